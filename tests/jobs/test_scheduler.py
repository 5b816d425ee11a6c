"""The daemon's scheduler and the chain lock: the catch-up runs newest hour first, one hour per
lock hold; an hour that closes meanwhile goes first; another chain gets the lock between two
hours and is told whom it waits for."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from klined.config import Config, DatabaseConfig
from klined.jobs.chain import run_chain
from klined.jobs.lock import chain_lock
from klined.jobs.scheduler import ChainScheduler, select_hours
from klined.model import HOUR_MS, MINUTE_MS, from_datetime
from klined.status import ChainStatus
from klined.warehouse.coverage import record_capture_start
from klined.warehouse.database import Database, sync_pairs
from tests.support.warehouse import H0, pairs_config, warehouse_dsn, wdb

__all__ = ["warehouse_dsn", "wdb"]

pytestmark = pytest.mark.anyio


def config(db: Database) -> Config:
    cfg = Config(database=DatabaseConfig(dsn=db.dsn))
    cfg.chain.catchup_hours = 48
    cfg.chain.rest_retry_hours = 0
    return cfg


async def completed(db: Database) -> list[tuple[int, str]]:
    """(hour, trigger) of every completeness step, in the order they ran."""
    rows = await db.fetch(
        "SELECT hour_start, trigger FROM ops.job_runs WHERE step = 'completeness' ORDER BY run_id"
    )
    return [(from_datetime(r["hour_start"]), r["trigger"]) for r in rows]


class SlowLake:
    """A lake whose listing takes a while, so an hour's chain takes a while."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    async def list_parts(self, hour_ms: int) -> list[Any]:
        await anyio.sleep(self.delay_s)
        return []


async def test_catch_up_runs_newest_first_and_a_newly_closed_hour_jumps_the_queue(
    wdb: Database,
) -> None:
    base = H0 + 6 * HOUR_MS  # 16:00; the daemon captured from 10:00 and was down since
    await sync_pairs(wdb, pairs_config({"binance": ["BTC/USD"]}))
    await record_capture_start(wdb, H0)
    status = ChainStatus()
    # 16:06 until two hours are done, then 17:06: the 17:05 run became due mid-catch-up
    times = (base + 6 * MINUTE_MS, base + HOUR_MS + 6 * MINUTE_MS)
    sched = ChainScheduler(
        wdb,
        config(wdb),
        status=status,
        lock_wait_s=10,
        clock_ms=lambda: times[status.run_done >= 2],
    )
    async with anyio.create_task_group() as tg:
        await tg.start(sched.run)
        with anyio.fail_after(60):
            while len(await completed(wdb)) < 7:  # noqa: ASYNC110 - the ledger is the signal
                await anyio.sleep(0.05)
            while status.running:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    hours = [(h - H0) // HOUR_MS for h, _ in await completed(wdb)]
    assert hours == [5, 4, 6, 3, 2, 1, 0]  # 15:00, 14:00, then 16:00 as soon as it was due
    triggers = dict(await completed(wdb))
    assert triggers[base] == "schedule" and triggers[H0] == "catchup"
    assert (status.run_done, status.run_total) == (7, 7)
    assert status.next_run_ms == base + 2 * HOUR_MS + 5 * MINUTE_MS
    assert status.last_result.startswith("7 hour(s)")
    assert await select_hours(wdb, config(wdb), times[1]) == []
    pending = await wdb.fetchval(
        "SELECT count(*) FROM monitoring.hourly_completeness WHERE pending"
    )
    assert pending == 0


async def test_another_chain_gets_the_lock_between_two_hours_and_knows_whom_it_waited_for(
    wdb: Database,
) -> None:
    await sync_pairs(wdb, pairs_config({"binance": ["BTC/USD"]}))
    await record_capture_start(wdb, H0)
    cfg = config(wdb)
    status = ChainStatus()
    seen_by_chain: list[str] = []
    seen_by_waiter: list[str] = []
    done_before_waiter: list[int] = []

    async def chain() -> None:
        await run_chain(
            wdb, cfg, [H0 + 2 * HOUR_MS, H0 + HOUR_MS, H0], trigger="catchup",
            steps=["bronze", "completeness"], lake=SlowLake(0.5), status=status,
            lock_wait_s=30, maintain_partitions=False, on_wait=seen_by_chain.append,
        )  # fmt: skip

    async def waiter() -> None:
        async with chain_lock(
            wdb, wait_s=30, description="a backfill's merge of 2026-03-01T09:00Z",
            on_wait=seen_by_waiter.append,
        ):  # fmt: skip
            done_before_waiter.append(len(await completed(wdb)))
            await anyio.sleep(0.3)

    async with anyio.create_task_group() as tg:
        tg.start_soon(chain)
        with anyio.fail_after(10):
            while status.current_hour_ms != H0 + 2 * HOUR_MS:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        tg.start_soon(waiter)
    assert done_before_waiter == [1]  # after one hour, not after all three
    assert seen_by_waiter and seen_by_waiter[0].startswith(
        "the daemon's catch-up of 2026-03-01T12:00Z (PostgreSQL backend pid "
    )
    assert seen_by_chain and seen_by_chain[0].startswith(
        "a backfill's merge of 2026-03-01T09:00Z (PostgreSQL backend pid "
    )
    assert [h for h, _ in await completed(wdb)] == [H0 + 2 * HOUR_MS, H0 + HOUR_MS, H0]
