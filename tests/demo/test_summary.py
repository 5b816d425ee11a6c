"""The demo's printed summary says what its figures are."""

from __future__ import annotations

from pathlib import Path

from klined.demo.summary import CompletenessLine, StreamLine, Summary
from klined.model import parse_time


def test_the_completeness_table_is_labelled_in_minutes() -> None:
    hours = [parse_time("2026-12-03T12:00Z"), parse_time("2026-12-03T13:00Z")]
    summary = Summary(Path("/tmp/demo"), 30.0, 1, 3, hours)
    summary.streams = [StreamLine("binance", connected=True, pairs=3, events=10)]
    counts = {"ws_final": 300, "rest": 50, "missing": 10}
    summary.completeness = [CompletenessLine("binance", rows=6, expected=360, counts=counts)]
    text = summary.render()
    section = text.split("completeness  ", 1)[1].split("\n\n", 1)[0]
    assert "(minutes, from monitoring.hourly_completeness)" in section
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "pair-hours from" not in text
    header, row = section.splitlines()[2:4]
    assert header.split()[0] == "expected" and row.split()[:2] == ["binance", "360"]
