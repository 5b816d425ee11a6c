"""The archive formats, pure: Binance's file plan, names, checksum files and kline rows (both
timestamp units, with and without a header); Kraken's member names and rows; the candles a
file's rows become (checks, omitted minutes, windows)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from klined.archives import binance as bn
from klined.archives import kraken as kr
from klined.archives.candles import ArchiveCandles, FileSpec, Row
from klined.errors import ArchiveError
from klined.exchanges import get_adapter
from klined.model import DAY_MS, MINUTE_MS, Pair, parse_time

JAN = parse_time("2026-01-01")
FEB = parse_time("2026-02-01")
MAR = parse_time("2026-03-01")


# ---------------------------------------------------------------------------- Binance: plan


def test_whole_months_as_monthly_files_the_rest_as_days() -> None:
    days = bn.whole_days(parse_time("2025-12-30"), parse_time("2026-02-03"), MAR)
    plan = bn.plan(days)
    assert [(p.kind, p.label) for p in plan] == [
        ("daily", "2025-12-30"),
        ("daily", "2025-12-31"),
        ("monthly", "2026-01"),
        ("daily", "2026-02-01"),
        ("daily", "2026-02-02"),
    ]
    assert plan[2].start_ms == JAN and plan[2].end_ms == FEB


def test_only_whole_days_that_are_over() -> None:
    start = parse_time("2026-01-01T06:00:00Z")
    end = parse_time("2026-01-05T12:00:00Z")
    published = parse_time("2026-01-04T15:00:00Z")  # the 3rd is over, the 4th is not
    assert bn.whole_days(start, end, published) == [JAN + DAY_MS, JAN + 2 * DAY_MS]
    assert bn.whole_days(start, start + DAY_MS, published) == []


@given(st.sets(st.integers(0, 400), max_size=120))
def test_the_plan_covers_exactly_the_days_asked(offsets: set[int]) -> None:
    days = [JAN + i * DAY_MS for i in offsets]
    plan = bn.plan(days)
    covered = [d for p in plan for d in p.days]
    assert sorted(covered) == sorted(days)
    assert covered == sorted(covered)
    for p in plan:
        if p.kind == bn.MONTHLY:
            assert bn.month_of(p.start_ms) == (p.start_ms, p.end_ms)


def test_file_names_and_paths() -> None:
    month = bn.Period(JAN, FEB, bn.MONTHLY)
    day = bn.Period(JAN + 14 * DAY_MS, JAN + 15 * DAY_MS, bn.DAILY)
    assert bn.file_name("BTCUSD", month) == "BTCUSD-1m-2026-01.zip"
    assert bn.file_path("BTCUSD", day) == ("spot/daily/klines/BTCUSD/1m/BTCUSD-1m-2026-01-15.zip")
    assert bn.checksum_path("BTCUSD", month).endswith("/BTCUSD-1m-2026-01.zip.CHECKSUM")
    assert [p.label for p in bn.daily_periods(month)][:2] == ["2026-01-01", "2026-01-02"]
    assert len(bn.daily_periods(month)) == 31


# ------------------------------------------------------------------------- Binance: checksum

SHA = "a" * 63 + "F"


@pytest.mark.parametrize(
    "body",
    [
        f"{SHA}  BTCUSD-1m-2026-01.zip\n",
        f"{SHA} *BTCUSD-1m-2026-01.zip",  # binary-mode marker
        f"\n{SHA}  data/spot/monthly/klines/BTCUSD/1m/BTCUSD-1m-2026-01.zip\n\n",
    ],
)
def test_checksum_files(body: str) -> None:
    assert bn.parse_checksum(body.encode(), "BTCUSD-1m-2026-01.zip") == SHA.lower()


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (f"{SHA}  ETHUSD-1m-2026-01.zip", "is for 'ETHUSD-1m-2026-01.zip'"),
        ("<Error><Code>NoSuchKey</Code></Error>", "unreadable"),
        (f"{SHA[:-1]}  BTCUSD-1m-2026-01.zip", "unreadable"),
        (f"{SHA}  BTCUSD-1m-2026-01.zip\n{SHA}  BTCUSD-1m-2026-01.zip", "unreadable"),
    ],
)
def test_bad_checksum_files(body: str, why: str) -> None:
    with pytest.raises(ArchiveError, match=why):
        bn.parse_checksum(body.encode(), "BTCUSD-1m-2026-01.zip")


# ------------------------------------------------------------------------- Binance: rows

MS_ROW = (
    "1767225600000,87375.50000000,87466.64000000,87328.49000000,87432.63000000,1.47908000,"
    "1767225659999,129258.38536050,58,0.64113000,56027.72356070,0"
)
US_ROW = (
    "1767225600000000,87375.50000000,87466.64000000,87328.49000000,87432.63000000,1.47908000,"
    "1767225659999999,129258.38536050,58,0.64113000,56027.72356070,0"
)
HEADER = (
    "open_time,open,high,low,close,volume,close_time,quote_volume,count,taker_buy_volume,"
    "taker_buy_quote_volume,ignore"
)


def binance_rows(*lines: str) -> list[tuple[int, Row]]:
    return list(bn.rows(enumerate(lines, 1), "BTCUSD-1m-2026-01-01.zip"))


def test_milliseconds_and_microseconds_read_the_same() -> None:
    ((_, ms),) = binance_rows(MS_ROW)
    ((_, us),) = binance_rows(US_ROW)
    assert ms == us
    assert ms.minute == JAN and ms.trades == 58 and ms.quote_volume == "129258.38536050"


def test_a_header_row_is_skipped_only_on_line_one() -> None:
    assert [n for n, _ in binance_rows(HEADER, MS_ROW)] == [2]
    with pytest.raises(ArchiveError, match="line 2: open time"):
        binance_rows(MS_ROW, HEADER)


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("1767225600000,1,2,3", "4 fields"),
        (MS_ROW.replace("1767225659999", "1767225720000"), "does not close the 1m kline"),
        (MS_ROW.replace(",58,", ",5.8,"), "whole number"),
    ],
)
def test_bad_binance_rows_name_the_line(line: str, why: str) -> None:
    with pytest.raises(ArchiveError, match=f"line 2: .*{why}"):
        binance_rows(MS_ROW.replace("1767225600000", "1767225540000").replace(
            "1767225659999", "1767225599999"), line)  # fmt: skip


# ----------------------------------------------------------------------------- Kraken


def test_member_names() -> None:
    assert kr.member_name("XBTUSD_1.csv") == ("XBTUSD", 1)
    assert kr.member_name("Kraken_OHLCVT/XDGUSD_1440.csv") == ("XDGUSD", 1440)
    assert kr.member_name("TRADES/XBTUSD.csv") is None
    assert kr.member_name("readme.txt") is None


def test_kraken_file_names_map_to_configured_pairs_through_the_adapter() -> None:
    adapter = get_adapter("kraken")
    pairs = [Pair.parse(p) for p in ("BTC/USD", "DOGE/USD", "ETH/USD", "SOL/USD")]
    names = kr.pair_names(adapter, pairs)
    assert names["XBTUSD"] == Pair("BTC", "USD")
    assert names["XDGUSD"] == Pair("DOGE", "USD")
    assert names["ETHUSD"] == Pair("ETH", "USD")
    assert names["SOLUSD"] == Pair("SOL", "USD")
    assert "ADAUSD" not in names


def test_kraken_rows() -> None:
    rows = list(kr.rows(enumerate(["1381095120,122.0,122.0,122.0,122.0,0.1,1"], 1), "X"))
    assert rows == [(1, Row(1_381_095_120_000, "122.0", "122.0", "122.0", "122.0", "0.1", None, 1))]
    with pytest.raises(ArchiveError, match="line 1: 6 fields"):
        list(kr.rows(enumerate(["1381095120,122.0,122.0,122.0,122.0,0.1"], 1), "X"))
    with pytest.raises(ArchiveError, match="line 2: time"):
        list(kr.rows(enumerate(["1,1,1,1,1,1,1", "x,1,1,1,1,1,1"], 1), "X"))


# ----------------------------------------------------------------------------- candles

BTC = Pair("BTC", "USD")


def row(minute: int, close: str = "10", trades: int = 2, volume: str = "1.5") -> Row:
    return Row(minute, close, close, close, close, volume, None, trades)


def candles(rows: list[Row], **spec: object) -> ArchiveCandles:
    fs = FileSpec("kraken", BTC, "XBTUSD", "XBTUSD_1.csv", **spec)  # type: ignore[arg-type]
    return ArchiveCandles(fs, enumerate(rows, 1), stamp_ms=7)


def test_omitted_minutes_between_rows_are_no_trades_at_the_previous_close() -> None:
    out = list(candles([row(JAN, "10"), row(JAN + 3 * MINUTE_MS, "12")]))
    assert [(c.interval_start - JAN) // MINUTE_MS for c in out] == [0, 1, 2, 3]
    assert [c.origin for c in out] == ["archive", "no_trades", "no_trades", "archive"]
    quiet = out[1]
    assert (quiet.open, quiet.high, quiet.low, quiet.close) == ("10",) * 4
    assert (quiet.volume, quiet.trade_count, quiet.is_final) == ("0", 0, True)
    assert all(c.event_ts == 7 and c.ingestion_ts == 7 for c in out)


def test_a_window_keeps_its_minutes_and_fills_from_a_close_before_it() -> None:
    c = candles([row(JAN, "10"), row(JAN + 10 * MINUTE_MS, "12")],
                window=(JAN + 5 * MINUTE_MS, JAN + 12 * MINUTE_MS))  # fmt: skip
    out = list(c)
    assert [(x.interval_start - JAN) // MINUTE_MS for x in out] == [5, 6, 7, 8, 9, 10]
    assert out[0].close == "10" and out[-1].close == "12"
    assert (c.stats.first_minute, c.stats.last_minute) == (
        JAN + 5 * MINUTE_MS,
        JAN + 10 * MINUTE_MS,
    )
    assert (c.stats.rows, c.stats.no_trades, c.stats.lines) == (6, 5, 2)


def test_a_zero_trade_row_is_no_trades_and_numbers_are_plain() -> None:
    (first, second) = list(candles([row(JAN, "10.500", volume="2.000"),
                                    row(JAN + MINUTE_MS, "10.5", 0, "0.0")]))  # fmt: skip
    assert (first.close, first.volume, first.origin) == ("10.5", "2", "archive")
    assert (second.origin, second.volume) == ("no_trades", "0")


def test_binance_rows_get_the_rest_vwap() -> None:
    fs = FileSpec("binance", BTC, "BTCUSD", "BTCUSD-1m-2026-01-01.zip")
    ((_, r),) = binance_rows(MS_ROW)
    (c,) = list(ArchiveCandles(fs, [(1, r)], stamp_ms=1))
    assert c.quote_volume == "129258.3853605"
    assert Decimal(c.vwap or "0") == Decimal("129258.3853605") / Decimal("1.47908")


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (Row(JAN, "10", "9", "11", "10", "1", None, 1), "high 9 is below low 11"),
        (Row(JAN, "12", "11", "9", "10", "1", None, 1), "outside the high-low range"),
        (Row(JAN, "0", "0", "0", "0", "1", None, 1), "non-positive price"),
        (Row(JAN, "NaN", "1", "1", "1", "1", None, 1), "open is not a positive number"),
        (Row(JAN, "1x", "1", "1", "1", "1", None, 1), "open is not a number"),
        (Row(JAN, "1", "1", "1", "1", "-1", None, 1), "volume is not a non-negative"),
        (Row(JAN, "1", "1", "1", "1", "1", None, -1), "trade count -1 is negative"),
        (Row(JAN + 1, "1", "1", "1", "1", "1", None, 1), "not the start of a minute"),
    ],
)
def test_impossible_rows_name_the_line(bad: Row, why: str) -> None:
    with pytest.raises(ArchiveError, match=f"XBTUSD_1.csv line 2: .*{why}"):
        list(candles([row(JAN - MINUTE_MS), bad]))


def test_rows_out_of_order_or_outside_the_files_period() -> None:
    with pytest.raises(ArchiveError, match=r"line 2: the row for .* repeats"):
        list(candles([row(JAN), row(JAN)]))
    with pytest.raises(ArchiveError, match=r"line 2: the row for .* comes before"):
        list(candles([row(JAN), row(JAN - MINUTE_MS)]))
    with pytest.raises(ArchiveError, match="line 1: a row for 2026-02-01"):
        list(candles([row(FEB)], period=(JAN, FEB)))


@given(st.lists(st.integers(0, 300), min_size=1, max_size=40, unique=True))
def test_every_minute_from_the_first_row_to_the_last_exactly_once(offsets: list[int]) -> None:
    minutes = sorted(JAN + i * MINUTE_MS for i in offsets)
    out = list(candles([row(m, str(10 + i)) for i, m in enumerate(minutes)]))
    assert [c.interval_start for c in out] == list(range(minutes[0], minutes[-1] + 1, MINUTE_MS))
    by_minute = {c.interval_start: c for c in out}
    for i, m in enumerate(minutes):
        assert by_minute[m].close == str(10 + i) and by_minute[m].origin == "archive"
