"""``klined sim``: a simulator a person can start, point a client at, and stop with Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from klined.config import parse_config


def test_klined_sim_runs_prints_config_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    plan = tmp_path / "faults.json"
    rule = {"kind": "http_5xx", "exchange": "kraken", "request": 2}
    plan.write_text(json.dumps({"rules": [rule]}))
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "klined.cli", "sim", "--binance-port", "0", "--kraken-port",
            "0", "--speed", "60", "--seed", "5", "--pairs", "BTC/USD,ETH/USD",
            "--faults", str(plan),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C" in line:
                break
        text = "".join(lines)
        binance = re.search(r"binance\s+ws (\S+)\s+rest (\S+)", text)
        kraken = re.search(r"kraken\s+ws (\S+)\s+rest (\S+)", text)
        assert binance and kraken, text
        assert kraken.group(1).endswith("/v2")
        snippet = text.split("# paste into klined.toml:")[1].split("Ctrl-C")[0]
        cfg = parse_config(snippet)  # the snippet is valid klined config
        assert cfg.ws_url("binance") == binance.group(1)
        assert cfg.rest_url("kraken") == kraken.group(2)

        with httpx.Client(timeout=10) as client:
            assert client.get(binance.group(2) + "/api/v3/ping").json() == {}
            info = client.get(binance.group(2) + "/api/v3/exchangeInfo").json()
            assert {"BTCUSD", "ETHUSD", "BTCUSDT"} <= {s["symbol"] for s in info["symbols"]}
            assert client.get(kraken.group(2) + "/0/public/Time").json()["error"] == []
            second = client.get(kraken.group(2) + "/0/public/Time")
            assert second.status_code == 503  # the scripted fault
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "stopped:" in out


def test_klined_sim_rejects_a_bad_fault_plan(tmp_path: Path) -> None:
    plan = tmp_path / "faults.toml"
    plan.write_text('[[rules]]\nkind = "meteor"\n')
    result = subprocess.run(
        [sys.executable, "-m", "klined.cli", "sim", "--faults", str(plan)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "unknown fault kind" in result.stderr
