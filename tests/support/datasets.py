"""Shared helpers for the dataset tests: a warehouse with hand-checked edge cases, and the
warehouse's own rows to compare every reader's result with (no tests here)."""

from __future__ import annotations

from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from klined.jobs import bronze, gold, silver
from klined.model import HOUR_MS, MINUTE_MS, to_datetime
from klined.warehouse.database import Database
from tests.support.warehouse import H0, candle

#: a Kraken volume of 23 digits and a PEPE price with 10 decimals (Kraken sends no quote volume)
KRAKEN_VOLUME = "123456789012345.12345678"
PEPE_PRICE = "0.0000123456"
#: Binance's vwap is quote volume / volume to 28 significant digits: exported at 18 places
BINANCE_QUOTE = "1219326311.12345678"
BINANCE_VOLUME = "98765432109876.54"
BINANCE_VWAP = str(Decimal(BINANCE_QUOTE) / Decimal(BINANCE_VOLUME))
#: the last minute of February, so an export spans two monthly partitions
FEB_LAST = H0 - 10 * HOUR_MS - MINUTE_MS  # 2026-02-28T23:59Z

EDGE_HOURS = [FEB_LAST - FEB_LAST % HOUR_MS, H0]


async def seed_edge_cases(db: Database) -> None:
    """Both exchanges, PEPE and BTC, a partial minute, a quiet minute, two months."""
    candles = [
        candle(H0, exchange="kraken", symbol="PEPE/USD", price=PEPE_PRICE, high="0.0000123499",
               low="0.00001234", volume=KRAKEN_VOLUME, quote_volume=None, vwap="0.0000123457",
               trade_count=42),
        candle(H0, exchange="binance", symbol="PEPE/USD", price=PEPE_PRICE, high=PEPE_PRICE,
               low=PEPE_PRICE, volume=BINANCE_VOLUME, quote_volume=BINANCE_QUOTE,
               vwap=BINANCE_VWAP, trade_count=1_000_000),
        candle(FEB_LAST, exchange="binance", symbol="BTC/USD", price="96999.99", volume="0.5",
               quote_volume="48499.995", vwap="96999.99"),
    ]  # fmt: skip
    for m in range(6):
        minute = H0 + m * MINUTE_MS
        price = f"97000.{m}2"
        candles.append(
            candle(minute, symbol="BTC/USD", price=price, high=f"97010.{m}", low="96990",
                   close=f"97001.{m}", volume=f"1.{m}5", quote_volume=f"{97000 + m}.5",
                   vwap=f"97000.{m}", final=m != 4)  # 10:04 stays partial
        )  # fmt: skip
        candles.append(
            candle(minute, exchange="kraken", symbol="BTC/USD", price=price, volume="0.25",
                   quote_volume=None, vwap=price)
        )  # fmt: skip
    candles.append(  # a quiet minute: flat, no volume, no vwap
        candle(H0 + 6 * MINUTE_MS, symbol="BTC/USD", origin="no_trades", price="97001.5",
               volume="0", trade_count=0, quote_volume="0")
    )  # fmt: skip
    await bronze.insert_candles(db, candles)
    for hour in EDGE_HOURS:
        await silver.merge_hour(db, hour)
    await gold.refresh(db)


def _ms_floor(value: datetime) -> datetime:
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


async def warehouse_rows(
    db: Database, interval: str = "1m", *, start: int | None = None, end: int | None = None
) -> dict[tuple[str, str, datetime], dict[str, Any]]:
    """The warehouse's rows as a reader should see them, keyed by (exchange, symbol, start):
    exact numerics, vwap rounded half up to 18 places, ``updated_at`` cut to the ms."""
    table = "silver.fact_ohlcv" if interval == "1m" else f"gold.ohlcv_{interval}"
    changed = "updated_at" if interval == "1m" else "ingestion_ts"
    extra = "source" if interval == "1m" else "minutes, traded_minutes"
    rows = await db.fetch(
        f"SELECT exchange, symbol, interval_start, interval_end, open, high, low, close,"
        f" volume, quote_volume, vwap, trade_count, {extra}, {changed} AS updated_at"
        f" FROM {table} WHERE interval_start >= $1 AND interval_start < $2",
        to_datetime(start if start is not None else 0),
        to_datetime(end if end is not None else 4_102_444_800_000),
    )
    out = {}
    for r in rows:
        row = dict(r)
        if row["vwap"] is not None:
            row["vwap"] = row["vwap"].quantize(Decimal("1e-18"), rounding=ROUND_HALF_UP)
        row["updated_at"] = _ms_floor(row["updated_at"])
        out[(row["exchange"], row["symbol"], row["interval_start"])] = row
    return out


def keyed(rows: list[dict[str, Any]], exchange: str | None = None) -> dict[tuple, dict[str, Any]]:
    """Reader rows keyed like :func:`warehouse_rows` (``exchange`` when the rows lack it)."""
    out = {}
    for r in rows:
        row = dict(r)
        row.setdefault("exchange", exchange)
        for name in ("year", "month", "day"):
            row.pop(name, None)
        out[(row["exchange"], row["symbol"], row["interval_start"])] = row
    return out


def assert_same_rows(got: dict[tuple, dict[str, Any]], want: dict[tuple, dict[str, Any]]) -> None:
    """Same keys, and every column equal as a value (Decimal 1.50 == 1.5; instants)."""
    assert sorted(got) == sorted(want)
    for key, row in want.items():
        other = got[key]
        assert set(other) == set(row), key
        for name, value in row.items():
            assert other[name] == value, (key, name, other[name], value)
            if isinstance(value, Decimal):
                assert isinstance(other[name], Decimal), (key, name)
