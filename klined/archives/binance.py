"""Binance US's kline archive (pure): which files cover a range, their names and paths, the
``.CHECKSUM`` file, and the CSV rows.

Files are per symbol, interval and UTC day or month, under a base URL (``archive_url``)::

    <base>/spot/daily/klines/BTCUSD/1m/BTCUSD-1m-2026-01-15.zip   (+ .CHECKSUM)
    <base>/spot/monthly/klines/BTCUSD/1m/BTCUSD-1m-2026-01.zip    (+ .CHECKSUM)

Each zip holds one CSV of ``/api/v3/klines`` rows. Open and close times are milliseconds in
files before 2025 and microseconds after; the unit is read from each value (anything from
10^14 is microseconds: 10^14 ms is the year 5138, 10^14 us is 1973). A file may start with a
header row. Sources are listed in :mod:`klined.archives`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from klined.archives.candles import Row
from klined.errors import ArchiveError
from klined.model import DAY_MS, MINUTE_MS, from_datetime, to_datetime

DAILY = "daily"
MONTHLY = "monthly"
INTERVAL = "1m"

#: from this value on, a timestamp is in microseconds
MICROS_FROM = 10**14

_CHECKSUM = re.compile(rb"^\s*([0-9a-fA-F]{64})[ \t]+\*?(\S+)\s*$")


@dataclass(frozen=True, slots=True, order=True)
class Period:
    """The UTC day or month one file is for: ``[start_ms, end_ms)``."""

    start_ms: int
    end_ms: int
    kind: str  # DAILY | MONTHLY

    @property
    def label(self) -> str:
        """``2026-01-15`` for a day, ``2026-01`` for a month (as in the file names)."""
        fmt = "%Y-%m-%d" if self.kind == DAILY else "%Y-%m"
        return to_datetime(self.start_ms).strftime(fmt)

    @property
    def days(self) -> range:
        return range(self.start_ms, self.end_ms, DAY_MS)


def floor_day(ts_ms: int) -> int:
    return ts_ms - ts_ms % DAY_MS


def month_of(ts_ms: int) -> tuple[int, int]:
    """``[start, end)`` of the UTC calendar month holding ``ts_ms``."""
    dt = to_datetime(ts_ms)
    start = datetime(dt.year, dt.month, 1, tzinfo=UTC)
    end = datetime(dt.year + dt.month // 12, dt.month % 12 + 1, 1, tzinfo=UTC)
    return from_datetime(start), from_datetime(end)


def whole_days(start_ms: int, end_ms: int, published_before_ms: int) -> list[int]:
    """Starts of the UTC days that lie wholly inside ``[start_ms, end_ms)`` and end by
    ``published_before_ms`` (a day's file appears after the day is over)."""
    first = -((-start_ms) // DAY_MS) * DAY_MS
    last = min(floor_day(end_ms), floor_day(published_before_ms))
    return list(range(first, last, DAY_MS))


def plan(days: Iterable[int]) -> list[Period]:
    """The fewest files for these UTC days: a month's file when every day of the month is
    wanted, daily files for the rest. Sorted by time."""
    wanted = sorted(set(days))
    by_month: dict[tuple[int, int], list[int]] = {}
    for day in wanted:
        by_month.setdefault(month_of(day), []).append(day)
    out: list[Period] = []
    for (start, end), month_days in sorted(by_month.items()):
        if len(month_days) == (end - start) // DAY_MS:
            out.append(Period(start, end, MONTHLY))
        else:
            out.extend(Period(d, d + DAY_MS, DAILY) for d in month_days)
    return out


def daily_periods(period: Period) -> list[Period]:
    """A month's days as daily files (a month not published yet is read day by day)."""
    return [Period(d, d + DAY_MS, DAILY) for d in period.days]


def file_name(native: str, period: Period) -> str:
    return f"{native}-{INTERVAL}-{period.label}.zip"


def file_path(native: str, period: Period) -> str:
    """The file's path under the archive's base URL."""
    return f"spot/{period.kind}/klines/{native}/{INTERVAL}/{file_name(native, period)}"


def checksum_path(native: str, period: Period) -> str:
    return file_path(native, period) + ".CHECKSUM"


def parse_checksum(body: bytes, name: str) -> str:
    """The SHA-256 (lowercase hex) a ``.CHECKSUM`` file gives for ``name``."""
    lines = [ln for ln in body.splitlines() if ln.strip()]
    match = _CHECKSUM.match(lines[0]) if len(lines) == 1 else None
    if match is None:
        raise ArchiveError(name, f"unreadable .CHECKSUM file: {body[:120]!r}")
    named = match.group(2).decode("utf-8", "replace").rsplit("/", 1)[-1]
    if named != name:
        raise ArchiveError(name, f"its .CHECKSUM is for {named!r}")
    return match.group(1).decode().lower()


def to_ms(value: int) -> int:
    """A file timestamp in milliseconds, whichever unit the file used."""
    if value >= MICROS_FROM:
        return value // 1000
    return value


def rows(lines: Iterable[tuple[int, str]], name: str) -> Iterator[tuple[int, Row]]:
    """``(line number, Row)`` for every kline line; a header on line 1 is skipped."""
    for number, text in lines:
        fields = text.split(",")
        if len(fields) < 11:
            if number == 1 and not text.strip():
                continue
            raise ArchiveError(name, f"{len(fields)} fields, a kline row has 12", line=number)
        try:
            open_time = int(fields[0])
        except ValueError:
            if number == 1:
                continue  # a header row (open_time,open,high,...)
            raise ArchiveError(
                name, f"open time {fields[0][:30]!r} is not a number", line=number
            ) from None
        try:
            close_time = int(fields[6])
            trades = int(fields[8])
        except ValueError:
            raise ArchiveError(
                name, "close time or trade count is not a whole number", line=number
            ) from None
        minute = to_ms(open_time)
        close_ms = to_ms(close_time)
        if not minute < close_ms < minute + MINUTE_MS:
            raise ArchiveError(
                name,
                f"close time {close_time} does not close the 1m kline opened at {open_time}",
                line=number,
            )
        yield (
            number,
            Row(minute, fields[1], fields[2], fields[3], fields[4], fields[5], fields[7], trades),
        )
