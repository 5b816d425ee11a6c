"""Making the lake writer's parts durable: appends, syncs and seals, run in worker threads.

:class:`OpenPart` is a part the writer has open; a flush hands each part's bytes to the disk as a
:class:`FlushJob` (:func:`write_jobs`), and closed parts are sealed in batches
(:func:`take_batch`, then :func:`seal_each`, or :func:`build_sealed`, :func:`install_sealed`
and :func:`drop_opens` when one ``syncfs`` covers them). Errors are recorded per job or part,
never raised, so the writer keeps what the disk refused and tries again.

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
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from loguru import logger

from klined.lake import compress
from klined.lake.compress import fsync_dir
from klined.model import HOUR_MS

#: a flush that syncs parts one by one spreads them over up to IO_THREADS threads
IO_THREADS = 8
JOBS_PER_THREAD = 32
#: bytes of parts sealed (compressed) per shielded batch: shutdown waits for one batch at most
#: (about a second), and each batch costs two ``syncfs``, so batches are large
SEAL_BATCH_BYTES = 256 * 1024 * 1024

_fdatasync = getattr(os, "fdatasync", os.fsync)
_O_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)


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


class FsSync:
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


class OpenPart:
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


class FlushJob:
    """One part's share of a flush, done in the worker thread."""

    __slots__ = ("close", "data", "done", "error", "events", "part")

    def __init__(self, part: OpenPart, data: bytes, events: int, close: bool) -> None:
        self.part = part
        self.data = data
        self.events = events
        self.close = close
        self.done = 0
        self.error: OSError | None = None


def write_jobs(jobs: list[FlushJob], *, sync: bool = True) -> None:
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
                        fsync_dir(part.path.parent)
        except OSError as exc:
            job.error = exc


def _undo_partial(fd: int, start: int, job: FlushJob) -> None:
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


def create_parts(jobs: list[FlushJob]) -> None:
    write_jobs(jobs, sync=False)


def sync_jobs(jobs: list[FlushJob]) -> None:
    """Make written parts durable one by one (``fdatasync`` and their folder's ``fsync``)."""
    for job in jobs:
        if job.error is not None or not job.part.created:
            continue
        try:
            sync_file(job.part.path)
            fsync_dir(job.part.path.parent)
        except OSError as exc:
            job.error = exc


def sync_written(jobs: list[FlushJob], fs: FsSync) -> None:
    """The durability barrier of a many-part flush: one ``syncfs`` (parts on another
    filesystem, or all of them when it fails, synced one by one)."""
    error = fs.sync()
    if error is not None:
        logger.error("lake: syncfs failed ({}); syncing {} parts one by one", error, len(jobs))
    sync_jobs([job for job in jobs if error is not None or job.part.dev != fs.dev])


def seal_each(parts: list[OpenPart], level: int) -> None:
    """Seal parts one by one, each step made durable (:func:`compress.seal_compressed`).
    Errors are recorded per part and leave its ``.open`` in place."""
    for part in parts:
        try:
            part.sealed_size = compress.seal_compressed(part.path, level)
        except OSError as exc:
            part.seal_error = exc


def build_sealed(parts: list[OpenPart], level: int, fs_dev: int | None) -> None:
    """Compress parts into their ``.gz.tmp``, unsynced on the lake's filesystem (``fs_dev``,
    which one ``syncfs`` covers), synced elsewhere."""
    for part in parts:
        try:
            part.sealed_size = compress.compress_to_tmp(part.path, level, sync=part.dev != fs_dev)
        except OSError as exc:
            part.seal_error = exc


def install_sealed(parts: list[OpenPart], fs: FsSync) -> None:
    """The built ``.gz`` made durable with one ``syncfs``, renamed into place, the renames made
    durable with one more (the ``.open`` files are dropped next, :func:`drop_opens`)."""
    error = fs.sync()
    if error is not None:
        logger.error(
            "lake: syncfs failed ({}); syncing {} sealed parts one by one", error, len(parts)
        )
    for part in parts:
        try:
            if error is not None:
                sync_file(compress.tmp_path(part.path))
            compress.install(part.path)
        except OSError as exc:
            part.seal_error = exc
    installed = [p for p in parts if p.seal_error is None]
    error = fs.sync()
    for part in installed:
        if error is not None or part.dev != fs.dev:
            fsync_dir(part.path.parent)


def drop_opens(parts: list[OpenPart]) -> None:
    """The plain copies of sealed parts go (unlinking costs ~1 ms a file on ext4: in threads)."""
    for part in parts:
        with contextlib.suppress(OSError):  # left behind, it is removed at the next start
            compress.drop_open(part.path)


def take_batch(queue: list[OpenPart]) -> list[OpenPart]:
    """The first parts of the queue, up to ``SEAL_BATCH_BYTES`` (at least one part)."""
    size = 0
    for n, part in enumerate(queue):
        size += part.written
        if size > SEAL_BATCH_BYTES and n:
            return queue[:n]
    return queue[:]


def sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        _fdatasync(fd)
    finally:
        os.close(fd)


async def spread(work: Callable[..., None], items: list[Any], *args: Any) -> None:
    """``work(chunk, *args)`` over the items, spread over up to ``IO_THREADS`` threads."""
    chunks = min(IO_THREADS, -(-len(items) // JOBS_PER_THREAD))
    if chunks <= 1:
        await anyio.to_thread.run_sync(work, items, *args)
        return
    async with anyio.create_task_group() as tg:
        for i in range(chunks):
            tg.start_soon(anyio.to_thread.run_sync, work, items[i::chunks], *args)
