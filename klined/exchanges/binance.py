"""Binance US: kline WebSocket streams and the ``/api/v3/klines`` / ``exchangeInfo`` REST API.

Protocol as documented in binance-us-api-docs (``web-socket-streams.md``, ``rest-api.md``):

* Streams ``<symbol>@kline_1m`` (lower-case symbol), combined at ``/stream?streams=a/b`` and
  wrapped as ``{"stream": ..., "data": <event>}``; live ``SUBSCRIBE`` requests are answered
  ``{"result": null, "id": N}``; errors look like ``{"code": 2, "msg": "...", "id": N}`` (the
  newer spot docs nest them: ``{"error": {"code": ..., "msg": ...}, "id": N}``).
* A connection lives at most 24 h, listens to at most 1024 streams and may send at most 5
  messages per second (pings, pongs and JSON requests alike). The server pings; the WebSocket
  library answers, so there is no application ping.
* ``GET /api/v3/klines`` returns 12-field rows, at most 1000, ``startTime``/``endTime``
  inclusive on the open time; the last row may be the unfinished current minute.
* Errors are ``{"code": -1121, "msg": "Invalid symbol."}``; HTTP 429 asks to back off, 418 is
  an IP ban, both with ``Retry-After`` seconds; ``X-MBX-USED-WEIGHT-1M`` reports the weight used.
"""

from __future__ import annotations

from decimal import Decimal

import msgspec

from klined.config import SymbolOverride
from klined.errors import ExchangeError, ParseError, RateLimited, RequestRejected, UnlistedPair
from klined.exchanges.base import (
    CandlePage,
    ErrorReply,
    ExchangeStatus,
    Frame,
    Limits,
    ListedPair,
    Malformed,
    RestBudget,
    RestRequest,
    Subscribed,
    SubscribeFailed,
)
from klined.exchanges.common import (
    SymbolMap,
    as_bytes,
    ceil_minute,
    check_numbers,
    compact_raw,
    distrust,
    header_float,
    plain_of,
    retry_after_s,
    scale,
    snippet,
    to_decimal,
)
from klined.model import MINUTE_MS, Candle, Origin, Pair, floor_minute

NAME = "binance"

LIMITS = Limits(
    streams_per_connection=1024,
    connection_lifetime_s=24 * 3600,
    max_candles_per_request=1000,
    ohlc_window_candles=None,
    rest_budget=RestBudget("weight", capacity=1200, window_s=60),
    ws_messages_per_s=5,
    ping_interval_s=None,
)

#: Request weight per endpoint (Binance US ``rest-api.md``).
WEIGHTS = {"klines": 2, "listing": 20}

#: Streams per ``SUBSCRIBE`` request. Binance documents no per-request cap, only 1024 streams
#: per connection and 5 messages/s; 200 keeps every request a few kB and lets a full connection
#: subscribe in 6 messages (the runtime paces them at ``ws_messages_per_s``).
STREAMS_PER_SUBSCRIBE = 200

KLINES_LIMIT = 1000

#: Unanswered SUBSCRIBE ids remembered (oldest forgotten first).
_MAX_PENDING = 1024

#: Quote assets, longest first, for splitting a native symbol nobody told us about.
KNOWN_QUOTES = (
    "FDUSD", "USDT", "USDC", "TUSD", "BUSD", "USDP", "USD", "DAI", "BTC", "ETH", "BNB",
    "EUR", "GBP", "AUD", "TRY", "BRL", "JPY", "DOGE", "XRP", "SOL",
)  # fmt: skip

#: Error codes that mean "the exchange could not serve this right now" (retry with backoff).
_RETRYABLE_CODES = {-1000, -1001, -1006, -1007, -1008, -1016}


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


class _Err(msgspec.Struct, gc=False):
    code: int | None = None
    msg: str | None = None


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
    error: _Err | str | None = None


class _Symbol(msgspec.Struct):
    symbol: str
    status: str = ""
    baseAsset: str = ""
    quoteAsset: str = ""


class _ExchangeInfo(msgspec.Struct):
    symbols: list[_Symbol]


_KlineRow = tuple[int, str, str, str, str, str, int, str, int, str, str, str]

_MSG = msgspec.json.Decoder(_Msg)
_ERR = msgspec.json.Decoder(_Err)
_INFO = msgspec.json.Decoder(_ExchangeInfo)
_ROWS = msgspec.json.Decoder(list[msgspec.Raw])
_ROW = msgspec.json.Decoder(_KlineRow)
_ENC = msgspec.json.Encoder()


class Binance:
    """The Binance US adapter (sans-I/O). See the module docstring for the protocol."""

    name = NAME
    limits = LIMITS

    def __init__(self, overrides: dict[Pair, SymbolOverride] | None = None) -> None:
        self.symbols = SymbolMap(overrides)
        # SUBSCRIBE id -> the pairs it asked for, so the reply can name them.
        self._pending: dict[int, tuple[Pair, ...]] = {}

    # ---------------------------------------------------------------------------- symbols

    def native(self, pair: Pair) -> str:
        """``BTC/USD`` -> ``BTCUSD`` (or the configured ``native`` override)."""
        return self.symbols.native(pair) or f"{pair.base}{pair.quote}"

    def canonical(self, native: str) -> Pair | None:
        """``BTCUSD`` -> ``BTC/USD``: overrides, listed and subscribed names first, then a
        guess by quote (memoized: every streamed event asks)."""
        try:
            return self.symbols.resolved[native]
        except KeyError:
            return self.symbols.remember(native, self._resolve(native))

    def _resolve(self, native: str) -> Pair | None:
        """A name nobody told us about is split at a known quote. ``REKTUSD`` reads as
        ``REKT/USD`` or ``REK/TUSD``: a split into assets of the pairs the adapter knows
        (configured, subscribed, listed) wins, then one into a known quote, then the longest
        quote."""
        name = native.upper()
        pair = self.symbols.by_native(name)
        if pair is not None:
            return pair
        guesses: list[Pair] = []
        for quote in KNOWN_QUOTES:
            if name.endswith(quote) and len(name) > len(quote):
                base = name[: -len(quote)]
                if base.isalnum() and base.isascii() and len(base) <= 20:
                    guesses.append(Pair(base, quote))
        if len(guesses) <= 1:
            return guesses[0] if guesses else None
        known = self.symbols.known_pairs()
        bases = {p.base for p in known}
        quotes = {p.quote for p in known}
        return max(guesses, key=lambda p: (p.base in bases) + (p.quote in quotes))

    def multiplier(self, pair: Pair) -> int:
        return self.symbols.multiplier(pair)

    def learn_listing(self, listing: dict[Pair, ListedPair]) -> None:
        """Remember the listed native names (optional; overrides still win)."""
        for pair, listed in listing.items():
            self.symbols.learn(pair, listed.ws_native, listed.rest_native)

    def stream_name(self, pair: Pair) -> str:
        return f"{self.native(pair).lower()}@kline_1m"

    def _streaming(self, pairs: list[Pair] | tuple[Pair, ...]) -> None:
        """Remember what we subscribe to, so its events map back to these very pairs."""
        for pair in pairs:
            self.symbols.note_streamed(pair, self.native(pair))

    # ---------------------------------------------------------------------------- WebSocket

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
        if isinstance(msg.error, _Err):
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
            Candle(
                exchange=NAME,
                symbol=str(pair),
                native_symbol=k.s,
                interval_start=k.t,
                open=nums.open,
                high=nums.high,
                low=nums.low,
                close=nums.close,
                volume=nums.volume,
                quote_volume=nums.quote_volume,
                vwap=nums.vwap,
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

    # ---------------------------------------------------------------------------- REST

    def listing_request(self) -> RestRequest:
        return RestRequest("GET", "/api/v3/exchangeInfo", {}, WEIGHTS["listing"], "listing")

    def parse_listing(
        self, status: int, headers: dict[str, str], body: bytes
    ) -> dict[Pair, ListedPair]:
        """``exchangeInfo`` -> every listed pair (``trading`` when status is TRADING)."""
        self._raise_for_status(status, headers, body, None, None)
        try:
            info = _INFO.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ParseError(f"binance exchangeInfo: {exc}", snippet(body)) from None
        listing: dict[Pair, ListedPair] = {}
        for sym in info.symbols:
            pair = self.symbols.by_native(sym.symbol)
            if pair is None:
                try:
                    pair = Pair.parse(f"{sym.baseAsset}/{sym.quoteAsset}")
                except ValueError:
                    continue  # not a spot pair klined can name; ignore it
            listing[pair] = ListedPair(
                pair=pair,
                ws_native=sym.symbol,
                rest_native=sym.symbol,
                rest_key=sym.symbol,
                trading=sym.status == "TRADING",
            )
        return listing

    def candles_request(self, pair: Pair, start_ms: int, end_ms: int) -> RestRequest:
        """Klines whose open time is in ``[start_ms, end_ms)`` (Binance's end is inclusive)."""
        first = ceil_minute(start_ms)
        params = {
            "symbol": self.native(pair),
            "interval": "1m",
            "startTime": str(first),
            "endTime": str(max(first, end_ms - 1)),
            "limit": str(KLINES_LIMIT),
        }
        return RestRequest(
            "GET",
            "/api/v3/klines",
            params,
            WEIGHTS["klines"],
            "klines",
            pair,
            start_ms=first,
            end_ms=end_ms,
        )

    def parse_candles(
        self,
        request: RestRequest,
        status: int,
        headers: dict[str, str],
        body: bytes,
        *,
        now_ms: int,
    ) -> CandlePage:
        """Closed klines of the request's window and the minute range they prove complete."""
        pair = request.pair
        if pair is None:
            raise ValueError("a klines request always names its pair")
        native = request.params.get("symbol", self.native(pair))
        self._raise_for_status(status, headers, body, pair, now_ms)
        start = (
            request.start_ms if request.start_ms is not None else int(request.params["startTime"])
        )
        end = request.end_ms if request.end_ms is not None else int(request.params["endTime"]) + 1
        limit = int(request.params.get("limit", KLINES_LIMIT))
        try:
            rows = _ROWS.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ParseError(f"binance klines for {pair}: {exc}", snippet(body)) from None
        mult = self.multiplier(pair)
        candles: list[Candle] = []
        last_open: int | None = None
        for raw_row in rows:
            try:
                row = _ROW.decode(raw_row)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise ParseError(f"binance kline row for {pair}: {exc}", snippet(raw_row)) from None
            open_time, o, h, lo, c, v, close_time, q, n = row[:9]
            problem = self._row_problem(open_time, close_time, o, h, lo, c, v, n)
            if problem is not None:
                raise ParseError(f"binance kline row for {pair}: {problem}", snippet(raw_row))
            if last_open is not None and open_time <= last_open:
                raise ParseError(f"binance klines for {pair} are not in time order", snippet(body))
            last_open = open_time
            if close_time >= now_ms or open_time + MINUTE_MS > now_ms:
                continue  # the unfinished current minute is never stored as final
            if not (start <= open_time < end):
                continue
            try:
                nums = scale(
                    Decimal(o),
                    Decimal(h),
                    Decimal(lo),
                    Decimal(c),
                    Decimal(v),
                    multiplier=mult,
                    quote_volume=to_decimal(q, "quote volume"),
                )
            except (ValueError, ArithmeticError) as exc:
                raise ParseError(f"binance kline row for {pair}: {exc}", snippet(raw_row)) from None
            candles.append(
                Candle(
                    exchange=NAME,
                    symbol=str(pair),
                    native_symbol=native,
                    interval_start=open_time,
                    open=nums.open,
                    high=nums.high,
                    low=nums.low,
                    close=nums.close,
                    volume=nums.volume,
                    quote_volume=nums.quote_volume,
                    vwap=nums.vwap,
                    trade_count=n,
                    is_final=True,
                    origin=Origin.NO_TRADES if n == 0 else Origin.REST,
                    event_ts=now_ms,
                    ingestion_ts=now_ms,
                    raw=compact_raw(bytes(raw_row)),
                )
            )
        cov_end = min(end, floor_minute(now_ms))
        truncated = len(rows) >= limit and last_open is not None
        if truncated and last_open is not None:
            cov_end = min(cov_end, last_open + MINUTE_MS)
        cov_end = max(cov_end, start)
        next_since = str(cov_end) if truncated and cov_end < end else None
        return CandlePage(
            candles=candles,
            covered=(start, cov_end),
            next_since=next_since,
            used_weight=header_float(headers, "x-mbx-used-weight-1m"),
        )

    @staticmethod
    def _row_problem(
        open_time: int, close_time: int, o: str, h: str, lo: str, c: str, v: str, n: int
    ) -> str | None:
        if open_time % MINUTE_MS or open_time <= 0:
            return f"open time {open_time} is not a minute boundary"
        if not (open_time < close_time < open_time + MINUTE_MS):
            return f"close time {close_time} does not close the 1m kline opened at {open_time}"
        if n < 0:
            return "negative trade count"
        return check_numbers(o, h, lo, c, v)

    def _raise_for_status(
        self,
        status: int,
        headers: dict[str, str],
        body: bytes,
        pair: Pair | None,
        now_ms: int | None,
    ) -> None:
        """Turn Binance's HTTP status and error JSON into klined errors (200 passes)."""
        what = f" for {pair}" if pair is not None else ""
        if status in (418, 429):
            wait = retry_after_s(headers, now_ms)
            banned = status == 418
            kind = "IP banned" if banned else "rate limited"
            raise RateLimited(
                f"binance {kind} (HTTP {status}){what}; retry after {wait}s: {snippet(body, 120)}",
                retry_after=wait,
                banned=banned,
            )
        if status >= 500:
            raise ExchangeError(f"binance HTTP {status}{what} (retryable): {snippet(body, 120)}")
        err = None
        if body[:1] == b"{" and b'"code"' in body:
            try:
                err = _ERR.decode(body)
            except (msgspec.DecodeError, msgspec.ValidationError):
                err = None
        if err is not None and err.code is not None:
            message = f"binance error {err.code}{what}: {err.msg or ''} (HTTP {status})"
            if err.code == -1121:
                raise UnlistedPair(message)
            if err.code == -1003:
                raise RateLimited(message, retry_after=retry_after_s(headers, now_ms))
            if err.code in _RETRYABLE_CODES:
                raise ExchangeError(message)
            raise RequestRejected(message)
        if status != 200:
            if 400 <= status < 500:
                raise RequestRejected(f"binance HTTP {status}{what}: {snippet(body, 120)}")
            raise ExchangeError(f"binance HTTP {status}{what}: {snippet(body, 120)}")
