"""Which hours the chain runs and when: :func:`select_hours` and the daemon's scheduler.

:class:`ChainScheduler` runs inside ``klined run``. At start it catches up on the hours the
warehouse still owes (newest first: the hour an operator looks at is the last closed one), then
it runs at every cron time (UTC). Its work is a queue of hours, newest first, run one hour per
chain-lock hold; whenever a cron time passes, the hours that became due join the queue, and
since they are the newest they go first. So the scheduled run for the newest closed hour never
waits behind more than the one hour in progress, whatever the catch-up still has to do, and a
``klined backfill`` or ``klined chain`` gets the lock between two hours.

The catch-up covers what klined itself captured: hours of the pairs' coverage
(:mod:`klined.warehouse.coverage`) inside ``chain.catchup_hours``. History before the coverage
is ``klined backfill``'s job, which the start-up log line suggests. The plan (hours, estimated
duration) is logged at start and its progress after every hour.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import anyio
from cronsim import CronSim, CronSimError
from loguru import logger

from klined.config import Config
from klined.errors import ConfigError, describe_error
from klined.jobs import ops
from klined.jobs.chain import lost_database, run_chain
from klined.jobs.chain_report import RUN_STEPS, STEPS, ChainReport
from klined.jobs.completeness import mark_pending, pending_hours
from klined.jobs.lock import hour_label
from klined.model import HOUR_MS, floor_hour, format_duration, from_datetime, to_datetime
from klined.rest.client import RestClient
from klined.status import ChainStatus
from klined.warehouse.coverage import covered_from
from klined.warehouse.database import Database

__all__ = ["ChainScheduler", "closed_end_ms", "next_cron_ms", "select_hours"]

#: What the scheduler runs per hour; ``publish`` runs once when a run's hours are done, so a
#: catch-up of many hours of one day writes that day's files once.
HOUR_STEPS = tuple(s for s in STEPS if s not in RUN_STEPS)
#: Recent hour-chains whose durations estimate a catch-up's length.
ESTIMATE_FROM_HOURS = 24


def next_cron_ms(schedule: str, after_ms: int) -> int:
    """The first time strictly after ``after_ms`` that the 5-field cron ``schedule`` (UTC)
    names; a bad expression is a :class:`ConfigError`."""
    try:
        it = CronSim(schedule, datetime.fromtimestamp(after_ms / 1000, tz=UTC))
        return from_datetime(next(it))
    except (CronSimError, StopIteration) as exc:
        raise ConfigError(
            f"bad cron expression {schedule!r}: {exc}", key="chain.schedule"
        ) from None


def closed_end_ms(cfg: Config, now_ms: int) -> int:
    """The end of the last closed hour: an hour is closed once its end plus the lake's
    ``hour_grace_s`` (late finals of its last minute) has passed."""
    return floor_hour(now_ms - int(cfg.lake.hour_grace_s * 1000))


async def select_hours(db: Database, cfg: Config, now_ms: int, lake: Any = None) -> list[int]:
    """Closed hours that need the chain, newest first.

    An hour needs the chain when, inside ``chain.catchup_hours`` and the pairs' coverage, it
    was never completed or still has pending completeness rows; when it is dirty (any age: new
    lake parts, gap-fill or backfill rows); when it is still incomplete inside
    ``chain.rest_retry_hours`` (missing or partial minutes REST may still supply, pending
    hours included); or, with a ``lake`` (a :class:`~klined.lake.LakeStore`), when it has
    parts inside ``chain.catchup_hours`` that ``ops.lake_parts`` does not know: parts another
    host uploaded late, or a late event's part.
    """
    closed_end = closed_end_ms(cfg, now_ms)
    catchup_start = closed_end - cfg.chain.catchup_hours * HOUR_MS
    retry_start = closed_end - cfg.chain.rest_retry_hours * HOUR_MS
    hours: set[int] = set()
    covered = await covered_from(db)
    if cfg.chain.catchup_hours and covered is not None:
        start = max(catchup_start, covered)
        rows = await db.fetch(
            "SELECT DISTINCT hour_start FROM ops.job_runs"
            " WHERE step = 'completeness' AND status = 'ok'"
            "   AND hour_start >= $1 AND hour_start < $2",
            to_datetime(start),
            to_datetime(closed_end),
        )
        done = {from_datetime(r["hour_start"]) for r in rows}
        hours.update(h for h in range(start, closed_end, HOUR_MS) if h not in done)
        hours.update(await pending_hours(db, start, closed_end))
    hours.update(d.hour_ms for d in await ops.list_dirty_hours(db, before_ms=closed_end))
    # parts that could not be read are tried again; minutes the daemon had to drop are filled
    rows = await db.fetch(
        "SELECT DISTINCT hour_start FROM ("
        "   SELECT hour_start FROM ops.lake_parts WHERE status = 'quarantined'"
        "   UNION ALL"
        "   SELECT generate_series(date_bin('1 hour', started_at, timestamptz 'epoch'),"
        "                          ended_at - interval '1 minute', interval '1 hour')"
        "   FROM monitoring.stream_incidents"
        "   WHERE kind = 'lake_dropped' AND repaired_at IS NULL AND ended_at IS NOT NULL"
        " ) h WHERE hour_start < $1",
        to_datetime(closed_end),
    )
    hours.update(from_datetime(r["hour_start"]) for r in rows if r["hour_start"] is not None)
    if cfg.chain.rest_retry_hours:
        rows = await db.fetch(
            "SELECT DISTINCT h.hour_start FROM monitoring.hourly_completeness h"
            " JOIN ops.pairs p ON p.exchange = h.exchange AND p.symbol = h.symbol"
            " WHERE p.active AND p.listed IS DISTINCT FROM false"
            "   AND h.hour_start >= $1 AND h.hour_start < $2"
            "   AND (h.missing > 0 OR h.ws_partial > 0)",
            to_datetime(retry_start),
            to_datetime(closed_end),
        )
        hours.update(from_datetime(r["hour_start"]) for r in rows)
    if cfg.chain.catchup_hours and hasattr(lake, "list_range"):
        hours.update(await unloaded_hours(db, lake, catchup_start, closed_end))
    return sorted(hours, reverse=True)


async def unloaded_hours(db: Database, lake: Any, start_ms: int, end_ms: int) -> set[int]:
    """Hours of ``[start_ms, end_ms)`` with lake parts (local or S3) not in ``ops.lake_parts``.

    A listing that fails (S3 unreachable) is logged and finds nothing: the hours come back once
    S3 does, and the flush step reports the outage."""
    try:
        refs = await lake.list_range(start_ms, end_ms)
    except Exception as exc:
        logger.warning("chain: cannot list the lake for unloaded parts: {}", exc)
        return set()
    if not refs:
        return set()
    rows = await db.fetch(
        "SELECT lake_key FROM ops.lake_parts WHERE lake_key = ANY($1::text[])",
        [r.key for r in refs],
    )
    known = {r["lake_key"] for r in rows}
    return {r.hour_ms for r in refs if r.key not in known}


async def seconds_per_hour(db: Database) -> float | None:
    """The median time one hour's chain took recently (its steps summed), from
    ``ops.job_runs``; None without history."""
    rows = await db.fetch(
        "SELECT sum(duration_ms) AS ms FROM ops.job_runs"
        " WHERE hour_start IS NOT NULL AND status IN ('ok', 'incomplete', 'skipped')"
        "   AND trigger <> 'backfill'"
        " GROUP BY hour_start, trigger HAVING bool_or(step = 'completeness')"
        " ORDER BY max(run_id) DESC LIMIT $1",
        ESTIMATE_FROM_HOURS,
    )
    values = [int(r["ms"]) / 1000 for r in rows if r["ms"] is not None]
    return statistics.median(values) if values else None


class ChainScheduler:
    """Runs the chain from the cron schedule (UTC), catching up at start, newest hour first.

    Start it in the daemon's task group (``await tg.start(scheduler.run)``). It never runs two
    chains at once in this process, never lets a chain error take the daemon down, and keeps
    ``status`` (the daemon's :class:`~klined.status.ChainStatus`) current: ``running``,
    ``trigger`` and ``run_done`` / ``run_total`` (the catch-up's progress), ``current_hour_ms``,
    ``current_step``, ``waiting_for`` (the lock's holder), ``last_run_ms``, ``last_result`` and
    ``next_run_ms``, the next cron time (never a past one once it has been acted on).
    Cancelling ``run`` stops the current step (recorded as failed: cancelled) and releases the
    lock; the hour is redone by the next run.
    """

    def __init__(
        self,
        db: Database,
        cfg: Config,
        *,
        lake: Any = None,
        clients: Mapping[str, RestClient] | None = None,
        status: ChainStatus | None = None,
        seal_hour: Callable[[int], Awaitable[None]] | None = None,
        clock_ms: Callable[[], int] | None = None,
        lock_wait_s: float | None = 120.0,
        nap_s: float = 30.0,
    ) -> None:
        self.db = db
        self.cfg = cfg
        self.lake = lake
        self.nap_s = nap_s  # longest sleep between clock readings while waiting for a run
        self.clients = clients
        self.status = status if status is not None else ChainStatus()
        self.seal_hour = seal_hour
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self.lock_wait_s = lock_wait_s
        self.schedule = cfg.chain.schedule
        next_cron_ms(self.schedule, 0)  # a bad expression fails at construction
        self._busy = anyio.Lock()
        self.last_report: ChainReport | None = None
        self.runs = 0
        #: (hour, trigger), newest hour first
        self._queue: list[tuple[int, str]] = []
        self._report: ChainReport | None = None
        self._run_started = 0.0
        self._maintained = False
        self._per_hour_s: float | None = None
        self._took: list[float] = []

    @property
    def next_run_ms(self) -> int | None:
        return self.status.next_run_ms

    @property
    def current_step(self) -> str:
        return self.status.current_step

    @property
    def running(self) -> bool:
        return self._busy.locked()

    @property
    def queued(self) -> list[int]:
        """The hours waiting in this run, newest first."""
        return [h for h, _ in self._queue]

    # -- the loop -------------------------------------------------------------------------------

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Catch up now, then run at every cron time until cancelled."""
        self.status.next_run_ms = next_cron_ms(self.schedule, self.clock_ms())
        task_status.started()
        async with self._busy:
            if not await self._plan("catchup"):
                self._nothing_to_do()
            await self._explain_coverage()
        while True:
            async with self._busy:
                if self.clock_ms() >= (self.status.next_run_ms or 0):
                    self.status.next_run_ms = next_cron_ms(self.schedule, self.clock_ms())
                    if not await self._plan("schedule") and self._report is None:
                        self._nothing_to_do()
                if self._queue and await self._run_next():
                    continue
                await self._publish()
                self._finish()
            await self._sleep_until(self.status.next_run_ms or 0)

    async def _sleep_until(self, target_ms: int) -> None:
        # short naps, re-reading the wall clock, so a suspended machine or a clock step does
        # not make us miss (or double) a run
        while True:
            delay = (target_ms - self.clock_ms()) / 1000
            if delay <= 0:
                return
            await anyio.sleep(min(delay, self.nap_s))

    async def run_once(self, trigger: str = "manual") -> ChainReport | None:
        """Select the hours due now and run them all, newest first; the report of the run
        (empty when nothing is due), or ``None`` if this scheduler is already running."""
        if self._busy.locked():
            logger.info("chain ({}) not started: a run is already in progress", trigger)
            return None
        async with self._busy:
            await self._plan(trigger)
            while self._queue and await self._run_next():
                pass
            await self._publish()
            return self._finish() or ChainReport(trigger, started_ms=int(time.time() * 1000))

    # -- planning -------------------------------------------------------------------------------

    def _nothing_to_do(self) -> None:
        self.runs += 1
        self.status.last_run_ms = self.clock_ms()
        self.status.last_result = "nothing to do"

    async def _plan(self, trigger: str) -> int:
        """Mark the closed hours pending, select what is due, and queue it newest first;
        return the hours added to the queue."""
        now = self.clock_ms()
        try:
            await mark_pending(self.db, closed_end_ms(self.cfg, now))
            hours = await select_hours(self.db, self.cfg, now, self.lake)
            if hours and self._per_hour_s is None:
                self._per_hour_s = await seconds_per_hour(self.db)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            error = describe_error(exc)
            if lost_database(exc):
                logger.error("chain ({}) cannot select hours: {}", trigger, error)
            else:
                logger.opt(exception=exc).error(
                    "chain ({}) cannot select hours: {}", trigger, error
                )
            self.status.last_run_ms = now
            self.status.last_result = f"error: {error}"[:300]
            return 0
        queued = {h for h, _ in self._queue}
        new = [(h, trigger) for h in hours if h not in queued]
        if not new:
            return 0
        self._queue = sorted(self._queue + new, key=lambda item: -item[0])
        if self._report is None:
            self._report = ChainReport(trigger, started_ms=int(time.time() * 1000))
            self._run_started = time.monotonic()
            self._maintained = False
            self._took = []
            self.status.run_done = 0
            self.status.run_total = 0
            self.status.trigger = trigger
        self.status.run_total += len(new)
        self.status.running = True
        if len(new) > 1 or trigger == "catchup":
            first, last = new[0][0], new[-1][0]
            span = (
                hour_label(first) if first == last else f"{hour_label(first)} .. {hour_label(last)}"
            )
            logger.info(
                "chain ({}): {} hour(s) to process, newest first: {}; {}",
                trigger,
                len(new),
                span,
                self._estimate(len(self._queue)),
            )
        return len(new)

    def _estimate(self, hours: int) -> str:
        """What ``hours`` more hours take: the mean of this run's hours so far (older hours
        can take much longer than recent ones: more to fetch), else recent runs' median."""
        per_hour = statistics.fmean(self._took) if self._took else self._per_hour_s
        if per_hour is None:
            return "estimated duration known after the first hour"
        return (
            f"estimated {format_duration(per_hour * hours)}"
            f" (about {format_duration(per_hour)} per hour)"
        )

    async def _explain_coverage(self) -> None:
        """At start: say when coverage begins, and that history before it is a backfill's."""
        try:
            covered = await covered_from(self.db)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:
            return
        now = self.clock_ms()
        window_start = closed_end_ms(self.cfg, now) - self.cfg.chain.catchup_hours * HOUR_MS
        if covered is None:
            logger.info("chain: no pair is covered yet (nothing captured or backfilled)")
        elif covered > window_start:
            logger.info(
                "chain: the warehouse covers the configured pairs from {} (when klined began"
                " capturing them); for history before that run `klined backfill --from <date>"
                " --to {}`",
                hour_label(covered),
                hour_label(covered),
            )

    # -- running --------------------------------------------------------------------------------

    async def _run_next(self) -> bool:
        """Run the newest queued hour; False when the chain lock stayed busy (the queue is
        dropped: the next cron time selects again)."""
        hour, trigger = self._queue[0]
        report = self._report
        assert report is not None
        self.status.trigger = trigger
        started = time.monotonic()
        try:
            one = await run_chain(
                self.db, self.cfg, [hour], trigger=trigger, lake=self.lake, clients=self.clients,
                steps=HOUR_STEPS, status=self.status, lock_wait_s=self.lock_wait_s,
                seal_hour=self.seal_hour, maintain_partitions=not self._maintained,
                now_ms=self.clock_ms(), publish_status=False,
            )  # fmt: skip
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            error = describe_error(exc)
            report.skipped = f"error: {error}"[:300]
            if lost_database(exc):
                # nothing more can run or be recorded: the next cron time selects again
                logger.error("chain ({}) stopped: {}", trigger, error)
                report.not_run = [h for h, _ in self._queue]
                self._queue.clear()
                return False
            logger.opt(exception=exc).error("chain ({}) failed: {}", trigger, error)
            self._queue.pop(0)
            self.status.running = bool(self._queue)
            return True
        self.status.running = True
        if one.skipped:
            report.skipped = one.skipped
            report.not_run = [h for h, _ in self._queue]
            self._queue.clear()
            return False
        self._queue.pop(0)
        self._maintained = True
        report.hours.extend(one.hours)
        self._took.append(time.monotonic() - started)
        self.status.run_done += 1
        if self.status.run_total > 1:
            outcome = one.hours[0] if one.hours else None
            state = (
                "ok"
                if outcome is None or (outcome.ok and not outcome.incomplete)
                else ("failed" if not outcome.ok else "incomplete")
            )
            left = (
                f"{len(self._queue)} left, {self._estimate(len(self._queue))}"
                if self._queue
                else "done"
            )
            logger.info(
                "chain ({}): {}/{} hours, {} {} in {:.1f}s; {}",
                trigger,
                self.status.run_done,
                self.status.run_total,
                hour_label(hour),
                state,
                self._took[-1],
                left,
            )
        return True

    async def _publish(self) -> None:
        """Once a run's hours are done: the publish step for the days they changed."""
        report = self._report
        if report is None or not self.cfg.publish.enabled:
            return
        try:
            one = await run_chain(
                self.db, self.cfg, [], trigger=report.trigger, lake=self.lake,
                steps=RUN_STEPS, status=self.status, lock_wait_s=self.lock_wait_s,
                maintain_partitions=False, now_ms=self.clock_ms(), publish_status=False,
            )  # fmt: skip
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            logger.error("chain ({}): publish not run: {}", report.trigger, describe_error(exc))
            return
        report.publish = one.publish

    def _finish(self) -> ChainReport | None:
        """The queue is empty (or given up): publish the run's result."""
        report, self._report = self._report, None
        self.status.running = False
        self.status.trigger = ""
        if report is None:
            return None
        report.duration_s = time.monotonic() - self._run_started
        self.runs += 1
        self.last_report = report
        self.status.last_run_ms = report.started_ms
        self.status.last_result = report.summary()
        if report.hours or report.skipped:
            logger.info("chain ({}): {}", report.trigger, report.summary())
        return report
