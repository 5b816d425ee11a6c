"""The candle datasets' columns: one Arrow schema per interval, and the SQL that reads them.

Every dataset is Hive-partitioned by ``exchange=`` (and time); the files hold the other
columns, ``symbol`` among them (readers take ``exchange`` from the path, as Hive, Spark,
Athena, DuckDB and polars all do). Types:

* prices and volumes: ``decimal128(38, 18)``, 20 integer digits and 18 decimals: a 23-digit
  Kraken volume (15 + 8), a PEPE price with 10 decimals and a day's quote volume of any pair
  all fit, and every reader (Spark, Athena/Trino, DuckDB, polars) has 38 digits. A value that
  does not fit fails the write with its row named; nothing is ever rounded, with one stated
  exception: ``vwap``, a quotient (Binance's is quote volume / volume to 28 significant digits),
  is carried rounded half away from zero to 18 decimal places, in every format alike.
* times: ``timestamp[ms, UTC]`` (candle times are whole minutes; ``updated_at``, when the row
  last changed in the warehouse, is cut to the millisecond).
* ``source`` (1m: ws_final, rest, trades, no_trades, ws_partial), ``trade_count``, and for
  the gold intervals ``minutes`` / ``traded_minutes`` (the bucket's silver minutes present and
  those with trades: its completeness).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import pyarrow as pa

from klined.errors import UsageError

DECIMAL = pa.decimal128(38, 18)
DECIMAL_TEXT = "decimal128(38, 18)"
#: the largest magnitude a DECIMAL holds
DECIMAL_MAX = Decimal("9" * 20 + "." + "9" * 18)
TIME = pa.timestamp("ms", tz="UTC")

#: interval name -> seconds; 1m is silver, the others gold
INTERVALS: dict[str, int] = {
    "1m": 60,
    "5m": 300,
    "15m": 900,
    "30m": 1800,
    "1h": 3600,
    "4h": 14400,
    "1d": 86400,
}

_COMMON = (
    pa.field("symbol", pa.string(), nullable=False),
    pa.field("interval_start", TIME, nullable=False),
    pa.field("interval_end", TIME, nullable=False),
    pa.field("open", DECIMAL, nullable=False),
    pa.field("high", DECIMAL, nullable=False),
    pa.field("low", DECIMAL, nullable=False),
    pa.field("close", DECIMAL, nullable=False),
    pa.field("volume", DECIMAL, nullable=False),
    pa.field("quote_volume", DECIMAL),
    pa.field("vwap", DECIMAL),
    pa.field("trade_count", pa.int64()),
)
_SILVER = pa.schema(
    [
        *_COMMON,
        pa.field("source", pa.string(), nullable=False),
        pa.field("updated_at", TIME, nullable=False),
    ]
)
_GOLD = pa.schema(
    [
        *_COMMON,
        pa.field("minutes", pa.int16(), nullable=False),
        pa.field("traded_minutes", pa.int16(), nullable=False),
        pa.field("updated_at", TIME, nullable=False),
    ]
)


@dataclass(frozen=True, slots=True)
class Dataset:
    """The candles of one interval, as files: their table, columns and query."""

    interval: str

    def __post_init__(self) -> None:
        if self.interval not in INTERVALS:
            raise UsageError(
                f"unknown interval {self.interval!r}; use one of {', '.join(INTERVALS)}"
            )

    @property
    def name(self) -> str:
        """``ohlcv_1m`` ... ``ohlcv_1d``: the dataset's folder under the datasets root."""
        return f"ohlcv_{self.interval}"

    @property
    def seconds(self) -> int:
        return INTERVALS[self.interval]

    @property
    def is_silver(self) -> bool:
        return self.interval == "1m"

    @property
    def table(self) -> str:
        return "silver.fact_ohlcv" if self.is_silver else f"gold.ohlcv_{self.interval}"

    @property
    def schema(self) -> pa.Schema:
        return _SILVER if self.is_silver else _GOLD

    @property
    def decimal_columns(self) -> list[str]:
        return [f.name for f in self.schema if f.type == DECIMAL]

    def select(self, *, pairs: bool, final_only: bool) -> str:
        """The rows of one exchange (``$1``) and ``[$2, $3)`` of ``interval_start``, ordered
        by symbol then time; ``pairs`` adds ``symbol = ANY($4)``.

        ``final_only`` keeps what can no longer change: 1m candles that are not
        ``ws_partial``; gold buckets whose every minute is in silver and none is partial.
        """
        columns = ", ".join(self._expression(f.name) for f in self.schema)
        where = ["c.exchange = $1", "c.interval_start >= $2", "c.interval_start < $3"]
        if pairs:
            where.append("c.symbol = ANY($4::text[])")
        if final_only and self.is_silver:
            where.append("c.source <> 'ws_partial'")
        elif final_only:
            where.append(f"c.minutes = {self.seconds // 60}")
            where.append(
                "NOT EXISTS (SELECT 1 FROM silver.fact_ohlcv s"
                " WHERE s.exchange = c.exchange AND s.symbol = c.symbol"
                " AND s.interval_start >= c.interval_start AND s.interval_start < c.interval_end"
                " AND s.source = 'ws_partial')"
            )
        return (
            f"SELECT {columns} FROM {self.table} c WHERE {' AND '.join(where)}"
            " ORDER BY c.symbol, c.interval_start"
        )

    def _expression(self, column: str) -> str:
        """How a column is read from the table (alias ``c``).

        Times travel as integer milliseconds since the epoch: cheaper for the server to print
        than timestamp text, and for Arrow to read (``date_part`` is a double: exact for any
        millisecond of the next few thousand years, rounded back to the integer).
        """
        if column == "vwap":
            return "round(c.vwap, 18)"
        if column == "updated_at":  # gold calls it ingestion_ts: when the row last changed
            changed = "updated_at" if self.is_silver else "ingestion_ts"
            return (
                f"round(date_part('epoch', date_trunc('milliseconds', c.{changed})) * 1000)::bigint"
            )
        if column in ("interval_start", "interval_end"):
            return f"round(date_part('epoch', c.{column}) * 1000)::bigint"
        return f"c.{column}"
