"""The warehouse's rules as Spark DataFrame transformations: lake lines -> silver 1m -> gold.

Every rule here mirrors the SQL that applies it in PostgreSQL, column for column, and the
equality test (``tests/spark/``) holds them to it:

* **silver** (``klined/jobs/silver.py``, ``MERGE_SQL``): per exchange, pair and minute, the
  bronze row first in ``rank`` (``ops.source_rank``, defined by ``klined.model.SOURCE_RANK``),
  then latest ``event_ts``, latest ``ingestion_ts``, then ``close`` desc,
  ``high`` desc, ``low``, ``open``, ``volume`` desc, ``trade_count``, ``quote_volume``,
  ``vwap``, ``session_id`` and ``lake_key`` desc with nulls last: every tie-break column, so
  the choice is the same row. Only 1-minute rows aligned to a minute count.
* **gold** (``klined/jobs/gold.py``): a minute trades unless its source is ``no_trades`` or
  its ``trade_count`` is 0; open/close of the first/last traded minute, high/low over traded
  minutes, sums over every minute (a traded minute with an unknown quote volume or trade count
  makes the bucket's unknown), ``minutes`` and ``traded_minutes``; a bucket without trades is
  flat at the close of the last traded minute before it (else its first minute's open).

Numbers: the lake keeps exact decimal text. Ordering and sums use ``DECIMAL(38, 18)``, and the
Parquet columns are ``DECIMAL(38, 18)``, the warehouse's ``numeric`` at that scale (only a
trades-rebuilt ``vwap``, a quotient with 28 significant digits, has more decimals in
PostgreSQL; it is rounded half up at the 18th, as PostgreSQL's own cast to ``numeric(38, 18)``
rounds it).
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from klined.model import SOURCE_RANK, Origin, Source, silver_source

#: the warehouse's gold intervals (``klined.jobs.gold.ALL_INTERVALS``; a test keeps them
#: equal). The warehouse builds 4h and 1d from its 1h rows, which it proves equal to
#: aggregating the silver minutes directly, as this job does for every size.
GOLD_INTERVALS: tuple[tuple[str, int], ...] = (
    ("5m", 300),
    ("15m", 900),
    ("30m", 1800),
    ("1h", 3600),
    ("4h", 14400),
    ("1d", 86400),
)

#: ``ops.source_rank`` by bronze origin, from its definition ``klined.model.SOURCE_RANK`` (a
#: source added there, e.g. ``archive``, is ranked here too); ws is final or partial
ORIGIN_RANK = {
    str(origin): SOURCE_RANK[silver_source(origin, True)]
    for origin in Origin
    if origin != Origin.WS
}
WS_FINAL_RANK, WS_PARTIAL_RANK = SOURCE_RANK[Source.WS_FINAL], SOURCE_RANK[Source.WS_PARTIAL]

NUMBER = T.DecimalType(38, 18)

#: a lake line, as :class:`klined.model.CandleRecord` writes it (defaults omitted)
LINE_SCHEMA = T.StructType(
    [
        T.StructField("exchange", T.StringType()),
        T.StructField("symbol", T.StringType()),
        T.StructField("native_symbol", T.StringType()),
        T.StructField("interval_start", T.LongType()),
        T.StructField("open", T.StringType()),
        T.StructField("high", T.StringType()),
        T.StructField("low", T.StringType()),
        T.StructField("close", T.StringType()),
        T.StructField("volume", T.StringType()),
        T.StructField("quote_volume", T.StringType()),
        T.StructField("vwap", T.StringType()),
        T.StructField("trade_count", T.LongType()),
        T.StructField("is_final", T.BooleanType()),
        T.StructField("origin", T.StringType()),
        T.StructField("session_id", T.StringType()),
        T.StructField("event_ts", T.LongType()),
        T.StructField("ingestion_ts", T.LongType()),
        T.StructField("interval_seconds", T.LongType()),
    ]
)

PRICES = ("open", "high", "low", "close")
NUMBERS = (*PRICES, "volume", "quote_volume", "vwap")


def _number(name: str) -> Column:
    """Exact decimal text -> DECIMAL(38, 18); anything else (garbage, NaN) -> null."""
    return F.expr(f"try_cast(`{name}` AS DECIMAL(38, 18))")


def _ts(ms: Column) -> Column:
    return F.timestamp_millis(ms)


def bronze(lines: DataFrame, root: str) -> DataFrame:
    """Lake lines (a ``value`` column, the file in ``path``) -> typed bronze rows.

    Lines klined's reader skips are skipped here too: unparseable JSON, a missing required
    field, a number that is not one (the bronze loader's careful mode refuses those). Omitted
    fields take :class:`~klined.model.CandleRecord`'s defaults.
    """
    rec = F.from_json(F.col("value"), LINE_SCHEMA)
    df = lines.select(rec.alias("r"), F.col("path")).select("r.*", "path")
    for name in NUMBERS:
        df = df.withColumn(f"_{name}", _number(name))
    ok = F.col("origin").isNull() | F.col("origin").isin("ws", *ORIGIN_RANK)
    for name in ("exchange", "symbol", "native_symbol", "interval_start"):
        ok = ok & F.col(name).isNotNull()
    for name in (*PRICES, "volume"):
        ok = ok & F.col(f"_{name}").isNotNull()
    for name in ("quote_volume", "vwap"):  # optional, but a number when present
        ok = ok & (F.col(name).isNull() | F.col(f"_{name}").isNotNull())
    return df.where(ok).select(
        "exchange",
        "symbol",
        "native_symbol",
        "interval_start",
        *(F.col(f"_{n}").alias(n) for n in NUMBERS),
        "trade_count",
        F.coalesce("is_final", F.lit(False)).alias("is_final"),
        F.coalesce("origin", F.lit("ws")).alias("origin"),
        "session_id",
        F.coalesce("event_ts", F.lit(0)).alias("event_ts"),
        F.coalesce("ingestion_ts", F.lit(0)).alias("ingestion_ts"),
        F.coalesce("interval_seconds", F.lit(60)).alias("interval_seconds"),
        F.regexp_replace("path", "^.*?" + _escape(root.rstrip("/")) + "/", "").alias("lake_key"),
    )


def _escape(text: str) -> str:
    return "".join("\\" + c if c in r"\.^$|?*+()[]{}" else c for c in text)


def rank(origin: Column, is_final: Column) -> Column:
    """``ops.source_rank``."""
    expr = F.when(origin == "ws", F.when(is_final, WS_FINAL_RANK).otherwise(WS_PARTIAL_RANK))
    for name, value in ORIGIN_RANK.items():
        expr = expr.when(origin == name, value)
    return expr


def source(origin: Column, is_final: Column) -> Column:
    """``ops.silver_source``."""
    return F.when(
        origin == "ws", F.when(is_final, F.lit("ws_final")).otherwise(F.lit("ws_partial"))
    ).otherwise(origin)


def silver(rows: DataFrame) -> DataFrame:
    """Exactly one row per exchange, pair and minute: the warehouse's choice."""
    cand = rows.where(
        (F.col("interval_seconds") == 60) & (F.col("interval_start") % 60_000 == 0)
    ).withColumn("rank", rank(F.col("origin"), F.col("is_final")))
    order = Window.partitionBy("exchange", "symbol", "interval_start").orderBy(
        F.col("rank").asc(),
        F.col("event_ts").desc(),
        F.col("ingestion_ts").desc(),
        F.col("close").desc(),
        F.col("high").desc(),
        F.col("low").asc(),
        F.col("open").asc(),
        F.col("volume").desc(),
        F.col("trade_count").desc_nulls_last(),
        F.col("quote_volume").desc_nulls_last(),
        F.col("vwap").desc_nulls_last(),
        F.col("session_id").desc_nulls_last(),
        F.col("lake_key").desc_nulls_last(),
    )
    best = cand.withColumn("_n", F.row_number().over(order)).where(F.col("_n") == 1)
    return best.select(
        "exchange",
        "symbol",
        F.split("symbol", "/").getItem(1).alias("quote_asset"),
        F.lit(60).alias("interval_seconds"),
        _ts(F.col("interval_start")).alias("interval_start"),
        _ts(F.col("interval_start") + 60_000).alias("interval_end"),
        *NUMBERS[:5],
        "quote_volume",
        "trade_count",
        "vwap",
        source(F.col("origin"), F.col("is_final")).alias("source"),
        F.col("rank").cast("short").alias("rank"),
        _ts(F.col("event_ts")).alias("event_ts"),
        _ts(F.col("ingestion_ts")).alias("ingestion_ts"),
    )


def gold(silver_rows: DataFrame, seconds: int) -> DataFrame:
    """Buckets of ``seconds`` (UTC-aligned) from silver, by the warehouse's gold rules."""
    ms = F.unix_millis("interval_start")
    traded = (F.col("source") != "no_trades") & (
        F.col("trade_count").isNull() | (F.col("trade_count") != 0)
    )
    pair = Window.partitionBy("exchange", "symbol").orderBy("interval_start")
    minutes = silver_rows.select(
        "exchange",
        "symbol",
        "interval_start",
        *NUMBERS[:5],
        "quote_volume",
        "trade_count",
        traded.alias("traded"),
        (ms - ms % (seconds * 1000)).alias("bucket"),
        # the close of the last traded minute at or before this one (null before the first)
        F.last(F.when(traded, F.col("close")), ignorenulls=True)
        .over(pair.rowsBetween(Window.unboundedPreceding, Window.currentRow))
        .alias("carry"),
    )
    t = F.col("traded")
    at = F.col("interval_start")
    agg = minutes.groupBy("exchange", "symbol", "bucket").agg(
        F.count(F.lit(1)).alias("minutes"),
        F.count(F.when(t, 1)).alias("traded_minutes"),
        F.min(F.when(t, F.struct(at, F.col("open")))).getField("open").alias("t_open"),
        F.max(F.when(t, F.struct(at, F.col("close")))).getField("close").alias("t_close"),
        F.max(F.when(t, F.col("high"))).alias("t_high"),
        F.min(F.when(t, F.col("low"))).alias("t_low"),
        F.sum("volume").alias("volume"),
        F.when(
            F.count(F.when(t & F.col("quote_volume").isNull(), 1)) == 0,
            F.coalesce(F.sum("quote_volume"), F.lit(0).cast(NUMBER)),
        ).alias("quote_volume"),
        F.when(
            F.count(F.when(t & F.col("trade_count").isNull(), 1)) == 0,
            F.coalesce(F.sum("trade_count"), F.lit(0).cast("long")),
        ).alias("trade_count"),
        F.min("carry").alias("carry"),
        F.min(F.struct(at, F.col("open"))).getField("open").alias("first_open"),
    )
    flat = F.when(F.col("traded_minutes") == 0, F.coalesce("carry", "first_open"))
    return agg.select(
        "exchange",
        "symbol",
        _ts(F.col("bucket")).alias("interval_start"),
        _ts(F.col("bucket") + seconds * 1000).alias("interval_end"),
        *(F.coalesce(f"t_{p}", flat).cast(NUMBER).alias(p) for p in PRICES),
        F.col("volume").cast(NUMBER).alias("volume"),
        F.col("quote_volume").cast(NUMBER).alias("quote_volume"),
        "trade_count",
        F.col("minutes").cast("short").alias("minutes"),
        F.col("traded_minutes").cast("short").alias("traded_minutes"),
        F.lit("derived").alias("source"),
    )
