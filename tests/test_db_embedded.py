"""The embedded PostgreSQL's lifecycle (``klined.db.open_database`` without a DSN): every exit
path stops the server this process started, and only a server nobody else uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import psutil
import pytest

import klined.db as db_module
from klined.config import Config, DaemonConfig
from klined.db import open_database

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def postgres_for(pgdata: Path) -> list[int]:
    """Live postgres processes whose command line names this data directory."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline", "status"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if "postgres" in (proc.info["name"] or "") and str(pgdata) in cmdline:
            found.append(proc.pid)
    return found


def embedded_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.delenv("KLINED_DSN", raising=False)
    return Config(daemon=DaemonConfig(data_dir=str(tmp_path / "data")))


async def test_cancelled_during_start_up_stops_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = embedded_config(tmp_path, monkeypatch)
    pgdata = cfg.data_dir / "pgdata"
    real_start = db_module._start_embedded_sync
    with anyio.CancelScope() as scope:

        def start_then_interrupt(path: Path) -> Any:
            server = real_start(path)
            assert postgres_for(pgdata)
            # Ctrl-C lands just as the server is up, before klined has connected to it
            anyio.from_thread.run_sync(scope.cancel)
            return server

        monkeypatch.setattr(db_module, "_start_embedded_sync", start_then_interrupt)
        async with open_database(cfg):
            pytest.fail("open_database went on after its start-up was cancelled")
    assert scope.cancelled_caught
    assert not postgres_for(pgdata)
    assert not (pgdata / "postmaster.pid").exists()
