"""Coverage: the hours klined owes a completeness figure for, per exchange and pair.

A pair's coverage is ``[coverage_start, coverage_end)`` in ``ops.pairs``, in whole UTC hours.
It is stored when it happens, never inferred later:

* **capture**: the daemon records the hour it started streaming the configured pairs
  (:func:`record_capture_start`), and loading a lake part into bronze records the part's hour
  for its pair (a part is proof the pair was captured then);
* **backfill**: ``klined backfill --from`` records the hour its range starts
  (:func:`extend_coverage`);
* **leaving the configuration** ends it (:func:`klined.warehouse.database.sync_pairs` sets
  ``coverage_end``); the rows of the ended span stay as history. A pair configured again
  starts a new coverage when it is next captured or backfilled.

A coverage only ever starts earlier (``least``), so recording it again is harmless. Running
the chain by hand for an hour outside a pair's coverage does not extend it: that is a backfill's
job (the chain command says so).
"""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg

from klined.model import floor_hour, from_datetime, to_datetime
from klined.warehouse.database import Database

__all__ = ["covered_from", "extend_coverage", "record_capture_start"]

_EXTEND_SQL = """
UPDATE ops.pairs p SET coverage_start = $3, updated_at = now()
FROM unnest($1::text[], $2::text[]) AS t(e, s)
WHERE p.exchange = t.e AND p.symbol = t.s AND p.active
  AND (p.coverage_start IS NULL OR p.coverage_start > $3)
RETURNING p.exchange, p.symbol
"""


async def extend_coverage(
    db: Database | asyncpg.Connection, pairs: Iterable[tuple[str, str]], hour_ms: int
) -> int:
    """Start the coverage of these active ``(exchange, symbol)`` pairs at ``hour_ms`` (floored
    to its hour) unless it already starts earlier; return the pairs changed.

    Takes a :class:`Database` or a connection (bronze records a part's hour in the transaction
    that loads it).
    """
    chosen = sorted(set(pairs))
    if not chosen:
        return 0
    rows = await db.fetch(
        _EXTEND_SQL,
        [e for e, _ in chosen],
        [s for _, s in chosen],
        to_datetime(floor_hour(hour_ms)),
    )
    return len(rows)


async def record_capture_start(db: Database, started_ms: int) -> int:
    """The daemon began capturing every active pair at ``started_ms``: the coverage of a pair
    never tracked before starts at that hour (earlier starts are kept)."""
    rows = await db.fetch("SELECT exchange, symbol FROM ops.pairs WHERE active")
    return await extend_coverage(db, [(r["exchange"], r["symbol"]) for r in rows], started_ms)


async def covered_from(db: Database, exchange: str | None = None) -> int | None:
    """The earliest coverage start of the active pairs (of one exchange), in ms; None if no
    active pair is covered yet."""
    value = await db.fetchval(
        "SELECT min(coverage_start) FROM ops.pairs"
        " WHERE active AND listed IS DISTINCT FROM false AND ($1::text IS NULL OR exchange = $1)",
        exchange,
    )
    return None if value is None else from_datetime(value)
