"""``klined backfill``: repair or seed any range at the exchanges' rate limits.

The same code as the hourly chain: :func:`klined.jobs.gapfill.fill_pair_range` fetches what
the warehouse lacks (final WS candles are never fetched again; ``refetch`` re-verifies REST
rows) into bronze, and :func:`klined.jobs.chain.run_chain` with the merge steps (silver, gold,
completeness) turns every touched hour into silver and gold, under the chain's advisory lock,
while the fetching goes on (hours are merged as soon as every pair of the exchange has
passed them, so the merge overlaps the rate-limited fetching). The lock is taken per hour, so
the daemon's hourly chain never waits behind more than one hour of merging; while the merge
waits for the lock, the progress says for whom. At the end, the chain's ``publish`` step
writes the changed days as Parquet datasets (when ``publish.enabled``).

A backfill is how klined starts tracking history: the range's start becomes the requested
pairs' coverage start (:mod:`klined.warehouse.coverage`) and their closed hours get pending
completeness rows at once, so until the merge reaches an hour it counts as missing.

With ``source`` ``auto`` (the default) each pair first loads what the exchange's published
archive has of its missing minutes (:mod:`klined.jobs.backfill_archive`: Binance US's files
for days before yesterday, Kraken's files in ``exchanges.kraken.archive_dir``), then fetches
the rest over REST; ``rest`` never reads archives, ``archive`` never calls REST.

Pairs run concurrently in a task group, bounded, sharing each exchange's limiter. Progress is
checkpointed per exchange and pair in ``ops.backfill_progress`` (``done_through`` = the hour
before which everything is in bronze), so an interrupted run resumes there; and since what is
in bronze is never fetched again, nothing is duplicated either way. Re-running a finished
range fetches nothing and changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from loguru import logger

from klined.config import Config
from klined.errors import UsageError
from klined.jobs.archive_import import ImportResult
from klined.jobs.backfill_archive import (
    NOT_IN_ARCHIVE,
    BackfillArchives,
    check_source,
)
from klined.jobs.chain import run_chain
from klined.jobs.chain_report import RUN_STEPS, ChainReport
from klined.jobs.completeness import mark_pending
from klined.jobs.fetcher import REQUEST_FAILED, PairReport
from klined.jobs.gapfill import (
    PAIR_CONCURRENCY,
    configured_pairs,
    dirty_hours,
    fill_pair_range,
    wanted_minutes,
)
from klined.jobs.ingest import ingest_for
from klined.jobs.merge import Merger, load_and_merge
from klined.jobs.progress import Progress
from klined.jobs.scheduler import closed_end_ms
from klined.model import (
    EXCHANGES,
    HOUR_MS,
    MINUTE_MS,
    Pair,
    floor_hour,
    floor_minute,
    iso,
    parse_time,
    to_datetime,
)
from klined.rest.client import RestClient
from klined.warehouse.coverage import extend_coverage
from klined.warehouse.database import Database

#: Reasons a minute stays missing that a later run may fix (failed requests: exit code 1).
RETRYABLE = REQUEST_FAILED


# ---------------------------------------------------------------------------------------------
# arguments


@dataclass(frozen=True, slots=True)
class BackfillRequest:
    start_ms: int
    end_ms: int
    pairs: dict[str, list[Pair]]  # exchange -> pairs
    note: str = ""  # e.g. the end was clamped to now
    source: str = "auto"  # auto | rest | archive


def ceil_hour(ms: int) -> int:
    return -(-ms // HOUR_MS) * HOUR_MS


def resolve_request(
    cfg: Config,
    start: str,
    end: str,
    exchanges: Sequence[str] = (),
    pairs: Sequence[str] = (),
    *,
    now_ms: int,
    source: str = "auto",
) -> BackfillRequest:
    """Validate the command's arguments against the config; every problem is a UsageError."""
    try:
        lo = parse_time(start)
    except ValueError as exc:
        raise UsageError(f"--from: {exc}") from None
    try:
        hi = parse_time(end)
    except ValueError as exc:
        raise UsageError(f"--to: {exc}") from None
    lo = -((-lo) // MINUTE_MS) * MINUTE_MS
    hi = floor_minute(hi)
    if hi < lo:
        raise UsageError(f"reversed range: --from {iso(lo)} is after --to {iso(hi)}")
    if hi == lo:
        raise UsageError(f"empty range: --from and --to are both {iso(lo)}")
    last_closed = floor_minute(now_ms)
    if lo >= last_closed:
        raise UsageError(f"the range starts in the future ({iso(lo)}; now is {iso(now_ms)})")
    note = ""
    if hi > last_closed:
        note = f"--to {iso(hi)} is in the future: backfilling up to {iso(last_closed)}"
        hi = last_closed
    enabled = cfg.exchanges.enabled()
    chosen = list(dict.fromkeys(e.strip().lower() for e in exchanges)) or list(enabled)
    for ex in chosen:
        if ex not in EXCHANGES:
            raise UsageError(f"unknown exchange {ex!r}; known exchanges: {', '.join(EXCHANGES)}")
        if ex not in enabled:
            raise UsageError(f"exchange {ex!r} is disabled in the config")
    wanted: list[Pair] = []
    for text in pairs:
        try:
            wanted.append(Pair.parse(text))
        except ValueError as exc:
            raise UsageError(f"--pair: {exc}") from None
    out: dict[str, list[Pair]] = {}
    for ex in chosen:
        configured = cfg.pairs(ex)
        out[ex] = [p for p in configured if p in wanted] if wanted else configured
    for p in wanted:
        if not any(p in out[ex] for ex in chosen):
            where = " or ".join(chosen)
            known = ", ".join(sorted({str(q) for ex in chosen for q in cfg.pairs(ex)}))
            raise UsageError(f"pair {p} is not configured for {where} (configured: {known})")
    out = {ex: ps for ex, ps in out.items() if ps}
    if not out:
        raise UsageError("no pairs to backfill: the selected exchanges have no pairs configured")
    check_source(cfg, source, out)
    return BackfillRequest(lo, hi, out, note, source)


# ---------------------------------------------------------------------------------------------
# checkpoints (ops.backfill_progress, one row per exchange and pair)


async def open_checkpoint(
    db: Database, exchange: str, pair: Pair, start_ms: int, end_ms: int, *, refetch: bool
) -> tuple[int, int]:
    """(backfill_id, resume_from): continue an unfinished run of the same range, or start one."""
    symbols = [str(pair)]
    if not refetch:
        row = await db.fetchrow(
            "SELECT backfill_id, done_through, status FROM ops.backfill_progress"
            " WHERE exchange = $1 AND symbols = $2::text[] AND range_start = $3"
            "   AND range_end = $4 ORDER BY backfill_id DESC LIMIT 1",
            exchange,
            symbols,
            to_datetime(start_ms),
            to_datetime(end_ms),
        )
        if row is not None and row["status"] != "done":
            through = row["done_through"]
            resume = max(start_ms, int(through.timestamp() * 1000)) if through else start_ms
            await db.execute(
                "UPDATE ops.backfill_progress SET status = 'running', updated_at = now(),"
                " detail = $2 WHERE backfill_id = $1",
                row["backfill_id"],
                f"resumed from {iso(resume)}",
            )
            return int(row["backfill_id"]), resume
    backfill_id = await db.fetchval(
        "INSERT INTO ops.backfill_progress (exchange, symbols, range_start, range_end,"
        " done_through, detail) VALUES ($1, $2::text[], $3, $4, $3, $5) RETURNING backfill_id",
        exchange,
        symbols,
        to_datetime(start_ms),
        to_datetime(end_ms),
        "refetch" if refetch else "",
    )
    return int(backfill_id), start_ms


async def save_checkpoint(db: Database, backfill_id: int, through_ms: int) -> None:
    await db.execute(
        "UPDATE ops.backfill_progress SET done_through = $2, updated_at = now()"
        " WHERE backfill_id = $1 AND (done_through IS NULL OR done_through < $2)",
        backfill_id,
        to_datetime(through_ms),
    )


async def close_checkpoint(db: Database, backfill_id: int, status: str, detail: str) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(10):
        await db.execute(
            "UPDATE ops.backfill_progress SET status = $2, detail = $3, updated_at = now()"
            " WHERE backfill_id = $1",
            backfill_id,
            status,
            detail[:500],
        )


# ---------------------------------------------------------------------------------------------
# the run


@dataclass(slots=True)
class BackfillResult:
    reports: list[PairReport] = field(default_factory=list)
    merges: list[ChainReport] = field(default_factory=list)
    duration_s: float = 0.0
    archive: ImportResult = field(default_factory=ImportResult)  # archive problems and notes
    published: ChainReport | None = None  # the publish run after the merges

    @property
    def rows(self) -> int:
        return sum(r.fetched + r.no_trades + r.archive for r in self.reports)

    @property
    def merged_ok(self) -> bool:
        return all(m.ok for m in self.merges) and (self.published is None or self.published.ok)

    @property
    def retryable_missing(self) -> int:
        return sum(n for r in self.reports for why, n in r.missing.items() if why in RETRYABLE)

    @property
    def ok(self) -> bool:
        return (
            self.merged_ok and not self.retryable_missing and not any(r.error for r in self.reports)
        )


async def run_backfill(
    db: Database,
    cfg: Config,
    clients: Mapping[str, RestClient],
    request: BackfillRequest,
    *,
    refetch: bool = False,
    now_ms: int | None = None,
    concurrency: int = PAIR_CONCURRENCY,
    progress: Progress | None = None,
    lake: Any = None,
) -> BackfillResult:
    """Fetch what the warehouse lacks in the range (into the lake, then bronze), then merge
    every touched hour. ``lake``: a :class:`~klined.lake.LakeStore` (default: configured)."""
    started = time.monotonic()
    ingest = ingest_for(db, cfg, lake)
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    start, end = request.start_ms, request.end_ms
    result = BackfillResult()
    by_exchange = await configured_pairs(db, cfg, list(request.pairs), request.pairs)
    reports: dict[str, list[PairReport]] = {}
    for ex, plist in by_exchange.items():
        reports[ex] = [PairReport(ex, str(p), through=start) for p in plist]
        result.reports.extend(reports[ex])
    if progress is not None:
        progress.reports[:] = result.reports
    # klined tracks these pairs from the range's start now: their hours count from here on,
    # as pending until the merge reaches them
    # (from the first whole hour of the range)
    await extend_coverage(
        db, [(ex, str(p)) for ex, plist in by_exchange.items() for p in plist], ceil_hour(start)
    )
    await mark_pending(db, closed_end_ms(cfg, now))
    dirty = await dirty_hours(db, start, end)

    def frontier(ex: str) -> int:
        return min((r.through for r in reports[ex]), default=start)

    merger = Merger(
        db,
        cfg,
        reports,
        touched=lambda ex: (h for r in reports[ex] for h in r.hours),
        is_ready=lambda ex, hour: hour + HOUR_MS <= frontier(ex),
        initial=dirty,
        reports=result.merges,
        progress=progress,
    )
    archives = BackfillArchives(db, cfg, request.source, start, end, now, lake=ingest.lake)
    result.archive = archives.result

    async def archive_first(ex: str, pair: Pair, resume: int, rep: PairReport) -> set[int]:
        """What the archive has of the pair's missing minutes; the hours that got rows."""
        if not archives.enabled(ex):
            return set()
        wanted = await wanted_minutes(
            db, ex, pair, resume, end, now, refetch=refetch, bronze_hours=dirty.get(ex, ())
        )
        return await archives.load(ex, pair, wanted, rep)

    async def one_pair(
        client: RestClient, pair: Pair, rep: PairReport, gate: anyio.CapacityLimiter
    ) -> None:
        async with gate:
            backfill_id, resume = await open_checkpoint(
                db, client.exchange, pair, start, end, refetch=refetch
            )
            rep.through = resume
            last_saved = floor_hour(resume)

            async def checkpoint(through: int) -> None:
                nonlocal last_saved
                hour = floor_hour(through) if through < end else end
                if hour > last_saved:
                    last_saved = hour
                    await save_checkpoint(db, backfill_id, hour)

            status, detail = "failed", "interrupted"
            ex = client.exchange
            try:
                loaded = await archive_first(ex, pair, resume, rep)
                bronze_hours = set(dirty.get(ex, ())) | loaded
                if request.source == "archive":
                    await leave_missing(db, ex, pair, resume, end, now, rep, bronze_hours)
                    await checkpoint(end)
                else:
                    await fill_pair_range(
                        db, client, pair, resume, end, ingest=ingest, now_ms=now,
                        refetch=refetch, bronze_hours=bronze_hours, reason="backfill",
                        report=rep, on_progress=checkpoint,
                    )  # fmt: skip
                status = "done"
                detail = f"fetched {rep.fetched}, no-trade {rep.no_trades}"
                if rep.archive:
                    detail += f", archive {rep.archive}"
                if rep.still_missing:
                    detail += f", missing {rep.still_missing}: " + ", ".join(
                        f"{why} ({n})" for why, n in rep.missing.most_common()
                    )
            except anyio.get_cancelled_exc_class():
                status, detail = "cancelled", f"cancelled at {iso(rep.through)}"
                raise
            except Exception as exc:
                # one pair's failure (a database hiccup) must not stop the others
                detail = f"{type(exc).__name__}: {exc}"
                rep.error = detail
                logger.opt(exception=exc).error(
                    "backfill {} {} failed: {}", rep.exchange, pair, exc
                )
            finally:
                await close_checkpoint(db, backfill_id, status, detail)

    async def fetch_all() -> None:
        async with anyio.create_task_group() as tg:
            for ex, plist in by_exchange.items():
                gate = anyio.CapacityLimiter(max(1, concurrency))
                for pair, rep in zip(plist, reports[ex], strict=True):
                    tg.start_soon(one_pair, clients[ex], pair, rep, gate)

    async with archives:
        await load_and_merge(fetch_all, merger, progress)
    if cfg.publish.enabled and any(m.hours for m in result.merges):
        # the days the merges changed, as Parquet datasets (queued by gold, published once)
        result.published = await run_chain(
            db, cfg, [], trigger="backfill", steps=RUN_STEPS, lock_wait_s=None,
            maintain_partitions=False,
        )  # fmt: skip
    result.duration_s = time.monotonic() - started
    return result


async def leave_missing(
    db: Database,
    exchange: str,
    pair: Pair,
    start: int,
    end: int,
    now: int,
    rep: PairReport,
    bronze_hours: set[int],
) -> None:
    """``--source archive``: what the archive did not have stays missing, said so."""
    left = await wanted_minutes(db, exchange, pair, start, end, now, bronze_hours=bronze_hours)
    rep.wanted += len(left)
    rep.done += len(left)
    if left:
        rep.missing[NOT_IN_ARCHIVE] += len(left)
    rep.through = end
