"""Bronze: load lake parts (and gap-fill rows) into ``bronze.bronze_ohlcv_native`` with COPY.

Exactly once: a batch of parts is loaded in ONE transaction that first claims the parts in
``ops.lake_parts`` (``INSERT ... ON CONFLICT DO NOTHING``), then COPYs their rows, then records
their counts. A concurrent loader blocks on the claim and then skips what was loaded; a crash
or cancellation rolls the whole batch back, claims included, so a re-run loads it again.

Speed: asyncpg's binary COPY encodes ``numeric`` from Python at ~60k rows/s on this class of
machine, far below what the server ingests. So lines are decoded with msgspec, re-encoded as
JSON arrays (C speed) and, when that is byte-for-byte valid CSV (no backslash escapes, the row
separator unambiguous), streamed as CSV into a temporary staging table whose timestamps are
integer milliseconds; one ``INSERT ... SELECT`` then converts them into bronze. Decoding the next
part overlaps with the server parsing the previous one.

Torn or malformed lines are skipped and counted per part. A value the server refuses (a
non-numeric price, NaN) fails the batch, which is then re-done in careful mode: every line is
validated in Python and the bad ones are counted like torn lines.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol, TypeVar

import asyncpg
import msgspec
from loguru import logger

from klined.db import Database
from klined.jobs.ops import StepResult, mark_dirty_hours
from klined.lake import read_part
from klined.model import HOUR_MS, Candle, CandleRecord, Origin, floor_hour, iso, to_datetime

STEP = "bronze"

#: parts per transaction (each part is a pair's slice of an hour, typically a few hundred rows)
BATCH_PARTS = 256
#: bad line numbers kept per part in the ledger
BAD_LINE_SAMPLE = 100

_STAGE = "klined_bronze_stage"
_STAGE_FIELDS = (
    "exchange",
    "symbol",
    "native_symbol",
    "interval_start",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "quote_volume",
    "vwap",
    "trade_count",
    "is_final",
    "origin",
    "session_id",
    "event_ts",
    "ingestion_ts",
    "interval_seconds",
)
_STAGE_COLUMNS = [*_STAGE_FIELDS, "lake_key"]
_STAGE_DDL = f"""
CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (
    exchange text, symbol text, native_symbol text, interval_start bigint,
    open numeric, high numeric, low numeric, close numeric, volume numeric,
    quote_volume numeric, vwap numeric, trade_count bigint, is_final boolean, origin text,
    session_id text, event_ts bigint, ingestion_ts bigint, interval_seconds integer,
    lake_key text
) ON COMMIT DELETE ROWS
"""
_MS = "* interval '1 millisecond'"
_STAGE_TO_BRONZE = f"""
INSERT INTO bronze.bronze_ohlcv_native (
    exchange, symbol, native_symbol, interval_seconds, interval_start, interval_end,
    open, high, low, close, volume, quote_volume, vwap, trade_count, is_final, source,
    session_id, event_ts, ingestion_ts, lake_key)
SELECT exchange, symbol, native_symbol, interval_seconds,
       timestamptz 'epoch' + interval_start {_MS},
       timestamptz 'epoch' + (interval_start + interval_seconds * 1000::bigint) {_MS},
       open, high, low, close, volume, quote_volume, vwap, trade_count, is_final, origin,
       session_id,
       timestamptz 'epoch' + event_ts {_MS},
       timestamptz 'epoch' + ingestion_ts {_MS},
       lake_key
FROM pg_temp.{_STAGE}
"""
_STAGE_HOURS = f"""
SELECT exchange, interval_start - interval_start % {HOUR_MS} AS hour_ms, count(*) AS n
FROM pg_temp.{_STAGE} GROUP BY 1, 2
"""

_ROW = operator.attrgetter(*_STAGE_FIELDS)
_ENCODER = msgspec.json.Encoder()
_LINE_DECODER = msgspec.json.Decoder(CandleRecord)
_ORIGINS = frozenset(o.value for o in Origin)
_MAX_MS = 32_503_680_000_000  # year 3000: beyond it a timestamp is garbage, not data
_SERVER_REFUSED = (
    asyncpg.DataError,
    asyncpg.CheckViolationError,
    asyncpg.NotNullViolationError,
    asyncpg.CharacterNotInRepertoireError,
)

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# the part source


class PartRefLike(Protocol):
    @property
    def key(self) -> str: ...


class PartSource(Protocol):
    """Where parts come from: :class:`klined.lake.LakeStore`, or a test's folder.

    Either method may be a coroutine function or a plain one.
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


def _read_part(data: bytes) -> tuple[list[CandleRecord], int, list[int]]:
    contents = read_part(data)
    return contents.records, contents.bad_lines, list(contents.bad_line_numbers)


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
        if not 0 <= getattr(rec, name) < _MAX_MS:
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
            rec = _LINE_DECODER.decode(line)
        except msgspec.DecodeError:
            rec = None
        if rec is None or validate_record(rec) is not None:
            bad += 1
            if len(numbers) < BAD_LINE_SAMPLE:
                numbers.append(number)
            continue
        records.append(rec)
    return records, bad, numbers


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
    """CSV for the staging COPY (``NULL 'null'``): JSON arrays when that is exact, else by hand."""
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


# ---------------------------------------------------------------------------------------------
# loading parts


class _PartStats:
    __slots__ = ("bad", "bad_numbers", "rows", "size")

    def __init__(self) -> None:
        self.size = 0
        self.rows = 0
        self.bad = 0
        self.bad_numbers: list[int] = []


class _BatchOutcome(msgspec.Struct):
    parts: int = 0
    rows: int = 0
    bad_lines: int = 0
    size: int = 0
    hours: list[tuple[str, int]] = msgspec.field(default_factory=list)


async def _copy_stage(conn: asyncpg.Connection, chunks: AsyncIterator[bytes]) -> None:
    await conn.copy_to_table(
        _STAGE, source=chunks, columns=_STAGE_COLUMNS, format="csv", null="null"
    )


async def _load_batch(
    db: Database, hour_ms: int, refs: Sequence[Any], source: PartSource, careful: bool
) -> _BatchOutcome:
    stats: dict[str, _PartStats] = {}
    async with db.transaction() as conn:
        await conn.execute(_STAGE_DDL)
        claimed_keys = {
            r["lake_key"]
            for r in await conn.fetch(
                "INSERT INTO ops.lake_parts (lake_key, hour_start, exchange, size, rows)"
                " SELECT k, $2, e, 0, 0 FROM unnest($1::text[], $3::text[]) AS t(k, e)"
                " ON CONFLICT (lake_key) DO NOTHING RETURNING lake_key",
                [r.key for r in refs],
                to_datetime(hour_ms),
                [_ref_exchange(r) for r in refs],
            )
        }
        claimed = [r for r in refs if r.key in claimed_keys]
        if not claimed:
            return _BatchOutcome()

        async def chunks() -> AsyncIterator[bytes]:
            for ref in claimed:
                data: bytes = await _maybe_await(source.read_part_bytes(ref))
                st = stats[ref.key] = _PartStats()
                st.size = len(data)
                if careful:
                    records, st.bad, st.bad_numbers = _careful_decode(data)
                else:
                    records, st.bad, st.bad_numbers = _read_part(data)
                st.rows = len(records)
                if records:
                    yield encode_csv([_ROW(r) for r in records], ref.key)

        await _copy_stage(conn, chunks())
        groups = await conn.fetch(_STAGE_HOURS)
        extra = sorted({g["hour_ms"] for g in groups} - {hour_ms})
        if extra:
            # rows filed under another hour's folder: create their partitions in this
            # transaction (rare; it briefly locks the parents until commit)
            await conn.execute(
                "SELECT ops.ensure_hour_partition(t, h)"
                " FROM unnest($1::text[]) t CROSS JOIN unnest($2::timestamptz[]) h",
                ["bronze.bronze_ohlcv_native", "silver.fact_ohlcv"],
                [to_datetime(h) for h in extra],
            )
        await conn.execute(_STAGE_TO_BRONZE)
        keys = list(stats)
        await conn.execute(
            "UPDATE ops.lake_parts p SET size = t.size, rows = t.n, bad_lines = t.bad,"
            "   bad_line_numbers = t.nums::int[]"
            " FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::int[], $5::text[])"
            "   AS t(k, size, n, bad, nums)"
            " WHERE p.lake_key = t.k",
            keys,
            [stats[k].size for k in keys],
            [stats[k].rows for k in keys],
            [stats[k].bad for k in keys],
            ["{" + ",".join(map(str, stats[k].bad_numbers[:BAD_LINE_SAMPLE])) + "}" for k in keys],
        )
        hours = [(g["exchange"], g["hour_ms"]) for g in groups]
        await mark_dirty_hours(conn, hours, "lake_parts")
    if extra:
        await db.ensure_partitions(extra)
    return _BatchOutcome(
        parts=len(stats),
        rows=sum(s.rows for s in stats.values()),
        bad_lines=sum(s.bad for s in stats.values()),
        size=sum(s.size for s in stats.values()),
        hours=hours,
    )


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
    (already loaded), ``bad_lines``, ``bytes``, ``dirty_hours`` and ``careful_batches``.
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
    result = StepResult(step=STEP, hour_ms=hour)
    details = {
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
    dirty: set[tuple[str, int]] = set()
    for start in range(0, len(todo), max(1, batch_parts)):
        batch = todo[start : start + max(1, batch_parts)]
        try:
            outcome = await _load_batch(db, hour, batch, parts, careful=False)
        except _SERVER_REFUSED as exc:
            logger.warning(
                "bronze {}: the server refused a value ({}); re-loading {} parts carefully",
                to_datetime(hour).isoformat(),
                exc,
                len(batch),
            )
            details["careful_batches"] += 1
            outcome = await _load_batch(db, hour, batch, parts, careful=True)
        result.rows += outcome.rows
        details["parts_loaded"] += outcome.parts
        details["bad_lines"] += outcome.bad_lines
        details["bytes"] += outcome.size
        details["parts_skipped"] += len(batch) - outcome.parts
        dirty.update(outcome.hours)
    details["dirty_hours"] = len(dirty)
    if details["bad_lines"]:
        logger.warning(
            "bronze {}: skipped {} torn or malformed lines",
            to_datetime(hour).isoformat(),
            details["bad_lines"],
        )
    result.details = details
    return result


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
    rows = []
    hours: set[tuple[str, int]] = set()
    for candle in candles:
        why = validate_record(candle)
        if why is not None:
            raise ValueError(
                f"refusing candle {candle.exchange} {candle.symbol}"
                f" @ {iso(candle.interval_start)}: {why}"
            )
        rows.append(_ROW(candle))
        hours.add((candle.exchange, floor_hour(candle.interval_start)))
    if not rows:
        return 0
    await db.ensure_partitions(h for _, h in hours)
    payload = encode_csv(rows, lake_key)

    async def one_chunk() -> AsyncIterator[bytes]:
        yield payload

    async with db.transaction() as conn:
        await conn.execute(_STAGE_DDL)
        await _copy_stage(conn, one_chunk())
        await conn.execute(_STAGE_TO_BRONZE)
        await mark_dirty_hours(conn, hours, reason)
    return len(rows)
