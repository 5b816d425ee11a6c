"""Gap-fill against the real simulator and an embedded PostgreSQL: silver equals the truth."""

from __future__ import annotations

from typing import Any

import pytest

from klined.jobs import silver
from klined.jobs.gapfill import fill_range
from klined.model import HOUR_MS, MINUTE_MS, floor_hour
from klined.rest.client import RetryPolicy, open_clients
from klined.warehouse.database import open_database
from tests.fixtures.sim import SIM_START
from tests.support.truth import assert_silver_is_truth, make_config, sim_limiters

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PAIRS = ["BTC/USD", "REKT/USD", "KSM/USD"]
FAST_RETRY = RetryPolicy(attempts=4, initial_s=0.02, max_s=0.2)


async def merge(db: Any, hours: set[tuple[str, int]]) -> None:
    for h in sorted({h for _, h in hours}):
        await silver.merge_hour(db, h)


async def test_recent_hours_from_candles_and_old_day_from_trades(
    sim_factory: Any, pg_dsn: str
) -> None:
    async with sim_factory(pairs=PAIRS, rate_limit_time_scale=60) as sim:
        cfg = make_config(sim, pg_dsn, PAIRS)
        recent = (floor_hour(SIM_START) - 3 * HOUR_MS, floor_hour(SIM_START))
        old = (floor_hour(SIM_START) - 30 * HOUR_MS, floor_hour(SIM_START) - 26 * HOUR_MS)
        async with (
            open_database(cfg, apply_schema=True) as db,
            open_clients(
                cfg, limiters=sim_limiters(sim), clock_ms=sim.clock.now_ms, retry=FAST_RETRY
            ) as clients,
        ):
            for start, end in (recent, old):
                res = await fill_range(db, cfg, start, end, clients, now_ms=sim.clock.now_ms())
                assert res.missing == 0, [r.missing for r in res.reports]
                assert res.wanted == 2 * len(PAIRS) * (end - start) // MINUTE_MS
                await merge(db, res.touched)
            for ex in ("binance", "kraken"):
                counts = await assert_silver_is_truth(db, sim, ex, PAIRS, *recent)
                assert counts.get("no_trades", 0) > 0  # the quiet pairs have quiet minutes
                counts = await assert_silver_is_truth(db, sim, ex, PAIRS, *old)
                if ex == "kraken":
                    assert counts.get("trades", 0) > 0 and "rest" not in counts
            # nothing left to fetch: a second run asks the exchanges for nothing
            before = {ex: c.limiter.stats.requests for ex, c in clients.items()}
            for start, end in (recent, old):
                res = await fill_range(db, cfg, start, end, clients, now_ms=sim.clock.now_ms())
                assert res.wanted == 0 and res.rows == 0
            assert {ex: c.limiter.stats.requests for ex, c in clients.items()} == before
        assert sim.stats.http_418 == 0
