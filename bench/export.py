"""Benchmark: candles out. ``klined export`` against a bare COPY, and the chain's publish step.

* **export**: N silver rows (default 1,000,000: 500 pairs x 2 exchanges x 1,000 minutes, with
  realistic decimals, Binance-like vwaps of 28 significant digits) exported to Parquet with
  :func:`klined.datasets.export.run_export`, against a bare ``COPY (SELECT ...) TO STDOUT`` of
  the same rows (the export's own query, per exchange and month, output read and dropped):
  ``ratio = copy_seconds / export_seconds`` (goal >= 0.5). The two alternate ``--rounds`` times
  and the best of each counts (the VM is shared and noisy). CPU seconds of the client (this
  process) and the server's backends say which side bounds each.
* **publish**: one hour of ``--publish-pairs`` pairs x 2 exchanges in silver (1m) and gold
  (5m .. 1d, built by the gold refresh), published as the chain does after that hour: one day
  file per dataset and exchange (goal: under 5 s). With ``--full-day`` also the last hour of a
  full day, which rewrites the whole day's files (the worst case of a day's 24 publishes).

Prints ONE JSON line. Runs against an embedded PostgreSQL (or ``--dsn``)::

    .venv/bin/python bench/export.py [--rows 1000000] [--publish-pairs 1000] [--full-day]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from chain import CpuMeter  # bench/chain.py: CPU seconds of this process and the server

from klined.config import Config, DaemonConfig, DatabaseConfig
from klined.datasets.export import ExportRequest, plan, run_export
from klined.datasets.publish import datasets_root, publish
from klined.datasets.schema import Dataset
from klined.jobs import gold
from klined.model import HOUR_MS, MINUTE_MS, to_datetime
from klined.warehouse.database import Database, open_database

DAY = 1_790_035_200_000  # 2026-09-22T00:00:00Z, a whole UTC day
EXCHANGES = ("binance", "kraken")

# One exchange's minutes for `pairs` pairs from $1 (`minutes` of them): prices of 2 to 10
# decimals across magnitudes, 8-decimal volumes, quote volume = price x volume, vwap = quote
# volume / volume as a 28-digit quotient (Binance's), Kraken without quote volume.
_FILL = """
INSERT INTO silver.fact_ohlcv (exchange, symbol, quote_asset, interval_seconds, interval_start,
    interval_end, open, high, low, close, volume, quote_volume, trade_count, vwap, source, rank,
    event_ts, ingestion_ts)
SELECT $2, 'C' || lpad(p::text, 4, '0') || '/USD', 'USD', 60, t, t + interval '1 minute',
       px, px * 1.001, px * 0.999, px * 1.0005, vol,
       CASE WHEN $2 = 'binance' THEN round(px * vol, 8) END,
       (p * 7 + m) % 500,
       CASE WHEN $2 = 'binance' THEN round(px * vol, 8) / vol ELSE round(px * 1.0002, 10) END,
       'ws_final', 1, t + interval '1 minute', t + interval '61 seconds'
FROM generate_series(0, $3 - 1) p
CROSS JOIN generate_series(0, $4 - 1) m
CROSS JOIN LATERAL (SELECT $1::timestamptz + m * interval '1 minute' AS t) tt
CROSS JOIN LATERAL (
    SELECT round((10 ^ (p % 9 - 4))::numeric * (1 + ((p * 31 + m * 17) % 1000) / 997.0), 10 - p % 9)
               AS px,
           round(((p * 13 + m * 7) % 100000) / 1000.0 + 0.00000001 * (m % 97 + 1), 8) AS vol
) v
"""


async def fill(db: Database, start_ms: int, pairs: int, minutes: int) -> int:
    await db.ensure_partitions(range(start_ms, start_ms + minutes * MINUTE_MS, HOUR_MS))
    for exchange in EXCHANGES:
        await db.execute(_FILL, to_datetime(start_ms), exchange, pairs, minutes)
    await db.execute("ANALYZE silver.fact_ohlcv")
    n: int = await db.fetchval("SELECT count(*) FROM silver.fact_ohlcv")
    return n


async def bare_copy(db: Database, req: ExportRequest) -> tuple[float, int]:
    """The export's own queries, COPY TO STDOUT, output dropped: seconds and bytes."""
    ds = Dataset(req.interval)
    sql = ds.select(pairs=False, final_only=False)
    total = 0

    async def drop(chunk: bytes) -> None:
        nonlocal total
        total += len(chunk)

    t0 = time.perf_counter()
    for part in plan(req, {}):
        args = [part.exchange, to_datetime(part.start_ms), to_datetime(part.end_ms)]
        async with (
            db.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            await conn.copy_from_query(sql, *args, output=drop, format="csv")
    return time.perf_counter() - t0, total


async def bench_export(db: Database, cfg: Config, work: Path, args: argparse.Namespace) -> Any:
    minutes = max(1, args.rows // (args.pairs * len(EXCHANGES)))
    start = DAY
    rows = await fill(db, start, args.pairs, minutes)
    req_args = {"start_ms": start, "end_ms": start + minutes * MINUTE_MS}
    copies: list[tuple[float, Any]] = []
    exports: list[tuple[float, Any, int]] = []
    for i in range(args.rounds):
        async with CpuMeter(db) as m1:
            seconds, size = await bare_copy(db, ExportRequest(out="-", **req_args))
        copies.append((seconds, m1))
        out = work / f"export-{i}"
        async with CpuMeter(db) as m2:
            t0 = time.perf_counter()
            result = await run_export(db, cfg, ExportRequest(out=str(out), **req_args))
            exports.append((time.perf_counter() - t0, m2, result.bytes))
        assert result.rows == rows, (result.rows, rows)
        shutil.rmtree(out, ignore_errors=True)
    copy_s, copy_cpu = min(copies, key=lambda c: c[0])
    export_s, export_cpu, parquet_bytes = min(exports, key=lambda e: e[0])
    await db.execute("TRUNCATE silver.fact_ohlcv")
    return {
        "rows": rows,
        "pairs": args.pairs,
        "exchanges": len(EXCHANGES),
        "copy_seconds": round(copy_s, 3),
        "copy_csv_bytes": size,
        "export_parquet_seconds": round(export_s, 3),
        "parquet_bytes": parquet_bytes,
        "rows_per_s": round(rows / export_s),
        "ratio": round(copy_s / export_s, 3),
        "cpu_seconds": {
            "copy": {"client": round(copy_cpu.client_s, 2), "server": round(copy_cpu.server_s, 2)},
            "export": {
                "client": round(export_cpu.client_s, 2),
                "server": round(export_cpu.server_s, 2),
            },
        },
        "all_rounds": {
            "copy": [round(c[0], 3) for c in copies],
            "export": [round(e[0], 3) for e in exports],
        },
    }


async def bench_publish(db: Database, cfg: Config, pairs: int, hours: int) -> dict[str, Any]:
    """``hours`` of silver (and gold from it), then the publish of the last hour's day."""
    await db.execute("TRUNCATE silver.fact_ohlcv, ops.publish_dirty, ops.published, ops.gold_dirty")
    for table in ("5m", "15m", "30m", "1h", "4h", "1d"):
        await db.execute(f"TRUNCATE gold.ohlcv_{table}")
    start = DAY + (24 - hours) * HOUR_MS if hours < 24 else DAY
    rows = await fill(db, start, pairs, hours * 60)
    await db.execute(
        "INSERT INTO ops.gold_dirty (exchange, symbol, bucket_start)"
        " SELECT DISTINCT exchange, symbol, date_bin('5 minutes', interval_start, 'epoch')"
        " FROM silver.fact_ohlcv ON CONFLICT DO NOTHING"
    )
    t0 = time.perf_counter()
    await gold.refresh(db)
    gold_s = time.perf_counter() - t0
    shutil.rmtree(datasets_root(cfg), ignore_errors=True)
    async with CpuMeter(db) as meter:
        t0 = time.perf_counter()
        report = await publish(db, cfg)
        seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in datasets_root(cfg).rglob("*.parquet"))
    return {
        "pairs": pairs,
        "exchanges": len(EXCHANGES),
        "hours_in_day": hours,
        "silver_rows": rows,
        "files": report.written,
        "rows": report.rows,
        "bytes": size,
        "seconds": round(seconds, 3),
        "cpu_seconds": {"client": round(meter.client_s, 2), "server": round(meter.server_s, 2)},
        "gold_refresh_seconds": round(gold_s, 2),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="klined-bench-export-"))
    try:
        cfg = Config(
            daemon=DaemonConfig(data_dir=str(work)),
            database=DatabaseConfig(dsn=args.dsn, statement_timeout_s=0, pool_size=2),
        )
        async with open_database(cfg, apply_schema=True) as db:
            out: dict[str, Any] = {"bench": "export"}
            if args.rows:
                out["export"] = await bench_export(db, cfg, work, args)
            out["publish_hour"] = await bench_publish(db, cfg, args.publish_pairs, 1)
            if args.full_day:
                out["publish_full_day"] = await bench_publish(db, cfg, args.publish_pairs, 24)
            out["server_version"] = await db.fetchval("SHOW server_version")
        out["goals"] = {"publish_hour_under_5_s": out["publish_hour"]["seconds"] < 5.0}
        if "export" in out:
            out["goals"]["export_ratio_at_least_0_5"] = out["export"]["ratio"] >= 0.5
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, default=1_000_000, help="silver rows to export (0: publish only)"
    )
    parser.add_argument("--pairs", type=int, default=500, help="pairs per exchange (export)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (best counts)")
    parser.add_argument("--publish-pairs", type=int, default=1000, help="pairs per exchange")
    parser.add_argument("--full-day", action="store_true", help="also publish a full day")
    parser.add_argument("--dsn", default="", help="use this server instead of the embedded one")
    args = parser.parse_args(argv)
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    print(json.dumps(anyio.run(run, args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
