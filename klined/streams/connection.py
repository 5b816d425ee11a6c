"""One supervised WebSocket connection: a chunk of pairs on one exchange, kept alive forever.

A :class:`StreamConnection` is a *slot*: it runs one :class:`~klined.streams.session.Session`
(one socket, one ``session_id``) at a time, except while it rotates before the exchange's
connection lifetime, when the successor is opened and subscribed first and the old session is
closed only once the new one delivers data (duplicates are fine, silver deduplicates; a gap is
not). Every failure is caught here and retried with capped, jittered backoff that resets only
after a healthy session; only cancellation propagates. Fatal errors (4xx on connect, unlisted
pairs) are reported once: a rejected connection retries at the maximum backoff, an unlisted
pair is dropped from the subscription.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
from loguru import logger
from websockets.exceptions import InvalidStatus, InvalidURI

from klined.exchanges.base import ExchangeAdapter, ExchangeStatus, Limits, Malformed
from klined.model import Candle, Pair
from klined.status import ConnectionStatus, PairStatus, StreamState
from klined.streams.backoff import Backoff
from klined.streams.session import (
    EVIDENCE_FINALITY,
    Session,
    StaleConnection,
    SubscribeRefused,
    SubscribeTimeout,
    now_ms,
)

__all__ = [
    "EVIDENCE_FINALITY",
    "ReqIds",
    "Session",
    "Sink",
    "StaleConnection",
    "StreamConnection",
    "StreamSettings",
    "SubscribeRefused",
    "SubscribeTimeout",
    "now_ms",
]

Sink = Callable[[Candle], None]


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """How one exchange's connections behave; built from ``[exchanges.<name>]``."""

    stale_after_s: float = 30.0
    connect_timeout_s: float = 10.0
    subscribe_timeout_s: float = 10.0
    ping_interval_s: float = 20.0
    max_connection_age_s: float | None = None  # rotate after this long; None: never
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    healthy_after_s: float = 10.0  # subscribed and flowing this long: backoff resets
    pair_stale_after_s: float = 90.0  # a pair this quiet is flagged (status only)
    close_timeout_s: float = 2.0
    max_message_bytes: int = 16 * 1024 * 1024
    subscribe_messages_per_s: float | None = None

    @classmethod
    def from_config(cls, ex: Any, limits: Limits) -> StreamSettings:
        """``ex`` is a :class:`klined.config.ExchangeConfig`."""
        age: float | None = ex.max_connection_age_s or None
        if age is None and limits.connection_lifetime_s:
            life = limits.connection_lifetime_s
            age = life - min(600.0, life * 0.05)
        ping = ex.ping_interval_s
        if limits.ping_interval_s:
            ping = min(ping, limits.ping_interval_s)
        return cls(
            stale_after_s=ex.stale_after_s,
            connect_timeout_s=ex.connect_timeout_s,
            subscribe_timeout_s=ex.connect_timeout_s,
            ping_interval_s=ping,
            max_connection_age_s=age,
            backoff_initial_s=ex.backoff_initial_s,
            backoff_max_s=ex.backoff_max_s,
            healthy_after_s=min(10.0, ex.stale_after_s),
            pair_stale_after_s=3 * ex.stale_after_s,
            subscribe_messages_per_s=limits.ws_messages_per_s,
        )


class ReqIds:
    """Request ids, unique per adapter: an adapter matches replies to requests by id across
    every connection it serves, so the connections of one exchange share one counter."""

    def __init__(self) -> None:
        self._next = 1

    def peek(self) -> int:
        return self._next

    def take(self, n: int) -> int:
        """Reserve ``n`` consecutive ids; return the first."""
        first = self._next
        self._next += max(1, n)
        return first


class _LogLimiter:
    """At most ``burst`` log lines per ``window_s``; then one summary of what was dropped."""

    def __init__(self, burst: int = 5, window_s: float = 60.0) -> None:
        self.burst = burst
        self.window_s = window_s
        self._start = 0.0
        self._count = 0
        self.suppressed = 0

    def allow(self) -> bool:
        t = time.monotonic()
        if t - self._start >= self.window_s:
            self._start, self._count = t, 0
        self._count += 1
        if self._count <= self.burst:
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        n, self.suppressed = self.suppressed, 0
        return n


class StreamConnection:
    """A chunk of pairs on one exchange, connected, subscribed and reconnected forever."""

    def __init__(
        self,
        adapter: ExchangeAdapter,
        conn_id: str,
        base_url: str,
        pairs: list[Pair],
        settings: StreamSettings,
        sink: Sink,
        pair_status: dict[str, PairStatus] | None = None,
        req_ids: ReqIds | None = None,
        on_refused: Callable[[StreamConnection, list[Pair], str], None] | None = None,
    ) -> None:
        self.adapter = adapter
        self.conn_id = conn_id
        self.base_url = base_url
        self.pairs = list(pairs)
        self.settings = settings
        self.sink = sink
        self.pair_status = pair_status if pair_status is not None else {}
        for pair in self.pairs:
            key = str(pair)
            self.pair_status.setdefault(key, PairStatus(exchange=adapter.name, symbol=key))
        self.status = ConnectionStatus(exchange=adapter.name, conn_id=conn_id, pairs=len(pairs))
        self.backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
        self.wake = anyio.Event()
        self.current: Session | None = None
        self.sessions_started = 0
        self._retiring: list[Session] = []
        self.req_ids = req_ids if req_ids is not None else ReqIds()
        self.wants_app_ping = adapter.ping_message(0) is not None
        self._malformed_log = _LogLimiter()
        self._error_log = _LogLimiter()
        self._last_fatal = ""
        self._counts: dict[str, int] = {}
        self._on_refused = on_refused
        self.finished = False  # run() returned (no pair left); add_pairs needs a new run()
        self._log = logger.bind(exchange=adapter.name, conn=conn_id)

    # -- supervision -------------------------------------------------------------------------

    async def run(self) -> None:
        """Run sessions until cancelled, or until no pair is left to stream."""
        self.finished = False
        try:
            await self._run()
        finally:
            self.finished = True

    async def _run(self) -> None:
        async with anyio.create_task_group() as tg:
            while self.pairs:
                session = Session(self)
                self.current = session
                self.sessions_started += 1
                self.wake = anyio.Event()
                tg.start_soon(self._run_session, session)
                await self.wake.wait()
                if not session.ended.is_set():
                    # rotation (age or a changed pair set): the successor starts now, this
                    # session keeps streaming until the successor is live
                    self._retiring.append(session)
                    continue
                delay = self._after_session(session)
                if delay is None:
                    break
                # a fatal error keeps the slot "down" while it retries slowly
                self._set_state(StreamState.DOWN if self._last_fatal else StreamState.BACKOFF)
                self.status.next_retry_ms = now_ms() + int(delay * 1000)
                await anyio.sleep(delay)
                self.status.next_retry_ms = None
            for old in self._retiring:
                old.retire()
            if not self.pairs:
                self._set_state(StreamState.DOWN)
                self.status.last_error = self.status.last_error or "no pair left to stream"

    async def _run_session(self, session: Session) -> None:
        try:
            await session.run()
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            session.error = exc
        finally:
            if session in self._retiring:
                self._retiring.remove(session)
            session.ended.set()
            if session is self.current:
                self.wake.set()

    def _after_session(self, session: Session) -> float | None:
        """Classify how the current session ended: the delay before the next, or None to stop."""
        exc = session.error
        if session.healthy:
            self.backoff.reset()
        if isinstance(exc, InvalidURI):
            # only a config change can fix it: give up on this slot (status "down")
            self._fatal(f"bad WebSocket URL: {exc}", retrying=False)
            self._set_state(StreamState.DOWN)
            return None
        if isinstance(exc, InvalidStatus):
            code = exc.response.status_code
            if code == 429:
                self._note_failure(f"rate limited on connect (HTTP {code})")
                return max(self.backoff.next(), self.settings.backoff_max_s / 2)
            if 400 <= code < 500:
                self._fatal(f"connection refused with HTTP {code}")
                return self.backoff.at_max()
        if exc is None:
            self._note_failure("closed by the exchange", level="INFO")
        else:
            self._note_failure(_describe(exc))
        self._last_fatal = ""
        return self.backoff.next()

    # -- callbacks from sessions -------------------------------------------------------------

    def on_session_open(self, session: Session) -> None:
        if self.sessions_started > 1 and session is self.current:
            self.status.reconnects += 1
            for p in session.pairs:
                ps = self.pair_status.get(str(p))
                if ps is not None:
                    ps.reconnects += 1
        self._log.debug("connected, session {}", session.session_id)

    def on_subscribed(self, session: Session) -> None:
        if session is not self.current:
            return
        self.status.session_id = session.session_id
        self.status.connected_since_ms = now_ms()
        self._set_state(StreamState.CONNECTED)
        self._log.info("subscribed {} pairs, session {}", len(session.pairs), session.session_id)

    def on_live(self, session: Session) -> None:
        if session is self.current:
            for old in list(self._retiring):
                self._log.info("rotated: closing session {}", old.session_id)
                old.retire()

    def on_stale(self, session: Session) -> None:
        if session is self.current:
            self._set_state(StreamState.STALE)

    def on_unlisted(self, pairs: list[Pair], message: str) -> None:
        for pair in pairs:
            if pair in self.pairs:
                self.pairs.remove(pair)
                self._log.error("{} refused by {}: {} (skipped)", pair, self.adapter.name, message)
            ps = self.pair_status.get(str(pair))
            if ps is not None:
                ps.state = StreamState.UNLISTED
                ps.last_error = message
        self.status.pairs = len(self.pairs)
        if self._on_refused is not None:
            self._on_refused(self, pairs, message)

    def add_pairs(self, pairs: list[Pair]) -> None:
        """Stream ``pairs`` too (listed again, or a refused subscription asked for again);
        the connection resubscribes: a successor opens first, as on rotation."""
        new = [p for p in pairs if p not in self.pairs]
        if not new:
            return
        self.pairs.extend(new)
        self.status.pairs = len(self.pairs)
        for pair in new:
            ps = self.pair_status.setdefault(
                str(pair), PairStatus(exchange=self.adapter.name, symbol=str(pair))
            )
            ps.state = StreamState.CONNECTING
        current = self.current
        if current is not None and not current.ended.is_set():
            current.rotate_due.set()
            self.wake.set()

    def drop_pairs(self, pairs: list[Pair]) -> None:
        """Stop streaming ``pairs`` (found unlisted later; their status says why).

        The connection resubscribes without them: a successor opens first, as on rotation.
        """
        gone = [p for p in pairs if p in self.pairs]
        if not gone:
            return
        for pair in gone:
            self.pairs.remove(pair)
        self.status.pairs = len(self.pairs)
        current = self.current
        if current is not None and not current.ended.is_set():
            if self.pairs:
                current.rotate_due.set()
            else:
                current.retire()
            self.wake.set()

    def on_malformed(self, bad: Malformed) -> None:
        self.status.malformed += 1
        if self._malformed_log.allow():
            dropped = self._malformed_log.take_suppressed()
            more = f" ({dropped} more not logged)" if dropped else ""
            self._log.warning(
                "{}: malformed frame skipped: {}: {!r}{}",
                self.adapter.name,
                bad.reason,
                bad.snippet[:200],
                more,
            )

    def on_error_reply(self, message: str) -> None:
        self.status.last_error = message
        if self._error_log.allow():
            self._log.warning("{} error reply: {}", self.adapter.name, message)

    def on_exchange_status(self, session: Session, st: ExchangeStatus) -> None:
        if st.state == "online":
            return
        self.note_error(f"exchange status {st.state} {st.detail}".strip())
        if st.state == "shutdown" and not session.rotate_due.is_set():
            # the server is about to close this socket: open the successor now
            session.rotate_due.set()
            if session is self.current:
                self.wake.set()

    def note_error(self, message: str) -> None:
        self.status.last_error = message
        self._log.warning("{}", message)

    # -- state -------------------------------------------------------------------------------

    def _set_state(self, state: StreamState) -> None:
        self.status.state = state
        for pair in self.pairs:
            ps = self.pair_status.get(str(pair))
            if ps is not None and ps.state != StreamState.UNLISTED:
                ps.state = state

    def _record_error(self, message: str) -> None:
        """The connection's and its pairs' ``last_error``."""
        self.status.last_error = message
        for pair in self.pairs:
            ps = self.pair_status.get(str(pair))
            if ps is not None:
                ps.last_error = message

    def _fatal(self, message: str, *, retrying: bool = True) -> None:
        """Report a fatal error once; repeats of the same error are only debug lines."""
        self._record_error(message)
        if message != self._last_fatal:
            then = "retrying slowly" if retrying else "giving up"
            self._log.error("{} {}: {} ({})", self.adapter.name, self.conn_id, message, then)
            self._last_fatal = message
        else:
            self._log.debug("{}", message)

    def _note_failure(self, message: str, level: str = "WARNING") -> None:
        self._record_error(message)
        self._log.log(level, "{} {}: {}; reconnecting", self.adapter.name, self.conn_id, message)

    def refresh(self, wall_ms: int, elapsed_s: float) -> None:
        """Periodic status upkeep: message rates, and per-pair staleness while data flows.

        A pair quiet for ``pair_stale_after_s`` while its connection is up is flagged ``stale``
        for the operator, never reconnected: illiquid pairs are quiet on Kraken.
        """
        st = self.status
        st.messages_per_s = self._rate(st.conn_id, st.messages, st.messages_per_s, elapsed_s)
        since = st.connected_since_ms or wall_ms
        limit_ms = self.settings.pair_stale_after_s * 1000
        no_data_ms = min(self.settings.stale_after_s * 1000, limit_ms)
        for pair in self.pairs:
            ps = self.pair_status.get(str(pair))
            if ps is None:
                continue
            ps.messages_per_s = self._rate(ps.symbol, ps.messages, ps.messages_per_s, elapsed_s)
            if st.state == StreamState.CONNECTED:
                if ps.last_message_ms is None:
                    # subscribed, yet nothing ever came: a name the exchange accepts but does
                    # not trade (or a pair with no trades yet) is not "connected"
                    quiet = wall_ms - since > no_data_ms
                    ps.state = StreamState.NO_DATA if quiet else StreamState.CONNECTED
                    continue
                last = max(ps.last_message_ms, since)
                ps.state = StreamState.STALE if wall_ms - last > limit_ms else StreamState.CONNECTED

    def _rate(self, key: str, count: int, previous: float, elapsed_s: float) -> float:
        """An EWMA of messages per second over refresh intervals (cheap: no per-event math)."""
        first = key not in self._counts
        before = self._counts.get(key, 0)
        self._counts[key] = count
        if elapsed_s <= 0:
            return previous
        instant = (count - before) / elapsed_s
        alpha = 1.0 if first else min(1.0, elapsed_s / 10.0)
        return round(previous + alpha * (instant - previous), 3)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
