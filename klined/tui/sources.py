"""Where the dashboard's data comes from: the daemon's status socket, the warehouse, the chain.

Each source is a small protocol so the app can be driven by fakes in tests (``klined.tui.fakes``)
and by the real thing in production. Sources raise only :class:`StatusError` or
:class:`DatabaseError` with a message written for the operator ("daemon not running: ..."),
which the app shows in its banner; the app never has to understand asyncpg or socket errors.
The TUI never starts a daemon or a database: it only reads what is already running.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from loguru import logger

from klined.errors import DatabaseError, StatusError
from klined.model import from_datetime, iso, to_datetime
from klined.status import StatusSnapshot
from klined.warehouse.database import EMBEDDED_DATABASE, embedded_server_dsn, redact_dsn

if TYPE_CHECKING:
    from klined.config import Config

# -- data the warehouse returns ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HourCompleteness:
    """One row of ``monitoring.hourly_completeness``: how an exchange/pair/hour was filled."""

    exchange: str
    symbol: str
    hour_ms: int
    expected: int = 60
    ws_final: int = 0
    rest: int = 0
    archive: int = 0
    trades: int = 0
    no_trades: int = 0
    ws_partial: int = 0
    missing: int = 0
    pending: bool = False  # the chain has not processed the hour yet: all of it is missing

    @property
    def complete(self) -> int:
        """Minutes with a final answer; a partial WS candle is not one (gapfill still tries)."""
        return self.ws_final + self.rest + self.archive + self.trades + self.no_trades

    @property
    def rate(self) -> float:
        return self.complete / self.expected if self.expected else 0.0

    def counts(self) -> tuple[int, int, int, int, int, int, int]:
        """In :data:`klined.tui.present.CATEGORIES` order."""
        return (
            self.ws_final,
            self.rest,
            self.archive,
            self.trades,
            self.no_trades,
            self.ws_partial,
            self.missing,
        )


@dataclass(frozen=True, slots=True)
class HourSoFar:
    """The hour in progress for one exchange (``monitoring.current_hour_completeness``, summed
    over its pairs): minutes with a final answer out of the minutes elapsed so far."""

    exchange: str
    hour_ms: int
    minutes_elapsed: int
    pairs: int
    final: int = 0
    ws_partial: int = 0
    missing: int = 0

    @property
    def expected(self) -> int:
        return self.pairs * self.minutes_elapsed

    @property
    def rate(self) -> float | None:
        return self.final / self.expected if self.expected else None


@dataclass(frozen=True, slots=True)
class JobRun:
    """One row of ``ops.job_runs``: a step of the hourly chain for one hour."""

    run_id: int
    hour_ms: int | None
    step: str
    status: str  # running | ok | failed | skipped
    rows: int | None = None
    started_ms: int | None = None
    finished_ms: int | None = None
    duration_ms: int | None = None
    error: str = ""
    trigger: str = ""


@dataclass(frozen=True, slots=True)
class ChainResult:
    """What a manual ``klined chain --hour`` run did."""

    hour_ms: int
    returncode: int
    duration_s: float
    log_path: str = ""
    tail: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.returncode == 0


# -- protocols --------------------------------------------------------------------------------


class StatusSource(Protocol):
    """The daemon's live status. Raises :class:`StatusError` when it cannot be read."""

    async def fetch(self) -> StatusSnapshot: ...


class WarehouseSource(Protocol):
    """Completeness and job runs. Raises :class:`DatabaseError` when they cannot be read."""

    async def completeness(self, since_ms: int, until_ms: int) -> list[HourCompleteness]:
        """Rows with ``since_ms <= hour_start < until_ms``."""
        ...

    async def job_runs(self, limit: int = 500) -> list[JobRun]:
        """The most recent runs, newest first."""
        ...

    async def hour_so_far(self) -> list[HourSoFar]:
        """The hour in progress, per exchange."""
        ...

    async def aclose(self) -> None: ...


class ChainRunner(Protocol):
    """Runs the hourly chain for one hour, outside the TUI's process."""

    async def run(self, hour_ms: int) -> ChainResult: ...


# -- the daemon's status socket ---------------------------------------------------------------


def explain_status_error(path: Path, exc: BaseException) -> str:
    """One line an operator can act on, from whatever reading the socket raised."""
    cause: BaseException = exc
    while not isinstance(cause, OSError | TimeoutError) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, FileNotFoundError):
        return f"daemon not running: socket {path} not found - start it with `klined run`"
    if isinstance(cause, ConnectionRefusedError):
        return (
            f"daemon not running: socket {path} refuses connections (left by a stopped daemon?)"
            " - start it with `klined run`"
        )
    if isinstance(cause, PermissionError):
        return (
            f"cannot open {path}: permission denied - run as the daemon's user or a member"
            " of its group"
        )
    if isinstance(cause, TimeoutError):
        return f"daemon did not answer on {path} in time (busy or hung?)"
    return f"cannot read daemon status from {path}: {exc}"


class SocketStatusSource:
    """Reads the running daemon's snapshot from its Unix socket (``Config.status_socket``)."""

    def __init__(self, path: Path, timeout: float = 2.0) -> None:
        self.path = path
        self.timeout = timeout

    async def fetch(self) -> StatusSnapshot:
        if not self.path.exists():
            raise StatusError(explain_status_error(self.path, FileNotFoundError(self.path)))
        try:
            from klined.daemon.status_server import fetch_status
        except ImportError:
            raise StatusError(
                "this klined has no status client (klined.daemon.status_server is missing)"
            ) from None
        try:
            with anyio.fail_after(self.timeout + 1.0):
                return await fetch_status(self.path, timeout=self.timeout)
        except StatusError:
            raise  # fetch_status already says what is wrong and what to do
        except (OSError, TimeoutError) as exc:
            raise StatusError(explain_status_error(self.path, exc)) from exc


# -- the warehouse ----------------------------------------------------------------------------


def _ms(value: datetime | None) -> int | None:
    return from_datetime(value) if value is not None else None


_COMPLETENESS_SQL = """
SELECT exchange, symbol, hour_start, expected, ws_final, rest, archive, trades, no_trades,
       ws_partial, missing, pending
FROM monitoring.hourly_completeness
WHERE hour_start >= $1 AND hour_start < $2
"""

_SO_FAR_SQL = """
SELECT exchange, min(hour_start) AS hour_start, max(minutes_elapsed) AS minutes_elapsed,
       count(*) AS pairs, sum(ws_final + rest + trades + no_trades) AS final,
       sum(ws_partial) AS ws_partial, sum(missing) AS missing
FROM monitoring.current_hour_completeness
GROUP BY exchange ORDER BY exchange
"""

_JOB_RUNS_SQL = """
SELECT run_id, hour_start, step, status, rows, started_at, finished_at, duration_ms,
       error, trigger
FROM ops.job_runs
ORDER BY run_id DESC
LIMIT $1
"""


class PgWarehouseSource:
    """Reads ``monitoring.hourly_completeness`` and ``ops.job_runs`` over one asyncpg connection.

    ``dsn`` may be a callable so the embedded server's address is looked up again on every
    reconnect (it changes when the daemon restarts). The connection is dropped on any error and
    reopened on the next call, so the TUI recovers by itself when the database comes back.
    """

    def __init__(self, dsn: str | Callable[[], str], timeout: float = 5.0) -> None:
        self._dsn = dsn
        self.timeout = timeout
        self._conn: Any = None
        self._where = ""

    def _resolve(self) -> str:
        return self._dsn() if callable(self._dsn) else self._dsn

    async def _connection(self) -> Any:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        import asyncpg

        dsn = self._resolve()
        self._where = redact_dsn(dsn)
        try:
            self._conn = await asyncpg.connect(
                dsn,
                timeout=self.timeout,
                command_timeout=self.timeout,
                server_settings={
                    "application_name": "klined-tui",
                    "default_transaction_read_only": "on",
                    "TimeZone": "UTC",
                },
            )
        except Exception as exc:
            raise DatabaseError(self._explain(exc)) from exc
        return self._conn

    def _explain(self, exc: BaseException) -> str:
        import asyncpg

        where = self._where or "the database"
        if isinstance(exc, asyncpg.UndefinedTableError | asyncpg.InvalidSchemaNameError):
            return (
                f"{where} has no monitoring/ops tables yet ({exc}) - the daemon creates them"
                " at start: run `klined run` once"
            )
        if isinstance(exc, asyncpg.InvalidCatalogNameError):
            return f"database unreachable: {where}: {exc}"
        if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
            return f"database refused the login: {where}: {exc}"
        if isinstance(exc, TimeoutError):
            return f"database unreachable: {where} did not answer within {self.timeout:g}s"
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc) or type(exc).__name__
            return f"database unreachable: {where}: {reason}"
        return f"database error: {where}: {exc}"

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        conn = await self._connection()
        try:
            with anyio.fail_after(self.timeout + 1.0):
                rows: list[Any] = await conn.fetch(sql, *args, timeout=self.timeout)
            return rows
        except Exception as exc:
            await self._drop()
            raise DatabaseError(self._explain(exc)) from exc

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with anyio.move_on_after(1.0, shield=True):
            try:
                await conn.close(timeout=1.0)
            except Exception:
                conn.terminate()

    async def completeness(self, since_ms: int, until_ms: int) -> list[HourCompleteness]:
        rows = await self._fetch(_COMPLETENESS_SQL, to_datetime(since_ms), to_datetime(until_ms))
        return [
            HourCompleteness(
                exchange=r["exchange"],
                symbol=r["symbol"],
                hour_ms=from_datetime(r["hour_start"]),
                expected=int(r["expected"] or 0),
                ws_final=int(r["ws_final"] or 0),
                rest=int(r["rest"] or 0),
                archive=int(r["archive"] or 0),
                trades=int(r["trades"] or 0),
                no_trades=int(r["no_trades"] or 0),
                ws_partial=int(r["ws_partial"] or 0),
                missing=int(r["missing"] or 0),
                pending=bool(r["pending"]),
            )
            for r in rows
        ]

    async def job_runs(self, limit: int = 500) -> list[JobRun]:
        rows = await self._fetch(_JOB_RUNS_SQL, limit)
        return [
            JobRun(
                run_id=int(r["run_id"]),
                hour_ms=_ms(r["hour_start"]),
                step=r["step"] or "",
                status=r["status"] or "",
                rows=None if r["rows"] is None else int(r["rows"]),
                started_ms=_ms(r["started_at"]),
                finished_ms=_ms(r["finished_at"]),
                duration_ms=None if r["duration_ms"] is None else int(r["duration_ms"]),
                error=r["error"] or "",
                trigger=r["trigger"] or "",
            )
            for r in rows
        ]

    async def hour_so_far(self) -> list[HourSoFar]:
        rows = await self._fetch(_SO_FAR_SQL)
        return [
            HourSoFar(
                exchange=r["exchange"],
                hour_ms=from_datetime(r["hour_start"]),
                minutes_elapsed=int(r["minutes_elapsed"] or 0),
                pairs=int(r["pairs"] or 0),
                final=int(r["final"] or 0),
                ws_partial=int(r["ws_partial"] or 0),
                missing=int(r["missing"] or 0),
            )
            for r in rows
        ]

    async def aclose(self) -> None:
        await self._drop()


def warehouse_dsn(cfg: Config) -> str:
    """The DSN to read: ``database.dsn`` / ``KLINED_DSN``, else the daemon's embedded server.

    The embedded server is found through its ``postmaster.pid`` (port and socket directory);
    the TUI never starts one, it only reads what the daemon runs.
    """
    if cfg.dsn:
        return cfg.dsn
    if cfg.daemon.role == "capture":
        raise DatabaseError(
            "this is a capture host: the warehouse is the chain host's - set database.dsn to"
            " it (or run `klined tui` there) to see completeness and jobs"
        )
    return embedded_dsn(cfg.data_dir / "pgdata")


def embedded_dsn(pgdata: Path, database: str = EMBEDDED_DATABASE) -> str:
    """The running embedded server's DSN (see ``embedded_server_dsn`` in klined.warehouse)."""
    dsn = embedded_server_dsn(pgdata, database)
    if dsn is None:
        raise DatabaseError(
            f"no database.dsn configured and the embedded PostgreSQL under {pgdata} is not"
            " running - start the daemon with `klined run`"
        )
    return dsn


# -- running the chain by hand ----------------------------------------------------------------


class SubprocessChainRunner:
    """Runs ``klined chain --hour <ISO hour>`` as a separate process.

    The chain takes a PostgreSQL advisory lock, so it cannot collide with the daemon's own
    run. Output goes to a log file, not a pipe, and the process gets its own session: quitting
    the TUI (or Ctrl+C in its terminal) lets a started chain finish instead of killing it
    mid-step.
    """

    def __init__(
        self,
        config_path: str | None,
        command: Sequence[str] | None = None,
        log_dir: Path | None = None,
        timeout: float = 3600.0,
    ) -> None:
        self.config_path = config_path
        self.command = list(command) if command else [sys.executable, "-m", "klined.cli"]
        self.log_dir = log_dir
        self.timeout = timeout

    def argv(self, hour_ms: int) -> list[str]:
        args = [*self.command, "chain", "--hour", iso(hour_ms)]
        if self.config_path:
            args += ["-c", self.config_path]
        return args

    async def run(self, hour_ms: int) -> ChainResult:
        log_dir = self.log_dir or Path(tempfile.gettempdir())
        log_dir.mkdir(parents=True, exist_ok=True)
        stamp = iso(hour_ms).replace(":", "")
        log_path = log_dir / f"klined-chain-{stamp}-{os.getpid()}.log"
        argv = self.argv(hour_ms)
        logger.info("running {} (log {})", " ".join(argv), log_path)
        started = time.monotonic()
        with log_path.open("wb") as log:
            process = await anyio.open_process(
                argv, stdin=None, stdout=log, stderr=log, start_new_session=True
            )
            with anyio.fail_after(self.timeout):
                returncode = await process.wait()
        tail = _tail(log_path, 5)
        return ChainResult(hour_ms, returncode, time.monotonic() - started, str(log_path), tail)


def _tail(path: Path, lines: int) -> tuple[str, ...]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ()
    return tuple(line for line in text.splitlines() if line.strip())[-lines:]
