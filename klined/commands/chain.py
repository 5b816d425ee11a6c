"""``klined chain``: run the hourly chain by hand and print what each step did."""

from __future__ import annotations

import time
from collections.abc import Sequence

import anyio
import click

from klined.commands.options import config_option
from klined.config import Config, load_config
from klined.errors import UsageError
from klined.jobs.chain import RUN_STEPS, STEPS, ChainReport, run_chain, select_hours
from klined.jobs.gapfill import sync_configured_pairs
from klined.jobs.interrupt import run_interruptible
from klined.lake import LakeUploader
from klined.logs import setup_config_logging
from klined.model import HOUR_MS, floor_hour, iso, parse_time
from klined.rest.client import open_clients
from klined.warehouse.database import open_database


def _hours_from_options(hour: str | None, start: str | None, end: str | None) -> list[int] | None:
    """Hours named on the command line, or ``None`` to let :func:`select_hours` decide."""

    def parse(text: str, what: str) -> int:
        try:
            return parse_time(text)
        except ValueError as exc:
            raise UsageError(f"{what}: {exc}") from None

    if hour is not None:
        if start is not None or end is not None:
            raise UsageError("use either --hour or --from/--to, not both")
        return [floor_hour(parse(hour, "--hour"))]
    if start is None and end is None:
        return None
    if start is None or end is None:
        raise UsageError("--from and --to go together")
    lo, hi = parse(start, "--from"), parse(end, "--to")
    if hi <= lo:
        raise UsageError(f"empty or reversed range: --from {iso(lo)} --to {iso(hi)}")
    return list(range(floor_hour(lo), hi, HOUR_MS))


async def _chain_main(
    cfg: Config, hours: list[int] | None, steps: Sequence[str], wait_s: float
) -> ChainReport:
    lake = LakeUploader(cfg.lake_root, cfg.lake, cfg.s3)
    async with open_database(cfg, apply_schema=True) as db:
        await sync_configured_pairs(db, cfg)
        now = int(time.time() * 1000)
        if hours is not None and set(steps) <= set(RUN_STEPS):
            # `--step publish --from --to`: publish (again) every day of the range
            from klined.datasets.publish import mark_days

            await mark_days(
                db,
                [f"ohlcv_{i}" for i in cfg.publish.intervals],
                list(cfg.exchanges.enabled()),
                hours[0],
                hours[-1] + HOUR_MS,
            )
        chosen = hours if hours is not None else await select_hours(db, cfg, now)
        if not chosen or set(steps) <= set(RUN_STEPS):
            # no hour to run: still publish what is queued (a day an earlier run could not)
            run_steps = [s for s in steps if s in RUN_STEPS]
            if not run_steps:
                return ChainReport("manual")
            return await run_chain(
                db, cfg, [], trigger="manual", lake=lake, steps=run_steps, lock_wait_s=wait_s,
                now_ms=now, maintain_partitions=False,
            )  # fmt: skip
        async with open_clients(cfg) as clients:
            return await run_chain(
                db, cfg, chosen, trigger="manual", lake=lake, clients=clients, steps=steps,
                lock_wait_s=wait_s, now_ms=now,
            )  # fmt: skip


@click.command("chain")
@config_option
@click.option("--hour", "hour", metavar="TIME", help="Run this hour (date-time, UTC).")
@click.option("--from", "start", metavar="TIME", help="First hour of a range.")
@click.option("--to", "end", metavar="TIME", help="End of the range (exclusive).")
@click.option(
    "--step",
    "steps",
    multiple=True,
    type=click.Choice(STEPS),
    help="Run only this step (repeatable). Default: every step.",
)
@click.option(
    "--wait",
    "wait_s",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds to wait when another chain holds the lock.",
)
def chain_command(
    config_path: str | None,
    hour: str | None,
    start: str | None,
    end: str | None,
    steps: tuple[str, ...],
    wait_s: float,
) -> int:
    """Run the hourly chain by hand: every hour that needs it, or the hours you name.

    Prints one line per hour with each step's result, then what publish wrote (`--step publish
    --from --to` publishes every day of the range again, e.g. history from before publishing
    was on); exits 1 if a step failed or
    another chain held the lock, 130/143 when stopped by SIGINT/SIGTERM (the step in progress
    is recorded as failed and the next run redoes its hour).
    """
    cfg = load_config(config_path)
    setup_config_logging(cfg.daemon)
    hours = _hours_from_options(hour, start, end)
    outcome = anyio.run(
        run_interruptible, lambda: _chain_main(cfg, hours, steps or STEPS, wait_s), "the chain"
    )
    if outcome.interrupted:
        click.echo(
            f"chain stopped by {outcome.signal_name}: the step in progress is recorded as "
            "failed (cancelled); the next run redoes its hour",
            err=True,
        )
        return outcome.exit_code
    report = outcome.result
    assert report is not None
    if report.skipped:
        click.echo(f"chain skipped: {report.skipped}", err=True)
        return 1
    if not report.hours:
        if report.publish is not None and report.publish.details.get("days", 1):
            click.echo(report.publish_line())
            return 0 if report.ok else 1
        click.echo("nothing to do: every closed hour is processed and complete")
        return 0
    click.echo(report.table())
    click.echo(report.summary())
    return 0 if report.ok else 1
