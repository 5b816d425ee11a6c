"""The Spark job in local mode against the warehouse, on the same lake, row for row.

1. Hand-made ties: one lake of parts whose rows differ only in the later tie-break columns
   (rank, event time, ingestion time, close, high, low, open, volume, trade count, quote
   volume, vwap), and minutes for every rule of gold's notional and vwap (28-digit vwaps, a
   tie at the 19th decimal, an unknown notional...), loaded by the chain's own steps and by
   Spark.
2. Production: the daemon and its chain against the simulator with faults; Spark reads the
   daemon's lake (half of its parts gzipped) and must produce the warehouse's silver and gold.

Needs the ``spark`` extra and Java; skipped with one line otherwise (``.ci/spark`` runs it).
"""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pyspark", reason="the spark extra is not installed")
if shutil.which("java") is None:
    pytest.skip("no Java: the Spark tests need a JVM", allow_module_level=True)

from klined.jobs import bronze, completeness, gold, silver
from klined.jobs.archive_import import import_binance, import_kraken
from klined.jobs.gapfill import sync_configured_pairs
from klined.lake import LakeStore, iter_local_parts, read_part_file
from klined.model import DAY_MS, HOUR_MS, MINUTE_MS, Origin, Pair, from_datetime, to_datetime
from klined.sim import Market, SimClock
from klined.sim.archive import write_kraken_zip
from klined.spark import job, rules
from klined.warehouse.database import Database, open_database
from tests.fixtures.sim import SIM_PAIRS, SIM_START, SimFactory
from tests.support.scenario import (
    FAULTS,
    H1,
    HOURS,
    START,
    host_config,
    hosts,
    until_settled,
)
from tests.support.truth import make_config
from tests.support.warehouse import (
    H0,
    candle,
    config_for,
    warehouse_dsn,
    write_part,
)

__all__ = ["warehouse_dsn"]

pytestmark = [pytest.mark.integration]

NUMS = ("open", "high", "low", "close", "volume", "quote_volume", "vwap")
SILVER_COLS = (
    "quote_asset", "interval_seconds", "interval_end", *NUMS, "trade_count", "source", "rank",
    "event_ts", "ingestion_ts",
)  # fmt: skip
GOLD_COLS = (
    "interval_end", "open", "high", "low", "close", "volume", "quote_volume", "trade_count",
    "minutes", "traded_minutes", "notional", "vwap",
)  # fmt: skip
#: the warehouse's numbers, as they are in Spark's DECIMAL(38, 18) (gold's vwap always is)
DECIMALS = (*NUMS, "notional")


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    session = job.session("local[2]", app="klined-tests")
    try:
        yield session
    finally:
        session.stop()


def _plain(value: Any) -> Any:
    """Comparable values: datetimes as ms, decimals normalized, the rest as is."""
    if hasattr(value, "timestamp"):
        return from_datetime(value)
    if isinstance(value, Decimal):
        return value.normalize()
    return value


def spark_rows(spark: Any, path: Path, cols: tuple[str, ...]) -> dict[tuple[Any, ...], tuple]:
    df = spark.read.parquet(str(path))
    return {
        (r["exchange"], r["symbol"], _plain(r["interval_start"])): tuple(_plain(r[c]) for c in cols)
        for r in df.collect()
    }


async def warehouse_rows(
    db: Database, table: str, cols: tuple[str, ...], start: int, end: int
) -> dict[tuple[Any, ...], tuple]:
    """The warehouse's rows, numbers as they would be in ``numeric(38, 18)``."""
    select = ", ".join(f"{c}::numeric(38, 18) AS {c}" if c in DECIMALS else c for c in cols)
    rows = await db.fetch(
        f"SELECT exchange, symbol, interval_start, {select} FROM {table}"
        " WHERE interval_end > $1 AND interval_start < $2",  # buckets overlapping the range
        to_datetime(start),
        to_datetime(end),
    )
    return {
        (r["exchange"], r["symbol"], _plain(r["interval_start"])): tuple(_plain(r[c]) for c in cols)
        for r in rows
    }


async def assert_spark_is_the_warehouse(
    spark: Any, db: Database, lake: Path, out: Path, start: int, end: int
) -> dict[str, int]:
    figures = job.run(spark, str(lake), start, end, str(out))
    want = await warehouse_rows(db, "silver.fact_ohlcv", SILVER_COLS, start, end)
    got = spark_rows(spark, out / job.SILVER_DATASET, SILVER_COLS)
    assert want, "the warehouse has no silver to compare"
    assert set(got) == set(want)
    diff = [(k, got[k], want[k]) for k in want if got[k] != want[k]]
    assert not diff, diff[:3]
    assert figures["silver_1m"] == len(want)
    for name, _ in gold.ALL_INTERVALS:
        want = await warehouse_rows(db, f"gold.ohlcv_{name}", GOLD_COLS, start, end)
        got = spark_rows(spark, out / job.gold_dataset(name), GOLD_COLS)
        assert set(got) == set(want), name
        diff = [(k, got[k], want[k]) for k in want if got[k] != want[k]]
        assert not diff, (name, diff[:3])
        vwap = GOLD_COLS.index("vwap")
        assert any(row[vwap] is not None for row in want.values()), f"{name}: no vwap to compare"
        types = {
            f.name: f.dataType for f in spark.read.parquet(str(out / job.gold_dataset(name))).schema
        }
        assert types["notional"] == types["vwap"] == rules.NUMBER, name
    return {k: int(v) for k, v in figures.items() if isinstance(v, int)}


def test_spark_has_every_gold_interval_of_the_warehouse() -> None:
    assert rules.GOLD_INTERVALS == gold.ALL_INTERVALS


@pytest.mark.anyio
async def test_spark_ranks_every_origin_as_postgresql_does(warehouse_dsn: str) -> None:
    async with open_database(config_for(warehouse_dsn)) as db:
        for origin in Origin:
            for final in (True, False):
                sql = await db.fetchval("SELECT ops.source_rank($1, $2)", str(origin), final)
                if origin == Origin.WS:
                    want = rules.WS_FINAL_RANK if final else rules.WS_PARTIAL_RANK
                else:
                    want = rules.ORIGIN_RANK[str(origin)]
                assert sql == want, (origin, final)


@pytest.mark.anyio
async def test_every_tie_break_column_and_notional_rule_decides_as_in_postgresql(
    spark: Any, warehouse_dsn: str, tmp_path: Path
) -> None:
    lake = tmp_path / "lake"
    e = H0 + MINUTE_MS + 5  # the same event time for rows that must tie on it
    m = [H0 + i * MINUTE_MS for i in range(12)]
    rows = [
        # rank: a final beats a later REST row, REST beats a partial
        (m[0], dict(price="10", event_ts=e), "ws"),
        (m[0], dict(price="11", event_ts=e + 9000, origin="rest"), "rest"),
        (m[1], dict(price="12", final=False, event_ts=e + 9000), "ws"),
        (m[1], dict(price="13", origin="rest"), "rest"),
        # event time, then ingestion time
        (m[2], dict(price="14", event_ts=e), "ws"),
        (m[2], dict(price="15", event_ts=e + 1), "ws2"),
        (m[3], dict(price="16", event_ts=e, ingestion_ts=e + 70), "ws"),
        (m[3], dict(price="17", event_ts=e, ingestion_ts=e + 60), "ws2"),
        # then close desc, high desc, low asc, open asc, volume desc
        (m[4], dict(price="18", close="19", event_ts=e, ingestion_ts=e), "ws"),
        (m[4], dict(price="18", close="19.5", high="19.5", event_ts=e, ingestion_ts=e), "ws2"),
        (m[5], dict(price="20", high="22", event_ts=e, ingestion_ts=e), "ws"),
        (m[5], dict(price="20", high="21", event_ts=e, ingestion_ts=e), "ws2"),
        (m[6], dict(price="20", low="19", event_ts=e, ingestion_ts=e), "ws"),
        (m[6], dict(price="20", low="18", event_ts=e, ingestion_ts=e), "ws2"),
        (m[7], dict(price="20", close="20", high="21", low="19", event_ts=e, ingestion_ts=e), "ws"),
        (
            m[7],
            dict(price="19.5", close="20", high="21", low="19", event_ts=e, ingestion_ts=e),
            "ws2",
        ),
        (m[8], dict(price="20", volume="2", event_ts=e, ingestion_ts=e), "ws"),
        (m[8], dict(price="20", volume="3", event_ts=e, ingestion_ts=e), "ws2"),
        # then trade count, quote volume (nulls last)
        (m[9], dict(price="20", trade_count=None, event_ts=e, ingestion_ts=e), "ws"),
        (m[9], dict(price="20", trade_count=4, event_ts=e, ingestion_ts=e), "ws2"),
        (m[10], dict(price="20", quote_volume="30", event_ts=e, ingestion_ts=e), "ws"),
        (m[10], dict(price="20", quote_volume="31", event_ts=e, ingestion_ts=e), "ws2"),
        # a no-trade minute between trades, and a quiet bucket carried flat
        (m[11], dict(price="19", volume="0", trade_count=0, origin="no_trades"), "nt"),
    ]
    for i, (minute, kwargs, seq) in enumerate(rows):
        c = candle(minute, **kwargs)  # type: ignore[arg-type]
        write_part(lake, [c], f"{seq}-{i:03d}")
    quiet = [candle(H0 + 40 * MINUTE_MS + i * MINUTE_MS, price="19", volume="0",
                    trade_count=0, origin="no_trades") for i in range(10)]  # fmt: skip
    write_part(lake, quiet, "nt-999")
    for i, pair in enumerate(NOTIONAL_CASES):
        write_part(lake, pair, f"n-{i}")
    async with open_database(config_for(warehouse_dsn)) as db:
        await bronze.load_hour(db, H0, LakeStore(lake))
        await silver.merge_hour(db, H0)
        await gold.refresh(db, H0)
        await completeness.refresh_hour(db, H0)
        figures = await assert_spark_is_the_warehouse(
            spark, db, lake, tmp_path / "out", H0, H0 + HOUR_MS
        )
        await assert_the_notional_cases_bite(db)
    assert figures["silver_1m"] == 22 + sum(len(p) for p in NOTIONAL_CASES)


def _kraken(minute: int, volume: str, vwap: str | None, **kwargs: Any) -> Any:
    """A Kraken-like minute of ETH/USD: a vwap and no quote volume (unless given)."""
    kwargs.setdefault("symbol", "ETH/USD")
    kwargs.setdefault("quote_volume", None)
    return candle(H0 + minute * MINUTE_MS, exchange="kraken", price="0.6", volume=volume,
                  vwap=vwap, **kwargs)  # fmt: skip


#: every notional / vwap rule, one 5-minute bucket each (ETH/USD), and a pair whose notional
#: is unknown (SOL/USD: a minute with volume but neither quote volume nor vwap)
NOTIONAL_CASES = [
    [
        # vwaps of 28 significant digits (trades-rebuilt and scaled ones have as many): the
        # vwap of the exact notional ends in ...657; of the vwaps rounded to 18 places, ...658
        _kraken(0, "0.46694124", "0.6062112068118372526952524091"),
        _kraken(1, "3.3128095", "0.5809901848355879607142016673"),
        # a tie at the 19th decimal: 1e-18 / 2 rounds half up
        _kraken(5, "2", None, quote_volume="0.000000000000000001"),
        # vwap x volume with 24 decimals: the notional is rounded, the vwap exact
        _kraken(10, "1234.56789012", "0.0000000123456789"),
        _kraken(11, "7", None, quote_volume="3.5"),
        # a volume below DECIMAL(38, 18)'s last digit still makes a vwap
        _kraken(15, "0.0000000000000000004", "2"),
        # no volume: notional 0, no vwap (a quote volume without volume is not counted)
        _kraken(20, "0", None, origin="no_trades", trade_count=0),
        _kraken(21, "0", None, quote_volume="5", trade_count=0),
    ],
    [
        _kraken(0, "1", "3", symbol="SOL/USD"),
        _kraken(1, "2", None, symbol="SOL/USD"),
    ],
]


async def assert_the_notional_cases_bite(db: Database) -> None:
    """The warehouse's own figures for :data:`NOTIONAL_CASES` are what they are meant to
    show (so Spark, equal to them, is exact where a DECIMAL(38, 18) pipeline is not)."""
    rows = await db.fetch(
        "SELECT symbol, interval_start, notional::text, vwap::text FROM gold.ohlcv_5m"
        " WHERE exchange = 'kraken' ORDER BY symbol, interval_start"
    )
    got = [(r["symbol"], (from_datetime(r["interval_start"]) - H0) // MINUTE_MS,
            r["notional"], r["vwap"]) for r in rows]  # fmt: skip
    assert got == [
        ("ETH/USD", 0, "2.207774816340707467791348570365420634", "0.584105928726058657"),
        ("ETH/USD", 5, "0.000000000000000001", "0.000000000000000001"),
        ("ETH/USD", 10, "3.500015241578751672002468", "0.002819028479578727"),
        ("ETH/USD", 15, "0.0000000000000000008", "2"),
        ("ETH/USD", 20, "0", None),
        ("SOL/USD", 0, None, None),
    ]
    naive = await db.fetchval(
        "SELECT ops.vwap(0.606211206811837253 * 0.46694124 + 0.580990184835587961 * 3.3128095,"
        " 0.46694124 + 3.3128095)"
    )
    assert str(naive) == "0.584105928726058658"


def gzip_half(src: Path, dst: Path) -> int:
    """A copy of the lake where every other part is plain (``.jsonl``) and the rest gzip
    (``.jsonl.gz``, as klined seals them); how many of each kind, the smaller count."""
    shutil.copytree(src, dst)
    kinds = {True: 0, False: 0}
    for i, part in enumerate(sorted(iter_local_parts(dst), key=lambda p: p.key)):
        path, zipped = part.path, part.path.name.endswith(".gz")
        if i % 2 and zipped:  # to plain
            path.with_name(path.name[:-3]).write_bytes(gzip.decompress(path.read_bytes()))
            path.unlink()
            zipped = False
        elif not i % 2 and not zipped:  # to gzip
            path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
            path.unlink()
            zipped = True
        kinds[zipped] += 1
    return min(kinds.values())


@pytest.mark.anyio
async def test_spark_builds_the_warehouses_silver_and_gold_from_a_faulty_days_lake(
    spark: Any,
    sim_factory: SimFactory,
    tmp_path: Path,
    s3_endpoint: str,
    s3_bucket: str,
    pg_dsn: str,
) -> None:
    s3 = (s3_endpoint, s3_bucket)
    async with sim_factory(clock=SimClock(START, 60.0), faults=FAULTS) as sim:
        cfg = host_config(tmp_path, "vm", sim, s3, pg_dsn)
        async with hosts([cfg], sim):
            await until_settled(sim, cfg, s3, 2 * len(SIM_PAIRS))
    lake = tmp_path / "lake"
    assert gzip_half(cfg.lake_root, lake) > 10
    start, end = HOURS[0], H1 + HOUR_MS
    async with open_database(cfg) as db:
        figures = await assert_spark_is_the_warehouse(spark, db, lake, tmp_path / "out", start, end)
    assert figures["silver_1m"] == len(HOURS) * 60 * 2 * len(SIM_PAIRS)
    assert figures["gold_1h"] == len(HOURS) * 2 * len(SIM_PAIRS)


@pytest.mark.anyio
async def test_spark_reads_the_archive_parts_as_the_warehouse_does(
    spark: Any, sim_factory: SimFactory, tmp_path: Path, pg_dsn: str
) -> None:
    """Binance US's archive from the simulator and a Kraken OHLCVT zip, imported: their
    ``archive_`` parts (origins ``archive`` and ``no_trades``) give Spark the warehouse's silver
    and gold."""
    pairs = ["BTC/USD", "REKT/USD"]
    start = SIM_START - SIM_START % DAY_MS - 3 * DAY_MS
    end = start + DAY_MS
    kraken_zip = write_kraken_zip(Market(7), tmp_path / "k.zip", pairs, start, end, intervals=(1,))
    async with sim_factory(pairs=pairs) as sim:
        cfg = make_config(sim, pg_dsn, pairs, data_dir=str(tmp_path / "data"))
        wanted = [Pair.parse(p) for p in pairs]
        async with open_database(cfg, apply_schema=True) as db:
            await sync_configured_pairs(db, cfg)
            binance = await import_binance(db, cfg, wanted, start, end, now_ms=sim.clock.now_ms())
            kraken = await import_kraken(db, cfg, [kraken_zip], wanted)
            assert binance.ok and kraken.ok
            parts = list(iter_local_parts(cfg.lake_root))
            assert parts and all("-archive_" in p.key for p in parts)
            origins = {r.origin for p in parts for r in read_part_file(p.path).records}
            assert origins == {"archive", "no_trades"}
            figures = await assert_spark_is_the_warehouse(
                spark, db, cfg.lake_root, tmp_path / "out", start, end
            )
    assert figures["silver_1m"] == binance.rows + kraken.rows
