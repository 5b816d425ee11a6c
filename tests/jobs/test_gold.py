"""Gold equals a straightforward recomputation from silver; only changed buckets are written."""

from __future__ import annotations

import random
from collections import defaultdict
from decimal import ROUND_HALF_UP, Context, Decimal
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from klined.config import Config
from klined.jobs import bronze, gold, silver
from klined.model import HOUR_MS, MINUTE_MS, Candle
from klined.warehouse.database import Database, open_database
from tests.support.warehouse import (
    GOLD_TABLES,
    H0,
    candle,
    config_for,
    table_hash,
    truncate_all,
    warehouse_dsn,
    wdb,
    xmins,
)

__all__ = ["warehouse_dsn", "wdb"]

INTERVALS = {
    "gold.ohlcv_5m": 300,
    "gold.ohlcv_15m": 900,
    "gold.ohlcv_30m": 1800,
    "gold.ohlcv_1h": 3600,
    "gold.ohlcv_4h": 14400,
    "gold.ohlcv_1d": 86400,
}
_EXACT = Context(prec=200)
_PLACES = Decimal("1e-18")


def reference_vwap(notional: Decimal | None, volume: Decimal) -> Decimal | None:
    """notional / volume, rounded half up to 18 decimal places."""
    if notional is None or volume <= 0:
        return None
    return _EXACT.divide(notional, volume).quantize(_PLACES, rounding=ROUND_HALF_UP)


def _traded(m: dict[str, Any]) -> bool:
    return m["source"] != "no_trades" and m["trade_count"] != 0


def reference_gold(silver_rows: list[dict[str, Any]], seconds: int) -> dict[tuple[Any, ...], Any]:
    """The Gold rules, written the obvious way."""
    by_pair: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in silver_rows:
        by_pair[(r["exchange"], r["symbol"])].append(r)
    out: dict[tuple[Any, ...], Any] = {}
    step = seconds * 1000
    for pair, minutes in by_pair.items():
        minutes.sort(key=lambda m: m["start"])
        buckets: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for m in minutes:
            buckets[m["start"] - m["start"] % step].append(m)
        for start, ms in buckets.items():
            traded = [m for m in ms if _traded(m)]
            if traded:
                o, c = traded[0]["open"], traded[-1]["close"]
                h = max(m["high"] for m in traded)
                lo = min(m["low"] for m in traded)
            else:
                before = [m for m in minutes if m["start"] < start and _traded(m)]
                o = h = lo = c = before[-1]["close"] if before else ms[0]["open"]
            qv = (
                None
                if any(_traded(m) and m["quote_volume"] is None for m in ms)
                else sum((m["quote_volume"] or Decimal(0)) for m in ms)
            )
            tc = (
                None
                if any(_traded(m) and m["trade_count"] is None for m in ms)
                else sum((m["trade_count"] or 0) for m in ms)
            )
            # quote value traded: quote volume, else vwap x volume, over minutes with volume
            valued = [
                m["quote_volume"]
                if m["quote_volume"] is not None
                else (m["vwap"] * m["volume"] if m["vwap"] is not None else None)
                for m in ms
                if m["volume"] > 0
            ]
            notional = None if None in valued else sum(valued, Decimal(0))
            volume = sum(m["volume"] for m in ms)
            out[(*pair, start)] = (
                start + step,
                o,
                h,
                lo,
                c,
                volume,
                qv,
                tc,
                len(ms),
                len(traded),
                notional,
                reference_vwap(notional, volume),
            )
    return out


async def check_gold(db: Database) -> None:
    rows = await db.fetch("SELECT * FROM silver.fact_ohlcv")
    silver_rows = [
        {**dict(r), "start": round(r["interval_start"].timestamp() * 1000)} for r in rows
    ]
    for table, seconds in INTERVALS.items():
        expected = reference_gold(silver_rows, seconds)
        actual = {
            (r["exchange"], r["symbol"], round(r["interval_start"].timestamp() * 1000)): (
                round(r["interval_end"].timestamp() * 1000),
                r["open"],
                r["high"],
                r["low"],
                r["close"],
                r["volume"],
                r["quote_volume"],
                r["trade_count"],
                r["minutes"],
                r["traded_minutes"],
                r["notional"],
                r["vwap"],
            )
            for r in await db.fetch(f"SELECT * FROM {table} WHERE source = 'derived'")
        }
        assert actual == expected, table
    assert await db.fetchval("SELECT count(*) FROM ops.gold_dirty") == 0


# ---------------------------------------------------------------------------------------------
# property: any silver history, merged and refreshed in any order, gives the reference gold

KINDS = ("final", "zero_final", "rest", "partial", "no_trades", "trades")
MINUTES = 300  # five hours, across a 4h boundary (H0 is 10:00)


def _make(symbol: str, minute_index: int, kind: str, prices: list[int], extra: int) -> Candle:
    minute = H0 + minute_index * MINUTE_MS
    o, c = prices[0], prices[1]
    hi, lo = max(prices), min(prices)
    args: dict[str, Any] = {
        "symbol": symbol,
        "price": str(o),
        "high": str(hi),
        "low": str(lo),
        "close": str(c),
        "volume": f"{extra}.5",
        "trade_count": extra,
        "quote_volume": None if extra == 3 else f"{extra * 10}",
        # Kraken-like minutes (no quote volume) carry the exchange's vwap, or not at all
        "vwap": None if extra in (1, 3) and prices[2] % 2 else f"{prices[2]}.{extra}7",
        "event_ts": minute + MINUTE_MS + extra,
    }
    if kind in ("zero_final", "no_trades"):
        args.update(price=str(o), high=str(o), low=str(o), close=str(o), volume="0", trade_count=0)
    if kind == "partial":
        args["trade_count"] = None if extra == 2 else extra
        return candle(minute, final=False, **args)
    if kind in ("final", "zero_final"):
        return candle(minute, **args)
    return candle(minute, origin=kind, **args)


event = st.tuples(
    st.sampled_from(["A/USD", "B/USD"]),
    st.integers(0, MINUTES - 1),
    st.sampled_from(KINDS),
    st.lists(st.integers(1, 40), min_size=3, max_size=3),
    st.integers(0, 4),
)
scenario = st.tuples(
    st.lists(event, min_size=1, max_size=40),
    st.lists(event, max_size=25),
    st.randoms(use_true_random=False),
)


async def _run_scenario(dsn: str, first: list[Any], second: list[Any], rnd: random.Random) -> None:
    async with open_database(config_for(dsn)) as db:
        await truncate_all(db)
        hours = [H0 + i * HOUR_MS for i in range(MINUTES // 60)]
        for wave in (first, second):
            if not wave:
                continue
            await bronze.insert_candles(db, [_make(*e) for e in wave])
            order = hours[:]
            rnd.shuffle(order)
            for hour in order:
                await silver.merge_hour(db, hour)
                if rnd.random() < 0.5:
                    await gold.refresh(db)
            await gold.refresh(db)
            await check_gold(db)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenario)
def test_gold_matches_reference(warehouse_dsn: str, case: tuple[Any, Any, random.Random]) -> None:
    first, second, rnd = case
    anyio.run(_run_scenario, warehouse_dsn, first, second, rnd)


# ---------------------------------------------------------------------------------------------
# examples


async def _fill(db: Database, candles: list[Candle], *hours: int) -> None:
    await bronze.insert_candles(db, candles)
    for hour in hours:
        await silver.merge_hour(db, hour)
    await gold.refresh(db)


async def _close_1h(db: Database, hour: int) -> Any:
    return await db.fetchval("SELECT close FROM gold.ohlcv_1h WHERE interval_start = $1", _dt(hour))


@pytest.mark.anyio
async def test_flat_buckets_follow_a_late_earlier_trade(wdb: Database) -> None:
    h1, h2 = H0 + HOUR_MS, H0 + 2 * HOUR_MS
    quiet = [
        candle(H0 + m * MINUTE_MS, origin="no_trades", price="5", volume="0", trade_count=0)
        for m in range(10, 180)
    ]
    await _fill(wdb, [candle(H0 + 2 * MINUTE_MS, price="5"), *quiet], H0, h1, h2)
    await check_gold(wdb)
    assert (await _close_1h(wdb, h1), await _close_1h(wdb, h2)) == (5, 5)
    # a late REST candle for 10:05 (missing until now) trades at 7: every later flat bucket,
    # in this hour and the two quiet hours after it, now sits at 7
    await _fill(wdb, [candle(H0 + 5 * MINUTE_MS, origin="rest", price="6", close="7")], H0)
    await check_gold(wdb)
    assert (await _close_1h(wdb, h1), await _close_1h(wdb, h2)) == (7, 7)
    flat = await wdb.fetchrow(
        "SELECT open, high, low, close, volume, minutes, traded_minutes FROM gold.ohlcv_5m"
        " WHERE interval_start = $1",
        _dt(h2 + 30 * MINUTE_MS),
    )
    assert tuple(flat or ()) == (7, 7, 7, 7, 0, 5, 0)


def _dt(ms: int) -> Any:
    from klined.model import to_datetime

    return to_datetime(ms)


@pytest.mark.anyio
async def test_only_changed_buckets_are_rewritten(wdb: Database) -> None:
    minutes = [candle(H0 + m * MINUTE_MS, price=str(10 + m % 7)) for m in range(60)]
    minutes[7] = candle(H0 + 7 * MINUTE_MS, final=False, price="3")
    await _fill(wdb, minutes, H0)
    await check_gold(wdb)
    before = {t: await xmins(wdb, t) for t in GOLD_TABLES}
    hashes = {t: await table_hash(wdb, t) for t in GOLD_TABLES}
    # nothing dirty: a refresh writes nothing
    assert (await gold.refresh(wdb)).rows == 0
    assert {t: await table_hash(wdb, t) for t in GOLD_TABLES} == hashes
    # re-merging the same hour changes nothing either
    await silver.merge_hour(wdb, H0)
    assert (await gold.refresh(wdb)).rows == 0
    assert {t: await xmins(wdb, t) for t in GOLD_TABLES} == before
    # REST replaces the partial 10:07: only the buckets holding 10:07 change
    await _fill(wdb, [candle(H0 + 7 * MINUTE_MS, origin="rest", price="30")], H0)
    await check_gold(wdb)
    after = {t: await xmins(wdb, t) for t in GOLD_TABLES}
    changed = {
        t: sorted(
            round(k[2].timestamp() * 1000) - H0 for k in after[t] if after[t][k] != before[t][k]
        )
        for t in GOLD_TABLES
    }
    assert changed == {
        "gold.ohlcv_5m": [5 * MINUTE_MS],
        "gold.ohlcv_15m": [0],
        "gold.ohlcv_30m": [0],
        "gold.ohlcv_1h": [0],
        "gold.ohlcv_4h": [-2 * HOUR_MS],  # 08:00-12:00 holds 10:07
        "gold.ohlcv_1d": [-10 * HOUR_MS],
    }


@pytest.mark.anyio
async def test_refresh_by_exchange_and_concurrent_sessions(wdb: Database) -> None:
    await bronze.insert_candles(
        wdb, [candle(H0, exchange="kraken", price="2"), candle(H0, exchange="binance", price="3")]
    )
    await silver.merge_hour(wdb, H0)
    result = await gold.refresh(wdb, H0, exchange="kraken")
    assert result.rows == 6 and result.hour_ms == H0
    assert await wdb.fetchval("SELECT count(*) FROM ops.gold_dirty") == 1

    async def other() -> None:
        async with open_database(Config(database=wdb.config)) as db:
            await gold.refresh(db)

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        tg.start_soon(other)
    await check_gold(wdb)


@pytest.mark.anyio
async def test_vwap_by_hand(wdb: Database) -> None:
    """Kraken sends vwap but no quote volume: notional = sum of vwap x volume, exact; vwap is
    rounded half up at the 18th decimal place; 4h and 1d carry the hours' sums on."""
    k = "kraken"
    minutes = [
        candle(H0, exchange=k, price="10", volume="2", quote_volume=None, vwap="10"),
        candle(H0 + MINUTE_MS, exchange=k, price="13", volume="1", quote_volume=None, vwap="13"),
        # the next hour: 3 units at a vwap of 0.1, then a quiet minute
        candle(H0 + HOUR_MS, exchange=k, price="1", volume="3", quote_volume=None, vwap="0.1"),
        candle(
            H0 + HOUR_MS + MINUTE_MS,
            exchange=k,
            price="1",
            volume="0",
            quote_volume=None,
            vwap=None,
            trade_count=0,
            origin="no_trades",
        ),
    ]
    await _fill(wdb, minutes, H0, H0 + HOUR_MS)
    rows = {
        (r["t"], round(r["interval_start"].timestamp() * 1000) - H0): (
            str(r["notional"]),
            str(r["vwap"]),
            r["quote_volume"],
        )
        for t in ("5m", "1h", "4h", "1d")
        for r in await wdb.fetch(
            f"SELECT '{t}' AS t, * FROM gold.ohlcv_{t} ORDER BY interval_start"
        )
    }
    assert rows == {
        ("5m", 0): ("33", "11", None),
        ("1h", 0): ("33", "11", None),
        ("5m", HOUR_MS): ("0.3", "0.1", None),
        ("1h", HOUR_MS): ("0.3", "0.1", None),
        ("4h", -2 * HOUR_MS): ("33.3", "5.55", None),  # 33.3 / 6
        ("1d", -10 * HOUR_MS): ("33.3", "5.55", None),
    }
    third = await wdb.fetchval("SELECT ops.vwap(2, 3)")
    assert str(third) == "0.666666666666666667"
    assert str(await wdb.fetchval("SELECT ops.vwap(1, 3)")) == "0.333333333333333333"
    assert await wdb.fetchval("SELECT ops.vwap(1, 0)") is None
