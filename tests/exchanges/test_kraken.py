"""Kraken adapter: documented payloads, garbage, symbol maps and REST edge cases."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klined.config import SymbolOverride
from klined.errors import ExchangeError, ParseError, RateLimited, RequestRejected, UnlistedPair
from klined.exchanges import get_adapter
from klined.exchanges.base import (
    ErrorReply,
    ExchangeStatus,
    Frame,
    Heartbeat,
    ListedPair,
    Malformed,
    Pong,
    RestRequest,
    Subscribed,
    SubscribeFailed,
    Trade,
)
from klined.exchanges.common import parse_rfc3339_ms
from klined.exchanges.kraken import COSTS, LIMITS, SYMBOLS_PER_SUBSCRIBE, Kraken
from klined.exchanges.trades import since_ns
from klined.model import MINUTE_MS, Candle, Pair, check_ohlcv, parse_time

PAYLOADS = Path(__file__).parent / "payloads" / "kraken"
BTC = Pair("BTC", "USD")
ETH = Pair("ETH", "USD")
ALGO = Pair("ALGO", "USD")
REKT = Pair("REKT", "USD")
SESSION = "sess-k"
RECEIVED = 1_696_436_762_000


def parse(data: bytes | str, a: Kraken | None = None) -> Frame:
    return (a or Kraken()).parse_frame(data, session_id=SESSION, received_ms=RECEIVED)


def enc(obj: object) -> bytes:
    return json.dumps(obj).encode()


def only_malformed(frame: Frame) -> Malformed:
    assert frame.candles == []
    assert frame.stamp_ms is None
    assert len(frame.controls) == 1, frame.controls
    bad = frame.controls[0]
    assert isinstance(bad, Malformed), bad
    assert len(bad.snippet) <= 200
    return bad


def candle(**fields: object) -> dict[str, object]:
    body: dict[str, object] = {
        "symbol": "BTC/USD",
        "open": 27000.1,
        "high": 27010.5,
        "low": 26990.0,
        "close": 27005.25,
        "trades": 12,
        "volume": 1.23456789,
        "vwap": 27001.7,
        "interval_begin": "2023-10-04T16:25:00.000000000Z",
        "interval": 1,
        "timestamp": "2023-10-04T16:26:00.000000Z",
    }
    body.update(fields)
    return body


def ohlc(*candles: dict[str, object], type_: str = "update") -> bytes:
    return enc(
        {
            "channel": "ohlc",
            "type": type_,
            "timestamp": "2023-10-04T16:25:30.123456789Z",
            "data": list(candles),
        }
    )


# --------------------------------------------------------------------------------------------
# limits, symbols


def test_limits() -> None:
    assert Kraken.name == "kraken"
    assert LIMITS.streams_per_connection == 1000
    assert LIMITS.connection_lifetime_s is None
    assert LIMITS.max_candles_per_request == 720
    assert LIMITS.ohlc_window_candles == 720
    assert LIMITS.rest_budget.kind == "decay"
    assert (LIMITS.rest_budget.capacity, LIMITS.rest_budget.decay_per_s) == (15, 0.33)
    assert LIMITS.ws_messages_per_s is None
    assert LIMITS.ping_interval_s == 30
    assert COSTS == {"ohlc": 1, "trades": 1, "listing": 1}


@pytest.mark.parametrize(
    ("pair", "ws", "rest"),
    [
        (BTC, "BTC/USD", "XBTUSD"),
        (ETH, "ETH/USD", "ETHUSD"),
        (Pair("DOGE", "USD"), "DOGE/USD", "XDGUSD"),
        (Pair("ETH", "BTC"), "ETH/BTC", "ETHXBT"),
        (Pair("FARTCOIN", "USD"), "FARTCOIN/USD", "FARTCOINUSD"),
    ],
)
def test_symbol_round_trip(pair: Pair, ws: str, rest: str) -> None:
    a = Kraken()
    assert a.native(pair) == ws
    assert a.rest_native(pair) == rest
    assert a.canonical(ws) == pair
    assert a.canonical(ws.replace("BTC", "XBT").replace("DOGE", "XDG")) == pair  # v1 names


def test_symbol_overrides_and_multiplier() -> None:
    a = Kraken(
        {
            REKT: SymbolOverride(native="1000REKT/USD", multiplier=1000),
            BTC: SymbolOverride(rest_native="XXBTZUSD"),
        }
    )
    assert a.native(REKT) == "1000REKT/USD"
    assert a.rest_native(REKT) == "1000REKTUSD"  # derived from the native override
    assert a.canonical("1000REKT/USD") == REKT
    assert a.multiplier(REKT) == 1000
    assert a.rest_native(BTC) == "XXBTZUSD"
    assert a.canonical("XXBTZUSD") == BTC
    assert a.native(BTC) == "BTC/USD"
    k = get_adapter("kraken", {BTC: SymbolOverride(rest_native="XBTUSD")})
    assert isinstance(k, Kraken) and k.rest_native(BTC) == "XBTUSD"


def test_unknown_ws_names() -> None:
    a = Kraken()
    assert a.canonical("BTCUSD") is None
    assert a.canonical("BTC/USD/X") is None
    assert a.canonical("bad name/USD") is None


# --------------------------------------------------------------------------------------------
# WebSocket requests


def test_subscribe_and_ping_messages() -> None:
    a = Kraken()
    assert a.ws_endpoint("wss://ws.kraken.com/v2", [BTC]) == "wss://ws.kraken.com/v2"
    (msg,) = a.subscribe_messages([ALGO, Pair("MATIC", "USD")], 4)
    assert json.loads(msg) == {
        "method": "subscribe",
        "params": {
            "channel": "ohlc",
            "symbol": ["ALGO/USD", "MATIC/USD"],
            "interval": 1,
            "snapshot": True,
        },
        "req_id": 4,
    }
    assert json.loads(a.ping_message(101) or "") == {"method": "ping", "req_id": 101}


def test_subscribe_messages_are_chunked() -> None:
    pairs = [Pair(f"C{i}", "USD") for i in range(250)]
    msgs = [json.loads(m) for m in Kraken().subscribe_messages(pairs, 1)]
    assert [m["req_id"] for m in msgs] == [1, 2, 3]
    assert [len(m["params"]["symbol"]) for m in msgs] == [SYMBOLS_PER_SUBSCRIBE, 100, 50]


# --------------------------------------------------------------------------------------------
# WebSocket frames


def test_documented_snapshot_interval_5_is_rejected_per_candle() -> None:
    data = (PAYLOADS / "ohlc_snapshot_docs.json").read_bytes()
    frame = parse(data)
    assert frame.candles == []
    assert [type(c) for c in frame.controls] == [Malformed, Malformed]
    assert all("interval 5 is not 1 minute" in c.reason for c in frame.controls)  # type: ignore[attr-defined]
    assert frame.stamp_ms is None  # a frame of nothing but garbage vouches for no time


def test_documented_snapshot_as_1m_candles() -> None:
    data = (
        (PAYLOADS / "ohlc_snapshot_docs.json")
        .read_bytes()
        .replace(b'"interval": 5', b'"interval": 1')
    )
    frame = parse(data)
    assert frame.controls == []
    first, second = frame.candles
    assert (first.exchange, first.symbol, first.native_symbol) == ("kraken", "ALGO/USD", "ALGO/USD")
    assert first.interval_start == parse_time("2023-10-04T15:25:00Z")
    assert (first.open, first.high, first.low, first.close) == ("0.09875",) * 4
    assert first.volume == "201.86015"
    assert first.vwap == "0.09875"
    assert first.trade_count == 1
    assert first.quote_volume is None
    assert first.is_final is False
    assert first.origin == "ws"
    assert first.session_id == SESSION
    assert first.ingestion_ts == RECEIVED
    assert first.event_ts == parse_time("2023-10-04T16:26:01.806Z")  # message timestamp
    assert (second.high, second.volume, second.trade_count) == ("0.0988", "16255.46368", 13)
    # raw is the candle's own element of data, kept on one line
    raw = bytes(first.raw)
    assert b"\n" not in raw
    assert json.loads(raw)["volume"] == 201.86015
    assert b"201.86015" in raw
    line = msgspec.json.encode(first)
    assert b"\n" not in line and msgspec.json.decode(line, type=Candle).raw == first.raw


def test_prices_are_exact_decimals_never_floats() -> None:
    c = candle(
        open=0.1, high=0.30000000000000004, low=0.1, close=0.2, volume=1e-9, vwap=0.15, trades=1
    )
    (out,) = parse(ohlc(c)).candles
    assert out.high == "0.30000000000000004"
    assert out.volume == "0.000000001"  # exponent normalized to plain notation
    precise = "27000.123456789012345"
    text = (
        '{"channel":"ohlc","type":"update","data":[{"symbol":"BTC/USD",'
        f'"open":{precise},"high":{precise},"low":{precise},"close":{precise},'
        '"trades":1,"volume":0.1,"vwap":27000.1,"interval_begin":"2023-10-04T16:25:00Z",'
        '"interval":1}]}'
    ).encode()
    (out,) = parse(text).candles
    assert out.open == "27000.123456789012345"
    assert out.event_ts == RECEIVED  # no timestamps at all: fall back to arrival


def test_event_time_falls_back_to_the_candle_timestamp() -> None:
    body = json.loads(ohlc(candle()))
    del body["timestamp"]
    frame = parse(enc(body))
    assert frame.stamp_ms is None
    assert frame.candles[0].event_ts == parse_time("2023-10-04T16:26:00Z")


def test_multiplier_applies_to_ws_candles() -> None:
    a = Kraken({REKT: SymbolOverride(native="1000REKT/USD", multiplier=1000)})
    c = candle(symbol="1000REKT/USD", open=2, high=2.5, low=1.5, close=2, volume=3, vwap=2.2)
    (out,) = parse(ohlc(c), a).candles
    assert out.symbol == "REKT/USD" and out.native_symbol == "1000REKT/USD"
    assert (out.open, out.high, out.low, out.close) == ("0.002", "0.0025", "0.0015", "0.002")
    assert (out.volume, out.vwap) == ("3000", "0.0022")


def test_bad_candles_are_dropped_and_the_rest_kept() -> None:
    frame = parse(
        ohlc(
            candle(),
            candle(interval=5),
            candle(high=1, low=2),
            candle(open="abc"),
            candle(symbol="NOPE"),
            candle(interval_begin="2023-10-04T16:25:30Z"),
            candle(interval_begin="yesterday"),
            candle(trades=-1),
            candle(volume=-1),
            candle(open=-5, low=-6),
            candle(close=0),
            candle(vwap=-1),
            candle(open=True),
            [1, 2, 3],  # type: ignore[arg-type]
            candle(interval_begin="2023-10-04T16:26:00.000000000Z"),
        )
    )
    assert [c.interval_start for c in frame.candles] == [
        parse_time("2023-10-04T16:25:00Z"),
        parse_time("2023-10-04T16:26:00Z"),
    ]
    assert len(frame.controls) == 13
    assert all(isinstance(c, Malformed) and len(c.snippet) <= 200 for c in frame.controls)


def test_subscribe_acks() -> None:
    a = Kraken()
    ack = {
        "method": "subscribe",
        "result": {
            "channel": "ohlc",
            "interval": 1,
            "snapshot": True,
            "symbol": "ALGO/USD",
            "warnings": ["timestamp is deprecated, use interval_begin"],
        },
        "success": True,
        "time_in": "2023-10-04T16:26:01.795424Z",
        "time_out": "2023-10-04T16:26:01.795464Z",
        "req_id": 4,
    }
    assert parse(enc(ack), a).controls == [Subscribed((ALGO,), 4)]
    refused = {
        "error": "Currency pair not supported XBT/EUR",
        "method": "subscribe",
        "success": False,
        "symbol": "XBT/EUR",
        "time_in": "2023-10-04T16:26:01.795424Z",
        "time_out": "2023-10-04T16:26:01.795464Z",
    }
    (ctl,) = parse(enc(refused), a).controls
    assert ctl == SubscribeFailed(
        (Pair("BTC", "EUR"),), "kraken: Currency pair not supported XBT/EUR", fatal=True
    )
    no_symbol = {"error": "Currency pair not supported BTC/XYZ", "method": "subscribe"}
    no_symbol["success"] = False  # type: ignore[assignment]
    (ctl,) = parse(enc(no_symbol), a).controls
    assert isinstance(ctl, SubscribeFailed)
    assert ctl.pairs == (Pair("BTC", "XYZ"),) and ctl.fatal
    busy = {"error": "Exceeded msg rate", "method": "subscribe", "success": False, "req_id": 9}
    (ctl,) = parse(enc(busy), a).controls
    assert isinstance(ctl, SubscribeFailed) and ctl.fatal is False and ctl.pairs == ()
    again = {"error": "Already subscribed", "method": "subscribe", "success": False}
    again["symbol"] = "BTC/USD"
    assert parse(enc(again), a).controls == [Subscribed((BTC,), None)]


def test_status_heartbeat_pong() -> None:
    status = (
        b'{"channel":"status","data":[{"api_version":"v2","connection_id":12393906104898154338,'
        b'"system":"online","version":"2.0.4"}],"type":"update"}'
    )
    assert parse(status).controls == [ExchangeStatus("online", "api_version=v2 version=2.0.4")]
    assert parse(b'{"channel":"heartbeat"}').controls == [Heartbeat()]
    pong = (
        b'{"method":"pong","req_id":101,"time_in":"2023-09-24T14:10:23.799685Z",'
        b'"time_out":"2023-09-24T14:10:23.799703Z"}'
    )
    frame = parse(pong)
    assert frame.controls == [Pong(101)]
    assert frame.stamp_ms is None  # the gateway's clock is no evidence about market data
    unsub = (
        b'{"method":"unsubscribe","result":{"channel":"ohlc","symbol":"BTC/USD"},"success":true}'
    )
    assert parse(unsub) == Frame()
    assert parse(b'{"channel":"ticker","type":"update","data":[]}') == Frame()
    err = b'{"method":"ping","success":false,"error":"Internal error","req_id":3}'
    assert parse(err).controls == [ErrorReply("kraken ping failed: Internal error", 3)]
    assert parse(b'{"error":"Malformed request"}').controls == [
        ErrorReply("kraken error: Malformed request", None)
    ]


GARBAGE: list[tuple[str, bytes | str]] = [
    ("empty", b""),
    ("blank", " \r\n "),
    ("truncated", ohlc(candle())[:-9]),
    ("binary junk", b"\x00\x9c\xff\xfeohlc"),
    ("json array", b'[0, {"a": 1}, "ohlc-1", "XBT/USD"]'),
    ("json number", b"42"),
    ("json null", b"null"),
    ("empty object", b"{}"),
    ("data not a list", b'{"channel":"ohlc","type":"update","data":{"symbol":"BTC/USD"}}'),
    ("data missing", b'{"channel":"ohlc","type":"update"}'),
    ("channel a number", b'{"channel": 5}'),
    ("status without data", b'{"channel":"status","type":"update","data":[]}'),
    ("status entry junk", b'{"channel":"status","type":"update","data":[{"nosystem":1}]}'),
    ("req_id a list", b'{"method":"pong","req_id":[1]}'),
    ("one bad candle", ohlc(candle(high="NaN"))),
    ("one string-number candle", ohlc(candle(volume="a lot"))),
]


@pytest.mark.parametrize(("name", "data"), GARBAGE, ids=[g[0] for g in GARBAGE])
def test_garbage_is_one_clear_malformed(name: str, data: bytes | str) -> None:
    bad = only_malformed(parse(data))
    assert bad.reason


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)


def _assert_sane(frame: Frame) -> None:
    assert isinstance(frame, Frame)
    garbage = bool(frame.controls) and all(isinstance(c, Malformed) for c in frame.controls)
    if garbage and not frame.candles:
        assert frame.stamp_ms is None
    for c in frame.candles:
        assert check_ohlcv(c.open, c.high, c.low, c.close, c.volume) is None
        assert c.interval_start % MINUTE_MS == 0 and c.is_final is False
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
    st.sampled_from([*candle(), "channel", "type", "timestamp", "method", "req_id"]),
    json_values,
)
def test_mutated_messages_never_raise(field: str, value: object) -> None:
    msg = json.loads(ohlc(candle(), candle(interval_begin="2023-10-04T16:26:00Z")))
    if field in msg or field in ("method", "req_id"):
        msg[field] = value
    else:
        msg["data"][0][field] = value
    _assert_sane(parse(enc(msg)))


@given(st.integers(min_value=0, max_value=4_102_444_799_999), st.integers(0, 999_999))
def test_rfc3339_nanoseconds(ms: int, extra: int) -> None:
    from datetime import UTC, datetime

    dt = datetime.fromtimestamp(ms // 1000, tz=UTC)
    frac = f"{ms % 1000:03d}{extra:06d}"
    assert parse_rfc3339_ms(dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{frac}Z") == ms
    assert parse_rfc3339_ms(dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{frac}+00:00") == ms


def test_rfc3339_offsets_and_junk() -> None:
    assert parse_rfc3339_ms("2023-10-04T17:25:00+01:00") == parse_time("2023-10-04T16:25:00Z")
    for bad in ("2023-10-04", "2023-13-04T00:00:00Z", "2023-10-04T16:25:00.1234567890Z", "x"):
        with pytest.raises(ValueError):
            parse_rfc3339_ms(bad)


# --------------------------------------------------------------------------------------------
# REST: listing


def test_parse_documented_asset_pairs() -> None:
    a = Kraken()
    req = a.listing_request()
    assert (req.method, req.path, req.cost, req.kind) == (
        "GET",
        "/0/public/AssetPairs",
        1,
        "listing",
    )
    listing = a.parse_listing(200, {}, (PAYLOADS / "asset_pairs_docs.json").read_bytes())
    assert listing[BTC] == ListedPair(BTC, "BTC/USD", "XBTUSD", "XXBTZUSD", trading=True)
    assert listing[Pair("ETH", "BTC")] == ListedPair(
        Pair("ETH", "BTC"), "ETH/BTC", "ETHXBT", "XETHXXBT", trading=True
    )
    assert listing[Pair("DOGE", "USD")].rest_native == "XDGUSD"
    assert listing[Pair("SOL", "USD")].trading is False  # cancel_only
    assert len(listing) == 4  # the dark-pool pair without wsname is not streamable
    a.learn_listing(listing)
    assert a.rest_native(BTC) == "XBTUSD"


def test_listing_errors() -> None:
    a = Kraken()
    with pytest.raises(ExchangeError, match="EService:Unavailable"):
        a.parse_listing(200, {}, b'{"error":["EService:Unavailable"],"result":{}}')
    with pytest.raises(ParseError):
        a.parse_listing(200, {}, b'{"error":[],"result":{"XXBTZUSD":{"wsname":5}}}')
    with pytest.raises(ParseError, match="no result"):
        a.parse_listing(200, {}, b'{"error":[]}')


# --------------------------------------------------------------------------------------------
# REST: OHLC

M0 = 1_688_671_200_000  # first minute of the documented OHLC example


def test_candles_request() -> None:
    req = Kraken().candles_request(BTC, M0, M0 + 4 * MINUTE_MS)
    assert (req.method, req.path, req.kind, req.cost, req.pair) == (
        "GET",
        "/0/public/OHLC",
        "ohlc",
        1,
        BTC,
    )
    assert req.params == {"pair": "XBTUSD", "interval": "1", "since": str(M0 // 1000 - 1)}
    assert (req.start_ms, req.end_ms) == (M0, M0 + 4 * MINUTE_MS)


def test_parse_documented_ohlc_drops_the_uncommitted_last_entry() -> None:
    a = Kraken()
    req = a.candles_request(BTC, M0, M0 + 60 * MINUTE_MS)
    body = (PAYLOADS / "ohlc_rest_docs.json").read_bytes()
    now = M0 + 3 * MINUTE_MS + 20_000
    page = a.parse_candles(req, 200, {}, body, now_ms=now)
    assert [c.interval_start for c in page.candles] == [M0, M0 + MINUTE_MS, M0 + 2 * MINUTE_MS]
    first = page.candles[0]
    assert (first.symbol, first.native_symbol) == ("BTC/USD", "XBTUSD")
    assert (first.open, first.high, first.low, first.close) == (
        "30306.1",
        "30306.2",
        "30305.7",
        "30305.7",
    )
    assert (first.vwap, first.volume, first.trade_count) == ("30306.1", "3.39243896", 23)
    assert first.origin == "rest" and first.is_final and first.event_ts == now
    assert json.loads(bytes(first.raw))[0] == 1688671200
    assert page.covered == (M0, M0 + 3 * MINUTE_MS)  # up to the current candle
    assert page.next_since is None and page.used_weight is None


def _ohlc_body(
    times: list[int], key: str = "XXBTZUSD", counts: dict[int, int] | None = None
) -> bytes:
    rows = []
    for t in times:
        n = (counts or {}).get(t, 3)
        v = "0" if n == 0 else "1.5"
        rows.append([t // 1000, "10.0", "10.5", "9.5", "10.0", "10.1" if n else "0", v, n])
    return enc({"error": [], "result": {key: rows, "last": times[-1] // 1000 if times else 0}})


def test_ohlc_result_key_may_be_the_plain_name_and_zero_trade_rows() -> None:
    a = Kraken()
    sol = Pair("SOL", "USD")
    req = a.candles_request(sol, M0, M0 + 3 * MINUTE_MS)
    times = [M0, M0 + MINUTE_MS, M0 + 2 * MINUTE_MS, M0 + 3 * MINUTE_MS]
    body = _ohlc_body(times, key="SOLUSD", counts={M0 + MINUTE_MS: 0})
    page = a.parse_candles(req, 200, {}, body, now_ms=M0 + 10 * MINUTE_MS)
    assert [c.origin for c in page.candles] == ["rest", "no_trades", "rest"]
    assert page.candles[1].vwap is None and page.candles[1].volume == "0"
    assert page.covered == (M0, M0 + 3 * MINUTE_MS)


def test_ohlc_entries_whose_minute_has_not_ended_are_dropped() -> None:
    a = Kraken()
    req = a.candles_request(BTC, M0, M0 + 10 * MINUTE_MS)
    times = [M0, M0 + MINUTE_MS, M0 + 2 * MINUTE_MS, M0 + 3 * MINUTE_MS]
    page = a.parse_candles(req, 200, {}, _ohlc_body(times), now_ms=M0 + MINUTE_MS + 5)
    assert [c.interval_start for c in page.candles] == [M0]
    assert page.covered == (M0, M0 + MINUTE_MS)


def test_ohlc_gap_before_the_current_candle_is_covered() -> None:
    """Minutes between the last committed entry and the current one had no trades."""
    a = Kraken()
    req = a.candles_request(BTC, M0, M0 + 30 * MINUTE_MS)
    times = [M0 + 5 * MINUTE_MS, M0 + 20 * MINUTE_MS]
    page = a.parse_candles(req, 200, {}, _ohlc_body(times), now_ms=M0 + 20 * MINUTE_MS + 1)
    assert [c.interval_start for c in page.candles] == [M0 + 5 * MINUTE_MS]
    assert page.covered == (M0, M0 + 20 * MINUTE_MS)


def test_ohlc_720_window_limits_what_coverage_can_claim() -> None:
    a = Kraken()
    now = M0 + 2000 * MINUTE_MS + 30_000
    current = M0 + 2000 * MINUTE_MS
    window = [current - i * MINUTE_MS for i in range(719, -1, -1)]  # 720 entries
    req = a.candles_request(BTC, M0, M0 + 3000 * MINUTE_MS)  # starts long before the window
    page = a.parse_candles(req, 200, {}, _ohlc_body(window), now_ms=now)
    assert page.covered == (window[0], current)
    assert len(page.candles) == 719
    # old start, sparse answer (fewer than 720 entries): still only from the first entry
    sparse = [current - 600 * MINUTE_MS, current - 10 * MINUTE_MS, current]
    page = a.parse_candles(req, 200, {}, _ohlc_body(sparse), now_ms=now)
    assert page.covered == (sparse[0], current)
    # a start inside the window with fewer entries: complete from the requested start
    req = a.candles_request(BTC, current - 100 * MINUTE_MS, current)
    page = a.parse_candles(req, 200, {}, _ohlc_body(sparse[1:]), now_ms=now)
    assert page.covered == (current - 100 * MINUTE_MS, current)
    # a full 720-entry page cuts even a recent start
    req = a.candles_request(BTC, current - 700 * MINUTE_MS, current)
    page = a.parse_candles(req, 200, {}, _ohlc_body(window), now_ms=now)
    assert page.covered[0] == current - 700 * MINUTE_MS  # window[0] is older: start stands
    req = a.candles_request(BTC, current - 719 * MINUTE_MS - MINUTE_MS, current)
    page = a.parse_candles(req, 200, {}, _ohlc_body(window), now_ms=now)
    assert page.covered[0] == window[0]


def test_ohlc_empty_and_multiplier() -> None:
    a = Kraken({REKT: SymbolOverride(native="1000REKT/USD", multiplier=1000)})
    req = a.candles_request(REKT, M0, M0 + 5 * MINUTE_MS)
    body = enc({"error": [], "result": {"1000REKTUSD": [], "last": 0}})
    page = a.parse_candles(req, 200, {}, body, now_ms=M0 + 10 * MINUTE_MS)
    assert page.candles == [] and page.covered == (M0, M0)
    page = a.parse_candles(
        req, 200, {}, _ohlc_body([M0, M0 + MINUTE_MS], key="1000REKTUSD"), now_ms=M0 + 9 * MINUTE_MS
    )
    (c,) = page.candles
    assert (c.open, c.high, c.vwap, c.volume) == ("0.01", "0.0105", "0.0101", "1500")
    assert c.native_symbol == "1000REKTUSD"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b'{"error":["EQuery:Unknown asset pair"],"result":{}}', UnlistedPair),
        (b'{"error":["EGeneral:Too many requests"],"result":{}}', RateLimited),
        (b'{"error":["EAPI:Rate limit exceeded"]}', RateLimited),
        (b'{"error":["EService:Unavailable"]}', ExchangeError),
        (b'{"error":["EService:Busy"]}', ExchangeError),
        (b'{"error":["EGeneral:Invalid arguments"]}', RequestRejected),
        (b"<html>cloudflare</html>", ParseError),
        (b'{"error":[],"result":{"XXBTZUSD":[],"XETHZUSD":[],"last":1}}', ParseError),
        (b'{"error":[],"result":{"last":1}}', ParseError),
        (
            b'{"error":[],"result":{"XXBTZUSD":[[1688671200,"1","1","1","1","1","1"]],"last":1}}',
            ParseError,
        ),
        (
            b'{"error":[],"result":{"XXBTZUSD":[[1688671230,"1","1","1","1","1","1",1]],"last":1}}',
            ParseError,
        ),
        (
            b'{"error":[],"result":{"XXBTZUSD":[[1688671200,"1","0.5","0.9","1","1","1",1],[1688671260,"1","1","1","1","1","1",1]],"last":1}}',
            ParseError,
        ),
        (
            b'{"error":[],"result":{"XXBTZUSD":[[1688671260,"1","1","1","1","1","1",1],[1688671200,"1","1","1","1","1","1",1]],"last":1}}',
            ParseError,
        ),
    ],
)
def test_ohlc_errors(body: bytes, error: type[Exception]) -> None:
    a = Kraken()
    req = a.candles_request(BTC, M0, M0 + 5 * MINUTE_MS)
    with pytest.raises(error):
        a.parse_candles(req, 200, {}, body, now_ms=M0 + 60 * MINUTE_MS)


def test_warnings_are_not_errors_and_http_statuses() -> None:
    a = Kraken()
    req = a.candles_request(BTC, M0, M0 + 5 * MINUTE_MS)
    body = json.loads(_ohlc_body([M0, M0 + MINUTE_MS]))
    body["error"] = ["WGeneral:Deprecated"]
    page = a.parse_candles(req, 200, {}, enc(body), now_ms=M0 + 9 * MINUTE_MS)
    assert len(page.candles) == 1
    with pytest.raises(RateLimited) as info:
        a.parse_candles(req, 429, {"retry-after": "3"}, b"", now_ms=M0)
    assert info.value.retry_after == 3.0
    with pytest.raises(RateLimited) as info:
        a.parse_candles(req, 429, {}, b'{"error":["EGeneral:Too many requests"]}', now_ms=M0)
    assert info.value.retry_after is None
    with pytest.raises(RateLimited) as info:
        a.parse_candles(req, 200, {}, b'{"error":["EService:Throttled: 1688671230"]}', now_ms=M0)
    assert info.value.retry_after == 30.0
    with pytest.raises(ExchangeError, match="HTTP 520") as err:
        a.parse_candles(req, 520, {}, b"<html>", now_ms=M0)
    assert not isinstance(err.value, RequestRejected)
    with pytest.raises(RequestRejected, match="HTTP 404"):
        a.parse_candles(req, 404, {}, b"nope", now_ms=M0)


# --------------------------------------------------------------------------------------------
# REST: Trades


def test_trades_request_and_documented_page() -> None:
    a = Kraken()
    req = a.trades_request(BTC, "1688669580000000000")
    assert (req.method, req.path, req.kind, req.cost, req.pair) == (
        "GET",
        "/0/public/Trades",
        "trades",
        1,
        BTC,
    )
    assert req.params == {"pair": "XBTUSD", "since": "1688669580000000000", "count": "1000"}
    page = a.parse_trades(req, 200, {}, (PAYLOADS / "trades_docs.json").read_bytes())
    assert page.trades == [
        Trade(1688669597827, "30243.4", "0.34507674", 61044952),
        Trade(1688669598280, "30243.3", "0.0037696", 61044953),
        Trade(1688669602698, "30243.3", "0.01235716", 61044956),
    ]
    assert page.next_since == "1688671969993150842"
    assert page.server_last_ms == 1688671969993


def test_trades_old_rows_without_id_and_multiplier() -> None:
    a = Kraken({REKT: SymbolOverride(native="1000REKT/USD", multiplier=1000)})
    req = a.trades_request(REKT, "0")
    body = enc(
        {
            "error": [],
            "result": {"1000REKTUSD": [["2.5", "4", 1688669597.5, "b", "l", ""]], "last": "1"},
        }
    )
    (t,) = a.parse_trades(req, 200, {}, body).trades
    assert t == Trade(1688669597500, "0.0025", "4000", None)


@pytest.mark.parametrize(
    "body",
    [
        b'{"error":[],"result":{"XXBTZUSD":[["x","1",1688669597.5,"b","l","",1]],"last":"1"}}',
        b'{"error":[],"result":{"XXBTZUSD":[["-1","1",1688669597.5,"b","l","",1]],"last":"1"}}',
        b'{"error":[],"result":{"XXBTZUSD":[["1","1","t","b","l","",1]],"last":"1"}}',
        b'{"error":[],"result":{"XXBTZUSD":[["1","1"]],"last":"1"}}',
        b'{"error":[],"result":{"XXBTZUSD":[]}}',
        b'{"error":[],"result":{"XXBTZUSD":[],"last":"soon"}}',
    ],
)
def test_trades_garbage(body: bytes) -> None:
    a = Kraken()
    with pytest.raises(ParseError):
        a.parse_trades(a.trades_request(BTC, "0"), 200, {}, body)


def test_trades_errors() -> None:
    a = Kraken()
    req = a.trades_request(BTC, "0")
    with pytest.raises(UnlistedPair):
        a.parse_trades(req, 200, {}, b'{"error":["EQuery:Unknown asset pair"]}')
    with pytest.raises(RateLimited):
        a.parse_trades(req, 429, {}, b'{"error":["EGeneral:Too many requests"]}')


def test_adapter_aggregates_documented_trades() -> None:
    a = Kraken()
    page = a.parse_trades(
        a.trades_request(BTC, "0"), 200, {}, (PAYLOADS / "trades_docs.json").read_bytes()
    )
    minute = 1688669580000
    (c,) = a.aggregate_trades(BTC, page.trades, minute, minute + MINUTE_MS, minute + MINUTE_MS)
    assert (c.symbol, c.native_symbol, c.origin, c.trade_count) == (
        "BTC/USD",
        "XBTUSD",
        "trades",
        3,
    )
    assert c.volume == "0.3612035"
    expected_q = (
        Decimal("30243.4") * Decimal("0.34507674")
        + Decimal("30243.3") * Decimal("0.0037696")
        + Decimal("30243.3") * Decimal("0.01235716")
    )
    assert Decimal(c.quote_volume or "") == expected_q


def test_listing_respects_overrides() -> None:
    odd = Pair("BITCOIN", "USD")
    a = Kraken({odd: SymbolOverride(native="BTC/USD")})
    listing = a.parse_listing(200, {}, (PAYLOADS / "asset_pairs_docs.json").read_bytes())
    assert listing[odd].rest_key == "XXBTZUSD"
    assert BTC not in listing
    b = Kraken({Pair("ETHER", "BTC"): SymbolOverride(rest_native="XETHXXBT")})
    listing = b.parse_listing(200, {}, (PAYLOADS / "asset_pairs_docs.json").read_bytes())
    assert listing[Pair("ETHER", "BTC")].rest_native == "ETHXBT"


def test_ohlc_request_without_window_fields() -> None:
    a = Kraken()
    params = {"pair": "XBTUSD", "interval": "1", "since": str(M0 // 1000 - 1)}
    req = RestRequest("GET", "/0/public/OHLC", params, 1, "ohlc", BTC)
    page = a.parse_candles(
        req, 200, {}, _ohlc_body([M0, M0 + MINUTE_MS]), now_ms=M0 + 5 * MINUTE_MS
    )
    assert page.covered == (M0, M0 + MINUTE_MS) and len(page.candles) == 1


# --------------------------------------------------------------------------------------------
# against the simulator (an independent implementation of the documented protocol)


def _same_numbers(c: Candle, t: Any) -> bool:
    fields = ("open", "high", "low", "close", "volume")
    return all(Decimal(getattr(c, f)) == Decimal(getattr(t, f)) for f in fields)


@pytest.mark.integration
@pytest.mark.anyio
async def test_rest_trades_and_ws_against_the_simulator(sim: Any) -> None:
    import anyio
    import httpx
    import websockets

    a = Kraken()
    pairs = [BTC, ETH, REKT]
    async with httpx.AsyncClient() as http:
        req = a.listing_request()
        resp = await http.get(sim.kraken_rest_url + req.path, params=req.params)
        listing = a.parse_listing(resp.status_code, {}, resp.content)
        assert set(pairs) <= set(listing)
        a.learn_listing(listing)
        for pair in pairs:
            now = sim.clock.now_ms()
            start = now - now % MINUTE_MS - 90 * MINUTE_MS
            req = a.candles_request(pair, start, now + MINUTE_MS)
            resp = await http.get(sim.kraken_rest_url + req.path, params=req.params)
            page = a.parse_candles(req, resp.status_code, {}, resp.content, now_ms=now)
            assert page.covered[0] == start and page.covered[1] - start >= 89 * MINUTE_MS
            have = {c.interval_start: c for c in page.candles}
            for m in range(*page.covered, MINUTE_MS):
                truth = sim.market.truth("kraken", str(pair), m)
                if m in have:
                    assert _same_numbers(have[m], truth)
                else:
                    assert truth.no_trades  # covered and absent: the minute had no trades
        now = sim.clock.now_ms()
        m0 = now - now % MINUTE_MS - 20 * MINUTE_MS
        since, trades = since_ns(m0), []
        for _ in range(50):
            req = a.trades_request(BTC, since)
            resp = await http.get(sim.kraken_rest_url + req.path, params=req.params)
            tp = a.parse_trades(req, resp.status_code, {}, resp.content)
            trades += tp.trades
            if tp.server_last_ms >= m0 + 5 * MINUTE_MS or not tp.trades:
                break
            since = tp.next_since
        rebuilt = a.aggregate_trades(BTC, trades, m0, m0 + 5 * MINUTE_MS, now)
        assert rebuilt
        for c in rebuilt:
            assert _same_numbers(c, sim.market.truth("kraken", "BTC/USD", c.interval_start))
    seen: list[Candle] = []
    controls: list[object] = []
    async with websockets.connect(a.ws_endpoint(sim.kraken_ws_url, pairs)) as ws:
        for message in a.subscribe_messages(pairs, 1):
            await ws.send(message)
        with anyio.fail_after(20):
            while len(seen) < 12:
                frame = a.parse_frame(await ws.recv(), session_id="s", received_ms=0)
                assert not [c for c in frame.controls if isinstance(c, Malformed)]
                seen += frame.candles
                controls += frame.controls
    assert {c.symbol for c in seen} <= {str(p) for p in pairs}
    assert {p for c in controls if isinstance(c, Subscribed) for p in c.pairs} == set(pairs)


# -- frames recorded from the live API (tests/exchanges/payloads/README.md) ---------------------

XBTUSDT = Pair("BTC", "USDT")


def test_recorded_tokenized_asset_keeps_its_case_on_the_wire() -> None:
    a = Kraken()
    listing = a.parse_listing(
        200, {}, (PAYLOADS / "asset_pairs_tokenized_recorded.json").read_bytes()
    )
    aapl = Pair("AAPLX", "USD")  # canonical pairs are upper-case
    assert listing[aapl].ws_native == "AAPLx/USD"
    assert listing[aapl].rest_native == "AAPLxUSD"
    a.learn_listing(listing)
    assert a.native(aapl) == "AAPLx/USD"
    assert a.rest_native(aapl) == "AAPLxUSD"
    [message] = a.subscribe_messages([aapl], 1)
    assert json.loads(message)["params"]["symbol"] == ["AAPLx/USD"]
    assert a.canonical("AAPLx/USD") == aapl
    # a candle on the wire under Kraken's spelling is the canonical pair's, native name kept
    frame = parse(
        enc(
            {
                "channel": "ohlc",
                "type": "update",
                "timestamp": "2025-11-10T12:00:01.000000Z",
                "data": [
                    {
                        "symbol": "AAPLx/USD", "open": 270.1, "high": 270.4, "low": 270.0,
                        "close": 270.2, "trades": 3, "volume": 1.5, "vwap": 270.2,
                        "interval_begin": "2025-11-10T12:00:00.000000000Z", "interval": 1,
                        "timestamp": "2025-11-10T12:01:00.000000Z",
                    }
                ],
            }
        ),
        a,
    )  # fmt: skip
    [candle] = frame.candles
    assert (candle.symbol, candle.native_symbol) == ("AAPLX/USD", "AAPLx/USD")


def test_a_native_override_keeps_its_case() -> None:
    a = Kraken({Pair("AAPLX", "USD"): SymbolOverride(native="AAPLx/USD", rest_native="AAPLxUSD")})
    assert a.native(Pair("AAPLX", "USD")) == "AAPLx/USD"
    assert a.rest_native(Pair("AAPLX", "USD")) == "AAPLxUSD"


def test_recorded_ohlc_parses_exactly() -> None:
    a = Kraken({XBTUSDT: SymbolOverride(rest_native="XBTUSDT")})
    body = (PAYLOADS / "ohlc_rest_recorded.json").read_bytes()
    rows = json.loads(body)["result"]["XBTUSDT"]
    start = rows[0][0] * 1000
    req = a.candles_request(XBTUSDT, start, start + 19 * MINUTE_MS)
    page = a.parse_candles(req, 200, {}, body, now_ms=rows[-1][0] * 1000 + 30_000)
    assert len(page.candles) == 19  # the last row is the uncommitted current candle
    first, fourth = page.candles[0], page.candles[3]
    assert (first.open, first.volume, first.trade_count, first.origin) == (
        "106038.2", "0", 0, "no_trades",
    )  # fmt: skip
    assert (fourth.open, fourth.high, fourth.low, fourth.close) == (
        "106038.1", "106044.3", "106038.1", "106040.1",
    )  # fmt: skip
    assert (fourth.vwap, fourth.volume, fourth.trade_count) == ("106039.6", "0.08317981", 3)


def test_ohlc_rows_an_hour_apart_are_refused_as_one_minute_candles() -> None:
    a = Kraken({XBTUSDT: SymbolOverride(rest_native="XBTUSDT")})
    body = (PAYLOADS / "ohlc_rest_recorded_hourly.json").read_bytes()
    rows = json.loads(body)["result"]["XBTUSDT"]
    start = rows[0][0] * 1000
    req = a.candles_request(XBTUSDT, start, rows[-1][0] * 1000)
    with pytest.raises(ParseError, match="3600 s apart"):
        a.parse_candles(req, 200, {}, body, now_ms=rows[-1][0] * 1000 + 30_000)


def test_recorded_trades_parse_and_extra_trailing_fields_are_ignored() -> None:
    from loguru import logger

    import klined.exchanges.kraken_rest as kraken_rest

    a = Kraken({XBTUSDT: SymbolOverride(rest_native="XBTUSDT")})
    body = (PAYLOADS / "trades_recorded.json").read_bytes()
    req = a.trades_request(XBTUSDT, "0")
    page = a.parse_trades(req, 200, {}, body)
    assert len(page.trades) == 20
    assert page.trades[0].price == "105433.6" and page.trades[0].volume == "0.00027625"
    assert page.trades[0].ts_ms == 1762795433971 and page.trades[0].trade_id == 10218208
    # Kraken appends a field to every row: the same trades, said once
    doc = json.loads(body)
    for row in doc["result"]["XBTUSDT"]:
        row.append("new-field")
    kraken_rest._extra_fields_noted = False
    seen: list[str] = []
    sink = logger.add(lambda m: seen.append(m.record["message"]), level="WARNING")
    try:
        again = a.parse_trades(req, 200, {}, enc(doc))
        a.parse_trades(req, 200, {}, enc(doc))
    finally:
        logger.remove(sink)
    assert again.trades == page.trades
    assert len([m for m in seen if "8 fields" in m]) == 1
