"""The hourly chain inside ``klined run``: the scheduler plug-in and what follows its runs.

:func:`default_chain` opens the database, records when this daemon began capturing (the
pairs' coverage, :mod:`klined.warehouse.coverage`) and runs
:class:`~klined.jobs.scheduler.ChainScheduler` and, with ``[live] enabled``, the live writer's
committer (:mod:`klined.live`, the same database); next to them, :func:`_follow_chain` keeps
three things current without ever querying the database per request: the figures the metrics
endpoint serves (:class:`ChainFigures`, refreshed after each chain run), the listing results
in ``ops.pairs`` (:class:`ListingSync`: written when the chain starts and again whenever a
stream's background listing re-check changes them), and a pending completeness row for every
hour that closes, even while the chain is busy elsewhere.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING

import anyio
from loguru import logger

from klined.config import Config
from klined.streams.backoff import Backoff
from klined.streams.connection import now_ms

if TYPE_CHECKING:
    from klined.daemon.process import Daemon
    from klined.jobs.chain_report import ChainReport
    from klined.jobs.scheduler import ChainScheduler
    from klined.status import ChainStatus
    from klined.streams import ExchangeStreams
    from klined.warehouse.database import Database

#: how often the follower looks for a finished chain run and a changed listing
FOLLOW_INTERVAL_S = 1.0

__all__ = ["ChainFigures", "ListingSync", "default_chain"]


class ChainFigures:
    """The chain's figures on the metrics endpoint, cached so that a scrape never queries the
    database: the seconds each step took in the last chain run that processed hours (summed
    over its hours), and the completion ratio per exchange of the last closed hour
    (``monitoring.exchange_hourly_completeness``), refreshed after each chain run."""

    def __init__(self) -> None:
        self.step_seconds: dict[str, float] = {}
        self.completeness: dict[str, float] = {}
        self.completeness_hour_ms: int | None = None

    def note_report(self, report: ChainReport | None) -> None:
        if report is None or not report.hours:
            return  # an empty or skipped run says nothing about the steps
        totals: dict[str, float] = {}
        for hour in report.hours:
            for step in hour.steps:
                totals[step.step] = totals.get(step.step, 0.0) + step.duration_s
        if report.publish is not None:
            totals["publish"] = report.publish.duration_s
        self.step_seconds = totals

    async def refresh_completeness(self, db: Database, cfg: Config, now: int) -> None:
        """Completion ratios of the last hour the chain considers closed (its end plus the
        lake's grace period is past); an exchange without figures for it is left out."""
        from klined.model import HOUR_MS, floor_hour, to_datetime

        hour = floor_hour(now - int(cfg.lake.hour_grace_s * 1000)) - HOUR_MS
        rows = await db.fetch(
            "SELECT exchange, completion_rate FROM monitoring.exchange_hourly_completeness"
            " WHERE hour_start = $1 AND completion_rate IS NOT NULL",
            to_datetime(hour),
        )
        enabled = cfg.exchanges.enabled()
        self.completeness = {
            r["exchange"]: float(r["completion_rate"]) for r in rows if r["exchange"] in enabled
        }
        self.completeness_hour_ms = hour


class ListingSync:
    """Writes each exchange's listing check to ``ops.pairs`` (``listed``, ``note``) once per
    change: at start, and again when a re-check in the background (the exchange's REST API was
    down at start) finds pairs unlisted, so completeness stops expecting them."""

    def __init__(self) -> None:
        self.written: dict[str, tuple[tuple[str, str], ...]] = {}

    @staticmethod
    def state(es: ExchangeStreams) -> tuple[tuple[str, str], ...] | None:
        """``(pair, note)`` per configured pair (note empty: listed); None before any check."""
        if not es.listing_checked:
            return None
        return tuple((str(p), es.unlisted.get(p, "")) for p in es.pairs)

    async def sync(self, db: Database, streams: list[ExchangeStreams]) -> int:
        """Write what changed since the last sync; return the exchanges written."""
        from klined.warehouse.database import set_pair_listing

        written = 0
        for es in streams:
            state = self.state(es)
            if state is None or self.written.get(es.name) == state:
                continue
            for pair in es.pairs:
                note = es.unlisted.get(pair, "")
                await set_pair_listing(db, es.name, pair, not note, note)
            self.written[es.name] = state
            written += 1
        return written


async def default_chain(daemon: Daemon) -> None:
    """Run the hourly chain scheduler when it is enabled and installed; needs the database.

    A database that cannot be opened is retried with backoff; capture goes on meanwhile (the
    lake is the source of truth and the chain catches up on missed hours when it starts).
    """
    cfg = daemon.cfg
    if not cfg.chains and cfg.daemon.role == "capture":
        logger.info("capture role: no chain here (a chain host builds the warehouse)")
        daemon.chain_status.last_result = "capture role: no chain"
        return
    if not cfg.chain.enabled:
        logger.info("chain disabled ([chain] enabled = false): running without a database")
        daemon.chain_status.last_result = "disabled"
        return
    if importlib.util.find_spec("klined.jobs.scheduler") is None:
        logger.warning("chain module not installed: capturing only")
        daemon.chain_status.last_result = "not installed"
        return
    backoff = Backoff(5.0, 300.0)
    while True:
        try:
            async with _chain_scheduler(daemon) as run:
                await run()
            return
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            delay = backoff.next()
            logger.error("chain unavailable ({}); retrying in {:.0f} s", exc, delay)
            daemon.chain_status.last_result = f"error: {exc}"[:300]
            daemon.chain_up.set()  # ready without it: capture does not wait for a database
            await anyio.sleep(delay)


@asynccontextmanager
async def _chain_scheduler(daemon: Daemon) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    from klined.jobs.gapfill import sync_configured_pairs
    from klined.jobs.ops import DroppedRange, record_lake_drops
    from klined.jobs.scheduler import ChainScheduler
    from klined.lake.held import Dropped
    from klined.rest.client import open_clients
    from klined.warehouse.coverage import record_capture_start
    from klined.warehouse.database import open_database

    cfg = daemon.cfg
    what = (
        "connecting to PostgreSQL"
        if cfg.dsn
        else "the embedded PostgreSQL (initdb on a first start)"
    )
    async with AsyncExitStack() as stack:
        with daemon.starting(what):
            db = await stack.enter_async_context(open_database(cfg, apply_schema=True))
        clients = await stack.enter_async_context(open_clients(cfg))
        await sync_configured_pairs(db, cfg)
        # capture began when the daemon did, even if the database came up later
        await record_capture_start(db, daemon.started_ms)
        listings = ListingSync()
        for es in daemon.listings:  # the chain role checks every pair's listing itself
            await es.check_listing()
        await listings.sync(db, daemon.streams + daemon.listings)
        writer = daemon.writer
        scheduler = ChainScheduler(
            db,
            cfg,
            lake=daemon.uploader,
            clients=clients,
            status=daemon.chain_status,
            seal_hour=writer.seal_hour if writer is not None else None,
            clock_ms=daemon.clock_ms,
            **daemon.chain_options,
        )

        async def record(drops: list[Dropped]) -> None:
            await record_lake_drops(
                db,
                [DroppedRange(d.exchange, d.symbol, d.start_ms, d.end_ms, d.events) for d in drops],
            )

        async def run() -> None:
            daemon.record_drops = record
            try:
                await run_scheduler()
            finally:
                daemon.record_drops = None

        async def run_scheduler() -> None:
            async with anyio.create_task_group() as tg:
                if daemon.live is not None:
                    await tg.start(daemon.live.run, db)
                await tg.start(scheduler.run)
                tg.start_soon(_follow_chain, daemon, db, scheduler, listings, name="chain follower")
                daemon.chain_up.set()

        yield run


async def refresh_quarantine(db: Database, status: ChainStatus) -> None:
    """How many lake parts are quarantined, and a few of them, for status and the TUI."""
    from klined.jobs.bronze import quarantined_parts

    parts = await quarantined_parts(db, limit=1000)
    status.quarantined_parts = len(parts)
    status.quarantined_sample = [f"{p['lake_key']}: {p['reason']}" for p in parts[:5]]


async def _follow_chain(
    daemon: Daemon, db: Database, scheduler: ChainScheduler, listings: ListingSync
) -> None:
    """Every second: write changed listing results to ``ops.pairs``; when an hour closes, its
    pending completeness rows (so they appear even while a backfill holds the chain lock);
    after each chain run, refresh the figures the metrics endpoint serves. A database hiccup
    is logged once and retried until it works; it never stops the scheduler."""
    from klined.jobs.completeness import mark_pending
    from klined.jobs.scheduler import closed_end_ms

    status = daemon.chain_status
    seen: int | None = None
    marked: int | None = None
    failing = False
    recheck = Backoff(30.0, 300.0)
    recheck_at = anyio.current_time() + recheck.next()
    while True:
        await anyio.sleep(FOLLOW_INTERVAL_S)
        unchecked = [es for es in daemon.listings if not es.listing_checked]
        if unchecked and anyio.current_time() >= recheck_at:
            for es in unchecked:  # the exchange's REST API did not answer at start
                await es.check_listing(quiet=True)
            recheck_at = anyio.current_time() + recheck.next()
        try:
            with anyio.fail_after(30):
                await listings.sync(db, daemon.streams + daemon.listings)
                closed = closed_end_ms(daemon.cfg, (daemon.clock_ms or now_ms)())
                if closed != marked:
                    await mark_pending(db, closed)
                    marked = closed
                finished = status.last_run_ms
                if not status.running and finished is not None and finished != seen:
                    daemon.chain_figures.note_report(scheduler.last_report)
                    await daemon.chain_figures.refresh_completeness(db, daemon.cfg, now_ms())
                    await refresh_quarantine(db, status)
                    seen = finished
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            if not failing:
                logger.warning("chain follower: database unavailable ({}); retrying", exc)
            failing = True
            continue
        if failing:
            logger.info("chain follower: database available again")
        failing = False
