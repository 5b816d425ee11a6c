"""One REST rate limiter per exchange, shared by the gap-filler and every backfill worker.

The arithmetic (:class:`WindowBudget` for Binance's fixed 1-minute weight window,
:class:`DecayBudget` for Kraken's decaying call counter) is pure: it takes ``now`` as an
argument and answers "granted" or "wait this long", so it is unit-testable with hypothesis and
never sleeps. :class:`RateLimiter` puts a clock, a FIFO lock and ``anyio.sleep`` around it.

Rules it enforces:

* Only ``rate_limit_fraction`` of the documented budget is ever used.
* The server is believed when it reports more weight used than we counted (Binance
  ``X-MBX-USED-WEIGHT-1M``), never when it reports less.
* A 429 pauses the whole exchange for Retry-After, not just the one request; a 418 (a ban) is a
  bug in this limiter: it is logged loudly and the exchange is stopped for Retry-After.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from loguru import logger

from klined.exchanges.base import RestBudget

#: Upper bound of the pause when a refusal carries no Retry-After (seconds); the budget's own
#: cool-down (the rest of the window; one call's decay) is used when shorter.
DEFAULT_RETRY_AFTER_S = 5.0


# ---------------------------------------------------------------------------------------------
# pure maths


class WindowBudget:
    """A fixed window of ``capacity`` weight per ``window_s`` seconds, aligned to the epoch.

    Binance counts weight per calendar minute on its own clock; aligning our windows to the
    epoch makes our windows its windows (up to clock skew, which the headroom left by
    ``rate_limit_fraction`` and the header sync absorb).

    Requests still in flight when a window rolls over may be counted by the server in the new
    window, so their cost is carried into it: slightly conservative, never over budget.
    """

    kind = "weight"

    def __init__(self, capacity: float, window_s: float) -> None:
        if capacity <= 0 or window_s <= 0:
            raise ValueError("capacity and window_s must be positive")
        self.capacity = capacity
        self.window_s = window_s
        self.window = -1  # index of the current window
        self.used = 0.0
        self.in_flight: dict[int, float] = {}  # window index -> cost reserved, not answered
        self.paused_until = 0.0

    def _roll(self, now: float) -> None:
        index = math.floor(now / self.window_s)
        if index > self.window:
            self.window = index
            self.used = sum(self.in_flight.values())

    def reserve(self, cost: float, now: float) -> float:
        """Take ``cost`` now and return 0.0, or return how many seconds to wait first."""
        if now < self.paused_until:
            return self.paused_until - now
        self._roll(now)
        # A request dearer than the whole budget may go into an empty window (never forever).
        if self.used + cost <= self.capacity or self.used == 0:
            self.used += cost
            self.in_flight[self.window] = self.in_flight.get(self.window, 0.0) + cost
            return 0.0
        return (self.window + 1) * self.window_s - now

    def ticket(self) -> int:
        """The window the last granted reservation was taken in."""
        return self.window

    def done(self, ticket: int, cost: float, used_weight: float | None, now: float) -> None:
        """A response arrived: stop carrying its cost and believe the server if it says more."""
        self._roll(now)  # first: the server may have counted it in a window that began since
        if ticket in self.in_flight:
            left = self.in_flight[ticket] - cost
            if left > 1e-9:
                self.in_flight[ticket] = left
            else:
                del self.in_flight[ticket]
        # The header counts the window the server processed the request in; only when that is
        # surely our current window can we compare it with our count.
        if used_weight is not None and ticket == self.window and used_weight > self.used:
            self.used = used_weight

    def exhaust(self, now: float) -> None:
        """The server said we are over: the rest of this window is spent."""
        self._roll(now)
        self.used = max(self.used, self.capacity)

    def pause(self, until: float) -> None:
        self.paused_until = max(self.paused_until, until)

    def cooldown_s(self, now: float) -> float:
        """How long a refusal without Retry-After should stop us: the rest of the window."""
        return max(0.0, (math.floor(now / self.window_s) + 1) * self.window_s - now)

    def rate_per_s(self) -> float:
        return self.capacity / self.window_s


class DecayBudget:
    """Kraken's counter: each call adds its cost, the counter decays by ``decay_per_s`` per
    second and must never exceed ``capacity``."""

    kind = "decay"

    def __init__(self, capacity: float, decay_per_s: float) -> None:
        if capacity <= 0 or decay_per_s <= 0:
            raise ValueError("capacity and decay_per_s must be positive")
        self.capacity = capacity
        self.decay_per_s = decay_per_s
        self.level = 0.0
        self.at = -math.inf
        self.paused_until = 0.0

    def _decay(self, now: float) -> None:
        if now > self.at:
            if self.at > -math.inf:
                self.level = max(0.0, self.level - (now - self.at) * self.decay_per_s)
            self.at = now

    def reserve(self, cost: float, now: float) -> float:
        if now < self.paused_until:
            return self.paused_until - now
        self._decay(now)
        if self.level + cost <= self.capacity + 1e-9 or self.level == 0:
            self.level += cost
            return 0.0
        # a hair more than exact, so float rounding never lands us a microsecond early
        return (self.level + cost - self.capacity) / self.decay_per_s + 1e-6

    def ticket(self) -> int:
        return 0

    def done(self, ticket: int, cost: float, used_weight: float | None, now: float) -> None:
        """Kraken reports nothing about its counter; nothing to sync."""

    def exhaust(self, now: float) -> None:
        self._decay(now)
        self.level = max(self.level, self.capacity)

    def pause(self, until: float) -> None:
        self.paused_until = max(self.paused_until, until)

    def cooldown_s(self, now: float) -> float:
        """How long a refusal without Retry-After should stop us: one call's worth of decay
        (our counter is also set full, so calls then resume at the steady rate)."""
        return 1.0 / self.decay_per_s

    def rate_per_s(self) -> float:
        return self.decay_per_s


Budget = WindowBudget | DecayBudget


def make_budget(budget: RestBudget, fraction: float = 1.0) -> Budget:
    """The pure budget for an exchange's documented limits, scaled to our share of them."""
    if not 0 < fraction <= 1:
        raise ValueError(f"rate_limit_fraction must be in (0, 1], got {fraction}")
    if budget.kind == "weight":
        return WindowBudget(budget.capacity * fraction, budget.window_s)
    if budget.kind == "decay":
        # Our share of a decaying counter: a smaller ceiling and a slower steady rate.
        return DecayBudget(budget.capacity * fraction, budget.decay_per_s * fraction)
    raise ValueError(f"unknown budget kind {budget.kind!r}")


def backoff_delay(
    attempt: int, initial: float, cap: float, rng: random.Random | None = None
) -> float:
    """Capped exponential backoff with "equal jitter": in [d/2, d], d = min(cap, initial*2^n).

    Half the delay is guaranteed (so a storm of retries really does slow down), half is random
    (so concurrent workers do not retry in lockstep).
    """
    r = rng or random
    d = min(cap, initial * (2 ** max(0, attempt)))
    return d / 2 + r.random() * d / 2


# ---------------------------------------------------------------------------------------------
# the async limiter


@dataclass(slots=True)
class LimiterStats:
    """Counters shown in the backfill progress line and the bench output."""

    requests: int = 0
    cost: float = 0.0
    waits: int = 0
    wait_s: float = 0.0
    throttled: int = 0  # 429s / "too many requests" replies
    banned: int = 0  # 418s: must stay zero
    retries: int = 0  # 5xx, timeouts, transport errors
    events: list[str] = field(default_factory=list)  # last few throttling events, for display

    def note(self, text: str) -> None:
        self.events.append(text)
        del self.events[:-5]


@dataclass(slots=True)
class Slot:
    """One granted reservation, handed back with the response."""

    cost: float
    ticket: int
    used_weight: float | None = None


class RateLimiter:
    """The async face of a budget: FIFO waiting, pauses, server sync, statistics.

    One instance per exchange per process (see :func:`shared_limiter`); every coroutine that
    calls the exchange's REST API goes through :meth:`slot`.
    """

    def __init__(
        self,
        exchange: str,
        budget: Budget,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.exchange = exchange
        self.budget = budget
        self.clock = clock
        self.sleep = sleep
        self.stats = LimiterStats()
        self._lock = anyio.Lock()

    @classmethod
    def for_limits(cls, exchange: str, budget: RestBudget, fraction: float) -> RateLimiter:
        return cls(exchange, make_budget(budget, fraction))

    async def acquire(self, cost: float) -> Slot:
        """Wait (FIFO with the other callers) until ``cost`` fits in the budget, then take it."""
        async with self._lock:
            while True:
                wait = self.budget.reserve(cost, self.clock())
                if wait <= 0:
                    break
                self.stats.waits += 1
                self.stats.wait_s += wait
                await self.sleep(wait)
            self.stats.requests += 1
            self.stats.cost += cost
            return Slot(cost, self.budget.ticket())

    def release(self, slot: Slot) -> None:
        """The request finished (any outcome); sync with what the server reported."""
        self.budget.done(slot.ticket, slot.cost, slot.used_weight, self.clock())

    @asynccontextmanager
    async def slot(self, cost: float) -> AsyncIterator[Slot]:
        """``async with limiter.slot(cost) as s: ...; s.used_weight = header``."""
        s = await self.acquire(cost)
        try:
            yield s
        finally:
            self.release(s)

    def throttle(self, retry_after: float | None, *, banned: bool = False, why: str = "") -> float:
        """The exchange said stop: pause every request to it for Retry-After seconds."""
        now = self.clock()
        if retry_after is not None and retry_after > 0:
            delay = retry_after  # the server knows when it will take calls again: believe it
        else:
            # no hint: assume our whole budget is spent and wait for it to come back
            delay = min(DEFAULT_RETRY_AFTER_S, max(0.05, self.budget.cooldown_s(now)))
            self.budget.exhaust(now)
        self.budget.pause(now + delay)
        if banned:
            self.stats.banned += 1
            self.stats.note(f"418 ban {delay:.0f}s")
            logger.critical(
                "{}: REST ban (HTTP 418) despite the rate limiter - this is a bug; "
                "stopping all {} REST calls for {:.0f}s {}",
                self.exchange,
                self.exchange,
                delay,
                why,
            )
        else:
            self.stats.throttled += 1
            self.stats.note(f"429 pause {delay:.1f}s")
            logger.warning(
                "{}: rate limited by the exchange, pausing REST for {:.1f}s {}",
                self.exchange,
                delay,
                why,
            )
        return delay

    @property
    def paused_until(self) -> float:
        return self.budget.paused_until

    def rate_per_s(self) -> float:
        """Budget units per second this limiter allows in the steady state."""
        return self.budget.rate_per_s()


_SHARED: dict[tuple[str, str], RateLimiter] = {}


def shared_limiter(
    exchange: str, rest_url: str, budget: RestBudget, fraction: float
) -> RateLimiter:
    """The process-wide limiter for one exchange endpoint (created on first use).

    The daemon's gap-filler and every backfill worker in this process share it, so together
    they stay within one budget. Keyed by URL too, so two simulators in one test process do not
    share a budget with each other or with the real exchange.
    """
    key = (exchange, rest_url)
    limiter = _SHARED.get(key)
    if limiter is None:
        limiter = _SHARED[key] = RateLimiter.for_limits(exchange, budget, fraction)
    return limiter
