"""Benchmark: what the lake costs in bytes, per event and per day per 1,000 pairs.

A capture daemon (``role = "capture"``, the real runtime and lake writer) streams the
simulator's Binance US and Kraken feeds, on an accelerated clock, for ``--minutes`` sim minutes
of ``--pairs`` pairs. The sealed parts are then measured: events per pair-minute and bytes per
event on each exchange, and the same parts gzipped one by one (what compressed sealed parts
cost; the baseline of the ``gzip_ratio``). Bytes per day per 1,000 pairs follow two ways: at
the simulator's own event rate, and at Binance's ceiling of 31 events per pair-minute (a push
every 2 s while the candle changes, plus the final) for a market busy every minute.

Prints ONE JSON line.

    .venv/bin/python bench/lake.py [--pairs 15] [--minutes 20] [--speed 20]
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio

from klined.config import ChainConfig, Config, DaemonConfig, ExchangeConfig, ExchangesConfig
from klined.config import LakeConfig as LakeSettings
from klined.daemon.process import Daemon
from klined.lake import iter_local_parts, read_part
from klined.model import MINUTE_MS
from klined.sim import SimClock, SimConfig, run_simulator
from klined.sim.config import DEFAULT_PAIRS

BINANCE_CEILING_PER_MINUTE = 31
MINUTES_PER_DAY = 1440


def measure(root: Path) -> dict[str, Any]:
    per: dict[str, Counter[str]] = {}
    pair_minutes: dict[str, set[tuple[str, int]]] = {}
    for part in iter_local_parts(root):
        data = part.path.read_bytes()
        records = read_part(data).records
        if not records:
            continue
        ex = records[0].exchange
        c = per.setdefault(ex, Counter())
        c["events"] += len(records)
        c["bytes"] += len(data)
        c["gzip_bytes"] += len(gzip.compress(data, compresslevel=6))
        c["parts"] += 1
        pair_minutes.setdefault(ex, set()).update(
            (r.symbol, r.interval_start // MINUTE_MS) for r in records
        )
    out: dict[str, Any] = {}
    for ex, c in per.items():
        events_per_pm = c["events"] / max(1, len(pair_minutes[ex]))
        per_event = c["bytes"] / c["events"]
        gz_per_event = c["gzip_bytes"] / c["events"]
        day = MINUTES_PER_DAY * 1000  # pair-minutes per day per 1,000 pairs
        out[ex] = {
            "events": c["events"],
            "parts": c["parts"],
            "events_per_pair_minute": round(events_per_pm, 2),
            "bytes_per_event": round(per_event, 1),
            "gzip_bytes_per_event": round(gz_per_event, 1),
            "gzip_ratio": round(c["gzip_bytes"] / c["bytes"], 3),
            "gb_per_day_per_1000_pairs": round(events_per_pm * per_event * day / 1e9, 2),
            "gzip_gb_per_day_per_1000_pairs": round(events_per_pm * gz_per_event * day / 1e9, 2),
        }
        if ex == "binance":
            ceiling = BINANCE_CEILING_PER_MINUTE * day
            out[ex]["gb_per_day_per_1000_pairs_at_31_per_minute"] = round(
                ceiling * per_event / 1e9, 2
            )
            out[ex]["gzip_gb_per_day_per_1000_pairs_at_31_per_minute"] = round(
                ceiling * gz_per_event / 1e9, 2
            )
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="klined-bench-lake-"))
    pairs = list(DEFAULT_PAIRS)[: args.pairs]
    start = int(time.time() * 1000) - 6 * 3_600_000
    start -= start % MINUTE_MS
    try:
        clock = SimClock(start, args.speed)
        async with run_simulator(SimConfig(seed=3, pairs=pairs, clock=clock)) as sim:

            def section(ex: str) -> ExchangeConfig:
                ws, rest = sim.urls(ex)
                return ExchangeConfig(ws_url=ws, rest_url=rest, pairs=pairs)

            cfg = Config(
                daemon=DaemonConfig(
                    data_dir=str(work), role="capture", status_socket=str(work / "k.sock")
                ),
                lake=LakeSettings(flush_interval_s=0.5, hour_grace_s=5.0),
                chain=ChainConfig(enabled=False),
                exchanges=ExchangesConfig(binance=section("binance"), kraken=section("kraken")),
            )
            daemon = Daemon(cfg, handle_signals=False, clock_ms=clock.now_ms)
            async with anyio.create_task_group() as tg:
                await tg.start(daemon.run)
                await anyio.sleep(args.minutes * 60 / args.speed)
                daemon.request_stop()
        figures = await anyio.to_thread.run_sync(measure, cfg.lake_root)
        return {
            "bench": "lake",
            "pairs": len(pairs),
            "sim_minutes": args.minutes,
            "speed": args.speed,
            "exchanges": figures,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=15, help="pairs per exchange (<= 15)")
    parser.add_argument("--minutes", type=int, default=20, help="sim minutes captured")
    parser.add_argument("--speed", type=float, default=20.0, help="sim seconds per wall second")
    args = parser.parse_args(argv)
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    print(json.dumps(anyio.run(run, args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
