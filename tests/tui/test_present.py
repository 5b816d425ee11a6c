"""The dashboard's presentation rules, without a running app."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from klined.model import HOUR_MS, parse_time
from klined.status import PairStatus, StreamState
from klined.tui.fakes import hour_row
from klined.tui.present import (
    allocate,
    exchange_rates,
    fmt_pct,
    fmt_span,
    group_pairs,
    group_runs,
    heat_level,
    order_streams,
    steps_of,
    window_hours,
)
from klined.tui.sources import JobRun, redact_dsn
from klined.tui.widgets.bars import stacked_bar

NOW = parse_time("2026-11-26T13:47:12Z")


def pair(exchange: str, symbol: str, state: StreamState, **kw: object) -> PairStatus:
    return PairStatus(exchange=exchange, symbol=symbol, state=state, **kw)  # type: ignore[arg-type]


def test_problems_come_first_then_name() -> None:
    pairs = [
        pair("binance", "BTC/USD", StreamState.CONNECTED),
        pair("kraken", "ETH/USD", StreamState.BACKOFF),
        pair("binance", "ETH/USD", StreamState.CONNECTED),
        pair("kraken", "SOL/USD", StreamState.DOWN),
        pair("binance", "SOL/USD", StreamState.STALE),
        pair("binance", "PUMP/USD", StreamState.UNLISTED),
        pair("kraken", "DOT/USD", StreamState.CONNECTING),
    ]
    ordered = order_streams(pairs, sort="problems", reverse=False, filter_text="", now_ms=NOW)
    assert [(p.exchange, p.symbol) for p in ordered] == [
        ("kraken", "SOL/USD"),
        ("binance", "SOL/USD"),
        ("kraken", "ETH/USD"),
        ("binance", "PUMP/USD"),
        ("kraken", "DOT/USD"),
        ("binance", "BTC/USD"),
        ("binance", "ETH/USD"),
    ]


def test_filter_terms_must_all_match_anywhere() -> None:
    pairs = [
        pair("binance", "BTC/USD", StreamState.CONNECTED),
        pair("kraken", "BTC/USD", StreamState.BACKOFF, last_error="connection reset by peer"),
        pair("kraken", "ETH/USD", StreamState.CONNECTED),
    ]

    def names(text: str) -> list[str]:
        got = order_streams(pairs, sort="pair", reverse=False, filter_text=text, now_ms=NOW)
        return [f"{p.exchange} {p.symbol}" for p in got]

    assert names("btc") == ["binance BTC/USD", "kraken BTC/USD"]
    assert names("KRAKEN btc") == ["kraken BTC/USD"]
    assert names("reset") == ["kraken BTC/USD"]
    assert names("btcusd") == ["binance BTC/USD", "kraken BTC/USD"]
    assert names("nothing-like-this") == []


def test_age_sort_puts_the_silent_ones_first() -> None:
    pairs = [
        pair("binance", "A/USD", StreamState.CONNECTED, last_message_ms=NOW - 1_000),
        pair("binance", "B/USD", StreamState.CONNECTED, last_message_ms=None),
        pair("binance", "C/USD", StreamState.CONNECTED, last_message_ms=NOW - 90_000),
    ]
    got = order_streams(pairs, sort="age", reverse=False, filter_text="", now_ms=NOW)
    assert [p.symbol for p in got] == ["B/USD", "C/USD", "A/USD"]


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (None, "—"),
        (850, "850ms"),
        (4_200, "4.2s"),
        (42_000, "42s"),
        (185_000, "3m05s"),
        (2 * HOUR_MS + 600_000, "2h10m"),
        (76 * HOUR_MS, "3d04h"),
        (-5, "0ms"),
    ],
)
def test_spans_fit_narrow_columns(ms: int | None, text: str) -> None:
    assert fmt_span(ms) == text


def test_percent_never_rounds_up_to_complete() -> None:
    assert fmt_pct(1.0) == "100%"
    assert fmt_pct(0.99999) == "99.9%"
    assert fmt_pct(0.5) == "50.0%"
    assert fmt_pct(None) == "—"


@given(
    counts=st.lists(st.integers(min_value=0, max_value=60), min_size=6, max_size=6),
    slots=st.integers(min_value=1, max_value=12),
)
def test_allocate_fills_exactly_and_never_hides_missing(counts: list[int], slots: int) -> None:
    cells = allocate(counts, slots, keep=(4, 5))
    if sum(counts) == 0:
        assert cells == [0] * 6
        return
    assert sum(cells) == slots
    assert all(c >= 0 for c in cells)
    assert all(c == 0 for c, n in zip(cells, counts, strict=True) if n == 0)
    if counts[5] > 0 and slots >= 2:
        assert cells[5] >= 1


def test_one_missing_minute_shows_on_a_bar() -> None:
    h = hour_row("binance", "BTC/USD", 0, missing=1)
    bar = stacked_bar(h, rows=3)
    colors = {str(span.style.color.name) for span in bar.spans}  # type: ignore[union-attr]
    assert "#f85149" in colors  # missing is red
    assert len(bar.plain.splitlines()) == 3


def test_heat_levels() -> None:
    assert heat_level(None) == "none"
    assert heat_level(hour_row("b", "X/USD", 0)) == "complete"
    assert heat_level(hour_row("b", "X/USD", 0, rest=10, no_trades=5)) == "complete"
    assert heat_level(hour_row("b", "X/USD", 0, ws_partial=2)) == "partial"
    assert heat_level(hour_row("b", "X/USD", 0, missing=6)) == "gaps"
    assert heat_level(hour_row("b", "X/USD", 0, missing=7)) == "bad"


def test_window_is_the_last_closed_hours_oldest_first() -> None:
    hours = window_hours(NOW, 3)
    assert hours == [
        parse_time("2026-11-26T10:00:00Z"),
        parse_time("2026-11-26T11:00:00Z"),
        parse_time("2026-11-26T12:00:00Z"),
    ]


def test_pairs_worst_first_and_exchange_totals() -> None:
    h12, h11 = window_hours(NOW, 2)[::-1]
    rows = [
        hour_row("binance", "BTC/USD", h12),
        hour_row("binance", "BTC/USD", h11, missing=6),
        hour_row("kraken", "ETH/USD", h12, ws_partial=1),
        hour_row("kraken", "SOL/USD", h12),
    ]
    grouped = group_pairs(rows)
    assert [p.key for p in grouped] == ["binance:BTC/USD", "kraken:ETH/USD", "kraken:SOL/USD"]
    assert grouped[0].rate == pytest.approx(114 / 120)
    assert exchange_rates(rows) == {"binance": (114, 120), "kraken": (119, 120)}


def test_runs_grouped_by_hour_latest_attempt_wins() -> None:
    h = parse_time("2026-11-26T12:00:00Z")
    runs = [
        JobRun(1, h, "gapfill", "failed", error="429"),
        JobRun(2, h, "gapfill", "ok", rows=4),
        JobRun(3, h - HOUR_MS, "flush", "ok"),
        JobRun(4, h, "vacuum", "ok"),
    ]
    groups = group_runs(runs)
    assert [g.hour_ms for g in groups] == [h, h - HOUR_MS]
    assert groups[0].latest["gapfill"].run_id == 2
    assert [r.run_id for r in groups[0].runs] == [4, 2, 1]
    assert steps_of(groups)[-1] == "vacuum"


def test_dsn_password_is_never_shown() -> None:
    assert redact_dsn("postgresql://klined:s3cret@db:5432/klined") == (
        "postgresql://klined:***@db:5432/klined"
    )
    assert redact_dsn("postgresql://klined@db/klined") == "postgresql://klined@db/klined"
