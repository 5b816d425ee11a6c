"""Pictures of every view at 80x24 and 160x48, from frozen demo data (pytest-textual-snapshot).

80x24 is what an operator has over SSH: every view, the 72 h heat map (it must open on the
newest hours), an error-heavy streams table, a catch-up with pending hours and a chain waiting
for the lock, and the Jobs view after ``r``. After an intended change of the dashboard's look,
review the report and refresh with ``pytest tests/tui/test_snapshots.py --snapshot-update``
(and the docs' pictures with ``docs/make_screenshots.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from textual.pilot import Pilot

from klined.errors import StatusError
from klined.tui.app import KlinedApp
from klined.tui.fakes import (
    DEMO_NOW_MS,
    FakeChainRunner,
    FakeStatusSource,
    FakeWarehouseSource,
    catching_up_completeness,
    catching_up_job_runs,
    catching_up_snapshot,
    demo_completeness,
    demo_job_runs,
    demo_snapshot,
    demo_so_far,
    error_heavy_snapshot,
    many_pairs_completeness,
    unreachable_database,
)

SIZES = [(80, 24), (160, 48)]
Snap = Callable[..., bool]


def demo_app(**kwargs: Any) -> KlinedApp:
    return KlinedApp(
        kwargs.pop("status", FakeStatusSource(demo_snapshot())),
        kwargs.pop(
            "warehouse", FakeWarehouseSource(demo_completeness(), demo_job_runs(), demo_so_far())
        ),
        FakeChainRunner(),
        refresh=3600,
        clock=lambda: DEMO_NOW_MS,
        **kwargs,
    )


async def loaded(pilot: Pilot[None]) -> None:
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("view", ["1", "2", "3"], ids=["streams", "completeness", "jobs"])
def test_view(snap_compare: Snap, view: str, size: tuple[int, int]) -> None:
    assert snap_compare(demo_app(), press=[view], terminal_size=size, run_before=loaded)


def test_streams_filtered(snap_compare: Snap) -> None:
    assert snap_compare(demo_app(), press=["slash", *"kraken", "enter"], run_before=loaded)


def test_completeness_heat_map_of_500_pairs(snap_compare: Snap) -> None:
    app = demo_app(warehouse=FakeWarehouseSource(many_pairs_completeness(500, 24)))
    assert snap_compare(app, press=["2"], run_before=loaded)


def test_nothing_reachable(snap_compare: Snap) -> None:
    status = FakeStatusSource()
    status.error = StatusError(
        "daemon not running: socket /run/klined/klined.sock not found - start it with `klined run`"
    )
    warehouse = FakeWarehouseSource()
    warehouse.error = unreachable_database()
    assert snap_compare(demo_app(status=status, warehouse=warehouse), run_before=loaded)


SMALL = (80, 24)


def test_completeness_heat_map_of_72_hours_opens_on_the_newest(snap_compare: Snap) -> None:
    press = ["2", "v", "right_square_bracket", "right_square_bracket"]
    assert snap_compare(demo_app(), press=press, terminal_size=SMALL, run_before=loaded)


def test_error_heavy_streams_fit_80_columns(snap_compare: Snap) -> None:
    app = demo_app(status=FakeStatusSource(error_heavy_snapshot()))
    assert snap_compare(app, press=["1"], terminal_size=SMALL, run_before=loaded)


def catching_up_app() -> KlinedApp:
    return demo_app(
        status=FakeStatusSource(catching_up_snapshot()),
        warehouse=FakeWarehouseSource(catching_up_completeness(), catching_up_job_runs()),
    )


@pytest.mark.parametrize("keys", [["2"], ["2", "v"], ["3"]], ids=["bars", "heat", "jobs"])
def test_catching_up_shows_pending_hours_and_whom_the_chain_waits_for(
    snap_compare: Snap, keys: list[str]
) -> None:
    assert snap_compare(catching_up_app(), press=keys, terminal_size=SMALL, run_before=loaded)


def test_jobs_after_running_the_chain_by_hand(snap_compare: Snap) -> None:
    async def run_it(pilot: Pilot[None]) -> None:
        await loaded(pilot)
        await pilot.press("3", "r", "y")
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()

    assert snap_compare(demo_app(), terminal_size=SMALL, run_before=run_it)
