"""The embedded PostgreSQL's lifecycle (``open_database`` without a DSN): every exit path
stops the server this process started, and only a server nobody else uses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
import pytest
from loguru import logger

import klined.warehouse.embedded as embedded_pg
from klined.config import Config, DaemonConfig
from klined.warehouse.database import open_database
from tests.support.process import postgres_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def embedded_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.delenv("KLINED_DSN", raising=False)
    return Config(daemon=DaemonConfig(data_dir=str(tmp_path / "data")))


async def test_cancelled_during_start_up_stops_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = embedded_config(tmp_path, monkeypatch)
    pgdata = cfg.data_dir / "pgdata"
    real_start = embedded_pg.start_server_sync
    with anyio.CancelScope() as scope:

        def start_then_interrupt(path: Path) -> Any:
            server = real_start(path)
            assert postgres_for(pgdata)
            # Ctrl-C lands just as the server is up, before klined has connected to it
            anyio.from_thread.run_sync(scope.cancel)
            return server

        monkeypatch.setattr(embedded_pg, "start_server_sync", start_then_interrupt)
        async with open_database(cfg):
            pytest.fail("open_database went on after its start-up was cancelled")
    assert scope.cancelled_caught
    assert not postgres_for(pgdata)
    assert not (pgdata / "postmaster.pid").exists()


#: a process that opens the embedded server on ``argv[1]`` and holds it until killed
HOLDER = """
import sys, anyio
from klined.config import Config, DaemonConfig
from klined.warehouse.database import open_database

async def main():
    async with open_database(Config(daemon=DaemonConfig(data_dir=sys.argv[1]))):
        print("up", flush=True)
        await anyio.sleep_forever()

anyio.run(main)
"""


async def start_holder(data_dir: Path) -> anyio.abc.Process:
    """A separate process using the embedded server under ``data_dir`` (it is up on return)."""
    env = {k: v for k, v in os.environ.items() if k != "KLINED_DSN"}
    proc = await anyio.open_process(
        [sys.executable, "-c", HOLDER, str(data_dir)], stderr=subprocess.DEVNULL, env=env
    )
    assert proc.stdout is not None
    with anyio.fail_after(60):
        line = await proc.stdout.receive()
    assert line.strip() == b"up"
    return proc


async def test_a_killed_process_does_not_keep_the_server_running_forever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = embedded_config(tmp_path, monkeypatch)
    pgdata = cfg.data_dir / "pgdata"
    holder = await start_holder(cfg.data_dir)
    async with holder:
        holder.kill()  # kill -9: no exit handler runs, its pid stays in the handle list
        await holder.wait()
    assert postgres_for(pgdata)
    handles = pgdata / ".handle_pids.json"
    assert json.loads(handles.read_text()) == [holder.pid]

    async with open_database(cfg) as db:  # finds the orphaned server and uses it
        assert db.embedded and await db.fetchval("SELECT 1") == 1
        assert json.loads(handles.read_text()) == [os.getpid()]
    assert not postgres_for(pgdata), "the last live user stops the server"
    assert json.loads(handles.read_text()) == []


async def test_the_stop_log_says_whether_the_server_stopped_or_stays_for_another_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = embedded_config(tmp_path, monkeypatch)
    pgdata = cfg.data_dir / "pgdata"
    messages: list[str] = []
    handler = logger.add(lambda m: messages.append(m.record["message"]), format="{message}")
    try:
        holder = await start_holder(cfg.data_dir)
        async with holder:
            async with open_database(cfg) as db:
                assert await db.fetchval("SELECT 1") == 1
            assert postgres_for(pgdata), "another process still uses it"
            left = [m for m in messages if "embedded PostgreSQL" in m and "left running" in m]
            assert len(left) == 1 and f"still used by process(es) {holder.pid}" in left[0]
            assert "embedded PostgreSQL stopped" not in messages

            holder.send_signal(signal.SIGINT)  # the holder exits cleanly: it stops the server
            with anyio.fail_after(60):
                await holder.wait()
        assert not postgres_for(pgdata)

        messages.clear()
        async with open_database(cfg) as db:
            assert await db.fetchval("SELECT 1") == 1
        assert not postgres_for(pgdata)
        assert "embedded PostgreSQL stopped" in messages
        assert not [m for m in messages if "left running" in m or "still running" in m]
    finally:
        logger.remove(handler)


async def test_nested_opens_in_one_process_share_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = embedded_config(tmp_path, monkeypatch)
    pgdata = cfg.data_dir / "pgdata"
    async with open_database(cfg) as outer:
        async with open_database(cfg) as inner:
            assert await inner.fetchval("SELECT 1") == 1
        assert postgres_for(pgdata), "the outer context still uses it"
        assert await outer.fetchval("SELECT 2") == 2
    assert not postgres_for(pgdata)
    # and a later open in this process starts it again
    async with open_database(cfg) as again:
        assert await again.fetchval("SELECT 3") == 3
    assert not postgres_for(pgdata)


OPEN_AND_CLOSE = """
import sys, anyio
from klined.config import Config, DaemonConfig
from klined.warehouse.database import open_database

async def main():
    async with open_database(Config(daemon=DaemonConfig(data_dir=sys.argv[1]))) as db:
        print(await db.fetchval("SELECT 40 + 2"), flush=True)

anyio.run(main)
"""


async def test_no_runtime_dir_warning_without_a_login_session(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("KLINED_DSN", "XDG_RUNTIME_DIR")}
    result = await anyio.run_process(
        [sys.executable, "-W", "default", "-c", OPEN_AND_CLOSE, str(tmp_path / "data")],
        env=env,
        check=False,
    )
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert result.stdout.strip() == b"42"
    assert "XDG_RUNTIME_DIR" not in err and "Warning" not in err, err
    assert "embedded PostgreSQL stopped" in err
    assert not postgres_for(tmp_path / "data" / "pgdata")
