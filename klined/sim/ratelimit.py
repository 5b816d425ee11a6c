"""REST rate limits enforced the way the exchanges do, on wall time.

Binance meters request *weight* in fixed windows aligned to the clock (1200 per minute), reports
the use in ``X-MBX-USED-WEIGHT-1M``, answers 429 with ``Retry-After`` past the limit, and bans
with 418 (a longer ``Retry-After``, doubling on repeat) a client that keeps sending after a 429.
Kraken keeps a call counter per client that each public call raises by 1, that decays by 0.33
per second and must stay at or below 15; past it the answer is ``EGeneral:Too many requests``.

``scale`` multiplies the budgets (``0.01``: Binance allows 12 weight a minute, so a test hits
429 quickly); ``time_scale`` compresses the windows, decay and ban durations (``60``: the
Binance window lasts one wall second).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BINANCE_WEIGHT_PER_MINUTE = 1200
BINANCE_WEIGHTS = {
    "/api/v3/ping": 1,
    "/api/v3/time": 1,
    "/api/v3/exchangeInfo": 20,
    "/api/v3/klines": 2,
}
BINANCE_BAN_S = 120.0
BINANCE_BAN_MAX_S = 3 * 86_400.0
KRAKEN_COUNTER_MAX = 15.0
KRAKEN_DECAY_PER_S = 0.33


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    status: int = 200  # 429 or 418 when refused (Binance)
    used: int = 0  # Binance weight used in the current window
    retry_after_s: int = 0


class BinanceWeightLimiter:
    """Fixed-window weight budget with 429 and escalating 418 bans."""

    def __init__(
        self,
        capacity: float = BINANCE_WEIGHT_PER_MINUTE,
        window_s: float = 60.0,
        *,
        ban_after: int = 2,
        ban_s: float = BINANCE_BAN_S,
        time_fn: Callable[[], float] = time.time,
    ) -> None:
        self.capacity = max(1, int(capacity))
        self.window_s = window_s
        self.ban_after = ban_after
        self.ban_s = ban_s
        self._time = time_fn
        self._window = -1
        self.used = 0
        self._limited_until = 0.0
        self._violations = 0
        self._banned_until = 0.0
        self._next_ban_s = ban_s

    def check(self, weight: int) -> Verdict:
        now = self._time()
        window = math.floor(now / self.window_s)
        if window != self._window:
            self._window, self.used = window, 0
        if now < self._banned_until:
            return Verdict(False, 418, self.used, max(1, math.ceil(self._banned_until - now)))
        self.used += weight
        if self.used <= self.capacity:
            return Verdict(True, 200, self.used)
        window_end = (window + 1) * self.window_s
        # a request over the limit while a 429 is still in force: the client is not backing off
        self._violations = self._violations + 1 if now < self._limited_until else 0
        self._limited_until = window_end
        if self._violations >= self.ban_after:
            ban = self._next_ban_s
            self._next_ban_s = min(ban * 2, BINANCE_BAN_MAX_S)
            self._banned_until = now + ban
            self._violations = 0
            return Verdict(False, 418, self.used, max(1, math.ceil(ban)))
        return Verdict(False, 429, self.used, max(1, math.ceil(window_end - now)))

    @property
    def banned_until(self) -> float:
        return self._banned_until


class KrakenCounterLimiter:
    """Kraken's decaying call counter."""

    def __init__(
        self,
        capacity: float = KRAKEN_COUNTER_MAX,
        decay_per_s: float = KRAKEN_DECAY_PER_S,
        *,
        time_fn: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = capacity
        self.decay_per_s = decay_per_s
        self._time = time_fn
        self.level = 0.0
        self._t = time_fn()

    def check(self, cost: float = 1.0) -> Verdict:
        now = self._time()
        self.level = max(0.0, self.level - (now - self._t) * self.decay_per_s)
        self._t = now
        if self.level + cost > self.capacity:
            wait = (self.level + cost - self.capacity) / self.decay_per_s
            return Verdict(False, 200, 0, max(1, math.ceil(wait)))
        self.level += cost
        return Verdict(True)


def rate_limit_body(status: int, limiter_capacity: int, banned_until_ms: int) -> dict[str, Any]:
    if status == 418:
        return {
            "code": -1003,
            "msg": f"Way too many requests; IP(127.0.0.1) banned until {banned_until_ms}. "
            "Please use the websocket for live updates to avoid bans.",
        }
    return {
        "code": -1003,
        "msg": f"Too many requests; current limit of IP(127.0.0.1) is {limiter_capacity} requests "
        "per minute. Please use the websocket for live updates to avoid polling the API.",
    }
