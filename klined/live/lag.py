"""Live lag: how long after its exchange event time a final candle was committed to silver.

Each committed batch adds one sample per candle (commit time minus the candle's ``event_ts``:
Binance's ``E`` of the ``x=true`` event, the evidence's time for a Kraken final). Percentiles are
over the samples of the last ``window_s`` seconds, nearest-rank, computed when asked (the status
feed, a metrics scrape) and cached for a second: at 2,000 finals a minute a five-minute window
holds 10,000 samples, a sort of a few milliseconds. Exchange and machine clocks differ by a few
milliseconds; a sample below zero (an exchange clock ahead of ours) counts as zero.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

#: a summary is recomputed at most this often (seconds)
CACHE_S = 1.0


@dataclass(frozen=True, slots=True)
class LagSummary:
    """Lag percentiles in seconds over the window (``None`` without samples)."""

    samples: int = 0
    p50_s: float | None = None
    p99_s: float | None = None
    max_s: float | None = None


def percentile(ordered: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending, non-empty list (``q`` in (0, 1])."""
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


class LagWindow:
    """Samples (milliseconds) of the commits of the last ``window_s`` seconds."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._batches: deque[tuple[float, list[int]]] = deque()
        self._cached: tuple[float, LagSummary] | None = None

    def add(self, lags_ms: Iterable[int]) -> None:
        """One committed batch's lags."""
        batch = [lag if lag > 0 else 0 for lag in lags_ms]
        if batch:
            self._batches.append((self._clock(), batch))
            self._cached = None

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        while self._batches and self._batches[0][0] < horizon:
            self._batches.popleft()
            self._cached = None

    def summary(self) -> LagSummary:
        now = self._clock()
        self._expire(now)
        if self._cached is not None and now - self._cached[0] < CACHE_S:
            return self._cached[1]
        merged = sorted(lag for _, batch in self._batches for lag in batch)
        if merged:
            result = LagSummary(
                samples=len(merged),
                p50_s=percentile(merged, 0.50) / 1000,
                p99_s=percentile(merged, 0.99) / 1000,
                max_s=merged[-1] / 1000,
            )
        else:
            result = LagSummary()
        self._cached = (now, result)
        return result
