"""Binance US: kline WebSocket streams, plus the REST API (in ``binance_rest``).

Protocol as documented in binance-us-api-docs (``web-socket-streams.md``, ``rest-api.md``):

* Streams ``<symbol>@kline_1m`` (lower-case symbol), combined at ``/stream?streams=a/b`` and
  wrapped as ``{"stream": ..., "data": <event>}``; live ``SUBSCRIBE`` requests are answered
  ``{"result": null, "id": N}``; errors look like ``{"code": 2, "msg": "...", "id": N}`` (the
  newer spot docs nest them: ``{"error": {"code": ..., "msg": ...}, "id": N}``).
* A connection lives at most 24 h, listens to at most 1024 streams and may send at most 5
  messages per second (pings, pongs and JSON requests alike). The server pings; the WebSocket
  library answers, so there is no application ping.
* ``GET /api/v3/klines`` and ``exchangeInfo``: see :mod:`klined.exchanges.binance_rest`.
"""

from __future__ import annotations

from decimal import Decimal

import msgspec

from klined.config import SymbolOverride
from klined.exchanges.base import (
    ErrorReply,
    ExchangeStatus,
    Frame,
    Limits,
    Malformed,
    RestBudget,
    Subscribed,
    SubscribeFailed,
)
from klined.exchanges.binance_rest import (
    KLINES_LIMIT,
    KNOWN_QUOTES,
    NAME,
    WEIGHTS,
    BinanceRest,
    ErrorBody,
)
from klined.exchanges.common import (
    as_bytes,
    check_numbers,
    compact_raw,
    distrust,
    plain_of,
    scale,
    snippet,
    to_decimal,
)
from klined.model import MINUTE_MS, Candle, Origin, Pair

__all__ = [
    "KLINES_LIMIT",
    "KNOWN_QUOTES",
    "LIMITS",
    "NAME",
    "STREAMS_PER_SUBSCRIBE",
    "WEIGHTS",
    "Binance",
]

LIMITS = Limits(
    streams_per_connection=1024,
    connection_lifetime_s=24 * 3600,
    max_candles_per_request=1000,
    ohlc_window_candles=None,
    rest_budget=RestBudget("weight", capacity=1200, window_s=60),
    ws_messages_per_s=5,
    ping_interval_s=None,
)

#: Streams per ``SUBSCRIBE`` request. Binance documents no per-request cap, only 1024 streams
#: per connection and 5 messages/s; 200 keeps every request a few kB and lets a full connection
#: subscribe in 6 messages (the runtime paces them at ``ws_messages_per_s``).
STREAMS_PER_SUBSCRIBE = 200

#: Unanswered SUBSCRIBE ids remembered (oldest forgotten first).
_MAX_PENDING = 1024


#: price text -> (``plain_decimal`` of it, its value); prices repeat from one update to the next
_PRICES: dict[str, tuple[str, Decimal]] = {}
_MAX_PRICES = 16_384


def _price(text: str) -> tuple[str, Decimal] | None:
    """``(plain_decimal(text), Decimal(text))`` for text the exact path reads as a finite
    non-negative number (memoized in ``_PRICES``), None for other numbers; raises for text
    ``Decimal`` cannot read."""
    value = Decimal(text)
    if not (value.is_finite() and value >= 0):
        return None
    if len(_PRICES) >= _MAX_PRICES:
        _PRICES.clear()
    known = _PRICES[text] = (plain_of(value), value)
    return known


# --------------------------------------------------------------------------------------------
# wire types (decoded once per frame with Decoder instances built at import). ``gc=False``:
# decoded values are trees (no reference cycles), so the collector need not track one per frame.


class _Kline(msgspec.Struct, gc=False):
    t: int
    T: int
    s: str
    i: str
    o: str
    c: str
    h: str
    l: str  # noqa: E741 - Binance's field name
    v: str
    n: int
    x: bool
    q: str


class _Msg(msgspec.Struct, gc=False):
    """Every shape a Binance stream connection sends, as one struct of optional fields."""

    e: str | None = None
    E: int | None = None
    s: str | None = None
    k: _Kline | None = None
    stream: str | None = None
    data: _Msg | None = None
    result: msgspec.Raw = msgspec.Raw()
    id: int | str | None = None
    code: int | None = None
    msg: str | None = None
    error: ErrorBody | str | None = None


_MSG = msgspec.json.Decoder(_Msg)
_ENC = msgspec.json.Encoder()


class Binance(BinanceRest):
    """The Binance US adapter (sans-I/O). See the module docstring for the protocol."""

    name = NAME
    limits = LIMITS

    def __init__(self, overrides: dict[Pair, SymbolOverride] | None = None) -> None:
        super().__init__(overrides)
        # SUBSCRIBE id -> the pairs it asked for, so the reply can name them.
        self._pending: dict[int, tuple[Pair, ...]] = {}

    # ---------------------------------------------------------------------------- WebSocket

    def stream_name(self, pair: Pair) -> str:
        return f"{self.native(pair).lower()}@kline_1m"

    def _streaming(self, pairs: list[Pair] | tuple[Pair, ...]) -> None:
        """Remember what we subscribe to, so its events map back to these very pairs."""
        for pair in pairs:
            self.symbols.note_streamed(pair, self.native(pair))

    def ws_endpoint(self, base_url: str, pairs: list[Pair]) -> str:
        """``<base>/stream?streams=btcusd@kline_1m/...``; ``<base>/stream`` when ``pairs`` is empty.

        With no pairs in the URL the runtime subscribes with :meth:`subscribe_messages`
        instead (handy beyond a URL's practical length, ~8 kB or 400 streams).
        """
        if len(pairs) > LIMITS.streams_per_connection:
            raise ValueError(
                f"{len(pairs)} pairs exceed Binance's {LIMITS.streams_per_connection} streams "
                "per connection; split them over several connections"
            )
        base = base_url.rstrip("/")
        for suffix in ("/stream", "/ws"):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
        if not pairs:
            return f"{base}/stream"
        self._streaming(pairs)
        return f"{base}/stream?streams=" + "/".join(self.stream_name(p) for p in pairs)

    def subscribe_messages(self, pairs: list[Pair], req_id: int) -> list[str]:
        """``SUBSCRIBE`` requests, ``STREAMS_PER_SUBSCRIBE`` streams each.

        Message ``i`` carries id ``req_id + i``: the caller advances its id counter by the
        number of messages, and sends them no faster than ``limits.ws_messages_per_s``.
        """
        messages = []
        for i, start in enumerate(range(0, len(pairs), STREAMS_PER_SUBSCRIBE)):
            chunk = tuple(pairs[start : start + STREAMS_PER_SUBSCRIBE])
            self._streaming(chunk)
            mid = req_id + i
            if len(self._pending) >= _MAX_PENDING:  # replies lost with their connection
                self._pending.pop(next(iter(self._pending)))
            self._pending[mid] = chunk
            body: dict[str, object] = {
                "method": "SUBSCRIBE",
                "params": [self.stream_name(p) for p in chunk],
                "id": mid,
            }
            messages.append(_ENC.encode(body).decode())
        return messages

    def ping_message(self, req_id: int) -> str | None:
        """None: Binance uses WebSocket protocol pings, answered by the library."""
        return None

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
        """Nearly every frame: a combined-stream kline with plain numbers, in one pass. None
        for anything else, which the general path (``_parse``) then reads from the start."""
        try:
            msg = _MSG.decode(buf)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        ev = msg.data
        if ev is None or ev.e != "kline" or ev.k is None or ev.E is None:
            return None
        candle = self._plain_kline(ev.k, ev.E, buf, session_id, received_ms)
        return None if candle is None else Frame([candle], [], ev.E)

    def _parse(self, buf: bytes, session_id: str, received_ms: int) -> Frame:
        if not buf.strip():
            return Frame(controls=[Malformed("empty frame", "")])
        try:
            msg = _MSG.decode(buf)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return Frame(controls=[Malformed(f"undecodable frame: {exc}", snippet(buf))])
        if msg.data is not None:  # combined stream wrapper
            inner = msg.data
            if inner.e is None and inner.k is None:
                return Frame(controls=[Malformed("combined frame without an event", snippet(buf))])
            return self._event(inner, buf, session_id, received_ms)
        if msg.e is not None or msg.k is not None:
            return self._event(msg, buf, session_id, received_ms)
        return self._reply(msg, buf)

    def _reply(self, msg: _Msg, buf: bytes) -> Frame:
        req_id = msg.id if isinstance(msg.id, int) else None
        code, text = msg.code, msg.msg
        if isinstance(msg.error, ErrorBody):
            code, text = msg.error.code, msg.error.msg
        elif isinstance(msg.error, str):
            text = msg.error
        if code is not None or text is not None:
            message = f"binance error {code}: {text or ''}".strip()
            pairs = self._pending.pop(req_id, None) if req_id is not None else None
            if pairs is not None:
                # Binance refuses a request as a whole (bad syntax, too many requests), never
                # per symbol: retrying later may help, so it is not fatal for the pairs.
                return Frame(controls=[SubscribeFailed(pairs, message, fatal=False)])
            return Frame(controls=[ErrorReply(message, req_id)])
        if msg.id is not None and bytes(msg.result) == b"null":
            pairs = self._pending.pop(req_id, ()) if req_id is not None else ()
            return Frame(controls=[Subscribed(pairs, req_id)])
        if msg.id is not None and msg.result:
            return Frame()  # a query reply (LIST_SUBSCRIPTIONS, GET_PROPERTY): nothing to do
        return Frame(controls=[Malformed("unrecognised message", snippet(buf))])

    def _event(self, ev: _Msg, buf: bytes, session_id: str, received_ms: int) -> Frame:
        if ev.e == "serverShutdown":
            return Frame(
                controls=[ExchangeStatus("shutdown", "server is about to shut down; reconnect")],
                stamp_ms=ev.E,
            )
        if ev.e != "kline":
            return Frame(
                controls=[Malformed(f"unexpected event type {ev.e!r}", snippet(buf))],
                stamp_ms=ev.E,
            )
        k = ev.k
        if k is None or ev.E is None:
            return Frame(controls=[Malformed("kline event without k or E", snippet(buf))])
        frame = Frame(stamp_ms=ev.E)
        reason = self._kline_problem(k)
        pair = self.canonical(k.s)
        if reason is None and pair is None:
            reason = f"unknown symbol {k.s!r}"
        if reason is not None or pair is None:
            frame.controls.append(Malformed(reason or "unknown symbol", snippet(buf)))
            return frame
        try:
            q = to_decimal(k.q, "quote volume")
            if q < 0:
                raise ValueError("negative quote volume")
            nums = scale(
                Decimal(k.o),
                Decimal(k.h),
                Decimal(k.l),
                Decimal(k.c),
                Decimal(k.v),
                multiplier=self.multiplier(pair),
                quote_volume=q,
            )
        except (ValueError, ArithmeticError) as exc:
            frame.controls.append(Malformed(str(exc), snippet(buf)))
            return frame
        frame.candles.append(
            nums.candle(
                NAME,
                pair,
                k.s,
                k.t,
                trade_count=k.n,
                is_final=k.x,
                origin=Origin.WS,
                session_id=session_id,
                event_ts=ev.E,
                ingestion_ts=received_ms,
                raw=compact_raw(buf),
            )
        )
        return frame

    def _plain_kline(
        self, k: _Kline, stamp: int, buf: bytes, session_id: str, received_ms: int
    ) -> Candle | None:
        """The candle of a kline whose numbers are sane, reading each number as the exact path
        does (``Decimal(text)``) but rendering it with ``plain_of`` and prices memoized; None
        whenever anything is unusual (a multiplier, any problem; text ``Decimal`` refuses
        raises): the exact path then decides, so both paths always agree."""
        start = k.t
        if k.i != "1m" or start % MINUTE_MS or start <= 0 or k.n < 0:
            return None
        symbol = self.symbols.plain_names.get(k.s)
        if symbol is None:
            symbol = self.symbols.plain_name(k.s, self.canonical(k.s))
            if symbol is None:
                return None
        known = _PRICES.get
        o = known(k.o) or _price(k.o)
        h = known(k.h) or _price(k.h)
        lo = known(k.l) or _price(k.l)
        c = known(k.c) or _price(k.c)
        if o is None or h is None or lo is None or c is None:
            return None
        v = Decimal(k.v)  # volumes rarely repeat: no memo
        q = Decimal(k.q)
        # ``check_ohlcv``'s rules and the quote volume's, on the exact values
        dlo = lo[1]
        if not (
            dlo > 0
            and dlo <= o[1] <= h[1]
            and dlo <= c[1] <= h[1]
            and v.is_finite()
            and v >= 0
            and q.is_finite()
            and q >= 0
        ):
            return None  # the exact path names the problem
        return Candle(  # positionally, in field order (see ``Candle``)
            NAME,  # exchange
            symbol,
            k.s,  # native_symbol
            start,  # interval_start
            o[0],  # open
            h[0],  # high
            lo[0],  # low
            c[0],  # close
            plain_of(v),  # volume
            plain_of(q),  # quote_volume
            plain_of(q / v) if v else None,  # vwap, exactly as ``scale`` makes it
            k.n,  # trade_count
            k.x,  # is_final
            Origin.WS,
            session_id,
            stamp,  # event_ts
            received_ms,  # ingestion_ts
            60,  # interval_seconds
            compact_raw(buf),  # raw
        )

    @staticmethod
    def _kline_problem(k: _Kline) -> str | None:
        if k.i != "1m":
            return f"interval {k.i!r} is not 1m"
        if k.t % MINUTE_MS or k.t <= 0:
            return f"kline start {k.t} is not a minute boundary"
        if k.n < 0:
            return "negative trade count"
        return check_numbers(k.o, k.h, k.l, k.c, k.v)
