"""Bronze: load lake parts (and gap-fill rows) into ``bronze.bronze_ohlcv_native`` with COPY.

Exactly once: a batch of parts is loaded in ONE transaction that first claims the parts in
``ops.lake_parts`` (``INSERT ... ON CONFLICT DO NOTHING``), then COPYs their rows, then records
their counts. A concurrent loader blocks on the claim and then skips what was loaded; a crash
or cancellation rolls the whole batch back, claims included, so a re-run loads it again.

Speed: asyncpg's binary COPY encodes ``numeric`` from Python at ~60k rows/s on this class of
machine, far below what the server ingests, so rows go in as CSV. Lines are decoded with
msgspec (:func:`klined.lake.read_part`), timestamps rendered from a per-second cache, and each
part re-encoded as JSON arrays in C; when that is byte-for-byte valid CSV (no backslash escape,
the row separator unambiguous) it is streamed as is, otherwise rows are quoted by hand. Encoding
the next part overlaps with the server parsing the previous one (on the other core), so COPY
messages stay well under the socket buffer. Parts on the local disk (a :class:`LakeStore`
ref's ``local_path``) are read in place: a few tens of KB from the page cache take microseconds,
while a worker-thread hop per part, fighting the busy loop for the GIL, cost more than decoding
the part. Other parts are fetched a few at a time concurrently, ahead of the COPY.

Torn or malformed lines are skipped and counted per part. A value the server refuses (a
non-numeric price, NaN) fails the batch, which is then re-done in careful mode: every line is
validated in Python and the bad ones are counted like torn lines. Rows filed under another
hour's folder are loaded too (their partitions are created in the same transaction).
"""

from __future__ import annotations

import inspect
import operator
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol, TypeVar

import anyio
import anyio.lowlevel
import asyncpg
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from loguru import logger

from klined.jobs.ops import StepResult, mark_dirty_hours
from klined.lake import LakeStore, read_part
from klined.model import HOUR_MS, Candle, CandleRecord, Origin, floor_hour, iso, to_datetime
from klined.warehouse.database import BRONZE_TABLE, PARTITIONED_TABLES, Database

STEP = "bronze"

#: parts per transaction (a part is one pair's slice of an hour, typically a few hundred rows);
#: each transaction costs a claim, a ledger update and a commit while the COPY pipeline is
#: drained, some 30-70 ms on this class of machine, so batches are large
BATCH_PARTS = 2048
#: parts fetched ahead of the COPY, and concurrent fetchers (parts not on the local disk)
READ_AHEAD = 16
READERS = 4
#: bytes per COPY data message: well under the socket's send buffer (~200 KiB for a local
#: socket), so the server always has the previous message to parse while the next is encoded;
#: a message larger than the buffer stalls the loader until the server has drained it
COPY_CHUNK = 64 * 1024
#: parts read in place between two passes of the event loop, at most
YIELD_PARTS = 8
#: bad line numbers kept per part in the ledger
BAD_LINE_SAMPLE = 100

COPY_COLUMNS = [
    "exchange", "symbol", "native_symbol", "interval_seconds", "open", "high", "low", "close",
    "volume", "quote_volume", "vwap", "trade_count", "is_final", "source", "session_id",
    "interval_start", "interval_end", "event_ts", "ingestion_ts", "lake_key",
]  # fmt: skip
_PLAIN = operator.attrgetter(
    "exchange", "symbol", "native_symbol", "interval_seconds", "open", "high", "low", "close",
    "volume", "quote_volume", "vwap", "trade_count", "is_final", "origin", "session_id",
)  # fmt: skip
_EXCHANGE = operator.attrgetter("exchange")

_ENCODER = msgspec.json.Encoder()
_LINE_DECODER = msgspec.json.Decoder(CandleRecord)
_ORIGINS = frozenset(o.value for o in Origin)
_MAX_MS = 253_402_300_799_000  # 9999-12-31T23:59:59Z
_SERVER_REFUSED = (
    asyncpg.DataError,
    asyncpg.CheckViolationError,
    asyncpg.NotNullViolationError,
    asyncpg.CharacterNotInRepertoireError,
)

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# the part source


class PartSource(Protocol):
    """Where parts come from: :class:`klined.lake.LakeStore`, or a test's folder.

    ``list_parts(hour_ms)`` returns refs with a ``key`` (and ideally ``exchange``);
    ``read_part_bytes(ref)`` their bytes. Either may be a coroutine function or a plain one.
    """

    def list_parts(self, hour_ms: int) -> Any: ...

    def read_part_bytes(self, ref: Any) -> Any: ...


async def _maybe_await(value: T | Awaitable[T]) -> T:
    if inspect.isawaitable(value):
        return await value
    return value


def _ref_exchange(ref: Any) -> str:
    exchange = getattr(ref, "exchange", None)
    if isinstance(exchange, str) and exchange:
        return exchange
    key: str = ref.key
    head = key.split("/", 1)[0]
    return head.removeprefix("exchange=") if head.startswith("exchange=") else ""


# ---------------------------------------------------------------------------------------------
# validation and CSV encoding


def _bad_number(text: str | None, optional: bool) -> bool:
    if text is None:
        return not optional
    try:
        return not Decimal(text).is_finite()
    except (InvalidOperation, ValueError, TypeError):
        return True


def validate_record(rec: CandleRecord | Candle) -> str | None:
    """Why a record cannot go into bronze, or ``None``. (Careful mode and gap-fill rows.)"""
    if rec.origin not in _ORIGINS:
        return f"unknown origin {rec.origin!r}"
    for name in ("exchange", "symbol", "native_symbol"):
        value = getattr(rec, name)
        if not value or "\x00" in value:
            return f"bad {name} {value!r}"
    if rec.session_id is not None and "\x00" in rec.session_id:
        return "bad session_id"
    if not 0 < rec.interval_seconds <= 86_400:
        return f"bad interval_seconds {rec.interval_seconds}"
    for name in ("interval_start", "event_ts", "ingestion_ts"):
        if not 0 <= getattr(rec, name) < _MAX_MS - 86_400_000:
            return f"{name} out of range"
    for name in ("open", "high", "low", "close", "volume"):
        if _bad_number(getattr(rec, name), optional=False):
            return f"{name} is not a finite number: {getattr(rec, name)!r}"
    for name in ("quote_volume", "vwap"):
        if _bad_number(getattr(rec, name), optional=True):
            return f"{name} is not a finite number: {getattr(rec, name)!r}"
    if rec.trade_count is not None and not 0 <= rec.trade_count < 2**63:
        return f"bad trade_count {rec.trade_count}"
    return None


def _careful_decode(data: bytes) -> tuple[list[CandleRecord], int, list[int]]:
    records: list[CandleRecord] = []
    bad = 0
    numbers: list[int] = []
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rec: CandleRecord | None = _LINE_DECODER.decode(line)
        except msgspec.DecodeError:
            rec = None
        if rec is None or validate_record(rec) is not None:
            bad += 1
            if len(numbers) < BAD_LINE_SAMPLE:
                numbers.append(number)
            continue
        records.append(rec)
    return records, bad, numbers


_SECONDS: dict[int, str] = {}  # epoch second -> "YYYY-MM-DD HH:MM:SS"
_SPANS: dict[int, tuple[str, str]] = {}  # 1-minute interval_start ms -> (start, end) text
_MILLIS = [f".{i:03d}+00" for i in range(1000)]
_CACHE_MAX = 200_000


def _second(sec: int) -> str:
    if len(_SECONDS) > _CACHE_MAX:
        _SECONDS.clear()
    text = _SECONDS[sec] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(sec))
    return text


def _span(start_ms: int, seconds: int) -> tuple[str, str]:
    q, m = divmod(start_ms, 1000)
    span = (
        (_SECONDS.get(q) or _second(q)) + _MILLIS[m],
        (_SECONDS.get(q + seconds) or _second(q + seconds)) + _MILLIS[m],
    )
    if seconds == 60:
        if len(_SPANS) > _CACHE_MAX:
            _SPANS.clear()
        _SPANS[start_ms] = span
    return span


def format_rows(
    records: Iterable[CandleRecord | Candle], lo: int, hi: int
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], set[int]]:
    """COPY rows (``COPY_COLUMNS`` order, without lake_key) split by ``lo <= start < hi``.

    Timestamps become UTC text with an explicit ``+00`` (from caches: this loop is the
    loader's hot path); returns (inside, outside, the hours of the outside rows).
    """
    inside: list[tuple[Any, ...]] = []
    outside: list[tuple[Any, ...]] = []
    hours: set[int] = set()
    sec = _SECONDS
    ms = _MILLIS
    spans = _SPANS
    plain = _PLAIN
    keep = inside.append
    for r in records:
        s = r.interval_start
        if r.interval_seconds == 60:
            span = spans.get(s) or _span(s, 60)
        else:
            span = _span(s, r.interval_seconds)
        e = r.event_ts
        i = r.ingestion_ts
        row = (
            plain(r)
            + span
            + (
                (sec.get(e // 1000) or _second(e // 1000)) + ms[e % 1000],
                (sec.get(i // 1000) or _second(i // 1000)) + ms[i % 1000],
            )
        )
        if lo <= s < hi:
            keep(row)
        else:
            outside.append(row)
            hours.add(floor_hour(s))
    return inside, outside, hours


def _csv_value(value: object) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace('"', '""') + '"'


def encode_csv(rows: Sequence[tuple[Any, ...]], lake_key: str | None) -> bytes:
    """CSV for COPY (``NULL 'null'``): JSON arrays when that is exact, else quoted by hand."""
    if not rows:
        return b""
    key_ok = lake_key is None or not any(c in lake_key for c in '"\\\r\n')
    if key_ok:
        data = _ENCODER.encode(rows)
        if b"\\" not in data and data.count(b"],[") == len(rows) - 1:
            tail = (b',"' + lake_key.encode() + b'"\n') if lake_key is not None else b",null\n"
            return data[2:-2].replace(b"],[", tail) + tail
    key_text = _csv_value(lake_key)
    return "".join(",".join(map(_csv_value, row)) + "," + key_text + "\n" for row in rows).encode()


async def copy_csv(conn: asyncpg.Connection, chunks: AsyncIterator[bytes]) -> None:
    """COPY CSV chunks (``encode_csv``) into bronze on the caller's connection."""
    await conn.copy_to_table(
        "bronze_ohlcv_native",
        schema_name="bronze",
        source=chunks,
        columns=COPY_COLUMNS,
        format="csv",
        null="null",
    )


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _create_partitions_here(conn: asyncpg.Connection, hours: Iterable[int]) -> None:
    """Create partitions inside the caller's transaction (rare: rows outside their folder)."""
    await conn.execute(
        "SELECT ops.ensure_hour_partition(t, h)"
        " FROM unnest($1::text[]) t CROSS JOIN unnest($2::timestamptz[]) h",
        list(PARTITIONED_TABLES),
        [to_datetime(h) for h in sorted(hours)],
    )


# ---------------------------------------------------------------------------------------------
# loading parts


class _PartStats:
    __slots__ = ("bad", "bad_numbers", "rows", "size")

    def __init__(self) -> None:
        self.size = 0
        self.rows = 0
        self.bad = 0
        self.bad_numbers: list[int] = []


class _Batch:
    """What one batch transaction loaded."""

    def __init__(self) -> None:
        self.stats: dict[str, _PartStats] = {}
        self.dirty: set[tuple[str, int]] = set()
        self.outside: list[bytes] = []
        self.outside_hours: set[int] = set()


async def _read_parts(
    source: PartSource,
    refs: Sequence[Any],
    send: MemoryObjectSendStream[tuple[Any, bytes | Exception]],
) -> None:
    """Read parts with a few concurrent readers, in any order; a failure is sent as an item."""
    pending = iter(refs)

    async def reader(out: MemoryObjectSendStream[tuple[Any, bytes | Exception]]) -> None:
        async with out:
            for ref in pending:
                try:
                    data: bytes = await _maybe_await(source.read_part_bytes(ref))
                except anyio.get_cancelled_exc_class():
                    raise
                except Exception as exc:
                    await out.send((ref, exc))
                    return
                await out.send((ref, data))

    async with send, anyio.create_task_group() as tg:
        for _ in range(min(READERS, len(refs))):
            tg.start_soon(reader, send.clone())


def _local_path(source: PartSource, ref: Any) -> str | None:
    """A local copy of the part that can be read in place, skipping a worker-thread hop."""
    path = getattr(ref, "local_path", None)
    if isinstance(source, LakeStore) and isinstance(path, str) and path:
        return path
    return None


async def _read_one(source: PartSource, ref: Any) -> bytes:
    data: bytes = await _maybe_await(source.read_part_bytes(ref))
    return data


def _read_local(path: str) -> bytes | None:
    """The file's bytes, or ``None`` to let the source read it (gone, unreadable...)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


async def _load_batch(
    db: Database, hour: int, refs: Sequence[Any], source: PartSource, careful: bool
) -> _Batch:
    batch = _Batch()
    lo, hi = hour, hour + HOUR_MS
    async with db.transaction() as conn:
        claimed_keys = {
            r["lake_key"]
            for r in await conn.fetch(
                "INSERT INTO ops.lake_parts (lake_key, hour_start, exchange, size, rows)"
                " SELECT k, $2, e, 0, 0 FROM unnest($1::text[], $3::text[]) AS t(k, e)"
                " ON CONFLICT (lake_key) DO NOTHING RETURNING lake_key",
                [r.key for r in refs],
                to_datetime(hour),
                [_ref_exchange(r) for r in refs],
            )
        }
        claimed = [r for r in refs if r.key in claimed_keys]
        if not claimed:
            return batch

        paths = [_local_path(source, r) for r in claimed]
        local = [(r, p) for r, p in zip(claimed, paths, strict=True) if p is not None]
        remote = [r for r, p in zip(claimed, paths, strict=True) if p is None]

        async def parts_data(
            fetched: MemoryObjectReceiveStream[tuple[Any, bytes | Exception]],
        ) -> AsyncIterator[tuple[Any, bytes]]:
            for n, (ref, path) in enumerate(local, 1):
                data = _read_local(path)
                yield ref, (data if data is not None else await _read_one(source, ref))
                if n % YIELD_PARTS == 0:
                    # a run of parts with no rows for the COPY never reaches its checkpoint
                    await anyio.lowlevel.checkpoint()
            async for ref, item in fetched:
                if isinstance(item, Exception):
                    raise item
                yield ref, item

        async def chunks(
            parts: MemoryObjectReceiveStream[tuple[Any, bytes | Exception]],
        ) -> AsyncIterator[bytes]:
            pending: list[bytes] = []
            pending_size = 0
            async for ref, data in parts_data(parts):
                st = batch.stats[ref.key] = _PartStats()
                st.size = len(data)
                if careful:
                    records, st.bad, st.bad_numbers = _careful_decode(data)
                else:
                    contents = read_part(data)
                    records, st.bad = contents.records, contents.bad_lines
                    st.bad_numbers = list(contents.bad_line_numbers)
                st.rows = len(records)
                if not records:
                    continue
                inside, outside, hours = format_rows(records, lo, hi)
                exchanges = set(map(_EXCHANGE, records))
                batch.dirty.update((e, h) for e in exchanges for h in (hours | {hour}))
                if outside:
                    batch.outside.append(encode_csv(outside, ref.key))
                    batch.outside_hours.update(hours)
                if inside:
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
            tg.start_soon(_read_parts, source, remote, send)
            async with receive:
                try:
                    await copy_csv(conn, chunks(receive))
                except Exception as exc:
                    failure = exc
                    tg.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if batch.outside:
            unknown = batch.outside_hours - db.known_partitions(BRONZE_TABLE)
            if unknown:
                await _create_partitions_here(conn, unknown)
            await copy_csv(conn, _one_chunk(b"".join(batch.outside)))
        keys = list(batch.stats)
        await conn.execute(
            "UPDATE ops.lake_parts p SET size = t.size, rows = t.n, bad_lines = t.bad,"
            "   bad_line_numbers = t.nums::int[]"
            " FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::int[], $5::text[])"
            "   AS t(k, size, n, bad, nums)"
            " WHERE p.lake_key = t.k",
            keys,
            [batch.stats[k].size for k in keys],
            [batch.stats[k].rows for k in keys],
            [batch.stats[k].bad for k in keys],
            [
                "{" + ",".join(map(str, batch.stats[k].bad_numbers[:BAD_LINE_SAMPLE])) + "}"
                for k in keys
            ],
        )
        await mark_dirty_hours(conn, batch.dirty, "lake_parts")
    if batch.outside_hours:
        await db.ensure_partitions(batch.outside_hours)
    return batch


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
    """Load every part of the hour that is not in ``ops.lake_parts`` yet; re-runnable.

    Returns rows loaded; details: ``parts_listed``, ``parts_loaded``, ``parts_skipped``
    (already loaded, here or by a concurrent loader), ``bad_lines``, ``bytes``,
    ``dirty_hours`` and ``careful_batches``.
    """
    hour = floor_hour(hour_ms)
    refs = list(await _maybe_await(parts.list_parts(hour)))
    if exchange is not None:
        refs = [r for r in refs if _ref_exchange(r) == exchange]
    refs.sort(key=lambda r: r.key)
    done = await db.fetch(
        "SELECT lake_key FROM ops.lake_parts WHERE lake_key = ANY($1::text[])",
        [r.key for r in refs],
    )
    loaded = {r["lake_key"] for r in done}
    todo = [r for r in refs if r.key not in loaded]
    details: dict[str, int] = {
        "parts_listed": len(refs),
        "parts_loaded": 0,
        "parts_skipped": len(refs) - len(todo),
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
        try:
            batch = await _load_batch(db, hour, group, parts, careful=False)
        except _SERVER_REFUSED as exc:
            if _missing_partition(exc):
                db.forget_partitions()
                await db.ensure_partitions([hour])
            else:
                logger.warning(
                    "bronze {}: the server refused a value ({}); loading {} parts carefully",
                    iso(hour),
                    exc,
                    len(group),
                )
                details["careful_batches"] += 1
            batch = await _load_batch(db, hour, group, parts, careful=True)
        stats = batch.stats.values()
        rows += sum(s.rows for s in stats)
        details["parts_loaded"] += len(batch.stats)
        details["parts_skipped"] += len(group) - len(batch.stats)
        details["bad_lines"] += sum(s.bad for s in stats)
        details["bytes"] += sum(s.size for s in stats)
        dirty.update(batch.dirty)
    details["dirty_hours"] = len(dirty)
    if details["bad_lines"]:
        logger.warning(
            "bronze {}: skipped {} torn or malformed lines", iso(hour), details["bad_lines"]
        )
    return StepResult(step=STEP, hour_ms=hour, rows=rows, details=dict(details))


# ---------------------------------------------------------------------------------------------
# gap-fill rows


async def insert_candles(
    db: Database,
    candles: Iterable[Candle | CandleRecord],
    *,
    reason: str = "gapfill",
    lake_key: str | None = None,
) -> int:
    """Append REST / trades / no_trades candles to bronze (one transaction); mark their hours.

    Every candle is validated first; an invalid one raises ``ValueError`` and nothing is
    written. Returns the number of rows inserted.
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
    rows, _, _ = format_rows(items, 0, _MAX_MS)
    hours = {(c.exchange, floor_hour(c.interval_start)) for c in items}
    await db.ensure_partitions(h for _, h in hours)
    payload = encode_csv(rows, lake_key)
    async with db.transaction() as conn:
        await copy_csv(conn, _one_chunk(payload))
        await mark_dirty_hours(conn, hours, reason)
    return len(rows)
