"""Load one archive file through the lake into bronze: all of it or nothing, once per checksum.

This is the one place archive rows enter the warehouse (``klined import`` and ``klined
backfill`` both come here). Like every other producer, it writes the lake first: the rows
become sealed parts (writer tag ``archive_``, each line's ``origin`` ``archive`` or
``no_trades``, one part per exchange / pair / hour), uploaded to S3 and verified when a bucket
is configured, then loaded through ``ops.lake_parts`` like any part
(:class:`klined.jobs.ingest.LakeIngest`): bronze's ``lake_key`` names the part, the load marks
the hours dirty and starts the pair's coverage at its first hour, and ``klined rebuild`` or
the Spark job finds the rows in the lake.

All or nothing: the file is read once, from its first row to its last, in a worker thread a
few thousand rows at a time (memory holds a chunk, never the file), and each hour's rows are
written as a part under a ``.writing`` name that nothing reads. Only when every row was read
and checked (a bad row, a truncated zip, a file that changed under the reader raise
:class:`klined.errors.ArchiveError` naming the file and the line) are the parts renamed to
their keys; on an error, or a cancellation (Ctrl-C) before that, they are deleted: nothing of
a bad file reaches the lake or bronze, and the caller goes on with the next file. (A ``kill
-9`` mid-read leaves ``.writing`` files that nothing reads.) A file without a checksum of its
own (Kraken's) is read once before that, checking every row and hashing it, so that a file
already loaded is recognised without writing anything.

Loading: 744 hours of parts per transaction (a 31-day month: every partition a transaction
writes stays locked until it commits, and years of hourly partitions overflow the server's lock
table), oldest first, so a Binance file is one transaction and a Kraken full history a month's
worth at a time. The file's row in ``ops.archive_files`` is written inside the last
transaction: a file is in the ledger exactly when all of its parts are loaded.

Exactly once: a file whose checksum is in the ledger for a range covering this load is not
read again (``unchanged``). An interruption after the parts are published and before the
ledger row commits (a crash, the database or S3 gone, Ctrl-C while loading a file spanning
months) leaves the file out of the ledger, so the next run writes and loads it again, as new
parts. The first attempt's parts stay in the lake: those it had loaded (the months before the
interruption), and any a chain or a rebuild loads later, put the same minutes into bronze a
second time, identical rows but for their earlier event time. That is harmless: silver keeps
one row per minute (the later one), with the same values.

A file that comes back with another checksum under the same name (a revision) is loaded
again, and the old ledger row is marked ``superseded``. Its rows replace the old ones through
silver's precedence: same rank (``archive``), later event time (the import's time). A revision
can change a minute; a minute the old version had and the new one lacks keeps its old row
(bronze is append-only and silver never deletes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread

from klined.archives.candles import ArchiveCandles, FileSpec, FileStats, Row
from klined.archives.files import CsvReader, CsvRef
from klined.errors import ArchiveError, LakeError
from klined.jobs.bronze_rows import MAX_MS, validate_record
from klined.jobs.ingest import LakeIngest
from klined.lake.sealed import StagedParts
from klined.model import HOUR_MS, MINUTE_MS, CandleRecord, iso, to_datetime
from klined.warehouse.database import Database

#: the ``ops.dirty_hours`` reason of archive loads
REASON = "archive"
#: the writer tag of archive parts (``part-<ms>-archive_<id>-<n>.jsonl.gz``)
TAG = "archive_"
#: candles read and staged per worker-thread hop (a cancellation waits for one at most)
CHUNK_ROWS = 20_000
#: hours of parts loaded per transaction: a 31-day month of partitions locked at a time
HOURS_PER_TRANSACTION = 744

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
    ingest: LakeIngest,
    now_ms: int | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> LoadResult:
    """Load ``file`` through ``ingest``'s lake (see the module doc); a bad file is a
    ``failed`` result, not an error.

    Statuses: ``loaded``, ``unchanged`` (the ledger has it for this range), ``outside`` (the
    file has no minute in the range), ``failed``. ``on_rows(n)`` is called as rows are read
    and written to the lake (progress). Cancellation propagates (staged parts are deleted, an
    open transaction is rolled back).
    """
    spec = file.spec
    result = LoadResult(spec.name, "failed")
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
        staged = ingest.staging()
        stats = await _stage(file, staged, stamp, checked, result, on_rows)

        async def record(conn: Any) -> None:
            result.replaced = await _record(conn, spec, sha, (lo, hi), stats)

        try:
            await ingest.load(
                staged.parts, reason=REASON, hours_per_batch=HOURS_PER_TRANSACTION, finish=record
            )
        except LakeError as exc:  # S3 refused the parts after its retries
            raise ArchiveError(spec.name, f"not loaded, the lake failed: {exc}") from None
    except ArchiveError as exc:
        result.status, result.error = "failed", exc
        return result
    result.status = "loaded"
    result.rows, result.no_trades = stats.rows, stats.no_trades
    result.first_minute, result.last_minute = stats.first_minute, stats.last_minute
    return result


def _check(file: ArchiveFile) -> tuple[str, FileStats]:
    """Read the whole file, checking every row (blocking: run it in a thread)."""
    name = file.spec.name
    with CsvReader(file.ref, name) as reader:
        candles = ArchiveCandles(file.spec, file.parse(reader.lines(), name), stamp_ms=0)
        for _ in candles:
            pass
    return reader.sha256, candles.stats


#: a candle whose numbers are this short in all holds nothing PostgreSQL refuses (``numeric``
#: keeps 131,072 digits before the point and 16,383 after)
_SHORT_NUMBERS = 16_000
#: the last minute bronze takes (a day before 9999-12-31T23:59:59Z, as its checks say)
_LAST_MINUTE = MAX_MS - 2 * 86_400_000


def _refusal(c: CandleRecord) -> str | None:
    """Why bronze would refuse a candle the file's checks let through, or None (fast)."""
    size = len(c.open) + len(c.high) + len(c.low) + len(c.close) + len(c.volume)
    size += len(c.quote_volume or "") + len(c.vwap or "")
    if size < _SHORT_NUMBERS and c.interval_start < _LAST_MINUTE:
        return None
    return validate_record(c)


class _Stager:
    """Reads a file's candles and stages them, whole hours at a time (blocking steps)."""

    def __init__(self, candles: Iterator[CandleRecord], staged: StagedParts, name: str) -> None:
        self.candles = candles
        self.staged = staged
        self.name = name
        self.held: list[CandleRecord] = []  # a candle read past the last step's hour
        self.done = False

    def step(self, max_rows: int) -> tuple[int, set[int]]:
        """Stage the next whole hours, ``max_rows`` candles or a little more unless the file
        ends; returns the candles staged and their hours."""
        batch, self.held = self.held, []
        for candle in self.candles:
            why = _refusal(candle)
            if why is not None:
                raise ArchiveError(self.name, f"the row for {iso(candle.interval_start)}: {why}")
            if len(batch) >= max_rows and (
                candle.interval_start // HOUR_MS != batch[-1].interval_start // HOUR_MS
            ):
                self.held.append(candle)
                break
            batch.append(candle)
        else:
            self.done = True
        if not batch:
            return 0, set()
        try:
            written = self.staged.stage(batch)
        except (OSError, LakeError) as exc:
            raise ArchiveError(self.name, f"cannot write it to the lake: {exc}") from None
        return len(batch), {p.hour_ms for p in written}


async def _stage(
    file: ArchiveFile,
    staged: StagedParts,
    stamp: int,
    checked: str,
    result: LoadResult,
    on_rows: Callable[[int], None] | None,
) -> FileStats:
    """Read the whole file into staged parts, then publish them; on any error or cancellation
    delete them. Returns what the file held (inside its window)."""
    spec = file.spec
    try:
        with CsvReader(file.ref, spec.name) as reader:
            candles = ArchiveCandles(spec, file.parse(reader.lines(), spec.name), stamp_ms=stamp)
            stager = _Stager(iter(candles), staged, spec.name)
            while not stager.done:
                n, hours = await anyio.to_thread.run_sync(stager.step, CHUNK_ROWS)
                result.hours.update(hours)
                if on_rows is not None and n:
                    on_rows(n)
        if checked and reader.sha256 != checked:
            raise ArchiveError(spec.name, "the file changed while it was read")
        try:
            await anyio.to_thread.run_sync(staged.publish)
        except OSError as exc:
            raise ArchiveError(spec.name, f"cannot write it to the lake: {exc}") from None
    except BaseException:
        result.hours.clear()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(staged.discard)
        raise
    return candles.stats


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
