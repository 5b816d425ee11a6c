"""The hour in progress, so far: one line of the Completeness view.

Closed hours are the grid's (``monitoring.hourly_completeness``, written by the chain); this
line is ``monitoring.current_hour_completeness``: minutes with a final answer out of the
minutes elapsed, per exchange. With the live path on it fills minute by minute.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.widgets import Static

from klined.model import MINUTE_MS, to_datetime
from klined.tui.sources import HourSoFar
from klined.tui.widgets.bars import rate_text

_DIM = "#8b949e"


def fmt_hm(ms: int) -> str:
    return to_datetime(ms).strftime("%H:%M")


def so_far_text(rows: Sequence[HourSoFar]) -> Text:
    """``so far 13:00-13:47 │ binance 100.0% │ kraken 98.6% -28m`` (the hour in progress)."""
    text = Text()
    if not rows:
        text.append("hour in progress: no configured pairs yet", style=_DIM)
        return text
    first = rows[0]
    text.append("so far ", style="bold")
    start = first.hour_ms
    until = start + first.minutes_elapsed * MINUTE_MS
    text.append(f"{fmt_hm(start)}-{fmt_hm(until)}", style=_DIM)
    for r in rows:
        text.append(" │ ", style=_DIM)
        text.append(f"{r.exchange} ", style="bold")
        text.append_text(rate_text(r.rate, 0))
        short = r.expected - r.final
        if short > 0:
            text.append(f" -{short}m", style=_DIM)
    return text


class SoFarLine(Static):
    """``show(rows)`` after each warehouse poll; ``show_failed()`` keeps the last line."""

    DEFAULT_CSS = """
    SoFarLine {
        height: 1;
        padding: 0 1;
    }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(Text("hour in progress: loading…", style=_DIM), **kwargs)  # type: ignore[arg-type]
        self.loaded = False

    def show(self, rows: Sequence[HourSoFar]) -> None:
        self.loaded = True
        self.update(so_far_text(rows))

    def show_failed(self) -> None:
        if not self.loaded:
            self.update(Text("hour in progress: the database cannot be read", style=_DIM))
