"""``klined backfill`` and ``klined chain`` on the command line: argument checking (exit 2),
dry run, a real run against a real-time simulator, and re-running it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from klined.cli import main
from klined.model import HOUR_MS, floor_hour, iso
from klined.sim import SimClock

PAIRS = ["BTC/USD", "KSM/USD"]


def write_config(path: Path, dsn: str, sim: Any | None = None) -> Path:
    lines = [
        "[daemon]",
        f'data_dir = "{path.parent / "data"}"',
        "[database]",
        f'dsn = "{dsn}"',
        'readonly_role = ""',
    ]
    for ex in ("binance", "kraken"):
        lines += [f"[exchanges.{ex}]", f"pairs = {PAIRS!r}".replace("'", '"')]
        if sim is not None:
            ws, rest = sim.urls(ex)
            lines += [f'ws_url = "{ws}"', f'rest_url = "{rest}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def run(args: list[str]) -> int:
    try:
        rv = main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return int(rv or 0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from", "2026-10-02", "--to", "2026-10-01"], "reversed range"),
        (["--from", "2026-10-01", "--to", "2026-10-01"], "empty range"),
        (["--from", "2099-01-01", "--to", "2099-02-01"], "in the future"),
        (["--from", "yesterday", "--to", "2026-10-01"], "--from"),
        (
            ["--from", "2026-10-01", "--to", "2026-10-02", "--exchange", "coinbase"],
            "unknown exchange",
        ),
        (["--from", "2026-10-01", "--to", "2026-10-02", "--pair", "DOGE/USD"], "not configured"),
        (["--from", "2026-10-01", "--to", "2026-10-02", "--pair", "btc-usd"], "canonical pair"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(
    tmp_path: Path, capsys: Any, args: list[str], message: str
) -> None:
    cfg = write_config(tmp_path / "klined.toml", "postgresql://nowhere.invalid/x")
    assert run(["backfill", "-c", str(cfg), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error:")


@pytest.mark.anyio
@pytest.mark.integration
async def test_cli_dry_run_then_real_run_then_rerun(
    sim_factory: Any, pg_dsn: str, tmp_path: Path, capsys: Any
) -> None:
    async with sim_factory(pairs=PAIRS, clock=SimClock.realtime()) as sim:
        cfg = str(write_config(tmp_path / "klined.toml", pg_dsn, sim))
        end = floor_hour(int(time.time() * 1000)) - 20 * HOUR_MS  # beyond Kraken's OHLC window
        rng = ["--from", iso(end - 2 * HOUR_MS), "--to", iso(end)]

        code = await anyio.to_thread.run_sync(run, ["backfill", "-c", cfg, *rng, "--dry-run"])
        out = capsys.readouterr().out
        assert code == 0 and "TOTAL" in out and "240" in out  # 2 pairs x 120 minutes
        assert sim.stats.requests["binance"] == 0 and sim.stats.requests["kraken"] == 0

        code = await anyio.to_thread.run_sync(run, ["backfill", "-c", cfg, *rng])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "still missing" not in out and "BTC/USD" in out and "candles/s" in out
        first = dict(sim.stats.requests)
        assert first["binance"] >= 2 and first["kraken"] >= 2

        code = await anyio.to_thread.run_sync(run, ["backfill", "-c", cfg, *rng])
        out = capsys.readouterr().out
        assert code == 0 and "0 rows" in out
        assert dict(sim.stats.requests) == first  # nothing fetched the second time

        code = await anyio.to_thread.run_sync(
            run, ["chain", "-c", cfg, "--hour", iso(end - HOUR_MS), "--step", "silver",
                  "--step", "gold", "--step", "completeness"]
        )  # fmt: skip
        out = capsys.readouterr().out
        assert code == 0 and "completeness" in out and "ok 0" in out


@pytest.mark.integration
@pytest.mark.parametrize("command", ["chain", "backfill"])
def test_logs_are_json_under_systemd_unless_configured_otherwise(
    tmp_path: Path, pg_dsn: str, command: str
) -> None:
    """``log_json = false`` is the default, not a demand for human lines: under systemd the
    commands log JSON, as ``klined run`` does."""
    cfg = write_config(tmp_path / "klined.toml", pg_dsn)
    cfg.write_text('[daemon]\nlog_level = "DEBUG"\n' + cfg.read_text().replace("[daemon]\n", ""))
    end = floor_hour(int(time.time() * 1000)) - 20 * HOUR_MS
    args = {
        "chain": ["--hour", iso(end), "--step", "completeness"],
        "backfill": ["--from", iso(end - HOUR_MS), "--to", iso(end), "--dry-run"],
    }[command]
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "KLINED_DSN")}
    env["INVOCATION_ID"] = "0123456789abcdef"  # what systemd sets for a service
    proc = subprocess.run(
        [sys.executable, "-m", "klined.cli", command, "-c", str(cfg), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    human = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}Z ")
    assert not [line for line in proc.stderr.splitlines() if human.match(line)], proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert records and all({"level", "message"} <= set(r) for r in records), proc.stderr
