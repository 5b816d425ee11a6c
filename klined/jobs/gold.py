"""Gold: 5m, 15m, 30m, 1h, 4h and 1d candles derived strictly from silver, where silver changed.

Rules (docs/architecture.md, gold): a minute *trades* unless its source is ``no_trades`` or its
``trade_count`` is 0. open = first traded minute's open, close = last traded minute's close,
high/low over traded minutes; volume, quote_volume and trade_count are sums over every minute
(a traded minute with an unknown quote_volume / trade_count makes the bucket's unknown too);
``minutes`` counts every silver minute present, ``traded_minutes`` the traded ones. A bucket
without trades is flat (O=H=L=C) at the previous close: the close of the last traded silver
minute before the bucket (if silver has none at all, the bucket's first minute's open, which a
``no_trades`` row already sets to the previous close). Buckets are aligned to UTC.

``notional`` is the quote value traded, summed exactly over the minutes with volume: a
minute's quote_volume, or its vwap x volume where the exchange gives no quote volume (Kraken);
unknown when such a minute has neither. ``vwap = notional / volume``, rounded half up to 18
decimal places (``ops.vwap``); NULL without volume. So ``vwap * volume`` estimates a Kraken
bucket's quote volume (which Kraken does not send), within ``volume * 0.5e-18`` of ``notional``.

4h and 1d buckets span hours, so they are built from the hours' 1h rows, which hold every sum
exactly (notional included) and the first/last traded prices: the result is the same as
aggregating their silver minutes directly (the tests check it against silver), at a fraction
of the cost. They are recomputed whenever one of their 1h rows changes.

Work queue: every silver writer (the hourly merge, the live writer) marks changed 5-minute
buckets in ``ops.gold_dirty``, an append-only queue, in the transaction of the silver change. A
refresh takes the earliest dirty hour, recomputes the buckets (of the four sizes within an hour)
that contain a dirty minute plus the flat buckets that follow one in the same run of untraded
buckets, then the 4h and 1d buckets of the pairs whose 1h row changed, writes only rows that
differ, and deletes exactly the marks it read, all in one transaction. When an hour's 1h row
changes, the following hours whose flat buckets inherit its close are marked too, and processed
in the same call (hours ascend, so the previous close always comes from up-to-date gold).
Changed gold rows are announced on ``klined_candles``.

Concurrency (silver writers run while a refresh runs): the refresh reads the marks first and
silver afterwards, in later statements of its transaction, so every silver change whose mark it
read is in what it computes from; a mark committed after it read the marks stays in the queue
for the next refresh. Writers only ever insert marks, and the refresh only deletes the ones it
read, so neither waits for the other. Refreshes run one at a time (a transaction-level advisory
lock, :data:`GOLD_LOCK_KEY`): two of them computing the same bucket from different snapshots
could otherwise commit the older one last. The chain waits for the lock; the live writer's
refresh tries it and comes back later.
"""

from __future__ import annotations

from typing import Any

from klined.jobs.ops import StepResult
from klined.model import HOUR_MS, from_datetime, to_datetime
from klined.warehouse.database import Database
from klined.warehouse.notify import notify_sql

STEP = "gold"

#: ``pg_advisory_xact_lock`` key of a gold refresh ("kl_gold" in ASCII)
GOLD_LOCK_KEY = 0x6B6C5F676F6C64

#: (table suffix, bucket seconds) of the buckets built from silver minutes, within an hour
INTERVALS: tuple[tuple[str, int], ...] = (("5m", 300), ("15m", 900), ("30m", 1800), ("1h", 3600))
#: ... and of the buckets built from 1h rows, across hours
LONG_INTERVALS: tuple[tuple[str, int], ...] = (("4h", 14400), ("1d", 86400))
#: every gold interval, finest first
ALL_INTERVALS = INTERVALS + LONG_INTERVALS

_BATCH = "klined_gold_batch"
_MARKS = "klined_gold_marks"
_MINUTES = "klined_gold_minutes"

_TEMP_DDL = f"""
CREATE TEMP TABLE IF NOT EXISTS {_MARKS} (
    seq bigint, exchange text, symbol text, bucket_start timestamptz
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS {_BATCH} (
    exchange text, symbol text, bucket_start timestamptz
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS {_MINUTES} (
    exchange text, symbol text, interval_start timestamptz,
    open numeric, high numeric, low numeric, close numeric, volume numeric,
    quote_volume numeric, trade_count bigint, traded boolean, carry numeric, notional numeric
) ON COMMIT DELETE ROWS
"""

_BATCH_EXCHANGES = f"SELECT DISTINCT exchange FROM pg_temp.{_BATCH}"

_NEXT_HOUR = """
SELECT date_bin('1 hour', min(bucket_start), timestamptz 'epoch')
FROM ops.gold_dirty WHERE ($1::text IS NULL OR exchange = $1) AND bucket_start >= $2
"""

# The hour's marks as committed now; silver is read by later statements (newer snapshots).
_TAKE = f"""
INSERT INTO pg_temp.{_MARKS}
SELECT seq, exchange, symbol, bucket_start FROM ops.gold_dirty
WHERE bucket_start >= $1 AND bucket_start < $2 AND ($3::text IS NULL OR exchange = $3)
"""
_BATCH_FILL = f"""
INSERT INTO pg_temp.{_BATCH}
SELECT DISTINCT exchange, symbol, bucket_start FROM pg_temp.{_MARKS}
"""

# Exactly the marks read: one a writer added meanwhile stays for the next refresh.
_DONE = f"DELETE FROM ops.gold_dirty d USING pg_temp.{_MARKS} m WHERE d.seq = m.seq"

# The silver minutes of the hour for the dirty pairs, with the close of the last traded minute
# at or before each minute (``carry``; NULL before the hour's first traded minute).
_LOAD_MINUTES = f"""
INSERT INTO pg_temp.{_MINUTES}
SELECT exchange, symbol, interval_start, open, high, low, close, volume, quote_volume,
       trade_count, traded,
       CASE WHEN grp > 0 THEN first_value(close) OVER (
           PARTITION BY exchange, symbol, grp ORDER BY interval_start) END,
       CASE WHEN volume > 0 THEN coalesce(quote_volume, vwap * volume) END
FROM (
    SELECT s.exchange, s.symbol, s.interval_start, s.open, s.high, s.low, s.close, s.volume,
           s.quote_volume, s.trade_count, s.vwap, m.traded,
           count(*) FILTER (WHERE m.traded) OVER (
               PARTITION BY s.exchange, s.symbol ORDER BY s.interval_start) AS grp
    FROM silver.fact_ohlcv s
    CROSS JOIN LATERAL (
        SELECT (s.source <> 'no_trades' AND s.trade_count IS DISTINCT FROM 0) AS traded) m
    WHERE s.interval_start >= $1 AND s.interval_start < $2
      AND (s.exchange, s.symbol) IN (SELECT DISTINCT exchange, symbol FROM pg_temp.{_BATCH})
) x
"""

_GOLD_COLUMNS = (
    "interval_end, open, high, low, close, volume, quote_volume, trade_count, minutes,"
    " traded_minutes, notional, vwap"
)


def _tuple(alias: str) -> str:
    return "(" + ", ".join(f"{alias}.{c.strip()}" for c in _GOLD_COLUMNS.split(",")) + ")"


def _refresh_sql(table: str, seconds: int) -> str:
    step = f"interval '{seconds} seconds'"
    return f"""
WITH agg AS (
    SELECT exchange, symbol,
           date_bin({step}, interval_start, timestamptz 'epoch') AS bstart,
           count(*) AS minutes,
           count(*) FILTER (WHERE traded) AS traded_minutes,
           (array_agg(open ORDER BY interval_start) FILTER (WHERE traded))[1] AS t_open,
           (array_agg(close ORDER BY interval_start DESC) FILTER (WHERE traded))[1] AS t_close,
           max(high) FILTER (WHERE traded) AS t_high,
           min(low) FILTER (WHERE traded) AS t_low,
           sum(volume) AS volume,
           CASE WHEN count(*) FILTER (WHERE traded AND quote_volume IS NULL) = 0
                THEN coalesce(sum(quote_volume), 0) END AS quote_volume,
           CASE WHEN count(*) FILTER (WHERE traded AND trade_count IS NULL) = 0
                THEN coalesce(sum(trade_count), 0) END AS trade_count,
           min(carry) AS carry,
           (array_agg(open ORDER BY interval_start))[1] AS first_open,
           CASE WHEN count(*) FILTER (WHERE volume > 0 AND notional IS NULL) = 0
                THEN coalesce(sum(notional), 0) END AS notional
    FROM pg_temp.{_MINUTES}
    GROUP BY 1, 2, 3
),
runs AS (
    SELECT agg.*,
           max(bstart) FILTER (WHERE traded_minutes > 0) OVER (
               PARTITION BY exchange, symbol ORDER BY bstart) AS run_start
    FROM agg
),
target AS (
    SELECT r.*
    FROM runs r
    WHERE EXISTS (
        SELECT 1 FROM pg_temp.{_BATCH} d
        WHERE d.exchange = r.exchange AND d.symbol = r.symbol
          AND d.bucket_start >= coalesce(r.run_start, $1)
          AND d.bucket_start < r.bstart + {step})
),
fresh AS (
    SELECT t.exchange, t.symbol, t.bstart AS interval_start, t.bstart + {step} AS interval_end,
           coalesce(t.t_open, p.flat) AS open,
           coalesce(t.t_high, p.flat) AS high,
           coalesce(t.t_low, p.flat) AS low,
           coalesce(t.t_close, p.flat) AS close,
           t.volume, t.quote_volume, t.trade_count,
           t.minutes::smallint AS minutes, t.traded_minutes::smallint AS traded_minutes,
           t.notional, ops.vwap(t.notional, t.volume) AS vwap
    FROM target t
    CROSS JOIN LATERAL (
        SELECT CASE WHEN t.traded_minutes = 0 THEN coalesce(
                   t.carry,
                   (SELECT g.close FROM gold.ohlcv_1h g
                    WHERE g.exchange = t.exchange AND g.symbol = t.symbol
                      AND g.interval_start < $1 AND g.traded_minutes > 0
                    ORDER BY g.interval_start DESC LIMIT 1),
                   t.first_open) END AS flat) p
),
{_upsert(table)}"""


def _upsert(table: str) -> str:
    """The tail of a refresh: write the ``fresh`` rows that differ from the stored ones, and
    announce them on ``klined_candles``; one row (exchange, symbol) per row written."""
    return f"""chg AS (
    SELECT f.*
    FROM fresh f
    LEFT JOIN gold.{table} g
           ON g.exchange = f.exchange AND g.symbol = f.symbol
          AND g.interval_start = f.interval_start
    WHERE g.exchange IS NULL OR {_tuple("f")} IS DISTINCT FROM {_tuple("g")}
),
w AS (
    INSERT INTO gold.{table} AS g (exchange, symbol, interval_start, {_GOLD_COLUMNS})
    SELECT exchange, symbol, interval_start, {_GOLD_COLUMNS} FROM chg
    ON CONFLICT (exchange, symbol, interval_start) DO UPDATE
       SET {", ".join(f"{c.strip()} = EXCLUDED.{c.strip()}" for c in _GOLD_COLUMNS.split(","))},
           ingestion_ts = now()
       WHERE {_tuple("EXCLUDED")} IS DISTINCT FROM {_tuple("g")}
    RETURNING g.exchange, g.symbol, g.interval_start, g.open, g.high, g.low, g.close, g.volume,
              g.quote_volume, g.trade_count, g.minutes, g.traded_minutes, g.vwap
),
announced AS ({notify_sql("w", table.removeprefix("ohlcv_"), gold=True)})
SELECT w.exchange, w.symbol, (SELECT count(*) FROM announced) AS announcements FROM w
"""


def _long_refresh_sql(table: str, seconds: int) -> str:
    """4h / 1d: the bucket holding hour $1, for the pairs ($2, $3) whose 1h row changed,
    from the bucket's 1h rows (each exact; composed here as the silver rules compose)."""
    step = f"interval '{seconds} seconds'"
    return f"""
WITH pairs AS (
    SELECT DISTINCT e AS exchange, s AS symbol FROM unnest($2::text[], $3::text[]) AS t(e, s)
),
bucket AS (SELECT date_bin({step}, $1::timestamptz, timestamptz 'epoch') AS bstart),
agg AS (
    SELECT h.exchange, h.symbol,
           (array_agg(h.open ORDER BY h.interval_start)
               FILTER (WHERE h.traded_minutes > 0))[1] AS t_open,
           (array_agg(h.close ORDER BY h.interval_start DESC)
               FILTER (WHERE h.traded_minutes > 0))[1] AS t_close,
           max(h.high) FILTER (WHERE h.traded_minutes > 0) AS t_high,
           min(h.low) FILTER (WHERE h.traded_minutes > 0) AS t_low,
           (array_agg(h.open ORDER BY h.interval_start))[1] AS flat,
           sum(h.volume) AS volume,
           CASE WHEN bool_and(h.quote_volume IS NOT NULL) THEN sum(h.quote_volume) END
               AS quote_volume,
           CASE WHEN bool_and(h.trade_count IS NOT NULL) THEN sum(h.trade_count) END
               AS trade_count,
           CASE WHEN bool_and(h.notional IS NOT NULL) THEN sum(h.notional) END AS notional,
           sum(h.minutes) AS minutes,
           sum(h.traded_minutes) AS traded_minutes
    FROM bucket b
    JOIN gold.ohlcv_1h h
      ON h.interval_start >= b.bstart AND h.interval_start < b.bstart + {step}
    JOIN pairs p ON p.exchange = h.exchange AND p.symbol = h.symbol
    GROUP BY h.exchange, h.symbol
),
fresh AS (
    SELECT a.exchange, a.symbol, b.bstart AS interval_start, b.bstart + {step} AS interval_end,
           coalesce(a.t_open, a.flat) AS open,
           coalesce(a.t_high, a.flat) AS high,
           coalesce(a.t_low, a.flat) AS low,
           coalesce(a.t_close, a.flat) AS close,
           a.volume, a.quote_volume, a.trade_count,
           a.minutes::smallint AS minutes, a.traded_minutes::smallint AS traded_minutes,
           a.notional, ops.vwap(a.notional, a.volume) AS vwap
    FROM agg a CROSS JOIN bucket b
),
{_upsert(table)}"""


REFRESH_SQL = {suffix: _refresh_sql(f"ohlcv_{suffix}", seconds) for suffix, seconds in INTERVALS}
REFRESH_SQL.update(
    {suffix: _long_refresh_sql(f"ohlcv_{suffix}", seconds) for suffix, seconds in LONG_INTERVALS}
)

# The published datasets (klined.datasets.publish) whose day holding hour $1 changed: the
# 1m dataset for the exchanges whose silver minutes were taken, the gold ones for those
# whose rows were written (every bucket up to 1d lies within the hour's UTC day).
_MARK_PUBLISH = """
INSERT INTO ops.publish_dirty AS d (dataset, exchange, day)
SELECT DISTINCT t.dataset, t.exchange, ($1::timestamptz AT TIME ZONE 'UTC')::date
FROM unnest($2::text[], $3::text[]) AS t(dataset, exchange)
ON CONFLICT (dataset, exchange, day) DO UPDATE
   SET marked_at = now(), seq = nextval('ops.publish_seq')
"""

# Hours after $1 whose untraded buckets inherit a changed close: every later 1h row of the pair
# up to and including the first one with trades.
_PROPAGATE = """
INSERT INTO ops.gold_dirty (exchange, symbol, bucket_start)
SELECT n.exchange, n.symbol, n.interval_start
FROM unnest($2::text[], $3::text[]) AS c(exchange, symbol)
CROSS JOIN LATERAL (
    SELECT min(x.interval_start) AS stop FROM gold.ohlcv_1h x
    WHERE x.exchange = c.exchange AND x.symbol = c.symbol
      AND x.interval_start > $1 AND x.traded_minutes > 0) s
JOIN gold.ohlcv_1h n
  ON n.exchange = c.exchange AND n.symbol = c.symbol AND n.interval_start > $1
 AND (s.stop IS NULL OR n.interval_start <= s.stop)
"""


class GoldBusy(Exception):
    """Another gold refresh holds the lock (only when the caller asked not to wait)."""


async def _refresh_one_hour(
    db: Database, exchange: str | None, counts: dict[str, int], after_ms: int, wait: bool
) -> int | None:
    """Process the earliest dirty hour at or after ``after_ms``; return it (ms), or ``None``
    when nothing is dirty there. :class:`GoldBusy` when ``wait`` is false and another refresh
    runs."""
    async with db.transaction() as conn:
        if wait:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", GOLD_LOCK_KEY)
        elif not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", GOLD_LOCK_KEY):
            raise GoldBusy("another gold refresh is running")
        first = await conn.fetchval(_NEXT_HOUR, exchange, to_datetime(after_ms))
        if first is None:
            return None
        hour = from_datetime(first)
        start, end = to_datetime(hour), to_datetime(hour + HOUR_MS)
        await conn.execute(_TEMP_DDL)
        await conn.execute(_TAKE, start, end, exchange)
        await conn.execute(_BATCH_FILL)
        await conn.execute(f"ANALYZE pg_temp.{_BATCH}")
        await conn.execute(_LOAD_MINUTES, start, end)
        await conn.execute(f"ANALYZE pg_temp.{_MINUTES}")
        changed: dict[str, list[Any]] = {}
        for suffix, _ in INTERVALS:
            changed[suffix] = await conn.fetch(REFRESH_SQL[suffix], start)
        if changed["1h"]:
            exchanges = [r["exchange"] for r in changed["1h"]]
            symbols = [r["symbol"] for r in changed["1h"]]
            for suffix, _ in LONG_INTERVALS:
                changed[suffix] = await conn.fetch(REFRESH_SQL[suffix], start, exchanges, symbols)
            await conn.execute(_PROPAGATE, start, exchanges, symbols)
        marks = {("ohlcv_1m", r["exchange"]) for r in await conn.fetch(_BATCH_EXCHANGES)}
        for suffix, rows in changed.items():
            counts[suffix] += len(rows)
            marks.update((f"ohlcv_{suffix}", r["exchange"]) for r in rows)
        if marks:
            await conn.execute(_MARK_PUBLISH, start, [m[0] for m in marks], [m[1] for m in marks])
        await conn.execute(_DONE)
    return hour


async def refresh(
    db: Database, hour_ms: int | None = None, *, exchange: str | None = None, wait: bool = True
) -> StepResult:
    """Recompute every gold bucket with a dirty silver minute (all pending hours, ascending).

    ``hour_ms`` only labels the result: gold depends on earlier hours (flat buckets take the
    previous close), so a refresh always drains the queue in time order, which after a
    ``silver.merge_hour(h)`` normally means just hour ``h``. Each hour is taken once per call
    (a mark a live writer adds meanwhile to an hour already done waits for the next call), so a
    refresh ends even while writers keep marking. Re-runnable: with nothing dirty it does
    nothing; unchanged rows are never rewritten. ``wait=False`` gives up (:class:`GoldBusy`)
    instead of waiting for another refresh. Returns rows = gold rows written; details: per
    interval counts and ``hours`` processed.
    """
    counts = {suffix: 0 for suffix, _ in ALL_INTERVALS}
    hours: list[int] = []
    after = 0
    while True:
        hour = await _refresh_one_hour(db, exchange, counts, after, wait)
        if hour is None:
            break
        hours.append(hour)
        after = hour + HOUR_MS
    return StepResult(
        step=STEP,
        hour_ms=hour_ms,
        rows=sum(counts.values()),
        details={**counts, "hours": len(hours), "first_hour_ms": hours[0] if hours else None},
    )
