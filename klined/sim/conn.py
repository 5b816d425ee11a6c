"""One simulated WebSocket connection: its schedule of candle events, faults and liveness.

Both exchanges share this machinery; :class:`WsProtocol` subclasses (``binance.py``,
``kraken.py``) say which events a minute produces, how they look on the wire and how client
requests are answered. The feed walks sim time one minute window at a time and sends every
event when the sim clock reaches it (real-time mode) or as fast as the client reads (replay
mode: ``send`` awaits the socket's drain, so a slow reader applies backpressure).
"""

from __future__ import annotations

import contextlib
import heapq
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, NamedTuple

import anyio
import anyio.lowlevel
from aiohttp import WSMsgType, web
from loguru import logger

from klined.model import MINUTE_MS, floor_minute
from klined.sim.clock import wall_ms
from klined.sim.log import ConnectionInfo
from klined.sim.market import Agg

if TYPE_CHECKING:
    from klined.sim.server import Simulator

SEND_TIMEOUT_S = 30.0


class Event(NamedTuple):
    """A scheduled candle message: due (and stamped) at sim time ``ts``."""

    ts: int
    pair: str
    minute: int
    agg: Agg | None  # None: a quiet minute (Binance final at the previous close)
    final: bool  # Binance x:true; Kraken: the minute's last update
    kind: str  # "update" | "final" | "tick" (internal window end)


class ConnectionDone(Exception):
    """The connection is over (closed, reset, or cut by a fault)."""


def rfc3339(ms: int, digits: int = 6) -> str:
    """``2023-10-04T16:26:30.524000Z`` with ``digits`` fractional digits (3..9)."""
    dt = datetime.fromtimestamp(ms // 1000, tz=UTC)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}{'0' * (digits - 3)}Z"


def abort_transport(transport: object) -> None:
    """Reset the TCP connection (RST, not FIN): what a crashed peer or middlebox does."""
    if transport is None:
        return
    get_extra = getattr(transport, "get_extra_info", None)
    sock = get_extra("socket") if get_extra else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # type: ignore[attr-defined]


class WsProtocol:
    """Exchange-specific behaviour of a connection (see ``binance.py``, ``kraken.py``)."""

    exchange = ""
    #: whether a minute's events spill into the next minute (Binance finals do)
    spill = False

    def __init__(self, conn: WsConnection) -> None:
        self.conn = conn
        self.sim = conn.sim

    def minute_events(self, minute: int, pairs: Sequence[str]) -> list[Event]:
        raise NotImplementedError

    def render(self, ev: Event) -> str:
        raise NotImplementedError

    def malformed(self, ev: Event, variant: str) -> str | bytes:
        raise NotImplementedError

    async def on_open(self) -> None:
        return None

    async def on_text(self, text: str) -> None:
        return None

    def on_incoming(self) -> None:
        """Called for every frame received (text, ping, pong): incoming rate limits."""

    async def background(self) -> None:
        return None


class WsConnection:
    """State of one accepted WebSocket connection."""

    def __init__(
        self,
        sim: Simulator,
        exchange: str,
        number: int,
        request: web.Request,
        ws: web.WebSocketResponse,
    ) -> None:
        self.sim = sim
        self.exchange = exchange
        self.number = number
        self.request = request
        self.ws = ws
        self.transport = request.transport
        self.pairs: dict[str, None] = {}
        self.subs_version = 0
        self.first_sub = anyio.Event()
        self._wake = anyio.Event()
        self.seq = 0
        self.stalled_until = 0.0
        self.last_send = time.monotonic()
        self.last_pong = time.monotonic()
        self.delayed: list[tuple[int, int, Event]] = []
        self._delay_counter = 0
        self.held: list[Event] = []
        self.resync = False
        self.done = False
        self.aborted = False
        self.cursor: int | None = None  # sim ms up to which the feed has sent events
        self.scope: anyio.CancelScope | None = None
        self._send_started = 0.0
        self.proto: WsProtocol | None = None
        self.info = ConnectionInfo(exchange, number, request.path_qs, wall_ms())

    # -- subscriptions ---------------------------------------------------------------------------

    def add_pairs(self, pairs: Sequence[str]) -> None:
        changed = False
        for p in pairs:
            if p not in self.pairs:
                self.pairs[p] = None
                changed = True
        if changed:
            self._changed()
        if self.pairs:
            self.first_sub.set()

    def remove_pairs(self, pairs: Sequence[str]) -> None:
        if any(self.pairs.pop(p, 0) is None for p in list(pairs)):
            self._changed()

    def _changed(self) -> None:
        self.subs_version += 1
        self.info.subscriptions = list(self.pairs)
        self._wake.set()

    async def wait(self, delay_s: float) -> None:
        """Sleep up to ``delay_s`` wall seconds, waking early when subscriptions change."""
        with anyio.move_on_after(delay_s):
            await self._wake.wait()
        if self._wake.is_set():
            self._wake = anyio.Event()

    def now_ms(self) -> int:
        """The connection's notion of now: the sim clock, or the replay cursor in replay mode."""
        if self.sim.config.mode == "replay":
            return self.cursor if self.cursor is not None else self.sim.config.replay_from or 0
        return self.sim.clock.now_ms()

    def feed_cursor(self) -> int:
        """Where the feed stands in sim time: a snapshot taken here is followed by exactly the
        events after it, as on the exchange, where one connection's messages are in order.

        Taken at the clock's now instead, a snapshot could run ahead of a feed that lags the
        clock (its stamp would say a minute is over while that minute's last updates for other
        pairs are still to come), or, on the first subscription, leave the updates between it
        and the feed's start unsent. The first snapshot places the feed's start.
        """
        if self.cursor is None:
            self.cursor = self.now_ms()
        return self.cursor

    # -- sending ---------------------------------------------------------------------------------

    @property
    def stalled(self) -> bool:
        return time.monotonic() < self.stalled_until

    async def wait_stall(self) -> None:
        remaining = self.stalled_until - time.monotonic()
        if remaining > 0:
            await anyio.sleep(remaining)

    async def send_raw(self, data: str | bytes) -> None:
        if self.done:
            raise ConnectionDone
        # aiohttp writes each frame with one transport write, so concurrent senders cannot
        # interleave; the send timeout is enforced by :meth:`send_watchdog` (a per-send cancel
        # scope would cost more than the send itself on the hot path)
        self._send_started = time.monotonic()
        try:
            if isinstance(data, bytes):
                await self.ws.send_bytes(data)
            else:
                await self.ws.send_str(data)
        except (ConnectionError, RuntimeError) as exc:
            self.done = True
            raise ConnectionDone(str(exc)) from exc
        finally:
            self._send_started = 0.0
        self.last_send = time.monotonic()

    async def send_watchdog(self) -> None:
        """Drop a client that stops reading (a send blocked on a full socket buffer)."""
        while True:
            await anyio.sleep(1.0)
            started = self._send_started
            if started and time.monotonic() - started > SEND_TIMEOUT_S:
                self.abort("send timeout: the client stopped reading")
                raise ConnectionDone("send timeout")

    async def send_control(self, text: str) -> None:
        """A non-candle message (ack, pong, heartbeat): dropped while stalled."""
        if not self.stalled:
            await self.send_raw(text)

    async def deliver(self, ev: Event, *, duplicate: bool = False, delayed: bool = False) -> None:
        assert self.proto is not None
        self.seq += 1
        await self.send_raw(self.proto.render(ev))
        self.info.messages += 1
        self.sim.stats.ws_messages[self.exchange] += 1
        self.record(ev, duplicate=duplicate, delayed=delayed)

    def record(self, ev: Event, *, duplicate: bool = False, delayed: bool = False) -> None:
        """Note a sent candle event in the simulator's log."""
        self.sim.log.record(
            self.exchange, ev.pair, ev.minute, ev.kind, ev.final, ev.agg,
            connection=self.number, seq=self.seq, event_ms=ev.ts, sent_ms=wall_ms(),
            sent_sim_ms=self.sim.clock.now_ms(), duplicate=duplicate, delayed=delayed,
        )  # fmt: skip

    async def send_event(self, ev: Event) -> None:
        """Send one scheduled candle event through the fault plan."""
        assert self.proto is not None
        sim = self.sim
        self.info.scheduled += 1
        message = self.info.scheduled
        fired = sim.faults.on_message(self.exchange, self.number, message, ev.pair, ev.ts, ev.final)
        duplicate = False
        for index, rule in fired:
            sim.faults.record(
                index,
                rule,
                self.exchange,
                wall_ms(),
                sim_ms=ev.ts,
                connection=self.number,
                pair=ev.pair,
                minute=ev.minute,
                message=message,
                detail=rule.variant if rule.kind == "malformed" else "",
            )
            logger.debug("sim {} conn {}: fault {} fired", self.exchange, self.number, rule.kind)
            kind = rule.kind
            if kind == "close":
                await self.close(1000, "", reason="fault: close")
                raise ConnectionDone("fault: close")
            if kind == "disconnect":
                self.abort("fault: disconnect")
                raise ConnectionDone("fault: disconnect")
            if kind == "stall":
                await self.stall(rule.duration_s, rule.then)
                return
            if kind == "malformed":
                await self.send_raw(self.proto.malformed(ev, rule.variant))
                if rule.replace:
                    return
            elif kind == "out_of_order":
                self.held.append(ev)
                return
            elif kind == "duplicate":
                duplicate = True
            elif kind == "late_final":
                if rule.until == "next_hour":
                    due = ev.minute - ev.minute % 3_600_000 + 3_600_000 + 5_000
                else:
                    due = ev.ts + int(rule.delay_s * 1000)
                self._delay_counter += 1
                heapq.heappush(self.delayed, (due, self._delay_counter, ev))
                return
        await self.deliver(ev)
        if duplicate:
            await self.deliver(ev, duplicate=True)
        while self.held:
            await self.deliver(self.held.pop(0), delayed=True)

    async def flush_delayed(self, upto_ms: int | None) -> None:
        """Send the held-back (late) events due by ``upto_ms``, stamped when they go out."""
        while self.delayed and (upto_ms is None or self.delayed[0][0] <= upto_ms):
            due, _, ev = heapq.heappop(self.delayed)
            stamp = max(due, ev.ts) if upto_ms is None else max(upto_ms, ev.ts)
            await self.deliver(ev._replace(ts=stamp), delayed=True)

    async def stall(self, duration_s: float, then: str) -> None:
        """Go silent: no data, no pongs, no heartbeats; then resume, close or reset."""
        self.stalled_until = time.monotonic() + duration_s
        await anyio.sleep(duration_s)
        if then == "close":
            await self.close(1000, "", reason="fault: stall then close")
            raise ConnectionDone("stall then close")
        if then == "disconnect":
            self.abort("fault: stall then disconnect")
            raise ConnectionDone("stall then disconnect")
        self.resync = self.sim.config.mode == "realtime"

    # -- ending ----------------------------------------------------------------------------------

    async def close(self, code: int, message: str, *, reason: str) -> None:
        if self.done:
            return
        self.done = True
        self.info.close_reason = self.info.close_reason or reason
        with anyio.move_on_after(2, shield=True), contextlib.suppress(Exception):
            await self.ws.close(code=code, message=message.encode())
        if self.scope is not None:
            self.scope.cancel()

    def abort(self, reason: str) -> None:
        self.done = True
        self.aborted = True
        self.info.close_reason = self.info.close_reason or reason
        abort_transport(self.transport)
        if self.scope is not None:
            self.scope.cancel()


# ---------------------------------------------------------------------------------------------
# the feed: sim time, minute window by minute window


def _window(conn: WsConnection, proto: WsProtocol, m: int, cursor: int) -> list[Event]:
    cfg = conn.sim.config
    pairs = list(conn.pairs)
    minutes = [m - MINUTE_MS, m] if proto.spill else [m]
    if cfg.mode == "replay":
        lo, hi = floor_minute(cfg.replay_from or 0), cfg.replay_to or 0
        minutes = [x for x in minutes if lo <= x < hi]
    events: list[Event] = []
    for x in minutes:
        events.extend(e for e in proto.minute_events(x, pairs) if cursor < e.ts < m + MINUTE_MS)
    events.sort(key=lambda e: e.ts)
    events.append(Event(m + MINUTE_MS - 1, "", m, None, False, "tick"))
    return events


async def run_feed(conn: WsConnection, proto: WsProtocol) -> None:
    sim = conn.sim
    cfg = sim.config
    clock = sim.clock
    replay = cfg.mode == "replay"
    await conn.first_sub.wait()
    if replay:
        cursor = floor_minute(cfg.replay_from or 0) - 1
        stop_at = (cfg.replay_to or 0) + MINUTE_MS
    else:
        # a snapshot sent before the feed started placed its start (WsConnection.feed_cursor)
        cursor = conn.cursor if conn.cursor is not None else clock.now_ms()
        stop_at = None
    conn.cursor = cursor
    sent = 0
    while stop_at is None or cursor + 1 < stop_at:
        m = floor_minute(cursor + 1)
        version = conn.subs_version
        events = _window(conn, proto, m, cursor)
        i = 0
        while i < len(events):
            ts = events[i].ts
            if not replay:
                while True:
                    due = min(ts, conn.delayed[0][0]) if conn.delayed else ts
                    delay = clock.wall_delay_s(due)
                    if delay > 0:
                        await conn.wait(delay)
                    if conn.subs_version != version:
                        break
                    if clock.now_ms() < due:
                        continue
                    if conn.delayed and conn.delayed[0][0] <= clock.now_ms():
                        await conn.flush_delayed(clock.now_ms())
                    if due >= ts:
                        break
                if conn.subs_version != version:
                    version = conn.subs_version
                    events, i = _window(conn, proto, m, cursor), 0
                    continue
            else:
                await conn.flush_delayed(ts)
            # the cursor moves first: a snapshot taken while these are sent includes them, and
            # the window a new subscription recomputes starts after them
            cursor = conn.cursor = ts
            while i < len(events) and events[i].ts == ts:
                ev = events[i]
                i += 1
                if ev.kind != "tick":
                    await conn.send_event(ev)
                    sent += 1
                    if sent % 64 == 0:  # sends rarely block: let pongs and requests through
                        await anyio.lowlevel.checkpoint()
            if conn.resync:
                conn.resync = False
                cursor = conn.cursor = max(cursor, clock.now_ms())
                break
    await conn.flush_delayed(None)
    while conn.held:
        await conn.deliver(conn.held.pop(0), delayed=True)
    if cfg.replay_end == "close":
        await conn.close(1000, "", reason="replay finished")
        raise ConnectionDone("replay finished")
    await anyio.sleep_forever()


async def receive_loop(conn: WsConnection, proto: WsProtocol) -> None:
    ws = conn.ws
    while not conn.done:
        msg = await ws.receive()
        if msg.type == WSMsgType.TEXT:
            proto.on_incoming()
            await conn.wait_stall()
            await proto.on_text(msg.data)
        elif msg.type == WSMsgType.PING:
            proto.on_incoming()
            await conn.wait_stall()  # a stalled peer reads nothing; it answers afterwards
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.pong(msg.data)
        elif msg.type == WSMsgType.PONG:
            proto.on_incoming()
            conn.last_pong = time.monotonic()
        elif msg.type == WSMsgType.BINARY:
            proto.on_incoming()
        else:  # CLOSE, CLOSING, CLOSED, ERROR
            conn.info.close_reason = conn.info.close_reason or "client closed"
            return


async def _guard(conn: WsConnection, work: Awaitable[None]) -> None:
    """Run one part of a connection; when it ends, the whole connection ends."""
    try:
        await work
    except ConnectionDone:
        pass
    except (ConnectionError, RuntimeError) as exc:
        conn.info.close_reason = conn.info.close_reason or f"transport: {exc}"
    finally:
        conn.done = True
        if conn.scope is not None:
            conn.scope.cancel()


async def serve_ws(
    sim: Simulator,
    exchange: str,
    request: web.Request,
    make_proto: Callable[[WsConnection], WsProtocol],
) -> web.WebSocketResponse:
    """The aiohttp handler body shared by both exchanges."""
    ws = web.WebSocketResponse(autoping=False, max_msg_size=1 << 20, compress=False)
    await ws.prepare(request)
    conn = sim.open_connection(exchange, request, ws)
    proto = conn.proto = make_proto(conn)
    try:
        async with anyio.create_task_group() as tg:
            conn.scope = tg.cancel_scope
            tg.start_soon(_guard, conn, run_feed(conn, proto))
            tg.start_soon(_guard, conn, proto.background())
            tg.start_soon(_guard, conn, conn.send_watchdog())
            with contextlib.suppress(ConnectionDone):
                await proto.on_open()
            await _guard(conn, receive_loop(conn, proto))
    finally:
        sim.close_connection(conn)
        if not conn.aborted and not ws.closed:
            with anyio.move_on_after(1, shield=True), contextlib.suppress(Exception):
                await ws.close()
    return ws
