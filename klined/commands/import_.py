"""``klined import binance|kraken``: the exchanges' published history files, verified, into the
warehouse (:mod:`klined.jobs.archive_import`). The module is ``import_`` because ``import``
is a Python keyword; the command is ``klined import``."""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import anyio
import click

from klined.archives.candles import ALL_TIME
from klined.commands.options import config_option
from klined.config import Config, load_config
from klined.errors import UsageError
from klined.jobs.archive_import import FileReport, ImportResult, import_binance, import_kraken
from klined.jobs.gapfill import sync_configured_pairs
from klined.jobs.interrupt import run_interruptible
from klined.jobs.progress import ImportProgress, fmt_duration
from klined.logs import setup_config_logging
from klined.model import MINUTE_MS, Pair, iso, parse_time
from klined.warehouse.database import Database, open_database


def _pairs(cfg: Config, exchange: str, wanted: Sequence[str]) -> list[Pair]:
    """The configured pairs of ``exchange``, or those of them named with ``--pair``."""
    section = getattr(cfg.exchanges, exchange)
    if not section.enabled:
        raise UsageError(f"exchange {exchange!r} is disabled in the config")
    configured = cfg.pairs(exchange)
    chosen: list[Pair] = []
    for text in wanted:
        try:
            pair = Pair.parse(text)
        except ValueError as exc:
            raise UsageError(f"--pair: {exc}") from None
        if pair not in configured:
            known = ", ".join(map(str, configured))
            raise UsageError(f"pair {pair} is not configured for {exchange} (configured: {known})")
        chosen.append(pair)
    pairs = chosen or configured
    if not pairs:
        raise UsageError(f"no pairs configured for {exchange}")
    return pairs


def _time(text: str, what: str) -> int:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise UsageError(f"{what}: {exc}") from None


def summary(result: ImportResult) -> str:
    """Per pair: files loaded / already loaded / not published / failed, rows, span."""
    head = ("exchange", "pair", "files", "loaded", "already", "missing", "failed", "rows",
            "no-trade", "span")  # fmt: skip

    def span(r: FileReport) -> str:
        if r.first_minute is None or r.last_minute is None:
            return "-"
        return f"{iso(r.first_minute)} .. {iso(r.last_minute + MINUTE_MS)}"

    rows = [
        (r.exchange, r.symbol, f"{r.files:,}", f"{r.loaded:,}", f"{r.unchanged:,}",
         f"{r.missing:,}", f"{r.failed:,}", f"{r.rows:,}", f"{r.no_trades:,}", span(r))
        for r in sorted(result.reports, key=lambda r: (r.exchange, r.symbol))
    ]  # fmt: skip
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    numeric = set(range(2, 9))

    def fmt(row: tuple[str, ...]) -> str:
        cells = [
            c.rjust(widths[i]) if i in numeric else c.ljust(widths[i]) for i, c in enumerate(row)
        ]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)])


def _report(result: ImportResult) -> int:
    click.echo(summary(result))
    rate = result.rows / result.duration_s if result.duration_s > 0 else 0.0
    merged = result.hours_merged
    click.echo(
        f"{result.rows:,} rows in {fmt_duration(result.duration_s)} ({rate:,.0f} rows/s);"
        f" {merged:,} hour(s) merged into silver/gold"
    )
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    for m in result.merges:
        if not m.ok:
            click.echo(m.table(), err=True)
    for err in result.errors:
        click.echo(f"error: {err}", err=True)
    if result.unreachable:
        click.echo(f"error: {result.unreachable}", err=True)
    if not result.ok:
        click.echo(
            "the files above were not loaded (nothing of them is in the warehouse); the rest "
            "was. Run the same command again once they are fixed: what is loaded is skipped",
            err=True,
        )
        sys.stderr.flush()
        return 1
    return 0


def _run(
    cfg: Config, what: str, work: Callable[[Database, ImportProgress], Awaitable[ImportResult]]
) -> int:
    async def main() -> ImportResult:
        async with open_database(cfg, apply_schema=True) as db:
            await sync_configured_pairs(db, cfg)
            return await work(db, ImportProgress(what))

    outcome = anyio.run(run_interruptible, main, "the import")
    if outcome.interrupted:
        click.echo(
            f"import stopped by {outcome.signal_name}: every file loaded so far is kept; run "
            "the same command again to continue",
            err=True,
        )
        return outcome.exit_code
    assert outcome.result is not None
    return _report(outcome.result)


@click.group("import")
def import_command() -> None:
    """Import the exchanges' published history files (verified) into the warehouse.

    Rows become source `archive`: written to the lake (sealed `archive_` parts, uploaded to S3
    when configured), then through bronze, silver, gold and completeness like a backfill's.
    Re-importing a file changes nothing; a file whose checksum changed is loaded again and
    replaces the old rows. A bad file (checksum, truncated zip, bad row) is reported with its
    name and line and nothing of it reaches the lake or the warehouse; the others do. Exit code 0
    when every file loaded, 1 when some did not, 2 for bad arguments, 130/143 when stopped.
    """


@import_command.command("binance")
@config_option
@click.option("--from", "start", required=True, metavar="DATE", help="First day (UTC).")
@click.option("--to", "end", required=True, metavar="DATE", help="End day, exclusive.")
@click.option("--pair", "pairs", multiple=True, help="Only this pair, e.g. BTC/USD (repeatable).")
def binance_command(config_path: str | None, start: str, end: str, pairs: tuple[str, ...]) -> int:
    """Download Binance US's daily and monthly kline files for the range and load them.

    Whole months come as monthly files, the other days as daily ones; only whole UTC days
    that are over are imported (a day's file appears the next day). Files come from
    `exchanges.binance.archive_url` (default Binance US's public data).
    """
    cfg = load_config(config_path)
    setup_config_logging(cfg.daemon)
    lo, hi = _time(start, "--from"), _time(end, "--to")
    if hi <= lo:
        raise UsageError(f"empty or reversed range: --from {iso(lo)} --to {iso(hi)}")
    chosen = _pairs(cfg, "binance", pairs)
    click.echo(
        f"import binance {iso(lo)} .. {iso(hi)}: {len(chosen)} pair(s) from {cfg.archive_url}",
        err=True,
    )

    async def work(db: Database, progress: ImportProgress) -> ImportResult:
        return await import_binance(
            db, cfg, chosen, lo, hi, now_ms=int(time.time() * 1000), progress=progress
        )

    return _run(cfg, "binance", work)


@import_command.command("kraken")
@config_option
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--pair", "pairs", multiple=True, help="Only this pair, e.g. BTC/USD (repeatable).")
@click.option("--from", "start", metavar="TIME", help="Only minutes from this time on.")
@click.option("--to", "end", metavar="TIME", help="Only minutes before this time.")
def kraken_command(
    config_path: str | None,
    paths: tuple[Path, ...],
    pairs: tuple[str, ...],
    start: str | None,
    end: str | None,
) -> int:
    """Load Kraken OHLCVT zips, folders or CSVs (downloaded by hand from Kraken's support
    site: the full history and the quarterly updates).

    Only the 1-minute files (`XBTUSD_1.csv`) of configured pairs are read; other intervals and
    pairs are counted and skipped. Minutes a file omits between its rows had no trades and
    become `no_trades`, flat at the previous close.
    """
    cfg = load_config(config_path)
    setup_config_logging(cfg.daemon)
    lo = _time(start, "--from") if start else ALL_TIME[0]
    hi = _time(end, "--to") if end else ALL_TIME[1]
    if hi <= lo:
        raise UsageError(f"empty or reversed range: --from {iso(lo)} --to {iso(hi)}")
    chosen = _pairs(cfg, "kraken", pairs)
    click.echo(f"import kraken {', '.join(map(str, paths))}: {len(chosen)} pair(s)", err=True)

    async def work(db: Database, progress: ImportProgress) -> ImportResult:
        return await import_kraken(
            db, cfg, list(paths), chosen, window=(lo, hi), now_ms=int(time.time() * 1000),
            progress=progress,
        )  # fmt: skip

    return _run(cfg, "kraken", work)
