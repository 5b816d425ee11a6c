"""Jobs view: did the hourly chain run, step by step, for every recent hour - and when next?

The line on top says what the chain does now (the step and hour it runs, the catch-up's
progress, or whom it waits for the lock) and when the next scheduled run is, never a time
already past. The table has one column per step of an hour; work not tied to an hour
(partition upkeep) is only mentioned on that line when it failed. Everything fits 80 columns.
"""

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
    fit,
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
from klined.tui.widgets.live_table import Columns, LiveTable, with_last_column

_DIM = "#8b949e"
_BAD = "#f85149"
_WARN = "#d29922"
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


#: a step column: "✓ 3m05s" at most
STEP_WIDTH = 7
#: column labels for step names longer than a column
STEP_LABELS = {"completeness": "complete"}
_TRIGGERS = {"catchup": "catch-up", "schedule": "hourly", "manual": "by hand"}


def detail_columns(width: int) -> Columns:
    columns: Columns = [
        ("step", "step", 12),
        ("status", "status", 12),
        ("rows", "rows", 6),
        ("duration", "took", 6),
        ("trigger", "trigger", 8),  # catchup, schedule, manual, backfill, ...
        ("started", "started", 8),
    ]
    return with_last_column(width, columns, "error", "error")


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
        self.upkeep: JobRun | None = None  # the latest run of work not tied to an hour
        self._width = 0

    def compose(self) -> ComposeResult:
        yield Static("", id="chain-line")
        yield LiveTable(id="runs", cursor_type="row", zebra_stripes=True)
        yield Static("", id="runs-title")
        yield LiveTable(id="run-detail", show_cursor=False)
        yield Static("", id="manual-line")

    def on_mount(self) -> None:
        detail = self.query_one("#run-detail", LiveTable)
        detail.can_focus = False
        self._fit_detail()
        self._render_chain_line()
        self._render_detail()

    def _fit_detail(self) -> bool:
        width = self.size.width or self.app.size.width
        if width == self._width:
            return False
        self._width = width
        self.query_one("#run-detail", LiveTable).set_columns(detail_columns(width))
        return True

    def on_resize(self) -> None:
        if self._fit_detail():
            self._render_detail()

    @property
    def table(self) -> LiveTable:
        return self.query_one("#runs", LiveTable)

    # -- data -----------------------------------------------------------------------------------

    def show_runs(self, runs: list[JobRun], now_ms: int) -> None:
        self.now_ms, self.loaded, self.failed = now_ms, True, False
        hourless = [r for r in runs if r.hour_ms is None]
        self.upkeep = max(hourless, key=lambda r: r.run_id) if hourless else None
        self.groups = group_runs(r for r in runs if r.hour_ms is not None)
        steps = steps_of(self.groups)
        table = self.table
        with self.app.batch_update():
            if steps != self.steps:
                self.steps = steps
                columns: Columns = [("hour", "hour (UTC)", 11)]
                columns += [
                    (
                        f"s:{s}",
                        STEP_LABELS.get(s, s)[:8],
                        max(STEP_WIDTH, len(STEP_LABELS.get(s, s)[:8])),
                    )
                    for s in steps
                ]
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
        self.query_one("#chain-line", Static).update(
            chain_line(self.chain, self.now_ms, self.upkeep)
        )

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
        text = Text(f"runs for {fmt_hour(group.hour_ms)} ", style="bold", no_wrap=True)
        text.append(f"({len(group.runs)} runs", style=_DIM)
        if failed:
            text.append(f", {failed} step(s) failing)", style=_BAD)
        else:
            text.append(")", style=_DIM)
        # the latest trouble in full (the table's error column is narrow at 80 columns)
        trouble = [r for r in group.latest.values() if r.status in ("failed", "incomplete")]
        if trouble:
            worst = max(trouble, key=lambda r: (r.status == "failed", r.run_id))
            color = _BAD if worst.status == "failed" else _WARN
            text.append(f" {worst.step}: {one_line(worst.error, 300)}", style=color)
        title.update(text)
        rows = []
        error_width = detail_columns(self._width)[-1][2] or 12
        for run in group.runs:
            color = _WARN if run.status == "incomplete" else _BAD
            cells: list[RenderableType] = [
                Text(run.step),
                job_badge(run.status, run.status),
                Text(fmt_count(run.rows), justify="right"),
                Text(fmt_span(run.duration_ms), justify="right"),
                Text(run.trigger, style=_DIM),
                Text(fmt_hms(run.started_ms)),
                Text(fit(one_line(run.error, 300), error_width), style=color if run.error else ""),
            ]
            rows.append((str(run.run_id), cells))
        detail.sync(rows)

    # -- interaction ----------------------------------------------------------------------------

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "runs":
            self._render_detail()

    def focus_main(self) -> None:
        self.table.focus()


def result_ok(summary: str) -> bool:
    """Whether a chain run's summary ("3 hour(s), 1 incomplete, 4.2s") reads as all good."""
    bad = (" failed", "incomplete", "not run")
    return not any(word in summary for word in bad) and not summary.startswith(("error", "skipped"))


def chain_line(chain: ChainStatus | None, now: int, upkeep: JobRun | None = None) -> Text:
    """One line: what the chain does now, its last result, the next run (never a past time)."""
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append("chain ", style="bold")
    if chain is None:
        text.append("schedule unknown (daemon not reachable)", style=_DIM)
        return text
    if chain.running:
        what = _TRIGGERS.get(chain.trigger, chain.trigger) if chain.trigger else ""
        if chain.run_total > 1:
            what += f" {min(chain.run_done + 1, chain.run_total)}/{chain.run_total}"
        if chain.waiting_for:
            holder = chain.waiting_for.split(" (PostgreSQL backend pid", 1)[0]
            text.append(f"{what.strip() or 'run'} waits for {holder}", style=_WARN)
        else:
            text.append(f"{chain.current_step or 'running'} {fmt_hour(chain.current_hour_ms)}",
                        style="bold #39c5cf")  # fmt: skip
            if what:
                text.append(f" ({what.strip()})")
    else:
        text.append("idle")
    if chain.quarantined_parts:
        text.append(f" · {chain.quarantined_parts} part(s) quarantined (klined check)", style=_BAD)
    if chain.next_run_ms is not None:
        if chain.next_run_ms > now:
            text.append(f" · next {fmt_hm(chain.next_run_ms)}")
            text.append(f" (in {fmt_span(chain.next_run_ms - now)})", style=_DIM)
        else:
            text.append(" · next run due" + (" after this hour" if chain.running else ""),
                        style=_WARN)  # fmt: skip
    if chain.last_run_ms is not None:
        ok = result_ok(chain.last_result)
        text.append(f" · last {fmt_hm(chain.last_run_ms)} ")
        text.append(chain.last_result or "ok", style=_OK if ok else _BAD)
    if upkeep is not None and upkeep.status == "failed":
        text.append(f" · {upkeep.step} failed {fmt_hm(upkeep.started_ms)}", style=_BAD)
    return text


def manual_started(hour_ms: int, now_ms: int) -> Text:
    text = Text("manual chain ", style="bold", no_wrap=True, overflow="ellipsis")
    text.append(f"for {fmt_hour(hour_ms)} running since {fmt_hms(now_ms)} UTC…", style="#39c5cf")
    return text


def manual_finished(result: ChainResult) -> Text:
    text = Text("manual chain ", style="bold", no_wrap=True, overflow="ellipsis")
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
