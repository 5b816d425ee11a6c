"""The live writer: every proven-final candle from the streams into silver within seconds.

::

    streams --sink--> lake writer .append          (every event; the system of record)
                  \\--> LiveWriter.offer            (finals only; hot path: a list append)
    batcher   cuts the pending finals into a batch QUIET_S after the first one if the
              committer is idle, else once they were quiet for QUIET_S or the oldest waited
              live.flush_interval_s -> a bounded queue (full: the oldest batch is dropped,
              counted, logged at most once a minute)
    committer waits until the lake has made the batch durable, then writes it into silver
              with the hourly merge's own statement (klined.jobs.silver.upsert_candles: the
              same precedence predicate, gold marks and announcements in the same
              transaction), and records each final's lag (commit time - event time)
    gold      refreshes the gold buckets the live path touched every live.gold_interval_s

Why the lake first: silver must never hold a row the lake could lose in a crash (the lake
flushes every ``lake.flush_interval_s``), or the hourly chain, which reconciles from the lake,
could not make silver the same as with the live path off. A batch waits for the lake's flush
(and asks for it at once).

The live path never slows capture: ``offer`` is synchronous and cheap, the queue is bounded,
and a slow or stopped PostgreSQL only costs dropped batches, whose minutes the hourly chain
fills from the lake. A failed commit is retried (capped, jittered backoff); the upsert is
idempotent, so a commit whose outcome was lost is simply written again. On shutdown the
committer writes what is queued, bounded by :data:`DRAIN_S`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio
import asyncpg
from anyio.abc import TaskStatus
from loguru import logger

from klined.config import LiveConfig
from klined.jobs import gold, silver
from klined.jobs.bronze_rows import validate_record
from klined.live.batches import Batch, BatchQueue, Dropped, compact
from klined.live.lag import LagWindow
from klined.model import HOUR_MS, Candle, CandleRecord
from klined.status import LiveStatus
from klined.streams.backoff import Backoff
from klined.warehouse.database import Database

#: a burst of finals (the minute boundary) is cut once no new final came for this long
QUIET_S = 0.05
#: how long a batch may wait for the lake to make it durable before the commit counts as failed
DURABLE_TIMEOUT_S = 30.0
#: one commit (transaction) at most this long; then it counts as failed and is retried
COMMIT_TIMEOUT_S = 60.0
#: on shutdown, what is queued is written within this bound (the chain fills the rest)
DRAIN_S = 10.0
#: a gold refresh that finds another one running tries again this soon
GOLD_RETRY_S = 1.0
#: problems (failed commits, dropped batches) are logged at most once per this span
LOG_EVERY_S = 60.0

#: errors a retry cannot fix: the batch is given up at once (the chain fills its minutes)
_PERMANENT = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.SyntaxOrAccessError,
)

Sink = Callable[[Candle], None]


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def live_sink(append: Sink, offer: Sink) -> Sink:
    """The streams' sink with the live path on: every event to the lake, then finals to live."""

    def sink(candle: Candle) -> None:
        append(candle)
        if candle.is_final:
            offer(candle)

    return sink


class LiveWriter:
    """Finals into silver: :meth:`offer` (the sink), :meth:`run_batcher` (from the daemon's
    start), :meth:`run` (once the database is open)."""

    def __init__(
        self,
        cfg: LiveConfig,
        *,
        status: LiveStatus | None = None,
        lake_mark: Callable[[], int] | None = None,
        wait_durable: Callable[[int], Awaitable[None]] | None = None,
        clock_ms: Callable[[], int] = wall_ms,
    ) -> None:
        """``lake_mark()`` is the lake writer's append count and ``wait_durable(mark)`` waits
        until that much is on disk (:class:`klined.lake.LakeWriter`); without them batches
        are written as soon as they are cut (tests, or a lake-less caller)."""
        self.cfg = cfg
        self.status = status if status is not None else LiveStatus()
        self.status.enabled = True
        self.status.state = "waiting"
        self.status.lag_window_s = cfg.lag_window_s
        self.queue = BatchQueue(cfg.queue_batches)
        self.lag = LagWindow(cfg.lag_window_s)
        self._lake_mark = lake_mark
        self._wait_durable = wait_durable
        self._clock_ms = clock_ms
        self._pending: list[Candle] = []
        self._first_at = 0.0
        self._arrived = anyio.Event()
        self._queued = anyio.Event()
        self._gold_due = False
        self._idle = False  # the committer waits for work (a batch cut now is written now)
        self._failing = False
        self._unlogged = Dropped()
        self._dropped_logged_at = -LOG_EVERY_S
        self._error_logged_at = -LOG_EVERY_S

    # -- the hot path -------------------------------------------------------------------------

    def offer(self, candle: Candle) -> None:
        """Take one proven-final candle (synchronous, no I/O)."""
        if not self._pending:
            self._first_at = time.monotonic()
            self._arrived.set()
        self._pending.append(candle)
        self.status.finals += 1

    # -- batching -----------------------------------------------------------------------------

    def cut(self) -> Batch | None:
        """Turn the pending finals into a queued batch (invalid ones are refused, counted)."""
        if not self._pending:
            return None
        pending, self._pending = self._pending, []
        candles: list[CandleRecord] = []
        for candle in pending:
            why = validate_record(candle)
            if why is None:
                candles.append(compact(candle))
            else:
                self.status.rejected += 1
                logger.warning(
                    "live: {} {} {}: not written ({})",
                    candle.exchange,
                    candle.symbol,
                    candle.interval_start,
                    why,
                )
        if not candles:
            return None
        mark = self._lake_mark() if self._lake_mark is not None else 0
        batch = Batch(candles, lake_mark=mark, cut_ms=self._clock_ms())
        self._note_dropped(self.queue.put(batch))
        self._queued.set()
        self._show_queue()
        return batch

    async def run_batcher(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Cut batches until cancelled, :data:`QUIET_S` after the first final at the earliest:
        at once when the committer is idle (its commit overlaps the rest of the burst, which
        forms the next batch), else once the burst is quiet, and never later than
        ``flush_interval_s`` after its first final or beyond ``batch_max_candles``."""
        task_status.started()
        limit = self.cfg.flush_interval_s
        while True:
            await self._arrived.wait()
            self._arrived = anyio.Event()
            while self._pending:
                seen = len(self._pending)
                left = limit - (time.monotonic() - self._first_at)
                if left > 0 and seen < self.cfg.batch_max_candles:
                    await anyio.sleep(min(QUIET_S, left))
                if (
                    self._idle
                    or len(self._pending) == seen
                    or time.monotonic() - self._first_at >= limit
                    or len(self._pending) >= self.cfg.batch_max_candles
                ):
                    break
            self.cut()

    # -- committing ---------------------------------------------------------------------------

    async def run(
        self, db: Database, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Write queued batches into silver and keep gold following, until cancelled; then
        write what is queued (shielded, within :data:`DRAIN_S`)."""
        self.status.state = "ok"
        task_status.started()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._follow_gold, db, name="live gold")
                await self._commit_loop(db)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(DRAIN_S) as scope:
                await self._drain(db)
            if scope.cancelled_caught or len(self.queue):
                logger.warning(
                    "live: {} final(s) not written at shutdown; the hourly chain fills them",
                    self.queue.candles,
                )
            self.status.state = "waiting"

    async def _commit_loop(self, db: Database) -> None:
        backoff = Backoff(0.5, 30.0)
        while True:
            while not len(self.queue):
                self._queued = anyio.Event()
                self._idle = True
                try:
                    await self._queued.wait()
                finally:
                    self._idle = False
            batches = self.queue.take(self.cfg.batch_max_candles)
            try:
                await self._commit(db, batches)
            except anyio.get_cancelled_exc_class():
                self._note_dropped(self.queue.put_back(batches))
                raise
            except _PERMANENT as exc:
                self._give_up(batches, exc)
            except Exception as exc:
                self._note_dropped(self.queue.put_back(batches))
                self._note_failure(exc)
                await anyio.sleep(backoff.next())
                continue
            backoff.reset()
            if self._failing:
                self._failing = False
                self.status.state = "ok"
                self.status.last_error = ""
                dropped = self._unlogged
                self._unlogged = Dropped()
                logger.info(
                    "live: PostgreSQL takes writes again ({} more batch(es), {} finals dropped"
                    " meanwhile; the hourly chain fills them)",
                    dropped.batches,
                    dropped.candles,
                )
            self._show_queue()

    async def _commit(self, db: Database, batches: list[Batch]) -> None:
        candles = [c for b in batches for c in b.candles]
        if self._wait_durable is not None:
            with anyio.move_on_after(DURABLE_TIMEOUT_S) as waiting:
                await self._wait_durable(max(b.lake_mark for b in batches))
            if waiting.cancelled_caught:
                raise TimeoutError(
                    f"the lake did not make the finals durable in {DURABLE_TIMEOUT_S:g} s"
                )
        with anyio.fail_after(COMMIT_TIMEOUT_S):
            await db.ensure_partitions(
                {c.interval_start - c.interval_start % HOUR_MS for c in candles}
            )
            async with db.transaction() as conn:
                result = await silver.upsert_candles(conn, candles)
        now = self._clock_ms()
        self.lag.add(now - c.event_ts for c in candles)
        st = self.status
        st.committed_batches += len(batches)
        st.written += result.written
        st.unchanged += len(candles) - result.written
        st.last_commit_ms = now
        if result.written:
            self._gold_due = True

    async def _drain(self, db: Database) -> None:
        self.cut()
        while len(self.queue):
            batches = self.queue.take(self.cfg.batch_max_candles)
            try:
                await self._commit(db, batches)
            except Exception as exc:
                self.queue.put_back(batches)
                logger.warning("live: writing the last batches failed: {}", exc)
                return
        self._show_queue()

    def _give_up(self, batches: list[Batch], exc: BaseException) -> None:
        n = sum(len(b) for b in batches)
        self.status.rejected += n
        self.status.last_error = f"{type(exc).__name__}: {exc}"[:300]
        logger.error("live: PostgreSQL refused {} final(s), not retried: {}", n, exc)

    # -- gold ---------------------------------------------------------------------------------

    async def _follow_gold(self, db: Database) -> None:
        """Refresh the gold buckets the live path touched, every ``gold_interval_s``."""
        while True:
            await anyio.sleep(self.cfg.gold_interval_s)
            while self._gold_due:
                self._gold_due = False
                try:
                    result = await gold.refresh(db, wait=False)
                except gold.GoldBusy:
                    self._gold_due = True  # the chain's own refresh runs; try again shortly
                    await anyio.sleep(GOLD_RETRY_S)
                    continue
                except anyio.get_cancelled_exc_class():
                    raise
                except Exception as exc:
                    self._gold_due = True
                    self._note_failure(exc, what="refreshing gold")
                    break
                self.status.gold_refreshed_ms = self._clock_ms()
                self.status.gold_rows += result.rows

    # -- reporting ----------------------------------------------------------------------------

    def _show_queue(self) -> None:
        self.status.queued_batches = len(self.queue)
        self.status.queued_finals = self.queue.candles

    def _note_dropped(self, dropped: Dropped) -> None:
        if not dropped.batches:
            return
        self.status.dropped_batches += dropped.batches
        self.status.dropped_finals += dropped.candles
        self._unlogged.batches += dropped.batches
        self._unlogged.candles += dropped.candles
        now = time.monotonic()
        if now - self._dropped_logged_at >= LOG_EVERY_S:
            logger.warning(
                "live: PostgreSQL is slow or down: dropped {} batch(es) ({} finals) from the"
                " live queue (at most {} kept); the hourly chain fills them from the lake",
                self._unlogged.batches,
                self._unlogged.candles,
                self.cfg.queue_batches,
            )
            self._unlogged = Dropped()
            self._dropped_logged_at = now

    def _note_failure(self, exc: BaseException, what: str = "writing silver") -> None:
        self._failing = True
        self.status.state = "failing"
        self.status.last_error = f"{what}: {type(exc).__name__}: {exc}"[:300]
        now = time.monotonic()
        if now - self._error_logged_at >= LOG_EVERY_S:
            logger.warning(
                "live: {} failed ({}); retrying, {} batch(es) queued",
                what,
                exc,
                len(self.queue),
            )
            self._error_logged_at = now

    def snapshot(self) -> LiveStatus:
        """The status with the lag percentiles of the window (for the status feed)."""
        lag = self.lag.summary()
        st = self.status
        st.lag_samples = lag.samples
        st.lag_p50_s = lag.p50_s
        st.lag_p99_s = lag.p99_s
        st.lag_max_s = lag.max_s
        return st
