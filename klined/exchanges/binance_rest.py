"""Binance US's public REST API (``exchangeInfo``, ``/api/v3/klines``) and its symbol names.

The REST half of :class:`klined.exchanges.binance.Binance`, kept apart to keep modules short.
``GET /api/v3/klines`` returns 12-field rows, at most 1000, ``startTime``/``endTime`` inclusive
on the open time; the last row may be the unfinished current minute. Errors are
``{"code": -1121, "msg": "Invalid symbol."}``; HTTP 429 asks to back off, 418 is an IP ban,
both with ``Retry-After`` seconds; ``X-MBX-USED-WEIGHT-1M`` reports the weight used.
"""

from __future__ import annotations

from decimal import Decimal

import msgspec

from klined.config import SymbolOverride
from klined.errors import ExchangeError, ParseError, RateLimited, RequestRejected, UnlistedPair
from klined.exchanges.base import CandlePage, ListedPair, RestRequest
from klined.exchanges.common import (
    SymbolMap,
    ceil_minute,
    check_numbers,
    compact_raw,
    header_float,
    retry_after_s,
    scale,
    snippet,
    to_decimal,
)
from klined.model import MINUTE_MS, Candle, Origin, Pair, floor_minute

NAME = "binance"

#: Request weight per endpoint (Binance US ``rest-api.md``).
WEIGHTS = {"klines": 2, "listing": 20}

KLINES_LIMIT = 1000

#: Quote assets, longest first, for splitting a native symbol nobody told us about.
KNOWN_QUOTES = (
    "FDUSD", "USDT", "USDC", "TUSD", "BUSD", "USDP", "USD", "DAI", "BTC", "ETH", "BNB",
    "EUR", "GBP", "AUD", "TRY", "BRL", "JPY", "DOGE", "XRP", "SOL",
)  # fmt: skip

#: Error codes that mean "the exchange could not serve this right now" (retry with backoff).
_RETRYABLE_CODES = {-1000, -1001, -1006, -1007, -1008, -1016}


class ErrorBody(msgspec.Struct, gc=False):
    """An error reply, REST or WebSocket: ``{"code": -1121, "msg": "Invalid symbol."}``."""

    code: int | None = None
    msg: str | None = None


class _Symbol(msgspec.Struct):
    symbol: str
    status: str = ""
    baseAsset: str = ""
    quoteAsset: str = ""


class _ExchangeInfo(msgspec.Struct):
    symbols: list[_Symbol]


_KlineRow = tuple[int, str, str, str, str, str, int, str, int, str, str, str]

_ERR = msgspec.json.Decoder(ErrorBody)
_INFO = msgspec.json.Decoder(_ExchangeInfo)
_ROWS = msgspec.json.Decoder(list[msgspec.Raw])
_ROW = msgspec.json.Decoder(_KlineRow)


class BinanceRest:
    """Symbol names and the REST requests/parsers of the Binance adapter."""

    def __init__(self, overrides: dict[Pair, SymbolOverride] | None = None) -> None:
        self.symbols = SymbolMap(overrides)

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
                nums.candle(
                    NAME,
                    pair,
                    native,
                    open_time,
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
