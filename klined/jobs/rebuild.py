"""``klined rebuild``: bronze, silver, gold and completeness for a range, from the lake alone.

Everything that enters bronze enters the lake first (captured events, the gap-fill's REST,
trades and no-trade rows as ``fill_`` parts, the exchanges' archive files as ``archive_``
parts), so the lake is enough to rebuild the warehouse: after losing the database, on a new
warehouse, or to repair a range. No exchange is asked for anything. The steps are the chain's
own (:func:`klined.jobs.chain.run_chain` with ``bronze``, ``silver``, ``gold``,
``completeness``; no flush, no gap-fill), under the chain's advisory lock, a day of hours per
lock hold so a running daemon's chain is never starved.

Idempotent: parts already in ``ops.lake_parts`` are not loaded again and the merges never
rewrite an unchanged row, so a rebuild into an existing warehouse adds only what it lacked, and
a second run changes nothing. Hours are taken oldest first (gold's flat buckets carry the
previous close forward).

Which lake: the configured one (the local spool and, when ``[s3]`` names a bucket, S3), or
another local folder or ``s3://bucket/prefix`` (the config's endpoint and region) given as
``lake``. A day of parts is listed at once (one S3 listing per pair and day of hours).

What the lake cannot say: which pairs the exchanges listed (``ops.pairs.listed``) and the
gap-fill's attempt log. Completeness expects every configured pair, as ``klined chain`` does
before a listing check has run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from klined.config import Config, S3Config
from klined.errors import UsageError
from klined.jobs.chain import run_chain
from klined.jobs.chain_report import ChainReport, HourOutcome
from klined.lake import LakeStore, PartRef
from klined.model import HOUR_MS, floor_hour, iso, parse_time
from klined.warehouse.database import Database

#: the steps a rebuild runs for every hour
REBUILD_STEPS = ("bronze", "silver", "gold", "completeness")
#: hours listed and merged per chain-lock hold
BATCH_HOURS = 24


@dataclass(frozen=True, slots=True)
class RebuildRequest:
    start_ms: int
    end_ms: int
    exchange: str | None = None

    @property
    def hours(self) -> list[int]:
        return list(range(floor_hour(self.start_ms), self.end_ms, HOUR_MS))


def resolve_request(
    cfg: Config, start: str, end: str, exchange: str | None, *, now_ms: int
) -> RebuildRequest:
    """Validate the arguments; every problem is a :class:`UsageError`."""
    try:
        lo = parse_time(start)
    except ValueError as exc:
        raise UsageError(f"--from: {exc}") from None
    try:
        hi = parse_time(end)
    except ValueError as exc:
        raise UsageError(f"--to: {exc}") from None
    if hi <= lo:
        raise UsageError(f"empty or reversed range: --from {iso(lo)} --to {iso(hi)}")
    if lo >= now_ms:
        raise UsageError(f"the range starts in the future ({iso(lo)})")
    if exchange is not None and exchange not in cfg.exchanges.enabled():
        known = ", ".join(cfg.exchanges.enabled()) or "none"
        raise UsageError(f"exchange {exchange!r} is not enabled (enabled: {known})")
    return RebuildRequest(floor_hour(lo), min(hi, floor_hour(now_ms) + HOUR_MS), exchange)


def lake_from(cfg: Config, where: str | None) -> LakeStore:
    """The lake to read: the configured one, a local folder, or ``s3://bucket[/prefix]``."""
    if not where:
        return LakeStore(cfg.lake_root, cfg.s3)
    if where.startswith("s3://"):
        bucket, _, prefix = where[5:].partition("/")
        if not bucket:
            raise UsageError(f"--lake {where!r}: no bucket; write s3://bucket/prefix")
        s3 = msgspec.structs.replace(cfg.s3, bucket=bucket, prefix=prefix.strip("/"))
        # nothing local: the S3 lake alone (an empty folder that is never written)
        return LakeStore(cfg.data_dir / "rebuild-no-local-lake", s3)
    return LakeStore(where, S3Config())


class _Listed(LakeStore):
    """The lake, with a listing made for a whole batch of hours at once."""

    def __init__(self, lake: LakeStore, refs: Sequence[PartRef]) -> None:
        super().__init__(lake.root, lake.s3)
        self.by_hour: dict[int, list[PartRef]] = {}
        for ref in refs:
            self.by_hour.setdefault(ref.hour_ms, []).append(ref)

    async def list_parts(self, hour_ms: int, exchange: str | None = None) -> list[PartRef]:
        return [r for r in self.by_hour.get(hour_ms, []) if exchange in (None, r.exchange)]


@dataclass(slots=True)
class RebuildResult:
    hours: list[HourOutcome] = field(default_factory=list)
    reports: list[ChainReport] = field(default_factory=list)
    parts_listed: int = 0
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.reports)

    def total(self, step: str) -> int:
        return sum(o.rows for h in self.hours for o in h.steps if o.step == step)


async def run_rebuild(
    db: Database,
    cfg: Config,
    lake: LakeStore,
    request: RebuildRequest,
    *,
    on_hour: Callable[[HourOutcome, int, int], None] | None = None,
    lock_wait_s: float | None = None,
) -> RebuildResult:
    """Rebuild the request's hours from ``lake``; ``on_hour(outcome, done, total)`` after each."""
    from klined.jobs.gapfill import sync_configured_pairs

    started = time.monotonic()
    await sync_configured_pairs(db, cfg)
    result = RebuildResult()
    hours = request.hours
    done = 0

    def hour_done(outcome: HourOutcome) -> None:
        nonlocal done
        done += 1
        result.hours.append(outcome)
        if on_hour is not None:
            on_hour(outcome, done, len(hours))

    for i in range(0, len(hours), BATCH_HOURS):
        batch = hours[i : i + BATCH_HOURS]
        refs = await lake.list_range(batch[0], batch[-1] + HOUR_MS, request.exchange)
        result.parts_listed += len(refs)
        source = _Listed(lake, refs)
        report = await run_chain(
            db, cfg, batch, trigger="rebuild", lake=source, steps=REBUILD_STEPS,
            exchange=request.exchange, lock_wait_s=lock_wait_s, maintain_partitions=False,
            on_hour=hour_done,
        )  # fmt: skip
        result.reports.append(report)
        if report.skipped:
            break
    result.duration_s = time.monotonic() - started
    return result


def progress_line(outcome: HourOutcome, done: int, total: int) -> str:
    """``[ 3/48] 2026-11-26T13:00:00Z  bronze 1,204 rows (30 parts)  silver 480  gold 156 ...``"""
    cells = []
    for o in outcome.steps:
        if o.status == "failed":
            cells.append(f"{o.step} FAILED: {o.error}")
        elif o.step == "bronze":
            parts = o.details.get("parts_loaded", 0)
            cells.append(f"bronze {o.rows:,} rows ({parts:,} parts)")
        else:
            cells.append(f"{o.step} {o.rows:,}")
    width = len(str(total))
    return f"[{done:>{width}}/{total}] {iso(outcome.hour_ms)}  " + "  ".join(cells)


__all__ = [
    "BATCH_HOURS",
    "REBUILD_STEPS",
    "RebuildRequest",
    "RebuildResult",
    "lake_from",
    "progress_line",
    "resolve_request",
    "run_rebuild",
]
