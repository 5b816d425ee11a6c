"""The Streams view driven by keys, against a fake status source with known pairs."""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.abc
import msgspec
import pytest
from textual.pilot import Pilot
from textual.widgets import Input, Static

from klined.daemon.status_server import StatusServer
from klined.errors import StatusError
from klined.status import StatusSnapshot, StreamState
from klined.tui.app import KlinedApp
from klined.tui.fakes import (
    DEMO_NOW_MS,
    FakeChainRunner,
    FakeStatusSource,
    FakeWarehouseSource,
    demo_completeness,
    demo_job_runs,
    demo_snapshot,
)
from klined.tui.sources import SocketStatusSource
from klined.tui.widgets.banner import ProblemBanner
from klined.tui.widgets.live_table import LiveTable

pytestmark = pytest.mark.anyio

DOWN = "daemon not running: socket /x/klined.sock not found - start it with `klined run`"


def make_app(status: FakeStatusSource | None = None) -> KlinedApp:
    return KlinedApp(
        status or FakeStatusSource(demo_snapshot()),
        FakeWarehouseSource(demo_completeness(), demo_job_runs()),
        FakeChainRunner(),
        refresh=3600,  # the tests poll by hand
        clock=lambda: DEMO_NOW_MS,
    )


async def settle(app: KlinedApp, pilot: Pilot[None]) -> None:
    await app.workers.wait_for_complete()
    await pilot.pause()


async def refresh(app: KlinedApp, pilot: Pilot[None]) -> None:
    app.action_refresh_now()
    await settle(app, pilot)


def text_of(app: KlinedApp, selector: str) -> str:
    return str(app.query_one(selector, Static).render())


def streams(app: KlinedApp) -> LiveTable:
    return app.query_one("#stream-table", LiveTable)


def names(app: KlinedApp) -> list[str]:
    table = streams(app)
    pairs = zip(table.column_texts("exchange"), table.column_texts("pair"), strict=True)
    return [f"{exchange} {pair}" for exchange, pair in pairs]


async def test_problems_float_to_the_top() -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        table = streams(app)
        assert table.row_count == 28
        assert table.column_texts("state")[:6] == [
            "down",
            "stale",
            "backoff",
            "backoff",
            "unlisted",
            "unlisted",
        ]
        assert set(table.column_texts("state")[6:]) == {"connected"}
        assert names(app)[0] == "kraken FARTCOIN/USD"
        # at 80 columns the error is cut to its column; the line below the table has it all
        assert table.cell_text(0, "error").startswith("subscribe failed: ")
        assert table.cell_text(0, "error").endswith("…")
        assert table.cell_text(1, "age") == "2m02s"
        assert "28/28" in text_of(app, "#stream-count")
        # the highlighted row is spelled out below the table
        detail = text_of(app, "#stream-detail")
        assert "kraken FARTCOIN/USD down · last error: subscribe failed: pair not supported" in (
            detail
        )
        conns = app.query_one("#connections", LiveTable)
        assert conns.column_texts("conn") == ["binance-0", "kraken-0", "kraken-1"]
        assert conns.cell_text(2, "note").startswith("retry in 12s")
        assert "pid 4242" in text_of(app, "#daemon-line")


async def test_typing_filters_and_escape_clears() -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("slash")
        assert isinstance(app.focused, Input)
        await pilot.press(*"kraken back")
        await pilot.pause()
        assert names(app) == ["kraken TRUMP/USD", "kraken PENGU/USD"]
        assert "2/28" in text_of(app, "#stream-count")
        # q types into the filter instead of quitting
        await pilot.press("q")
        await pilot.pause()
        assert app.is_running
        assert names(app) == []
        assert "no pair matches" in text_of(app, "#stream-detail")
        await pilot.press("backspace", "enter")
        assert app.focused is streams(app)
        assert streams(app).row_count == 2
        await pilot.press("slash", "escape")
        await pilot.pause()
        assert app.query_one("#stream-filter", Input).value == ""
        assert streams(app).row_count == 28
        assert app.focused is streams(app)


async def test_sort_keys_cycle_and_reverse() -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("s")  # problems -> pair
        await pilot.pause()
        assert names(app)[:2] == ["binance APE/USD", "binance BTC/USD"]
        assert "sort pair" in text_of(app, "#stream-count")
        await pilot.press("S")
        await pilot.pause()
        assert names(app)[0] == "kraken WIF/USD"
        await pilot.press("s")  # age: silent pairs first, never-heard-from ones on top
        await pilot.pause()
        assert streams(app).column_texts("age")[:2] == ["—", "—"]
        await pilot.press("s", "s", "s")  # rate, reconnects, back to problems
        await pilot.pause()
        assert names(app)[0] == "kraken FARTCOIN/USD"


async def test_rows_update_in_place_and_the_cursor_follows_its_pair() -> None:
    status = FakeStatusSource(demo_snapshot())
    app = make_app(status)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        table = streams(app)
        await pilot.press("down")  # binance KSM/USD, stale
        assert table.selected_key == "binance:KSM/USD"
        row_keys = list(table.rows)
        # KSM recovers: it sinks among the healthy pairs; the cursor goes with it
        snap = msgspec.structs.replace(demo_snapshot(), now_ms=DEMO_NOW_MS + 2_000)
        for p in snap.pairs:
            if p.symbol == "KSM/USD" and p.exchange == "binance":
                p.state, p.last_error = StreamState.CONNECTED, ""
                p.last_message_ms = DEMO_NOW_MS + 1_500
        status.snapshot = snap
        await refresh(app, pilot)
        assert table.selected_key == "binance:KSM/USD"
        assert table.cursor_row == 5  # below the five pairs still in trouble
        assert table.cell_text(table.cursor_row, "state") == "connected"
        assert list(table.rows) == row_keys  # same rows, new contents: never cleared


async def test_survives_the_daemon_going_away_and_coming_back() -> None:
    status = FakeStatusSource(demo_snapshot())
    app = make_app(status)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        banner = app.query_one(ProblemBanner)
        assert not banner.has_class("-shown")

        status.error = StatusError(DOWN)
        await refresh(app, pilot)
        assert banner.has_class("-shown")
        assert DOWN in str(banner.render())
        assert "daemon DOWN" in app.sub_title
        # the last rows stay on screen, marked as old
        assert streams(app).row_count == 28
        assert "now unreachable" in text_of(app, "#daemon-line")
        assert "daemon not reachable" in text_of(app, "#chain-line")

        status.error = RuntimeError("garbage on the socket")  # anything else: still no crash
        await refresh(app, pilot)
        assert "garbage on the socket" in str(banner.render())

        status.error = None
        await refresh(app, pilot)
        assert not banner.has_class("-shown")
        assert "daemon ok" in app.sub_title
        assert "now unreachable" not in text_of(app, "#daemon-line")
        assert app.is_running


async def test_never_reached_daemon_says_how_to_start_it(tmp_path: Path) -> None:
    sock = tmp_path / "klined.sock"
    app = KlinedApp(
        SocketStatusSource(sock),
        FakeWarehouseSource(),
        refresh=3600,
        clock=lambda: DEMO_NOW_MS,
    )
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        text = str(app.query_one(ProblemBanner).render())
        assert f"daemon not running: socket {sock} not found - start it with `klined run`" in text
        assert streams(app).row_count == 0
        assert "no status from the daemon yet" in text_of(app, "#daemon-line")


async def test_socket_that_refuses_is_explained(tmp_path: Path) -> None:
    import socket

    sock = tmp_path / "klined.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    s.close()  # a socket file nobody listens on: what a killed daemon leaves behind
    with pytest.raises(StatusError) as info:
        await SocketStatusSource(sock, timeout=0.5).fetch()
    message = str(info.value)
    assert str(sock) in message
    assert "not running" in message


async def test_resizes_without_losing_anything() -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        for size in ((160, 48), (60, 20), (80, 24)):
            await pilot.resize_terminal(*size)
            await pilot.pause()
            assert streams(app).row_count == 28
        for key in ("2", "3", "1"):
            await pilot.press(key)
            await pilot.resize_terminal(100, 30)
            await pilot.pause()
        assert app.query_one("#views").active == "streams"  # type: ignore[attr-defined]


async def test_number_keys_switch_views_and_q_quits() -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        views = app.query_one("#views")
        await pilot.press("2")
        assert views.active == "completeness"  # type: ignore[attr-defined]
        assert app.focused is app.query_one("#grid")
        await pilot.press("3")
        assert views.active == "jobs"  # type: ignore[attr-defined]
        assert app.focused is app.query_one("#runs")
        await pilot.press("1")
        assert app.focused is streams(app)
        await pilot.press("q")
        await pilot.pause()
        assert not app.is_running


def test_snapshot_decodes_what_the_fake_sends() -> None:
    """The demo snapshot survives the wire format the daemon uses."""
    from klined.status import decode_snapshot, encode_snapshot

    snap = demo_snapshot()
    assert decode_snapshot(encode_snapshot(snap)) == snap
    assert isinstance(snap, StatusSnapshot)


async def test_real_status_socket_goes_away_and_comes_back(tmp_path: Path) -> None:
    """Against the daemon's own StatusServer: rows, outage message, recovery."""
    sock = tmp_path / "klined.sock"
    app = KlinedApp(
        SocketStatusSource(sock, timeout=2),
        FakeWarehouseSource(),
        refresh=3600,
        clock=lambda: DEMO_NOW_MS,
    )
    async with anyio.create_task_group() as tg, app.run_test(size=(80, 24)) as pilot:
        scope = anyio.CancelScope()

        async def serve(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            with scope:
                await StatusServer(sock, demo_snapshot).serve(task_status=task_status)

        await tg.start(serve)
        await refresh(app, pilot)
        assert streams(app).row_count == 28
        assert app.daemon_ok

        scope.cancel()  # the daemon stops: its socket goes away
        await anyio.wait_all_tasks_blocked()
        await refresh(app, pilot)
        banner = str(app.query_one(ProblemBanner).render())
        assert f"daemon not running: socket {sock} not found" in banner
        assert streams(app).row_count == 28  # last known rows, marked as old

        scope = anyio.CancelScope()
        await tg.start(serve)
        await refresh(app, pilot)
        assert app.daemon_ok
        assert not app.query_one(ProblemBanner).has_class("-shown")
        scope.cancel()


async def test_clicking_a_header_sorts_by_it() -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        table = streams(app)
        table.post_message(
            table.HeaderSelected(table, table.columns["pair"].key, 1, table.columns["pair"].label)
        )
        await pilot.pause()
        assert names(app)[0] == "binance APE/USD"
        table.post_message(
            table.HeaderSelected(table, table.columns["pair"].key, 1, table.columns["pair"].label)
        )
        await pilot.pause()
        assert names(app)[0] == "kraken WIF/USD"


async def test_the_daemon_line_says_the_role_and_shard_of_a_larger_setup() -> None:
    app = make_app()
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        assert "capture" not in text_of(app, "#daemon-line")  # one VM: nothing to say
    snap = demo_snapshot()
    snap.role, snap.shard = "capture", "2/3"
    app = make_app(FakeStatusSource(snap))
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        assert "daemon capture 2/3 · pid" in text_of(app, "#daemon-line")
