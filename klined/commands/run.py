"""``klined run``: the daemon in the foreground until SIGTERM/SIGINT/SIGHUP (see
:mod:`klined.daemon.process`)."""

from __future__ import annotations

import functools
import sys

import anyio
import click
from loguru import logger

from klined.commands.options import config_option
from klined.config import ROLES, load_config
from klined.daemon.process import run_daemon, tune_process
from klined.daemon.systemd import Notifier
from klined.errors import ConfigError, EventsLost, KlinedError
from klined.logs import setup_config_logging

__all__ = ["run_command"]


def _klined_error(exc: BaseException) -> KlinedError | None:
    """The first :class:`KlinedError` inside a (nested) exception group."""
    if isinstance(exc, KlinedError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _klined_error(inner)
            if found is not None:
                return found
    return None


@click.command("run")
@config_option
@click.option(
    "--role",
    type=click.Choice(ROLES),
    default=None,
    help="all: streams and chain; capture: streams into the lake only (this host's shard, "
    "daemon.shard); chain: no streams, loads the whole lake. Default: daemon.role.",
)
def run_command(config_path: str | None, role: str | None) -> int:
    """Run the daemon: streams, lake, status, hourly chain (as daemon.role says).

    Runs until SIGTERM, SIGINT or SIGHUP (a closed SSH session), then stops gracefully: every
    open lake part is sealed and uploaded, an embedded PostgreSQL stopped; exit code 0.
    """
    cfg = load_config(config_path)  # ConfigError: the CLI prints it and exits 2
    if role is not None:
        cfg.daemon.role = role
    setup_config_logging(cfg.daemon)
    notifier = Notifier.from_env()
    tune_process()
    chosen = cfg.capture_pairs if cfg.captures else cfg.pairs
    pairs = {name: [str(p) for p in chosen(name)] for name in cfg.exchanges.enabled()}
    logger.info(
        "klined starting (config {}, role {}{}): {}",
        cfg.source_path or "<defaults>",
        cfg.daemon.role,
        f", shard {cfg.daemon.shard}" if cfg.captures and cfg.shard[1] > 1 else "",
        ", ".join(f"{k} {len(v)} pairs" for k, v in pairs.items()) or "no exchange enabled",
    )
    if cfg.daemon.role != "all" and not cfg.s3.bucket:
        logger.warning(
            "role {} without an S3 bucket: only hosts sharing this lake folder ({}) see its parts",
            cfg.daemon.role,
            cfg.lake_root,
        )
    try:
        return anyio.run(functools.partial(run_daemon, cfg, notifier=notifier))
    except BaseException as exc:
        err = _klined_error(exc)
        if err is None:
            raise
        if isinstance(err, EventsLost):  # logged by the daemon already
            click.echo(f"error: {err}", err=True)
            sys.exit(1)
        logger.error("klined cannot run: {}", err)
        click.echo(f"error: {err}", err=True)
        # a config problem found only at run time is still a config problem: exit 2, which
        # systemd's RestartPreventExitStatus=2 does not restart in a loop
        sys.exit(2 if isinstance(err, ConfigError) else 1)
