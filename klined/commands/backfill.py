"""``klined backfill --from --to``: the command line around :mod:`klined.jobs.backfill`."""

from __future__ import annotations

import sys
import time

import anyio
import click

from klined.commands.options import config_option
from klined.config import Config, load_config
from klined.jobs.backfill import BackfillRequest, BackfillResult, resolve_request, run_backfill
from klined.jobs.backfill_archive import SOURCES
from klined.jobs.backfill_plan import dry_run, dry_run_table
from klined.jobs.gapfill import sync_configured_pairs
from klined.jobs.interrupt import run_interruptible
from klined.jobs.progress import Progress, fmt_duration, summary_table
from klined.logs import setup_config_logging
from klined.model import iso
from klined.rest.client import open_clients
from klined.warehouse.database import open_database


async def _main(
    cfg: Config, req: BackfillRequest, *, dry: bool, refetch: bool, concurrency: int
) -> BackfillResult | None:
    async with (
        open_database(cfg, apply_schema=True) as db,
        open_clients(cfg, list(req.pairs)) as clients,
    ):
        if dry:
            lines = await dry_run(db, cfg, clients, req, refetch=refetch)
            click.echo(dry_run_table(lines))
            return None
        await sync_configured_pairs(db, cfg)
        progress = Progress([], {ex: c.limiter.stats for ex, c in clients.items()})
        result = await run_backfill(
            db, cfg, clients, req, refetch=refetch, concurrency=concurrency, progress=progress
        )
        return result


@click.command("backfill")
@config_option
@click.option("--from", "start", required=True, metavar="TIME", help="Start (date or UTC time).")
@click.option("--to", "end", required=True, metavar="TIME", help="End, exclusive.")
@click.option("--exchange", "exchanges", multiple=True, help="Only this exchange (repeatable).")
@click.option("--pair", "pairs", multiple=True, help="Only this pair, e.g. BTC/USD (repeatable).")
@click.option("--dry-run", "dry", is_flag=True, help="Print what would be fetched; fetch nothing.")
@click.option("--refetch", is_flag=True, help="Fetch REST rows again and re-verify them.")
@click.option(
    "--source",
    type=click.Choice(SOURCES),
    default="auto",
    show_default=True,
    help="auto: the exchanges' archive files where they cover, REST elsewhere; rest: REST "
    "only; archive: archive files only.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=8,
    show_default=True,
    help="Pairs fetched at once per exchange (they share its rate limit).",
)
def backfill_command(
    config_path: str | None,
    start: str,
    end: str,
    exchanges: tuple[str, ...],
    pairs: tuple[str, ...],
    dry: bool,
    refetch: bool,
    source: str,
    concurrency: int,
) -> int:
    """Repair or seed a time range: fetch what the warehouse lacks at the exchanges' rate
    limits, then build silver, gold and completeness for every touched hour.

    With --source auto (the default) the exchanges' published history is read first where it
    covers the range (Binance US's archive files for days before yesterday; Kraken's OHLCVT
    files in exchanges.kraken.archive_dir) and REST fetches the rest. Resumable (re-run the
    same command after an interruption) and idempotent (re-running a finished range fetches
    nothing). Exit code 0 when done, 1 when minutes stay missing for a
    reason a later run may fix, 2 for bad arguments, 130/143 when stopped by SIGINT/SIGTERM.
    """
    cfg = load_config(config_path)
    setup_config_logging(cfg.daemon)
    req = resolve_request(
        cfg, start, end, exchanges, pairs, now_ms=int(time.time() * 1000), source=source
    )
    if req.note:
        click.echo(f"note: {req.note}", err=True)
    what = ", ".join(f"{ex} ({len(ps)} pairs)" for ex, ps in req.pairs.items())
    click.echo(
        f"backfill {iso(req.start_ms)} .. {iso(req.end_ms)}: {what}, source {source}", err=True
    )
    outcome = anyio.run(
        run_interruptible,
        lambda: _main(cfg, req, dry=dry, refetch=refetch, concurrency=concurrency),
        "the backfill",
    )
    if outcome.interrupted:
        click.echo(
            f"backfill stopped by {outcome.signal_name}: progress is saved; run the same "
            "command again to resume",
            err=True,
        )
        return outcome.exit_code
    result = outcome.result
    if result is None:
        return 0
    click.echo(summary_table(result.reports))
    rate = result.rows / result.duration_s if result.duration_s > 0 else 0.0
    merged = sum(len(m.hours) for m in result.merges)
    click.echo(
        f"{result.rows:,} rows in {fmt_duration(result.duration_s)} ({rate:,.0f} candles/s);"
        f" {merged} hour(s) merged into silver/gold"
    )
    for m in result.merges:
        if not m.ok:
            click.echo(m.table(), err=True)
    instead = "REST filled in for them" if req.source == "auto" else "their minutes stay missing"
    for err in result.archive.errors:
        click.echo(f"warning: archive {err} ({instead})", err=True)
    if result.archive.unreachable:
        click.echo(f"warning: {result.archive.unreachable} ({instead})", err=True)
    if result.published is not None:
        click.echo(result.published.publish_line())
    if not result.ok:
        click.echo(
            "some minutes are still missing for reasons a later run may fix; run the same "
            "command again (or let the hourly chain retry recent hours)",
            err=True,
        )
        sys.stderr.flush()
        return 1
    return 0
