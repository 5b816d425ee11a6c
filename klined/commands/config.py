"""``klined config``: validate a configuration file and show what klined will use."""

from __future__ import annotations

import click
import msgspec

from klined.commands.options import config_option
from klined.config import load_config


@click.command("config")
@config_option
def config_command(config_path: str | None) -> None:
    """Validate the config (exit 2 on any problem) and print it as JSON with defaults filled in."""
    cfg = load_config(config_path)
    click.echo(msgspec.json.format(msgspec.json.encode(cfg), indent=2))
