"""Turning lake records into bronze's COPY rows: validation and CSV encoding.

asyncpg's binary COPY encodes ``numeric`` from Python at ~60k rows/s on this class of machine,
far below what the server ingests, so rows go in as CSV: timestamps rendered from a per-second
cache, and each part re-encoded as JSON arrays in C; when that is byte-for-byte valid CSV (no
backslash escape, the row separator unambiguous) it is streamed as is, otherwise rows are
quoted by hand. :func:`validate_record` and :class:`Folder` say which lines cannot go in (the
loader, :mod:`klined.jobs.bronze`, counts them as bad lines).
"""

from __future__ import annotations

import operator
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import asyncpg
import msgspec

from klined.lake import parse_key, plain_bytes
from klined.model import HOUR_MS, Candle, CandleRecord, Origin, floor_hour

#: bad line numbers kept per part in the ledger
BAD_LINE_SAMPLE = 100

COPY_COLUMNS = [
    "exchange", "symbol", "native_symbol", "interval_seconds", "open", "high", "low", "close",
    "volume", "quote_volume", "vwap", "trade_count", "is_final", "source", "session_id",
    "interval_start", "interval_end", "event_ts", "ingestion_ts", "lake_key",
]  # fmt: skip
_PLAIN = operator.attrgetter(
    "exchange", "symbol", "native_symbol", "interval_seconds", "open", "high", "low", "close",
    "volume", "quote_volume", "vwap", "trade_count", "is_final", "origin", "session_id",
)  # fmt: skip
_EXCHANGE = operator.attrgetter("exchange")
_SYMBOL = operator.attrgetter("symbol")
_SECONDS_OF = operator.attrgetter("interval_seconds")

_ENCODER = msgspec.json.Encoder()
_LINE_DECODER = msgspec.json.Decoder(CandleRecord)
_ORIGINS = frozenset(o.value for o in Origin)
MAX_MS = 253_402_300_799_000  # 9999-12-31T23:59:59Z


#: PostgreSQL ``numeric``: at most 131072 digits before the decimal point, 16383 after
NUMERIC_INT_DIGITS = 131_072
NUMERIC_FRAC_DIGITS = 16_383


def _bad_number(text: str | None, optional: bool) -> bool:
    """Whether ``text`` is not a number PostgreSQL's ``numeric`` can hold exactly."""
    if text is None:
        return not optional
    try:
        value = Decimal(text)
    except (InvalidOperation, ValueError, TypeError):
        return True
    if not value.is_finite():
        return True
    if value.is_zero():
        return False
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    return value.adjusted() >= NUMERIC_INT_DIGITS or -exponent > NUMERIC_FRAC_DIGITS


def validate_record(rec: CandleRecord | Candle) -> str | None:
    """Why a record cannot go into bronze, or ``None``. (Careful mode and gap-fill rows.)"""
    if rec.origin not in _ORIGINS:
        return f"unknown origin {rec.origin!r}"
    for name in ("exchange", "symbol", "native_symbol"):
        value = getattr(rec, name)
        if not value or "\x00" in value:
            return f"bad {name} {value!r}"
    if rec.session_id is not None and "\x00" in rec.session_id:
        return "bad session_id"
    if not 0 < rec.interval_seconds <= 86_400:
        return f"bad interval_seconds {rec.interval_seconds}"
    for name in ("interval_start", "event_ts", "ingestion_ts"):
        if not 0 <= getattr(rec, name) < MAX_MS - 86_400_000:
            return f"{name} out of range"
    if rec.interval_start % (rec.interval_seconds * 1000):
        return f"interval_start {rec.interval_start} is not on the {rec.interval_seconds} s grid"
    for name in ("open", "high", "low", "close", "volume"):
        if _bad_number(getattr(rec, name), optional=False):
            return f"{name} is not a finite number PostgreSQL can hold: {getattr(rec, name)!r:.60}"
    for name in ("quote_volume", "vwap"):
        if _bad_number(getattr(rec, name), optional=True):
            return f"{name} is not a finite number PostgreSQL can hold: {getattr(rec, name)!r:.60}"
    if rec.trade_count is not None and not 0 <= rec.trade_count < 2**63:
        return f"bad trade_count {rec.trade_count}"
    return None


class Folder(msgspec.Struct, frozen=True):
    """What a part's folder says every line of it must be: exchange, symbol, hour."""

    exchange: str
    symbol: str
    hour_ms: int

    def mismatch(self, rec: CandleRecord) -> str | None:
        if rec.exchange != self.exchange or rec.symbol != self.symbol:
            return f"{rec.exchange!r} {rec.symbol!r} in the folder of {self.exchange} {self.symbol}"
        if not self.hour_ms <= rec.interval_start < self.hour_ms + HOUR_MS:
            return f"minute {rec.interval_start} outside the part's hour"
        if rec.interval_seconds != 60:
            return f"interval of {rec.interval_seconds} s in a 1-minute part"
        return None

    def fits(self, records: list[CandleRecord], outside: bool) -> bool:
        """The cheap check of a whole part (C-level set building); ``outside``: whether
        ``format_rows`` put a row outside the hour or off the minute grid."""
        return (
            not outside
            and set(map(_EXCHANGE, records)) == {self.exchange}
            and set(map(_SYMBOL, records)) == {self.symbol}
            and set(map(_SECONDS_OF, records)) == {60}
        )


def folder_of(ref: Any, hour: int) -> Folder | None:
    """The folder a part was filed under (None for a source whose keys are not lake keys)."""
    try:
        pk = parse_key(ref.key)
    except (ValueError, AttributeError):
        return None
    return Folder(pk.exchange, pk.symbol, hour if pk.hour_ms == hour else pk.hour_ms)


def careful_decode(
    data: bytes, folder: Folder | None = None
) -> tuple[list[CandleRecord], int, list[int]]:
    """Every line validated (and checked against its folder): the good records, the count of
    bad lines and a sample of their numbers."""
    records: list[CandleRecord] = []
    data, complete = plain_bytes(data)
    if not complete:
        data = data[: data.rfind(b"\n") + 1]  # a line cut by the damage is part of it
    bad = 0 if complete else 1  # the damaged rest of a gzip part
    numbers: list[int] = [] if complete else [data.count(b"\n") + 1]
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rec: CandleRecord | None = _LINE_DECODER.decode(line)
        except msgspec.DecodeError:
            rec = None
        if (
            rec is None
            or validate_record(rec) is not None
            or (folder is not None and folder.mismatch(rec) is not None)
        ):
            bad += 1
            if len(numbers) < BAD_LINE_SAMPLE:
                numbers.append(number)
            continue
        records.append(rec)
    return records, bad, numbers


_SECONDS: dict[int, str] = {}  # epoch second -> "YYYY-MM-DD HH:MM:SS"
_SPANS: dict[int, tuple[str, str]] = {}  # 1-minute interval_start ms -> (start, end) text
_MILLIS = [f".{i:03d}+00" for i in range(1000)]
_CACHE_MAX = 200_000


def _second(sec: int) -> str:
    if len(_SECONDS) > _CACHE_MAX:
        _SECONDS.clear()
    text = _SECONDS[sec] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(sec))
    return text


def _span(start_ms: int, seconds: int) -> tuple[str, str]:
    q, m = divmod(start_ms, 1000)
    span = (
        (_SECONDS.get(q) or _second(q)) + _MILLIS[m],
        (_SECONDS.get(q + seconds) or _second(q + seconds)) + _MILLIS[m],
    )
    if seconds == 60 and not start_ms % 60_000:
        if len(_SPANS) > _CACHE_MAX:
            _SPANS.clear()
        _SPANS[start_ms] = span
    return span


def format_rows(
    records: Iterable[CandleRecord | Candle], lo: int, hi: int
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], set[int]]:
    """COPY rows (``COPY_COLUMNS`` order, without lake_key) split by ``lo <= start < hi``
    (a start off its interval's grid counts as outside too).

    Timestamps become UTC text with an explicit ``+00`` (from caches: this loop is the
    loader's hot path); returns (inside, outside, the hours of the outside rows).
    """
    inside: list[tuple[Any, ...]] = []
    outside: list[tuple[Any, ...]] = []
    hours: set[int] = set()
    sec = _SECONDS
    ms = _MILLIS
    spans = _SPANS
    plain = _PLAIN
    keep = inside.append
    for r in records:
        s = r.interval_start
        grid = True
        if r.interval_seconds == 60:
            span = spans.get(s)  # only minutes on the grid are cached
            if span is None:
                span = _span(s, 60)
                grid = not s % 60_000
        else:
            span = _span(s, r.interval_seconds)
            grid = not s % (r.interval_seconds * 1000)
        e = r.event_ts
        i = r.ingestion_ts
        row = (
            plain(r)
            + span
            + (
                (sec.get(e // 1000) or _second(e // 1000)) + ms[e % 1000],
                (sec.get(i // 1000) or _second(i // 1000)) + ms[i % 1000],
            )
        )
        if grid and lo <= s < hi:
            keep(row)
        else:
            outside.append(row)
            hours.add(floor_hour(s))
    return inside, outside, hours


def _csv_value(value: object) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace('"', '""') + '"'


def encode_csv(rows: Sequence[tuple[Any, ...]], lake_key: str | None) -> bytes:
    """CSV for COPY (``NULL 'null'``): JSON arrays when that is exact, else quoted by hand."""
    if not rows:
        return b""
    key_ok = lake_key is None or not any(c in lake_key for c in '"\\\r\n')
    if key_ok:
        data = _ENCODER.encode(rows)
        if b"\\" not in data and data.count(b"],[") == len(rows) - 1:
            tail = (b',"' + lake_key.encode() + b'"\n') if lake_key is not None else b",null\n"
            return data[2:-2].replace(b"],[", tail) + tail
    key_text = _csv_value(lake_key)
    return "".join(",".join(map(_csv_value, row)) + "," + key_text + "\n" for row in rows).encode()


async def copy_csv(conn: asyncpg.Connection, chunks: AsyncIterator[bytes]) -> None:
    """COPY CSV chunks (``encode_csv``) into bronze on the caller's connection."""
    await conn.copy_to_table(
        "bronze_ohlcv_native",
        schema_name="bronze",
        source=chunks,
        columns=COPY_COLUMNS,
        format="csv",
        null="null",
    )


async def one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data
