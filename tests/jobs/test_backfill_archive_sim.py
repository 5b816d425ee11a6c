"""``klined backfill --source auto|archive`` against the simulator: the exchanges' archives serve
the days they cover, REST the rest; the dry run says which serves what; silver equals the truth
either way; an unreachable archive falls back to REST."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from klined.jobs.backfill import resolve_request, run_backfill
from klined.jobs.backfill_archive import NOT_IN_ARCHIVE
from klined.jobs.backfill_plan import dry_run, dry_run_table
from klined.jobs.gapfill import sync_configured_pairs
from klined.jobs.progress import summary_table
from klined.model import DAY_MS, HOUR_MS, iso, to_datetime
from klined.rest.client import RetryPolicy, open_clients
from klined.sim.archive import write_kraken_zip
from klined.warehouse.database import open_database
from tests.fixtures.sim import SIM_START
from tests.support.truth import (
    assert_completeness,
    assert_silver_is_truth,
    make_config,
    sim_limiters,
    table_hashes,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PAIRS = ["BTC/USD", "REKT/USD"]
FAST_RETRY = RetryPolicy(attempts=3, initial_s=0.02, max_s=0.2)
TODAY = SIM_START - SIM_START % DAY_MS  # 2026-01-01
#: 2025-12-30 .. 2026-01-01 00:40: the 30th is before yesterday (archive), the 31st is yesterday
START, END = TODAY - 2 * DAY_MS, TODAY + 40 * 60_000


def sim_options(**extra: Any) -> dict[str, Any]:
    return {"pairs": PAIRS, "rate_limit_scale": 0.2, "rate_limit_time_scale": 120, **extra}


async def test_auto_reads_the_archive_where_it_covers_and_rest_elsewhere(
    sim_factory: Any, pg_dsn: str, tmp_path: Path
) -> None:
    async with sim_factory(**sim_options()) as sim:
        cfg = make_config(sim, pg_dsn, PAIRS, data_dir=str(tmp_path), exchanges=("binance",))
        now = sim.clock.now_ms()
        req = resolve_request(cfg, iso(START), iso(END), now_ms=now)
        assert req.source == "auto"
        limiters = sim_limiters(sim)
        async with (
            open_database(cfg, apply_schema=True) as db,
            open_clients(
                cfg, limiters=limiters, clock_ms=sim.clock.now_ms, retry=FAST_RETRY
            ) as clients,
        ):
            await sync_configured_pairs(db, cfg)
            lines = await dry_run(db, cfg, clients, req, now_ms=now)
            table = dry_run_table(lines)
            assert [(ln.archive_minutes, ln.archive_files) for ln in lines] == [(1440, 1)] * 2
            assert "archive 2025-12-30; rest 2025-12-31..2026-01-01" in table, table
            rest_only = resolve_request(cfg, iso(START), iso(END), now_ms=now, source="rest")
            rest_lines = await dry_run(db, cfg, clients, rest_only, now_ms=now)
            # REST is asked for a day less (the estimate drops with it; here the limits are
            # scaled to milliseconds, so the archive's own guess dominates)
            assert [ln.estimate.minutes for ln in lines] == [
                ln.estimate.minutes - 1440 for ln in rest_lines
            ]
            assert sum(ln.estimate.seconds for ln in lines) < sum(
                ln.estimate.seconds for ln in rest_lines
            )
            assert sim.stats.archive_requests == 0  # a dry run fetches nothing

            result = await run_backfill(db, cfg, clients, req, now_ms=now)
            assert result.ok, summary_table(result.reports)
            assert [(r.archive, r.archive_files) for r in result.reports] == [(1440, 1)] * 2
            counts = await assert_silver_is_truth(db, sim, "binance", PAIRS, START, END)
            assert counts["archive"] > 0 and counts["rest"] > 0
            rest_rows = await db.fetchval(
                "SELECT count(*) FROM silver.fact_ohlcv WHERE source = 'rest'"
                " AND interval_start < to_timestamp($1 / 1000.0)",
                START + DAY_MS,
            )
            assert rest_rows == 0  # REST only served the days the archive does not have yet
            await assert_completeness(db, "binance", PAIRS, list(range(START, TODAY, HOUR_MS)))

            before = await table_hashes(db)
            again = await run_backfill(db, cfg, clients, req, now_ms=sim.clock.now_ms())
            assert again.ok and again.rows == 0
            assert await table_hashes(db) == before


async def test_archive_only_leaves_what_the_archive_lacks_missing(
    sim_factory: Any, pg_dsn: str, tmp_path: Path
) -> None:
    async with sim_factory(**sim_options()) as sim:
        cfg = make_config(sim, pg_dsn, PAIRS, data_dir=str(tmp_path), exchanges=("binance",))
        now = sim.clock.now_ms()
        req = resolve_request(cfg, iso(START), iso(END), now_ms=now, source="archive")
        async with (
            open_database(cfg, apply_schema=True) as db,
            open_clients(cfg, limiters=sim_limiters(sim), clock_ms=sim.clock.now_ms) as clients,
        ):
            await sync_configured_pairs(db, cfg)
            result = await run_backfill(db, cfg, clients, req, now_ms=now)
            assert result.ok  # nothing a later run could fix: the archive has no more
            assert sim.stats.requests["binance"] == 0  # no REST at all
            for rep in result.reports:
                assert rep.archive == 1440
                assert rep.missing[NOT_IN_ARCHIVE] == (END - START) // 60_000 - 1440
            await assert_silver_is_truth(db, sim, "binance", PAIRS, START, START + DAY_MS)


async def test_an_unreachable_archive_falls_back_to_rest(
    sim_factory: Any, pg_dsn: str, tmp_path: Path
) -> None:
    async with sim_factory(**sim_options()) as sim:
        cfg = make_config(sim, pg_dsn, PAIRS, data_dir=str(tmp_path), exchanges=("binance",))
        cfg.exchanges.binance.archive_url = "http://127.0.0.1:9/public_data"  # nothing listens
        now = sim.clock.now_ms()
        req = resolve_request(cfg, iso(START), iso(END), now_ms=now)
        async with (
            open_database(cfg, apply_schema=True) as db,
            open_clients(cfg, limiters=sim_limiters(sim), clock_ms=sim.clock.now_ms) as clients,
        ):
            await sync_configured_pairs(db, cfg)
            result = await run_backfill(db, cfg, clients, req, now_ms=now)
            assert result.ok, summary_table(result.reports)
            assert "cannot be reached" in result.archive.unreachable
            counts = await assert_silver_is_truth(db, sim, "binance", PAIRS, START, END)
            assert "archive" not in counts


async def test_kraken_files_from_the_archive_folder(
    sim_factory: Any, pg_dsn: str, tmp_path: Path
) -> None:
    async with sim_factory(**sim_options()) as sim:
        folder = tmp_path / "kraken"
        # the "quarterly file" ends 6 hours into the range: Trades/OHLC do the rest
        write_kraken_zip(sim.market, folder / "Kraken_OHLCVT.zip", PAIRS,
                         START - DAY_MS, START + 6 * HOUR_MS)  # fmt: skip
        cfg = make_config(
            sim, pg_dsn, PAIRS, data_dir=str(tmp_path), exchanges=("kraken",),
            kraken_archive_dir=str(folder),
        )  # fmt: skip
        now = sim.clock.now_ms()
        end = START + 8 * HOUR_MS
        req = resolve_request(cfg, iso(START), iso(end), now_ms=now)
        async with (
            open_database(cfg, apply_schema=True) as db,
            open_clients(
                cfg, limiters=sim_limiters(sim), clock_ms=sim.clock.now_ms, retry=FAST_RETRY
            ) as clients,
        ):
            await sync_configured_pairs(db, cfg)
            lines = await dry_run(db, cfg, clients, req, now_ms=now)
            assert all(ln.archive_files == 1 and ln.archive_minutes > 300 for ln in lines)
            result = await run_backfill(db, cfg, clients, req, now_ms=now)
            assert result.ok, summary_table(result.reports)
            counts = await assert_silver_is_truth(db, sim, "kraken", PAIRS, START, end)
            assert counts["archive"] > 0 and counts["trades"] > 0
            first_trades = await db.fetchval(
                "SELECT min(interval_start) FROM silver.fact_ohlcv WHERE source = 'trades'"
            )
            assert first_trades >= to_datetime(START + 6 * HOUR_MS - 60_000)
