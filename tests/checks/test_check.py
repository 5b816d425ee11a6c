"""``klined check`` against a working setup and against setups broken one thing at a time.

The working setup is real: the simulator's exchanges, moto S3 over HTTP, PostgreSQL with the
schema applied, a StatusServer on a Unix socket. Each test runs the command as a user would
(``klined.cli.main`` in a worker thread, or a subprocess) and asserts on the table and the
exit code; a broken test asserts that only the broken row FAILs.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.abc
import asyncpg
import boto3
import pytest

from klined.cli import main
from klined.config import load_config
from klined.daemon.status_server import StatusServer
from klined.sim import Simulator
from klined.status import ConnectionStatus, StatusSnapshot, StreamState
from klined.warehouse.database import open_database, with_database
from tests.fixtures.s3 import free_port
from tests.fixtures.sim import SIM_PAIRS, SimFactory

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


@dataclass
class Setup:
    path: Path  # klined.toml
    sim: Simulator
    tmp: Path


def write_config(
    tmp: Path,
    sim: Simulator | None,
    *,
    dsn: str = "",
    s3: tuple[str, str] | None = None,
    pairs: dict[str, list[str]] | None = None,
) -> Path:
    pairs = pairs if pairs is not None else {"binance": list(SIM_PAIRS), "kraken": list(SIM_PAIRS)}
    lines = [
        "[daemon]",
        f'data_dir = "{tmp / "data"}"',
        f'status_socket = "{tmp / "k.sock"}"',
    ]
    if dsn:
        lines += ["[database]", f'dsn = "{dsn}"']
    if s3 is not None:
        lines += ["[s3]", f'endpoint_url = "{s3[0]}"', f'bucket = "{s3[1]}"', 'prefix = "raw"']
    for ex in ("binance", "kraken"):
        lines.append(f"[exchanges.{ex}]")
        if ex not in pairs or sim is None:
            lines.append("enabled = false")
            continue
        lines += [f'rest_url = "{sim.urls(ex)[1]}"', f"pairs = {json.dumps(pairs[ex])}"]
        if ex == "binance":
            lines.append(f'archive_url = "{sim.binance_archive_url}"')
    path = tmp / "klined.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def snapshot() -> StatusSnapshot:
    return StatusSnapshot(
        pid=4242,
        uptime_s=125.0,
        connections=[
            ConnectionStatus(exchange="binance", conn_id="binance-0", state=StreamState.CONNECTED),
            ConnectionStatus(exchange="kraken", conn_id="kraken-0", state=StreamState.BACKOFF),
        ],
    )


async def apply_schema(dsn: str, tmp: Path) -> None:
    path = write_config(tmp, None, dsn=dsn, pairs={})
    async with open_database(load_config(path), apply_schema=True):
        pass


@asynccontextmanager
async def running(
    tmp: Path, sim_factory: SimFactory, *, daemon: bool = True, **sim: Any
) -> AsyncIterator[Simulator]:
    """The simulator, and (``daemon``) a status server on ``tmp/k.sock``."""
    async with sim_factory(**sim) as simulator, anyio.create_task_group() as tg:
        if daemon:
            await tg.start(StatusServer(tmp / "k.sock", snapshot).serve)
        yield simulator
        tg.cancel_scope.cancel()


async def klined(*args: str) -> tuple[int, str]:
    """``klined <args>`` in-process (its own event loop, in a worker thread): (exit, stdout)."""

    def call() -> tuple[int, str]:
        out = io.StringIO()
        code: Any = 0
        with redirect_stdout(out):
            try:
                main(list(args))
            except SystemExit as exc:
                code = exc.code
        return int(code or 0), out.getvalue()

    return await anyio.to_thread.run_sync(call)


def rows(output: str) -> dict[str, tuple[str, str]]:
    """The table as {check: (outcome, reason)}."""
    table: dict[str, tuple[str, str]] = {}
    for line in output.splitlines():
        m = re.match(
            r"^  (config|postgresql|schema|read-only role|reader role|lake parts|s3|exchange \w+"
            r"|archive \w+|status socket|lake in s3|lake)"
            r"\s+(OK|WARN|FAIL|SKIP)\s+(.*)$",
            line,
        )
        if m:
            table[m[1]] = (m[2], m[3])
    return table


def outcomes(output: str) -> dict[str, str]:
    return {name: row[0] for name, row in rows(output).items()}


ALL_OK = {
    "config": "OK",
    "postgresql": "OK",
    "schema": "OK",
    "read-only role": "OK",
    "reader role": "OK",
    "lake parts": "OK",
    "s3": "OK",
    "exchange binance": "OK",
    "exchange kraken": "OK",
    "archive binance": "OK",
    "archive kraken": "SKIP",
    "status socket": "OK",
    "lake": "OK",
}


# -- working --------------------------------------------------------------------------------


async def test_working_setup_passes(
    tmp_path: Path, sim_factory: SimFactory, pg_dsn: str, s3_endpoint: str, s3_bucket: str
) -> None:
    await apply_schema(pg_dsn, tmp_path)
    (tmp_path / "data" / "lake").mkdir(parents=True)
    async with running(tmp_path, sim_factory) as sim:
        config = write_config(tmp_path, sim, dsn=pg_dsn, s3=(s3_endpoint, s3_bucket))
        code, out = await klined("check", "-c", str(config))
    assert code == 0, out
    assert outcomes(out) == ALL_OK, out
    assert list((tmp_path / "data" / "lake").iterdir()) == []  # the probe file is gone
    table = rows(out)
    assert f"config: {config}" in out
    assert table["config"][1].startswith(f"{config} (2 exchange(s), 8 pair(s), database.dsn")
    assert "version 2 (matches this klined)" in table["schema"][1]
    assert table["read-only role"][1] == "klined_looker can read the monitoring views"
    assert table["reader role"][1] == "klined_reader can read silver, gold and monitoring"
    assert table["s3"][1].startswith(f"s3://{s3_bucket}/raw/: write, list, read, delete OK")
    assert table["exchange binance"][1] == f"all 4 pair(s) listed ({sim.binance_rest_url})"
    assert table["status socket"][1].startswith("klined pid 4242 answers on")
    assert "1/2 connection(s) connected" in table["status socket"][1]
    assert re.fullmatch(
        rf"{tmp_path / 'data' / 'lake'} writable; [\d.]+ [KMGT]?B free of [\d.]+ [KMGT]?B",
        table["lake"][1],
    )
    assert out.rstrip().endswith("all required checks OK")
    # the probe object is gone and nothing else was written
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    assert s3.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0


async def test_json_output_and_klined_dsn(
    tmp_path: Path, sim_factory: SimFactory, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await apply_schema(pg_dsn, tmp_path)
    # the test server trusts local connections: the password is ignored, but must never show
    parts = urlsplit(pg_dsn)
    host = parts.netloc.rpartition("@")[2]
    with_password = urlunsplit(parts._replace(netloc=f"{parts.username}:sekrit@{host}"))
    monkeypatch.setenv("KLINED_DSN", with_password)
    async with running(tmp_path, sim_factory) as sim:
        config = write_config(tmp_path, sim, pairs={"kraken": ["BTC/USD"]})
        code, out = await klined("check", "-c", str(config), "--json")
    assert code == 0, out
    assert "sekrit" not in out
    doc = json.loads(out)
    assert doc["ok"] is True
    assert doc["config"] == str(config)
    by_name = {c["name"]: c for c in doc["checks"]}
    assert by_name["postgresql"]["reason"].startswith(
        f"postgresql://{parts.username}:***@{host}/t_"
    )
    assert "(KLINED_DSN; PostgreSQL " in by_name["postgresql"]["reason"]
    assert by_name["s3"]["outcome"] == "SKIP"
    assert by_name["s3"]["reason"] == "no bucket configured (the lake is local only)"
    assert by_name["exchange binance"]["outcome"] == "SKIP"
    assert by_name["exchange kraken"] == {
        "name": "exchange kraken",
        "outcome": "OK",
        "reason": f"all 1 pair(s) listed ({sim.kraken_rest_url})",
        "details": [],
    }


# -- broken, one thing at a time ------------------------------------------------------------


async def test_wrong_dsn_fails_without_showing_the_password(
    tmp_path: Path, sim_factory: SimFactory, pg_server_dsn: str
) -> None:
    dead = f"postgresql://klined:hunter2@127.0.0.1:{free_port()}/klined"
    missing = with_database(pg_server_dsn, "no_such_database_here")
    async with running(tmp_path, sim_factory) as sim:
        config = write_config(tmp_path, sim, dsn=dead)
        code, out = await klined("check", "-c", str(config))
        config = write_config(tmp_path, sim, dsn=missing)
        code2, out2 = await klined("check", "-c", str(config))

    assert code == 1
    skipped = {"schema": "SKIP", "read-only role": "SKIP", "reader role": "SKIP",
               "lake parts": "SKIP", "s3": "SKIP"}  # fmt: skip
    assert outcomes(out) == {**ALL_OK, "postgresql": "FAIL", **skipped}
    reason = rows(out)["postgresql"][1]
    assert reason.startswith("cannot connect to PostgreSQL at postgresql://klined:***@127.0.0.1:")
    assert "cannot reach the server" in reason
    assert rows(out)["schema"] == ("SKIP", "database not reachable")
    assert "hunter2" not in out
    assert out.rstrip().endswith("1 failed: postgresql")

    assert code2 == 1
    assert "the database does not exist" in rows(out2)["postgresql"][1]


async def test_schema_not_applied_is_a_warning(
    tmp_path: Path, sim_factory: SimFactory, pg_dsn: str
) -> None:
    async with running(tmp_path, sim_factory) as sim:
        config = write_config(tmp_path, sim, dsn=pg_dsn)
        code, out = await klined("check", "-c", str(config))
    assert code == 0, out
    table = rows(out)
    assert table["schema"] == ("WARN", "not applied yet; `klined run` applies version 2")
    # the read-only role is cluster-wide: another test's schema may have created it already
    assert table["read-only role"][0] in ("OK", "WARN")
    assert table["reader role"][0] in ("OK", "WARN")
    conn = await asyncpg.connect(pg_dsn)  # check itself changed nothing
    try:
        assert await conn.fetchval("SELECT to_regclass('ops.schema_version')") is None
    finally:
        await conn.close()


async def test_missing_bucket_fails(
    tmp_path: Path, sim_factory: SimFactory, pg_dsn: str, s3_endpoint: str
) -> None:
    await apply_schema(pg_dsn, tmp_path)
    async with running(tmp_path, sim_factory) as sim:
        config = write_config(tmp_path, sim, dsn=pg_dsn, s3=(s3_endpoint, "klined-not-there"))
        code, out = await klined("check", "-c", str(config))
    assert code == 1
    assert outcomes(out) == {**ALL_OK, "s3": "FAIL"}, out
    assert rows(out)["s3"][1] == f"write: bucket 'klined-not-there' does not exist ({s3_endpoint})"
    assert out.rstrip().endswith("1 failed: s3")


async def test_unreachable_s3_endpoint_fails(tmp_path: Path, sim_factory: SimFactory) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    async with running(tmp_path, sim_factory) as sim:
        config = write_config(tmp_path, sim, s3=(endpoint, "bucket"), pairs={})
        code, out = await klined("check", "-c", str(config))
    assert code == 1
    assert rows(out)["s3"] == ("FAIL", f"write: endpoint unreachable: {endpoint}")


async def test_unlisted_pairs_are_named_with_a_suggestion(
    tmp_path: Path, sim_factory: SimFactory
) -> None:
    listed = {"binance": ["BTC/USD", "ETH/USDT"], "kraken": list(SIM_PAIRS)}
    async with running(tmp_path, sim_factory, listed=listed) as sim:
        pairs = {"binance": ["BTC/USD", "ETH/USD"], "kraken": ["BTC/USD", "DOGE/USD"]}
        config = write_config(tmp_path, sim, pairs=pairs)
        code, out = await klined("check", "-c", str(config))
    assert code == 1
    found = outcomes(out)
    assert (found["exchange binance"], found["exchange kraken"]) == ("FAIL", "FAIL"), out
    assert rows(out)["exchange binance"][1] == (
        f"1 of 2 pair(s) not usable ({sim.binance_rest_url}):"
    )
    lines = out.splitlines()
    binance = lines.index(next(line for line in lines if "exchange binance" in line))
    assert lines[binance + 1].strip() == (
        "- ETH/USD is not listed on binance; ETH/USDT is (configure it explicitly: a quote is "
        "never relabelled)"
    )
    assert "- DOGE/USD is not listed on kraken (no DOGE pair is)" in out
    assert "BTC/USD is not listed" not in out
    assert "\n2 failed: exchange binance, exchange kraken;" in out


async def test_unreachable_exchange_fails(tmp_path: Path, sim_factory: SimFactory) -> None:
    port = free_port()
    async with running(tmp_path, sim_factory) as sim:
        config = write_config(tmp_path, sim, pairs={"binance": ["BTC/USD"]})
        text = config.read_text().replace(sim.binance_rest_url, f"http://127.0.0.1:{port}")
        config.write_text(text)
        code, out = await klined("check", "-c", str(config))
    assert code == 1
    outcome, reason = rows(out)["exchange binance"]
    assert outcome == "FAIL"
    assert reason.startswith(f"cannot reach http://127.0.0.1:{port}: ConnectError")


async def test_a_check_that_hangs_fails_at_its_deadline(
    tmp_path: Path, sim_factory: SimFactory
) -> None:
    """An exchange that accepts the connection and never answers: FAIL after --timeout, and
    the other checks still report."""
    held: list[Any] = []
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)

        async def hold(stream: Any) -> None:
            held.append(stream)
            await anyio.sleep_forever()

        async with running(tmp_path, sim_factory) as sim, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, hold)
            config = write_config(
                tmp_path, sim, pairs={"binance": ["BTC/USD"], "kraken": ["BTC/USD"]}
            )
            text = config.read_text().replace(sim.binance_rest_url, f"http://127.0.0.1:{port}")
            config.write_text(text)
            code, out = await klined("check", "-c", str(config), "--timeout", "1")
            tg.cancel_scope.cancel()
    assert code == 1
    assert rows(out)["exchange binance"] == ("FAIL", "no answer within 1s")
    assert rows(out)["exchange kraken"][0] == "OK"
    assert held  # it really connected


async def test_no_daemon_is_a_warning_and_exits_0(
    tmp_path: Path, sim_factory: SimFactory, pg_dsn: str, s3_endpoint: str, s3_bucket: str
) -> None:
    """Run as a user would: a subprocess, before the daemon's first start."""
    await apply_schema(pg_dsn, tmp_path)
    async with running(tmp_path, sim_factory, daemon=False) as sim:
        config = write_config(tmp_path, sim, dsn=pg_dsn, s3=(s3_endpoint, s3_bucket))
        env = {**os.environ, "NO_COLOR": "1"}
        env.pop("KLINED_DSN", None)
        result = await anyio.run_process(
            [sys.executable, "-m", "klined.cli", "check", "-c", str(config)],
            check=False,
            env=env,
        )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert outcomes(out) == {**ALL_OK, "status socket": "WARN"}
    assert rows(out)["status socket"][1].startswith(
        f"klined is not running (no status socket at {tmp_path / 'k.sock'})"
    )
    assert out.rstrip().endswith("all required checks OK; 1 warning(s): status socket")


async def test_stale_socket_is_not_running(tmp_path: Path) -> None:
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "k.sock"))  # bound, never listening: a dead daemon's leftover
        config = write_config(tmp_path, None, pairs={})
        code, out = await klined("check", "-c", str(config))
    assert code == 0, out
    outcome, reason = rows(out)["status socket"]
    assert outcome == "WARN"
    assert "klined is not running" in reason


# -- embedded PostgreSQL ----------------------------------------------------------------------


async def test_embedded_not_running_is_a_warning_and_never_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KLINED_DSN", raising=False)
    config = write_config(tmp_path, None, pairs={})
    code, out = await klined("check", "-c", str(config))
    assert code == 0, out
    table = rows(out)
    pgdata = tmp_path / "data" / "pgdata"
    assert table["postgresql"] == (
        "WARN",
        f"embedded server under {pgdata} is not running; `klined run` starts it "
        "(check never starts a database)",
    )
    assert table["schema"] == ("SKIP", "embedded server not running")
    assert table["config"][0] == "WARN"  # no exchange enabled
    assert not pgdata.exists()


async def test_embedded_running_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pg_server_dsn: str
) -> None:
    """The daemon's embedded server is found via its postmaster.pid (here: the test server)."""
    if os.environ.get("KLINED_TEST_DSN"):
        pytest.skip("needs the embedded test server")
    monkeypatch.delenv("KLINED_DSN", raising=False)
    admin = await asyncpg.connect(pg_server_dsn)
    try:
        data_directory = Path(await admin.fetchval("SHOW data_directory"))
        await admin.execute('DROP DATABASE IF EXISTS "klined" WITH (FORCE)')
        await admin.execute('CREATE DATABASE "klined"')
        pgdata = tmp_path / "data" / "pgdata"
        pgdata.mkdir(parents=True)
        pidfile = (data_directory / "postmaster.pid").read_text()
        (pgdata / "postmaster.pid").write_text(pidfile)
        await apply_schema(with_database(pg_server_dsn, "klined"), tmp_path)
        config = write_config(tmp_path, None, pairs={})
        code, out = await klined("check", "-c", str(config))
    finally:
        await admin.execute('DROP DATABASE IF EXISTS "klined" WITH (FORCE)')
        await admin.close()
    assert code == 0, out
    table = rows(out)
    assert table["postgresql"][0] == "OK"
    assert table["postgresql"][1].startswith("postgresql://postgres@/klined?host=")
    assert f"(embedded, {pgdata}; PostgreSQL " in table["postgresql"][1]
    assert table["schema"] == ("OK", "version 2 (matches this klined)")


# -- the lake and the config ------------------------------------------------------------------


async def test_unwritable_lake_fails(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    lake = tmp_path / "lake"
    lake.mkdir(mode=0o500)
    config = write_config(tmp_path, None, pairs={})
    config.write_text(config.read_text() + f'[lake]\nroot = "{lake}"\n')
    try:
        code, out = await klined("check", "-c", str(config))
    finally:
        lake.chmod(0o700)
    assert code == 1
    assert rows(out)["lake"] == ("FAIL", f"{lake} is not writable: Permission denied")
    assert list(lake.iterdir()) == []


async def test_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "klined.toml"
    config.write_text("[databse]\n")

    def call() -> int:
        try:
            main(["check", "-c", str(config)])
        except SystemExit as exc:
            return int(exc.code or 0)
        return 0

    assert await anyio.to_thread.run_sync(call) == 2
    assert "did you mean 'database'?" in capsys.readouterr().err


def test_help_documents_the_exit_code_and_warnings() -> None:
    from click.testing import CliRunner

    from klined.cli import cli

    result = CliRunner().invoke(cli, ["check", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "Exit code 0 when nothing FAILs, 1 otherwise, 2 for a bad config" in text
    assert "WARN never fails the check" in text


async def test_lake_root_that_is_a_file_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KLINED_DSN", raising=False)
    lake = tmp_path / "lake"
    lake.write_text("not a directory\n")
    config = write_config(tmp_path, None, pairs={})
    config.write_text(config.read_text() + f'[lake]\nroot = "{lake}"\n')
    code, out = await klined("check", "-c", str(config))
    assert code == 1
    assert rows(out)["lake"] == ("FAIL", f"{lake} is not a directory")
    assert out.rstrip().endswith("1 failed: lake; 3 warning(s): config, postgresql, status socket")


async def test_a_mistyped_native_name_is_reported(tmp_path: Path, sim_factory: SimFactory) -> None:
    async with running(tmp_path, sim_factory) as sim:
        config = write_config(tmp_path, sim, pairs={"binance": ["BTC/USD", "ETH/USD"]})
        config.write_text(
            config.read_text() + '[exchanges.binance.symbols."BTC/USD"]\nnative = "BTCUSDX"\n'
        )
        code, out = await klined("check", "-c", str(config))
    assert code == 1
    assert rows(out)["exchange binance"][0] == "FAIL"
    assert (
        "- BTC/USD: the configured native name 'BTCUSDX' is not listed on binance; it lists "
        "BTC/USD as 'BTCUSD'"
    ) in out
    assert "all 2 pair(s) listed" not in out


async def test_quarantined_lake_parts_are_listed(
    tmp_path: Path, sim_factory: SimFactory, pg_dsn: str
) -> None:
    import asyncpg

    await apply_schema(pg_dsn, tmp_path)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(
            "INSERT INTO ops.lake_parts (lake_key, hour_start, exchange, size, rows, status,"
            " reason, attempts) VALUES ('exchange=binance/x/part-1.jsonl', now(), 'binance', 0, 0,"
            " 'quarantined', 'LakeError: part cannot be read locally (Permission denied)', 3)"
        )
    finally:
        await conn.close()
    async with running(tmp_path, sim_factory) as sim:
        config = write_config(tmp_path, sim, dsn=pg_dsn, pairs={})
        _code, out = await klined("check", "-c", str(config))
    assert rows(out)["lake parts"] == (
        "WARN",
        "1 part(s) quarantined (unreadable; fix them and the next chain loads them):",
    )
    assert (
        "- exchange=binance/x/part-1.jsonl: LakeError: part cannot be read locally "
        "(Permission denied) (3 tries)"
    ) in out


async def test_check_lake_uploads_again_what_s3_lost(
    tmp_path: Path, sim_factory: SimFactory, s3_endpoint: str, s3_bucket: str
) -> None:
    from klined.lake import LakeUploader, LakeWriter
    from tests.lake.test_writer import HOUR, FakeClock, candle
    from tests.lake.test_writer import config as lake_config

    async with running(tmp_path, sim_factory) as sim:
        path = write_config(tmp_path, sim, s3=(s3_endpoint, s3_bucket), pairs={})
        cfg = load_config(path)
        writer = LakeWriter(cfg.lake_root, lake_config(), clock=FakeClock(HOUR + 600_000))
        for i, symbol in enumerate(["BTC/USD", "ETH/USD"]):
            writer.append(candle(i, HOUR, symbol=symbol))
        await writer.flush(close_all=True)
        await LakeUploader(cfg.lake_root, cfg.lake, cfg.s3).upload_pending()
        client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        [first, _second] = sorted(
            o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]
        )
        client.delete_object(Bucket=s3_bucket, Key=first)

        _code, out = await klined("check", "-c", str(path))
        assert "lake in s3" not in rows(out)
        _code, out = await klined("check", "--lake", "-c", str(path))
        assert rows(out)["lake in s3"] == (
            "WARN",
            "1 of 2 part(s) were missing in S3 and are uploaded again:",
        ), out
        assert f"- uploaded again: {first.removeprefix('raw/')}" in out
        _code, out = await klined("check", "--lake", "-c", str(path))
        assert rows(out)["lake in s3"] == (
            "OK",
            "2 local part(s) match their S3 copy (size, MD5)",
        ), out
    assert first in {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]}


async def test_a_capture_host_needs_no_database(tmp_path: Path) -> None:
    config = write_config(tmp_path, None, pairs={})
    config.write_text(config.read_text().replace("[daemon]\n", '[daemon]\nrole = "capture"\n'))
    code, out = await klined("check", "-c", str(config))
    assert code == 0, out
    outcome, reason = rows(out)["postgresql"]
    assert outcome == "SKIP" and "role is capture" in reason


async def test_archives_reachable_missing_or_unset(tmp_path: Path, sim_factory: SimFactory) -> None:
    """Binance's archive location is probed (unreachable is a WARN: backfill falls back to
    REST); Kraken's folder of OHLCVT files is looked into when it is set."""
    from klined.sim import Market
    from klined.sim.archive import write_kraken_zip

    folder = tmp_path / "kraken"
    write_kraken_zip(Market(1), folder / "Kraken_OHLCVT.zip", ["BTC/USD"],
                     1_767_139_200_000, 1_767_225_600_000, intervals=(1,))  # fmt: skip
    async with running(tmp_path, sim_factory, daemon=False) as sim:
        pairs = {"binance": ["BTC/USD"], "kraken": ["BTC/USD", "ETH/USD"]}
        config = write_config(tmp_path, sim, pairs=pairs)
        text = config.read_text() + f'archive_dir = "{folder}"\n'  # the kraken section is last
        config.write_text(text)
        code, out = await klined("check", "-c", str(config))
        table = rows(out)
        assert table["archive binance"][0] == "OK", out
        assert table["archive binance"][1].startswith(f"{sim.binance_archive_url} reachable")
        assert table["archive kraken"] == (
            "OK", f"{folder}: 1-minute files for 1 of 2 pair(s)"
        )  # fmt: skip
        assert "- no 1-minute file for ETH/USD" in out

        dead = f"http://127.0.0.1:{free_port()}/public_data"
        config.write_text(
            text.replace(sim.binance_archive_url, dead).replace(str(folder), str(tmp_path / "no"))
        )
        code, out = await klined("check", "-c", str(config))
    table = rows(out)
    assert table["archive binance"][0] == "WARN"
    assert "cannot be reached" in table["archive binance"][1]
    assert "uses REST instead" in table["archive binance"][1]
    assert table["archive kraken"][0] == "FAIL"
    assert code == 1
