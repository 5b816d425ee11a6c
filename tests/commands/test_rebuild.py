"""``klined rebuild``: the daemon and its chain against the simulator with faults, then the
database is dropped and the local lake deleted, and a rebuild from S3 alone gives identical
silver, gold and completeness; a second rebuild changes nothing at all."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import asyncpg
import pytest

from klined.model import HOUR_MS, iso
from klined.sim import SimClock
from klined.warehouse.database import open_database
from tests.commands.test_backfill import run
from tests.fixtures.sim import SIM_PAIRS, SimFactory
from tests.support.scenario import FAULTS, H1, HOURS, START, host_config, hosts, until_settled
from tests.support.warehouse import GOLD_TABLES, WALL_CLOCK, table_hash

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

COMPARED = ("silver.fact_ohlcv", *GOLD_TABLES, "monitoring.hourly_completeness")


async def hashes(cfg: Any, *, wall_clock: bool) -> dict[str, str]:
    async with open_database(cfg) as db:
        return {
            t: await table_hash(db, t, () if wall_clock else WALL_CLOCK.get(t, ()))
            for t in (*COMPARED, "bronze.bronze_ohlcv_native", "ops.lake_parts")
        }


async def recreate(server_dsn: str, dsn: str) -> None:
    name = urlsplit(dsn).path.lstrip("/")
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def test_rebuild_from_the_lake_gives_the_same_warehouse(
    sim_factory: SimFactory,
    tmp_path: Path,
    s3_endpoint: str,
    s3_bucket: str,
    pg_dsn: str,
    pg_server_dsn: str,
    capsys: Any,
) -> None:
    s3 = (s3_endpoint, s3_bucket)
    async with sim_factory(clock=SimClock(START, 60.0), faults=FAULTS) as sim:
        cfg = host_config(tmp_path, "vm", sim, s3, pg_dsn)
        async with hosts([cfg], sim):
            await until_settled(sim, cfg, s3, 2 * len(SIM_PAIRS))
        # stopped: the chain ran the hours it found closed; the warehouse as built live
        before = await hashes(cfg, wall_clock=False)

    async with open_database(cfg) as db:
        assert await db.fetchval("SELECT count(*) FROM silver.fact_ohlcv") == len(HOURS) * 60 * 8
        hours = {
            r["h"] for r in await db.fetch("SELECT DISTINCT hour_start AS h FROM ops.lake_parts")
        }
    await recreate(pg_server_dsn, pg_dsn)
    shutil.rmtree(cfg.lake_root)  # the host is gone too: S3 is all that is left

    span = ["--from", iso(HOURS[0]), "--to", iso(H1 + HOUR_MS)]
    args = ["rebuild", "-c", cfg.source_path, *span]
    assert await anyio.to_thread.run_sync(run, args) == 0
    out = capsys.readouterr()
    n = len(HOURS)
    assert f"[{n}/{n}]" in out.err and "bronze" in out.err and f"{n} hour(s)" in out.out
    after = await hashes(cfg, wall_clock=False)
    for table in COMPARED:
        assert after[table] == before[table], table
    # bronze holds what the live warehouse loaded for those hours (parts of later hours, in
    # S3 too, were outside the range)
    async with open_database(cfg) as db:
        rebuilt = {
            r["h"] for r in await db.fetch("SELECT DISTINCT hour_start AS h FROM ops.lake_parts")
        }
        assert rebuilt == {h for h in hours if h.timestamp() * 1000 <= H1}
        assert not await db.fetchval(
            "SELECT count(*) FROM bronze.bronze_ohlcv_native WHERE lake_key IS NULL"
        )

    # again: nothing to load, nothing rewritten (wall-clock columns included)
    still = await hashes(cfg, wall_clock=True)
    assert await anyio.to_thread.run_sync(run, args) == 0
    assert "bronze 0 rows loaded, silver 0, gold 0, completeness 0" in capsys.readouterr().out
    assert await hashes(cfg, wall_clock=True) == still


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from", "2026-10-02", "--to", "2026-10-01"], "reversed range"),
        (["--from", "2099-01-01", "--to", "2099-02-01"], "in the future"),
        (["--from", "soon", "--to", "2026-10-01"], "--from"),
        (["--from", "2026-10-01", "--to", "2026-10-02", "--exchange", "coinbase"], "not enabled"),
        (["--from", "2026-10-01", "--to", "2026-10-02", "--lake", "s3://"], "no bucket"),
    ],
)
def test_bad_arguments_exit_2(tmp_path: Path, capsys: Any, args: list[str], message: str) -> None:
    cfg = tmp_path / "k.toml"
    cfg.write_text(f'[daemon]\ndata_dir = "{tmp_path}"\n')
    assert run(["rebuild", "-c", str(cfg), *args]) == 2
    assert message in capsys.readouterr().err
