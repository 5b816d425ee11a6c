"""Writing one partition's file: Parquet, CSV or JSON lines, from typed Arrow tables.

* **Parquet**: the Arrow types as they are (``decimal128(38, 18)`` columns, millisecond UTC
  timestamps), zstd, row groups of ``ROW_GROUP_ROWS`` rows in (symbol, time) order, so a reader
  that wants one pair skips the others' row groups by their statistics.
* **CSV** (header, comma, no quoting needed) and **JSON lines** (one object per candle): every
  decimal as its exact digits without trailing zeros (as text in JSON, so no reader turns it
  into a float), times as ISO 8601 UTC with milliseconds (``2026-11-26T13:05:00.000Z``),
  missing values empty (CSV) or ``null`` (JSON).

Each sink counts rows, distinct symbols and the first and last ``interval_start`` for the
manifest. Output is deterministic: the same rows always make the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from klined.datasets.schema import DECIMAL, TIME, Dataset

#: format -> file suffix
FORMATS = {"parquet": ".parquet", "csv": ".csv", "jsonl": ".jsonl"}
#: every partition holds one file, under this name (plus the format's suffix)
FILE_STEM = "candles"
ROW_GROUP_ROWS = 256 * 1024

_ISO = "%Y-%m-%dT%H:%M:%SZ"  # %S carries the milliseconds of a ms timestamp
_SAFE_TEXT = r'^[^"\\\x00-\x1f]*$'


def file_name(fmt: str) -> str:
    return FILE_STEM + FORMATS[fmt]


class Sink:
    """One partition's file being written. ``write`` and ``close`` run in worker threads.

    ``as_text`` sinks take the decimal columns as PostgreSQL's digits (see
    :func:`klined.datasets.stream.parse_block`): Arrow would print a small decimal in
    scientific notation.
    """

    as_text = False

    def __init__(self, path: Path, ds: Dataset) -> None:
        self.path = path
        self.ds = ds
        self.rows = 0
        self.symbols: set[str] = set()
        self.first: int | None = None  # interval_start, ms
        self.last: int | None = None

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self.rows += table.num_rows
        self.symbols.update(pc.unique(table.column("symbol")).to_pylist())
        bounds = pc.min_max(table.column("interval_start").cast(pa.int64()))
        low, high = bounds["min"].as_py(), bounds["max"].as_py()
        self.first = low if self.first is None else min(self.first, low)
        self.last = high if self.last is None else max(self.last, high)
        self._write(table)

    def _write(self, table: pa.Table) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class ParquetSink(Sink):
    def __init__(self, path: Path, ds: Dataset) -> None:
        super().__init__(path, ds)
        self._writer = pq.ParquetWriter(path, ds.schema, compression="zstd", write_statistics=True)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def _write(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            table = pa.concat_tables(self._pending)
            self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            self._pending = []
            self._pending_rows = 0

    def close(self) -> None:
        self._flush()
        self._writer.close()


def _text(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """A column as text: times ISO 8601 UTC, numbers in digits (decimals come as text)."""
    if column.type == TIME:
        return pc.strftime(column, format=_ISO)
    if pa.types.is_string(column.type):
        return column
    return pc.cast(column, pa.string())


class CsvSink(Sink):
    as_text = True

    def __init__(self, path: Path, ds: Dataset) -> None:
        super().__init__(path, ds)
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._schema = pa.schema([pa.field(f.name, pa.string()) for f in ds.schema])
        self._file.write((",".join(self._schema.names) + "\n").encode())
        options = pcsv.WriteOptions(include_header=False, quoting_style="none")
        self._writer = pcsv.CSVWriter(self._file, self._schema, write_options=options)

    def _write(self, table: pa.Table) -> None:
        columns = [_text(table.column(n)) for n in table.column_names]
        self._writer.write_table(pa.table(columns, schema=self._schema))

    def close(self) -> None:
        self._writer.close()
        self._file.close()


class JsonlSink(Sink):
    """Lines are built column-wise in Arrow (each value rendered, then joined per row)."""

    as_text = True

    def __init__(self, path: Path, ds: Dataset) -> None:
        super().__init__(path, ds)
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        # decimals as JSON strings: most JSON readers would turn a number into a float
        self._quoted = {
            f.name for f in ds.schema if f.type in (DECIMAL, TIME) or pa.types.is_string(f.type)
        }

    def _write(self, table: pa.Table) -> None:
        pieces: list[Any] = []
        for i, name in enumerate(table.column_names):
            value = _text(table.column(name))
            if name in self._quoted:
                if name in ("symbol", "source"):
                    safe = pc.all(pc.match_substring_regex(value, _SAFE_TEXT)).as_py()
                    if safe is False:
                        raise ValueError(f"{name} holds text that needs JSON escaping")
                value = pc.binary_join_element_wise('"', value, '"', "")
            pieces += ['{"' if i == 0 else ',"', name, '":', pc.fill_null(value, "null")]
        pieces.append("}\n")
        lines = pc.binary_join_element_wise(*pieces, "").combine_chunks()
        # the lines lie end to end in the array's data buffer: write them in one go
        _, offsets, data = lines.buffers()
        bounds = memoryview(offsets).cast("i")
        self._file.write(memoryview(data)[bounds[lines.offset] : bounds[lines.offset + len(lines)]])

    def close(self) -> None:
        self._file.close()


SINKS: dict[str, type[Sink]] = {"parquet": ParquetSink, "csv": CsvSink, "jsonl": JsonlSink}


def open_sink(fmt: str, path: Path, ds: Dataset) -> Sink:
    return SINKS[fmt](path, ds)
