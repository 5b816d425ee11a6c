"""The hourly chain end to end: lake parts (WS finals and partials) -> bronze -> REST gap-fill
-> silver -> gold -> completeness against the simulator's truth; twice = identical tables; the
advisory lock keeps two chains apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from klined.config import LakeConfig
from klined.jobs.chain import chain_lock, run_chain
from klined.jobs.gapfill import sync_configured_pairs
from klined.jobs.scheduler import ChainScheduler, select_hours
from klined.lake import LakeStore, LakeWriter
from klined.model import HOUR_MS, MINUTE_MS, Candle, Origin, floor_hour
from klined.rest.client import RetryPolicy, open_clients
from klined.status import ChainStatus
from klined.warehouse.coverage import extend_coverage
from klined.warehouse.database import open_database
from tests.fixtures.sim import SIM_START
from tests.support.truth import (
    assert_completeness,
    assert_gold_is_truth,
    assert_silver_is_truth,
    make_config,
    sim_limiters,
    table_hashes,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def wait_for(condition: Any) -> None:
    """Poll a condition (the scheduler publishes no event a test could wait on)."""
    while not condition():  # noqa: ASYNC110
        await anyio.sleep(0.02)


PAIRS = ["BTC/USD", "REKT/USD"]
FAST_RETRY = RetryPolicy(attempts=4, initial_s=0.02, max_s=0.2)
H0 = floor_hour(SIM_START) - 2 * HOUR_MS  # two closed hours before the sim's start
EVERY_PAIR = [(ex, p) for ex in ("binance", "kraken") for p in PAIRS]


def ws_candle(sim: Any, exchange: str, pair: str, minute: int, *, final: bool) -> Candle | None:
    t = sim.market.truth(exchange, pair, minute)
    if t.trades == 0:
        return None
    if final:
        o, h, lo, c, v = t.open, t.high, t.low, t.close, t.volume
        q, n = (t.quote_volume if exchange == "binance" else None), t.trades
    else:  # a partial update cut off mid-minute: only the first trade seen
        o = h = lo = c = t.open
        v, q, n = "0.00001", None, 1
    return Candle(
        exchange=exchange,
        symbol=pair,
        native_symbol=pair.replace("/", ""),
        interval_start=minute,
        open=o,
        high=h,
        low=lo,
        close=c,
        volume=v,
        quote_volume=q,
        vwap=t.vwap if final else None,
        trade_count=n,
        is_final=final,
        origin=Origin.WS,
        session_id="test-session",
        event_ts=minute + (MINUTE_MS + 5 if final else 20_000),
        ingestion_ts=minute + MINUTE_MS + 50,
    )


async def write_lake(sim: Any, root: Path, hours: list[int]) -> None:
    """Minutes :00-:29 captured final, :30-:39 only partially, :40-:59 not at all."""
    writer = LakeWriter(root, LakeConfig())
    for hour in hours:
        for ex in ("binance", "kraken"):
            for pair in PAIRS:
                for i in range(40):
                    c = ws_candle(sim, ex, pair, hour + i * MINUTE_MS, final=i < 30)
                    if c is not None:
                        writer.append(c)
    await writer.aclose()


async def test_chain_end_to_end_and_twice_changes_nothing(
    sim_factory: Any, pg_dsn: str, tmp_path: Path
) -> None:
    hours = [H0, H0 + HOUR_MS]
    async with sim_factory(pairs=PAIRS, rate_limit_time_scale=60) as sim:
        cfg = make_config(sim, pg_dsn, PAIRS, data_dir=str(tmp_path))
        await write_lake(sim, cfg.lake_root, hours)
        lake = LakeStore(cfg.lake_root)
        status = ChainStatus()
        async with (
            open_database(cfg, apply_schema=True) as db,
            open_clients(
                cfg, limiters=sim_limiters(sim), clock_ms=sim.clock.now_ms, retry=FAST_RETRY
            ) as clients,
        ):
            await sync_configured_pairs(db, cfg)
            report = await run_chain(
                db, cfg, hours, trigger="manual", lake=lake, clients=clients, status=status,
                now_ms=sim.clock.now_ms(),
            )  # fmt: skip
            assert report.ok, report.table()
            assert [o.step for o in report.hours[0].steps] == [
                "flush", "bronze", "gapfill", "silver", "gold", "completeness",
            ]  # fmt: skip
            assert report.hours[0].steps[0].status == "skipped"  # no S3 bucket
            assert status.last_result and not status.running
            start, end = hours[0], hours[-1] + HOUR_MS
            for ex in ("binance", "kraken"):
                counts = await assert_silver_is_truth(db, sim, ex, PAIRS, start, end)
                assert counts["ws_final"] > 0 and counts["rest"] > 0
                assert "ws_partial" not in counts  # REST replaced every partial candle
                # the captured finals are still there: REST never replaced them
                rows = await db.fetch(
                    "SELECT count(*) AS n FROM silver.fact_ohlcv WHERE exchange = $1"
                    " AND source = 'ws_final' AND extract(minute from interval_start) >= 30",
                    ex,
                )
                assert rows[0]["n"] == 0
                assert await assert_gold_is_truth(db, sim, ex, PAIRS, start, end) > 0
                await assert_completeness(db, ex, PAIRS, hours)
            assert not await db.fetch("SELECT 1 FROM ops.dirty_hours")
            await assert_bronze_is_the_lake(db, cfg.lake_root)
            steps = await db.fetch(
                "SELECT step, status FROM ops.job_runs WHERE hour_start IS NOT NULL"
            )
            assert {(r["step"], r["status"]) for r in steps} >= {
                ("silver", "ok"),
                ("gapfill", "ok"),
            }

            before = await table_hashes(db)
            again = await run_chain(
                db, cfg, hours, trigger="manual", lake=lake, clients=clients,
                now_ms=sim.clock.now_ms(),
            )  # fmt: skip
            assert again.ok
            assert all(o.rows == 0 for h in again.hours for o in h.steps), again.table()
            assert await table_hashes(db) == before
        assert sim.stats.http_418 == 0


async def assert_bronze_is_the_lake(db: Any, root: Path) -> None:
    """Every bronze row came from a lake part, every part was loaded exactly once, and the
    gap-fill's rows are in parts of their own (``fill_`` writers) with their origin."""
    from collections import Counter

    from klined.lake import iter_local_parts, read_part_file

    assert (
        await db.fetchval("SELECT count(*) FROM bronze.bronze_ohlcv_native WHERE lake_key IS NULL")
        == 0
    )
    parts = {p.key: read_part_file(p.path).records for p in iter_local_parts(root)}
    ledger = {
        r["lake_key"]: r["rows"]
        for r in await db.fetch("SELECT lake_key, rows FROM ops.lake_parts")
    }
    assert ledger == {k: len(v) for k, v in parts.items()}
    in_bronze = Counter(
        {
            r["lake_key"]: r["n"]
            for r in await db.fetch(
                "SELECT lake_key, count(*) AS n FROM bronze.bronze_ohlcv_native GROUP BY 1"
            )
        }
    )
    assert in_bronze == Counter(ledger)
    fill = {k: v for k, v in parts.items() if "-fill_" in k}
    origins = {r.origin for rows in fill.values() for r in rows}
    assert fill and origins <= {"rest", "trades", "no_trades"} and "rest" in origins
    assert all(r.origin == "ws" for k, rows in parts.items() if k not in fill for r in rows)


async def test_advisory_lock_keeps_two_chains_apart(sim_factory: Any, pg_dsn: str) -> None:
    async with sim_factory(pairs=PAIRS) as sim:
        cfg = make_config(sim, pg_dsn, PAIRS)
        async with open_database(cfg, apply_schema=True) as db:
            hour = [H0]
            async with chain_lock(db):
                busy = await run_chain(db, cfg, hour, trigger="manual", steps=["completeness"])
                assert busy.skipped and "another chain" in busy.skipped and not busy.ok
                assert busy.hours == []

            # a waiting chain runs as soon as the holder lets go
            release = anyio.Event()

            async def holder() -> None:
                async with chain_lock(db):
                    await release.wait()

            async with anyio.create_task_group() as tg:
                tg.start_soon(holder)
                await anyio.sleep(0.3)
                result: list[Any] = []

                async def waiter() -> None:
                    report = await run_chain(
                        db,
                        cfg,
                        hour,
                        trigger="manual",
                        steps=["completeness"],
                        lock_wait_s=30,
                        maintain_partitions=False,
                    )
                    result.append(report)

                tg.start_soon(waiter)
                await anyio.sleep(0.5)
                assert not result
                release.set()
            assert result and result[0].ok and len(result[0].hours) == 1


async def test_select_hours_and_scheduler_catch_up(sim_factory: Any, pg_dsn: str) -> None:
    async with sim_factory(pairs=PAIRS) as sim:
        cfg = make_config(sim, pg_dsn, PAIRS)
        cfg.chain.catchup_hours = 3
        cfg.chain.rest_retry_hours = 0
        now = H0 + 2 * HOUR_MS + 5 * MINUTE_MS
        async with open_database(cfg, apply_schema=True) as db:
            await sync_configured_pairs(db, cfg)
            # nothing captured or backfilled: nothing to catch up on
            assert await select_hours(db, cfg, now) == []
            await extend_coverage(db, EVERY_PAIR, H0 - 10 * HOUR_MS)
            # newest first
            assert await select_hours(db, cfg, now) == [H0 + HOUR_MS, H0, H0 - HOUR_MS]
            status = ChainStatus()
            sched = ChainScheduler(db, cfg, status=status, clock_ms=lambda: now, lock_wait_s=0)
            report = await sched.run_once("catchup")
            assert report is not None and report.ok
            assert [h.hour_ms for h in report.hours] == [H0 + HOUR_MS, H0, H0 - HOUR_MS]
            assert (status.run_done, status.run_total, status.running) == (3, 3, False)
            # completed hours are not selected again; a dirty one is
            assert await select_hours(db, cfg, now) == []
            await db.execute(
                "INSERT INTO ops.dirty_hours (exchange, hour_start, reason)"
                " VALUES ('kraken', to_timestamp($1 / 1000.0), 'manual')",
                H0 - 10 * HOUR_MS,
            )
            assert await select_hours(db, cfg, now) == [H0 - 10 * HOUR_MS]
            # the scheduler's loop: catch-up first, then the cron time is published
            async with anyio.create_task_group() as tg:
                await tg.start(sched.run)
                with anyio.fail_after(20):
                    await wait_for(lambda: sched.runs >= 2 and (status.next_run_ms or 0) > now)
                assert status.next_run_ms is not None and status.next_run_ms > now
                tg.cancel_scope.cancel()
            assert await select_hours(db, cfg, now) == []


async def test_cancelled_chain_leaves_consistent_ops_and_reruns_cleanly(
    sim_factory: Any, pg_dsn: str, tmp_path: Path
) -> None:
    from klined.sim import FaultPlan, FaultRule

    slow = FaultPlan(rules=[FaultRule(kind="slow", exchange="kraken", duration_s=3, times=2)])
    hours = [H0]
    async with sim_factory(pairs=PAIRS, rate_limit_time_scale=60, faults=slow) as sim:
        cfg = make_config(sim, pg_dsn, PAIRS, data_dir=str(tmp_path))
        await write_lake(sim, cfg.lake_root, hours)
        lake = LakeStore(cfg.lake_root)
        status = ChainStatus()
        async with (
            open_database(cfg, apply_schema=True) as db,
            open_clients(
                cfg, limiters=sim_limiters(sim), clock_ms=sim.clock.now_ms, retry=FAST_RETRY
            ) as clients,
        ):
            await sync_configured_pairs(db, cfg)
            async with anyio.create_task_group() as tg:

                async def chain() -> None:
                    await run_chain(
                        db, cfg, hours, trigger="schedule", lake=lake, clients=clients,
                        status=status, now_ms=sim.clock.now_ms(),
                    )  # fmt: skip

                tg.start_soon(chain)
                with anyio.fail_after(20):
                    await wait_for(lambda: status.current_step == "gapfill")
                await anyio.sleep(0.5)  # Kraken answers take 3 s: the step is mid-flight
                tg.cancel_scope.cancel()
            runs = await db.fetch("SELECT step, status, error FROM ops.job_runs ORDER BY run_id")
            assert [(r["step"], r["status"]) for r in runs][-1] == ("gapfill", "failed")
            assert runs[-1]["error"] == "cancelled"
            assert all(r["status"] != "running" for r in runs)
            assert await db.fetch("SELECT 1 FROM ops.dirty_hours")  # the hour is still to do
            async with chain_lock(db, wait_s=0):  # the lock was released
                pass

            now = sim.clock.now_ms()
            assert H0 in await select_hours(db, cfg, now)
            report = await run_chain(
                db, cfg, hours, trigger="schedule", lake=lake, clients=clients, now_ms=now
            )
            assert report.ok, report.table()
            for ex in ("binance", "kraken"):
                await assert_silver_is_truth(db, sim, ex, PAIRS, H0, H0 + HOUR_MS)
                await assert_gold_is_truth(db, sim, ex, PAIRS, H0, H0 + HOUR_MS)
                await assert_completeness(db, ex, PAIRS, hours)
            before = await table_hashes(db)
            await run_chain(
                db, cfg, hours, trigger="schedule", lake=lake, clients=clients,
                now_ms=sim.clock.now_ms(),
            )  # fmt: skip
            assert await table_hashes(db) == before


async def test_daemon_chain_and_backfill_share_one_warehouse(
    sim_factory: Any, pg_dsn: str, tmp_path: Path
) -> None:
    """A backfill and the scheduler's chain at the same time: the lock serializes the merges,
    bronze takes both writers, and the result is the truth."""
    from klined.jobs.backfill import resolve_request, run_backfill
    from klined.model import iso

    hours = [H0 - HOUR_MS, H0, H0 + HOUR_MS]
    async with sim_factory(pairs=PAIRS, rate_limit_time_scale=60) as sim:
        cfg = make_config(sim, pg_dsn, PAIRS, data_dir=str(tmp_path))
        cfg.chain.catchup_hours = 3
        await write_lake(sim, cfg.lake_root, hours)
        lake = LakeStore(cfg.lake_root)
        now = sim.clock.now_ms()
        async with (
            open_database(cfg, apply_schema=True) as db,
            open_clients(
                cfg, limiters=sim_limiters(sim), clock_ms=sim.clock.now_ms, retry=FAST_RETRY
            ) as clients,
        ):
            await sync_configured_pairs(db, cfg)
            await extend_coverage(db, EVERY_PAIR, hours[0])  # the daemon captured them
            sched = ChainScheduler(
                db, cfg, lake=lake, clients=clients, clock_ms=sim.clock.now_ms, lock_wait_s=60
            )
            req = resolve_request(cfg, iso(H0 - 6 * HOUR_MS), iso(H0 + 2 * HOUR_MS), now_ms=now)
            results: dict[str, Any] = {}

            async def chain() -> None:
                results["chain"] = await sched.run_once("catchup")

            async def backfill() -> None:
                results["backfill"] = await run_backfill(db, cfg, clients, req, now_ms=now)

            async with anyio.create_task_group() as tg:
                tg.start_soon(chain)
                tg.start_soon(backfill)
            assert results["chain"] is not None and results["chain"].ok
            assert results["backfill"].ok and results["backfill"].merged_ok
            # whatever one of them left dirty, one more chain run settles
            final = await sched.run_once("schedule")
            assert final is not None and final.ok
            for ex in ("binance", "kraken"):
                counts = await assert_silver_is_truth(db, sim, ex, PAIRS, req.start_ms, req.end_ms)
                assert counts["ws_final"] > 0  # the captured finals survived the REST rows
                await assert_gold_is_truth(db, sim, ex, PAIRS, req.start_ms, req.end_ms)
            failed = await db.fetch("SELECT step, error FROM ops.job_runs WHERE status = 'failed'")
            assert not failed, [dict(r) for r in failed]


async def test_minutes_the_lake_dropped_are_gap_filled_even_outside_the_retry_window(
    sim_factory: Any, pg_dsn: str, tmp_path: Path
) -> None:
    from klined.jobs.ops import DroppedRange, record_lake_drops
    from klined.model import to_datetime

    async with sim_factory(pairs=PAIRS, rate_limit_time_scale=60) as sim:
        cfg = make_config(sim, pg_dsn, PAIRS, data_dir=str(tmp_path))
        cfg.chain.catchup_hours = 0
        cfg.chain.rest_retry_hours = 0  # H0 is older: gap-fill would normally be skipped
        await write_lake(sim, cfg.lake_root, [H0])
        lake = LakeStore(cfg.lake_root)
        now = sim.clock.now_ms()
        async with (
            open_database(cfg, apply_schema=True) as db,
            open_clients(
                cfg, limiters=sim_limiters(sim), clock_ms=sim.clock.now_ms, retry=FAST_RETRY
            ) as clients,
        ):
            await sync_configured_pairs(db, cfg)
            await db.execute(
                "INSERT INTO ops.job_runs (hour_start, step, status) VALUES ($1, 'gapfill', 'ok')",
                to_datetime(H0),
            )
            # what the daemon records when the disk stayed full past lake.max_held_bytes
            await record_lake_drops(
                db,
                [
                    DroppedRange(ex, pair, H0 + 30 * MINUTE_MS, H0 + HOUR_MS, 99)
                    for ex in ("binance", "kraken")
                    for pair in PAIRS
                ],
            )
            assert await select_hours(db, cfg, now) == [H0]
            report = await run_chain(
                db, cfg, [H0], trigger="manual", lake=lake, clients=clients, now_ms=now
            )
            assert report.ok, report.table()
            gapfill = next(o for o in report.hours[0].steps if o.step == "gapfill")
            assert gapfill.status == "ok" and gapfill.rows > 0
            for ex in ("binance", "kraken"):
                counts = await assert_silver_is_truth(db, sim, ex, PAIRS, H0, H0 + HOUR_MS)
                assert "ws_partial" not in counts
            open_incidents = await db.fetchval(
                "SELECT count(*) FROM monitoring.stream_incidents"
                " WHERE kind = 'lake_dropped' AND repaired_at IS NULL"
            )
            assert open_incidents == 0
            assert await select_hours(db, cfg, now) == []
