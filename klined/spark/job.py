"""The Spark job: the raw lake for a range -> silver 1m and gold as Parquet datasets.

Reads every sealed part (``part-*.jsonl`` and gzip ``part-*.jsonl.gz``) of the range's hour
folders under ``--lake``, a local path or ``s3a://bucket/prefix``, and writes::

    <out>/silver/ohlcv_1m/exchange=E/date=YYYY-MM-DD/part-*.parquet
    <out>/gold/ohlcv_5m/...  (every gold interval of the warehouse)

with the warehouse's precedence, tie-breaks and gold rules (:mod:`klined.spark.rules`). A
re-run of a range replaces exactly the partitions (exchange, day) it writes (dynamic partition
overwrite), so it is idempotent; ranges should be whole UTC days when their days are partly
written by another run. Prints one JSON line: rows per dataset, parts read, seconds.

On a cluster (EMR, Dataproc, Databricks)::

    spark-submit --master yarn $(python -c 'import klined.spark.job as j; print(j.__file__)') \\
        --lake s3a://my-klined-lake/raw --from 2026-10-01 --to 2026-11-01 \\
        --out s3a://my-klined-lake/spark

``s3a://`` needs the ``hadoop-aws`` connector (and its AWS SDK) on the classpath: EMR, Dataproc
and Databricks ship it; elsewhere add ``--packages org.apache.hadoop:hadoop-aws:<the cluster's
Hadoop version>``. Credentials come from the cluster (instance role, or the usual
``fs.s3a.*`` settings); klined passes none. Locally, ``--master 'local[2]'`` runs it in this
process against local folders.

Rows filed under another hour's folder than their own (klined never writes such parts) are
read only when their folder is in the range; the warehouse loads them with that folder too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from klined.model import DAY_MS, HOUR_MS, floor_hour, hours_between, iso, parse_time

#: the datasets the job writes, under ``--out``
SILVER_DATASET = "silver/ohlcv_1m"


def gold_dataset(name: str) -> str:
    return f"gold/ohlcv_{name}"


def day_globs(root: str, start_ms: int, end_ms: int) -> list[str]:
    """One Hadoop glob per UTC day of ``[start_ms, end_ms)``: its hour folders in the range,
    every pair's sealed parts (plain and gzip; never ``.open``, ``.tmp`` or markers)."""
    by_day: dict[int, list[int]] = {}
    for hour in hours_between(start_ms, end_ms):
        by_day.setdefault(hour - hour % DAY_MS, []).append(hour)
    out = []
    base = root.rstrip("/")
    for day, hours in sorted(by_day.items()):
        t = time.gmtime(day // 1000)
        hh = ",".join(f"{time.gmtime(h // 1000).tm_hour:02d}" for h in hours)
        out.append(
            f"{base}/exchange=*/symbol=*/interval_minutes=1/year={t.tm_year:04d}"
            f"/month={t.tm_mon:02d}/day={t.tm_mday:02d}/hour={{{hh}}}/part-*.{{jsonl,jsonl.gz}}"
        )
    return out


def lake_files(spark: Any, root: str, start_ms: int, end_ms: int) -> list[str]:
    """The parts of the range, found with Hadoop's file system (local, ``s3a://``, ...)."""
    jvm = spark._jvm
    conf = spark._jsc.hadoopConfiguration()
    files: list[str] = []
    for pattern in day_globs(root, start_ms, end_ms):
        path = jvm.org.apache.hadoop.fs.Path(pattern)
        found = path.getFileSystem(conf).globStatus(path)
        if found:
            files += [str(st.getPath().toString()) for st in found if st.isFile()]
    return sorted(files)


def build(
    spark: Any, root: str, start_ms: int, end_ms: int, exchange: str | None = None
) -> tuple[Any, dict[str, Any], int]:
    """(silver, {gold name: DataFrame}, parts read) for the range, not yet written."""
    from pyspark.sql import functions as F

    from klined.spark import rules

    files = lake_files(spark, root, start_ms, end_ms)
    if not files:
        return None, {}, 0
    lines = spark.read.text(files).select("value", F.col("_metadata.file_path").alias("path"))
    rows = rules.bronze(lines, root).where(
        (F.col("interval_start") >= start_ms) & (F.col("interval_start") < end_ms)
    )
    if exchange:
        rows = rows.where(F.col("exchange") == exchange)
    silver = rules.silver(rows).cache()
    gold = {name: rules.gold(silver, seconds) for name, seconds in rules.GOLD_INTERVALS}
    return silver, gold, len(files)


def write(df: Any, path: str) -> int:
    """Write a dataset partitioned by exchange and UTC day (replacing just those); its rows."""
    from pyspark.sql import functions as F

    out = df.withColumn("date", F.date_format("interval_start", "yyyy-MM-dd")).cache()
    out.write.mode("overwrite").partitionBy("exchange", "date").parquet(path)
    rows = int(out.count())
    out.unpersist()
    return rows


def session(
    master: str | None = None, app: str = "klined", shuffle_partitions: int | None = None
) -> Any:
    """The job's session: UTC, dynamic partition overwrite. In local mode (``local[...]``)
    a few shuffle partitions instead of Spark's 200 (one machine's cores, small data)."""
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app)
    if master:
        builder = builder.master(master)
        if master.startswith("local") and shuffle_partitions is None:
            shuffle_partitions = 4
            builder = builder.config("spark.ui.enabled", "false")
    if shuffle_partitions:
        builder = builder.config("spark.sql.shuffle.partitions", str(shuffle_partitions))
    spark = (
        builder.config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.sources.partitionOverwriteMode", "dynamic")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("WARN")
    return spark


def run(
    spark: Any, root: str, start_ms: int, end_ms: int, out: str, exchange: str | None = None
) -> dict[str, object]:
    """Build and write the range; the figures printed as the job's JSON line."""
    started = time.monotonic()
    if "://" not in root:
        root = os.path.abspath(root)  # a local folder: the files' URIs carry its full path
    silver, gold, parts = build(spark, root, start_ms, end_ms, exchange)
    figures: dict[str, object] = {"from": iso(start_ms), "to": iso(end_ms), "parts": parts}
    if silver is not None:
        figures["silver_1m"] = write(silver, f"{out.rstrip('/')}/{SILVER_DATASET}")
        for name, df in gold.items():
            figures[f"gold_{name}"] = write(df, f"{out.rstrip('/')}/{gold_dataset(name)}")
        silver.unpersist()
    figures["seconds"] = round(time.monotonic() - started, 2)
    return figures


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="klined.spark", description="Rebuild silver and gold from the raw lake with Spark."
    )
    p.add_argument("--lake", required=True, help="lake root: a path or s3a://bucket/prefix")
    p.add_argument("--from", dest="start", required=True, help="start (date or UTC time)")
    p.add_argument("--to", dest="end", required=True, help="end, exclusive")
    p.add_argument("--out", required=True, help="where the Parquet datasets go")
    p.add_argument("--exchange", default=None, help="only this exchange")
    p.add_argument("--master", default=None, help="e.g. 'local[2]' (default: spark-submit's)")
    p.add_argument(
        "--shuffle-partitions", type=int, default=None, help="default: 4 locally, else Spark's"
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        start, end = parse_time(args.start), parse_time(args.end)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start, end = floor_hour(start), -(-end // HOUR_MS) * HOUR_MS
    if end <= start:
        print("error: empty or reversed range", file=sys.stderr)
        return 2
    spark = session(args.master, shuffle_partitions=args.shuffle_partitions)
    try:
        figures = run(spark, args.lake, start, end, args.out, args.exchange)
    finally:
        spark.stop()
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":  # spark-submit .../klined/spark/job.py
    sys.exit(main())
