"""The live writer against a real PostgreSQL: finals reach silver with the merge's own
precedence, the merge later finds nothing to change, gold follows, every change is announced."""

from __future__ import annotations

import random
from typing import Any

import anyio
import asyncpg
import pytest

from klined.config import LiveConfig
from klined.jobs import bronze, gold, silver
from klined.live import LiveWriter
from klined.live.batches import compact
from klined.model import HOUR_MS, MINUTE_MS, Candle
from klined.warehouse.database import Database
from klined.warehouse.notify import CHANNEL, ROW_MAX_BYTES, decode_payload
from tests.support.streams import until
from tests.support.warehouse import H0, candle, table_hash, warehouse_dsn, wdb, xmins

__all__ = ["warehouse_dsn", "wdb"]

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

SILVER_DATA = "silver.fact_ohlcv"


async def upsert(db: Database, *candles: Candle) -> silver.UpsertResult:
    await db.ensure_partitions(c.interval_start for c in candles)
    async with db.transaction() as conn:
        return await silver.upsert_candles(conn, [compact(c) for c in candles])


async def silver_data(db: Database) -> str:
    """Every data column of silver (``updated_at`` says when a row was last written)."""
    return await table_hash(db, SILVER_DATA, exclude=("updated_at",))


def finals(seed: int, minutes: int = 90) -> list[Candle]:
    """Finals of two pairs over an hour boundary, with duplicates and re-sent minutes."""
    rng = random.Random(seed)
    out = []
    for pair in ("BTC/USD", "ETH/USD"):
        for i in range(minutes):
            m = H0 + i * MINUTE_MS
            price = str(rng.randint(90, 110))
            out.append(candle(m, symbol=pair, price=price, event_ts=m + MINUTE_MS + 5))
            if rng.random() < 0.2:  # a duplicate final (same event, later ingestion)
                out.append(
                    candle(m, symbol=pair, price=price, event_ts=m + MINUTE_MS + 5,
                           ingestion_ts=m + MINUTE_MS + 900)
                )  # fmt: skip
            if rng.random() < 0.1:  # a second session's final of the same minute, later event
                out.append(
                    candle(m, symbol=pair, price=str(int(price) + 1), event_ts=m + MINUTE_MS + 40)
                )
    rng.shuffle(out)
    return out


async def test_live_upserts_leave_silver_exactly_as_the_merge_would(wdb: Database) -> None:
    events = finals(1)
    # the merge's way: every event in bronze, then the hours merged
    await bronze.insert_candles(wdb, events)
    for hour in (H0, H0 + HOUR_MS):
        await silver.merge_hour(wdb, hour)
    merged = await silver_data(wdb)
    await wdb.execute("TRUNCATE silver.fact_ohlcv, ops.gold_dirty")
    # the live way: the same events in micro-batches of every size, in arrival order
    rng = random.Random(2)
    i = 0
    while i < len(events):
        n = rng.randint(1, 25)
        await upsert(wdb, *events[i : i + n])
        i += n
    assert await silver_data(wdb) == merged
    # and the merge, run afterwards over the same bronze, finds nothing to write
    before = await xmins(wdb, SILVER_DATA)
    for hour in (H0, H0 + HOUR_MS):
        assert (await silver.merge_hour(wdb, hour)).rows == 0
    assert await xmins(wdb, SILVER_DATA) == before


async def test_live_keeps_the_precedence_and_skips_identical_rows(wdb: Database) -> None:
    m = H0 + 5 * MINUTE_MS
    # a REST row, then the live final: the final outranks it
    await bronze.insert_candles(wdb, [candle(m, origin="rest", price="10")])
    await silver.merge_hour(wdb, H0)
    result = await upsert(wdb, candle(m, price="11"))
    assert (result.written, result.inserted) == (1, 0)
    row = await wdb.fetchrow("SELECT source, close, rank FROM silver.fact_ohlcv")
    assert row is not None and (row["source"], str(row["close"]), row["rank"]) == (
        "ws_final", "11", 1,
    )  # fmt: skip
    # the same final again changes nothing, not even xmin
    before = await xmins(wdb, SILVER_DATA)
    assert (await upsert(wdb, candle(m, price="11"))).written == 0
    assert await xmins(wdb, SILVER_DATA) == before
    # an older final (earlier event time) never replaces a newer one
    assert (await upsert(wdb, candle(m, price="9", event_ts=m + 1000))).written == 0
    # one minute, twice in one batch: the later event wins, as in the merge
    r = await upsert(
        wdb,
        candle(m + MINUTE_MS, price="20", event_ts=m + 2 * MINUTE_MS + 1),
        candle(m + MINUTE_MS, price="21", event_ts=m + 2 * MINUTE_MS + 2),
    )
    assert (r.candidates, r.written, r.inserted) == (1, 1, 1)
    closes = await wdb.fetch("SELECT close FROM silver.fact_ohlcv ORDER BY interval_start")
    assert [str(x["close"]) for x in closes] == ["11", "21"]
    marks = await wdb.fetch("SELECT bucket_start FROM ops.gold_dirty ORDER BY seq")
    assert [x["bucket_start"].timestamp() * 1000 for x in marks] == [H0 + 5 * MINUTE_MS] * 3


async def test_every_change_is_announced_in_small_payloads(
    wdb: Database, warehouse_dsn: str
) -> None:
    conn = await asyncpg.connect(warehouse_dsn)
    heard: list[str] = []
    await conn.add_listener(CHANNEL, lambda *args: heard.append(args[3]))
    try:
        events = [
            candle(H0 + i * MINUTE_MS, symbol=f"P{i % 7}/USD", price="123456789.123456789")
            for i in range(600)
        ]
        events.append(candle(H0, symbol="LONG/USD", price="1" + "0" * 1200))  # absurd, but valid
        await upsert(wdb, *events)
        await gold.refresh(wdb)
        everything = {"1m", "5m", "15m", "30m", "1h", "4h", "1d"}
        await until(lambda: {r.interval for p in heard for r in decode_payload(p)} == everything)
    finally:
        await conn.close()
    assert all(len(p.encode()) < 8000 for p in heard)
    assert max(len(p.encode()) for p in heard) > ROW_MAX_BYTES  # several rows per payload
    rows = [r for p in heard for r in decode_payload(p)]
    silver_rows = [r for r in rows if r.interval == "1m"]
    assert len(silver_rows) == 601
    first = next(
        r for r in silver_rows if r.symbol == "P0/USD" and r.start == "2026-03-01T10:00:00Z"
    )
    assert (first.exchange, first.open, first.close, first.source, first.trade_count) == (
        "binance", "123456789.123456789", "123456789.123456789", "ws_final", 3,
    )  # fmt: skip
    assert first.quote_volume == "150" and first.volume == "1.5" and not first.fetch
    long = next(r for r in silver_rows if r.symbol == "LONG/USD")
    assert long.fetch and long.close is None  # keys only: the reader fetches the row
    gold_rows = [r for r in rows if r.interval != "1m"]
    assert {r.interval for r in gold_rows} == {"5m", "15m", "30m", "1h", "4h", "1d"}
    five = next(r for r in gold_rows if r.interval == "5m" and r.symbol == "P0/USD")
    assert five.source == "derived" and five.minutes is not None and five.minutes >= 1


async def run_live(db: Database, live: LiveWriter, body: Any) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(live.run_batcher)
        await tg.start(live.run, db)
        await body()
        tg.cancel_scope.cancel()


async def test_the_writer_commits_batches_records_lag_and_keeps_gold_following(
    wdb: Database,
) -> None:
    now = [H0 + 10 * MINUTE_MS]
    live = LiveWriter(
        LiveConfig(flush_interval_s=0.2, gold_interval_s=1.0), clock_ms=lambda: now[0]
    )

    async def body() -> None:
        for i in range(10):
            live.offer(candle(H0 + i * MINUTE_MS, event_ts=H0 + (i + 1) * MINUTE_MS + 100))
        await until(lambda: live.status.written >= 10)
        await until(lambda: live.status.gold_refreshed_ms is not None)
        # after the shutdown drain: what was offered last is written too
        live.offer(candle(H0 + 10 * MINUTE_MS))

    await run_live(wdb, live, body)
    st = live.snapshot()
    assert st.written == 11 and st.unchanged == 0 and st.dropped_batches == 0
    assert st.committed_batches >= 2 and st.queued_batches == 0
    assert st.lag_samples == 10 or st.lag_samples == 11
    assert st.lag_max_s == (H0 + 10 * MINUTE_MS - (H0 + MINUTE_MS + 100)) / 1000
    assert await wdb.fetchval("SELECT count(*) FROM silver.fact_ohlcv") == 11
    gold5 = await wdb.fetch("SELECT minutes FROM gold.ohlcv_5m ORDER BY interval_start")
    assert [r["minutes"] for r in gold5] == [5, 5]
    # the 11th final's mark waits for the next refresh (the live one or the chain's)
    assert await wdb.fetchval("SELECT count(*) FROM ops.gold_dirty") == 1
    assert st.gold_rows >= 5
