"""Reading the lake: decode parts (tolerating torn lines) and find local parts and hours.

A part written by a process that was killed may end in a torn line, and a disk can hand back
garbage: readers skip such lines, count them and report a sample of their line numbers, and
never raise on bad content. Sealed parts are gzip (``.jsonl.gz``) or, in lakes written before
compression, plain (``.jsonl``); :func:`read_part` reads both, telling them apart by content.
A damaged gzip part yields the lines before the damage, and the damage counts as one bad line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from klined.lake.compress import plain_bytes
from klined.lake.layout import (
    GZ_SUFFIX,
    OPEN_SUFFIX,
    PART_SUFFIX,
    SEALED_SUFFIXES,
    hour_from_parts,
    hour_path,
)
from klined.model import CandleRecord

#: how many bad line numbers a report keeps
BAD_LINE_SAMPLE = 20

_DECODER = msgspec.json.Decoder(CandleRecord)


class PartContents(msgspec.Struct, kw_only=True):
    """The records of one part, and what could not be read."""

    records: list[CandleRecord]
    bad_lines: int = 0
    bad_line_numbers: list[int] = msgspec.field(default_factory=list)  # 1-based, a sample


def read_part(data: bytes) -> PartContents:
    """Decode a part's bytes (plain or gzip); malformed or torn lines are skipped and
    reported, never raised."""
    data, complete = plain_bytes(data)
    if not complete:
        data = data[: data.rfind(b"\n") + 1]  # a line cut by the damage is part of it
        contents = _read_lines(data)
        contents.bad_lines += 1  # the damaged rest of a gzip part
        if len(contents.bad_line_numbers) < BAD_LINE_SAMPLE:
            contents.bad_line_numbers.append(data.count(b"\n") + 1)
        return contents
    try:
        return PartContents(records=_DECODER.decode_lines(data))
    except msgspec.DecodeError:
        pass  # some line is bad: fall back to line by line to keep every good one
    return _read_lines(data)


def _read_lines(data: bytes) -> PartContents:
    decode = _DECODER.decode
    records: list[CandleRecord] = []
    bad = 0
    sample: list[int] = []
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            records.append(decode(line))
        except msgspec.DecodeError:
            bad += 1
            if len(sample) < BAD_LINE_SAMPLE:
                sample.append(number)
    return PartContents(records=records, bad_lines=bad, bad_line_numbers=sample)


def read_part_file(path: str | os.PathLike[str]) -> PartContents:
    """:func:`read_part` of a local file."""
    return read_part(Path(path).read_bytes())


@dataclass(frozen=True, slots=True)
class LocalPart:
    """A part file under the local root. ``key`` is the sealed key (``.jsonl.gz``, or
    ``.jsonl`` for a plain part); an open part's is its base key (``.jsonl``, no ``.open``)."""

    key: str
    path: Path
    size: int
    closed: bool


def _subdirs(path: Path, prefix: str) -> list[Path]:
    try:
        with os.scandir(path) as it:
            names = sorted(e.name for e in it if e.name.startswith(prefix) and e.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [path / n for n in names]


def _hour_dirs(symbol_base: Path) -> Iterator[tuple[int, Path]]:
    """Every ``year=/month=/day=/hour=`` folder under a symbol's ``interval_minutes=1``."""
    for year in _subdirs(symbol_base, "year="):
        for month in _subdirs(year, "month="):
            for day in _subdirs(month, "day="):
                for hour in _subdirs(day, "hour="):
                    try:
                        hour_ms = hour_from_parts(
                            year.name[5:], month.name[6:], day.name[4:], hour.name[5:]
                        )
                    except ValueError:
                        continue  # a foreign folder; not ours to judge
                    yield hour_ms, hour


def _symbol_bases(root: Path, exchange: str | None) -> Iterator[Path]:
    exchanges = [root / f"exchange={exchange}"] if exchange else _subdirs(root, "exchange=")
    for ex_dir in exchanges:
        for sym_dir in _subdirs(ex_dir, "symbol="):
            yield sym_dir / "interval_minutes=1"


def _parts_in(folder: Path, root: Path, closed_only: bool) -> Iterator[LocalPart]:
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return
    rel = folder.relative_to(root).as_posix()
    names = {entry.name for entry in entries}
    for entry in entries:
        name = entry.name
        if not name.startswith("part-"):
            continue
        if name.endswith(SEALED_SUFFIXES):
            closed = True
        elif not closed_only and name.endswith(PART_SUFFIX + OPEN_SUFFIX):
            closed = False
            name = name[: -len(OPEN_SUFFIX)]
            if name + GZ_SUFFIX in names:
                continue  # sealed a moment ago: its .gz is listed, the .open is going
        else:
            continue
        try:
            size = entry.stat().st_size
        except FileNotFoundError:
            continue  # sealed or deleted while we looked
        yield LocalPart(key=f"{rel}/{name}", path=Path(entry.path), size=size, closed=closed)


def iter_local_parts(
    root: str | os.PathLike[str],
    *,
    hour_ms: int | None = None,
    exchange: str | None = None,
    closed_only: bool = True,
) -> Iterator[LocalPart]:
    """Local parts (sorted by key), optionally of one hour and/or one exchange.

    With ``closed_only=False`` open parts are included too (``closed=False``, key without
    ``.open``); their content may still grow.
    """
    root_path = Path(root)
    for base in _symbol_bases(root_path, exchange):
        if hour_ms is not None:
            yield from _parts_in(base / hour_path(hour_ms), root_path, closed_only)
        else:
            for _, folder in _hour_dirs(base):
                yield from _parts_in(folder, root_path, closed_only)


def local_hours(
    root: str | os.PathLike[str], *, exchange: str | None = None, closed_only: bool = True
) -> list[int]:
    """Sorted hour starts (ms) that have at least one local part."""
    root_path = Path(root)
    hours: set[int] = set()
    for base in _symbol_bases(root_path, exchange):
        for hour_ms, folder in _hour_dirs(base):
            if hour_ms in hours:
                continue
            if next(_parts_in(folder, root_path, closed_only), None) is not None:
                hours.add(hour_ms)
    return sorted(hours)
