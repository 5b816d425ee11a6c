"""Rebuild 1-minute candles from public trades (Kraken history beyond its OHLC window).

Pure and exact: volumes and quote volumes are summed as ``Decimal``; the open is the first
trade by (time, trade id) and the close the last, so the result does not depend on the order
the pages arrived in.
"""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal

import msgspec

from klined.exchanges.base import Trade
from klined.model import MINUTE_MS, Candle, Origin, Pair, floor_minute, plain_decimal


def since_ns(ts_ms: int) -> str:
    """Kraken's ``Trades`` cursor for a time: nanoseconds since the epoch, as text."""
    return str(ts_ms * 1_000_000)


def _order(trade: Trade) -> tuple[int, int]:
    return (trade.ts_ms, trade.trade_id if trade.trade_id is not None else -1)


def aggregate_trades(
    exchange: str,
    pair: Pair,
    native: str,
    trades: list[Trade],
    start_ms: int,
    end_ms: int,
    now_ms: int,
) -> list[Candle]:
    """One ``origin="trades"`` candle per closed minute of ``[start_ms, end_ms)`` with trades.

    Minutes that have not ended by ``now_ms`` are left out (more trades may still come).
    Trades must be in canonical units (the adapter's ``parse_trades`` already applied any
    multiplier). Duplicate trades (same id, e.g. from overlapping pages) count once.
    """
    by_minute: dict[int, list[Trade]] = defaultdict(list)
    seen: set[int] = set()
    for trade in trades:
        if trade.trade_id is not None:
            if trade.trade_id in seen:
                continue
            seen.add(trade.trade_id)
        minute = floor_minute(trade.ts_ms)
        if start_ms <= minute < end_ms and minute + MINUTE_MS <= now_ms:
            by_minute[minute].append(trade)
    candles = []
    for minute in sorted(by_minute):
        group = sorted(by_minute[minute], key=_order)
        prices = [Decimal(t.price) for t in group]
        volumes = [Decimal(t.volume) for t in group]
        volume = sum(volumes, Decimal(0))
        quote_volume = sum((p * v for p, v in zip(prices, volumes, strict=True)), Decimal(0))
        ids = [t.trade_id for t in group if t.trade_id is not None]
        raw = {"trades": len(group), "first_id": ids[0] if ids else None}
        raw["last_id"] = ids[-1] if ids else None
        candles.append(
            Candle(
                exchange=exchange,
                symbol=str(pair),
                native_symbol=native,
                interval_start=minute,
                open=plain_decimal(prices[0]),
                high=plain_decimal(max(prices)),
                low=plain_decimal(min(prices)),
                close=plain_decimal(prices[-1]),
                volume=plain_decimal(volume),
                quote_volume=plain_decimal(quote_volume),
                vwap=plain_decimal(quote_volume / volume) if volume > 0 else None,
                trade_count=len(group),
                is_final=True,
                origin=Origin.TRADES,
                event_ts=now_ms,
                ingestion_ts=now_ms,
                raw=msgspec.Raw(msgspec.json.encode(raw)),
            )
        )
    return candles
