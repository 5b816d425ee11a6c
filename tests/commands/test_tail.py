"""``klined tail`` as a user runs it: a subprocess listening on a real PostgreSQL, candles
committed by the live upsert and the gold refresh, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process

from klined.commands.tail import format_candle
from klined.config import Config, DatabaseConfig
from klined.jobs import gold, silver
from klined.live.batches import compact
from klined.model import MINUTE_MS
from klined.warehouse.database import open_database
from klined.warehouse.notify import Announced
from tests.support.warehouse import H0, candle

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

KLINED = [sys.executable, "-m", "klined.cli"]


class Lines:
    """A subprocess stream read line by line, with a deadline per line."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.buffer = b""

    async def next(self, limit_s: float = 20.0) -> str:
        with anyio.fail_after(limit_s):
            while b"\n" not in self.buffer:
                chunk = await self.stream.receive()
                self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()


async def tail(dsn: str, tmp_path: Path, *args: str) -> tuple[Process, Lines, Lines]:
    env = {k: v for k, v in os.environ.items() if k != "KLINED_CONFIG"}
    env["KLINED_DSN"] = dsn
    process = await anyio.open_process([*KLINED, "tail", *args], env=env, cwd=tmp_path)
    assert process.stdout is not None and process.stderr is not None
    return process, Lines(process.stdout), Lines(process.stderr)


async def test_tail_prints_committed_candles_and_exits_0_on_ctrl_c(
    pg_dsn: str, tmp_path: Path
) -> None:
    cfg = Config(database=DatabaseConfig(dsn=pg_dsn, readonly_role=""))
    async with open_database(cfg, apply_schema=True) as db:
        process, out, err = await tail(pg_dsn, tmp_path, "--json", "--exchange", "binance")
        async with process:
            assert (await err.next(60)).startswith("listening on klined_candles")
            minutes = [H0 + i * MINUTE_MS for i in range(5)]
            rows = [candle(m, price=str(100 + i)) for i, m in enumerate(minutes)]
            rows.append(candle(H0, exchange="kraken", symbol="ETH/USD"))  # filtered out
            huge = "1" + "0" * 1200  # announced by its keys only: tail reads the row
            rows.append(candle(H0, symbol="LONG/USD", price=huge))
            await db.ensure_partitions(minutes)
            async with db.transaction() as conn:
                await silver.upsert_candles(conn, [compact(c) for c in rows])
            await gold.refresh(db)
            got = [json.loads(await out.next()) for _ in range(6 + 8)]  # 6 minutes, 8 buckets
            process.send_signal(signal.SIGINT)
            with anyio.fail_after(20):
                code = await process.wait()
    assert code == 0
    long = [r for r in got if r["symbol"] == "LONG/USD"]
    assert len(long) == 5 and all(r["close"] == huge and not r["fetch"] for r in long)
    got = [r for r in got if r["symbol"] == "BTC/USD"]
    silver_rows = [r for r in got if r["interval"] == "1m"]
    assert [r["start"] for r in silver_rows] == [
        f"2026-03-01T10:0{i}:00Z" for i in range(5)
    ]  # committed order: by key
    first = silver_rows[0]
    assert first["exchange"] == "binance" and first["symbol"] == "BTC/USD"
    assert (first["open"], first["close"], first["volume"]) == ("100", "100", "1.5")
    assert first["source"] == "ws_final" and first["trade_count"] == 3
    buckets = {r["interval"]: r for r in got if r["interval"] != "1m"}
    assert set(buckets) == {"5m", "15m", "30m", "1h"}
    assert buckets["5m"]["minutes"] == 5 and buckets["5m"]["close"] == "104"
    assert all(r["exchange"] == "binance" for r in got)


async def test_tail_without_a_database_exits_1_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("KLINED_CONFIG", "KLINED_DSN")}
    (tmp_path / "klined.toml").write_text(f'[daemon]\ndata_dir = "{tmp_path / "data"}"\n')
    result = await anyio.run_process([*KLINED, "tail"], env=env, cwd=tmp_path, check=False)
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "klined run" in lines[0]
    bad = await anyio.run_process([*KLINED, "tail", "--pair", "BTCUSD"], env=env, cwd=tmp_path,
                                  check=False)  # fmt: skip
    assert bad.returncode == 2 and b"BASE/QUOTE" in bad.stderr


def test_the_human_line() -> None:
    row = Announced(
        interval="1m", exchange="kraken", symbol="BTC/USD", start="2026-01-01T00:59:00Z",
        open="87000.1", high="87010", low="86990", close="87005.5", volume="1.25",
        trade_count=12, source="ws_final",
    )  # fmt: skip
    assert format_candle(row) == (
        "2026-01-01T00:59:00Z kraken   BTC/USD       1m  O 87000.1 H 87010 L 86990 C 87005.5"
        " V 1.25 n 12  ws_final"
    )
    bucket = Announced(
        interval="15m", exchange="binance", symbol="ETH/USD", start="2026-01-01T00:45:00Z",
        open="1", high="2", low="1", close="2", volume="3", minutes=11, source="derived",
    )  # fmt: skip
    assert format_candle(bucket).endswith("V 3 n -  11/15 min")
