"""``klined.read_candles``: candles as a ``pyarrow.Table``, from the warehouse or the datasets.

Both sources give the same table (the same columns, types and rows, sorted by exchange,
symbol and time): ``exchange`` then the dataset's columns (:mod:`klined.datasets.schema`),
prices and volumes as exact ``decimal128(38, 18)``, times as UTC milliseconds.

* ``source="postgresql://..."`` (or ``KLINED_DSN`` in the environment when ``source`` is not
  given): read from silver (1m) or gold, streamed with a server-side COPY, in one consistent
  snapshot per exchange. The role needs SELECT on silver and gold (``klined_reader``).
* ``source=<folder>`` or ``"s3://bucket/prefix"``: the Parquet datasets the chain publishes
  (``<lake root>``, ``<lake root>/datasets`` or ``.../datasets/ohlcv_<interval>`` all work)
  or a Parquet ``klined export`` folder; only the files of the asked exchanges, months and
  days are opened. S3 uses the standard AWS credentials; ``AWS_ENDPOINT_URL`` points it at an
  S3-compatible store.

It is a plain function: it runs its own event loop (in a helper thread when the caller's
thread already runs one, as in Jupyter).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.fs as pafs

from klined.datasets.schema import Dataset
from klined.datasets.stream import copy_tables
from klined.datasets.targets import MANIFEST, decode_json
from klined.errors import DatasetError, UsageError
from klined.model import EXCHANGES, Pair, from_datetime, iso, parse_time, to_datetime

TimeLike = str | datetime | int


def _ms(value: TimeLike, what: str) -> int:
    if isinstance(value, datetime):
        return from_datetime(value)
    if isinstance(value, int):
        return value
    try:
        return parse_time(value)
    except ValueError as exc:
        raise UsageError(f"{what}: {exc}") from None


def _names(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def result_schema(ds: Dataset) -> pa.Schema:
    return pa.schema([pa.field("exchange", pa.string(), nullable=False), *ds.schema])


def read_candles(
    start: TimeLike,
    end: TimeLike,
    *,
    exchange: str | Sequence[str] | None = None,
    pair: str | Sequence[str] | None = None,
    interval: str = "1m",
    source: str | os.PathLike[str] | None = None,
) -> pa.Table:
    """Candles with ``start <= interval_start < end``; see :func:`klined.read_candles`."""
    ds = Dataset(interval)
    lo, hi = _ms(start, "start"), _ms(end, "end")
    if hi <= lo:
        raise UsageError(f"empty or reversed range: {iso(lo)} .. {iso(hi)}")
    exchanges = _names(exchange)
    unknown = [e for e in exchanges if e not in EXCHANGES]
    if unknown:
        raise UsageError(f"unknown exchange {unknown[0]!r}; klined knows {', '.join(EXCHANGES)}")
    try:
        pairs = sorted({str(Pair.parse(p)) for p in _names(pair)})
    except ValueError as exc:
        raise UsageError(f"pair: {exc}") from None
    where = os.fspath(source) if source is not None else os.environ.get("KLINED_DSN", "")
    if not where:
        raise UsageError("say where to read: source='postgresql://...' or a datasets folder")
    if where.startswith(("postgresql://", "postgres://")):
        table = _run(_from_database, where, ds, lo, hi, exchanges or list(EXCHANGES), pairs)
    else:
        table = _from_files(where, ds, lo, hi, exchanges, pairs)
    order = [("exchange", "ascending"), ("symbol", "ascending"), ("interval_start", "ascending")]
    return table.sort_by(order)


def _run(fn: Any, *args: Any) -> pa.Table:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.run(fn, *args)
    with ThreadPoolExecutor(1) as pool:  # the caller's thread runs a loop (Jupyter)
        return pool.submit(anyio.run, fn, *args).result()


async def _from_database(
    dsn: str, ds: Dataset, lo: int, hi: int, exchanges: list[str], pairs: list[str]
) -> pa.Table:
    import asyncpg

    sql = ds.select(pairs=bool(pairs), final_only=False)
    schema = result_schema(ds)
    tables: list[pa.Table] = []
    conn = await asyncpg.connect(dsn, timeout=10, server_settings={"timezone": "UTC"})
    try:
        for exchange in exchanges:
            parts: list[pa.Table] = []
            args: list[Any] = [exchange, to_datetime(lo), to_datetime(hi)]
            if pairs:
                args.append(pairs)
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                await copy_tables(conn, sql, args, ds, parts.append, where=f"{exchange} {ds.name}")
            for part in parts:
                column = pa.array([exchange] * part.num_rows, pa.string())
                tables.append(part.add_column(0, "exchange", column).cast(schema))
    finally:
        await conn.close()
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _dataset_dir(fs: pafs.FileSystem, base: str, ds: Dataset) -> str:
    """The folder of the dataset under what the user named."""
    base = base.rstrip("/")
    for candidate in (f"{base}/{ds.name}", f"{base}/datasets/{ds.name}"):
        if fs.get_file_info(candidate).type == pafs.FileType.Directory:
            return candidate
    return base


def _from_files(
    where: str, ds: Dataset, lo: int, hi: int, exchanges: list[str], pairs: list[str]
) -> pa.Table:
    if where.startswith("s3://"):
        fs, base = pafs.FileSystem.from_uri(where)
    else:
        fs, base = pafs.LocalFileSystem(), str(Path(where).expanduser().resolve())
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        raise DatasetError(f"{where} is not a folder of klined datasets")
    folder = _dataset_dir(fs, base, ds)
    _check_export(fs, folder, ds, where)
    selector = pafs.FileSelector(folder, recursive=True)
    files = [
        info.path
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.File
        and info.path.endswith(".parquet")
        and not any(part.startswith((".", "_")) for part in info.path[len(folder) :].split("/"))
    ]
    if not files:
        raise DatasetError(
            f"no Parquet files under {where} (for {ds.name}: a published datasets folder, "
            "the lake root with publishing on, or a Parquet export)"
        )
    dataset = pds.dataset(
        files,
        filesystem=fs,
        format="parquet",
        partitioning=pds.partitioning(flavor="hive"),
        partition_base_dir=folder,
    )
    fields = set(dataset.schema.names)
    time_type = ds.schema.field("interval_start").type
    start_at = pc.field("interval_start")
    condition = (start_at >= pa.scalar(to_datetime(lo), time_type)) & (
        start_at < pa.scalar(to_datetime(hi), time_type)
    )
    condition &= _calendar_filter(fields, lo, hi)
    if exchanges:
        condition &= pc.field("exchange").isin(exchanges)
    if pairs:
        condition &= pc.field("symbol").isin(pairs)
    table = dataset.to_table(columns=["exchange", *ds.schema.names], filter=condition)
    return table.cast(result_schema(ds))


def _calendar_filter(fields: set[str], lo: int, hi: int) -> pc.Expression:
    """year/month(/day) bounds, so files outside the range are never opened."""
    first, last = to_datetime(lo), to_datetime(hi - 1)
    if {"year", "month", "day"} <= fields:
        key = pc.field("year") * 10000 + pc.field("month") * 100 + pc.field("day")
        low = first.year * 10000 + first.month * 100 + first.day
        high = last.year * 10000 + last.month * 100 + last.day
    elif {"year", "month"} <= fields:
        key = pc.field("year") * 100 + pc.field("month")
        low, high = first.year * 100 + first.month, last.year * 100 + last.month
    else:
        return pc.scalar(True)
    return (key >= low) & (key <= high)


def _check_export(fs: pafs.FileSystem, folder: str, ds: Dataset, where: str) -> None:
    """An export folder says what it holds: refuse the wrong interval or a text format."""
    try:
        with fs.open_input_stream(f"{folder}/{MANIFEST}") as f:
            manifest = decode_json(f.read(), f"{where}/{MANIFEST}")
    except FileNotFoundError:
        return
    if manifest is None:
        return
    if manifest.get("interval") not in (None, ds.interval):
        raise DatasetError(
            f"{where} holds {manifest.get('interval')} candles, not {ds.interval}; "
            f"pass interval={manifest.get('interval')!r}"
        )
    if manifest.get("format") not in (None, "parquet"):
        raise DatasetError(
            f"{where} is a {manifest.get('format')} export; read_candles reads Parquet "
            "(export with --format parquet, or read the files with your CSV/JSON reader)"
        )
