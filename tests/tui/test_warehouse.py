"""Completeness and Jobs views against a real (embedded) PostgreSQL with known rows."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from textual.pilot import Pilot
from textual.widgets import Static

from klined.errors import DatabaseError
from klined.model import HOUR_MS, MINUTE_MS, parse_time, to_datetime
from klined.tui.app import KlinedApp
from klined.tui.fakes import (
    DEMO_NOW_MS,
    FakeChainRunner,
    FakeStatusSource,
    demo_snapshot,
    hour_row,
    many_pairs_completeness,
    pending_row,
)
from klined.tui.sources import HourCompleteness, JobRun, PgWarehouseSource, embedded_dsn
from klined.tui.widgets.banner import ProblemBanner
from klined.tui.widgets.live_table import LiveTable
from klined.tui.widgets.so_far import SoFarLine

pytestmark = pytest.mark.anyio

SCHEMA = Path(__file__).resolve().parents[2] / "klined" / "warehouse" / "schema.sql"
LAST = parse_time("2026-11-26T12:00:00Z")  # last closed hour at DEMO_NOW_MS (13:47:12)

#: only what the TUI reads, for a tree where schema.sql has not landed
_MINIMAL_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS monitoring;
CREATE SCHEMA IF NOT EXISTS ops;
CREATE TABLE monitoring.hourly_completeness (
    exchange text, symbol text, hour_start timestamptz, expected int, ws_final int, rest int,
    archive int, trades int, no_trades int, ws_partial int, missing int, completion_rate numeric,
    refreshed_at timestamptz DEFAULT now(), pending boolean DEFAULT false,
    PRIMARY KEY (exchange, symbol, hour_start));
CREATE TABLE ops.job_runs (
    run_id bigserial PRIMARY KEY, hour_start timestamptz, step text, status text, rows bigint,
    started_at timestamptz, finished_at timestamptz, duration_ms int, error text, trigger text);
"""


async def create_schema(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA.read_text() if SCHEMA.is_file() else _MINIMAL_SCHEMA)
    finally:
        await conn.close()


async def insert(
    dsn: str, rows: Iterable[HourCompleteness] = (), runs: Iterable[JobRun] = ()
) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.copy_records_to_table(
            "hourly_completeness",
            schema_name="monitoring",
            columns=[
                "exchange",
                "symbol",
                "hour_start",
                "expected",
                "ws_final",
                "rest",
                "archive",
                "trades",
                "no_trades",
                "ws_partial",
                "missing",
                "completion_rate",
                "pending",
            ],
            records=[
                (
                    r.exchange,
                    r.symbol,
                    to_datetime(r.hour_ms),
                    r.expected,
                    *r.counts(),
                    r.complete / r.expected,
                    r.pending,
                )
                for r in rows
            ],
        )
        for run in runs:
            await conn.execute(
                "INSERT INTO ops.job_runs (hour_start, step, status, rows, started_at,"
                " finished_at, duration_ms, error, trigger)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                to_datetime(run.hour_ms) if run.hour_ms is not None else None,
                run.step,
                run.status,
                run.rows,
                to_datetime(run.started_ms) if run.started_ms else None,
                to_datetime(run.finished_ms) if run.finished_ms else None,
                run.duration_ms,
                run.error or None,
                run.trigger,
            )
    finally:
        await conn.close()


def known_rows() -> list[HourCompleteness]:
    rows = []
    for i in range(24):
        hour = LAST - i * HOUR_MS
        btc = {"rest": 5, "missing": 5} if i == 2 else {"archive": 60} if i == 3 else {}
        eth = {"ws_partial": 3} if i == 0 else {"no_trades": 4} if i == 1 else {}
        rows.append(hour_row("binance", "BTC/USD", hour, **btc))
        rows.append(hour_row("kraken", "ETH/USD", hour, **eth))
        if i < 20:  # the four oldest hours were never computed
            rows.append(hour_row("kraken", "SOL/USD", hour, trades=2))
    rows.append(hour_row("binance", "BTC/USD", LAST - 30 * HOUR_MS, missing=60))  # outside
    return rows


def known_runs() -> list[JobRun]:
    runs = []
    for hour in (LAST - HOUR_MS, LAST):
        t = hour + HOUR_MS + 5 * MINUTE_MS
        for step in ("flush", "bronze", "gapfill", "silver", "gold", "completeness"):
            failed = hour == LAST and step == "gapfill"
            runs.append(
                JobRun(
                    0,
                    hour,
                    step,
                    "failed" if failed else "ok",
                    0 if failed else 120,
                    t,
                    t + 1_500,
                    1_500,
                    "kraken REST 429: too many requests" if failed else "",
                    "schedule",
                )
            )
            t += 2_000
    t = LAST + HOUR_MS + 30 * MINUTE_MS
    runs.append(JobRun(0, LAST, "gapfill", "ok", 7, t, t + 900, 900, "", "manual"))
    return runs


@pytest.fixture
async def warehouse(pg_dsn: str) -> AsyncIterator[str]:
    await create_schema(pg_dsn)
    await insert(pg_dsn, known_rows(), known_runs())
    yield pg_dsn


def make_app(source: PgWarehouseSource) -> KlinedApp:
    return KlinedApp(
        FakeStatusSource(demo_snapshot()),
        source,
        FakeChainRunner(),
        refresh=3600,
        db_refresh=3600,
        clock=lambda: DEMO_NOW_MS,
    )


async def settle(app: KlinedApp, pilot: Pilot[None]) -> None:
    await app.workers.wait_for_complete()
    await pilot.pause()


def text_of(app: KlinedApp, selector: str) -> str:
    return str(app.query_one(selector, Static).render())


async def test_source_reads_the_window_and_the_ledger(warehouse: str) -> None:
    source = PgWarehouseSource(warehouse)
    try:
        rows = await source.completeness(LAST - 23 * HOUR_MS, LAST + HOUR_MS)
        assert len(rows) == 24 + 24 + 20
        btc = {r.hour_ms: r for r in rows if r.symbol == "BTC/USD"}
        assert btc[LAST - 2 * HOUR_MS].counts() == (50, 5, 0, 0, 0, 0, 5)
        assert btc[LAST - 3 * HOUR_MS].archive == 60 and btc[LAST - 3 * HOUR_MS].rate == 1.0
        runs = await source.job_runs(limit=5)
        assert [r.run_id for r in runs] == sorted((r.run_id for r in runs), reverse=True)
        assert runs[0].trigger == "manual" and runs[0].rows == 7
        assert runs[0].hour_ms == LAST
    finally:
        await source.aclose()


async def test_completeness_view_shows_the_known_hours(warehouse: str) -> None:
    app = make_app(PgWarehouseSource(warehouse))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("2")
        grid = app.query_one("#grid", LiveTable)
        # worst first: BTC lost 5 minutes, ETH has 3 provisional, SOL is complete where computed
        assert grid.item_keys == ["binance:BTC/USD", "kraken:ETH/USD", "kraken:SOL/USD"]
        assert [t.strip() for t in grid.column_texts("rate")] == ["99.7%", "99.8%", "100%"]
        assert len(grid.columns) == 3 + 24
        assert grid.get_row_height(grid.ordered_rows[0].key) == 3  # few pairs: stacked bars
        rates = text_of(app, "#exchange-rates")
        assert "binance 99.7% -5m" in rates
        assert "kraken 99.9% -3m" in rates  # SOL's uncomputed hours do not count as missing
        # the cursor walks to BTC at 10:00 (third-last column) and the line below explains it
        await pilot.press("end")
        await pilot.press("left", "left")
        await pilot.pause()
        detail = text_of(app, "#grid-detail")
        assert "binance BTC/USD 11-26 10:00 91.7%" in detail
        assert "ws_final 50 · rest 5 · missing 5" in detail
        # SOL's oldest hours were never computed
        await pilot.press("down", "down", "home", "right", "right", "right")  # 3 = first hour
        await pilot.pause()
        assert "kraken SOL/USD 11-25 13:00 n/a: not covered then" in text_of(app, "#grid-detail")
        assert grid.cell_text(2, f"h{LAST - 23 * HOUR_MS}").strip() == "·"
        # heat map: one line per pair, colour by completion
        await pilot.press("v")
        await pilot.pause()
        assert grid.get_row_height(grid.ordered_rows[0].key) == 1
        assert grid.cell_text(0, f"h{LAST - 2 * HOUR_MS}") == "█ "
        # fewer hours: the window shrinks to 12 and reloads
        await pilot.press("left_square_bracket")
        await settle(app, pilot)
        assert len(grid.columns) == 3 + 12
        assert "12h" in text_of(app, "#exchange-rates")
        assert [t.strip() for t in grid.column_texts("rate")] == ["99.3%", "99.6%", "100%"]


async def test_jobs_view_shows_steps_failures_and_attempts(warehouse: str) -> None:
    app = make_app(PgWarehouseSource(warehouse))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("3")
        runs = app.query_one("#runs", LiveTable)
        assert runs.column_texts("hour") == ["11-26 12:00", "11-26 11:00"]
        # the latest attempt per step wins: the manual gapfill fixed 12:00
        assert runs.cell_text(0, "s:gapfill") == "✓ 900ms"
        assert runs.cell_text(0, "s:silver") == "✓ 1.5s"
        detail = app.query_one("#run-detail", LiveTable)
        assert detail.column_texts("step")[:2] == ["gapfill", "completeness"]
        assert detail.cell_text(0, "trigger") == "manual"
        failed = detail.column_texts("status").index("✗ failed")
        assert detail.cell_text(failed, "error").startswith("kraken REST")  # cut at 80 columns
        assert "7 runs" in text_of(app, "#runs-title")
        await pilot.press("down")
        await pilot.pause()
        assert detail.row_count == 6
        assert "next 14:05 (in 17m48s)" in text_of(app, "#chain-line")


async def test_unreachable_database_is_explained_and_recovers(pg_server_dsn: str) -> None:
    name = "t_tui_late"
    dsn = urlunsplit(urlsplit(pg_server_dsn)._replace(path="/" + name))
    admin = await asyncpg.connect(pg_server_dsn)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    app = make_app(PgWarehouseSource(dsn, timeout=3))
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(app, pilot)
            banner = app.query_one(ProblemBanner)
            assert "database unreachable" in str(banner.render())
            assert name in str(banner.render())
            assert "db DOWN" in app.sub_title
            await pilot.press("2")
            assert "the database cannot be read" in text_of(app, "#grid-detail")

            await admin.execute(f'CREATE DATABASE "{name}"')
            await create_schema(dsn)
            await insert(dsn, known_rows()[:3])
            app.action_refresh_now()
            await settle(app, pilot)
            assert not banner.has_class("-shown")
            assert "db ok" in app.sub_title
            assert app.query_one("#grid", LiveTable).row_count == 3
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_no_server_at_all_is_a_message_not_a_crash() -> None:
    app = make_app(PgWarehouseSource("postgresql://klined:secret@127.0.0.1:1/klined", timeout=2))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        text = str(app.query_one(ProblemBanner).render())
        assert "database unreachable: postgresql://klined:***@127.0.0.1:1/klined" in text
        assert "secret" not in text
        assert app.is_running


def test_embedded_dsn_is_looked_up_never_started(tmp_path: Path) -> None:
    pgdata = tmp_path / "pgdata"
    with pytest.raises(DatabaseError, match="start the daemon with `klined run`"):
        embedded_dsn(pgdata)
    pgdata.mkdir()
    import os

    lines = [str(os.getpid()), str(pgdata), "1700000000", "54321", "/tmp", "localhost", "", ""]
    (pgdata / "postmaster.pid").write_text("\n".join(lines))
    assert embedded_dsn(pgdata) == "postgresql://postgres@/klined?host=/tmp&port=54321"
    assert not (pgdata / "PG_VERSION").exists()


async def test_five_hundred_pairs_stay_navigable(pg_dsn: str) -> None:
    await create_schema(pg_dsn)
    await insert(pg_dsn, many_pairs_completeness(500, 24))
    app = make_app(PgWarehouseSource(pg_dsn))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("2")
        grid = app.query_one("#grid", LiveTable)
        assert grid.row_count == 500
        assert grid.get_row_height(grid.ordered_rows[0].key) == 1  # heat map, automatically
        rates = grid.column_texts("rate")
        assert rates[-1].strip() == "100%"
        assert rates[0].strip() != "100%"
        await pilot.press("pagedown", "pagedown")
        await pilot.pause()
        assert 20 < grid.cursor_row < 499
        await pilot.press("ctrl+end", "end")
        await pilot.pause()
        assert grid.cursor_coordinate == (499, 3 + 23)
        last = grid.item_keys[-1].split(":")[1]
        assert f"binance {last} 11-26 12:00 100%" in text_of(app, "#grid-detail")
        # a refresh with the same data changes no cell and keeps the cursor where it was
        before = grid.cursor_coordinate
        app.action_refresh_now()
        await settle(app, pilot)
        assert grid.cursor_coordinate == before
        assert grid.row_count == 500


async def test_the_hour_in_progress_and_the_live_lag_are_shown(warehouse: str) -> None:
    conn = await asyncpg.connect(warehouse)
    try:
        await conn.execute(
            "INSERT INTO ops.pairs (exchange, symbol, quote_asset, native_symbol)"
            " VALUES ('binance', 'BTC/USD', 'USD', 'BTCUSD'),"
            "        ('kraken', 'ETH/USD', 'USD', 'ETH/USD')"
        )
    finally:
        await conn.close()
    source = PgWarehouseSource(warehouse)
    so_far = await source.hour_so_far()
    assert [(r.exchange, r.pairs, r.final) for r in so_far] == [("binance", 1, 0), ("kraken", 1, 0)]
    elapsed = so_far[0].minutes_elapsed
    assert so_far[0].missing == elapsed and so_far[0].expected == elapsed
    app = make_app(source)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("2")
        line = str(app.query_one(SoFarLine).render())
        assert line.startswith("so far ") and "binance" in line and "kraken" in line
        if elapsed:
            assert f"binance 0.0% -{elapsed}m" in line
        assert "live p50/p99 0.4/1.3s" in app.sub_title  # the demo snapshot's live lag


async def test_pending_hours_are_drawn_apart_and_counted_missing(pg_dsn: str) -> None:
    """Hours the chain has not processed are hatched, counted missing in the rates, and the
    line below the table says so, read from a real warehouse."""
    await create_schema(pg_dsn)
    rows = [hour_row("binance", "BTC/USD", LAST - i * HOUR_MS) for i in range(3, 24)]
    rows += [pending_row("binance", "BTC/USD", LAST - i * HOUR_MS) for i in range(3)]
    await insert(pg_dsn, rows)
    app = make_app(PgWarehouseSource(pg_dsn))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("2")
        await pilot.pause()
        grid = app.query_one("#grid", LiveTable)
        rates = text_of(app, "#exchange-rates")
        assert "3h pending" in rates and "binance 87.5% -180m" in rates
        # the cursor opens on the newest hour: pending
        assert "binance BTC/USD 11-26 12:00 0.0% pending: not processed by the chain yet" in (
            text_of(app, "#grid-detail")
        )
        assert "░" in grid.cell_text(0, f"h{LAST}") and "█" in grid.cell_text(
            0, f"h{LAST - 3 * HOUR_MS}"
        )
        await pilot.press("v")
        await pilot.pause()
        assert grid.cell_text(0, f"h{LAST}") == "░ "
        assert grid.cell_text(0, f"h{LAST - 3 * HOUR_MS}") == "█ "


def test_a_capture_host_points_at_the_chain_hosts_warehouse() -> None:
    from klined.config import parse_config
    from klined.tui.sources import warehouse_dsn

    with pytest.raises(DatabaseError, match="capture host"):
        warehouse_dsn(parse_config('[daemon]\nrole = "capture"\n'))
    cfg = parse_config('[daemon]\nrole = "capture"\n[database]\ndsn = "postgresql://h/db"\n')
    assert warehouse_dsn(cfg) == "postgresql://h/db"
