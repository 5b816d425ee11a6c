"""Lake keys and local paths: one Hive-style layout, identical on disk and in S3.

A key is the part's path relative to the lake root (and, in S3, relative to the prefix)::

    exchange=binance/symbol=BTC-USD/interval_minutes=1/year=2026/month=11/day=26/
        hour=13/part-<first-event-ms>-<writer-id>-<counter>.jsonl.gz

A part is ``<key>.open`` (plain JSONL) while it is written and ``.jsonl.gz`` once sealed
(:mod:`klined.lake.compress`); lakes written before compression hold plain sealed
``.jsonl`` parts, which every reader still reads.

The hour is the candle's ``interval_start`` hour (UTC), never the arrival time. The writer id
is 64 random bits per writer instance after a tag naming the writer (``s1of2_`` for a capture
shard, ``fill_`` for gap-fill rows, ``archive_`` for archive files), so keys never collide
across processes, restarts or hosts sharing one bucket.
"""

from __future__ import annotations

import calendar
import re
import time
from pathlib import Path

import msgspec

from klined.errors import LakeError
from klined.model import HOUR_MS

PART_SUFFIX = ".jsonl"  # a part's base name; sealed plain by writers before compression
GZ_SUFFIX = ".gz"  # a sealed part is ``<base>.gz``
SEALED_SUFFIXES = (PART_SUFFIX + GZ_SUFFIX, PART_SUFFIX)
OPEN_SUFFIX = ".open"  # an open part is ``<base>.open`` until it is sealed
UPLOADED_SUFFIX = ".uploaded"  # sidecar marker written after a verified upload

_EXCHANGE_RE = re.compile(r"^[a-z0-9_]{1,32}$")
_SYMBOL_RE = re.compile(r"^[A-Z0-9]{1,20}/[A-Z0-9]{1,20}$")
_KEY_RE = re.compile(
    r"^exchange=(?P<exchange>[a-z0-9_]{1,32})"
    r"/symbol=(?P<base>[A-Z0-9]{1,20})-(?P<quote>[A-Z0-9]{1,20})"
    r"/interval_minutes=1/year=(?P<y>\d{4})/month=(?P<m>\d{2})/day=(?P<d>\d{2})/hour=(?P<h>\d{2})"
    r"/part-(?P<first>\d+)-(?P<seq>[A-Za-z0-9_-]+)\.jsonl(?:\.gz)?$"
)


class PartKey(msgspec.Struct, frozen=True, kw_only=True):
    """What a key says about its part."""

    key: str
    exchange: str
    symbol: str  # canonical BASE/QUOTE
    hour_ms: int
    first_event_ms: int
    seq: str


def lake_symbol(symbol: str) -> str:
    """``BTC/USD`` -> ``BTC-USD`` (the folder spelling)."""
    return symbol.replace("/", "-")


def check_names(exchange: str, symbol: str) -> None:
    """Refuse names that would not round-trip through a key (or escape the lake root)."""
    if not _EXCHANGE_RE.match(exchange):
        raise LakeError(f"exchange name {exchange!r} cannot be used in a lake key")
    if not _SYMBOL_RE.match(symbol):
        raise LakeError(f"symbol {symbol!r} is not a canonical BASE/QUOTE pair")


def hour_path(hour_ms: int) -> str:
    """``year=YYYY/month=MM/day=DD/hour=HH`` of the UTC hour containing ``hour_ms``."""
    t = time.gmtime(hour_ms // 1000)
    return f"year={t.tm_year:04d}/month={t.tm_mon:02d}/day={t.tm_mday:02d}/hour={t.tm_hour:02d}"


def symbol_dir(exchange: str, symbol: str) -> str:
    return f"exchange={exchange}/symbol={lake_symbol(symbol)}/interval_minutes=1"


def hour_dir(exchange: str, symbol: str, hour_ms: int) -> str:
    """The folder (relative key prefix, no trailing slash) of one pair's hour."""
    return f"{symbol_dir(exchange, symbol)}/{hour_path(hour_ms)}"


def part_key(exchange: str, symbol: str, hour_ms: int, first_event_ms: int, seq: str) -> str:
    """A part's base key (``.jsonl``): its open file is ``<base>.open``, its sealed one
    ``<base>.gz``."""
    return f"{hour_dir(exchange, symbol, hour_ms)}/part-{first_event_ms}-{seq}{PART_SUFFIX}"


def hour_from_parts(year: str, month: str, day: str, hour: str) -> int:
    """Hour start in ms from the folder fields (validated: a bad folder raises ValueError)."""
    y, m, d, h = int(year), int(month), int(day), int(hour)
    if not (1 <= m <= 12 and 1 <= d <= 31 and 0 <= h <= 23):
        raise ValueError(f"not an hour: {year}-{month}-{day} {hour}h")
    return calendar.timegm((y, m, d, h, 0, 0, 0, 0, 0)) * 1000


def parse_key(key: str) -> PartKey:
    """Parse a (prefix-free) part key; ``ValueError`` if it is not one of ours."""
    m = _KEY_RE.match(key)
    if m is None:
        raise ValueError(f"not a lake part key: {key!r}")
    hour_ms = hour_from_parts(m["y"], m["m"], m["d"], m["h"])
    if hour_ms % HOUR_MS:  # pragma: no cover - timegm of a whole hour
        raise ValueError(f"not an hour boundary: {key!r}")
    return PartKey(
        key=key,
        exchange=m["exchange"],
        symbol=f"{m['base']}/{m['quote']}",
        hour_ms=hour_ms,
        first_event_ms=int(m["first"]),
        seq=m["seq"],
    )


def s3_key(prefix: str, key: str) -> str:
    """The object key of a part under the configured prefix (no leading/trailing slash)."""
    return f"{prefix}/{key}" if prefix else key


def strip_prefix(prefix: str, object_key: str) -> str | None:
    """The lake key of an object, or ``None`` when it is outside the prefix."""
    if not prefix:
        return object_key
    head = prefix + "/"
    return object_key[len(head) :] if object_key.startswith(head) else None


def remove_empty_folders(folder: Path, root: Path) -> None:
    """Remove ``folder`` and its parents up to (not including) ``root`` while they are empty:
    deleting parts must not leave a tree of empty hour folders behind."""
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone, or not ours): stop climbing
            break
        folder = folder.parent
