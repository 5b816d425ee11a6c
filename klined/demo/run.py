"""One demo run, start to finish, in one process and one task group.

Order (each step is up before the next; everything is undone in reverse on every exit path):

1. the simulator on free loopback ports, then ``<dir>/klined.toml`` pointing at it;
2. the S3 bucket (created when missing on an explicit ``--s3-endpoint``);
3. the embedded PostgreSQL under ``<dir>/pgdata``, schema applied (started under a shield,
   so a Ctrl-C during its start-up still ends with it stopped; ``open_database`` first
   forgets processes a ``kill -9`` left in its handle list, so this run stops it at the end);
4. the last hours seeded by a backfill at the simulator's scaled rate limits, then the full
   chain for those hours (so silver, gold and completeness have data at once, and the daemon's
   catch-up finds nothing left to do);
5. the daemon (streams, lake, uploads, status socket, hourly chain), connected to the same
   PostgreSQL by DSN so only the demo ever starts or stops the embedded server;
6. the dashboard (in this process, on this event loop) or, headless, a timed wait; meanwhile
   each closed minute is logged as the live path put it into silver and gold;
7. stop: the daemon seals and uploads every part, the summary is collected, PostgreSQL
   stops, the simulator stops.

The demo owns SIGINT, SIGTERM and SIGHUP for the whole run: the first one stops everything in
that order, a second one skips the daemon's final upload (parts stay sealed on disk). The
dashboard runs with ``TEXTUAL_ALLOW_SIGNALS`` so Ctrl-C reaches the same handler.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import click
import msgspec
from loguru import logger

from klined.config import Config, load_config
from klined.daemon.process import Daemon
from klined.demo.live import live_line
from klined.demo.prepare import (
    SIM_RATE_SCALE,
    DemoError,
    DemoOptions,
    ensure_bucket,
    seeded_hours,
    sim_config,
    write_config,
)
from klined.demo.summary import (
    LakeLine,
    Summary,
    completeness_lines,
    datasets_line,
    gold_rows,
    stream_lines,
)
from klined.model import HOUR_MS, iso
from klined.sim import Simulator, run_simulator
from klined.status import StreamState

#: Lines of ``<dir>/demo.log`` (the log while and after the dashboard is shown).
LOG_FILE_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS!UTC}Z {level: <7} {name} {message}"


class _Discard(io.StringIO):
    """A text stream that keeps nothing (the terminal belongs to the dashboard)."""

    def write(self, text: str) -> int:
        return len(text)


def with_dsn(cfg: Config, dsn: str) -> Config:
    """The same config, connecting to an already running PostgreSQL by DSN."""
    return msgspec.structs.replace(cfg, database=msgspec.structs.replace(cfg.database, dsn=dsn))


def local_parts(root: Path) -> dict[str, bool]:
    """Sealed local parts: key -> whether a verified upload marker sits next to it."""
    from klined.lake import UPLOADED_SUFFIX, iter_local_parts

    if not root.is_dir():
        return {}
    return {
        part.key: part.path.with_name(part.path.name + UPLOADED_SUFFIX).exists()
        for part in iter_local_parts(root)
    }


def _plain(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups (cancellations are not)."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if isinstance(inner, Exception):
                return _plain(inner)
    return exc


class Demo:
    """The run: its steps, the stop request, and what the summary needs."""

    def __init__(self, options: DemoOptions, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.step = "starting"
        self.stop = anyio.Event()
        self.signals = 0
        self.daemon: Daemon | None = None
        self.app: Any = None
        self._setup_scope: anyio.CancelScope | None = None
        self.connected: set[str] = set()
        self.daemon_span = (0, 0)  # wall ms the daemon started and stopped
        self.interrupted = False
        self._log_file_handler: int | None = None

    # -- stopping -------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop whatever is running now; everything started so far is then undone in order."""
        if self.stop.is_set():
            return
        self.stop.set()
        if self._setup_scope is not None:
            self._setup_scope.cancel()
        if self.daemon is not None:
            self.daemon.request_stop()
        if self.app is not None:
            self.app.exit()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                self.signals += 1
                name = signal.Signals(signum).name
                if self.signals == 1:
                    self.interrupted = True
                    logger.info("{}: stopping the demo (daemon, PostgreSQL, simulator)", name)
                    self.request_stop()
                else:
                    logger.warning(
                        "{} again: skipping the final upload; PostgreSQL is still stopped cleanly",
                        name,
                    )
                    if self.daemon is not None:
                        self.daemon.force_stop()

    # -- the run --------------------------------------------------------------------------------

    async def main(self) -> Summary | None:
        """Run the demo; the summary (None when stopped before the daemon ran)."""
        result: Summary | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_signals, name="signals")
            try:
                result = await self._run()
            finally:
                tg.cancel_scope.cancel()
                if self._log_file_handler is not None:
                    logger.remove(self._log_file_handler)
        return result

    async def _run(self) -> Summary | None:
        opts = self.options
        async with AsyncExitStack() as stack:
            self.step = "starting the exchange simulator"
            sim = await stack.enter_async_context(run_simulator(sim_config(opts)))
            config_path = write_config(self.workdir, sim, opts)
            cfg = load_config(config_path)
            self._announce(sim, config_path)

            if opts.s3 is not None and not self.stop.is_set():
                self.step = f"checking the S3 bucket {opts.s3.describe()}"
                with self._setup() as scope:
                    await ensure_bucket(opts.s3)
                if scope.cancel_called:
                    return None

            if self.stop.is_set():
                return None
            self.step = f"starting the embedded PostgreSQL under {cfg.data_dir / 'pgdata'}"
            from klined.warehouse.database import open_database

            with anyio.CancelScope(shield=True):
                db = await stack.enter_async_context(open_database(cfg, apply_schema=True))
            run_cfg = with_dsn(cfg, db.dsn)

            hours = seeded_hours(int(time.time() * 1000), opts.seed_hours)
            if self.stop.is_set():
                return None
            self.step = f"seeding {len(hours)} hour(s) with a backfill"
            with self._setup() as scope:
                await seed(db, run_cfg, sim, hours)
            if scope.cancel_called:
                return None

            self.step = "running the daemon"
            before = set(await anyio.to_thread.run_sync(local_parts, cfg.lake_root))
            started = time.monotonic()
            self.daemon_span = (int(time.time() * 1000), 0)
            daemon = await self._run_daemon(run_cfg, config_path, db)
            self.daemon_span = (self.daemon_span[0], int(time.time() * 1000))
            ran_s = time.monotonic() - started

            self.step = "collecting the summary"
            return await self._summary(db, run_cfg, daemon, hours, before, ran_s)
        return None  # pragma: no cover - mypy: the stack never swallows exceptions

    def _setup(self) -> anyio.CancelScope:
        """A scope a stop request cancels (set-up steps that may take a while)."""
        scope = anyio.CancelScope()
        self._setup_scope = scope
        if self.stop.is_set():
            scope.cancel()
        return scope

    def _announce(self, sim: Simulator, config_path: Path) -> None:
        opts = self.options
        kept = "" if opts.dir else " (temporary: removed at exit; --dir DIR keeps state)"
        lines = [
            f"klined demo: working directory {self.workdir}{kept}",
            f"  simulator: binance {sim.binance_rest_url}  kraken {sim.kraken_rest_url}",
            f"             seed {opts.seed}, {len(opts.pair_names)} pairs per exchange, faults on",
            f"  config:    {config_path}",
            "  while the demo runs, from another terminal:",
            f"    klined status -c {config_path}",
            f"    klined tui -c {config_path}",
            f"    klined tail -c {config_path}     (each candle as it is committed)",
        ]
        if not opts.headless:
            lines.append(f"  logs while the dashboard is open: {self.workdir / 'demo.log'}")
            lines.append("  Ctrl-C or q stops everything.")
        click.echo("\n".join(lines), err=True)

    async def _run_daemon(self, run_cfg: Config, config_path: Path, db: Any) -> Daemon:
        """The daemon until the duration is over, the dashboard is closed, or a signal. Each
        closed minute is logged as it stands in silver and gold (to the terminal headless, to
        ``demo.log`` behind the dashboard)."""
        # no signal handling of its own: the demo owns the signals for the whole run (set-up,
        # daemon, shutdown), so one Ctrl-C stops everything in order
        daemon = Daemon(run_cfg, handle_signals=False, simulated=True)
        self.daemon = daemon
        error: BaseException | None = None
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            watcher = anyio.CancelScope()
            reporter = anyio.CancelScope()

            async def watch() -> None:
                with watcher:
                    while True:
                        self._note_connected(daemon)
                        await anyio.sleep(0.5)

            tg.start_soon(watch, name="demo watcher")
            tg.start_soon(self._watch_live, daemon, db, run_cfg, reporter, name="demo live")
            try:
                if not self.stop.is_set():
                    if self.options.headless:
                        logger.info("demo running headless for {:.0f} s", self.options.duration_s)
                        with anyio.move_on_after(self.options.duration_s):
                            await self.stop.wait()
                    else:
                        await self._run_tui(run_cfg, config_path)
            except Exception as exc:
                # not raised here: that would cancel the daemon instead of stopping it
                error = exc
            finally:
                self._note_connected(daemon)
                watcher.cancel()
                reporter.cancel()
                daemon.request_stop()
        if error is not None:
            raise error
        return daemon

    async def _watch_live(
        self, daemon: Daemon, db: Any, run_cfg: Config, scope: anyio.CancelScope
    ) -> None:
        from klined.demo.live import watch_live

        with scope:
            await watch_live(daemon, db, _pairs(run_cfg))

    def _note_connected(self, daemon: Daemon) -> None:
        for conn in daemon.snapshot().connections:
            if conn.state == StreamState.CONNECTED:
                self.connected.add(conn.exchange)

    async def _run_tui(self, run_cfg: Config, config_path: Path) -> None:
        """The dashboard in this process; logs go to a file meanwhile (they would draw over it)."""
        from klined.logs import setup_logging
        from klined.tui.app import build_app

        # Ctrl-C stays a signal (the demo's handler stops everything), not a key
        os.environ.setdefault("TEXTUAL_ALLOW_SIGNALS", "1")
        level = self.options.log_level
        # from here to the end, every log line goes to <dir>/demo.log; the terminal gets
        # nothing while the dashboard is drawn, then warnings only (the summary follows)
        log_path = self.workdir / "demo.log"
        self._log_file_handler = logger.add(
            str(log_path),
            level=level,
            format=LOG_FILE_FORMAT,
            colorize=False,
            backtrace=False,
            diagnose=False,
        )
        setup_logging(level, False, stream=_Discard())
        try:
            app = build_app(run_cfg, str(config_path), refresh=1.0)
            app.title = "klined demo"
            self.app = app
            if not self.stop.is_set():
                await app.run_async()
        finally:
            self.app = None
            setup_logging("WARNING", None)
        click.echo(
            f"stopping: daemon (sealing and uploading parts), PostgreSQL, simulator "
            f"(log: {log_path})",
            err=True,
        )
        self.request_stop()  # quitting the dashboard ends the demo

    async def _summary(
        self,
        db: Any,
        run_cfg: Config,
        daemon: Daemon,
        hours: list[int],
        parts_before: set[str],
        ran_s: float,
    ) -> Summary:
        opts = self.options
        exchanges = list(run_cfg.exchanges.enabled())
        pairs = _pairs(run_cfg)
        summary = Summary(self.workdir, ran_s, opts.seed, len(opts.pair_names), hours)
        summary.temporary = opts.dir is None
        summary.streams = stream_lines(daemon.snapshot(), exchanges, self.connected)
        after = await anyio.to_thread.run_sync(local_parts, run_cfg.lake_root)
        new = {key: uploaded for key, uploaded in after.items() if key not in parts_before}
        lake = LakeLine(
            parts_written=len(new),
            parts_uploaded=sum(new.values()),
            parts_pending=len(daemon.uploader.pending),
            root=str(run_cfg.lake_root),
        )
        if opts.s3 is not None:
            lake.s3 = opts.s3.describe()
            try:
                lake.s3_objects = await count_s3_objects(run_cfg)
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:
                lake.s3_error = str(exc)[:200]
        summary.lake = lake
        try:
            summary.live = await live_line(db, daemon, pairs, *self.daemon_span)
            summary.completeness = await completeness_lines(db, hours, pairs)
            summary.gold = await gold_rows(db, hours, pairs)
            summary.datasets = await datasets_line(db, str(run_cfg.lake_root / "datasets"))
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            summary.problems.append(f"reading completeness failed: {exc}")
        return summary


def _pairs(cfg: Config) -> dict[str, list[str]]:
    return {ex: [str(p) for p in cfg.pairs(ex)] for ex in cfg.exchanges.enabled()}


async def count_s3_objects(cfg: Config, timeout_s: float = 30.0) -> int:
    """Objects under the lake layout in the configured bucket/prefix."""
    from klined.lake import LakeStore, parse_key
    from klined.lake.layout import strip_prefix

    store = LakeStore(cfg.lake_root, cfg.s3, op_timeout_s=timeout_s)
    count = 0
    with anyio.fail_after(timeout_s):
        async with store.client() as s3:
            paginator = s3.get_paginator("list_objects_v2")
            prefix = f"{cfg.s3.prefix}/" if cfg.s3.prefix else ""
            async for page in paginator.paginate(Bucket=cfg.s3.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    key = strip_prefix(cfg.s3.prefix, obj["Key"])
                    try:
                        parse_key(key or "")
                    except ValueError:
                        continue
                    count += 1
    return count


# ---------------------------------------------------------------------------------------------
# seeding


async def seed(db: Any, cfg: Config, sim: Simulator, hours: list[int]) -> None:
    """Backfill ``hours`` at the simulator's scaled limits, then run the whole chain for them."""
    from klined.exchanges import get_adapter
    from klined.exchanges.base import RestBudget
    from klined.jobs.backfill import resolve_request, run_backfill
    from klined.jobs.chain import run_chain
    from klined.jobs.gapfill import sync_configured_pairs
    from klined.jobs.progress import summary_table
    from klined.lake import LakeUploader
    from klined.rest.client import RetryPolicy, open_clients
    from klined.rest.ratelimit import RateLimiter, make_budget

    await sync_configured_pairs(db, cfg)
    limiters = {}
    for ex in cfg.exchanges.enabled():
        real = get_adapter(ex).limits.rest_budget
        scaled = RestBudget(
            real.kind, real.capacity * SIM_RATE_SCALE, real.window_s, real.decay_per_s
        )
        limiters[ex] = RateLimiter(ex, make_budget(scaled, 0.8))
    now = int(time.time() * 1000)
    start, end = hours[0], hours[-1] + HOUR_MS
    request = resolve_request(cfg, iso(start), iso(end), now_ms=now)
    logger.info(
        "seeding {} .. {} ({} h) with a backfill: {}",
        iso(start),
        iso(end),
        len(hours),
        ", ".join(f"{ex} {len(ps)} pairs" for ex, ps in request.pairs.items()),
    )
    retry = RetryPolicy(attempts=6, initial_s=0.2, max_s=2.0)
    async with open_clients(cfg, limiters=limiters, retry=retry) as clients:
        result = await run_backfill(db, cfg, clients, request, now_ms=now)
        logger.info(
            "seeded {:,} rows in {:.1f} s ({} hour(s) merged into silver/gold)",
            result.rows,
            result.duration_s,
            sum(len(m.hours) for m in result.merges),
        )
        if not result.ok:
            logger.warning("the seeding backfill left gaps:\n{}", summary_table(result.reports))
        lake = LakeUploader(cfg.lake_root, cfg.lake, cfg.s3)
        report = await run_chain(
            db, cfg, hours, trigger="demo", lake=lake, clients=clients, lock_wait_s=60.0,
            now_ms=now,
        )  # fmt: skip
        if report.skipped:
            raise DemoError(f"the chain did not run: {report.skipped}")
        if not report.ok:
            logger.warning("the chain failed for some seeded hours:\n{}", report.table())


def run(options: DemoOptions, workdir: Path) -> tuple[int, Summary | None, Demo]:
    """Run the demo to the end; (exit code, summary, the run). Errors print one plain line."""
    demo = Demo(options, workdir)
    try:
        summary = anyio.run(demo.main)
    except KeyboardInterrupt:  # pragma: no cover - the demo handles SIGINT itself
        return 130, None, demo
    except BaseException as exc:
        err = _plain(exc)
        if not isinstance(err, Exception):
            raise
        from klined.errors import ConfigError, KlinedError, UsageError

        if isinstance(err, ConfigError | UsageError):
            raise err from None
        if demo.interrupted:
            # Ctrl-C reaches the whole process group: a tool still starting (initdb, pg_ctl)
            # fails with it; that is the interruption, not a separate failure
            click.echo(f"demo stopped while {demo.step} ({err})", err=True)
            return (1 if options.headless else 0), None, demo
        if not isinstance(err, KlinedError):  # a bug: the traceback helps its report
            logger.opt(exception=err).error("unexpected error while {}", demo.step)
        click.echo(f"error: {demo.step} failed: {err}", err=True)
        sys.stderr.flush()
        return 1, None, demo
    if summary is None:
        click.echo(f"demo stopped while {demo.step}; everything it started is stopped", err=True)
        return (1 if options.headless else 0), None, demo
    click.echo(summary.render())
    if options.headless:
        return (0 if summary.ok else 1), summary, demo
    return 0, summary, demo
