"""The backfill's progress says what it is doing: once the fetching is done and the merge waits
for the chain lock, it says so and for whom, instead of repeating a finished 100%."""

from __future__ import annotations

import io

from loguru import logger

from klined.jobs.fetcher import PairReport
from klined.jobs.progress import Progress


def test_a_merge_waiting_for_the_lock_says_so_once_not_100_percent_every_ten_seconds() -> None:
    report = PairReport("binance", "BTC/USD", wanted=240, done=240, fetched=240)
    progress = Progress([report], {}, stream=io.StringIO(), tty=False, clock=lambda: 100.0)
    progress.stage = "merging"
    progress.waiting_for = "the daemon's catch-up of 2026-12-03T14:00Z (PostgreSQL backend pid 7)"
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="INFO")
    try:
        for _ in range(3):  # three redraws, ten seconds apart
            progress.draw()
        progress.waiting_for = ""
        progress.draw()
    finally:
        logger.remove(sink)
    assert lines == [
        "backfill merging: waiting for the chain lock, held by the daemon's catch-up of"
        " 2026-12-03T14:00Z (PostgreSQL backend pid 7)",
        "backfill merging",
    ]
    assert not any("240/240" in line for line in lines)


def test_on_a_terminal_the_block_ends_with_what_it_waits_for() -> None:
    report = PairReport("kraken", "ETH/USD", wanted=60, done=60)
    progress = Progress([report], {}, stream=io.StringIO(), tty=True, clock=lambda: 5.0)
    progress.stage = "merging"
    progress.waiting_for = "`klined chain` of 2026-12-03T15:00Z (PostgreSQL backend pid 9)"
    last = progress.lines()[-1]
    assert last.startswith("merging: waiting for the chain lock, held by `klined chain` of")
