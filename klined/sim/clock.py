"""The simulator's clock: sim time runs from ``start_ms`` at ``speed`` times wall time.

Real-time mode is ``SimClock(now, 1.0)``; an accelerated clock (``speed=60``: one sim minute
per wall second) lets tests cross minute and hour boundaries quickly. Market-level times (kline
pushes, finals, trades) follow the sim clock; connection-level timers (server pings,
connection lifetime, Kraken heartbeats, stalls, rate-limit windows) run on wall time, because
that is what clients time their watchdogs and back-offs with.
"""

from __future__ import annotations

import time

import anyio


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class SimClock:
    """``sim_now = start_ms + (wall - wall0) * speed``, with ``wall0`` taken at construction."""

    def __init__(self, start_ms: int | None = None, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError("speed must be > 0")
        self.start_ms = wall_ms() if start_ms is None else int(start_ms)
        self.speed = float(speed)
        self._mono0 = time.monotonic()

    @classmethod
    def realtime(cls) -> SimClock:
        return cls(None, 1.0)

    def now_ms(self) -> int:
        return self.start_ms + int((time.monotonic() - self._mono0) * 1000.0 * self.speed)

    def wall_delay_s(self, sim_ms: int) -> float:
        """Wall seconds until the sim clock reaches ``sim_ms`` (0 if already past)."""
        return max(0.0, (sim_ms - self.now_ms()) / 1000.0 / self.speed)

    async def sleep_until(self, sim_ms: int) -> None:
        delay = self.wall_delay_s(sim_ms)
        if delay > 0:
            await anyio.sleep(delay)

    def __repr__(self) -> str:
        return f"SimClock(start_ms={self.start_ms}, speed={self.speed}, now={self.now_ms()})"
