"""Parts written whole (gap-fill rows), listing a range of the lake, uploading named parts."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from klined.config import S3Config
from klined.errors import LakeError
from klined.lake import LakeStore, LakeUploader, iter_local_parts, parse_key, read_part_file
from klined.lake.sealed import SealedPartWriter, StagedParts
from klined.model import HOUR_MS, MINUTE_MS, Candle, Origin
from tests.lake.test_s3 import FAST, objects
from tests.lake.test_writer import HOUR, candle, config


def rest_rows(hour: int, symbol: str = "BTC/USD", n: int = 3) -> list[Candle]:
    return [
        msgspec.structs.replace(
            candle(i + 1, hour + i * MINUTE_MS, symbol=symbol), origin=Origin.REST, is_final=True
        )
        for i in range(n)
    ]


def test_sealed_parts_are_whole_tagged_and_one_per_pair_hour(tmp_path: Path) -> None:
    writer = SealedPartWriter(tmp_path, tag="fill_")
    rows = rest_rows(HOUR) + rest_rows(HOUR + HOUR_MS) + rest_rows(HOUR, "ETH/USD", 2)
    written = writer.write(rows)
    assert [(p.symbol, p.hour_ms, p.rows) for p in written] == [
        ("BTC/USD", HOUR, 3), ("BTC/USD", HOUR + HOUR_MS, 3), ("ETH/USD", HOUR, 2),
    ]  # fmt: skip
    assert all(f"-{writer.writer_id}-" in p.key and "-fill_" in p.key for p in written)
    local = {p.key: p for p in iter_local_parts(tmp_path)}
    assert set(local) == {p.key for p in written}
    for p in written:
        assert parse_key(p.key).hour_ms == p.hour_ms
        records = read_part_file(local[p.key].path).records
        assert len(records) == p.rows and {r.origin for r in records} == {"rest"}
    assert not list(tmp_path.rglob("*.writing"))
    assert all(p.key.endswith(".jsonl.gz") for p in written)  # sealed parts are gzip
    # a second batch never reuses a name
    again = writer.write(rest_rows(HOUR))
    assert again[0].key not in local


def test_a_bad_tag_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LakeError):
        SealedPartWriter(tmp_path, tag="no/slash")


@pytest.mark.anyio
async def test_list_range_unites_local_and_s3(
    tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    s3 = S3Config(bucket=s3_bucket, endpoint_url=s3_endpoint, prefix="raw")
    here, there = tmp_path / "here", tmp_path / "there"
    hours = [HOUR - 2 * HOUR_MS, HOUR, HOUR + HOUR_MS, HOUR + 30 * HOUR_MS]  # two UTC days
    remote = LakeUploader(there, config(), s3, **FAST)
    written = SealedPartWriter(there).write([r for h in hours for r in rest_rows(h)])
    report = await remote.upload([(p.key, p.size) for p in written])
    assert report.uploaded == len(written) and not report.failed
    assert len(objects(s3_endpoint, s3_bucket)) == len(written)
    again = await remote.upload([(p.key, p.size) for p in written])
    assert again.uploaded == 0  # verified already: nothing sent twice
    local = SealedPartWriter(here).write(rest_rows(HOUR, "ETH/USD"))

    lake = LakeStore(here, s3, **FAST)
    got = await lake.list_range(HOUR, HOUR + 31 * HOUR_MS)
    want = {p.key for p in written if p.hour_ms >= HOUR} | {p.key for p in local}
    assert {r.key for r in got} == want
    by_key = {r.key: r for r in got}
    assert all(by_key[p.key].local_path for p in local)
    assert all(by_key[p.key].s3_key == f"raw/{p.key}" for p in written if p.hour_ms >= HOUR)
    only_first = await lake.list_range(HOUR, HOUR + HOUR_MS, exchange="binance")
    assert {parse_key(r.key).hour_ms for r in only_first} == {HOUR}
    assert await LakeStore(here).list_range(HOUR + HOUR_MS, HOUR + HOUR_MS) == []


def test_staged_parts_appear_together_or_not_at_all(tmp_path: Path) -> None:
    writer = SealedPartWriter(tmp_path, tag="archive_")
    staged = StagedParts(writer)
    staged.stage(rest_rows(HOUR) + rest_rows(HOUR + HOUR_MS))
    staged.stage(rest_rows(HOUR + 2 * HOUR_MS, "ETH/USD"))
    assert len(staged.parts) == 3 and list(iter_local_parts(tmp_path)) == []
    assert len(list(tmp_path.rglob("*.writing"))) == 3
    assert staged.publish() == staged.parts
    assert {p.key for p in iter_local_parts(tmp_path)} == {p.key for p in staged.parts}
    assert not list(tmp_path.rglob("*.writing"))
    assert all("-archive_" in p.key for p in staged.parts)
    with pytest.raises(LakeError):
        staged.stage(rest_rows(HOUR))  # a published group is closed

    dropped = StagedParts(SealedPartWriter(tmp_path / "other"))
    dropped.stage(rest_rows(HOUR) + rest_rows(HOUR + HOUR_MS))
    dropped.discard()
    assert dropped.parts == [] and list((tmp_path / "other").rglob("*")) == []  # folders too
