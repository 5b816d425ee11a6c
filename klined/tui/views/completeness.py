"""Completeness view: for every exchange/pair, was every minute of every recent hour captured?

One table, one row per exchange/pair, one two-character column per hour. With few pairs each
cell is a three-line stacked bar of where the hour's 60 minutes came from (ws_final, rest,
archive, trades, no_trades, ws_partial, missing - the Looker chart, sideways in time); with
many pairs (or on ``v``) it is a one-line heat map that stays readable with hundreds of pairs.
An hour the chain has not processed yet is hatched (pending: its minutes count as missing),
apart from red (processed, missing) and from ``·`` (no row: the pair was not covered then).
The table opens on the newest hours (a 72 h window is wider than 80 columns); the cell cursor
picks an hour and the line below the table spells out its counts. ``o`` switches the order of
the pairs (worst first, or by name) and the header says which one is shown.
"""

from __future__ import annotations

from typing import ClassVar

from rich.console import RenderableType
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable, Static

from klined.model import HOUR_MS, to_datetime
from klined.tui.present import (
    WINDOWS,
    PairHours,
    exchange_rates,
    fmt_hour,
    fmt_pct,
    group_pairs,
    pending_hours,
    window_hours,
)
from klined.tui.sources import HourCompleteness
from klined.tui.widgets.bars import (
    HEAT_COLOR,
    counts_text,
    heat_cell,
    legend,
    rate_text,
    stacked_bar,
)
from klined.tui.widgets.live_table import LiveTable
from klined.tui.widgets.so_far import SoFarLine

#: above this many pairs the automatic mode draws heat-map lines instead of bars
BARS_MAX_PAIRS = 40
BAR_ROWS = 3
FIXED = 3  # exchange, pair, rate
FIXED_WIDTH = 9 + 13 + 6
#: hour columns are 2 to 4 characters wide: wider terminals get wider bars
MIN_CELL, MAX_CELL = 2, 4
_DIM = "#8b949e"


def _hour_label(hour_ms: int, width: int) -> str:
    """Every hour is labelled when columns are wide; every third one when labels would touch."""
    hour = to_datetime(hour_ms).hour
    return f"{hour:02d}" if width > 2 or hour % 3 == 0 else ""


class CompletenessView(Vertical):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("v", "toggle_mode", "Bars/heat"),
        Binding("left_square_bracket", "window(-1)", "Fewer hours"),
        Binding("right_square_bracket", "window(1)", "More hours"),
        Binding("o", "toggle_order", "Order"),
    ]

    def __init__(self, hours: int = 24, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.hours = hours
        self.mode = "auto"  # auto | bars | heat
        self.worst_first = True
        self.rows: list[HourCompleteness] = []
        self.loaded = False
        self.failed = False
        self.now_ms = 0
        self.window: list[int] = []
        self.pairs: list[PairHours] = []
        self._layout: tuple[tuple[int, ...], bool, int] | None = None

    def compose(self) -> ComposeResult:
        yield Static("", id="exchange-rates", classes="one-line")
        yield SoFarLine(id="so-far", classes="one-line")
        yield Static("", id="legend", classes="one-line")
        yield LiveTable(
            id="grid",
            cursor_type="cell",
            cell_padding=0,
            fixed_columns=FIXED,
            cursor_foreground_priority="css",
            cursor_background_priority="css",
        )
        yield Static("", id="grid-detail", classes="one-line")

    @property
    def grid(self) -> LiveTable:
        return self.query_one("#grid", LiveTable)

    def cell_width(self) -> int:
        """As wide as the terminal allows, so 160 columns show fatter, easier bars."""
        width = self.size.width or self.app.size.width
        room = (width - FIXED_WIDTH - 2) // max(self.hours, 1)
        return max(MIN_CELL, min(MAX_CELL, room))

    def on_resize(self) -> None:
        if self._layout is not None and self._layout[2] != self.cell_width():
            self._render_all()

    @property
    def heat(self) -> bool:
        if self.mode == "auto":
            return len(self.pairs) > BARS_MAX_PAIRS
        return self.mode == "heat"

    # -- data -----------------------------------------------------------------------------------

    def on_mount(self) -> None:
        self._render_detail()

    def show(self, rows: list[HourCompleteness], now_ms: int) -> None:
        self.rows, self.now_ms, self.loaded, self.failed = rows, now_ms, True, False
        self._render_all()

    def show_failed(self, now_ms: int) -> None:
        """The database could not be read: keep what is shown, say so if nothing is."""
        self.failed = True
        if not self.loaded:
            self.now_ms = now_ms
            self._render_all()  # the empty grid still shows which hours it is about
        else:
            self._render_detail()

    def since_until(self, now_ms: int) -> tuple[int, int]:
        """The hour range the app should load for the current window."""
        hours = window_hours(now_ms, self.hours)
        return hours[0], hours[-1] + HOUR_MS

    def _render_all(self) -> None:
        self.window = window_hours(self.now_ms, self.hours)
        inside = set(self.window)
        rows = [r for r in self.rows if r.hour_ms in inside]
        self.pairs = group_pairs(rows, worst_first=self.worst_first)
        heat = self.heat
        width = self.cell_width()
        layout = (tuple(self.window), heat, width)
        grid = self.grid
        rebuilt = layout != self._layout or grid.row_count == 0
        with self.app.batch_update():
            if layout != self._layout:
                self._layout = layout
                columns: list[tuple[str, str, int | None]] = [
                    ("exchange", "exchange", 9),
                    ("pair", "pair", 13),
                    ("rate", " rate ", 6),
                ]
                columns += [(f"h{h}", _hour_label(h, width), width) for h in self.window]
                grid.set_columns(columns)
            table_rows: list[tuple[str, list[RenderableType]]] = []
            for ph in self.pairs:
                cells: list[RenderableType] = [
                    Text(ph.exchange),
                    Text(ph.symbol, style="bold"),
                    rate_text(ph.rate, 5) + Text(" "),
                ]
                if heat:
                    cells += [heat_cell(ph.hours.get(h), width) for h in self.window]
                else:
                    cells += [stacked_bar(ph.hours.get(h), BAR_ROWS, width) for h in self.window]
                table_rows.append((ph.key, cells))
            grid.sync(table_rows, height=1 if heat else BAR_ROWS)
            if rebuilt and table_rows:
                # on the newest hour, scrolled so the newest hours show: a wide window does
                # not fit the screen, and the recent hours are what an operator looks at
                row = min(grid.cursor_row, len(table_rows) - 1) if grid.cursor_row >= 0 else 0
                grid.move_cursor(row=row, column=FIXED + len(self.window) - 1, animate=False)
                self.call_after_refresh(self._scroll_to_newest)
            self._render_header(rows)
            self._render_detail()

    def _scroll_to_newest(self) -> None:
        grid = self.grid
        grid.scroll_to(x=grid.max_scroll_x, animate=False)

    def _render_header(self, rows: list[HourCompleteness]) -> None:
        text = Text(no_wrap=True, overflow="ellipsis")
        if self.window:
            text.append(f"{self.hours}h", style="bold")
            text.append(f" to {fmt_hour(self.window[-1] + HOUR_MS)}", style=_DIM)
            text.append(" · worst first" if self.worst_first else " · by name", style=_DIM)
        pending = pending_hours(rows)
        if pending:
            text.append(" │ ", style=_DIM)
            text.append(f"{pending}h pending", style=HEAT_COLOR["pending"])
        for exchange, (complete, expected) in exchange_rates(rows).items():
            text.append(" │ ", style=_DIM)
            text.append(f"{exchange} ", style="bold")
            text.append_text(rate_text(complete / expected if expected else None, 0))
            if expected > complete:
                text.append(f" -{expected - complete}m", style=_DIM)
        self.query_one("#exchange-rates", Static).update(text)
        self.query_one("#legend", Static).update(legend(self.heat))

    def _render_detail(self) -> None:
        detail = self.query_one("#grid-detail", Static)
        if not self.pairs:
            if self.failed:
                message = "no completeness data: the database cannot be read (see above)"
            elif self.loaded:
                message = f"no completeness rows in the last {self.hours}h: no pair was"
                message += " covered (captured or backfilled) in a closed hour yet"
            else:
                message = "loading completeness…"
            detail.update(Text(message, style=_DIM))
            return
        row, column = self.grid.cursor_coordinate
        key = self.grid.item_keys[row] if row < len(self.grid.item_keys) else None
        ph = next((p for p in self.pairs if p.key == key), None)
        if ph is None:
            detail.update("")
            return
        text = Text()
        text.append(f"{ph.exchange} {ph.symbol} ", style="bold")
        if column >= FIXED and column - FIXED < len(self.window):
            hour = self.window[column - FIXED]
            text.append(f"{fmt_hour(hour)} ")
            h = ph.hours.get(hour)
            if h is None:
                text.append("n/a: not covered then (klined was not tracking it)", style=_DIM)
            else:
                text.append(f"{fmt_pct(h.rate)} ", style="bold")
                text.append_text(counts_text(h))
        else:
            totals = ph.totals()
            text.append(f"{self.hours}h {fmt_pct(totals.rate)} ", style="bold")
            text.append_text(counts_text(totals))
            if ph.pending:
                text.append(f" ({ph.pending}h pending)", style=HEAT_COLOR["pending"])
        detail.update(text)

    # -- interaction ----------------------------------------------------------------------------

    def on_data_table_cell_highlighted(self, event: DataTable.CellHighlighted) -> None:
        self._render_detail()

    def action_toggle_mode(self) -> None:
        self.mode = "bars" if self.heat else "heat"
        self._render_all()

    def action_toggle_order(self) -> None:
        self.worst_first = not self.worst_first
        self._render_all()
        self.grid.move_cursor(row=0, animate=False)  # to the top of the new order

    def action_window(self, step: int) -> None:
        at = WINDOWS.index(self.hours) if self.hours in WINDOWS else WINDOWS.index(24)
        new = WINDOWS[max(0, min(len(WINDOWS) - 1, at + step))]
        if new == self.hours:
            return
        self.hours = new
        self._render_all()
        self.post_message(self.WindowChanged())

    class WindowChanged(Message):
        """The hour window changed: the app loads the new range."""

    def focus_main(self) -> None:
        self.grid.focus()
