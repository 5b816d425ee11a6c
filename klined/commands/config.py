"""``klined config``: validate a configuration file and show what klined will use."""

from __future__ import annotations

from typing import Any

import click
import msgspec

from klined.commands.options import config_option
from klined.config import Config, dsn_origin, load_config, redact_dsn


def effective_config(cfg: Config) -> dict[str, Any]:
    """The configuration as JSON-ready data, passwords redacted, plus what klined resolves from
    it and the environment: the DSN in effect and where it comes from, and the paths."""
    doc: dict[str, Any] = msgspec.to_builtins(cfg)
    if cfg.database.dsn:
        doc["database"]["dsn"] = redact_dsn(cfg.database.dsn)
    doc["effective"] = {
        "dsn": redact_dsn(cfg.dsn) if cfg.dsn else "",
        "dsn_from": dsn_origin(cfg),
        "data_dir": str(cfg.data_dir),
        "lake_root": str(cfg.lake_root),
        "status_socket": str(cfg.status_socket),
    }
    return doc


@click.command("config")
@config_option
def config_command(config_path: str | None) -> None:
    """Validate the config (exit 2 on any problem) and print it as JSON with defaults filled in.

    Passwords in DSNs are shown as ``***``. The ``effective`` block says which DSN klined uses
    (``KLINED_DSN`` overrides ``database.dsn``; none means the embedded PostgreSQL) and the
    resolved paths.
    """
    cfg = load_config(config_path)
    click.echo(msgspec.json.format(msgspec.json.encode(effective_config(cfg)), indent=2))
