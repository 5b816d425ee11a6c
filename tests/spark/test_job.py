"""The Spark job's plumbing that needs no Spark: which files a range reads, bad arguments."""

from __future__ import annotations

from typing import Any

from klined.model import HOUR_MS, parse_time
from klined.spark import job


def test_one_glob_per_day_with_the_ranges_hours_and_only_sealed_parts() -> None:
    start = parse_time("2026-01-01T22:00:00Z")
    globs = job.day_globs("s3a://bucket/raw/", start, start + 3 * HOUR_MS)
    assert globs == [
        "s3a://bucket/raw/exchange=*/symbol=*/interval_minutes=1/year=2026/month=01/day=01"
        "/hour={22,23}/part-*.{jsonl,jsonl.gz}",
        "s3a://bucket/raw/exchange=*/symbol=*/interval_minutes=1/year=2026/month=01/day=02"
        "/hour={00}/part-*.{jsonl,jsonl.gz}",
    ]


def test_bad_arguments_exit_2_before_spark_starts(capsys: Any) -> None:
    argv = ["--lake", "/x", "--out", "/y", "--from", "2026-01-02", "--to", "2026-01-01"]
    assert job.main(argv) == 2
    assert "empty or reversed range" in capsys.readouterr().err
    assert job.main([*argv[:4], "--from", "soon", "--to", "2026-01-01"]) == 2
    assert "not a date" in capsys.readouterr().err
