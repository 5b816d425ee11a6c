"""Kraken's OHLCVT downloads (pure): which CSVs are 1-minute files of which pair, and their rows.

A zip (or the folder it was extracted to) holds ``<PAIR>_<minutes>.csv`` for every pair and
interval, named with Kraken's REST pair names (``XBTUSD``, ``XDGUSD``, ``ETHUSD``). Rows have
no header: time (Unix seconds, the interval's start), open, high, low, close, volume, trades;
intervals without trades are omitted. Sources are listed in :mod:`klined.archives`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

from klined.archives.candles import Row
from klined.errors import ArchiveError
from klined.model import Pair

_MEMBER = re.compile(r"^([A-Za-z0-9.]+)_([0-9]+)\.csv$")


class KrakenNames(Protocol):
    """What the Kraken adapter says about names (:class:`klined.exchanges.kraken.Kraken`)."""

    def native(self, pair: Pair) -> str: ...
    def rest_native(self, pair: Pair) -> str: ...


def member_name(path: str) -> tuple[str, int] | None:
    """``("XBTUSD", 1)`` for ``.../XBTUSD_1.csv``; None for anything that is not such a CSV."""
    match = _MEMBER.match(path.replace("\\", "/").rsplit("/", 1)[-1])
    if match is None:
        return None
    return match.group(1), int(match.group(2))


def pair_names(adapter: KrakenNames, pairs: Sequence[Pair]) -> dict[str, Pair]:
    """File name (upper case) -> configured pair: the adapter's REST name (``XBTUSD`` for
    BTC/USD, or the configured ``rest_native``), and the plain ``BASEQUOTE`` spelling."""
    out: dict[str, Pair] = {}
    for pair in pairs:
        for name in (
            adapter.rest_native(pair),
            adapter.native(pair).replace("/", ""),
            pair.base + pair.quote,
        ):
            out.setdefault(name.upper(), pair)
    return out


def rows(lines: Iterable[tuple[int, str]], name: str) -> Iterator[tuple[int, Row]]:
    """``(line number, Row)`` for every line of a Kraken OHLCVT CSV."""
    for number, text in lines:
        fields = text.split(",")
        if len(fields) != 7:
            if number == 1 and not text.strip():
                continue
            raise ArchiveError(
                name,
                f"{len(fields)} fields; an OHLCVT row has 7 (time, open, high, low, close,"
                " volume, trades)",
                line=number,
            )
        try:
            seconds = int(fields[0])
        except ValueError:
            if number == 1:
                continue  # a header row (Kraken's files have none, a user's export may)
            raise ArchiveError(
                name, f"time {fields[0][:30]!r} is not Unix seconds", line=number
            ) from None
        try:
            trades = int(fields[6])
        except ValueError:
            raise ArchiveError(
                name, f"trade count {fields[6][:30]!r} is not a whole number", line=number
            ) from None
        yield (
            number,
            Row(
                seconds * 1000, fields[1], fields[2], fields[3], fields[4], fields[5], None, trades
            ),
        )
