"""Simulated Binance US: kline WebSocket streams and the public REST API.

WebSocket (base ``ws://host:port``): raw ``/ws/<stream>[/<stream>...]``, combined
``/stream?streams=a/b`` (events wrapped as ``{"stream":..., "data":...}``) and ``/ws`` or
``/stream`` with live ``SUBSCRIBE`` / ``UNSUBSCRIBE`` / ``LIST_SUBSCRIPTIONS`` /
``SET_PROPERTY`` / ``GET_PROPERTY`` requests. While a minute is open, a ``<symbol>@kline_1m``
stream pushes the running candle every 2 s of sim time *when it changed* (new trades; set
``binance_push_unchanged`` to push every period regardless), and the final ``x: true`` event
right after the minute ends, also for a quiet minute (``n: 0``, zero volume, ``o=h=l=c`` the
previous close, ``f = L = -1``). As on Binance, a well-formed stream for an unknown symbol is
accepted and stays silent; a malformed stream name is refused (``{"error": {"code": 2, "msg":
"Invalid request: invalid stream"}, "id": N}``; in the URL: close 1008). The server pings
every ``binance_ping_interval_s`` and closes connections that do not answer, that send more
than 5 messages a second, or that reach the 24 h lifetime.

REST: ``/api/v3/ping``, ``/api/v3/time``, ``/api/v3/exchangeInfo``, ``/api/v3/klines``
(interval ``1m`` only), weights metered per minute with ``X-MBX-USED-WEIGHT-1M``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from aiohttp import web

from klined.model import MINUTE_MS, Pair, floor_minute
from klined.sim.conn import Event, WsConnection, WsProtocol, serve_ws
from klined.sim.market import fmt_fixed
from klined.sim.ratelimit import BINANCE_WEIGHTS
from klined.sim.rest import json_response, rest_middleware

if TYPE_CHECKING:
    from klined.sim.server import Simulator

NAME = "binance"
KLINE_INTERVALS = (
    "1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h",
    "1d", "3d", "1w", "1M",
)  # fmt: skip
_STREAM_RE = re.compile(
    r"^[a-z0-9]+@(kline_(" + "|".join(KLINE_INTERVALS) + r")|trade|aggTrade|ticker|miniTicker|"
    r"bookTicker|avgPrice|depth(5|10|20)?(@100ms|@1000ms)?|ticker_(1h|4h|1d))$"
)
_METHODS = ("SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "SET_PROPERTY", "GET_PROPERTY")
_ENC = msgspec.json.Encoder()


def native(pair: str) -> str:
    p = Pair.parse(pair)
    return f"{p.base}{p.quote}"


def _error(code: int, msg: str, req_id: object) -> str:
    return _ENC.encode({"error": {"code": code, "msg": msg}, "id": req_id}).decode()


def _bfmt(value: int, dp: int) -> str:
    """Binance renders every price and quantity with (at least) 8 decimals."""
    return fmt_fixed(value, dp, pad_to=8)


class BinanceWs(WsProtocol):
    exchange = NAME
    spill = True

    def __init__(self, conn: WsConnection, combined: bool, streams: list[str]) -> None:
        super().__init__(conn)
        self.combined = combined
        self.initial = streams
        self.streams: dict[str, str | None] = {}  # stream name -> pair it feeds (None: silent)
        self.by_symbol = self.sim.native_index[NAME]
        self._incoming: list[float] = []

    # -- subscriptions ---------------------------------------------------------------------------

    def _pair_of(self, stream: str) -> str | None:
        symbol, _, kind = stream.partition("@")
        return self.by_symbol.get(symbol.upper()) if kind == "kline_1m" else None

    def _subscribe(self, streams: Sequence[str]) -> None:
        for s in streams:
            self.streams[s] = self._pair_of(s)
        self.conn.add_pairs([p for p in self.streams.values() if p is not None])

    def _unsubscribe(self, streams: Sequence[str]) -> None:
        gone = [self.streams.pop(s) for s in streams if s in self.streams]
        still = set(self.streams.values())
        self.conn.remove_pairs([p for p in gone if p is not None and p not in still])

    async def on_open(self) -> None:
        bad = [s for s in self.initial if not _STREAM_RE.match(s)]
        if bad or len(self.initial) > self.sim.config.binance_max_streams:
            reason = '{"code":-1,"msg":"Illegal format ws or stream"}'
            await self.conn.close(1008, reason, reason="invalid stream in URL")
            return
        self._subscribe(self.initial)

    async def on_text(self, text: str) -> None:
        try:
            req = msgspec.json.decode(text)
        except msgspec.DecodeError:
            await self.conn.send_control(
                _error(3, "Invalid JSON: expected value at line 1 column 1", None)
            )
            return
        if not isinstance(req, dict):
            await self.conn.send_control(_error(3, "Invalid JSON: expected an object", None))
            return
        req_id = req.get("id")
        if req_id is not None and (
            not isinstance(req_id, int) or isinstance(req_id, bool) or req_id < 0
        ):
            await self.conn.send_control(
                _error(2, "Invalid request: request ID must be an unsigned integer", None)
            )
            return
        method = req.get("method")
        if method not in _METHODS:
            msg = f"Invalid request: unknown variant `{method}`, expected one of " + ", ".join(
                f"`{m}`" for m in _METHODS
            )
            await self.conn.send_control(_error(2, msg, req_id))
            return
        params = req.get("params", [])
        if not isinstance(params, list):
            await self.conn.send_control(
                _error(2, "Invalid request: params must be an array", req_id)
            )
            return
        await self.conn.send_control(self._method(method, params, req_id))

    def _method(self, method: str, params: list[Any], req_id: object) -> str:
        ok = _ENC.encode({"result": None, "id": req_id}).decode()
        if method == "LIST_SUBSCRIPTIONS":
            return _ENC.encode({"result": list(self.streams), "id": req_id}).decode()
        if method == "GET_PROPERTY":
            if params != ["combined"]:
                return _error(2, "Invalid request: unknown property", req_id)
            return _ENC.encode({"result": self.combined, "id": req_id}).decode()
        if method == "SET_PROPERTY":
            if len(params) != 2 or params[0] != "combined" or not isinstance(params[1], bool):
                return _error(1, "Invalid value type: expected Boolean", req_id)
            self.combined = params[1]
            return ok
        if not all(isinstance(s, str) and _STREAM_RE.match(s) for s in params):
            return _error(2, "Invalid request: invalid stream", req_id)
        if method == "UNSUBSCRIBE":
            self._unsubscribe(params)
            return ok
        if len(set(self.streams) | set(params)) > self.sim.config.binance_max_streams:
            return _error(2, "Invalid request: too many streams", req_id)
        for s in params:
            pair = self._pair_of(s)
            if pair is None and s.endswith("@kline_1m"):
                if self.sim.config.binance_unknown_symbol == "error":
                    return _error(2, "Invalid request: invalid stream", req_id)
            elif pair is not None and self.sim.subscribe_fault(NAME, self.conn.number, pair):
                return _error(2, "Invalid request: invalid stream", req_id)
        self._subscribe(params)
        return ok

    def on_incoming(self) -> None:
        limit = self.sim.config.binance_max_incoming_per_s
        if not limit:
            return
        now = time.monotonic()
        self._incoming = [t for t in self._incoming if now - t < 1.0]
        self._incoming.append(now)
        if len(self._incoming) > limit:
            self.conn.abort("too many incoming messages")

    async def background(self) -> None:
        cfg = self.sim.config
        with anyio.move_on_after(cfg.binance_connection_lifetime_s):
            while True:
                await anyio.sleep(cfg.binance_ping_interval_s)
                if (
                    time.monotonic() - self.conn.last_pong
                    > cfg.binance_pong_timeout_s + cfg.binance_ping_interval_s
                ):
                    await self.conn.close(1008, "pong timeout", reason="pong timeout")
                    return
                if not self.conn.stalled:
                    await self.conn.ws.ping(b"")
        await self.conn.close(1000, "", reason="connection lifetime reached")

    # -- events ----------------------------------------------------------------------------------

    def minute_events(self, minute: int, pairs: Sequence[str]) -> list[Event]:
        cfg = self.sim.config
        step = cfg.binance_update_ms
        final_at = minute + MINUTE_MS + cfg.binance_final_delay_ms
        market = self.sim.market
        out: list[Event] = []
        for pair in pairs:
            data = market.minute(NAME, pair, minute)
            if data.trades:
                prev = minute - 1
                for t in range(minute + step, minute + MINUTE_MS, step):
                    if cfg.binance_push_unchanged or data.count_between(prev, t):
                        agg = data.until(t)
                        if agg is not None:
                            out.append(Event(t, pair, minute, agg, False, "update"))
                    prev = t
            out.append(Event(final_at, pair, minute, data.total, True, "final"))
        return out

    def _numbers(self, ev: Event) -> dict[str, Any]:
        spec = self.sim.market.spec(ev.pair)
        pdp, qdp = spec.price_dp, spec.qty_dp
        agg = ev.agg
        if agg is None:
            close = _bfmt(self.sim.market.prev_close(NAME, ev.pair, ev.minute), pdp)
            zero = _bfmt(0, 0)
            return dict(
                f=-1, L=-1, o=close, c=close, h=close, l=close, v=zero, n=0, q=zero, V=zero, Q=zero
            )
        return dict(
            f=agg.first_id,
            L=agg.last_id,
            o=_bfmt(agg.open, pdp),
            c=_bfmt(agg.close, pdp),
            h=_bfmt(agg.high, pdp),
            l=_bfmt(agg.low, pdp),
            v=_bfmt(agg.volume, qdp),
            n=agg.n,
            q=_bfmt(agg.quote, pdp + qdp),
            V=_bfmt(agg.taker_volume, qdp),
            Q=_bfmt(agg.taker_quote, pdp + qdp),
        )

    def _stream(self, pair: str) -> str:
        return f"{native(pair).lower()}@kline_1m"

    def render(self, ev: Event) -> str:
        sym = native(ev.pair)
        n = self._numbers(ev)
        x = "true" if ev.final else "false"
        k = (
            f'{{"t":{ev.minute},"T":{ev.minute + MINUTE_MS - 1},"s":"{sym}","i":"1m",'
            f'"f":{n["f"]},"L":{n["L"]},"o":"{n["o"]}","c":"{n["c"]}","h":"{n["h"]}",'
            f'"l":"{n["l"]}","v":"{n["v"]}","n":{n["n"]},"x":{x},"q":"{n["q"]}",'
            f'"V":"{n["V"]}","Q":"{n["Q"]}","B":"0"}}'
        )
        data = f'{{"e":"kline","E":{ev.ts},"s":"{sym}","k":{k}}}'
        if self.combined:
            return f'{{"stream":"{self._stream(ev.pair)}","data":{data}}}'
        return data

    def malformed(self, ev: Event, variant: str) -> str | bytes:
        good = self.render(ev)
        if variant == "truncated":
            return good[: len(good) // 2]
        if variant == "garbage":
            return "}{ not json at all \\u0000 ]["
        if variant == "binary":
            return b"\x00\xff\xfe garbage"
        if variant == "empty":
            return ""
        n = self._numbers(ev)
        if variant == "wrong_types":
            return good.replace(f'"o":"{n["o"]}"', f'"o":{float(n["o"])}').replace(
                f'"t":{ev.minute}', f'"t":"{ev.minute}"'
            )
        if variant == "nan":
            return good.replace(f'"o":"{n["o"]}"', '"o":"NaN"').replace(
                f'"h":"{n["h"]}"', '"h":"NaN"'
            )
        if variant == "negative":
            return good.replace(f'"o":"{n["o"]}"', f'"o":"-{n["o"]}"').replace(
                f'"l":"{n["l"]}"', f'"l":"-{n["l"]}"'
            )
        # high_low: high below low
        return (
            good.replace(f'"h":"{n["h"]}"', '"h":"__H__"')
            .replace(f'"l":"{n["l"]}"', f'"l":"{n["h"]}"')
            .replace("__H__", n["l"])
        )


# ---------------------------------------------------------------------------------------------
# REST


def _bad(code: int, msg: str, status: int = 400) -> web.Response:
    return json_response({"code": code, "msg": msg}, status=status)


def kline_row(sim: Simulator, pair: str, minute: int, now: int) -> list[Any]:
    """One 12-field kline row; the current minute holds the trades up to ``now``."""
    data = sim.market.minute(NAME, pair, minute)
    agg = data.until(now) if minute + MINUTE_MS > now else data.total
    spec = sim.market.spec(pair)
    pdp, qdp = spec.price_dp, spec.qty_dp
    close_time = minute + MINUTE_MS - 1
    if agg is None:
        c = _bfmt(sim.market.prev_close(NAME, pair, minute), pdp)
        z = _bfmt(0, 0)
        return [minute, c, c, c, c, z, close_time, z, 0, z, z, "0"]
    return [
        minute,
        _bfmt(agg.open, pdp),
        _bfmt(agg.high, pdp),
        _bfmt(agg.low, pdp),
        _bfmt(agg.close, pdp),
        _bfmt(agg.volume, qdp),
        close_time,
        _bfmt(agg.quote, pdp + qdp),
        agg.n,
        _bfmt(agg.taker_volume, qdp),
        _bfmt(agg.taker_quote, pdp + qdp),
        "0",
    ]


def _int_param(request: web.Request, name: str) -> int | web.Response | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    if not re.fullmatch(r"-?[0-9]{1,20}", raw):
        return _bad(
            -1100,
            f"Illegal characters found in parameter '{name}'; legal range is '^[0-9]{{1,20}}$'.",
        )
    return int(raw)


def build_app(sim: Simulator) -> web.Application:
    app = web.Application(middlewares=[rest_middleware(sim, NAME, _weight, _pair_param)])

    async def ws_handler(request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith("/stream"):
            raw = request.query.get("streams", "")
            streams = [s for s in raw.split("/") if s]
            combined = True
        else:
            streams = [s for s in path.removeprefix("/ws").split("/") if s]
            combined = False
        return await serve_ws(sim, NAME, request, lambda c: BinanceWs(c, combined, streams))

    async def ping(_: web.Request) -> web.Response:
        return json_response({})

    async def server_time(_: web.Request) -> web.Response:
        return json_response({"serverTime": sim.clock.now_ms()})

    async def exchange_info(request: web.Request) -> web.Response:
        listed = sim.listing[NAME]
        wanted: list[str] | None = None
        if "symbol" in request.query:
            wanted = [request.query["symbol"]]
        elif "symbols" in request.query:
            try:
                wanted = msgspec.json.decode(request.query["symbols"], type=list[str])
            except (msgspec.DecodeError, msgspec.ValidationError):
                return _bad(-1100, "Illegal characters found in parameter 'symbols'.")
        index = sim.native_index[NAME]
        if wanted is not None:
            if any(s not in index for s in wanted):
                return _bad(-1121, "Invalid symbol.")
            pairs = [index[s] for s in wanted]
        else:
            pairs = listed
        return json_response(
            {
                "timezone": "UTC",
                "serverTime": sim.clock.now_ms(),
                "rateLimits": [
                    {
                        "rateLimitType": "REQUEST_WEIGHT",
                        "interval": "MINUTE",
                        "intervalNum": 1,
                        "limit": sim.binance_limiter.capacity,
                    },
                    {
                        "rateLimitType": "ORDERS",
                        "interval": "SECOND",
                        "intervalNum": 10,
                        "limit": 100,
                    },
                    {
                        "rateLimitType": "RAW_REQUESTS",
                        "interval": "MINUTE",
                        "intervalNum": 5,
                        "limit": 6100,
                    },
                ],
                "exchangeFilters": [],
                "symbols": [_symbol_info(sim, p) for p in pairs],
            }
        )

    async def klines(request: web.Request) -> web.Response:
        symbol = request.query.get("symbol")
        if not symbol:
            return _bad(
                -1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed."
            )
        interval = request.query.get("interval")
        if not interval:
            return _bad(
                -1102, "Mandatory parameter 'interval' was not sent, was empty/null, or malformed."
            )
        pair = sim.native_index[NAME].get(symbol)
        if pair is None:
            return _bad(-1121, "Invalid symbol.")
        if interval != "1m":
            return _bad(-1120, "Invalid interval.")
        values = {}
        for name in ("startTime", "endTime", "limit"):
            v = _int_param(request, name)
            if isinstance(v, web.Response):
                return v
            values[name] = v
        start, end, limit = values["startTime"], values["endTime"], values["limit"]
        limit = 500 if limit is None else limit
        if limit <= 0:
            return _bad(-1130, "Data sent for parameter 'limit' is not valid.")
        limit = min(limit, 1000)
        if start is not None and end is not None and start > end:
            return _bad(-1023, "Start time is greater than end time.")
        now = sim.clock.now_ms()
        last = floor_minute(now if end is None else min(end, now))
        first_allowed = sim.market.genesis_ms
        if start is not None:
            first = max(first_allowed, start + (-start) % MINUTE_MS)
            minutes = range(first, min(last, first + (limit - 1) * MINUTE_MS) + 1, MINUTE_MS)
        else:
            minutes = range(max(first_allowed, last - (limit - 1) * MINUTE_MS), last + 1, MINUTE_MS)
        return json_response([kline_row(sim, pair, m, now) for m in minutes])

    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/ws/{streams:.*}", ws_handler)
    app.router.add_get("/stream", ws_handler)
    app.router.add_get("/api/v3/ping", ping)
    app.router.add_get("/api/v3/time", server_time)
    app.router.add_get("/api/v3/exchangeInfo", exchange_info)
    app.router.add_get("/api/v3/klines", klines)
    return app


def _symbol_info(sim: Simulator, pair: str) -> dict[str, Any]:
    p = Pair.parse(pair)
    spec = sim.market.spec(pair)
    tick = fmt_fixed(1, spec.price_dp, pad_to=8)
    step = fmt_fixed(1, spec.qty_dp, pad_to=8)
    return {
        "symbol": native(pair),
        "status": "TRADING",
        "baseAsset": p.base,
        "baseAssetPrecision": 8,
        "quoteAsset": p.quote,
        "quotePrecision": 8,
        "quoteAssetPrecision": 8,
        "baseCommissionPrecision": 8,
        "quoteCommissionPrecision": 8,
        "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS_LIMIT", "TAKE_PROFIT_LIMIT"],
        "icebergAllowed": True,
        "ocoAllowed": True,
        "quoteOrderQtyMarketAllowed": True,
        "allowTrailingStop": False,
        "cancelReplaceAllowed": False,
        "isSpotTradingAllowed": True,
        "isMarginTradingAllowed": False,
        "filters": [
            {
                "filterType": "PRICE_FILTER",
                "minPrice": tick,
                "maxPrice": "1000000.00000000",
                "tickSize": tick,
            },
            {
                "filterType": "LOT_SIZE",
                "minQty": step,
                "maxQty": "90000000.00000000",
                "stepSize": step,
            },
        ],
        "permissions": [],
        "permissionSets": [["SPOT"]],
        "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
        "allowedSelfTradePreventionModes": ["EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"],
    }


def _weight(request: web.Request) -> int:
    return BINANCE_WEIGHTS.get(request.path, 1)


def _pair_param(sim: Simulator, request: web.Request) -> str | None:
    symbol = request.query.get("symbol")
    return sim.native_index[NAME].get(symbol) if symbol else None
