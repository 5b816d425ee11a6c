"""Silver: exactly one candle per (exchange, symbol, minute), chosen by precedence.

Rank (``klined.model.SOURCE_RANK``, as ``ops.source_rank()`` computes it in SQL; lower wins):
ws_final < rest < archive < trades < no_trades < ws_partial. Within a rank the latest exchange
event time wins, then the latest ingestion; the remaining columns only break exact ties, so the
choice is a pure function of the events.

Silver has two writers: the hourly merge (:func:`merge_hour`, the whole hour of bronze) and the
live writer (:func:`upsert_candles`, a micro-batch of proven-final candles straight from the
streams). Both run the one statement :func:`upsert_sql` generates, over a different source of
bronze-shaped events: the same choice among the events, the same precedence predicate, the same
gold marks and announcements, never two copies. A row is written only when the candidate
outranks the stored row (or ties it and is newer) AND differs from it, so a re-run writes nothing
(not even a row lock: unchanged rows are filtered before the upsert). A lower rank never
replaces a higher one, which also protects silver rows whose bronze partition has been dropped
by retention. Changed minutes mark their 5-minute gold buckets in ``ops.gold_dirty`` and are
announced on ``klined_candles`` (:mod:`klined.warehouse.notify`), both in the same transaction.

Concurrency: the merge, live writers of several daemons and a backfill may write the same
partition at once. Every writer locks its rows in key order (exchange, symbol, minute), so two
writers never wait for each other in a circle, and the precedence predicate is evaluated on
the row as committed (``ON CONFLICT ... WHERE``), so a better row is never overwritten by one
that read the table before it was written: no deadlock, no lost update. Gold marks are an
append-only queue and take no lock a gold refresh could hold (:mod:`klined.jobs.gold`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from klined.jobs.ops import StepResult
from klined.model import HOUR_MS, CandleRecord, floor_hour, to_datetime
from klined.warehouse.database import (
    BRONZE_TABLE,
    SILVER_TABLE,
    Database,
    analyze_partition,
    partition_name,
)
from klined.warehouse.notify import notify_sql

STEP = "silver"

#: memory for the per-hour sort of bronze (per connection, only during the merge)
WORK_MEM = "128MB"
#: refresh planner statistics of the hour's silver partition after writing this many rows
ANALYZE_AFTER_ROWS = 5_000

_VALUES = (
    "interval_seconds, interval_end, open, high, low, close, volume, quote_volume,"
    " trade_count, vwap, source, rank, event_ts, ingestion_ts"
)


def _tuple(alias: str) -> str:
    return "(" + ", ".join(f"{alias}.{c.strip()}" for c in _VALUES.split(",")) + ")"


def _outranks(new: str, old: str) -> str:
    """The precedence predicate: ``new`` may replace ``old`` (the caller adds "and differs")."""
    return (
        f"({new}.rank < {old}.rank OR ({new}.rank = {old}.rank"
        f" AND ({new}.event_ts, {new}.ingestion_ts) >= ({old}.event_ts, {old}.ingestion_ts)))"
    )


_COLUMNS = (
    "exchange, symbol, quote_asset, interval_seconds, interval_start, interval_end, open, high,"
    " low, close, volume, quote_volume, trade_count, vwap, source, rank, event_ts, ingestion_ts"
)
_UPDATE_SET = ", ".join(
    f"{c.strip()} = EXCLUDED.{c.strip()}" for c in ("quote_asset," + _VALUES).split(",")
)

#: the bronze-shaped columns an event source gives :func:`upsert_sql`
EVENT_COLUMNS = (
    "exchange, symbol, interval_seconds, interval_start, interval_end, open, high, low, close,"
    " volume, quote_volume, vwap, trade_count, source, is_final, session_id, event_ts,"
    " ingestion_ts, lake_key"
)


def upsert_sql(events: str) -> str:
    """The statement that writes silver from ``events``, a query of bronze-shaped rows
    (:data:`EVENT_COLUMNS`; ``source`` is the bronze origin ``ws``/``rest``/...).

    Parameters: ``$1``/``$2`` the range of minutes the events may touch (``[start, end)``,
    for partition pruning of silver), ``$3`` an exchange or NULL (the events query filters on
    it). Returns one row: ``candidates`` (minutes among the events), ``written`` (silver rows
    inserted or updated), ``inserted``.
    """
    return f"""
WITH ev AS ({events}),
cand AS (
    SELECT DISTINCT ON (b.exchange, b.symbol, b.interval_start)
           b.exchange, b.symbol, split_part(b.symbol, '/', 2) AS quote_asset,
           b.interval_seconds, b.interval_start, b.interval_end,
           b.open, b.high, b.low, b.close, b.volume, b.quote_volume, b.trade_count, b.vwap,
           ops.silver_source(b.source, b.is_final) AS source,
           ops.source_rank(b.source, b.is_final) AS rank,
           b.event_ts, b.ingestion_ts
    FROM ev b
    WHERE b.interval_seconds = 60
      AND b.interval_start = date_bin('1 minute', b.interval_start, timestamptz 'epoch')
    ORDER BY b.exchange, b.symbol, b.interval_start,
             ops.source_rank(b.source, b.is_final), b.event_ts DESC, b.ingestion_ts DESC,
             b.close DESC, b.high DESC, b.low, b.open, b.volume DESC,
             b.trade_count DESC NULLS LAST, b.quote_volume DESC NULLS LAST,
             b.vwap DESC NULLS LAST, b.session_id DESC NULLS LAST, b.lake_key DESC NULLS LAST
),
chg AS (
    SELECT c.*, s.exchange IS NULL AS is_new
    FROM cand c
    LEFT JOIN silver.fact_ohlcv s
           ON s.exchange = c.exchange AND s.symbol = c.symbol
          AND s.interval_start = c.interval_start
          AND s.interval_start >= $1 AND s.interval_start < $2
    WHERE s.exchange IS NULL
       OR ({_outranks("c", "s")} AND {_tuple("c")} IS DISTINCT FROM {_tuple("s")})
),
up AS (
    INSERT INTO silver.fact_ohlcv AS f ({_COLUMNS})
    SELECT {_COLUMNS} FROM chg
    ORDER BY exchange, symbol, interval_start
    ON CONFLICT (exchange, symbol, interval_start) DO UPDATE
       SET {_UPDATE_SET}, updated_at = now()
       WHERE {_outranks("EXCLUDED", "f")} AND {_tuple("EXCLUDED")} IS DISTINCT FROM {_tuple("f")}
    RETURNING f.exchange, f.symbol, f.interval_start, f.open, f.high, f.low, f.close, f.volume,
              f.quote_volume, f.trade_count, f.vwap, f.source
),
dirty AS (
    INSERT INTO ops.gold_dirty (exchange, symbol, bucket_start)
    SELECT DISTINCT exchange, symbol,
           date_bin('5 minutes', interval_start, timestamptz 'epoch')
    FROM up
),
announced AS ({notify_sql("up", "1m")})
SELECT (SELECT count(*) FROM cand) AS candidates,
       (SELECT count(*) FROM up) AS written,
       (SELECT count(*) FROM chg WHERE is_new) AS inserted,
       (SELECT count(*) FROM announced) AS announcements
"""


#: the hourly merge: one hour of bronze ($1, $2), one exchange or all ($3)
MERGE_SQL = upsert_sql(
    f"SELECT {EVENT_COLUMNS} FROM bronze.bronze_ohlcv_native"
    " WHERE interval_start >= $1 AND interval_start < $2"
    "   AND ($3::text IS NULL OR exchange = $3)"
)

_MS = "(timestamptz 'epoch' + ({}) * interval '1 millisecond')"

#: the live writer: a micro-batch of captured candles as arrays ($4..), positional
LIVE_SQL = upsert_sql(
    f"SELECT {EVENT_COLUMNS} FROM ("
    "  SELECT t.exchange, t.symbol, t.interval_seconds,"
    f"        {_MS.format('t.start_ms')} AS interval_start,"
    f"        {_MS.format('t.start_ms + t.interval_seconds * 1000')} AS interval_end,"
    "         t.open::numeric AS open, t.high::numeric AS high, t.low::numeric AS low,"
    "         t.close::numeric AS close, t.volume::numeric AS volume,"
    "         t.quote_volume::numeric AS quote_volume, t.vwap::numeric AS vwap,"
    "         t.trade_count, t.origin AS source, t.is_final, t.session_id,"
    f"        {_MS.format('t.event_ms')} AS event_ts,"
    f"        {_MS.format('t.ingestion_ms')} AS ingestion_ts,"
    "         NULL::text AS lake_key"
    "  FROM unnest($4::text[], $5::text[], $6::int[], $7::bigint[], $8::text[], $9::text[],"
    "              $10::text[], $11::text[], $12::text[], $13::text[], $14::text[],"
    "              $15::bigint[], $16::text[], $17::boolean[], $18::text[], $19::bigint[],"
    "              $20::bigint[])"
    "    AS t(exchange, symbol, interval_seconds, start_ms, open, high, low, close, volume,"
    "         quote_volume, vwap, trade_count, origin, is_final, session_id, event_ms,"
    "         ingestion_ms)"
    ") e WHERE interval_start >= $1 AND interval_start < $2"
    "   AND ($3::text IS NULL OR exchange = $3)"
)


@dataclass(frozen=True, slots=True)
class UpsertResult:
    """What one live upsert did: minutes among the candles, silver rows written, of which new."""

    candidates: int
    written: int
    inserted: int


async def upsert_candles(conn: asyncpg.Connection, candles: Sequence[CandleRecord]) -> UpsertResult:
    """Write captured candles into silver by precedence, on ``conn`` (inside the caller's
    transaction, or as one of its own). The caller makes sure the hours have partitions
    (:meth:`Database.ensure_partitions`)."""
    if not candles:
        return UpsertResult(0, 0, 0)
    lo = min(c.interval_start for c in candles)
    hi = max(c.interval_start for c in candles) + 1
    row = await conn.fetchrow(
        LIVE_SQL,
        to_datetime(lo),
        to_datetime(hi),
        None,
        [c.exchange for c in candles],
        [c.symbol for c in candles],
        [c.interval_seconds for c in candles],
        [c.interval_start for c in candles],
        [c.open for c in candles],
        [c.high for c in candles],
        [c.low for c in candles],
        [c.close for c in candles],
        [c.volume for c in candles],
        [c.quote_volume for c in candles],
        [c.vwap for c in candles],
        [c.trade_count for c in candles],
        [c.origin for c in candles],
        [c.is_final for c in candles],
        [c.session_id for c in candles],
        [c.event_ts for c in candles],
        [c.ingestion_ts for c in candles],
    )
    assert row is not None
    written = int(row["written"])
    return UpsertResult(int(row["candidates"]), written, min(written, int(row["inserted"])))


async def _analyze_bronze_if_stale(db: Database, hour: int) -> None:
    """ANALYZE the hour's bronze partition when the ledger loaded far more rows than its
    statistics know (a fresh partition reads as ~1000 rows and gets a poor plan)."""
    row = await db.fetchrow(
        "SELECT (SELECT reltuples FROM pg_class WHERE oid = to_regclass($1)) AS known,"
        " (SELECT coalesce(sum(rows), 0) FROM ops.lake_parts WHERE hour_start = $2) AS loaded",
        partition_name(BRONZE_TABLE, hour),
        to_datetime(hour),
    )
    if row is None or row["known"] is None:
        return
    if row["loaded"] >= ANALYZE_AFTER_ROWS and row["loaded"] > 2 * max(row["known"], 0):
        await analyze_partition(db, BRONZE_TABLE, hour)


async def merge_hour(db: Database, hour_ms: int, exchange: str | None = None) -> StepResult:
    """Merge one hour of bronze into silver (one transaction); re-runnable and idempotent.

    Returns rows = silver rows inserted or updated; details: ``candidates`` (minutes present
    in bronze), ``inserted``, ``updated``.
    """
    hour = floor_hour(hour_ms)
    await db.ensure_partitions([hour])
    await _analyze_bronze_if_stale(db, hour)
    async with db.transaction() as conn:
        await conn.execute(f"SET LOCAL work_mem = '{WORK_MEM}'")
        row = await conn.fetchrow(
            MERGE_SQL, to_datetime(hour), to_datetime(hour + HOUR_MS), exchange
        )
    assert row is not None
    written = int(row["written"])
    if written >= ANALYZE_AFTER_ROWS:
        await analyze_partition(db, SILVER_TABLE, hour)
    inserted = min(written, int(row["inserted"]))
    updated = written - inserted
    return StepResult(
        step=STEP,
        hour_ms=hour,
        rows=inserted + updated,
        details={
            "candidates": int(row["candidates"]),
            "inserted": inserted,
            "updated": updated,
            "exchange": exchange,
        },
    )
