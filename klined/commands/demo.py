"""The ``klined demo`` command line: validate, run, clean up, exit code."""

from __future__ import annotations

import os
import shutil
import sys

import click
from loguru import logger

from klined.demo.prepare import SEED_HOURS, DemoOptions, S3Target, prepare_dir
from klined.errors import UsageError
from klined.sim import DEFAULT_PAIRS


@click.command("demo")
@click.option(
    "--dir",
    "dir_",
    metavar="DIR",
    default=None,
    help="Working directory to create or reuse (config, lake, PostgreSQL data). "
    "Default: a new temporary directory, removed at exit.",
)
@click.option(
    "--headless",
    is_flag=True,
    help="No dashboard: run for --duration seconds, then print a summary "
    "(exit 1 unless every exchange streamed and completeness was computed).",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=1.0),
    default=60.0,
    show_default=True,
    help="Seconds the daemon runs with --headless.",
)
@click.option(
    "--pairs",
    type=click.IntRange(1, 200),
    default=len(DEFAULT_PAIRS),
    show_default=True,
    help="Pairs per exchange (the shipped ones first, then synthetic P0001/USD...).",
)
@click.option(
    "--hours",
    "seed_hours",
    type=click.IntRange(1, 24),
    default=SEED_HOURS,
    show_default=True,
    help="Closed hours to seed with a backfill at start.",
)
@click.option(
    "--s3-endpoint",
    metavar="URL",
    default=None,
    help="S3-compatible endpoint to mirror the lake to (e.g. a local moto or MinIO server).",
)
@click.option(
    "--bucket",
    default=None,
    help="S3 bucket for the lake (created when missing on an explicit --s3-endpoint).",
)
@click.option("--seed", type=int, default=1, show_default=True, help="The simulator's market seed.")
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
def demo_command(
    dir_: str | None,
    headless: bool,
    duration: float,
    pairs: int,
    seed_hours: int,
    s3_endpoint: str | None,
    bucket: str | None,
    seed: int,
    log_level: str,
) -> int:
    """Run everything against the built-in exchange simulator: no internet, no services.

    Starts the simulator (with faults), an embedded PostgreSQL and a local lake (plus S3 when
    given), seeds the last hours with a backfill and the hourly chain, runs the daemon, and
    opens the dashboard. Ctrl-C (or q) stops everything cleanly. With --headless, prints a
    summary instead: streams, lake parts and uploads, completeness and gold of the seeded
    hours.
    """
    from klined.daemon.process import tune_process
    from klined.demo.run import run
    from klined.logs import setup_logging
    from klined.warehouse.embedded import postmaster_pid

    s3: S3Target | None = None
    if s3_endpoint is not None and not bucket:
        raise UsageError("--s3-endpoint needs --bucket NAME")
    if s3_endpoint is not None and not s3_endpoint.startswith(("http://", "https://")):
        raise UsageError(f"--s3-endpoint {s3_endpoint!r} must be an http(s):// URL")
    if bucket:
        s3 = S3Target(bucket, s3_endpoint or "")
    if not headless and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError(
            "the dashboard needs a terminal; use --headless (with --duration) without one"
        )
    options = DemoOptions(
        dir=dir_,
        headless=headless,
        duration_s=duration,
        pairs=pairs,
        s3=s3,
        seed=seed,
        seed_hours=seed_hours,
        log_level=log_level.upper(),
    )
    workdir, temporary = prepare_dir(dir_)
    setup_logging(options.log_level, None)
    if os.environ.pop("KLINED_DSN", None):
        logger.warning("ignoring KLINED_DSN: the demo runs its own embedded PostgreSQL")
    if s3 is not None:
        from klined.demo.prepare import placeholder_credentials

        if placeholder_credentials(s3):
            logger.info("no AWS credentials configured: using placeholders for {}", s3_endpoint)
    tune_process()

    code, _summary, _demo = run(options, workdir)

    pgdata = workdir / "pgdata"
    pid = postmaster_pid(pgdata)
    if pid is not None:
        logger.error(
            "the embedded PostgreSQL (pid {}) under {} is still running; another klined "
            "process may be using it, else stop it with: kill {}",
            pid,
            pgdata,
            pid,
        )
        code = code or 1
    elif temporary:
        shutil.rmtree(workdir, ignore_errors=True)
        click.echo(f"removed the temporary directory {workdir}", err=True)
    return code
