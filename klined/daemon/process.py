"""The daemon (``klined run``): one top-level task group owns every task.

Start-up order (each step is up before the next starts):

1. config validated (exit 2 on errors), logging set up;
2. lake writer (seals parts a crash left open; not on a chain host) and uploader (rescans the
   spool);
3. status socket, metrics endpoint (when ``daemon.metrics_port`` is set);
4. per exchange, concurrently: the listing check over REST starts, and its connections start
   when it answers or after a few seconds at most (a 429 or an unreachable REST API never
   delays capture), with this host's shard (``daemon.shard``) of the configured pairs minus
   those the last known listing (cached in ``data_dir``) says are not listed; the check goes on
   in the background; a chain host (``daemon.role = "chain"``) streams nothing and checks
   every pair's listing when its chain starts;
5. the hourly chain scheduler, when ``[chain] enabled``, the role is not ``capture`` and the
   chain module is present (it needs the database; the daemon runs without one when the chain
   is disabled); see :mod:`klined.daemon.chain` (listing results and metrics figures follow
   its runs). With ``[live] enabled`` (and role ``all``) the streams' finals also go to the
   live writer (:mod:`klined.live`): it batches them from the start and writes them into
   silver once the chain's database is open;
6. ``READY=1`` to systemd, then watchdog pings from the main loop's 1 Hz tick.

Steps that can be slow on a first start (the embedded PostgreSQL's ``initdb``, the listing
checks) run inside :meth:`Daemon.starting`: while one runs, the daemon asks systemd for more
start time (``EXTEND_TIMEOUT_USEC``, renewed every ``EXTEND_EVERY_S``) and says which step it
waits for (``STATUS=``). Each such step is bounded by its own timeout, so a start that hangs
still fails.

Shutdown on SIGTERM/SIGINT/SIGHUP (the last is what a closing SSH session sends a foreground
``klined run``; the daemon has no configuration to reload, so it stops just as gracefully), in
order: streams and the scheduler are cancelled (sockets closed, bounded; the live writer
writes what it still holds, bounded, once the lake has it); every open lake part is sealed
(everything buffered reaches the disk) and the sealed
parts are uploaded, both shielded and bounded by ``daemon.shutdown_timeout_s``; then the status
and metrics servers stop and the process exits 0. A second signal skips the upload: the parts
are already sealed on disk and the next start uploads them.

A disk that refuses writes at shutdown: the events it never took are uploaded to S3 straight
from memory, as parts of their own; when that is impossible too (no bucket, S3 down, a second
signal) :func:`run_daemon` raises :class:`~klined.errors.EventsLost` naming the pairs and
minutes, and ``klined run`` exits 1 (systemd sees a failure). Minutes dropped past
``lake.max_held_bytes`` while running are recorded as ``lake_dropped`` incidents (the chain
repairs them over REST); any not recorded by the end are named the same way.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from typing import Any

import anyio
from anyio.abc import TaskStatus
from loguru import logger

from klined.config import Config
from klined.daemon.chain import ChainFigures, default_chain
from klined.errors import EventsLost
from klined.lake import LakeUploader, LakeWriter
from klined.lake.held import Dropped, describe_held
from klined.lake.writer import wall_ms
from klined.live import LiveWriter, live_sink
from klined.model import Candle
from klined.status import ChainStatus, LakeStatus, LiveStatus, StatusSnapshot
from klined.streams import ExchangeStreams, StreamSettings, streams_status
from klined.streams.backoff import Backoff
from klined.streams.connection import now_ms
from klined.streams.supervisor import ListingCache

#: how long stopping the streams may take before the lake is sealed anyway
STREAMS_STOP_S = 5.0
#: a listing check at start tries this often (each try bounded by ``rest_timeout_s``)
LISTING_ATTEMPTS = 3
#: while a slow start-up step runs, systemd is asked for this much more start time, this often
EXTEND_START_S = 60.0
EXTEND_EVERY_S = 20.0
#: the signals that stop the daemon gracefully (a second one skips the final upload)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: how often minutes dropped by the lake are recorded (or logged without a database)
DROPS_EVERY_S = 10.0
MINUTE_MS = 60_000

__all__ = ["Daemon", "run_daemon", "tune_process"]


class Daemon:
    """The running daemon: its components, their status, and the start/stop choreography."""

    def __init__(
        self,
        cfg: Config,
        *,
        notifier: Any = None,
        chain_factory: Callable[[Daemon], Awaitable[None]] | None = None,
        uploader_options: dict[str, Any] | None = None,
        stream_options: dict[str, Any] | None = None,
        handle_signals: bool = True,
        simulated: bool = False,
        clock_ms: Callable[[], int] | None = None,
        chain_options: dict[str, Any] | None = None,
    ) -> None:
        """``handle_signals=False`` leaves SIGTERM/SIGINT/SIGHUP to the host program (the demo owns
        them for its whole run and calls :meth:`request_stop` / :meth:`force_stop`).
        ``uploader_options`` / ``stream_options`` tune the uploader / every exchange's
        :class:`ExchangeStreams` (tests shorten their timers). ``simulated``: the exchanges
        are the simulator with injected faults (the demo); the status says so. ``clock_ms``
        replaces the wall clock of the lake writer and the chain scheduler (tests run them on a
        simulator's accelerated clock); ``chain_options`` go to the chain scheduler."""
        self.cfg = cfg
        self.simulated = simulated
        self.role = cfg.daemon.role
        enabled = cfg.exchanges.enabled()
        self._configured_pairs = sum(len(cfg.pairs(e)) for e in enabled)
        self._shard_pairs = sum(len(cfg.capture_pairs(e)) for e in enabled) if cfg.captures else 0
        self.clock_ms = clock_ms
        self.chain_options = dict(chain_options or {})
        self.handle_signals = handle_signals
        self.started_ms = now_ms()
        self._t0 = time.monotonic()
        self.lake_status = LakeStatus()
        self.chain_status = ChainStatus()
        self.uploader = LakeUploader(
            cfg.lake_root, cfg.lake, cfg.s3, status=self.lake_status, **(uploader_options or {})
        )
        # a chain host writes no capture parts (its gap-fill parts are sealed as they are
        # written), so it takes no writer lock and can share a lake folder with a capture host
        self.writer: LakeWriter | None = None
        self.live: LiveWriter | None = None
        if cfg.captures:
            k, n = cfg.shard
            writer = self.writer = LakeWriter(
                cfg.lake_root,
                cfg.lake,
                status=self.lake_status,
                on_part_closed=self.uploader.part_closed,
                writer_tag=f"s{k}of{n}_" if n > 1 else "",
                clock=clock_ms or wall_ms,
            )
            # the live path needs this host's streams and its warehouse: role all only
            if cfg.live.enabled and cfg.chains:
                self.live = LiveWriter(
                    cfg.live,
                    lake_mark=lambda: writer.appended,
                    wait_durable=writer.wait_durable,
                )
        self.streams: list[ExchangeStreams] = []
        #: the chain role's listing check of every configured pair (never streamed)
        self.listings: list[ExchangeStreams] = []
        self.notifier = notifier
        self.chain_factory = chain_factory
        self.stream_options = dict(stream_options or {})
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
        self._starting: list[str] = []
        #: records dropped minutes as incidents (set by the chain plug-in while its database
        #: is open); without it they are logged
        self.record_drops: Callable[[list[Dropped]], Awaitable[None]] | None = None
        self.lost = ""  # what shutdown could neither write nor upload

    # -- status ----------------------------------------------------------------------------------

    def snapshot(self) -> StatusSnapshot:
        """The status feed's document (status socket, metrics, ``klined status``)."""
        conns, pairs = streams_status(self.streams)
        return StatusSnapshot(
            role=self.role,
            shard=self.cfg.daemon.shard,
            shard_pairs=self._shard_pairs,
            configured_pairs=self._configured_pairs,
            pid=os.getpid(),
            started_ms=self.started_ms,
            now_ms=now_ms(),
            uptime_s=round(time.monotonic() - self._t0, 3),
            rss_bytes=self._rss(),
            connections=conns,
            pairs=pairs,
            lake=self.lake_status,
            chain=self.chain_status,
            live=self.live.snapshot() if self.live is not None else LiveStatus(),
            simulated=self.simulated,
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
                if self.writer is not None:
                    await root.start(self.writer.run)
                await root.start(self.uploader.run)
                if self.live is not None:
                    await root.start(self.live.run_batcher)
                elif cfg.live.enabled:
                    logger.info("live path off: it writes into the chain's database ([chain] off)")
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
        if self.lost:
            logger.error("klined stopped; {}", self.lost)
            return 1
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

    @contextmanager
    def starting(self, what: str) -> Iterator[None]:
        """A start-up step that may take long: until the daemon is ready, systemd is asked for
        more start time while it runs, and told what it is."""
        self._starting.append(what)
        self._extend_start()
        try:
            yield
        finally:
            self._starting.remove(what)

    def _extend_start(self) -> None:
        if self.notifier is None or self.ready.is_set() or not self._starting:
            return
        self.notifier.extend_timeout(EXTEND_START_S)
        self.notifier.status("starting: " + "; ".join(self._starting))

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
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
        if self.cfg.captures:
            what = f"streaming {pairs} pairs on {conns} connections"
            k, n = self.cfg.shard
            if n > 1:
                what += f" (shard {k}/{n})"
        else:
            what = "chain host: no streams, loading the lake"
        logger.info("klined ready ({}): {}", self.role, what)
        self.ready.set()
        if self.notifier is not None:
            self.notifier.ready(what)

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
            if self.writer is not None:
                await self.writer.aclose()
            await self._save_held()
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
        await self._settle_drops(final=True)
        left = len(self.uploader.pending)
        if left:
            logger.warning("{} sealed part(s) not uploaded yet; the next start uploads them", left)

    async def _save_held(self) -> None:
        """Events the disk never took: straight to S3 from memory, else named as lost (also
        when the shutdown timeout or a second signal cuts the upload short)."""
        writer = self.writer
        if writer is None:
            return
        held = writer.held_parts()
        if not held:
            return
        size = sum(len(p.data) for p in held)
        events = sum(p.events for p in held)
        why = "no S3 bucket is configured"
        uploaded = False
        try:
            if self.forced:
                why = "a second signal skipped the upload"
            elif self.uploader.enabled:
                why = "the shutdown timeout ran out before S3 took them"
                try:
                    for part in held:
                        await self.uploader.upload_from_memory(part.key, part.data)
                    uploaded = True
                except Exception as exc:
                    why = f"S3 failed too ({exc})"
        finally:
            if uploaded:
                writer.forget_held()
                logger.warning(
                    "lake: the disk refused {:,} bytes ({:,} events); uploaded them to S3 "
                    "from memory as {} part(s)",
                    size,
                    events,
                    len(held),
                )
            else:
                self.lost = (
                    f"{events:,} events ({size:,} bytes) could not be written to "
                    f"{writer.root} and {why}; lost: {describe_held(held)}"
                )

    async def _settle_drops(self, *, final: bool = False) -> None:
        """Record minutes the lake dropped (settled ones, or all at the end) as incidents."""
        writer = self.writer
        if writer is None:
            return
        before = None if final else now_ms() - 2 * MINUTE_MS
        drops = writer.take_dropped(before)
        if not drops:
            return
        what = ", ".join(
            f"{d.exchange} {d.symbol} {_hm(d.start_ms)}-{_hm(d.end_ms)}Z" for d in drops[:5]
        ) + (f" and {len(drops) - 5} more" if len(drops) > 5 else "")
        events = sum(d.events for d in drops)
        if self.record_drops is not None:
            try:
                with anyio.fail_after(10):
                    await self.record_drops(drops)
            except Exception as exc:
                if not final:
                    writer.trouble.give_back(drops)
                    logger.warning("lake: cannot record dropped minutes yet ({})", exc)
                    return
            else:
                logger.error(
                    "lake: {:,} events dropped (disk full past lake.max_held_bytes): {}; "
                    "recorded for the chain's gap-fill",
                    events,
                    what,
                )
                return
        message = f"{events:,} events dropped (disk full past lake.max_held_bytes): {what}"
        if final:
            self.lost = f"{self.lost}; {message}" if self.lost else message
        else:
            logger.error("lake: {}; no database to record them: gap-fill them by hand", message)

    # -- components ------------------------------------------------------------------------------

    async def _listing_clients(self, stack: AsyncExitStack) -> dict[str, Any]:
        """One REST client per enabled exchange, sharing the adapter its streams use."""
        import httpx

        from klined.exchanges import adapter_for
        from klined.rest.client import RestClient, RetryPolicy
        from klined.rest.ratelimit import shared_limiter

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
        """Capture roles: this shard's pairs, streamed into the lake (and the live path). The
        chain role: every configured pair, for the listing check only (``self.listings``)."""
        writer = self.writer
        sink: Callable[[Candle], None] = writer.append if writer is not None else _no_sink
        if writer is not None and self.live is not None:
            sink = live_sink(writer.append, self.live.offer)
        for name, section in self.cfg.exchanges.enabled().items():
            client = clients[name]
            adapter = client.adapter
            es = ExchangeStreams(
                adapter,
                self.cfg.ws_url(name),
                self.cfg.capture_pairs(name) if writer is not None else self.cfg.pairs(name),
                StreamSettings.from_config(section, adapter.limits),
                sink,
                fetch_listing=client.fetch_listing,
                listing_attempts=1,  # the REST client retries with backoff itself
                listing_cache=ListingCache(self.cfg.data_dir, name),
                **self.stream_options,
            )
            (self.streams if writer is not None else self.listings).append(es)

    async def _serve_status(self, *, task_status: TaskStatus[None]) -> None:
        from klined.daemon.status_server import StatusServer

        group = self.cfg.daemon.status_socket_group or None
        server = StatusServer(self.cfg.status_socket, self.snapshot, group=group)
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            task_status.started()

    async def _serve_metrics(self, *, task_status: TaskStatus[None]) -> None:
        from klined.daemon.metrics import MetricsServer

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
        with self.starting(f"{es.name}: listing check and first connection"):
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
        from klined.daemon.systemd import Heartbeat, watchdog_loop

        heartbeat = Heartbeat(max_age_s=30.0)
        async with anyio.create_task_group() as tg:
            if self.notifier is not None:
                tg.start_soon(watchdog_loop, self.notifier, heartbeat)
            last = extended = drops_at = time.monotonic()
            while True:
                await anyio.sleep(1.0)
                t = time.monotonic()
                if t - extended >= EXTEND_EVERY_S:
                    self._extend_start()
                    extended = t
                for es in self.streams:
                    es.refresh(t - last)
                last = t
                heartbeat.beat()
                if t - drops_at >= DROPS_EVERY_S:
                    drops_at = t
                    tg.start_soon(self._settle_drops)


def _no_sink(candle: Any) -> None:  # pragma: no cover - listing-only streams never run
    raise AssertionError("a chain host streams nothing")


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
    """Run the daemon until SIGTERM/SIGINT/SIGHUP; return the exit code. :class:`EventsLost`
    when captured events could be neither written nor uploaded."""
    daemon = Daemon(cfg, notifier=notifier)
    code = await daemon.run()
    if daemon.lost:
        raise EventsLost(daemon.lost)
    return code


def _hm(ms: int) -> str:
    return time.strftime("%H:%M", time.gmtime(ms // 1000))
