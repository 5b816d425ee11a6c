"""Kraken: WebSocket v2 ``ohlc`` channel, plus the public REST API (in ``kraken_rest``).

Protocol as documented at docs.kraken.com:

* WS v2 (``wss://ws.kraken.com/v2``) names pairs ``BTC/USD``. A ``subscribe`` request lists
  symbols and is acknowledged once per symbol (``success`` true/false, ``error`` such as
  ``Currency pair not supported XBT/EUR``). ``ohlc`` messages (``snapshot`` then ``update``)
  carry numbers as JSON numbers and times as RFC 3339 with up to nine fractional digits.
  Candles have no final flag. A ``status`` message arrives on connect, ``heartbeat`` about
  every second without other traffic, and the client may ``ping`` (answered by ``pong``).
* Public REST calls are metered by a per-IP counter: each call adds its cost (1), the counter
  decays by about one every three seconds and must stay at or below 15.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec

from klined.exchanges.base import (
    ErrorReply,
    ExchangeStatus,
    Frame,
    Heartbeat,
    Limits,
    Malformed,
    Pong,
    RestBudget,
    Subscribed,
    SubscribeFailed,
)
from klined.exchanges.common import (
    PLAIN,
    as_bytes,
    check_numbers,
    compact_raw,
    distrust,
    parse_rfc3339_ms,
    plain_number,
    plain_text,
    scale,
    snippet,
    to_decimal,
)
from klined.exchanges.kraken_rest import (
    ASSET_ALIASES,
    COSTS,
    NAME,
    OHLC_WINDOW,
    TRADES_PER_PAGE,
    KrakenRest,
    ws_name_to_pair,
)
from klined.model import MINUTE_MS, Candle, Origin, Pair

__all__ = [
    "ASSET_ALIASES",
    "COSTS",
    "LIMITS",
    "NAME",
    "OHLC_WINDOW",
    "SYMBOLS_PER_SUBSCRIBE",
    "TRADES_PER_PAGE",
    "Kraken",
    "ws_name_to_pair",
]

LIMITS = Limits(
    streams_per_connection=1000,
    connection_lifetime_s=None,
    max_candles_per_request=720,
    ohlc_window_candles=720,
    # Public endpoints: a call counter that must stay <= 15 and decays ~1 per 3 s.
    rest_budget=RestBudget("decay", capacity=15, decay_per_s=0.33),
    ws_messages_per_s=None,
    ping_interval_s=30,
)

#: Symbols per ``subscribe`` request. Kraken documents no cap, but answers each symbol with
#: its own ack: 100 keeps a request and its burst of acks small, and one refused request
#: (e.g. a rate limit) costs at most 100 subscriptions, which are then retried.
SYMBOLS_PER_SUBSCRIBE = 100

#: Error messages on which retrying a subscription later may help.
_TRANSIENT = ("rate", "limit", "busy", "unavailable", "timeout", "try again", "exceeded")


# --------------------------------------------------------------------------------------------
# wire types (``gc=False``: decoded values are trees, never cycles; nothing for the collector)


class _Candle(msgspec.Struct):
    symbol: str
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    interval_begin: str
    interval: int
    trades: int | None = None
    vwap: Decimal | None = None
    timestamp: str | None = None


class _PlainCandle(msgspec.Struct, gc=False):
    """``_Candle`` with its numbers untyped: decoded with ``float_hook=str``, a JSON number
    arrives as its own text (an integer as ``int``), so plain numbers need no ``Decimal``. A
    JSON string arrives as text too; for plain text ``_Candle`` reads the same value from
    either."""

    symbol: str
    open: Any
    high: Any
    low: Any
    close: Any
    volume: Any
    interval_begin: str
    interval: int
    trades: int | None = None
    vwap: Any = None
    timestamp: str | None = None


class _Result(msgspec.Struct, gc=False):
    channel: str | None = None
    symbol: str | None = None


class _Msg(msgspec.Struct, gc=False):
    channel: str | None = None
    type: str | None = None
    timestamp: str | None = None
    data: list[msgspec.Raw] | None = None
    method: str | None = None
    success: bool | None = None
    result: _Result | None = None
    error: str | None = None
    symbol: str | None = None
    req_id: int | str | None = None


class _Status(msgspec.Struct):
    system: str
    api_version: str | None = None
    version: str | None = None


_MSG = msgspec.json.Decoder(_Msg)
_CANDLE = msgspec.json.Decoder(_Candle)
_PLAIN_CANDLE = msgspec.json.Decoder(_PlainCandle, float_hook=str)
_STATUS = msgspec.json.Decoder(_Status)
_ENC = msgspec.json.Encoder()


class Kraken(KrakenRest):
    """The Kraken adapter (sans-I/O). See the module docstring for the protocol."""

    name = NAME
    limits = LIMITS

    # ---------------------------------------------------------------------------- WebSocket

    def ws_endpoint(self, base_url: str, pairs: list[Pair]) -> str:
        """Kraken subscribes by message; the URL is the base (``wss://ws.kraken.com/v2``)."""
        return base_url

    def subscribe_messages(self, pairs: list[Pair], req_id: int) -> list[str]:
        """``subscribe`` requests for the 1m ``ohlc`` channel with a snapshot.

        Message ``i`` carries ``req_id + i``; the caller advances its counter accordingly.
        """
        messages = []
        for i, start in enumerate(range(0, len(pairs), SYMBOLS_PER_SUBSCRIBE)):
            chunk = pairs[start : start + SYMBOLS_PER_SUBSCRIBE]
            params = {
                "channel": "ohlc",
                "symbol": [self.native(p) for p in chunk],
                "interval": 1,
                "snapshot": True,
            }
            body = {"method": "subscribe", "params": params, "req_id": req_id + i}
            messages.append(_ENC.encode(body).decode())
        return messages

    def ping_message(self, req_id: int) -> str | None:
        return _ENC.encode({"method": "ping", "req_id": req_id}).decode()

    def parse_frame(self, data: str | bytes, *, session_id: str, received_ms: int) -> Frame:
        """One inbound frame -> candles and control events; never raises."""
        try:
            buf = as_bytes(data)
        except Exception:  # pragma: no cover - only unencodable str subclasses
            return Frame(controls=[Malformed("frame is not text", snippet(repr(data)))])
        try:
            frame = self._plain_frame(buf, session_id, received_ms)
        except Exception:  # a bug here must not cost the event: the general path decides
            frame = None
        if frame is not None:
            return frame
        try:
            return distrust(self._parse(buf, session_id, received_ms))
        except Exception as exc:  # a parser bug must never take the stream down
            return Frame(controls=[Malformed(f"unexpected parser error: {exc!r}", snippet(buf))])

    def _plain_frame(self, buf: bytes, session_id: str, received_ms: int) -> Frame | None:
        """Nearly every frame: ``ohlc`` candles with plain numbers, in one pass. None for
        anything else, which the general path (``_parse``) then reads from the start."""
        try:
            msg = _MSG.decode(buf)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        if msg.channel != "ohlc" or not msg.data:
            return None
        if buf.find(10) >= 0 or buf.find(13) >= 0:
            return None  # line breaks: the general path puts each candle's JSON on one line
        stamp = _try_time(msg.timestamp)
        # A lone candle keeps its slice of the frame as its raw JSON (no copy; the frame is
        # hardly bigger); candles of a bigger frame (a snapshot) get their own copy, so a
        # candle held for finality does not keep the whole snapshot alive.
        lone = len(msg.data) == 1
        candles = []
        for raw in msg.data:
            item = raw if lone else msgspec.Raw(bytes(raw))
            candle = self._plain_candle(item, stamp, session_id, received_ms)
            if candle is None:
                return None
            candles.append(candle)
        return Frame(candles, [], stamp)

    def _parse(self, buf: bytes, session_id: str, received_ms: int) -> Frame:
        if not buf.strip():
            return Frame(controls=[Malformed("empty frame", "")])
        try:
            msg = _MSG.decode(buf)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return Frame(controls=[Malformed(f"undecodable frame: {exc}", snippet(buf))])
        if msg.channel == "ohlc":
            return self._ohlc(msg, buf, session_id, received_ms)
        if msg.channel == "heartbeat":
            return Frame(controls=[Heartbeat()])
        if msg.channel == "status":
            return self._status(msg, buf)
        if msg.method is not None:
            return self._method_reply(msg, buf)
        if msg.channel is not None:
            return Frame()  # a channel klined does not subscribe to: nothing to do
        if msg.error is not None:
            req_id = msg.req_id if isinstance(msg.req_id, int) else None
            return Frame(controls=[ErrorReply(f"kraken error: {msg.error}", req_id)])
        return Frame(controls=[Malformed("unrecognised message", snippet(buf))])

    def _status(self, msg: _Msg, buf: bytes) -> Frame:
        frame = Frame()
        for item in msg.data or []:
            try:
                st = _STATUS.decode(item)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                frame.controls.append(Malformed(f"status entry: {exc}", snippet(bytes(item))))
                continue
            detail = f"api_version={st.api_version} version={st.version}"
            frame.controls.append(ExchangeStatus(st.system, detail))
        if not frame.controls:
            frame.controls.append(Malformed("status message without data", snippet(buf)))
        return frame

    def _method_reply(self, msg: _Msg, buf: bytes) -> Frame:
        req_id = msg.req_id if isinstance(msg.req_id, int) else None
        if msg.method == "pong":
            # No stamp_ms: ``time_out`` is the gateway's clock, not the market-data feed's, so
            # a pong stamped after a minute's end does not prove that minute's last update
            # was already sent. Only ohlc messages' own timestamps vouch for that.
            return Frame(controls=[Pong(req_id)])
        if msg.method == "subscribe":
            if msg.success:
                symbol = msg.result.symbol if msg.result is not None else msg.symbol
                pair = self.canonical(symbol) if symbol else None
                return Frame(controls=[Subscribed((pair,) if pair else (), req_id)])
            error = msg.error or "subscription refused"
            symbol = msg.symbol or _symbol_in(error)
            pair = self.canonical(symbol) if symbol else None
            pairs = (pair,) if pair else ()
            if "already subscribed" in error.lower():
                return Frame(controls=[Subscribed(pairs, req_id)])
            fatal = not any(word in error.lower() for word in _TRANSIENT)
            return Frame(controls=[SubscribeFailed(pairs, f"kraken: {error}", fatal=fatal)])
        if msg.success is False or msg.error:
            text = f"kraken {msg.method} failed: {msg.error or 'no reason given'}"
            return Frame(controls=[ErrorReply(text, req_id)])
        return Frame()  # unsubscribe acks and the like

    def _ohlc(self, msg: _Msg, buf: bytes, session_id: str, received_ms: int) -> Frame:
        stamp = _try_time(msg.timestamp)
        frame = Frame(stamp_ms=stamp)
        if msg.data is None:
            frame.controls.append(Malformed("ohlc message without data", snippet(buf)))
            return frame
        for raw in msg.data:
            item = bytes(raw)
            try:
                candle = self._ws_candle(item, stamp, session_id, received_ms)
            except ValueError as exc:
                frame.controls.append(Malformed(str(exc), snippet(item)))
                continue
            frame.candles.append(candle)
        return frame

    def _plain_candle(
        self, item: msgspec.Raw, stamp: int | None, session_id: str, received_ms: int
    ) -> Candle | None:
        """``_ws_candle`` for a candle whose numbers are plain and sane, without a ``Decimal``
        round trip per number; None whenever anything is unusual (a multiplier, numbers
        ``plain_number`` does not take, any problem): ``_ws_candle`` then decides, so both
        paths always agree."""
        try:
            c = _PLAIN_CANDLE.decode(item)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        # numbers: text, an int, or anything else (an unhashable value raises, and
        # ``parse_frame`` then takes the general path)
        known = PLAIN.get
        o = known(c.open) or plain_number(c.open)
        h = known(c.high) or plain_number(c.high)
        lo = known(c.low) or plain_number(c.low)
        close = known(c.close) or plain_number(c.close)
        volume = plain_text(c.volume)  # volumes and vwaps rarely repeat: no memo
        if o is None or h is None or lo is None or close is None or volume is None:
            return None
        vwap = None
        if c.vwap is not None:
            w = plain_text(c.vwap)
            if w is None or (w == "0" and volume != "0"):
                return None
            if volume != "0":  # as ``_ws_candle``: no vwap without volume
                vwap = w
        if c.interval != 1 or (c.trades is not None and c.trades < 0):
            return None
        # ``check_ohlcv``'s price rules, on the exact values (the volume is non-negative)
        dlo = lo[1]
        if not (dlo > 0 and dlo <= o[1] <= h[1] and dlo <= close[1] <= h[1]):
            return None
        symbol = self.symbols.plain_names.get(c.symbol)
        if symbol is None:
            symbol = self.symbols.plain_name(c.symbol, self.canonical(c.symbol))
            if symbol is None:
                return None
        try:
            start = parse_rfc3339_ms(c.interval_begin)
        except ValueError:
            return None
        if start % MINUTE_MS:
            return None
        event_ts = stamp if stamp is not None else _try_time(c.timestamp)
        return Candle(  # positionally, in field order (see ``Candle``)
            NAME,  # exchange
            symbol,
            c.symbol,  # native_symbol
            start,  # interval_start
            o[0],  # open
            h[0],  # high
            lo[0],  # low
            close[0],
            volume,
            None,  # quote_volume: Kraken sends none
            vwap,
            c.trades,  # trade_count
            False,  # is_final: Kraken has no final flag; the stream runtime decides
            Origin.WS,
            session_id,
            event_ts if event_ts is not None else received_ms,
            received_ms,  # ingestion_ts
            60,  # interval_seconds
            item,  # raw: exact JSON of one candle, without line breaks (see ``_plain_frame``)
        )

    def _ws_candle(
        self, item: bytes, stamp: int | None, session_id: str, received_ms: int
    ) -> Candle:
        try:
            c = _CANDLE.decode(item)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ValueError(f"ohlc candle: {exc}") from None
        if c.interval != 1:
            raise ValueError(f"ohlc candle interval {c.interval} is not 1 minute")
        start = parse_rfc3339_ms(c.interval_begin)
        if start % MINUTE_MS:
            raise ValueError(f"interval_begin {c.interval_begin} is not a minute boundary")
        pair = self.canonical(c.symbol)
        if pair is None:
            raise ValueError(f"unknown symbol {c.symbol!r}")
        problem = check_numbers(c.open, c.high, c.low, c.close, c.volume)
        if problem is not None:
            raise ValueError(f"ohlc candle for {c.symbol}: {problem}")
        if c.trades is not None and c.trades < 0:
            raise ValueError(f"ohlc candle for {c.symbol}: negative trade count")
        vwap = None
        if c.vwap is not None and c.volume > 0:
            vwap = to_decimal(c.vwap, "vwap")
            if vwap <= 0:
                raise ValueError(f"ohlc candle for {c.symbol}: non-positive vwap")
        nums = scale(
            c.open, c.high, c.low, c.close, c.volume, multiplier=self.multiplier(pair), vwap=vwap
        )
        event_ts = stamp if stamp is not None else _try_time(c.timestamp)
        return nums.candle(
            NAME,
            pair,
            c.symbol,
            start,
            trade_count=c.trades,
            is_final=False,  # Kraken has no final flag; the stream runtime decides
            origin=Origin.WS,
            session_id=session_id,
            event_ts=event_ts if event_ts is not None else received_ms,
            ingestion_ts=received_ms,
            raw=compact_raw(item),
        )


def _try_time(text: str | None) -> int | None:
    if not text:
        return None
    try:
        return parse_rfc3339_ms(text)
    except ValueError:
        return None


def _symbol_in(error: str) -> str | None:
    """The pair an error names at its end (``Currency pair not supported BTC/XYZ``)."""
    last = error.rsplit(" ", 1)[-1].strip()
    return last if "/" in last else None
