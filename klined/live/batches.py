"""Micro-batches of final candles and the bounded queue that holds them until committed.

Pure and synchronous (the writer drives it from the event loop). A :class:`Batch` keeps only the
values silver needs, not the captured frame, so a queue full of batches costs a few hundred
bytes per candle. The :class:`BatchQueue` holds at most ``max_batches``; putting one more drops
the oldest, which the caller counts and reports: the live path may shed work under pressure,
the hourly chain fills those minutes from the lake.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from klined.model import CandleRecord

#: the fields of a candle the live upsert writes (``klined.jobs.silver.upsert_candles``)
_FIELDS = (
    "exchange", "symbol", "native_symbol", "interval_start", "open", "high", "low", "close",
    "volume", "quote_volume", "vwap", "trade_count", "is_final", "origin", "session_id",
    "event_ts", "ingestion_ts", "interval_seconds",
)  # fmt: skip
_VALUES = operator.attrgetter(*_FIELDS)


def compact(candle: CandleRecord) -> CandleRecord:
    """The candle without its raw payload (which may hold the whole frame alive)."""
    return CandleRecord(*_VALUES(candle))


@dataclass(slots=True)
class Batch:
    """Finals cut together: the candles and the lake's append count after the last of them
    (the batch is written only once the lake has made that much durable)."""

    candles: list[CandleRecord]
    lake_mark: int = 0
    cut_ms: int = 0

    def __len__(self) -> int:
        return len(self.candles)


@dataclass(slots=True)
class Dropped:
    """Batches the queue let go of."""

    batches: int = 0
    candles: int = 0


@dataclass(slots=True)
class BatchQueue:
    """A FIFO of at most ``max_batches`` batches; beyond it the oldest are dropped."""

    max_batches: int
    _items: deque[Batch] = field(default_factory=deque)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def candles(self) -> int:
        return sum(len(b) for b in self._items)

    def put(self, batch: Batch) -> Dropped:
        self._items.append(batch)
        return self._trim()

    def take(self, max_candles: int) -> list[Batch]:
        """The oldest batches, as many as fit in ``max_candles`` (at least one)."""
        taken: list[Batch] = []
        total = 0
        while self._items and (not taken or total + len(self._items[0]) <= max_candles):
            batch = self._items.popleft()
            taken.append(batch)
            total += len(batch)
        return taken

    def put_back(self, batches: Iterable[Batch]) -> Dropped:
        """Return batches a failed commit took, at the front (they are still the oldest)."""
        self._items.extendleft(reversed(list(batches)))
        return self._trim()

    def _trim(self) -> Dropped:
        dropped = Dropped()
        while len(self._items) > self.max_batches:
            oldest = self._items.popleft()
            dropped.batches += 1
            dropped.candles += len(oldest)
        return dropped
