"""Fetching Binance's archive files, verified, from the simulator's archive host (real HTTP on
loopback) and from a ``file://`` mirror: 404s, 5xx retried, checksum mismatches, a location
that cannot be reached."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from klined.archives import binance as bn
from klined.archives.download import ArchiveSource
from klined.errors import ArchiveError, ArchiveNotPublished, ArchiveUnreachable
from klined.model import DAY_MS
from klined.sim import FaultPlan, FaultRule
from klined.sim.archive import write_binance
from tests.fixtures.sim import SIM_START

pytestmark = [pytest.mark.anyio]

DAY = SIM_START - SIM_START % DAY_MS - 2 * DAY_MS
PERIOD = bn.Period(DAY, DAY + DAY_MS, bn.DAILY)
NAME = bn.file_name("BTCUSD", PERIOD)


async def fetch(source: ArchiveSource) -> Path:
    body = await source.checksum(bn.checksum_path("BTCUSD", PERIOD), NAME)
    sha = bn.parse_checksum(body, NAME)
    return await source.fetch(bn.file_path("BTCUSD", PERIOD), NAME, sha)


async def test_a_file_and_its_checksum_over_http(sim_factory: Any, tmp_path: Path) -> None:
    plan = FaultPlan(rules=[FaultRule(kind="http_5xx", endpoint="public_data", request=1)])
    async with sim_factory(faults=plan) as sim:
        seen: list[int] = []
        async with ArchiveSource(
            sim.binance_archive_url, work_dir=tmp_path, backoff_s=(0.01, 0.05)
        ) as source:
            body = await source.checksum(bn.checksum_path("BTCUSD", PERIOD), NAME)  # after a 503
            sha = bn.parse_checksum(body, NAME)
            path = await source.fetch(bn.file_path("BTCUSD", PERIOD), NAME, sha, seen.append)
            assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
            assert sum(seen) == path.stat().st_size == source.bytes_downloaded - len(body)
            source.discard(path)
            assert not path.exists()
            with pytest.raises(ArchiveNotPublished, match="HTTP 404"):
                await source.checksum("spot/daily/klines/NOPEUSD/1m/x.zip.CHECKSUM", "x.zip")
            today = bn.Period(SIM_START - SIM_START % DAY_MS, SIM_START + DAY_MS, bn.DAILY)
            with pytest.raises(ArchiveNotPublished):  # a day's file appears the next day
                await source.checksum(bn.checksum_path("BTCUSD", today), "today.zip")
        assert sim.stats.http_5xx == 1


async def test_a_checksum_mismatch_is_fetched_once_more_then_refused(
    sim_factory: Any, tmp_path: Path
) -> None:
    plan = FaultPlan(rules=[FaultRule(kind="archive_bad_checksum", endpoint="BTCUSD", times=0)])
    async with sim_factory(faults=plan) as sim:
        async with ArchiveSource(sim.binance_archive_url, work_dir=tmp_path) as source:
            with pytest.raises(ArchiveError, match=f"{NAME}: checksum mismatch"):
                await fetch(source)
        assert sim.binance_archive.requests[NAME] == 2
        leftovers = [p.name for p in tmp_path.rglob("*.zip")]  # noqa: ASYNC240 - a test
        assert leftovers == []  # nothing half-downloaded is left


async def test_an_unreachable_archive_is_said_once(tmp_path: Path) -> None:
    source = ArchiveSource("http://127.0.0.1:9/public_data", work_dir=tmp_path,
                           backoff_s=(0.01, 0.02))  # fmt: skip
    async with source:
        with pytest.raises(ArchiveUnreachable, match="cannot be reached"):
            await fetch(source)
        with pytest.raises(ArchiveUnreachable):  # at once, no new attempts
            await fetch(source)


async def test_a_file_mirror_is_read_in_place(tmp_path: Path) -> None:
    from klined.sim import Market

    root = tmp_path / "mirror"
    (zip_path,) = write_binance(Market(7), root, ["BTC/USD"], DAY, DAY + DAY_MS)
    async with ArchiveSource(f"file://{root}") as source:
        path = await fetch(source)
        assert path == zip_path
        source.discard(path)
        assert path.exists()  # a mirror's own file is never deleted
        with pytest.raises(ArchiveNotPublished, match="not in the mirror"):
            await source.checksum("spot/daily/klines/X/1m/X.zip.CHECKSUM", "X.zip")
    async with ArchiveSource(f"file://{tmp_path / 'nowhere'}") as source:
        with pytest.raises(ArchiveUnreachable, match="not a folder"):
            await fetch(source)
