"""The lake on a full disk: a real 3 MB tmpfs filled to the last byte, then freed again.

Events wait in memory (bounded), the log says so once and then at most once a minute,
events past the cap are dropped and named by exchange, pair and minute, sealed parts still
reach S3 when their marker cannot be written, and when space returns everything held is
written exactly once.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from loguru import logger

from klined.config import S3Config
from klined.lake import LakeUploader, LakeWriter, iter_local_parts
from klined.lake.held import Dropped
from klined.model import MINUTE_MS
from tests.lake.test_writer import HOUR, FakeClock, candle, config, identity, read_all
from tests.support.disk import fill, free, tiny_filesystem

pytestmark = pytest.mark.anyio

PAIRS = ["BTC/USD", "ETH/USD", "SOL/USD", "DOT/USD"]


class Capture:
    """Every log line of a level or above, as text."""

    def __init__(self, level: str = "INFO") -> None:
        self.lines: list[tuple[str, str]] = []
        self._id = logger.add(
            lambda m: self.lines.append((m.record["level"].name, m.record["message"])), level=level
        )

    def close(self) -> None:
        logger.remove(self._id)

    def of(self, level: str) -> list[str]:
        return [text for lvl, text in self.lines if lvl == level]


async def test_a_full_disk_holds_events_logs_once_caps_memory_and_loses_nothing(
    tmp_path: Path,
) -> None:
    with tiny_filesystem(tmp_path / "lake") as root:
        clock = FakeClock(HOUR + 10 * MINUTE_MS)
        writer = LakeWriter(root, config(max_held_bytes=300_000), clock=clock)
        sent: Counter[tuple] = Counter()
        seq = 0

        def send(minute: int, symbol: str) -> bool:
            nonlocal seq
            seq += 1
            c = candle(seq, HOUR + minute * MINUTE_MS, symbol=symbol)
            held = writer.held_bytes
            writer.append(c)
            kept = writer.held_bytes > held
            if kept:
                sent[identity(c.exchange, c.symbol, c.interval_start, c.event_ts)] += 1
            return kept

        for minute in range(5):
            for symbol in PAIRS:
                for _ in range(10):
                    send(minute, symbol)
        await writer.flush()
        assert writer.held_bytes == 0

        fill(root)
        log = Capture()
        try:
            # many flushes of many parts while the disk is full: events wait in memory
            for minute in range(5, 25):
                for symbol in PAIRS:
                    for _ in range(20):
                        assert send(minute, symbol), "under the cap every event is kept"
                await writer.flush()
                if writer.held_bytes > 250_000:
                    break
            held = writer.held_bytes
            assert held > 0 and writer.trouble.failing
            # past the cap: dropped, and named exactly
            dropped_sent: Counter[tuple[str, int]] = Counter()
            while writer.held_bytes < 300_000:
                send(40, "BTC/USD")
            for minute in (41, 42, 44):
                for _ in range(3):
                    assert not send(minute, "ETH/USD")
                    dropped_sent[("ETH/USD", minute)] += 1
            assert not send(41, "SOL/USD")
            await writer.flush()
            assert writer.held_bytes <= 300_000 + 1000
            errors = log.of("ERROR")
            assert len(errors) == 1 and "cannot write to" in errors[0], errors
            assert "No space left on device" in errors[0]
            assert len(log.of("WARNING")) <= 1  # the summary, at most once a minute
            dropped = sorted(writer.take_dropped(), key=lambda d: (d.symbol, d.start_ms))
            assert dropped == [
                Dropped("binance", "ETH/USD", HOUR + 41 * MINUTE_MS, HOUR + 43 * MINUTE_MS, 6),
                Dropped("binance", "ETH/USD", HOUR + 44 * MINUTE_MS, HOUR + 45 * MINUTE_MS, 3),
                Dropped("binance", "SOL/USD", HOUR + 41 * MINUTE_MS, HOUR + 42 * MINUTE_MS, 1),
            ]
            assert writer.take_dropped() == []

            # space returns: everything held is written, once
            free(root)
            await writer.flush(close_all=True)
            assert writer.held_bytes == 0 and not writer.trouble.failing
            assert any("again" in line for line in log.of("INFO"))
        finally:
            log.close()
        seen, bad = read_all(root)
        assert bad == 0
        assert seen == sent
        assert not list(root.rglob("*.open"))


async def test_sealed_parts_are_uploaded_when_their_marker_cannot_be_written(
    tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    with tiny_filesystem(tmp_path / "lake") as root:
        writer = LakeWriter(root, config(), clock=FakeClock(HOUR + 10 * MINUTE_MS))
        for i, symbol in enumerate(PAIRS):
            writer.append(candle(i, HOUR, symbol=symbol))
        await writer.flush(close_all=True)
        s3 = S3Config(bucket=s3_bucket, endpoint_url=s3_endpoint)
        uploader = LakeUploader(root, config(), s3, attempts=1)
        fill(root)
        try:
            report = await uploader.upload_pending()
        finally:
            free(root)
        assert report.uploaded == len(PAIRS) and not report.failed
        assert uploader.pending == []
        assert not list(root.rglob("*.uploaded")), "the disk was full: no marker"
        # a later pass writes the markers it could not write then, without uploading again
        await uploader.upload_pending()
        assert len(list(root.rglob("*.uploaded"))) == len(PAIRS)
        assert {p.key for p in iter_local_parts(root)} == set(uploader._uploaded)
