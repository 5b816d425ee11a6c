"""``klined run``: the daemon. One top-level task group owns every task.

Start-up order (each step is up before the next starts):

1. config validated (exit 2 on errors), logging set up;
2. lake writer (seals parts a crash left open) and uploader (rescans the spool);
3. status socket, metrics endpoint (when ``daemon.metrics_port`` is set);
4. per exchange, concurrently: listing check over REST (bounded; an unreachable exchange is
   streamed with every configured pair and checked again later), then its connections;
5. the hourly chain scheduler, when ``[chain] enabled`` and the chain module is present (it
   needs the database; the daemon runs without one when the chain is disabled);
6. ``READY=1`` to systemd, then watchdog pings from the main loop's 1 Hz tick.

Shutdown on SIGTERM/SIGINT, in order: streams and the scheduler are cancelled (sockets closed,
bounded); every open lake part is sealed (everything buffered reaches the disk) and the sealed
parts are uploaded, both shielded and bounded by ``daemon.shutdown_timeout_s``; then the status
and metrics servers stop and the process exits 0. A second signal skips the upload: the parts
are already sealed on disk and the next start uploads them.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import click
from anyio.abc import TaskStatus
from loguru import logger

from klined.config import Config, load_config
from klined.config_cli import config_option
from klined.errors import KlinedError
from klined.lake import LakeUploader, LakeWriter
from klined.status import ChainStatus, LakeStatus, StatusSnapshot
from klined.streams import ExchangeStreams, StreamSettings, streams_status
from klined.streams.backoff import Backoff
from klined.streams.connection import now_ms

if TYPE_CHECKING:
    from klined.db import Database
    from klined.jobs.chain import ChainReport, ChainScheduler

#: how long stopping the streams may take before the lake is sealed anyway
STREAMS_STOP_S = 5.0
#: a listing check at start tries this often (each try bounded by ``rest_timeout_s``)
LISTING_ATTEMPTS = 3
#: how often the chain follower looks for a finished chain run
FOLLOW_INTERVAL_S = 1.0

__all__ = ["Daemon", "run_command", "run_daemon"]


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


class Daemon:
    """The running daemon: its components, their status, and the start/stop choreography."""

    def __init__(
        self,
        cfg: Config,
        *,
        notifier: Any = None,
        chain_factory: Callable[[Daemon], Awaitable[None]] | None = None,
        uploader_options: dict[str, Any] | None = None,
        handle_signals: bool = True,
    ) -> None:
        """``handle_signals=False`` leaves SIGTERM/SIGINT to the host program (the demo owns
        them for its whole run and calls :meth:`request_stop` / :meth:`force_stop`)."""
        self.cfg = cfg
        self.handle_signals = handle_signals
        self.started_ms = now_ms()
        self._t0 = time.monotonic()
        self.lake_status = LakeStatus()
        self.chain_status = ChainStatus()
        self.uploader = LakeUploader(
            cfg.lake_root, cfg.lake, cfg.s3, status=self.lake_status, **(uploader_options or {})
        )
        self.writer = LakeWriter(
            cfg.lake_root,
            cfg.lake,
            status=self.lake_status,
            on_part_closed=self.uploader.part_closed,
        )
        self.streams: list[ExchangeStreams] = []
        self.notifier = notifier
        self.chain_factory = chain_factory
        self.stop_requested = anyio.Event()
        self.streams_up = anyio.Event()
        self.chain_up = anyio.Event()
        self.ready = anyio.Event()
        self.stopped_streams = anyio.Event()
        self.forced = False
        self._streams_scope = anyio.CancelScope()
        self._chain_scope = anyio.CancelScope()
        self._final_scope: anyio.CancelScope | None = None
        self._process: Any = None
        self.chain_figures = ChainFigures()

    # -- status ----------------------------------------------------------------------------------

    def snapshot(self) -> StatusSnapshot:
        """The status feed's document (status socket, metrics, ``klined status``)."""
        conns, pairs = streams_status(self.streams)
        return StatusSnapshot(
            pid=os.getpid(),
            started_ms=self.started_ms,
            now_ms=now_ms(),
            uptime_s=round(time.monotonic() - self._t0, 3),
            rss_bytes=self._rss(),
            connections=conns,
            pairs=pairs,
            lake=self.lake_status,
            chain=self.chain_status,
        )

    def _rss(self) -> int:
        try:
            if self._process is None:
                import psutil

                self._process = psutil.Process()
            return int(self._process.memory_info().rss)
        except Exception:
            return 0

    # -- running ---------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> int:
        """Run until a stop is requested (signal or :meth:`request_stop`); return the exit code."""
        cfg = self.cfg
        cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cfg.lake_root.mkdir(parents=True, exist_ok=True)
        async with AsyncExitStack() as stack:
            self._build_streams(await self._listing_clients(stack))
            async with anyio.create_task_group() as root:
                if self.handle_signals:
                    root.start_soon(self._watch_signals, name="signals")
                await root.start(self.writer.run)
                await root.start(self.uploader.run)
                await root.start(self._serve_status)
                if cfg.daemon.metrics_port:
                    await root.start(self._serve_metrics)
                root.start_soon(self._run_streams, name="streams")
                root.start_soon(self._run_chain, name="chain")
                root.start_soon(self._tick, name="tick")
                await self._wait_started()
                if not self.stop_requested.is_set():
                    self._announce_ready()
                task_status.started()
                await self.stop_requested.wait()
                await self._shutdown()
                root.cancel_scope.cancel()
        logger.info("klined stopped")
        return 0

    def request_stop(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does)."""
        if not self.stop_requested.is_set():
            logger.info("stopping: closing streams, sealing and uploading the lake")
            self.stop_requested.set()

    def force_stop(self) -> None:
        """Skip what is left of a graceful shutdown's upload (what a second signal does)."""
        self.forced = True
        logger.warning("second signal: skipping the final upload (parts stay sealed on disk)")
        if self._final_scope is not None:
            self._final_scope.cancel()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                logger.info("received {}", signal.Signals(signum).name)
                if not self.stop_requested.is_set():
                    self.request_stop()
                else:
                    self.force_stop()

    async def _wait_started(self) -> None:
        """Streams started and the scheduler started (or given up for now), or a stop."""
        async with anyio.create_task_group() as tg:

            async def both() -> None:
                await self.streams_up.wait()
                await self.chain_up.wait()
                tg.cancel_scope.cancel()

            async def stop() -> None:
                await self.stop_requested.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(both)
            tg.start_soon(stop)

    def _announce_ready(self) -> None:
        conns = sum(len(s.connections) for s in self.streams)
        pairs = sum(len(s.pairs) for s in self.streams)
        logger.info("klined ready: {} connection(s), {} pair(s)", conns, pairs)
        self.ready.set()
        if self.notifier is not None:
            self.notifier.ready(f"streaming {pairs} pairs on {conns} connections")

    async def _shutdown(self) -> None:
        if self.notifier is not None:
            self.notifier.stopping("stopping: sealing and uploading the lake")
        self._streams_scope.cancel()
        self._chain_scope.cancel()
        with anyio.move_on_after(STREAMS_STOP_S, shield=True):
            await self.stopped_streams.wait()
        timeout = self.cfg.daemon.shutdown_timeout_s
        with anyio.CancelScope(shield=True) as scope:
            self._final_scope = scope
            scope.deadline = anyio.current_time() + timeout
            if self.forced:
                scope.cancel()
            await self.writer.aclose()
            if self.uploader.enabled and not self.forced:
                try:
                    report = await self.uploader.upload_pending()
                    logger.info(
                        "final upload: {} part(s) uploaded, {} already there",
                        report.uploaded,
                        report.already_present,
                    )
                except Exception as exc:
                    logger.warning("final upload failed: {}", exc)
        self._final_scope = None
        left = len(self.uploader.pending)
        if left:
            logger.warning("{} sealed part(s) not uploaded yet; the next start uploads them", left)

    # -- components ------------------------------------------------------------------------------

    async def _listing_clients(self, stack: AsyncExitStack) -> dict[str, Any]:
        """One REST client per enabled exchange, sharing the adapter its streams use."""
        import httpx

        from klined.exchanges import adapter_for
        from klined.jobs.ratelimit import shared_limiter
        from klined.jobs.rest import RestClient, RetryPolicy

        clients: dict[str, Any] = {}
        for name, section in self.cfg.exchanges.enabled().items():
            adapter = adapter_for(name, section)
            url = self.cfg.rest_url(name)
            http = await stack.enter_async_context(
                httpx.AsyncClient(
                    timeout=httpx.Timeout(section.rest_timeout_s), headers={"User-Agent": "klined"}
                )
            )
            limiter = shared_limiter(
                name, url, adapter.limits.rest_budget, section.rate_limit_fraction
            )
            clients[name] = RestClient(
                adapter,
                url,
                limiter,
                http,
                timeout_s=section.rest_timeout_s,
                retry=RetryPolicy(attempts=LISTING_ATTEMPTS, initial_s=0.5, max_s=4.0),
            )
        return clients

    def _build_streams(self, clients: dict[str, Any]) -> None:
        for name, section in self.cfg.exchanges.enabled().items():
            client = clients[name]
            adapter = client.adapter
            self.streams.append(
                ExchangeStreams(
                    adapter,
                    self.cfg.ws_url(name),
                    self.cfg.pairs(name),
                    StreamSettings.from_config(section, adapter.limits),
                    self.writer.append,
                    fetch_listing=client.fetch_listing,
                    listing_attempts=1,  # the REST client retries with backoff itself
                )
            )

    async def _serve_status(self, *, task_status: TaskStatus[None]) -> None:
        from klined.status_server import StatusServer

        group = self.cfg.daemon.status_socket_group or None
        server = StatusServer(self.cfg.status_socket, self.snapshot, group=group)
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            task_status.started()

    async def _serve_metrics(self, *, task_status: TaskStatus[None]) -> None:
        from klined.metrics import MetricsServer

        figures = self.chain_figures
        server = MetricsServer(
            self.cfg.daemon.metrics_port,
            self.snapshot,
            chain_steps=lambda: figures.step_seconds,
            completeness=lambda: figures.completeness,
        )
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            task_status.started()

    async def _run_streams(self) -> None:
        """Every exchange's streams; exchanges start concurrently (one's listing check does
        not delay another), and one exchange's failure never stops another."""
        try:
            with self._streams_scope:
                async with anyio.create_task_group() as tg:
                    async with anyio.create_task_group() as starting:
                        for es in self.streams:
                            starting.start_soon(self._start_exchange, tg, es)
                    self.streams_up.set()
        finally:
            self.streams_up.set()
            self.stopped_streams.set()

    async def _start_exchange(self, tg: anyio.abc.TaskGroup, es: ExchangeStreams) -> None:
        await tg.start(self._supervise_exchange, es, name=f"exchange {es.name}")

    async def _supervise_exchange(
        self, es: ExchangeStreams, *, task_status: TaskStatus[None]
    ) -> None:
        """``es.run`` catches every connection's failures; should a bug still escape it, the
        exchange is restarted (slowly) rather than taking the other exchanges down."""
        backoff = Backoff(1.0, 60.0)
        while True:
            try:
                status = anyio.TASK_STATUS_IGNORED if es.started else task_status
                await es.run(task_status=status)
                return
            except anyio.get_cancelled_exc_class():
                raise
            except Exception:
                logger.exception("{}: stream supervisor crashed; restarting", es.name)
            if not es.started:
                es.started = True
                task_status.started()
            await anyio.sleep(backoff.next())

    async def _run_chain(self) -> None:
        try:
            with self._chain_scope:
                factory = self.chain_factory or default_chain
                await factory(self)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:
            logger.exception("chain scheduler stopped")
        finally:
            self.chain_up.set()

    async def _tick(self) -> None:
        """The main loop's 1 Hz tick: stream rates and staleness, and the systemd watchdog."""
        from klined.systemd import Heartbeat, watchdog_loop

        heartbeat = Heartbeat(max_age_s=30.0)
        async with anyio.create_task_group() as tg:
            if self.notifier is not None:
                tg.start_soon(watchdog_loop, self.notifier, heartbeat)
            last = time.monotonic()
            while True:
                await anyio.sleep(1.0)
                t = time.monotonic()
                for es in self.streams:
                    es.refresh(t - last)
                last = t
                heartbeat.beat()


# ---------------------------------------------------------------------------------------------
# the chain plug-in


async def default_chain(daemon: Daemon) -> None:
    """Run the hourly chain scheduler when it is enabled and installed; needs the database.

    A database that cannot be opened is retried with backoff; capture goes on meanwhile (the
    lake is the source of truth and the chain catches up on missed hours when it starts).
    """
    cfg = daemon.cfg
    if not cfg.chain.enabled:
        logger.info("chain disabled ([chain] enabled = false): running without a database")
        daemon.chain_status.last_result = "disabled"
        return
    if importlib.util.find_spec("klined.jobs.chain") is None:
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
    from klined.db import open_database, set_pair_listing
    from klined.jobs.chain import ChainScheduler
    from klined.jobs.gapfill import sync_configured_pairs
    from klined.jobs.rest import open_clients

    cfg = daemon.cfg
    async with open_database(cfg, apply_schema=True) as db, open_clients(cfg) as clients:
        await sync_configured_pairs(db, cfg)
        for es in daemon.streams:
            if es.listing_checked:
                for pair in es.pairs:
                    note = es.unlisted.get(pair, "")
                    await set_pair_listing(db, es.name, pair, not note, note)
        scheduler = ChainScheduler(
            db,
            cfg,
            lake=daemon.uploader,
            clients=clients,
            status=daemon.chain_status,
            seal_hour=daemon.writer.seal_hour,
        )

        async def run() -> None:
            async with anyio.create_task_group() as tg:
                await tg.start(scheduler.run)
                tg.start_soon(_follow_chain, daemon, db, scheduler, name="chain follower")
                daemon.chain_up.set()

        yield run


async def _follow_chain(daemon: Daemon, db: Database, scheduler: ChainScheduler) -> None:
    """After each chain run, refresh the figures the metrics endpoint serves. A database
    hiccup is logged once and retried every second until it works; it never stops the
    scheduler."""
    status = daemon.chain_status
    seen: int | None = None
    failing = False
    while True:
        await anyio.sleep(FOLLOW_INTERVAL_S)
        if status.running or status.last_run_ms is None or status.last_run_ms == seen:
            continue
        try:
            daemon.chain_figures.note_report(scheduler.last_report)
            with anyio.fail_after(30):
                await daemon.chain_figures.refresh_completeness(db, daemon.cfg, now_ms())
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            if not failing:
                logger.warning("cannot refresh the completeness figures: {}", exc)
            failing = True
            continue
        seen = status.last_run_ms
        failing = False


# ---------------------------------------------------------------------------------------------
# entry points


def tune_process() -> None:
    """Process-wide settings for the daemon.

    The GIL switch interval drops from 5 ms to 1 ms: the lake writer's flush thread makes
    thousands of short syscalls (one write and fdatasync per open part), and under a busy event
    loop each of them waited up to a full interval for the GIL, so a flush of 2,000 parts took
    seconds and buffered events piled up in memory.
    """
    sys.setswitchinterval(0.001)


async def run_daemon(cfg: Config, *, notifier: Any = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; return the exit code."""
    return await Daemon(cfg, notifier=notifier).run()


def _klined_error(exc: BaseException) -> KlinedError | None:
    """The first :class:`KlinedError` inside a (nested) exception group."""
    if isinstance(exc, KlinedError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _klined_error(inner)
            if found is not None:
                return found
    return None


@click.command("run")
@config_option
def run_command(config_path: str | None) -> int:
    """Run the daemon: streams, lake, status, hourly chain (until SIGTERM/SIGINT)."""
    from klined.logs import setup_config_logging
    from klined.systemd import Notifier

    cfg = load_config(config_path)  # ConfigError: the CLI prints it and exits 2
    setup_config_logging(cfg.daemon)
    notifier = Notifier.from_env()
    tune_process()
    pairs = {name: [str(p) for p in cfg.pairs(name)] for name in cfg.exchanges.enabled()}
    logger.info(
        "klined starting (config {}): {}",
        cfg.source_path or "<defaults>",
        ", ".join(f"{k} {len(v)} pairs" for k, v in pairs.items()) or "no exchange enabled",
    )
    try:
        return anyio.run(functools.partial(run_daemon, cfg, notifier=notifier))
    except BaseException as exc:
        err = _klined_error(exc)
        if err is None:
            raise
        logger.error("klined cannot run: {}", err)
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
