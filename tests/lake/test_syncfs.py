"""The lake writer's many-part flush: appends, one ``syncfs``, seals; and its fallbacks."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import pytest

import klined.lake.writer as writer_module
from klined.lake import LakeWriter, iter_local_parts, read_part_file
from klined.lake.writer import SYNC_EACH_MAX
from klined.model import HOUR_MS, MINUTE_MS
from tests.lake.test_writer import HOUR, FakeClock, candle, config, leftovers, read_all

PAIRS = [f"P{i:03d}/USD" for i in range(2 * SYNC_EACH_MAX)]  # more parts than one by one


class SyncSpy:
    """Stands in for libc ``syncfs``: counts calls, optionally fails like the kernel does."""

    def __init__(self, fail_with: int = 0) -> None:
        self.calls = 0
        self.fail_with = fail_with
        self.fds: set[int] = set()

    def __call__(self, fd: int) -> int:
        self.calls += 1
        self.fds.add(fd)
        if self.fail_with:
            ctypes.set_errno(self.fail_with)
            return -1
        os.sync()
        return 0


def fill(writer: LakeWriter, first: int, count: int, hour: int = HOUR) -> list[int]:
    """``count`` events spread over every pair; their ``event_ts`` (ids) are returned."""
    ids = list(range(first, first + count))
    for i in ids:
        writer.append(candle(i, hour + (i % 60) * MINUTE_MS, symbol=PAIRS[i % len(PAIRS)]))
    return ids


@pytest.mark.anyio
async def test_many_parts_flush_with_one_syncfs_and_seal_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = SyncSpy()
    monkeypatch.setattr(writer_module, "_syncfs", spy)
    clock = FakeClock(HOUR)
    writer = LakeWriter(tmp_path, config(), clock=clock)
    ids = fill(writer, 0, 500)
    await writer.flush()
    assert spy.calls == 1  # creating and appending 32 parts, made durable at once
    parts = list(iter_local_parts(tmp_path, closed_only=False))
    assert len(parts) == len(PAIRS) and not any(p.closed for p in parts)
    assert sum(len(read_part_file(p.path).records) for p in parts) == 500
    ids += fill(writer, 500, 500)
    await writer.flush()
    assert spy.calls == 2  # appends to existing parts
    clock.now = HOUR + HOUR_MS + 121_000  # the first hour is over, grace included
    ids += fill(writer, 1000, 100, hour=HOUR + HOUR_MS)  # the next hour opens new parts
    await writer.flush()
    # the data, then the sealed parts' .gz, then their renames
    assert spy.calls == 5
    sealed = list(iter_local_parts(tmp_path))
    assert len(sealed) == len(PAIRS) and all(p.key.endswith(".jsonl.gz") for p in sealed)
    assert not [p for p in leftovers(tmp_path) if p.suffix == ".tmp"]
    await writer.aclose()
    seen, bad = read_all(tmp_path)
    assert bad == 0
    assert sorted(k[3] for k in seen) == ids and all(n == 1 for n in seen.values())
    assert writer.events_written == len(ids)
    assert all(p.closed for p in iter_local_parts(tmp_path, closed_only=False))
    assert len(spy.fds) == 1  # one descriptor on the root, kept for the writer's life


@pytest.mark.anyio
async def test_a_failing_syncfs_falls_back_to_syncing_each_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = SyncSpy(fail_with=errno.EIO)
    monkeypatch.setattr(writer_module, "_syncfs", spy)
    writer = LakeWriter(tmp_path, config(), clock=FakeClock(HOUR))
    ids = fill(writer, 0, 300)
    await writer.flush()
    ids += fill(writer, 300, 300)
    await writer.aclose()
    # tried every time (EIO is not "unsupported"): two flushes, the seal's .gz and renames
    assert spy.calls == 4
    seen, bad = read_all(tmp_path)
    assert bad == 0 and sorted(k[3] for k in seen) == ids
    assert writer.events_written == 600


@pytest.mark.anyio
@pytest.mark.parametrize("missing", ["no syncfs", "ENOSYS"])
async def test_without_syncfs_every_part_is_synced_on_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    spy = SyncSpy(fail_with=errno.ENOSYS)
    monkeypatch.setattr(writer_module, "_syncfs", None if missing == "no syncfs" else spy)
    synced: list[int] = []
    real = writer_module._fdatasync

    def counting_fdatasync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(writer_module, "_fdatasync", counting_fdatasync)
    writer = LakeWriter(tmp_path, config(), clock=FakeClock(HOUR))
    ids = fill(writer, 0, 200)
    await writer.flush()
    ids += fill(writer, 200, 200)
    await writer.aclose()
    assert spy.calls == (0 if missing == "no syncfs" else 1)  # ENOSYS: never tried again
    assert len(synced) >= 2 * len(PAIRS)  # every part, at every flush
    seen, bad = read_all(tmp_path)
    assert bad == 0 and sorted(k[3] for k in seen) == ids


@pytest.mark.anyio
async def test_many_parts_write_failure_keeps_events_and_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "_syncfs", SyncSpy())
    blocker = tmp_path / "exchange=binance"
    blocker.write_bytes(b"not a folder")  # creating any part's folder fails
    writer = LakeWriter(tmp_path, config(), clock=FakeClock(HOUR))
    ids = fill(writer, 0, 100)
    await writer.flush()
    assert writer.events_written == 0
    blocker.unlink()
    ids += fill(writer, 100, 100)
    await writer.aclose()
    seen, bad = read_all(tmp_path)
    assert bad == 0 and sorted(k[3] for k in seen) == ids
    assert writer.events_written == 200
