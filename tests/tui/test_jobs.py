"""The Jobs view: the schedule from the daemon, and running the chain by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner
from textual.pilot import Pilot
from textual.widgets import Static

from klined.commands.tui import tui_command
from klined.config import parse_config
from klined.errors import StatusError
from klined.model import HOUR_MS, parse_time
from klined.status import ChainStatus
from klined.tui.app import KlinedApp, build_app, config_file
from klined.tui.fakes import (
    DEMO_NOW_MS,
    FakeChainRunner,
    FakeStatusSource,
    FakeWarehouseSource,
    catching_up_completeness,
    catching_up_job_runs,
    catching_up_snapshot,
    demo_job_runs,
    demo_snapshot,
)
from klined.tui.sources import PgWarehouseSource, SocketStatusSource, SubprocessChainRunner
from klined.tui.views.jobs import chain_line, result_ok
from klined.tui.widgets.confirm import ConfirmScreen
from klined.tui.widgets.live_table import LiveTable

pytestmark = pytest.mark.anyio

LAST = parse_time("2026-11-26T12:00:00Z")


def make_app(runner: FakeChainRunner | SubprocessChainRunner | None) -> KlinedApp:
    return KlinedApp(
        FakeStatusSource(demo_snapshot()),
        FakeWarehouseSource([], demo_job_runs()),
        runner,
        refresh=3600,
        clock=lambda: DEMO_NOW_MS,
    )


async def settle(app: KlinedApp, pilot: Pilot[None]) -> None:
    await app.workers.wait_for_complete()
    await pilot.pause()


def text_of(app: KlinedApp, selector: str) -> str:
    return str(app.query_one(selector, Static).render())


async def test_schedule_and_recent_runs() -> None:
    app = make_app(FakeChainRunner())
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("3")
        line = text_of(app, "#chain-line")
        assert line == "chain idle · next 14:05 (in 17m48s) · last 13:05 ok"
        runs = app.query_one("#runs", LiveTable)
        assert runs.row_count == 30
        assert runs.cell_text(0, "hour") == "11-26 12:00"
        # 09:00's gapfill failed at 10:05 and was redone at 11:05: the latest attempt shows
        nine = runs.column_texts("hour").index("11-26 09:00")
        assert runs.cell_text(nine, "s:gapfill").startswith("✓")
        for _ in range(nine):
            await pilot.press("down")
        await pilot.pause()
        detail = app.query_one("#run-detail", LiveTable)
        assert detail.column_texts("trigger")[:4] == ["dirty"] * 4
        failed = detail.column_texts("status").index("✗ failed")
        assert detail.cell_text(failed, "error").startswith("kraken REST")  # cut at 80 columns
        assert "1 step(s) failing" not in text_of(app, "#runs-title")
        skipped = runs.column_texts("hour").index("11-26 07:00")
        assert runs.cell_text(skipped, "s:flush") == "– skip"


async def test_schedule_unknown_while_the_daemon_is_away() -> None:
    app = make_app(FakeChainRunner())
    assert isinstance(app.status_source, FakeStatusSource)
    app.status_source.error = StatusError("daemon not running")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        assert "schedule unknown (daemon not reachable)" in text_of(app, "#chain-line")


async def test_run_now_asks_then_runs_the_last_closed_hour() -> None:
    runner = FakeChainRunner()
    runner.release = anyio.Event()
    app = make_app(runner)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("3", "r")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        assert "2026-11-26 12:00 UTC" in app.screen.question
        await pilot.press("n")
        await pilot.pause()
        assert runner.hours == []

        await pilot.press("r", "y")
        await pilot.pause()
        assert runner.hours == [LAST]
        assert "running since 13:47:12" in text_of(app, "#manual-line")
        await pilot.press("r")  # a second run while the first one goes: refused, not queued
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen)
        assert runner.hours == [LAST]

        runner.release.set()
        await settle(app, pilot)
        assert "manual chain for 11-26 12:00: ok in 4.2s" in text_of(app, "#manual-line")


async def test_a_failed_run_shows_its_last_words() -> None:
    runner = FakeChainRunner(returncode=1, tail=("ChainError: gapfill: kraken REST 503",))
    app = make_app(runner)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("3", "r", "y")
        await settle(app, pilot)
        line = text_of(app, "#manual-line")
        assert "failed (exit 1) after 4.2s: ChainError: gapfill: kraken REST 503" in line


async def test_subprocess_runner_passes_hour_and_config(tmp_path: Path) -> None:
    script = tmp_path / "fake_klined.py"
    script.write_text(
        "import sys\nprint('args:', ' '.join(sys.argv[1:]))\n"
        "print('chain failed', file=sys.stderr)\nsys.exit(3)\n"
    )
    runner = SubprocessChainRunner(
        "/etc/klined/klined.toml", command=[sys.executable, str(script)], log_dir=tmp_path
    )
    result = await runner.run(LAST)
    assert result.returncode == 3
    assert result.tail == (
        "args: chain --hour 2026-11-26T12:00:00Z -c /etc/klined/klined.toml",
        "chain failed",
    )
    assert Path(result.log_path).parent == tmp_path


async def test_the_real_runner_from_the_app(tmp_path: Path) -> None:
    script = tmp_path / "fake_klined.py"
    script.write_text("print('processed 2026-11-26T12:00:00Z')\n")
    runner = SubprocessChainRunner(None, command=[sys.executable, str(script)], log_dir=tmp_path)
    app = make_app(runner)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("3", "r", "y")
        await pilot.pause()
        await settle(app, pilot)
        assert "manual chain for 11-26 12:00: ok in" in text_of(app, "#manual-line")


def test_build_app_wires_the_configured_socket_dsn_and_config(tmp_path: Path) -> None:
    toml = tmp_path / "klined.toml"
    toml.write_text(
        '[daemon]\ndata_dir = "data"\n[database]\ndsn = "postgresql://u@127.0.0.1:1/klined"\n'
    )
    from klined.config import load_config

    cfg = load_config(toml)
    app = build_app(cfg, str(toml), refresh=1.5)
    assert isinstance(app.status_source, SocketStatusSource)
    assert app.status_source.path == tmp_path / "data" / "klined.sock"
    assert isinstance(app.warehouse, PgWarehouseSource)
    assert isinstance(app.chain_runner, SubprocessChainRunner)
    assert app.chain_runner.argv(LAST)[-2:] == ["-c", str(toml)]
    assert app.refresh_s == 1.5
    assert app.db_refresh_s == 10.0
    assert config_file(parse_config(""), None) is None


def test_cli_help_and_bad_refresh() -> None:
    runner = CliRunner()
    result = runner.invoke(tui_command, ["--help"])
    assert result.exit_code == 0
    assert "--refresh" in result.output and "--config" in result.output
    result = runner.invoke(tui_command, ["--refresh", "0"])
    assert result.exit_code == 2


def test_the_chain_line_never_shows_a_past_next_run() -> None:
    now = DEMO_NOW_MS
    busy = ChainStatus(
        running=True, trigger="catchup", run_done=2, run_total=17, current_step="gapfill",
        current_hour_ms=LAST - 3 * HOUR_MS, next_run_ms=now - 60_000,
    )  # fmt: skip
    line = chain_line(busy, now).plain
    assert line == "chain gapfill 11-26 09:00 (catch-up 3/17) · next run due after this hour"
    busy.waiting_for = "a backfill's merge of 2026-11-20T04:00Z (PostgreSQL backend pid 9)"
    assert chain_line(busy, now).plain.startswith(
        "chain catch-up 3/17 waits for a backfill's merge of 2026-11-20T04:00Z · next run due"
    )
    idle = ChainStatus(
        next_run_ms=now - 1000,
        last_run_ms=now - HOUR_MS,
        last_result="1 hour(s), 1 incomplete, 3.1s",
    )
    assert chain_line(idle, now).plain == (
        "chain idle · next run due · last 12:47 1 hour(s), 1 incomplete, 3.1s"
    )
    assert not result_ok(idle.last_result) and result_ok("nothing to do")


async def test_catch_up_pending_hours_and_an_incomplete_gapfill() -> None:
    app = KlinedApp(
        FakeStatusSource(catching_up_snapshot()),
        FakeWarehouseSource(catching_up_completeness(), catching_up_job_runs()),
        FakeChainRunner(),
        refresh=3600,
        clock=lambda: DEMO_NOW_MS,
    )
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("3")
        runs = app.query_one("#runs", LiveTable)
        assert runs.cell_text(0, "s:gapfill").startswith("! ")
        title = text_of(app, "#runs-title")
        assert "gapfill: 95 minutes left missing, requests failed" in title
        line = text_of(app, "#chain-line")
        assert line.startswith("chain catch-up 2/6 waits for a backfill's merge of")


async def test_quarantined_lake_parts_show_on_the_chain_line() -> None:
    snapshot = demo_snapshot()
    snapshot.chain.quarantined_parts = 2
    app = KlinedApp(
        FakeStatusSource(snapshot),
        FakeWarehouseSource([], demo_job_runs()),
        FakeChainRunner(),
        refresh=3600,
        clock=lambda: DEMO_NOW_MS,
    )
    async with app.run_test(size=(120, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("3")
        assert "2 part(s) quarantined (klined check)" in text_of(app, "#chain-line")
