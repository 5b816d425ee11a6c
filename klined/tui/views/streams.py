"""Streams view: is every exchange connection and every pair streaming right now?

At 80 columns every column is on screen: the error column takes the width the others leave
(the message rate is dropped below 100 columns; the connections show it), an error is cut
with an ellipsis, and the line under the table shows the selected pair's whole error. When
the daemon runs against the simulator with injected faults (``klined demo``) every error is
labelled simulated.
"""

from __future__ import annotations

from typing import ClassVar

from rich.console import RenderableType
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Input, Static

from klined.status import ConnectionStatus, PairStatus, StatusSnapshot
from klined.tui.present import (
    STREAM_SORTS,
    final_lag_ms,
    fit,
    fmt_age,
    fmt_bytes,
    fmt_count,
    fmt_hm,
    fmt_hms,
    fmt_rate,
    fmt_span,
    one_line,
    order_streams,
    short_error,
)
from klined.tui.widgets.badge import state_badge
from klined.tui.widgets.live_table import Columns, LiveTable, with_last_column

_DIM = "#8b949e"
_WARN = "#d29922"
_BAD = "#f85149"


def _age_text(now_ms: int, then_ms: int | None) -> Text:
    if then_ms is None:
        return Text("—", style=_DIM)
    age = now_ms - then_ms
    style = "" if age < 10_000 else _WARN if age < 60_000 else _BAD
    return Text(fmt_age(now_ms, then_ms), style=style)


def _final_text(p: PairStatus, now_ms: int) -> Text:
    lag = final_lag_ms(p, now_ms)
    if lag is None:
        return Text("—", style=_DIM)
    style = "" if lag < 120_000 else _WARN if lag < 600_000 else _BAD
    return Text(fmt_hm(p.last_final_minute_ms), style=style)


#: what a simulated error's cell starts with (the detail line spells it out)
SIM_TAG = "sim: "
#: below this many columns the message-rate column is left out (the connections show rates)
WIDE = 100
#: the error columns never get narrower than this
MIN_ERROR = 12


def error_cell(error: str, width: int, simulated: bool) -> Text:
    """An error cut to its column: the exception class dropped, ``sim:`` for simulated."""
    if not error:
        return Text("")
    text = (SIM_TAG if simulated else "") + short_error(error)
    return Text(fit(text, width), style=_BAD)


def stream_cells(
    p: PairStatus, now_ms: int, *, error_width: int = 60, simulated: bool = False, wide: bool = True
) -> list[RenderableType]:
    cells: list[RenderableType] = [
        Text(p.exchange),
        Text(p.symbol, style="bold"),
        state_badge(p.state),
        _age_text(now_ms, p.last_message_ms),
    ]
    if wide:
        cells.append(Text(fmt_rate(p.messages_per_s), justify="right"))
    cells += [
        Text(str(p.reconnects), justify="right", style=_WARN if p.reconnects else ""),
        _final_text(p, now_ms),
        error_cell(p.last_error, error_width, simulated),
    ]
    return cells


def connection_cells(
    c: ConnectionStatus, now_ms: int, *, note_width: int = 60, simulated: bool = False
) -> list[RenderableType]:
    if c.next_retry_ms is not None and c.next_retry_ms > now_ms:
        note = Text(f"retry in {fmt_span(c.next_retry_ms - now_ms)}", style=_WARN)
        if c.last_error:
            rest = note_width - len(note.plain) - 3
            note.append(" · ")
            note.append_text(error_cell(c.last_error, rest, simulated))
    else:
        note = error_cell(c.last_error, note_width, simulated)
    up = fmt_age(now_ms, c.connected_since_ms) if c.connected_since_ms else "—"
    return [
        Text(c.conn_id or c.exchange, style="bold"),
        state_badge(c.state),
        Text(str(c.pairs), justify="right"),
        Text(fmt_rate(c.messages_per_s), justify="right"),
        Text(str(c.reconnects), justify="right", style=_WARN if c.reconnects else ""),
        Text(up, justify="right"),
        note,
    ]


def stream_columns(width: int) -> Columns:
    """The pairs table's columns for a table ``width`` cells wide (error gets the rest)."""
    columns: Columns = [
        ("exchange", "exchange", 8),
        ("pair", "pair", 12),
        ("state", "state", 10),
        ("age", "age", 5),
    ]
    if width >= WIDE:
        columns.append(("rate", "msg/s", 5))
    columns += [("reconnects", "rec", 3), ("final", "final", 5)]
    return with_last_column(width, columns, "error", "last error", MIN_ERROR)


def connection_columns(width: int) -> Columns:
    columns: Columns = [
        ("conn", "connection", 10),
        ("state", "state", 10),
        ("pairs", "pairs", 5),
        ("rate", "msg/s", 5),
        ("reconnects", "rec", 3),
        ("up", "up", 6),
    ]
    return with_last_column(width, columns, "note", "retry / last error", MIN_ERROR)


_HEADER_SORTS = {
    "exchange": "pair",
    "pair": "pair",
    "state": "problems",
    "error": "problems",
    "age": "age",
    "final": "age",
    "rate": "rate",
    "reconnects": "reconnects",
}


class StreamsView(Vertical):
    """Connections on top, then one row per exchange/pair, problems first."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "focus_filter", "Filter"),
        Binding("s", "cycle_sort", "Sort"),
        Binding("S", "reverse_sort", "Reverse"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.sort = "problems"
        self.reverse = False
        self.snapshot: StatusSnapshot | None = None
        self.stale_since_ms: int | None = None
        self._width = 0

    def compose(self) -> ComposeResult:
        yield Static("waiting for the daemon's status…", id="daemon-line")
        yield LiveTable(id="connections", show_cursor=False, zebra_stripes=False)
        with Horizontal(id="filter-bar"):
            yield Input(
                placeholder="/ to filter by exchange, pair, state or error",
                compact=True,
                id="stream-filter",
            )
            yield Static("", id="stream-count")
        yield LiveTable(id="stream-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="stream-detail")

    def on_mount(self) -> None:
        connections = self.query_one("#connections", LiveTable)
        connections.can_focus = False
        connections.display = False
        self._fit_columns()
        self._render_count(0, 0)

    def _fit_columns(self) -> bool:
        """Size the columns to the view's width; True when they changed (rows redrawn)."""
        width = self.size.width or self.app.size.width
        if width == self._width:
            return False
        self._width = width
        self.query_one("#connections", LiveTable).set_columns(connection_columns(width))
        self.query_one("#stream-table", LiveTable).set_columns(stream_columns(width))
        return True

    def on_resize(self) -> None:
        if self._fit_columns():
            self._render_all()

    @property
    def table(self) -> LiveTable:
        return self.query_one("#stream-table", LiveTable)

    @property
    def filter_text(self) -> str:
        return self.query_one("#stream-filter", Input).value

    # -- data -----------------------------------------------------------------------------------

    def show_snapshot(self, snapshot: StatusSnapshot) -> None:
        self.snapshot = snapshot
        self.stale_since_ms = None
        self._render_all()

    def show_unreachable(self, now_ms: int) -> None:
        """Keep the last rows on screen, but say plainly that they are old."""
        if self.stale_since_ms is None:
            self.stale_since_ms = now_ms
        self._render_daemon_line(now_ms)
        self._render_detail()

    def _render_all(self) -> None:
        snap = self.snapshot
        if snap is None:
            return
        now = snap.now_ms
        with self.app.batch_update():
            self._render_daemon_line(now)
            conns = sorted(snap.connections, key=lambda c: (c.exchange, c.conn_id))
            connections = self.query_one("#connections", LiveTable)
            note = connection_columns(self._width)[-1][2] or MIN_ERROR
            connections.sync(
                [
                    (c.conn_id, connection_cells(c, now, note_width=note, simulated=snap.simulated))
                    for c in conns
                ]
            )
            connections.display = bool(conns)
            rows = order_streams(
                snap.pairs,
                sort=self.sort,
                reverse=self.reverse,
                filter_text=self.filter_text,
                now_ms=now,
            )
            columns = stream_columns(self._width)
            error, wide = columns[-1][2] or MIN_ERROR, self._width >= WIDE
            self.table.sync(
                [
                    (
                        f"{p.exchange}:{p.symbol}",
                        stream_cells(
                            p, now, error_width=error, simulated=snap.simulated, wide=wide
                        ),
                    )
                    for p in rows
                ]
            )
            self._render_count(len(rows), len(snap.pairs))
            self._render_detail()

    def _render_daemon_line(self, now_ms: int) -> None:
        snap = self.snapshot
        line = self.query_one("#daemon-line", Static)
        if snap is None:
            line.update(Text("no status from the daemon yet", style=_DIM))
            return
        text = Text(no_wrap=True, overflow="ellipsis")
        if self.stale_since_ms is not None:
            text.append(f"status from {fmt_hms(snap.now_ms)} UTC, now unreachable · ", style=_BAD)
        if snap.simulated:
            text.append("simulated", style="bold " + _WARN)
            text.append(" · ")
        text.append("daemon ", style="bold")
        if snap.role != "all" or snap.shard != "1/1":
            # a single VM says nothing; a host of a larger setup says what it is
            role = snap.role if snap.shard == "1/1" else f"{snap.role} {snap.shard}"
            text.append(f"{role} · ", style="bold")
        text.append(f"pid {snap.pid} · up {fmt_span(int(snap.uptime_s * 1000))}")
        lake = snap.lake
        if lake.last_upload_error:
            text.append(f" · upload error: {one_line(lake.last_upload_error, 60)}", style=_BAD)
        text.append(f" · lake {lake.open_parts} open, {lake.pending_upload_parts} to upload")
        if lake.s3_enabled:
            text.append(" (S3)")
        text.append(f" · {fmt_count(lake.events_written)} events")
        if snap.rss_bytes:
            text.append(f" · {fmt_bytes(snap.rss_bytes)}")
        line.update(text)

    def _render_count(self, shown: int, total: int) -> None:
        arrow = "↓" if self.reverse else "↑"
        self.query_one("#stream-count", Static).update(
            Text(f" {shown}/{total} · sort {self.sort} {arrow} ", style=_DIM)
        )

    def _render_detail(self) -> None:
        detail = self.query_one("#stream-detail", Static)
        snap, key = self.snapshot, self.table.selected_key
        pair = None
        if snap is not None and key is not None:
            pair = next((p for p in snap.pairs if f"{p.exchange}:{p.symbol}" == key), None)
        if pair is None or snap is None:
            if snap is None and self.stale_since_ms is not None:
                detail.update(Text("no streams to show: the daemon cannot be reached", _WARN))
            elif snap is not None and snap.pairs and not self.table.item_keys:
                detail.update(Text(f"no pair matches {self.filter_text!r}", style=_WARN))
            else:
                detail.update("")
            return
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(f"{pair.exchange} {pair.symbol} ", style="bold")
        text.append_text(state_badge(pair.state))
        if pair.last_error:
            what = "simulated fault" if snap.simulated else "last error"
            text.append(f" · {what}: {one_line(short_error(pair.last_error), 300)}", style=_BAD)
        text.append(f" · {fmt_count(pair.messages)} messages")
        text.append(f" · last final {fmt_hm(pair.last_final_minute_ms)}")
        detail.update(text)

    # -- interaction ----------------------------------------------------------------------------

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "stream-table":
            self._render_detail()

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        """A click on a column header sorts by it (a second click reverses)."""
        sort = _HEADER_SORTS.get(str(event.column_key.value))
        if event.data_table.id != "stream-table" or sort is None:
            return
        self.reverse = not self.reverse if sort == self.sort else False
        self.sort = sort
        self._render_all()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "stream-filter":
            self._render_all()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "stream-filter":
            self.table.focus()

    def action_focus_filter(self) -> None:
        self.query_one("#stream-filter", Input).focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#stream-filter", Input)
        if box.value:
            box.value = ""
        self.table.focus()

    def action_cycle_sort(self) -> None:
        self.sort = STREAM_SORTS[(STREAM_SORTS.index(self.sort) + 1) % len(STREAM_SORTS)]
        self.reverse = False
        self._render_all()

    def action_reverse_sort(self) -> None:
        self.reverse = not self.reverse
        self._render_all()

    def focus_main(self) -> None:
        self.table.focus()
