"""The property the live path is built on: for the same feed, silver and gold after the hourly
chain are identical, row for row and value for value, whether the live path was on or off.

One capture feeds both warehouses, so the only difference between them is the live path. The
daemon runs against the simulator with faults (late finals, one of them after the hour turned,
duplicate finals, abrupt disconnects mid-minute, a silent stall that ends in a reconnect) and
the live path on, writing warehouse A. While it captures, the chain runs for the previous hour
on A (concurrently with live writes), and A's silver already holds the minutes just closed.
Then the chain runs for both hours on A and, over the same lake, on a fresh warehouse B (the
live path off). REST answers are fixed in time (a frozen REST clock and chain ``now``, both after
the capture), so both chains fetch the same rows.

Compared: every column of silver except ``updated_at`` and every column of gold except
``ingestion_ts``: both say when klined last wrote the row (a live row rewritten by the chain,
or a gold bucket refreshed several times, was written at other moments), not what the candle
is. ``event_ts`` and ``ingestion_ts`` of silver are data (the winning event's times) and are
compared.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest

from klined.daemon.process import Daemon
from klined.jobs.gapfill import sync_configured_pairs
from klined.model import HOUR_MS, MINUTE_MS, floor_hour, to_datetime
from klined.sim import FaultPlan, FaultRule
from klined.warehouse.database import open_database
from tests.fixtures.sim import SIM_START
from tests.support.live import (
    another_database,
    assert_same,
    daemon_config,
    data_rows,
    frozen_chain,
)
from tests.support.streams import until

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PAIRS = ["BTC/USD", "ETH/USD", "REKT/USD"]
H1 = floor_hour(SIM_START) + HOUR_MS  # 2026-01-01T01:00Z
H0 = H1 - HOUR_MS
START = H1 - 5 * MINUTE_MS  # capture starts at 00:55
MID_CHAIN_AT = H1 + 4 * MINUTE_MS  # the chain for H0 runs while live writes H1
STOP_AT = H1 + 16 * MINUTE_MS
FROZEN = H1 + 17 * MINUTE_MS  # REST's clock and the chain's "now" for every chain run

FAULTS = FaultPlan(
    seed=5,
    rules=[
        # 00:59's final reaches the streams only after 01:00 (its hour is closed by then)
        FaultRule(kind="late_final", exchange="binance", pair="BTC/USD", until="next_hour"),
        FaultRule(kind="late_final", exchange="kraken", pair="ETH/USD", delay_s=90, times=2),
        FaultRule(kind="duplicate", probability=0.2, times=0),
        FaultRule(kind="disconnect", exchange="binance", connection=1, message=40),
        FaultRule(kind="disconnect", exchange="kraken", connection=1, message=70),
        # a stall on a reconnected Kraken connection (the first is reset at its 70th message):
        # not "the second", whose number depends on how often a loaded machine reconnected
        FaultRule(kind="stall", exchange="kraken", message=100, duration_s=3.0),
        FaultRule(kind="out_of_order", probability=0.02, times=0),
    ],
)


async def test_silver_and_gold_after_the_chain_are_the_same_with_live_on_or_off(
    sim_factory: Any, pg_dsn: str, pg_server_dsn: str, tmp_path: Path
) -> None:
    async with sim_factory(
        pairs=PAIRS, start_ms=START, faults=FAULTS, rate_limit_time_scale=60
    ) as sim:
        cfg = daemon_config(sim, pg_dsn, tmp_path, PAIRS)
        daemon = Daemon(cfg, handle_signals=False)
        async with open_database(cfg) as db_a:
            async with anyio.create_task_group() as tg:
                await tg.start(daemon.run)
                assert daemon.live is not None
                await until(lambda: sim.clock.now_ms() >= MID_CHAIN_AT, 60)
                # live rows of the hour in progress are in silver, long before any chain
                h1_live = await db_a.fetchval(
                    "SELECT count(*) FROM silver.fact_ohlcv WHERE interval_start >= $1"
                    " AND source = 'ws_final'",
                    to_datetime(H1),
                )
                assert h1_live >= len(PAIRS), "no live row of the hour in progress"
                assert not await db_a.fetchval(
                    "SELECT count(*) FROM ops.job_runs WHERE hour_start IS NOT NULL"
                )
                # the chain for the previous hour, while the live path writes the current one
                written_before = daemon.live.status.written
                await frozen_chain(db_a, cfg, sim, [H0], FROZEN)
                await until(lambda: sim.clock.now_ms() >= STOP_AT, 60)
                assert daemon.live.status.written > written_before
                live = daemon.live.snapshot()
                daemon.request_stop()
            assert live.dropped_batches == 0 and live.rejected == 0
            assert live.written > 10 * len(PAIRS) and live.lag_samples > 0
            await until(lambda: sim.clock.now_ms() >= FROZEN + MINUTE_MS, 60)
            await frozen_chain(db_a, cfg, sim, [H0, H1], FROZEN)
            on = await data_rows(db_a, H0, H1 + HOUR_MS)
        async with another_database(pg_server_dsn, f"off_{uuid.uuid4().hex[:8]}") as dsn_b:
            cfg_b = daemon_config(sim, dsn_b, tmp_path, PAIRS)
            async with open_database(cfg_b, apply_schema=True) as db_b:
                await sync_configured_pairs(db_b, cfg_b)
                await frozen_chain(db_b, cfg_b, sim, [H0, H1], FROZEN)
                off = await data_rows(db_b, H0, H1 + HOUR_MS)
    fired = {(f.kind, f.exchange) for f in sim.faults.fired}
    for kind in ("late_final", "duplicate", "disconnect"):
        assert {(kind, "binance"), (kind, "kraken")} <= fired, kind
    kraken_connections = [
        (c.number, c.scheduled, c.messages, c.close_reason)
        for c in sim.stats.connection_log
        if c.exchange == "kraken"
    ]
    assert ("stall", "kraken") in fired, kraken_connections
    sources = {r[14] for r in on["silver"]}
    assert {"ws_final", "rest"} <= sources, sources  # captured minutes and REST-filled gaps
    assert len(on["silver"]) > 2 * len(PAIRS) * 60
    assert_same(on, off)
