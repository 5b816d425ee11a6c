"""Pictures of every view at 80x24 and 160x48, from frozen demo data (pytest-textual-snapshot).

After an intended change of the dashboard's look, review the report and refresh with
``pytest tests/test_tui_snapshots.py --snapshot-update``.
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
    demo_completeness,
    demo_job_runs,
    demo_snapshot,
    demo_so_far,
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
