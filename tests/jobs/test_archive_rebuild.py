"""Archive rows live in the lake: imported from the simulator's Binance US archive and a Kraken
OHLCVT zip into a lake mirrored to S3, they are sealed ``archive_`` parts whose lines say
``origin`` ``archive`` (or ``no_trades``), every bronze row names its part, and after the
database and the local lake are lost, ``klined rebuild`` from S3 alone gives the same bronze,
silver, gold and completeness."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import msgspec
import pytest

from klined.config import S3Config
from klined.jobs.archive_import import import_binance, import_kraken
from klined.jobs.gapfill import sync_configured_pairs
from klined.jobs.rebuild import RebuildRequest, lake_from, run_rebuild
from klined.lake import iter_local_parts, parse_key, read_part_file
from klined.model import DAY_MS, Pair, to_datetime
from klined.sim import Market
from klined.sim.archive import write_kraken_zip
from klined.warehouse.database import Database, open_database
from tests.commands.test_rebuild import recreate
from tests.fixtures.sim import SIM_START
from tests.lake.test_s3 import objects
from tests.support.truth import assert_silver_is_truth, make_config
from tests.support.warehouse import GOLD_TABLES, WALL_CLOCK

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PAIRS = ["BTC/USD", "REKT/USD"]
#: 2025-12-29T00:00:00Z, three days before the simulator's clock
DAY0 = SIM_START - SIM_START % DAY_MS - 3 * DAY_MS
START, END = DAY0, DAY0 + 2 * DAY_MS


async def snapshot(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the range (wall-clock columns left out), per table, sorted."""
    out = {}
    tables = ("bronze.bronze_ohlcv_native", "silver.fact_ohlcv", *GOLD_TABLES)
    for table in (*tables, "monitoring.hourly_completeness"):
        time_col = "hour_start" if table.startswith("monitoring") else "interval_start"
        cols = await db.fetch(
            "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0"
            " AND NOT attisdropped ORDER BY attnum",
            table,
        )
        keep = [c["attname"] for c in cols if c["attname"] not in WALL_CLOCK.get(table, ())]
        rows = await db.fetch(
            f"SELECT {', '.join(keep)} FROM {table} WHERE {time_col} >= $1 AND {time_col} < $2",
            to_datetime(START),
            to_datetime(END),
        )
        out[table] = sorted(tuple(r.values()) for r in rows)
    return out


async def test_archives_are_in_the_lake_and_a_rebuild_from_s3_gives_the_same_warehouse(
    sim_factory: Any,
    pg_dsn: str,
    pg_server_dsn: str,
    tmp_path: Path,
    s3_endpoint: str,
    s3_bucket: str,
) -> None:
    kraken_zip = write_kraken_zip(Market(7), tmp_path / "Kraken_OHLCVT.zip", PAIRS, START, END,
                                  intervals=(1,))  # fmt: skip
    async with sim_factory(pairs=PAIRS) as sim:
        cfg = make_config(sim, pg_dsn, PAIRS, data_dir=str(tmp_path / "data"))
        cfg = msgspec.structs.replace(
            cfg, s3=S3Config(bucket=s3_bucket, endpoint_url=s3_endpoint, prefix="lake")
        )
        pairs = [Pair.parse(p) for p in PAIRS]
        async with open_database(cfg, apply_schema=True) as db:
            await sync_configured_pairs(db, cfg)
            binance = await import_binance(db, cfg, pairs, START, END, now_ms=sim.clock.now_ms())
            kraken = await import_kraken(db, cfg, [kraken_zip], pairs)
            assert binance.ok and kraken.ok, (binance.errors, kraken.errors)
            await assert_silver_is_truth(db, sim, "binance", PAIRS, START, END)

            # the lake: sealed archive parts, one per exchange, pair and hour, all in S3
            parts = list(iter_local_parts(cfg.lake_root))
            assert parts and all("-archive_" in p.key for p in parts)
            keys = [parse_key(p.key) for p in parts]
            assert len({(k.exchange, k.symbol, k.hour_ms) for k in keys}) == len(parts)
            assert {k.exchange for k in keys} == {"binance", "kraken"}
            origins = {r.origin for p in parts for r in read_part_file(p.path).records}
            assert origins == {"archive", "no_trades"}
            assert not list(cfg.lake_root.rglob("*.writing"))
            assert set(objects(s3_endpoint, s3_bucket)) >= {f"lake/{p.key}" for p in parts}
            # bronze: every row from a part, the part's own key
            loaded = await db.fetch(
                "SELECT lake_key, count(*) AS n FROM bronze.bronze_ohlcv_native GROUP BY 1"
            )
            assert None not in {r["lake_key"] for r in loaded}
            assert {r["lake_key"] for r in loaded} == {p.key for p in parts}
            assert sum(r["n"] for r in loaded) == binance.rows + kraken.rows
            before = await snapshot(db)
        assert before["silver.fact_ohlcv"] and before["monitoring.hourly_completeness"]

        # the machine is gone: a new database, no local lake, S3 only
        await recreate(pg_server_dsn, pg_dsn)
        shutil.rmtree(cfg.lake_root)
        async with open_database(cfg, apply_schema=True) as db:
            lake = lake_from(cfg, f"s3://{s3_bucket}/lake")
            result = await run_rebuild(db, cfg, lake, RebuildRequest(START, END))
            assert result.ok and result.parts_listed == len(parts)
            after = await snapshot(db)
            assert not await db.fetchval(
                "SELECT count(*) FROM bronze.bronze_ohlcv_native WHERE lake_key IS NULL"
            )
            await assert_silver_is_truth(db, sim, "binance", PAIRS, START, END)
    for table, rows in before.items():
        assert after[table] == rows, table
