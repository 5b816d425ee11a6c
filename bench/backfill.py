"""Benchmark: ``klined backfill`` of a 30-day range for 15 pairs on both exchanges.

The simulator runs in a child process (so its rendering does not compete with the client for
the GIL), one simulated exchange per instance so each gets its own rate-limit scaling:

* Binance: the real weight budget (1200 per minute, klines weight 2, 1000 candles per request)
  scaled by ``--binance-scale`` (budget) and ``--binance-time-scale`` (window compression);
* Kraken: the real call counter (15, decaying 0.33/s, 1 per call) with its decay compressed by
  ``--kraken-time-scale``. 30 days is far beyond the 720-minute OHLC window, so every Kraken
  minute comes from the Trades endpoint (1000 trades per page).

The ceiling each exchange's limits allow is ``budget per second / cost per request x candles
per request``: for Binance 1000 candles per request; for Kraken the candles per Trades page
the market allows at best (all candles / the fewest pages that can carry the range's trades,
``sum(ceil(trades of a pair / 1000))``, counted from what was stored). ``ratio`` is the
achieved candles/s over that ceiling, with each exchange's time measured from the start until
its last pair's rows were in bronze; ``ratio_end_to_end`` uses the whole run (merges into
silver/gold/completeness included). ``rate_limit_fraction`` is the share of the budget klined
may use (the ceiling is the full budget, so the ratio is at most that fraction).

Prints ONE JSON line.

    .venv/bin/python bench/backfill.py [--days 30] [--pairs 15] [--fraction 0.97] [--dsn URL]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import anyio

from klined.config import (
    BinanceConfig,
    Config,
    DaemonConfig,
    DatabaseConfig,
    ExchangesConfig,
    KrakenConfig,
)
from klined.exchanges import get_adapter
from klined.exchanges.base import RestBudget
from klined.jobs.backfill import resolve_request, run_backfill
from klined.jobs.gapfill import sync_configured_pairs
from klined.model import DAY_MS, iso
from klined.rest.client import open_clients
from klined.rest.ratelimit import RateLimiter, make_budget
from klined.sim.market import DEFAULT_PAIRS, synthetic_pairs
from klined.warehouse.database import open_database


def _sim_child(
    conn: Connection, exchange: str, pairs: list[str], settings: dict[str, float]
) -> None:
    """Run a simulator for one exchange until told to stop; report its URLs, then stats."""
    from loguru import logger

    from klined.sim import SimConfig, run_simulator

    logger.remove()

    async def main() -> None:
        config = SimConfig(pairs=pairs, binance_extra_pairs=(), log_events=False, **settings)
        async with run_simulator(config) as sim:
            conn.send(sim.urls(exchange))
            await anyio.to_thread.run_sync(conn.recv)
            s = sim.stats
            conn.send(
                {
                    "requests": s.requests[exchange],
                    "http_429": s.http_429,
                    "http_418": s.http_418,
                    "kraken_rate_limited": s.kraken_rate_limited,
                }
            )

    anyio.run(main)


def _scaled(budget: RestBudget, scale: float, time_scale: float) -> RestBudget:
    return RestBudget(
        budget.kind,
        capacity=budget.capacity * scale,
        window_s=budget.window_s / time_scale,
        decay_per_s=budget.decay_per_s * time_scale,
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level=args.log_level)
    pairs = list(DEFAULT_PAIRS[: args.pairs]) if args.pairs <= 15 else synthetic_pairs(args.pairs)
    settings = {
        "binance": {
            "rate_limit_scale": args.binance_scale,
            "rate_limit_time_scale": args.binance_time_scale,
        },
        "kraken": {"rate_limit_scale": 1.0, "rate_limit_time_scale": args.kraken_time_scale},
    }
    ctx = mp.get_context("spawn")
    pipes, procs, urls = {}, [], {}
    for ex in ("binance", "kraken"):  # one process each: the simulator must not be the bottleneck
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_sim_child, args=(child, ex, pairs, settings[ex]), daemon=True)
        proc.start()
        pipes[ex] = parent
        procs.append(proc)
    for ex, pipe in pipes.items():
        urls[ex] = await anyio.to_thread.run_sync(pipe.recv)
    tmp = Path(tempfile.mkdtemp(prefix="klined-bench-backfill-"))
    try:

        def section(ex: str) -> dict[str, Any]:
            return {
                "ws_url": urls[ex][0],
                "rest_url": urls[ex][1],
                "pairs": pairs,
                "rate_limit_fraction": args.fraction,
                "rest_timeout_s": 30.0,
            }

        cfg = Config(
            daemon=DaemonConfig(data_dir=str(tmp)),
            database=DatabaseConfig(dsn=args.dsn, readonly_role="", pool_size=8),
            exchanges=ExchangesConfig(
                binance=BinanceConfig(**section("binance")),
                kraken=KrakenConfig(**section("kraken")),
            ),
        )
        budgets = {
            ex: _scaled(
                get_adapter(ex).limits.rest_budget,
                settings[ex]["rate_limit_scale"],
                settings[ex]["rate_limit_time_scale"],
            )
            for ex in ("binance", "kraken")
        }
        limiters = {ex: RateLimiter(ex, make_budget(b, args.fraction)) for ex, b in budgets.items()}
        now = int(time.time() * 1000)
        end = now - now % DAY_MS - DAY_MS
        start = end - args.days * DAY_MS
        async with open_database(cfg, apply_schema=True) as db:
            await sync_configured_pairs(db, cfg)
            req = resolve_request(cfg, iso(start), iso(end), now_ms=now, source="rest")
            async with open_clients(cfg, limiters=limiters) as clients:
                finished: dict[str, float] = {}
                from klined.jobs.progress import Progress

                progress = Progress([], {ex: lim.stats for ex, lim in limiters.items()}, tty=False)
                t0 = time.monotonic()

                async def watch() -> None:
                    while len(finished) < 2:
                        for ex in ("binance", "kraken"):
                            reps = [r for r in progress.reports if r.exchange == ex]
                            if ex not in finished and reps and all(r.through >= end for r in reps):
                                finished[ex] = time.monotonic() - t0
                        await anyio.sleep(0.05)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch)
                    result = await run_backfill(
                        db, cfg, clients, req, now_ms=now, progress=progress,
                        concurrency=args.concurrency,
                    )  # fmt: skip
                    total_s = time.monotonic() - t0
                    tg.cancel_scope.cancel()
            trades = await db.fetch(
                "SELECT symbol, sum(trade_count)::bigint AS n FROM silver.fact_ohlcv"
                " WHERE exchange = 'kraken' AND interval_start >= to_timestamp($1 / 1000.0)"
                "   AND interval_start < to_timestamp($2 / 1000.0) GROUP BY symbol",
                start,
                end,
            )
            silver_rows = await db.fetchval("SELECT count(*) FROM silver.fact_ohlcv")
        sim_stats = {}
        for ex, pipe in pipes.items():
            pipe.send("stop")
            sim_stats[ex] = await anyio.to_thread.run_sync(pipe.recv)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    out: dict[str, Any] = {
        "bench": "backfill",
        "days": args.days,
        "pairs": len(pairs),
        "range": [iso(start), iso(end)],
        "rate_limit_fraction": args.fraction,
        "seconds": round(total_s, 2),
        "candles": result.rows,
        "candles_per_s": round(result.rows / total_s, 1),
        "silver_rows": silver_rows,
        "merged_ok": result.merged_ok,
        "missing": sum(r.still_missing for r in result.reports),
        "exchanges": {},
    }
    kraken_pages_min = sum(-(-int(r["n"]) // 1000) for r in trades)
    for ex in ("binance", "kraken"):
        reps = [r for r in result.reports if r.exchange == ex]
        candles = sum(r.fetched + r.no_trades for r in reps)
        requests = sum(r.requests for r in reps)
        b = budgets[ex]
        if ex == "binance":
            cost = 2.0
            budget_per_s = b.capacity / b.window_s
            per_request = 1000.0
        else:
            cost = 1.0
            budget_per_s = b.decay_per_s
            per_request = candles / kraken_pages_min if kraken_pages_min else 0.0
        ceiling = budget_per_s / cost * per_request
        secs = finished.get(ex, total_s)
        rate = candles / secs if secs else 0.0
        st = limiters[ex].stats
        out["exchanges"][ex] = {
            "candles": candles,
            "seconds": round(secs, 2),
            "candles_per_s": round(rate, 1),
            "requests": requests,
            "candles_per_request": round(candles / requests, 1) if requests else 0.0,
            "ceiling_candles_per_s": round(ceiling, 1),
            "ceiling_candles_per_request": round(per_request, 1),
            "ratio": round(rate / ceiling, 3) if ceiling else 0.0,
            "ratio_end_to_end": round(candles / total_s / ceiling, 3) if ceiling else 0.0,
            "budget_per_s": round(budget_per_s, 3),
            "rate_limit_scale": settings[ex]["rate_limit_scale"],
            "rate_limit_time_scale": settings[ex]["rate_limit_time_scale"],
            "limiter_waits": st.waits,
            "throttled_429": st.throttled,
            "retries": st.retries,
            "sim_http_429": sim_stats[ex]["http_429"] + sim_stats[ex]["kraken_rate_limited"],
            "sim_http_418": sim_stats[ex]["http_418"],
        }
    out["http_418"] = sum(e["sim_http_418"] for e in out["exchanges"].values())
    out["ratio_min"] = min(e["ratio"] for e in out["exchanges"].values())
    out["goal_met"] = out["ratio_min"] >= 0.9 and out["http_418"] == 0 and out["missing"] == 0
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--fraction", type=float, default=0.97, help="rate_limit_fraction")
    parser.add_argument("--concurrency", type=int, default=16, help="pairs at once per exchange")
    parser.add_argument("--binance-scale", type=float, default=0.1)
    parser.add_argument("--binance-time-scale", type=float, default=3.0)
    parser.add_argument("--kraken-time-scale", type=float, default=40.0)
    parser.add_argument("--dsn", default="", help="use this server instead of the embedded one")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    print(json.dumps(anyio.run(run, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
