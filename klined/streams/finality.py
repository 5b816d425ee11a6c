"""Kraken candle finality from evidence on one connection (docs/architecture.md, finality).

Kraken's OHLC channel never says a minute is over. The last update of a minute is proven final
only when the *same connection* later delivers a newer ``interval_begin`` for that pair, or any
message stamped by the exchange at or after that minute's end (messages on one connection are
ordered, so nothing older can follow). The tracker holds the latest update of each pair's
current minute and, on such evidence, emits it again with ``is_final=True``: same values, same
``session_id``, the evidence's ``event_ts``. A connection cut mid-minute simply drops the
tracker: that minute stays non-final and the gap-filler replaces it from REST.

Pure and synchronous: the runtime feeds it frames in arrival order, one tracker per connection.
"""

from __future__ import annotations

import msgspec

from klined.model import Candle


class FinalityTracker:
    """Per connection, per pair: the held update of the current minute and the last final."""

    __slots__ = ("_earliest_end", "_finalized", "_held")

    def __init__(self) -> None:
        self._held: dict[str, Candle] = {}
        # a lower bound of the held candles' minute ends: a frame stamped before it cannot
        # prove anything, so the common case (a frame inside the current minute) costs O(1)
        self._earliest_end = _NEVER
        # newest minute start already proven final, per pair: later updates of it (or of older
        # minutes) arrived out of order and prove nothing
        self._finalized: dict[str, int] = {}

    @property
    def held(self) -> dict[str, Candle]:
        """The pending (not yet proven) update per pair; read-only view for status and tests."""
        return dict(self._held)

    def last_final(self, symbol: str) -> int | None:
        return self._finalized.get(symbol)

    def observe(
        self, candles: list[Candle], stamp_ms: int | None, received_ms: int
    ) -> list[Candle]:
        """Feed one frame's candles (as the adapter parsed them); return the proven finals.

        ``stamp_ms`` is the exchange's timestamp of the frame (``Frame.stamp_ms`` or a
        heartbeat's), ``received_ms`` when klined received it (the finals' ``ingestion_ts``).
        The caller writes the frame's own candles unchanged, then the returned finals.
        """
        finals: list[Candle] = []
        if stamp_ms is not None and stamp_ms >= self._earliest_end:
            newest: dict[str, int] = {}
            for c in candles:
                if c.interval_start > newest.get(c.symbol, -1):
                    newest[c.symbol] = c.interval_start
            for symbol, pending in list(self._held.items()):
                # a frame that also updates the held minute carries newer values for it: the
                # frame's update replaces the held one and waits for evidence of its own
                if (
                    pending.interval_end <= stamp_ms
                    and newest.get(symbol, -1) < pending.interval_start
                ):
                    finals.append(self._finalize(pending, stamp_ms, received_ms))
            self._earliest_end = min((c.interval_end for c in self._held.values()), default=_NEVER)
        if not candles:
            return finals
        ordered = candles if len(candles) == 1 else sorted(candles, key=_minute)
        for candle in ordered:
            symbol = candle.symbol
            done = self._finalized.get(symbol)
            if done is not None and candle.interval_start <= done:
                continue
            held = self._held.get(symbol)
            if held is None or candle.interval_start > held.interval_start:
                if held is not None:
                    evidence = candle.event_ts or stamp_ms or received_ms
                    finals.append(self._finalize(held, evidence, received_ms))
                self._held[symbol] = candle
                end = candle.interval_end
                if end < self._earliest_end:
                    self._earliest_end = end
            elif candle.interval_start == held.interval_start:
                self._held[symbol] = candle
            # else: an update older than the held minute, delivered after it: proves nothing
        return finals

    def _finalize(self, held: Candle, evidence_ms: int, received_ms: int) -> Candle:
        symbol = held.symbol
        del self._held[symbol]
        self._finalized[symbol] = held.interval_start
        return msgspec.structs.replace(
            held, is_final=True, event_ts=evidence_ms, ingestion_ts=received_ms
        )


_NEVER = 1 << 62


def _minute(candle: Candle) -> int:
    return candle.interval_start
