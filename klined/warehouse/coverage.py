"""``ops.pairs``: the configured pairs, their listing, and their coverage: the hours klined
owes a completeness figure for, per exchange and pair.

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

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from klined.model import Pair, floor_hour, from_datetime, to_datetime

if TYPE_CHECKING:  # the database module re-exports sync_pairs and set_pair_listing from here
    import asyncpg

    from klined.warehouse.database import Database

__all__ = [
    "covered_from",
    "extend_coverage",
    "record_capture_start",
    "set_pair_listing",
    "sync_pairs",
]

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


# ---------------------------------------------------------------------------------------------
# the configured pairs and their listing


async def sync_pairs(
    db: Database,
    pairs_by_exchange: Mapping[str, Sequence[tuple[Pair, str]]],
    *,
    now_ms: int | None = None,
) -> int:
    """Make ``ops.pairs`` match the configuration; return the number of rows changed.

    Every listed ``(Pair, native_symbol)`` becomes active; pairs of these exchanges that are no
    longer configured become inactive (their history stays). Exchanges absent from the mapping
    are deactivated entirely: the mapping is the whole configuration.

    Coverage (:mod:`klined.warehouse.coverage`): a pair leaving the configuration ends its
    coverage at the current hour; a pair configured again starts afresh (its new coverage is
    recorded when it is next captured or backfilled), after the pending rows of its ended
    coverage were written, so that history stays as it was.
    """
    now = int(time.time() * 1000) if now_ms is None else now_ms
    hour = to_datetime(floor_hour(now))
    exchanges: list[str] = []
    symbols: list[str] = []
    quotes: list[str] = []
    natives: list[str] = []
    for exchange, pairs in pairs_by_exchange.items():
        for pair, native in pairs:
            exchanges.append(exchange)
            symbols.append(str(pair))
            quotes.append(pair.quote)
            natives.append(native)
    async with db.transaction() as conn:
        reopened = await conn.fetchval(
            "SELECT count(*) FROM ops.pairs p"
            " JOIN unnest($1::text[], $2::text[]) AS t(e, s) ON t.e = p.exchange AND t.s = p.symbol"
            " WHERE NOT p.active AND p.coverage_start IS NOT NULL",
            exchanges,
            symbols,
        )
        if reopened:
            await conn.execute("SELECT ops.mark_pending_hours($1)", hour)
        upserted = await conn.fetch(
            "INSERT INTO ops.pairs AS p (exchange, symbol, quote_asset, native_symbol, active)"
            " SELECT e, s, q, n, true FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])"
            "   AS t(e, s, q, n)"
            " ON CONFLICT (exchange, symbol) DO UPDATE"
            "   SET native_symbol = EXCLUDED.native_symbol, quote_asset = EXCLUDED.quote_asset,"
            "       active = true, updated_at = now(),"
            "       coverage_start = CASE WHEN p.active THEN p.coverage_start END,"
            "       coverage_end = CASE WHEN p.active THEN p.coverage_end END,"
            "       completeness_from = CASE WHEN p.active THEN p.completeness_from END,"
            "       completeness_to = CASE WHEN p.active THEN p.completeness_to END"
            "   WHERE (p.native_symbol, p.quote_asset, p.active)"
            "         IS DISTINCT FROM (EXCLUDED.native_symbol, EXCLUDED.quote_asset, true)"
            " RETURNING 1",
            exchanges,
            symbols,
            quotes,
            natives,
        )
        deactivated = await conn.fetch(
            "UPDATE ops.pairs p SET active = false, updated_at = now(),"
            "   coverage_end = CASE WHEN p.coverage_start IS NOT NULL"
            "                       THEN greatest(p.coverage_start, $3) END"
            " WHERE p.active AND NOT EXISTS ("
            "   SELECT 1 FROM unnest($1::text[], $2::text[]) AS t(e, s)"
            "   WHERE t.e = p.exchange AND t.s = p.symbol)"
            " RETURNING 1",
            exchanges,
            symbols,
            hour,
        )
    return len(upserted) + len(deactivated)


async def set_pair_listing(
    db: Database, exchange: str, pair: Pair, listed: bool | None, note: str = ""
) -> None:
    """Record the exchange listing check for a configured pair (``listed=False`` pairs are not
    expected in completeness: pending rows written for it while its listing was unknown are
    removed, and written again should it be listed later)."""
    async with db.transaction() as conn:
        changed = await conn.fetchval(
            "UPDATE ops.pairs SET listed = $3, note = $4, updated_at = now(),"
            "   completeness_from = CASE WHEN $3 IS FALSE THEN NULL ELSE completeness_from END,"
            "   completeness_to = CASE WHEN $3 IS FALSE THEN NULL ELSE completeness_to END"
            " WHERE exchange = $1 AND symbol = $2"
            "   AND (listed, note) IS DISTINCT FROM ($3, $4)"
            " RETURNING 1",
            exchange,
            str(pair),
            listed,
            note,
        )
        if changed and listed is False:
            await conn.execute(
                "DELETE FROM monitoring.hourly_completeness"
                " WHERE exchange = $1 AND symbol = $2 AND pending",
                exchange,
                str(pair),
            )
