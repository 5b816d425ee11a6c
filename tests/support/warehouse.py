"""Shared helpers for the warehouse tests (no tests here).

One database per test module with the schema applied once (``warehouse_dsn``); each test gets
an open :class:`Database` with every data table truncated (``wdb``). Builders write candles to
bronze directly or as lake parts; ``snapshot`` hashes tables so idempotency is asserted on data.
"""

from __future__ import annotations

import asyncio
import gzip
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from klined.config import Config, DatabaseConfig
from klined.lake import part_key
from klined.model import HOUR_MS, MINUTE_MS, Candle, Pair
from klined.warehouse.database import Database, open_database, with_database

#: 2026-03-01T10:00:00Z
H0 = 1_772_359_200_000

DATA_TABLES = (
    "bronze.bronze_ohlcv_native",
    "silver.fact_ohlcv",
    "gold.ohlcv_5m",
    "gold.ohlcv_15m",
    "gold.ohlcv_30m",
    "gold.ohlcv_1h",
    "gold.ohlcv_4h",
    "gold.ohlcv_1d",
    "ops.pairs",
    "ops.lake_parts",
    "ops.job_runs",
    "ops.dirty_hours",
    "ops.gold_dirty",
    "ops.gapfill_attempts",
    "ops.backfill_progress",
    "ops.publish_dirty",
    "ops.published",
    "monitoring.hourly_completeness",
    "monitoring.stream_incidents",
)

#: columns that hold wall-clock times of the run itself (excluded when two runs are compared)
WALL_CLOCK = {
    "silver.fact_ohlcv": ("updated_at",),
    "gold.ohlcv_5m": ("ingestion_ts",),
    "gold.ohlcv_15m": ("ingestion_ts",),
    "gold.ohlcv_30m": ("ingestion_ts",),
    "gold.ohlcv_1h": ("ingestion_ts",),
    "gold.ohlcv_4h": ("ingestion_ts",),
    "gold.ohlcv_1d": ("ingestion_ts",),
    "ops.publish_dirty": ("marked_at", "seq"),
    "ops.published": ("published_at",),
    "monitoring.hourly_completeness": ("refreshed_at",),
    "ops.lake_parts": ("loaded_at",),
    "ops.pairs": ("updated_at",),
    "ops.dirty_hours": ("marked_at", "seq"),
}

GOLD_TABLES = tuple(f"gold.ohlcv_{t}" for t in ("5m", "15m", "30m", "1h", "4h", "1d"))


def config_for(dsn: str, **database: Any) -> Config:
    return Config(database=DatabaseConfig(dsn=dsn, **database))


async def _admin(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def warehouse_dsn(pg_server_dsn: str) -> Iterator[str]:
    """A database with the schema applied, shared by one test module."""
    name = "w_" + uuid.uuid4().hex[:12]
    asyncio.run(_admin(pg_server_dsn, f'CREATE DATABASE "{name}"'))
    dsn = with_database(pg_server_dsn, name)

    async def apply() -> None:
        async with open_database(config_for(dsn), apply_schema=True):
            pass

    asyncio.run(apply())
    try:
        yield dsn
    finally:
        asyncio.run(_admin(pg_server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def truncate_all(db: Database) -> None:
    await db.execute("TRUNCATE " + ", ".join(DATA_TABLES))


@pytest.fixture
async def wdb(warehouse_dsn: str) -> AsyncIterator[Database]:
    """An open Database on the module's warehouse, every data table empty."""
    async with open_database(config_for(warehouse_dsn)) as db:
        await truncate_all(db)
        yield db


# ---------------------------------------------------------------------------------------------
# builders


def candle(
    minute: int,
    *,
    exchange: str = "binance",
    symbol: str = "BTC/USD",
    origin: str = "ws",
    final: bool = True,
    price: str = "100",
    high: str | None = None,
    low: str | None = None,
    close: str | None = None,
    volume: str = "1.5",
    trade_count: int | None = 3,
    event_ts: int | None = None,
    ingestion_ts: int | None = None,
    quote_volume: str | None = "150",
    vwap: str | None = None,
) -> Candle:
    """A 1-minute candle starting at ``minute`` (ms); O=price, H/L/C default to it."""
    event = minute + MINUTE_MS if event_ts is None else event_ts
    return Candle(
        exchange=exchange,
        symbol=symbol,
        native_symbol=symbol.replace("/", ""),
        interval_start=minute,
        open=price,
        high=high or price,
        low=low or price,
        close=close or price,
        volume=volume,
        quote_volume=quote_volume,
        vwap=vwap,
        trade_count=trade_count,
        is_final=final,
        origin=origin,
        session_id="s1" if origin == "ws" else None,
        event_ts=event,
        ingestion_ts=event + 50 if ingestion_ts is None else ingestion_ts,
        raw=msgspec.Raw(b'{"x":1}'),
    )


_ENCODER = msgspec.json.Encoder()


def part_bytes(candles: list[Candle]) -> bytes:
    return b"".join(_ENCODER.encode(c) + b"\n" for c in candles)


def write_part(
    root: Path,
    candles: list[Candle],
    seq: str = "t-0",
    *,
    hour_ms: int | None = None,
    compressed: bool = False,
) -> str:
    """Write a sealed lake part (all candles of one exchange/symbol); return its key.

    Plain ``.jsonl`` by default (what lakes written before compression hold), gzip
    ``.jsonl.gz`` (what the writer seals today) with ``compressed``."""
    first = candles[0]
    hour = hour_ms if hour_ms is not None else first.interval_start - first.interval_start % HOUR_MS
    key = part_key(first.exchange, first.symbol, hour, first.event_ts, seq)
    data = part_bytes(candles)
    if compressed:
        key += ".gz"
        data = gzip.compress(data, mtime=0)
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return key


def pairs_config(pairs: Mapping[str, list[str]]) -> dict[str, list[tuple[Pair, str]]]:
    return {
        ex: [(Pair.parse(p), p.replace("/", "")) for p in symbols] for ex, symbols in pairs.items()
    }


# ---------------------------------------------------------------------------------------------
# observing tables


async def table_hash(db: Database, table: str, exclude: tuple[str, ...] = ()) -> str:
    """md5 of every row as text (in a UTC session), optionally without some columns."""
    cols = await db.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0"
        " AND NOT attisdropped ORDER BY attnum",
        table,
    )
    names = [r["attname"] for r in cols if r["attname"] not in exclude]
    row = ", ".join(f'"{n}"' for n in names)
    value: str = await db.fetchval(
        f"SELECT coalesce(md5(string_agg(r::text, '|' ORDER BY r::text)), '')"
        f" FROM (SELECT {row} FROM {table}) r"
    )
    return value


async def snapshot(db: Database, *, wall_clock: bool = True) -> dict[str, str]:
    """Hashes of every data table except the job log; without wall-clock columns if asked."""
    out: dict[str, str] = {}
    for table in DATA_TABLES:
        if table == "ops.job_runs":
            continue
        exclude = () if wall_clock else WALL_CLOCK.get(table, ())
        out[table] = await table_hash(db, table, exclude)
    return out


async def xmins(db: Database, table: str) -> dict[tuple[Any, ...], str]:
    rows = await db.fetch(f"SELECT exchange, symbol, interval_start, xmin::text AS x FROM {table}")
    return {(r["exchange"], r["symbol"], r["interval_start"]): r["x"] for r in rows}


async def silver_rows(db: Database) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT * FROM silver.fact_ohlcv ORDER BY exchange, symbol, interval_start"
    )
