"""``klined import``: the exchanges' history files into the lake, then bronze, silver, gold and
completeness.

Binance US (:func:`import_binance`): the range's whole UTC days, as monthly files for whole
months and daily files for the rest (:func:`klined.archives.binance.plan`); a month not
published yet is read day by day. Each file's ``.CHECKSUM`` is fetched first: a checksum the
ledger already holds means the file is not even downloaded. A few workers download and load
at once (``exchanges.binance.archive_downloads``), each file all or nothing, as ``archive_``
parts of the lake loaded into bronze (:func:`klined.jobs.archive.load_file`).

Kraken (:func:`import_kraken`): every ``<PAIR>_1.csv`` in the given zips and folders whose
pair is configured; other intervals and pairs are counted and named, not loaded.

Both merge hours into silver, gold and completeness with the chain's own steps while loading
(:class:`klined.jobs.merge.Merger`: Binance hours as soon as no file still to load covers
them; Kraken's at the end, a file spanning years). Interrupted, a re-run continues: loaded
files are in the ledger, hours loaded but not merged are still dirty and merged by it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from loguru import logger

from klined.archives import binance as bn
from klined.archives import kraken as kr
from klined.archives.candles import ALL_TIME, FileSpec
from klined.archives.download import ArchiveSource
from klined.archives.files import scan_kraken, single_csv
from klined.config import Config
from klined.errors import ArchiveError, ArchiveNotPublished, ArchiveUnreachable
from klined.jobs.archive import TAG, ArchiveFile, LoadResult, covered, describe, load_file
from klined.jobs.chain_report import ChainReport
from klined.jobs.gapfill import dirty_hours
from klined.jobs.ingest import LakeIngest, ingest_for
from klined.jobs.merge import Merger, load_and_merge
from klined.jobs.progress import ImportProgress
from klined.model import HOUR_MS, Pair, iso
from klined.rest.client import build_adapter
from klined.warehouse.database import Database

#: Where downloads wait to be loaded, under the data directory.
WORK_DIR = "archives"


@dataclass(slots=True)
class FileReport:
    """One pair's files: what happened to them."""

    exchange: str
    symbol: str
    files: int = 0  # planned (a month read day by day counts its days)
    loaded: int = 0
    unchanged: int = 0  # already in the ledger with this checksum
    missing: int = 0  # not published (404), or not in the range
    failed: int = 0
    rows: int = 0
    no_trades: int = 0
    first_minute: int | None = None
    last_minute: int | None = None
    hours: set[int] = field(default_factory=set)
    missing_days: list[int] = field(default_factory=list)  # Binance: days without a file

    def add(self, result: LoadResult) -> None:
        if result.status == "loaded":
            self.loaded += 1
            self.rows += result.rows
            self.no_trades += result.no_trades
            self.hours.update(result.hours)
            for m in (result.first_minute, result.last_minute):
                if m is not None:
                    first, last = self.first_minute, self.last_minute
                    self.first_minute = m if first is None else min(first, m)
                    self.last_minute = m if last is None else max(last, m)
        elif result.status == "unchanged":
            self.unchanged += 1
        elif result.status in ("missing", "outside"):
            self.missing += 1
        else:
            self.failed += 1


@dataclass(slots=True)
class ImportResult:
    reports: list[FileReport] = field(default_factory=list)
    errors: list[ArchiveError] = field(default_factory=list)
    merges: list[ChainReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unreachable: str = ""
    duration_s: float = 0.0
    hours_merged: int = 0
    merge_s: float = 0.0  # spent merging (beside the loading, then after it)
    load_s: float = 0.0  # until the last file was loaded (merging goes on after it)

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.reports)

    @property
    def ok(self) -> bool:
        return not self.errors and not self.unreachable and all(m.ok for m in self.merges)


def _merged(result: ImportResult, progress: ImportProgress | None, hours: int) -> None:
    result.hours_merged += hours
    if progress is not None:
        progress.add_merged(hours)


class _Frontier:
    """The earliest start of a file still to load, per exchange (hours before it are final)."""

    def __init__(self) -> None:
        self._open: dict[int, tuple[str, int]] = {}

    def open(self, key: int, exchange: str, start_ms: int) -> None:
        self._open[key] = (exchange, start_ms)

    def close(self, key: int) -> None:
        self._open.pop(key, None)

    def ready(self, exchange: str, hour: int) -> bool:
        starts = [s for ex, s in self._open.values() if ex == exchange]
        return not starts or hour + HOUR_MS <= min(starts)


# ---------------------------------------------------------------------------------------------
# Binance US


@dataclass(frozen=True, slots=True)
class BinanceJob:
    pair: Pair
    native: str
    period: bn.Period
    report: FileReport


def binance_jobs(
    pairs: Sequence[tuple[Pair, str, FileReport]], days: Sequence[int]
) -> list[BinanceJob]:
    """Files for ``days`` of every pair ``(pair, native, report)``, oldest period first."""
    periods = bn.plan(days)
    return [BinanceJob(p, native, period, rep) for period in periods for p, native, rep in pairs]


async def load_binance(
    db: Database,
    source: ArchiveSource,
    jobs: Sequence[BinanceJob],
    *,
    workers: int,
    result: ImportResult,
    ingest: LakeIngest,
    progress: ImportProgress | None = None,
    frontier: _Frontier | None = None,
    multiplier: Callable[[Pair], int] = lambda _: 1,
    now_ms: int | None = None,
) -> None:
    """Fetch, verify and load every job's file(s), ``workers`` at a time; results go to each
    job's report and ``result`` (errors). Stops asking once the archive is unreachable."""
    stamp = now_ms if now_ms is not None else int(time.time() * 1000)
    todo = iter(enumerate(jobs))
    for i, job in enumerate(jobs):
        job.report.files += 1
        if frontier is not None:
            frontier.open(i, "binance", job.period.start_ms)

    def finish(job: BinanceJob, outcome: LoadResult) -> None:
        job.report.add(outcome)
        if outcome.error is not None and outcome.status == "failed":
            result.errors.append(outcome.error)
            logger.error("{}", describe(outcome))
        elif outcome.status == "loaded":
            logger.debug("{}", describe(outcome))
        if progress is not None:
            progress.files_done += 1
            progress.failed += outcome.status == "failed"

    async def one(job: BinanceJob, period: bn.Period) -> None:
        name = bn.file_name(job.native, period)
        if source.unreachable:
            raise ArchiveUnreachable(source.unreachable)
        try:
            body = await source.checksum(bn.checksum_path(job.native, period), name)
        except ArchiveNotPublished as exc:
            if period.kind == bn.MONTHLY:  # months come out later than days: read its days
                days = bn.daily_periods(period)
                job.report.files += len(days) - 1
                if progress is not None:
                    progress.files_total += len(days) - 1
                for day in days:
                    await one(job, day)
                return
            job.report.missing_days.append(period.start_ms)
            finish(job, LoadResult(name, "missing", error=exc))
            return
        try:
            sha = bn.parse_checksum(body, name)
            if await covered(db, "binance", sha, period.start_ms, period.end_ms):
                finish(job, LoadResult(name, "unchanged"))
                return
            on_bytes = progress.add_bytes if progress is not None else None
            local = await source.fetch(bn.file_path(job.native, period), name, sha, on_bytes)
        except ArchiveNotPublished as exc:
            job.report.missing_days.extend(period.days)
            finish(job, LoadResult(name, "missing", error=exc))
            return
        except ArchiveError as exc:
            finish(job, LoadResult(name, "failed", error=exc))
            return
        try:
            ref = await anyio.to_thread.run_sync(single_csv, local, name)
            spec = FileSpec(
                "binance", job.pair, job.native, name,
                period=(period.start_ms, period.end_ms), multiplier=multiplier(job.pair),
            )  # fmt: skip
            file = ArchiveFile(spec, ref, bn.rows, sha256=sha)
            on_rows = progress.add_rows if progress is not None else None
            outcome = await load_file(db, file, ingest=ingest, now_ms=stamp, on_rows=on_rows)
        except ArchiveError as exc:
            outcome = LoadResult(name, "failed", error=exc)
        finally:
            source.discard(local)
        finish(job, outcome)

    async def worker() -> None:
        for i, job in todo:
            try:
                if not result.unreachable:
                    await one(job, job.period)
            except ArchiveUnreachable as exc:
                result.unreachable = str(exc)
            finally:
                if frontier is not None:
                    frontier.close(i)
            if result.unreachable and progress is not None:
                progress.files_done += 1

    async with anyio.create_task_group() as tg:
        for _ in range(max(1, min(workers, len(jobs)))):
            tg.start_soon(worker)


async def import_binance(
    db: Database,
    cfg: Config,
    pairs: Sequence[Pair],
    start_ms: int,
    end_ms: int,
    *,
    now_ms: int | None = None,
    progress: ImportProgress | None = None,
    lake: Any = None,
) -> ImportResult:
    """Import Binance US's archive for the whole UTC days of ``[start_ms, end_ms)`` that are
    over by ``now_ms`` into ``lake`` (a :class:`~klined.lake.LakeStore`; default: configured)
    and bronze, then merge every touched hour."""
    started = time.monotonic()
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    adapter = build_adapter(cfg, "binance")
    result = ImportResult()
    reports = [FileReport("binance", str(p)) for p in pairs]
    result.reports = reports
    days = bn.whole_days(start_ms, end_ms, bn.floor_day(now))
    if not days:
        result.notes.append(
            f"no whole UTC day in {iso(start_ms)} .. {iso(end_ms)} is over yet: nothing to import"
        )
        return result
    named = [(p, adapter.native(p), r) for p, r in zip(pairs, reports, strict=True)]
    jobs = binance_jobs(named, days)
    if progress is not None:
        progress.files_total = len(jobs)
    frontier = _Frontier()
    initial = await dirty_hours(db, days[0], days[-1] + 86_400_000)
    merger = Merger(
        db, cfg, ["binance"],
        touched=lambda ex: (h for r in reports for h in r.hours),
        is_ready=frontier.ready,
        initial={"binance": initial.get("binance", set())},
        reports=result.merges, trigger="import", keep_ok_reports=False,
        on_merged=lambda n: _merged(result, progress, n),
    )  # fmt: skip
    section = cfg.exchanges.binance
    async with ArchiveSource(
        cfg.archive_url, timeout_s=section.rest_timeout_s * 3, work_dir=cfg.data_dir / WORK_DIR
    ) as source:

        async def load_all() -> None:
            await load_binance(
                db, source, jobs, workers=section.archive_downloads, result=result,
                ingest=ingest_for(db, cfg, lake, tag=TAG), progress=progress, frontier=frontier,
                multiplier=adapter.multiplier, now_ms=now,
            )  # fmt: skip
            result.load_s = time.monotonic() - started

        await load_and_merge(load_all, merger, progress)
    result.merge_s = merger.seconds
    result.duration_s = time.monotonic() - started
    return result


# ---------------------------------------------------------------------------------------------
# Kraken


async def kraken_files(
    cfg: Config,
    paths: Sequence[Path],
    pairs: Sequence[Pair],
    *,
    window: tuple[int, int] = ALL_TIME,
    result: ImportResult,
) -> list[tuple[ArchiveFile, FileReport, int]]:
    """The 1-minute CSVs of ``pairs`` in ``paths`` with their sizes (uncompressed bytes); what
    else was found goes to ``result``."""
    adapter = build_adapter(cfg, "kraken")
    scan = await anyio.to_thread.run_sync(scan_kraken, list(paths))
    result.errors.extend(scan.problems)
    names = kr.pair_names(adapter, pairs)
    reports = {p: FileReport("kraken", str(p)) for p in pairs}
    result.reports = list(reports.values())
    other_intervals: set[int] = set()
    skipped_other = 0
    unknown: set[str] = set()
    out: list[tuple[ArchiveFile, FileReport, int]] = []
    for found in scan.files:
        if found.interval != 1:
            other_intervals.add(found.interval)
            skipped_other += 1
            continue
        pair = names.get(found.native.upper())
        if pair is None:
            unknown.add(found.native)
            continue
        spec = FileSpec(
            "kraken", pair, adapter.rest_native(pair), found.ref.name,
            window=window, multiplier=adapter.multiplier(pair),
        )  # fmt: skip
        out.append((ArchiveFile(spec, found.ref, kr.rows), reports[pair], found.size))
        reports[pair].files += 1
    if skipped_other:
        minutes = ", ".join(str(i) for i in sorted(other_intervals))
        result.notes.append(f"ignored {skipped_other:,} files of other intervals ({minutes} min)")
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (", ..." if len(unknown) > 8 else "")
        result.notes.append(f"skipped {len(unknown):,} pairs that are not configured ({shown})")
    for pair, rep in reports.items():
        if not rep.files:
            expected = f"{adapter.rest_native(pair)}_1.csv"
            result.notes.append(f"no 1-minute file for {pair} ({expected})")
    if scan.other:
        result.notes.append(f"ignored {scan.other:,} files that are not OHLCVT CSVs or zips")
    return out


async def load_kraken(
    db: Database,
    files: Sequence[tuple[ArchiveFile, FileReport, int]],
    *,
    result: ImportResult,
    ingest: LakeIngest,
    progress: ImportProgress | None = None,
    now_ms: int | None = None,
) -> None:
    """Load the files one after the other (each is a long CPU-bound stream)."""
    stamp = now_ms if now_ms is not None else int(time.time() * 1000)
    for file, report, size in files:
        on_rows = progress.add_rows if progress is not None else None
        outcome = await load_file(db, file, ingest=ingest, now_ms=stamp, on_rows=on_rows)
        report.add(outcome)
        if outcome.status == "failed" and outcome.error is not None:
            result.errors.append(outcome.error)
            logger.error("{}", describe(outcome))
        else:
            logger.debug("{}", describe(outcome))
        if progress is not None:
            progress.files_done += 1
            progress.failed += outcome.status == "failed"
            progress.bytes += size


async def import_kraken(
    db: Database,
    cfg: Config,
    paths: Sequence[Path],
    pairs: Sequence[Pair],
    *,
    window: tuple[int, int] = ALL_TIME,
    now_ms: int | None = None,
    progress: ImportProgress | None = None,
    lake: Any = None,
) -> ImportResult:
    """Import Kraken OHLCVT files (zips, folders, CSVs) into ``lake`` (default: configured)
    and bronze, then merge every touched hour."""
    started = time.monotonic()
    result = ImportResult()
    files = await kraken_files(cfg, paths, pairs, window=window, result=result)
    if progress is not None:
        progress.files_total = len(files)
    initial = await dirty_hours(db, max(window[0], 0), window[1]) if files else {}
    merger = Merger(
        db, cfg, ["kraken"],
        touched=lambda ex: (h for r in result.reports for h in r.hours),
        is_ready=lambda ex, hour: False,  # a file spans years: merge once everything is in
        initial={"kraken": initial.get("kraken", set())},
        reports=result.merges, trigger="import", keep_ok_reports=False,
        on_merged=lambda n: _merged(result, progress, n),
    )  # fmt: skip

    async def load_all() -> None:
        ingest = ingest_for(db, cfg, lake, tag=TAG)
        await load_kraken(db, files, result=result, ingest=ingest, progress=progress, now_ms=now_ms)
        result.load_s = time.monotonic() - started

    await load_and_merge(load_all, merger, progress)
    result.merge_s = merger.seconds
    result.duration_s = time.monotonic() - started
    return result
