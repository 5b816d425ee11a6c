"""Options every command that reads the configuration shares."""

from __future__ import annotations

import click

config_option = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    envvar="KLINED_CONFIG",
    help="Path to klined.toml (default: ./klined.toml, else built-in defaults).",
)
