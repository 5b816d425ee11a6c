"""``klined run`` end to end: the simulator's exchanges, moto's S3, the lake, the status socket.

In-process tests drive :class:`klined.daemon.Daemon` directly (S3 outage and recovery, the
listing check, an unreachable REST API, the chain with a real PostgreSQL); the subprocess test
runs the real command and stops it with SIGTERM mid-hour.
"""

from __future__ import annotations

import grp
import os
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import boto3
import pytest

from klined.config import Config, load_config
from klined.daemon.process import Daemon
from klined.daemon.status_server import fetch_status
from klined.lake import iter_local_parts
from klined.model import HOUR_MS, MINUTE_MS, floor_hour
from klined.sim import SimClock, Simulator
from klined.status import StreamState
from tests.fixtures.s3 import free_port
from tests.fixtures.sim import SIM_PAIRS, SimFactory
from tests.support.process import command, postgres_for
from tests.support.streams import (
    assert_exactly_once,
    assert_kraken_finality,
    is_derived_final,
    lake_key,
    lake_records,
    sent_key,
    until,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def write_config(
    tmp_path: Path,
    sim: Simulator | None,
    *,
    s3: tuple[str, str] | None = None,
    pairs: dict[str, list[str]] | None = None,
    extra: str = "",
    chain: bool = False,
    dsn: str = "",
) -> Path:
    """A klined.toml pointing at the simulator (and moto), with fast timers."""
    pairs = pairs or {"binance": list(SIM_PAIRS), "kraken": list(SIM_PAIRS)}
    lines = [
        "[daemon]",
        f'data_dir = "{tmp_path / "data"}"',
        f'status_socket = "{tmp_path / "k.sock"}"',
        "shutdown_timeout_s = 20",
        "[lake]",
        "flush_interval_s = 0.2",
        "upload_interval_s = 0.2",
        "[chain]",
        f"enabled = {'true' if chain else 'false'}",
        "catchup_hours = 0",
        "rest_retry_hours = 0",
    ]
    if dsn:
        lines += ["[database]", f'dsn = "{dsn}"']
    if s3 is not None:
        lines += ["[s3]", f'endpoint_url = "{s3[0]}"', f'bucket = "{s3[1]}"', 'prefix = "raw"']
    for ex in ("binance", "kraken"):
        lines.append(f"[exchanges.{ex}]")
        if ex not in pairs:
            lines.append("enabled = false")
            continue
        if sim is not None:
            ws, rest = sim.urls(ex)
            lines += [f'ws_url = "{ws}"', f'rest_url = "{rest}"']
        lines += [
            f"pairs = {pairs[ex]!r}".replace("'", '"'),
            "stale_after_s = 2.0",
            "connect_timeout_s = 3.0",
            "backoff_initial_s = 0.05",
            "backoff_max_s = 0.5",
            "rest_timeout_s = 2.0",
        ]
    path = tmp_path / "klined.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


@asynccontextmanager
async def running(cfg: Config, **options: Any) -> AsyncIterator[Daemon]:
    """The daemon in this process until the block ends; then a graceful stop."""
    daemon = Daemon(cfg, **options)
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        try:
            yield daemon
        finally:
            daemon.request_stop()


class S3Proxy:
    """A TCP proxy in front of moto that can refuse service: an S3 outage on demand."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.up = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=self.port)
        task_status.started()
        await listener.serve(self._handle)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            if not self.up:
                return  # accept and drop: the client sees the connection die
            try:
                upstream = await anyio.connect_tcp("127.0.0.1", self.target_port)
            except OSError:
                return
            async with upstream, anyio.create_task_group() as tg:

                async def pipe(a: anyio.abc.SocketStream, b: anyio.abc.SocketStream) -> None:
                    try:
                        async for chunk in a:
                            await b.send(chunk)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(pipe, client, upstream)
                tg.start_soon(pipe, upstream, client)


def s3_objects(endpoint: str, bucket: str) -> dict[str, int]:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    out: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = obj["Size"]
    return out


def local_parts(root: Path) -> dict[str, int]:
    return {p.key: p.size for p in iter_local_parts(root)}


# --------------------------------------------------------------------------------------------


async def test_s3_outage_then_recovery_loses_nothing(
    sim_factory: SimFactory, tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    proxy = S3Proxy(int(s3_endpoint.rsplit(":", 1)[1]))
    proxy.up = False
    async with sim_factory() as sim, anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        cfg = load_config(write_config(tmp_path, sim, s3=(proxy.url, s3_bucket)))
        fast = {"backoff_initial_s": 0.1, "backoff_max_s": 0.5, "connect_timeout_s": 1.0}
        async with running(cfg, uploader_options=fast) as daemon:
            lake = daemon.lake_status
            await until(lambda: lake.pending_upload_parts >= 4 and bool(lake.last_upload_error))
            assert lake.uploaded_parts == 0
            proxy.up = True  # S3 is back
            await until(lambda: lake.uploaded_parts >= 4 and not lake.last_upload_error)
            await anyio.sleep(0.5)
            await sim.stop()  # every event the exchanges sent is now received
            await until(
                lambda: all(c.state != StreamState.CONNECTED for c in daemon.snapshot().connections)
            )
        tg.cancel_scope.cancel()

    root = cfg.lake_root
    assert not list(root.rglob("*.open")), "every part is sealed on shutdown"
    local = local_parts(root)
    remote = s3_objects(s3_endpoint, s3_bucket)
    assert {f"raw/{k}": size for k, size in local.items()} == remote
    records = lake_records(root)
    assert assert_exactly_once(sim.log, records, {"binance", "kraken"}) > 100
    assert assert_kraken_finality(sim, records) > 0


async def test_sigterm_mid_hour_exits_0_with_everything_sealed_and_uploaded(
    sim_factory: SimFactory, tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    # the sim runs in the middle of the current hour, so the hour's parts are open (not yet
    # due) when the signal arrives: shutdown must seal and upload them
    start = floor_hour(int(time.time() * 1000)) + 30 * MINUTE_MS
    async with sim_factory(clock=SimClock(start, 60.0)) as sim:
        cfg_path = write_config(tmp_path, sim, s3=(s3_endpoint, s3_bucket))
        cfg = load_config(cfg_path)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        async with await anyio.open_process(
            [sys.executable, "-m", "klined.cli", "run", "-c", str(cfg_path)],
            stdout=None,
            stderr=None,
            env=env,
        ) as proc:
            try:
                await wait_streaming(cfg.status_socket, min_messages=60)
                await anyio.sleep(1.5)  # a minute and a half of sim time
                snap = await fetch_status(cfg.status_socket)
                assert snap.lake.open_parts > 0
                signalled_ms = int(time.time() * 1000)
                proc.send_signal(signal.SIGTERM)
                with anyio.fail_after(30):
                    code = await proc.wait()
            finally:
                if proc.returncode is None:
                    proc.kill()
    assert code == 0

    root = cfg.lake_root
    assert not list(root.rglob("*.open")), "every part is sealed on shutdown"
    local = local_parts(root)
    assert local
    assert {f"raw/{k}": size for k, size in local.items()} == s3_objects(s3_endpoint, s3_bucket)
    records = lake_records(root)
    hours = {floor_hour(r.interval_start) for r in records}
    assert hours <= {floor_hour(start), floor_hour(start) + HOUR_MS}
    # nothing stored that was not sent, nothing twice; everything sent well before the signal
    # (so certainly received) is stored
    sent = Counter(sent_key(e) for e in sim.log)
    captured = Counter(lake_key(r) for r in records if not is_derived_final(r))
    assert not captured - sent
    early = [e for e in sim.log if e.sent_ms < signalled_ms - 500]
    assert len(early) > 60
    assert not Counter(sent_key(e) for e in early) - captured
    assert_kraken_finality(sim, records)
    assert not cfg.status_socket.exists()


async def test_sighup_stops_like_sigterm_sealing_every_part_and_stopping_postgres(
    sim_factory: SimFactory, tmp_path: Path
) -> None:
    """An SSH session closing on a foreground ``klined run`` sends SIGHUP: the daemon stops
    gracefully (it was killed on the spot, parts left open, the embedded PostgreSQL running)."""
    start = floor_hour(int(time.time() * 1000)) + 30 * MINUTE_MS
    async with sim_factory(clock=SimClock(start, 60.0)) as sim:
        cfg_path = write_config(tmp_path, sim, chain=True)  # no DSN: the embedded PostgreSQL
        cfg = load_config(cfg_path)
        pgdata = cfg.data_dir / "pgdata"
        env = {k: v for k, v in os.environ.items() if k != "KLINED_DSN"}
        async with await anyio.open_process(
            [sys.executable, "-m", "klined.cli", "run", "-c", str(cfg_path)],
            stdout=None,
            stderr=None,
            env={**env, "PYTHONUNBUFFERED": "1"},
        ) as proc:
            try:
                await wait_streaming(cfg.status_socket, min_messages=60, limit_s=120)
                with anyio.fail_after(120):  # the chain has its database (initdb included)
                    while not (await fetch_status(cfg.status_socket)).chain.last_run_ms:  # noqa: ASYNC110
                        await anyio.sleep(0.2)
                assert postgres_for(pgdata)
                snap = await fetch_status(cfg.status_socket)
                assert snap.lake.open_parts > 0
                proc.send_signal(signal.SIGHUP)
                with anyio.fail_after(60):
                    code = await proc.wait()
            finally:
                if proc.returncode is None:
                    proc.kill()
    assert code == 0
    assert not list(cfg.lake_root.rglob("*.open")), "every part is sealed"
    assert local_parts(cfg.lake_root)
    records = lake_records(cfg.lake_root)
    assert not Counter(lake_key(r) for r in records if not is_derived_final(r)) - Counter(
        sent_key(e) for e in sim.log
    )
    assert not postgres_for(pgdata), "the embedded PostgreSQL is stopped"
    assert not (pgdata / "postmaster.pid").exists()
    assert not cfg.status_socket.exists()


async def test_a_first_start_asks_systemd_for_more_time_while_initdb_runs(
    sim_factory: SimFactory, tmp_path: Path
) -> None:
    """Under systemd, a first start's slow steps (initdb, listing checks) extend the start
    timeout with EXTEND_TIMEOUT_USEC and say what they wait for, before READY=1."""
    import socket

    from klined.daemon.systemd import Notifier

    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.setblocking(False)
    messages: list[str] = []
    try:
        async with sim_factory() as sim:
            cfg = load_config(write_config(tmp_path, sim, chain=True))  # a fresh embedded pgdata
            async with running(cfg, notifier=Notifier(str(path))):
                while True:
                    try:
                        messages.append(listener.recv(4096).decode())
                    except BlockingIOError:
                        break
    finally:
        listener.close()
    ready = next(i for i, m in enumerate(messages) if m.startswith("READY=1"))
    before = messages[:ready]
    assert "EXTEND_TIMEOUT_USEC=60000000" in before
    assert any(m.startswith("STATUS=starting: ") and "initdb" in m for m in before), before
    assert any(m.startswith("STATUS=starting: ") and "listing check" in m for m in before)
    assert not [m for m in messages[ready:] if m.startswith("EXTEND_TIMEOUT_USEC")]


async def wait_streaming(sock: Path, *, min_messages: int, limit_s: float = 30.0) -> None:
    """Until the daemon's status shows every connection up and data flowing."""
    with anyio.fail_after(limit_s):
        while True:
            try:
                snap = await fetch_status(sock)
            except Exception:
                snap = None
            if (
                snap is not None
                and snap.connections
                and all(c.state == StreamState.CONNECTED for c in snap.connections)
                and sum(c.messages for c in snap.connections) >= min_messages
            ):
                return
            await anyio.sleep(0.1)


async def test_config_errors_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[exchanges.binance]\nws_ur = 'ws://x'\n")
    result = await anyio.run_process(
        [sys.executable, "-m", "klined.cli", "run", "-c", str(bad)], check=False
    )
    assert result.returncode == 2
    assert b"did you mean 'ws_url'" in result.stderr


async def test_unlisted_pairs_are_reported_with_a_suggestion_and_skipped(
    sim_factory: SimFactory, tmp_path: Path
) -> None:
    listed = {"binance": ["BTC/USD", "ETH/USDT"], "kraken": ["BTC/USD", "ETH/USD"]}
    async with sim_factory(listed=listed) as sim:
        pairs = {"binance": ["BTC/USD", "ETH/USD"], "kraken": ["BTC/USD", "ETH/USD"]}
        cfg = load_config(write_config(tmp_path, sim, pairs=pairs))
        async with running(cfg) as daemon:
            snap = daemon.snapshot()
            by_pair = {(p.exchange, p.symbol): p for p in snap.pairs}
            eth = by_pair[("binance", "ETH/USD")]
            assert eth.state == StreamState.UNLISTED
            assert "ETH/USDT" in eth.last_error
            await until(lambda: by_pair[("kraken", "ETH/USD")].messages > 0)
            await until(lambda: by_pair[("binance", "BTC/USD")].messages > 0)
            assert eth.messages == 0
            conns = {c.conn_id: c for c in daemon.snapshot().connections}
            assert conns["binance-0"].pairs == 1 and conns["kraken-0"].pairs == 2
    subscribed = [c.subscriptions for c in sim.stats.connections_of("binance")]
    assert subscribed and all(s == ["BTC/USD"] for s in subscribed)


async def test_unreachable_rest_at_start_streams_every_configured_pair(
    sim_factory: SimFactory, tmp_path: Path
) -> None:
    async with sim_factory() as sim:
        closed = f"http://127.0.0.1:{free_port()}"
        path = write_config(tmp_path, sim, pairs={"kraken": ["BTC/USD", "ETH/USD"]})
        text = path.read_text().replace(sim.kraken_rest_url, closed)
        path.write_text(text)
        cfg = load_config(path)
        async with running(cfg) as daemon:
            es = daemon.streams[0]
            assert not es.listing_checked
            await until(lambda: all(p.messages > 0 for p in es.pair_statuses()))
            assert daemon.ready.is_set()


async def test_status_snapshot_fields(sim_factory: SimFactory, tmp_path: Path) -> None:
    async with sim_factory() as sim:
        cfg = load_config(write_config(tmp_path, sim))
        async with running(cfg) as daemon:
            await until(
                lambda: all(p.last_final_minute_ms is not None for p in daemon.snapshot().pairs)
            )
            await anyio.sleep(1.2)  # one status tick: rates
            snap = await fetch_status(cfg.status_socket)
    assert snap.pid == os.getpid() and snap.uptime_s > 0 and snap.rss_bytes > 10_000_000
    assert {c.conn_id for c in snap.connections} == {"binance-0", "kraken-0"}
    for c in snap.connections:
        assert c.state == StreamState.CONNECTED and c.session_id.startswith(c.conn_id)
        assert c.messages > 0 and c.messages_per_s > 0 and c.last_message_ms
    assert len(snap.pairs) == 2 * len(SIM_PAIRS)
    for p in snap.pairs:
        assert p.state in (StreamState.CONNECTED, StreamState.STALE)
        assert p.messages > 0 and p.last_message_ms and p.last_final_minute_ms
    assert snap.lake.events_written > 0
    assert snap.chain.last_result == "disabled"


async def test_chain_scheduler_runs_with_the_database_and_records_the_listing(
    sim_factory: SimFactory, tmp_path: Path, pg_dsn: str
) -> None:
    import asyncpg

    async with sim_factory(listed={"binance": ["BTC/USD"], "kraken": ["BTC/USD"]}) as sim:
        pairs = {"binance": ["BTC/USD", "ETH/USD"]}
        cfg = load_config(write_config(tmp_path, sim, pairs=pairs, chain=True, dsn=pg_dsn))
        async with running(cfg) as daemon:
            assert daemon.chain_status.next_run_ms is not None
            await until(lambda: daemon.chain_status.last_run_ms is not None)
            conn = await asyncpg.connect(pg_dsn)
            try:
                rows = await conn.fetch(
                    "SELECT symbol, listed, note FROM ops.pairs WHERE exchange = 'binance'"
                )
            finally:
                await conn.close()
    listing = {r["symbol"]: (r["listed"], r["note"]) for r in rows}
    assert listing["BTC/USD"] == (True, "")
    assert listing["ETH/USD"][0] is False and "not listed" in listing["ETH/USD"][1]


async def test_a_second_signal_skips_the_upload_but_keeps_every_sealed_part(
    sim_factory: SimFactory, tmp_path: Path, s3_bucket: str
) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # S3 unreachable: the final upload would retry
    async with sim_factory() as sim:
        cfg_path = write_config(tmp_path, sim, s3=(down, s3_bucket))
        cfg = load_config(cfg_path)
        async with await anyio.open_process(
            [sys.executable, "-m", "klined.cli", "run", "-c", str(cfg_path)],
            stdout=None,
            stderr=subprocess.PIPE,
        ) as proc:
            log = bytearray()

            async def read_log() -> None:
                assert proc.stderr is not None
                async for chunk in proc.stderr:
                    log.extend(chunk)

            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(read_log)  # never let a full pipe block the daemon
                    await wait_streaming(cfg.status_socket, min_messages=30)
                    proc.send_signal(signal.SIGTERM)
                    await until(lambda: b"stopping: closing streams" in log)
                    proc.send_signal(signal.SIGTERM)  # an impatient operator
                    with anyio.fail_after(30):
                        code = await proc.wait()
            finally:
                if proc.returncode is None:
                    proc.kill()
    assert code == 0
    assert b"second signal: skipping the final upload" in log
    assert not list(cfg.lake_root.rglob("*.open"))
    records = lake_records(cfg.lake_root)
    assert records and not Counter(
        lake_key(r) for r in records if not is_derived_final(r)
    ) - Counter(sent_key(e) for e in sim.log)


async def test_a_second_daemon_on_the_same_data_exits_with_a_clear_error(
    sim_factory: SimFactory, tmp_path: Path
) -> None:
    async with sim_factory() as sim:
        cfg_path = write_config(tmp_path, sim, pairs={"kraken": ["BTC/USD"]})
        async with running(load_config(cfg_path)):
            result = await anyio.run_process(
                [sys.executable, "-m", "klined.cli", "run", "-c", str(cfg_path)], check=False
            )
    assert result.returncode == 1
    # the lake's writer lock or the status socket refuses it, whichever it meets first
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(b"error:") and (b"another klined" in last or b"k.sock" in last)


async def test_status_socket_group_makes_the_socket_group_readable(
    sim_factory: SimFactory, tmp_path: Path
) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    async with sim_factory() as sim:
        path = write_config(tmp_path, sim, pairs={"kraken": ["BTC/USD"]})
        path.write_text(
            path.read_text().replace("[daemon]\n", f'[daemon]\nstatus_socket_group = "{group}"\n')
        )
        cfg = load_config(path)
        async with running(cfg):
            info = os.stat(cfg.status_socket)
            snap = await fetch_status(cfg.status_socket)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == os.getgid()
    assert snap.pid == os.getpid()


def metric_samples(text: str, name: str) -> dict[str, float]:
    """``{label value: number}`` of a one-label metric family in the exposition text."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1 :].rsplit("} ", 1)
            found[labels.split('"')[1]] = float(value)
    return found


async def covered_since(cfg: Config, hour_ms: int) -> None:
    """A daemon ran before: the configured pairs are covered from ``hour_ms``."""
    from klined.jobs.gapfill import sync_configured_pairs
    from klined.warehouse.coverage import record_capture_start
    from klined.warehouse.database import open_database

    async with open_database(cfg, apply_schema=True) as db:
        await sync_configured_pairs(db, cfg)
        await record_capture_start(db, hour_ms)


async def test_metrics_serve_chain_step_durations_and_completeness(
    sim_factory: SimFactory, tmp_path: Path, pg_dsn: str
) -> None:
    import asyncpg
    import httpx

    port = free_port()
    async with sim_factory(clock=SimClock.realtime()) as sim:
        pairs = {"binance": ["BTC/USD"], "kraken": ["BTC/USD", "ETH/USD"]}
        path = write_config(tmp_path, sim, pairs=pairs, chain=True, dsn=pg_dsn)
        text = path.read_text().replace("catchup_hours = 0", "catchup_hours = 2")
        path.write_text(text.replace("[daemon]\n", f"[daemon]\nmetrics_port = {port}\n"))
        cfg = load_config(path)
        await covered_since(cfg, floor_hour(int(time.time() * 1000)) - 2 * HOUR_MS)
        async with running(cfg) as daemon, httpx.AsyncClient(timeout=5) as client:
            figures = daemon.chain_figures
            await until(lambda: set(figures.completeness) == {"binance", "kraken"}, 60)
            body = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
            hour = figures.completeness_hour_ms
            conn = await asyncpg.connect(pg_dsn)
            try:
                rows = await conn.fetch(
                    "SELECT exchange, completion_rate FROM monitoring.exchange_hourly_completeness"
                    " WHERE hour_start = to_timestamp($1::bigint / 1000.0)",
                    hour,
                )
                steps = await conn.fetch(
                    "SELECT DISTINCT step FROM ops.job_runs"
                    " WHERE hour_start IS NOT NULL OR step = 'publish'"
                )
            finally:
                await conn.close()
    assert hour is not None and hour == floor_hour(int(time.time() * 1000) - 120_000) - HOUR_MS
    ratios = metric_samples(body, "klined_completeness_ratio")
    assert ratios == {r["exchange"]: float(r["completion_rate"]) for r in rows}
    assert ratios["binance"] == 1.0  # the simulator's REST history filled the hour
    durations = metric_samples(body, "klined_chain_step_seconds")
    assert set(durations) == {r["step"] for r in steps} == {
        "flush", "bronze", "gapfill", "silver", "gold", "completeness", "publish"
    }  # fmt: skip
    assert all(v >= 0 for v in durations.values()) and durations["gapfill"] > 0


async def test_a_daemon_without_signal_handling_leaves_the_signals_to_its_host(
    sim_factory: SimFactory, tmp_path: Path
) -> None:
    async with sim_factory() as sim:
        cfg = load_config(write_config(tmp_path, sim, pairs={"kraken": ["BTC/USD"]}))
        with anyio.open_signal_receiver(signal.SIGTERM) as host:
            async with running(cfg, handle_signals=False) as daemon:
                os.kill(os.getpid(), signal.SIGTERM)
                # a daemon handling signals would have taken SIGTERM over: the host never
                # sees it and the wait fails
                with anyio.fail_after(10):
                    received = await host.__anext__()
                assert received == signal.SIGTERM
                assert not daemon.stop_requested.is_set()
                assert daemon.ready.is_set()
        assert daemon.stop_requested.is_set()  # stopped by the host, gracefully


async def test_a_later_listing_check_updates_ops_pairs(
    sim_factory: SimFactory, tmp_path: Path, pg_dsn: str
) -> None:
    """Kraken's REST API is down at start: every pair streams, ``ops.pairs`` cannot say what is
    listed. When the background re-check gets an answer, the unlisted pair is written there
    too (completeness must stop expecting it), not only in the daemon's status."""
    import asyncpg

    async def listing() -> dict[str, tuple[bool | None, str]]:
        conn = await asyncpg.connect(pg_dsn)
        try:
            rows = await conn.fetch(
                "SELECT symbol, listed, note FROM ops.pairs WHERE exchange = 'kraken'"
            )
        finally:
            await conn.close()
        return {r["symbol"]: (r["listed"], r["note"]) for r in rows}

    async def until_listing(pred: Any) -> dict[str, tuple[bool | None, str]]:
        with anyio.fail_after(30):
            while not pred(found := await listing()):  # noqa: ASYNC110 - polling the table
                await anyio.sleep(0.1)
        return found

    async with sim_factory(listed={"kraken": ["BTC/USD"]}) as sim, anyio.create_task_group() as tg:
        proxy = S3Proxy(sim.ports["kraken"])  # a TCP proxy: REST through it, WS direct
        proxy.up = False
        await tg.start(proxy.serve)
        path = write_config(
            tmp_path, sim, pairs={"kraken": ["BTC/USD", "ETH/USD"]}, chain=True, dsn=pg_dsn
        )
        path.write_text(path.read_text().replace(sim.kraken_rest_url, proxy.url))
        cfg = load_config(path)
        options = {"recheck_interval_s": 0.2}
        async with running(cfg, stream_options=options) as daemon:
            es = daemon.streams[0]
            assert not es.listing_checked
            before = await until_listing(lambda found: len(found) == 2)
            assert before == {"BTC/USD": (None, ""), "ETH/USD": (None, "")}

            proxy.up = True  # the exchange answers again: the re-check finds ETH/USD unlisted
            await until(lambda: es.listing_checked, 30)
            after = await until_listing(lambda found: found["ETH/USD"][0] is not None)
        tg.cancel_scope.cancel()
    assert after["BTC/USD"] == (True, "")
    assert after["ETH/USD"][0] is False and "not listed" in after["ETH/USD"][1]


@pytest.mark.parametrize(
    "extra",
    [
        "[lake]\nflush_interval_s = nan\n",
        "[lake]\npart_max_age_s = inf\n",
        "[database]\npool_size = 100000000\n",
        '[chain]\nschedule = "99 99 * * *"\n',
        "[chain]\ncatchup_hours = 10000000000\n",
    ],
)
async def test_hostile_config_values_exit_2_without_a_traceback(tmp_path: Path, extra: str) -> None:
    path = tmp_path / "k.toml"
    path.write_text(f'[daemon]\ndata_dir = "{tmp_path / "data"}"\n' + extra)
    result = await anyio.run_process(
        [sys.executable, "-m", "klined.cli", "run", "-c", str(path)], check=False
    )
    assert result.returncode == 2
    assert b"Traceback" not in result.stderr
    key = extra.splitlines()[1].split(" =")[0]
    assert f".{key}: ".encode() in result.stderr


def s3_records(endpoint: str, bucket: str, skip: set[str]) -> list[Any]:
    """Records of every S3 part whose lake key is not in ``skip``."""
    from klined.lake import read_part

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    out = []
    for key in s3_objects(endpoint, bucket):
        lake = key.removeprefix("raw/")
        if lake in skip:
            continue
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        contents = read_part(body)
        assert contents.bad_lines == 0, key
        out.extend(contents.records)
    return out


async def _run_until_disk_full_then_sigterm(
    sim: Simulator, tmp_path: Path, root: Path, s3: tuple[str, str]
) -> tuple[int, str, int]:
    """``klined run`` with its lake on ``root``; fill the disk while it streams, wait until
    it holds events in memory, SIGTERM it. Returns exit code, stderr, signal time (ms)."""
    from tests.support.disk import fill

    cfg_path = write_config(tmp_path, sim, s3=s3)
    cfg_path.write_text(cfg_path.read_text().replace("[lake]\n", f'[lake]\nroot = "{root}"\n'))
    cfg = load_config(cfg_path)
    argv = [sys.executable, "-m", "klined.cli", "run", "-c", str(cfg_path)]
    async with command(argv, {**os.environ, "PYTHONUNBUFFERED": "1"}) as (proc, log):
        await wait_streaming(cfg.status_socket, min_messages=60)
        fill(root)
        with anyio.fail_after(30):
            while (await fetch_status(cfg.status_socket)).lake.held_bytes < 20_000:  # noqa: ASYNC110
                await anyio.sleep(0.2)
        snap = await fetch_status(cfg.status_socket)
        assert snap.lake.write_failing_since_ms is not None
        assert "No space left" in snap.lake.last_write_error
        signalled = int(time.time() * 1000)
        proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(60):
            code = await proc.wait()
    return code, log.decode(), signalled


async def test_sigterm_on_a_full_disk_uploads_the_held_events_from_memory(
    sim_factory: SimFactory, tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    from klined.lake import seal_open_parts
    from tests.support.disk import free, tiny_filesystem

    start = floor_hour(int(time.time() * 1000)) + 30 * MINUTE_MS
    with tiny_filesystem(tmp_path / "lake") as root:
        async with sim_factory(clock=SimClock(start, 60.0)) as sim:
            code, log, signalled = await _run_until_disk_full_then_sigterm(
                sim, tmp_path, root, (s3_endpoint, s3_bucket)
            )
        assert code == 0, log
        assert "uploaded them to S3 from memory" in log
        assert log.count("cannot write to") == 1, log
        free(root)
        seal_open_parts(root)  # what the next start does with the parts the disk cut short
        local = local_parts(root)
        records = lake_records(root) + s3_records(s3_endpoint, s3_bucket, set(local))
    sent = Counter(sent_key(e) for e in sim.log)
    captured = Counter(lake_key(r) for r in records if not is_derived_final(r))
    assert not captured - sent, "nothing twice, nothing that was not sent"
    early = [e for e in sim.log if e.sent_ms < signalled - 500]
    assert len(early) > 20
    assert not Counter(sent_key(e) for e in early) - captured, "nothing lost"


async def test_sigterm_on_a_full_disk_without_s3_exits_1_naming_what_was_lost(
    sim_factory: SimFactory, tmp_path: Path
) -> None:
    from tests.support.disk import tiny_filesystem

    closed = f"http://127.0.0.1:{free_port()}"  # S3 down as well
    with tiny_filesystem(tmp_path / "lake") as root:
        async with sim_factory(pairs=["BTC/USD"]) as sim:
            code, log, _ = await _run_until_disk_full_then_sigterm(
                sim, tmp_path, root, (closed, "bucket")
            )
    assert code == 1, log
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, log
    assert "could not be written to" in errors[0] and "S3 failed too" in errors[0]
    assert "binance BTC/USD" in errors[0] and "kraken BTC/USD" in errors[0]
    assert "Traceback" not in log


async def test_a_listing_429_delays_neither_capture_nor_ready_and_the_cache_applies(
    sim_factory: SimFactory, tmp_path: Path
) -> None:
    from klined.exchanges.base import ListedPair
    from klined.model import Pair
    from klined.sim import FaultPlan, FaultRule
    from klined.streams.supervisor import ListingCache

    slow_listing = FaultRule(
        kind="http_429", exchange="binance", endpoint="exchangeInfo", retry_after_s=40, times=1
    )
    async with sim_factory(faults=FaultPlan(rules=[slow_listing])) as sim:
        pairs = {"binance": ["BTC/USD", "ETH/USD"]}
        cfg = load_config(write_config(tmp_path, sim, pairs=pairs))
        # what an earlier run learned: ETH/USD is not listed on binance
        cfg.data_dir.mkdir(parents=True)
        btc = Pair("BTC", "USD")
        ListingCache(cfg.data_dir, "binance").save(
            {btc: ListedPair(btc, "BTCUSD", "BTCUSD", "BTCUSD")}
        )
        async with running(cfg) as daemon:
            es = daemon.streams[0]
            assert daemon.ready.is_set() and not es.listing_checked
            by_pair = {p.symbol: p for p in es.pair_statuses()}
            await until(lambda: by_pair["BTC/USD"].messages > 0)
            assert not es.listing_checked, "capture runs while the listing is still refused"
            assert by_pair["ETH/USD"].state == StreamState.UNLISTED
            assert "as of the last listing" in by_pair["ETH/USD"].last_error
    subscribed = [c.subscriptions for c in sim.stats.connections_of("binance")]
    assert subscribed and all(s == ["BTC/USD"] for s in subscribed)


async def test_a_refused_kraken_subscription_is_asked_again_once_the_listing_lists_it(
    sim_factory: SimFactory, tmp_path: Path
) -> None:
    from klined.sim import FaultPlan, FaultRule

    refusal = FaultRule(kind="subscribe_error", exchange="kraken", pair="ETH/USD", times=1)
    async with sim_factory(faults=FaultPlan(rules=[refusal])) as sim:
        cfg = load_config(write_config(tmp_path, sim, pairs={"kraken": ["BTC/USD", "ETH/USD"]}))
        async with running(cfg) as daemon:
            es = daemon.streams[0]
            by_pair = {p.symbol: p for p in es.pair_statuses()}
            await until(lambda: "subscribe_error" in sim.faults.fired_kinds())
            # refused once (a transient refusal), then asked again: the listing lists it
            await until(lambda: by_pair["ETH/USD"].messages > 0, 30)
            assert by_pair["ETH/USD"].state != StreamState.UNLISTED
            assert not es.refused and not es.unlisted
    subscribed = [s for c in sim.stats.connections_of("kraken") for s in c.subscriptions]
    assert "ETH/USD" in subscribed
