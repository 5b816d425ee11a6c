"""The hourly chain: flush -> bronze -> gapfill -> silver -> gold -> completeness, per hour,
then publish once per run.

:func:`run_chain` runs the steps for a list of hours, taking the chain lock
(:mod:`klined.jobs.lock`) for one hour at a time, so another chain (the daemon's, a by-hand
``klined chain``, a backfill's merges) never waits behind more than one hour of this one.
Each step is recorded in ``ops.job_runs``; a failing step stops its hour (later hours still
run) and the hour is picked again by the next run, because it is still dirty or was never
completed. A gap-fill whose requests failed is ``incomplete``: its hour goes on (silver, gold
and completeness from what there is), the report says so, and ``klined chain`` exits 1.
:mod:`klined.jobs.scheduler` decides which hours the daemon runs and when; ``klined chain``
runs them by hand (:mod:`klined.commands.chain`).

What a run returns (:class:`ChainReport`, its hours' and steps' outcomes) and the step names
are :mod:`klined.jobs.chain_report`.

Idempotent by construction: every step is (see each step module), and a dirty mark is only
cleared when the hour's silver, gold and completeness succeeded after the mark was made.

``publish`` (:mod:`klined.datasets.publish`) is not tied to an hour: after the run's hours it
writes every day whose silver or gold changed (queued by gold) as Parquet datasets, once, so a
run that catches up on 24 hours of one day writes that day once, not 24 times. It runs even
when an hour failed (what did change is published; the rest stays queued) and is recorded in
``ops.job_runs`` without an hour. ``publish.enabled = false`` turns it off.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import anyio
import asyncpg
from loguru import logger

from klined.config import Config
from klined.errors import ChainError, DatabaseError, describe_error, underlying
from klined.jobs import ops
from klined.jobs.chain_report import (
    MERGE_STEPS,
    RUN_STEPS,
    STEPS,
    ChainReport,
    HourOutcome,
    StepOutcome,
)
from klined.jobs.fetcher import REQUEST_FAILED
from klined.jobs.lock import ChainBusy, ChainLock, chain_lock, describe
from klined.model import HOUR_MS, floor_hour, iso, to_datetime
from klined.rest.client import RestClient
from klined.status import ChainStatus
from klined.warehouse.database import Database

__all__ = [
    "ChainBusy",
    "chain_lock",
    "run_chain",
]


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
        if (
            hour < retry_from
            and await self._gapfilled_before(hour)
            and not await ops.has_lake_drops(self.db, hour)
        ):
            run.skip("outside chain.rest_retry_hours (use klined backfill for older hours)")
            return None
        from klined.jobs.gapfill import fill_hour

        clients = self.clients
        if self.exchange is not None:
            clients = {k: v for k, v in clients.items() if k == self.exchange}
        result = await fill_hour(
            self.db, self.cfg, hour, clients, now_ms=self.now_ms, lake=self.lake
        )
        step = result.step_result(hour)
        failed = {
            why: n for why, n in step.details["missing_reasons"].items() if why in REQUEST_FAILED
        }
        if failed:
            reasons = ", ".join(f"{why} ({n:,})" for why, n in sorted(failed.items()))
            run.incomplete(
                f"{sum(failed.values()):,} minutes left missing, requests failed: {reasons}"
            )
        return step

    async def publish(self) -> StepOutcome:
        """The run's publish step, recorded without an hour; never raises (but cancellation)."""
        from klined.datasets.publish import publish

        started = time.monotonic()
        try:
            async with ops.record_step(self.db, "publish", None, trigger=self.trigger) as run:
                report = await publish(self.db, self.cfg)
                run.set_result(
                    ops.StepResult(step="publish", rows=report.rows, details=report.details())
                )
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            logger.error("chain {}: publish failed: {}", self.trigger, error)
            return StepOutcome("publish", "failed", 0, time.monotonic() - started, error[:500])
        return StepOutcome(
            "publish", "ok", run.rows, time.monotonic() - started, "", dict(run.details)
        )

    async def _gapfilled_before(self, hour: int) -> bool:
        row = await self.db.fetchval(
            "SELECT 1 FROM ops.job_runs WHERE hour_start = $1 AND step = 'gapfill'"
            " AND status IN ('ok', 'incomplete') LIMIT 1",
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
                if lost_database(exc):
                    raise
                error = describe_error(exc)
                logger.error("chain {} {}: {} failed: {}", iso(hour), self.trigger, name, error)
                outcome.steps.append(
                    StepOutcome(name, "failed", 0, time.monotonic() - started, error[:500])
                )
                return outcome
            status, note = "ok", ""
            if run.skipped_reason is not None:
                status, note = "skipped", run.skipped_reason
            elif run.incomplete_reason is not None:
                status, note = "incomplete", run.incomplete_reason
                logger.warning(
                    "chain {} {}: {} incomplete: {}", iso(hour), self.trigger, name, note
                )
            outcome.steps.append(
                StepOutcome(
                    name, status, run.rows, time.monotonic() - started, note, dict(run.details)
                )
            )
        if dirty and all(s in steps for s in MERGE_STEPS):
            for d in dirty:
                await ops.clear_dirty_hour(self.db, d)
        if "silver" in steps:
            await ops.settle_lake_drops(self.db, hour)
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
    on_wait: Callable[[str], None] | None = None,
    publish_status: bool = True,
    on_hour: Callable[[HourOutcome], None] | None = None,
) -> ChainReport:
    """Run ``steps`` for every hour in ``hours``, in the order given, one hour per lock hold.

    ``lake``: a :class:`klined.lake.LakeUploader` (flush + bronze) or
    :class:`klined.lake.LakeStore` (bronze only); ``clients``: REST clients by exchange (for
    gapfill); ``exchange`` limits every step to one exchange; ``status`` is updated in place
    for the daemon's status feed (with ``publish_status``, its last run and result at the end).
    ``publish`` in ``steps`` (and ``publish.enabled``) runs the publish step once, after the
    hours, under its own hold of the lock.
    Each hour waits up to ``lock_wait_s`` for the lock (``on_wait(holder)`` is told whom it
    waits for); when it does not come free the report says ``skipped`` and lists the hours
    not run. Cancellation stops the current step (recorded ``failed: cancelled``) and
    releases the lock. ``on_hour`` is called with each hour's outcome as soon as it is done
    (progress lines).
    """
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ChainError(f"unknown step(s) {unknown}; steps are {', '.join(STEPS)}")
    ordered = [s for s in STEPS if s in steps and s not in RUN_STEPS]
    run_publish = "publish" in steps and cfg.publish.enabled
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    report = ChainReport(trigger, started_ms=int(time.time() * 1000))
    todo = list(dict.fromkeys(floor_hour(h) for h in hours))
    started = time.monotonic()
    runner = _Runner(
        db, cfg, trigger=trigger, lake=lake, clients=clients, exchange=exchange,
        status=status, seal_hour=seal_hour, now_ms=now,
    )  # fmt: skip

    def waiting(holder: str) -> None:
        if status is not None:
            status.waiting_for = holder
        if on_wait is not None:
            on_wait(holder)

    if status is not None:
        status.running = True
    try:
        async with ChainLock(db, wait_s=lock_wait_s, on_wait=waiting) as lock:
            if not todo and not run_publish:
                # nothing to run: still tidy up after killed chains, if the lock is free
                with contextlib.suppress(ChainBusy):
                    async with lock.hold(describe(trigger)):
                        await _mark_abandoned(db)
            for i, hour in enumerate(todo):
                try:
                    async with lock.hold(describe(trigger, hour)):
                        if status is not None:
                            status.waiting_for = ""
                        if i == 0:
                            # under the lock no other chain runs: a row left running is
                            # abandoned when its process is gone
                            await _mark_abandoned(db)
                            if maintain_partitions:
                                await _maintain(db, trigger, now)
                        if ordered:
                            outcome = await runner.hour(hour, ordered)
                            report.hours.append(outcome)
                            if on_hour is not None:
                                on_hour(outcome)
                except ChainBusy as exc:
                    report.skipped = str(exc)
                    report.not_run = todo[i:]
                    logger.warning(
                        "chain ({}): {} hour(s) not run: {}", trigger, len(report.not_run), exc
                    )
                    break
            if run_publish and not report.not_run:
                try:
                    async with lock.hold(f"{describe(trigger)}: publish"):
                        if status is not None:
                            status.waiting_for = ""
                            status.current_hour_ms = None
                            status.current_step = "publish"
                        if not todo:
                            await _mark_abandoned(db)
                        report.publish = await runner.publish()
                except ChainBusy as exc:
                    # what changed stays queued for the next run's publish
                    report.publish = StepOutcome("publish", "skipped", error=str(exc))
    except Exception as exc:
        if not lost_database(exc):
            raise
        raise DatabaseError(f"lost the connection to PostgreSQL: {describe_error(exc)}") from (
            underlying(exc)
        )
    finally:
        report.duration_s = time.monotonic() - started
        if status is not None:
            status.running = False
            status.waiting_for = ""
            status.current_step = ""
            status.current_hour_ms = None
            if publish_status:
                status.last_run_ms = report.started_ms
                status.last_result = report.summary()
    # a scheduler that does not publish its status logs its own progress
    if (report.hours or report.publish is not None) and publish_status:
        # a backfill's or an import's merges come by the hundred and have their own progress
        quiet = trigger in ("backfill", "import") and report.ok
        logger.log("DEBUG" if quiet else "INFO", "chain ({}): {}", trigger, report.summary())
    return report


def lost_database(exc: BaseException) -> bool:
    """Whether ``exc`` means the database went away (stopped, restarted, unreachable): then
    nothing more can be recorded, and the chain stops with one clear error."""
    cause = underlying(exc)
    return isinstance(
        cause,
        DatabaseError
        | OSError
        | asyncpg.InterfaceError
        | asyncpg.PostgresConnectionError
        | asyncpg.exceptions.OperatorInterventionError,
    )


async def _mark_abandoned(db: Database) -> None:
    """Runs left ``running`` by a gone process become ``abandoned`` (never fatal)."""
    try:
        await ops.mark_abandoned(db)
    except anyio.get_cancelled_exc_class():
        raise
    except Exception as exc:
        if lost_database(exc):
            raise
        logger.warning("could not mark abandoned step runs: {}", exc)


async def _maintain(db: Database, trigger: str, now_ms: int) -> None:
    """Partitions ahead and bronze retention: once per run, recorded, never fatal."""
    from klined.jobs import partitions

    try:
        await ops.run_step(db, "partitions", None, partitions.maintain, now_ms, trigger=trigger)
    except anyio.get_cancelled_exc_class():
        raise
    except Exception as exc:
        if lost_database(exc):
            raise
        logger.warning("partition upkeep failed (will retry next run): {}", exc)
