"""Backfill and import progress: a redrawn status block on a terminal, plain log lines
otherwise, and the backfill's summary table at the end. Plain ANSI, no rich/Textual (the
headless core stays light)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

import anyio
from loguru import logger

from klined.jobs.fetcher import PairReport
from klined.rest.ratelimit import LimiterStats


def fmt_duration(seconds: float) -> str:
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "--:--"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Display:
    """Redraws :meth:`lines` on a terminal; logs all but the last line now and then otherwise."""

    #: the log lines' first word
    what = ""

    def __init__(
        self,
        *,
        stream: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        log_every_s: float = 10.0,
    ) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self.started = clock()
        self.log_every_s = log_every_s
        self._lines = 0
        self.stage = "fetching"
        #: who holds the chain lock while the merge waits for it ("" when it does not wait)
        self.waiting_for = ""
        self._said = ""

    def lines(self) -> list[str]:
        raise NotImplementedError

    @property
    def settled(self) -> bool:
        """Whether the figures no longer move (only the stage line is worth logging)."""
        return False

    def stage_line(self) -> str:
        """What the work is doing now, e.g. waiting for the chain lock and for whom."""
        elapsed = fmt_duration(self.clock() - self.started)
        if self.waiting_for:
            return (
                f"{self.stage}: waiting for the chain lock, held by {self.waiting_for}"
                f" ... {elapsed} elapsed"
            )
        return f"{self.stage} ... {elapsed} elapsed"

    def draw(self) -> None:
        lines = self.lines()
        if self.tty:
            up = f"\x1b[{self._lines}A" if self._lines else ""
            text = up + "".join(f"\r\x1b[K{line}\n" for line in lines)
            self.stream.write(text)
            self.stream.flush()
            self._lines = len(lines)
        elif self.waiting_for or self.settled:
            # the figures no longer move: say what the work waits for, once per change
            line = lines[-1].rsplit(" ... ", 1)[0]
            if line != self._said:
                logger.info("{} {}", self.what, line)
                self._said = line
        else:
            for line in lines[:-1]:
                logger.info("{} {}", self.what, " ".join(line.split()))

    async def run(self) -> None:
        """Redraw until cancelled (run it in the work's task group)."""
        period = 0.5 if self.tty else self.log_every_s
        try:
            while True:
                await anyio.sleep(period)
                self.draw()
        finally:
            if self.tty:
                self.draw()


class Progress(Display):
    """Live view of a backfill: what each exchange has done, how fast, and how long is left."""

    what = "backfill"

    def __init__(
        self,
        reports: list[PairReport],
        limiters: dict[str, LimiterStats],
        *,
        stream: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        log_every_s: float = 10.0,
    ) -> None:
        super().__init__(stream=stream, tty=tty, clock=clock, log_every_s=log_every_s)
        self.reports = reports
        self.limiters = limiters

    @property
    def settled(self) -> bool:
        return bool(self.reports) and all(r.done >= r.wanted for r in self.reports)

    # ------------------------------------------------------------------------------- numbers

    def totals(self, exchange: str | None = None) -> dict[str, float]:
        rs = [r for r in self.reports if exchange is None or r.exchange == exchange]
        wanted = sum(r.wanted for r in rs)
        done = sum(r.done for r in rs)
        rows = sum(r.fetched + r.no_trades + r.archive for r in rs)
        elapsed = max(1e-9, self.clock() - self.started)
        rate = rows / elapsed
        done_rate = done / elapsed
        eta = (wanted - done) / done_rate if done_rate > 0 else float("inf")
        finished = sum(1 for r in rs if r.wanted and r.done >= r.wanted)
        return {
            "pairs": len(rs),
            "finished": finished,
            "wanted": wanted,
            "done": done,
            "rows": rows,
            "rate": rate,
            "eta": eta if wanted > done else 0.0,
            "missing": sum(r.still_missing for r in rs),
            "requests": sum(r.requests for r in rs),
        }

    def lines(self) -> list[str]:
        out = []
        for ex in sorted({r.exchange for r in self.reports}):
            t = self.totals(ex)
            st = self.limiters.get(ex)
            pct = 100.0 * t["done"] / t["wanted"] if t["wanted"] else 100.0
            throttle = ""
            if st is not None:
                throttle = f"  429s {st.throttled}  waits {st.waits}"
                if st.banned:
                    throttle += f"  418s {st.banned}!"
                if st.retries:
                    throttle += f"  retries {st.retries}"
            out.append(
                f"{ex:<8} pairs {int(t['finished'])}/{int(t['pairs'])}  "
                f"minutes {int(t['done']):,}/{int(t['wanted']):,} ({pct:5.1f}%)  "
                f"{t['rate']:,.0f} candles/s  ETA {fmt_duration(t['eta'])}  "
                f"req {int(t['requests']):,}{throttle}"
            )
        out.append(self.stage_line())
        return out


def summary_table(reports: list[PairReport]) -> str:
    """Per pair: rows from archives, fetched, no-trade minutes, still missing and why."""
    head = (
        "exchange", "pair", "archive", "rest wanted", "fetched", "no-trade", "missing",
        "why missing", "req",
    )  # fmt: skip
    rows = []
    for r in sorted(reports, key=lambda r: (r.exchange, r.symbol)):
        why = ", ".join(f"{reason} ({n})" for reason, n in r.missing.most_common()) or "-"
        rows.append(
            (
                r.exchange,
                r.symbol,
                f"{r.archive:,}",
                f"{r.wanted:,}",
                f"{r.fetched:,}",
                f"{r.no_trades:,}",
                f"{r.still_missing:,}",
                why,
                f"{r.requests:,}",
            )
        )
    widths = [
        max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)
    ]
    numeric = {2, 3, 4, 5, 6, 8}

    def fmt(row: tuple[str, ...]) -> str:
        cells = [
            c.rjust(widths[i]) if i in numeric else c.ljust(widths[i]) for i, c in enumerate(row)
        ]
        return "  ".join(cells).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(head), sep, *(fmt(r) for r in rows)])


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover - the loop always returns


class ImportProgress(Display):
    """Live view of an archive import: files fetched and loaded, rows, hours merged."""

    what = "import"

    def __init__(
        self,
        exchange: str,
        *,
        stream: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        log_every_s: float = 10.0,
    ) -> None:
        super().__init__(stream=stream, tty=tty, clock=clock, log_every_s=log_every_s)
        self.exchange = exchange
        self.files_total = 0
        self.files_done = 0
        self.failed = 0
        self.bytes = 0
        self.rows = 0
        self.hours_merged = 0
        self.stage = "loading"

    def add_bytes(self, n: int) -> None:
        self.bytes += n

    def add_rows(self, n: int) -> None:
        self.rows += n

    def add_merged(self, n: int) -> None:
        self.hours_merged += n

    def lines(self) -> list[str]:
        elapsed = max(1e-9, self.clock() - self.started)
        pct = 100.0 * self.files_done / self.files_total if self.files_total else 100.0
        rate = self.files_done / elapsed
        left = self.files_total - self.files_done
        eta = left / rate if rate > 0 else float("inf")
        failed = f"  {self.failed} failed" if self.failed else ""
        return [
            f"{self.exchange:<8} files {self.files_done:,}/{self.files_total:,} ({pct:5.1f}%)"
            f"{failed}  {_size(self.bytes)} read  ETA {fmt_duration(eta if left else 0.0)}",
            f"{'':<8} rows {self.rows:,} ({self.rows / elapsed:,.0f}/s)  hours merged "
            f"{self.hours_merged:,}",
            self.stage_line(),
        ]
