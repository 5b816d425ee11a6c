"""The steps together: completeness adds up, re-running anything changes nothing, the session
time zone does not matter, and every run is recorded in ops.job_runs."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest

from klined.config import Config
from klined.jobs import bronze, completeness, gold, silver
from klined.jobs.ops import (
    DroppedRange,
    record_lake_drops,
    record_step,
    run_step,
    settle_lake_drops,
)
from klined.lake import LakeStore
from klined.model import DAY_MS, HOUR_MS, MINUTE_MS, to_datetime
from klined.warehouse.coverage import extend_coverage
from klined.warehouse.database import Database, open_database, sync_pairs
from tests.support.warehouse import (
    GOLD_TABLES,
    H0,
    candle,
    pairs_config,
    snapshot,
    truncate_all,
    warehouse_dsn,
    wdb,
    write_part,
    xmins,
)

__all__ = ["warehouse_dsn", "wdb"]

pytestmark = pytest.mark.anyio

#: the last hour of a UTC day, so the daily view has a day boundary to get wrong
LATE = H0 - H0 % DAY_MS + 23 * HOUR_MS
PAIRS = {"binance": ["BTC/USD", "ETH/USD", "SOL/USD"], "kraken": ["BTC/USD", "ETH/USD"]}


def _lake(root: Path) -> None:
    """Two hours around midnight with every kind of minute."""
    for hour in (LATE, LATE + HOUR_MS):
        for exchange in ("binance", "kraken"):
            btc = []
            for m in range(60):
                minute = hour + m * MINUTE_MS
                if m % 10 == 3:
                    continue  # missing: gap-fill will bring REST rows
                btc.append(candle(minute, exchange=exchange, final=False, price="9"))
                btc.append(candle(minute, exchange=exchange, final=m != 59, price=f"1{m % 9}"))
            write_part(root, btc, f"{exchange}-btc")
            eth = [
                candle(hour + m * MINUTE_MS, exchange=exchange, symbol="ETH/USD", final=False)
                for m in range(0, 60, 2)
            ]
            write_part(root, eth, f"{exchange}-eth")
        # a pair nobody configured shows up in the lake: loaded, merged, not expected
        write_part(root, [candle(hour, symbol="DOGE/USD")], "doge")


async def _chain(db: Database, root: Path) -> None:
    source = LakeStore(root)
    for hour in (LATE, LATE + HOUR_MS):
        await bronze.load_hour(db, hour, source)
        if hour == LATE:
            gap = [
                candle(LATE + m * MINUTE_MS, origin="rest", price="12")
                for m in range(3, 60, 10)
                if m != 53
            ]
            gap.append(candle(LATE + 53 * MINUTE_MS, origin="no_trades", volume="0", trade_count=0))
            gap.append(candle(LATE + 59 * MINUTE_MS, origin="rest", price="13"))  # was partial
            gap.append(candle(LATE + 10 * MINUTE_MS, origin="rest", price="77"))  # final stays
            await bronze.insert_candles(db, gap)
        await silver.merge_hour(db, hour)
        await gold.refresh(db, hour)
        await completeness.refresh_hour(db, hour)


async def test_completeness_counts_add_up(wdb: Database, tmp_path: Path) -> None:
    await sync_pairs(wdb, pairs_config(PAIRS))
    # the daemon captured every configured pair from LATE on (SOL/USD sent nothing)
    await extend_coverage(wdb, [(ex, p) for ex, ps in PAIRS.items() for p in ps], LATE)
    _lake(tmp_path)
    await _chain(wdb, tmp_path)
    rows = await wdb.fetch(
        "SELECT * FROM monitoring.hourly_completeness ORDER BY hour_start, exchange, symbol"
    )
    assert len(rows) == 10  # 5 configured pairs x 2 hours; DOGE is not expected
    for r in rows:
        parts = r["ws_final"] + r["rest"] + r["trades"] + r["no_trades"] + r["ws_partial"]
        assert r["expected"] == 60 and parts + r["missing"] == 60
        complete = r["ws_final"] + r["rest"] + r["trades"] + r["no_trades"]
        assert r["completion_rate"] == round(Decimal(complete) / 60, 4)
    first = {(r["exchange"], r["symbol"]): r for r in rows if r["hour_start"].hour == 23}
    b = first[("binance", "BTC/USD")]
    assert (b["ws_final"], b["rest"], b["no_trades"], b["ws_partial"], b["missing"]) == (
        53,
        6,
        1,
        0,
        0,
    )
    k = first[("kraken", "BTC/USD")]  # no gap-fill for kraken: 6 missing, 59th minute partial
    assert (k["ws_final"], k["ws_partial"], k["missing"]) == (53, 1, 6)
    sol = first[("binance", "SOL/USD")]
    assert (sol["missing"], sol["completion_rate"]) == (60, 0)
    eth = first[("kraken", "ETH/USD")]
    assert (eth["ws_partial"], eth["missing"], eth["completion_rate"]) == (30, 30, 0)
    # the daily view splits at UTC midnight, the exchange view sums the pairs
    days = await wdb.fetch(
        "SELECT day, expected, missing FROM monitoring.daily_completeness"
        " WHERE exchange = 'binance' AND symbol = 'BTC/USD' ORDER BY day"
    )
    day0 = to_datetime(LATE).date()
    assert [(d["day"], d["expected"]) for d in days] == [
        (day0, 60),
        (day0 + timedelta(days=1), 60),
    ]
    ex = await wdb.fetchrow(
        "SELECT * FROM monitoring.exchange_hourly_completeness"
        " WHERE exchange = 'kraken' AND hour_start = $1",
        first[("kraken", "BTC/USD")]["hour_start"],
    )
    assert ex is not None
    assert (ex["pairs"], ex["expected"], ex["missing"]) == (2, 120, 36)


async def test_rerunning_every_step_changes_nothing(wdb: Database, tmp_path: Path) -> None:
    await sync_pairs(wdb, pairs_config(PAIRS))
    _lake(tmp_path)
    await _chain(wdb, tmp_path)
    before = await snapshot(wdb)
    stamps = {t: await xmins(wdb, t) for t in ("silver.fact_ohlcv", *GOLD_TABLES)}
    source = LakeStore(tmp_path)
    for hour in (LATE + HOUR_MS, LATE):
        assert (await bronze.load_hour(wdb, hour, source)).rows == 0
        assert (await silver.merge_hour(wdb, hour)).rows == 0
        assert (await gold.refresh(wdb, hour)).rows == 0
        assert (await completeness.refresh_hour(wdb, hour)).rows == 0
    assert await snapshot(wdb) == before
    assert {t: await xmins(wdb, t) for t in ("silver.fact_ohlcv", *GOLD_TABLES)} == stamps


async def test_session_time_zone_changes_nothing(wdb: Database, tmp_path: Path) -> None:
    _lake(tmp_path)
    await sync_pairs(wdb, pairs_config(PAIRS))
    await _chain(wdb, tmp_path)
    utc = await snapshot(wdb, wall_clock=False)
    for zone in ("Asia/Kathmandu", "America/St_Johns"):
        await truncate_all(wdb)
        async with open_database(
            Config(database=wdb.config), session_settings={"timezone": zone}
        ) as other:
            assert await other.fetchval("SHOW TimeZone") == zone
            await sync_pairs(other, pairs_config(PAIRS))
            await _chain(other, tmp_path)
            days = await other.fetch("SELECT DISTINCT day FROM monitoring.daily_completeness")
            assert len(days) == 2
        assert await snapshot(wdb, wall_clock=False) == utc, zone


async def test_steps_are_recorded(wdb: Database, tmp_path: Path) -> None:
    write_part(tmp_path, [candle(H0)], "x")
    result = await run_step(
        wdb, "bronze", H0, bronze.load_hour, H0, LakeStore(tmp_path), trigger="manual"
    )
    assert result.rows == 1
    with pytest.raises(ZeroDivisionError):
        async with record_step(wdb, "silver", H0) as run:
            run.rows = 5
            _ = 1 / 0
    async with record_step(wdb, "gold", None, trigger="catchup") as run:
        run.skip("nothing dirty")
    with anyio.move_on_after(0.2):
        async with record_step(wdb, "completeness", H0):
            await anyio.sleep_forever()
    rows = await wdb.fetch("SELECT * FROM ops.job_runs ORDER BY run_id")
    summary = [(r["step"], r["status"], r["rows"], r["trigger"], r["error"]) for r in rows]
    assert summary == [
        ("bronze", "ok", 1, "manual", None),
        ("silver", "failed", 5, "schedule", "ZeroDivisionError: division by zero"),
        ("gold", "skipped", 0, "catchup", None),
        ("completeness", "failed", 0, "schedule", "cancelled"),
    ]
    assert all(r["finished_at"] >= r["started_at"] and r["duration_ms"] >= 0 for r in rows)
    assert rows[0]["details"] is not None and '"parts_loaded": 1' in rows[0]["details"]
    assert rows[0]["hour_start"].timestamp() * 1000 == H0 and rows[2]["hour_start"] is None


async def test_a_failure_inside_a_task_group_is_recorded_as_its_cause(wdb: Database) -> None:
    async def unreadable() -> None:
        raise PermissionError(13, "Permission denied", "part-1.jsonl")

    with pytest.raises(BaseExceptionGroup):
        async with (
            record_step(wdb, "bronze", H0, trigger="manual"),
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(unreadable)
    row = await wdb.fetchrow("SELECT status, error, pid, host FROM ops.job_runs")
    assert row is not None and row["status"] == "failed"
    assert row["error"].startswith("PermissionError: [Errno 13] Permission denied"), row["error"]
    assert row["pid"] and row["host"]


async def test_a_chain_marks_runs_of_gone_processes_abandoned(wdb: Database) -> None:
    import sys

    from klined.jobs.chain import run_chain
    from klined.jobs.ops import HOST

    gone = await anyio.run_process([sys.executable, "-c", "import os; print(os.getpid())"])
    dead_pid = int(gone.stdout)
    await wdb.execute(
        "INSERT INTO ops.job_runs (hour_start, step, status, pid, host)"
        " VALUES ($1, 'silver', 'running', $2, $3), ($1, 'gold', 'ok', $2, $3)",
        to_datetime(H0),
        dead_pid,
        HOST,
    )
    await run_chain(wdb, Config(), [], trigger="manual")
    rows = await wdb.fetch("SELECT step, status, error FROM ops.job_runs ORDER BY run_id")
    by_step = {r["step"]: r for r in rows}
    assert by_step["silver"]["status"] == "abandoned"
    assert f"process {dead_pid} on {HOST} is gone" in by_step["silver"]["error"]
    assert by_step["gold"]["status"] == "ok"


async def test_settling_dropped_minutes_opens_only_their_hours_of_silver(wdb: Database) -> None:
    """Minutes the lake dropped are settled once silver has them, and checking that opens the
    silver partitions of their hours only (a year of hourly partitions, all opened, overflows
    the server's lock table: "out of shared memory")."""
    await wdb.ensure_partitions(range(H0 - 200 * HOUR_MS, H0 + 200 * HOUR_MS, HOUR_MS))
    start, end = H0 + 10 * MINUTE_MS, H0 + 12 * MINUTE_MS
    await record_lake_drops(wdb, [DroppedRange("binance", "BTC/USD", start, end, 5)])

    class OneConnection:  # settle_lake_drops on a connection whose locks can be counted
        def __init__(self, conn: Any) -> None:
            self.fetch, self.execute = conn.fetch, conn.execute

    async def settle() -> tuple[int, int]:
        async with wdb.transaction() as conn:
            settled = await settle_lake_drops(OneConnection(conn), H0)  # type: ignore[arg-type]
            locked = await conn.fetchval(
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE l.pid = pg_backend_pid() AND n.nspname = 'silver'"
            )
        return settled, locked

    settled, locked = await settle()
    assert settled == 0 and 0 < locked <= 4  # the hour's partition and its key, maybe the parent
    await bronze.insert_candles(wdb, [candle(start), candle(start + MINUTE_MS)])
    await silver.merge_hour(wdb, H0)
    assert (await settle())[0] == 1
