"""From PostgreSQL to Arrow, streamed: ``COPY (SELECT ...) TO STDOUT`` in blocks, typed exactly.

The server renders each row as CSV text (``numeric`` as its exact decimal digits, times as
milliseconds since the epoch); the bytes arrive a chunk at a time and are cut into blocks of
whole lines, each parsed by Arrow's CSV reader straight into the dataset's types (decimals from
their digits, never through a float) in a worker thread, then handed to the caller's
``consume`` there too. At most a few blocks are in memory whatever the range: the server-side
cursor of COPY streams, and a slow consumer holds the COPY back.

A value that does not fit its decimal column (more than 18 decimals or 20 integer digits)
fails the stream with the row named. Arrow's reader refuses a decimal it would have to round,
but converting a number of more than 38 digits it wraps around silently: so a block goes
straight to decimals only when its text has no run of 21 digits (a value with more than 20
integer digits would), and is otherwise read as text and checked column by column.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import datetime
from decimal import Context, Decimal, InvalidOperation
from typing import Any

import anyio
import asyncpg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from klined.datasets.schema import DECIMAL, DECIMAL_MAX, DECIMAL_TEXT, TIME, Dataset
from klined.errors import DatasetError

#: bytes of CSV text parsed at a time
BLOCK_BYTES = 8 << 20
#: blocks waiting to be parsed while the next one arrives
QUEUE_BLOCKS = 1

#: more digits before the point than a DECIMAL holds (20)
TOO_MANY_INTEGER_DIGITS = r"^-?[0-9]{21}"
LONG_DIGIT_RUN = r"[0-9]{21}"
_CONTEXT = Context(prec=100)


def _read(block: bytes, ds: Dataset, *, decimals_as_text: bool) -> pa.Table:
    schema = ds.schema
    # one thread: the other core serves the COPY (threads were slower on 2 cores)
    read = pcsv.ReadOptions(column_names=schema.names, block_size=BLOCK_BYTES, use_threads=False)
    convert = pcsv.ConvertOptions(
        column_types={f.name: _csv_type(f.type, decimals_as_text) for f in schema},
        null_values=[""],
        strings_can_be_null=True,  # an unquoted empty field is NULL, as COPY writes it
        quoted_strings_can_be_null=False,
    )
    table = pcsv.read_csv(pa.py_buffer(block), read_options=read, convert_options=convert)
    for i, f in enumerate(schema):
        if f.type == TIME:  # milliseconds since the epoch (see Dataset.select)
            table = table.set_column(i, f.name, table.column(i).cast(TIME))
    return table


def _csv_type(arrow: pa.DataType, decimals_as_text: bool) -> pa.DataType:
    if arrow == TIME:
        return pa.int64()
    if arrow == DECIMAL and decimals_as_text:
        return pa.string()
    return arrow


def _long_digit_run(block: bytes) -> bool:
    """Whether the text holds 21 digits in a row anywhere (RE2 over the whole block)."""
    offsets = pa.py_buffer(struct.pack("<qq", 0, len(block)))
    text = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), 1, [None, offsets, pa.py_buffer(block)]
    )
    return bool(pc.match_substring_regex(text, LONG_DIGIT_RUN)[0].as_py())


def parse_block(block: bytes, ds: Dataset, where: str, *, as_text: bool = False) -> pa.Table:
    """Whole CSV lines (as COPY writes them) -> a table of ``ds.schema``, every decimal
    checked; :class:`DatasetError` naming the first row that does not fit.

    The fast path, for the usual block: no value can have more than 20 integer digits when the
    text holds no 21 digits in a row (and Arrow's reader refuses a decimal it would have to
    round), so Arrow converts the decimals directly. Otherwise (or when Arrow refuses), the
    careful path reads them as text, checks each column, casts them, and names the first row
    that does not fit. With ``as_text``, the decimal columns keep PostgreSQL's exact digits as
    text (without trailing zeros) instead, for the text formats, once they are known to fit.
    """
    if not as_text and not _long_digit_run(block):
        try:
            return _read(block, ds, decimals_as_text=False).cast(ds.schema)
        except pa.ArrowInvalid:
            pass  # the careful path says which row
    try:
        table = _read(block, ds, decimals_as_text=True)
    except pa.ArrowInvalid as exc:
        raise DatasetError(f"{where}: cannot read the rows PostgreSQL sent: {exc}") from None
    for name in ds.decimal_columns:
        column = table.column(name)
        # PostgreSQL writes plain digits (no exponent, no leading zeros)
        too_long = pc.match_substring_regex(column, TOO_MANY_INTEGER_DIGITS)
        if pc.any(too_long).as_py():
            row = pc.index(too_long, True).as_py()
            raise _misfit(where, ds, table.slice(row, 1).to_pylist()[0], name)
        try:
            exact = pc.cast(column, DECIMAL)  # refuses to drop a digit after the 18th decimal
        except pa.ArrowInvalid:
            values = column.to_pylist()
            row = next(i for i, v in enumerate(values) if v is not None and not fits(v))
            raise _misfit(where, ds, table.slice(row, 1).to_pylist()[0], name) from None
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, trim_zeros(column) if as_text else exact)
    return table if as_text else table.cast(ds.schema)


def trim_zeros(text: pa.ChunkedArray) -> pa.ChunkedArray:
    """``97000.10`` -> ``97000.1``, ``5.000`` -> ``5``: the same value, its significant digits."""
    text = pc.replace_substring_regex(text, pattern=r"(\.[0-9]*[1-9])0+$", replacement=r"\1")
    return pc.replace_substring_regex(text, pattern=r"\.0+$", replacement="")


def _misfit(where: str, ds: Dataset, row: dict[str, Any], column: str) -> DatasetError:
    start = row["interval_start"]
    when = start.strftime("%Y-%m-%dT%H:%M:%SZ") if isinstance(start, datetime) else start
    return DatasetError(
        f"{where}: {row['symbol']} {ds.interval} candle at {when}: {column} = {row[column]} "
        f"does not fit {DECIMAL_TEXT} (at most 20 digits before the point and 18 after); "
        "nothing is rounded, so nothing was written for this partition"
    )


def fits(text: str) -> bool:
    """Whether a decimal text is held exactly by the datasets' decimal type."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        return False
    if not value.is_finite() or value.copy_abs() > DECIMAL_MAX:
        return False
    exponent = value.normalize(_CONTEXT).as_tuple().exponent
    return isinstance(exponent, int) and exponent >= -18


async def copy_tables(
    conn: asyncpg.Connection,
    sql: str,
    args: list[Any],
    ds: Dataset,
    consume: Callable[[pa.Table], None],
    *,
    where: str,
    on_rows: Callable[[int], None] | None = None,
    as_text: bool = False,
    block_bytes: int = BLOCK_BYTES,
) -> int:
    """Stream ``COPY (sql) TO STDOUT`` into ``consume`` (called in a worker thread, in row
    order, once per block) as tables of ``ds.schema``; return the rows. ``on_rows(n)`` is
    called on the event loop after each block (for progress); ``as_text``: see
    :func:`parse_block`."""
    send, receive = anyio.create_memory_object_stream[bytes](QUEUE_BLOCKS)

    async def produce() -> None:
        pending = bytearray()

        async def sink(chunk: bytes) -> None:
            pending.extend(chunk)
            if len(pending) >= block_bytes:
                cut = pending.rfind(b"\n") + 1
                await send.send(bytes(pending[:cut]))
                del pending[:cut]

        async with send:
            await conn.copy_from_query(sql, *args, output=sink, format="csv")
            if pending:
                await send.send(bytes(pending))

    def convert(block: bytes) -> int:
        table = parse_block(block, ds, where, as_text=as_text)
        consume(table)
        return table.num_rows

    rows = 0

    # the consumer's own error is kept out of the task group, so callers see it as itself
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        async with receive:
            try:
                async for block in receive:
                    n = await anyio.to_thread.run_sync(convert, block)
                    rows += n
                    if on_rows is not None:
                        on_rows(n)
            except Exception as exc:
                failure = exc
                tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return rows
