"""The archives a backfill reads before (or instead of) REST: ``--source auto|rest|archive``.

* Binance US: its daily/monthly kline files for the whole UTC days of the range that ended
  before yesterday (a day's file appears the next day; yesterday's may not be there yet), and
  only days with minutes the warehouse lacks. A month or day without a file, a file that fails
  its checksum or holds a bad row, an archive that cannot be reached: those minutes go to REST
  (``auto``) or stay missing (``archive``).
* Kraken: the OHLCVT files in ``exchanges.kraken.archive_dir`` (1-minute CSVs of the pair, in
  zips or folders), read for the backfill's range only. Minutes outside every file's span (after
  the last quarterly update) go to REST/Trades in ``auto``.

Loading is :func:`klined.jobs.archive.load_file`, the same as ``klined import``: the rows into
the backfill's lake as ``archive_`` parts and from there into bronze, the ledger, the dirty
hours. The backfill then fetches over REST what is still missing, which is
how ``auto`` uses archives "where they cover": nothing decides coverage ahead but the rows.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread

from klined.archives import binance as bn
from klined.archives import kraken as kr
from klined.archives.candles import FileSpec
from klined.archives.download import ArchiveSource
from klined.archives.files import KrakenScan, scan_kraken, survey
from klined.config import Config
from klined.errors import ArchiveError, UsageError
from klined.jobs.archive import TAG, ArchiveFile, load_file
from klined.jobs.archive_import import (
    WORK_DIR,
    FileReport,
    ImportResult,
    binance_jobs,
    load_binance,
)
from klined.jobs.fetcher import PairReport
from klined.jobs.ingest import LakeIngest, ingest_for
from klined.model import DAY_MS, MINUTE_MS, Pair
from klined.rest.client import build_adapter
from klined.warehouse.database import Database

SOURCES = ("auto", "rest", "archive")

#: why a minute stays missing with ``--source archive``
NOT_IN_ARCHIVE = "not in the archive"

#: dry-run guesses for an archive file: seconds to fetch and verify it, and rows loaded a second
ARCHIVE_FILE_S_GUESS = 0.5
ARCHIVE_ROWS_PER_S_GUESS = 20_000


def check_source(cfg: Config, source: str, exchanges: Iterable[str]) -> None:
    """``--source archive`` needs an archive for every exchange it is asked for."""
    if source not in SOURCES:
        raise UsageError(f"--source must be one of {', '.join(SOURCES)}, not {source!r}")
    if source == "archive" and "kraken" in exchanges and cfg.kraken_archive_dir is None:
        raise UsageError(
            "--source archive: Kraken's files come by hand; set exchanges.kraken.archive_dir"
            " to their folder, or pass --exchange binance"
        )


def binance_days(start_ms: int, end_ms: int, now_ms: int) -> list[int]:
    """Whole UTC days of the range that ended before yesterday: the archive has them."""
    return bn.whole_days(start_ms, end_ms, bn.floor_day(now_ms) - DAY_MS)


@dataclass(slots=True)
class KrakenFiles:
    """A pair's 1-minute files in ``archive_dir`` and their spans (from a survey)."""

    files: list[ArchiveFile] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)


class BackfillArchives:
    """``async with BackfillArchives(db, cfg, source, start, end, now) as archives``; rows go
    into ``lake`` (a :class:`~klined.lake.LakeStore`; default: the configured one)."""

    def __init__(
        self,
        db: Database,
        cfg: Config,
        source: str,
        start_ms: int,
        end_ms: int,
        now_ms: int,
        *,
        lake: Any = None,
    ) -> None:
        self.db = db
        self.cfg = cfg
        self.lake = lake
        self._ingest: LakeIngest | None = None
        self.source = source
        self.start_ms = start_ms
        self.end_ms = end_ms
        self.now_ms = now_ms
        self.result = ImportResult()  # errors and notes, for the summary
        self._binance: ArchiveSource | None = None
        self._kraken: dict[Pair, KrakenFiles] | None = None
        self._kraken_lock = anyio.Lock()
        self._adapters: dict[str, Any] = {}

    async def __aenter__(self) -> BackfillArchives:
        if self.enabled("binance"):
            section = self.cfg.exchanges.binance
            self._binance = ArchiveSource(
                self.cfg.archive_url,
                timeout_s=section.rest_timeout_s * 3,
                work_dir=self.cfg.data_dir / WORK_DIR,
            )
            await self._binance.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._binance is not None:
            await self._binance.__aexit__(*exc)

    def enabled(self, exchange: str) -> bool:
        if self.source == "rest":
            return False
        if exchange == "kraken":
            return self.cfg.kraken_archive_dir is not None
        return exchange == "binance"

    @property
    def ingest(self) -> LakeIngest:
        """Archive parts' way into the lake and bronze (made when first loading)."""
        if self._ingest is None:
            self._ingest = ingest_for(self.db, self.cfg, self.lake, tag=TAG)
        return self._ingest

    def _adapter(self, exchange: str) -> Any:
        if exchange not in self._adapters:
            self._adapters[exchange] = build_adapter(self.cfg, exchange)
        return self._adapters[exchange]

    # ------------------------------------------------------------------------- what serves

    def binance_plan(self, wanted: Sequence[int]) -> list[bn.Period]:
        """The files for the days of ``wanted`` minutes the archive has."""
        days = {m - m % DAY_MS for m in wanted}
        eligible = set(binance_days(self.start_ms, self.end_ms, self.now_ms))
        return bn.plan(sorted(days & eligible))

    async def kraken(self, pair: Pair) -> KrakenFiles:
        """The pair's files in ``archive_dir`` (the folder is scanned once per backfill)."""
        async with self._kraken_lock:
            if self._kraken is None:
                self._kraken = await self._scan_kraken()
        return self._kraken.get(pair, KrakenFiles())

    async def _scan_kraken(self) -> dict[Pair, KrakenFiles]:
        folder = self.cfg.kraken_archive_dir
        assert folder is not None
        scan: KrakenScan = await anyio.to_thread.run_sync(scan_kraken, [folder])
        self.result.errors.extend(scan.problems)
        adapter = self._adapter("kraken")
        names = kr.pair_names(adapter, self.cfg.pairs("kraken"))
        out: dict[Pair, KrakenFiles] = {}
        for found in scan.files:
            pair = names.get(found.native.upper())
            if found.interval != 1 or pair is None:
                continue
            spec = FileSpec(
                "kraken", pair, adapter.rest_native(pair), found.ref.name,
                window=(self.start_ms, self.end_ms), multiplier=adapter.multiplier(pair),
            )  # fmt: skip
            out.setdefault(pair, KrakenFiles()).files.append(ArchiveFile(spec, found.ref, kr.rows))
        return out

    async def kraken_spans(self, pair: Pair) -> list[tuple[int, int]]:
        """``[first, last]`` minute spans of the pair's files (a read of each: dry runs)."""
        files = await self.kraken(pair)
        if not files.spans:
            for file in files.files:
                try:
                    found = await anyio.to_thread.run_sync(survey, file.ref, file.spec.name)
                except ArchiveError as exc:
                    self.result.errors.append(exc)
                    continue
                if found.first is not None and found.last is not None:
                    files.spans.append((found.first * 1000, found.last * 1000 + MINUTE_MS))
        return files.spans

    async def covered(
        self, exchange: str, pair: Pair, wanted: Sequence[int]
    ) -> tuple[set[int], int]:
        """(the minutes of ``wanted`` the archive would serve, files it would read): the dry
        run (for Binance it assumes every file is there; at run time a missing one falls back
        to REST)."""
        if not self.enabled(exchange) or not wanted:
            return set(), 0
        if exchange == "binance":
            periods = self.binance_plan(wanted)
            days = {d for p in periods for d in p.days}
            return {m for m in wanted if m - m % DAY_MS in days}, len(periods)
        spans = await self.kraken_spans(pair)
        served = {m for m in wanted if any(lo <= m < hi for lo, hi in spans)}
        files = sum(1 for lo, hi in spans if any(lo <= m < hi for m in served))
        return served, files

    # ------------------------------------------------------------------------- loading

    async def load(
        self, exchange: str, pair: Pair, wanted: Sequence[int], report: PairReport
    ) -> set[int]:
        """Load what the archive has of ``wanted``; return the hours that got rows."""
        files = FileReport(exchange, str(pair))
        if exchange == "binance" and self._binance is not None:
            periods = self.binance_plan(wanted)
            if not periods or self._binance.unreachable:
                return set()
            adapter = self._adapter("binance")
            days = [d for p in periods for d in p.days]
            jobs = binance_jobs([(pair, adapter.native(pair), files)], days)
            await load_binance(
                self.db, self._binance, jobs, workers=1, result=self.result, ingest=self.ingest,
                multiplier=adapter.multiplier, now_ms=self.now_ms,
            )  # fmt: skip
        elif exchange == "kraken" and wanted:
            stamp = int(time.time() * 1000)
            for file in (await self.kraken(pair)).files:
                outcome = await load_file(self.db, file, ingest=self.ingest, now_ms=stamp)
                files.add(outcome)
                if outcome.error is not None:
                    self.result.errors.append(outcome.error)
        report.archive += files.rows
        report.archive_files += files.loaded
        report.hours.update(files.hours)
        return files.hours
