"""``klined tail``: print each candle as it is committed to silver or gold.

It listens on PostgreSQL's ``klined_candles`` channel (:mod:`klined.warehouse.notify` documents
the payload), the way any application can: the live writer, the hourly chain and backfills
announce every row they change, in the committing transaction. One line per candle, or one
JSON object per line with ``--json``. Ctrl-C (or SIGTERM) stops it with exit code 0; a database
that cannot be reached at start is exit code 1; a connection lost later is re-opened by itself
(candles committed meanwhile are not shown: NOTIFY keeps nothing for absent listeners).
"""

from __future__ import annotations

import signal

import anyio
import click
import msgspec

from klined.commands.options import config_option
from klined.config import load_config
from klined.errors import DatabaseError
from klined.model import EXCHANGES, Pair

__all__ = ["format_candle", "tail_command"]

INTERVALS = ("1m", "5m", "15m", "30m", "1h", "4h", "1d")
_MINUTES = {"1m": 1, "5m": 5, "15m": 15, "30m": 30, "1h": 60, "4h": 240, "1d": 1440}


def format_candle(row: object) -> str:
    """``2026-01-01T00:59:00Z binance  BTC/USD      1m  O 87000.1 H ... C ... V 1.25 ws_final``"""
    from klined.warehouse.notify import Announced

    assert isinstance(row, Announced)
    head = f"{row.start} {row.exchange:<8} {row.symbol:<12} {row.interval:>3}"
    if row.fetch:
        return f"{head}  (changed; its values could not be read)"
    text = (
        f"{head}  O {row.open} H {row.high} L {row.low} C {row.close} V {row.volume}"
        f" n {'-' if row.trade_count is None else row.trade_count}"
    )
    if row.interval == "1m":
        return f"{text}  {row.source}"
    return f"{text}  {row.minutes}/{_MINUTES.get(row.interval, '?')} min"


@click.command("tail")
@config_option
@click.option(
    "--exchange",
    "exchanges",
    multiple=True,
    type=click.Choice(EXCHANGES),
    help="Only this exchange (repeatable; default: all).",
)
@click.option(
    "--pair", "pairs", multiple=True, help="Only this BASE/QUOTE pair (repeatable; default: all)."
)
@click.option(
    "--interval",
    "intervals",
    multiple=True,
    type=click.Choice(INTERVALS),
    help="Only this interval: 1m is silver, the others gold (repeatable; default: all).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per candle and line.")
@click.pass_context
def tail_command(
    ctx: click.Context,
    config_path: str | None,
    exchanges: tuple[str, ...],
    pairs: tuple[str, ...],
    intervals: tuple[str, ...],
    as_json: bool,
) -> None:
    """Print each candle as it is committed (LISTEN klined_candles); Ctrl-C stops."""
    cfg = load_config(config_path)
    try:
        wanted_pairs = {str(Pair.parse(p)) for p in pairs}
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--pair") from None

    from klined.warehouse.database import redact_dsn, running_embedded_dsn
    from klined.warehouse.notify import CHANNEL, Announced, listen

    def dsn() -> str:
        found = cfg.dsn or running_embedded_dsn(cfg)
        if not found:
            raise DatabaseError(
                f"no database.dsn configured and the embedded PostgreSQL under"
                f" {cfg.data_dir / 'pgdata'} is not running - start the daemon with `klined run`"
            )
        return found

    encoder = msgspec.json.Encoder()

    def show(row: Announced) -> None:
        if exchanges and row.exchange not in exchanges:
            return
        if wanted_pairs and row.symbol not in wanted_pairs:
            return
        if intervals and row.interval not in intervals:
            return
        if as_json:
            click.echo(encoder.encode(row).decode())
        else:
            click.echo(format_candle(row))

    def state(text: str) -> None:
        if text == "listening":
            click.echo(f"listening on {CHANNEL} (Ctrl-C stops)", err=True)
        else:
            click.echo(f"connection {text}; reconnecting", err=True)

    async def main() -> Exception | None:
        failed: Exception | None = None
        async with anyio.create_task_group() as tg:

            async def stop_on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(stop_on_signal)
            try:
                await listen(dsn, show, on_state=state)
            except Exception as exc:  # reported below, outside the task group
                failed = exc
            tg.cancel_scope.cancel()
        return failed

    failed = anyio.run(main)
    if failed is None:
        return
    import asyncpg

    if isinstance(failed, DatabaseError):
        click.echo(f"error: {failed}", err=True)
    elif isinstance(failed, OSError | TimeoutError):
        where = redact_dsn(cfg.dsn) if cfg.dsn else "the embedded PostgreSQL"
        click.echo(f"error: cannot connect to {where}: {failed or type(failed).__name__}", err=True)
    elif isinstance(failed, asyncpg.PostgresError | asyncpg.InterfaceError):
        click.echo(f"error: PostgreSQL: {failed}", err=True)
    else:
        raise failed
    ctx.exit(1)
