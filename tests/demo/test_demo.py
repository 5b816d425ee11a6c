"""``klined demo`` as CI and a user run it: a subprocess, its printed summary, its exit code,
moto's bucket, and no PostgreSQL left behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from klined.lake import parse_key
from tests.support.process import postgres_for

pytestmark = pytest.mark.integration

PAIRS = 3
HOURS = 2
KLINED = [sys.executable, "-m", "klined.cli"]


def demo_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("KLINED_DSN", None)
    env.pop("KLINED_CONFIG", None)
    return env


def row(summary: str, name: str) -> list[str]:
    """The cells of the summary line starting with ``name`` under its section."""
    for line in summary.splitlines():
        cells = line.split()
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no {name!r} line in:\n{summary}")


def section(summary: str, title: str) -> str:
    """The summary's lines from the section starting with ``title`` to the next blank line."""
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return "\n".join(lines[start:end])


def number(cell: str) -> int:
    return int(cell.replace(",", ""))


def test_headless_demo_streams_uploads_and_computes_completeness(
    tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    workdir = tmp_path / "demo"
    argv = f"demo --headless --duration 8 --pairs {PAIRS} --hours {HOURS}".split()
    argv += ["--dir", str(workdir), "--s3-endpoint", s3_endpoint, "--bucket", s3_bucket]
    proc = subprocess.run(
        [*KLINED, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=demo_env(),
    )
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err[-4000:]}"

    # streams connected on both exchanges, with events captured
    streams = section(out, "streams")
    for ex in ("binance", "kraken"):
        cells = row(streams, ex)
        assert cells[1] == "yes", streams
        assert number(cells[2]) == PAIRS
        assert number(cells[3]) > 0

    # parts written, uploaded and verified; the bucket holds them under the lake layout
    lake = section(out, "lake")
    parts = re.search(r"lake\s+([\d,]+) part\(s\) written", lake)
    assert parts is not None, lake
    written = number(parts[1])
    uploaded = re.search(r"([\d,]+) uploaded and verified in s3://(\S+)", lake)
    assert uploaded is not None, lake
    assert written > 0 and number(uploaded[1]) == written and uploaded[2] == s3_bucket
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    objects = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    keys = [k for k in objects if not k.startswith("datasets/")]
    # the daemon's parts, and the seeding backfill's REST rows (which enter the lake first)
    assert len([k for k in keys if "-fill_" not in k]) == written
    assert any("-fill_" in k for k in keys)
    parsed = [parse_key(k) for k in keys]  # every object is a lake key
    assert {p.exchange for p in parsed} == {"binance", "kraken"}
    local = {p.relative_to(workdir / "lake").as_posix() for p in workdir.rglob("part-*.jsonl.gz")}
    assert set(keys) == local

    # the live path wrote finals into silver as they closed, and says how the minutes arrived
    live = section(out, "live path")
    assert "silver write(s) as candles closed" in live and "0 batch(es) dropped" in live, out
    assert "arrived live" in live or "no whole minute in this run" in live, live

    # completeness of the seeded hours: every pair-hour, counts adding up to expected
    comp = section(out, "completeness")
    assert f"({HOURS} h)" in comp
    for ex in ("binance", "kraken"):
        cells = row(comp, ex)
        expected, *counts = (number(c) for c in cells[1:9])
        assert expected == HOURS * PAIRS * 60
        assert sum(counts) == expected, comp
        assert cells[9] == "100.00%", comp  # seeded by REST from the simulator's truth
    gold = section(out, "gold rows")
    for ex in ("binance", "kraken"):
        counts = [number(c) for c in row(gold, ex)[1:]]
        assert counts[:4] == [n * HOURS * PAIRS for n in (12, 4, 2, 1)], gold
        # 4h and 1d: the buckets the seeded hours fall in (one or two, by the time of day)
        assert all(PAIRS <= n <= 2 * PAIRS for n in counts[4:]), gold

    # the chain published the seeded days as Parquet, mirrored to the bucket
    datasets = section(out, "datasets")
    published = re.search(r"datasets\s+([\d,]+) Parquet day file\(s\)", datasets)
    mirrored = re.search(r"([\d,]+) mirrored to S3 under datasets/", datasets)
    assert published is not None and mirrored is not None, datasets
    files = [k for k in objects if k.startswith("datasets/")]
    assert number(published[1]) == number(mirrored[1]) == len(files) >= 14  # 7 x 2 exchanges
    assert "OK: streams connected on binance and kraken" in out

    # the config it wrote is a real one, and nothing is left running
    check = subprocess.run(
        [*KLINED, "config", "-c", str(workdir / "klined.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        env=demo_env(),
    )
    assert check.returncode == 0, check.stderr
    assert not postgres_for(workdir / "pgdata")


def test_ctrl_c_while_running_stops_everything_cleanly(tmp_path: Path) -> None:
    """SIGINT (what Ctrl-C sends) mid-run: the daemon stops, the summary is still printed,
    the embedded PostgreSQL is stopped; the run was cut short, not broken."""
    workdir = tmp_path / "demo"
    argv = ["demo", "--headless", "--duration", "600", "--pairs", "2", "--hours", "1"]
    argv += ["--dir", str(workdir)]
    proc = subprocess.Popen(
        [*KLINED, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=demo_env(),
    )
    try:
        deadline = time.monotonic() + 90
        while not (workdir / "klined.sock").exists():  # the daemon is up
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.2)
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "SIGINT: stopping the demo" in err
    assert "klined stopped" in err and "embedded PostgreSQL stopped" in err
    assert "streams" in out and "completeness" in out, err[-3000:]
    assert proc.returncode in (0, 1)
    assert not postgres_for(workdir / "pgdata")
    assert not (workdir / "klined.sock").exists()


def test_bad_arguments_exit_2_with_a_clear_message(tmp_path: Path) -> None:
    own = tmp_path / "mine"
    own.mkdir()
    (own / "klined.toml").write_text("[daemon]\n")
    cases = [
        (["--headless", "--s3-endpoint", "http://127.0.0.1:1"], "--s3-endpoint needs --bucket"),
        (["--headless", "--dir", str(own)], "was not written by `klined demo`"),
        (["--headless", "--pairs", "0"], "--pairs"),
        ([], "needs a terminal; use --headless"),
    ]
    for args, message in cases:
        proc = subprocess.run(
            [*KLINED, "demo", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=demo_env(),
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
    assert (own / "klined.toml").read_text() == "[daemon]\n"
