"""What the lake writer does while its disk refuses writes (full, read-only, failing).

Events stay in memory and every flush tries again, so a disk that comes back loses nothing.
This module keeps that bearable and honest:

* **Logs**: one ERROR when writing starts to fail, then a summary at most once a minute (bytes
  and events held, since when, events dropped), one INFO when writing works again. A flush of
  2,000 parts used to log one line per part per flush.
* **A cap** (``lake.max_held_bytes``): past it new events are dropped, never buffered, and the
  exchange, pair and minute of each is counted (:class:`Dropped` ranges). The daemon records
  them as ``lake_dropped`` stream incidents; the chain gap-fills those minutes over REST.
* **Held parts** (:class:`HeldPart`): what is still in memory when the writer closes, as
  complete parts under fresh keys of their hour, so the daemon can upload them straight to S3.
  The part already on disk keeps what was written (a torn last line there, if the disk cut a
  line, is repeated whole in the held part: readers skip the torn copy, nothing is doubled).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec
from loguru import logger

from klined.model import MINUTE_MS, CandleRecord, format_duration, iso

#: the summary of an ongoing write failure is logged at most this often
SUMMARY_INTERVAL_S = 60.0

_RECORD = msgspec.json.Decoder(CandleRecord)


class Dropped(msgspec.Struct, frozen=True):
    """Minutes ``[start_ms, end_ms)`` of one pair whose events the writer dropped."""

    exchange: str
    symbol: str
    start_ms: int
    end_ms: int
    events: int


class HeldPart(msgspec.Struct, frozen=True):
    """Events of one part that never reached the disk, as a complete part of its own."""

    key: str
    data: bytes
    events: int
    exchange: str
    symbol: str

    def minutes(self) -> tuple[int, int]:
        """The first and last minute of its events (for saying what would be lost)."""
        starts = []
        for line in self.data.split(b"\n"):
            if line.strip():
                try:
                    starts.append(_RECORD.decode(line).interval_start)
                except msgspec.DecodeError:
                    continue
        return (min(starts), max(starts)) if starts else (0, 0)


def describe_held(parts: list[HeldPart], limit: int = 5) -> str:
    """``binance BTC/USD 13:05-13:07Z, ... and 3 more`` for a log or error line."""
    items = []
    for part in sorted(parts, key=lambda p: (p.exchange, p.symbol)):
        first, last = part.minutes()
        items.append(f"{part.exchange} {part.symbol} {iso(first)}..{iso(last)}")
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def ranges(minutes: dict[int, int]) -> list[tuple[int, int, int]]:
    """Sorted minute starts (with their event counts) as ``(start, end, events)`` runs."""
    out: list[tuple[int, int, int]] = []
    for minute in sorted(minutes):
        if out and out[-1][1] == minute:
            start, _end, events = out[-1]
            out[-1] = (start, minute + MINUTE_MS, events + minutes[minute])
        else:
            out.append((minute, minute + MINUTE_MS, minutes[minute]))
    return out


class DiskTrouble:
    """The writer's state while writes fail: since when, what to log, what was dropped."""

    def __init__(self, root: str, cap_bytes: int, clock_s: Callable[[], float] = time.monotonic):
        self.root = root
        self.cap_bytes = cap_bytes
        self._clock_s = clock_s
        self.since_ms: int | None = None
        self.last_error = ""
        self._logged_at = 0.0
        self._dropped: dict[tuple[str, str], dict[int, int]] = {}
        self.dropped_events = 0  # since the daemon started
        self._dropped_logged = 0

    @property
    def failing(self) -> bool:
        return self.since_ms is not None

    def drop(self, exchange: str, symbol: str, interval_start: int) -> None:
        """An event not kept: the cap is reached."""
        minutes = self._dropped.setdefault((exchange, symbol), {})
        minute = interval_start - interval_start % MINUTE_MS
        minutes[minute] = minutes.get(minute, 0) + 1
        self.dropped_events += 1

    def take_dropped(self, before_ms: int | None = None) -> list[Dropped]:
        """Dropped minutes starting before ``before_ms`` (all without it), forgotten here."""
        out: list[Dropped] = []
        for (exchange, symbol), minutes in list(self._dropped.items()):
            due = {m: n for m, n in minutes.items() if before_ms is None or m < before_ms}
            for m in due:
                del minutes[m]
            if not minutes:
                del self._dropped[(exchange, symbol)]
            out += [Dropped(exchange, symbol, a, b, n) for a, b, n in ranges(due)]
        return out

    def give_back(self, dropped: list[Dropped]) -> None:
        """Ranges that could not be recorded yet: keep them for the next try."""
        for d in dropped:
            minutes = self._dropped.setdefault((d.exchange, d.symbol), {})
            first = True
            for m in range(d.start_ms, d.end_ms, MINUTE_MS):
                minutes[m] = minutes.get(m, 0) + (d.events if first else 0)
                first = False

    def failed(self, error: BaseException, held_bytes: int, held_events: int, now_ms: int) -> None:
        """A flush could not write everything (call once per flush)."""
        self.last_error = f"{type(error).__name__}: {error}"
        now = self._clock_s()
        if self.since_ms is None:
            self.since_ms = now_ms
            self._logged_at = now
            logger.error(
                "lake: cannot write to {} ({}); holding events in memory (up to {:,} bytes) "
                "and retrying every flush",
                self.root,
                self.last_error,
                self.cap_bytes,
            )
            return
        if now - self._logged_at >= SUMMARY_INTERVAL_S:
            self._logged_at = now
            dropped = self.dropped_events - self._dropped_logged
            self._dropped_logged = self.dropped_events
            logger.warning(
                "lake: still cannot write to {} since {} ({}): {:,} bytes, {:,} events held in "
                "memory{}: {}",
                self.root,
                iso(self.since_ms),
                format_duration((now_ms - self.since_ms) / 1000),
                held_bytes,
                held_events,
                f"; {dropped:,} events dropped past lake.max_held_bytes (recorded for gap-fill)"
                if dropped
                else "",
                self.last_error,
            )

    def recovered(self, now_ms: int) -> None:
        """Everything held was written."""
        if self.since_ms is None:
            return
        logger.info(
            "lake: writing to {} again after {}; every held event is written",
            self.root,
            format_duration((now_ms - self.since_ms) / 1000),
        )
        self.since_ms = None
        self.last_error = ""
