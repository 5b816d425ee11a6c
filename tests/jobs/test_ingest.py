"""Rows that did not come from a stream: lake first (sealed parts, uploaded), then bronze
through the ledger, each exactly once; a failure in between loses nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from klined.config import S3Config
from klined.errors import LakeError
from klined.jobs import bronze
from klined.jobs.ingest import LakeIngest
from klined.lake import LakeStore, LakeUploader, iter_local_parts
from klined.model import HOUR_MS, MINUTE_MS, Candle
from klined.warehouse.database import Database
from tests.fixtures.s3 import free_port
from tests.lake.test_s3 import FAST, objects
from tests.lake.test_writer import config
from tests.support.warehouse import H0, candle, warehouse_dsn, wdb

__all__ = ["warehouse_dsn", "wdb"]

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def rest(minute: int, price: str = "10") -> Candle:
    return candle(minute, origin="rest", price=price)


async def ledger(db: Database) -> dict[str, int]:
    rows = await db.fetch("SELECT lake_key, rows FROM ops.lake_parts")
    return {r["lake_key"]: r["rows"] for r in rows}


async def test_rows_enter_the_lake_then_bronze_once(wdb: Database, tmp_path: Path) -> None:
    ingest = LakeIngest(wdb, LakeStore(tmp_path))
    rows = [rest(H0 + i * MINUTE_MS) for i in range(5)] + [rest(H0 + 61 * MINUTE_MS)]
    assert await ingest.rows(rows, reason="gapfill") == 6
    parts = {p.key: p for p in iter_local_parts(tmp_path)}
    assert len(parts) == 2 and all("-fill_" in k for k in parts)
    assert await ledger(wdb) == {k: n for k, n in zip(sorted(parts), (5, 1), strict=True)}
    keys = await wdb.fetch("SELECT DISTINCT lake_key FROM bronze.bronze_ohlcv_native")
    assert {r["lake_key"] for r in keys} == set(parts)
    dirty = await wdb.fetch("SELECT reason FROM ops.dirty_hours")
    assert {r["reason"] for r in dirty} == {"gapfill"}
    # the chain's bronze step finds the parts in the lake: already loaded, nothing twice
    result = await bronze.load_hour(wdb, H0, LakeStore(tmp_path))
    assert result.rows == 0 and result.details["parts_skipped"] == 1
    assert await wdb.fetchval("SELECT count(*) FROM bronze.bronze_ohlcv_native") == 6


async def test_a_bad_row_writes_nothing(wdb: Database, tmp_path: Path) -> None:
    bad = msgspec.structs.replace(rest(H0 + MINUTE_MS), close="NaN")
    with pytest.raises(ValueError, match="close"):
        await LakeIngest(wdb, LakeStore(tmp_path)).rows([rest(H0), bad], reason="gapfill")
    assert list(iter_local_parts(tmp_path)) == []
    assert await ledger(wdb) == {}


async def test_s3_down_leaves_the_parts_sealed_for_the_next_flush_and_bronze(
    wdb: Database, tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    down = S3Config(bucket=s3_bucket, endpoint_url=f"http://127.0.0.1:{free_port()}")
    ingest = LakeIngest(wdb, LakeUploader(tmp_path, config(), down, **FAST))
    with pytest.raises(LakeError):
        await ingest.rows([rest(H0), rest(H0 + MINUTE_MS)], reason="backfill")
    assert await ledger(wdb) == {}  # not in bronze before it is in S3
    [part] = list(iter_local_parts(tmp_path))

    up = LakeUploader(tmp_path, config(), S3Config(bucket=s3_bucket, endpoint_url=s3_endpoint))
    report = await up.upload_pending(H0)  # the chain's flush step
    assert report.uploaded == 1 and list(objects(s3_endpoint, s3_bucket)) == [part.key]
    result = await bronze.load_hour(wdb, H0, up)  # and its bronze step
    assert result.rows == 2 and await ledger(wdb) == {part.key: 2}


async def test_staged_parts_load_in_batches_with_the_finish_in_the_last(
    wdb: Database, tmp_path: Path
) -> None:
    ingest = LakeIngest(wdb, LakeStore(tmp_path), tag="archive_")
    rows = [rest(H0 + h * HOUR_MS + i * MINUTE_MS) for h in range(3) for i in range(2)]
    staged = ingest.staging()
    staged.stage(rows[:2])
    staged.stage(rows[2:])
    staged.publish()
    seen: list[int] = []

    async def finish(conn: Any) -> None:  # inside the last transaction, after its rows
        seen.append(await conn.fetchval("SELECT count(*) FROM bronze.bronze_ohlcv_native"))

    assert await ingest.load(staged.parts, reason="archive", hours_per_batch=2, finish=finish) == 6
    assert seen == [6]
    batches = await wdb.fetch(
        "SELECT xmin::text AS x, count(*) AS n FROM ops.lake_parts GROUP BY 1 ORDER BY 2"
    )
    assert [r["n"] for r in batches] == [1, 2]  # two hours, then the third with the finish
    # every hour marked for the chain, with the reason given
    start = await wdb.fetchval("SELECT min(hour_start) FROM ops.lake_parts")
    dirty = await wdb.fetch("SELECT DISTINCT hour_start, reason FROM ops.dirty_hours")
    assert len(dirty) == 3 and {r["reason"] for r in dirty} == {"archive"}
    assert min(r["hour_start"] for r in dirty) == start

    # a finish that fails takes its batch's rows with it; the batches before stay
    again = ingest.staging()
    again.stage([rest(H0 + h * HOUR_MS + 30 * MINUTE_MS) for h in range(3)])
    again.publish()

    async def fail(conn: Any) -> None:
        raise RuntimeError("the ledger refused")

    with pytest.raises(RuntimeError):
        await ingest.load(again.parts, reason="archive", hours_per_batch=2, finish=fail)
    assert await wdb.fetchval("SELECT count(*) FROM bronze.bronze_ohlcv_native") == 8
    # nothing staged at all: the finish still runs, in a transaction of its own
    assert await ingest.load([], reason="archive", finish=finish) == 0
    assert seen == [6, 8]
