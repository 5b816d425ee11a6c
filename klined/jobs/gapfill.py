"""Gap-fill: fetch over REST every minute the warehouse has no settled candle for.

"Missing" means: the minute is closed, and neither silver nor an unmerged bronze row holds a
final WS candle or a REST-derived row (``rest``/``trades``/``no_trades``). A minute whose best
row is a partial WS candle is missing too (REST replaces it; it never replaces a final WS
candle). With ``refetch``, REST-derived rows are fetched again and re-verified (only rows that
differ from what silver holds are written, so a refetch of an unchanged range writes nothing).

Rows enter the lake first and bronze through the ledger (:class:`klined.jobs.ingest.LakeIngest`,
which marks their hours dirty); silver is never written here. Unfetchable minutes stay
missing, are recorded in ``ops.gapfill_attempts`` and are tried again by later runs; minutes
the exchange proved it has no data for at all (no candle and no close before them) are
recorded ``unavailable`` and not asked for again unless ``refetch``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
from loguru import logger

from klined.config import Config
from klined.jobs.fetcher import PairFetcher, PairReport
from klined.jobs.gapplan import SETTLED, SETTLED_REFETCH, closed_range
from klined.jobs.ingest import LakeIngest, ingest_for
from klined.jobs.ops import StepResult
from klined.model import (
    HOUR_MS,
    MINUTE_MS,
    SETTLED_RANK,
    Candle,
    Pair,
    floor_hour,
    plain_decimal,
    to_datetime,
)
from klined.rest.client import RestClient
from klined.warehouse.database import Database

STEP = "gapfill"

#: Pairs of one exchange fetched at the same time (they share the exchange's limiter).
PAIR_CONCURRENCY = 8

_EPOCH_MS = "(extract(epoch from interval_start) * 1000)::bigint"


@dataclass(slots=True)
class GapfillResult:
    """The outcome of a gap-fill over a range: per-pair reports and the hours that got rows."""

    start_ms: int
    end_ms: int
    reports: list[PairReport] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(r.fetched + r.no_trades for r in self.reports)

    @property
    def missing(self) -> int:
        return sum(r.still_missing for r in self.reports)

    @property
    def wanted(self) -> int:
        return sum(r.wanted for r in self.reports)

    @property
    def touched(self) -> set[tuple[str, int]]:
        """(exchange, hour) pairs that received rows."""
        return {(r.exchange, h) for r in self.reports for h in r.hours}

    def step_result(self, hour_ms: int | None = None) -> StepResult:
        reasons: dict[str, int] = {}
        for r in self.reports:
            for why, n in r.missing.items():
                reasons[why] = reasons.get(why, 0) + n
        return StepResult(
            step=STEP,
            hour_ms=hour_ms,
            rows=self.rows,
            details={
                "wanted": self.wanted,
                "fetched": sum(r.fetched for r in self.reports),
                "no_trades": sum(r.no_trades for r in self.reports),
                "missing": self.missing,
                "missing_reasons": reasons,
                "requests": sum(r.requests for r in self.reports),
            },
        )


# ---------------------------------------------------------------------------------------------
# what the warehouse already has


async def wanted_minutes(
    db: Database,
    exchange: str,
    pair: Pair,
    start_ms: int,
    end_ms: int,
    now_ms: int,
    *,
    refetch: bool = False,
    bronze_hours: Iterable[int] = (),
) -> list[int]:
    """Closed minutes of ``[start_ms, end_ms)`` without a settled row, oldest first.

    Silver answers for merged rows; bronze is read only for ``bronze_hours`` (hours whose
    bronze is newer than silver: dirty hours, or the hour the chain just loaded), because an
    unmerged row can only be in such an hour.
    """
    closed = closed_range(start_ms, end_ms, now_ms)
    if not closed:
        return []
    lo, hi = closed.start, closed.stop
    settled = sorted(SETTLED_REFETCH if refetch else SETTLED)
    symbol = str(pair)
    have: set[int] = set()
    async with db.acquire() as conn:
        rows = await conn.fetch(
            f"SELECT {_EPOCH_MS} AS m FROM silver.fact_ohlcv"
            " WHERE exchange = $1 AND symbol = $2 AND interval_start >= $3"
            "   AND interval_start < $4 AND source = ANY($5::text[])",
            exchange,
            symbol,
            to_datetime(lo),
            to_datetime(hi),
            settled,
        )
        have.update(r["m"] for r in rows)
        for hour in sorted({floor_hour(h) for h in bronze_hours}):
            h_lo, h_hi = max(lo, hour), min(hi, hour + HOUR_MS)
            if h_lo >= h_hi:
                continue
            rows = await conn.fetch(
                f"SELECT DISTINCT {_EPOCH_MS} AS m FROM bronze.bronze_ohlcv_native"
                " WHERE exchange = $1 AND symbol = $2 AND interval_start >= $3"
                "   AND interval_start < $4"
                "   AND ops.silver_source(source, is_final) = ANY($5::text[])",
                exchange,
                symbol,
                to_datetime(h_lo),
                to_datetime(h_hi),
                settled,
            )
            have.update(r["m"] for r in rows)
        unavailable: list[tuple[int, int]] = []
        if not refetch:
            rows = await conn.fetch(
                "SELECT (extract(epoch from range_start) * 1000)::bigint AS s,"
                "       (extract(epoch from range_end) * 1000)::bigint AS e"
                " FROM ops.gapfill_attempts"
                " WHERE exchange = $1 AND symbol = $2 AND outcome = 'unavailable'"
                "   AND range_end > $3 AND range_start < $4",
                exchange,
                symbol,
                to_datetime(lo),
                to_datetime(hi),
            )
            unavailable = [(r["s"], r["e"]) for r in rows]
    out = [m for m in closed if m not in have]
    if unavailable:
        out = [m for m in out if not any(s <= m < e for s, e in unavailable)]
    return out


async def settled_close_before(db: Database, exchange: str, pair: Pair, minute: int) -> str | None:
    """The close of ``minute - 1`` if the warehouse holds a settled row for it.

    Silver and bronze are read in separate statements: a statement locking both tables (silver
    first) could deadlock with a partition being created for both (bronze first).
    """
    prev = to_datetime(minute - MINUTE_MS)
    async with db.acquire() as conn:
        value = await conn.fetchval(
            "SELECT close::text FROM silver.fact_ohlcv"
            " WHERE exchange = $1 AND symbol = $2 AND interval_start = $3 AND rank <= $4",
            exchange,
            str(pair),
            prev,
            SETTLED_RANK,
        )
        if value is None:
            value = await conn.fetchval(
                "SELECT close::text FROM bronze.bronze_ohlcv_native"
                " WHERE exchange = $1 AND symbol = $2 AND interval_start = $3"
                "   AND ops.source_rank(source, is_final) <= $4"
                " ORDER BY ops.source_rank(source, is_final), event_ts DESC, ingestion_ts DESC"
                " LIMIT 1",
                exchange,
                str(pair),
                prev,
                SETTLED_RANK,
            )
    return plain_decimal(value) if value is not None else None


async def silver_rows(
    db: Database, exchange: str, pair: Pair, minutes: list[int]
) -> dict[int, tuple[str, ...]]:
    """Silver's values for minutes (for ``refetch``: write only what changed)."""
    if not minutes:
        return {}
    rows = await db.fetch(
        f"SELECT {_EPOCH_MS} AS m, open::text, high::text, low::text, close::text,"
        " volume::text, coalesce(trade_count, -1) AS n, source"
        " FROM silver.fact_ohlcv WHERE exchange = $1 AND symbol = $2"
        "   AND interval_start >= $3 AND interval_start < $4",
        exchange,
        str(pair),
        to_datetime(min(minutes)),
        to_datetime(max(minutes) + MINUTE_MS),
    )
    return {
        r["m"]: (
            *(plain_decimal(r[k]) for k in ("open", "high", "low", "close", "volume")),
            str(r["n"]),
            r["source"],
        )
        for r in rows
    }


def _values(c: Candle) -> tuple[str, ...]:
    n = c.trade_count if c.trade_count is not None else -1
    return (
        *(plain_decimal(x) for x in (c.open, c.high, c.low, c.close, c.volume)),
        str(n),
        str(c.source),
    )


# ---------------------------------------------------------------------------------------------
# writing


class DbSink:
    """Rows to the lake and bronze, attempts to ``ops.gapfill_attempts`` (batched)."""

    def __init__(
        self,
        db: Database,
        exchange: str,
        *,
        ingest: LakeIngest,
        reason: str,
        known: Mapping[int, tuple[str, ...]] | None = None,
        on_progress: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self.db = db
        self.ingest = ingest
        self.exchange = exchange
        self.reason = reason
        self.known = known  # refetch: silver's current values, to skip unchanged rows
        self.on_progress = on_progress
        self.written = 0
        self._attempts: list[tuple[str, int, int, str, int, str]] = []

    async def rows(self, candles: list[Candle]) -> None:
        """Attempts first, rows last: once the rows commit nothing can fail, so the caller
        never sees an error for rows that are in bronze (and never writes them again)."""
        await self.flush_attempts()
        if self.known is not None:
            candles = [c for c in candles if self.known.get(c.interval_start) != _values(c)]
        if candles:
            self.written += await self.ingest.rows(candles, reason=self.reason)

    async def attempt(
        self, pair: Pair, start_ms: int, end_ms: int, outcome: str, rows: int, detail: str
    ) -> None:
        self._attempts.append((str(pair), start_ms, max(start_ms, end_ms), outcome, rows, detail))
        if len(self._attempts) >= 200:
            await self.flush_attempts()

    async def progress(self, through_ms: int) -> None:
        if self.on_progress is not None:
            await self.on_progress(through_ms)

    async def flush_attempts(self) -> None:
        if not self._attempts:
            return
        batch, self._attempts = self._attempts, []
        await self.db.execute(
            "INSERT INTO ops.gapfill_attempts"
            " (exchange, symbol, range_start, range_end, outcome, rows, detail)"
            " SELECT $1, s, a, b, o, n, d FROM unnest($2::text[], $3::timestamptz[],"
            "   $4::timestamptz[], $5::text[], $6::int[], $7::text[]) AS t(s, a, b, o, n, d)",
            self.exchange,
            [a[0] for a in batch],
            [to_datetime(a[1]) for a in batch],
            [to_datetime(a[2]) for a in batch],
            [a[3] for a in batch],
            [a[4] for a in batch],
            [a[5] for a in batch],
        )


# ---------------------------------------------------------------------------------------------
# the range form (backfill) and the hour form (chain)


async def sync_configured_pairs(db: Database, cfg: Config) -> int:
    """Make ``ops.pairs`` match the config (as the daemon does at start), so completeness
    expects the configured pairs when a chain or backfill runs on its own."""
    from klined.rest.client import build_adapter
    from klined.warehouse.database import sync_pairs

    mapping = {}
    for ex in cfg.exchanges.enabled():
        adapter = build_adapter(cfg, ex)
        mapping[ex] = [(p, adapter.native(p)) for p in cfg.pairs(ex)]
    return await sync_pairs(db, mapping)


async def configured_pairs(
    db: Database, cfg: Config, exchanges: Iterable[str], only: Mapping[str, list[Pair]] | None
) -> dict[str, list[Pair]]:
    """Pairs to fill per exchange: the configured ones (or ``only``), minus known-unlisted."""
    out: dict[str, list[Pair]] = {}
    for ex in exchanges:
        pairs = list(only[ex]) if only is not None and ex in only else cfg.pairs(ex)
        rows = await db.fetch(
            "SELECT symbol FROM ops.pairs WHERE exchange = $1 AND listed IS FALSE", ex
        )
        unlisted = {r["symbol"] for r in rows}
        skipped = [p for p in pairs if str(p) in unlisted]
        if skipped:
            logger.info("{}: not gap-filling unlisted pairs {}", ex, ", ".join(map(str, skipped)))
        out[ex] = [p for p in pairs if str(p) not in unlisted]
    return out


async def fill_pair_range(
    db: Database,
    client: RestClient,
    pair: Pair,
    start_ms: int,
    end_ms: int,
    *,
    ingest: LakeIngest,
    now_ms: int,
    refetch: bool = False,
    bronze_hours: Iterable[int] = (),
    reason: str = "gapfill",
    report: PairReport | None = None,
    on_progress: Callable[[int], Awaitable[None]] | None = None,
) -> PairReport:
    """Fill one pair's missing minutes of a range (reads the warehouse, fetches, writes).

    ``on_progress(through_ms)`` is awaited after rows are safely in bronze, with the time
    before which every wanted minute is done (the backfill checkpoints it).
    """
    exchange = client.exchange
    report = report or PairReport(exchange, str(pair))
    report.through = max(report.through, start_ms)
    wanted = await wanted_minutes(
        db, exchange, pair, start_ms, end_ms, now_ms, refetch=refetch, bronze_hours=bronze_hours
    )
    if not wanted:
        if on_progress is not None:
            await on_progress(end_ms)
        report.through = max(report.through, end_ms)
        return report
    known = await silver_rows(db, exchange, pair, wanted) if refetch else None
    sink = DbSink(db, exchange, ingest=ingest, reason=reason, known=known, on_progress=on_progress)

    async def prev_close(minute: int) -> str | None:
        return await settled_close_before(db, exchange, pair, minute)

    fetcher = PairFetcher(client, pair, sink, prev_close=prev_close, report=report)
    try:
        await fetcher.run(wanted, now_ms, end_ms)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await sink.flush_attempts()
    return report


async def fill_range(
    db: Database,
    cfg: Config,
    start_ms: int,
    end_ms: int,
    clients: Mapping[str, RestClient],
    pairs: Mapping[str, list[Pair]] | None = None,
    *,
    refetch: bool = False,
    now_ms: int | None = None,
    bronze_hours: Iterable[int] | None = None,
    reason: str = "gapfill",
    concurrency: int = PAIR_CONCURRENCY,
    reports: list[PairReport] | None = None,
    lake: Any = None,
) -> GapfillResult:
    """Gap-fill ``[start_ms, end_ms)`` for every pair of every exchange with a client.

    ``bronze_hours``: hours whose unmerged bronze must be consulted; default: the dirty hours
    of the range. Pairs of one exchange run concurrently (``concurrency``) and share its
    limiter; exchanges run side by side. ``lake``: where the rows enter (a
    :class:`~klined.lake.LakeStore`; default: the configured lake).
    """
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    ingest = ingest_for(db, cfg, lake)
    by_exchange = await configured_pairs(db, cfg, clients, pairs)
    result = GapfillResult(start_ms, end_ms, reports if reports is not None else [])
    dirty = await dirty_hours(db, start_ms, end_ms) if bronze_hours is None else None

    async def one_exchange(ex: str, client: RestClient, plist: list[Pair]) -> None:
        hours = dirty.get(ex, set()) if dirty is not None else set(bronze_hours or ())
        gate = anyio.CapacityLimiter(max(1, concurrency))
        async with anyio.create_task_group() as tg:
            for pair in plist:
                rep = PairReport(ex, str(pair))
                result.reports.append(rep)
                tg.start_soon(one_pair, client, pair, hours, rep, gate)

    async def one_pair(
        client: RestClient,
        pair: Pair,
        hours: set[int],
        rep: PairReport,
        gate: anyio.CapacityLimiter,
    ) -> None:
        async with gate:
            await fill_pair_range(
                db, client, pair, start_ms, end_ms, ingest=ingest, now_ms=now, refetch=refetch,
                bronze_hours=hours, reason=reason, report=rep,
            )  # fmt: skip

    async with anyio.create_task_group() as tg:
        for ex, plist in by_exchange.items():
            if plist:
                tg.start_soon(one_exchange, ex, clients[ex], plist)
    return result


async def dirty_hours(db: Database, start_ms: int, end_ms: int) -> dict[str, set[int]]:
    rows = await db.fetch(
        "SELECT exchange, (extract(epoch from hour_start) * 1000)::bigint AS h"
        " FROM ops.dirty_hours WHERE hour_start >= $1 AND hour_start < $2",
        to_datetime(floor_hour(start_ms)),
        to_datetime(end_ms),
    )
    out: dict[str, set[int]] = {}
    for r in rows:
        out.setdefault(r["exchange"], set()).add(r["h"])
    return out


async def fill_hour(
    db: Database,
    cfg: Config,
    hour_ms: int,
    clients: Mapping[str, RestClient],
    pairs: Mapping[str, list[Pair]] | None = None,
    *,
    now_ms: int | None = None,
    refetch: bool = False,
    lake: Any = None,
) -> GapfillResult:
    """The chain's gap-fill step for one hour (its bronze is always consulted)."""
    hour = floor_hour(hour_ms)
    return await fill_range(
        db, cfg, hour, hour + HOUR_MS, clients, pairs,
        refetch=refetch, now_ms=now_ms, bronze_hours=[hour], reason="gapfill", lake=lake,
    )  # fmt: skip
