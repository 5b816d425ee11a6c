"""One WebSocket session: connect, subscribe, receive until the socket ends or goes stale.

A session is one socket and one ``session_id`` (the finality evidence's scope: a Kraken final
is only ever proven by later messages of the same session). Its slot
(:class:`klined.streams.connection.StreamConnection`) decides what happens when it ends.

Timeouts: the handshake has ``open_timeout``; everything after it is bounded by the session's
watchdog (no subscribe ack in time, no message for ``stale_after_s``) that cancels the session,
so the hot receive loop needs no per-message cancel scope.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedOK

from klined.exchanges.base import (
    ErrorReply,
    ExchangeStatus,
    Heartbeat,
    Malformed,
    Subscribed,
    SubscribeFailed,
)
from klined.model import Pair
from klined.streams.finality import FinalityTracker

if TYPE_CHECKING:
    from klined.streams.connection import StreamConnection

#: exchanges whose WS candles carry no final flag: finality comes from evidence
EVIDENCE_FINALITY = frozenset({"kraken"})


class StaleConnection(Exception):
    """Nothing arrived for ``stale_after_s``: the connection is presumed dead."""


class SubscribeTimeout(Exception):
    """The exchange never acknowledged the subscription."""


class SubscribeRefused(Exception):
    """A retryable subscription refusal (e.g. the exchange is busy)."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Session:
    """One socket: connect, subscribe, receive until it ends, is retired, or goes stale."""

    def __init__(self, slot: StreamConnection) -> None:
        self.slot = slot
        self.session_id = f"{slot.conn_id}-{uuid.uuid4().hex[:8]}"
        self.pairs = list(slot.pairs)
        self.tracker = FinalityTracker() if slot.adapter.name in EVIDENCE_FINALITY else None
        self.subscribed = False
        self.live = False  # subscribed and data flowed: a predecessor may close
        self.healthy = False
        self.rotate_due = anyio.Event()  # set once at max age: the slot opens a successor
        self.ended = anyio.Event()
        self.retired = False
        self.error: BaseException | None = None
        self.connected_at = 0.0
        self.last_rx = 0.0
        self._scope: anyio.CancelScope | None = None
        self._unacked: set[Pair] = set(self.pairs)  # subscribed pairs not acknowledged yet
        self._acks_without_pairs = 0
        self._sent_subscribes = 0

    # -- control from the slot ---------------------------------------------------------------

    def retire(self) -> None:
        """Close this session on purpose (its successor is live, or its pairs changed)."""
        self.retired = True
        if self._scope is not None:
            self._scope.cancel()

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        if self._scope is not None:
            self._scope.cancel()

    # -- the session -------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until the socket ends; raise what ended it (``None`` when closed cleanly)."""
        slot = self.slot
        s = slot.settings
        # subscribe by message on every exchange (acks name the pairs; no URL length limit)
        url = slot.adapter.ws_endpoint(slot.base_url, [])
        ws = await connect(
            url,
            open_timeout=s.connect_timeout_s,
            ping_interval=s.ping_interval_s,
            ping_timeout=max(s.ping_interval_s, s.stale_after_s),
            close_timeout=s.close_timeout_s,
            max_size=s.max_message_bytes,
            max_queue=64,
            user_agent_header="klined",
        )
        try:
            self.connected_at = self.last_rx = time.monotonic()
            slot.on_session_open(self)
            with anyio.CancelScope() as scope:
                self._scope = scope
                if self.retired:
                    scope.cancel()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._guard, self._watchdog())
                    if slot.wants_app_ping:
                        tg.start_soon(self._guard, self._pinger(ws))
                    await self._guard(self._subscribe(ws))
                    await self._guard(self._receive(ws))
                    tg.cancel_scope.cancel()
        finally:
            self._scope = None
            with anyio.move_on_after(s.close_timeout_s, shield=True) as cs:
                await ws.close()
            if cs.cancelled_caught:
                ws.transport.abort()
        if self.error is not None and not self.retired:
            raise self.error

    async def _guard(self, work: Coroutine[Any, Any, None]) -> None:
        """Turn a failure inside the session into its error (no exception groups escape)."""
        try:
            await work
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            self._fail(exc)

    async def _subscribe(self, ws: ClientConnection) -> None:
        adapter = self.slot.adapter
        first = self.slot.req_ids.peek()
        messages = adapter.subscribe_messages(self.pairs, first)
        self.slot.req_ids.take(len(messages))
        self._sent_subscribes = len(messages)
        rate = self.slot.settings.subscribe_messages_per_s
        for i, message in enumerate(messages):
            if i and rate:
                # keep a margin under the exchange's limit: our keep-alive pings count too
                await anyio.sleep(1.25 / rate)
            await ws.send(message)
        if not messages:
            self._mark_subscribed()

    async def _receive(self, ws: ClientConnection) -> None:
        slot = self.slot
        parse = slot.adapter.parse_frame
        sink = slot.sink
        pair_status = slot.pair_status
        cstatus = slot.status
        tracker = self.tracker
        sid = self.session_id
        clock = time.monotonic
        wall = time.time_ns
        recv = ws.recv
        while True:
            try:
                data = await recv(False)
            except ConnectionClosedOK:
                return
            self.last_rx = clock()
            received = wall() // 1_000_000
            frame = parse(data, session_id=sid, received_ms=received)
            cstatus.messages += 1
            cstatus.last_message_ms = received
            stamp = frame.stamp_ms
            if frame.controls:
                stamp = self._controls(frame.controls, stamp)
            candles = frame.candles
            for candle in candles:
                sink(candle)
                ps = pair_status.get(candle.symbol)
                if ps is not None:
                    ps.messages += 1
                    ps.last_message_ms = received
                    if candle.is_final and (
                        ps.last_final_minute_ms is None
                        or candle.interval_start > ps.last_final_minute_ms
                    ):
                        ps.last_final_minute_ms = candle.interval_start
            if tracker is not None and (candles or stamp is not None):
                for final in tracker.observe(candles, stamp, received):
                    sink(final)
                    ps = pair_status.get(final.symbol)
                    if ps is not None and (
                        ps.last_final_minute_ms is None
                        or final.interval_start > ps.last_final_minute_ms
                    ):
                        ps.last_final_minute_ms = final.interval_start
            if candles and not self.live and self.subscribed:
                self._go_live()

    def _controls(self, controls: list[object], stamp: int | None) -> int | None:
        slot = self.slot
        for ctl in controls:
            if isinstance(ctl, Heartbeat):
                if ctl.ts_ms is not None and (stamp is None or ctl.ts_ms > stamp):
                    stamp = ctl.ts_ms
            elif isinstance(ctl, Malformed):
                slot.on_malformed(ctl)
            elif isinstance(ctl, Subscribed):
                if ctl.pairs:
                    self._unacked.difference_update(ctl.pairs)
                else:
                    self._acks_without_pairs += 1
                if not self._unacked or self._acks_without_pairs >= self._sent_subscribes:
                    self._mark_subscribed()
            elif isinstance(ctl, SubscribeFailed):
                if ctl.fatal:
                    slot.on_unlisted(list(ctl.pairs), ctl.message)
                    self._unacked.difference_update(ctl.pairs)
                    if not slot.pairs:
                        self._fail(SubscribeRefused(f"every pair refused: {ctl.message}"))
                    elif not self._unacked:
                        self._mark_subscribed()
                else:
                    self._fail(SubscribeRefused(ctl.message))
            elif isinstance(ctl, ErrorReply):
                slot.on_error_reply(ctl.message)
            elif isinstance(ctl, ExchangeStatus):
                slot.on_exchange_status(self, ctl)
        return stamp

    def _mark_subscribed(self) -> None:
        if not self.subscribed:
            self.subscribed = True
            self.slot.on_subscribed(self)

    def _go_live(self) -> None:
        self.live = True
        self.slot.on_live(self)

    async def _pinger(self, ws: ClientConnection) -> None:
        """Application-level pings for exchanges that want them (Kraken ``{"method":"ping"}``)."""
        interval = self.slot.settings.ping_interval_s
        while True:
            await anyio.sleep(interval)
            message = self.slot.adapter.ping_message(self.slot.req_ids.take(1))
            if message is not None:
                await ws.send(message)

    async def _watchdog(self) -> None:
        """Every wait after the handshake is bounded here: ack, staleness, age, health."""
        s = self.slot.settings
        tick = max(0.05, min(1.0, s.stale_after_s / 4, s.subscribe_timeout_s / 4))
        while True:
            await anyio.sleep(tick)
            t = time.monotonic()
            age = t - self.connected_at
            if t - self.last_rx > s.stale_after_s:
                self.slot.on_stale(self)
                self._fail(StaleConnection(f"no message for {s.stale_after_s:g} s"))
                return
            if not self.subscribed and age > s.subscribe_timeout_s:
                if len(self._unacked) < len(self.pairs):
                    # some acks came: stream what we have, and say which did not
                    missing = sorted(str(p) for p in self._unacked)
                    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                    self.slot.note_error(f"no subscribe ack for {', '.join(missing[:5])}{more}")
                    self._mark_subscribed()
                else:
                    self._fail(SubscribeTimeout(f"no subscribe ack in {s.subscribe_timeout_s:g} s"))
                    return
            if self.subscribed and not self.live and age > s.healthy_after_s:
                self._go_live()  # subscribed, messages flow, but its pairs are quiet
            if self.live and not self.healthy and age > s.healthy_after_s:
                self.healthy = True
                self.slot.backoff.reset()
            if (
                s.max_connection_age_s is not None
                and age > s.max_connection_age_s
                and not self.rotate_due.is_set()
            ):
                self.rotate_due.set()
                self.slot.wake.set()
