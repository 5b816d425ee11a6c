"""The candle event, canonical pairs, sources and their precedence, and UTC minute/hour maths.

Times are integers of milliseconds since the Unix epoch, always UTC: cheap on the hot path and
impossible to confuse with a local time. Prices and volumes are decimal *strings* exactly as
the exchange sent them (normalized to plain notation), so nothing is ever rounded through a
float on its way to PostgreSQL's ``numeric``.
"""

from __future__ import annotations

import enum
import hashlib
import re
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

import msgspec

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000

EXCHANGES = ("binance", "kraken")

_PAIR_RE = re.compile(r"^[A-Z0-9]{1,20}/[A-Z0-9]{1,20}$")


class Source(enum.StrEnum):
    """Where a candle came from; also the silver ``source`` column."""

    WS_FINAL = "ws_final"
    REST = "rest"
    ARCHIVE = "archive"
    TRADES = "trades"
    NO_TRADES = "no_trades"
    WS_PARTIAL = "ws_partial"


#: Lower is better. A row is only ever replaced by a row of a better (lower) rank, or of the
#: same rank with a later exchange event time / ingestion time (docs/architecture.md, silver).
#: Silver stores the rank; ``archive`` (issue 18) took 3 and moved the later ones down by one,
#: and schema.sql renumbers stored rows once (schema version 2).
SOURCE_RANK: dict[Source, int] = {
    Source.WS_FINAL: 1,
    Source.REST: 2,
    Source.ARCHIVE: 3,
    Source.TRADES: 4,
    Source.NO_TRADES: 5,
    Source.WS_PARTIAL: 6,
}

#: The worst rank that settles a minute (every source but ``ws_partial``).
SETTLED_RANK = SOURCE_RANK[Source.NO_TRADES]

#: Completeness counts are reported in this order everywhere (views, TUI, docs).
COMPLETENESS_ORDER = (
    Source.WS_FINAL,
    Source.REST,
    Source.ARCHIVE,
    Source.TRADES,
    Source.NO_TRADES,
    Source.WS_PARTIAL,
)


class Origin(enum.StrEnum):
    """How an event was obtained: captured live, fetched afterwards, or read from the exchange's
    published history files (``archive``)."""

    WS = "ws"
    REST = "rest"
    ARCHIVE = "archive"
    TRADES = "trades"
    NO_TRADES = "no_trades"


def silver_source(origin: str, is_final: bool) -> Source:
    """The silver source (and so the precedence rank) of a bronze event."""
    if origin == Origin.WS:
        return Source.WS_FINAL if is_final else Source.WS_PARTIAL
    return Source(origin)


class Pair(msgspec.Struct, frozen=True, order=True):
    """A canonical ``BASE/QUOTE`` pair. A quote is never relabelled: USDT is not USD."""

    base: str
    quote: str

    @classmethod
    def parse(cls, text: str) -> Pair:
        """Parse ``"BTC/USD"``; raise ``ValueError`` with a helpful message otherwise."""
        norm = text.strip().upper()
        if not _PAIR_RE.match(norm):
            raise ValueError(
                f"{text!r} is not a canonical pair; write it as BASE/QUOTE, e.g. 'BTC/USD'"
            )
        base, quote = norm.split("/")
        return cls(base, quote)

    def __str__(self) -> str:
        return f"{self.base}/{self.quote}"

    @property
    def lake_name(self) -> str:
        """The lake's folder spelling, ``BTC-USD``."""
        return f"{self.base}-{self.quote}"


class CandleRecord(msgspec.Struct, omit_defaults=True, gc=False):
    """A candle without its raw payload: what lake readers decode (cheaper), and the fields
    every candle has.

    Its fields are all atomic (no cycles possible), so the garbage collector does not track
    it (``gc=False``). ``origin`` says how it was obtained; ``is_final`` carries the finality
    evidence (Binance ``k.x``; Kraken a newer ``interval_begin`` or a later message on the same
    connection; REST rows only ever for closed minutes). ``event_ts`` is the exchange's time
    for the event (for REST, the time it was fetched), ``ingestion_ts`` when klined received it.
    """

    exchange: str
    symbol: str
    native_symbol: str
    interval_start: int
    open: str
    high: str
    low: str
    close: str
    volume: str
    quote_volume: str | None = None
    vwap: str | None = None
    trade_count: int | None = None
    is_final: bool = False
    origin: str = Origin.WS
    session_id: str | None = None
    event_ts: int = 0
    ingestion_ts: int = 0
    interval_seconds: int = 60

    @property
    def interval_end(self) -> int:
        return self.interval_start + self.interval_seconds * 1000

    @property
    def source(self) -> Source:
        return silver_source(self.origin, self.is_final)


class Candle(CandleRecord, omit_defaults=True, gc=False):
    """One normalized 1-minute candle event, as captured, fetched or rebuilt: a
    :class:`CandleRecord` plus ``raw``, the exchange's own JSON for it, kept verbatim in the lake.

    Build it with keywords; the adapters' hot paths pass the fields positionally, in the
    record's order, since a keyword call of a 19-field struct costs several times more.
    """

    raw: msgspec.Raw = msgspec.Raw(b"null")


# ---------------------------------------------------------------------------------------------
# shards: which capture host streams which pair


def parse_shard(text: str) -> tuple[int, int]:
    """``"k/n"`` -> ``(k, n)`` with ``1 <= k <= n <= MAX_SHARDS``; ``ValueError`` otherwise."""
    m = re.fullmatch(r"\s*(\d{1,4})\s*/\s*(\d{1,4})\s*", text)
    if m is None:
        raise ValueError(f"{text!r} is not a shard; write it as k/n, e.g. '1/2'")
    k, n = int(m[1]), int(m[2])
    if not 1 <= n <= MAX_SHARDS:
        raise ValueError(f"the shard count n must be between 1 and {MAX_SHARDS}, got {n}")
    if not 1 <= k <= n:
        raise ValueError(f"the shard number k must be between 1 and n ({n}), got {k}")
    return k, n


#: the most capture hosts one configuration can be split over
MAX_SHARDS = 1024


def shard_of(exchange: str, pair: Pair | str, n: int) -> int:
    """The shard (1..n) that streams ``pair`` of ``exchange``.

    Deterministic on every host and Python version (BLAKE2b of ``exchange:BASE/QUOTE``, never
    the randomized ``hash()``), so every host sharing a config agrees without talking: each
    listed pair belongs to exactly one shard. Jump consistent hashing (Lamping and Veach) maps
    the digest to a shard, so growing ``n`` to ``n + 1`` moves only about 1/(n + 1) of the
    pairs, all of them to the new shard.
    """
    if n <= 1:
        return 1
    digest = hashlib.blake2b(f"{exchange}:{pair}".encode(), digest_size=8).digest()
    key = int.from_bytes(digest, "big")
    b, j = -1, 0
    while j < n:
        b = j
        key = (key * 2862933555777941757 + 1) % (1 << 64)
        j = int((b + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return b + 1


# ---------------------------------------------------------------------------------------------
# decimal helpers


def plain_decimal(value: object) -> str:
    """Render a number as plain decimal text (no exponent), refusing NaN and infinities."""
    try:
        dec = value if isinstance(value, Decimal) else Decimal(str(value))
    except (InvalidOperation, ValueError) as exc:
        raise ValueError(f"not a number: {value!r}") from exc
    if not dec.is_finite():
        raise ValueError(f"not a finite number: {value!r}")
    text = format(dec, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".") or "0"
    return "0" if text in ("-0", "") else text


def check_ohlcv(open_: str, high: str, low: str, close: str, volume: str) -> str | None:
    """Why a candle's numbers are impossible, or ``None`` when they are sane."""
    try:
        o, h, lo, c, v = (Decimal(x) for x in (open_, high, low, close, volume))
    except (InvalidOperation, ValueError, TypeError):
        return "non-numeric price or volume"
    for name, val in (("open", o), ("high", h), ("low", lo), ("close", c), ("volume", v)):
        if not val.is_finite():
            return f"{name} is not finite"
    if min(o, h, lo, c) <= 0:
        return "non-positive price"
    if v < 0:
        return "negative volume"
    if h < lo:
        return "high below low"
    if not (lo <= o <= h and lo <= c <= h):
        return "open/close outside high-low range"
    return None


# ---------------------------------------------------------------------------------------------
# UTC time maths (ms since epoch)


def floor_minute(ts_ms: int) -> int:
    return ts_ms - ts_ms % MINUTE_MS


def floor_hour(ts_ms: int) -> int:
    return ts_ms - ts_ms % HOUR_MS


def floor_interval(ts_ms: int, interval_ms: int) -> int:
    """Start of the UTC-aligned bucket of ``interval_ms`` that contains ``ts_ms``."""
    return ts_ms - ts_ms % interval_ms


def minutes_of_hour(hour_ms: int) -> range:
    """The 60 minute starts of the hour that starts at ``hour_ms``."""
    start = floor_hour(hour_ms)
    return range(start, start + HOUR_MS, MINUTE_MS)


def hours_between(start_ms: int, end_ms: int) -> range:
    """Hour starts covering ``[start_ms, end_ms)``."""
    first = floor_hour(start_ms)
    return range(first, end_ms, HOUR_MS) if end_ms > start_ms else range(0)


def to_datetime(ts_ms: int) -> datetime:
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC)


def from_datetime(dt: datetime) -> int:
    """Milliseconds since the epoch; a naive datetime is taken as UTC, never local time."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return round(dt.timestamp() * 1000)


def iso(ts_ms: int) -> str:
    """``2026-11-26T13:05:00Z``, the one way klined prints a time."""
    dt = to_datetime(ts_ms)
    if ts_ms % 1000:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> int:
    """Parse a date (``2026-10-01``) or an ISO timestamp (UTC unless an offset is given)."""
    value = text.strip()
    if value.endswith("Z"):
        value = value[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(
            f"{text!r} is not a date or timestamp; use e.g. 2026-10-01 or 2026-10-01T13:00:00Z"
        ) from exc
    return from_datetime(dt)


def format_duration(seconds: float) -> str:
    """``4.2s``, ``3m07s``, ``2h05m``, ``3d04h``: the one way status and check print a span."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
