"""``klined import kraken`` of OHLCVT zips and folders written from the simulator's market:
silver equals the truth inside each file's span (omitted minutes become ``no_trades``), other
intervals and pairs are skipped with a note, re-imports change nothing, bad files are reported
and leave nothing behind."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import pytest

from klined.jobs import archive
from klined.jobs.archive_import import import_kraken
from klined.jobs.gapfill import sync_configured_pairs
from klined.lake import iter_local_parts, parse_key
from klined.model import DAY_MS, HOUR_MS, MINUTE_MS, Pair, floor_hour, from_datetime
from klined.sim import Market
from klined.sim.archive import kraken_lines, write_kraken_zip
from klined.warehouse.database import Database, open_database
from tests.fixtures.sim import SIM_START
from tests.support.truth import (
    assert_completeness,
    assert_silver_is_truth,
    make_config,
    table_hashes,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PAIRS = ["BTC/USD", "REKT/USD"]
DAY0 = SIM_START - SIM_START % DAY_MS - 3 * DAY_MS
SEED = 7


@pytest.fixture
def market() -> Market:
    return Market(SEED)


def lake_symbols(root: Path) -> set[str]:
    """The pairs with parts in the local lake; no half-written part anywhere."""
    assert not list(root.rglob("*.writing"))
    return {parse_key(p.key).symbol for p in iter_local_parts(root)}


async def spans(db: Database) -> dict[str, tuple[int, int]]:
    rows = await db.fetch(
        "SELECT symbol, first_minute, last_minute FROM ops.archive_files WHERE status = 'loaded'"
    )
    return {
        r["symbol"]: (from_datetime(r["first_minute"]), from_datetime(r["last_minute"]) + MINUTE_MS)
        for r in rows
    }


async def test_kraken_zip_import_equals_truth_and_a_reimport_changes_nothing(
    sim_factory: Any, pg_dsn: str, tmp_path: Path, market: Market
) -> None:
    archive = write_kraken_zip(market, tmp_path / "Kraken_OHLCVT.zip", [*PAIRS, "ETH/USD"],
                               DAY0, DAY0 + 2 * DAY_MS)  # fmt: skip
    async with sim_factory(pairs=PAIRS) as sim:
        cfg = make_config(sim, pg_dsn, PAIRS, data_dir=str(tmp_path), exchanges=("kraken",))
        pairs = [Pair.parse(p) for p in PAIRS]
        async with open_database(cfg, apply_schema=True) as db:
            await sync_configured_pairs(db, cfg)
            result = await import_kraken(db, cfg, [archive], pairs)
            assert result.ok, result.errors
            assert [r.loaded for r in result.reports] == [1, 1]
            assert "ignored 6 files of other intervals (5, 60 min)" in result.notes
            assert any("ETHUSD" in n and "not configured" in n for n in result.notes)
            names = sorted(r["name"] for r in await db.fetch("SELECT name FROM ops.archive_files"))
            assert names == ["Kraken_OHLCVT.zip/REKTUSD_1.csv", "Kraken_OHLCVT.zip/XBTUSD_1.csv"]
            covered = await spans(db)
            by_pair = {r.symbol: r for r in result.reports}
            # REKT trades rarely: Kraken omits its quiet minutes; they come back as no_trades
            assert by_pair["REKT/USD"].no_trades > 0
            lo = max(s for s, _ in covered.values())
            hi = min(e for _, e in covered.values())
            counts = await assert_silver_is_truth(db, sim, "kraken", PAIRS, lo, hi)
            assert set(counts) == {"archive", "no_trades"}
            for pair, (first, last) in covered.items():
                # a file proves nothing before its first row or after its last
                first_traded = next(
                    m
                    for m in range(DAY0, last, MINUTE_MS)
                    if market.truth("kraken", pair, m).trades
                )
                assert first == first_traded
                edges = await db.fetchrow(
                    "SELECT min(interval_start) AS a, max(interval_start) AS b FROM"
                    " silver.fact_ohlcv WHERE symbol = $1",
                    pair,
                )
                assert edges is not None
                assert (from_datetime(edges["a"]), from_datetime(edges["b"])) == (
                    first,
                    last - MINUTE_MS,
                )

            before = await table_hashes(db)
            again = await import_kraken(db, cfg, [archive], pairs)
            assert again.ok and [r.unchanged for r in again.reports] == [1, 1]
            assert again.hours_merged == 0 and await table_hashes(db) == before

            # the same CSVs extracted to a folder: the same checksums, nothing to do
            folder = tmp_path / "extracted"
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(folder)
            third = await import_kraken(db, cfg, [folder], pairs)
            assert third.ok and [r.unchanged for r in third.reports] == [1, 1]
            assert await table_hashes(db) == before


async def test_every_hour_inside_the_files_is_complete(
    sim_factory: Any, pg_dsn: str, tmp_path: Path, market: Market
) -> None:
    archive = write_kraken_zip(
        market, tmp_path / "k.zip", PAIRS, DAY0, DAY0 + DAY_MS, intervals=(1,)
    )
    async with sim_factory(pairs=PAIRS) as sim:
        cfg = make_config(sim, pg_dsn, PAIRS, data_dir=str(tmp_path), exchanges=("kraken",))
        async with open_database(cfg, apply_schema=True) as db:
            await sync_configured_pairs(db, cfg)
            result = await import_kraken(db, cfg, [archive], [Pair.parse(p) for p in PAIRS])
            assert result.ok
            covered = await spans(db)
            lo = max(floor_hour(s) + HOUR_MS for s, _ in covered.values())
            hi = min(floor_hour(e) for _, e in covered.values())
            assert hi - lo >= 20 * HOUR_MS
            await assert_completeness(db, "kraken", PAIRS, list(range(lo, hi, HOUR_MS)))


async def test_a_window_loads_only_its_minutes(
    sim_factory: Any, pg_dsn: str, tmp_path: Path, market: Market
) -> None:
    archive = write_kraken_zip(
        market, tmp_path / "k.zip", PAIRS, DAY0, DAY0 + DAY_MS, intervals=(1,)
    )
    async with sim_factory(pairs=PAIRS) as sim:
        cfg = make_config(sim, pg_dsn, PAIRS, data_dir=str(tmp_path), exchanges=("kraken",))
        lo, hi = DAY0 + 6 * HOUR_MS, DAY0 + 8 * HOUR_MS
        async with open_database(cfg, apply_schema=True) as db:
            await sync_configured_pairs(db, cfg)
            result = await import_kraken(
                db, cfg, [archive], [Pair.parse(p) for p in PAIRS], window=(lo, hi)
            )
            assert result.ok
            span = await db.fetchrow(
                "SELECT min(interval_start) AS a, max(interval_start) AS b, count(*) AS n"
                " FROM silver.fact_ohlcv"
            )
            assert span is not None and span["n"] == len(PAIRS) * 120
            assert from_datetime(span["a"]) == lo and from_datetime(span["b"]) == hi - MINUTE_MS
            await assert_silver_is_truth(db, sim, "kraken", PAIRS, lo, hi)
            # the whole file later: what the window loaded is not loaded twice
            whole = await import_kraken(db, cfg, [archive], [Pair.parse(p) for p in PAIRS])
            assert whole.ok and [r.loaded for r in whole.reports] == [1, 1]
            dupes = await db.fetchval(
                "SELECT count(*) FROM (SELECT 1 FROM silver.fact_ohlcv"
                " GROUP BY symbol, interval_start HAVING count(*) > 1) x"
            )
            assert dupes == 0


async def test_bad_kraken_files_are_reported_and_leave_nothing_behind(
    sim_factory: Any, pg_dsn: str, tmp_path: Path, market: Market
) -> None:
    good = write_kraken_zip(market, tmp_path / "good.zip", ["REKT/USD"], DAY0, DAY0 + DAY_MS,
                            intervals=(1,))  # fmt: skip
    # a zip cut short: its central directory is gone
    whole = write_kraken_zip(market, tmp_path / "full.zip", ["ETH/USD"], DAY0, DAY0 + DAY_MS)
    cut = tmp_path / "cut.zip"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    # a CSV with one bad row among good ones
    lines = list(kraken_lines(market, "BTC/USD", DAY0, DAY0 + DAY_MS))
    bad_line = len(lines) // 2
    fields = lines[bad_line - 1].split(",")
    fields[4] = "-5"  # a negative close
    lines[bad_line - 1] = ",".join(fields)
    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "XBTUSD_1.csv").write_text("\n".join(lines) + "\n")
    pairs = ["BTC/USD", "ETH/USD", "REKT/USD"]
    async with sim_factory(pairs=pairs) as sim:
        cfg = make_config(sim, pg_dsn, pairs, data_dir=str(tmp_path), exchanges=("kraken",))
        async with open_database(cfg, apply_schema=True) as db:
            await sync_configured_pairs(db, cfg)
            result = await import_kraken(
                db, cfg, [good, cut, folder], [Pair.parse(p) for p in pairs]
            )
            assert not result.ok
            errors = sorted(str(e) for e in result.errors)
            assert len(errors) == 2, errors
            assert errors[0].startswith(f"XBTUSD_1.csv line {bad_line}: close")
            assert errors[1].startswith("cut.zip: not a readable zip")
            by_pair = {r.symbol: r for r in result.reports}
            assert by_pair["BTC/USD"].failed == 1 and by_pair["REKT/USD"].loaded == 1
            assert any("ETH/USD" in n for n in result.notes)  # no file for it could be read
            symbols = {
                r["symbol"]
                for r in await db.fetch("SELECT DISTINCT symbol FROM bronze.bronze_ohlcv_native")
            }
            assert symbols == {"REKT/USD"}
            assert lake_symbols(cfg.lake_root) == {"REKT/USD"}


async def test_a_file_across_months_is_checked_whole_then_written_a_month_at_a_time(
    sim_factory: Any, pg_dsn: str, tmp_path: Path, market: Market, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(archive, "HOURS_PER_TRANSACTION", 5)
    dec = 1_764_547_200_000  # 2025-12-01
    lo, hi = dec - 12 * HOUR_MS, dec + 12 * HOUR_MS
    lines = list(kraken_lines(market, "BTC/USD", lo, hi))
    bad = next(i for i, line in enumerate(lines) if int(line.split(",")[0]) * 1000 > dec + HOUR_MS)
    broken = [*lines[:bad], "1764554400,1,2,0.5,x,1,1", *lines[bad:]]
    folder = tmp_path / "csv"
    folder.mkdir()
    csv = folder / "XBTUSD_1.csv"
    csv.write_text("\n".join(broken) + "\n")
    async with sim_factory(pairs=["BTC/USD"]) as sim:
        cfg = make_config(sim, pg_dsn, ["BTC/USD"], data_dir=str(tmp_path), exchanges=("kraken",))
        async with open_database(cfg, apply_schema=True) as db:
            await sync_configured_pairs(db, cfg)
            result = await import_kraken(db, cfg, [csv], [Pair("BTC", "USD")])
            (error,) = result.errors
            assert str(error).startswith(f"XBTUSD_1.csv line {bad + 1}: close")
            # November's rows come first in the file, and still nothing was written
            assert await db.fetchval("SELECT count(*) FROM bronze.bronze_ohlcv_native") == 0
            assert lake_symbols(cfg.lake_root) == set()

            csv.write_text("\n".join(lines) + "\n")
            result = await import_kraken(db, cfg, [csv], [Pair("BTC", "USD")])
            assert result.ok
            (ledger,) = await db.fetch("SELECT rows, first_minute FROM ops.archive_files")
            assert ledger["rows"] == (hi - lo) // MINUTE_MS
            # a part per hour, loaded five hours per transaction: 24 parts, 5 transactions
            loads = await db.fetch(
                "SELECT xmin::text AS x, count(*) AS n FROM ops.lake_parts GROUP BY 1 ORDER BY 2"
            )
            assert [r["n"] for r in loads] == [4, 5, 5, 5, 5]
            await assert_silver_is_truth(db, sim, "kraken", ["BTC/USD"], lo, hi)
