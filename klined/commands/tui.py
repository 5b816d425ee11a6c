"""``klined tui``: the dashboard (Textual is imported only when this command runs)."""

from __future__ import annotations

from typing import Any

import click
from loguru import logger

from klined.commands.options import config_option
from klined.config import load_config

__all__ = ["tui_command"]


@click.command("tui")
@config_option
@click.option(
    "--refresh",
    type=click.FloatRange(min=0.2, max=3600),
    default=2.0,
    show_default=True,
    help="Seconds between reads of the daemon's status (the database is read every 5x that, "
    "at least every 10 s).",
)
def tui_command(config_path: str | None, refresh: float) -> None:
    """Open the dashboard: streams (1), completeness (2), jobs (3); q quits."""
    cfg = load_config(config_path)
    # loguru's stderr sink would draw over the screen; keep warnings in a file instead
    logger.remove()
    log_file: Any = cfg.data_dir / "klined-tui.log" if cfg.data_dir.is_dir() else None
    if log_file is not None:
        logger.add(log_file, level="WARNING", rotation="1 MB", retention=2)
    from klined.tui.app import build_app

    build_app(cfg, config_path, refresh).run()
