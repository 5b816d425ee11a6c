"""Bronze loading: exactly once (re-run, concurrent, crash), torn lines, bad values, gap-fill."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from klined.config import Config
from klined.jobs import bronze, bronze_rows
from klined.jobs.ops import clear_dirty_hour, list_dirty_hours
from klined.lake import LakeStore
from klined.model import HOUR_MS, MINUTE_MS
from klined.warehouse.database import Database, open_database
from tests.support.warehouse import (
    H0,
    candle,
    part_bytes,
    table_hash,
    warehouse_dsn,
    wdb,
    write_part,
)

__all__ = ["warehouse_dsn", "wdb"]

pytestmark = pytest.mark.anyio


def _lake(root: Path, symbols: int = 3, minutes: int = 10) -> int:
    """Write one part per symbol (updates + a final per minute); return the line count."""
    lines = 0
    for i in range(symbols):
        candles = []
        for m in range(minutes):
            minute = H0 + m * MINUTE_MS
            for u in range(3):
                candles.append(
                    candle(
                        minute,
                        symbol=f"C{i}/USD",
                        final=u == 2,
                        price=f"{10 + i}.{m}{u}",
                        event_ts=minute + 1000 * (u + 1),
                    )
                )
        write_part(root, candles, f"w-{i}")
        lines += len(candles)
    return lines


async def _bronze_count(db: Database) -> int:
    n: int = await db.fetchval("SELECT count(*) FROM bronze.bronze_ohlcv_native")
    return n


async def test_loads_every_part_exactly_once(wdb: Database, tmp_path: Path) -> None:
    lines = _lake(tmp_path)
    source = LakeStore(tmp_path)
    first = await bronze.load_hour(wdb, H0, source)
    assert first.rows == lines
    assert first.details["parts_loaded"] == 3 and first.details["bad_lines"] == 0
    before = await table_hash(wdb, "bronze.bronze_ohlcv_native")
    again = await bronze.load_hour(wdb, H0, source)
    assert again.rows == 0 and again.details["parts_skipped"] == 3
    assert await table_hash(wdb, "bronze.bronze_ohlcv_native") == before
    ledger = await wdb.fetch("SELECT * FROM ops.lake_parts ORDER BY lake_key")
    assert [r["rows"] for r in ledger] == [30, 30, 30]
    assert all(r["exchange"] == "binance" and r["size"] > 0 for r in ledger)
    # every value made it, exactly (times are UTC instants, prices exact decimals)
    row = await wdb.fetchrow(
        "SELECT * FROM bronze.bronze_ohlcv_native WHERE symbol = 'C1/USD'"
        " ORDER BY interval_start DESC, event_ts DESC LIMIT 1"
    )
    assert row is not None
    assert str(row["close"]) == "11.92" and row["is_final"] and row["source"] == "ws"
    assert row["interval_start"].timestamp() * 1000 == H0 + 9 * MINUTE_MS
    assert row["interval_end"].timestamp() * 1000 == H0 + 10 * MINUTE_MS
    assert row["event_ts"].timestamp() * 1000 == H0 + 9 * MINUTE_MS + 3000
    assert row["lake_key"].endswith("part-1772359201000-w-1.jsonl")
    # a late part for the same hour is picked up by the next run, and only it
    write_part(tmp_path, [candle(H0 + 59 * MINUTE_MS, symbol="C0/USD")], "late")
    late = await bronze.load_hour(wdb, H0, source)
    assert late.rows == 1 and late.details["parts_loaded"] == 1
    assert await _bronze_count(wdb) == lines + 1


async def test_gzip_and_plain_parts_load_alike(wdb: Database, tmp_path: Path) -> None:
    """A lake from before compression (plain parts) keeps working beside gzip parts; a
    damaged gzip part loads what precedes the damage and reports the rest."""
    minutes = [H0 + m * MINUTE_MS for m in range(10)]
    plain = write_part(tmp_path, [candle(m, symbol="A/USD") for m in minutes], "w-1")
    packed = write_part(
        tmp_path, [candle(m, symbol="B/USD") for m in minutes], "w-2", compressed=True
    )
    damaged = write_part(
        tmp_path, [candle(m, symbol="C/USD") for m in minutes], "w-3", compressed=True
    )
    data = (tmp_path / damaged).read_bytes()
    (tmp_path / damaged).write_bytes(data[:-8] + bytes(8))  # a wrong checksum in the trailer
    result = await bronze.load_hour(wdb, H0, LakeStore(tmp_path))
    assert result.details["parts_loaded"] == 3 and result.details["bad_lines"] == 1
    ledger = {
        r["lake_key"]: (r["rows"], r["bad_lines"])
        for r in await wdb.fetch("SELECT * FROM ops.lake_parts")
    }
    assert ledger == {plain: (10, 0), packed: (10, 0), damaged: (10, 1)}
    assert plain.endswith(".jsonl") and packed.endswith(".jsonl.gz")
    rows = await wdb.fetch(
        "SELECT symbol, count(*) AS n, sum(close) AS s FROM bronze.bronze_ohlcv_native"
        " GROUP BY symbol ORDER BY symbol"
    )
    assert [(r["symbol"], r["n"], str(r["s"])) for r in rows] == [
        ("A/USD", 10, "1000"),
        ("B/USD", 10, "1000"),
        ("C/USD", 10, "1000"),
    ]


async def test_concurrent_loaders_do_not_double_load(wdb: Database, tmp_path: Path) -> None:
    lines = _lake(tmp_path, symbols=6)
    results: list[Any] = []

    async def load() -> None:
        async with open_database(Config(database=wdb.config)) as other:
            results.append(await bronze.load_hour(other, H0, LakeStore(tmp_path), batch_parts=2))

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(load)
    assert sum(r.rows for r in results) == lines
    assert sum(r.details["parts_loaded"] for r in results) == 6
    assert await _bronze_count(wdb) == lines
    dupes = await wdb.fetchval(
        "SELECT count(*) FROM (SELECT lake_key FROM bronze.bronze_ohlcv_native"
        " GROUP BY lake_key HAVING count(*) <> 30) x"
    )
    assert dupes == 0


class _StallingSource:
    """A LakeStore whose reads stall on one part, to cancel a load in the middle."""

    def __init__(self, root: Path, stall_key_part: str) -> None:
        self.store = LakeStore(root)
        self.stall = stall_key_part
        self.reached = anyio.Event()

    async def list_parts(self, hour_ms: int) -> Any:
        return await self.store.list_parts(hour_ms)

    async def read_part_bytes(self, ref: Any) -> bytes:
        if self.stall in ref.key:
            self.reached.set()
            await anyio.sleep_forever()
        return await self.store.read_part_bytes(ref)


async def test_crash_mid_load_then_rerun_loads_exactly_once(wdb: Database, tmp_path: Path) -> None:
    lines = _lake(tmp_path, symbols=5)
    source = _StallingSource(tmp_path, "w-3")
    async with anyio.create_task_group() as tg:

        async def load() -> None:
            await bronze.load_hour(wdb, H0, source, batch_parts=2)

        tg.start_soon(load)
        with anyio.fail_after(30):
            await source.reached.wait()
        await anyio.sleep(0.1)  # the batch holding w-3 is mid-COPY
        tg.cancel_scope.cancel()
    # batches 1 (w-0, w-1) committed; the cancelled batch (w-2, w-3) left nothing behind
    assert await _bronze_count(wdb) == 60
    assert await wdb.fetchval("SELECT count(*) FROM ops.lake_parts") == 2
    rerun = await bronze.load_hour(wdb, H0, LakeStore(tmp_path))
    assert rerun.details["parts_loaded"] == 3 and rerun.details["parts_skipped"] == 2
    assert await _bronze_count(wdb) == lines
    assert (
        await wdb.fetchval("SELECT count(DISTINCT lake_key) FROM bronze.bronze_ohlcv_native") == 5
    )


async def test_torn_and_malformed_lines_are_skipped_and_counted(
    wdb: Database, tmp_path: Path
) -> None:
    good = [candle(H0 + m * MINUTE_MS) for m in range(4)]
    key = write_part(tmp_path, good)
    path = tmp_path / key
    data = part_bytes(good[:2]) + b"this is not json\n" + part_bytes(good[2:]) + b'{"exchange":"bin'
    path.write_bytes(data)
    result = await bronze.load_hour(wdb, H0, LakeStore(tmp_path))
    assert result.rows == 4 and result.details["bad_lines"] == 2
    ledger = await wdb.fetchrow("SELECT rows, bad_lines, bad_line_numbers FROM ops.lake_parts")
    assert ledger is not None
    assert (ledger["rows"], ledger["bad_lines"], ledger["bad_line_numbers"]) == (4, 2, [3, 6])


async def test_values_the_server_refuses_are_counted_not_fatal(
    wdb: Database, tmp_path: Path
) -> None:
    ok = [candle(H0 + m * MINUTE_MS, symbol="OK/USD") for m in range(3)]
    write_part(tmp_path, ok, "a")
    bad = [
        candle(H0, symbol="BAD/USD"),
        candle(H0 + MINUTE_MS, symbol="BAD/USD", price="abc"),
        candle(H0 + 2 * MINUTE_MS, symbol="BAD/USD", price="NaN"),
        candle(H0 + 3 * MINUTE_MS, symbol="BAD/USD", volume="Infinity"),
        candle(H0 + 4 * MINUTE_MS, symbol="BAD/USD"),
    ]
    write_part(tmp_path, bad, "b")
    result = await bronze.load_hour(wdb, H0, LakeStore(tmp_path))
    assert result.details["careful_batches"] == 1
    assert result.rows == 5 and result.details["bad_lines"] == 3
    rows = await wdb.fetch(
        "SELECT symbol, count(*) AS n FROM bronze.bronze_ohlcv_native GROUP BY 1 ORDER BY 1"
    )
    assert [(r["symbol"], r["n"]) for r in rows] == [("BAD/USD", 2), ("OK/USD", 3)]
    numbers = await wdb.fetchval(
        "SELECT bad_line_numbers FROM ops.lake_parts WHERE lake_key LIKE '%BAD-USD%'"
    )
    assert numbers == [2, 3, 4]


async def test_lines_that_do_not_belong_to_their_part_are_bad_lines(
    wdb: Database, tmp_path: Path
) -> None:
    good = [candle(H0 + m * MINUTE_MS) for m in range(3)]
    hostile = [
        candle(H0 + 3 * MINUTE_MS, exchange="../../../etc/passwd"),
        candle(H0 + 4 * MINUTE_MS, exchange="kraken'; DROP TABLE silver.fact_ohlcv; --"),
        candle(H0 + 5 * MINUTE_MS, symbol="ETH/USD"),  # another pair's folder
        candle(H0 + 365 * 24 * HOUR_MS),  # a year away
        candle(H0 + 7 * MINUTE_MS + 1234),  # off the minute grid
        candle(H0 - MINUTE_MS),  # the hour before
    ]
    odd_interval = candle(H0 + 8 * MINUTE_MS)
    odd_interval.interval_seconds = 3600
    lines = [*good[:2], *hostile, odd_interval, good[2]]
    write_part(tmp_path, lines, hour_ms=H0)
    result = await bronze.load_hour(wdb, H0, LakeStore(tmp_path))
    assert result.rows == 3 and result.details["bad_lines"] == 7
    rows = await wdb.fetch(
        "SELECT DISTINCT exchange, symbol, interval_start FROM bronze.bronze_ohlcv_native"
    )
    assert {(r["exchange"], r["symbol"]) for r in rows} == {("binance", "BTC/USD")}
    assert len(rows) == 3
    numbers = await wdb.fetchval("SELECT bad_line_numbers FROM ops.lake_parts")
    assert numbers == [3, 4, 5, 6, 7, 8, 9]
    assert [(d.exchange, d.hour_ms) for d in await list_dirty_hours(wdb)] == [("binance", H0)]


async def test_a_value_postgresql_cannot_hold_is_a_bad_line_not_a_failed_hour(
    wdb: Database, tmp_path: Path
) -> None:
    lines = [candle(H0 + m * MINUTE_MS) for m in range(4)]
    lines[1].high = "1e999999"
    lines[2].volume = "0." + "1" * 20_000  # more fractional digits than numeric keeps
    write_part(tmp_path, lines)
    write_part(tmp_path, [candle(H0, symbol="ETH/USD")], "e")
    result = await bronze.load_hour(wdb, H0, LakeStore(tmp_path))
    assert result.details["careful_batches"] == 1
    assert result.rows == 3 and result.details["bad_lines"] == 2
    assert await _bronze_count(wdb) == 3


def _make_unreadable(path: Path) -> Callable[[], None]:
    """Make a part unreadable for real; return how to fix it. Without root, mode 000; as
    root (who reads any mode) a directory in its place, which ``open`` refuses (EISDIR)."""
    data = path.read_bytes()
    if os.geteuid() != 0:
        path.chmod(0)
        return lambda: path.chmod(0o644)
    path.unlink()
    path.mkdir()

    def fix() -> None:
        path.rmdir()
        path.write_bytes(data)

    return fix


async def test_an_unreadable_part_is_quarantined_and_loaded_once_when_fixed(
    wdb: Database, tmp_path: Path
) -> None:
    lines = _lake(tmp_path, symbols=3)
    [bad_key] = [k for k in _keys(tmp_path) if "C1-USD" in k]
    fix = _make_unreadable(tmp_path / bad_key)
    result = await bronze.load_hour(wdb, H0, LakeStore(tmp_path))
    per_part = lines // 3
    assert result.details["parts_quarantined"] == 1 and result.details["parts_loaded"] == 2
    assert result.rows == 2 * per_part
    [row] = await wdb.fetch(
        "SELECT status, reason FROM ops.lake_parts WHERE lake_key = $1", bad_key
    )
    assert row["status"] == "quarantined" and "cannot be read" in row["reason"]
    [q] = await bronze.quarantined_parts(wdb)
    assert q["lake_key"] == bad_key and q["attempts"] == 1
    # what the daemon's status (klined status, the TUI's Jobs view) shows
    from klined.daemon.chain import refresh_quarantine
    from klined.status import ChainStatus

    status = ChainStatus()
    await refresh_quarantine(wdb, status)
    assert status.quarantined_parts == 1
    assert status.quarantined_sample[0].startswith(f"{bad_key}: LakeError: part ")
    # still unreadable: tried again, still quarantined, nothing loaded twice
    again = await bronze.load_hour(wdb, H0, LakeStore(tmp_path))
    assert again.rows == 0 and again.details["parts_quarantined"] == 1
    assert (await bronze.quarantined_parts(wdb))[0]["attempts"] == 2
    fix()
    fixed = await bronze.load_hour(wdb, H0, LakeStore(tmp_path))
    assert fixed.rows == per_part and fixed.details["parts_quarantined"] == 0
    assert await bronze.quarantined_parts(wdb) == []
    assert (await bronze.load_hour(wdb, H0, LakeStore(tmp_path))).rows == 0
    assert await _bronze_count(wdb) == lines
    assert (
        await wdb.fetchval(
            "SELECT count(*) FROM bronze.bronze_ohlcv_native WHERE lake_key = $1", bad_key
        )
        == per_part
    )


def _keys(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("part-*.jsonl"))


async def test_new_parts_mark_their_hour_dirty(wdb: Database, tmp_path: Path) -> None:
    write_part(tmp_path, [candle(H0, exchange="kraken")], "k")
    await bronze.load_hour(wdb, H0, LakeStore(tmp_path))
    [dirty] = await list_dirty_hours(wdb)
    assert (dirty.exchange, dirty.hour_ms, dirty.reason) == ("kraken", H0, "lake_parts")
    # marked again while being processed: clearing the old mark leaves the new one
    await bronze.insert_candles(wdb, [candle(H0, exchange="kraken", origin="rest")])
    assert not await clear_dirty_hour(wdb, dirty)
    [again] = await list_dirty_hours(wdb)
    assert again.reason == "gapfill" and again.seq > dirty.seq
    assert await clear_dirty_hour(wdb, again)
    assert await list_dirty_hours(wdb) == []
    # a re-run with nothing new marks nothing
    await bronze.load_hour(wdb, H0, LakeStore(tmp_path))
    assert await list_dirty_hours(wdb) == []


async def test_insert_candles_validates_everything_first(wdb: Database) -> None:
    good = candle(H0, origin="rest")
    with pytest.raises(ValueError, match="not a finite number"):
        await bronze.insert_candles(wdb, [good, candle(H0 + MINUTE_MS, origin="rest", price="x")])
    with pytest.raises(ValueError, match="unknown origin"):
        await bronze.insert_candles(wdb, [candle(H0, origin="carrier-pigeon")])
    assert await _bronze_count(wdb) == 0
    odd = candle(H0 + MINUTE_MS, origin="no_trades", trade_count=0, volume="0")
    odd.session_id = 'quote " and \\ backslash'
    assert await bronze.insert_candles(wdb, [good, odd], lake_key="gap/1") == 2
    rows = await wdb.fetch(
        "SELECT source, session_id, lake_key, trade_count FROM bronze.bronze_ohlcv_native"
        " ORDER BY interval_start"
    )
    assert [tuple(r) for r in rows] == [
        ("rest", None, "gap/1", 3),
        ("no_trades", 'quote " and \\ backslash', "gap/1", 0),
    ]


def test_csv_encoding_round_trips_awkward_text() -> None:
    rows = [("a", None, True, 5, 'he said "hi"'), ("b\\c", "x,y", False, 0, "line\nbreak")]
    text = bronze_rows.encode_csv(rows, 'k"ey').decode()
    assert text == (
        '"a",null,true,5,"he said ""hi""","k""ey"\n"b\\c","x,y",false,0,"line\nbreak","k""ey"\n'
    )
    fast = bronze_rows.encode_csv([("a", None, True, 5, "plain")], "key/1").decode()
    assert fast == '"a",null,true,5,"plain","key/1"\n'


class _MovedLakeStore(LakeStore):
    """A LakeStore whose listing names local copies that are gone by the time they are read."""

    async def list_parts(self, hour_ms: int, exchange: str | None = None) -> Any:
        refs = await super().list_parts(hour_ms, exchange)
        return [msgspec.structs.replace(r, local_path=f"{r.local_path}.gone") for r in refs]


async def test_local_parts_that_vanish_are_read_through_the_source(
    wdb: Database, tmp_path: Path
) -> None:
    lines = _lake(tmp_path, symbols=2)
    result = await bronze.load_hour(wdb, H0, _MovedLakeStore(tmp_path))
    assert result.rows == lines and result.details["parts_loaded"] == 2
    assert await _bronze_count(wdb) == lines
