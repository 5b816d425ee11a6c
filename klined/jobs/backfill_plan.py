"""``klined backfill --dry-run``: what a backfill would do, without doing it.

Per pair: the minutes the warehouse lacks, which of them the exchange's archive would serve
(which days; Binance's files are assumed to be there, a missing one falls back to REST at run
time) and which REST would, the REST requests and the time at the rate limit. Nothing is
fetched: the planning is the same code a real run uses (:mod:`klined.jobs.gapplan`,
:mod:`klined.jobs.backfill_archive`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from loguru import logger

from klined.config import Config
from klined.jobs.backfill import BackfillRequest
from klined.jobs.backfill_archive import (
    ARCHIVE_FILE_S_GUESS,
    ARCHIVE_ROWS_PER_S_GUESS,
    BackfillArchives,
)
from klined.jobs.gapfill import configured_pairs, dirty_hours, wanted_minutes
from klined.jobs.gapplan import Estimate, estimate, plan_windows, runs
from klined.model import DAY_MS, iso
from klined.rest.client import RestClient
from klined.warehouse.database import Database


@dataclass(slots=True)
class DryRunLine:
    exchange: str
    symbol: str
    minutes: int  # wanted
    estimate: Estimate  # the REST part
    archive_minutes: int = 0
    archive_files: int = 0
    archive_seconds: float = 0.0
    sources: str = ""  # which source serves which days

    @property
    def seconds(self) -> float:
        return self.estimate.seconds + self.archive_seconds


def _day(ms: int) -> str:
    return iso(ms)[:10]


def day_ranges(minutes: Sequence[int]) -> str:
    """``2026-09-01..2026-09-29, 2026-10-03``: the UTC days of these minutes."""
    days = sorted({m - m % DAY_MS for m in minutes})
    parts: list[str] = []
    for s, e in runs(days, DAY_MS):
        parts.append(_day(s) if e - s == DAY_MS else f"{_day(s)}..{_day(e - DAY_MS)}")
    return ", ".join(parts)


async def dry_run(
    db: Database,
    cfg: Config,
    clients: Mapping[str, RestClient],
    request: BackfillRequest,
    *,
    refetch: bool = False,
    now_ms: int | None = None,
) -> list[DryRunLine]:
    """What a real run would do: minutes, which source serves which days, REST requests and
    time at the rate limit (archive time is a rough guess)."""
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    start, end = request.start_ms, request.end_ms
    dirty = await dirty_hours(db, start, end)
    by_exchange = await configured_pairs(db, cfg, list(request.pairs), request.pairs)
    archives = BackfillArchives(db, cfg, request.source, start, end, now)
    lines = []
    for ex, plist in by_exchange.items():
        client = clients[ex]
        limits = client.limits
        cost_candles = client.adapter.candles_request(plist[0], start, end).cost if plist else 1
        trades_req = getattr(client.adapter, "trades_request", None)
        cost_trades = trades_req(plist[0], "0").cost if trades_req and plist else cost_candles
        for pair in plist:
            wanted = await wanted_minutes(
                db, ex, pair, start, end, now, refetch=refetch, bronze_hours=dirty.get(ex, ())
            )
            served, files = await archives.covered(ex, pair, wanted)
            rest = [m for m in wanted if m not in served]
            sources = []
            if served:
                sources.append(f"archive {day_ranges(sorted(served))}")
            if rest:
                kind = "missing (no archive)" if request.source == "archive" else "rest"
                sources.append(f"{kind} {day_ranges(rest)}")
            if request.source == "archive":
                rest = []
            windows = plan_windows(
                rest, now, limits.max_candles_per_request, limits.ohlc_window_candles
            )
            est = estimate(
                len(rest), windows, cost_candles, cost_trades, client.limiter.rate_per_s()
            )
            archive_s = files * ARCHIVE_FILE_S_GUESS + len(served) / ARCHIVE_ROWS_PER_S_GUESS
            lines.append(
                DryRunLine(
                    ex,
                    str(pair),
                    len(wanted),
                    est,
                    len(served),
                    files,
                    archive_s,
                    "; ".join(sources) or "-",
                )
            )
    for err in archives.result.errors:
        logger.warning("archive: {}", err)
    return lines


def _requests(line: DryRunLine) -> int:
    return line.estimate.candle_requests + line.estimate.trades_requests


def dry_run_table(lines: list[DryRunLine]) -> str:
    from klined.jobs.progress import fmt_duration

    head = ("exchange", "pair", "minutes", "archive", "files", "rest", "requests", "est. time",
            "sources")  # fmt: skip
    rows = [
        (
            ln.exchange,
            ln.symbol,
            f"{ln.minutes:,}",
            f"{ln.archive_minutes:,}",
            f"{ln.archive_files:,}",
            f"{ln.estimate.minutes:,}",
            f"{_requests(ln):,}" + ("*" if ln.estimate.trades_requests else ""),
            fmt_duration(ln.seconds),
            ln.sources,
        )
        for ln in lines
    ]
    for ex in sorted({ln.exchange for ln in lines}):
        mine = [ln for ln in lines if ln.exchange == ex]
        rows.append(
            (
                ex,
                "TOTAL",
                f"{sum(ln.minutes for ln in mine):,}",
                f"{sum(ln.archive_minutes for ln in mine):,}",
                f"{sum(ln.archive_files for ln in mine):,}",
                f"{sum(ln.estimate.minutes for ln in mine):,}",
                f"{sum(_requests(ln) for ln in mine):,}",
                fmt_duration(sum(ln.seconds for ln in mine)),  # pairs share one budget
                "",
            )
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    numeric = {2, 3, 4, 5, 6, 7}
    out = [
        "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [head, *rows]
    ]
    if any(ln.estimate.trades_requests for ln in lines):
        out.append("* includes Trades pages, estimated (their number depends on market activity)")
    if any(ln.archive_minutes for ln in lines):
        out.append(
            "archive: the exchange's published files (Binance US: days before yesterday;"
            " Kraken: exchanges.kraken.archive_dir); a file missing at run time falls back to REST"
        )
    return "\n".join(line.rstrip() for line in out)
