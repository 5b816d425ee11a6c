"""Trade -> 1m candle aggregation (Kraken history beyond the OHLC window)."""

from __future__ import annotations

import random
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from klined.exchanges.base import Trade
from klined.exchanges.trades import aggregate_trades, since_ns
from klined.model import MINUTE_MS, Pair, check_ohlcv

BTC = Pair("BTC", "USD")
M = 1_688_669_580_000  # a minute boundary


def agg(trades: list[Trade], start: int = M, end: int = M + 10 * MINUTE_MS, now: int | None = None):
    return aggregate_trades("kraken", BTC, "XBTUSD", trades, start, end, now or end)


def test_documented_trades_make_one_candle() -> None:
    trades = [
        Trade(1688669597827, "30243.4", "0.34507674", 61044952),
        Trade(1688669598280, "30243.3", "0.0037696", 61044953),
        Trade(1688669602698, "30243.3", "0.01235716", 61044956),
    ]
    (c,) = agg(trades)
    assert (c.exchange, c.symbol, c.native_symbol) == ("kraken", "BTC/USD", "XBTUSD")
    assert c.interval_start == M
    assert (c.open, c.high, c.low, c.close) == ("30243.4", "30243.4", "30243.3", "30243.3")
    assert c.volume == "0.3612035"
    q = Decimal("30243.4") * Decimal("0.34507674") + Decimal("30243.3") * Decimal("0.01612676")
    assert Decimal(c.quote_volume or "") == q
    assert Decimal(c.vwap or "") == q / Decimal("0.3612035")
    assert c.trade_count == 3
    assert c.origin == "trades" and c.is_final is True
    assert c.event_ts == c.ingestion_ts == M + 10 * MINUTE_MS
    assert bytes(c.raw) == b'{"trades":3,"first_id":61044952,"last_id":61044956}'


def test_open_close_by_time_then_trade_id_whatever_the_input_order() -> None:
    trades = [
        Trade(M + 1_000, "10", "1", 5),
        Trade(M + 1_000, "11", "1", 4),  # same ms, lower id: first
        Trade(M + 59_999, "12", "1", 9),
        Trade(M + 59_999, "9", "1", 10),  # same ms, higher id: last
    ]
    expected = agg(trades)
    for seed in range(5):
        shuffled = trades[:]
        random.Random(seed).shuffle(shuffled)
        assert agg(shuffled) == expected
    (c,) = expected
    assert (c.open, c.close, c.high, c.low) == ("11", "9", "12", "9")


def test_one_candle_per_minute_with_trades_only() -> None:
    trades = [Trade(M + 5, "1", "1", 1), Trade(M + 3 * MINUTE_MS + 5, "2", "3", 2)]
    candles = agg(trades)
    assert [c.interval_start for c in candles] == [M, M + 3 * MINUTE_MS]
    assert candles[1].volume == "3" and candles[1].quote_volume == "6"


def test_window_bounds_unfinished_minute_and_duplicates() -> None:
    trades = [
        Trade(M - 1, "1", "1", 1),  # before the window
        Trade(M, "2", "1", 2),
        Trade(M, "2", "1", 2),  # the same trade from an overlapping page
        Trade(M + MINUTE_MS, "3", "1", 3),  # the minute is not over at `now`
        Trade(M + 5 * MINUTE_MS, "4", "1", 4),  # at the (exclusive) end
    ]
    candles = agg(trades, end=M + 5 * MINUTE_MS, now=M + MINUTE_MS + 59_999)
    assert [(c.interval_start, c.trade_count) for c in candles] == [(M, 1)]


def test_zero_volume_trades_have_no_vwap() -> None:
    (c,) = agg([Trade(M, "5", "0", 1)])
    assert c.volume == "0" and c.vwap is None and c.quote_volume == "0"


def test_since_ns() -> None:
    assert since_ns(M) == "1688669580000000000"


prices = st.decimals(min_value=Decimal("0.00000001"), max_value=Decimal(10**6), places=8)
volumes = st.decimals(min_value=Decimal(0), max_value=Decimal(10**4), places=8)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5 * MINUTE_MS - 1), prices, volumes), min_size=1, max_size=40)
)
def test_aggregates_are_sane_and_exact(rows: list[tuple[int, Decimal, Decimal]]) -> None:
    trades = [Trade(M + t, str(p), str(v), i) for i, (t, p, v) in enumerate(rows)]
    candles = agg(trades, end=M + 5 * MINUTE_MS)
    assert sum(c.trade_count or 0 for c in candles) == len(trades)
    assert sum(Decimal(c.volume) for c in candles) == sum(v for _, _, v in rows)
    for c in candles:
        assert check_ohlcv(c.open, c.high, c.low, c.close, c.volume) is None
        assert c.interval_start % MINUTE_MS == 0
