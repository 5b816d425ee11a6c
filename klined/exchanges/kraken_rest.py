"""Kraken's public REST API (AssetPairs, OHLC, Trades) and its symbol names.

The REST half of :class:`klined.exchanges.kraken.Kraken`, kept apart to keep modules short.
Native names keep Kraken's spelling, case included: its tokenized stocks are ``AAPLx/USD`` on the
WebSocket and ``AAPLxUSD`` over REST, while klined's canonical pair is ``AAPLX/USD`` (canonical
pairs are upper-case; the listing, or a ``native`` override, supplies the exchange's spelling).
REST names are the legacy ones (``XBTUSD`` for BTC/USD) and results are keyed by the pair's own
key, legacy (``XXBTZUSD``) or plain (``SOLUSD``), so responses are read by taking the single
key of ``result`` that is not ``last``. Errors come as an array of strings, usually with HTTP
200 (``EQuery:Unknown asset pair``, ``EGeneral:Too many requests``). ``OHLC`` returns at most
the 720 most recent entries, the last one being the current, uncommitted candle; ``Trades``
pages by a nanosecond ``last`` cursor, up to 1000 trades per page.
"""

from __future__ import annotations

import itertools
import re
from decimal import Decimal

import msgspec
from loguru import logger

from klined.config import SymbolOverride
from klined.errors import ExchangeError, ParseError, RateLimited, RequestRejected, UnlistedPair
from klined.exchanges.base import CandlePage, ListedPair, RestRequest, Trade, TradePage
from klined.exchanges.common import (
    SymbolMap,
    ceil_minute,
    check_numbers,
    compact_raw,
    retry_after_s,
    scale,
    snippet,
    to_decimal,
)
from klined.exchanges.trades import aggregate_trades
from klined.model import MINUTE_MS, Candle, Origin, Pair, floor_minute, plain_decimal

NAME = "kraken"

#: Cost of each public call in the decaying counter (``Limits.rest_budget``).
COSTS = {"ohlc": 1, "trades": 1, "listing": 1}

OHLC_WINDOW = 720
#: Kraken's OHLC intervals other than one minute (5 min to 15 days), in ms
_OTHER_INTERVALS_MS = frozenset(m * MINUTE_MS for m in (5, 15, 30, 60, 240, 1440, 10080, 21600))
TRADES_PER_PAGE = 1000

#: Kraken's legacy asset codes (REST and WS v1) -> the common names WS v2 and klined use.
ASSET_ALIASES = {"XBT": "BTC", "XDG": "DOGE"}
_REST_ALIASES = {v: k for k, v in ASSET_ALIASES.items()}

_THROTTLED = re.compile(r"EService:Throttled:\s*(\d+)")


class _Rest(msgspec.Struct):
    error: list[str] = []
    result: dict[str, msgspec.Raw] | None = None


class _AssetPair(msgspec.Struct):
    altname: str = ""
    wsname: str = ""
    status: str = "online"


_OhlcRow = tuple[int, str, str, str, str, str, str, int]
#: a trade row's leading fields: price, volume, time (then side, type, misc, trade id, and
#: whatever Kraken may append later, which is ignored)
_TradeHead = tuple[str, str, Decimal]

_REST = msgspec.json.Decoder(_Rest)
_PAIRS = msgspec.json.Decoder(_AssetPair)
_RAWS = msgspec.json.Decoder(list[msgspec.Raw])
_OHLC_ROW = msgspec.json.Decoder(_OhlcRow)
_TRADE_HEAD = msgspec.json.Decoder(_TradeHead)
_TRADE_ID = msgspec.json.Decoder(int)
_TRADE_FIELDS = 7
_LAST = msgspec.json.Decoder(int | str)


def _common_asset(code: str) -> str:
    return ASSET_ALIASES.get(code.upper(), code.upper())


def ws_native_name(wsname: str) -> str:
    """AssetPairs' ``wsname`` as WS v2 spells it: legacy codes replaced (``XBT/USD`` ->
    ``BTC/USD``), the case of everything else kept (``AAPLx/USD``)."""
    if wsname.count("/") != 1:
        return wsname
    return "/".join(ASSET_ALIASES.get(side.upper(), side) for side in wsname.split("/"))


def ws_name_to_pair(name: str) -> Pair | None:
    """``XBT/USD`` or ``BTC/USD`` -> ``BTC/USD``; None when it is not a BASE/QUOTE name."""
    if name.count("/") != 1:
        return None
    base, quote = name.split("/")
    try:
        return Pair.parse(f"{_common_asset(base)}/{_common_asset(quote)}")
    except ValueError:
        return None


_extra_fields_noted = False


def _note_extra_trade_fields(count: int, item: bytes) -> None:
    """Kraken appended fields to its trade rows: they are ignored; said once per process."""
    global _extra_fields_noted
    if not _extra_fields_noted:
        _extra_fields_noted = True
        logger.warning(
            "kraken Trades rows now carry {} fields (klined reads the first {}; the rest are "
            "ignored): {}",
            count,
            _TRADE_FIELDS,
            snippet(item),
        )


class KrakenRest:
    """Symbol names and the REST requests/parsers of the Kraken adapter."""

    def __init__(self, overrides: dict[Pair, SymbolOverride] | None = None) -> None:
        self.symbols = SymbolMap(overrides)

    # ---------------------------------------------------------------------------- symbols

    def native(self, pair: Pair) -> str:
        """The WS v2 name: ``BTC/USD`` (or the configured ``native`` override)."""
        return self.symbols.native(pair) or f"{pair.base}/{pair.quote}"

    def rest_native(self, pair: Pair) -> str:
        """The REST name: ``XBTUSD`` for BTC/USD, ``<BASE><QUOTE>`` otherwise (or overrides)."""
        name = self.symbols.rest(pair)
        if name:
            return name
        ws = self.symbols.native(pair)
        base, quote = ws.split("/", 1) if ws and "/" in ws else (pair.base, pair.quote)
        return _REST_ALIASES.get(base, base) + _REST_ALIASES.get(quote, quote)

    def canonical(self, native: str) -> Pair | None:
        """A WS name (or a known REST name) -> the canonical pair (memoized: every streamed
        event asks)."""
        try:
            return self.symbols.resolved[native]
        except KeyError:
            pass
        pair = self.symbols.by_native(native) or self.symbols.by_rest(native)
        return self.symbols.remember(native, pair if pair is not None else ws_name_to_pair(native))

    def multiplier(self, pair: Pair) -> int:
        return self.symbols.multiplier(pair)

    def learn_listing(self, listing: dict[Pair, ListedPair]) -> None:
        """Remember listed REST names (``altname``); overrides still win."""
        for pair, listed in listing.items():
            self.symbols.learn(pair, listed.ws_native, listed.rest_native)

    # ---------------------------------------------------------------------------- REST

    def listing_request(self) -> RestRequest:
        return RestRequest("GET", "/0/public/AssetPairs", {}, COSTS["listing"], "listing")

    def parse_listing(
        self, status: int, headers: dict[str, str], body: bytes
    ) -> dict[Pair, ListedPair]:
        """``AssetPairs`` -> listed pairs by their WS name (``XBT/USD`` -> BTC/USD)."""
        result = self._result(status, headers, body, None, None, "AssetPairs")
        listing: dict[Pair, ListedPair] = {}
        for key, raw in result.items():
            try:
                info = _PAIRS.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                bad = snippet(bytes(raw))
                raise ParseError(f"kraken AssetPairs entry {key}: {exc}", bad) from None
            if not info.wsname:
                continue  # dark-pool and other pairs without a WebSocket feed
            ws_pair = ws_name_to_pair(info.wsname)
            pair = (
                (self.symbols.by_native(str(ws_pair)) if ws_pair is not None else None)
                or self.symbols.by_native(info.wsname)
                or self.symbols.by_rest(info.altname or key)
                or self.symbols.by_rest(key)
                or ws_pair
            )
            if pair is None:
                continue
            listing[pair] = ListedPair(
                pair=pair,
                ws_native=ws_native_name(info.wsname),
                rest_native=info.altname or key,
                rest_key=key,
                trading=info.status == "online",
            )
        return listing

    def candles_request(self, pair: Pair, start_ms: int, end_ms: int) -> RestRequest:
        """``OHLC`` from just before ``start_ms``: whatever ``since`` means exactly (after or
        from), the first minute is included and nothing earlier is paid for."""
        first = ceil_minute(start_ms)
        params = {"pair": self.rest_native(pair), "interval": "1", "since": str(first // 1000 - 1)}
        return RestRequest(
            "GET",
            "/0/public/OHLC",
            params,
            COSTS["ohlc"],
            "ohlc",
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
        """Committed candles of the request's window and the minute range they prove.

        The last entry is always the uncommitted current candle and is dropped; minutes between
        the last committed entry and it had no trades. Only the 720 most recent entries exist:
        when the window may have cut the start, coverage begins at the first entry returned.
        """
        pair = request.pair
        if pair is None:
            raise ValueError("an OHLC request always names its pair")
        start = request.start_ms
        if start is None:  # a request built elsewhere: since = first minute - 1 s
            start = ceil_minute((int(request.params.get("since", "-1")) + 1) * 1000)
        end = request.end_ms if request.end_ms is not None else now_ms
        rows = self._rows(self._result(status, headers, body, pair, now_ms, "OHLC"), pair, "OHLC")
        native = request.params.get("pair", self.rest_native(pair))
        mult = self.multiplier(pair)
        parsed: list[tuple[int, _OhlcRow, bytes]] = []
        for raw in rows:
            item = bytes(raw)
            try:
                row = _OHLC_ROW.decode(item)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise ParseError(f"kraken OHLC row for {pair}: {exc}", snippet(item)) from None
            t_ms = row[0] * 1000
            if t_ms % MINUTE_MS or t_ms <= 0:
                raise ParseError(f"kraken OHLC row for {pair}: time is not a minute", snippet(item))
            if parsed and t_ms <= parsed[-1][0]:
                raise ParseError(f"kraken OHLC for {pair} is not in time order", snippet(body))
            parsed.append((t_ms, row, item))
        if not parsed:
            return CandlePage(candles=[], covered=(start, start))
        spacings = {b[0] - a[0] for a, b in itertools.pairwise(parsed)}
        if len(parsed) >= 3 and len(spacings) == 1 and spacings <= _OTHER_INTERVALS_MS:
            # Kraken sends a row for every minute of a 1-minute request (traded or not):
            # rows evenly one of its other intervals apart are candles of that interval (a
            # proxy or cache that ignored ``interval``), never 1-minute candles
            raise ParseError(
                f"kraken OHLC for {pair}: rows are {min(spacings) // 1000} s apart, but "
                f"1-minute candles were requested (interval={request.params.get('interval')})",
                snippet(body),
            )
        candles = []
        for t_ms, row, item in parsed[:-1]:  # the last entry is the uncommitted current candle
            if t_ms + MINUTE_MS > now_ms or not (start <= t_ms < end):
                continue
            _, o, h, lo, c, vwap_s, v, count = row
            problem = check_numbers(o, h, lo, c, v)
            if problem is None and count < 0:
                problem = "negative trade count"
            if problem is not None:
                raise ParseError(f"kraken OHLC row for {pair}: {problem}", snippet(item))
            try:
                volume = Decimal(v)
                vwap = to_decimal(vwap_s, "vwap") if volume > 0 else None
                nums = scale(
                    Decimal(o), Decimal(h), Decimal(lo), Decimal(c), volume,
                    multiplier=mult, vwap=vwap,
                )  # fmt: skip
            except (ValueError, ArithmeticError) as exc:
                raise ParseError(f"kraken OHLC row for {pair}: {exc}", snippet(item)) from None
            candles.append(
                nums.candle(
                    NAME,
                    pair,
                    native,
                    t_ms,
                    trade_count=count,
                    is_final=True,
                    origin=Origin.NO_TRADES if count == 0 else Origin.REST,
                    event_ts=now_ms,
                    ingestion_ts=now_ms,
                    raw=compact_raw(item),
                )
            )
        current = parsed[-1][0]
        cov_start = start
        window_oldest = floor_minute(now_ms) - (OHLC_WINDOW - 1) * MINUTE_MS
        if len(parsed) >= OHLC_WINDOW or start < window_oldest:
            cov_start = max(start, parsed[0][0])
        cov_end = max(cov_start, min(end, current, floor_minute(now_ms)))
        return CandlePage(candles=candles, covered=(cov_start, cov_end))

    def trades_request(self, pair: Pair, since_ns: str) -> RestRequest:
        """One page of public trades after the ``since`` cursor (ns since epoch, as text)."""
        params = {"pair": self.rest_native(pair), "since": since_ns, "count": str(TRADES_PER_PAGE)}
        return RestRequest("GET", "/0/public/Trades", params, COSTS["trades"], "trades", pair)

    def parse_trades(
        self,
        request: RestRequest,
        status: int,
        headers: dict[str, str],
        body: bytes,
        *,
        now_ms: int | None = None,
    ) -> TradePage:
        """A ``Trades`` page, prices and volumes already in canonical units."""
        pair = request.pair
        if pair is None:
            raise ValueError("a Trades request always names its pair")
        result = self._result(status, headers, body, pair, now_ms, "Trades")
        rows = self._rows(result, pair, "Trades")
        if "last" not in result:
            raise ParseError(f"kraken Trades for {pair}: no 'last' cursor", snippet(body))
        try:
            last = str(_LAST.decode(result["last"]))
            last_ms = int(last) // 1_000_000
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            raise ParseError(
                f"kraken Trades for {pair}: bad 'last' cursor", snippet(body)
            ) from None
        mult = Decimal(self.multiplier(pair))
        trades = []
        for raw in rows:
            item = bytes(raw)
            trade_id: int | None = None
            try:
                fields = _RAWS.decode(item)
                if len(fields) < 6:
                    raise msgspec.ValidationError(f"{len(fields)} fields, expected 6 or more")
                price_s, volume_s, when = _TRADE_HEAD.decode(b"[%s,%s,%s]" % tuple(fields[:3]))
                if len(fields) >= _TRADE_FIELDS:
                    trade_id = _TRADE_ID.decode(fields[6])
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise ParseError(f"kraken trade for {pair}: {exc}", snippet(item)) from None
            if len(fields) > _TRADE_FIELDS:
                _note_extra_trade_fields(len(fields), item)
            try:
                price = to_decimal(price_s, "price")
                volume = to_decimal(volume_s, "volume")
                when = to_decimal(when, "time")
            except ValueError as exc:
                raise ParseError(f"kraken trade for {pair}: {exc}", snippet(item)) from None
            if price <= 0 or volume < 0 or when <= 0:
                raise ParseError(f"kraken trade for {pair}: impossible values", snippet(item))
            if mult != 1:
                price, volume = price / mult, volume * mult
            trades.append(
                Trade(
                    ts_ms=int(when * 1000),
                    price=plain_decimal(price),
                    volume=plain_decimal(volume),
                    trade_id=trade_id,
                )
            )
        return TradePage(trades=trades, next_since=last, server_last_ms=last_ms)

    def aggregate_trades(
        self, pair: Pair, trades: list[Trade], start_ms: int, end_ms: int, now_ms: int
    ) -> list[Candle]:
        """:func:`klined.exchanges.trades.aggregate_trades` with this adapter's names."""
        return aggregate_trades(
            NAME, pair, self.rest_native(pair), trades, start_ms, end_ms, now_ms
        )

    # ---------------------------------------------------------------------------- errors

    @staticmethod
    def _rows(result: dict[str, msgspec.Raw], pair: Pair, what: str) -> list[msgspec.Raw]:
        keys = [k for k in result if k != "last"]
        if len(keys) != 1:
            raise ParseError(
                f"kraken {what} for {pair}: expected one pair key in result, got {keys[:5]}"
            )
        try:
            return _RAWS.decode(result[keys[0]])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            bad = snippet(bytes(result[keys[0]]))
            raise ParseError(f"kraken {what} for {pair}: {exc}", bad) from None

    @staticmethod
    def _result(
        status: int,
        headers: dict[str, str],
        body: bytes,
        pair: Pair | None,
        now_ms: int | None,
        what: str,
    ) -> dict[str, msgspec.Raw]:
        """Check HTTP status and Kraken's ``error`` array; return the ``result`` object."""
        where = f"kraken {what}" + (f" for {pair}" if pair is not None else "")
        if status == 429:
            wait = retry_after_s(headers, now_ms)
            raise RateLimited(f"{where}: rate limited (HTTP 429)", retry_after=wait)
        if status >= 500:
            raise ExchangeError(f"{where}: HTTP {status} (retryable): {snippet(body, 120)}")
        try:
            env = _REST.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            if status != 200:
                raise RequestRejected(f"{where}: HTTP {status}: {snippet(body, 120)}") from None
            raise ParseError(f"{where}: {exc}", snippet(body)) from None
        errors = [e for e in env.error if not e.startswith("W")]  # W... are warnings
        for err in errors:
            text = f"{where}: {err}"
            if err.startswith("EQuery:Unknown asset pair"):
                raise UnlistedPair(text)
            if err.startswith(("EGeneral:Too many requests", "EAPI:Rate limit exceeded")):
                raise RateLimited(text, retry_after=retry_after_s(headers, now_ms))
            throttled = _THROTTLED.match(err)
            if throttled is not None:
                wait = None
                if now_ms is not None:
                    wait = max(0.0, int(throttled.group(1)) - now_ms / 1000)
                raise RateLimited(text, retry_after=wait)
            if err.startswith(("EService:", "EGeneral:Internal error")):
                raise ExchangeError(f"{text} (retryable)")
        if errors:
            raise RequestRejected(f"{where}: {'; '.join(errors)}")
        if status != 200:
            raise RequestRejected(f"{where}: HTTP {status}: {snippet(body, 120)}")
        if env.result is None:
            raise ParseError(f"{where}: response has no result", snippet(body))
        return env.result
