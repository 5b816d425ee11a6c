"""The chain's ``publish`` step: the days whose silver or gold changed, as Parquet datasets.

Next to the raw lake, and under the same prefix in its S3 bucket::

    <lake root>/datasets/ohlcv_1m/exchange=binance/year=2026/month=11/day=26/candles.parquet
    <lake root>/datasets/ohlcv_5m/...   ohlcv_15m, ohlcv_30m, ohlcv_1h, ohlcv_4h, ohlcv_1d

One file per dataset, exchange and UTC day (no small files), holding the whole day as the
warehouse has it (partial minutes included, marked by ``source``; the columns are those of
:mod:`klined.datasets.schema`). A day whose rows changed is written again under the same name,
complete, and put in place in one step (:mod:`klined.datasets.targets`): a reader sees the
previous version of the day or the new one, never half a day, never a day twice. The S3 copy is
uploaded after the local file is in place (a PUT replaces the object whole).

The work queue is ``ops.publish_dirty``, marked by the gold refresh in the same transaction as
the rows it changed; a day's mark is cleared (unless marked again meanwhile) only once its file
is written and mirrored, so a crash or an S3 outage only delays a day. A day whose new file is
byte for byte the one in place is not rewritten nor uploaded again. ``ops.published`` lists
what was written (rows, bytes, SHA-256, S3 key).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from loguru import logger

from klined.config import Config
from klined.datasets.export import write_partition
from klined.datasets.schema import Dataset
from klined.datasets.targets import LocalTarget, S3Target
from klined.errors import DatasetError
from klined.model import DAY_MS, from_datetime, iso, to_datetime
from klined.warehouse.database import Database

STEP = "publish"
#: the datasets root, under the lake root (and the S3 prefix)
ROOT = "datasets"
FILE = "candles.parquet"


def dataset_path(dataset: str, exchange: str, day_ms: int) -> str:
    """``ohlcv_1m/exchange=E/year=YYYY/month=MM/day=DD/candles.parquet``."""
    t = time.gmtime(day_ms // 1000)
    return (
        f"{dataset}/exchange={exchange}/year={t.tm_year:04d}/month={t.tm_mon:02d}"
        f"/day={t.tm_mday:02d}/{FILE}"
    )


def datasets_root(cfg: Config) -> Path:
    return cfg.lake_root / ROOT


def _mirror(cfg: Config) -> S3Target | None:
    if not cfg.s3.bucket:
        return None
    prefix = f"{cfg.s3.prefix}/{ROOT}" if cfg.s3.prefix else ROOT
    return S3Target(cfg.s3.bucket, prefix, cfg.s3, datasets_root(cfg) / ".scratch")


async def mark_days(
    db: Database,
    datasets: Iterable[str],
    exchanges: Iterable[str],
    start_ms: int,
    end_ms: int,
) -> int:
    """Queue the days of ``[start_ms, end_ms)`` for publishing (to publish history, or again);
    return how many marks were made."""
    first = start_ms - start_ms % DAY_MS
    days = [to_datetime(d).date() for d in range(first, end_ms, DAY_MS)]
    rows = await db.fetch(
        "INSERT INTO ops.publish_dirty AS d (dataset, exchange, day)"
        " SELECT ds, ex, day FROM unnest($1::text[]) ds, unnest($2::text[]) ex,"
        "   unnest($3::date[]) day"
        " ON CONFLICT (dataset, exchange, day) DO UPDATE"
        "   SET marked_at = now(), seq = nextval('ops.publish_seq')"
        " RETURNING 1",
        list(datasets),
        list(exchanges),
        days,
    )
    return len(rows)


async def _published(db: Database, dataset: str, exchange: str, day: Any) -> Any:
    return await db.fetchrow(
        "SELECT sha256, s3_key FROM ops.published WHERE dataset = $1 AND exchange = $2"
        " AND day = $3",
        dataset,
        exchange,
        day,
    )


async def publish_day(
    db: Database,
    cfg: Config,
    dataset: str,
    exchange: str,
    day_ms: int,
    *,
    local: LocalTarget,
    mirror: S3Target | None,
) -> tuple[str, int]:
    """Write one day's file (and mirror it); ``("written"|"unchanged"|"removed"|"empty",
    rows)``."""
    ds = Dataset(dataset.removeprefix("ohlcv_"))
    rel = dataset_path(dataset, exchange, day_ms)
    day = to_datetime(day_ms).date()
    before = await _published(db, dataset, exchange, day)
    sql = ds.select(pairs=False, final_only=False)
    args = [exchange, to_datetime(day_ms), to_datetime(day_ms + DAY_MS)]
    done = await write_partition(
        db, local, ds, "parquet", sql, args, rel, where=f"{exchange} {dataset} {iso(day_ms)}",
        unless_sha256=before["sha256"] if before else None,
    )  # fmt: skip
    if not done.rows:
        if mirror is not None and before is not None and before["s3_key"]:
            await mirror.remove(rel)
        await db.execute(
            "DELETE FROM ops.published WHERE dataset = $1 AND exchange = $2 AND day = $3",
            dataset,
            exchange,
            day,
        )
        return ("removed" if before is not None else "empty"), 0
    same = not done.replaced
    s3_key = before["s3_key"] if (same and before is not None) else None
    if mirror is not None and s3_key is None:
        s3_key = await mirror.mirror(rel, local.root / rel)
    await db.execute(
        "INSERT INTO ops.published AS p (dataset, exchange, day, path, rows, bytes, sha256, s3_key)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        " ON CONFLICT (dataset, exchange, day) DO UPDATE"
        "   SET path = EXCLUDED.path, rows = EXCLUDED.rows, bytes = EXCLUDED.bytes,"
        "       sha256 = EXCLUDED.sha256, s3_key = EXCLUDED.s3_key, published_at = now()"
        "   WHERE (p.sha256, p.s3_key) IS DISTINCT FROM (EXCLUDED.sha256, EXCLUDED.s3_key)",
        dataset,
        exchange,
        day,
        rel,
        done.rows,
        done.bytes,
        done.sha256,
        s3_key,
    )
    return ("unchanged" if same else "written"), done.rows


@dataclass(slots=True)
class PublishReport:
    """What a publish did: rows written, and per outcome how many days."""

    rows: int = 0
    days: int = 0
    written: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: int = 0

    def details(self) -> dict[str, int]:
        return {
            "days": self.days,
            "written": self.written,
            "unchanged": self.unchanged,
            "removed": self.removed,
            "failed": self.failed,
        }


async def publish(
    db: Database,
    cfg: Config,
    *,
    limit: int | None = None,
    retry_attempts: int | None = None,
) -> PublishReport:
    """Publish every queued day (oldest first; at most ``limit``); see the module docstring.

    A day that fails stays queued; after trying the others the call raises
    :class:`DatasetError` naming it. ``retry_attempts`` bounds each S3 call's tries.
    """
    wanted = [f"ohlcv_{i}" for i in cfg.publish.intervals]
    queue = await db.fetch(
        "SELECT dataset, exchange, day, seq FROM ops.publish_dirty"
        " WHERE dataset = ANY($1::text[]) ORDER BY day, dataset, exchange"
        + (f" LIMIT {int(limit)}" if limit else ""),
        wanted,
    )
    local = LocalTarget(datasets_root(cfg))
    mirror = _mirror(cfg)
    if mirror is not None and retry_attempts is not None:
        mirror.store.attempts = max(1, retry_attempts)
    report = PublishReport(days=len(queue))
    errors: list[str] = []
    for item in queue:
        day_ms = from_datetime(_midnight(item["day"]))
        what = f"{item['dataset']} {item['exchange']} {iso(day_ms)[:10]}"
        try:
            outcome, n = await publish_day(
                db, cfg, item["dataset"], item["exchange"], day_ms, local=local, mirror=mirror
            )
        except DatasetError as exc:
            report.failed += 1
            errors.append(f"{what}: {exc}")
            logger.error("publish {}: {}", what, exc)
            continue
        if outcome == "written":
            report.written += 1
            report.rows += n
        elif outcome == "unchanged":
            report.unchanged += 1
        elif outcome == "removed":
            report.removed += 1
        await db.execute(
            "DELETE FROM ops.publish_dirty WHERE dataset = $1 AND exchange = $2 AND day = $3"
            " AND seq <= $4",
            item["dataset"],
            item["exchange"],
            item["day"],
            item["seq"],
        )
    if errors:
        raise DatasetError(
            f"{len(errors)} of {len(queue)} day(s) not published (kept queued): {errors[0]}"
        )
    return report


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)
