"""Completeness: ``monitoring.hourly_completeness`` for every closed hour of every covered pair.

A pair is expected in an hour when the hour lies in its coverage (``ops.pairs.coverage_start``
to ``coverage_end``, see :mod:`klined.warehouse.coverage`) and the pair is not known to be
unlisted (``listed IS DISTINCT FROM false``). Expected is 60 minutes.

Two writers, one table:

* :func:`mark_pending` adds a *pending* row (``pending = true``, all 60 minutes ``missing``)
  for every closed hour of a coverage that has no row yet, so an hour the chain has not
  processed is never absent from the denominator (the daemon calls it as hours close, the
  chain and backfill commands when they start);
* :func:`refresh_hour`, the chain's last step, counts silver by source for a processed hour
  and clears ``pending``. ``missing`` is what is left, so ws_final + rest + archive + trades +
  no_trades + ws_partial + missing = 60 always; the completion rate counts every source but
  ws_partial. Rows are written only when they change (``refreshed_at`` is when they last did),
  so a re-run writes nothing.

Pairs that left the configuration keep their rows; the daily and per-exchange views in
``monitoring`` roll these rows up (a covered day is 1,440 expected minutes per pair).
"""

from __future__ import annotations

from klined.jobs.ops import StepResult
from klined.model import HOUR_MS, floor_hour, from_datetime, to_datetime
from klined.warehouse.database import Database

STEP = "completeness"

EXPECTED_PER_HOUR = 60

_COUNTS = (
    "expected, ws_final, rest, archive, trades, no_trades, ws_partial, missing, completion_rate,"
    " pending"
)
_F_COUNTS = ", ".join(f"f.{c.strip()}" for c in _COUNTS.split(","))

REFRESH_SQL = f"""
WITH p AS (
    SELECT exchange, symbol FROM ops.pairs
    WHERE coverage_start <= $1 AND (coverage_end IS NULL OR coverage_end > $1)
      AND listed IS DISTINCT FROM false
      AND ($3::text IS NULL OR exchange = $3)
),
c AS (
    SELECT s.exchange, s.symbol,
           count(*) FILTER (WHERE s.source = 'ws_final')::int AS ws_final,
           count(*) FILTER (WHERE s.source = 'rest')::int AS rest,
           count(*) FILTER (WHERE s.source = 'archive')::int AS archive,
           count(*) FILTER (WHERE s.source = 'trades')::int AS trades,
           count(*) FILTER (WHERE s.source = 'no_trades')::int AS no_trades,
           count(*) FILTER (WHERE s.source = 'ws_partial')::int AS ws_partial
    FROM silver.fact_ohlcv s
    JOIN p ON p.exchange = s.exchange AND p.symbol = s.symbol
    WHERE s.interval_start >= $1 AND s.interval_start < $2
    GROUP BY s.exchange, s.symbol
),
n AS (
    SELECT p.exchange, p.symbol, $1::timestamptz AS hour_start, $4::int AS expected,
           coalesce(c.ws_final, 0) AS ws_final, coalesce(c.rest, 0) AS rest,
           coalesce(c.archive, 0) AS archive,
           coalesce(c.trades, 0) AS trades, coalesce(c.no_trades, 0) AS no_trades,
           coalesce(c.ws_partial, 0) AS ws_partial
    FROM p LEFT JOIN c ON c.exchange = p.exchange AND c.symbol = p.symbol
),
f AS (
    SELECT n.*,
           expected - (ws_final + rest + archive + trades + no_trades + ws_partial) AS missing,
           round((ws_final + rest + archive + trades + no_trades)::numeric / expected, 4)
               AS completion_rate,
           false AS pending
    FROM n
),
chg AS (
    SELECT f.* FROM f
    LEFT JOIN monitoring.hourly_completeness h
           ON h.exchange = f.exchange AND h.symbol = f.symbol AND h.hour_start = f.hour_start
    WHERE h.exchange IS NULL OR ({_F_COUNTS}) IS DISTINCT FROM
          (h.expected, h.ws_final, h.rest, h.archive, h.trades, h.no_trades, h.ws_partial,
           h.missing, h.completion_rate, h.pending)
)
INSERT INTO monitoring.hourly_completeness AS h (exchange, symbol, hour_start, {_COUNTS})
SELECT exchange, symbol, hour_start, {_COUNTS} FROM chg
ON CONFLICT (exchange, symbol, hour_start) DO UPDATE
   SET expected = EXCLUDED.expected, ws_final = EXCLUDED.ws_final, rest = EXCLUDED.rest,
       archive = EXCLUDED.archive, trades = EXCLUDED.trades, no_trades = EXCLUDED.no_trades,
       ws_partial = EXCLUDED.ws_partial, missing = EXCLUDED.missing,
       completion_rate = EXCLUDED.completion_rate, pending = false, refreshed_at = now()
RETURNING 1
"""


async def mark_pending(db: Database, closed_end_ms: int) -> int:
    """Pending rows for the closed hours (those starting before ``closed_end_ms``) of every
    coverage that have no row yet; return the rows added (``ops.mark_pending_hours``)."""
    added: int = await db.fetchval(
        "SELECT ops.mark_pending_hours($1)", to_datetime(floor_hour(closed_end_ms))
    )
    return added


async def pending_hours(
    db: Database, since_ms: int | None = None, until_ms: int | None = None
) -> list[int]:
    """Hours with at least one pending row (optionally in ``[since_ms, until_ms)``), newest
    first."""
    rows = await db.fetch(
        "SELECT DISTINCT hour_start FROM monitoring.hourly_completeness WHERE pending"
        " AND ($1::timestamptz IS NULL OR hour_start >= $1)"
        " AND ($2::timestamptz IS NULL OR hour_start < $2)"
        " ORDER BY hour_start DESC",
        None if since_ms is None else to_datetime(since_ms),
        None if until_ms is None else to_datetime(until_ms),
    )
    return [from_datetime(r["hour_start"]) for r in rows]


async def refresh_hour(db: Database, hour_ms: int, exchange: str | None = None) -> StepResult:
    """Upsert the hour's completeness for every pair it covers (of one exchange, or all).

    Returns rows = completeness rows written (changed); details: ``pairs`` covered and the
    hour's totals (``complete``, ``ws_partial``, ``missing``).
    """
    hour = floor_hour(hour_ms)
    start, end = to_datetime(hour), to_datetime(hour + HOUR_MS)
    async with db.transaction() as conn:
        written = await conn.fetch(REFRESH_SQL, start, end, exchange, EXPECTED_PER_HOUR)
        totals = await conn.fetchrow(
            "SELECT count(*) AS pairs,"
            " coalesce(sum(ws_final + rest + archive + trades + no_trades), 0) AS complete,"
            " coalesce(sum(ws_partial), 0) AS ws_partial, coalesce(sum(missing), 0) AS missing"
            " FROM monitoring.hourly_completeness h"
            " WHERE hour_start = $1 AND ($2::text IS NULL OR exchange = $2)"
            "   AND EXISTS (SELECT 1 FROM ops.pairs p WHERE p.exchange = h.exchange"
            "               AND p.symbol = h.symbol AND p.coverage_start <= h.hour_start"
            "               AND (p.coverage_end IS NULL OR p.coverage_end > h.hour_start)"
            "               AND p.listed IS DISTINCT FROM false)",
            start,
            exchange,
        )
    assert totals is not None
    return StepResult(
        step=STEP,
        hour_ms=hour,
        rows=len(written),
        details={k: int(totals[k]) for k in ("pairs", "complete", "ws_partial", "missing")},
    )
