"""The progress displays: what an import's lines say, redrawn in place on a terminal and logged
without the stage line otherwise; once the fetching is done and the merge waits for the chain
lock, the backfill says so and for whom, instead of repeating a finished 100%."""

from __future__ import annotations

import io

from loguru import logger

from klined.jobs.fetcher import PairReport
from klined.jobs.progress import ImportProgress, Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_import_progress_lines_and_eta() -> None:
    clock = Clock()
    p = ImportProgress("binance", stream=io.StringIO(), tty=True, clock=clock)
    p.files_total = 10
    clock.now += 20
    p.files_done, p.failed = 4, 1
    p.add_bytes(3 * 1024 * 1024)
    p.add_rows(40_000)
    p.add_merged(24)
    first, second, stage = p.lines()
    assert first.startswith("binance  files 4/10 ( 40.0%)  1 failed  3.0 MB read  ETA 0:30")
    assert "rows 40,000 (2,000/s)  hours merged 24" in second
    assert stage == "loading ... 0:20 elapsed"
    p.draw()
    p.draw()
    out = p.stream.getvalue()  # type: ignore[attr-defined]
    assert out.count("\x1b[3A") == 1 and out.count("files 4/10") == 2  # the second overwrites


def test_without_a_terminal_it_logs() -> None:
    lines: list[str] = []
    handler = logger.add(lines.append, format="{message}", level="INFO")
    try:
        p = ImportProgress("kraken", stream=io.StringIO(), tty=False, clock=Clock())
        p.files_total = 2
        p.draw()
    finally:
        logger.remove(handler)
    assert [ln.split()[:3] for ln in lines] == [
        ["import", "kraken", "files"],
        ["import", "rows", "0"],
    ]
    assert p.stream.getvalue() == ""  # type: ignore[attr-defined]


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
