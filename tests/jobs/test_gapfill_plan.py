"""Missing-minute planning and batching (pure)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from klined.jobs.gapplan import (
    OHLC_WINDOW_MARGIN,
    batch,
    closed_range,
    estimate,
    ohlc_oldest,
    plan_windows,
    runs,
    split_by_window,
    trade_windows,
    wanted_minutes,
)
from klined.model import HOUR_MS, MINUTE_MS

H = 1_790_000_000_000 - 1_790_000_000_000 % HOUR_MS  # an hour start
M = MINUTE_MS


def test_closed_range_stops_before_the_unfinished_minute() -> None:
    now = H + 10 * M + 30_000
    assert list(closed_range(H, H + HOUR_MS, now)) == [H + i * M for i in range(10)]
    assert list(closed_range(H + 1, H + 3 * M, H + HOUR_MS)) == [H + M, H + 2 * M]
    assert list(closed_range(H, H + HOUR_MS, H - 1)) == []


def test_wanted_minutes_follow_precedence() -> None:
    sources = {
        H: "ws_final",
        H + M: "ws_partial",
        H + 2 * M: "rest",
        H + 3 * M: "no_trades",
        H + 4 * M: "trades",
    }
    end = H + 6 * M
    assert wanted_minutes(H, end, sources, H + HOUR_MS) == [H + M, H + 5 * M]
    assert wanted_minutes(H, end, sources, H + HOUR_MS, refetch=True) == [
        H + M,
        H + 2 * M,
        H + 3 * M,
        H + 4 * M,
        H + 5 * M,
    ]


def test_runs() -> None:
    mins = [H, H + M, H + 2 * M, H + 5 * M, H + 7 * M, H + 8 * M]
    assert runs(mins) == [(H, H + 3 * M), (H + 5 * M, H + 6 * M), (H + 7 * M, H + 9 * M)]
    assert runs([]) == []


@settings(max_examples=200, deadline=None)
@given(
    offsets=st.sets(st.integers(0, 5000), max_size=400),
    cap=st.sampled_from([1, 7, 60, 720, 1000]),
)
def test_batch_covers_every_minute_with_the_fewest_requests(offsets: set[int], cap: int) -> None:
    minutes = sorted(H + o * M for o in offsets)
    windows = batch(minutes, cap)
    for w in windows:
        assert 1 <= w.minutes <= cap
        assert w.start_ms in minutes and w.end_ms - M in minutes  # trimmed to wanted minutes
    covered = [m for m in minutes if any(w.start_ms <= m < w.end_ms for w in windows)]
    assert covered == minutes
    assert all(a.end_ms <= b.start_ms for a, b in itertools.pairwise(windows))
    # a lower bound: every window spans at most cap minutes, so no cover can use fewer
    if minutes:
        greedy_lower = 0
        edge = None
        for m in minutes:
            if edge is None or m >= edge:
                greedy_lower += 1
                edge = m + cap * M
        assert len(windows) == greedy_lower


def test_a_full_day_is_two_binance_requests_and_a_month_is_the_minimum() -> None:
    day = [H + i * M for i in range(1440)]
    assert [w.minutes for w in batch(day, 1000)] == [1000, 440]
    month = [H + i * M for i in range(30 * 1440)]
    assert len(batch(month, 1000)) == 44  # ceil(43200 / 1000)


def test_kraken_split_by_the_ohlc_window() -> None:
    now = H + 30 * M + 5_000
    oldest = ohlc_oldest(now, 720)
    assert oldest == H + 30 * M - (719 - OHLC_WINDOW_MARGIN) * M
    minutes = [oldest - 2 * M, oldest - M, oldest, oldest + M]
    recent, old = split_by_window(minutes, now, 720)
    assert recent == [oldest, oldest + M] and old == [oldest - 2 * M, oldest - M]
    assert split_by_window(minutes, now, None) == (minutes, [])


def test_trade_windows_bridge_short_gaps() -> None:
    mins = [H, H + M, H + 10 * M, H + 100 * M]
    ws = trade_windows(mins, bridge_minutes=30)
    assert [(w.start_ms, w.end_ms, w.kind) for w in ws] == [
        (H, H + 11 * M, "trades"),
        (H + 100 * M, H + 101 * M, "trades"),
    ]


def test_plan_windows_mixes_both_endpoints_in_time_order() -> None:
    now = H + 2 * 24 * HOUR_MS
    mins = [H + i * M for i in range(0, 2 * 24 * 60)]
    ws = plan_windows(mins, now, 720, 720)
    assert ws[0].kind == "trades" and ws[-1].kind == "candles"
    assert sum(w.minutes for w in ws) == len(mins)
    assert [w.start_ms for w in ws] == sorted(w.start_ms for w in ws)
    est = estimate(len(mins), ws, 1, 1, 0.33)
    assert est.candle_requests == 1 and est.trades_requests >= 1
    assert est.seconds == est.cost / 0.33
