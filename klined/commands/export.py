"""``klined export``: silver or gold candles of a range into Parquet, CSV or JSON-lines files."""

from __future__ import annotations

import sys
from typing import Any

import anyio
import click

from klined.commands.options import config_option
from klined.config import Config, load_config
from klined.datasets.export import ExportRequest, ExportResult, Progress, request_from_options
from klined.datasets.formats import FORMATS
from klined.datasets.schema import INTERVALS
from klined.jobs.interrupt import run_interruptible
from klined.logs import setup_config_logging
from klined.model import iso
from klined.warehouse.database import open_database


class _Bar(Progress):
    """A progress bar on a terminal (rows against the planner's estimate, stretched when the
    estimate falls short); quiet otherwise."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.total = 0
        self.done = 0

    def start(self, estimated_rows: int) -> None:
        if sys.stderr.isatty():
            self.total = max(1, estimated_rows)
            self.bar = click.progressbar(
                length=self.total, label="exporting", file=sys.stderr, show_pos=True, width=30
            )
            self.bar.__enter__()

    def partition(self, key: str) -> None:
        if self.bar is not None:
            self.bar.label = key

    def advance(self, rows: int) -> None:
        if self.bar is not None:
            self.done += rows
            if self.done > self.total:  # the planner's estimate fell short
                self.total = self.bar.length = self.done + self.done // 10
            self.bar.update(rows)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.length = max(1, self.done)  # what was written is all there is
            self.bar.label = "exported"
            self.bar.render_progress()
            self.bar.__exit__(None, None, None)
            self.bar = None


async def _main(cfg: Config, req: ExportRequest, bar: _Bar) -> ExportResult:
    from klined.datasets.export import run_export

    async with open_database(cfg) as db:
        try:
            return await run_export(db, cfg, req, progress=bar)
        finally:
            bar.close()


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


@click.command("export")
@config_option
@click.option("--from", "start", required=True, metavar="TIME", help="Start (date or UTC time).")
@click.option("--to", "end", required=True, metavar="TIME", help="End, exclusive.")
@click.option("--exchange", "exchanges", multiple=True, help="Only this exchange (repeatable).")
@click.option("--pair", "pairs", multiple=True, help="Only this pair, e.g. BTC/USD (repeatable).")
@click.option(
    "--interval",
    type=click.Choice(list(INTERVALS)),
    default="1m",
    show_default=True,
    help="1m is silver; the others gold.",
)
@click.option(
    "--format", "fmt", type=click.Choice(list(FORMATS)), default="parquet", show_default=True
)
@click.option(
    "--out",
    required=True,
    metavar="DIR|s3://BUCKET/PREFIX",
    help="Where the Hive-partitioned files and _manifest.json go.",
)
@click.option(
    "--final-only",
    is_flag=True,
    help="Only candles that can no longer change (no ws_partial minute, gold buckets complete).",
)
def export_command(
    config_path: str | None,
    start: str,
    end: str,
    exchanges: tuple[str, ...],
    pairs: tuple[str, ...],
    interval: str,
    fmt: str,
    out: str,
    final_only: bool,
) -> int:
    """Export candles to files: exchange=/year=/month= partitions, symbol a column, exact
    decimals (Parquet decimal(38, 18); decimal text in CSV and JSON lines), UTC milliseconds.

    Streams from PostgreSQL (never the whole range in memory). Re-running replaces each
    partition whole and atomically; a partition keeps the union of the ranges exported into
    it. Exit 0 when written, 1 when a value does not fit its column (the row is named, nothing
    is rounded) or the output cannot be written, 2 for bad arguments or an --out that holds
    another export, 130/143 when interrupted (written partitions stay; re-run to finish).
    """
    cfg = load_config(config_path)
    setup_config_logging(cfg.daemon)
    req = request_from_options(
        start, end, out, interval=interval, fmt=fmt, exchanges=exchanges, pairs=pairs,
        final_only=final_only,
    )  # fmt: skip
    bar = _Bar()
    outcome = anyio.run(run_interruptible, lambda: _main(cfg, req, bar), "the export")
    if outcome.interrupted:
        click.echo(
            f"export stopped by {outcome.signal_name}: the partitions written so far are "
            "complete and in the manifest; run the same command again to finish",
            err=True,
        )
        return outcome.exit_code
    result = outcome.result
    assert result is not None
    for part in result.partitions:
        if part.removed:
            click.echo(f"{part.key}  removed (no candles in {iso(part.start_ms)} .. now)")
            continue
        click.echo(
            f"{part.key}  {part.rows:>12,} rows  {part.symbols:>5,} pair(s)"
            f"  {_size(part.bytes):>10}  {iso(part.start_ms)} .. {iso(part.end_ms)}"
        )
    click.echo(
        f"{result.rows:,} {req.dataset.name} rows in {len(result.partitions)} partition(s),"
        f" {_size(result.bytes)}, {result.seconds:.1f}s -> {result.where}"
        " (listed in _manifest.json)"
    )
    return 0
