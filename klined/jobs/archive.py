"""Load one archive file into bronze: all of it or nothing, once per checksum, in the ledger.

This is the one place archive rows enter the warehouse (``klined import`` and ``klined
backfill`` both come here), so routing them through the lake later changes this module only.

One file, one transaction: its rows are COPYed into bronze as they are parsed (streamed, never
a whole file in memory), then ``ops.archive_files`` gets its row and the hours it touched are
marked dirty. A bad row raises :class:`klined.errors.ArchiveError` from inside the COPY, which
rolls the transaction back: nothing of that file is loaded, and the caller goes on with the
next one. So is a cancellation (Ctrl-C): the re-run loads the file again.

Exactly once: a file whose checksum is in the ledger for a range covering this load is not
read again (``unchanged``). A file that comes back with another checksum under the same name (a
revision) is loaded again, and the old ledger row is marked ``superseded``. Its rows replace
the old ones through silver's precedence: same rank (``archive``), later event time (the
import's time). A revision can change a minute; a minute the old version had and the new one
lacks keeps its old row (bronze is append-only and silver never deletes).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel
import anyio.to_thread

from klined.archives.candles import ALL_TIME, ArchiveCandles, FileSpec, FileStats, Row
from klined.archives.files import CsvReader, CsvRef, survey
from klined.errors import ArchiveError
from klined.jobs import bronze
from klined.jobs.ops import mark_dirty_hours
from klined.model import MINUTE_MS, hours_between, iso, to_datetime
from klined.warehouse.database import Database

#: the ``ops.dirty_hours`` reason of archive loads
REASON = "archive"
#: candles parsed and encoded per COPY message
CHUNK_ROWS = 2000

RowParser = Callable[[Iterable[tuple[int, str]], str], Iterator[tuple[int, Row]]]


@dataclass(frozen=True, slots=True)
class ArchiveFile:
    """One file to load: what it is (``spec``), where its CSV is, how its rows read.

    ``sha256`` is known beforehand for Binance (its ``.CHECKSUM``, already verified against
    the zip); otherwise a first pass computes it, with the span the file covers. ``time_unit``
    turns the survey's first field into ms (Kraken: seconds).
    """

    spec: FileSpec
    ref: CsvRef
    parse: RowParser
    sha256: str | None = None
    time_unit: int = 1000


@dataclass(slots=True)
class LoadResult:
    name: str
    status: str  # loaded | unchanged | outside | failed
    rows: int = 0
    no_trades: int = 0
    first_minute: int | None = None
    last_minute: int | None = None
    hours: set[int] = field(default_factory=set)
    replaced: bool = False  # a revision: the same name was loaded before with another checksum
    error: ArchiveError | None = None

    @property
    def ok(self) -> bool:
        return self.status != "failed"


def lake_key(exchange: str, name: str, sha256: str) -> str:
    """What bronze's ``lake_key`` says about an archive row: the file and its checksum."""
    return f"archive/{exchange}/{name}#{sha256[:16]}"


async def covered(db: Database, exchange: str, sha256: str, start_ms: int, end_ms: int) -> bool:
    """Whether a file with this checksum was loaded for a range covering ``[start, end)``."""
    found = await db.fetchval(
        "SELECT 1 FROM ops.archive_files WHERE exchange = $1 AND sha256 = $2"
        " AND status = 'loaded' AND range_start <= $3 AND range_end >= $4 LIMIT 1",
        exchange,
        sha256,
        to_datetime(start_ms),
        to_datetime(end_ms),
    )
    return found is not None


def _span(file: ArchiveFile) -> tuple[int, int]:
    lo, hi = file.spec.window
    if file.spec.period is not None:
        lo, hi = max(lo, file.spec.period[0]), min(hi, file.spec.period[1])
    return lo, hi


async def load_file(
    db: Database,
    file: ArchiveFile,
    *,
    now_ms: int | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> LoadResult:
    """Load ``file`` (see the module doc); a bad file is a ``failed`` result, not an error.

    Statuses: ``loaded``, ``unchanged`` (the ledger has it for this range), ``outside`` (the
    file has no minute in the range), ``failed``. ``on_rows(n)`` is called as rows are written
    (progress). Cancellation propagates (the transaction is rolled back).
    """
    spec = file.spec
    name = spec.name
    result = LoadResult(name, "failed")
    stamp = now_ms if now_ms is not None else int(time.time() * 1000)
    try:
        sha = file.sha256
        lo, hi = _span(file)
        surveyed = ""
        if sha is None:
            found = await anyio.to_thread.run_sync(survey, file.ref, name, abandon_on_cancel=True)
            sha = surveyed = found.sha256
            if found.first is None or found.last is None:
                hi = lo  # no data lines
            else:
                lo = max(lo, found.first * file.time_unit)
                hi = min(hi, found.last * file.time_unit + MINUTE_MS)
        if hi <= lo:
            result.status = "outside"
            return result
        if await covered(db, spec.exchange, sha, lo, hi):
            result.status = "unchanged"
            return result
        await db.ensure_partitions(hours_between(lo, hi))
        await _write(db, file, sha, (lo, hi), surveyed, stamp, result, on_rows)
    except ArchiveError as exc:
        result.status, result.error = "failed", exc
    return result


async def _write(
    db: Database,
    file: ArchiveFile,
    sha: str,
    span: tuple[int, int],
    surveyed: str,
    stamp: int,
    result: LoadResult,
    on_rows: Callable[[int], None] | None,
) -> None:
    spec = file.spec
    key = lake_key(spec.exchange, spec.name, sha)
    stats = FileStats()
    read_sha = ""

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal stats, read_sha
        with CsvReader(file.ref, spec.name) as reader:
            candles = ArchiveCandles(spec, file.parse(reader.lines(), spec.name), stamp_ms=stamp)
            stats = candles.stats
            rows = iter(candles)
            while batch := list(itertools.islice(rows, CHUNK_ROWS)):
                formatted, _, _ = bronze.format_rows(batch, 0, ALL_TIME[1])
                yield bronze.encode_csv(formatted, key)
                if on_rows is not None:
                    on_rows(len(batch))
                await anyio.lowlevel.checkpoint()
            read_sha = reader.sha256

    async with db.transaction() as conn:
        await bronze.copy_csv(conn, chunks())
        if surveyed and read_sha != surveyed:
            raise ArchiveError(spec.name, "the file changed while it was read")
        replaced = await conn.fetchval(
            "WITH old AS (UPDATE ops.archive_files SET status = 'superseded'"
            "  WHERE exchange = $1 AND name = $2 AND sha256 <> $3 AND status = 'loaded'"
            "  RETURNING 1) SELECT count(*) FROM old",
            spec.exchange,
            spec.name,
            sha,
        )
        await conn.execute(
            "INSERT INTO ops.archive_files (exchange, symbol, name, sha256, range_start,"
            " range_end, first_minute, last_minute, rows, no_trades)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            spec.exchange,
            str(spec.pair),
            spec.name,
            sha,
            to_datetime(span[0]),
            to_datetime(span[1]),
            to_datetime(stats.first_minute) if stats.first_minute is not None else None,
            to_datetime(stats.last_minute) if stats.last_minute is not None else None,
            stats.rows,
            stats.no_trades,
        )
        hours: set[int] = set()
        if stats.first_minute is not None and stats.last_minute is not None:
            hours = set(hours_between(stats.first_minute, stats.last_minute + MINUTE_MS))
        await mark_dirty_hours(conn, ((spec.exchange, h) for h in hours), REASON)
    result.status = "loaded"
    result.rows, result.no_trades = stats.rows, stats.no_trades
    result.first_minute, result.last_minute = stats.first_minute, stats.last_minute
    result.hours = hours
    result.replaced = bool(replaced)


def describe(result: LoadResult) -> str:
    """One line for logs: what a load did."""
    if result.error is not None:
        return f"error: {result.error}"
    if result.status == "unchanged":
        return f"{result.name}: already loaded (same checksum)"
    if result.status == "outside":
        return f"{result.name}: no minute in the range"
    span = ""
    if result.first_minute is not None and result.last_minute is not None:
        span = f" {iso(result.first_minute)} .. {iso(result.last_minute)}"
    again = " (revised: replaces the earlier version)" if result.replaced else ""
    return f"{result.name}: {result.rows:,} rows{span}{again}"
