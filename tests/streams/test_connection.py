"""One supervised connection against small scripted WebSocket servers on loopback.

These pin the connection's own rules (ack timeout, staleness, rotation with overlap, fatal
handshakes, refused pairs, malformed frames, finality evidence) with a server each test scripts
exactly; the simulator tests cover the same paths end to end.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from websockets.asyncio.server import ServerConnection, serve

from klined.exchanges import get_adapter
from klined.model import MINUTE_MS, Candle, Pair, iso
from klined.status import StreamState
from klined.streams import StreamConnection, StreamSettings
from klined.streams.connection import now_ms
from tests.support.streams import until

pytestmark = pytest.mark.anyio

T0 = 1_800_000_000_000 - 1_800_000_000_000 % 3_600_000
BTC, ETH, BAD = Pair("BTC", "USD"), Pair("ETH", "USD"), Pair("NOPE", "USD")
SOL = Pair("SOL", "USD")

FAST = StreamSettings(
    stale_after_s=1.0,
    connect_timeout_s=2.0,
    subscribe_timeout_s=1.0,
    ping_interval_s=5.0,
    backoff_initial_s=0.05,
    backoff_max_s=0.2,
    healthy_after_s=0.2,
    close_timeout_s=0.5,
)


def ts(minute: float) -> str:
    return iso(T0 + int(minute * MINUTE_MS)).replace("Z", ".000000Z")


def ohlc(symbol: str, minute: int, close: str, stamp: float, kind: str = "update") -> str:
    return json.dumps(
        {
            "channel": "ohlc",
            "type": kind,
            "timestamp": ts(stamp),
            "data": [
                {
                    "symbol": symbol,
                    "open": 1.0,
                    "high": max(3.0, float(close)),
                    "low": 0.5,
                    "close": float(close),
                    "trades": 2,
                    "volume": 1.5,
                    "vwap": 1.2,
                    "interval_begin": ts(minute),
                    "interval": 1,
                    "timestamp": ts(stamp),
                }
            ],
        }
    )


Script = Callable[["Conn"], Awaitable[None]]


@dataclass
class Conn:
    """One accepted client connection, as the script sees it."""

    index: int
    ws: ServerConnection
    symbols: list[str] = field(default_factory=list)

    async def send(self, text: str) -> None:
        await self.ws.send(text)


@dataclass
class FakeKraken:
    """A Kraken-v2-like server: acks subscriptions (refusing ``refuse``), then runs ``script``."""

    script: Script
    refuse: set[str] = field(default_factory=set)
    ack: bool = True
    reject_status: int | None = None
    opened: list[int] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)
    events: list[tuple[str, int]] = field(default_factory=list)
    subscribes: list[list[str]] = field(default_factory=list)
    pings: int = 0
    url: str = ""

    async def handler(self, ws: ServerConnection) -> None:
        index = len(self.opened)
        self.opened.append(index)
        self.events.append(("open", index))
        conn = Conn(index, ws)
        try:
            await ws.send(json.dumps({"channel": "status", "type": "update", "data": [
                {"system": "online", "api_version": "v2", "version": "2.0.0"}]}))  # fmt: skip
            req = json.loads(await ws.recv())
            symbols = req["params"]["symbol"]
            self.subscribes.append(symbols)
            if self.ack:
                for sym in symbols:
                    reply: dict[str, Any] = {"method": "subscribe", "req_id": req["req_id"]}
                    if sym in self.refuse:
                        reply["success"] = False
                        reply["symbol"] = sym
                        reply["error"] = f"Currency pair not supported {sym}"
                    else:
                        reply["success"] = True
                        reply["result"] = {"channel": "ohlc", "symbol": sym, "interval": 1}
                        conn.symbols.append(sym)
                    await ws.send(json.dumps(reply))
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._answer_pings, ws, tg.cancel_scope)
                await self.script(conn)
                tg.cancel_scope.cancel()
        finally:
            self.closed.append(index)
            self.events.append(("close", index))

    async def _answer_pings(self, ws: ServerConnection, scope: anyio.CancelScope) -> None:
        """Answer pings; when the client goes away, end the script too."""
        try:
            async for message in ws:
                if json.loads(message).get("method") == "ping":
                    self.pings += 1
                    await ws.send(json.dumps({"method": "pong", "req_id": 1}))
        finally:
            scope.cancel()

    def process_request(self, conn: Any, request: Any) -> Any:
        if self.reject_status is not None:
            return conn.respond(self.reject_status, "no such endpoint\n")
        return None


@asynccontextmanager
async def fake_kraken(script: Script, **kw: Any) -> AsyncIterator[FakeKraken]:
    fake = FakeKraken(script, **kw)
    async with serve(fake.handler, "127.0.0.1", 0, process_request=fake.process_request) as srv:
        port = srv.sockets[0].getsockname()[1]
        fake.url = f"ws://127.0.0.1:{port}/v2"
        yield fake


def make_conn(url: str, pairs: list[Pair], sink: list[Candle], **settings: Any) -> StreamConnection:
    s = dataclasses.replace(FAST, **settings)
    return StreamConnection(get_adapter("kraken"), "kraken-0", url, pairs, s, sink.append)


async def forever(conn: Conn) -> None:
    await anyio.sleep_forever()


# --------------------------------------------------------------------------------------------


async def test_captures_updates_and_finalizes_on_evidence() -> None:
    async def script(c: Conn) -> None:
        await c.send(ohlc("BTC/USD", 0, "1", 0.1, "snapshot"))
        await c.send(ohlc("BTC/USD", 0, "2", 0.5))
        await c.send(ohlc("ETH/USD", 0, "5", 0.7))
        await c.send(ohlc("BTC/USD", 1, "3", 1.2))  # proves BTC minute 0
        await c.send(ohlc("BTC/USD", 1, "4", 1.9))  # ETH's minute 0 is proven by this stamp too
        await anyio.sleep_forever()

    sink: list[Candle] = []
    async with fake_kraken(script) as fake, anyio.create_task_group() as tg:
        conn = make_conn(fake.url, [BTC, ETH], sink)
        tg.start_soon(conn.run)
        await until(lambda: sum(c.is_final for c in sink) == 2)
        tg.cancel_scope.cancel()

    updates = [c for c in sink if not c.is_final]
    finals = {c.symbol: c for c in sink if c.is_final}
    assert [(c.symbol, c.close) for c in updates] == [
        ("BTC/USD", "1"), ("BTC/USD", "2"), ("ETH/USD", "5"), ("BTC/USD", "3"), ("BTC/USD", "4"),
    ]  # fmt: skip
    assert finals["BTC/USD"].close == "2" and finals["BTC/USD"].interval_start == T0
    assert finals["ETH/USD"].close == "5" and finals["ETH/USD"].interval_start == T0
    assert len({c.session_id for c in sink}) == 1
    assert sink[0].session_id and sink[0].session_id.startswith("kraken-0-")
    assert conn.pair_status["BTC/USD"].last_final_minute_ms == T0
    assert conn.pair_status["BTC/USD"].messages == 4


async def test_abrupt_cut_mid_minute_reconnects_with_a_new_session_and_no_final() -> None:
    async def script(c: Conn) -> None:
        if c.index == 0:
            await c.send(ohlc("BTC/USD", 0, "1", 0.2))
            await c.send(ohlc("BTC/USD", 0, "2", 0.4))
            c.ws.transport.abort()  # mid-minute, no close frame
            return
        await c.send(ohlc("BTC/USD", 0, "2.5", 0.8, "snapshot"))
        await c.send(ohlc("BTC/USD", 1, "3", 1.1))
        await anyio.sleep_forever()

    sink: list[Candle] = []
    async with fake_kraken(script) as fake, anyio.create_task_group() as tg:
        conn = make_conn(fake.url, [BTC], sink)
        tg.start_soon(conn.run)
        await until(lambda: any(c.is_final for c in sink))
        tg.cancel_scope.cancel()

    sessions = list(dict.fromkeys(c.session_id for c in sink))
    assert len(sessions) == 2
    first = [c for c in sink if c.session_id == sessions[0]]
    assert [(c.close, c.is_final) for c in first] == [("1", False), ("2", False)]
    finals = [c for c in sink if c.is_final]
    assert [(f.session_id, f.close) for f in finals] == [(sessions[1], "2.5")]
    assert conn.status.reconnects == 1
    assert conn.pair_status["BTC/USD"].reconnects == 1


async def test_silent_connection_goes_stale_and_reconnects() -> None:
    async def script(c: Conn) -> None:
        if c.index == 0:
            await c.send(ohlc("BTC/USD", 0, "1", 0.2))
            await anyio.sleep_forever()  # silence: no heartbeat either
        await c.send(ohlc("BTC/USD", 0, "2", 0.5))
        while True:
            await c.send(json.dumps({"channel": "heartbeat"}))
            await anyio.sleep(0.1)

    sink: list[Candle] = []
    async with fake_kraken(script) as fake, anyio.create_task_group() as tg:
        conn = make_conn(fake.url, [BTC], sink)
        tg.start_soon(conn.run)
        await until(lambda: len(fake.opened) >= 2 and len(sink) >= 2)
        await until(lambda: conn.status.state == StreamState.CONNECTED)
        tg.cancel_scope.cancel()
    assert "no message" in conn.status.last_error
    assert [c.close for c in sink] == ["1", "2"]


async def test_missing_subscribe_ack_times_out_and_retries() -> None:
    sink: list[Candle] = []
    async with fake_kraken(forever, ack=False) as fake, anyio.create_task_group() as tg:
        conn = make_conn(fake.url, [BTC], sink, stale_after_s=30.0)
        tg.start_soon(conn.run)
        await until(lambda: len(fake.opened) >= 2)
        tg.cancel_scope.cancel()
    assert "no subscribe ack" in conn.status.last_error


async def test_refused_pair_is_unlisted_once_and_not_resubscribed() -> None:
    async def script(c: Conn) -> None:
        await c.send(ohlc("BTC/USD", 0, "1", 0.2))
        if c.index == 0:
            await c.ws.close()  # clean close: the client reconnects
            return
        await anyio.sleep_forever()

    sink: list[Candle] = []
    async with fake_kraken(script, refuse={"NOPE/USD"}) as fake, anyio.create_task_group() as tg:
        conn = make_conn(fake.url, [BTC, BAD], sink)
        tg.start_soon(conn.run)
        await until(lambda: len(fake.subscribes) >= 2 and len(sink) >= 2)
        tg.cancel_scope.cancel()
    assert fake.subscribes == [["BTC/USD", "NOPE/USD"], ["BTC/USD"]]
    assert conn.pair_status["NOPE/USD"].state == StreamState.UNLISTED
    assert "not supported" in conn.pair_status["NOPE/USD"].last_error
    assert conn.pairs == [BTC]


async def test_http_4xx_on_connect_is_fatal_reported_once_and_retried_slowly() -> None:
    sink: list[Candle] = []
    messages: list[str] = []
    from loguru import logger

    hid = logger.add(lambda m: messages.append(str(m)), level="ERROR")
    try:
        async with fake_kraken(forever, reject_status=404) as fake, anyio.create_task_group() as tg:
            conn = make_conn(fake.url, [BTC], sink, backoff_max_s=0.1)
            tg.start_soon(conn.run)
            await until(lambda: conn.sessions_started >= 3)
            tg.cancel_scope.cancel()
    finally:
        logger.remove(hid)
    assert conn.status.state == StreamState.DOWN
    assert "HTTP 404" in conn.status.last_error
    assert sum("HTTP 404" in m for m in messages) == 1
    assert conn.pair_status["BTC/USD"].state == StreamState.DOWN


async def test_bad_url_stops_the_connection() -> None:
    sink: list[Candle] = []
    conn = make_conn("http://not-a-websocket", [BTC], sink)
    with anyio.fail_after(5):
        await conn.run()
    assert conn.status.state == StreamState.DOWN
    assert "bad WebSocket URL" in conn.status.last_error


async def test_rotation_opens_the_successor_before_closing_the_old_session() -> None:
    async def script(c: Conn) -> None:
        n = 0
        while True:
            n += 1
            await c.send(ohlc("BTC/USD", 0, f"{c.index + 1}.{n}", 0.1))
            await anyio.sleep(0.02)

    sink: list[Candle] = []
    async with fake_kraken(script) as fake, anyio.create_task_group() as tg:
        conn = make_conn(fake.url, [BTC], sink, max_connection_age_s=0.4)
        tg.start_soon(conn.run)
        await until(lambda: len(fake.closed) >= 1 and len(fake.opened) >= 2)
        await anyio.sleep(0.1)
        tg.cancel_scope.cancel()
    # the successor was open (and subscribed) before the first connection closed
    assert fake.events.index(("open", 1)) < fake.events.index(("close", 0))
    sessions = list(dict.fromkeys(c.session_id for c in sink))
    assert len(sessions) >= 2
    assert conn.status.session_id == sessions[-1]


async def test_malformed_frames_are_counted_and_skipped() -> None:
    async def script(c: Conn) -> None:
        await c.send("{not json")
        await c.send(json.dumps({"channel": "ohlc", "type": "update", "data": [{"symbol": 1}]}))
        await c.send(ohlc("BTC/USD", 0, "1", 0.2))
        await anyio.sleep_forever()

    sink: list[Candle] = []
    async with fake_kraken(script) as fake, anyio.create_task_group() as tg:
        conn = make_conn(fake.url, [BTC], sink)
        tg.start_soon(conn.run)
        await until(lambda: len(sink) == 1)
        tg.cancel_scope.cancel()
    assert conn.status.malformed == 2
    assert len(fake.opened) == 1  # no reconnect for bad frames


async def test_application_pings_are_sent() -> None:
    sink: list[Candle] = []
    async with fake_kraken(forever) as fake, anyio.create_task_group() as tg:
        conn = make_conn(fake.url, [BTC], sink, ping_interval_s=0.05, stale_after_s=5.0)
        tg.start_soon(conn.run)
        await until(lambda: fake.pings >= 2)
        tg.cancel_scope.cancel()
    assert len(fake.opened) == 1


async def test_a_quiet_pair_is_flagged_stale_without_a_reconnect() -> None:
    async def script(c: Conn) -> None:
        n = 0
        await c.send(ohlc("ETH/USD", 0, "2.0", 0.1))  # then never again
        while True:
            n += 1
            await c.send(ohlc("BTC/USD", 0, f"1.{n}", 0.1))
            await anyio.sleep(0.02)

    sink: list[Candle] = []
    async with fake_kraken(script) as fake, anyio.create_task_group() as tg:
        conn = make_conn(fake.url, [BTC, ETH, SOL], sink, pair_stale_after_s=0.3)
        tg.start_soon(conn.run)
        await until(lambda: conn.status.state == StreamState.CONNECTED and len(sink) > 5)
        await anyio.sleep(0.5)
        conn.refresh(now_ms(), 0.5)
        states = {s: conn.pair_status[s].state for s in ("BTC/USD", "ETH/USD", "SOL/USD")}
        tg.cancel_scope.cancel()
    # a pair that went quiet is stale; one that never sent anything is "no data"
    assert states == {
        "BTC/USD": StreamState.CONNECTED,
        "ETH/USD": StreamState.STALE,
        "SOL/USD": StreamState.NO_DATA,
    }
    assert conn.status.state == StreamState.CONNECTED
    assert len(fake.opened) == 1
    assert conn.status.messages_per_s > 0 and conn.pair_status["BTC/USD"].messages_per_s > 0


async def test_a_listing_that_answers_late_drops_unlisted_pairs_by_resubscribing() -> None:
    from klined.errors import ExchangeError
    from klined.exchanges.base import ListedPair
    from klined.streams import ExchangeStreams

    calls = 0

    async def flaky_listing() -> dict[Pair, ListedPair]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ExchangeError("exchange unreachable")
        return {BTC: ListedPair(BTC, "BTC/USD", "XBTUSD", "XXBTZUSD")}

    async def script(c: Conn) -> None:
        n = 0
        while True:
            n += 1
            await c.send(ohlc("BTC/USD", 0, f"1.{n}", 0.1))
            await anyio.sleep(0.02)

    sink: list[Candle] = []
    async with fake_kraken(script) as fake, anyio.create_task_group() as tg:
        es = ExchangeStreams(
            get_adapter("kraken"), fake.url, [BTC, ETH], FAST, sink.append,
            fetch_listing=flaky_listing, listing_attempts=1, recheck_interval_s=0.2,
        )  # fmt: skip
        await tg.start(es.run)
        assert not es.listing_checked and es.connections[0].pairs == [BTC, ETH]
        await until(lambda: len(fake.subscribes) >= 2 and len(fake.closed) >= 1)
        tg.cancel_scope.cancel()
    assert fake.subscribes[:2] == [["BTC/USD", "ETH/USD"], ["BTC/USD"]]
    assert fake.events.index(("open", 1)) < fake.events.index(("close", 0))  # no gap
    eth = es.pair_status["ETH/USD"]
    assert eth.state == StreamState.UNLISTED and "not listed" in eth.last_error
    assert es.connections[0].pairs == [BTC]
