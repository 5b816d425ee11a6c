"""``klined.read_candles``: the same table from the warehouse, the published datasets, an
export and their S3 copies; filters; usable inside a running event loop; clear refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import polars as pl
import pyarrow as pa
import pytest

import klined
from klined.config import Config, DaemonConfig, DatabaseConfig, S3Config
from klined.datasets.export import ExportRequest, run_export
from klined.datasets.publish import datasets_root, publish
from klined.errors import DatasetError, UsageError
from klined.model import parse_time
from klined.warehouse.database import open_database
from tests.support.datasets import assert_same_rows, keyed, seed_edge_cases, warehouse_rows
from tests.support.warehouse import config_for, truncate_all, warehouse_dsn

__all__ = ["warehouse_dsn"]

MARCH = ("2026-03-01", "2026-03-02")


@pytest.fixture
def published(warehouse_dsn: str, tmp_path: Path) -> tuple[str, Path, Path]:
    """The edge cases in the warehouse, published under a lake root, and exported (1m)."""
    cfg = Config(
        daemon=DaemonConfig(data_dir=str(tmp_path)), database=DatabaseConfig(dsn=warehouse_dsn)
    )
    export = tmp_path / "export"

    async def prepare() -> None:
        async with open_database(config_for(warehouse_dsn)) as db:
            await truncate_all(db)
            await seed_edge_cases(db)
            await publish(db, cfg)
            request = ExportRequest(
                start_ms=parse_time("2026-02-01"), end_ms=parse_time("2026-04-01"), out=str(export)
            )
            await run_export(db, cfg, request)

    anyio.run(prepare)
    return warehouse_dsn, cfg.lake_root, export


async def _want(dsn: str, interval: str, **kw: Any) -> dict[tuple, dict[str, Any]]:
    async with open_database(config_for(dsn)) as db:
        return await warehouse_rows(db, interval, **kw)


def test_every_source_gives_the_same_table(published: tuple[str, Path, Path]) -> None:
    dsn, lake_root, export = published
    start, end = "2026-02-01", "2026-04-01"
    tables = {
        where: klined.read_candles(start, end, source=where)
        for where in (dsn, str(lake_root), str(lake_root / "datasets"), str(export))
    }
    first = tables[dsn]
    assert first.schema.names[:3] == ["exchange", "symbol", "interval_start"]
    assert str(first.schema.field("volume").type) == "decimal128(38, 18)"
    for where, table in tables.items():
        assert table.equals(first), where
    assert_same_rows(keyed(first.to_pylist()), anyio.run(_want, dsn, "1m"))
    # sorted by exchange, symbol, time
    keys = [(r["exchange"], r["symbol"], r["interval_start"]) for r in first.to_pylist()]
    assert keys == sorted(keys)
    # the usual next steps work
    assert pl.from_arrow(first).height == first.num_rows
    assert first.to_pandas()["volume"].iloc[0].__class__.__name__ == "Decimal"


def test_filters_and_gold(published: tuple[str, Path, Path]) -> None:
    dsn, lake_root, _ = published
    for where in (dsn, str(lake_root)):
        btc = klined.read_candles(
            "2026-03-01T10:02:00Z", "2026-03-01T10:05:00Z", exchange="binance", pair="btc/usd",
            source=where,
        )  # fmt: skip
        assert btc.column("symbol").to_pylist() == ["BTC/USD"] * 3
        assert set(btc.column("exchange").to_pylist()) == {"binance"}
        both = klined.read_candles(
            *MARCH, exchange=["binance", "kraken"], pair=["PEPE/USD"], source=where
        )
        assert both.column("exchange").to_pylist() == ["binance", "kraken"]
        daily = klined.read_candles(*MARCH, interval="1d", source=where)
        assert daily.schema.names[-3:] == ["minutes", "traded_minutes", "updated_at"]
        want = anyio.run(_want, dsn, "1d")
        assert_same_rows(
            keyed(daily.to_pylist()), {k: v for k, v in want.items() if k[2].month == 3}
        )


def test_from_s3(published: tuple[str, Path, Path], s3_endpoint: str, s3_bucket: str,
                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    dsn, lake_root, _ = published
    cfg = Config(
        daemon=DaemonConfig(data_dir=str(lake_root.parent)),
        database=DatabaseConfig(dsn=dsn),
        s3=S3Config(bucket=s3_bucket, prefix="lake", endpoint_url=s3_endpoint),
    )

    async def mirror() -> None:
        async with open_database(config_for(dsn)) as db:
            await db.execute("UPDATE ops.published SET sha256 = ''")  # upload everything again
            await db.execute(
                "INSERT INTO ops.publish_dirty (dataset, exchange, day)"
                " SELECT dataset, exchange, day FROM ops.published"
            )
            await publish(db, cfg)

    anyio.run(mirror)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    remote = klined.read_candles(*MARCH, source=f"s3://{s3_bucket}/lake")
    local = klined.read_candles(*MARCH, source=str(datasets_root(cfg)))
    assert remote.num_rows > 0 and remote.equals(local)


def test_inside_a_running_event_loop(published: tuple[str, Path, Path]) -> None:
    """A notebook's cell runs inside an event loop: read_candles still just works."""
    dsn, _, _ = published

    async def notebook_cell() -> pa.Table:
        return klined.read_candles(*MARCH, source=dsn)

    assert anyio.run(notebook_cell).num_rows > 0


def test_dsn_from_the_environment_and_refusals(
    published: tuple[str, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dsn, lake_root, export = published
    monkeypatch.setenv("KLINED_DSN", dsn)
    assert klined.read_candles(*MARCH).num_rows > 0
    monkeypatch.delenv("KLINED_DSN")
    with pytest.raises(UsageError, match="say where to read"):
        klined.read_candles(*MARCH)
    with pytest.raises(UsageError, match="empty or reversed"):
        klined.read_candles("2026-03-02", "2026-03-01", source=dsn)
    with pytest.raises(UsageError, match="unknown interval"):
        klined.read_candles(*MARCH, interval="2m", source=dsn)
    with pytest.raises(UsageError, match="unknown exchange"):
        klined.read_candles(*MARCH, exchange="bitstamp", source=dsn)
    with pytest.raises(DatasetError, match="holds 1m candles, not 5m"):
        klined.read_candles(*MARCH, interval="5m", source=str(export))
    with pytest.raises(DatasetError, match="not a folder of klined datasets"):
        klined.read_candles(*MARCH, source=str(tmp_path / "nowhere"))
    (tmp_path / "raw" / "exchange=kraken").mkdir(parents=True)  # a raw lake, nothing published
    with pytest.raises(DatasetError, match="no Parquet files under"):
        klined.read_candles(*MARCH, source=str(tmp_path / "raw"))
    # a range with nothing in it: an empty table, with the columns
    empty = klined.read_candles("2020-01-01", "2020-01-02", source=str(lake_root))
    assert empty.num_rows == 0 and empty.schema.names[:2] == ["exchange", "symbol"]


def test_import_klined_stays_light() -> None:
    code = (
        "import sys, klined; print(sorted(m for m in ('pyarrow', 'asyncpg') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
