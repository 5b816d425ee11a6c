"""The ``ops`` ledgers the chain steps share: step results, the job-run log and dirty hours.

Every step returns a :class:`StepResult`. :func:`record_step` writes ``ops.job_runs``
(``running`` -> ``ok`` / ``incomplete`` / ``failed`` / ``skipped``) around a step, so the TUI
and Looker can see what ran, how long it took and why it failed. Dirty hours are hours whose
bronze changed (new lake parts, gap-fill or backfill rows) and which need silver, gold and
completeness again; ``seq`` makes clearing exact when new marks arrive while an hour is
being processed.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import asyncpg
import msgspec
from loguru import logger

from klined.errors import describe_error
from klined.model import floor_hour, from_datetime, to_datetime
from klined.warehouse.database import Database

_CLEANUP_TIMEOUT_S = 10.0
#: this machine's name, recorded with every step run
HOST = socket.gethostname()


class StepResult(msgspec.Struct, kw_only=True):
    """What a step did: rows it wrote (or loaded) and step-specific details."""

    step: str
    hour_ms: int | None = None
    rows: int = 0
    details: dict[str, Any] = msgspec.field(default_factory=dict)


class StepRun:
    """Handle for a step being recorded; set ``rows``/``details`` or call :meth:`skip`."""

    def __init__(self, run_id: int, step: str, hour_ms: int | None) -> None:
        self.run_id = run_id
        self.step = step
        self.hour_ms = hour_ms
        self.rows: int = 0
        self.details: dict[str, Any] = {}
        self.skipped_reason: str | None = None
        self.incomplete_reason: str | None = None

    def set_result(self, result: StepResult) -> StepResult:
        self.rows = result.rows
        self.details = dict(result.details)
        return result

    def skip(self, reason: str) -> None:
        """Finish as ``skipped`` (e.g. nothing to do, lock held elsewhere)."""
        self.skipped_reason = reason

    def incomplete(self, reason: str) -> None:
        """Finish as ``incomplete``: the step ran, but failed requests left work undone (the
        reason is recorded as its error; later steps still run)."""
        self.incomplete_reason = reason


async def _finish(
    db: Database, run: StepRun, status: str, started: float, error: str | None
) -> None:
    duration_ms = round((time.monotonic() - started) * 1000)
    with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_TIMEOUT_S):
        try:
            await db.execute(
                "UPDATE ops.job_runs SET status = $2, rows = $3, finished_at = clock_timestamp(),"
                " duration_ms = $4, error = $5, details = $6::jsonb WHERE run_id = $1",
                run.run_id,
                status,
                run.rows,
                duration_ms,
                error,
                msgspec.json.encode(run.details).decode() if run.details else None,
            )
        except Exception as exc:
            logger.warning(
                "could not record the end of step {} run {}: {}", run.step, run.run_id, exc
            )


@asynccontextmanager
async def record_step(
    db: Database, step: str, hour_ms: int | None = None, *, trigger: str = "schedule"
) -> AsyncIterator[StepRun]:
    """Record one run of ``step`` in ``ops.job_runs`` around the ``async with`` body.

    The row is inserted as ``running`` (with this process's id and host) before the body and
    finished (shielded from cancellation) as ``ok``, ``skipped``, ``incomplete`` (with its
    reason) or ``failed`` with the underlying error's text; exceptions and cancellation
    propagate unchanged.
    """
    run_id: int = await db.fetchval(
        "INSERT INTO ops.job_runs (hour_start, step, status, trigger, pid, host)"
        " VALUES ($1, $2, 'running', $3, $4, $5) RETURNING run_id",
        to_datetime(hour_ms) if hour_ms is not None else None,
        step,
        trigger,
        os.getpid(),
        HOST,
    )
    run = StepRun(run_id, step, hour_ms)
    started = time.monotonic()
    try:
        yield run
    except anyio.get_cancelled_exc_class():
        await _finish(db, run, "failed", started, "cancelled")
        raise
    except BaseException as exc:
        await _finish(db, run, "failed", started, describe_error(exc)[:4000])
        raise
    if run.skipped_reason is not None:
        run.details.setdefault("skipped", run.skipped_reason)
        await _finish(db, run, "skipped", started, None)
    elif run.incomplete_reason is not None:
        await _finish(db, run, "incomplete", started, run.incomplete_reason[:4000])
    else:
        await _finish(db, run, "ok", started, None)


async def run_step(
    db: Database,
    step: str,
    hour_ms: int | None,
    func: Callable[..., Awaitable[StepResult]],
    *args: Any,
    trigger: str = "schedule",
    **kwargs: Any,
) -> StepResult:
    """Call ``func(db, *args, **kwargs)`` recorded as ``step`` (see :func:`record_step`)."""
    async with record_step(db, step, hour_ms, trigger=trigger) as run:
        return run.set_result(await func(db, *args, **kwargs))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


async def mark_abandoned(db: Database) -> int:
    """Mark ``running`` rows whose process is gone as ``abandoned``; return how many.

    Call it while holding the chain lock: every step run is recorded under that lock, so a
    row still ``running`` then belongs to a chain that is over (killed, or its database
    session lost). The error says which process ran it and, on this host, that it is gone.
    """
    rows = await db.fetch("SELECT run_id, pid, host FROM ops.job_runs WHERE status = 'running'")
    if not rows:
        return 0
    me = os.getpid()
    notes: dict[int, str] = {}
    for r in rows:
        pid, host = r["pid"], r["host"]
        if pid == me and host == HOST:
            # an earlier chain of this process whose end could not be recorded (the
            # database went away mid-step); this process runs one chain at a time
            notes[r["run_id"]] = "abandoned: its end could not be recorded (database lost)"
        elif pid is None:
            notes[r["run_id"]] = "abandoned: left running by an earlier chain"
        elif host == HOST:
            state = "still running" if _pid_alive(pid) else "gone"
            notes[r["run_id"]] = f"abandoned: process {pid} on {host} is {state} without the lock"
        else:
            notes[r["run_id"]] = f"abandoned: process {pid} on {host} no longer holds the lock"
    await db.execute(
        "UPDATE ops.job_runs j SET status = 'abandoned', error = t.note,"
        "   finished_at = coalesce(j.finished_at, clock_timestamp())"
        " FROM unnest($1::bigint[], $2::text[]) AS t(id, note)"
        " WHERE j.run_id = t.id AND j.status = 'running'",
        list(notes),
        list(notes.values()),
    )
    logger.warning("marked {} step run(s) left running by a gone process as abandoned", len(notes))
    return len(notes)


# ---------------------------------------------------------------------------------------------
# dirty hours


class DirtyHour(msgspec.Struct, frozen=True):
    exchange: str
    hour_ms: int
    reason: str
    seq: int


async def mark_dirty_hours(
    conn: asyncpg.Connection, exchange_hours: Iterable[tuple[str, int]], reason: str
) -> int:
    """Mark (exchange, hour) pairs for reprocessing, inside the caller's transaction."""
    pairs = sorted({(e, floor_hour(h)) for e, h in exchange_hours})
    if not pairs:
        return 0
    await conn.execute(
        "INSERT INTO ops.dirty_hours AS d (exchange, hour_start, reason)"
        " SELECT e, h, $3 FROM unnest($1::text[], $2::timestamptz[]) AS t(e, h)"
        " ON CONFLICT (exchange, hour_start) DO UPDATE"
        "   SET reason = EXCLUDED.reason, marked_at = now(), seq = nextval('ops.dirty_seq')",
        [p[0] for p in pairs],
        [to_datetime(p[1]) for p in pairs],
        reason,
    )
    return len(pairs)


async def list_dirty_hours(
    db: Database, *, before_ms: int | None = None, exchange: str | None = None
) -> list[DirtyHour]:
    """Dirty hours, oldest first (optionally only hours starting before ``before_ms``)."""
    rows = await db.fetch(
        "SELECT exchange, hour_start, reason, seq FROM ops.dirty_hours"
        " WHERE ($1::timestamptz IS NULL OR hour_start < $1)"
        "   AND ($2::text IS NULL OR exchange = $2)"
        " ORDER BY hour_start, exchange",
        to_datetime(before_ms) if before_ms is not None else None,
        exchange,
    )
    return [
        DirtyHour(r["exchange"], from_datetime(r["hour_start"]), r["reason"], r["seq"])
        for r in rows
    ]


async def clear_dirty_hour(db: Database, dirty: DirtyHour) -> bool:
    """Clear a processed mark unless it was re-marked meanwhile (then it stays dirty)."""
    status = await db.execute(
        "DELETE FROM ops.dirty_hours WHERE exchange = $1 AND hour_start = $2 AND seq <= $3",
        dirty.exchange,
        to_datetime(dirty.hour_ms),
        dirty.seq,
    )
    return status.endswith(" 1")


# ---------------------------------------------------------------------------------------------
# minutes the daemon had to drop (the lake's disk refused them)


class DroppedRange(msgspec.Struct, frozen=True):
    """Minutes ``[start_ms, end_ms)`` of one pair whose events were dropped."""

    exchange: str
    symbol: str
    start_ms: int
    end_ms: int
    events: int
    detail: str = ""


async def record_lake_drops(db: Database, ranges: Iterable[DroppedRange]) -> int:
    """Record dropped minutes as ``lake_dropped`` stream incidents (the chain repairs them)."""
    items = list(ranges)
    if not items:
        return 0
    async with db.transaction() as conn:
        await conn.execute(
            "INSERT INTO monitoring.stream_incidents"
            " (exchange, symbol, started_at, ended_at, kind, detail)"
            " SELECT e, s, a, b, 'lake_dropped', d FROM unnest($1::text[], $2::text[],"
            "   $3::timestamptz[], $4::timestamptz[], $5::text[]) AS t(e, s, a, b, d)",
            [r.exchange for r in items],
            [r.symbol for r in items],
            [to_datetime(r.start_ms) for r in items],
            [to_datetime(r.end_ms) for r in items],
            [
                r.detail or f"{r.events} event(s) dropped: the lake could not write them"
                for r in items
            ],
        )
        await mark_dirty_hours(
            conn,
            {
                (r.exchange, h)
                for r in items
                for h in range(floor_hour(r.start_ms), r.end_ms, 3_600_000)
            },
            "lake_dropped",
        )
    return len(items)


async def has_lake_drops(db: Database, hour_ms: int) -> bool:
    """Whether minutes of the hour were dropped and are not repaired yet."""
    found = await db.fetchval(
        "SELECT 1 FROM monitoring.stream_incidents WHERE kind = 'lake_dropped'"
        " AND repaired_at IS NULL AND started_at < $2 AND ended_at > $1 LIMIT 1",
        to_datetime(hour_ms),
        to_datetime(hour_ms + 3_600_000),
    )
    return found is not None


async def settle_lake_drops(db: Database, hour_ms: int) -> int:
    """Mark dropped ranges touching the hour repaired once every minute of them has a silver
    candle better than a partial one; return how many were settled.

    Each range is checked by a statement of its own with its bounds as values, so the planner
    opens only the silver partitions of its hours: one statement reading the bounds from the
    incidents would open (and lock) every partition of silver, and a year of hourly partitions
    overflows the server's lock table ("out of shared memory")."""
    found = await db.fetch(
        "SELECT incident_id, exchange, symbol, started_at, ended_at"
        " FROM monitoring.stream_incidents"
        " WHERE kind = 'lake_dropped' AND repaired_at IS NULL"
        "   AND started_at < $2 AND ended_at > $1",
        to_datetime(hour_ms),
        to_datetime(hour_ms + 3_600_000),
    )
    settled = 0
    for r in found:
        status = await db.execute(
            "UPDATE monitoring.stream_incidents SET repaired_at = now()"
            " WHERE incident_id = $1 AND repaired_at IS NULL"
            "   AND NOT EXISTS ("
            "     SELECT 1 FROM generate_series($4::timestamptz,"
            "                                   $5::timestamptz - interval '1 minute',"
            "                                   interval '1 minute') m"
            "     WHERE NOT EXISTS (SELECT 1 FROM silver.fact_ohlcv s"
            "       WHERE s.exchange = $2 AND s.symbol = $3 AND s.interval_start = m"
            "         AND s.interval_start >= $4 AND s.interval_start < $5"
            "         AND s.source <> 'ws_partial'))",
            r["incident_id"],
            r["exchange"],
            r["symbol"],
            r["started_at"],
            r["ended_at"],
        )
        settled += int(status.split()[-1])
    return settled
