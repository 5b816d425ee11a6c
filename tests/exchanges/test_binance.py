"""Binance US adapter: documented payloads, garbage, symbol maps and REST edge cases."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klined.config import ExchangeConfig, SymbolOverride
from klined.errors import (
    ExchangeError,
    ParseError,
    RateLimited,
    RequestRejected,
    UnlistedPair,
    UsageError,
)
from klined.exchanges import (
    ADAPTERS,
    Binance,
    Kraken,
    adapter_for,
    check_listing,
    get_adapter,
    overrides_from_config,
)
from klined.exchanges.base import (
    ErrorReply,
    ExchangeStatus,
    Frame,
    ListedPair,
    Malformed,
    RestRequest,
    Subscribed,
    SubscribeFailed,
)
from klined.exchanges.binance import LIMITS, STREAMS_PER_SUBSCRIBE, WEIGHTS
from klined.model import MINUTE_MS, Candle, Pair, check_ohlcv

PAYLOADS = Path(__file__).parent / "payloads" / "binance"
BTC = Pair("BTC", "USD")
ETH = Pair("ETH", "USD")
REKT = Pair("REKT", "USD")
T0 = 1_672_515_780_000  # 2022-12-31T19:43:00Z, a minute boundary
SESSION = "sess-1"


def adapter(**overrides: SymbolOverride) -> Binance:
    return Binance({Pair.parse(k.replace("_", "/")): v for k, v in overrides.items()})


def kline(**k: object) -> dict[str, object]:
    """A well-formed kline event (the documented shape with consistent numbers)."""
    body: dict[str, object] = {
        "t": T0,
        "T": T0 + 59_999,
        "s": "BTCUSD",
        "i": "1m",
        "f": 100,
        "L": 200,
        "o": "16500.10",
        "c": "16502.00",
        "h": "16505.00",
        "l": "16499.00",
        "v": "2.5",
        "n": 100,
        "x": False,
        "q": "41255.00",
        "V": "1.2",
        "Q": "19800.0",
        "B": "123456",
    }
    body.update(k)
    return {"e": "kline", "E": T0 + 2_136, "s": body["s"], "k": body}


def enc(obj: object) -> bytes:
    return json.dumps(obj).encode()


def parse(frame: bytes | str, a: Binance | None = None) -> Frame:
    return (a or Binance()).parse_frame(frame, session_id=SESSION, received_ms=T0 + 2_500)


def only_malformed(frame: Frame) -> Malformed:
    assert frame.candles == []
    assert frame.stamp_ms is None
    assert len(frame.controls) == 1, frame.controls
    bad = frame.controls[0]
    assert isinstance(bad, Malformed), bad
    assert len(bad.snippet) <= 200
    return bad


# --------------------------------------------------------------------------------------------
# registry, limits, symbols


def test_registry_and_limits() -> None:
    assert set(ADAPTERS) == {"binance", "kraken"}
    assert isinstance(get_adapter("binance"), Binance)
    assert isinstance(get_adapter("kraken"), Kraken)
    with pytest.raises(UsageError, match="unknown exchange 'bitfinex'"):
        get_adapter("bitfinex")
    assert Binance.name == "binance"
    assert LIMITS.streams_per_connection == 1024
    assert LIMITS.connection_lifetime_s == 24 * 3600
    assert LIMITS.max_candles_per_request == 1000
    assert LIMITS.ohlc_window_candles is None
    assert (LIMITS.rest_budget.kind, LIMITS.rest_budget.capacity) == ("weight", 1200)
    assert LIMITS.rest_budget.window_s == 60
    assert LIMITS.ws_messages_per_s == 5
    assert LIMITS.ping_interval_s is None
    assert WEIGHTS == {"klines": 2, "listing": 20}


def test_adapter_from_config_section() -> None:
    cfg = ExchangeConfig(
        symbols={"REKT/USD": SymbolOverride(native="1000REKTUSD", multiplier=1000)}
    )
    assert overrides_from_config(cfg) == {REKT: cfg.symbols["REKT/USD"]}
    a = adapter_for("binance", cfg)
    assert a.native(REKT) == "1000REKTUSD"


@pytest.mark.parametrize(
    ("pair", "native"),
    [(BTC, "BTCUSD"), (Pair("ETH", "USDT"), "ETHUSDT"), (Pair("FARTCOIN", "USD"), "FARTCOINUSD")],
)
def test_symbol_round_trip(pair: Pair, native: str) -> None:
    a = Binance()
    assert a.native(pair) == native
    assert a.canonical(native) == pair
    assert a.canonical(native.lower()) == pair
    assert a.stream_name(pair) == native.lower() + "@kline_1m"


def test_symbol_overrides_and_multiplier() -> None:
    a = adapter(REKT_USD=SymbolOverride(native="1000REKTUSD", multiplier=1000))
    assert a.native(REKT) == "1000REKTUSD"
    assert a.canonical("1000REKTUSD") == REKT
    assert a.canonical("1000rektusd") == REKT
    assert a.multiplier(REKT) == 1000
    assert a.multiplier(BTC) == 1
    assert a.stream_name(REKT) == "1000rektusd@kline_1m"


def test_unknown_symbols_do_not_map() -> None:
    a = Binance()
    assert a.canonical("FOOBAR") is None
    assert a.canonical("USD") is None
    assert a.canonical("") is None


def test_learned_listing_names() -> None:
    a = Binance()
    odd = Pair("WEIRD", "USD")
    a.learn_listing({odd: ListedPair(odd, "WEIRDOUSD", "WEIRDOUSD", "WEIRDOUSD")})
    assert a.native(odd) == "WEIRDOUSD"
    assert a.canonical("WEIRDOUSD") == odd


# --------------------------------------------------------------------------------------------
# WebSocket requests


def test_ws_endpoint_combined_streams() -> None:
    a = Binance()
    base = "wss://stream.binance.us:9443"
    assert (
        a.ws_endpoint(base, [BTC, ETH])
        == "wss://stream.binance.us:9443/stream?streams=btcusd@kline_1m/ethusd@kline_1m"
    )
    assert a.ws_endpoint(base + "/", [BTC]).endswith(":9443/stream?streams=btcusd@kline_1m")
    assert a.ws_endpoint(base + "/ws", [BTC]).endswith(":9443/stream?streams=btcusd@kline_1m")
    assert a.ws_endpoint(base + "/stream", []) == base + "/stream"
    many = [Pair(f"C{i}", "USD") for i in range(1025)]
    with pytest.raises(ValueError, match="1024 streams"):
        a.ws_endpoint(base, many)


def test_subscribe_message_is_the_documented_request() -> None:
    a = Binance()
    (msg,) = a.subscribe_messages([BTC, ETH], 1)
    assert json.loads(msg) == {
        "method": "SUBSCRIBE",
        "params": ["btcusd@kline_1m", "ethusd@kline_1m"],
        "id": 1,
    }
    assert a.ping_message(3) is None


def test_subscribe_messages_are_chunked_with_sequential_ids() -> None:
    a = Binance()
    pairs = [Pair(f"C{i}", "USD") for i in range(1024)]
    msgs = [json.loads(m) for m in a.subscribe_messages(pairs, 10)]
    assert len(msgs) == -(-1024 // STREAMS_PER_SUBSCRIBE)
    assert [m["id"] for m in msgs] == list(range(10, 10 + len(msgs)))
    assert all(len(m["params"]) <= STREAMS_PER_SUBSCRIBE for m in msgs)
    assert [p for m in msgs for p in m["params"]] == [f"c{i}usd@kline_1m" for i in range(1024)]
    # each reply names the pairs of its own request
    frame = parse(b'{"result":null,"id":11}', a)
    assert frame.controls == [Subscribed(tuple(pairs[200:400]), 11)]


# --------------------------------------------------------------------------------------------
# WebSocket frames


def test_documented_kline_payload_is_rejected_for_its_own_inconsistency() -> None:
    """The docs' sample starts mid-minute and opens below its low: klined must refuse it."""
    body = (PAYLOADS / "kline_event_us_docs.json").read_bytes()
    a = Binance({Pair("BNB", "BTC"): SymbolOverride()})
    bad = only_malformed(parse(body, a))
    assert "minute boundary" in bad.reason
    # the spot docs' newer sample starts on a minute but keeps the same numbers
    newer = json.loads(body)
    newer["E"], newer["k"]["t"], newer["k"]["T"] = 1672515782136, 1672515780000, 1672515839999
    bad = only_malformed(parse(enc(newer), a))
    assert bad.reason == "open/close outside high-low range"
    # with consistent numbers the documented shape parses
    newer["k"]["o"] = "0.0016"
    (candle,) = parse(enc(newer), a).candles
    assert (candle.symbol, candle.native_symbol) == ("BNB/BTC", "BNBBTC")
    assert candle.trade_count == 100 and candle.quote_volume == "1"


def test_raw_kline_event_to_candle() -> None:
    data = enc(kline())
    frame = parse(data)
    assert frame.controls == []
    assert frame.stamp_ms == T0 + 2_136
    (c,) = frame.candles
    assert c.exchange == "binance"
    assert (c.symbol, c.native_symbol) == ("BTC/USD", "BTCUSD")
    assert c.interval_start == T0
    assert (c.open, c.high, c.low, c.close) == ("16500.1", "16505", "16499", "16502")
    assert c.volume == "2.5"
    assert c.quote_volume == "41255"
    assert Decimal(c.vwap or "") == Decimal("41255.00") / Decimal("2.5")
    assert c.trade_count == 100
    assert c.is_final is False
    assert c.origin == "ws"
    assert c.session_id == SESSION
    assert c.event_ts == T0 + 2_136
    assert c.ingestion_ts == T0 + 2_500
    assert bytes(c.raw) == data


def test_combined_frame_keeps_the_whole_frame_as_raw() -> None:
    data = enc({"stream": "btcusd@kline_1m", "data": kline(x=True)})
    (c,) = parse(data).candles
    assert c.is_final is True
    assert bytes(c.raw) == data
    # the raw survives a lake round trip verbatim
    line = msgspec.json.encode(c)
    assert b"\n" not in line
    assert msgspec.json.decode(line, type=Candle).raw == c.raw


def test_pretty_printed_frame_raw_stays_on_one_line() -> None:
    data = json.dumps({"stream": "btcusd@kline_1m", "data": kline()}, indent=2).encode()
    (c,) = parse(data).candles
    assert b"\n" not in bytes(c.raw)
    assert json.loads(bytes(c.raw)) == json.loads(data)


def test_zero_volume_kline_has_no_vwap() -> None:
    ev = kline(o="16500", h="16500", l="16500", c="16500", v="0", q="0", n=0)
    (c,) = parse(enc(ev)).candles
    assert c.vwap is None and c.volume == "0" and c.trade_count == 0


def test_multiplier_scales_prices_and_volumes() -> None:
    a = adapter(REKT_USD=SymbolOverride(native="1000REKTUSD", multiplier=1000))
    ev = kline(s="1000REKTUSD", o="0.0020", h="0.0025", l="0.0015", c="0.0020", v="1000", q="2")
    (c,) = parse(enc(ev), a).candles
    assert (c.symbol, c.native_symbol) == ("REKT/USD", "1000REKTUSD")
    assert (c.open, c.high, c.low, c.close) == ("0.000002", "0.0000025", "0.0000015", "0.000002")
    assert c.volume == "1000000"
    assert c.quote_volume == "2"
    assert c.vwap == "0.000002"
    assert check_ohlcv(c.open, c.high, c.low, c.close, c.volume) is None


def test_subscribe_reply_and_unknown_id() -> None:
    a = Binance()
    a.subscribe_messages([BTC], 1)
    assert parse(b'{"result": null, "id": 1}', a).controls == [Subscribed((BTC,), 1)]
    assert parse(b'{"result": null, "id": 99}', a).controls == [Subscribed((), 99)]
    assert parse(b'{"result": ["btcusd@kline_1m"], "id": 3}', a) == Frame()


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ('{"code": 0, "msg": "Unknown property", "id": 5}', 0),
        ('{"code": 1, "msg": "Invalid value type: expected Boolean"}', 1),
        ('{"code": 2, "msg": "Invalid request: request ID must be an unsigned integer"}', 2),
        ('{"code": 2, "msg": "Invalid request: too many parameters"}', 2),
        ('{"code":3,"msg":"Invalid JSON: expected value at line 1 column 1"}', 3),
        ('{"error":{"code":2,"msg":"Invalid request: unknown variable"},"id":1}', 2),
    ],
)
def test_documented_error_replies(body: str, code: int) -> None:
    (ctl,) = parse(body).controls
    assert isinstance(ctl, ErrorReply)
    assert f"binance error {code}:" in ctl.message


def test_error_reply_to_a_subscribe_fails_its_pairs() -> None:
    a = Binance()
    a.subscribe_messages([BTC, ETH], 7)
    frame = parse(b'{"error":{"code":2,"msg":"Invalid request: unknown variable"},"id":7}', a)
    (ctl,) = frame.controls
    assert isinstance(ctl, SubscribeFailed)
    assert ctl.pairs == (BTC, ETH)
    assert "unknown variable" in ctl.message
    assert ctl.fatal is False


def test_server_shutdown_event() -> None:
    frame = parse(b'{"e":"serverShutdown","E":1672515782136}')
    assert frame.controls == [ExchangeStatus("shutdown", "server is about to shut down; reconnect")]
    assert frame.stamp_ms == 1672515782136


def _mutate(**k: object) -> bytes:
    return enc(kline(**k))


GARBAGE: list[tuple[str, bytes | str]] = [
    ("empty", b""),
    ("blank", "   \n"),
    ("truncated", _mutate()[:-7]),
    ("binary junk", b"\xff\xfe\x00\x81binance"),
    ("json array", b"[1, 2, 3]"),
    ("json string", b'"kline"'),
    ("json null", b"null"),
    ("empty object", b"{}"),
    ("start time as string", _mutate(t="1672515780000")),
    ("price as number", _mutate(o=16500.1)),
    ("price not a number", _mutate(h="abc")),
    ("NaN price", _mutate(o="NaN", h="NaN")),
    ("infinite volume", _mutate(v="Infinity")),
    ("negative price", _mutate(l="-1")),
    ("zero price", _mutate(o="0", l="0")),
    ("negative volume", _mutate(v="-2.5")),
    ("high below low", _mutate(h="16400", l="16499")),
    ("negative quote volume", _mutate(q="-1")),
    ("quote volume junk", _mutate(q="lots")),
    ("negative trade count", _mutate(n=-1)),
    ("final flag as string", _mutate(x="yes")),
    ("interval 5m", _mutate(i="5m")),
    ("mid-minute start", _mutate(t=T0 + 1)),
    ("unknown symbol", _mutate(s="FOOBAR")),
    ("missing close", enc({"e": "kline", "E": 1, "k": {"t": T0, "s": "BTCUSD"}})),
    ("missing event time", enc({k: v for k, v in kline().items() if k != "E"})),
    ("other event", b'{"e":"24hrTicker","E":1,"s":"BTCUSD"}'),
    ("combined without event", b'{"stream":"btcusd@kline_1m","data":{}}'),
    ("combined data not object", b'{"stream":"btcusd@kline_1m","data":[1]}'),
]


@pytest.mark.parametrize(("name", "data"), GARBAGE, ids=[g[0] for g in GARBAGE])
def test_garbage_is_one_clear_malformed(name: str, data: bytes | str) -> None:
    bad = only_malformed(parse(data))
    assert bad.reason


def test_snippet_is_bounded() -> None:
    bad = only_malformed(parse(b'{"x": "' + b"a" * 10_000))
    assert len(bad.snippet) <= 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)


def _assert_sane(frame: Frame) -> None:
    assert isinstance(frame, Frame)
    if frame.controls and all(isinstance(c, Malformed) for c in frame.controls):
        assert frame.stamp_ms is None
    for c in frame.candles:
        assert check_ohlcv(c.open, c.high, c.low, c.close, c.volume) is None
        assert c.interval_start % MINUTE_MS == 0
    for ctl in frame.controls:
        if isinstance(ctl, Malformed):
            assert len(ctl.snippet) <= 200


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise(data: bytes) -> None:
    _assert_sane(parse(data))


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_random_json_never_raises(value: object) -> None:
    _assert_sane(parse(enc(value)))


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(["t", "T", "s", "i", "o", "c", "h", "l", "v", "n", "x", "q", "E", "e"]),
    json_values,
    st.booleans(),
)
def test_mutated_klines_never_raise(field: str, value: object, combined: bool) -> None:
    ev = kline()
    if field in ("E", "e"):
        ev[field] = value
    else:
        k = ev["k"]
        assert isinstance(k, dict)
        k[field] = value
    frame = {"stream": "btcusd@kline_1m", "data": ev} if combined else ev
    _assert_sane(parse(enc(frame)))


# --------------------------------------------------------------------------------------------
# REST: listing


def test_listing_request() -> None:
    req = Binance().listing_request()
    assert (req.method, req.path, req.params, req.cost, req.kind) == (
        "GET",
        "/api/v3/exchangeInfo",
        {},
        20,
        "listing",
    )


def test_parse_documented_exchange_info() -> None:
    a = adapter(REKT_USD=SymbolOverride(native="1000REKTUSD", multiplier=1000))
    body = (PAYLOADS / "exchange_info_docs.json").read_bytes()
    listing = a.parse_listing(200, {}, body)
    assert listing[Pair("ETH", "BTC")] == ListedPair(
        Pair("ETH", "BTC"), "ETHBTC", "ETHBTC", "ETHBTC", trading=True
    )
    assert listing[BTC].trading is True
    assert listing[REKT].ws_native == "1000REKTUSD"  # the override claims the odd symbol
    assert Pair("1000REKT", "USD") not in listing
    assert listing[Pair("DOT", "USD")].trading is False  # status BREAK


def test_check_listing_suggests_without_relabelling() -> None:
    body = (PAYLOADS / "exchange_info_docs.json").read_bytes()
    listing = Binance().parse_listing(200, {}, body)
    configured = [BTC, ETH, Pair("DOT", "USD"), Pair("PEPE", "USD"), Pair("BTCC", "USD")]
    listed, problems = check_listing(configured, listing, exchange="binance")
    assert listed == [BTC]
    assert problems[ETH] == (
        "ETH/USD is not listed on binance; ETH/USDT and ETH/BTC are "
        "(configure it explicitly: a quote is never relabelled)"
    )
    assert problems[Pair("DOT", "USD")].startswith("DOT/USD is listed on binance but not trading")
    assert problems[Pair("PEPE", "USD")] == "PEPE/USD is not listed on binance (no PEPE pair is)"
    assert problems[Pair("BTCC", "USD")].endswith("did you mean BTC/USD?")


def test_check_listing_single_alternative_wording() -> None:
    usdt = Pair("ETH", "USDT")
    listing = {usdt: ListedPair(usdt, "ETHUSDT", "ETHUSDT", "ETHUSDT")}
    _, problems = check_listing([ETH], listing, exchange="binance")
    assert problems[ETH] == (
        "ETH/USD is not listed on binance; ETH/USDT is "
        "(configure it explicitly: a quote is never relabelled)"
    )


def test_listing_errors() -> None:
    a = Binance()
    with pytest.raises(ParseError, match="exchangeInfo"):
        a.parse_listing(200, {}, b"<html>maintenance</html>")
    with pytest.raises(RateLimited):
        a.parse_listing(429, {"retry-after": "30"}, b"")
    with pytest.raises(ExchangeError, match="HTTP 502"):
        a.parse_listing(502, {}, b"bad gateway")


# --------------------------------------------------------------------------------------------
# REST: klines

H0 = 1_700_000_400_000  # 2023-11-14T22:20:00Z, an hour+minute boundary


def row(open_ms: int, n: int = 5, o: str = "100.0", c: str = "101.0", v: str = "2") -> list[object]:
    hi, lo = max(o, c, key=Decimal), min(o, c, key=Decimal)
    return [open_ms, o, hi, lo, c, v, open_ms + 59_999, "201.0", n, "1", "100", "0"]


def klines_body(rows: list[list[object]]) -> bytes:
    return json.dumps(rows).encode()


def test_candles_request_covers_exactly_the_window() -> None:
    req = Binance().candles_request(BTC, H0, H0 + 60 * MINUTE_MS)
    assert (req.method, req.path, req.kind, req.cost, req.pair) == (
        "GET",
        "/api/v3/klines",
        "klines",
        2,
        BTC,
    )
    assert req.params == {
        "symbol": "BTCUSD",
        "interval": "1m",
        "startTime": str(H0),
        "endTime": str(H0 + 60 * MINUTE_MS - 1),
        "limit": "1000",
    }
    assert (req.start_ms, req.end_ms) == (H0, H0 + 60 * MINUTE_MS)
    assert Binance({REKT: SymbolOverride(native="1000REKTUSD")}).candles_request(
        REKT, H0, H0 + MINUTE_MS
    ).params["symbol"] == ("1000REKTUSD")


def test_parse_candles_closed_window() -> None:
    a = Binance()
    req = a.candles_request(BTC, H0, H0 + 3 * MINUTE_MS)
    rows = [row(H0), row(H0 + MINUTE_MS, n=0, o="101.0", c="101.0", v="0"), row(H0 + 2 * MINUTE_MS)]
    now = H0 + 10 * MINUTE_MS
    page = a.parse_candles(req, 200, {"x-mbx-used-weight-1m": "42"}, klines_body(rows), now_ms=now)
    assert [c.interval_start for c in page.candles] == [H0, H0 + MINUTE_MS, H0 + 2 * MINUTE_MS]
    assert [c.origin for c in page.candles] == ["rest", "no_trades", "rest"]
    assert all(c.is_final and c.event_ts == now and c.ingestion_ts == now for c in page.candles)
    assert page.candles[1].vwap is None and page.candles[1].trade_count == 0
    assert page.candles[0].vwap == "100.5"
    assert page.covered == (H0, H0 + 3 * MINUTE_MS)
    assert page.next_since is None
    assert page.used_weight == 42
    assert json.loads(bytes(page.candles[0].raw)) == rows[0]


def test_parse_candles_drops_the_unfinished_minute() -> None:
    a = Binance()
    req = a.candles_request(BTC, H0, H0 + 60 * MINUTE_MS)
    now = H0 + 2 * MINUTE_MS + 30_000  # minute 2 is still running
    rows = [row(H0), row(H0 + MINUTE_MS), row(H0 + 2 * MINUTE_MS)]
    page = a.parse_candles(req, 200, {}, klines_body(rows), now_ms=now)
    assert [c.interval_start for c in page.candles] == [H0, H0 + MINUTE_MS]
    assert page.covered == (H0, H0 + 2 * MINUTE_MS)  # never beyond the last closed minute
    # exactly at the close time boundary the minute is still unfinished
    page = a.parse_candles(req, 200, {}, klines_body(rows), now_ms=H0 + 3 * MINUTE_MS - 1)
    assert [c.interval_start for c in page.candles] == [H0, H0 + MINUTE_MS]
    page = a.parse_candles(req, 200, {}, klines_body(rows), now_ms=H0 + 3 * MINUTE_MS)
    assert len(page.candles) == 3


def test_parse_candles_full_page_covers_only_to_its_last_row() -> None:
    a = Binance()
    end = H0 + 2000 * MINUTE_MS
    req = a.candles_request(BTC, H0, end)
    rows = [row(H0 + i * MINUTE_MS) for i in range(0, 2000, 2)]  # 1000 rows, gaps between
    page = a.parse_candles(req, 200, {}, klines_body(rows), now_ms=end + 5 * MINUTE_MS)
    last = H0 + 1998 * MINUTE_MS
    assert page.covered == (H0, last + MINUTE_MS)
    assert page.next_since == str(last + MINUTE_MS)
    assert len(page.candles) == 1000


def test_parse_candles_ignores_rows_outside_the_window_and_empty_bodies() -> None:
    a = Binance()
    req = a.candles_request(BTC, H0, H0 + 2 * MINUTE_MS)
    rows = [row(H0 - MINUTE_MS), row(H0), row(H0 + 2 * MINUTE_MS)]
    page = a.parse_candles(req, 200, {}, klines_body(rows), now_ms=H0 + 60 * MINUTE_MS)
    assert [c.interval_start for c in page.candles] == [H0]
    assert page.covered == (H0, H0 + 2 * MINUTE_MS)
    page = a.parse_candles(req, 200, {}, b"[]", now_ms=H0 + MINUTE_MS // 2)
    assert page.candles == [] and page.covered == (H0, H0)


def test_parse_candles_multiplier() -> None:
    a = Binance({REKT: SymbolOverride(native="1000REKTUSD", multiplier=1000)})
    req = a.candles_request(REKT, H0, H0 + MINUTE_MS)
    rows = [
        [H0, "0.0020", "0.0025", "0.0015", "0.0020", "1000", H0 + 59_999, "2", 3, "0", "0", "0"]
    ]
    (c,) = a.parse_candles(req, 200, {}, klines_body(rows), now_ms=H0 + MINUTE_MS).candles
    assert (c.symbol, c.native_symbol) == ("REKT/USD", "1000REKTUSD")
    assert (c.open, c.volume, c.quote_volume, c.vwap) == ("0.000002", "1000000", "2", "0.000002")


def test_documented_weekly_kline_is_refused_by_a_1m_parser() -> None:
    a = Binance()
    req = a.candles_request(BTC, 1499040000000, 1499040000000 + MINUTE_MS)
    body = (PAYLOADS / "klines_rest_docs.json").read_bytes()
    with pytest.raises(ParseError, match="does not close the 1m kline"):
        a.parse_candles(req, 200, {}, body, now_ms=1_700_000_000_000)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"rows": []}',
        b"[[1]]",
        b'[["1700000400000", "1", "1", "1", "1", "1", 1, "1", 1, "1", "1", "1"]]',
        klines_body([[H0, "NaN", "1", "1", "1", "1", H0 + 59_999, "1", 1, "1", "1", "1"]]),
        klines_body([[H0, "1", "0.5", "0.9", "1", "1", H0 + 59_999, "1", 1, "1", "1", "1"]]),
        klines_body([row(H0 + MINUTE_MS), row(H0)]),
        klines_body([row(H0 + 1)]),
    ],
    ids=[
        "not-json",
        "object",
        "short-row",
        "time-as-text",
        "nan",
        "high<low",
        "order",
        "unaligned",
    ],
)
def test_parse_candles_garbage_raises_parse_error(body: bytes) -> None:
    a = Binance()
    req = a.candles_request(BTC, H0, H0 + 2 * MINUTE_MS)
    with pytest.raises(ParseError):
        a.parse_candles(req, 200, {}, body, now_ms=H0 + 60 * MINUTE_MS)


def test_rest_errors() -> None:
    a = Binance()
    req = a.candles_request(BTC, H0, H0 + MINUTE_MS)
    now = H0 + 60 * MINUTE_MS

    def call(status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        a.parse_candles(req, status, headers or {}, body, now_ms=now)

    too_much = b'{"code":-1003,"msg":"Too much request weight used"}'
    with pytest.raises(RateLimited) as info:
        call(429, too_much, {"retry-after": "7"})
    assert (info.value.retry_after, info.value.banned) == (7.0, False)
    with pytest.raises(RateLimited) as info:
        call(
            418,
            b'{"code":-1003,"msg":"Way too much request weight used; IP banned"}',
            {"retry-after": "120"},
        )
    assert (info.value.retry_after, info.value.banned) == (120.0, True)
    with pytest.raises(RateLimited) as info:
        call(429, b"", {"retry-after": "Tue, 14 Nov 2023 23:20:30 GMT"})
    assert info.value.retry_after == 30.0  # an HTTP date, relative to now_ms
    with pytest.raises(RateLimited) as info:
        call(429, b"", {"retry-after": "soon"})
    assert info.value.retry_after is None
    with pytest.raises(UnlistedPair, match="-1121 for BTC/USD: Invalid symbol"):
        call(400, b'{"code":-1121,"msg":"Invalid symbol."}')
    with pytest.raises(ExchangeError, match="HTTP 503") as err:
        call(503, b"<html>Service Unavailable</html>")
    assert not isinstance(err.value, RequestRejected)
    with pytest.raises(ExchangeError) as err:
        call(200, b'{"code":-1001,"msg":"Internal error; unable to process your request."}')
    assert not isinstance(err.value, (RequestRejected, ParseError))
    with pytest.raises(RequestRejected, match="-1100"):
        call(400, b'{"code":-1100,"msg":"Illegal characters found in parameter \'symbol\'"}')
    with pytest.raises(RequestRejected, match="HTTP 404"):
        call(404, b"not found")


def test_rest_request_window_fields_default() -> None:
    """Requests built elsewhere (without a window) still parse via the params."""
    a = Binance()
    params = {
        "symbol": "BTCUSD",
        "interval": "1m",
        "startTime": str(H0),
        "endTime": str(H0 + MINUTE_MS - 1),
        "limit": "1000",
    }
    req = RestRequest("GET", "/api/v3/klines", params, 2, "klines", BTC)
    page = a.parse_candles(req, 200, {}, klines_body([row(H0)]), now_ms=H0 + 5 * MINUTE_MS)
    assert page.covered == (H0, H0 + MINUTE_MS) and len(page.candles) == 1


# --------------------------------------------------------------------------------------------
# against the simulator (an independent implementation of the documented protocol)


def _same_numbers(c: Candle, t: object) -> bool:
    fields = ("open", "high", "low", "close", "volume")
    return all(Decimal(getattr(c, f)) == Decimal(getattr(t, f)) for f in fields)


@pytest.mark.integration
@pytest.mark.anyio
async def test_rest_and_ws_against_the_simulator(sim: Any) -> None:
    import anyio
    import httpx
    import websockets

    a = Binance()
    pairs = [BTC, ETH, REKT]
    async with httpx.AsyncClient() as http:
        req = a.listing_request()
        resp = await http.get(sim.binance_rest_url + req.path, params=req.params)
        listing = a.parse_listing(resp.status_code, dict(resp.headers), resp.content)
        listed, _ = check_listing(pairs, listing, exchange="binance")
        assert listed == pairs
        for pair in pairs:
            now = sim.clock.now_ms()
            req = a.candles_request(pair, now - now % MINUTE_MS - 90 * MINUTE_MS, now + MINUTE_MS)
            resp = await http.get(sim.binance_rest_url + req.path, params=req.params)
            headers = {k.lower(): v for k, v in resp.headers.items()}
            page = a.parse_candles(req, resp.status_code, headers, resp.content, now_ms=now)
            assert page.covered[1] - page.covered[0] >= 90 * MINUTE_MS
            assert page.used_weight is not None
            for c in page.candles:
                truth = sim.market.truth("binance", str(pair), c.interval_start)
                assert _same_numbers(c, truth)
                assert (c.origin == "no_trades") == truth.no_trades
    seen: list[Candle] = []
    async with websockets.connect(a.ws_endpoint(sim.binance_ws_url, [])) as ws:
        for message in a.subscribe_messages(pairs, 1):
            await ws.send(message)
        with anyio.fail_after(20):
            while len(seen) < 12:
                frame = a.parse_frame(await ws.recv(), session_id="s", received_ms=0)
                assert not [c for c in frame.controls if isinstance(c, Malformed)]
                seen += frame.candles
    assert {c.symbol for c in seen} <= {str(p) for p in pairs}


def test_recorded_klines_parse_exactly() -> None:
    usdt = Pair("BTC", "USDT")
    a = Binance()
    body = (PAYLOADS / "klines_rest_recorded.json").read_bytes()
    rows = json.loads(body)
    start = rows[0][0]
    req = a.candles_request(usdt, start, start + len(rows) * MINUTE_MS)
    page = a.parse_candles(req, 200, {}, body, now_ms=start + 60 * MINUTE_MS)
    assert len(page.candles) == len(rows) == 10
    first = page.candles[0]
    assert (first.native_symbol, first.interval_start) == ("BTCUSDT", 1634943780000)
    assert (first.open, first.high, first.low, first.close) == (
        "60685.22", "60729.84", "60670.9", "60719.27",
    )  # fmt: skip
    assert (first.volume, first.quote_volume, first.trade_count) == (
        "21.63272", "1313200.0134041", 617,
    )  # fmt: skip
    assert page.covered == (start, start + len(rows) * MINUTE_MS)
