"""Pure planning for the gap-filler: which minutes to fetch, and in how few requests.

No I/O and no clock: every function takes ``now_ms``, so planning is unit-testable and the
dry run (`klined backfill --dry-run`) prints exactly what a real run would do.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from klined.model import MINUTE_MS, Source, floor_minute

#: Sources that settle a minute for the gap-filler: nothing to fetch.
SETTLED = frozenset({Source.WS_FINAL, Source.REST, Source.ARCHIVE, Source.TRADES, Source.NO_TRADES})
#: With ``refetch``, only a final WS candle settles a minute (REST rows are re-verified).
SETTLED_REFETCH = frozenset({Source.WS_FINAL})

#: Minutes of safety at the old end of Kraken's OHLC window: the window slides while a request
#: is queued behind the rate limiter, so the oldest minutes go to the Trades endpoint.
OHLC_WINDOW_MARGIN = 20

#: Two runs of missing minutes closer than this are fetched with one Trades paging pass (the
#: trades in between cost little; a new cursor costs a request).
TRADES_BRIDGE_MINUTES = 30

#: Dry-run guess of how many minutes one Trades page (1000 trades) covers.
TRADES_MINUTES_PER_PAGE_GUESS = 60


@dataclass(frozen=True, slots=True)
class Window:
    """A half-open minute range ``[start_ms, end_ms)`` fetched with one method.

    ``kind`` is ``"candles"`` (Binance klines, Kraken OHLC) or ``"trades"`` (Kraken Trades,
    paged by its cursor from ``start_ms`` until the cursor passes ``end_ms``).
    """

    start_ms: int
    end_ms: int
    kind: str = "candles"

    @property
    def minutes(self) -> int:
        return (self.end_ms - self.start_ms) // MINUTE_MS


def closed_range(start_ms: int, end_ms: int, now_ms: int) -> range:
    """Minute starts of ``[start_ms, end_ms)`` whose minute is over by ``now_ms``."""
    first = -((-start_ms) // MINUTE_MS) * MINUTE_MS
    last = min(end_ms, floor_minute(now_ms))
    return range(first, max(first, last), MINUTE_MS)


def wanted_minutes(
    start_ms: int,
    end_ms: int,
    sources: dict[int, str],
    now_ms: int,
    *,
    refetch: bool = False,
) -> list[int]:
    """Closed minutes of the range not settled by what the warehouse holds.

    ``sources`` maps a minute to the best source the warehouse has for it (silver, or a
    bronze row not yet merged). A partial WS candle does not settle a minute; a final WS
    candle always does; REST-derived rows do unless ``refetch``.
    """
    settled = SETTLED_REFETCH if refetch else SETTLED
    return [m for m in closed_range(start_ms, end_ms, now_ms) if sources.get(m) not in settled]


def runs(minutes: Iterable[int], step: int = MINUTE_MS) -> list[tuple[int, int]]:
    """Contiguous runs ``[start, end)`` of sorted minute (or ``step``-long) starts."""
    out: list[tuple[int, int]] = []
    for m in minutes:
        if out and out[-1][1] == m:
            out[-1] = (out[-1][0], m + step)
        else:
            out.append((m, m + step))
    return out


def batch(minutes: list[int], max_candles: int) -> list[Window]:
    """Fewest requests of at most ``max_candles`` minutes covering every wanted minute.

    Greedy from the earliest: a request starts at the first uncovered wanted minute and is
    trimmed to end just after the last wanted minute it can reach (gaps inside cost nothing:
    one request is one request whatever it returns). Greedy is optimal for covering points on
    a line with fixed-length intervals.
    """
    out: list[Window] = []
    i, n = 0, len(minutes)
    span = max_candles * MINUTE_MS
    while i < n:
        start = minutes[i]
        j = i
        while j + 1 < n and minutes[j + 1] < start + span:
            j += 1
        out.append(Window(start, minutes[j] + MINUTE_MS))
        i = j + 1
    return out


def ohlc_oldest(now_ms: int, window_candles: int, margin: int = OHLC_WINDOW_MARGIN) -> int:
    """The oldest minute an OHLC-window request can still be trusted to return."""
    newest = floor_minute(now_ms)  # the unfinished candle counts towards the window
    return newest - (window_candles - 1 - margin) * MINUTE_MS


def split_by_window(
    minutes: list[int], now_ms: int, window_candles: int | None
) -> tuple[list[int], list[int]]:
    """(candles-endpoint minutes, trades-endpoint minutes) for an exchange's OHLC window."""
    if window_candles is None:
        return minutes, []
    oldest = ohlc_oldest(now_ms, window_candles)
    return [m for m in minutes if m >= oldest], [m for m in minutes if m < oldest]


def trade_windows(minutes: list[int], bridge_minutes: int = TRADES_BRIDGE_MINUTES) -> list[Window]:
    """Trades paging passes: runs of wanted minutes, joined across short gaps."""
    out: list[Window] = []
    for s, e in runs(minutes):
        if out and s - out[-1].end_ms <= bridge_minutes * MINUTE_MS:
            out[-1] = Window(out[-1].start_ms, e, "trades")
        else:
            out.append(Window(s, e, "trades"))
    return out


def plan_windows(
    minutes: list[int], now_ms: int, max_candles: int, window_candles: int | None
) -> list[Window]:
    """Every request window for one pair's wanted minutes, oldest first."""
    recent, old = split_by_window(minutes, now_ms, window_candles)
    cap = min(max_candles, window_candles) if window_candles else max_candles
    windows = trade_windows(old) + batch(recent, cap)
    return sorted(windows, key=lambda w: w.start_ms)


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a plan will cost: requests, budget units and seconds at the limiter's rate."""

    minutes: int
    candle_requests: int
    trades_requests: int
    cost: float
    seconds: float


def estimate(
    wanted: int,
    windows: list[Window],
    cost_candles: float,
    cost_trades: float,
    rate_per_s: float,
) -> Estimate:
    """Requests and time for ``windows`` (Trades pages are a guess: they depend on activity)."""
    candle_req = sum(1 for w in windows if w.kind == "candles")
    trades_req = sum(
        max(1, -(-w.minutes // TRADES_MINUTES_PER_PAGE_GUESS))
        for w in windows
        if w.kind == "trades"
    )
    cost = candle_req * cost_candles + trades_req * cost_trades
    return Estimate(
        minutes=wanted,
        candle_requests=candle_req,
        trades_requests=trades_req,
        cost=cost,
        seconds=cost / rate_per_s if rate_per_s > 0 else 0.0,
    )
