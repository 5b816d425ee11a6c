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

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from klined.config import Config, LakeConfig, LiveConfig
from klined.daemon.process import Daemon
from klined.jobs.chain import run_chain
from klined.jobs.gapfill import sync_configured_pairs
from klined.lake import LakeStore
from klined.model import HOUR_MS, MINUTE_MS, floor_hour, to_datetime
from klined.rest.client import RetryPolicy, open_clients
from klined.sim import FaultPlan, FaultRule, Simulator
from klined.warehouse.database import Database, open_database
from tests.fixtures.pg import _with_database
from tests.fixtures.sim import SIM_START
from tests.support.streams import until
from tests.support.truth import make_config, sim_limiters

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PAIRS = ["BTC/USD", "ETH/USD", "REKT/USD"]
H1 = floor_hour(SIM_START) + HOUR_MS  # 2026-01-01T01:00Z
H0 = H1 - HOUR_MS
START = H1 - 5 * MINUTE_MS  # capture starts at 00:55
MID_CHAIN_AT = H1 + 4 * MINUTE_MS  # the chain for H0 runs while live writes H1
STOP_AT = H1 + 16 * MINUTE_MS
FROZEN = H1 + 17 * MINUTE_MS  # REST's clock and the chain's "now" for every chain run
FAST_RETRY = RetryPolicy(attempts=6, initial_s=0.02, max_s=0.2)

FAULTS = FaultPlan(
    seed=5,
    rules=[
        # 00:59's final reaches the streams only after 01:00 (its hour is closed by then)
        FaultRule(kind="late_final", exchange="binance", pair="BTC/USD", until="next_hour"),
        FaultRule(kind="late_final", exchange="kraken", pair="ETH/USD", delay_s=90, times=2),
        FaultRule(kind="duplicate", probability=0.2, times=0),
        FaultRule(kind="disconnect", exchange="binance", connection=1, message=40),
        FaultRule(kind="disconnect", exchange="kraken", connection=1, message=70),
        FaultRule(kind="stall", exchange="kraken", connection=2, message=30, duration_s=3.0),
        FaultRule(kind="out_of_order", probability=0.02, times=0),
    ],
)


def daemon_config(sim: Simulator, dsn: str, tmp_path: Path) -> Config:
    cfg = make_config(sim, dsn, PAIRS, data_dir=str(tmp_path / "data"))
    cfg.daemon.status_socket = str(tmp_path / "k.sock")
    cfg.lake = LakeConfig(flush_interval_s=0.2, upload_interval_s=0.2)
    cfg.chain.schedule = "0 0 1 1 *"  # never during the test: the test runs the chains
    cfg.chain.catchup_hours = 0
    cfg.chain.rest_retry_hours = 0
    cfg.live = LiveConfig(gold_interval_s=1.0, flush_interval_s=0.5)
    for ex in ("binance", "kraken"):
        section = getattr(cfg.exchanges, ex)
        section.stale_after_s = 2.0
        section.connect_timeout_s = 3.0
    return cfg


async def chain(db: Database, cfg: Config, sim: Simulator, hours: list[int]) -> None:
    async with open_clients(
        cfg, limiters=sim_limiters(sim), clock_ms=lambda: FROZEN, retry=FAST_RETRY
    ) as clients:
        report = await run_chain(
            db, cfg, hours, trigger="manual", lake=LakeStore(cfg.lake_root), clients=clients,
            now_ms=FROZEN, lock_wait_s=60,
        )  # fmt: skip
    assert report.ok, report.table()


SILVER_SQL = """
SELECT exchange, symbol, quote_asset, interval_seconds, interval_start, interval_end, open, high,
       low, close, volume, quote_volume, trade_count, vwap, source, rank, event_ts, ingestion_ts
FROM silver.fact_ohlcv WHERE interval_start >= $1 AND interval_start < $2
ORDER BY exchange, symbol, interval_start
"""
GOLD_SQL = """
SELECT exchange, symbol, interval_start, interval_end, open, high, low, close, volume,
       quote_volume, trade_count, minutes, traded_minutes, source
FROM gold.ohlcv_{} WHERE interval_start >= $1 AND interval_start < $2
ORDER BY exchange, symbol, interval_start
"""


async def tables(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every data column of silver and gold over the two hours."""
    span = (to_datetime(H0), to_datetime(H1 + HOUR_MS))
    out = {"silver": [tuple(r) for r in await db.fetch(SILVER_SQL, *span)]}
    for suffix in ("5m", "15m", "30m", "1h"):
        out[suffix] = [tuple(r) for r in await db.fetch(GOLD_SQL.format(suffix), *span)]
    return out


def first_difference(name: str, a: list[tuple[Any, ...]], b: list[tuple[Any, ...]]) -> str:
    def key(r: tuple[Any, ...]) -> tuple[Any, ...]:
        return (r[0], r[1], r[4]) if name == "silver" else r[:3]

    keys_a = {key(r): r for r in a}
    keys_b = {key(r): r for r in b}
    for key in sorted(set(keys_a) | set(keys_b), key=str):
        if keys_a.get(key) != keys_b.get(key):
            return f"{key}: live on {keys_a.get(key)} / live off {keys_b.get(key)}"
    return "none"


@asynccontextmanager
async def second_database(pg_server_dsn: str, name: str) -> AsyncIterator[str]:
    import asyncpg

    admin = await asyncpg.connect(pg_server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield _with_database(pg_server_dsn, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_silver_and_gold_after_the_chain_are_the_same_with_live_on_or_off(
    sim_factory: Any, pg_dsn: str, pg_server_dsn: str, tmp_path: Path
) -> None:
    async with sim_factory(
        pairs=PAIRS, start_ms=START, faults=FAULTS, rate_limit_time_scale=60
    ) as sim:
        cfg = daemon_config(sim, pg_dsn, tmp_path)
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
                await chain(db_a, cfg, sim, [H0])
                await until(lambda: sim.clock.now_ms() >= STOP_AT, 60)
                assert daemon.live.status.written > written_before
                live = daemon.live.snapshot()
                daemon.request_stop()
            assert live.dropped_batches == 0 and live.rejected == 0
            assert live.written > 10 * len(PAIRS) and live.lag_samples > 0
            await until(lambda: sim.clock.now_ms() >= FROZEN + MINUTE_MS, 60)
            await chain(db_a, cfg, sim, [H0, H1])
            on = await tables(db_a)
        async with second_database(pg_server_dsn, f"{Path(pg_dsn).name}_off") as dsn_b:
            cfg_b = daemon_config(sim, dsn_b, tmp_path)
            async with open_database(cfg_b, apply_schema=True) as db_b:
                await sync_configured_pairs(db_b, cfg_b)
                await chain(db_b, cfg_b, sim, [H0, H1])
                off = await tables(db_b)
    fired = {(f.kind, f.exchange) for f in sim.faults.fired}
    for kind in ("late_final", "duplicate", "disconnect"):
        assert {(kind, "binance"), (kind, "kraken")} <= fired, kind
    assert ("stall", "kraken") in fired
    sources = {r[14] for r in on["silver"]}
    assert {"ws_final", "rest"} <= sources, sources  # captured minutes and REST-filled gaps
    assert len(on["silver"]) > 2 * len(PAIRS) * 60
    for name in on:
        assert on[name] == off[name], (
            f"{name} differs: {first_difference(name, on[name], off[name])}"
        )
