from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from klined.model import (
    COMPLETENESS_ORDER,
    HOUR_MS,
    MINUTE_MS,
    SOURCE_RANK,
    Pair,
    Source,
    check_ohlcv,
    floor_hour,
    floor_interval,
    from_datetime,
    iso,
    minutes_of_hour,
    parse_shard,
    parse_time,
    plain_decimal,
    shard_of,
    silver_source,
)

ts = st.integers(min_value=0, max_value=4_102_444_800_000)


@given(ts)
def test_minute_and_hour_floors(t: int) -> None:
    h = floor_hour(t)
    assert h % HOUR_MS == 0 and h <= t < h + HOUR_MS
    mins = minutes_of_hour(t)
    assert len(mins) == 60 and mins[0] == h and floor_interval(t, MINUTE_MS) in mins


@given(ts, st.sampled_from([5, 15, 30, 60]))
def test_buckets_align_to_utc(t: int, minutes: int) -> None:
    start = floor_interval(t, minutes * MINUTE_MS)
    assert to_dt(start).minute % minutes == 0 and to_dt(start).second == 0


def to_dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def test_time_zone_never_matters() -> None:
    plus5 = timezone(timedelta(hours=5))
    assert from_datetime(datetime(2026, 1, 1, 5, 0, tzinfo=plus5)) == from_datetime(
        datetime(2026, 1, 1, 0, 0, tzinfo=UTC)
    )
    assert parse_time("2026-10-01") == parse_time("2026-10-01T00:00:00Z")
    assert iso(parse_time("2026-10-01T13:05:00+02:00")) == "2026-10-01T11:05:00Z"
    with pytest.raises(ValueError, match="2026-10-01"):
        parse_time("yesterday")


def test_pairs() -> None:
    assert Pair.parse(" btc/usd ") == Pair("BTC", "USD")
    assert Pair("ETH", "USDT").lake_name == "ETH-USDT"
    with pytest.raises(ValueError, match="BASE/QUOTE"):
        Pair.parse("BTCUSD")


def test_precedence_order() -> None:
    ranked = sorted(Source, key=SOURCE_RANK.__getitem__)
    assert ranked == [
        Source.WS_FINAL,
        Source.REST,
        Source.ARCHIVE,
        Source.TRADES,
        Source.NO_TRADES,
        Source.WS_PARTIAL,
    ]
    assert list(COMPLETENESS_ORDER) == ranked
    assert silver_source("archive", True) is Source.ARCHIVE
    assert silver_source("ws", True) is Source.WS_FINAL
    assert silver_source("ws", False) is Source.WS_PARTIAL
    assert silver_source("rest", True) is Source.REST


@pytest.mark.parametrize(
    ("value", "text"),
    [("1E-8", "0.00000001"), (0.5, "0.5"), ("100.000", "100"), ("-0", "0"), ("42", "42")],
)
def test_plain_decimal(value: object, text: str) -> None:
    assert plain_decimal(value) == text


@pytest.mark.parametrize("bad", ["NaN", "inf", "abc", None])
def test_plain_decimal_refuses_garbage(bad: object) -> None:
    with pytest.raises(ValueError):
        plain_decimal(bad)


def test_check_ohlcv() -> None:
    assert check_ohlcv("1", "2", "0.5", "1.5", "10") is None
    assert check_ohlcv("1", "0.5", "2", "1", "1") == "high below low"
    assert check_ohlcv("NaN", "2", "0.5", "1", "1") == "open is not finite"
    assert check_ohlcv("-1", "2", "0.5", "1", "1") == "non-positive price"
    assert check_ohlcv("1", "2", "0.5", "1", "-1") == "negative volume"
    assert check_ohlcv("x", "2", "0.5", "1", "1") == "non-numeric price or volume"


# ---------------------------------------------------------------------------------------------
# shards


@given(st.lists(st.from_regex(r"[A-Z]{2,6}/(USD|USDT|EUR)", fullmatch=True), unique=True))
def test_every_pair_belongs_to_exactly_one_shard(pairs: list[str]) -> None:
    for n in (1, 2, 3, 7):
        owners = {p: [k for k in range(1, n + 1) if shard_of("binance", p, n) == k] for p in pairs}
        assert all(len(ks) == 1 for ks in owners.values())


def test_shards_are_stable_deterministic_and_balanced() -> None:
    pairs = [f"C{i}/USD" for i in range(4000)]
    # the same on every host and every run: pinned values (a randomized hash would change)
    assert [shard_of("kraken", p, 4) for p in pairs[:8]] == [
        shard_of("kraken", Pair.parse(p), 4) for p in pairs[:8]
    ]
    assert shard_of("binance", "BTC/USD", 2) == 2
    counts = [sum(shard_of("binance", p, 4) == k for p in pairs) for k in (1, 2, 3, 4)]
    assert min(counts) > 850 and max(counts) < 1150
    # the exchange is part of the key: the two exchanges' lists split independently
    assert any(shard_of("binance", p, 2) != shard_of("kraken", p, 2) for p in pairs[:50])
    # growing n by one only moves pairs to the new shard, about 1/(n+1) of them
    moved = [p for p in pairs if shard_of("binance", p, 4) != shard_of("binance", p, 5)]
    assert all(shard_of("binance", p, 5) == 5 for p in moved)
    assert 600 < len(moved) < 1000


@pytest.mark.parametrize(("text", "shard"), [("1/1", (1, 1)), ("2/3", (2, 3)), (" 1 / 2 ", (1, 2))])
def test_parse_shard(text: str, shard: tuple[int, int]) -> None:
    assert parse_shard(text) == shard


@pytest.mark.parametrize("bad", ["", "1", "0/2", "3/2", "1/0", "a/b", "1/2000", "-1/2"])
def test_parse_shard_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_shard(bad)
