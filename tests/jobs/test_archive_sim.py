"""``klined import binance`` against the simulator's archive and an embedded PostgreSQL: silver,
gold and completeness equal the market's truth; re-imports change nothing; bad files are
reported and leave nothing behind; a revised file replaces its rows; an interrupted import
resumes."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest

from klined.archives.download import ArchiveSource
from klined.jobs import archive
from klined.jobs.archive import TAG
from klined.jobs.archive_import import (
    FileReport,
    ImportResult,
    binance_jobs,
    import_binance,
    load_binance,
)
from klined.jobs.gapfill import sync_configured_pairs
from klined.jobs.ingest import ingest_for
from klined.lake import iter_local_parts, parse_key
from klined.model import DAY_MS, HOUR_MS, MINUTE_MS, Pair, to_datetime
from klined.sim import FaultPlan, FaultRule
from klined.warehouse.database import Database, open_database
from tests.fixtures.sim import SIM_START
from tests.support.truth import (
    assert_completeness,
    assert_gold_is_truth,
    assert_silver_is_truth,
    make_config,
    table_hashes,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PAIRS = ["BTC/USD", "REKT/USD"]
#: 2025-12-29T00:00:00Z, three days before the simulator's clock
DAY0 = SIM_START - SIM_START % DAY_MS - 3 * DAY_MS


def day_name(pair: str, day: int) -> str:
    from klined.model import iso

    return f"{pair.replace('/', '')}-1m-{iso(day)[:10]}.zip"


async def bronze_rows(db: Database, pair: str, start: int, end: int) -> int:
    n: int = await db.fetchval(
        "SELECT count(*) FROM bronze.bronze_ohlcv_native WHERE exchange = 'binance'"
        " AND symbol = $1 AND interval_start >= $2 AND interval_start < $3",
        pair,
        to_datetime(start),
        to_datetime(end),
    )
    return n


def lake_days(root: Path) -> set[tuple[str, int]]:
    """(pair, UTC day) of every part in the local lake; no half-written part anywhere."""
    assert not list(root.rglob("*.writing"))
    days = set()
    for part in iter_local_parts(root):
        key = parse_key(part.key)
        days.add((key.symbol, key.hour_ms - key.hour_ms % DAY_MS))
    return days


async def run_import(db: Database, cfg: Any, sim: Any, start: int, end: int) -> ImportResult:
    return await import_binance(
        db, cfg, [Pair.parse(p) for p in PAIRS], start, end, now_ms=sim.clock.now_ms()
    )


async def test_binance_import_equals_truth_and_a_reimport_changes_nothing(
    sim_factory: Any, pg_dsn: str, tmp_path: Any
) -> None:
    # the second day is the first in microseconds; some files have a header row
    async with sim_factory(pairs=PAIRS, binance_archive_micros_from=DAY0 + DAY_MS) as sim:
        cfg = make_config(sim, pg_dsn, PAIRS, data_dir=str(tmp_path), exchanges=("binance",))
        start, end = DAY0, DAY0 + 2 * DAY_MS
        async with open_database(cfg, apply_schema=True) as db:
            await sync_configured_pairs(db, cfg)
            result = await run_import(db, cfg, sim, start, end)
            assert result.ok, (result.errors, result.notes)
            assert result.rows == 2 * len(PAIRS) * 1440
            assert result.hours_merged == 48 and not result.merges  # only failed ones are kept
            assert [r.loaded for r in result.reports] == [2, 2]
            counts = await assert_silver_is_truth(db, sim, "binance", PAIRS, start, end)
            assert set(counts) == {"archive", "no_trades"} and counts["no_trades"] > 0
            await assert_gold_is_truth(db, sim, "binance", PAIRS, start, end)
            await assert_completeness(db, "binance", PAIRS, list(range(start, end, HOUR_MS)))
            assert not await db.fetch("SELECT 1 FROM ops.dirty_hours")
            ledger = await db.fetch(
                "SELECT name, rows, status FROM ops.archive_files ORDER BY name"
            )
            assert [(r["name"], r["rows"], r["status"]) for r in ledger] == [
                (day_name(p, d), 1440, "loaded") for p in PAIRS for d in (start, start + DAY_MS)
            ]
            # again: only the checksums are fetched, nothing is written
            before = await table_hashes(db)
            zips = sum(
                n for name, n in sim.binance_archive.requests.items() if name.endswith("zip")
            )
            again = await run_import(db, cfg, sim, start, end)
            assert again.ok and again.rows == 0
            assert [r.unchanged for r in again.reports] == [2, 2]
            assert again.hours_merged == 0
            assert await table_hashes(db) == before
            after = sum(
                n for name, n in sim.binance_archive.requests.items() if name.endswith("zip")
            )
            assert after == zips


async def test_bad_files_are_reported_and_leave_nothing_behind(
    sim_factory: Any, pg_dsn: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # hours before the bad row are written to the lake (as parts nothing reads) before it is met
    monkeypatch.setattr(archive, "CHUNK_ROWS", 100)
    d1, d2, d3 = DAY0, DAY0 + DAY_MS, DAY0 + 2 * DAY_MS
    plan = FaultPlan(
        rules=[
            FaultRule(kind="archive_bad_checksum", endpoint=day_name("BTC/USD", d1)[:-4], times=0),
            FaultRule(kind="archive_truncated", endpoint=day_name("REKT/USD", d1)[:-4], times=0),
            FaultRule(kind="archive_bad_row", endpoint=day_name("BTC/USD", d2)[:-4], times=0),
            FaultRule(kind="archive_missing", endpoint=day_name("REKT/USD", d2)[:-4], times=0),
        ]
    )
    async with sim_factory(pairs=PAIRS, faults=plan, binance_archive_header="always") as sim:
        cfg = make_config(sim, pg_dsn, PAIRS, data_dir=str(tmp_path), exchanges=("binance",))
        async with open_database(cfg, apply_schema=True) as db:
            await sync_configured_pairs(db, cfg)
            result = await run_import(db, cfg, sim, d1, d3 + DAY_MS)
            assert not result.ok
            errors = sorted(str(e) for e in result.errors)
            assert len(errors) == 3, errors
            bad_checksum, bad_row, truncated = errors
            assert bad_checksum.startswith(day_name("BTC/USD", d1)) and "checksum" in bad_checksum
            # line 1 is the header: the middle minute (720) is on line 722
            assert bad_row.startswith(day_name("BTC/USD", d2) + " line 722:"), bad_row
            assert "high" in bad_row and "not a number" in bad_row
            assert truncated.startswith(day_name("REKT/USD", d1)) and "zip" in truncated
            by_pair = {r.symbol: r for r in result.reports}
            assert (by_pair["BTC/USD"].failed, by_pair["BTC/USD"].loaded) == (2, 1)
            assert (by_pair["REKT/USD"].failed, by_pair["REKT/USD"].missing) == (1, 1)
            assert by_pair["REKT/USD"].missing_days == [d2]
            # nothing of the bad files, all of the good ones, in the lake and in bronze
            assert lake_days(cfg.lake_root) == {("BTC/USD", d3), ("REKT/USD", d3)}
            assert not [d for d in cfg.lake_root.rglob("day=*") if not any(d.rglob("*.gz"))]
            assert await bronze_rows(db, "BTC/USD", d1, d3) == 0
            assert await bronze_rows(db, "REKT/USD", d1, d3) == 0
            await assert_silver_is_truth(db, sim, "binance", PAIRS, d3, d3 + DAY_MS)
            assert await db.fetchval("SELECT count(*) FROM ops.archive_files") == 2


async def test_a_revised_file_replaces_its_rows(
    sim_factory: Any, pg_dsn: str, tmp_path: Any
) -> None:
    async with sim_factory(pairs=PAIRS) as sim:
        cfg = make_config(sim, pg_dsn, PAIRS, data_dir=str(tmp_path), exchanges=("binance",))
        start, end = DAY0, DAY0 + DAY_MS
        async with open_database(cfg, apply_schema=True) as db:
            await sync_configured_pairs(db, cfg)
            assert (await run_import(db, cfg, sim, start, end)).ok
            name = day_name("BTC/USD", start)
            sim.binance_archive.set_variant(name, "revised")
            again = await run_import(db, cfg, sim, start, end)
            assert again.ok
            by_pair = {r.symbol: r for r in again.reports}
            assert (by_pair["BTC/USD"].loaded, by_pair["REKT/USD"].unchanged) == (1, 1)
            ledger = await db.fetch(
                "SELECT status FROM ops.archive_files WHERE name = $1 ORDER BY file_id", name
            )
            assert [r["status"] for r in ledger] == ["superseded", "loaded"]
            # the first traded minute's volume is one step larger; every other minute is truth
            first = next(
                m
                for m in range(start, end, MINUTE_MS)
                if sim.market.truth("binance", "BTC/USD", m).trades
            )
            truth = sim.market.truth("binance", "BTC/USD", first)
            step = Decimal("0.00000001")  # the last decimal Binance writes
            volume = await db.fetchval(
                "SELECT volume FROM silver.fact_ohlcv WHERE exchange = 'binance'"
                " AND symbol = 'BTC/USD' AND interval_start = $1",
                to_datetime(first),
            )
            assert volume == Decimal(truth.volume) + step
            await assert_silver_is_truth(db, sim, "binance", PAIRS, first + MINUTE_MS, end)
            gold_volume = await db.fetchval(
                "SELECT volume FROM gold.ohlcv_5m WHERE exchange = 'binance'"
                " AND symbol = 'BTC/USD' AND interval_start = $1",
                to_datetime(first - first % (5 * MINUTE_MS)),
            )
            bucket = first - first % (5 * MINUTE_MS)
            truth_5m = sum(
                Decimal(sim.market.truth("binance", "BTC/USD", m).volume)
                for m in range(bucket, bucket + 5 * MINUTE_MS, MINUTE_MS)
            )
            assert gold_volume == truth_5m + step


async def test_a_whole_month_comes_as_one_monthly_file(
    sim_factory: Any, pg_dsn: str, tmp_path: Any
) -> None:
    """November 2025 in one file, the days around it in daily ones. (Loaded without the
    merge: a month of hours merges like any other, only slowly.)"""
    nov, dec = 1_761_955_200_000, 1_764_547_200_000
    async with sim_factory(pairs=["REKT/USD"]) as sim:
        cfg = make_config(sim, pg_dsn, ["REKT/USD"], data_dir=str(tmp_path), exchanges=("binance",))
        async with (
            open_database(cfg, apply_schema=True) as db,
            ArchiveSource(sim.binance_archive_url, work_dir=tmp_path) as source,
        ):
            report = FileReport("binance", "REKT/USD")
            days = list(range(nov - DAY_MS, dec + DAY_MS, DAY_MS))
            jobs = binance_jobs([(Pair.parse("REKT/USD"), "REKTUSD", report)], days)
            result = ImportResult()
            await load_binance(
                db, source, jobs, workers=2, result=result, ingest=ingest_for(db, cfg, tag=TAG),
                now_ms=sim.clock.now_ms(),
            )  # fmt: skip
            assert not result.errors and report.rows == len(days) * 1440
            names = [r["name"] for r in await db.fetch("SELECT name FROM ops.archive_files")]
            assert sorted(names) == [
                "REKTUSD-1m-2025-10-31.zip", "REKTUSD-1m-2025-11.zip", "REKTUSD-1m-2025-12-01.zip"
            ]  # fmt: skip
            row = await db.fetchrow(
                "SELECT count(*) AS n, sum(volume) AS v, sum(trade_count) AS t"
                " FROM bronze.bronze_ohlcv_native WHERE interval_start >= $1"
                " AND interval_start < $2",
                to_datetime(nov),
                to_datetime(dec),
            )
            truth = list(sim.market.truth_range("binance", "REKT/USD", nov, dec))
            assert row is not None and row["n"] == len(truth)
            assert row["v"] == sum(Decimal(t.volume) for t in truth)
            assert row["t"] == sum(t.trades for t in truth)


async def test_a_month_not_published_yet_is_read_day_by_day(
    sim_factory: Any, pg_dsn: str, tmp_path: Any
) -> None:
    """Binance publishes a month's file days after the month: until then, its days. (Here the
    days are missing too, so nothing loads and the test stays quick.)"""
    nov, dec = 1_761_955_200_000, 1_764_547_200_000
    plan = FaultPlan(rules=[FaultRule(kind="archive_missing", endpoint="-2025-11-", times=0)])
    async with sim_factory(
        pairs=["REKT/USD"], binance_archive_monthly_delay_days=60, faults=plan
    ) as sim:
        cfg = make_config(sim, pg_dsn, ["REKT/USD"], data_dir=str(tmp_path), exchanges=("binance",))
        async with (
            open_database(cfg, apply_schema=True) as db,
            ArchiveSource(sim.binance_archive_url, work_dir=tmp_path) as source,
        ):
            report = FileReport("binance", "REKT/USD")
            days = list(range(nov, dec, DAY_MS))
            jobs = binance_jobs([(Pair.parse("REKT/USD"), "REKTUSD", report)], days)
            assert [j.period.kind for j in jobs] == ["monthly"]
            await load_binance(db, source, jobs, workers=1, result=ImportResult(),
                               ingest=ingest_for(db, cfg, tag=TAG),
                               now_ms=sim.clock.now_ms())  # fmt: skip
            assert report.files == 30 and report.missing == 30 and report.missing_days == days
            asked = [n for n in sim.binance_archive.requests if n.endswith(".CHECKSUM")]
            assert "REKTUSD-1m-2025-11.zip.CHECKSUM" in asked and len(asked) == 31


async def test_an_interrupted_import_resumes_without_duplicates(
    sim_factory: Any, pg_dsn: str, tmp_path: Any
) -> None:
    async with sim_factory(pairs=PAIRS) as sim:
        cfg = make_config(sim, pg_dsn, PAIRS, data_dir=str(tmp_path), exchanges=("binance",))
        start, end = DAY0 - 3 * DAY_MS, DAY0 + 3 * DAY_MS
        async with open_database(cfg, apply_schema=True) as db:
            await sync_configured_pairs(db, cfg)
            with anyio.move_on_after(60) as scope:
                async with anyio.create_task_group() as tg:

                    async def interrupt() -> None:
                        query = "SELECT count(*) >= 3 FROM ops.archive_files"
                        while not await db.fetchval(query):  # noqa: ASYNC110 - polling the DB
                            await anyio.sleep(0.01)
                        tg.cancel_scope.cancel()

                    tg.start_soon(interrupt)
                    await run_import(db, cfg, sim, start, end)
            assert not scope.cancelled_caught
            loaded = await db.fetchval("SELECT count(*) FROM ops.archive_files")
            assert 3 <= loaded < 12
            lake_days(cfg.lake_root)  # files cut short by the interruption left no .writing
            again = await run_import(db, cfg, sim, start, end)
            assert again.ok
            assert sum(r.unchanged for r in again.reports) == loaded
            assert await db.fetchval("SELECT count(*) FROM ops.archive_files") == 12
            dupes = await db.fetchval(
                "SELECT count(*) FROM (SELECT 1 FROM bronze.bronze_ohlcv_native"
                " GROUP BY symbol, interval_start HAVING count(*) > 1) x"
            )
            assert dupes == 0
            await assert_silver_is_truth(db, sim, "binance", PAIRS, start, end)
            hours = list(range(start, end, HOUR_MS))
            await assert_completeness(db, "binance", PAIRS, hours)
