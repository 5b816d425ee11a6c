"""Parts written whole: rows that did not come from a stream enter the lake sealed at once.

REST and trades candles, no-trade rows and rows read from the exchanges' archive files are
complete when klined has them, so they skip the open-part stage of :class:`LakeWriter`: each
batch becomes one gzip part (``.jsonl.gz``, like every sealed part) per exchange / pair / hour,
written to ``<key>.writing``, made durable (a batch's fsyncs a few at once: they share the
file system's journal commits), renamed to its key (atomic) and the rename made durable. A
part exists either whole or not at all; readers never see the ``.writing`` name (a ``kill -9``
mid-write leaves one that nothing reads: its rows never reached bronze, so the gap-fill fetches
them again, or the import reads the file again), and a capture writer's start-up cleanup of
its own half-built ``.gz.tmp`` files never touches it.

:class:`StagedParts` keeps the ``.writing`` names for a whole group of batches and renames them
only when told (an archive file becomes visible only once every row of it was read and
checked), or deletes them.

The part name carries the writer's tag (``fill_`` for gap-fill, ``archive_`` for archive
files) and every line its ``origin`` (``rest``, ``trades``, ``no_trades``, ``archive``), so the
lake says where each row came from. No lock: the random writer id keeps the names apart from a
capture writer sharing the folder.
"""

from __future__ import annotations

import gzip
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec

from klined.errors import LakeError
from klined.lake.layout import GZ_SUFFIX, check_names, part_key, remove_empty_folders
from klined.model import HOUR_MS, Candle, CandleRecord

TMP_SUFFIX = ".writing"

_ENCODE = msgspec.json.Encoder().encode


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class WrittenPart(msgspec.Struct, frozen=True, kw_only=True):
    """One sealed part: its key, bytes, rows, and what it holds."""

    key: str
    exchange: str
    symbol: str
    hour_ms: int
    size: int
    rows: int
    path: str


class SealedPartWriter:
    """Writes batches of candles as sealed parts under ``root`` (thread-safe enough: one
    counter, used from one task at a time per instance)."""

    def __init__(self, root: str | os.PathLike[str], *, tag: str = "fill_", level: int = 1) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_]*", tag):
            raise LakeError(f"writer tag {tag!r} cannot be used in a part key")
        self.root = Path(root)
        self.writer_id = tag + secrets.token_hex(8)
        self.level = level  # gzip level (``lake.compress_level``)
        self._counter = 0

    def write(self, candles: Iterable[Candle | CandleRecord]) -> list[WrittenPart]:
        """One sealed, durable part per exchange / pair / hour of ``candles`` (in their order
        within a part). Blocking: run it in a worker thread."""
        written = self.stage(candles)
        publish(written)
        return written

    def stage(self, candles: Iterable[Candle | CandleRecord]) -> list[WrittenPart]:
        """Like :meth:`write`, but each part stays at ``<path>.writing`` (read by nothing, not
        made durable yet) until :func:`publish` renames it. Blocking."""
        groups: dict[tuple[str, str, int], list[Candle | CandleRecord]] = {}
        for c in candles:
            start = c.interval_start
            groups.setdefault((c.exchange, c.symbol, start - start % HOUR_MS), []).append(c)
        written: list[WrittenPart] = []
        for (exchange, symbol, hour), rows in groups.items():
            check_names(exchange, symbol)
            self._counter += 1
            first = min(r.ingestion_ts or r.event_ts for r in rows)
            seq = f"{self.writer_id}-{self._counter:06d}"
            key = part_key(exchange, symbol, hour, first, seq) + GZ_SUFFIX
            data = gzip.compress(b"".join(_ENCODE(r) + b"\n" for r in rows), self.level, mtime=0)
            path = self.root / key
            _write_file(staged_path(path), data)
            written.append(
                WrittenPart(
                    key=key,
                    exchange=exchange,
                    symbol=symbol,
                    hour_ms=hour,
                    size=len(data),
                    rows=len(rows),
                    path=str(path),
                )
            )
        return written


def staged_path(path: str | Path) -> Path:
    """Where a part waits until it is published: ``<path>.writing``."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


def _write_file(tmp: Path, data: bytes) -> None:
    tmp.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: fsyncs at once while publishing: concurrent ones share the file system's journal commits
#: (~0.2 ms a part with 8 at once on this class of VM, ~0.9 ms one after the other)
SYNC_THREADS = 8


def publish(parts: Sequence[WrittenPart]) -> None:
    """Make staged parts durable, rename them to their keys, make the renames durable (each
    folder once). Blocking; a part is visible only once whole and durable."""
    if not parts:
        return
    paths = [Path(p.path) for p in parts]
    with ThreadPoolExecutor(min(SYNC_THREADS, len(paths)), "klined-publish") as pool:
        list(pool.map(_fsync_file, [staged_path(p) for p in paths]))
        for path in paths:
            os.replace(staged_path(path), path)
        list(pool.map(_fsync_dir, sorted({p.parent for p in paths})))


class StagedParts:
    """Parts of one all-or-nothing group: staged batch by batch (``.writing``), then published
    together or discarded (deleted). Blocking methods: run them in a worker thread, one at a
    time."""

    def __init__(self, writer: SealedPartWriter) -> None:
        self.writer = writer
        self.parts: list[WrittenPart] = []
        self.published = False

    def stage(self, candles: Iterable[Candle | CandleRecord]) -> list[WrittenPart]:
        if self.published:
            raise LakeError("these parts are published already: stage a new group")
        written = self.writer.stage(candles)
        self.parts.extend(written)
        return written

    def publish(self) -> list[WrittenPart]:
        """Every staged part into the lake (:func:`publish`)."""
        publish(self.parts)
        self.published = True
        return self.parts

    def discard(self) -> None:
        """Delete the staged parts (never published ones: a published part is in the lake),
        and the folders the staging made if they are empty."""
        if self.published:
            return
        folders: set[Path] = set()
        for part in self.parts:
            path = staged_path(part.path)
            path.unlink(missing_ok=True)
            folders.add(path.parent)
        self.parts.clear()
        for folder in sorted(folders, reverse=True):
            remove_empty_folders(folder, self.writer.root)
