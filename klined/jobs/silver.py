"""Silver: exactly one candle per (exchange, symbol, minute), chosen from bronze by precedence.

Rank (``klined.model.SOURCE_RANK``, lower wins): ws_final < rest < archive < trades <
no_trades < ws_partial. Within a rank the latest exchange event time wins, then the latest
ingestion; the remaining columns only break exact ties, so the choice is a pure function of
bronze.

The merge re-reads the whole hour of bronze (one partition) and writes a silver row only when
the candidate outranks the stored row (or ties it and is newer) AND differs from it, so a re-run
writes nothing (not even a row lock: unchanged rows are filtered before the upsert). A lower
rank never replaces a higher one, which also protects silver rows whose bronze partition has
been dropped by retention. Changed minutes mark their 5-minute gold buckets dirty in the same
transaction (``ops.gold_dirty``), for :func:`klined.jobs.gold.refresh`.
"""

from __future__ import annotations

from klined.jobs.ops import StepResult
from klined.model import HOUR_MS, floor_hour, to_datetime
from klined.warehouse.database import (
    BRONZE_TABLE,
    SILVER_TABLE,
    Database,
    analyze_partition,
    partition_name,
)

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

MERGE_SQL = f"""
WITH cand AS (
    SELECT DISTINCT ON (b.exchange, b.symbol, b.interval_start)
           b.exchange, b.symbol, split_part(b.symbol, '/', 2) AS quote_asset,
           b.interval_seconds, b.interval_start, b.interval_end,
           b.open, b.high, b.low, b.close, b.volume, b.quote_volume, b.trade_count, b.vwap,
           ops.silver_source(b.source, b.is_final) AS source,
           ops.source_rank(b.source, b.is_final) AS rank,
           b.event_ts, b.ingestion_ts
    FROM bronze.bronze_ohlcv_native b
    WHERE b.interval_start >= $1 AND b.interval_start < $2
      AND ($3::text IS NULL OR b.exchange = $3)
      AND b.interval_seconds = 60
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
    ON CONFLICT (exchange, symbol, interval_start) DO UPDATE
       SET {_UPDATE_SET}, updated_at = now()
       WHERE {_outranks("EXCLUDED", "f")} AND {_tuple("EXCLUDED")} IS DISTINCT FROM {_tuple("f")}
    RETURNING f.exchange, f.symbol, f.interval_start
),
dirty AS (
    INSERT INTO ops.gold_dirty (exchange, symbol, bucket_start)
    SELECT DISTINCT exchange, symbol,
           date_bin('5 minutes', interval_start, timestamptz 'epoch')
    FROM up
    ON CONFLICT DO NOTHING
)
SELECT (SELECT count(*) FROM cand) AS candidates,
       (SELECT count(*) FROM up) AS written,
       (SELECT count(*) FROM chg WHERE is_new) AS inserted
"""


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
