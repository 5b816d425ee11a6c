"""``klined rebuild --from --to``: the command line around :mod:`klined.jobs.rebuild`."""

from __future__ import annotations

import sys
import time

import anyio
import click

from klined.commands.options import config_option
from klined.config import Config, load_config
from klined.jobs.chain_report import HourOutcome
from klined.jobs.interrupt import run_interruptible
from klined.jobs.progress import fmt_duration
from klined.jobs.rebuild import (
    RebuildRequest,
    RebuildResult,
    lake_from,
    progress_line,
    resolve_request,
    run_rebuild,
)
from klined.lake import LakeStore
from klined.logs import setup_config_logging
from klined.model import iso
from klined.warehouse.database import open_database


async def _main(
    cfg: Config, lake: LakeStore, req: RebuildRequest, wait_s: float | None
) -> RebuildResult:
    def show(outcome: HourOutcome, done: int, total: int) -> None:
        click.echo(progress_line(outcome, done, total), err=True)

    async with open_database(cfg, apply_schema=True) as db:
        return await run_rebuild(db, cfg, lake, req, on_hour=show, lock_wait_s=wait_s)


@click.command("rebuild")
@config_option
@click.option("--from", "start", required=True, metavar="TIME", help="Start (date or UTC time).")
@click.option("--to", "end", required=True, metavar="TIME", help="End, exclusive.")
@click.option("--exchange", default=None, help="Only this exchange.")
@click.option(
    "--lake",
    "where",
    metavar="DIR|s3://BUCKET/PREFIX",
    default=None,
    help="Read this lake instead of the configured one (local spool + S3).",
)
@click.option(
    "--wait",
    "wait_s",
    type=float,
    default=None,
    help="Seconds to wait for another chain holding the lock (default: as long as it takes).",
)
def rebuild_command(
    config_path: str | None,
    start: str,
    end: str,
    exchange: str | None,
    where: str | None,
    wait_s: float | None,
) -> int:
    """Rebuild bronze, silver, gold and completeness for a range from the lake alone (no
    exchange is asked), into an empty or existing warehouse.

    Idempotent: parts already loaded are skipped and unchanged rows are never rewritten, so it
    can be re-run, or resumed after an interruption, at any time. Prints one progress line per
    hour; exit code 0 when every hour is done, 1 when a step failed, 2 for bad arguments,
    130/143 when stopped by SIGINT/SIGTERM.
    """
    cfg = load_config(config_path)
    setup_config_logging(cfg.daemon)
    req = resolve_request(cfg, start, end, exchange, now_ms=int(time.time() * 1000))
    lake = lake_from(cfg, where)
    source = f"s3://{lake.s3.bucket}/{lake.s3.prefix}" if lake.enabled else ""
    source = f"{lake.root} + {source}" if source and where is None else source or str(lake.root)
    click.echo(
        f"rebuild {iso(req.start_ms)} .. {iso(req.end_ms)}"
        f"{' ' + req.exchange if req.exchange else ''} from {source}",
        err=True,
    )
    outcome = anyio.run(run_interruptible, lambda: _main(cfg, lake, req, wait_s), "the rebuild")
    if outcome.interrupted:
        click.echo(
            f"rebuild stopped by {outcome.signal_name}: what is loaded stays; run the same "
            "command again to finish",
            err=True,
        )
        return outcome.exit_code
    result = outcome.result
    assert result is not None
    for report in result.reports:
        if report.skipped:
            click.echo(f"error: {report.skipped}", err=True)
            return 1
    click.echo(
        f"{len(result.hours)} hour(s) in {fmt_duration(result.duration_s)}:"
        f" {result.parts_listed:,} parts listed, bronze {result.total('bronze'):,} rows loaded,"
        f" silver {result.total('silver'):,}, gold {result.total('gold'):,},"
        f" completeness {result.total('completeness'):,} rows written"
    )
    if not result.ok:
        for report in result.reports:
            if not report.ok:
                click.echo(report.table(), err=True)
        sys.stderr.flush()
        return 1
    return 0
