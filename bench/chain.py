"""Benchmark: one hour of N pairs x 2 exchanges through bronze, silver, gold and completeness.

Synthetic lake parts (every minute: several partial WS updates then a final, with realistic raw
payloads; several parts per pair-hour as the writer's age bound makes them; gzip, as the writer
seals them) are written to a temporary lake, then the chain steps run against the embedded
PostgreSQL (or ``--dsn``).
Two bare COPY baselines of the same rows run in the same process into an identical table:

* ``copy_csv``: the rows pre-rendered as CSV (ISO timestamps), one COPY: the server's floor.
* ``copy_records``: the rows pre-decoded into tuples, ``copy_records_to_table`` (asyncpg binary).

Prints ONE JSON line: seconds per step, rows/s, and the bronze load against each baseline
(``ratio = baseline_seconds / load_seconds``; 1.0 means the load costs no more than the COPY).

    .venv/bin/python bench/chain.py [--pairs 1000] [--updates 5] [--parts 4] [--dsn URL]
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import gzip
import io
import json
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
import psutil

from klined.config import Config, DaemonConfig, DatabaseConfig, LakeConfig
from klined.jobs import bronze, completeness, gold, silver
from klined.lake import LakeStore, part_key, read_part
from klined.model import HOUR_MS, MINUTE_MS, Candle, Pair
from klined.warehouse.database import Database, open_database, sync_pairs

HOUR = 1_790_000_000_000 - 1_790_000_000_000 % HOUR_MS  # a fixed hour in 2026
LEVEL = LakeConfig().compress_level
EXCHANGES = ("binance", "kraken")
COLUMNS = [
    "exchange", "symbol", "native_symbol", "interval_seconds", "interval_start", "interval_end",
    "open", "high", "low", "close", "volume", "quote_volume", "vwap", "trade_count", "is_final",
    "source", "session_id", "event_ts", "ingestion_ts", "lake_key",
]  # fmt: skip


def _pairs(n: int) -> list[Pair]:
    return [Pair(f"C{i:04d}", "USD") for i in range(n)]


def write_lake(root: Path, pairs: list[Pair], updates: int, parts: int) -> int:
    """Write the synthetic hour; return the number of lines."""
    enc = msgspec.json.Encoder()
    lines_total = 0
    per_part = 60 // parts
    for exchange in EXCHANGES:
        for p_i, pair in enumerate(pairs):
            native = f"{pair.base}{pair.quote}"
            base_price = 100 + p_i
            for part in range(parts):
                lines: list[bytes] = []
                first_event = HOUR + part * per_part * MINUTE_MS + 1000
                for minute in range(part * per_part, (part + 1) * per_part):
                    start = HOUR + minute * MINUTE_MS
                    for u in range(updates + 1):
                        final = u == updates
                        price = f"{base_price + minute / 100 + u / 1000:.4f}"
                        event = start + (MINUTE_MS if final else 1000 + u * 9000)
                        raw = (
                            b'{"e":"kline","E":%d,"s":"%s","k":{"t":%d,"T":%d,"s":"%s",'
                            b'"i":"1m","o":"%s","c":"%s","h":"%s","l":"%s","v":"%d.5",'
                            b'"n":%d,"x":%s,"q":"%d.25"}}'
                            % (event, native.encode(), start, start + 59999, native.encode(),
                               price.encode(), price.encode(), price.encode(), price.encode(),
                               u + 1, u + 3, b"true" if final else b"false", u + 100)
                        )  # fmt: skip
                        candle = Candle(
                            exchange=exchange,
                            symbol=str(pair),
                            native_symbol=native,
                            interval_start=start,
                            open=price,
                            high=price,
                            low=price,
                            close=price,
                            volume=f"{u + 1}.5",
                            quote_volume=f"{u + 100}.25",
                            trade_count=u + 3,
                            is_final=final,
                            session_id="s-bench",
                            event_ts=event,
                            ingestion_ts=event + 40,
                            raw=msgspec.Raw(raw),
                        )
                        lines.append(enc.encode(candle))
                # sealed as the writer seals them: gzip at its default level
                key = part_key(exchange, str(pair), HOUR, first_event, f"bench-{part}") + ".gz"
                path = root / key
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n", LEVEL, mtime=0))
                lines_total += len(lines)
    return lines_total


def _iso(ms: int) -> str:
    dt = datetime.fromtimestamp(ms / 1000, UTC)
    return dt.strftime("%Y-%m-%d %H:%M:%S.") + f"{ms % 1000:03d}+00"


def baseline_rows(root: Path) -> tuple[list[tuple[Any, ...]], bytes]:
    """The same rows, decoded ahead: tuples for copy_records and CSV text for a bare COPY."""
    records: list[tuple[Any, ...]] = []
    buf = io.StringIO()
    writer = csv.writer(buf)
    for path in sorted(root.rglob("*.jsonl.gz")):
        key = path.relative_to(root).as_posix()
        for r in read_part(path.read_bytes()).records:
            start = datetime.fromtimestamp(r.interval_start / 1000, UTC)
            end = datetime.fromtimestamp((r.interval_start + 60_000) / 1000, UTC)
            event = datetime.fromtimestamp(r.event_ts / 1000, UTC)
            ingest = datetime.fromtimestamp(r.ingestion_ts / 1000, UTC)
            row = (
                r.exchange, r.symbol, r.native_symbol, r.interval_seconds, start, end,
                r.open, r.high, r.low, r.close, r.volume, r.quote_volume, r.vwap, r.trade_count,
                r.is_final, r.origin, r.session_id, event, ingest, key,
            )  # fmt: skip
            records.append(row)
            writer.writerow(
                [
                    *row[:4],
                    _iso(r.interval_start),
                    _iso(r.interval_start + 60_000),
                    *row[6:17],
                    _iso(r.event_ts),
                    _iso(r.ingestion_ts),
                    key,
                ]
            )
    return records, buf.getvalue().encode()


class CpuMeter:
    """CPU seconds of this process and of the server's processes (backends and helpers).

    The load overlaps Python decoding with the backend parsing the COPY on another core, so
    its time is about the larger of the two: these say which side bounds it.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self.me = psutil.Process()
        self.server: dict[int, psutil.Process] = {}
        self.start: tuple[float, float] = (0.0, 0.0)

    async def _server_cpu(self) -> float:
        for row in await self.db.fetch("SELECT pid FROM pg_stat_activity"):
            pid = row["pid"]
            if pid not in self.server:
                try:
                    self.server[pid] = psutil.Process(pid)
                    self.server[pid].cpu_times()
                except psutil.Error:
                    continue
        total = 0.0
        for proc in self.server.values():
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system
        return total

    def _client_cpu(self) -> float:
        t = self.me.cpu_times()
        return t.user + t.system

    async def __aenter__(self) -> CpuMeter:
        self.start = (self._client_cpu(), await self._server_cpu())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.client_s = self._client_cpu() - self.start[0]
        self.server_s = await self._server_cpu() - self.start[1]


async def _baseline_table(db: Database, name: str) -> None:
    await db.execute(
        f"DROP TABLE IF EXISTS bench.{name};"
        f" CREATE TABLE bench.{name} (LIKE bronze.bronze_ohlcv_native INCLUDING ALL)"
        "  PARTITION BY RANGE (interval_start);"
        f" CREATE TABLE bench.{name}_p PARTITION OF bench.{name}"
        f"  FOR VALUES FROM ('{_iso(HOUR)}') TO ('{_iso(HOUR + HOUR_MS)}')"
    )


async def copy_csv(db: Database, data: bytes) -> float:
    await _baseline_table(db, "copy_csv")
    async with db.transaction() as conn:
        t0 = time.perf_counter()
        await conn.copy_to_table(
            "copy_csv", schema_name="bench", source=io.BytesIO(data), columns=COLUMNS,
            format="csv",
        )  # fmt: skip
        return time.perf_counter() - t0


async def copy_records(db: Database, records: list[tuple[Any, ...]]) -> float:
    await _baseline_table(db, "copy_records")
    async with db.transaction() as conn:
        t0 = time.perf_counter()
        await conn.copy_records_to_table(
            "copy_records", schema_name="bench", records=records, columns=COLUMNS
        )
        return time.perf_counter() - t0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="klined-bench-"))
    try:
        pairs = _pairs(args.pairs)
        lake = work / "lake"
        t0 = time.perf_counter()
        lines = write_lake(lake, pairs, args.updates, args.parts)
        gen_s = time.perf_counter() - t0
        records, csv_data = baseline_rows(lake)
        cfg = Config(
            daemon=DaemonConfig(data_dir=str(work)),
            database=DatabaseConfig(dsn=args.dsn, statement_timeout_s=0),
        )
        async with open_database(cfg, apply_schema=True) as db:
            await db.execute("CREATE SCHEMA IF NOT EXISTS bench")
            await sync_pairs(
                db, {ex: [(p, f"{p.base}{p.quote}") for p in pairs] for ex in EXCHANGES}
            )
            await db.ensure_partitions([HOUR])
            cpu: dict[str, dict[str, float]] = {}
            async with CpuMeter(db) as meter:
                csv_s = await copy_csv(db, csv_data)
            cpu["copy_csv"] = {"client": meter.client_s, "server": meter.server_s}
            steps: dict[str, float] = {}
            rows: dict[str, int] = {}
            source = LakeStore(lake)
            for name, call in (
                ("bronze", lambda: bronze.load_hour(db, HOUR, source)),
                ("silver", lambda: silver.merge_hour(db, HOUR)),
                ("gold", lambda: gold.refresh(db, HOUR)),
                ("completeness", lambda: completeness.refresh_hour(db, HOUR)),
            ):
                profile = cProfile.Profile() if args.profile and name == "bronze" else None
                async with CpuMeter(db) as meter:
                    t0 = time.perf_counter()
                    if profile is not None:
                        profile.enable()
                    result = await call()
                    if profile is not None:
                        profile.disable()
                        profile.dump_stats(args.profile)
                    steps[name] = time.perf_counter() - t0
                if name == "bronze":
                    cpu["bronze"] = {"client": meter.client_s, "server": meter.server_s}
                rows[name] = result.rows
            records_s = await copy_records(db, records)
            bronze_rows = await db.fetchval("SELECT count(*) FROM bronze.bronze_ohlcv_native")
            silver_rows = await db.fetchval("SELECT count(*) FROM silver.fact_ohlcv")
            server = await db.fetchval("SHOW server_version")
            await db.execute("DROP SCHEMA bench CASCADE")
        load_s = steps["bronze"]
        return {
            "bench": "chain",
            "pairs": args.pairs,
            "exchanges": len(EXCHANGES),
            "lines": lines,
            "parts": args.pairs * len(EXCHANGES) * args.parts,
            "bronze_rows": bronze_rows,
            "silver_rows": silver_rows,
            "gold_rows": rows["gold"],
            "completeness_rows": rows["completeness"],
            "seconds": {k: round(v, 3) for k, v in steps.items()},
            "chain_seconds": round(sum(steps.values()), 3),
            "rows_per_s": {
                "bronze": round(bronze_rows / steps["bronze"]),
                "silver_from_bronze": round(bronze_rows / steps["silver"]),
                "gold": round(rows["gold"] / steps["gold"]),
                "completeness": round(rows["completeness"] / steps["completeness"]),
            },
            "bare_copy_seconds": {"copy_csv": round(csv_s, 3), "copy_records": round(records_s, 3)},
            "bronze_vs_bare_copy": {
                "copy_csv": round(csv_s / load_s, 3),
                "copy_records": round(records_s / load_s, 3),
            },
            "cpu_seconds": {k: {s: round(v, 3) for s, v in d.items()} for k, d in cpu.items()},
            "lake_generation_seconds": round(gen_s, 1),
            "server_version": server,
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000, help="pairs per exchange")
    parser.add_argument("--updates", type=int, default=5, help="partial updates per minute")
    parser.add_argument("--parts", type=int, default=4, help="parts per pair-hour (divides 60)")
    parser.add_argument("--dsn", default="", help="use this server instead of the embedded one")
    parser.add_argument("--profile", default="", help="write a cProfile of the bronze step here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary lake/pgdata")
    args = parser.parse_args(argv)
    if 60 % args.parts:
        parser.error("--parts must divide 60")
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    print(json.dumps(anyio.run(run, args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
