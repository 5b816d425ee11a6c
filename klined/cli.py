"""The ``klined`` command line.

Each command is a module of :mod:`klined.commands` (arguments, output, exit codes) that drives
the code of its concept package, imported only when invoked, so ``klined status`` does not pay
for Textual and the simulator does not import asyncpg. Errors a user can fix (config,
arguments) exit with code 2 and one clear line; any other klined error (database unreachable,
exchange down) prints one line and exits 1. Unexpected exceptions keep their traceback: bugs.
"""

from __future__ import annotations

import importlib
import importlib.util
import keyword
import sys
from typing import Any

import click

from klined import __version__
from klined.errors import ConfigError, KlinedError, UsageError

#: command name -> (attribute of ``klined.commands.<name>``, one-line help for ``klined --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("run_command", "Run the daemon: streams, lake, status, hourly chain."),
    "status": ("status_command", "Print the running daemon's status."),
    "chain": ("chain_command", "Run the hourly chain by hand."),
    "backfill": ("backfill_command", "Repair or seed a time range."),
    "import": ("import_command", "Import the exchanges' published history files."),
    "export": ("export_command", "Export candles to Parquet, CSV or JSON-lines files."),
    "rebuild": ("rebuild_command", "Rebuild the warehouse for a range from the lake alone."),
    "tui": ("tui_command", "Open the dashboard (streams, completeness, jobs)."),
    "tail": ("tail_command", "Print each candle as it is committed (LISTEN/NOTIFY)."),
    "sim": ("sim_command", "Run the Binance US / Kraken exchange simulator."),
    "demo": ("demo_command", "Run everything against the simulator, no internet."),
    "check": ("check_command", "Check config, PostgreSQL, S3, exchanges, daemon."),
    "config": ("config_command", "Validate a config file and print it."),
    "sql": ("sql_command", "Open psql on the warehouse (--dsn prints its DSN)."),
}


def command_module(name: str) -> str:
    """The module of command ``name``: ``klined.commands.<name>``, with a trailing ``_`` when
    the name is a Python keyword (``import`` lives in ``klined.commands.import_``)."""
    return f"klined.commands.{name}_" if keyword.iskeyword(name) else f"klined.commands.{name}"


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._available(name)]

    def _available(self, name: str) -> bool:
        return importlib.util.find_spec(command_module(name)) is not None

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None or not self._available(cmd_name):
            return None
        attr, _ = entry
        command = getattr(importlib.import_module(command_module(cmd_name)), attr)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="klined")
def cli() -> None:
    """klined: 1-minute OHLCV candles from Binance US and Kraken you can trust."""


def main(argv: list[str] | None = None) -> Any:
    """Console entry point: user errors print one line and exit 2."""
    try:
        rv = cli.main(args=argv, standalone_mode=False)
        if isinstance(rv, int) and rv:
            sys.exit(rv)
        return rv
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2 if isinstance(exc, click.UsageError) else exc.exit_code)
    except (ConfigError, UsageError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KlinedError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
