"""``klined chain``: run the hourly chain by hand and print what each step did."""

from __future__ import annotations

import time
from collections.abc import Sequence

import anyio
import click

from klined.commands.options import config_option
from klined.config import Config, load_config
from klined.errors import UsageError
from klined.jobs.chain import run_chain
from klined.jobs.chain_report import RUN_STEPS, STEPS, ChainReport
from klined.jobs.completeness import mark_pending
from klined.jobs.gapfill import sync_configured_pairs
from klined.jobs.interrupt import run_interruptible
from klined.jobs.lock import hour_label
from klined.jobs.scheduler import closed_end_ms, select_hours
from klined.lake import LakeUploader
from klined.logs import setup_config_logging
from klined.model import HOUR_MS, floor_hour, from_datetime, iso, parse_time, to_datetime
from klined.rest.client import open_clients
from klined.warehouse.database import Database, open_database


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


def refuse_open_hours(cfg: Config, hours: Sequence[int], now_ms: int) -> None:
    """An hour still in progress (or within the lake's grace period after it) is refused: its
    candles are still arriving, so gold and completeness would be computed from a fraction."""
    closed_end = closed_end_ms(cfg, now_ms)
    open_hours = [h for h in hours if h >= closed_end]
    if not open_hours:
        return
    first = open_hours[0]
    closes = first + HOUR_MS + int(cfg.lake.hour_grace_s * 1000)
    what = "in the future" if first > now_ms else "still open"
    raise UsageError(
        f"hour {iso(first)} is {what}: it closes at {iso(closes)} (its end plus"
        f" lake.hour_grace_s); run it then, or pass --allow-open-hour to process what has"
        " arrived so far (gold and completeness will count it as missing)"
    )


async def uncovered(db: Database, hours: Sequence[int]) -> tuple[int, int | None]:
    """(pairs not covered for some of ``hours``, the earliest coverage start among them)."""
    if not hours:
        return 0, None
    row = await db.fetchrow(
        "SELECT count(*) AS n, min(coverage_start) AS first FROM ops.pairs"
        " WHERE active AND listed IS DISTINCT FROM false"
        "   AND (coverage_start IS NULL OR coverage_start > $1)",
        to_datetime(min(hours)),
    )
    assert row is not None
    first = row["first"]
    return int(row["n"]), (None if first is None else from_datetime(first))


async def _chain_main(
    cfg: Config, hours: list[int] | None, steps: Sequence[str], wait_s: float
) -> tuple[ChainReport, str]:
    """The run's report and a note for the user (hours outside the coverage) or ""."""
    lake = LakeUploader(cfg.lake_root, cfg.lake, cfg.s3)
    async with open_database(cfg, apply_schema=True) as db:
        await sync_configured_pairs(db, cfg)
        now = int(time.time() * 1000)
        await mark_pending(db, closed_end_ms(cfg, now))
        if hours is not None and set(steps) <= set(RUN_STEPS):
            # `--step publish --from --to`: publish (again) every day of the range
            from klined.datasets.publish import mark_days

            await mark_days(
                db,
                [f"ohlcv_{i}" for i in cfg.publish.intervals],
                list(cfg.exchanges.enabled()),
                min(hours),
                max(hours) + HOUR_MS,
            )
        chosen = hours if hours is not None else await select_hours(db, cfg, now, lake)
        if not chosen or set(steps) <= set(RUN_STEPS):
            # no hour to run: still publish what is queued (a day an earlier run could not)
            run_steps = [s for s in steps if s in RUN_STEPS]
            if not run_steps:
                return ChainReport("manual"), ""
            report = await run_chain(
                db, cfg, [], trigger="manual", lake=lake, steps=run_steps, lock_wait_s=wait_s,
                now_ms=now, maintain_partitions=False,
            )  # fmt: skip
            return report, ""
        async with open_clients(cfg) as clients:
            report = await run_chain(
                db, cfg, chosen, trigger="manual", lake=lake, clients=clients, steps=steps,
                lock_wait_s=wait_s, now_ms=now,
            )  # fmt: skip
        note = ""
        if hours is not None and "completeness" in steps:
            count, first = await uncovered(db, report_hours(report) or chosen)
            if count:
                lo, hi = min(chosen), max(chosen) + HOUR_MS
                since = f" (the earliest coverage starts {hour_label(first)})" if first else ""
                note = (
                    f"note: {count} pair(s) are not covered for all of these hours{since}:"
                    " their completeness is not counted there; `klined backfill --from"
                    f" {hour_label(lo)} --to {hour_label(hi)}` covers them"
                )
        return report, note


def report_hours(report: ChainReport) -> list[int]:
    return [h.hour_ms for h in report.hours]


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
    help="Seconds each hour waits when another chain holds the lock.",
)
@click.option(
    "--allow-open-hour",
    is_flag=True,
    help="Also process an hour still in progress (refused by default).",
)
def chain_command(
    config_path: str | None,
    hour: str | None,
    start: str | None,
    end: str | None,
    steps: tuple[str, ...],
    wait_s: float,
    allow_open_hour: bool,
) -> int:
    """Run the hourly chain by hand: every hour that needs it (newest first), or the hours
    you name.

    Prints one line per hour with each step's result, then what publish wrote (`--step publish
    --from --to` publishes every day of the range again, e.g. history from before publishing
    was on). Exit codes: 0 when every step did its work; 1 when a step failed, when a gap-fill
    is incomplete (REST requests failed and left minutes missing; a later run retries them) or
    when another chain held the lock; 2 for bad arguments, including an hour that is not
    closed yet (see --allow-open-hour); 130/143 when stopped by SIGINT/SIGTERM (the step in
    progress is recorded as failed and the next run redoes its hour).
    """
    cfg = load_config(config_path)
    setup_config_logging(cfg.daemon)
    hours = _hours_from_options(hour, start, end)
    if hours is not None and not allow_open_hour:
        refuse_open_hours(cfg, hours, int(time.time() * 1000))
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
    assert outcome.result is not None
    report, note = outcome.result
    if report.skipped and not report.hours:
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
    if note:
        click.echo(note, err=True)
    if any(h.ok and h.incomplete for h in report.hours):
        click.echo(
            "incomplete: REST requests failed and left minutes missing (reasons above and in"
            " ops.gapfill_attempts); the hourly chain retries them within"
            " chain.rest_retry_hours, or run this command again",
            err=True,
        )
    return 0 if report.ok else 1
