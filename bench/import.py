"""Benchmark: ``klined import binance`` of N days x 15 pairs of Binance US archive files.

The simulator writes the archive (daily and monthly zips with their .CHECKSUM files, in Binance's
layout) to a folder on local disk once (``--cache``; a year of 15 pairs is ~7.9M rows and takes a
few minutes to generate), then klined imports it end to end from ``file://`` against the
embedded PostgreSQL (or ``--dsn``): checksums, unzip, parse, the lake (sealed ``archive_``
parts, one per pair and hour), bronze, silver, gold, completeness. The baseline, measured in the
same run and the same server: one bare COPY of the very same bronze rows (their ``lake_key`` a
part key as long as the import's), pre-rendered as CSV (on disk, streamed), into a table
shaped and partitioned exactly like bronze (its partitions made beforehand, untimed).

What the lake costs, measured in the same run on the same files (in a child process, before
the import, one core): ``parse_seconds`` reading and checking the rows, ``lake_write_seconds``
writing them as sealed parts (JSON lines, gzip, fsync, rename), ``lake_read_seconds`` reading
them back as bronze's loader does (gunzip, decode, render the COPY rows).

Prints ONE JSON line: rows, seconds, rows/s, ``ratio = bare_copy_seconds / import_seconds``
(goal >= 0.5), the import's peak RSS (goal < 300 MB), the silver rows produced, and the lake
figures.

    .venv/bin/python bench/import.py [--days 365] [--pairs 15] [--cache DIR] [--dsn URL]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import psutil

from klined.config import (
    BinanceConfig,
    Config,
    DaemonConfig,
    DatabaseConfig,
    ExchangesConfig,
    KrakenConfig,
)
from klined.lake import iter_local_parts
from klined.model import DAY_MS, HOUR_MS, Pair, iso, to_datetime
from klined.sim.market import DEFAULT_PAIRS

#: 2025-01-01T00:00:00Z: the year imported (all in microsecond files, as Binance's are now)
START = 1_735_689_600_000
COLUMNS = [
    "exchange", "symbol", "native_symbol", "interval_seconds", "open", "high", "low", "close",
    "volume", "quote_volume", "vwap", "trade_count", "is_final", "source", "session_id",
    "interval_start", "interval_end", "event_ts", "ingestion_ts", "lake_key",
]  # fmt: skip


def _generate_pair(args: tuple[Path, str, int, int, int]) -> int:
    from klined.sim.archive import write_binance
    from klined.sim.market import Market

    root, pair, start, end, seed = args
    return len(write_binance(Market(seed, cache_minutes=10), root, [pair], start, end, seed=seed))


def generate(root: Path, pairs: list[str], start: int, end: int, seed: int) -> float:
    """Write the archive (skipping files already there); seconds it took."""
    t0 = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_generate_pair, [(root, p, start, end, seed) for p in pairs])
    return time.perf_counter() - t0


def render_baseline(
    root: Path, pairs: list[str], start: int, end: int, out: Path, scratch: Path
) -> dict[str, float]:
    """The bronze CSV klined's import writes, for the same files, to ``out``; its rows, and
    the lake's costs for them (the parts written to ``scratch``, then deleted)."""
    from klined.archives import binance as bn
    from klined.archives.candles import ArchiveCandles, FileSpec
    from klined.archives.files import CsvReader, single_csv
    from klined.jobs import bronze_rows
    from klined.jobs.archive import TAG
    from klined.lake import read_part_file
    from klined.lake.sealed import SealedPartWriter, StagedParts

    figures = dict.fromkeys(
        ("rows", "parts", "lake_bytes", "parse_s", "lake_write_s", "lake_read_s"), 0.0
    )
    days = bn.whole_days(start, end, end)
    with out.open("wb") as fh:
        for pair in pairs:
            p = Pair.parse(pair)
            native = f"{p.base}{p.quote}"
            for period in bn.plan(days):
                name = bn.file_name(native, period)
                t0 = time.perf_counter()
                ref = single_csv(root / bn.file_path(native, period), name)
                spec = FileSpec("binance", p, native, name, period=(period.start_ms, period.end_ms))
                with CsvReader(ref, name) as reader:
                    batch = list(ArchiveCandles(spec, bn.rows(reader.lines(), name), stamp_ms=1))
                t1 = time.perf_counter()
                staged = StagedParts(SealedPartWriter(scratch, tag=TAG))
                staged.stage(batch)
                staged.publish()
                t2 = time.perf_counter()
                for part in staged.parts:
                    records = read_part_file(part.path).records
                    bronze_rows.format_rows(records, part.hour_ms, part.hour_ms + HOUR_MS)
                t3 = time.perf_counter()
                figures["parse_s"] += t1 - t0
                figures["lake_write_s"] += t2 - t1
                figures["lake_read_s"] += t3 - t2
                figures["parts"] += len(staged.parts)
                figures["lake_bytes"] += sum(part.size for part in staged.parts)
                keys = {part.hour_ms: part.key for part in staged.parts}
                by_hour: dict[int, list[Any]] = {}
                for candle in batch:
                    start_ms = candle.interval_start
                    by_hour.setdefault(start_ms - start_ms % HOUR_MS, []).append(candle)
                for hour, rows in by_hour.items():
                    formatted, _, _ = bronze_rows.format_rows(rows, 0, end)
                    fh.write(bronze_rows.encode_csv(formatted, keys[hour]))
                figures["rows"] += len(batch)
                shutil.rmtree(scratch, ignore_errors=True)
                # durable before the next file: its fsyncs are timed, and must not wait for these
                fh.flush()
                os.fsync(fh.fileno())
    return figures


async def bare_copy(db: Any, path: Path, start: int, end: int) -> tuple[float, float]:
    """(seconds of the COPY, seconds it took to create the table's hourly partitions)."""
    await db.execute(
        "DROP SCHEMA IF EXISTS bench CASCADE; CREATE SCHEMA bench;"
        " CREATE TABLE bench.copy_csv (LIKE bronze.bronze_ohlcv_native INCLUDING ALL)"
        "  PARTITION BY RANGE (interval_start)"
    )
    t0 = time.perf_counter()
    for hour in range(start, end, HOUR_MS):
        a, b = iso(hour), iso(hour + HOUR_MS)
        await db.execute(
            f"CREATE TABLE bench.copy_csv_{hour // HOUR_MS} PARTITION OF bench.copy_csv"
            f" FOR VALUES FROM ('{a}') TO ('{b}')"
        )
    ddl = time.perf_counter() - t0

    async def chunks() -> Any:
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                yield chunk

    async with db.transaction() as conn:
        t0 = time.perf_counter()
        await conn.copy_to_table(
            "copy_csv", schema_name="bench", source=chunks(), columns=COLUMNS, format="csv",
            null="null",
        )  # fmt: skip
        seconds = time.perf_counter() - t0
    # a few hundred partitions per statement: one DROP of them all needs more locks than the
    # server's lock table holds
    names = [f"bench.copy_csv_{hour // HOUR_MS}" for hour in range(start, end, HOUR_MS)]
    for i in range(0, len(names), 500):
        await db.execute("DROP TABLE " + ", ".join(names[i : i + 500]))
    await db.execute("DROP SCHEMA bench CASCADE")
    return seconds, ddl


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from klined.jobs.archive_import import import_binance
    from klined.jobs.gapfill import sync_configured_pairs
    from klined.warehouse.database import open_database

    pairs = list(DEFAULT_PAIRS[: args.pairs])
    start, end = START, START + args.days * DAY_MS
    cache = Path(args.cache)
    gen_s = await anyio.to_thread.run_sync(generate, cache, pairs, start, end, args.seed)
    work = Path(tempfile.mkdtemp(prefix="klined-bench-import-"))
    try:
        cfg = Config(
            daemon=DaemonConfig(data_dir=str(work)),
            database=DatabaseConfig(dsn=args.dsn, statement_timeout_s=0, readonly_role=""),
            exchanges=ExchangesConfig(
                binance=BinanceConfig(pairs=pairs, archive_url=f"file://{cache}"),
                kraken=KrakenConfig(enabled=False),
            ),
        )
        baseline_csv = work / "baseline.csv"
        # in a child process, so that this process's peak RSS is the import's own
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            lake = await anyio.to_thread.run_sync(
                pool.apply, render_baseline,
                (cache, pairs, start, end, baseline_csv, work / "scratch-lake"),
            )  # fmt: skip
        baseline_rows = int(lake["rows"])
        async with open_database(cfg, apply_schema=True) as db:
            await sync_configured_pairs(db, cfg)
            copy_s, ddl_s = await bare_copy(db, baseline_csv, start, end)
            baseline_csv.unlink()
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
            proc = psutil.Process()
            peak = proc.memory_info().rss
            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:

                async def sample() -> None:
                    nonlocal peak
                    while True:
                        peak = max(peak, proc.memory_info().rss)
                        await anyio.sleep(0.2)

                tg.start_soon(sample)
                result = await import_binance(
                    db, cfg, [Pair.parse(p) for p in pairs], start, end, now_ms=end + DAY_MS
                )
                tg.cancel_scope.cancel()
            import_s = time.perf_counter() - t0
            print(f"imported {result.rows:,} rows in {import_s:.1f}s, ok={result.ok}; bare COPY"
                  f" {copy_s:.1f}s", file=sys.stderr)  # fmt: skip
            merge_s = result.merge_s
            silver_rows = 0
            for month in range(start, end, 30 * DAY_MS):  # a year of hourly partitions in one
                silver_rows += await db.fetchval(  # query overflows the server's lock table
                    "SELECT count(*) FROM silver.fact_ohlcv WHERE interval_start >= $1"
                    " AND interval_start < $2",
                    to_datetime(month),
                    to_datetime(min(end, month + 30 * DAY_MS)),
                )
            gold_1h = await db.fetchval("SELECT count(*) FROM gold.ohlcv_1h")
            parts = list(iter_local_parts(cfg.lake_root))
            server = await db.fetchval("SHOW server_version")
        return {
            "bench": "import",
            "days": args.days,
            "pairs": len(pairs),
            "files": sum(r.loaded for r in result.reports),
            "rows": result.rows,
            "baseline_rows": baseline_rows,
            "import_seconds": round(import_s, 2),
            "load_seconds": round(result.load_s, 2),
            "merge_seconds": round(merge_s, 2),
            "rows_per_s": round(result.rows / import_s),
            "bare_copy_seconds": round(copy_s, 2),
            "partitions_ddl_seconds_per_table": round(ddl_s, 2),
            "ratio": round(copy_s / import_s, 3),
            "load_ratio": round(copy_s / result.load_s, 3) if result.load_s else None,
            "peak_rss_mb": round(peak / 2**20, 1),
            "maxrss_before_import_mb": round(rss_before / 1024, 1),
            "silver_rows": silver_rows,
            "gold_1h_rows": gold_1h,
            "lake_parts": len(parts),
            "lake_mb": round(sum(p.size for p in parts) / 2**20, 1),
            "parse_seconds": round(lake["parse_s"], 2),
            "lake_write_seconds": round(lake["lake_write_s"], 2),
            "lake_read_seconds": round(lake["lake_read_s"], 2),
            "ok": result.ok,
            "archive_generation_seconds": round(gen_s, 1),
            "server_version": server,
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=365, help="days from 2025-01-01")
    parser.add_argument("--pairs", type=int, default=15, help="pairs (of the default 15)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cache", default="", help="where the generated archive is kept")
    parser.add_argument("--dsn", default="", help="use this server instead of the embedded one")
    parser.add_argument("--keep", action="store_true", help="keep the temporary pgdata")
    args = parser.parse_args(argv)
    default = Path(tempfile.gettempdir()) / f"klined-bench-{args.seed}"
    args.cache = os.path.abspath(args.cache or default)
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    print(json.dumps(anyio.run(run, args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
