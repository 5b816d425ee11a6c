"""Silver precedence: one row per minute, higher rank never replaced, ties by event/ingestion."""

from __future__ import annotations

from decimal import Decimal

import pytest

from klined.jobs import bronze, silver
from klined.model import DAY_MS, HOUR_MS, MINUTE_MS, SOURCE_RANK, Candle, Source
from klined.warehouse.database import Database
from tests.support.warehouse import H0, candle, table_hash, warehouse_dsn, wdb, xmins

__all__ = ["warehouse_dsn", "wdb"]

pytestmark = pytest.mark.anyio

M = H0 + 7 * MINUTE_MS


async def _merge(db: Database, *candles: Candle) -> int:
    await bronze.insert_candles(db, list(candles))
    result = await silver.merge_hour(db, H0)
    return result.rows


async def _row(db: Database, minute: int = M) -> tuple[str, str, int]:
    """(source, close, rank) of the silver row for ``minute``."""
    row = await db.fetchrow(
        "SELECT source, close, rank FROM silver.fact_ohlcv WHERE interval_start = to_timestamp($1)",
        minute / 1000,
    )
    assert row is not None
    return row["source"], str(row["close"]), row["rank"]


async def test_rest_never_replaces_a_final_ws_candle(wdb: Database) -> None:
    await _merge(wdb, candle(M, price="10"))
    assert await _row(wdb) == ("ws_final", "10", 1)
    # REST fetched later (later event and ingestion time) still loses to the final
    assert await _merge(wdb, candle(M, origin="rest", price="11", event_ts=M + HOUR_MS)) == 0
    assert await _row(wdb) == ("ws_final", "10", 1)


async def test_rest_replaces_a_partial_ws_candle(wdb: Database) -> None:
    await _merge(wdb, candle(M, final=False, price="10", event_ts=M + 30_000))
    assert await _row(wdb) == ("ws_partial", "10", SOURCE_RANK[Source.WS_PARTIAL])
    assert await _merge(wdb, candle(M, origin="rest", price="11", event_ts=M + 90_000)) == 1
    assert await _row(wdb) == ("rest", "11", 2)
    # a later partial update (e.g. a reconnect snapshot re-sending the minute) does not win back
    assert await _merge(wdb, candle(M, final=False, price="12", event_ts=M + 200_000)) == 0
    assert await _row(wdb) == ("rest", "11", 2)


@pytest.mark.parametrize(
    ("better", "worse"),
    [
        ("rest", "trades"),
        ("trades", "no_trades"),
        ("rest", "no_trades"),
        ("rest", "archive"),
        ("archive", "trades"),
        ("archive", "no_trades"),
    ],
)
async def test_rank_order_whatever_the_arrival_order(
    wdb: Database, better: str, worse: str
) -> None:
    # the worse source arrives last and newest: it still loses
    await _merge(wdb, candle(M, origin=better, price="10", event_ts=M + 60_000))
    await _merge(wdb, candle(M, origin=worse, price="11", event_ts=M + 600_000))
    assert await _row(wdb) == (better, "10", SOURCE_RANK[Source(better)])


async def test_an_archive_row_replaces_a_partial_and_a_later_archive_row_replaces_it(
    wdb: Database,
) -> None:
    await _merge(wdb, candle(M, final=False, price="10", event_ts=M + 30_000))
    assert await _merge(wdb, candle(M, origin="archive", price="11", event_ts=M + HOUR_MS)) == 1
    assert await _row(wdb) == ("archive", "11", SOURCE_RANK[Source.ARCHIVE])
    # a revised file, imported later: same rank, later event time
    revised = candle(M, origin="archive", price="12", event_ts=M + 2 * HOUR_MS)
    assert await _merge(wdb, revised) == 1
    assert await _row(wdb) == ("archive", "12", SOURCE_RANK[Source.ARCHIVE])


async def test_late_final_replaces_rest(wdb: Database) -> None:
    await _merge(wdb, candle(M, origin="rest", price="11"))
    # the final WS event was delayed (arrived after the REST fill): it ranks higher
    assert await _merge(wdb, candle(M, price="10", event_ts=M + 60_000)) == 1
    assert await _row(wdb) == ("ws_final", "10", 1)


async def test_duplicate_finals_latest_event_then_latest_ingestion(wdb: Database) -> None:
    await _merge(
        wdb,
        candle(M, price="10", event_ts=M + 60_001),
        candle(M, price="11", event_ts=M + 60_003),
        candle(M, price="12", event_ts=M + 60_002),
    )
    assert await _row(wdb) == ("ws_final", "11", 1)
    # same event time, ingested later: wins; ingested earlier: loses
    await _merge(wdb, candle(M, price="13", event_ts=M + 60_003, ingestion_ts=M + 70_000))
    assert await _row(wdb) == ("ws_final", "13", 1)
    await _merge(wdb, candle(M, price="14", event_ts=M + 60_003, ingestion_ts=M + 60_004))
    assert await _row(wdb) == ("ws_final", "13", 1)
    # identical duplicates change nothing
    assert (
        await _merge(wdb, candle(M, price="13", event_ts=M + 60_003, ingestion_ts=M + 70_000)) == 0
    )


async def test_one_row_per_minute_with_every_column(wdb: Database) -> None:
    minutes = [H0 + m * MINUTE_MS for m in range(60)]
    updates = [
        candle(m, final=u == 2, price=f"{100 + i}.{u}", event_ts=m + 1000 * (u + 1))
        for i, m in enumerate(minutes)
        for u in range(3)
    ]
    assert await _merge(wdb, *updates) == 60
    rows = await wdb.fetch("SELECT * FROM silver.fact_ohlcv ORDER BY interval_start")
    assert len(rows) == 60
    first = rows[0]
    assert first["exchange"] == "binance" and first["symbol"] == "BTC/USD"
    assert first["quote_asset"] == "USD" and first["interval_seconds"] == 60
    assert first["close"] == Decimal("100.2") and first["volume"] == Decimal("1.5")
    assert first["quote_volume"] == Decimal("150") and first["trade_count"] == 3
    assert first["interval_end"].timestamp() * 1000 == H0 + MINUTE_MS
    assert first["event_ts"].timestamp() * 1000 == H0 + 3000


async def test_rerun_changes_nothing_not_even_xmin(wdb: Database) -> None:
    await _merge(
        wdb,
        *[candle(H0 + m * MINUTE_MS, price=str(m + 1), final=m % 3 > 0) for m in range(60)],
        candle(M, origin="rest", price="99"),
    )
    before = (await table_hash(wdb, "silver.fact_ohlcv"), await xmins(wdb, "silver.fact_ohlcv"))
    dirty = await table_hash(wdb, "ops.gold_dirty")
    again = await silver.merge_hour(wdb, H0)
    assert again.rows == 0 and again.details["candidates"] == 60
    after = (await table_hash(wdb, "silver.fact_ohlcv"), await xmins(wdb, "silver.fact_ohlcv"))
    assert after == before
    assert await table_hash(wdb, "ops.gold_dirty") == dirty


async def test_changed_minutes_mark_their_gold_buckets(wdb: Database) -> None:
    await _merge(wdb, candle(H0 + 4 * MINUTE_MS), candle(H0 + 59 * MINUTE_MS))
    marks = await wdb.fetch("SELECT bucket_start FROM ops.gold_dirty ORDER BY 1")
    assert [r["bucket_start"].timestamp() * 1000 for r in marks] == [H0, H0 + 55 * MINUTE_MS]


async def test_hour_boundaries(wdb: Database) -> None:
    last = H0 + 59 * MINUTE_MS
    nxt = H0 + HOUR_MS
    # the 59th minute's final arrives after the hour turned: it still belongs to hour H0
    await bronze.insert_candles(
        wdb,
        [
            candle(last, final=False, price="1", event_ts=last + 30_000),
            candle(last, price="2", event_ts=nxt + 150),
            candle(nxt, price="3"),
        ],
    )
    assert (await silver.merge_hour(wdb, nxt)).rows == 1
    assert (await silver.merge_hour(wdb, H0)).rows == 1
    assert await _row(wdb, last) == ("ws_final", "2", 1)
    assert await _row(wdb, nxt) == ("ws_final", "3", 1)
    # a day boundary: 23:59 belongs to the old day's last hour
    midnight = H0 - H0 % DAY_MS + DAY_MS
    await bronze.insert_candles(
        wdb, [candle(midnight - MINUTE_MS, price="4"), candle(midnight, price="5")]
    )
    assert (await silver.merge_hour(wdb, midnight - HOUR_MS)).rows == 1
    assert (await silver.merge_hour(wdb, midnight)).rows == 1
    assert await _row(wdb, midnight - MINUTE_MS) == ("ws_final", "4", 1)


async def test_merge_one_exchange(wdb: Database) -> None:
    await bronze.insert_candles(wdb, [candle(M), candle(M, exchange="kraken")])
    result = await silver.merge_hour(wdb, H0, exchange="kraken")
    assert result.rows == 1
    rows = await wdb.fetch("SELECT exchange FROM silver.fact_ohlcv")
    assert [r["exchange"] for r in rows] == ["kraken"]


async def test_silver_survives_dropped_bronze(wdb: Database) -> None:
    await _merge(wdb, candle(M, price="10"))
    await wdb.execute("TRUNCATE bronze.bronze_ohlcv_native")  # as if retention dropped it
    # a backfill brings a REST row for the old hour: the final WS row stays
    assert await _merge(wdb, candle(M, origin="rest", price="11")) == 0
    assert await _row(wdb) == ("ws_final", "10", 1)
