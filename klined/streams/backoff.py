"""Capped, jittered exponential backoff, in the manner of ``websockets``' ``backoff()``.

``websockets``' own reconnect iterator resets its delays as soon as a handshake succeeds; an
exchange that accepts the connection and then drops it (bad subscription, overload) would then
be hammered at the initial delay. :class:`Backoff` keeps the series going until the caller says
the connection was healthy (:meth:`Backoff.reset`), which the stream runtime does only after a
subscription was acknowledged and data flowed for a while.
"""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff_delays(
    initial_s: float = 1.0,
    max_s: float = 60.0,
    factor: float = 2.0,
    rng: random.Random | None = None,
) -> Iterator[float]:
    """Delays for successive retries: ``initial * factor**n`` capped at ``max_s``, jittered.

    Each delay is drawn uniformly from ``[d/2, d]`` ("equal jitter"): never zero, so a fleet
    of clients that lost the same server does not come back in one burst, and never above the
    cap, so the cap is an honest promise.
    """
    draw = (rng or random).uniform
    delay = min(initial_s, max_s)
    while True:
        yield draw(delay / 2, delay)
        delay = min(delay * factor, max_s)


class Backoff:
    """A resettable :func:`backoff_delays` series."""

    def __init__(
        self,
        initial_s: float = 1.0,
        max_s: float = 60.0,
        factor: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        if initial_s <= 0 or max_s < initial_s or factor < 1:
            raise ValueError("backoff needs 0 < initial_s <= max_s and factor >= 1")
        self.initial_s = initial_s
        self.max_s = max_s
        self.factor = factor
        self._rng = rng
        self.attempts = 0
        self._delays = backoff_delays(initial_s, max_s, factor, rng)

    def next(self) -> float:
        """The delay before the next attempt."""
        self.attempts += 1
        return next(self._delays)

    def at_max(self) -> float:
        """A delay at the cap (jittered), for errors that only a slow retry may fix."""
        self.attempts += 1
        return (self._rng or random).uniform(self.max_s / 2, self.max_s)

    def reset(self) -> None:
        """Start again from the initial delay (after a healthy connection)."""
        self.attempts = 0
        self._delays = backoff_delays(self.initial_s, self.max_s, self.factor, self._rng)
