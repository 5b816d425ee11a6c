"""``klined tui``: the operator's dashboard, built to be used over SSH in an 80x24 terminal.

The app owns the data sources and polls them from Textual workers on the app's event loop
(asyncpg and the status socket are asynchronous, so nothing blocks the screen). Each poll
hands plain data to a view, which updates its tables in place. A source that fails shows a
sentence in the banner and the last data stays on screen; the next successful poll clears it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from loguru import logger
from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.notifications import SeverityLevel
from textual.widgets import Footer, Header, TabbedContent, TabPane
from textual.worker import Worker

from klined.config import Config
from klined.errors import DatabaseError, StatusError
from klined.status import LiveStatus, StatusSnapshot
from klined.tui.present import fmt_hms, fmt_when
from klined.tui.sources import (
    ChainRunner,
    PgWarehouseSource,
    SocketStatusSource,
    StatusSource,
    SubprocessChainRunner,
    WarehouseSource,
    warehouse_dsn,
)
from klined.tui.views.completeness import CompletenessView
from klined.tui.views.jobs import JobsView, last_closed_hour, manual_finished, manual_started
from klined.tui.views.streams import StreamsView
from klined.tui.widgets.banner import ProblemBanner
from klined.tui.widgets.confirm import ConfirmScreen
from klined.tui.widgets.so_far import SoFarLine

VIEWS = ("streams", "completeness", "jobs")
#: columns of the header that its icon and the matching right margin take
HEADER_MARGIN = 16


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


def live_mark(live: LiveStatus | None) -> str:
    """`` · live p50/p99 0.4/1.3s`` for the header: the live path's lag (final's event time
    to commit), or why there is none."""
    if live is None or not live.enabled:
        return ""
    if live.state == "failing":
        return " · live DOWN"
    if live.lag_p50_s is None or live.lag_p99_s is None:
        return " · live -"
    return f" · live p50/p99 {live.lag_p50_s:.1f}/{live.lag_p99_s:.1f}s"


class KlinedApp(App[None]):
    """Streams, Completeness and Jobs, fed by a status source and a warehouse source."""

    CSS_PATH = "app.tcss"
    TITLE = "klined"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("1", "show_view('streams')", "Streams", show=False),
        Binding("2", "show_view('completeness')", "Completeness", show=False),
        Binding("3", "show_view('jobs')", "Jobs", show=False),
        Binding("f5", "refresh_now", "Refresh", show=False),
    ]

    def __init__(
        self,
        status: StatusSource,
        warehouse: WarehouseSource,
        chain: ChainRunner | None = None,
        *,
        refresh: float = 2.0,
        db_refresh: float | None = None,
        clock: Callable[[], int] = wall_clock_ms,
        hours: int = 24,
    ) -> None:
        super().__init__()
        self.status_source = status
        self.warehouse = warehouse
        self.chain_runner = chain
        self.refresh_s = refresh
        self.db_refresh_s = db_refresh if db_refresh is not None else max(5 * refresh, 10.0)
        self.clock = clock
        self.hours = hours
        self.daemon_ok: bool | None = None
        self.db_ok: bool | None = None
        self.live: LiveStatus | None = None
        self._status_worker: Worker[None] | None = None
        self._db_worker: Worker[None] | None = None
        self._chain_worker: Worker[None] | None = None

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False, icon="≡")
        yield ProblemBanner(id="banner")
        with TabbedContent(initial="streams", id="views"):
            with TabPane("1 Streams", id="streams"):
                yield StreamsView(id="streams-view")
            with TabPane("2 Completeness", id="completeness"):
                yield CompletenessView(hours=self.hours, id="completeness-view")
            with TabPane("3 Jobs", id="jobs"):
                yield JobsView(id="jobs-view")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(TabbedContent).query_one("Tabs").can_focus = False
        self._update_subtitle()
        self.set_interval(self.refresh_s, self._tick_status)
        self.set_interval(self.db_refresh_s, self._tick_warehouse)
        self._tick_status()
        self._tick_warehouse()
        self.streams.focus_main()

    async def on_unmount(self) -> None:
        try:
            await self.warehouse.aclose()
        except Exception as exc:
            logger.debug("closing the warehouse source: {}", exc)

    # -- views ----------------------------------------------------------------------------------

    @property
    def streams(self) -> StreamsView:
        return self.query_one(StreamsView)

    @property
    def completeness(self) -> CompletenessView:
        return self.query_one(CompletenessView)

    @property
    def jobs(self) -> JobsView:
        return self.query_one(JobsView)

    @property
    def banner(self) -> ProblemBanner:
        return self.query_one(ProblemBanner)

    def action_show_view(self, name: str) -> None:
        self.query_one(TabbedContent).active = name
        self._focus_view(name)

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self._focus_view(event.pane.id or "streams")

    def _focus_view(self, name: str) -> None:
        if name == "streams":
            self.streams.focus_main()
        elif name == "completeness":
            self.completeness.focus_main()
        elif name == "jobs":
            self.jobs.focus_main()

    def _update_subtitle(self) -> None:
        def mark(ok: bool | None) -> str:
            return "…" if ok is None else "ok" if ok else "DOWN"

        text = f"daemon {mark(self.daemon_ok)} · db {mark(self.db_ok)}{live_mark(self.live)}"
        clock = f" · {fmt_hms(self.clock())}Z"
        # the header centres "title — subtitle" between its icon and an equal margin: the clock
        # gives way when it would be cut (a long title at 80 columns)
        room = (self.size.width or 80) - HEADER_MARGIN - len(self.title) - len(" — ")
        self.sub_title = text + clock if len(text) + len(clock) <= room else text

    # -- polling --------------------------------------------------------------------------------

    def _tick_status(self) -> None:
        """Start a status poll unless the previous one is still waiting for its answer."""
        if self._status_worker is None or self._status_worker.is_finished:
            self._status_worker = self.poll_status()

    def _tick_warehouse(self) -> None:
        if self._db_worker is None or self._db_worker.is_finished:
            self._db_worker = self.poll_warehouse()

    def action_refresh_now(self) -> None:
        self._tick_status()
        self._tick_warehouse()

    def on_completeness_view_window_changed(self, _: CompletenessView.WindowChanged) -> None:
        self._tick_warehouse()

    @work(group="status", exit_on_error=False)
    async def poll_status(self) -> None:
        snapshot: StatusSnapshot | None = None
        problem = ""
        try:
            snapshot = await self.status_source.fetch()
        except StatusError as exc:
            problem = str(exc)
        except Exception as exc:
            logger.opt(exception=exc).warning("reading the daemon status failed")
            problem = f"cannot read the daemon's status: {exc}"
        now = self.clock()
        self.live = snapshot.live if snapshot is not None else None
        if snapshot is None:
            self.daemon_ok = False
            self.banner.set_problem("daemon", problem)
            self.streams.show_unreachable(now)
            self.jobs.show_chain(None, now)
        else:
            self.daemon_ok = True
            self.banner.set_problem("daemon", None)
            self.streams.show_snapshot(snapshot)
            self.jobs.show_chain(snapshot.chain, now)
        self._update_subtitle()

    @work(group="warehouse", exit_on_error=False)
    async def poll_warehouse(self) -> None:
        now = self.clock()
        problems: list[str] = []
        since, until = self.completeness.since_until(now)
        try:
            rows = await self.warehouse.completeness(since, until)
        except DatabaseError as exc:
            problems.append(str(exc))
            self.completeness.show_failed(now)
        except Exception as exc:
            logger.opt(exception=exc).warning("reading completeness failed")
            problems.append(f"cannot read completeness: {exc}")
            self.completeness.show_failed(now)
        else:
            self.completeness.show(rows, now)
        so_far = self.completeness.query_one(SoFarLine)
        try:
            so_far.show(await self.warehouse.hour_so_far())
        except Exception as exc:
            logger.opt(exception=exc).debug("reading the hour in progress failed")
            so_far.show_failed()
        try:
            runs = await self.warehouse.job_runs()
        except DatabaseError as exc:
            problems.append(str(exc))
            self.jobs.show_failed()
        except Exception as exc:
            logger.opt(exception=exc).warning("reading job runs failed")
            problems.append(f"cannot read job runs: {exc}")
            self.jobs.show_failed()
        else:
            self.jobs.show_runs(runs, now)
        self.db_ok = not problems
        self.banner.set_problem("database", problems[0] if problems else None)
        self._update_subtitle()

    # -- running the chain by hand ------------------------------------------------------------

    def action_run_chain(self) -> None:
        if self.chain_runner is None:
            self.jobs.show_manual(Text("running the chain is not available here", "#d29922"))
            return
        if self._chain_worker is not None and not self._chain_worker.is_finished:
            self.jobs.show_manual(Text("a manual chain run is already in progress", "#d29922"))
            return
        hour = last_closed_hour(self.clock())
        question = (
            f"Run the hourly chain now for {fmt_when(hour)}?\n"
            "It waits for the chain lock if the daemon is running it, and re-running an hour"
            " is safe."
        )

        def answered(yes: bool | None) -> None:
            if yes:
                self._chain_worker = self.run_chain_for(hour)

        self.push_screen(ConfirmScreen(question), answered)

    @work(group="chain", exit_on_error=False)
    async def run_chain_for(self, hour_ms: int) -> None:
        assert self.chain_runner is not None
        self.jobs.show_manual(manual_started(hour_ms, self.clock()))
        try:
            result = await self.chain_runner.run(hour_ms)
        except Exception as exc:
            logger.opt(exception=exc).warning("manual chain run failed to start")
            text = Text(f"manual chain for {fmt_when(hour_ms)} could not run: {exc}", "#f85149")
            self.jobs.show_manual(text)
            self.tell(text.plain, severity="error")
            return
        self.jobs.show_manual(manual_finished(result))
        self.tell(manual_finished(result).plain, severity="information" if result.ok else "error")
        self._tick_warehouse()

    def tell(self, message: str, *, severity: SeverityLevel = "information") -> None:
        """One notification at a time, and none while the Jobs view shows the same news on
        its own line (a toast there covered that line and the table)."""
        if self.query_one(TabbedContent).active == "jobs":
            return
        self.clear_notifications()
        self.notify(message, severity=severity, timeout=8)


# -- wiring ---------------------------------------------------------------------------------------


def config_file(cfg: Config, config_path: str | None) -> str | None:
    """The config file the manual chain run must use too (absolute), if there is one."""
    path = config_path or cfg.source_path
    if not path or path.startswith("<"):
        return None
    return str(Path(path).expanduser().resolve())


def build_app(cfg: Config, config_path: str | None, refresh: float = 2.0) -> KlinedApp:
    """The real app: the daemon's socket, the configured (or embedded) PostgreSQL, the CLI."""
    status = SocketStatusSource(cfg.status_socket)

    def dsn() -> str:
        return warehouse_dsn(cfg)

    warehouse = PgWarehouseSource(dsn)
    log_dir = cfg.data_dir / "logs" if cfg.data_dir.is_dir() else None
    chain = SubprocessChainRunner(config_file(cfg, config_path), log_dir=log_dir)
    return KlinedApp(status, warehouse, chain, refresh=refresh)
