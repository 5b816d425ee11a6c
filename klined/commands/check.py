"""``klined check``: is this machine ready to run klined (and is klined running)?

The probes are :mod:`klined.checks.probes`; this module prints their rows and sets the exit
code (1 when any row FAILs, 2 for a bad config).
"""

from __future__ import annotations

from dataclasses import asdict

import anyio
import click
import msgspec

from klined.checks.probes import (
    DEFAULT_TIMEOUT_S,
    CheckResult,
    Outcome,
    config_label,
    exit_code,
    run_checks,
)
from klined.commands.options import config_option
from klined.config import Config, load_config
from klined.logs import setup_logging

__all__ = ["check_command", "render_json", "render_table"]

_COLOURS = {Outcome.OK: "green", Outcome.WARN: "yellow", Outcome.FAIL: "red", Outcome.SKIP: None}


def render_table(results: list[CheckResult]) -> str:
    """The human view: one row per check, details indented below, then a one-line verdict."""
    name_w = max(len("CHECK"), *(len(r.name) for r in results))
    res_w = len("RESULT")
    lines = [f"  {'CHECK':<{name_w}}  {'RESULT':<{res_w}}  REASON"]
    indent = " " * (2 + name_w + 2 + res_w + 2)
    for r in results:
        word = click.style(f"{r.outcome.value:<{res_w}}", fg=_COLOURS[r.outcome], bold=True)
        lines.append(f"  {r.name:<{name_w}}  {word}  {r.reason}")
        lines.extend(f"{indent}- {d}" for d in r.details)
    failed = [r.name for r in results if r.outcome is Outcome.FAIL]
    warned = [r.name for r in results if r.outcome is Outcome.WARN]
    verdict = f"{len(failed)} failed: {', '.join(failed)}" if failed else "all required checks OK"
    if warned:
        verdict += f"; {len(warned)} warning(s): {', '.join(warned)}"
    lines += ["", verdict]
    return "\n".join(lines)


def render_json(cfg: Config, results: list[CheckResult]) -> str:
    doc = {
        "ok": exit_code(results) == 0,
        "config": config_label(cfg),
        "checks": [{**asdict(r), "outcome": r.outcome.value} for r in results],
    }
    return msgspec.json.format(msgspec.json.encode(doc), indent=2).decode()


@click.command("check")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option(
    "--lake",
    "lake_s3",
    is_flag=True,
    help="Also compare the local parts with S3 (size, checksum); upload again what S3 lost.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.5, max=600),
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    help="Seconds each check may take before it FAILs.",
)
@click.pass_context
def check_command(
    ctx: click.Context, config_path: str | None, as_json: bool, lake_s3: bool, timeout: float
) -> None:
    """Check config, PostgreSQL (schema, read-only role), S3, exchange listings, the exchanges'
    archives, the daemon's status socket and the lake; print OK/WARN/FAIL/SKIP per check.

    Exit code 0 when nothing FAILs, 1 otherwise, 2 for a bad config. WARN never fails the
    check: a daemon that is not running (status socket), an embedded PostgreSQL the daemon has
    not started yet, a schema or read-only role `klined run` will create. `check` never starts
    a database and leaves nothing behind (the S3 probe object is deleted); with --lake it
    compares the parts still on disk with S3 and uploads again the ones S3 lost.
    """
    cfg = load_config(config_path)
    setup_logging("ERROR", json=False)  # problems belong in the table, not in log lines
    results = anyio.run(lambda: run_checks(cfg, deadline_s=timeout, lake_s3=lake_s3))
    if as_json:
        click.echo(render_json(cfg, results))
    else:
        click.echo(f"klined check - config: {config_label(cfg)}\n")
        click.echo(render_table(results))
    ctx.exit(exit_code(results))
