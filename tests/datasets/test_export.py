"""``klined export``: exact values in every format, Hive layout, manifest, idempotent reruns,
atomic replacement, refusals that name the row, S3 output (moto)."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3
import duckdb
import msgspec
import polars as pl
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

from klined.cli import main
from klined.config import Config, DatabaseConfig, S3Config
from klined.datasets.export import ExportRequest, run_export
from klined.datasets.schema import Dataset
from klined.errors import DatasetError, UsageError
from klined.jobs import bronze, gold, silver
from klined.model import DAY_MS, HOUR_MS, MINUTE_MS, parse_time
from klined.warehouse.database import Database
from tests.support.datasets import (
    BINANCE_VWAP,
    KRAKEN_VOLUME,
    PEPE_PRICE,
    assert_same_rows,
    keyed,
    seed_edge_cases,
    warehouse_rows,
)
from tests.support.warehouse import H0, candle, warehouse_dsn, wdb

__all__ = ["warehouse_dsn", "wdb"]

pytestmark = pytest.mark.anyio

FEB = "exchange=binance/year=2026/month=02"
MAR = "exchange=binance/year=2026/month=03"
KRAKEN_MAR = "exchange=kraken/year=2026/month=03"


def cfg_for(db: Database, **s3: Any) -> Config:
    return Config(database=DatabaseConfig(dsn=db.dsn), s3=S3Config(**s3))


def request(out: Path | str, **kw: Any) -> ExportRequest:
    kw.setdefault("start_ms", parse_time("2026-02-01"))
    kw.setdefault("end_ms", parse_time("2026-04-01"))
    return ExportRequest(out=str(out), **kw)


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _typed(row: dict[str, Any], ds: Dataset) -> dict[str, Any]:
    """A CSV/JSON row (text) as values: decimals, instants, ints."""
    out: dict[str, Any] = {}
    for f in ds.schema:
        value = row[f.name]
        if value in ("", None):
            out[f.name] = None
        elif f.name in ds.decimal_columns:
            assert (isinstance(value, str) and not value.endswith("0")) or "." not in value
            out[f.name] = Decimal(value)
        elif str(f.type).startswith("timestamp"):
            out[f.name] = _time(value)
        elif f.name in ("trade_count", "minutes", "traded_minutes"):
            out[f.name] = int(value)
        else:
            out[f.name] = value
    return out


def files_in(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def read_export(root: Path, fmt: str, ds: Dataset) -> dict[tuple, dict[str, Any]]:
    """Every file of a local export, read with the plainest reader of its format."""
    got: dict[tuple, dict[str, Any]] = {}
    for path in sorted(root.rglob(f"candles.{fmt}")):
        exchange = path.relative_to(root).parts[0].removeprefix("exchange=")
        if fmt == "parquet":
            rows = pq.read_table(path).to_pylist()
        elif fmt == "csv":
            with path.open(newline="") as f:
                rows = [_typed(r, ds) for r in csv.DictReader(f)]
        else:
            rows = [_typed(json.loads(line), ds) for line in path.read_text().splitlines()]
        got.update(keyed(rows, exchange))
    return got


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
async def test_every_format_carries_the_edge_cases_exactly(
    wdb: Database, tmp_path: Path, fmt: str
) -> None:
    await seed_edge_cases(wdb)
    for interval in ("1m", "5m", "1h", "1d"):
        out = tmp_path / interval
        result = await run_export(wdb, cfg_for(wdb), request(out, fmt=fmt, interval=interval))
        ds = Dataset(interval)
        want = await warehouse_rows(wdb, interval)
        assert_same_rows(read_export(out, fmt, ds), want)
        assert result.rows == len(want)
    # the hand-checked values, as the file holds them
    pepe = read_export(tmp_path / "1m", fmt, Dataset("1m"))
    kraken = next(r for k, r in pepe.items() if k[:2] == ("kraken", "PEPE/USD"))
    binance = next(r for k, r in pepe.items() if k[:2] == ("binance", "PEPE/USD"))
    assert (kraken["volume"], kraken["open"]) == (Decimal(KRAKEN_VOLUME), Decimal(PEPE_PRICE))
    assert kraken["quote_volume"] is None and kraken["trade_count"] == 42
    assert binance["vwap"] == Decimal(BINANCE_VWAP).quantize(Decimal("1e-18"))
    assert len(BINANCE_VWAP.split(".")[1]) > 18  # the warehouse holds more: vwap is rounded
    if fmt != "parquet":
        text = (tmp_path / "1m" / MAR / f"candles.{fmt}").read_text()
        assert KRAKEN_VOLUME not in text  # kraken is in its own partition
        kraken_text = next((tmp_path / "1m" / KRAKEN_MAR).glob(f"candles.{fmt}")).read_text()
        assert KRAKEN_VOLUME in kraken_text and PEPE_PRICE in kraken_text
        assert "2026-03-01T10:00:00.000Z" in kraken_text


async def test_layout_manifest_and_other_readers(wdb: Database, tmp_path: Path) -> None:
    await seed_edge_cases(wdb)
    result = await run_export(wdb, cfg_for(wdb), request(tmp_path))
    assert [p.key for p in result.partitions] == [FEB, MAR, KRAKEN_MAR]
    assert files_in(tmp_path) == [
        ".klined-export.lock",
        "_manifest.json",
        f"{FEB}/candles.parquet",
        f"{MAR}/candles.parquet",
        f"{KRAKEN_MAR}/candles.parquet",
    ]
    manifest = json.loads((tmp_path / "_manifest.json").read_text())
    assert (manifest["dataset"], manifest["format"], manifest["pairs"]) == (
        "ohlcv_1m",
        "parquet",
        None,
    )
    mar = manifest["partitions"][MAR]
    assert (mar["from"], mar["to"]) == ("2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z")
    assert (mar["rows"], mar["symbols"]) == (8, 2)
    assert mar["first_interval_start"] == "2026-03-01T10:00:00Z"
    data = (tmp_path / MAR / "candles.parquet").read_bytes()
    assert mar["sha256"] == hashlib.sha256(data).hexdigest() and mar["bytes"] == len(data)
    # Parquet types: exact decimals, UTC milliseconds; exchange only in the path
    schema = pq.read_schema(tmp_path / MAR / "candles.parquet")
    assert str(schema.field("open").type) == "decimal128(38, 18)"
    assert str(schema.field("interval_start").type) == "timestamp[ms, tz=UTC]"
    assert "exchange" not in schema.names
    want = await warehouse_rows(wdb)
    # pyarrow.dataset, DuckDB and polars read the Hive layout and get the warehouse's rows
    arrow = pds.dataset(tmp_path, format="parquet", partitioning="hive").to_table()
    assert_same_rows(keyed(arrow.to_pylist()), want)
    glob = str(tmp_path / "**" / "*.parquet")
    con = duckdb.connect()
    rel = con.execute(f"SELECT * FROM read_parquet('{glob}', hive_partitioning = true)")
    names = [d[0] for d in rel.description]
    assert_same_rows(keyed([dict(zip(names, r, strict=True)) for r in rel.fetchall()]), want)
    frame = pl.scan_parquet(glob, hive_partitioning=True).collect()
    assert str(frame.schema["open"]).startswith("Decimal(precision=38, scale=18")
    assert_same_rows(keyed(frame.to_dicts()), want)


async def test_reruns_replace_partitions_whole_and_keep_their_range(
    wdb: Database, tmp_path: Path
) -> None:
    await seed_edge_cases(wdb)
    cfg = cfg_for(wdb)
    day = parse_time("2026-03-01")
    first = await run_export(
        wdb, cfg, request(tmp_path, start_ms=day, end_ms=H0 + 3 * MINUTE_MS, exchanges=("binance",))
    )
    assert [(p.key, p.rows) for p in first.partitions] == [(MAR, 4)]  # 3 BTC + PEPE
    # the next slice of the same month: the partition now holds both, read afresh
    await run_export(
        wdb, cfg, request(tmp_path, start_ms=H0 + 3 * MINUTE_MS, end_ms=day + DAY_MS,
                          exchanges=("binance",))
    )  # fmt: skip
    manifest = json.loads((tmp_path / "_manifest.json").read_text())
    entry = manifest["partitions"][MAR]
    assert (entry["from"], entry["to"], entry["rows"]) == (
        "2026-03-01T00:00:00Z", "2026-03-02T00:00:00Z", 8,
    )  # fmt: skip
    path = tmp_path / MAR / "candles.parquet"
    before = path.read_bytes()
    inode = path.stat().st_ino
    # the same export again: identical bytes, put in place by a rename (a new inode)
    await run_export(
        wdb, cfg, request(tmp_path, start_ms=day, end_ms=day + DAY_MS, exchanges=("binance",))
    )
    assert path.read_bytes() == before and path.stat().st_ino != inode
    # REST replaces the partial 10:04: a rerun writes what the warehouse holds now
    await bronze.insert_candles(wdb, [candle(H0 + 4 * MINUTE_MS, origin="rest", price="97777")])
    await silver.merge_hour(wdb, H0)
    await gold.refresh(wdb)
    await run_export(
        wdb, cfg, request(tmp_path, start_ms=day, end_ms=day + DAY_MS, exchanges=("binance",))
    )
    rows = keyed(pq.read_table(path).to_pylist(), "binance")
    fixed = rows[("binance", "BTC/USD", datetime.fromtimestamp((H0 + 4 * MINUTE_MS) / 1000, UTC))]
    assert (fixed["open"], fixed["source"]) == (Decimal("97777"), "rest")
    assert not [f for f in files_in(tmp_path) if f.endswith(".tmp")]


async def test_a_value_that_does_not_fit_fails_naming_the_row(
    wdb: Database, tmp_path: Path
) -> None:
    await seed_edge_cases(wdb)
    out = tmp_path / "out"
    await run_export(wdb, cfg_for(wdb), request(out))
    manifest = json.loads((out / "_manifest.json").read_text())
    march = (out / MAR / "candles.parquet").read_bytes()
    huge = candle(H0 + 30 * MINUTE_MS, symbol="SHIB/USD", price="0.00000000000000000012345",
                  volume="7")  # fmt: skip
    await bronze.insert_candles(wdb, [huge])
    await silver.merge_hour(wdb, H0)
    with pytest.raises(DatasetError) as caught:
        await run_export(wdb, cfg_for(wdb), request(out))
    text = str(caught.value)
    assert "binance ohlcv_1m: SHIB/USD 1m candle at 2026-03-01T10:30:00Z" in text
    assert "open = 0.00000000000000000012345 does not fit decimal128(38, 18)" in text
    # the failing partition and its manifest entry are untouched (February, before it, was
    # rewritten: partitions are replaced one by one); nothing half-written remains
    assert (out / MAR / "candles.parquet").read_bytes() == march
    after = json.loads((out / "_manifest.json").read_text())
    assert after["partitions"][MAR] == manifest["partitions"][MAR]
    assert not list(out.rglob("*.tmp"))
    # a volume of 21 integer digits is refused the same way (Arrow alone would take it)
    await wdb.execute(
        "UPDATE silver.fact_ohlcv SET open = 1, high = 1, low = 1, close = 1,"
        " volume = 123456789012345678901.5 WHERE symbol = 'SHIB/USD'"
    )
    with pytest.raises(DatasetError, match=r"volume = 123456789012345678901\.5 does not fit"):
        await run_export(wdb, cfg_for(wdb), request(tmp_path / "other", fmt="csv"))


async def test_an_output_holds_one_dataset(wdb: Database, tmp_path: Path) -> None:
    await seed_edge_cases(wdb)
    await run_export(wdb, cfg_for(wdb), request(tmp_path))
    with pytest.raises(UsageError, match=r"holds another export.*interval '1m' \(not '5m'\)"):
        await run_export(wdb, cfg_for(wdb), request(tmp_path, interval="5m"))
    with pytest.raises(UsageError, match=r"format 'parquet' \(not 'csv'\)"):
        await run_export(wdb, cfg_for(wdb), request(tmp_path, fmt="csv"))
    with pytest.raises(DatasetError, match="no ohlcv_1m candles"):
        await run_export(wdb, cfg_for(wdb), request(tmp_path / "empty", start_ms=0, end_ms=HOUR_MS))


async def test_final_only_and_pairs(wdb: Database, tmp_path: Path) -> None:
    await seed_edge_cases(wdb)
    cfg = cfg_for(wdb)
    await run_export(wdb, cfg, request(tmp_path / "m", final_only=True, pairs=("BTC/USD",)))
    rows = read_export(tmp_path / "m", "parquet", Dataset("1m"))
    assert {k[1] for k in rows} == {"BTC/USD"}
    assert all(r["source"] != "ws_partial" for r in rows.values())
    assert len(rows) == 14 - 1  # 7 binance (10:04 partial left out) + 6 kraken + February
    # gold: only buckets whose every minute is in silver and final: Kraken's BTC 10:00-10:05;
    # Binance's has the partial 10:04, the other buckets lack minutes
    await run_export(wdb, cfg, request(tmp_path / "g", interval="5m", final_only=True))
    complete = read_export(tmp_path / "g", "parquet", Dataset("5m"))
    assert [(k[0], k[1], k[2].isoformat()) for k in complete] == [
        ("kraken", "BTC/USD", "2026-03-01T10:00:00+00:00")
    ]
    await run_export(wdb, cfg, request(tmp_path / "all5", interval="5m"))
    assert len(read_export(tmp_path / "all5", "parquet", Dataset("5m"))) > 0


async def test_s3_output_matches_the_local_one(
    wdb: Database, tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    await seed_edge_cases(wdb)
    cfg = cfg_for(wdb, endpoint_url=s3_endpoint)
    local = await run_export(wdb, cfg, request(tmp_path / "local"))
    remote = await run_export(wdb, cfg, request(f"s3://{s3_bucket}/exports/candles/"))
    assert remote.where == f"s3://{s3_bucket}/exports/candles"
    assert [p.key for p in remote.partitions] == [p.key for p in local.partitions]
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert keys == [
        "exports/candles/_manifest.json",
        f"exports/candles/{FEB}/candles.parquet",
        f"exports/candles/{MAR}/candles.parquet",
        f"exports/candles/{KRAKEN_MAR}/candles.parquet",
    ]
    manifest = json.loads(s3.get_object(Bucket=s3_bucket, Key=keys[0])["Body"].read())
    for key in keys[1:]:
        body = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        rel = key.removeprefix("exports/candles/")
        assert body == (tmp_path / "local" / rel).read_bytes()  # deterministic files
        entry = manifest["partitions"][rel.rsplit("/", 1)[0]]
        assert entry["sha256"] == hashlib.sha256(body).hexdigest()
    # a rerun into S3 widens the ranges from the manifest there, as locally
    again = await run_export(
        wdb, cfg, request(f"s3://{s3_bucket}/exports/candles", start_ms=H0, end_ms=H0 + HOUR_MS)
    )
    assert {p.key: (p.start_ms, p.end_ms) for p in again.partitions} == {
        MAR: (parse_time("2026-03-01"), parse_time("2026-04-01")),
        KRAKEN_MAR: (parse_time("2026-03-01"), parse_time("2026-04-01")),
    }
    assert (
        msgspec.json.decode(s3.get_object(Bucket=s3_bucket, Key=keys[0])["Body"].read())[
            "partitions"
        ].keys()
        == manifest["partitions"].keys()
    )


def test_command_line(
    warehouse_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import anyio

    from klined.warehouse.database import open_database
    from tests.support.warehouse import config_for, truncate_all

    async def seed() -> None:
        async with open_database(config_for(warehouse_dsn)) as db:
            await truncate_all(db)
            await seed_edge_cases(db)

    anyio.run(seed)
    conf = tmp_path / "klined.toml"
    conf.write_text(f'[database]\ndsn = "{warehouse_dsn}"\n')
    out = tmp_path / "out"
    args = [
        "export",
        "-c",
        str(conf),
        "--from",
        "2026-03-01",
        "--to",
        "2026-03-02",
        "--out",
        str(out),
    ]
    assert _exit([*args, "--format", "csv", "--pair", "btc/usd"]) == 0
    printed = capsys.readouterr().out
    assert re.search(rf"{MAR} +7 rows +1 pair\(s\) +[\d.]+ KB  2026-03-01T00:00:00Z", printed)
    assert "13 ohlcv_1m rows in 2 partition(s)" in printed
    assert (
        (out / MAR / "candles.csv").read_text().splitlines()[0].startswith("symbol,interval_start")
    )
    # bad arguments exit 2 with one line; a misfit exits 1 with one line
    assert _exit([*args, "--interval", "2m"]) == 2
    assert _exit([*args[:5], "--to", "2026-02-01", "--out", str(out)]) == 2
    assert "empty or reversed range" in capsys.readouterr().err
    assert _exit([*args, "--format", "jsonl"]) == 2  # the folder holds a csv export
    assert "holds another export" in capsys.readouterr().err

    async def spoil() -> None:
        async with open_database(config_for(warehouse_dsn)) as db:
            await db.execute("UPDATE silver.fact_ohlcv SET volume = 1e21 WHERE symbol = 'BTC/USD'")

    anyio.run(spoil)
    assert _exit([*args[:-1], str(tmp_path / "spoilt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: binance ohlcv_1m: BTC/USD 1m candle at")


def _exit(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
