"""Parsed archive rows -> bronze candles, checked, and the minutes a file omits filled.

Pure: rows come in as ``(line number, Row)`` from a format's parser, candles go out. A row that
cannot be true (a price that is not a positive number, high below low, a minute out of order
or outside the file's day/month) raises :class:`klined.errors.ArchiveError` naming the file and
the line, so the loader can drop the whole file.

What a file proves, and so what becomes a row (DESIGN's ``archive`` and ``no_trades``):

* every row is the exchange's own final candle of that minute: ``archive``; a row with zero
  trades says the minute had none: ``no_trades`` (as the REST parsers do);
* a minute missing between two rows of the file had no trades (Kraken omits such minutes):
  ``no_trades``, flat at the previous row's close, zero volume, ``trade_count = 0``;
* before the file's first row and after its last nothing is proven: nothing is written.

Numbers are normalized exactly as the REST parsers normalize them (plain decimal text; vwap =
quote volume / volume when the file has a quote volume), so an archive row and a REST row of
the same minute are the same row.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import NamedTuple

from klined.errors import ArchiveError
from klined.exchanges.common import PLAIN, plain_number, plain_text, scale
from klined.model import MINUTE_MS, CandleRecord, Origin, Pair, iso, plain_decimal

#: the widest window: every minute a timestamp can name (to 9999-12-31)
ALL_TIME = (0, 253_402_300_740_000)

_ARCHIVE = Origin.ARCHIVE.value
_NO_TRADES = Origin.NO_TRADES.value


class Row(NamedTuple):
    """One line of an archive file, its numbers still as the file wrote them."""

    minute: int  # ms since the epoch, UTC
    open: str
    high: str
    low: str
    close: str
    volume: str
    quote_volume: str | None
    trades: int | None


@dataclass(frozen=True, slots=True)
class FileSpec:
    """What is known about a file before it is read.

    ``period`` is the day or month a Binance file is named for: a row outside it means the
    file is not what its name says. ``window`` limits what is written (a backfill reads a
    Kraken file for its range only); rows outside it are still read and checked.
    """

    exchange: str
    pair: Pair
    native: str
    name: str
    period: tuple[int, int] | None = None
    window: tuple[int, int] = ALL_TIME
    multiplier: int = 1


@dataclass(slots=True)
class FileStats:
    """What reading a file produced (inside the window)."""

    rows: int = 0  # candles written: the file's rows plus the filled minutes
    no_trades: int = 0  # of them, minutes filled because the file omits them
    first_minute: int | None = None  # the first and last minute written (fills included)
    last_minute: int | None = None
    lines: int = 0  # data lines read (the whole file)


def _price(text: str, what: str, name: str, line: int) -> tuple[str, Decimal]:
    known = PLAIN.get(text) or plain_number(text)
    if known is not None:
        return known
    try:
        value = Decimal(text)
    except (InvalidOperation, ValueError):
        raise ArchiveError(name, f"{what} is not a number: {text!r}", line=line) from None
    if not value.is_finite() or value <= 0:
        raise ArchiveError(name, f"{what} is not a positive number: {text!r}", line=line)
    return plain_decimal(value), value


def _amount(text: str, what: str, name: str, line: int) -> str:
    plain = plain_text(text)
    if plain is not None:
        return plain
    try:
        value = Decimal(text)
    except (InvalidOperation, ValueError):
        raise ArchiveError(name, f"{what} is not a number: {text!r}", line=line) from None
    if not value.is_finite() or value < 0:
        raise ArchiveError(name, f"{what} is not a non-negative number: {text!r}", line=line)
    return plain_decimal(value)


class ArchiveCandles:
    """Iterate the candles of one file's rows; :attr:`stats` counts them as they go."""

    def __init__(self, spec: FileSpec, rows: Iterable[tuple[int, Row]], *, stamp_ms: int) -> None:
        self.spec = spec
        self.rows = rows
        self.stamp_ms = stamp_ms
        self.stats = FileStats()
        self._symbol = str(spec.pair)

    def __iter__(self) -> Iterator[CandleRecord]:
        spec = self.spec
        name = spec.name
        lo, hi = spec.window
        p_lo, p_hi = spec.period if spec.period is not None else ALL_TIME
        stats = self.stats
        prev_minute = -1
        prev_close = ""
        for line, row in self.rows:
            stats.lines += 1
            minute = row.minute
            if minute % MINUTE_MS:
                raise ArchiveError(name, f"{minute} is not the start of a minute", line=line)
            if not p_lo <= minute < p_hi:
                raise ArchiveError(
                    name,
                    f"a row for {iso(minute)} in a file for {iso(p_lo)} .. {iso(p_hi)}",
                    line=line,
                )
            if minute <= prev_minute:
                what = "repeats" if minute == prev_minute else "comes before"
                raise ArchiveError(
                    name, f"the row for {iso(minute)} {what} the previous row", line=line
                )
            candle = self._candle(row, line)
            if prev_minute >= 0 and minute - prev_minute > MINUTE_MS:
                start = max(prev_minute + MINUTE_MS, lo)
                for gap in range(start, min(minute, hi), MINUTE_MS):
                    stats.rows += 1
                    stats.no_trades += 1
                    if stats.first_minute is None:
                        stats.first_minute = gap
                    stats.last_minute = gap
                    yield self._quiet(gap, prev_close)
            if lo <= minute < hi:
                stats.rows += 1
                if stats.first_minute is None:
                    stats.first_minute = minute
                stats.last_minute = minute
                yield candle
            prev_minute, prev_close = minute, candle.close

    def _candle(self, row: Row, line: int) -> CandleRecord:
        name = self.spec.name
        o_text, o = _price(row.open, "open", name, line)
        h_text, h = _price(row.high, "high", name, line)
        l_text, lo = _price(row.low, "low", name, line)
        c_text, c = _price(row.close, "close", name, line)
        if h < lo:
            raise ArchiveError(name, f"high {row.high} is below low {row.low}", line=line)
        if lo <= 0:  # the fast path takes any plain number; a price must be positive
            raise ArchiveError(name, f"non-positive price (low {row.low})", line=line)
        if not (lo <= o <= h and lo <= c <= h):
            raise ArchiveError(name, "open or close outside the high-low range", line=line)
        volume = _amount(row.volume, "volume", name, line)
        quote = None
        if row.quote_volume is not None:
            quote = _amount(row.quote_volume, "quote volume", name, line)
        trades = row.trades
        vwap: str | None = None
        if trades is not None and trades < 0:
            raise ArchiveError(name, f"trade count {trades} is negative", line=line)
        if self.spec.multiplier != 1:
            scaled = scale(
                o, h, lo, c, Decimal(volume),
                multiplier=self.spec.multiplier,
                quote_volume=None if quote is None else Decimal(quote),
            )  # fmt: skip
            o_text, h_text, l_text, c_text = scaled.open, scaled.high, scaled.low, scaled.close
            volume, quote, vwap = scaled.volume, scaled.quote_volume, scaled.vwap
        elif quote is not None and volume != "0":
            vwap = plain_decimal(Decimal(quote) / Decimal(volume))
        origin = _NO_TRADES if trades == 0 else _ARCHIVE
        stamp = self.stamp_ms
        # positional, in the record's field order (see klined.model.Candle): the hot path
        return CandleRecord(
            self.spec.exchange, self._symbol, self.spec.native, row.minute,
            o_text, h_text, l_text, c_text, volume, quote, vwap, trades,
            True, origin, None, stamp, stamp, 60,
        )  # fmt: skip

    def _quiet(self, minute: int, close: str) -> CandleRecord:
        stamp = self.stamp_ms
        return CandleRecord(
            self.spec.exchange, self._symbol, self.spec.native, minute,
            close, close, close, close, "0", "0", None, 0,
            True, _NO_TRADES, None, stamp, stamp, 60,
        )  # fmt: skip
