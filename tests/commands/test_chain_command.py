"""Exit codes and refusals that tell the truth: ``klined chain`` refuses an open hour, a chain
or backfill whose REST requests failed exits 1 and says ``incomplete``, and a backfill waiting
for the chain lock says for whom. Real subprocesses, a real PostgreSQL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from klined.config import load_config
from klined.jobs.backfill import BackfillResult
from klined.jobs.fetcher import PairReport
from klined.jobs.lock import chain_lock, hour_label
from klined.model import HOUR_MS, floor_hour, iso, to_datetime
from klined.sim import SimClock
from klined.warehouse.database import open_database
from tests.fixtures.s3 import free_port

KLINED = [sys.executable, "-m", "klined.cli"]


def write_config(path: Path, dsn: str, rest: dict[str, str], pairs: list[str]) -> Path:
    lines = [
        "[daemon]",
        f'data_dir = "{path.parent / "data"}"',
        "[database]",
        f'dsn = "{dsn}"',
        'readonly_role = ""',
        "[chain]",
        "rest_retry_hours = 48",
    ]
    for ex in ("binance", "kraken"):
        lines.append(f"[exchanges.{ex}]")
        if ex not in rest:
            lines.append("enabled = false")
            continue
        lines += [
            f"pairs = {pairs!r}".replace("'", '"'),
            f'rest_url = "{rest[ex]}"',
            "rest_timeout_s = 2.0",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("KLINED_DSN", "KLINED_CONFIG")}
    out["PYTHONUNBUFFERED"] = "1"
    return out


def klined(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KLINED, *args], capture_output=True, text=True, timeout=timeout, env=env()
    )


def test_the_open_hour_is_refused_unless_asked_for(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "klined.toml", "postgresql://nowhere.invalid/x", {"binance": "http://x"}, []
    )
    now = int(time.time() * 1000)
    current = iso(floor_hour(now))
    proc = klined("chain", "-c", str(cfg), "--hour", current)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: hour ") and "is still open" in proc.stderr
    assert "--allow-open-hour" in proc.stderr
    later = klined("chain", "-c", str(cfg), "--from", iso(now - 3 * HOUR_MS), "--to", iso(now))
    assert later.returncode == 2 and "is still open" in later.stderr
    future = klined("chain", "-c", str(cfg), "--hour", iso(now + 2 * HOUR_MS))
    assert future.returncode == 2 and "is in the future" in future.stderr
    # asked for: it runs (here it then fails to reach the database: exit 1, not 2)
    allowed = klined("chain", "-c", str(cfg), "--hour", current, "--allow-open-hour")
    assert allowed.returncode == 1 and "nowhere.invalid" in allowed.stderr


@pytest.mark.integration
def test_a_chain_whose_requests_failed_exits_1_and_says_incomplete(
    tmp_path: Path, pg_dsn: str
) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens: every request fails
    cfg = write_config(tmp_path / "klined.toml", pg_dsn, {"binance": down}, ["BTC/USD", "ETH/USD"])
    hour = floor_hour(int(time.time() * 1000)) - 3 * HOUR_MS
    proc = klined("chain", "-c", str(cfg), "--hour", iso(hour))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    table = proc.stdout.splitlines()
    assert table[0].split()[:4] == ["hour", "flush", "bronze", "gapfill"]
    assert "incomplete 0 (120 missing)" in table[1] and "ok 0 (" not in table[1]
    assert "gapfill: 120 minutes left missing, requests failed: exchange unreachable (120)" in (
        proc.stdout
    )
    assert "1 hour(s), 1 incomplete" in proc.stdout
    assert "incomplete: REST requests failed and left minutes missing" in proc.stderr

    async def recorded() -> list[tuple[str, str]]:
        async with open_database(load_config(cfg)) as db:
            rows = await db.fetch(
                "SELECT step, status FROM ops.job_runs WHERE hour_start IS NOT NULL"
            )
        return [(r["step"], r["status"]) for r in rows]

    runs = anyio.run(recorded)
    assert ("gapfill", "incomplete") in runs and ("completeness", "ok") in runs


@pytest.mark.integration
def test_a_backfill_whose_requests_failed_exits_1(tmp_path: Path, pg_dsn: str) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    cfg = write_config(tmp_path / "klined.toml", pg_dsn, {"binance": down}, ["BTC/USD"])
    end = floor_hour(int(time.time() * 1000)) - 3 * HOUR_MS
    proc = klined("backfill", "-c", str(cfg), "--from", iso(end - HOUR_MS), "--to", iso(end))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"\b60  exchange (unreachable|error) \(60\)", proc.stdout), proc.stdout
    assert "some minutes are still missing" in proc.stderr


def test_every_failed_request_counts_against_a_backfill() -> None:
    """Minutes missing because the exchange could not be reached at all make a backfill fail
    like any other failed request (it exited 0 for them)."""
    for reason in ("exchange unreachable", "exchange error", "rate limited"):
        report = PairReport("binance", "BTC/USD", wanted=60, done=60)
        report.missing[reason] = 60
        assert not BackfillResult(reports=[report]).ok, reason
    quiet = PairReport("binance", "BTC/USD", wanted=60, done=60)
    quiet.missing["not yet available at the exchange"] = 3
    assert BackfillResult(reports=[quiet]).ok


@pytest.mark.anyio
@pytest.mark.integration
async def test_a_backfill_waiting_for_the_chain_lock_says_for_whom(
    sim_factory: Any, tmp_path: Path, pg_dsn: str
) -> None:
    async with sim_factory(pairs=["BTC/USD"], clock=SimClock.realtime()) as sim:
        rest = {"binance": sim.urls("binance")[1]}
        cfg_path = write_config(tmp_path / "klined.toml", pg_dsn, rest, ["BTC/USD"])
        cfg = load_config(cfg_path)
        end = floor_hour(int(time.time() * 1000)) - 2 * HOUR_MS
        argv = [*KLINED, "backfill", "-c", str(cfg_path), "--from", iso(end - HOUR_MS)]
        log = bytearray()
        async with open_database(cfg, apply_schema=True) as db:
            release = anyio.Event()

            async def daemon_catching_up() -> None:
                async with chain_lock(db, description="the daemon's catch-up of 2026-12-03T14:00Z"):
                    await release.wait()

            async with anyio.create_task_group() as tg:
                await db.execute("SELECT 1")
                tg.start_soon(daemon_catching_up)
                await anyio.sleep(0.5)
                async with await anyio.open_process(
                    [*argv, "--to", iso(end)], stdout=subprocess.DEVNULL, env=env()
                ) as proc:

                    async def read() -> None:
                        assert proc.stderr is not None
                        async for chunk in proc.stderr:
                            log.extend(chunk)

                    tg.start_soon(read)
                    wanted = (
                        b"waiting for the chain lock, held by the daemon's catch-up of"
                        b" 2026-12-03T14:00Z (PostgreSQL backend pid"
                    )
                    with anyio.fail_after(60):
                        while wanted not in log:  # noqa: ASYNC110 - a growing buffer
                            await anyio.sleep(0.1)
                    assert proc.returncode is None  # it waits; it has not given up
                    merges = "SELECT count(*) FROM ops.job_runs WHERE trigger = 'backfill'"
                    assert await db.fetchval(merges) == 0
                    release.set()
                    with anyio.fail_after(60):
                        code = await proc.wait()
            assert code == 0, log.decode()
            assert await db.fetchval(merges) > 0
            silver = await db.fetchval(
                "SELECT count(*) FROM silver.fact_ohlcv WHERE interval_start >= $1",
                to_datetime(end - HOUR_MS),
            )
            assert silver == 60


@pytest.mark.integration
def test_a_chain_outside_the_coverage_says_how_to_cover_it(tmp_path: Path, pg_dsn: str) -> None:
    """Nothing captured or backfilled for these pairs: the chain runs the hour, and says that
    its completeness is not counted and how a backfill would cover it."""
    cfg = write_config(tmp_path / "klined.toml", pg_dsn, {"binance": "http://x"}, ["BTC/USD"])
    hour = floor_hour(int(time.time() * 1000)) - 5 * HOUR_MS
    proc = klined("chain", "-c", str(cfg), "--hour", iso(hour), "--step", "completeness")
    assert proc.returncode == 0, proc.stderr
    assert "note: 1 pair(s) are not covered for all of these hours" in proc.stderr
    frm, to = hour_label(hour), hour_label(hour + HOUR_MS)
    assert f"`klined backfill --from {frm} --to {to}` covers them" in proc.stderr
