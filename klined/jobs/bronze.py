"""Bronze: load lake parts into ``bronze.bronze_ohlcv_native`` with COPY.

Exactly once: a batch of parts is loaded in ONE transaction that first claims the parts in
``ops.lake_parts`` (``INSERT ... ON CONFLICT DO NOTHING``), then COPYs their rows, then records
their counts. A concurrent loader blocks on the claim and then skips what was loaded; a crash
or cancellation rolls the whole batch back, claims included, so a re-run loads it again.

Speed: rows go in as CSV (:mod:`klined.jobs.bronze_rows`), and lines are decoded with
msgspec (:func:`klined.lake.read_part`, which unzips sealed gzip parts first). Encoding
the next part overlaps with the server parsing the previous one (on the other core), so COPY
messages stay well under the socket buffer. Parts are read ahead of the COPY
(:mod:`klined.jobs.bronze_parts`).

A loaded part is proof its pair was captured in its hour, so the same transaction starts the
pair's coverage there if it started later (:mod:`klined.warehouse.coverage`).

The chain loads an hour's parts (:func:`load_hour`); a producer that wrote parts itself loads
them by name (:func:`load_parts`), a given number of hours per transaction (an archive file: a
month's worth), with a last statement of its own in the last transaction (its ledger row).

One bad part never stops an hour:

* A part that cannot be read (permissions, an I/O error, gone from disk and from S3, content
  that cannot be decoded at all) is **quarantined**: its ledger row says ``quarantined`` with
  the reason, its rows are not loaded, and the rest of the hour loads. Every later run tries
  it again (the chain picks hours with quarantined parts); once it reads, it is loaded exactly
  once and its row turns ``loaded``.
* **Bad lines** are skipped and counted per part (``bad_lines``, a sample of their numbers):
  torn or malformed JSON; a line whose exchange or symbol differs from the part's folder; a
  minute outside the part's hour or off the minute grid (the writer files every event under
  its candle's hour, so there is no late window for the *minute*: lateness shows only in
  ``ingestion_ts``, and a late event goes to a new part of the right hour); an interval other
  than one minute; a value PostgreSQL cannot hold (not a finite number, more digits than
  ``numeric`` keeps, a trade count beyond ``bigint``). The cheap checks run on every part;
  when one fails, that part is decoded again line by line to count exactly which lines are
  bad. A value only the server refuses fails the batch, which is then re-done in careful mode:
  every line is validated in Python.
"""

from __future__ import annotations

import operator
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import asyncpg
from anyio.streams.memory import MemoryObjectReceiveStream
from loguru import logger

from klined.jobs.bronze_parts import (
    PartSource,
    local_path,
    maybe_await,
    read_local,
    read_one,
    read_parts,
    ref_exchange,
)
from klined.jobs.bronze_rows import (
    BAD_LINE_SAMPLE,
    MAX_MS,
    Folder,
    careful_decode,
    copy_csv,
    encode_csv,
    folder_of,
    format_rows,
    one_chunk,
    validate_record,
)
from klined.jobs.ops import StepResult, mark_dirty_hours
from klined.lake import read_part
from klined.model import HOUR_MS, Candle, CandleRecord, floor_hour, from_datetime, iso, to_datetime
from klined.warehouse.coverage import extend_coverage
from klined.warehouse.database import Database

STEP = "bronze"

#: parts per transaction (a part is one pair's slice of an hour, typically a few hundred rows);
#: each transaction costs a claim, a ledger update and a commit while the COPY pipeline is
#: drained, some 30-70 ms on this class of machine, so batches are large
BATCH_PARTS = 2048
#: parts fetched ahead of the COPY (parts not on the local disk)
READ_AHEAD = 16
#: bytes per COPY data message: well under the socket's send buffer (~200 KiB for a local
#: socket), so the server always has the previous message to parse while the next is encoded;
#: a message larger than the buffer stalls the loader until the server has drained it
COPY_CHUNK = 64 * 1024
#: parts read in place between two passes of the event loop, at most
YIELD_PARTS = 8

_EXCHANGE = operator.attrgetter("exchange")
_PAIR = operator.attrgetter("exchange", "symbol")
_SERVER_REFUSED = (
    asyncpg.DataError,
    asyncpg.CheckViolationError,
    asyncpg.NotNullViolationError,
    asyncpg.CharacterNotInRepertoireError,
)


# ---------------------------------------------------------------------------------------------
# loading parts


class _PartStats:
    __slots__ = ("bad", "bad_numbers", "quarantined", "rows", "size")

    def __init__(self) -> None:
        self.size = 0
        self.rows = 0
        self.bad = 0
        self.bad_numbers: list[int] = []
        self.quarantined = ""  # why the part could not be read ("" when it was)


class _Batch:
    """What one batch transaction loaded."""

    def __init__(self) -> None:
        self.stats: dict[str, _PartStats] = {}
        self.dirty: set[tuple[str, int]] = set()
        #: (exchange, symbol) -> the first hour it was captured in, in this batch
        self.pairs: dict[tuple[str, str], int] = {}


def _why(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:500]


def _decode(
    data: bytes, folder: Folder | None, careful: bool, lo: int, hi: int, st: _PartStats
) -> tuple[list[tuple[Any, ...]], list[CandleRecord]]:
    """The part's COPY rows; bad lines counted in ``st``. Fast unless something is off."""
    if not careful:
        contents = read_part(data)
        records = contents.records
        inside, outside, _hours = format_rows(records, lo, hi)
        if folder is None or not records or folder.fits(records, bool(outside)):
            st.bad, st.bad_numbers = contents.bad_lines, list(contents.bad_line_numbers)
            return inside, records
    records, st.bad, st.bad_numbers = careful_decode(data, folder)
    inside, _outside, _hours = format_rows(records, lo, hi)
    return inside, records


#: what runs last inside a batch's transaction (:func:`load_parts`' ``finish``)
Finish = Callable[[asyncpg.Connection], Awaitable[None]]


async def _load_batch(
    db: Database,
    hours: Sequence[int],
    refs: Sequence[Any],
    source: PartSource,
    careful: bool,
    reason: str = "lake_parts",
    finish: Finish | None = None,
) -> _Batch:
    """One transaction: claim ``refs`` (``hours[i]`` is the hour of ``refs[i]``), COPY the
    claimed ones, record them; then ``finish(conn)``, whether any part was claimed or not."""
    batch = _Batch()
    hour_of = {r.key: h for r, h in zip(refs, hours, strict=True)}
    async with db.transaction() as conn:
        # a part is claimed once; a quarantined one is claimed again (it may read now)
        claimed_keys = {
            r["lake_key"]
            for r in await conn.fetch(
                "INSERT INTO ops.lake_parts AS p (lake_key, hour_start, exchange, size, rows)"
                " SELECT k, h, e, 0, 0"
                " FROM unnest($1::text[], $2::timestamptz[], $3::text[]) AS t(k, h, e)"
                " ON CONFLICT (lake_key) DO UPDATE SET status = 'loaded', reason = '',"
                "   attempts = p.attempts + 1, loaded_at = now()"
                " WHERE p.status = 'quarantined'"
                " RETURNING lake_key",
                [r.key for r in refs],
                [to_datetime(h) for h in hours],
                [ref_exchange(r) for r in refs],
            )
        }
        claimed = [r for r in refs if r.key in claimed_keys]
        if claimed:
            await _copy_claimed(conn, claimed, hour_of, source, careful, reason, batch)
        if finish is not None:
            await finish(conn)
    return batch


async def _copy_claimed(
    conn: asyncpg.Connection,
    claimed: Sequence[Any],
    hour_of: dict[str, int],
    source: PartSource,
    careful: bool,
    reason: str,
    batch: _Batch,
) -> None:
    """COPY the claimed parts' rows, record their counts, mark their hours, extend coverage."""
    paths = [local_path(source, r) for r in claimed]
    local = [(r, p) for r, p in zip(claimed, paths, strict=True) if p is not None]
    remote = [r for r, p in zip(claimed, paths, strict=True) if p is None]

    async def parts_data(
        fetched: MemoryObjectReceiveStream[tuple[Any, bytes | Exception]],
    ) -> AsyncIterator[tuple[Any, bytes | Exception]]:
        for n, (ref, path) in enumerate(local, 1):
            data = read_local(path)
            yield ref, (data if data is not None else await read_one(source, ref))
            if n % YIELD_PARTS == 0:
                # a run of parts with no rows for the COPY never reaches its checkpoint
                await anyio.lowlevel.checkpoint()
        async for item in fetched:
            yield item

    async def chunks(
        parts: MemoryObjectReceiveStream[tuple[Any, bytes | Exception]],
    ) -> AsyncIterator[bytes]:
        pending: list[bytes] = []
        pending_size = 0
        async for ref, data in parts_data(parts):
            st = batch.stats[ref.key] = _PartStats()
            if isinstance(data, Exception):
                st.quarantined = _why(data)
                continue
            st.size = len(data)
            hour = hour_of[ref.key]
            folder = folder_of(ref, hour)
            try:
                inside, records = _decode(data, folder, careful, hour, hour + HOUR_MS, st)
            except Exception as exc:  # content no decoder makes sense of (e.g. bad gzip)
                st.quarantined = _why(exc)
                continue
            st.rows = len(inside)
            if not inside:
                continue
            batch.dirty.update((e, hour) for e in set(map(_EXCHANGE, records)))
            for pair in set(map(_PAIR, records)):
                batch.pairs[pair] = min(hour, batch.pairs.get(pair, hour))
            encoded = encode_csv(inside, ref.key)
            pending.append(encoded)
            pending_size += len(encoded)
            if pending_size >= COPY_CHUNK:
                yield b"".join(pending)
                pending.clear()
                pending_size = 0
                # let the loop flush the socket (and other tasks run)
                await anyio.lowlevel.checkpoint()
        if pending:
            yield b"".join(pending)

    # Readers run ahead in the background; the COPY's own exception is kept out of the
    # task group so callers see it as itself, not wrapped in an ExceptionGroup.
    failure: Exception | None = None
    send, receive = anyio.create_memory_object_stream[tuple[Any, bytes | Exception]](READ_AHEAD)
    async with anyio.create_task_group() as tg:
        tg.start_soon(read_parts, source, remote, send)
        async with receive:
            try:
                await copy_csv(conn, chunks(receive))
            except Exception as exc:
                failure = exc
                tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    keys = list(batch.stats)
    await conn.execute(
        "UPDATE ops.lake_parts p SET size = t.size, rows = t.n, bad_lines = t.bad,"
        "   bad_line_numbers = t.nums::int[],"
        "   status = CASE WHEN t.why = '' THEN 'loaded' ELSE 'quarantined' END,"
        "   reason = t.why"
        " FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::int[], $5::text[],"
        "   $6::text[]) AS t(k, size, n, bad, nums, why)"
        " WHERE p.lake_key = t.k",
        keys,
        [batch.stats[k].size for k in keys],
        [batch.stats[k].rows for k in keys],
        [batch.stats[k].bad for k in keys],
        [
            "{" + ",".join(map(str, batch.stats[k].bad_numbers[:BAD_LINE_SAMPLE])) + "}"
            for k in keys
        ],
        [batch.stats[k].quarantined for k in keys],
    )
    await mark_dirty_hours(conn, batch.dirty, reason)
    # a part is proof the pair was captured in its hour: its coverage starts there at
    # the latest (klined.warehouse.coverage)
    by_hour: dict[int, list[tuple[str, str]]] = {}
    for pair, first in batch.pairs.items():
        by_hour.setdefault(first, []).append(pair)
    for first, pairs in sorted(by_hour.items()):
        await extend_coverage(conn, pairs, first)


def _missing_partition(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.CheckViolationError) and "no partition" in str(exc)


async def load_hour(
    db: Database,
    hour_ms: int,
    parts: PartSource,
    *,
    exchange: str | None = None,
    batch_parts: int = BATCH_PARTS,
) -> StepResult:
    """Load every part of the hour that is not loaded yet (quarantined ones are tried again);
    re-runnable.

    Returns rows loaded; details: ``parts_listed``, ``parts_loaded``, ``parts_skipped``
    (already loaded, here or by a concurrent loader), ``parts_quarantined`` (could not be
    read; recorded with the reason, tried again by later runs), ``bad_lines``, ``bytes``,
    ``dirty_hours`` and ``careful_batches``.
    """
    hour = floor_hour(hour_ms)
    refs = list(await maybe_await(parts.list_parts(hour)))
    if exchange is not None:
        refs = [r for r in refs if ref_exchange(r) == exchange]
    refs.sort(key=lambda r: r.key)
    done = await db.fetch(
        "SELECT lake_key FROM ops.lake_parts WHERE lake_key = ANY($1::text[])"
        " AND status = 'loaded'",
        [r.key for r in refs],
    )
    loaded = {r["lake_key"] for r in done}
    todo = [r for r in refs if r.key not in loaded]
    details: dict[str, int] = {
        "parts_listed": len(refs),
        "parts_loaded": 0,
        "parts_skipped": len(refs) - len(todo),
        "parts_quarantined": 0,
        "bad_lines": 0,
        "bytes": 0,
        "dirty_hours": 0,
        "careful_batches": 0,
    }
    if todo:
        await db.ensure_partitions([hour])
    rows = 0
    dirty: set[tuple[str, int]] = set()
    size = max(1, batch_parts)
    for start in range(0, len(todo), size):
        group = todo[start : start + size]
        batch = await _load_group(db, [hour] * len(group), group, parts, details, "lake_parts")
        stats = batch.stats
        quarantined = {k: st for k, st in stats.items() if st.quarantined}
        for key, st in quarantined.items():
            logger.error("bronze {}: part {} quarantined: {}", iso(hour), key, st.quarantined)
        rows += sum(s.rows for s in stats.values())
        details["parts_loaded"] += len(stats) - len(quarantined)
        details["parts_quarantined"] += len(quarantined)
        details["parts_skipped"] += len(group) - len(stats)
        details["bad_lines"] += sum(s.bad for s in stats.values())
        details["bytes"] += sum(s.size for s in stats.values())
        dirty.update(batch.dirty)
    details["dirty_hours"] = len(dirty)
    if details["bad_lines"]:
        logger.warning(
            "bronze {}: skipped {} torn, malformed or misfiled lines",
            iso(hour),
            details["bad_lines"],
        )
    return StepResult(step=STEP, hour_ms=hour, rows=rows, details=dict(details))


async def quarantined_parts(
    db: Database, *, since_ms: int | None = None, limit: int = 1000
) -> list[dict[str, Any]]:
    """Quarantined parts, newest hour first: ``lake_key``, ``hour_ms``, ``exchange``,
    ``reason``, ``attempts``, ``last_tried_ms`` (for status, the TUI and ``klined check``)."""
    rows = await db.fetch(
        "SELECT lake_key, hour_start, exchange, reason, attempts, loaded_at FROM ops.lake_parts"
        " WHERE status = 'quarantined' AND ($1::timestamptz IS NULL OR hour_start >= $1)"
        " ORDER BY hour_start DESC, lake_key LIMIT $2",
        to_datetime(since_ms) if since_ms is not None else None,
        limit,
    )
    return [
        {
            "lake_key": r["lake_key"],
            "hour_ms": from_datetime(r["hour_start"]),
            "exchange": r["exchange"],
            "reason": r["reason"],
            "attempts": r["attempts"],
            "last_tried_ms": from_datetime(r["loaded_at"]),
        }
        for r in rows
    ]


async def _load_group(
    db: Database,
    hours: Sequence[int],
    group: Sequence[Any],
    parts: PartSource,
    details: dict[str, int],
    reason: str,
    finish: Finish | None = None,
) -> _Batch:
    """One batch transaction; a value the server refuses makes it redo the batch carefully."""
    try:
        return await _load_batch(db, hours, group, parts, False, reason, finish)
    except _SERVER_REFUSED as exc:
        if _missing_partition(exc):
            db.forget_partitions()
            await db.ensure_partitions(hours)
        else:
            logger.warning(
                "bronze {}: the server refused a value ({}); loading {} parts carefully",
                iso(min(hours, default=0)),
                exc,
                len(group),
            )
            details["careful_batches"] = details.get("careful_batches", 0) + 1
        return await _load_batch(db, hours, group, parts, True, reason, finish)


async def load_parts(
    db: Database,
    refs: Sequence[Any],
    parts: PartSource,
    *,
    reason: str = "lake_parts",
    hours_per_batch: int = 1,
    finish: Finish | None = None,
) -> int:
    """Load these parts (refs with ``key``, ``hour_ms``, ideally ``exchange`` and
    ``local_path``) through the ledger, each exactly once; mark their hours dirty with
    ``reason``. Returns the rows loaded (0 for parts a loader took before).

    One transaction per ``hours_per_batch`` hours of parts, oldest first (every partition a
    transaction writes stays locked until it commits: a month of hours is fine, a year
    overflows the server's lock table). ``finish(conn)`` runs last inside the last batch's
    transaction (even when another loader had claimed every part of it), so what it writes
    commits with the last rows; with no parts at all it runs in a transaction of its own.
    """
    by_hour: dict[int, list[Any]] = {}
    for ref in refs:
        by_hour.setdefault(floor_hour(ref.hour_ms), []).append(ref)
    if not by_hour:
        if finish is not None:
            async with db.transaction() as conn:
                await finish(conn)
        return 0
    await db.ensure_partitions(by_hour)
    ordered = sorted(by_hour.items())
    size = max(1, hours_per_batch)
    rows = 0
    details: dict[str, int] = {}
    for start in range(0, len(ordered), size):
        chunk = ordered[start : start + size]
        group = [ref for _, refs_of_hour in chunk for ref in refs_of_hour]
        hours = [hour for hour, refs_of_hour in chunk for _ in refs_of_hour]
        last = start + size >= len(ordered)
        batch = await _load_group(
            db, hours, group, parts, details, reason, finish if last else None
        )
        rows += sum(s.rows for s in batch.stats.values())
    return rows


# ---------------------------------------------------------------------------------------------
# rows inserted directly (tests and tools: production rows enter through the lake)


async def insert_candles(
    db: Database,
    candles: Iterable[Candle | CandleRecord],
    *,
    reason: str = "gapfill",
    lake_key: str | None = None,
) -> int:
    """Append candles to bronze directly (one transaction); mark their hours.

    For tests and tools that build a warehouse by hand: rows inserted here are in no lake part,
    so a rebuild from the lake would not have them. The gap-fill and every other producer go
    through the lake (:mod:`klined.jobs.ingest`). Every candle is validated first; an invalid
    one raises ``ValueError`` and nothing is written. Returns the number of rows inserted.
    """
    items = list(candles)
    for candle in items:
        why = validate_record(candle)
        if why is not None:
            raise ValueError(
                f"refusing candle {candle.exchange} {candle.symbol}"
                f" @ {iso(candle.interval_start)}: {why}"
            )
    if not items:
        return 0
    rows, _, _ = format_rows(items, 0, MAX_MS)
    hours = {(c.exchange, floor_hour(c.interval_start)) for c in items}
    await db.ensure_partitions(h for _, h in hours)
    payload = encode_csv(rows, lake_key)
    async with db.transaction() as conn:
        await copy_csv(conn, one_chunk(payload))
        await mark_dirty_hours(conn, hours, reason)
    return len(rows)
