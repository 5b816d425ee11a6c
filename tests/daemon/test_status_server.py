"""The status socket, its client and ``klined status``, over real Unix sockets."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.from_thread
import pytest
from click.testing import CliRunner

from klined.commands.status import render_status, status_command
from klined.daemon.status_server import StatusServer, fetch_status
from klined.errors import StatusError
from klined.status import (
    ChainStatus,
    ConnectionStatus,
    LakeStatus,
    LiveStatus,
    PairStatus,
    StatusSnapshot,
    StreamState,
)

NOW = 1_714_564_800_000  # 2024-05-01 12:00:00Z


def make_snapshot(pairs: int = 3) -> StatusSnapshot:
    ps = [
        PairStatus(
            exchange="binance",
            symbol=f"C{i}/USD",
            state=StreamState.CONNECTED,
            last_message_ms=NOW - 400,
            messages=100 + i,
            last_final_minute_ms=NOW - 60_000,
        )
        for i in range(pairs)
    ]
    ps += [
        PairStatus(
            exchange="binance",
            symbol="REKT/USD",
            state=StreamState.UNLISTED,
            last_error="not listed on binance; listed: REKT/USDT",
        ),
        PairStatus(
            exchange="kraken",
            symbol="BTC/USD",
            state=StreamState.STALE,
            last_message_ms=NOW - 95_000,
            last_final_minute_ms=NOW - 180_000,
        ),
    ]
    return StatusSnapshot(
        pid=4242,
        started_ms=NOW - 11_000_000,
        now_ms=NOW,
        uptime_s=11_000.0,
        rss_bytes=90 * 1024 * 1024,
        connections=[
            ConnectionStatus(
                exchange="binance",
                conn_id="binance-0",
                state=StreamState.CONNECTED,
                pairs=pairs + 1,
                last_message_ms=NOW - 400,
                messages=123_456,
                messages_per_s=12.5,
                reconnects=2,
            ),
            ConnectionStatus(
                exchange="kraken",
                conn_id="kraken-0",
                state=StreamState.BACKOFF,
                pairs=1,
                last_message_ms=NOW - 95_000,
                messages=999,
                reconnects=7,
                malformed=3,
                next_retry_ms=NOW + 8_000,
                last_error="ConnectionResetError: connection reset by peer",
            ),
        ],
        pairs=ps,
        lake=LakeStatus(
            open_parts=30,
            pending_upload_parts=4,
            pending_upload_bytes=1_300_000,
            uploaded_parts=120,
            events_written=1_234_567,
            s3_enabled=True,
            last_upload_error="EndpointConnectionError: could not connect",
        ),
        chain=ChainStatus(
            running=True,
            current_hour_ms=NOW - 3_600_000,
            current_step="silver",
            last_run_ms=NOW - 3_300_000,
            last_result="ok",
            next_run_ms=NOW + 300_000,
            trigger="schedule",
            run_done=0,
            run_total=1,
        ),
    )


@pytest.fixture
def sock_dir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, or a short directory when tmp_path would overflow sun_path (108 bytes)."""
    if len(str(tmp_path / "klined.sock")) < 100:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="kl"))
    try:
        yield short
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def sock_path(sock_dir: Path) -> Path:
    return sock_dir / "klined.sock"


def dead_socket(path: Path) -> None:
    """A socket file nobody listens on, as a crashed daemon leaves behind."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()


# -- server and client -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_roundtrip_and_owner_only_permissions(sock_path: Path) -> None:
    snap = make_snapshot()
    server = StatusServer(sock_path, lambda: snap)
    async with anyio.create_task_group() as tg:
        bound = await tg.start(server.serve)
        assert bound == sock_path
        st = os.stat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        got = await fetch_status(sock_path)
        assert got == snap
        tg.cancel_scope.cancel()
    assert not await anyio.Path(sock_path).exists()  # removed on exit
    assert server.served == 1


@pytest.mark.anyio
async def test_group_socket_is_0660_and_group_owned(sock_path: Path) -> None:
    gid = os.getgid()
    server = StatusServer(sock_path, make_snapshot, group=gid)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        st = os.stat(sock_path)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == gid
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_unknown_group_is_a_clear_error(sock_path: Path) -> None:
    server = StatusServer(sock_path, make_snapshot, group="no-such-group-klined")
    with pytest.raises(StatusError, match="group 'no-such-group-klined' does not exist"):
        await server.serve()


@pytest.mark.anyio
async def test_each_connection_gets_a_fresh_snapshot_concurrently(sock_path: Path) -> None:
    calls = 0

    def snapshot() -> StatusSnapshot:
        nonlocal calls
        calls += 1
        return StatusSnapshot(pid=calls, now_ms=NOW)

    results: list[int] = []

    async def one() -> None:
        results.append((await fetch_status(sock_path)).pid)

    async with anyio.create_task_group() as tg:
        await tg.start(StatusServer(sock_path, snapshot).serve)
        async with anyio.create_task_group() as clients:
            for _ in range(20):
                clients.start_soon(one)
        tg.cancel_scope.cancel()
    assert sorted(results) == list(range(1, 21))


@pytest.mark.anyio
async def test_large_snapshot(sock_path: Path) -> None:
    snap = make_snapshot(pairs=2000)
    async with anyio.create_task_group() as tg:
        await tg.start(StatusServer(sock_path, lambda: snap).serve)
        got = await fetch_status(sock_path)
        tg.cancel_scope.cancel()
    assert len(got.pairs) == 2002
    assert got == snap


@pytest.mark.anyio
async def test_stale_socket_from_a_crash_is_replaced(sock_path: Path) -> None:
    dead_socket(sock_path)
    with pytest.raises(StatusError, match="left over from a previous run"):
        await fetch_status(sock_path)
    async with anyio.create_task_group() as tg:
        await tg.start(StatusServer(sock_path, make_snapshot).serve)
        assert (await fetch_status(sock_path)).pid == 4242
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_live_socket_is_never_stolen(sock_path: Path) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(StatusServer(sock_path, make_snapshot).serve)
        inode = os.stat(sock_path).st_ino
        with pytest.raises(StatusError, match="another klined is already serving"):
            await StatusServer(sock_path, make_snapshot).serve()
        assert os.stat(sock_path).st_ino == inode
        assert (await fetch_status(sock_path)).pid == 4242  # the first one still answers
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_regular_file_is_not_replaced(sock_path: Path) -> None:
    await anyio.Path(sock_path).write_text("precious")
    with pytest.raises(StatusError, match="is not a socket"):
        await StatusServer(sock_path, make_snapshot).serve()
    assert await anyio.Path(sock_path).read_text() == "precious"


@pytest.mark.anyio
async def test_exit_leaves_a_successors_socket_alone(sock_path: Path) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(StatusServer(sock_path, make_snapshot).serve)
        os.unlink(sock_path)
        dead_socket(sock_path)  # another process bound the path meanwhile
        inode = os.stat(sock_path).st_ino
        tg.cancel_scope.cancel()
    assert os.stat(sock_path).st_ino == inode


@pytest.mark.anyio
async def test_path_too_long(tmp_path: Path) -> None:
    path = tmp_path / ("x" * 120) / "klined.sock"
    with pytest.raises(StatusError, match="too long"):
        await StatusServer(path, make_snapshot).serve()


@pytest.mark.anyio
async def test_client_errors_are_clear(sock_dir: Path) -> None:
    with pytest.raises(StatusError, match=r"klined is not running \(no status socket at"):
        await fetch_status(sock_dir / "missing.sock")

    # a snapshot provider that crashes: the client gets nothing, and says so
    def broken() -> StatusSnapshot:
        raise RuntimeError("board is broken")

    path = sock_dir / "broken.sock"
    async with anyio.create_task_group() as tg:
        await tg.start(StatusServer(path, broken).serve)
        with pytest.raises(StatusError, match="without a status snapshot"):
            await fetch_status(path)
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_client_rejects_garbage_and_silence(sock_dir: Path) -> None:
    garbage = sock_dir / "garbage.sock"
    silent = sock_dir / "silent.sock"

    async def say_garbage(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.send(b"HTTP/1.1 200 OK\r\n\r\nhello")

    async def say_nothing(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await anyio.sleep_forever()

    async with (
        await anyio.create_unix_listener(garbage) as g,
        await anyio.create_unix_listener(silent) as s,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(g.serve, say_garbage)
        tg.start_soon(s.serve, say_nothing)
        with pytest.raises(StatusError, match="not a klined status"):
            await fetch_status(garbage)
        with pytest.raises(StatusError, match=r"did not answer .* within 0.2s"):
            await fetch_status(silent, timeout=0.2)
        tg.cancel_scope.cancel()


def test_permission_denied_is_explained(sock_path: Path) -> None:
    """A user who may not open the socket is told what to do (checked as a real other user)."""

    def attempt() -> str:
        try:
            anyio.run(fetch_status, sock_path)
        except StatusError as exc:
            return str(exc)
        return "no error"

    with anyio.from_thread.start_blocking_portal() as portal:
        future, _ = portal.start_task(StatusServer(sock_path, make_snapshot).serve)
        try:
            if os.geteuid() != 0:
                os.chmod(sock_path, 0)
                message = attempt()
            else:
                # root ignores file modes: ask a forked child running as 'nobody'
                read_fd, write_fd = os.pipe()
                pid = os.fork()
                if pid == 0:  # pragma: no cover - runs in the child
                    try:
                        os.close(read_fd)
                        os.setgid(65534)
                        os.setuid(65534)
                        os.write(write_fd, attempt().encode())
                    finally:
                        os._exit(0)
                os.close(write_fd)
                with os.fdopen(read_fd, "rb") as fh:
                    message = fh.read().decode()
                os.waitpid(pid, 0)
        finally:
            future.cancel()
    assert message.startswith(f"permission denied on {sock_path}"), message
    assert "sudo -u klined" in message


# -- klined status ------------------------------------------------------------------------------


@pytest.fixture
def served(sock_path: Path) -> Iterator[Path]:
    """A status server running in a background event loop, as the daemon would run it."""
    with anyio.from_thread.start_blocking_portal() as portal:
        future, _ = portal.start_task(StatusServer(sock_path, make_snapshot).serve)
        try:
            yield sock_path
        finally:
            future.cancel()


def write_config(tmp_path: Path, socket_path: Path) -> Path:
    cfg = tmp_path / "klined.toml"
    cfg.write_text(f'[daemon]\nstatus_socket = "{socket_path}"\n')
    return cfg


def test_status_command_prints_the_table(served: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, served)
    result = CliRunner().invoke(status_command, ["-c", str(cfg)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "klined pid 4242 · up 3h03m · RSS 90.0 MB" in out
    assert "binance-0" in out and "kraken-0" in out
    assert "retry in 8.0s" in out
    assert "PAIRS (5): backoff" not in out
    assert "PAIRS (5): connected 3 · stale 1 · unlisted 1" in out
    assert "REKT/USD" in out and "not listed on binance" in out
    assert "C0/USD" not in out  # healthy pairs are only counted
    assert "pending upload 4 parts (1.2 MB)" in out
    assert (
        "CHAIN: running silver for hour 11:00:00Z (hourly run)"
        " · next scheduled run 12:05:00Z\n  last run 11:05:00Z (ok)"
    ) in out


def test_status_command_json(served: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, served)
    result = CliRunner().invoke(status_command, ["-c", str(cfg), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["pid"] == 4242
    assert doc["connections"][1]["state"] == "backoff"
    assert doc["lake"]["pending_upload_bytes"] == 1_300_000


def test_status_command_daemon_not_running(sock_dir: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, sock_dir / "nothing.sock")
    result = CliRunner().invoke(status_command, ["-c", str(cfg)])
    assert result.exit_code == 1
    assert "error: klined is not running (no status socket at" in result.output


def test_status_command_uses_klined_config_env(
    served: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KLINED_CONFIG", str(write_config(tmp_path, served)))
    result = CliRunner().invoke(status_command, ["--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["pid"] == 4242


def test_render_status_limits_problem_pairs() -> None:
    snap = make_snapshot(pairs=0)
    snap.pairs = [
        PairStatus(exchange="kraken", symbol=f"X{i:02d}/USD", state=StreamState.STALE)
        for i in range(25)
    ]
    text = render_status(snap)
    assert "X19/USD" in text and "X20/USD" not in text
    assert "... and 5 more (see --json)" in text


def test_render_status_empty_daemon() -> None:
    text = render_status(StatusSnapshot(pid=1, now_ms=NOW))
    assert "CONNECTIONS (0)\n  none" in text
    assert "PAIRS (0)" in text
    assert "CHAIN: idle · next scheduled run not scheduled\n  last run -" in text


def test_status_never_shows_a_next_run_in_the_past() -> None:
    """The catch-up's 17th hour runs past the cron time: the status says what runs, how far
    the catch-up is, and that the due run waits for it, not a "next" that has passed."""
    snap = make_snapshot()
    snap.chain = ChainStatus(
        running=True,
        trigger="catchup",
        run_done=2,
        run_total=17,
        current_hour_ms=NOW - 4 * 3_600_000,
        current_step="gapfill",
        next_run_ms=NOW - 90_000,
    )
    text = render_status(snap)
    assert (
        "CHAIN: running gapfill for hour 08:00:00Z (catch-up, hour 3 of 17)"
        " · next scheduled run due now, after the hour in progress"
    ) in text
    assert "11:58:30Z" not in text
    snap.chain.waiting_for = "a backfill's merge of 2024-05-01T03:00Z (PostgreSQL backend pid 7)"
    assert (
        "CHAIN: waiting for the chain lock, held by a backfill's merge of 2024-05-01T03:00Z"
        " (PostgreSQL backend pid 7) (catch-up, hour 3 of 17)"
    ) in render_status(snap)
    snap.chain = ChainStatus(running=False, next_run_ms=NOW - 1_000, last_run_ms=NOW - 60_000)
    assert "CHAIN: idle · next scheduled run due now\n" in render_status(snap)


def test_a_demo_daemon_says_its_errors_are_simulated() -> None:
    snap = make_snapshot()
    assert "SIMULATED" not in render_status(snap)
    snap.simulated = True
    assert render_status(snap).splitlines()[1] == (
        "SIMULATED: the exchanges are klined's simulator; its errors are injected faults"
    )


def test_render_status_shows_no_data_pairs_and_quarantined_parts() -> None:
    snap = make_snapshot(pairs=1)
    snap.pairs = [
        snap.pairs[0],
        PairStatus(exchange="binance", symbol="BTC/USD", state=StreamState.NO_DATA),
    ]
    snap.chain.quarantined_parts = 2
    snap.lake.write_failing_since_ms = NOW - 90_000
    snap.lake.held_bytes = 3 * 1024 * 1024
    snap.lake.last_write_error = "OSError: [Errno 28] No space left on device"
    snap.lake.dropped_events = 1234
    snap.chain.quarantined_sample = ["exchange=binance/a/part-1.jsonl: LakeError: unreadable"]
    text = render_status(snap)
    assert "all pairs connected" not in text
    assert "no data 1" in text
    assert "binance   BTC/USD  no data" in text
    assert "2 lake part(s) quarantined" in text
    assert "exchange=binance/a/part-1.jsonl: LakeError: unreadable" in text
    assert "cannot write the lake since" in text and "3.0 MB held in memory" in text
    assert "No space left on device" in text
    assert "1,234 events dropped past lake.max_held_bytes" in text


def test_render_status_reports_the_live_path() -> None:
    text = render_status(StatusSnapshot(pid=1, now_ms=NOW))
    assert "LIVE: off (needs [live] enabled and the chain's database)" in text
    snap = StatusSnapshot(
        pid=1,
        now_ms=NOW,
        live=LiveStatus(
            enabled=True, state="failing", written=3990, dropped_batches=2, dropped_finals=70,
            queued_batches=1, lag_window_s=300.0, lag_samples=3990, lag_p50_s=0.41,
            lag_p99_s=0.93, lag_max_s=12.5, gold_refreshed_ms=NOW - 20_000,
            last_error="writing silver: ConnectionRefusedError: no",
        ),
    )  # fmt: skip
    text = render_status(snap)
    assert (
        "LIVE: failing · lag p50 0.41s p99 0.93s max 12s (last 5m00s, 3,990 finals)\n"
        "  written 3,990 · queued 1 · dropped 2 batch(es) (70 finals) · gold 20s ago"
    ) in text
    assert "last live error: writing silver: ConnectionRefusedError: no" in text


def test_render_status_says_the_role_and_shard() -> None:
    one_vm = render_status(StatusSnapshot(pid=1, now_ms=NOW))
    assert "ROLE all\n" in one_vm
    capture = StatusSnapshot(
        pid=1, now_ms=NOW, role="capture", shard="2/3", shard_pairs=10, configured_pairs=30
    )
    text = render_status(capture)
    assert "ROLE capture, shard 2/3 (10 of 30 pairs) (no chain: another host" in text
    chain = StatusSnapshot(pid=1, now_ms=NOW, role="chain", configured_pairs=30)
    assert "ROLE chain (no streams; loads the lake for all 30 pairs)" in render_status(chain)
