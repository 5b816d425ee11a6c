"""Shared helpers for the gap-fill / backfill / chain tests: config against a simulator,
scaled limiters, truth comparison and table hashes."""

from __future__ import annotations

import tempfile
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from klined.config import (
    BinanceConfig,
    Config,
    DaemonConfig,
    DatabaseConfig,
    ExchangeConfig,
    ExchangesConfig,
    KrakenConfig,
)
from klined.exchanges import get_adapter
from klined.exchanges.base import RestBudget
from klined.model import MINUTE_MS, to_datetime
from klined.rest.ratelimit import RateLimiter, make_budget
from klined.sim import Simulator
from klined.warehouse.database import Database


def make_config(
    sim: Simulator,
    dsn: str,
    pairs: list[str],
    *,
    data_dir: str = "",
    exchanges: tuple[str, ...] = ("binance", "kraken"),
    fraction: float = 0.9,
    rest_timeout_s: float = 5.0,
    kraken_archive_dir: str = "",
) -> Config:
    def section(ex: str) -> ExchangeConfig:
        ws, rest = sim.urls(ex)
        extra: dict[str, Any] = (
            {"archive_url": sim.binance_archive_url}
            if ex == "binance"
            else {"archive_dir": kraken_archive_dir}
        )
        kind = BinanceConfig if ex == "binance" else KrakenConfig
        return kind(
            **extra,
            enabled=ex in exchanges,
            ws_url=ws,
            rest_url=rest,
            pairs=list(pairs),
            rate_limit_fraction=fraction,
            rest_timeout_s=rest_timeout_s,
            backoff_initial_s=0.05,
            backoff_max_s=0.5,
        )

    binance, kraken = section("binance"), section("kraken")
    assert isinstance(binance, BinanceConfig) and isinstance(kraken, KrakenConfig)
    return Config(
        # a folder of its own: gap-fill rows enter the lake, and no test may read another's
        daemon=DaemonConfig(data_dir=data_dir or tempfile.mkdtemp(prefix="klined-test-")),
        database=DatabaseConfig(dsn=dsn, readonly_role=""),
        exchanges=ExchangesConfig(binance=binance, kraken=kraken),
    )


def scaled_budget(budget: RestBudget, scale: float, time_scale: float) -> RestBudget:
    """The budget the simulator enforces with ``rate_limit_scale`` / ``rate_limit_time_scale``."""
    return RestBudget(
        budget.kind,
        capacity=budget.capacity * scale,
        window_s=budget.window_s / time_scale,
        decay_per_s=budget.decay_per_s * time_scale,
    )


def sim_limiters(sim: Simulator, fraction: float = 0.9) -> dict[str, RateLimiter]:
    """Fresh limiters matching the simulator's scaled limits (not the process-wide ones)."""
    cfg = sim.config
    out = {}
    for ex in ("binance", "kraken"):
        base = get_adapter(ex).limits.rest_budget
        budget = scaled_budget(base, cfg.rate_limit_scale, cfg.rate_limit_time_scale)
        out[ex] = RateLimiter(ex, make_budget(budget, fraction))
    return out


def _dec(x: Any) -> Decimal | None:
    return None if x is None else Decimal(str(x))


def _round(x: Decimal | None, dp: int) -> Decimal | None:
    return None if x is None else x.quantize(Decimal(1).scaleb(-dp), rounding=ROUND_HALF_EVEN)


async def fetch_silver(db: Database, exchange: str, start: int, end: int) -> list[Any]:
    return await db.fetch(
        "SELECT symbol, (extract(epoch from interval_start) * 1000)::bigint AS m,"
        " open, high, low, close, volume, quote_volume, vwap, trade_count, source"
        " FROM silver.fact_ohlcv WHERE exchange = $1"
        "   AND interval_start >= $2 AND interval_start < $3 ORDER BY symbol, interval_start",
        exchange,
        to_datetime(start),
        to_datetime(end),
    )


async def assert_silver_is_truth(
    db: Database,
    sim: Simulator,
    exchange: str,
    pairs: list[str],
    start: int,
    end: int,
    *,
    sources: set[str] | None = None,
) -> dict[str, int]:
    """Every minute of every pair has exactly one silver row equal to the market's truth.

    Returns the count of rows per source. vwap is compared at the pair's price precision
    (the truth rounds it to a tick; REST/trade rows may carry the exact quotient).
    """
    rows = await fetch_silver(db, exchange, start, end)
    by_key = {}
    for r in rows:
        key = (r["symbol"], r["m"])
        assert key not in by_key, f"duplicate silver row {key}"
        by_key[key] = r
    counts: dict[str, int] = {}
    problems = []
    for pair in pairs:
        spec = sim.market.spec(pair)
        for m in range(start, end, MINUTE_MS):
            r = by_key.get((pair, m))
            if r is None:
                problems.append(f"{exchange} {pair} {m}: missing")
                continue
            t = sim.market.truth(exchange, pair, m)
            src = r["source"]
            counts[src] = counts.get(src, 0) + 1
            if sources is not None:
                assert src in sources, f"{exchange} {pair} {m}: source {src}"
            traded = {"rest", "archive", "trades", "ws_final"}
            expect_src = {"no_trades", "ws_final"} if t.trades == 0 else traded
            if src not in expect_src:
                problems.append(f"{exchange} {pair} {m}: source {src} for {t.trades} trades")
            for f in ("open", "high", "low", "close", "volume"):
                if _dec(r[f]) != Decimal(getattr(t, f)):
                    problems.append(f"{exchange} {pair} {m}: {f} {r[f]} != {getattr(t, f)}")
            if (r["trade_count"] or 0) != t.trades:
                problems.append(f"{exchange} {pair} {m}: trades {r['trade_count']} != {t.trades}")
            if r["quote_volume"] is not None and _dec(r["quote_volume"]) != Decimal(t.quote_volume):
                problems.append(f"{exchange} {pair} {m}: quote {r['quote_volume']}")
            if t.vwap is None:
                if r["vwap"] is not None and t.trades:
                    problems.append(f"{exchange} {pair} {m}: vwap {r['vwap']} (none expected)")
            elif r["vwap"] is None and src == "archive" and exchange == "kraken":
                pass  # Kraken's OHLCVT files carry no vwap
            elif _round(_dec(r["vwap"]), spec.price_dp) != Decimal(t.vwap):
                problems.append(f"{exchange} {pair} {m}: vwap {r['vwap']} != {t.vwap}")
    extra = {k for k in by_key if k[0] not in pairs}
    assert not extra, f"rows for unexpected pairs: {sorted(extra)[:3]}"
    assert not problems, f"{len(problems)} problems, e.g. {problems[:5]}"
    return counts


TABLES = (
    "bronze.bronze_ohlcv_native",
    "silver.fact_ohlcv",
    "gold.ohlcv_5m",
    "gold.ohlcv_15m",
    "gold.ohlcv_30m",
    "gold.ohlcv_1h",
    "monitoring.hourly_completeness",
)


async def table_hashes(
    db: Database, tables: tuple[str, ...] = TABLES
) -> dict[str, tuple[int, str]]:
    """(row count, md5 of all rows in a stable order) per table."""
    out = {}
    for t in tables:
        row = await db.fetchrow(
            f"SELECT count(*) AS n, md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), ''))"
            f" AS h FROM {t} x"
        )
        assert row is not None
        out[t] = (row["n"], row["h"])
    return out


GOLD = {"5m": 5, "15m": 15, "30m": 30, "1h": 60}


def truth_gold(
    sim: Simulator, exchange: str, pair: str, start: int, end: int, minutes: int
) -> dict[int, dict[str, Any]]:
    """Gold buckets recomputed from the market's truth (the gold rules)."""
    out: dict[int, dict[str, Any]] = {}
    size = minutes * MINUTE_MS
    for b in range(start - start % size, end, size):
        cs = [sim.market.truth(exchange, pair, m) for m in range(b, b + size, MINUTE_MS)]
        traded = [c for c in cs if c.trades > 0]
        if traded:
            o, c = Decimal(traded[0].open), Decimal(traded[-1].close)
            h = max(Decimal(x.high) for x in traded)
            lo = min(Decimal(x.low) for x in traded)
        else:
            o = h = lo = c = Decimal(cs[0].close)
        out[b] = {
            "open": o,
            "high": h,
            "low": lo,
            "close": c,
            "volume": sum((Decimal(x.volume) for x in cs), Decimal(0)),
            "quote_volume": sum((Decimal(x.quote_volume) for x in cs), Decimal(0)),
            "trade_count": sum(x.trades for x in cs),
            "minutes": minutes,
            "traded_minutes": len(traded),
        }
    return out


async def assert_gold_is_truth(
    db: Database, sim: Simulator, exchange: str, pairs: list[str], start: int, end: int
) -> int:
    """Every gold bucket of the range equals the one recomputed from the truth."""
    checked = 0
    for name, minutes in GOLD.items():
        rows = await db.fetch(
            "SELECT symbol, (extract(epoch from interval_start) * 1000)::bigint AS b, open, high,"
            " low, close, volume, quote_volume, trade_count, minutes, traded_minutes"
            f" FROM gold.ohlcv_{name} WHERE exchange = $1"
            "   AND interval_start >= $2 AND interval_start < $3",
            exchange,
            to_datetime(start),
            to_datetime(end),
        )
        got = {(r["symbol"], r["b"]): r for r in rows}
        for pair in pairs:
            for b, t in truth_gold(sim, exchange, pair, start, end, minutes).items():
                r = got.get((pair, b))
                assert r is not None, f"gold {name} {exchange} {pair} {b} missing"
                for f in ("open", "high", "low", "close", "volume", "trade_count"):
                    assert _dec(r[f]) == Decimal(t[f]), (name, exchange, pair, b, f, r[f], t[f])
                if r["quote_volume"] is not None:
                    assert _dec(r["quote_volume"]) == t["quote_volume"], (name, pair, b)
                assert (r["minutes"], r["traded_minutes"]) == (t["minutes"], t["traded_minutes"])
                checked += 1
    return checked


async def assert_completeness(
    db: Database, exchange: str, pairs: list[str], hours: list[int]
) -> None:
    """60 minutes per pair and hour, counts equal to silver's sources, nothing missing."""
    for hour in hours:
        rows = await db.fetch(
            "SELECT symbol, expected, ws_final, rest, archive, trades, no_trades, ws_partial,"
            " missing"
            " FROM monitoring.hourly_completeness WHERE exchange = $1 AND hour_start = $2",
            exchange,
            to_datetime(hour),
        )
        assert sorted(r["symbol"] for r in rows) == sorted(pairs), (exchange, hour)
        for r in rows:
            parts = ("ws_final", "rest", "archive", "trades", "no_trades", "ws_partial", "missing")
            assert r["expected"] == 60 and sum(r[k] for k in parts) == 60
            assert r["missing"] == 0 and r["ws_partial"] == 0, dict(r)
            silver = await db.fetch(
                "SELECT source, count(*) AS n FROM silver.fact_ohlcv WHERE exchange = $1"
                " AND symbol = $2 AND interval_start >= $3 AND interval_start < $4"
                " GROUP BY source",
                exchange,
                r["symbol"],
                to_datetime(hour),
                to_datetime(hour + 60 * MINUTE_MS),
            )
            assert {s["source"]: s["n"] for s in silver} == {k: r[k] for k in parts[:6] if r[k]}
