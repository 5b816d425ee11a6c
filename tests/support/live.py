"""Shared helpers for the live-path tests against the simulator (no tests here): a daemon
config, the chain with REST frozen in time, silver and gold as comparable rows, a second
database on the test server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg

from klined.config import Config, LakeConfig, LiveConfig
from klined.jobs.chain import run_chain
from klined.lake import LakeStore
from klined.model import to_datetime
from klined.rest.client import RetryPolicy, open_clients
from klined.sim import Simulator
from klined.warehouse.database import Database, with_database
from tests.support.truth import make_config, sim_limiters

FAST_RETRY = RetryPolicy(attempts=6, initial_s=0.02, max_s=0.2)


def daemon_config(sim: Simulator, dsn: str, tmp_path: Path, pairs: list[str]) -> Config:
    """The daemon against the simulator with the live path on and a chain that never runs by
    itself (the tests run it, at a time they choose)."""
    cfg = make_config(sim, dsn, pairs, data_dir=str(tmp_path / "data"))
    cfg.daemon.status_socket = str(tmp_path / "k.sock")
    cfg.lake = LakeConfig(flush_interval_s=0.2, upload_interval_s=0.2)
    cfg.chain.schedule = "0 0 1 1 *"
    cfg.chain.catchup_hours = 0
    cfg.chain.rest_retry_hours = 0
    cfg.live = LiveConfig(gold_interval_s=1.0, flush_interval_s=0.5)
    for ex in ("binance", "kraken"):
        section = getattr(cfg.exchanges, ex)
        section.stale_after_s = 2.0
        section.connect_timeout_s = 3.0
    return cfg


async def frozen_chain(
    db: Database, cfg: Config, sim: Simulator, hours: list[int], frozen_ms: int
) -> None:
    """The chain for ``hours`` over the lake, with REST's clock and the chain's "now" fixed at
    ``frozen_ms``: two runs fetch exactly the same REST rows (same values, same times)."""
    async with open_clients(
        cfg, limiters=sim_limiters(sim), clock_ms=lambda: frozen_ms, retry=FAST_RETRY
    ) as clients:
        report = await run_chain(
            db, cfg, hours, trigger="manual", lake=LakeStore(cfg.lake_root), clients=clients,
            now_ms=frozen_ms, lock_wait_s=60,
        )  # fmt: skip
    assert report.ok, report.table()


_SILVER_SQL = """
SELECT exchange, symbol, quote_asset, interval_seconds, interval_start, interval_end, open, high,
       low, close, volume, quote_volume, trade_count, vwap, source, rank, event_ts, ingestion_ts
FROM silver.fact_ohlcv WHERE interval_start >= $1 AND interval_start < $2
ORDER BY exchange, symbol, interval_start
"""
_GOLD_SQL = """
SELECT exchange, symbol, interval_start, interval_end, open, high, low, close, volume,
       quote_volume, trade_count, minutes, traded_minutes, source
FROM gold.ohlcv_{} WHERE interval_start >= $1 AND interval_start < $2
ORDER BY exchange, symbol, interval_start
"""
#: where each table's key is in its rows
_KEYS = {"silver": (0, 1, 4)}


async def data_rows(db: Database, start_ms: int, end_ms: int) -> dict[str, list[tuple[Any, ...]]]:
    """Every data column of silver and gold in ``[start, end)``: all but ``updated_at``
    (silver) and ``ingestion_ts`` (gold), which say when klined last wrote the row."""
    span = (to_datetime(start_ms), to_datetime(end_ms))
    out = {"silver": [tuple(r) for r in await db.fetch(_SILVER_SQL, *span)]}
    for suffix in ("5m", "15m", "30m", "1h"):
        out[suffix] = [tuple(r) for r in await db.fetch(_GOLD_SQL.format(suffix), *span)]
    return out


def first_difference(name: str, a: list[tuple[Any, ...]], b: list[tuple[Any, ...]]) -> str:
    """The first key whose rows differ, with both rows (for an assertion message)."""
    index = _KEYS.get(name, (0, 1, 2))
    rows_a = {tuple(r[i] for i in index): r for r in a}
    rows_b = {tuple(r[i] for i in index): r for r in b}
    for key in sorted(set(rows_a) | set(rows_b), key=str):
        if rows_a.get(key) != rows_b.get(key):
            return f"{key}: {rows_a.get(key)} vs {rows_b.get(key)}"
    return "none"


def assert_same(a: dict[str, list[tuple[Any, ...]]], b: dict[str, list[tuple[Any, ...]]]) -> None:
    for name in a:
        assert a[name] == b[name], f"{name} differs: {first_difference(name, a[name], b[name])}"


@asynccontextmanager
async def another_database(server_dsn: str, name: str) -> AsyncIterator[str]:
    """A fresh database on the test server (dropped afterwards); yields its DSN."""
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield with_database(server_dsn, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
