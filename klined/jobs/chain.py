"""The hourly chain: flush -> bronze -> gapfill -> silver -> gold -> completeness, per hour.

:func:`run_chain` runs the steps for a list of hours under a PostgreSQL advisory lock (two
chains never run at once, even from several daemons or a backfill sharing the warehouse).
Each step is recorded in ``ops.job_runs``; a failing step stops its hour (later hours still
run) and the hour is picked again by the next run, because it is still dirty or was never
completed. :func:`select_hours` decides which hours a run takes; :class:`ChainScheduler` runs
it from the embedded cron inside ``klined run``; ``klined chain`` runs it by hand
(:mod:`klined.commands.chain`).

Idempotent by construction: every step is (see each step module), and a dirty mark is only
cleared when the hour's silver, gold and completeness succeeded after the mark was made.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import asyncpg
from cronsim import CronSim, CronSimError
from loguru import logger

from klined.config import Config
from klined.errors import ChainError, ConfigError
from klined.jobs import ops
from klined.model import HOUR_MS, floor_hour, from_datetime, iso, to_datetime
from klined.rest.client import RestClient
from klined.status import ChainStatus
from klined.warehouse.database import Database

#: The steps of one hour, in order.
STEPS = ("flush", "bronze", "gapfill", "silver", "gold", "completeness")
#: The steps that turn bronze into silver/gold/completeness (what a backfill runs).
MERGE_STEPS = ("silver", "gold", "completeness")

#: ``pg_try_advisory_lock`` key held by a running chain ("klined" in ASCII).
CHAIN_LOCK_KEY = 0x6B6C696E6564

_CLEANUP_S = 10.0


class ChainBusy(ChainError):
    """Another chain (daemon, ``klined chain`` or a backfill's merge) holds the lock."""


# ---------------------------------------------------------------------------------------------
# reports


@dataclass(slots=True)
class StepOutcome:
    step: str
    status: str  # ok | failed | skipped
    rows: int = 0
    duration_s: float = 0.0
    error: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class HourOutcome:
    hour_ms: int
    exchange: str | None = None
    steps: list[StepOutcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.status != "failed" for s in self.steps)


@dataclass(slots=True)
class ChainReport:
    trigger: str
    hours: list[HourOutcome] = field(default_factory=list)
    skipped: str = ""  # why the whole run did not happen (lock held elsewhere)
    started_ms: int = 0
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.skipped and all(h.ok for h in self.hours)

    def summary(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        failed = sum(1 for h in self.hours if not h.ok)
        text = f"{len(self.hours)} hour(s), {failed} failed, {self.duration_s:.1f}s"
        return text if failed else text.replace(", 0 failed", "")

    def table(self, steps: Sequence[str] = STEPS) -> str:
        """One line per hour, one column per step: ``ok 1,234`` / ``skipped`` / ``FAILED``.

        A gap-fill that could not fetch everything says how many minutes are still missing
        (they are retried by later runs; the reasons are in ``ops.gapfill_attempts``).
        """
        cols = [s for s in steps if any(o.step == s for h in self.hours for o in h.steps)]
        head = ["hour", *cols]
        rows = []
        for h in self.hours:
            cells = [iso(h.hour_ms) + (f" {h.exchange}" if h.exchange else "")]
            by_step = {o.step: o for o in h.steps}
            for s in cols:
                o = by_step.get(s)
                if o is None:
                    cells.append("-")
                elif o.status == "ok":
                    missing = o.details.get("missing") or 0
                    cells.append(f"ok {o.rows:,}" + (f" ({missing:,} missing)" if missing else ""))
                elif o.status == "failed":
                    cells.append("FAILED")
                else:
                    cells.append("skipped")
            rows.append(cells)
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *rows]
        ]
        errors = [
            f"  {iso(h.hour_ms)} {o.step}: {o.error}"
            for h in self.hours
            for o in h.steps
            if o.status == "failed"
        ]
        if errors:
            lines += ["", "errors:", *errors]
        return "\n".join(line.rstrip() for line in lines)


# ---------------------------------------------------------------------------------------------
# cron


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


# ---------------------------------------------------------------------------------------------
# the advisory lock


@asynccontextmanager
async def chain_lock(
    db: Database, *, wait_s: float | None = 0.0, poll_s: float = 1.0
) -> AsyncIterator[None]:
    """Hold the chain lock on a dedicated connection for the ``async with`` body.

    ``wait_s``: how long to wait for another holder (``None``: as long as it takes); raises
    :class:`ChainBusy` when it does not come free. Closing the connection releases the lock
    even if the unlock itself cannot run (a cancelled or crashed holder never leaves it held).
    """
    conn: asyncpg.Connection = await asyncpg.connect(db.dsn, timeout=10)
    try:
        deadline = None if wait_s is None else time.monotonic() + wait_s
        told = False
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", CHAIN_LOCK_KEY):
            holder = await _lock_holder(conn)
            if deadline is not None and time.monotonic() >= deadline:
                raise ChainBusy(f"another chain is running ({holder}); try again later")
            if not told:
                logger.info("waiting for the chain lock, held by {}", holder)
                told = True
            await anyio.sleep(poll_s)
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_S):
                await conn.execute("SELECT pg_advisory_unlock($1)", CHAIN_LOCK_KEY)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_S):
            await conn.close()
        if not conn.is_closed():
            conn.terminate()


async def _lock_holder(conn: asyncpg.Connection) -> str:
    row = await conn.fetchrow(
        "SELECT l.pid, a.application_name, a.client_addr::text AS addr"
        " FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
        "   AND ((l.classid::bigint << 32) | l.objid::bigint) = $1",
        CHAIN_LOCK_KEY,
    )
    if row is None:
        return "another session"
    where = f" from {row['addr']}" if row["addr"] else ""
    return f"PostgreSQL backend pid {row['pid']} ({row['application_name'] or '?'}{where})"


# ---------------------------------------------------------------------------------------------
# which hours


async def select_hours(db: Database, cfg: Config, now_ms: int) -> list[int]:
    """Closed hours that need the chain, oldest first.

    An hour is closed when its end plus the lake's ``hour_grace_s`` has passed. It needs the
    chain when it was never completed (inside ``chain.catchup_hours``), is dirty (any age: new
    lake parts, gap-fill or backfill rows), or is still incomplete inside
    ``chain.rest_retry_hours`` (missing or partial minutes REST may still supply).
    """
    closed_end = floor_hour(now_ms - int(cfg.lake.hour_grace_s * 1000))
    catchup_start = closed_end - cfg.chain.catchup_hours * HOUR_MS
    retry_start = closed_end - cfg.chain.rest_retry_hours * HOUR_MS
    hours: set[int] = set()
    if cfg.chain.catchup_hours:
        rows = await db.fetch(
            "SELECT DISTINCT hour_start FROM ops.job_runs"
            " WHERE step = 'completeness' AND status = 'ok'"
            "   AND hour_start >= $1 AND hour_start < $2",
            to_datetime(catchup_start),
            to_datetime(closed_end),
        )
        done = {from_datetime(r["hour_start"]) for r in rows}
        hours.update(h for h in range(catchup_start, closed_end, HOUR_MS) if h not in done)
    hours.update(d.hour_ms for d in await ops.list_dirty_hours(db, before_ms=closed_end))
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
    return sorted(hours)


# ---------------------------------------------------------------------------------------------
# running the steps


StepFunc = Callable[[int], Awaitable[ops.StepResult | None]]


class _Runner:
    """The steps of one run, bound to its database, config, lake and REST clients."""

    def __init__(
        self,
        db: Database,
        cfg: Config,
        *,
        trigger: str,
        lake: Any,
        clients: Mapping[str, RestClient] | None,
        exchange: str | None,
        status: ChainStatus | None,
        seal_hour: Callable[[int], Awaitable[None]] | None,
        now_ms: int,
    ) -> None:
        self.db = db
        self.cfg = cfg
        self.trigger = trigger
        self.lake = lake
        self.clients = clients
        self.exchange = exchange
        self.status = status
        self.seal_hour = seal_hour
        self.now_ms = now_ms
        self._gapfilled: set[int] | None = None

    async def step(self, name: str, hour: int, run: ops.StepRun) -> ops.StepResult | None:
        if name == "flush":
            return await self._flush(hour, run)
        if name == "bronze":
            return await self._bronze(hour, run)
        if name == "gapfill":
            return await self._gapfill(hour, run)
        if name == "silver":
            from klined.jobs import silver

            return await silver.merge_hour(self.db, hour, self.exchange)
        if name == "gold":
            from klined.jobs import gold

            return await gold.refresh(self.db, hour, exchange=self.exchange)
        if name == "completeness":
            from klined.jobs import completeness

            return await completeness.refresh_hour(self.db, hour, self.exchange)
        raise ChainError(f"unknown step {name!r}")

    async def _flush(self, hour: int, run: ops.StepRun) -> ops.StepResult | None:
        if self.seal_hour is not None:
            await self.seal_hour(hour)
        if self.lake is None or not getattr(self.lake, "enabled", False):
            run.skip("no S3 bucket configured: the lake is local only")
            return None
        report = await self.lake.upload_pending(hour)
        return ops.StepResult(
            step="flush",
            hour_ms=hour,
            rows=report.uploaded,
            details={"parts": report.parts, "already_present": report.already_present},
        )

    async def _bronze(self, hour: int, run: ops.StepRun) -> ops.StepResult | None:
        if self.lake is None:
            run.skip("no lake")
            return None
        from klined.jobs import bronze

        return await bronze.load_hour(self.db, hour, self.lake, exchange=self.exchange)

    async def _gapfill(self, hour: int, run: ops.StepRun) -> ops.StepResult | None:
        if not self.clients:
            run.skip("no REST clients (exchanges disabled)")
            return None
        retry_from = floor_hour(self.now_ms) - self.cfg.chain.rest_retry_hours * HOUR_MS
        if hour < retry_from and await self._gapfilled_before(hour):
            run.skip("outside chain.rest_retry_hours (use klined backfill for older hours)")
            return None
        from klined.jobs.gapfill import fill_hour

        clients = self.clients
        if self.exchange is not None:
            clients = {k: v for k, v in clients.items() if k == self.exchange}
        result = await fill_hour(self.db, self.cfg, hour, clients, now_ms=self.now_ms)
        return result.step_result(hour)

    async def _gapfilled_before(self, hour: int) -> bool:
        row = await self.db.fetchval(
            "SELECT 1 FROM ops.job_runs WHERE hour_start = $1 AND step = 'gapfill'"
            " AND status = 'ok' LIMIT 1",
            to_datetime(hour),
        )
        return row is not None

    async def hour(self, hour: int, steps: Sequence[str]) -> HourOutcome:
        outcome = HourOutcome(hour, self.exchange)
        dirty: list[ops.DirtyHour] | None = None
        if self.status is not None:
            self.status.current_hour_ms = hour
        for name in steps:
            if name in MERGE_STEPS and dirty is None:
                # marks made before silver reads bronze are covered by this run; later ones
                # (a lake part or backfill row arriving meanwhile) keep the hour dirty
                dirty = [
                    d
                    for d in await ops.list_dirty_hours(
                        self.db, before_ms=hour + HOUR_MS, exchange=self.exchange
                    )
                    if d.hour_ms == hour
                ]
            if self.status is not None:
                self.status.current_step = name
            started = time.monotonic()
            try:
                async with ops.record_step(self.db, name, hour, trigger=self.trigger) as run:
                    result = await self.step(name, hour, run)
                    if result is not None:
                        run.set_result(result)
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                logger.error("chain {} {}: {} failed: {}", iso(hour), self.trigger, name, error)
                outcome.steps.append(
                    StepOutcome(name, "failed", 0, time.monotonic() - started, error[:500])
                )
                return outcome
            status = "skipped" if run.skipped_reason is not None else "ok"
            outcome.steps.append(
                StepOutcome(
                    name,
                    status,
                    run.rows,
                    time.monotonic() - started,
                    run.skipped_reason or "",
                    dict(run.details),
                )
            )
        if dirty and all(s in steps for s in MERGE_STEPS):
            for d in dirty:
                await ops.clear_dirty_hour(self.db, d)
        return outcome


async def run_chain(
    db: Database,
    cfg: Config,
    hours: Iterable[int],
    *,
    trigger: str,
    lake: Any = None,
    clients: Mapping[str, RestClient] | None = None,
    steps: Sequence[str] = STEPS,
    exchange: str | None = None,
    status: ChainStatus | None = None,
    lock_wait_s: float | None = 0.0,
    seal_hour: Callable[[int], Awaitable[None]] | None = None,
    maintain_partitions: bool = True,
    now_ms: int | None = None,
) -> ChainReport:
    """Run ``steps`` for every hour in ``hours`` (oldest first) under the chain lock.

    ``lake``: a :class:`klined.lake.LakeUploader` (flush + bronze) or
    :class:`klined.lake.LakeStore` (bronze only); ``clients``: REST clients by exchange (for
    gapfill); ``exchange`` limits every step to one exchange; ``status`` is updated in place
    for the daemon's status feed. When the lock is held elsewhere past ``lock_wait_s`` the
    report says ``skipped`` and nothing runs. Cancellation stops the current step (recorded
    ``failed: cancelled``) and releases the lock.
    """
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ChainError(f"unknown step(s) {unknown}; steps are {', '.join(STEPS)}")
    ordered = [s for s in STEPS if s in steps]
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    report = ChainReport(trigger, started_ms=int(time.time() * 1000))
    todo = sorted({floor_hour(h) for h in hours})
    started = time.monotonic()
    runner = _Runner(
        db, cfg, trigger=trigger, lake=lake, clients=clients, exchange=exchange,
        status=status, seal_hour=seal_hour, now_ms=now,
    )  # fmt: skip
    try:
        async with chain_lock(db, wait_s=lock_wait_s):
            if status is not None:
                status.running = True
            if maintain_partitions:
                await _maintain(db, trigger, now)
            for hour in todo:
                outcome = await runner.hour(hour, ordered)
                report.hours.append(outcome)
    except ChainBusy as exc:
        report.skipped = str(exc)
        logger.warning("chain ({}) skipped: {}", trigger, exc)
    finally:
        report.duration_s = time.monotonic() - started
        if status is not None:
            status.running = False
            status.current_step = ""
            status.current_hour_ms = None
            status.last_run_ms = report.started_ms
            status.last_result = report.summary()
    if report.hours:
        # a backfill's or an import's merges come by the hundred and have their own progress
        quiet = trigger in ("backfill", "import") and report.ok
        logger.log("DEBUG" if quiet else "INFO", "chain ({}): {}", trigger, report.summary())
    return report


async def _maintain(db: Database, trigger: str, now_ms: int) -> None:
    """Partitions ahead and bronze retention: once per run, recorded, never fatal."""
    from klined.jobs import partitions

    try:
        await ops.run_step(db, "partitions", None, partitions.maintain, now_ms, trigger=trigger)
    except anyio.get_cancelled_exc_class():
        raise
    except Exception as exc:
        logger.warning("partition upkeep failed (will retry next run): {}", exc)


# ---------------------------------------------------------------------------------------------
# the scheduler inside ``klined run``


class ChainScheduler:
    """Runs the chain from the cron schedule (UTC), once at start for catch-up.

    Start it in the daemon's task group (``await tg.start(scheduler.run)``). It never runs two
    chains at once in this process, never lets a chain error take the daemon down, and keeps
    ``status`` (the daemon's :class:`~klined.status.ChainStatus`) current: ``running``,
    ``current_hour_ms``, ``current_step``, ``last_run_ms``, ``last_result``, ``next_run_ms``.
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
        lock_wait_s: float = 120.0,
    ) -> None:
        self.db = db
        self.cfg = cfg
        self.lake = lake
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

    @property
    def next_run_ms(self) -> int | None:
        return self.status.next_run_ms

    @property
    def current_step(self) -> str:
        return self.status.current_step

    @property
    def running(self) -> bool:
        return self._busy.locked()

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Catch up now, then run at every cron time until cancelled."""
        self.status.next_run_ms = self.clock_ms()
        task_status.started()
        await self.run_once("catchup")
        while True:
            nxt = next_cron_ms(self.schedule, self.clock_ms())
            self.status.next_run_ms = nxt
            await self._sleep_until(nxt)
            await self.run_once("schedule")

    async def _sleep_until(self, target_ms: int) -> None:
        # short naps, re-reading the wall clock, so a suspended machine or a clock step does
        # not make us miss (or double) a run
        while True:
            delay = (target_ms - self.clock_ms()) / 1000
            if delay <= 0:
                return
            await anyio.sleep(min(delay, 30.0))

    async def run_once(self, trigger: str = "manual") -> ChainReport | None:
        """One chain run over :func:`select_hours`; ``None`` if one is already running here."""
        if self._busy.locked():
            logger.info("chain ({}) not started: a run is already in progress", trigger)
            return None
        async with self._busy:
            self.runs += 1
            try:
                now = self.clock_ms()
                hours = await select_hours(self.db, self.cfg, now)
                report = await run_chain(
                    self.db, self.cfg, hours, trigger=trigger, lake=self.lake,
                    clients=self.clients, status=self.status, lock_wait_s=self.lock_wait_s,
                    seal_hour=self.seal_hour, now_ms=now,
                )  # fmt: skip
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:
                logger.opt(exception=exc).error("chain ({}) failed: {}", trigger, exc)
                self.status.last_run_ms = self.clock_ms()
                self.status.last_result = f"error: {type(exc).__name__}: {exc}"[:300]
                return None
            self.last_report = report
            return report
