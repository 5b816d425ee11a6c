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

Durability, cheaply. A flush of a few parts syncs each one (``fdatasync``, and ``fsync`` of a
new part's folder). A flush of many parts (2,000 at 1,000 pairs on two exchanges) instead
writes them all and then calls Linux ``syncfs(2)`` once on the lake's filesystem: it writes back
*every* dirty page and all metadata of that filesystem (file data, sizes, new directory entries,
renames) and returns once they are on stable storage, a superset of what the per-file calls
guarantee, for one journal commit instead of thousands (a flush of 2,000 parts took ~1 s of
fdatasyncs, ~60 ms with ``syncfs``). Since Linux 5.8 ``syncfs`` reports writeback errors
recorded on the filesystem since the descriptor it is called on was opened (the writer keeps
one open on the root for its lifetime); on such an error the flush falls back to syncing its
parts one by one, which reports per file as before. Parts found on another filesystem than
the root (a mount inside the lake) are always synced one by one, and where ``syncfs`` does not
exist (not Linux) every flush syncs per file. So "a crash loses at most the last flush
interval" holds either way: a flush returns, and the data counts as written, only after its
bytes are durable, and a part's ``.gz`` only takes its sealed name once it is durable.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus
from loguru import logger

from klined.config import LakeConfig
from klined.errors import LakeError
from klined.lake import compress
from klined.lake.compress import fsync_dir as _fsync_dir
from klined.lake.held import DiskTrouble, Dropped, HeldPart
from klined.lake.layout import (
    GZ_SUFFIX,
    OPEN_SUFFIX,
    PART_SUFFIX,
    check_names,
    parse_key,
    part_key,
)
from klined.model import HOUR_MS, Candle
from klined.status import LakeStatus

#: flush early when this many events wait in memory (bounds memory at high rates)
FLUSH_AFTER_EVENTS = 20_000
#: a flush that syncs parts one by one spreads them over up to IO_THREADS threads
IO_THREADS = 8
JOBS_PER_THREAD = 32
#: a flush of more parts than this makes them durable with one ``syncfs`` where available
SYNC_EACH_MAX = 16
#: bytes of parts sealed (compressed) per shielded batch: shutdown waits for one batch at most
#: (about a second), and each batch costs two ``syncfs``, so batches are large
SEAL_BATCH_BYTES = 256 * 1024 * 1024
#: a part that cannot be sealed (a full disk) is logged at most this often
SEAL_ERROR_LOG_EVERY_S = 60.0
LOCK_NAME = ".writer.lock"
DEFAULT_LEVEL = LakeConfig().compress_level

_fdatasync = getattr(os, "fdatasync", os.fsync)
_O_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _load_syncfs() -> Callable[[int], int] | None:
    """libc's ``syncfs(2)`` (Linux only; Python has no binding). ctypes releases the GIL
    while it runs."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_syncfs = _load_syncfs()


class _FsSync:
    """One ``syncfs`` of the lake root's filesystem, through a descriptor kept open so that a
    writeback error anywhere on the filesystem since the previous call is reported."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fd: int | None = None
        self.dev: int | None = None
        self.usable = _syncfs is not None

    def open(self) -> int:
        """The root's descriptor (opened once), and its filesystem (``dev``)."""
        if self.fd is None:
            fd = os.open(self.root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            self.dev = os.fstat(fd).st_dev
            self.fd = fd
        return self.fd

    def sync(self) -> OSError | None:
        """Sync the filesystem; the error when it failed (``usable`` turns False when the
        kernel has no ``syncfs``)."""
        if _syncfs is None:
            return OSError(errno.ENOSYS, "syncfs is not available")
        try:
            if _syncfs(self.open()) == 0:
                return None
            code = ctypes.get_errno()
        except OSError as exc:
            return exc
        if code in (errno.ENOSYS, errno.EINVAL):
            self.usable = False
        return OSError(code, f"syncfs: {os.strerror(code)}")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


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


def leftover_parts(
    root: str | os.PathLike[str], *, keep_writer_id: str | None = None
) -> list[Path]:
    """The ``.open`` parts a crashed writer left with content, still to be sealed.

    On the way, what needs no sealing goes: empty ``.open`` parts, a ``.open`` whose ``.gz``
    exists (the crash came after its seal), a half-built ``.gz.tmp``. Parts whose key carries
    ``keep_writer_id`` belong to a live writer and are left alone.
    """
    found: list[Path] = []
    suffix = PART_SUFFIX + OPEN_SUFFIX
    tmp_suffix = PART_SUFFIX + GZ_SUFFIX + compress.TMP_SUFFIX
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if not name.startswith("part-"):
                continue
            if keep_writer_id and f"-{keep_writer_id}-" in name:
                continue
            path = Path(dirpath) / name
            try:
                if name.endswith(tmp_suffix):
                    path.unlink()
                elif name.endswith(suffix):
                    if path.stat().st_size == 0 or compress.sealed_path(path).exists():
                        path.unlink()
                    else:
                        found.append(path)
            except FileNotFoundError:
                continue
    return sorted(found)


def seal_open_parts(
    root: str | os.PathLike[str],
    *,
    keep_writer_id: str | None = None,
    level: int = DEFAULT_LEVEL,
) -> list[tuple[str, int]]:
    """Seal the parts a crashed writer left open (:func:`leftover_parts`), here and now;
    return their sealed ``(key, size)``. Their content is kept as is (a torn last line is the
    readers' to skip) and compressed. (A running writer queues them for its sealer instead.)
    """
    root_path = Path(root)
    sealed: list[tuple[str, int]] = []
    for path in leftover_parts(root_path, keep_writer_id=keep_writer_id):
        try:
            size = compress.seal_compressed(path, level)
        except FileNotFoundError:
            continue
        sealed.append((compress.sealed_path(path).relative_to(root_path).as_posix(), size))
    return sealed


class _Part:
    """An open part: bytes waiting in memory, and what was already handed to the disk."""

    __slots__ = (
        "carry",
        "created",
        "dev",
        "fragment",
        "hour_end_ms",
        "key",
        "lines",
        "opened_ms",
        "path",
        "pending_bytes",
        "pending_events",
        "seal_error",
        "sealed_size",
        "written",
    )

    def __init__(self, key: str, path: Path, hour_ms: int, opened_ms: int) -> None:
        self.key = key
        self.path = path  # the .open path
        self.hour_end_ms = hour_ms + HOUR_MS
        self.opened_ms = opened_ms
        self.lines: list[bytes] = []  # encoded events, without their line breaks
        self.carry = b""  # bytes a failed write left over, written before ``lines``
        self.fragment = b""  # a torn line's start on disk that could not be truncated away
        self.pending_bytes = 0  # of ``carry`` and ``lines`` with their line breaks
        self.pending_events = 0
        self.written = 0
        self.created = False
        self.dev: int | None = None  # the filesystem it lives on, once created
        self.sealed_size = 0  # of its .gz, once sealed
        self.seal_error: OSError | None = None


class _Job:
    """One part's share of a flush, done in the worker thread."""

    __slots__ = ("close", "data", "done", "error", "events", "part")

    def __init__(self, part: _Part, data: bytes, events: int, close: bool) -> None:
        self.part = part
        self.data = data
        self.events = events
        self.close = close
        self.done = 0
        self.error: OSError | None = None


def _write_jobs(jobs: list[_Job], *, sync: bool = True) -> None:
    """Append each job's bytes; with ``sync``, also fdatasync each part (and fsync a new
    part's folder). Errors are recorded per job."""
    for job in jobs:
        part = job.part
        try:
            if job.data or not part.created:
                if not part.created:
                    part.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(part.path, _O_FLAGS, 0o644)
                try:
                    view = memoryview(job.data)
                    start = os.fstat(fd).st_size if job.data else 0
                    try:
                        while job.done < len(view):
                            job.done += os.write(fd, view[job.done :])
                    except OSError:
                        _undo_partial(fd, start, job)
                        raise
                    if part.dev is None:
                        part.dev = os.fstat(fd).st_dev
                    if sync:
                        _fdatasync(fd)
                finally:
                    os.close(fd)
                if not part.created:
                    part.created = True
                    if sync:
                        _fsync_dir(part.path.parent)
        except OSError as exc:
            job.error = exc


def _undo_partial(fd: int, start: int, job: _Job) -> None:
    """A write the disk cut short: truncate the file back to where it started, so the retry
    writes the whole data again and no line is ever doubled or torn for good."""
    if not job.done:
        return
    try:
        os.ftruncate(fd, start)
    except OSError:
        # kept as written; the retry continues the torn line (the disk has its start)
        return
    job.done = 0


def _create_parts(jobs: list[_Job]) -> None:
    _write_jobs(jobs, sync=False)


def _sync_jobs(jobs: list[_Job]) -> None:
    """Make written parts durable one by one (``fdatasync`` and their folder's ``fsync``)."""
    for job in jobs:
        if job.error is not None or not job.part.created:
            continue
        try:
            _sync_file(job.part.path)
            _fsync_dir(job.part.path.parent)
        except OSError as exc:
            job.error = exc


def _sync_written(jobs: list[_Job], fs: _FsSync) -> None:
    """The durability barrier of a many-part flush: one ``syncfs`` (parts on another
    filesystem, or all of them when it fails, synced one by one)."""
    error = fs.sync()
    if error is not None:
        logger.error("lake: syncfs failed ({}); syncing {} parts one by one", error, len(jobs))
    _sync_jobs([job for job in jobs if error is not None or job.part.dev != fs.dev])


def _seal_each(parts: list[_Part], level: int) -> None:
    """Seal parts one by one, each step made durable (:func:`compress.seal_compressed`).
    Errors are recorded per part and leave its ``.open`` in place."""
    for part in parts:
        try:
            part.sealed_size = compress.seal_compressed(part.path, level)
        except OSError as exc:
            part.seal_error = exc


def _build_sealed(parts: list[_Part], level: int, fs_dev: int | None) -> None:
    """Compress parts into their ``.gz.tmp``, unsynced on the lake's filesystem (``fs_dev``,
    which one ``syncfs`` covers), synced elsewhere."""
    for part in parts:
        try:
            part.sealed_size = compress.compress_to_tmp(part.path, level, sync=part.dev != fs_dev)
        except OSError as exc:
            part.seal_error = exc


def _install_sealed(parts: list[_Part], fs: _FsSync) -> None:
    """The built ``.gz`` made durable with one ``syncfs``, renamed into place, the renames made
    durable with one more (the ``.open`` files are dropped next, :func:`_drop_opens`)."""
    error = fs.sync()
    if error is not None:
        logger.error(
            "lake: syncfs failed ({}); syncing {} sealed parts one by one", error, len(parts)
        )
    for part in parts:
        try:
            if error is not None:
                _sync_file(compress.tmp_path(part.path))
            compress.install(part.path)
        except OSError as exc:
            part.seal_error = exc
    installed = [p for p in parts if p.seal_error is None]
    error = fs.sync()
    for part in installed:
        if error is not None or part.dev != fs.dev:
            _fsync_dir(part.path.parent)


def _drop_opens(parts: list[_Part]) -> None:
    """The plain copies of sealed parts go (unlinking costs ~1 ms a file on ext4: in threads)."""
    for part in parts:
        with contextlib.suppress(OSError):  # left behind, it is removed at the next start
            compress.drop_open(part.path)


def _take_batch(queue: list[_Part]) -> list[_Part]:
    """The first parts of the queue, up to ``SEAL_BATCH_BYTES`` (at least one part)."""
    size = 0
    for n, part in enumerate(queue):
        size += part.written
        if size > SEAL_BATCH_BYTES and n:
            return queue[:n]
    return queue[:]


def _sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        _fdatasync(fd)
    finally:
        os.close(fd)


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
        self._open: dict[tuple[str, str, int], _Part] = {}
        self._closing: list[_Part] = []
        self._counter = 0
        self._unflushed = 0
        self._wake = anyio.Event()
        self._lock = anyio.Lock()
        self._fs = _FsSync(self.root)
        self._level = config.compress_level
        self._unsealed: list[_Part] = []  # closed, data durable in .open, not compressed yet
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

    def _new_part(self, slot: tuple[str, str, int], candle: Candle) -> _Part:
        exchange, symbol, hour_ms = slot
        check_names(exchange, symbol)
        now = self._clock()
        self._counter += 1
        seq = f"{self.writer_id}-{self._counter:06d}"
        key = part_key(exchange, symbol, hour_ms, candle.ingestion_ts or now, seq)
        part = _Part(key, self.root / (key + OPEN_SUFFIX), hour_ms, now)
        self._open[slot] = part
        if self._status is not None:
            self._status.open_parts = len(self._open)
        return part

    # -- flushing -------------------------------------------------------------------------------

    @property
    def open_parts(self) -> list[str]:
        """Keys of the parts currently open (for status and tests)."""
        return sorted(p.key for p in self._open.values())

    def _due(self, part: _Part, now: int) -> bool:
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
            failed: list[_Part] = []
            try:
                while queue:
                    batch = _take_batch(queue)
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

    async def _seal_batch(self, parts: list[_Part]) -> None:
        """Many parts: build every ``.gz`` side by side, then one ``syncfs`` makes them durable
        (:func:`_install_sealed`); a few, or no ``syncfs``: each sealed and synced on its own."""
        if len(parts) > SYNC_EACH_MAX and self._fs.usable:
            fs = self._fs
            with contextlib.suppress(OSError):
                fs.open()
            await self._spread(_build_sealed, parts, self._level, fs.dev)
            built = [p for p in parts if p.seal_error is None]
            if built:
                await anyio.to_thread.run_sync(_install_sealed, built, fs)
                await self._spread(_drop_opens, [p for p in built if p.seal_error is None])
        else:
            await self._spread(_seal_each, parts, self._level)

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
            part = _Part(key, path, hour_ms, self._clock())
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
            jobs: list[_Job] = []
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

    async def _write(self, jobs: list[_Job]) -> None:
        """Run the jobs in worker threads: many parts with one ``syncfs`` where the kernel has
        it, else synced one by one, spread over a few threads (their fdatasyncs are
        independent and a disk serves them faster side by side)."""
        if len(jobs) > SYNC_EACH_MAX and self._fs.usable:
            await self._write_many(jobs)
        else:
            await self._in_threads(_write_jobs, jobs)

    async def _write_many(self, jobs: list[_Job]) -> None:
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
        _write_jobs([job for job in jobs if job.part.created], sync=False)
        fresh = [job for job in jobs if not job.part.created]
        if fresh:
            await self._in_threads(_create_parts, fresh)
        await anyio.to_thread.run_sync(_sync_written, jobs, fs)

    @staticmethod
    async def _in_threads(work: Callable[[list[_Job]], None], jobs: list[_Job]) -> None:
        """``work`` over the jobs, spread over up to ``IO_THREADS`` worker threads."""
        await LakeWriter._spread(work, jobs)

    @staticmethod
    async def _spread(work: Callable[..., None], items: list[Any], *args: Any) -> None:
        """``work(chunk, *args)`` over the items, spread over up to ``IO_THREADS`` threads."""
        chunks = min(IO_THREADS, -(-len(items) // JOBS_PER_THREAD))
        if chunks <= 1:
            await anyio.to_thread.run_sync(work, items, *args)
            return
        async with anyio.create_task_group() as tg:
            for i in range(chunks):
                tg.start_soon(anyio.to_thread.run_sync, work, items[i::chunks], *args)

    def _take(self, part: _Part, *, close: bool) -> _Job:
        lines = part.lines
        if lines:
            lines.append(b"")  # the last line's break
            data = b"\n".join(lines)
            if part.carry:
                data = part.carry + data
        else:
            data = part.carry
        job = _Job(part, data, part.pending_events, close)
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

    def _settle(self, jobs: list[_Job]) -> None:
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
