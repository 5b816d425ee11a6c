"""The demo's view of the live path: silver and gold filling minute by minute while the daemon
runs, and the summary's account of how the minutes of the run arrived (live, or by REST).

Counted straight from the warehouse: a ``ws_final`` row of a minute that closed while the demo
ran got there by the live path (the hourly chain only loads an hour after it closed); ``rest``,
``trades`` and ``no_trades`` rows came from gap-fill.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
from loguru import logger

from klined.daemon.process import Daemon
from klined.model import MINUTE_MS, floor_interval, floor_minute, iso, to_datetime
from klined.status import LiveStatus
from klined.warehouse.database import Database

__all__ = ["LiveLine", "live_line", "watch_live"]

#: a closed minute is reported this long after it closed: its finals are committed within
#: seconds, and the demo's gold follows every 10 s (``[live] gold_interval_s`` it writes)
REPORT_AFTER_S = 15.0
#: a minute that closed less than this before the daemon stopped is left out of the summary
SETTLE_MS = 5_000

_MINUTE_SQL = """
SELECT count(*) FILTER (WHERE source = 'ws_final') AS live, count(*) AS rows
FROM silver.fact_ohlcv
WHERE interval_start = $1 AND (exchange, symbol) IN (SELECT * FROM unnest($2::text[], $3::text[]))
"""
_BUCKET_SQL = """
SELECT count(*) AS buckets, coalesce(sum(minutes), 0) AS minutes
FROM gold.ohlcv_5m
WHERE interval_start = $1 AND (exchange, symbol) IN (SELECT * FROM unnest($2::text[], $3::text[]))
"""
_WINDOW_SQL = """
SELECT source, count(*) AS n FROM silver.fact_ohlcv
WHERE interval_start >= $1 AND interval_start < $2
  AND (exchange, symbol) IN (SELECT * FROM unnest($3::text[], $4::text[]))
GROUP BY source
"""


@dataclass(slots=True)
class LiveLine:
    """The summary's live-path lines."""

    enabled: bool = False
    status: LiveStatus = field(default_factory=LiveStatus)
    first_ms: int = 0  # the minutes of the run: [first_ms, end_ms)
    end_ms: int = 0
    expected: int = 0  # pairs x minutes
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def live(self) -> int:
        return self.counts.get("ws_final", 0)

    @property
    def by_rest(self) -> int:
        return sum(self.counts.get(s, 0) for s in ("rest", "trades", "no_trades"))

    def render(self) -> list[str]:
        if not self.enabled:
            return ["live path     off"]
        s = self.status
        lag = "no final committed"
        if s.lag_samples:
            lag = f"lag p50 {s.lag_p50_s:.2f}s, p99 {s.lag_p99_s:.2f}s, max {s.lag_max_s:.2f}s"
        out = [
            f"live path     {s.written:,} silver write(s) as candles closed",
            f"              ({lag}),",
            f"              {s.dropped_batches} batch(es) dropped, {s.gold_rows:,} gold row(s)"
            " refreshed",
        ]
        if self.end_ms > self.first_ms:
            minutes = (self.end_ms - self.first_ms) // MINUTE_MS
            pairs = self.expected // minutes
            others = self.expected - self.live - self.by_rest
            out += [
                f"              minutes of this run, {iso(self.first_ms)[11:16]}-"
                f"{iso(self.end_ms)[11:16]} ({minutes} x {pairs} pairs):",
                f"              {self.live:,} arrived live, {self.by_rest:,} by REST,"
                f" {others:,} not in silver yet",
            ]
        else:
            out.append("              (no whole minute in this run)")
        return out


def _keys(pairs: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    return [ex for ex, ps in pairs.items() for _ in ps], [p for ps in pairs.values() for p in ps]


async def watch_live(daemon: Daemon, db: Database, pairs: dict[str, list[str]]) -> None:
    """Log, a few seconds after each minute closes, how that minute stands in silver and its
    5-minute bucket in gold: the warehouse filling from the live streams."""
    exchanges, symbols = _keys(pairs)
    total = len(symbols)
    while True:
        now = daemon.snapshot().now_ms
        nxt = floor_minute(now) + MINUTE_MS
        await anyio.sleep((nxt - now) / 1000 + REPORT_AFTER_S)
        minute = nxt - MINUTE_MS
        bucket = floor_interval(minute, 5 * MINUTE_MS)
        try:
            row = await db.fetchrow(_MINUTE_SQL, to_datetime(minute), exchanges, symbols)
            gold = await db.fetchrow(_BUCKET_SQL, to_datetime(bucket), exchanges, symbols)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            logger.warning("demo: reading the warehouse failed: {}", exc)
            continue
        assert row is not None and gold is not None
        live = daemon.live.snapshot() if daemon.live is not None else None
        lag = f", lag p99 {live.lag_p99_s:.2f}s" if live and live.lag_p99_s is not None else ""
        logger.info(
            "minute {} in silver for {}/{} pairs ({} live){}; gold 5m {}: {} of {} minutes",
            iso(minute)[11:16],
            row["rows"],
            total,
            row["live"],
            lag,
            iso(bucket)[11:16],
            gold["minutes"],
            5 * total,
        )


async def live_line(
    db: Database, daemon: Daemon, pairs: dict[str, list[str]], started_ms: int, ended_ms: int
) -> LiveLine:
    """How the minutes that closed while the daemon ran reached silver (a Binance final carries
    its whole minute, so even the minute the daemon started in can arrive live)."""
    if daemon.live is None:
        return LiveLine()
    first = floor_minute(started_ms)
    end = floor_minute(ended_ms - SETTLE_MS)
    line = LiveLine(enabled=True, status=daemon.live.snapshot(), first_ms=first, end_ms=end)
    if end <= first:
        return line
    exchanges, symbols = _keys(pairs)
    line.expected = len(symbols) * (end - first) // MINUTE_MS
    rows = await db.fetch(_WINDOW_SQL, to_datetime(first), to_datetime(end), exchanges, symbols)
    line.counts = {r["source"]: int(r["n"]) for r in rows}
    return line
