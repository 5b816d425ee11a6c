"""Simulated Kraken: WebSocket v2 ``ohlc`` channel and the public REST API.

WebSocket ``/v2``: a ``status`` message on connect; ``subscribe`` / ``unsubscribe`` to
``ohlc`` (interval 1) with one acknowledgement per symbol (``success: false`` and
``"Currency pair not supported <SYM>"`` for a pair Kraken does not list); a ``snapshot`` per
symbol (the traded candles of the last ``kraken_snapshot_minutes`` minutes, including closed
ones, or the last traded candle if none); then an ``update`` on every trade; ``heartbeat``
about once a second when nothing else was sent; ``ping`` -> ``pong`` with ``req_id``.
Numbers are JSON numbers (exact decimal literals), times RFC 3339.

REST ``/0/public/``: ``Time``, ``SystemStatus``, ``AssetPairs`` (result keys like
``XXBTZUSD``, ``altname`` ``XBTUSD``, ``wsname`` ``XBT/USD``), ``OHLC`` (interval 1; the 720
most recent minutes, quiet minutes omitted, ``since`` exclusive, the last entry the current
uncommitted candle, ``last`` = the last committed minute) and ``Trades`` (``since`` in ns,
exclusive; ``count`` <= 1000; ``last`` cursor as a string of ns). Errors are HTTP 200 with
``{"error": ["EQuery:Unknown asset pair"]}`` (no ``result`` key, as the live API answers).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from aiohttp import web

from klined.model import MINUTE_MS, Pair, floor_minute
from klined.sim.conn import Event, WsConnection, WsProtocol, rfc3339, serve_ws
from klined.sim.market import Agg, fmt_fixed, fmt_plain, vwap_ticks
from klined.sim.rest import json_response, rest_middleware

if TYPE_CHECKING:
    from klined.sim.server import Simulator

NAME = "kraken"
_LEGACY = {
    "BTC": "XXBT", "ETH": "XETH", "LTC": "XLTC", "XRP": "XXRP", "XLM": "XXLM", "XMR": "XXMR",
    "ZEC": "XZEC", "ETC": "XETC", "DOGE": "XXDG", "REP": "XREP", "MLN": "XMLN",
}  # fmt: skip
_ALT = {"BTC": "XBT", "DOGE": "XDG"}
_FIAT = {"USD": "ZUSD", "EUR": "ZEUR", "GBP": "ZGBP", "CAD": "ZCAD", "JPY": "ZJPY"}
_ENC = msgspec.json.Encoder()
_CONN_IDS = itertools.count(14_205_913_560_117_000_000)


def names(pair: str) -> dict[str, str]:
    """Kraken's names for a canonical pair: result key, altname, v1 wsname, v2 symbol, assets."""
    p = Pair.parse(pair)
    alt = _ALT.get(p.base, p.base) + _ALT.get(p.quote, p.quote)
    key = _LEGACY[p.base] + _FIAT[p.quote] if p.base in _LEGACY and p.quote in _FIAT else alt
    return {
        "key": key,
        "altname": alt,
        "wsname": f"{_ALT.get(p.base, p.base)}/{_ALT.get(p.quote, p.quote)}",
        "ws2": str(p),
        "base": _LEGACY.get(p.base, p.base),
        "quote": _FIAT.get(p.quote, p.quote),
    }


def _num(value: int, dp: int) -> str:
    """An exact JSON number literal (Kraken v2 sends floats; we send their exact decimals)."""
    return fmt_plain(value, dp)


def _now_stamps(sim: Simulator) -> tuple[str, str]:
    t = rfc3339(sim.clock.now_ms(), 6)
    return t, t


class KrakenWs(WsProtocol):
    exchange = NAME
    spill = False

    def __init__(self, conn: WsConnection) -> None:
        super().__init__(conn)
        self.heartbeats = False

    # -- requests --------------------------------------------------------------------------------

    async def on_open(self) -> None:
        status = {
            "channel": "status",
            "data": [
                {
                    "api_version": "v2",
                    "connection_id": next(_CONN_IDS),
                    "system": "online",
                    "version": "2.0.10",
                }
            ],
            "type": "update",
        }
        await self.conn.send_control(_ENC.encode(status).decode())

    async def _reply(self, body: dict[str, Any], req_id: object, time_in: str) -> None:
        body["time_in"] = time_in
        body["time_out"] = rfc3339(self.sim.clock.now_ms(), 6)
        if req_id is not None:
            body["req_id"] = req_id
        await self.conn.send_control(_ENC.encode(body).decode())

    async def on_text(self, text: str) -> None:
        time_in = rfc3339(self.sim.clock.now_ms(), 6)
        try:
            req = msgspec.json.decode(text)
        except msgspec.DecodeError:
            await self._reply({"error": "Malformed request", "success": False}, None, time_in)
            return
        if not isinstance(req, dict):
            await self._reply({"error": "Malformed request", "success": False}, None, time_in)
            return
        method, req_id = req.get("method"), req.get("req_id")
        if method == "ping":
            await self._reply({"method": "pong"}, req_id, time_in)
            return
        if method not in ("subscribe", "unsubscribe"):
            await self._reply(
                {"error": f"Method not found: {method}", "method": method, "success": False},
                req_id,
                time_in,
            )
            return
        params = req.get("params")
        if not isinstance(params, dict):
            await self._reply(
                {"error": "EGeneral:Invalid arguments", "method": method, "success": False},
                req_id,
                time_in,
            )
            return
        channel = params.get("channel")
        if channel == "heartbeat":
            self.heartbeats = method == "subscribe"
            await self._reply(
                {"method": method, "result": {"channel": "heartbeat"}, "success": True},
                req_id,
                time_in,
            )
            return
        if channel != "ohlc":
            await self._reply(
                {"error": f"Channel {channel} not found", "method": method, "success": False},
                req_id,
                time_in,
            )
            return
        symbols = params.get("symbol")
        if (
            not isinstance(symbols, list)
            or not symbols
            or not all(isinstance(s, str) for s in symbols)
        ):
            await self._reply(
                {"error": "EGeneral:Invalid arguments:symbol", "method": method, "success": False},
                req_id,
                time_in,
            )
            return
        interval = params.get("interval", 1)
        snapshot = params.get("snapshot", True) is not False
        added: list[str] = []
        try:
            for sym in symbols:
                await self._one(method, sym, interval, snapshot, req_id, time_in, added)
        finally:
            self.conn.add_pairs(added)  # once: the feed reschedules once, not per symbol

    async def _one(
        self,
        method: str,
        sym: str,
        interval: object,
        snapshot: bool,
        req_id: object,
        time_in: str,
        added: list[str],
    ) -> None:
        listed = self.sim.kraken_ws_index
        pair = listed.get(sym)

        async def fail(error: str) -> None:
            body = {"error": error, "method": method, "success": False, "symbol": sym}
            await self._reply(body, req_id, time_in)

        if pair is None:
            await fail(f"Currency pair not supported {sym}")
            return
        if interval != 1:
            await fail("Unsupported interval: the simulator serves interval 1")
            return
        result: dict[str, Any] = {"channel": "ohlc", "interval": 1, "symbol": sym}
        if method == "unsubscribe":
            if pair not in self.conn.pairs:
                await fail("Subscription Not Found")
                return
            self.conn.remove_pairs([pair])
            await self._reply(
                {"method": method, "result": result, "success": True}, req_id, time_in
            )
            return
        if pair in self.conn.pairs or pair in added:
            await fail("Already subscribed")
            return
        if self.sim.subscribe_fault(NAME, self.conn.number, pair):
            await fail(f"Currency pair not supported {sym}")
            return
        result["snapshot"] = snapshot
        result["warnings"] = ["timestamp is deprecated, use interval_begin"]
        await self._reply({"method": method, "result": result, "success": True}, req_id, time_in)
        added.append(pair)
        if snapshot:
            await self._snapshot(pair)

    async def _snapshot(self, pair: str) -> None:
        market = self.sim.market
        now = self.conn.feed_cursor()
        cur = floor_minute(now)
        items: list[tuple[int, Agg]] = []
        for m in range(
            cur - (self.sim.config.kraken_snapshot_minutes - 1) * MINUTE_MS,
            cur + MINUTE_MS,
            MINUTE_MS,
        ):
            agg = market.minute(NAME, pair, m).until(now)
            if agg is not None:
                items.append((m, agg))
        if not items:
            data = market.last_traded(NAME, pair, cur)
            if data is not None and data.total is not None:
                items.append((data.minute, data.total))
        payload = ",".join(self._item(pair, m, agg) for m, agg in items)
        stamp = rfc3339(now, 9)
        await self.conn.send_control(
            f'{{"channel":"ohlc","type":"snapshot","timestamp":"{stamp}","data":[{payload}]}}'
        )
        for m, agg in items:
            ev = Event(now, pair, m, agg, False, "snapshot")
            self.conn.seq += 1
            self.conn.record(ev)

    async def background(self) -> None:
        period = self.sim.config.kraken_heartbeat_s
        while True:
            await anyio.sleep(period / 4)
            idle = time.monotonic() - self.conn.last_send
            if (self.conn.pairs or self.heartbeats) and idle >= period and not self.conn.stalled:
                await self.conn.send_control('{"channel":"heartbeat"}')

    # -- events ----------------------------------------------------------------------------------

    def minute_events(self, minute: int, pairs: Sequence[str]) -> list[Event]:
        market = self.sim.market
        out: list[Event] = []
        for pair in pairs:
            data = market.minute(NAME, pair, minute)
            last = len(data.trades) - 1
            for k, t in enumerate(data.trades):
                out.append(Event(t.ts_ms, pair, minute, data.prefix[k], k == last, "update"))
        return out

    def _item(self, pair: str, minute: int, agg: Agg, **override: str) -> str:
        spec = self.sim.market.spec(pair)
        pdp, qdp = spec.price_dp, spec.qty_dp
        f = {
            "open": _num(agg.open, pdp),
            "high": _num(agg.high, pdp),
            "low": _num(agg.low, pdp),
            "close": _num(agg.close, pdp),
            "trades": str(agg.n),
            "volume": _num(agg.volume, qdp),
            "vwap": _num(vwap_ticks(agg), pdp),
            "interval_begin": f'"{rfc3339(minute, 9)}"',
            "timestamp": f'"{rfc3339(minute + MINUTE_MS, 6)}"',
        }
        f.update(override)
        return (
            f'{{"symbol":"{pair}","open":{f["open"]},"high":{f["high"]},"low":{f["low"]},'
            f'"close":{f["close"]},"trades":{f["trades"]},"volume":{f["volume"]},'
            f'"vwap":{f["vwap"]},"interval_begin":{f["interval_begin"]},"interval":1,'
            f'"timestamp":{f["timestamp"]}}}'
        )

    def _message(self, ev: Event, item: str) -> str:
        stamp = rfc3339(ev.ts, 9)
        return f'{{"channel":"ohlc","type":"update","timestamp":"{stamp}","data":[{item}]}}'

    def render(self, ev: Event) -> str:
        assert ev.agg is not None
        return self._message(ev, self._item(ev.pair, ev.minute, ev.agg))

    def malformed(self, ev: Event, variant: str) -> str | bytes:
        assert ev.agg is not None
        good = self.render(ev)
        if variant == "truncated":
            return good[: len(good) // 2]
        if variant == "garbage":
            return "}{ not json at all ]["
        if variant == "binary":
            return b"\x00\xff\xfe garbage"
        if variant == "empty":
            return ""
        spec = self.sim.market.spec(ev.pair)
        agg, pdp = ev.agg, spec.price_dp
        if variant == "wrong_types":
            item = self._item(ev.pair, ev.minute, agg, open='"abc"', interval_begin=str(ev.minute))
        elif variant == "nan":
            item = self._item(ev.pair, ev.minute, agg, open="NaN", high="NaN")
        elif variant == "negative":
            item = self._item(
                ev.pair,
                ev.minute,
                agg,
                open="-" + _num(agg.open, pdp),
                low="-" + _num(agg.low, pdp),
            )
        else:  # high_low
            item = self._item(
                ev.pair, ev.minute, agg, high=_num(agg.low, pdp), low=_num(agg.high, pdp)
            )
        return self._message(ev, item)


# ---------------------------------------------------------------------------------------------
# REST


def _err(*errors: str) -> web.Response:
    return json_response({"error": list(errors)})


def _ok(result: Any) -> web.Response:
    return json_response({"error": [], "result": result})


def _pair_param(sim: Simulator, request: web.Request) -> str | None:
    raw = request.query.get("pair")
    return sim.kraken_rest_index.get(raw.upper()) if raw else None


def _ohlc_row(sim: Simulator, pair: str, minute: int, agg: Agg | None) -> list[Any]:
    spec = sim.market.spec(pair)
    pdp, qdp = spec.price_dp, spec.qty_dp
    if agg is None:
        c = fmt_fixed(sim.market.prev_close(NAME, pair, minute), pdp)
        return [minute // 1000, c, c, c, c, fmt_fixed(0, pdp), fmt_fixed(0, 8), 0]
    return [
        minute // 1000,
        fmt_fixed(agg.open, pdp),
        fmt_fixed(agg.high, pdp),
        fmt_fixed(agg.low, pdp),
        fmt_fixed(agg.close, pdp),
        fmt_fixed(vwap_ticks(agg), pdp),
        fmt_fixed(agg.volume, qdp, pad_to=8),
        agg.n,
    ]


def _trade_ns(ts_ms: int, trade_id: int) -> int:
    """Unique, increasing ns stamps: the ms plus the trade's index in its minute as microseconds."""
    return ts_ms * 1_000_000 + (trade_id % 1000) * 1_000


def build_app(sim: Simulator) -> web.Application:
    app = web.Application(middlewares=[rest_middleware(sim, NAME, lambda _r: 1, _pair_param)])

    async def ws_handler(request: web.Request) -> web.StreamResponse:
        return await serve_ws(sim, NAME, request, KrakenWs)

    async def server_time(_: web.Request) -> web.Response:
        now = sim.clock.now_ms()
        dt = datetime.fromtimestamp(now // 1000, tz=UTC)
        return _ok({"unixtime": now // 1000, "rfc1123": dt.strftime("%a, %d %b %y %H:%M:%S +0000")})

    async def system_status(_: web.Request) -> web.Response:
        now = sim.clock.now_ms()
        return _ok({"status": "online", "timestamp": rfc3339(now - now % 1000, 3)[:19] + "Z"})

    async def asset_pairs(request: web.Request) -> web.Response:
        raw = request.query.get("pair")
        if raw:
            pairs = []
            for token in raw.split(","):
                pair = sim.kraken_rest_index.get(token.strip().upper())
                if pair is None:
                    return _err("EQuery:Unknown asset pair")
                pairs.append(pair)
        else:
            pairs = sim.listing[NAME]
        return _ok({names(p)["key"]: _asset_pair(sim, p) for p in pairs})

    async def ohlc(request: web.Request) -> web.Response:
        raw = request.query.get("pair")
        if not raw:
            return _err("EGeneral:Invalid arguments")
        pair = sim.kraken_rest_index.get(raw.upper())
        if pair is None:
            return _err("EQuery:Unknown asset pair")
        if request.query.get("interval", "1") != "1":
            return _err("EGeneral:Invalid arguments")
        try:
            since = int(request.query["since"]) if request.query.get("since") else None
        except ValueError:
            return _err("EGeneral:Invalid arguments")
        now = sim.clock.now_ms()
        cur = floor_minute(now)
        first = cur - (sim.config.kraken_ohlc_window - 1) * MINUTE_MS
        if since is not None:
            first = max(first, (since // 60 + 1) * MINUTE_MS)
        rows = []
        flat = sim.config.kraken_ohlc_quiet == "flat"
        for m in range(max(first, sim.market.genesis_ms), cur, MINUTE_MS):
            agg = sim.market.minute(NAME, pair, m).total
            if agg is not None or flat:
                rows.append(_ohlc_row(sim, pair, m, agg))
        rows.append(_ohlc_row(sim, pair, cur, sim.market.minute(NAME, pair, cur).until(now)))
        return _ok({names(pair)["key"]: rows, "last": (cur - MINUTE_MS) // 1000})

    async def trades(request: web.Request) -> web.Response:
        raw = request.query.get("pair")
        if not raw:
            return _err("EGeneral:Invalid arguments")
        pair = sim.kraken_rest_index.get(raw.upper())
        if pair is None:
            return _err("EQuery:Unknown asset pair")
        try:
            count = int(request.query.get("count") or 1000)
            since_raw = request.query.get("since")
            since = int(since_raw) if since_raw else None
        except ValueError:
            return _err("EGeneral:Invalid arguments")
        count = max(1, min(count, 1000))
        now = sim.clock.now_ms()
        if since is not None and since < 10**12:
            since *= 1_000_000_000  # seconds, as older clients send
        rows = _trades_page(sim, pair, since, count, now)
        spec = sim.market.spec(pair)
        last = rows[-1][0] if rows else (since if since is not None else now * 1_000_000)
        out = [
            [
                fmt_fixed(t.price, spec.price_dp),
                fmt_fixed(t.qty, spec.qty_dp, pad_to=8),
                msgspec.Raw(f"{ns // 10**9}.{ns % 10**9 // 1000:06d}".encode()),
                "b" if t.buy else "s",
                "l" if t.trade_id % 3 == 0 else "m",
                "",
                t.trade_id,
            ]
            for ns, t in rows
        ]
        return _ok({names(pair)["key"]: out, "last": str(last)})

    app.router.add_get("/v2", ws_handler)
    for path, handler in (
        ("Time", server_time),
        ("SystemStatus", system_status),
        ("AssetPairs", asset_pairs),
        ("OHLC", ohlc),
        ("Trades", trades),
    ):
        app.router.add_route("GET", f"/0/public/{path}", handler)
        app.router.add_route("POST", f"/0/public/{path}", handler)
    return app


def _trades_page(
    sim: Simulator, pair: str, since_ns: int | None, count: int, now: int
) -> list[Any]:
    """Up to ``count`` trades after ``since_ns`` (exclusive) and not after ``now``."""
    market = sim.market
    rows: list[Any] = []
    if since_ns is None:  # the most recent trades
        m = floor_minute(now)
        while len(rows) < count and m >= market.genesis_ms:
            minute = [t for t in market.minute(NAME, pair, m).trades if t.ts_ms <= now]
            rows[:0] = [(_trade_ns(t.ts_ms, t.trade_id), t) for t in minute]
            m -= MINUTE_MS
        return rows[-count:]
    m = max(floor_minute(since_ns // 1_000_000), market.genesis_ms)
    while len(rows) < count and m <= now:
        for t in market.minute(NAME, pair, m).trades:
            ns = _trade_ns(t.ts_ms, t.trade_id)
            if ns > since_ns and t.ts_ms <= now:
                rows.append((ns, t))
                if len(rows) == count:
                    break
        m += MINUTE_MS
    return rows


def _asset_pair(sim: Simulator, pair: str) -> dict[str, Any]:
    n = names(pair)
    spec = sim.market.spec(pair)
    return {
        "altname": n["altname"],
        "wsname": n["wsname"],
        "aclass_base": "currency",
        "base": n["base"],
        "aclass_quote": "currency",
        "quote": n["quote"],
        "lot": "unit",
        "cost_decimals": min(spec.price_dp + 3, 10),
        "pair_decimals": spec.price_dp,
        "lot_decimals": 8,
        "lot_multiplier": 1,
        "leverage_buy": [],
        "leverage_sell": [],
        "fees": [[0, 0.4], [10000, 0.35], [50000, 0.24]],
        "fees_maker": [[0, 0.25], [10000, 0.2], [50000, 0.14]],
        "fee_volume_currency": "ZUSD",
        "margin_call": 80,
        "margin_stop": 40,
        "ordermin": fmt_plain(10**spec.qty_dp, spec.qty_dp),
        "costmin": "0.5",
        "tick_size": fmt_plain(1, spec.price_dp),
        "status": "online",
    }
