"""Load one archive file into bronze: all of it or nothing, once per checksum, in the ledger.

This is the one place archive rows enter the warehouse (``klined import`` and ``klined
backfill`` both come here), so routing them through the lake later changes this module only.

One file, one transaction: its rows are COPYed into bronze as they are parsed (streamed, never
a whole file in memory), then ``ops.archive_files`` gets its row and the hours it touched are
marked dirty. A bad row raises :class:`klined.errors.ArchiveError` from inside the COPY, which
rolls the transaction back: nothing of that file is loaded, and the caller goes on with the
next one. So is a cancellation (Ctrl-C): the re-run loads the file again.

A file without a checksum of its own (Kraken's) is read twice: once checking every row (and
hashing it), then written. One that spans more than a month (Kraken's full history) is
written a month per transaction (every new partition a transaction touches stays locked until
it commits; years of hourly partitions overflow the server's lock table), the ledger row with
the last: an interruption part way leaves checked rows in bronze, their hours dirty, and no
ledger row, so the re-run loads the file again.

Exactly once: a file whose checksum is in the ledger for a range covering this load is not
read again (``unchanged``). A file that comes back with another checksum under the same name (a
revision) is loaded again, and the old ledger row is marked ``superseded``. Its rows replace
the old ones through silver's precedence: same rank (``archive``), later event time (the
import's time). A revision can change a minute; a minute the old version had and the new one
lacks keeps its old row (bronze is append-only and silver never deletes).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from klined.archives.binance import month_of
from klined.archives.candles import ALL_TIME, ArchiveCandles, FileSpec, FileStats, Row
from klined.archives.files import CsvReader, CsvRef
from klined.errors import ArchiveError
from klined.jobs import bronze
from klined.jobs.ops import mark_dirty_hours
from klined.model import MINUTE_MS, floor_hour, hours_between, iso, to_datetime
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
    the zip); otherwise a first pass reads the whole file, checking every row, and computes it
    with the span the file covers.
    """

    spec: FileSpec
    ref: CsvRef
    parse: RowParser
    sha256: str | None = None


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
    (progress). Cancellation propagates (the open transaction is rolled back).
    """
    spec = file.spec
    name = spec.name
    result = LoadResult(name, "failed")
    stamp = now_ms if now_ms is not None else int(time.time() * 1000)
    try:
        lo, hi = _span(file)
        checked = ""
        if file.sha256 is not None:
            sha = file.sha256
        else:
            # every row checked before anything is written; the checksum and the span with it
            sha, stats = await anyio.to_thread.run_sync(_check, file, abandon_on_cancel=True)
            checked = sha
            if stats.first_minute is None or stats.last_minute is None:
                result.status = "outside"
                return result
            lo, hi = stats.first_minute, stats.last_minute + MINUTE_MS
        if await covered(db, spec.exchange, sha, lo, hi):
            result.status = "unchanged"
            return result
        await db.ensure_partitions(hours_between(lo, hi))
        windows = _months(lo, hi) if checked else [(lo, ALL_TIME[1])]
        await _write(db, file, sha, (lo, hi), windows, checked, stamp, result, on_rows)
    except ArchiveError as exc:
        result.status, result.error = "failed", exc
    return result


def _check(file: ArchiveFile) -> tuple[str, FileStats]:
    """Read the whole file, checking every row (blocking: run it in a thread)."""
    name = file.spec.name
    with CsvReader(file.ref, name) as reader:
        candles = ArchiveCandles(file.spec, file.parse(reader.lines(), name), stamp_ms=0)
        for _ in candles:
            pass
    return reader.sha256, candles.stats


def _months(lo: int, hi: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` cut at UTC month starts: one transaction's worth each (at most 744
    partitions locked at a time; a year at once overflows the server's lock table)."""
    out = []
    start = lo
    while start < hi:
        end = min(hi, month_of(start)[1])
        out.append((start, end))
        start = end
    return out


async def _write(
    db: Database,
    file: ArchiveFile,
    sha: str,
    span: tuple[int, int],
    windows: list[tuple[int, int]],
    checked: str,
    stamp: int,
    result: LoadResult,
    on_rows: Callable[[int], None] | None,
) -> None:
    """Write the file's candles, one transaction per window (one, unless the file was checked
    ahead); the last one records the file in the ledger."""
    spec = file.spec
    key = lake_key(spec.exchange, spec.name, sha)
    exchange = spec.exchange
    with CsvReader(file.ref, spec.name) as reader:
        candles = ArchiveCandles(spec, file.parse(reader.lines(), spec.name), stamp_ms=stamp)
        rows = iter(candles)
        held: list[Any] = []  # a candle read past the current window

        def take(limit: int) -> list[Any]:
            """Up to CHUNK_ROWS candles before ``limit``."""
            batch: list[Any] = []
            if held:
                if held[0].interval_start >= limit:
                    return batch
                batch.append(held.pop())
            for candle in rows:
                if candle.interval_start >= limit:
                    held.append(candle)
                    break
                batch.append(candle)
                if len(batch) >= CHUNK_ROWS:
                    break
            return batch

        for i, (_, end) in enumerate(windows):
            hours: set[int] = set()

            async def chunks(end: int = end, hours: set[int] = hours) -> AsyncIterator[bytes]:
                while batch := take(end):
                    formatted, _, _ = bronze.format_rows(batch, 0, ALL_TIME[1])
                    hours.update(floor_hour(c.interval_start) for c in batch)
                    yield bronze.encode_csv(formatted, key)
                    if on_rows is not None:
                        on_rows(len(batch))
                    await anyio.lowlevel.checkpoint()

            async with db.transaction() as conn:
                await bronze.copy_csv(conn, chunks())
                await mark_dirty_hours(conn, ((exchange, h) for h in hours), REASON)
                result.hours.update(hours)
                if i == len(windows) - 1:
                    if checked and reader.sha256 != checked:
                        raise ArchiveError(spec.name, "the file changed while it was read")
                    result.replaced = await _record(conn, spec, sha, span, candles.stats)
    stats = candles.stats
    result.status = "loaded"
    result.rows, result.no_trades = stats.rows, stats.no_trades
    result.first_minute, result.last_minute = stats.first_minute, stats.last_minute


async def _record(
    conn: Any, spec: FileSpec, sha: str, span: tuple[int, int], stats: FileStats
) -> bool:
    """The file's ledger row (an earlier version under the same name is superseded); whether
    there was one."""
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
    return bool(replaced)


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
