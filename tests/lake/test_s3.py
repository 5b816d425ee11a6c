"""The S3 mirror against a real S3 API (moto over HTTP): verified, idempotent, patient."""

from __future__ import annotations

import base64
import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import boto3
import pytest

from klined.config import S3Config
from klined.errors import LakeError
from klined.lake import (
    UPLOADED_SUFFIX,
    LakeUploader,
    LakeWriter,
    hour_dir,
    iter_local_parts,
    parse_key,
    read_part,
)
from klined.model import HOUR_MS, MINUTE_MS, floor_hour
from klined.status import LakeStatus
from tests.fixtures.s3 import free_port
from tests.lake.test_writer import HOUR, FakeClock, candle, config, identity, wait_until

FAST = {
    "attempts": 2,
    "backoff_initial_s": 0.01,
    "backoff_max_s": 0.05,
    "op_timeout_s": 10.0,
    "connect_timeout_s": 2.0,
}


def s3_client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    s3 = s3_client(endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


async def write_parts(root: Path, hours: list[int], per_hour: int = 30) -> Counter[tuple]:
    """Sealed parts for two pairs in each hour; returns the events written."""
    writer = LakeWriter(root, config(), clock=FakeClock(max(hours) + 3 * HOUR_MS))
    sent: Counter[tuple] = Counter()
    seq = 0
    for hour in hours:
        for i in range(per_hour):
            for symbol in ("BTC/USD", "ETH/USD"):
                seq += 1
                c = candle(seq, hour + (i % 60) * MINUTE_MS, symbol=symbol)
                writer.append(c)
                sent[identity(c.exchange, c.symbol, c.interval_start, c.event_ts)] += 1
    await writer.aclose()
    return sent


def markers(root: Path) -> list[Path]:
    return list(root.rglob("*" + UPLOADED_SUFFIX))


def events_in(blobs: list[bytes]) -> Counter[tuple]:
    seen: Counter[tuple] = Counter()
    for blob in blobs:
        contents = read_part(blob)
        assert contents.bad_lines == 0
        for r in contents.records:
            seen[identity(r.exchange, r.symbol, r.interval_start, r.event_ts)] += 1
    return seen


@pytest.mark.anyio
async def test_upload_is_verified_and_idempotent(
    tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    sent = await write_parts(tmp_path, [HOUR, HOUR + HOUR_MS])
    s3cfg = S3Config(bucket=s3_bucket, prefix="lake/v1", endpoint_url=s3_endpoint)
    status = LakeStatus()
    uploader = LakeUploader(tmp_path, config(), s3cfg, status=status, **FAST)
    assert status.s3_enabled

    report = await uploader.upload_pending(HOUR)
    assert (report.parts, report.uploaded, report.already_present) == (2, 2, 0)
    assert uploader.pending == []  # the other hour was only picked up for its own call
    report = await uploader.upload_pending()
    assert (report.parts, report.uploaded) == (2, 2)
    assert status.uploaded_parts == 4 and status.pending_upload_parts == 0

    stored = objects(s3_endpoint, s3_bucket)
    local = {p.key: p.path.read_bytes() for p in iter_local_parts(tmp_path)}
    assert stored == {f"lake/v1/{k}": v for k, v in local.items()}
    # sealed parts are gzip; the objects are those bytes, as stored, not unzipped on the way
    assert all(k.endswith(".jsonl.gz") and v[:2] == b"\x1f\x8b" for k, v in stored.items())
    assert events_in(list(stored.values())) == sent
    first = next(iter(stored))
    head = s3_client(s3_endpoint).head_object(Bucket=s3_bucket, Key=first, ChecksumMode="ENABLED")
    assert head["ContentType"] == "application/gzip" and "ContentEncoding" not in head
    assert head["ETag"].strip('"') == hashlib.md5(stored[first]).hexdigest()
    sha = base64.b64encode(hashlib.sha256(stored[first]).digest()).decode()
    assert head["ChecksumSHA256"] == sha

    # a restart finds the markers and uploads nothing
    again = LakeUploader(tmp_path, config(), s3cfg, **FAST)
    report = await again.upload_pending()
    assert (report.parts, report.uploaded, report.already_present) == (0, 0, 0)

    # without markers, the identical objects already in S3 are recognised, not re-sent
    for part in iter_local_parts(tmp_path):
        part.path.with_name(part.path.name + UPLOADED_SUFFIX).unlink()
    fresh = LakeUploader(tmp_path, config(), s3cfg, **FAST)
    report = await fresh.upload_pending()
    assert (report.parts, report.uploaded, report.already_present) == (4, 0, 4)
    assert objects(s3_endpoint, s3_bucket) == stored


@pytest.mark.anyio
async def test_different_content_under_the_key_is_never_overwritten(
    tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    await write_parts(tmp_path, [HOUR])
    first, second = list(iter_local_parts(tmp_path))
    s3 = s3_client(s3_endpoint)
    s3.put_object(Bucket=s3_bucket, Key=first.key, Body=b"someone else's bytes\n")
    status = LakeStatus()
    uploader = LakeUploader(
        tmp_path, config(), S3Config(bucket=s3_bucket, endpoint_url=s3_endpoint), status=status
    )
    uploader.attempts = 1
    with pytest.raises(LakeError, match="different content"):
        await uploader.upload_pending(HOUR)
    assert uploader.pending == [first.key]
    assert "different content" in status.last_upload_error
    assert s3.get_object(Bucket=s3_bucket, Key=first.key)["Body"].read() == (
        b"someone else's bytes\n"
    )
    assert s3.get_object(Bucket=s3_bucket, Key=second.key)["Body"].read() == (
        second.path.read_bytes()
    )


@pytest.mark.anyio
async def test_list_parts_unites_local_and_s3_and_reads_either(
    tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    sent = await write_parts(tmp_path, [HOUR])
    s3cfg = S3Config(bucket=s3_bucket, prefix="pfx", endpoint_url=s3_endpoint)
    clock = FakeClock(HOUR + 5 * HOUR_MS)
    uploader = LakeUploader(tmp_path, config(retention_hours=0), s3cfg, clock=clock, **FAST)
    await uploader.upload_pending(HOUR)
    assert await uploader.apply_retention() == 2  # now only in S3
    later = await write_parts(tmp_path, [HOUR], per_hour=5)  # a late part, only local
    sent.update(later)
    # an object of another hour and a foreign object do not belong to the listing
    s3 = s3_client(s3_endpoint)
    s3.put_object(Bucket=s3_bucket, Key="pfx/README.txt", Body=b"hello")
    await write_parts(tmp_path / "other", [HOUR + HOUR_MS])

    refs = await uploader.list_parts(HOUR)
    assert len(refs) == 4
    assert sum(1 for r in refs if r.local_path and not r.s3_key) == 2
    assert sum(1 for r in refs if r.s3_key and not r.local_path) == 2
    assert all(r.hour_ms == HOUR and r.exchange == "binance" for r in refs)
    assert {r.symbol for r in refs} == {"BTC/USD", "ETH/USD"}
    assert [r.key for r in refs] == sorted(r.key for r in refs)
    blobs = [await uploader.read_part_bytes(r) for r in refs]
    assert events_in(blobs) == sent
    assert await uploader.list_parts(HOUR, exchange="kraken") == []
    assert len(await uploader.list_parts(HOUR, exchange="binance")) == 4

    # an S3 object that does not match its listing is refused
    ref = next(r for r in refs if r.s3_key)
    s3.put_object(Bucket=s3_bucket, Key=ref.s3_key, Body=b"x" * ref.size)
    with pytest.raises(LakeError, match="ETag"):
        await uploader.read_part_bytes(ref)


@pytest.mark.anyio
async def test_retention_deletes_only_verified_uploads(
    tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    await write_parts(tmp_path, [HOUR, HOUR + HOUR_MS])
    clock = FakeClock(HOUR + 3 * HOUR_MS)
    uploader = LakeUploader(
        tmp_path,
        config(retention_hours=1),
        S3Config(bucket=s3_bucket, endpoint_url=s3_endpoint),
        clock=clock,
        **FAST,
    )
    await uploader.upload_pending(HOUR)
    await uploader.rescan()
    assert len(uploader.pending) == 2  # the second hour is known but not uploaded
    clock.now += 59 * MINUTE_MS
    assert await uploader.apply_retention() == 0
    clock.now += 2 * MINUTE_MS
    assert await uploader.apply_retention() == 2
    left = list(iter_local_parts(tmp_path))
    assert {p.key for p in left} == set(uploader.pending)
    assert all(parse_key(p.key).hour_ms == HOUR + HOUR_MS for p in left)
    assert not (tmp_path / hour_dir("binance", "BTC/USD", HOUR)).exists()  # emptied folders go
    assert markers(tmp_path) == []
    # a restart does not resurrect the deleted parts, nor delete the unuploaded ones
    again = LakeUploader(
        tmp_path,
        config(retention_hours=0),
        S3Config(bucket=s3_bucket, endpoint_url=s3_endpoint),
        clock=clock,
        **FAST,
    )
    await again.rescan()
    assert await again.apply_retention() == 0
    assert again.pending == uploader.pending


@pytest.mark.anyio
async def test_local_only_lake(tmp_path: Path) -> None:
    sent = await write_parts(tmp_path, [HOUR])
    status = LakeStatus()
    uploader = LakeUploader(tmp_path, config(retention_hours=0), S3Config(), status=status)
    assert not uploader.enabled and not status.s3_enabled
    report = await uploader.upload_pending(HOUR)
    assert not report.enabled and report.parts == 0
    assert await uploader.apply_retention() == 0
    uploader.part_closed(next(iter(iter_local_parts(tmp_path))).key, 10)
    assert uploader.pending == []
    async with anyio.create_task_group() as tg:
        await tg.start(uploader.run)  # a no-op loop
        tg.cancel_scope.cancel()
    refs = await uploader.list_parts(HOUR)
    assert len(refs) == 2 and all(r.local_path and not r.s3_key for r in refs)
    assert events_in([await uploader.read_part_bytes(r) for r in refs]) == sent
    (tmp_path / refs[0].key).unlink()
    with pytest.raises(LakeError, match="not configured"):
        await uploader.read_part_bytes(refs[0])


@pytest.mark.anyio
async def test_unreachable_s3_is_a_lake_error_and_parts_stay(tmp_path: Path) -> None:
    await write_parts(tmp_path, [HOUR])
    status = LakeStatus()
    s3cfg = S3Config(bucket="klined-nowhere", endpoint_url=f"http://127.0.0.1:{free_port()}")
    uploader = LakeUploader(tmp_path, config(), s3cfg, status=status, **FAST)
    with pytest.raises(LakeError, match="could not be uploaded"):
        await uploader.upload_pending(HOUR)
    assert len(uploader.pending) == 2
    assert status.pending_upload_parts == 2 and status.pending_upload_bytes > 0
    assert status.last_upload_error
    with pytest.raises(LakeError, match="S3 listing failed"):
        await uploader.list_parts(HOUR)
    assert len(list(iter_local_parts(tmp_path))) == 2


@pytest.mark.anyio
async def test_s3_outage_keeps_parts_and_uploads_them_on_return(tmp_path: Path) -> None:
    from moto.server import ThreadedMotoServer

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    bucket = "klined-outage"
    s3_client(endpoint).create_bucket(Bucket=bucket)
    status = LakeStatus()
    lake_cfg = config(flush_interval_s=0.02, part_max_age_s=0.1, upload_interval_s=0.05)
    uploader = LakeUploader(
        tmp_path,
        lake_cfg,
        S3Config(bucket=bucket, endpoint_url=endpoint),
        status=status,
        **FAST,
    )
    writer = LakeWriter(tmp_path, lake_cfg, status=status, on_part_closed=uploader.part_closed)
    hour = floor_hour(writer._clock())
    sent: Counter[tuple] = Counter()
    seq = 0

    def send(n: int) -> None:
        nonlocal seq
        for _ in range(n):
            seq += 1
            c = candle(seq, hour + (seq % 60) * MINUTE_MS, symbol=("BTC/USD", "SOL/USD")[seq % 2])
            writer.append(c)
            sent[identity(c.exchange, c.symbol, c.interval_start, c.event_ts)] += 1

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(uploader.run)
            await tg.start(writer.run)
            send(50)
            await wait_until(lambda: writer.parts_closed >= 2 and not uploader.pending)
            assert status.uploaded_parts >= 2

            server.stop()  # S3 goes away; capture goes on
            send(50)
            await wait_until(lambda: bool(status.last_upload_error) and len(uploader.pending) >= 2)
            send(50)
            await anyio.sleep(0.2)
            assert uploader.pending  # still waiting on disk

            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()
            await writer.aclose()
            await wait_until(lambda: not uploader.pending and not status.last_upload_error)
            tg.cancel_scope.cancel()
        assert status.pending_upload_parts == 0 and status.events_written == 150
        stored = objects(endpoint, bucket)
        assert len(stored) == writer.parts_closed
        assert events_in(list(stored.values())) == sent
    finally:
        server.stop()


@pytest.mark.anyio
async def test_listing_a_missing_bucket_is_a_lake_error(tmp_path: Path, s3_endpoint: str) -> None:
    s3cfg = S3Config(bucket="klined-no-such-bucket", endpoint_url=s3_endpoint)
    store = LakeUploader(tmp_path, config(), s3cfg, **FAST)
    for exchange in (None, "binance"):
        with pytest.raises(LakeError, match="S3 listing failed"):
            await store.list_parts(HOUR, exchange=exchange)


@pytest.mark.anyio
async def test_verification_finds_parts_s3_lost_and_uploads_them_again(
    tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    writer = LakeWriter(tmp_path, config(), clock=FakeClock(HOUR + 10 * MINUTE_MS))
    for i, symbol in enumerate(["BTC/USD", "ETH/USD", "SOL/USD"]):
        for hour in (HOUR - HOUR_MS, HOUR):
            writer.append(candle(i, hour + MINUTE_MS, symbol=symbol))
    await writer.flush(close_all=True)
    s3cfg = S3Config(bucket=s3_bucket, endpoint_url=s3_endpoint, prefix="raw")
    uploader = LakeUploader(tmp_path, config(), s3cfg)
    assert (await uploader.upload_pending()).uploaded == 6
    assert (await uploader.verify()).checked == 6
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"])
    lost = keys[1:3]
    for key in lost:  # the store lost them after a verified upload
        client.delete_object(Bucket=s3_bucket, Key=key)
    # another key, silently replaced by something else: reported, never overwritten
    client.put_object(Bucket=s3_bucket, Key=keys[4], Body=b"not ours\n")

    report = await uploader.verify()
    assert report.checked == 6 and not report.error
    assert sorted(f"raw/{k}" for k in report.missing) == lost
    assert report.different == [keys[4].removeprefix("raw/")]
    assert sorted(uploader.pending) == sorted(report.missing)
    await uploader.upload_pending()
    after = {o["Key"]: o["Size"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    local = {f"raw/{p.key}": p.size for p in iter_local_parts(tmp_path)}
    assert {k: v for k, v in after.items() if k != keys[4]} == {
        k: v for k, v in local.items() if k != keys[4]
    }
    assert after[keys[4]] == len(b"not ours\n")
    assert (await uploader.verify()).missing == []
