"""klined.warehouse against the real embedded PostgreSQL: schema, role, partitions, connecting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from klined.config import Config, DaemonConfig
from klined.errors import DatabaseError
from klined.jobs import bronze, gold, partitions, silver
from klined.model import DAY_MS, HOUR_MS, MINUTE_MS, Pair, from_datetime, to_datetime
from klined.warehouse.database import (
    BRONZE_TABLE,
    SCHEMA_VERSION,
    SILVER_TABLE,
    Database,
    open_database,
    set_pair_listing,
    sync_pairs,
    with_database,
)
from tests.support.warehouse import H0, candle, config_for, pairs_config

pytestmark = pytest.mark.anyio

FINGERPRINT = """
WITH ns AS (SELECT oid, nspname FROM pg_namespace
            WHERE nspname IN ('bronze', 'silver', 'gold', 'ops', 'monitoring'))
SELECT md5(string_agg(x, E'\\n' ORDER BY x)) FROM (
    SELECT 'ns:' || nspname || ':' || coalesce(n.nspacl::text, '')
    FROM pg_namespace n WHERE n.oid IN (SELECT oid FROM ns)
  UNION ALL
    SELECT 'rel:' || c.oid::regclass::text || ':' || c.relkind::text || ':'
           || coalesce(c.relacl::text, '') || ':'
           || coalesce(pg_get_expr(c.relpartbound, c.oid), '')
    FROM pg_class c WHERE c.relnamespace IN (SELECT oid FROM ns)
  UNION ALL
    SELECT 'col:' || a.attrelid::regclass::text || ':' || a.attname || ':'
           || format_type(a.atttypid, a.atttypmod) || ':' || a.attnotnull || ':'
           || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE c.relnamespace IN (SELECT oid FROM ns) AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
    SELECT 'con:' || conrelid::regclass::text || ':' || conname || ':' || pg_get_constraintdef(oid)
    FROM pg_constraint WHERE connamespace IN (SELECT oid FROM ns)
  UNION ALL
    SELECT 'idx:' || pg_get_indexdef(i.indexrelid)
    FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
    WHERE c.relnamespace IN (SELECT oid FROM ns)
  UNION ALL
    SELECT 'view:' || c.oid::regclass::text || ':' || pg_get_viewdef(c.oid)
    FROM pg_class c WHERE c.relkind = 'v' AND c.relnamespace IN (SELECT oid FROM ns)
  UNION ALL
    SELECT 'fn:' || p.oid::regprocedure::text || ':' || md5(pg_get_functiondef(p.oid)) || ':'
           || coalesce(p.proacl::text, '')
    FROM pg_proc p WHERE p.pronamespace IN (SELECT oid FROM ns)
  UNION ALL
    SELECT 'defacl:' || coalesce(defaclnamespace::regnamespace::text, '') || ':'
           || defaclobjtype::text || ':' || defaclacl::text
    FROM pg_default_acl
  UNION ALL
    SELECT 'ver:' || version || ':' || applied_at::text || ':' || xmin::text
    FROM ops.schema_version
) t(x)
"""


@pytest.fixture
async def db(pg_dsn: str) -> Database:
    async with open_database(config_for(pg_dsn)) as database:
        yield database  # type: ignore[misc]


async def test_schema_applies_twice_without_change(db: Database) -> None:
    assert await db.apply_schema() == SCHEMA_VERSION == 2
    first = await db.fetchval(FINGERPRINT)
    assert await db.apply_schema() == 2
    assert await db.fetchval(FINGERPRINT) == first
    tables = {
        r["t"]
        for r in await db.fetch(
            "SELECT table_schema || '.' || table_name AS t FROM information_schema.tables"
            " WHERE table_schema IN ('bronze', 'silver', 'gold', 'ops', 'monitoring')"
        )
    }
    assert {
        "bronze.bronze_ohlcv_native",
        "silver.fact_ohlcv",
        "gold.ohlcv_5m",
        "gold.ohlcv_15m",
        "gold.ohlcv_30m",
        "gold.ohlcv_1h",
        "gold.ohlcv_4h",
        "gold.ohlcv_1d",
        "ops.schema_version",
        "ops.pairs",
        "ops.lake_parts",
        "ops.job_runs",
        "ops.dirty_hours",
        "ops.gold_dirty",
        "ops.gapfill_attempts",
        "ops.backfill_progress",
        "ops.publish_dirty",
        "ops.published",
        "ops.data_migrations",
        "ops.archive_files",
        "monitoring.hourly_completeness",
        "monitoring.daily_completeness",
        "monitoring.exchange_hourly_completeness",
        "monitoring.stream_incidents",
    } <= tables


async def test_concurrent_schema_application(pg_dsn: str) -> None:
    cfg = config_for(pg_dsn)

    async def apply() -> None:
        async with open_database(cfg) as database:
            await database.apply_schema()

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(apply)
    async with open_database(cfg) as database:
        assert await database.fetchval("SELECT count(*) FROM ops.schema_version") == 2


async def test_newer_schema_is_refused(db: Database) -> None:
    await db.apply_schema()
    await db.execute("INSERT INTO ops.schema_version (version, description) VALUES (99, 'x')")
    with pytest.raises(DatabaseError, match="newer"):
        await db.apply_schema()


async def test_readonly_role_sees_monitoring_only(db: Database) -> None:
    await db.apply_schema()
    role = db.config.readonly_role
    assert await db.fetchval("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1", role) is False
    await db.execute(
        "INSERT INTO monitoring.hourly_completeness (exchange, symbol, hour_start, expected,"
        " ws_final, rest, trades, no_trades, ws_partial, missing, completion_rate)"
        " VALUES ('binance', 'BTC/USD', $1, 60, 50, 5, 0, 1, 2, 2, 0.9333)",
        to_datetime(H0),
    )
    async with db.acquire() as conn, conn.transaction():
        await conn.execute(f'SET LOCAL ROLE "{role}"')
        assert await conn.fetchval("SELECT count(*) FROM monitoring.hourly_completeness") == 1
        assert await conn.fetchval("SELECT missing FROM monitoring.daily_completeness") == 2
        assert await conn.fetchval("SELECT pairs FROM monitoring.exchange_hourly_completeness") == 1
        assert await conn.fetchval("SELECT count(*) FROM monitoring.stream_incidents") == 0
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with conn.transaction():
                await conn.fetchval("SELECT count(*) FROM silver.fact_ohlcv")
    # tables created in monitoring later are readable too (default privileges)
    await db.execute("CREATE TABLE monitoring.later (x int)")
    async with db.acquire() as conn, conn.transaction():
        await conn.execute(f'SET LOCAL ROLE "{role}"')
        assert await conn.fetchval("SELECT count(*) FROM monitoring.later") == 0


async def test_reader_role_reads_silver_gold_and_monitoring_only(db: Database) -> None:
    await db.apply_schema()
    role = db.config.reader_role
    assert role == "klined_reader"
    assert await db.fetchval("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1", role) is False
    await bronze.insert_candles(db, [candle(H0, price="97000.12")])
    await silver.merge_hour(db, H0)
    await gold.refresh(db)
    async with db.acquire() as conn, conn.transaction():
        await conn.execute(f'SET LOCAL ROLE "{role}"')
        # silver through its parent (partitions made after the grant included), every gold
        assert str(await conn.fetchval("SELECT close FROM silver.fact_ohlcv")) == "97000.12"
        for table in ("5m", "15m", "30m", "1h", "4h", "1d"):
            assert await conn.fetchval(f"SELECT count(*) FROM gold.ohlcv_{table}") == 1
        assert await conn.fetchval("SELECT count(*) FROM monitoring.daily_completeness") == 0
        for forbidden in ("bronze.bronze_ohlcv_native", "ops.pairs", "ops.job_runs"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with conn.transaction():
                    await conn.fetchval(f"SELECT count(*) FROM {forbidden}")
        # reading is all it may do
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with conn.transaction():
                await conn.execute("DELETE FROM gold.ohlcv_1h")
    # tables created later in its schemas are readable too, and the Looker role still sees
    # monitoring only
    await db.execute("CREATE TABLE gold.later (x int)")
    async with db.acquire() as conn, conn.transaction():
        await conn.execute(f'SET LOCAL ROLE "{role}"')
        assert await conn.fetchval("SELECT count(*) FROM gold.later") == 0
        await conn.execute(f'SET LOCAL ROLE "{db.config.readonly_role}"')
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetchval("SELECT count(*) FROM gold.ohlcv_1h")


async def test_gold_migration_fills_vwap_and_long_buckets_once(db: Database) -> None:
    """A warehouse whose gold predates notional/vwap and 4h/1d: the next schema application
    queues its buckets once, and the gold refresh fills them in."""
    await db.apply_schema()
    await bronze.insert_candles(
        db, [candle(H0 + m * MINUTE_MS, price="10", volume="2", quote_volume="20") for m in (0, 7)]
    )
    await silver.merge_hour(db, H0)
    await gold.refresh(db)
    # as an older klined left it
    for t in ("5m", "15m", "30m", "1h"):
        await db.execute(f"UPDATE gold.ohlcv_{t} SET notional = NULL, vwap = NULL")
    await db.execute("TRUNCATE gold.ohlcv_4h, gold.ohlcv_1d, ops.publish_dirty")
    await db.execute("DELETE FROM ops.data_migrations")
    await db.apply_schema()
    assert await db.fetchval("SELECT count(*) FROM ops.gold_dirty") == 2
    await db.apply_schema()  # once
    assert await db.fetchval("SELECT count(*) FROM ops.gold_dirty") == 2
    await gold.refresh(db)
    for t in ("5m", "1h", "4h", "1d"):
        row = await db.fetchrow(f"SELECT sum(notional) AS n, max(vwap) AS v FROM gold.ohlcv_{t}")
        assert row is not None and (str(row["n"]), str(row["v"])) == ("40", "10"), t
    marked = await db.fetch("SELECT dataset FROM ops.publish_dirty ORDER BY dataset")
    assert [r["dataset"] for r in marked] == [
        "ohlcv_15m", "ohlcv_1d", "ohlcv_1h", "ohlcv_1m", "ohlcv_30m", "ohlcv_4h", "ohlcv_5m",
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# partitions


async def _partition_hours(db: Database, table: str) -> set[int]:
    rows = await db.fetch("SELECT hour_start FROM ops.hour_partitions($1)", table)
    return {from_datetime(r["hour_start"]) for r in rows}


async def test_partitions_on_demand_and_cached(db: Database) -> None:
    await db.apply_schema()
    hours = [H0, H0 + HOUR_MS + 5 * MINUTE_MS]
    assert await db.ensure_partitions(hours) == 4
    assert await db.ensure_partitions(hours) == 0
    assert {H0, H0 + HOUR_MS} <= await _partition_hours(db, BRONZE_TABLE)
    assert {H0, H0 + HOUR_MS} <= await _partition_hours(db, SILVER_TABLE)
    # another process (fresh cache) finds them and creates nothing
    async with open_database(Config(database=db.config)) as other:
        assert await other.ensure_partitions(hours) == 0
    # an insert path creates what it needs: an hour nobody prepared
    far = H0 + 500 * HOUR_MS
    assert await bronze.insert_candles(db, [candle(far + 59 * MINUTE_MS, origin="rest")]) == 1
    assert far in await _partition_hours(db, BRONZE_TABLE)


async def test_prepared_statements_are_planned_for_their_hour(db: Database) -> None:
    """A generic plan locks every partition at each run: with a year of hourly partitions the
    lock table overflows (bench/import.py found it). Sessions plan per run instead."""
    assert await db.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
    await db.apply_schema()
    await db.ensure_partitions(range(H0 - 48 * HOUR_MS, H0 + HOUR_MS, HOUR_MS))

    async def locks_per_run(conn: Any) -> list[int]:
        stmt = await conn.prepare(
            "SELECT count(*) FROM silver.fact_ohlcv WHERE interval_start >= $1"
            " AND interval_start < $2"
        )
        counts = []
        for _ in range(8):  # past the five runs after which a generic plan may be chosen
            async with conn.transaction():
                await stmt.fetchval(to_datetime(H0), to_datetime(H0 + HOUR_MS))
                counts.append(
                    await conn.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid()"
                        " AND relation::regclass::text LIKE 'silver.fact_ohlcv_p%'"
                    )
                )
        return counts

    async with db.acquire() as conn:
        assert max(await locks_per_run(conn)) <= 3  # the hour's partition, its index, toast
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        assert max(await locks_per_run(conn)) >= 49 * 2  # every partition and its index
        await conn.execute("RESET plan_cache_mode")


async def test_concurrent_partition_creation(db: Database) -> None:
    await db.apply_schema()
    hours = [H0 + i * HOUR_MS for i in range(6)]
    created: list[int] = []

    async def one() -> None:
        async with open_database(Config(database=db.config)) as other:
            created.append(await other.ensure_partitions(hours))

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(one)
    assert sum(created) == 12
    assert set(hours) <= await _partition_hours(db, BRONZE_TABLE)

    # two sessions racing inside open transactions: the second waits, then reports "exists"
    hour = to_datetime(H0 + 100 * HOUR_MS)
    async with db.acquire() as a, db.acquire() as b:
        tx = a.transaction()
        await tx.start()
        assert await a.fetchval("SELECT ops.ensure_hour_partition($1, $2)", BRONZE_TABLE, hour)
        results: list[bool] = []

        async def racer() -> None:
            results.append(
                await b.fetchval("SELECT ops.ensure_hour_partition($1, $2)", BRONZE_TABLE, hour)
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(racer)
            await anyio.sleep(0.3)
            await tx.commit()
        assert results == [False]


async def _until_a_session_waits_for_a_lock(db: Database) -> None:
    with anyio.fail_after(30):
        while not await db.fetchval(  # noqa: ASYNC110 - polling the server's view
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ):
            await anyio.sleep(0.02)


@pytest.mark.parametrize("order", [(SILVER_TABLE, BRONZE_TABLE), (BRONZE_TABLE, SILVER_TABLE)])
async def test_partition_creation_never_deadlocks_a_reader(
    db: Database, order: tuple[str, str]
) -> None:
    """A reader holding one partitioned table and then reading the other (what one statement
    over silver and bronze does) must not deadlock with partitions being created."""
    await db.apply_schema()
    await db.ensure_partitions([H0])
    hours = [H0 + i * HOUR_MS for i in range(1, 4)]
    created: list[int] = []

    async def create() -> None:
        created.append(await db.ensure_partitions(hours))

    # the transaction ends (commit) before the task group waits for the creator
    async with db.acquire() as reader, anyio.create_task_group() as tg, reader.transaction():
        await reader.fetchval(f"SELECT count(*) FROM {order[0]}")  # holds the first table
        tg.start_soon(create)
        await _until_a_session_waits_for_a_lock(db)  # the creator waits for the reader
        assert await reader.fetchval(f"SELECT count(*) FROM {order[1]}") == 0
    assert created == [2 * len(hours)]
    assert set(hours) <= await _partition_hours(db, BRONZE_TABLE)
    assert set(hours) <= await _partition_hours(db, SILVER_TABLE)


async def test_partition_bounds_ignore_session_time_zone(pg_dsn: str) -> None:
    cfg = config_for(pg_dsn)
    async with open_database(cfg, session_settings={"timezone": "Asia/Kathmandu"}) as ktm:
        await ktm.apply_schema()
        await ktm.ensure_partitions([H0])
        bound = await ktm.fetchval(
            "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c"
            " WHERE c.oid = 'bronze.bronze_ohlcv_native_p2026030110'::regclass"
        )
        assert "+05:45" in bound  # rendered in the session zone, but the instant is 10:00Z
    async with open_database(cfg) as utc:
        assert H0 in await _partition_hours(utc, BRONZE_TABLE)
        # the hour's first and last minute both land in that partition
        await bronze.insert_candles(
            utc, [candle(H0, origin="rest"), candle(H0 + 59 * MINUTE_MS, origin="rest")]
        )
        assert (
            await utc.fetchval("SELECT count(*) FROM bronze.bronze_ohlcv_native_p2026030110") == 2
        )


async def test_drop_old_bronze_keeps_dirty_hours_and_silver(db: Database) -> None:
    await db.apply_schema()
    old = [H0 + i * HOUR_MS for i in range(3)]
    await db.ensure_partitions(old)
    await db.execute(
        "INSERT INTO ops.dirty_hours (exchange, hour_start, reason) VALUES ('kraken', $1, 'x')",
        to_datetime(old[1]),
    )
    now = H0 + 20 * DAY_MS
    result = await partitions.maintain(db, now, hours_ahead=2, retention_days=14)
    assert result.details["dropped"] == [old[0], old[2]]
    assert result.details["created"] == 6  # now .. now + 2h, bronze and silver
    remaining = await _partition_hours(db, BRONZE_TABLE)
    assert old[1] in remaining and old[0] not in remaining and old[2] not in remaining
    assert set(old) <= await _partition_hours(db, SILVER_TABLE)
    # a dropped hour can be loaded again later: its partition is recreated on demand
    assert await bronze.insert_candles(db, [candle(old[0], origin="rest")]) == 1


# ---------------------------------------------------------------------------------------------
# connecting


async def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    cfg = config_for(f"postgresql://postgres@/klined?host={tmp_path}/nowhere&port=5999")
    with pytest.raises(DatabaseError, match="cannot connect to PostgreSQL") as info:
        async with open_database(cfg):
            pass
    assert "nowhere" in str(info.value)


async def test_missing_database_is_a_clear_error(pg_server_dsn: str) -> None:
    cfg = config_for(with_database(pg_server_dsn, "no_such_db_here"))
    with pytest.raises(DatabaseError, match="does not exist"):
        async with open_database(cfg):
            pass


async def test_password_is_not_in_errors() -> None:
    cfg = config_for("postgresql://bob:s3cret@127.0.0.1:1/klined")
    with pytest.raises(DatabaseError) as info:
        async with open_database(cfg):
            pass
    assert "s3cret" not in str(info.value) and "***" in str(info.value)


async def test_embedded_server_starts_and_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KLINED_DSN", raising=False)
    data_dir = tmp_path / "data"
    cfg = Config(daemon=DaemonConfig(data_dir=str(data_dir)))
    async with open_database(cfg, apply_schema=True) as database:
        assert database.embedded
        assert await database.fetchval("SELECT current_database()") == "klined"
        assert await database.fetchval("SHOW TimeZone") == "UTC"
        assert await database.fetchval("SELECT count(*) FROM ops.schema_version") == 2
        pid_file = data_dir / "pgdata" / "postmaster.pid"
        assert pid_file.exists()
    assert not pid_file.exists()


# ---------------------------------------------------------------------------------------------
# pairs


async def test_sync_pairs_follows_the_config(db: Database) -> None:
    await db.apply_schema()
    first = pairs_config({"binance": ["BTC/USD", "ETH/USD"], "kraken": ["BTC/USD"]})
    assert await sync_pairs(db, first) == 3
    assert await sync_pairs(db, first) == 0
    await set_pair_listing(db, "kraken", Pair.parse("BTC/USD"), False, "not listed")
    second = pairs_config({"binance": ["ETH/USD", "SOL/USD"]})
    assert await sync_pairs(db, second) == 3  # SOL added; binance BTC, kraken BTC deactivated
    rows = await db.fetch(
        "SELECT exchange, symbol, quote_asset, native_symbol, active, listed, note"
        " FROM ops.pairs ORDER BY 1, 2"
    )
    assert [tuple(r) for r in rows] == [
        ("binance", "BTC/USD", "USD", "BTCUSD", False, None, ""),
        ("binance", "ETH/USD", "USD", "ETHUSD", True, None, ""),
        ("binance", "SOL/USD", "USD", "SOLUSD", True, None, ""),
        ("kraken", "BTC/USD", "USD", "BTCUSD", False, False, "not listed"),
    ]


async def test_a_version_1_warehouse_is_migrated_once(db: Database) -> None:
    """The schema of before the archive source, with rows: applying today's schema renumbers
    silver's ranks, widens the source checks and adds completeness' archive column, once."""
    old = (Path(__file__).parent / "schema_v1.sql").read_text()
    async with db.acquire() as conn:
        await conn.execute(old)
    await db.ensure_partitions([H0])
    sources = ["ws_final", "rest", "trades", "no_trades", "ws_partial"]
    for i, source in enumerate(sources):
        await db.execute(
            "INSERT INTO silver.fact_ohlcv (exchange, symbol, quote_asset, interval_start,"
            " interval_end, open, high, low, close, volume, source, rank, event_ts, ingestion_ts)"
            " VALUES ('binance', 'BTC/USD', 'USD', $1, $2, 1, 1, 1, 1, 0, $3, $4, $1, $1)",
            to_datetime(H0 + i * MINUTE_MS),
            to_datetime(H0 + (i + 1) * MINUTE_MS),
            source,
            i + 1,  # the old numbering: 1..5
        )
    await db.execute(
        "INSERT INTO monitoring.hourly_completeness (exchange, symbol, hour_start, expected,"
        " ws_final, rest, trades, no_trades, ws_partial, missing, completion_rate)"
        " VALUES ('binance', 'BTC/USD', $1, 60, 1, 1, 1, 1, 1, 55, 0.0667)",
        to_datetime(H0),
    )
    assert await db.apply_schema() == 2
    ranks = {
        r["source"]: r["rank"] for r in await db.fetch("SELECT source, rank FROM silver.fact_ohlcv")
    }
    assert ranks == {"ws_final": 1, "rest": 2, "trades": 4, "no_trades": 5, "ws_partial": 6}
    row = await db.fetchrow("SELECT archive, missing FROM monitoring.hourly_completeness")
    assert row is not None and (row["archive"], row["missing"]) == (0, 55)
    # the widened checks take archive rows, and still refuse nonsense
    await db.execute("UPDATE monitoring.hourly_completeness SET archive = 5, missing = 50")
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("UPDATE monitoring.hourly_completeness SET archive = 6")
    await bronze.insert_candles(db, [candle(H0 + 9 * MINUTE_MS, origin="archive")])
    # a later start changes nothing (the version row stops a second scan)
    await db.execute("UPDATE silver.fact_ohlcv SET rank = 9 WHERE source = 'rest'")
    first = await db.fetchval(FINGERPRINT)
    assert await db.apply_schema() == 2
    assert await db.fetchval(FINGERPRINT) == first
    assert await db.fetchval("SELECT rank FROM silver.fact_ohlcv WHERE source = 'rest'") == 9
