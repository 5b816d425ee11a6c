"""The Completeness view at 80x24: a wide window opens on the newest hours, and ``o`` shows
what it did."""

from __future__ import annotations

import pytest
from textual.widgets import Static

from klined.tui.app import KlinedApp
from klined.tui.fakes import (
    DEMO_NOW_MS,
    FakeChainRunner,
    FakeStatusSource,
    FakeWarehouseSource,
    demo_completeness,
    demo_snapshot,
)
from klined.tui.views.completeness import FIXED
from klined.tui.widgets.live_table import LiveTable

pytestmark = pytest.mark.anyio


def make_app() -> KlinedApp:
    return KlinedApp(
        FakeStatusSource(demo_snapshot()),
        FakeWarehouseSource(demo_completeness()),
        FakeChainRunner(),
        refresh=3600,
        clock=lambda: DEMO_NOW_MS,
    )


def header(app: KlinedApp) -> str:
    return str(app.query_one("#exchange-rates", Static).render())


async def test_72_hours_open_on_the_newest_hours() -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.press("2", "v", "right_square_bracket", "right_square_bracket")
        await app.workers.wait_for_complete()
        await pilot.pause()
        grid = app.query_one("#grid", LiveTable)
        assert len(grid.columns) == FIXED + 72
        assert grid.max_scroll_x > 0  # 72 hours do not fit 80 columns
        assert grid.scroll_x == grid.max_scroll_x  # scrolled to the newest ones
        assert grid.cursor_coordinate.column == FIXED + 71  # on the newest hour
        assert header(app).startswith("72h to 11-26 13:00")


async def test_o_switches_the_order_and_says_so() -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.press("2")
        await pilot.pause()
        grid = app.query_one("#grid", LiveTable)
        worst = list(grid.item_keys)
        assert "· worst first" in header(app)
        await pilot.press("o")
        await pilot.pause()
        assert "· by name" in header(app) and "worst first" not in header(app)
        assert grid.item_keys == sorted(worst) != worst
        assert grid.cursor_coordinate.row == 0
