"""The chain's publish step: one Parquet file per dataset, exchange and day, equal to the
warehouse through pyarrow.dataset, DuckDB and polars; rewritten whole when the day changes;
mirrored to S3 (moto); a failure keeps the day queued."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import boto3
import duckdb
import polars as pl
import pyarrow.dataset as pds
import pyarrow.fs as pafs
import pytest

from klined.config import Config, DaemonConfig, DatabaseConfig, S3Config
from klined.datasets.publish import dataset_path, datasets_root, mark_days, publish
from klined.errors import DatasetError
from klined.jobs import bronze, gold, silver
from klined.jobs.chain import run_chain
from klined.jobs.chain_report import RUN_STEPS
from klined.model import DAY_MS, MINUTE_MS, parse_time
from klined.warehouse.database import Database
from tests.support.datasets import assert_same_rows, keyed, seed_edge_cases, warehouse_rows
from tests.support.warehouse import H0, candle, warehouse_dsn, wdb

__all__ = ["warehouse_dsn", "wdb"]

pytestmark = pytest.mark.anyio

INTERVALS = ("1m", "5m", "15m", "30m", "1h", "4h", "1d")
MARCH_1 = parse_time("2026-03-01")
FEB_28 = parse_time("2026-02-28")


def cfg_for(db: Database, tmp_path: Path, **s3: Any) -> Config:
    return Config(
        daemon=DaemonConfig(data_dir=str(tmp_path)),
        database=DatabaseConfig(dsn=db.dsn),
        s3=S3Config(**s3),
    )


def files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.parquet"))


def read_three_ways(root: Path, interval: str) -> list[dict[tuple, dict[str, Any]]]:
    """The dataset as pyarrow.dataset, DuckDB and polars read it (Hive partitions)."""
    folder = root / f"ohlcv_{interval}"
    arrow = pds.dataset(folder, format="parquet", partitioning="hive").to_table().to_pylist()
    glob = str(folder / "**" / "*.parquet")
    rel = duckdb.connect().execute(f"SELECT * FROM read_parquet('{glob}', hive_partitioning=1)")
    names = [d[0] for d in rel.description]
    duck = [dict(zip(names, r, strict=True)) for r in rel.fetchall()]
    polars = pl.scan_parquet(glob, hive_partitioning=True).collect().to_dicts()
    return [keyed(rows) for rows in (arrow, duck, polars)]


async def test_published_days_are_the_warehouse(wdb: Database, tmp_path: Path) -> None:
    await seed_edge_cases(wdb)
    cfg = cfg_for(wdb, tmp_path)
    report = await publish(wdb, cfg)
    root = datasets_root(cfg)
    assert root == tmp_path / "lake" / "datasets"
    # every dataset: Binance has two days (28 Feb, 1 Mar), Kraken one
    assert report.failed == 0 and report.written == report.days == 3 * len(INTERVALS)
    assert files(root) == sorted(
        dataset_path(f"ohlcv_{i}", ex, day)
        for i in INTERVALS
        for ex, day in (("binance", FEB_28), ("binance", MARCH_1), ("kraken", MARCH_1))
    )
    assert "ohlcv_1m/exchange=binance/year=2026/month=03/day=01/candles.parquet" in files(root)
    for interval in INTERVALS:
        want = await warehouse_rows(wdb, interval)
        for got in read_three_ways(root, interval):
            assert_same_rows(got, want)
    ledger = await wdb.fetch("SELECT * FROM ops.published ORDER BY dataset, exchange, day")
    assert len(ledger) == report.written and all(r["s3_key"] is None for r in ledger)
    assert await wdb.fetchval("SELECT count(*) FROM ops.publish_dirty") == 0


async def test_a_changed_day_is_rewritten_whole_and_an_unchanged_one_left(
    wdb: Database, tmp_path: Path
) -> None:
    await seed_edge_cases(wdb)
    cfg = cfg_for(wdb, tmp_path)
    await publish(wdb, cfg)
    root = datasets_root(cfg)
    one_m = root / dataset_path("ohlcv_1m", "binance", MARCH_1)
    feb = root / dataset_path("ohlcv_1m", "binance", FEB_28)
    before = (one_m.stat().st_ino, feb.stat().st_ino, one_m.read_bytes())
    # nothing queued: nothing happens
    assert (await publish(wdb, cfg)).days == 0
    # asked again (the range republished by hand): the same bytes, so nothing is replaced
    await mark_days(wdb, ["ohlcv_1m"], ["binance"], FEB_28, MARCH_1 + DAY_MS)
    again = await publish(wdb, cfg)
    assert (again.days, again.written, again.unchanged) == (2, 0, 2)
    assert (one_m.stat().st_ino, feb.stat().st_ino) == before[:2]
    # REST replaces the partial 10:04: the chain's gold marks 1 March only; its files are
    # replaced (new inodes: a rename), February's are not
    await bronze.insert_candles(wdb, [candle(H0 + 4 * MINUTE_MS, origin="rest", price="97777")])
    await silver.merge_hour(wdb, H0)
    await gold.refresh(wdb)
    marked = await wdb.fetch("SELECT dataset, exchange, day FROM ops.publish_dirty")
    assert {(r["exchange"], str(r["day"])) for r in marked} == {("binance", "2026-03-01")}
    changed = await publish(wdb, cfg)
    assert changed.written == len(marked) and changed.unchanged == 0
    assert one_m.stat().st_ino != before[0] and feb.stat().st_ino == before[1]
    assert one_m.read_bytes() != before[2]
    assert not list(root.rglob("*.tmp"))
    for got in read_three_ways(root, "1m"):
        assert_same_rows(got, await warehouse_rows(wdb, "1m"))


async def test_mirrored_to_s3_under_the_lake_prefix(
    wdb: Database, tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    await seed_edge_cases(wdb)
    cfg = cfg_for(wdb, tmp_path, bucket=s3_bucket, prefix="lake", endpoint_url=s3_endpoint)
    report = await run_chain(wdb, cfg, [], trigger="manual", steps=RUN_STEPS)
    assert report.ok and report.publish is not None
    assert report.publish.details["written"] == 3 * len(INTERVALS)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"])
    root = datasets_root(cfg)
    assert keys == [f"lake/datasets/{f}" for f in files(root)]
    for key in keys:
        body = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        assert body == (root / key.removeprefix("lake/datasets/")).read_bytes()
    ledger = await wdb.fetch("SELECT s3_key, path FROM ops.published")
    assert all(r["s3_key"] == f"lake/datasets/{r['path']}" for r in ledger)
    # pyarrow reads the mirror straight from S3 and gets the warehouse's rows
    fs = pafs.S3FileSystem(
        endpoint_override=s3_endpoint, scheme="http", region="us-east-1",
        access_key="testing", secret_key="testing",
    )  # fmt: skip
    mirror = pds.dataset(
        f"{s3_bucket}/lake/datasets/ohlcv_1d", filesystem=fs, format="parquet", partitioning="hive"
    )
    assert_same_rows(keyed(mirror.to_table().to_pylist()), await warehouse_rows(wdb, "1d"))


async def test_a_failed_upload_keeps_the_day_queued(wdb: Database, tmp_path: Path) -> None:
    await seed_edge_cases(wdb)
    # an S3 endpoint nobody listens on
    cfg = cfg_for(wdb, tmp_path, bucket="nowhere", endpoint_url="http://127.0.0.1:9")
    queued = await wdb.fetchval("SELECT count(*) FROM ops.publish_dirty")
    cfg.publish.intervals = ["1d"]
    with pytest.raises(DatasetError, match=r"3 of 3 day\(s\) not published \(kept queued\)"):
        await publish(wdb, cfg, retry_attempts=1)
    assert await wdb.fetchval("SELECT count(*) FROM ops.publish_dirty") == queued
    # the local files are in place already; the next run uploads them
    assert len(files(datasets_root(cfg))) == 3
