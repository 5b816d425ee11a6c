"""Completeness never hides an hour: every closed hour of a pair's coverage has a row, pending
until the chain processed it, and the daily figures divide by every covered minute."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from klined.config import Config, DatabaseConfig
from klined.jobs import bronze, completeness
from klined.jobs.chain import run_chain
from klined.jobs.chain_report import MERGE_STEPS
from klined.jobs.scheduler import closed_end_ms, select_hours
from klined.lake import LakeStore
from klined.model import DAY_MS, HOUR_MS, MINUTE_MS, to_datetime
from klined.warehouse.coverage import covered_from, extend_coverage, record_capture_start
from klined.warehouse.database import Database, open_database, sync_pairs
from tests.support.warehouse import (
    H0,
    candle,
    pairs_config,
    warehouse_dsn,
    wdb,
    write_part,
)

__all__ = ["warehouse_dsn", "wdb"]

pytestmark = pytest.mark.anyio

BTC = {"binance": ["BTC/USD"]}


def config(db: Database, catchup_hours: int = 48) -> Config:
    cfg = Config(database=DatabaseConfig(dsn=db.dsn))
    cfg.chain.catchup_hours = catchup_hours
    cfg.chain.rest_retry_hours = 0
    return cfg


async def capture_hours(db: Database, first: int, hours: int) -> None:
    """Every minute of ``hours`` hours from ``first`` captured final into bronze."""
    await bronze.insert_candles(
        db,
        [candle(first + m * MINUTE_MS) for m in range(hours * 60)],
        reason="lake_parts",
    )


async def daily(db: Database) -> dict[str, object]:
    row = await db.fetchrow(
        "SELECT * FROM monitoring.daily_completeness WHERE exchange = 'binance'"
        " AND symbol = 'BTC/USD'"
    )
    assert row is not None
    return dict(row)


async def test_a_pair_captured_five_hours_with_two_processed_has_three_pending(
    wdb: Database,
) -> None:
    """The issue's case: the daemon captured 5 closed hours, the chain processed 2 of them."""
    await sync_pairs(wdb, pairs_config(BTC))
    await record_capture_start(wdb, H0 + 7 * MINUTE_MS)  # the daemon started at 10:07
    await capture_hours(wdb, H0, 5)
    now = H0 + 5 * HOUR_MS + 5 * MINUTE_MS  # 15:05: hours 10..14 are closed
    cfg = config(wdb)
    report = await run_chain(
        wdb,
        cfg,
        [H0 + 3 * HOUR_MS, H0 + 4 * HOUR_MS],
        trigger="manual",
        steps=MERGE_STEPS,
        maintain_partitions=False,
    )
    assert report.ok, report.table()
    assert await completeness.mark_pending(wdb, closed_end_ms(cfg, now)) == 3

    rows = await wdb.fetch(
        "SELECT hour_start, pending, missing, ws_final, completion_rate"
        " FROM monitoring.hourly_completeness ORDER BY hour_start"
    )
    assert [r["hour_start"] for r in rows] == [to_datetime(H0 + i * HOUR_MS) for i in range(5)]
    assert [r["pending"] for r in rows] == [True, True, True, False, False]
    assert sum(r["missing"] for r in rows if r["pending"]) == 180
    assert [r["ws_final"] for r in rows] == [0, 0, 0, 60, 60]
    day = await daily(wdb)
    assert (day["expected"], day["missing"], day["hours"], day["pending_hours"]) == (
        300,
        180,
        5,
        3,
    )
    assert day["completion_rate"] == Decimal("0.4000")
    exchange = await wdb.fetchrow(
        "SELECT pending_pairs, completion_rate FROM monitoring.exchange_hourly_completeness"
        " WHERE hour_start = $1",
        to_datetime(H0),
    )
    assert exchange is not None and (exchange["pending_pairs"], exchange["completion_rate"]) == (
        1,
        Decimal("0"),
    )

    # the scheduler's catch-up takes the pending hours, newest first, and then all is counted
    todo = await select_hours(wdb, cfg, now)
    assert todo == [H0 + 2 * HOUR_MS, H0 + HOUR_MS, H0]
    assert (
        await run_chain(
            wdb, cfg, todo, trigger="catchup", steps=MERGE_STEPS, maintain_partitions=False
        )
    ).ok
    day = await daily(wdb)
    assert (day["expected"], day["missing"], day["pending_hours"]) == (300, 0, 0)
    assert day["completion_rate"] == Decimal("1.0000")
    assert await select_hours(wdb, cfg, now) == []


async def test_a_covered_day_expects_1440_minutes_and_the_first_day_counts_from_its_start(
    wdb: Database,
) -> None:
    day0 = H0 - H0 % DAY_MS
    await sync_pairs(wdb, pairs_config(BTC))
    await record_capture_start(wdb, day0 + 22 * HOUR_MS + 30 * MINUTE_MS)  # 22:30 on day 0
    now = day0 + 2 * DAY_MS + 3 * HOUR_MS  # day 2, 03:00
    assert await completeness.mark_pending(wdb, closed_end_ms(config(wdb), now)) == 2 + 24 + 2
    days = await wdb.fetch(
        "SELECT day, expected, missing, hours, pending_hours, completion_rate"
        " FROM monitoring.daily_completeness ORDER BY day"
    )
    assert [(d["expected"], d["hours"], d["pending_hours"]) for d in days] == [
        (120, 2, 2),  # 22:00 and 23:00 of the first day
        (1440, 24, 24),
        (120, 2, 2),  # today so far: its closed hours (02:00 is within the grace period)
    ]
    assert all(d["completion_rate"] == 0 and d["missing"] == d["expected"] for d in days)
    # marking again adds nothing (and looks only at hours not done before)
    assert await completeness.mark_pending(wdb, closed_end_ms(config(wdb), now)) == 0


async def test_processed_rows_are_never_overwritten_by_pending_ones(wdb: Database) -> None:
    await sync_pairs(wdb, pairs_config(BTC))
    await extend_coverage(wdb, [("binance", "BTC/USD")], H0)
    await capture_hours(wdb, H0, 1)
    cfg = config(wdb)
    await run_chain(wdb, cfg, [H0], trigger="manual", steps=MERGE_STEPS, maintain_partitions=False)
    await wdb.execute("UPDATE ops.pairs SET completeness_from = NULL, completeness_to = NULL")
    assert await completeness.mark_pending(wdb, H0 + 2 * HOUR_MS) == 1  # only 11:00
    row = await wdb.fetchrow(
        "SELECT pending, ws_final FROM monitoring.hourly_completeness WHERE hour_start = $1",
        to_datetime(H0),
    )
    assert row is not None and (row["pending"], row["ws_final"]) == (False, 60)


async def test_coverage_starts_at_capture_or_backfill_and_ends_with_the_config(
    wdb: Database, tmp_path: Path
) -> None:
    pairs = {"binance": ["BTC/USD", "ETH/USD"]}
    await sync_pairs(wdb, pairs_config(pairs), now_ms=H0)
    assert await covered_from(wdb) is None  # configured is not tracked
    # a lake part is proof of capture: loading it covers its pair from its hour
    write_part(tmp_path, [candle(H0 + 2 * HOUR_MS + MINUTE_MS)], "p")
    await bronze.load_hour(wdb, H0 + 2 * HOUR_MS, LakeStore(tmp_path))
    starts = await coverage(wdb)
    assert starts == {"BTC/USD": (H0 + 2 * HOUR_MS, None), "ETH/USD": (None, None)}
    # the daemon's capture start covers every active pair, never later than before
    await record_capture_start(wdb, H0 + 5 * HOUR_MS)
    assert await coverage(wdb) == {
        "BTC/USD": (H0 + 2 * HOUR_MS, None),
        "ETH/USD": (H0 + 5 * HOUR_MS, None),
    }
    # a backfill reaches further back
    await extend_coverage(wdb, [("binance", "ETH/USD")], H0 + HOUR_MS)
    assert (await coverage(wdb))["ETH/USD"] == (H0 + HOUR_MS, None)

    # ETH leaves the configuration at 17:20: its coverage ends with hour 17 (exclusive) and
    # no pending rows are added after that; its rows stay
    await sync_pairs(wdb, pairs_config(BTC), now_ms=H0 + 7 * HOUR_MS + 20 * MINUTE_MS)
    assert (await coverage(wdb))["ETH/USD"] == (H0 + HOUR_MS, H0 + 7 * HOUR_MS)
    await completeness.mark_pending(wdb, H0 + 10 * HOUR_MS)
    eth = await hours_of(wdb, "ETH/USD")
    assert eth == [H0 + i * HOUR_MS for i in range(1, 7)]
    # configured again at 20:10: a new coverage starts when it is next captured; the ended
    # one stays as history, and the hours in between are not owed
    await sync_pairs(wdb, pairs_config(pairs), now_ms=H0 + 10 * HOUR_MS + 10 * MINUTE_MS)
    assert (await coverage(wdb))["ETH/USD"] == (None, None)
    await record_capture_start(wdb, H0 + 10 * HOUR_MS + 10 * MINUTE_MS)
    await completeness.mark_pending(wdb, H0 + 13 * HOUR_MS)
    assert await hours_of(wdb, "ETH/USD") == [
        *(H0 + i * HOUR_MS for i in range(1, 7)),
        *(H0 + i * HOUR_MS for i in range(10, 13)),
    ]


async def test_an_unlisted_pair_is_not_owed_any_hour(wdb: Database) -> None:
    await sync_pairs(wdb, pairs_config({"binance": ["BTC/USD", "PUMP/USD"]}))
    await wdb.execute("UPDATE ops.pairs SET listed = (symbol = 'BTC/USD')")
    await record_capture_start(wdb, H0)
    await completeness.mark_pending(wdb, H0 + 3 * HOUR_MS)
    assert await hours_of(wdb, "PUMP/USD") == []
    assert len(await hours_of(wdb, "BTC/USD")) == 3


async def test_an_older_warehouse_gets_its_coverage_from_the_hours_it_counted(
    warehouse_dsn: str, wdb: Database
) -> None:
    """Upgrading: a warehouse from before coverage existed starts each pair's coverage at the
    first hour its completeness was counted (once, when the column is added)."""
    await sync_pairs(wdb, pairs_config(BTC))
    await wdb.execute(
        "INSERT INTO monitoring.hourly_completeness (exchange, symbol, hour_start, expected,"
        " ws_final, rest, trades, no_trades, ws_partial, missing, completion_rate)"
        " VALUES ('binance', 'BTC/USD', $1, 60, 60, 0, 0, 0, 0, 0, 1)",
        to_datetime(H0 + 3 * HOUR_MS),
    )
    await wdb.execute("ALTER TABLE ops.pairs DROP COLUMN coverage_start")
    try:
        async with open_database(Config(database=DatabaseConfig(dsn=warehouse_dsn)),
                                 apply_schema=True) as db:  # fmt: skip
            assert await coverage(db) == {"BTC/USD": (H0 + 3 * HOUR_MS, None)}
            await db.execute("UPDATE ops.pairs SET coverage_start = NULL")
            await db.apply_schema()  # once: a second start changes nothing
            assert await coverage(db) == {"BTC/USD": (None, None)}
    finally:
        await wdb.execute(
            "ALTER TABLE ops.pairs ADD COLUMN IF NOT EXISTS coverage_start timestamptz"
        )


async def coverage(db: Database) -> dict[str, tuple[int | None, int | None]]:
    rows = await db.fetch("SELECT symbol, coverage_start, coverage_end FROM ops.pairs")
    return {
        r["symbol"]: tuple(  # type: ignore[misc]
            None if r[k] is None else int(r[k].timestamp() * 1000)
            for k in ("coverage_start", "coverage_end")
        )
        for r in rows
    }


async def hours_of(db: Database, symbol: str) -> list[int]:
    rows = await db.fetch(
        "SELECT hour_start FROM monitoring.hourly_completeness WHERE symbol = $1"
        " ORDER BY hour_start",
        symbol,
    )
    return [int(r["hour_start"].timestamp() * 1000) for r in rows]


async def test_a_pair_found_unlisted_later_drops_its_pending_hours(wdb: Database) -> None:
    """The listing was unknown at start (the exchange's REST down): its hours were owed; once
    the listing says the exchange does not trade it, the unprocessed ones are not."""
    from klined.model import Pair
    from klined.warehouse.database import set_pair_listing

    await sync_pairs(wdb, pairs_config({"binance": ["BTC/USD", "PUMP/USD"]}))
    await record_capture_start(wdb, H0)
    await completeness.mark_pending(wdb, H0 + 3 * HOUR_MS)
    assert len(await hours_of(wdb, "PUMP/USD")) == 3
    await set_pair_listing(wdb, "binance", Pair.parse("PUMP/USD"), False, "not listed")
    assert await hours_of(wdb, "PUMP/USD") == []
    assert len(await hours_of(wdb, "BTC/USD")) == 3
    await completeness.mark_pending(wdb, H0 + 4 * HOUR_MS)
    assert await hours_of(wdb, "PUMP/USD") == []
    await set_pair_listing(wdb, "binance", Pair.parse("PUMP/USD"), True)  # listed after all
    await completeness.mark_pending(wdb, H0 + 4 * HOUR_MS)
    assert len(await hours_of(wdb, "PUMP/USD")) == 4
