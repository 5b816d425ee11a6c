"""``klined config``: validate a configuration file and show what klined will use."""

from __future__ import annotations

import click
import msgspec

from klined.config import load_config

config_option = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    envvar="KLINED_CONFIG",
    help="Path to klined.toml (default: ./klined.toml, else built-in defaults).",
)


@click.command("config")
@config_option
def config_command(config_path: str | None) -> None:
    """Validate the config (exit 2 on any problem) and print it as JSON with defaults filled in."""
    cfg = load_config(config_path)
    click.echo(msgspec.json.format(msgspec.json.encode(cfg), indent=2))
