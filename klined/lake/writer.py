"""The lake writer: every captured event, appended to the local spool, durably and cheaply.

``append`` runs on the hot path for every event, so it only encodes the event and keeps the line
in its open part (one per exchange / pair / hour): no syscall, no await. Lines are kept as a list
of ``bytes`` and joined once per flush: ``Encoder.encode`` into a new ``bytes`` costs about two
thirds of ``encode_into`` a growing ``bytearray`` (which resizes the buffer on every call).
``run`` flushes the lines at least every ``flush_interval_s`` (write every part, then make them
durable), so a crash loses at most the last interval, and closes parts when they reach their
size or age bound or when their hour is over plus the grace period. A closed part, its data
durable, is sealed beside the flushes: compressed into ``<key>.gz`` in worker threads (never on
the event loop, see :mod:`klined.lake.compress`), then announced. Sealed parts are immutable; a
late event for a sealed hour opens a new part in the same folder. ``aclose`` writes and seals
everything that is open, so nothing buffered is lost on shutdown (a part whose compression did
not fit in the time allowed stays ``.open``, durable, and the next start seals it).

When the disk refuses writes (full, read-only), events wait in memory up to
``lake.max_held_bytes`` and every flush tries again; what happens meanwhile (logging, the cap,
the minutes dropped past it, what is left at close) is :mod:`klined.lake.held`. A write cut
short by the disk is truncated back to where it started, so a retry never doubles a line.

Durability, cheaply (one ``syncfs`` for a flush of many parts, per-file syncs otherwise), and
the writes and seals run in worker threads, are :mod:`klined.lake.durable`.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import msgspec
from anyio.abc import TaskStatus
from loguru import logger

from klined.config import LakeConfig
from klined.errors import LakeError
from klined.lake.compress import seal_open_parts
from klined.lake.durable import (
    FlushJob,
    FsSync,
    OpenPart,
    build_sealed,
    create_parts,
    drop_opens,
    install_sealed,
    seal_each,
    spread,
    sync_written,
    take_batch,
    write_jobs,
)
from klined.lake.held import DiskTrouble, Dropped, HeldPart
from klined.lake.layout import (
    GZ_SUFFIX,
    OPEN_SUFFIX,
    check_names,
    parse_key,
    part_key,
)
from klined.model import HOUR_MS, Candle
from klined.status import LakeStatus

#: flush early when this many events wait in memory (bounds memory at high rates)
FLUSH_AFTER_EVENTS = 20_000
#: a flush of more parts than this makes them durable with one ``syncfs`` where available
SYNC_EACH_MAX = 16
#: a part that cannot be sealed (a full disk) is logged at most this often
SEAL_ERROR_LOG_EVERY_S = 60.0
LOCK_NAME = ".writer.lock"


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def lock_root(root: Path) -> int:
    """Take the lake root's writer lock (a second writer would seal the first one's parts)."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise LakeError(
            f"another klined writer is using the lake at {root} (lock {LOCK_NAME} is held)"
        ) from None
    return fd


class LakeWriter:
    """Appends candle events to the local lake. One writer per lake root.

    The owner runs :meth:`run` in its task group (``await tg.start(writer.run)`` seals parts a
    crashed run left open before returning) and calls :meth:`aclose` after the producers have
    stopped. ``on_part_closed(key, size)`` is called for every sealed part (the uploader's
    :meth:`~klined.lake.LakeUploader.part_closed`).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        config: LakeConfig,
        *,
        status: LakeStatus | None = None,
        on_part_closed: Callable[[str, int], None] | None = None,
        clock: Callable[[], int] = wall_ms,
        flush_after_events: int = FLUSH_AFTER_EVENTS,
        close_timeout_s: float = 60.0,
        writer_tag: str = "",
    ) -> None:
        self.root = Path(root)
        # 64 random bits, after a tag saying who writes (a capture shard, ``s1of2_``): part
        # keys never collide across processes, restarts or hosts sharing one bucket
        if not re.fullmatch(r"[A-Za-z0-9_]*", writer_tag):
            raise LakeError(f"writer tag {writer_tag!r} cannot be used in a part key")
        self.writer_id = writer_tag + secrets.token_hex(8)
        self._cfg = config
        self._status = status
        self._on_part_closed = on_part_closed
        self._clock = clock
        self._flush_after_events = flush_after_events
        self._close_timeout_s = close_timeout_s
        self._max_bytes = config.part_max_bytes
        self._max_age_ms = int(config.part_max_age_s * 1000)
        self._grace_ms = int(config.hour_grace_s * 1000)
        self._encode = msgspec.json.Encoder().encode
        self._open: dict[tuple[str, str, int], OpenPart] = {}
        self._closing: list[OpenPart] = []
        self._counter = 0
        self._unflushed = 0
        self._wake = anyio.Event()
        self._lock = anyio.Lock()
        self._fs = FsSync(self.root)
        self._level = config.compress_level
        self._unsealed: list[OpenPart] = []  # closed, data durable in .open, not compressed yet
        self._seal_error_logged = -SEAL_ERROR_LOG_EVERY_S
        self._seal_lock = anyio.Lock()
        self._seal_wake = anyio.Event()
        self._held = 0  # bytes of events waiting in parts (not in a flush under way)
        self._cap = config.max_held_bytes
        self.trouble = DiskTrouble(str(self.root), self._cap)
        self.events_written = 0
        self.parts_closed = 0
        #: events appended so far, and how many of the first ones are durable (every flush
        #: that writes all it took without an error advances it): :meth:`wait_durable`
        self.appended = 0
        self.durable_through = 0
        self._durable = anyio.Event()

    # -- hot path -------------------------------------------------------------------------------

    def append(self, candle: Candle) -> None:
        """Buffer one event in its hour's open part. Synchronous, no I/O."""
        start = candle.interval_start
        if self._held >= self._cap:  # the disk has refused writes for a while
            self.trouble.drop(candle.exchange, candle.symbol, start)
            return
        slot = (candle.exchange, candle.symbol, start - start % HOUR_MS)
        part = self._open.get(slot)
        if part is None:
            part = self._new_part(slot, candle)
        line = self._encode(candle)
        part.lines.append(line)
        part.pending_bytes += len(line) + 1
        self._held += len(line) + 1
        part.pending_events += 1
        self._unflushed += 1
        self.appended += 1
        if part.written + part.pending_bytes >= self._max_bytes:
            del self._open[slot]
            self._closing.append(part)
            self._wake.set()
        elif self._unflushed == self._flush_after_events:
            self._wake.set()  # once: the flush resets the count

    def _new_part(self, slot: tuple[str, str, int], candle: Candle) -> OpenPart:
        exchange, symbol, hour_ms = slot
        check_names(exchange, symbol)
        now = self._clock()
        self._counter += 1
        seq = f"{self.writer_id}-{self._counter:06d}"
        key = part_key(exchange, symbol, hour_ms, candle.ingestion_ts or now, seq)
        part = OpenPart(key, self.root / (key + OPEN_SUFFIX), hour_ms, now)
        self._open[slot] = part
        if self._status is not None:
            self._status.open_parts = len(self._open)
        return part

    # -- flushing -------------------------------------------------------------------------------

    @property
    def open_parts(self) -> list[str]:
        """Keys of the parts currently open (for status and tests)."""
        return sorted(p.key for p in self._open.values())

    def _due(self, part: OpenPart, now: int) -> bool:
        return now - part.opened_ms >= self._max_age_ms or now >= part.hour_end_ms + self._grace_ms

    async def flush(self, *, close_all: bool = False) -> None:
        """Write every buffered event and seal the parts that are due (or all of them)."""
        await self._flush(close_all=close_all, hour_ms=None)
        await self._seal_closed()

    async def seal_hour(self, hour_ms: int) -> None:
        """Seal the hour's open parts now (e.g. before a flush step that runs inside the
        grace period), besides the usual flush. Later events of the hour open new parts."""
        await self._flush(close_all=False, hour_ms=hour_ms - hour_ms % HOUR_MS)
        await self._seal_closed()

    async def _seal_closed(self) -> None:
        """Compress the closed parts (their data is durable in ``.open``) into their sealed
        ``.gz`` in worker threads, and announce them, ``SEAL_BATCH_BYTES`` at a time.

        A batch is shielded (worker threads cannot be abandoned anyway), so cancellation lands
        between batches and the parts not sealed yet simply stay queued (and ``.open`` on
        disk: the next pass, or the next start, seals them). A part that cannot be sealed now
        (disk full) stays queued too and is tried again at the next pass.
        """
        async with self._seal_lock:
            queue, self._unsealed = self._unsealed, []
            failed: list[OpenPart] = []
            try:
                while queue:
                    batch = take_batch(queue)
                    with anyio.CancelScope(shield=True):
                        await self._seal_batch(batch)
                    del queue[: len(batch)]
                    for part in batch:
                        if part.seal_error is None:
                            self.parts_closed += 1
                            self._notify_closed(part.key + GZ_SUFFIX, part.sealed_size)
                        else:
                            failed.append(part)
            finally:
                now = time.monotonic()
                if failed and now - self._seal_error_logged >= SEAL_ERROR_LOG_EVERY_S:
                    # a full disk fails every pass: say so once a minute, not every flush
                    self._seal_error_logged = now
                    logger.error(
                        "lake: cannot seal {} part(s), kept as .open and tried again: {}",
                        len(failed),
                        failed[0].seal_error,
                    )
                    for part in failed:
                        part.seal_error = None
                self._unsealed = failed + queue + self._unsealed
                if self._status is not None:
                    self._status.open_parts = (
                        len(self._open) + len(self._closing) + len(self._unsealed)
                    )

    async def _seal_batch(self, parts: list[OpenPart]) -> None:
        """Many parts: build every ``.gz`` side by side, then one ``syncfs`` makes them durable
        (:func:`install_sealed`); a few, or no ``syncfs``: each sealed and synced on its own."""
        if len(parts) > SYNC_EACH_MAX and self._fs.usable:
            fs = self._fs
            with contextlib.suppress(OSError):
                fs.open()
            await spread(build_sealed, parts, self._level, fs.dev)
            built = [p for p in parts if p.seal_error is None]
            if built:
                await anyio.to_thread.run_sync(install_sealed, built, fs)
                await spread(drop_opens, [p for p in built if p.seal_error is None])
        else:
            await spread(seal_each, parts, self._level)

    def _adopt(self, paths: list[Path]) -> None:
        """Queue the parts an earlier run left open for the sealer: capture starts at once,
        whatever there is to compress (their data is on disk; nothing is lost meanwhile)."""
        for path in paths:
            key = path.relative_to(self.root).as_posix()[: -len(OPEN_SUFFIX)]
            try:
                hour_ms = parse_key(key).hour_ms
                stat = path.stat()
                dev, size = stat.st_dev, stat.st_size
            except (ValueError, OSError):
                hour_ms, dev, size = 0, None, 0  # foreign or gone: sealed (or failing) as is
            part = OpenPart(key, path, hour_ms, self._clock())
            part.created, part.dev, part.written = True, dev, size
            self._unsealed.append(part)
            logger.warning("lake: sealing {} left open by an earlier run", key)
        if paths:
            self._seal_wake.set()

    async def _sealer(self) -> None:
        """Seal what the flushes closed, beside them (a flush never waits for compression)."""
        while True:
            await self._seal_wake.wait()
            self._seal_wake = anyio.Event()
            await self._seal_closed()

    async def wait_durable(self, mark: int) -> None:
        """Return once the first ``mark`` appended events (a value :attr:`appended` had) are
        on stable storage; wakes the flush now rather than at its next tick. Whoever must never
        get ahead of the lake (the live path) waits here."""
        while self.durable_through < mark:
            durable = self._durable
            self._wake.set()
            await durable.wait()

    async def _flush(self, *, close_all: bool, hour_ms: int | None) -> None:
        async with self._lock:
            mark = self.appended
            now = self._clock()
            for slot, part in list(self._open.items()):
                if close_all or slot[2] == hour_ms or self._due(part, now):
                    del self._open[slot]
                    self._closing.append(part)
            jobs: list[FlushJob] = []
            for part in self._open.values():
                if part.pending_bytes:
                    jobs.append(self._take(part, close=False))
            jobs.extend(self._take(part, close=True) for part in self._closing)
            self._closing = []
            self._unflushed = 0
            if jobs:
                await self._write(jobs)
                self._settle(jobs)
            if all(job.error is None for job in jobs) and mark > self.durable_through:
                self.durable_through = mark
                self._durable.set()
                self._durable = anyio.Event()
            if self._status is not None:
                self._status.open_parts = len(self._open) + len(self._closing) + len(self._unsealed)
                self._status.events_written = self.events_written
                self._status.held_bytes = self._held
                self._status.dropped_events = self.trouble.dropped_events
                self._status.write_failing_since_ms = self.trouble.since_ms
                self._status.last_write_error = self.trouble.last_error

    async def _write(self, jobs: list[FlushJob]) -> None:
        """Run the jobs in worker threads: many parts with one ``syncfs`` where the kernel has
        it, else synced one by one, spread over a few threads (their fdatasyncs are
        independent and a disk serves them faster side by side)."""
        if len(jobs) > SYNC_EACH_MAX and self._fs.usable:
            await self._write_many(jobs)
        else:
            await spread(write_jobs, jobs)

    async def _write_many(self, jobs: list[FlushJob]) -> None:
        """Write many parts and make them durable with one ``syncfs`` in a worker thread (the
        closing ones are then sealed by :meth:`_seal_closed`).

        Appends to existing parts are copies into the page cache (microseconds each) and are
        made right here: a worker thread would wait for the GIL after each of its thousands of
        syscalls while the event loop is busy, which made a flush of 2,000 parts take seconds
        and let buffered events pile up. Creating parts is a metadata operation (a folder, an
        inode: a few hundred microseconds on a journaling filesystem), so it runs in worker
        threads, side by side.
        """
        fs = self._fs
        with contextlib.suppress(OSError):
            fs.open()  # when the root is gone, the writes fail and say so
        write_jobs([job for job in jobs if job.part.created], sync=False)
        fresh = [job for job in jobs if not job.part.created]
        if fresh:
            await spread(create_parts, fresh)
        await anyio.to_thread.run_sync(sync_written, jobs, fs)

    def _take(self, part: OpenPart, *, close: bool) -> FlushJob:
        lines = part.lines
        if lines:
            lines.append(b"")  # the last line's break
            data = b"\n".join(lines)
            if part.carry:
                data = part.carry + data
        else:
            data = part.carry
        job = FlushJob(part, data, part.pending_events, close)
        self._held -= part.pending_bytes
        part.written += len(data)
        part.lines = []
        part.carry = b""
        part.pending_bytes = 0
        part.pending_events = 0
        return job

    def _notify_closed(self, key: str, size: int) -> None:
        if self._on_part_closed is None:
            return
        try:
            self._on_part_closed(key, size)
        except Exception:  # a listener's bug must not stop the writer
            logger.exception("lake: on_part_closed failed for {}", key)

    def _settle(self, jobs: list[FlushJob]) -> None:
        """Account for a flush; put back whatever the disk refused, to retry next time."""
        error: OSError | None = None
        for job in jobs:
            part = job.part
            if job.error is None:
                self.events_written += job.events
                part.fragment = b""
                if job.close:
                    self._unsealed.append(part)
                    self._seal_wake.set()
                continue
            error = error or job.error
            rest = job.data[job.done :]
            if job.done and job.data[job.done - 1 : job.done] != b"\n":
                # the disk holds the start of a line it could not finish (and keep)
                torn = job.data.rfind(b"\n", 0, job.done) + 1
                part.fragment = job.data[torn : job.done]
            unwritten = rest.count(b"\n")
            part.written -= len(rest)
            self.events_written += job.events - unwritten
            part.pending_events += unwritten
            part.carry = rest + part.carry
            part.pending_bytes += len(rest)
            self._held += len(rest)
            if job.close and part not in self._closing:
                self._closing.append(part)
        if error is not None:
            events = sum(p.pending_events for p in (*self._open.values(), *self._closing))
            self.trouble.failed(error, self._held, events, self._clock())
        elif self.trouble.failing and not self._held:
            self.trouble.recovered(self._clock())

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Lock the root, queue the leftovers of a crashed run for sealing, then flush, rotate and
        seal until cancelled.

        :class:`LakeError` if another writer holds the root. On the way out (cancellation)
        every open part is sealed, as :meth:`aclose` does.
        """
        lock_fd = await anyio.to_thread.run_sync(lock_root, self.root)
        try:
            sealed = await anyio.to_thread.run_sync(
                lambda: seal_open_parts(self.root, keep_writer_id=self.writer_id, level=self._level)
            )
            for key, size in sealed:
                self._notify_closed(key, size)
            task_status.started()
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._sealer)
                    while True:
                        with anyio.move_on_after(self._cfg.flush_interval_s):
                            await self._wake.wait()
                        self._wake = anyio.Event()
                        with anyio.CancelScope(shield=True):
                            await self._flush(close_all=False, hour_ms=None)
            finally:
                await self.aclose()
        finally:
            self._fs.close()
            os.close(lock_fd)  # closing the descriptor releases the lock

    async def aclose(self) -> None:
        """Seal every open part, writing everything buffered (shielded, bounded).

        Safe to call more than once; events appended afterwards open new parts that the next
        ``aclose`` (or flush) writes. What the disk still refuses stays in memory:
        :meth:`held_parts` hands it out (the daemon uploads it straight to S3).
        """
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self._close_timeout_s) as scope:
                await self.flush(close_all=True)
        if scope.cancelled_caught or self._held:
            logger.error(
                "lake: closing did not finish; {:,} bytes of events not written to {}",
                self._held,
                self.root,
            )
        if self._unsealed:
            logger.warning(
                "lake: {} part(s) written but not sealed yet; they stay .open and are sealed at "
                "the next start",
                len(self._unsealed),
            )

    @property
    def held_bytes(self) -> int:
        """Bytes of events in memory that the disk has not taken (yet)."""
        return self._held

    def held_parts(self) -> list[HeldPart]:
        """Every part's events still in memory, each as a complete part under a fresh key of
        its hour (never the key of the part on disk, which keeps what was written)."""
        out = []
        for part in (*self._open.values(), *self._closing):
            if not part.pending_bytes:
                continue
            lines = part.lines
            data = part.fragment + part.carry + b"".join(line + b"\n" for line in lines)
            pk = parse_key(part.key)
            self._counter += 1
            key = part_key(
                pk.exchange,
                pk.symbol,
                pk.hour_ms,
                pk.first_event_ms,
                f"{self.writer_id}-{self._counter:06d}",
            )
            out.append(HeldPart(key, data, part.pending_events, pk.exchange, pk.symbol))
        return out

    def forget_held(self) -> None:
        """The held events are safe elsewhere (uploaded): drop them from memory."""
        for part in (*self._open.values(), *self._closing):
            part.lines, part.carry, part.fragment = [], b"", b""
            part.pending_bytes = part.pending_events = 0
        self._held = 0

    def take_dropped(self, before_ms: int | None = None) -> list[Dropped]:
        """Minutes whose events were dropped past ``lake.max_held_bytes`` (see
        :meth:`DiskTrouble.take_dropped`)."""
        return self.trouble.take_dropped(before_ms)
