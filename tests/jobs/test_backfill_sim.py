"""``klined backfill`` against the simulator (faults and rate limits on) and an embedded
PostgreSQL: multi-day ranges equal the truth in silver and gold, re-runs change nothing,
an interrupted run resumes without duplicating work."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from klined.jobs.backfill import resolve_request, run_backfill
from klined.jobs.backfill_plan import dry_run
from klined.jobs.completeness import mark_pending
from klined.jobs.gapfill import sync_configured_pairs
from klined.jobs.progress import Progress, summary_table
from klined.jobs.scheduler import closed_end_ms
from klined.model import DAY_MS, HOUR_MS, floor_hour, iso, to_datetime
from klined.rest.client import RetryPolicy, open_clients
from klined.sim import FaultPlan, FaultRule
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

PAIRS = ["BTC/USD", "REKT/USD", "KSM/USD"]
FAST_RETRY = RetryPolicy(attempts=5, initial_s=0.02, max_s=0.3)
DAY0 = floor_hour(SIM_START) - 3 * DAY_MS  # well beyond Kraken's 720-minute OHLC window

FAULTS = FaultPlan(
    rules=[
        FaultRule(kind="http_5xx", exchange="binance", endpoint="klines", request=2),
        FaultRule(
            kind="http_429", exchange="binance", endpoint="klines", request=4, retry_after_s=1
        ),
        FaultRule(kind="timeout", exchange="kraken", endpoint="Trades", request=5, duration_s=3),
        FaultRule(kind="http_429", exchange="kraken", endpoint="Trades", request=9),
        FaultRule(kind="http_5xx", exchange="kraken", endpoint="Trades", request=12),
    ]
)


def kraken_btc_through(progress: Progress) -> int:
    """How far Kraken BTC/USD (the longest Trades paging) is checkpointed."""
    return max(
        (r.through for r in progress.reports if (r.exchange, r.symbol) == ("kraken", "BTC/USD")),
        default=0,
    )


async def wait_for(condition: Any) -> None:
    while not condition():  # noqa: ASYNC110 - polling a plain counter
        await anyio.sleep(0.01)


def sim_options(**extra: Any) -> dict[str, Any]:
    """Real limits, scaled: Binance 240 weight per 0.5 s window; Kraken 3 calls, decay 40/s."""
    return {"pairs": PAIRS, "rate_limit_scale": 0.2, "rate_limit_time_scale": 120, **extra}


async def test_multi_day_backfill_equals_truth_and_rerun_changes_nothing(
    sim_factory: Any, pg_dsn: str, tmp_path: Any
) -> None:
    async with sim_factory(**sim_options(faults=FAULTS)) as sim:
        cfg = make_config(sim, pg_dsn, PAIRS, data_dir=str(tmp_path), rest_timeout_s=1.0)
        now = sim.clock.now_ms()
        req = resolve_request(cfg, iso(DAY0), iso(DAY0 + 2 * DAY_MS), now_ms=now, source="rest")
        limiters = sim_limiters(sim)
        async with (
            open_database(cfg, apply_schema=True) as db,
            open_clients(
                cfg, limiters=limiters, clock_ms=sim.clock.now_ms, retry=FAST_RETRY
            ) as clients,
        ):
            await sync_configured_pairs(db, cfg)
            lines = await dry_run(db, cfg, clients, req, now_ms=now)
            assert sum(ln.minutes for ln in lines) == 2 * len(PAIRS) * 2 * 1440
            assert sum(limiter.stats.requests for limiter in limiters.values()) == 0

            progress = Progress([], {ex: lim.stats for ex, lim in limiters.items()}, tty=False)
            result = await run_backfill(db, cfg, clients, req, now_ms=now, progress=progress)
            assert result.ok, summary_table(result.reports)
            assert result.rows == 2 * len(PAIRS) * 2 * 1440
            assert "ETA" in progress.lines()[0]
            start, end = req.start_ms, req.end_ms
            hours = list(range(start, end, HOUR_MS))
            for ex in ("binance", "kraken"):
                counts = await assert_silver_is_truth(db, sim, ex, PAIRS, start, end)
                assert "ws_final" not in counts and "ws_partial" not in counts
                if ex == "kraken":  # older than the OHLC window: rebuilt from trades
                    assert counts["trades"] > 0 and "rest" not in counts
                await assert_gold_is_truth(db, sim, ex, PAIRS, start, end)
                await assert_completeness(db, ex, PAIRS, hours)
            assert not await db.fetch("SELECT 1 FROM ops.dirty_hours")
            done = await db.fetch("SELECT status FROM ops.backfill_progress")
            assert {r["status"] for r in done} == {"done"} and len(done) == 2 * len(PAIRS)

            # faults happened and were survived; the limiter was never a bug
            assert sim.stats.http_429 >= 1 and sim.stats.http_5xx >= 2
            assert sim.stats.http_418 == 0
            assert limiters["binance"].stats.throttled >= 1
            assert limiters["binance"].stats.retries >= 1 and limiters["kraken"].stats.retries >= 2

            # the same command again: nothing fetched, nothing changed (the hours that closed
            # since are owed pending rows: the pairs are covered from the range's start on)
            later = sim.clock.now_ms()
            await mark_pending(db, closed_end_ms(cfg, later))
            before = await table_hashes(db)
            requests = {ex: lim.stats.requests for ex, lim in limiters.items()}
            again = await run_backfill(db, cfg, clients, req, now_ms=later)
            assert again.ok and again.rows == 0 and not again.merges
            assert {ex: lim.stats.requests for ex, lim in limiters.items()} == requests
            assert await table_hashes(db) == before


async def test_interrupted_backfill_resumes_without_duplicating(
    sim_factory: Any, pg_dsn: str, tmp_path: Any
) -> None:
    async with sim_factory(**sim_options()) as sim:
        cfg = make_config(sim, pg_dsn, PAIRS, data_dir=str(tmp_path))
        now = sim.clock.now_ms()
        req = resolve_request(cfg, iso(DAY0), iso(DAY0 + DAY_MS), now_ms=now, source="rest")
        async with open_database(cfg, apply_schema=True) as db:
            await sync_configured_pairs(db, cfg)
            limiters = sim_limiters(sim)
            async with open_clients(
                cfg, limiters=limiters, clock_ms=sim.clock.now_ms, retry=FAST_RETRY
            ) as clients:
                progress = Progress([], {}, tty=False)
                with anyio.move_on_after(30) as scope:
                    async with anyio.create_task_group() as tg:

                        async def interrupt() -> None:
                            # Ctrl-C once Kraken is well into its Trades paging
                            await wait_for(
                                lambda: kraken_btc_through(progress) >= DAY0 + 4 * HOUR_MS
                            )
                            tg.cancel_scope.cancel()

                        tg.start_soon(interrupt)
                        await run_backfill(db, cfg, clients, req, now_ms=now, progress=progress)
                assert not scope.cancelled_caught
                first_requests = {ex: lim.stats.requests for ex, lim in limiters.items()}
            rows = await db.fetch("SELECT status, done_through FROM ops.backfill_progress")
            assert "cancelled" in {r["status"] for r in rows}
            assert max(r["done_through"] for r in rows) >= to_datetime(DAY0 + 4 * HOUR_MS)
            written = await db.fetchval("SELECT count(*) FROM bronze.bronze_ohlcv_native")
            assert 0 < written < 2 * len(PAIRS) * 1440

            limiters2 = sim_limiters(sim)
            async with open_clients(
                cfg, limiters=limiters2, clock_ms=sim.clock.now_ms, retry=FAST_RETRY
            ) as clients:
                result = await run_backfill(db, cfg, clients, req, now_ms=sim.clock.now_ms())
            assert result.ok, summary_table(result.reports)
            # the second run fetched only what the first had not written
            assert result.rows == 2 * len(PAIRS) * 1440 - written, summary_table(result.reports)
            assert limiters2["binance"].stats.requests <= first_requests["binance"] + len(PAIRS) * 2
            dupes = await db.fetchval(
                "SELECT count(*) FROM (SELECT 1 FROM bronze.bronze_ohlcv_native"
                " GROUP BY exchange, symbol, interval_start HAVING count(*) > 1) d"
            )
            assert dupes == 0
            for ex in ("binance", "kraken"):
                await assert_silver_is_truth(db, sim, ex, PAIRS, req.start_ms, req.end_ms)
                await assert_gold_is_truth(db, sim, ex, PAIRS, req.start_ms, req.end_ms)
            statuses = await db.fetch(
                "SELECT status, detail FROM ops.backfill_progress ORDER BY backfill_id"
            )
            assert all(r["status"] == "done" for r in statuses)
            assert any(r["detail"].startswith("fetched") for r in statuses)


async def test_refetch_reverifies_rest_rows_and_writes_only_differences(
    sim_factory: Any, pg_dsn: str, tmp_path: Any
) -> None:
    async with sim_factory(**sim_options()) as sim:
        cfg = make_config(sim, pg_dsn, PAIRS, data_dir=str(tmp_path))
        now = sim.clock.now_ms()
        req = resolve_request(cfg, iso(DAY0), iso(DAY0 + 3 * HOUR_MS), now_ms=now, source="rest")
        async with (
            open_database(cfg, apply_schema=True) as db,
            open_clients(
                cfg, limiters=sim_limiters(sim), clock_ms=sim.clock.now_ms, retry=FAST_RETRY
            ) as clients,
        ):
            await sync_configured_pairs(db, cfg)
            assert (await run_backfill(db, cfg, clients, req, now_ms=now)).ok
            bronze_rows = await db.fetchval("SELECT count(*) FROM bronze.bronze_ohlcv_native")

            # nothing changed at the exchange: a refetch asks again and writes nothing
            before = await table_hashes(db)
            again = await run_backfill(db, cfg, clients, req, now_ms=now, refetch=True)
            assert again.ok and again.rows == bronze_rows  # every minute re-verified
            assert await table_hashes(db) == before

            # a stored REST row that is wrong (bronze and silver) is corrected by a refetch
            minute = to_datetime(DAY0 + 7 * 60_000)
            for table in ("bronze.bronze_ohlcv_native", "silver.fact_ohlcv"):
                await db.execute(
                    f"UPDATE {table} SET close = close * 2, high = high * 2"
                    " WHERE exchange = 'binance' AND symbol = 'BTC/USD' AND interval_start = $1",
                    minute,
                )
            fixed = await run_backfill(db, cfg, clients, req, now_ms=now, refetch=True)
            assert fixed.ok
            after = await db.fetchval("SELECT count(*) FROM bronze.bronze_ohlcv_native")
            assert after == bronze_rows + 1
            for ex in ("binance", "kraken"):
                await assert_silver_is_truth(db, sim, ex, PAIRS, req.start_ms, req.end_ms)
                await assert_gold_is_truth(db, sim, ex, PAIRS, req.start_ms, req.end_ms)
