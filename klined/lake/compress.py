"""Gzip for sealed parts: compress a part as it is sealed, and read plain or gzip parts alike.

An open part is plain JSONL (``<key>.open``), appended to at every flush. Sealing compresses it
into ``<key>.gz`` (``part-....jsonl.gz``): gzip, because Spark, Athena/Trino, DuckDB, pandas
and ``zcat`` read it natively (by the ``.gz`` name). The steps keep a crash harmless:

1. compress ``<key>.open`` into ``<key>.gz.tmp`` (streamed, 1 MiB at a time: memory stays
   small whatever the part's size; ``zlib`` releases the GIL while it works);
2. make the temporary file durable, rename it to ``<key>.gz`` and make the rename durable;
3. remove ``<key>.open``.

So a ``.gz`` part is always complete, and while a ``.open`` exists it is the truth: after a
crash, a ``.open`` whose ``.gz`` exists was sealed already (it is removed), any other is sealed
again, and a leftover ``.tmp`` is deleted. The gzip header carries no name and no time, so the
same content always compresses to the same bytes.

Readers never look at names: :func:`plain_bytes` recognises gzip by its magic bytes, so parts
sealed before compression existed (``part-....jsonl``) read as they always did.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import zlib
from pathlib import Path

from klined.lake.layout import GZ_SUFFIX, OPEN_SUFFIX

TMP_SUFFIX = ".tmp"
GZIP_MAGIC = b"\x1f\x8b"
#: bytes read and compressed at a time
CHUNK = 1 << 20
#: compressed bytes inflated at a time when reading past damage
SALVAGE_CHUNK = 16 << 10
#: zlib's gzip container (header and trailer) with the default window
_GZIP_WBITS = 16 + zlib.MAX_WBITS

_fdatasync = getattr(os, "fdatasync", os.fsync)
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)


def sealed_path(open_path: Path) -> Path:
    """``<key>.open`` -> ``<key>.gz``."""
    return open_path.with_name(open_path.name[: -len(OPEN_SUFFIX)] + GZ_SUFFIX)


def tmp_path(open_path: Path) -> Path:
    """Where ``<key>.gz`` is built: ``<key>.gz.tmp`` (no reader lists it)."""
    return open_path.with_name(sealed_path(open_path).name + TMP_SUFFIX)


def compress_to_tmp(open_path: Path, level: int, *, sync: bool) -> int:
    """Step 1 (and, with ``sync``, the data half of step 2); returns the compressed size."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, _GZIP_WBITS)
    tmp = tmp_path(open_path)
    size = 0
    with open(open_path, "rb") as src:
        fd = os.open(tmp, _WRITE_FLAGS, 0o644)
        try:
            while chunk := src.read(CHUNK):
                size += _write_all(fd, compressor.compress(chunk))
            size += _write_all(fd, compressor.flush())
            if sync:
                _fdatasync(fd)
        finally:
            os.close(fd)
    return size


def _write_all(fd: int, data: bytes) -> int:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])
    return done


def install(open_path: Path) -> None:
    """Rename ``<key>.gz.tmp`` to ``<key>.gz`` (the sealed part appears, complete)."""
    os.replace(tmp_path(open_path), sealed_path(open_path))


def drop_open(open_path: Path) -> None:
    """Step 3, once the ``.gz`` is durable: the plain copy goes."""
    open_path.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    """Make a new or renamed directory entry durable (best effort: not every OS allows it)."""
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


def seal_compressed(open_path: Path, level: int) -> int:
    """All three steps for one part, each made durable; returns the ``.gz`` size."""
    size = compress_to_tmp(open_path, level, sync=True)
    install(open_path)
    fsync_dir(open_path.parent)
    drop_open(open_path)
    return size


def plain_bytes(data: bytes) -> tuple[bytes, bool]:
    """A part's JSONL bytes, and whether they are complete.

    Plain parts come back as they are. A gzip part is decompressed (several gzip members in
    a row too, as ``zcat`` reads them); when it is damaged (cut short, corrupt) the text up
    to the damage comes back with ``False``, for the reader to report.
    """
    if not data.startswith(GZIP_MAGIC):
        return data, True
    try:
        return gzip.decompress(data), True
    except (OSError, EOFError, zlib.error):
        return _salvage(data), False


def _salvage(data: bytes) -> bytes:
    """What a damaged gzip part holds before the damage: its members inflated raw (so a bad
    checksum costs nothing), a small chunk at a time (so an error loses little)."""
    out: list[bytes] = []
    view = memoryview(data)
    start = 0
    while start < len(view) and bytes(view[start : start + 2]) == GZIP_MAGIC:
        body = _member_body(view, start)
        if body is None:
            break
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        fed = body
        try:
            while fed < len(view) and not inflater.eof:
                out.append(inflater.decompress(view[fed : fed + SALVAGE_CHUNK]))
                fed = min(fed + SALVAGE_CHUNK, len(view))
        except zlib.error:
            break
        if not inflater.eof:
            with contextlib.suppress(zlib.error):
                out.append(inflater.flush())
            break
        start = fed - len(inflater.unused_data) + 8  # past the CRC-32 and size trailer
    return b"".join(out)


def _member_body(view: memoryview, start: int) -> int | None:
    """Where a gzip member's deflate data begins (past its header), or ``None``."""
    if len(view) < start + 10 or view[start + 2] != 8:  # 8: deflate, the only method
        return None
    flags = view[start + 3]
    pos = start + 10
    if flags & 4:  # FEXTRA
        if len(view) < pos + 2:
            return None
        pos += 2 + int.from_bytes(view[pos : pos + 2], "little")
    for flag in (8, 16):  # FNAME, FCOMMENT: zero-terminated
        if flags & flag:
            end = bytes(view[pos:]).find(b"\0")
            if end < 0:
                return None
            pos += end + 1
    if flags & 2:  # FHCRC
        pos += 2
    return pos if pos <= len(view) else None
