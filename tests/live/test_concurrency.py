"""Several silver writers on the same partitions at once: live writers of several daemons, the
hourly merge, a backfill's per-exchange merge, gold refreshes (waiting and not). No deadlock
(PostgreSQL would abort one of them), no lost update: silver ends as the merge alone makes it,
and gold, once its queue is drained, as a refresh from scratch makes it."""

from __future__ import annotations

import contextlib
import random

import anyio
import pytest

from klined.jobs import bronze, gold, silver
from klined.live.batches import compact
from klined.model import HOUR_MS, MINUTE_MS, Candle
from klined.warehouse.database import Database, open_database
from tests.support.warehouse import (
    GOLD_TABLES,
    H0,
    candle,
    config_for,
    table_hash,
    truncate_all,
    warehouse_dsn,
)

__all__ = ["warehouse_dsn"]

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

HOURS = (H0, H0 + HOUR_MS)
PAIRS = [f"C{i}/USD" for i in range(6)]


def events(seed: int) -> list[Candle]:
    """Every minute of two hours, each with one to four events of different sources."""
    rng = random.Random(seed)
    out = []
    for exchange in ("binance", "kraken"):
        for pair in PAIRS:
            for i in range(120):
                m = H0 + i * MINUTE_MS
                for _ in range(rng.randint(1, 4)):
                    origin = rng.choice(["ws", "ws", "rest", "trades"])
                    price = str(rng.randint(50, 150))
                    out.append(
                        candle(
                            m, exchange=exchange, symbol=pair, origin=origin,
                            final=rng.random() < 0.7, price=price,
                            high=str(int(price) + 5), low=str(int(price) - 5),
                            trade_count=rng.choice([0, 1, 7]),
                            event_ts=m + MINUTE_MS + rng.randint(0, 5000),
                        )
                    )  # fmt: skip
    return out


async def data_hashes(db: Database) -> dict[str, str]:
    tables = {"silver.fact_ohlcv": ("updated_at",)} | {t: ("ingestion_ts",) for t in GOLD_TABLES}
    return {t: await table_hash(db, t, exclude=ex) for t, ex in tables.items()}


async def test_live_writers_merges_and_gold_refreshes_at_once(warehouse_dsn: str) -> None:
    all_events = events(3)
    async with open_database(config_for(warehouse_dsn, pool_size=12)) as db:
        await truncate_all(db)
        await bronze.insert_candles(db, all_events)
        # the reference: the merge alone, then gold from scratch
        for hour in HOURS:
            await silver.merge_hour(db, hour)
        await gold.refresh(db)
        reference = await data_hashes(db)
        await db.execute("TRUNCATE silver.fact_ohlcv, ops.gold_dirty, " + ", ".join(GOLD_TABLES))

        stop = anyio.Event()
        rounds = {"live": 0, "merge": 0, "gold": 0}

        async def live_writer(seed: int) -> None:
            """A daemon's live path: every event once, in its own order and batch sizes."""
            rng = random.Random(seed)
            mine = [compact(c) for c in all_events]
            rng.shuffle(mine)
            i = 0
            while i < len(mine):
                n = rng.randint(5, 400)
                async with db.transaction() as conn:
                    await silver.upsert_candles(conn, mine[i : i + n])
                i += n
                rounds["live"] += 1

        async def merger(exchange: str | None) -> None:
            while not stop.is_set():
                for hour in HOURS:
                    await silver.merge_hour(db, hour, exchange)
                rounds["merge"] += 1

        async def refresher(wait: bool) -> None:
            while not stop.is_set():
                with contextlib.suppress(gold.GoldBusy):
                    await gold.refresh(db, wait=wait)
                rounds["gold"] += 1
                await anyio.sleep(0.01)

        with anyio.fail_after(240):
            async with anyio.create_task_group() as tg:
                tg.start_soon(merger, None)
                tg.start_soon(merger, "kraken")  # a backfill's merge of one exchange
                tg.start_soon(refresher, True)
                tg.start_soon(refresher, False)
                async with anyio.create_task_group() as writers:
                    for seed in range(4):
                        writers.start_soon(live_writer, seed)
                stop.set()
        assert rounds["live"] > 20 and rounds["merge"] >= 2 and rounds["gold"] >= 2
        # no lost update: silver is what the merge alone makes, before any repair
        got = await data_hashes(db)
        assert got["silver.fact_ohlcv"] == reference["silver.fact_ohlcv"]
        # gold: whatever the refreshes did meanwhile, draining the queue gives the reference
        await gold.refresh(db)
        assert await data_hashes(db) == reference
        assert await db.fetchval("SELECT count(*) FROM ops.gold_dirty") == 0
