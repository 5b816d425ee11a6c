"""Small pure helpers shared by the exchange adapters (no I/O, no clocks)."""

from __future__ import annotations

import re
from calendar import timegm
from decimal import Decimal, InvalidOperation
from email.utils import parsedate_to_datetime

import msgspec

from klined.config import SymbolOverride
from klined.exchanges.base import Frame, Malformed
from klined.model import MINUTE_MS, Candle, Pair, check_ohlcv, plain_decimal

SNIPPET_CHARS = 200

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})$"
)
#: What follows a UTC minute prefix the full parser has already validated (see
#: ``parse_rfc3339_ms``): seconds, an optional fraction (its first three digits captured), ``Z``.
#: ASCII digits only, so anything the full pattern reads differently (other digits, a trailing
#: newline) takes the full path.
_RFC3339_TAIL = re.compile(r":([0-5][0-9]|60)(?:\.([0-9]{1,3})[0-9]{0,6})?[Zz]")
#: ``YYYY-MM-DDTHH:MM`` -> that minute in ms, for prefixes the full parser accepted in UTC
_MINUTE_PREFIXES: dict[str, int] = {}
#: whole texts that name a minute start (Kraken's ``interval_begin``) -> ms
_MINUTE_TEXTS: dict[str, int] = {}
_MAX_CACHED = 10_000

#: Plain non-negative decimal text (no sign, exponent, spaces or superfluous leading zero):
#: nearly every number either exchange sends. The group is that text without a fraction's
#: trailing zeros, which is what ``plain_decimal`` makes of it.
_PLAIN_NUMBER = re.compile(r"((?:0|[1-9][0-9]*)(?:\.[0-9]*[1-9])?)(?:\.0+|0*)").fullmatch
#: number text -> (``plain_decimal`` of it, its value), for plain text (see ``plain_number``)
PLAIN: dict[str, tuple[str, Decimal]] = {}
_MAX_PLAIN = 16_384


def as_bytes(data: str | bytes | bytearray | memoryview) -> bytes:
    """Frames arrive as text or bytes; decoders want bytes."""
    if isinstance(data, str):
        return data.encode("utf-8", errors="surrogatepass")
    return bytes(data)


def snippet(data: str | bytes | bytearray | memoryview, limit: int = SNIPPET_CHARS) -> str:
    """A short, printable excerpt of a payload for logs and errors (at most ``limit`` chars)."""
    text = data if isinstance(data, str) else bytes(data).decode("utf-8", errors="replace")
    text = " ".join(text.split())  # one line, indentation collapsed
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def distrust(frame: Frame) -> Frame:
    """Drop the exchange time of a frame that carried nothing but garbage.

    The runtime takes ``stamp_ms`` as evidence that earlier minutes are over (Kraken
    finality); a frame that could not be understood must not vouch for anything.
    """
    garbage = bool(frame.controls) and all(isinstance(c, Malformed) for c in frame.controls)
    if garbage and not frame.candles:
        frame.stamp_ms = None
    return frame


def compact_raw(buf: bytes) -> msgspec.Raw:
    """Keep the exchange's JSON verbatim, but on one line.

    The lake is JSON Lines, so a pretty-printed frame must not carry its line breaks in. Inside
    JSON strings a raw CR/LF is illegal, so every CR/LF in valid JSON is insignificant
    whitespace and replacing it with a space keeps the document byte-for-byte equivalent.
    """
    buf = buf.strip()
    # find(10): ``in`` first tries its operand as an int and builds a TypeError each time
    if buf.find(10) >= 0 or buf.find(13) >= 0:
        buf = buf.replace(b"\r", b" ").replace(b"\n", b" ")
    return msgspec.Raw(buf)


def parse_rfc3339_ms(text: str) -> int:
    """``2023-10-04T15:25:00.000000000Z`` -> ms since the epoch (fraction truncated, UTC).

    Kraken sends up to nine fractional digits, more than ``datetime`` keeps; this parser takes
    the calendar fields directly and never goes through a float. Kraken stamps every message
    and every candle, so the calendar work is done once per minute: texts that name a minute
    start are remembered whole, and so is a UTC minute prefix the full parser has accepted; a
    text that continues such a prefix with plain seconds is read from there (the same result,
    since ``timegm`` is linear in the seconds).
    """
    ms = _MINUTE_TEXTS.get(text)
    if ms is not None:
        return ms
    minute_ms = _MINUTE_PREFIXES.get(text[:16])
    tail = None if minute_ms is None else _RFC3339_TAIL.fullmatch(text, 16)
    if minute_ms is not None and tail is not None:
        second, frac = tail.groups()
        ms = minute_ms + int(second) * 1000 + (int((frac + "00")[:3]) if frac else 0)
    else:
        ms = _parse_rfc3339_full(text)
    if ms % MINUTE_MS == 0:
        if len(_MINUTE_TEXTS) >= _MAX_CACHED:
            _MINUTE_TEXTS.clear()
        _MINUTE_TEXTS[text] = ms
    return ms


def _parse_rfc3339_full(text: str) -> int:
    m = _RFC3339.match(text)
    if m is None:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour <= 23 and minute <= 59 and second <= 60):
        raise ValueError(f"not a valid time: {text!r}")
    frac = m.group(7) or ""
    millis = int((frac + "000")[:3])
    seconds = timegm((year, month, day, hour, minute, second, 0, 0, 0))
    tz = m.group(8)
    if tz not in ("Z", "z"):
        sign = 1 if tz[0] == "+" else -1
        seconds -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    elif m.end(5) == 16:
        if len(_MINUTE_PREFIXES) >= _MAX_CACHED:
            _MINUTE_PREFIXES.clear()
        _MINUTE_PREFIXES[text[:16]] = (seconds - second) * 1000
    return seconds * 1000 + millis


def retry_after_s(headers: dict[str, str], now_ms: int | None = None) -> float | None:
    """The ``Retry-After`` header in seconds: delay-seconds or an HTTP date (needs ``now_ms``)."""
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        seconds = None
    if seconds is not None:
        return seconds if seconds >= 0 and seconds == seconds and seconds != float("inf") else None
    if now_ms is None:
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now_ms / 1000)


def header_float(headers: dict[str, str], name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def to_decimal(value: object, what: str) -> Decimal:
    """A finite Decimal from exchange text/number, or ``ValueError`` naming the field."""
    try:
        dec = value if isinstance(value, Decimal) else Decimal(str(value))
    except (InvalidOperation, ValueError, TypeError):
        raise ValueError(f"{what} is not a number: {value!r}") from None
    if not dec.is_finite():
        raise ValueError(f"{what} is not finite: {value!r}")
    return dec


def check_numbers(o: object, h: object, lo: object, c: object, v: object) -> str | None:
    """``check_ohlcv`` for raw exchange values (strings or Decimals)."""
    return check_ohlcv(str(o), str(h), str(lo), str(c), str(v))


def plain_number(value: object) -> tuple[str, Decimal] | None:
    """``(plain_decimal(value), Decimal(value))`` for plain non-negative decimal text or a
    non-negative int; None for anything else (the caller then takes the exact path).

    For such text ``plain_decimal`` only drops a fraction's trailing zeros: string work, no
    ``Decimal`` round trip. Texts are memoized in ``PLAIN`` (prices repeat from one update to
    the next), so hot callers look there first: ``PLAIN.get(x) or plain_number(x)``.
    """
    if type(value) is int:  # not bool: True is no number here
        return (str(value), Decimal(value)) if value >= 0 else None
    if not isinstance(value, str):
        return None
    m = _PLAIN_NUMBER(value)
    if m is None:
        return None
    text = m.group(1)
    if len(PLAIN) >= _MAX_PLAIN:
        PLAIN.clear()
    known = PLAIN[value] = (text, Decimal(text))
    return known


def plain_text(value: object) -> str | None:
    """``plain_number(value)[0]`` without the ``Decimal`` and the memo: for values that rarely
    repeat (volumes) and are never compared, only checked for zero by their text."""
    if type(value) is int:
        return str(value) if value >= 0 else None
    if not isinstance(value, str):
        return None
    m = _PLAIN_NUMBER(value)
    return None if m is None else m.group(1)


def plain_of(dec: Decimal) -> str:
    """``plain_decimal`` of a finite non-negative Decimal, via ``str`` when that is already
    plain notation (the same digits as ``format(dec, "f")``)."""
    text = str(dec)
    if "E" in text or text[0] == "-":
        return plain_decimal(dec)
    return text.rstrip("0").rstrip(".") if "." in text else text


class Scaled(msgspec.Struct, frozen=True):
    """A candle's numbers in canonical units, as plain decimal strings."""

    open: str
    high: str
    low: str
    close: str
    volume: str
    quote_volume: str | None
    vwap: str | None

    def candle(
        self,
        exchange: str,
        pair: Pair,
        native_symbol: str,
        interval_start: int,
        *,
        trade_count: int | None,
        is_final: bool,
        origin: str,
        event_ts: int,
        ingestion_ts: int,
        raw: msgspec.Raw,
        session_id: str | None = None,
    ) -> Candle:
        """The candle with these numbers: how the exact WS paths and REST build theirs."""
        return Candle(
            exchange=exchange,
            symbol=str(pair),
            native_symbol=native_symbol,
            interval_start=interval_start,
            open=self.open,
            high=self.high,
            low=self.low,
            close=self.close,
            volume=self.volume,
            quote_volume=self.quote_volume,
            vwap=self.vwap,
            trade_count=trade_count,
            is_final=is_final,
            origin=origin,
            session_id=session_id,
            event_ts=event_ts,
            ingestion_ts=ingestion_ts,
            raw=raw,
        )


def scale(
    o: Decimal,
    h: Decimal,
    lo: Decimal,
    c: Decimal,
    v: Decimal,
    *,
    multiplier: int,
    quote_volume: Decimal | None = None,
    vwap: Decimal | None = None,
) -> Scaled:
    """Convert native numbers to canonical units.

    One native unit is ``multiplier`` base units (e.g. ``1000REKT``): a canonical price is the
    native price / multiplier and a canonical volume the native volume x multiplier; the quote
    volume is the same money either way. Without an exchange vwap, vwap = quote volume /
    volume when there was volume.
    """
    if multiplier != 1:
        m = Decimal(multiplier)
        o, h, lo, c = o / m, h / m, lo / m, c / m
        v = v * m
        if vwap is not None:
            vwap = vwap / m
    if vwap is None and quote_volume is not None and v > 0:
        vwap = quote_volume / v
    return Scaled(
        open=plain_decimal(o),
        high=plain_decimal(h),
        low=plain_decimal(lo),
        close=plain_decimal(c),
        volume=plain_decimal(v),
        quote_volume=None if quote_volume is None else plain_decimal(quote_volume),
        vwap=None if vwap is None else plain_decimal(vwap),
    )


def ceil_minute(ts_ms: int) -> int:
    return -((-ts_ms) // MINUTE_MS) * MINUTE_MS


class SymbolMap:
    """Per-pair overrides from the config plus names learned from the listing.

    ``native`` is the exchange's streaming name, ``rest`` its REST name (Kraken differs);
    ``multiplier`` scales prices and volumes. Explicit overrides always win over names
    learned from a listing. ``resolved`` memoizes the adapter's ``canonical`` (every streamed
    event asks it); it is emptied whenever a name is learned.
    """

    #: bound of ``resolved`` (names nobody subscribed to must not grow it without limit)
    MAX_RESOLVED = 20_000

    def __init__(self, overrides: dict[Pair, SymbolOverride] | None) -> None:
        self.overrides: dict[Pair, SymbolOverride] = dict(overrides or {})
        self.resolved: dict[str, Pair | None] = {}
        #: native name -> canonical text, for pairs without a multiplier (the fast paths')
        self.plain_names: dict[str, str] = {}
        #: pairs whose native units differ from canonical ones (``multiplier != 1``)
        self.scaled: frozenset[Pair] = frozenset(
            p for p, ov in self.overrides.items() if ov.multiplier > 0 and ov.multiplier != 1
        )
        self._native: dict[Pair, str] = {}
        self._rest: dict[Pair, str] = {}
        self._by_native: dict[str, Pair] = {}
        self._by_rest: dict[str, Pair] = {}
        self._streamed: set[Pair] = set()
        for pair, ov in self.overrides.items():
            if ov.native:
                self._native[pair] = ov.native
                self._by_native[ov.native.upper()] = pair
            if ov.rest_native:
                self._rest[pair] = ov.rest_native
                self._by_rest[ov.rest_native.upper()] = pair

    def native(self, pair: Pair) -> str | None:
        return self._native.get(pair)

    def rest(self, pair: Pair) -> str | None:
        return self._rest.get(pair)

    def by_native(self, name: str) -> Pair | None:
        return self._by_native.get(name.upper())

    def by_rest(self, name: str) -> Pair | None:
        return self._by_rest.get(name.upper())

    def multiplier(self, pair: Pair) -> int:
        ov = self.overrides.get(pair)
        return ov.multiplier if ov is not None and ov.multiplier > 0 else 1

    def remember(self, name: str, pair: Pair | None) -> Pair | None:
        """Memoize ``canonical(name)``; return ``pair``."""
        if len(self.resolved) >= self.MAX_RESOLVED:
            self.resolved.clear()
        self.resolved[name] = pair
        return pair

    def plain_name(self, name: str, pair: Pair | None) -> str | None:
        """The canonical text of ``pair`` (``canonical(name)``) when it has no multiplier,
        memoized; None otherwise."""
        if pair is None or pair in self.scaled:
            return None
        if len(self.plain_names) >= self.MAX_RESOLVED:
            self.plain_names.clear()
        text = self.plain_names[name] = str(pair)
        return text

    def _forget(self) -> None:
        self.resolved.clear()
        self.plain_names.clear()

    def note_streamed(self, pair: Pair, native: str) -> None:
        """Map a streamed name back to the pair it was subscribed for (names already known
        from an override or a listing keep their pair)."""
        if self._by_native.setdefault(native.upper(), pair) == pair:
            self._streamed.add(pair)
            self._forget()

    def known_pairs(self) -> set[Pair]:
        """Every pair the map has been told about (overrides, listing, subscriptions)."""
        return {*self.overrides, *self._native, *self._streamed}

    def learn(self, pair: Pair, native: str, rest: str) -> None:
        """Record a listed pair's names unless the config overrides them."""
        self._forget()
        ov = self.overrides.get(pair)
        if not (ov and ov.native) and native:
            self._native[pair] = native
            self._by_native.setdefault(native.upper(), pair)
        if not (ov and ov.rest_native) and rest:
            self._rest[pair] = rest
            self._by_rest.setdefault(rest.upper(), pair)
