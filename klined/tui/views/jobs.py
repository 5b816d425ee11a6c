"""Jobs view: did the hourly chain run, step by step, for every recent hour - and when next?"""

from __future__ import annotations

from typing import ClassVar

from rich.console import RenderableType
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from klined.model import HOUR_MS
from klined.status import ChainStatus
from klined.tui.present import (
    HourRuns,
    fmt_count,
    fmt_hm,
    fmt_hms,
    fmt_hour,
    fmt_span,
    group_runs,
    one_line,
    steps_of,
)
from klined.tui.sources import ChainResult, JobRun
from klined.tui.widgets.badge import job_badge
from klined.tui.widgets.live_table import LiveTable

_DIM = "#8b949e"
_BAD = "#f85149"
_OK = "#3fb950"


def last_closed_hour(now_ms: int) -> int:
    return now_ms - now_ms % HOUR_MS - HOUR_MS


def _step_cell(run: JobRun | None, now_ms: int) -> Text:
    if run is None:
        return Text("·", style=_DIM)
    if run.status == "skipped":
        return job_badge("skipped", "skip")
    duration = run.duration_ms
    if duration is None and run.status == "running" and run.started_ms is not None:
        duration = now_ms - run.started_ms
    return job_badge(run.status, fmt_span(duration) if duration is not None else "")


DETAIL_COLUMNS: list[tuple[str, str, int | None]] = [
    ("step", "step", 12),
    ("status", "status", 9),
    ("rows", "rows", 7),
    ("duration", "took", 6),
    ("trigger", "trigger", 9),
    ("started", "started", 8),
    ("error", "error", 80),
]


class JobsView(Vertical):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("r", "app.run_chain", "Run chain now")]

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.groups: list[HourRuns] = []
        self.steps: list[str] = []
        self.loaded = False
        self.failed = False
        self.now_ms = 0
        self.chain: ChainStatus | None = None
        self.manual: Text = Text()

    def compose(self) -> ComposeResult:
        yield Static("", id="chain-line")
        yield LiveTable(id="runs", cursor_type="row", zebra_stripes=True)
        yield Static("", id="runs-title")
        yield LiveTable(id="run-detail", show_cursor=False)
        yield Static("", id="manual-line")

    def on_mount(self) -> None:
        detail = self.query_one("#run-detail", LiveTable)
        detail.can_focus = False
        detail.set_columns(DETAIL_COLUMNS)
        self._render_chain_line()
        self._render_detail()

    @property
    def table(self) -> LiveTable:
        return self.query_one("#runs", LiveTable)

    # -- data -----------------------------------------------------------------------------------

    def show_runs(self, runs: list[JobRun], now_ms: int) -> None:
        self.now_ms, self.loaded, self.failed = now_ms, True, False
        self.groups = group_runs(runs)
        steps = steps_of(self.groups)
        table = self.table
        with self.app.batch_update():
            if steps != self.steps:
                self.steps = steps
                columns: list[tuple[str, str, int | None]] = [("hour", "hour (UTC)", 11)]
                columns += [(f"s:{s}", s[:8], 8) for s in steps]
                table.set_columns(columns)
            rows = []
            for g in self.groups:
                cells: list[RenderableType] = [Text(fmt_hour(g.hour_ms), style="bold")]
                cells += [_step_cell(g.latest.get(s), now_ms) for s in self.steps]
                rows.append((g.key, cells))
            table.sync(rows)
            self._render_detail()
            self._render_chain_line()

    def show_failed(self) -> None:
        self.failed = True
        self._render_detail()

    def show_chain(self, chain: ChainStatus | None, now_ms: int) -> None:
        """The daemon's scheduler state (``None``: the daemon cannot be reached)."""
        self.chain, self.now_ms = chain, max(self.now_ms, now_ms)
        self._render_chain_line()

    def show_manual(self, text: Text) -> None:
        self.manual = text
        self.query_one("#manual-line", Static).update(text)

    def _render_chain_line(self) -> None:
        now, chain = self.now_ms, self.chain
        text = Text()
        text.append("chain ", style="bold")
        if chain is None:
            text.append("schedule unknown (daemon not reachable)", style=_DIM)
        else:
            if chain.running:
                text.append(f"running {fmt_hour(chain.current_hour_ms)} ", style="bold #39c5cf")
                text.append(chain.current_step or "")
            else:
                text.append("idle")
            if chain.last_run_ms is not None:
                text.append(f" · last {fmt_hm(chain.last_run_ms)} ")
                ok = chain.last_result in ("ok", "")
                text.append(chain.last_result or "ok", style=_OK if ok else _BAD)
            if chain.next_run_ms is not None:
                text.append(f" · next {fmt_hm(chain.next_run_ms)} UTC")
                if chain.next_run_ms > now:
                    text.append(f" (in {fmt_span(chain.next_run_ms - now)})", style=_DIM)
            if chain.quarantined_parts:
                text.append(
                    f" · {chain.quarantined_parts} lake part(s) quarantined (klined check)",
                    style=_BAD,
                )
        if now:
            text.append(f" · r: run now for {fmt_hm(last_closed_hour(now))}", style=_DIM)
        self.query_one("#chain-line", Static).update(text)

    def _render_detail(self) -> None:
        title = self.query_one("#runs-title", Static)
        detail = self.query_one("#run-detail", LiveTable)
        key = self.table.selected_key
        group = next((g for g in self.groups if g.key == key), None)
        if group is None:
            if self.failed:
                message = "no job runs: the database cannot be read (see above)"
            elif self.loaded:
                message = "no chain runs recorded yet"
            else:
                message = "loading job runs…"
            title.update(Text(message, style=_DIM))
            detail.sync([])
            detail.display = False
            return
        detail.display = True
        failed = sum(1 for r in group.latest.values() if r.status == "failed")
        text = Text(f"runs for {fmt_hour(group.hour_ms)} ", style="bold")
        text.append(f"({len(group.runs)} runs", style=_DIM)
        if failed:
            text.append(f", {failed} step(s) failing)", style=_BAD)
        else:
            text.append(")", style=_DIM)
        title.update(text)
        rows = []
        for run in group.runs:
            cells: list[RenderableType] = [
                Text(run.step),
                job_badge(run.status, run.status),
                Text(fmt_count(run.rows), justify="right"),
                Text(fmt_span(run.duration_ms), justify="right"),
                Text(run.trigger, style=_DIM),
                Text(fmt_hms(run.started_ms)),
                Text(one_line(run.error, 120), style=_BAD if run.error else ""),
            ]
            rows.append((str(run.run_id), cells))
        detail.sync(rows)

    # -- interaction ----------------------------------------------------------------------------

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "runs":
            self._render_detail()

    def focus_main(self) -> None:
        self.table.focus()


def manual_started(hour_ms: int, now_ms: int) -> Text:
    text = Text("manual chain ", style="bold")
    text.append(f"for {fmt_hour(hour_ms)} running since {fmt_hms(now_ms)} UTC…", style="#39c5cf")
    return text


def manual_finished(result: ChainResult) -> Text:
    text = Text("manual chain ", style="bold")
    text.append(f"for {fmt_hour(result.hour_ms)}: ")
    took = fmt_span(int(result.duration_s * 1000))
    if result.ok:
        text.append(f"ok in {took}", style=_OK)
    else:
        text.append(f"failed (exit {result.returncode}) after {took}", style=_BAD)
        if result.tail:
            text.append(f": {one_line(result.tail[-1], 200)}", style=_BAD)
    if result.log_path:
        text.append(f" · log {result.log_path}", style=_DIM)
    return text
