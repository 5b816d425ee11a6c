"""sd_notify against a real datagram socket, the watchdog loop, and the unit file."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from klined.daemon.systemd import Heartbeat, Notifier, watchdog_loop

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "klined.service"


@pytest.fixture
def sock_dir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, or a short directory when tmp_path would overflow sun_path (108 bytes)."""
    if len(str(tmp_path / "notify.sock")) < 100:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="kl"))
    try:
        yield short
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def listener(sock_dir: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(sock_dir / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield path, sock
    finally:
        sock.close()


def recv_all(sock: socket.socket) -> list[str]:
    """Every datagram waiting on ``sock``, decoded."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(5)
    return out


def test_from_env_reads_and_unsets_the_variables(listener: tuple[str, socket.socket]) -> None:
    path, _ = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}
    n = Notifier.from_env(env)
    assert n.enabled and n.watchdog_enabled
    assert n.watchdog_interval_s() == 30.0
    assert env == {}  # children (embedded PostgreSQL) must not inherit them


def test_watchdog_for_another_pid_is_ignored(listener: tuple[str, socket.socket]) -> None:
    path, _ = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}
    n = Notifier.from_env(env, unset_environment=False)
    assert n.enabled and not n.watchdog_enabled
    assert n.watchdog_interval_s() is None
    assert "NOTIFY_SOCKET" in env


def test_messages_arrive_on_a_path_socket(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    try:
        assert n.ready(status="streams up: 2 connections")
        assert n.status("catching up\n3 hours")
        assert n.watchdog()
        assert n.extend_timeout(30)
        assert n.stopping(status="flushing lake")
    finally:
        n.close()
    assert recv_all(sock) == [
        "READY=1\nSTATUS=streams up: 2 connections",
        "STATUS=catching up 3 hours",
        "WATCHDOG=1",
        "EXTEND_TIMEOUT_USEC=30000000",
        "STOPPING=1\nSTATUS=flushing lake",
    ]


def test_messages_arrive_on_an_abstract_socket() -> None:
    name = f"klined-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        n.close()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_noop_outside_systemd() -> None:
    n = Notifier.from_env({})
    assert not n.enabled and not n.watchdog_enabled
    assert not n.ready(status="x")
    assert not n.watchdog()
    assert not n.stopping()
    assert n.watchdog_interval_s() is None


def test_watchdog_not_sent_without_watchdog_usec(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert not n.watchdog()
    assert n.status("ok")
    assert recv_all(sock) == ["STATUS=ok"]


def test_send_failure_does_not_raise(tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "nobody-listens.sock"), 1_000_000)
    assert n.ready() is False
    assert n.watchdog() is False


async def next_datagram(sock: socket.socket, wait_s: float = 5.0) -> bytes | None:
    """The next datagram on ``sock``, or None if none comes within ``wait_s``."""
    sock.setblocking(False)
    with anyio.move_on_after(wait_s):
        await anyio.wait_readable(sock)
        return sock.recv(4096)
    return None


@pytest.mark.anyio
async def test_watchdog_loop_pings_while_healthy(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    n = Notifier(path, watchdog_usec=20_000)  # pings every 10 ms
    healthy = True
    async with anyio.create_task_group() as tg:
        tg.start_soon(watchdog_loop, n, lambda: healthy)
        assert [await next_datagram(sock) for _ in range(3)] == [b"WATCHDOG=1"] * 3
        healthy = False
        got = await next_datagram(sock)
        while got == b"WATCHDOG=1":  # a ping sent before the flag flipped
            got = await next_datagram(sock)
        assert got == b"STATUS=unhealthy: main loop heartbeat is stale"
        # ten intervals with a sick heartbeat: nothing more is sent
        assert await next_datagram(sock, wait_s=0.1) is None
        healthy = True
        assert await next_datagram(sock) == b"WATCHDOG=1"
        tg.cancel_scope.cancel()
    n.close()


@pytest.mark.anyio
async def test_watchdog_loop_returns_when_watchdog_is_off() -> None:
    with anyio.fail_after(2):
        await watchdog_loop(Notifier(None), lambda: True)


@pytest.mark.anyio
async def test_raising_heartbeat_counts_as_unhealthy(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    n = Notifier(path, watchdog_usec=20_000)

    def broken() -> bool:
        raise RuntimeError("supervisor state unreadable")

    with anyio.move_on_after(0.1):
        await watchdog_loop(n, broken)
    n.close()
    got = recv_all(sock)
    assert got == ["STATUS=unhealthy: main loop heartbeat is stale"]


def test_heartbeat_goes_stale() -> None:
    hb = Heartbeat(max_age_s=0.0)
    assert hb.age_s() >= 0
    hb2 = Heartbeat(max_age_s=3600)
    hb2.beat()
    assert hb2()
    hb._last -= 1  # pretend a second passed without a beat
    assert not hb()


# -- the unit file -----------------------------------------------------------------------------


def unit_directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


def test_unit_has_the_operational_contract() -> None:
    d = unit_directives()
    expect = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "/opt/klined/.venv/bin/klined run -c /etc/klined/klined.toml",
        "EnvironmentFile": "-/etc/klined/klined.env",
        "WatchdogSec": "60",
        "Restart": "on-failure",
        "TimeoutStopSec": "45",
        "KillMode": "mixed",
        "User": "klined",
        "StateDirectory": "klined",
        "RuntimeDirectory": "klined",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "true",
        "CapabilityBoundingSet": "",
        "UMask": "0027",
    }
    for key, value in expect.items():
        assert d.get(key) == [value], key
    # the daemon's default graceful-stop budget must fit inside systemd's
    from klined.config import DaemonConfig

    assert DaemonConfig().shutdown_timeout_s < float(d["TimeoutStopSec"][0])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    klined = Path(sys.executable).with_name("klined")
    if not klined.exists():
        pytest.skip("the klined console script is not installed in this venv")
    text = UNIT.read_text().replace("/opt/klined/.venv/bin/klined", str(klined))
    unit = tmp_path / "klined.service"
    unit.write_text(text)
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice", "SYSTEMD_LOG_COLOR": "0"},
    )
    output = proc.stdout + proc.stderr
    ours = [line for line in output.splitlines() if "klined.service" in line]
    assert proc.returncode == 0, output
    assert not [line for line in ours if "Unknown" in line or "unknown" in line], output
    assert ours == [], output
