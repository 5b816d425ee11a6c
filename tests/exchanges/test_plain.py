"""The adapters' plain-number fast paths agree with the exact ``Decimal`` path, always.

Each adapter reads nearly every frame through a fast path (plain number text, string work) and
falls back to the general path for anything unusual. These tests feed both the same frames,
well-formed and not, and require identical results: the same candles, text for text, and the
same malformed reports.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from klined.config import SymbolOverride
from klined.exchanges import Binance, Kraken
from klined.exchanges.base import Frame, ListedPair
from klined.exchanges.common import _parse_rfc3339_full, parse_rfc3339_ms, plain_number
from klined.model import Pair, plain_decimal

T0 = 1_672_515_780_000  # a minute boundary
SESSION = "sess"
RECEIVED = 1_672_515_790_000
BTC = Pair("BTC", "USD")


class GeneralBinance(Binance):
    """The reference: the general (exact) path only."""

    def _plain_frame(self, buf: bytes, session_id: str, received_ms: int) -> Frame | None:
        return None


class GeneralKraken(Kraken):
    def _plain_frame(self, buf: bytes, session_id: str, received_ms: int) -> Frame | None:
        return None


def both(fast: Any, general: Any, data: bytes) -> tuple[Frame, Frame]:
    kw = {"session_id": SESSION, "received_ms": RECEIVED}
    return fast.parse_frame(data, **kw), general.parse_frame(data, **kw)


# -- numbers ----------------------------------------------------------------------------------

near_one = [
    "1", "1.0", "1.00000000", "0.99999999999999999999", "1.00000000000000000001", "01",
    "1.000000000000000000000000000001", "0.999999999999999999999999999999",
]  # fmt: skip
odd = [
    "", " 1", "1 ", "1e5", "1E-7", "NaN", "nan", "inf", "-Infinity", "-0", "-1", "0", "0.0",
    "+1", "١٢", "1_000", ".5", "5.", "00.5", "0.00000000", "1\n", "1.2.3", "12 34", "0x10",
]  # fmt: skip
number_text = st.one_of(
    st.sampled_from(near_one + odd),
    st.from_regex(r"-?(0|[1-9][0-9]{0,12})(\.[0-9]{1,12})?", fullmatch=True),
    st.from_regex(r"0{0,2}[0-9]{1,4}(\.[0-9]{1,6}0{0,4})?", fullmatch=True),
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(number_text, st.integers(-5, 10**30), st.booleans(), st.none()))
@example("10.50")
@example("0.000")
@example("100")
def test_plain_number_is_plain_decimal(value: object) -> None:
    for _ in range(2):  # the second time from the memo
        got = plain_number(value)
        if got is not None:
            assert got == (plain_decimal(value), Decimal(str(value)))
            assert got[1] >= 0 and isinstance(value, str | int) and not isinstance(value, bool)
            assert "E" not in got[0] and "e" not in got[0]


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 4_102_444_799_999),
    st.sampled_from(["", ".1", ".123", ".123456789", ".000000000", ".1234567890"]),
    st.sampled_from(["Z", "z", "+00:00", "-01:30", "Z\n", "ZZ", ""]),
    st.sampled_from([":", "٣", "7"]),
)
def test_cached_rfc3339_is_the_full_parser(ms: int, frac: str, tz: str, sep: str) -> None:
    from datetime import UTC, datetime

    dt = datetime.fromtimestamp(ms // 1000, tz=UTC)
    base = dt.strftime("%Y-%m-%dT%H:%M")
    seconds = dt.strftime("%S")
    for text in (f"{base}:{seconds}{frac}{tz}", f"{base}{sep}{seconds}{frac}{tz}", f"{base}:00Z"):
        for _ in range(2):  # the second time, from the caches
            try:
                expected: int | str = _parse_rfc3339_full(text)
            except ValueError:
                expected = "error"
            try:
                got: int | str = parse_rfc3339_ms(text)
            except ValueError:
                got = "error"
            assert got == expected, text


# -- Binance ----------------------------------------------------------------------------------


def kline_frame(nums: list[str], **k: object) -> bytes:
    o, h, lo, c, v, q = nums
    body: dict[str, object] = {
        "t": T0, "T": T0 + 59_999, "s": "BTCUSD", "i": "1m", "f": 1, "L": 2, "o": o, "c": c,
        "h": h, "l": lo, "v": v, "n": 3, "x": False, "q": q, "V": "0", "Q": "0", "B": "0",
    }  # fmt: skip
    body.update(k)
    event = {"e": "kline", "E": T0 + 5_000, "s": body["s"], "k": body}
    return json.dumps({"stream": "btcusd@kline_1m", "data": event}).encode()


def binance_pair() -> tuple[Binance, Binance]:
    return Binance(), GeneralBinance()


@settings(max_examples=300, deadline=None)
@given(st.lists(number_text, min_size=6, max_size=6))
@example(["16500.10", "16505.00", "16499.00", "16502.00", "2.5", "41255.00"])
@example(["1", "1", "1", "1", "0.00000000", "0"])
@example(["1", "1", "1", "1", "0", "5"])
@example(["1.00000000000000000001", "1.00000000000000000001", "1", "1", "1", "1"])
def test_binance_fast_path_is_the_general_path(nums: list[str]) -> None:
    fast, general = binance_pair()
    got, want = both(fast, general, kline_frame(nums))
    assert got == want


def test_binance_reads_a_plain_kline_on_the_fast_path() -> None:
    frame = kline_frame(["16500.10", "16505.00", "16499.00", "16502.00", "2.5", "41255.00"])
    fast = Binance()._plain_frame(frame, SESSION, RECEIVED)
    assert fast is not None and fast == GeneralBinance().parse_frame(
        frame, session_id=SESSION, received_ms=RECEIVED
    )
    (c,) = fast.candles
    assert (c.open, c.high, c.low, c.close) == ("16500.1", "16505", "16499", "16502")
    assert (c.volume, c.quote_volume, c.vwap) == ("2.5", "41255", "16502")


@pytest.mark.parametrize(
    "changes",
    [
        {"i": "5m"},
        {"t": T0 + 1},
        {"t": 0},
        {"n": -1},
        {"s": "XYZ"},
        {"s": "ETHUSDT"},
        {"x": True},
        {"o": 5},
        {"q": None},
        {"q": "-1"},
    ],
)
def test_binance_fast_path_agrees_on_other_fields(changes: dict[str, object]) -> None:
    fast, general = binance_pair()
    frame = kline_frame(["100.5", "101", "100", "100.75", "3.25", "326.8"], **changes)
    got, want = both(fast, general, frame)
    assert got == want


def test_binance_fast_path_agrees_with_multipliers_and_odd_frames() -> None:
    scaled = {Pair("REKT", "USD"): SymbolOverride(native="1000REKTUSD", multiplier=1000)}
    fast, general = Binance(scaled), GeneralBinance(scaled)
    frame = kline_frame(["0.002", "0.0025", "0.0015", "0.002", "1000", "2"], s="1000REKTUSD")
    got, want = both(fast, general, frame)
    assert got == want and got.candles[0].open == "0.000002"
    for data in (
        b'{"result":null,"id":1}',
        b'{"e":"kline","E":1,"s":"BTCUSD"}',
        kline_frame(["1", "1", "1", "1", "1", "1"])[:-1],
        kline_frame(["1", "1", "1", "1", "1", "1"]).replace(b'"stream"', b'"stream":1,"x"'),
        b"  " + kline_frame(["1", "2", "0.5", "1", "1", "1"]) + b"\n",
        kline_frame(["1", "2", "0.5", "1", "1", "1"]).replace(b", ", b",\n "),
    ):
        got, want = both(fast, general, data)
        assert got == want, data


# -- Kraken -----------------------------------------------------------------------------------

json_number = st.one_of(
    st.from_regex(r"-?(0|[1-9][0-9]{0,8})(\.[0-9]{1,10})?([eE][+-]?[0-9]{1,2})?", fullmatch=True),
    st.sampled_from(["1.50", "1.0", "0.0", "-0.0", "0", "-0", "27000.1", "1e-7", "100"]),
    number_text.map(json.dumps),  # a JSON string
    st.sampled_from(["null", "true", "[1]", "{}"]),
)


def kraken_frame(*candles: dict[str, str]) -> bytes:
    items = []
    for c in candles:
        fields = {
            "symbol": json.dumps(c.get("symbol", "BTC/USD")),
            "open": c.get("open", "27000.1"),
            "high": c.get("high", "27010.5"),
            "low": c.get("low", "26990.0"),
            "close": c.get("close", "27005.25"),
            "trades": c.get("trades", "12"),
            "volume": c.get("volume", "1.23456789"),
            "vwap": c.get("vwap", "27001.7"),
            "interval_begin": json.dumps(c.get("interval_begin", "2023-10-04T16:25:00.000000000Z")),
            "interval": c.get("interval", "1"),
            "timestamp": json.dumps(c.get("timestamp", "2023-10-04T16:26:00.000000Z")),
        }
        items.append("{" + ",".join(f'"{k}":{v}' for k, v in fields.items() if v != "-") + "}")
    stamp = '"2023-10-04T16:25:07.123456789Z"'
    return (
        f'{{"channel":"ohlc","type":"update","timestamp":{stamp},"data":[{",".join(items)}]}}'
    ).encode()


@settings(max_examples=300, deadline=None)
@given(st.lists(json_number, min_size=6, max_size=6), st.booleans())
@example(["27000.1", "27010.5", "26990.0", "27005.25", "1.23456789", "27001.7"], False)
@example(["1", "1", "1", "1", "0", "0"], False)
@example(["1", "1", "1", "1", "0", "null"], False)
@example(["1", "1", "1", "1", "2", "0"], False)
@example(["1", "1", "1", "1", "2", "-"], True)
def test_kraken_fast_path_is_the_general_path(nums: list[str], two: bool) -> None:
    o, h, lo, c, v, w = nums
    candle = {"open": o, "high": h, "low": lo, "close": c, "volume": v, "vwap": w}
    candles = [candle, {"interval_begin": "2023-10-04T16:26:00Z"}] if two else [candle]
    got, want = both(Kraken(), GeneralKraken(), kraken_frame(*candles))
    assert got == want


def test_kraken_reads_plain_candles_on_the_fast_path() -> None:
    frame = kraken_frame({}, {"interval_begin": "2023-10-04T16:26:00Z", "volume": "3"})
    fast = Kraken()._plain_frame(frame, SESSION, RECEIVED)
    assert fast is not None and fast == GeneralKraken().parse_frame(
        frame, session_id=SESSION, received_ms=RECEIVED
    )
    first, second = fast.candles
    assert (first.open, first.low, first.volume, first.vwap) == (
        "27000.1",
        "26990",
        "1.23456789",
        "27001.7",
    )
    assert second.volume == "3" and second.interval_start == first.interval_start + 60_000


@pytest.mark.parametrize(
    "changes",
    [
        {"interval": "5"},
        {"interval_begin": "2023-10-04T16:25:30Z"},
        {"interval_begin": "yesterday"},
        {"trades": "-1"},
        {"trades": "null"},
        {"trades": "-"},
        {"symbol": "XBT/USD"},
        {"symbol": "NOPE"},
        {"timestamp": "-"},
        {"vwap": "-"},
        {"interval": "-"},
    ],
)
def test_kraken_fast_path_agrees_on_other_fields(changes: dict[str, str]) -> None:
    got, want = both(Kraken(), GeneralKraken(), kraken_frame(changes))
    assert got == want


def test_kraken_fast_path_agrees_with_multipliers_and_odd_frames() -> None:
    scaled = {Pair("REKT", "USD"): SymbolOverride(multiplier=1000)}
    got, want = both(Kraken(scaled), GeneralKraken(scaled), kraken_frame({"symbol": "REKT/USD"}))
    assert got == want and got.candles[0].volume == "1234.56789"
    for data in (
        b'{"channel":"ohlc","type":"update","data":[]}',
        b'{"channel":"ohlc","type":"update"}',
        kraken_frame({}).replace(b'"timestamp":"2023-10-04T16:25:07.123456789Z",', b""),
        kraken_frame({}).replace(b",", b",\r\n"),
        kraken_frame({}, {"high": "1"}),
        b'{"channel":"heartbeat"}',
    ):
        got, want = both(Kraken(), GeneralKraken(), data)
        assert got == want, data


# -- symbols ----------------------------------------------------------------------------------


def test_subscribed_names_map_back_to_their_pairs_without_a_listing() -> None:
    rekt = Pair("REKT", "USD")
    a = Binance()
    a.subscribe_messages([BTC, rekt], 1)
    assert a.canonical("REKTUSD") == rekt
    assert a.canonical("rektusd") == rekt
    b = Binance()
    b.ws_endpoint("wss://x", [rekt])
    assert b.canonical("REKTUSD") == rekt


def test_a_guess_prefers_the_assets_it_knows() -> None:
    a = Binance()
    a.subscribe_messages([BTC], 1)
    assert a.canonical("XYZTUSD") == Pair("XYZT", "USD")  # USD is a quote it streams
    b = Binance()
    b.subscribe_messages([Pair("ETH", "TUSD")], 1)
    assert b.canonical("XYZTUSD") == Pair("XYZ", "TUSD")
    assert Binance().canonical("BTCUSDT") == Pair("BTC", "USDT")


def test_learning_a_listing_forgets_memoized_guesses() -> None:
    a = Binance()
    odd = Pair("WEIRD", "USD")
    assert a.canonical("WEIRDOUSD") == Pair("WEIRDO", "USD")
    a.learn_listing({odd: ListedPair(odd, "WEIRDOUSD", "WEIRDOUSD", "WEIRDOUSD")})
    assert a.canonical("WEIRDOUSD") == odd
    k = Kraken()
    assert k.canonical("FOO/BAR") == Pair("FOO", "BAR")
    k.learn_listing({odd: ListedPair(odd, "FOO/BAR", "FOOBAR", "FOOBAR")})
    assert k.canonical("FOO/BAR") == odd
