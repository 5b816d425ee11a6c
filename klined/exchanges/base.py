"""The public shape every exchange adapter shares.

Adapters are sans-I/O, in the manner of the ``websockets`` protocol core: they turn pairs into
subscribe messages and REST requests, and bytes into events and candles, and never touch a
socket. The stream runtime (``klined.streams``), the gap-filler and backfill (``klined.jobs``)
do the I/O and hand the bytes back. That keeps every protocol detail unit-testable against
payloads exactly as the exchanges document them.

Parsing never raises on bad input: a frame that cannot be understood becomes a
:class:`Malformed` event (counted and logged by the runtime), and a REST body that cannot be
understood raises :class:`klined.errors.ParseError`, which callers treat like a failed
request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from klined.model import Candle, Pair


@dataclass(frozen=True, slots=True)
class RestBudget:
    """How an exchange meters public REST calls.

    ``kind == "weight"`` (Binance): ``capacity`` weight units per ``window_s`` seconds, fixed
    window, reported back in a ``X-MBX-USED-WEIGHT-1M`` header. ``kind == "decay"`` (Kraken):
    a counter that each call raises by its cost, that decays by ``decay_per_s`` per second and
    must stay at or below ``capacity``.
    """

    kind: str
    capacity: float
    window_s: float = 60.0
    decay_per_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Limits:
    """The documented limits of an exchange that klined must respect."""

    streams_per_connection: int
    connection_lifetime_s: float | None
    max_candles_per_request: int
    ohlc_window_candles: int | None
    rest_budget: RestBudget
    ws_messages_per_s: float | None = None
    ping_interval_s: float | None = None


@dataclass(frozen=True, slots=True)
class RestRequest:
    """One HTTP request, described but not performed. ``cost`` is in the budget's units."""

    method: str
    path: str
    params: dict[str, str]
    cost: float
    kind: str  # "klines" | "ohlc" | "trades" | "listing"
    pair: Pair | None = None
    # The half-open minute range ``[start_ms, end_ms)`` a candle request is meant to cover, so
    # the parser can bound what the response proves (Kraken's ``since`` carries no end).
    start_ms: int | None = None
    end_ms: int | None = None


@dataclass(slots=True)
class CandlePage:
    """What one REST candle/trades response proves.

    ``candles`` holds only closed minutes (never the exchange's unfinished candle), with
    ``origin`` ``rest``/``trades``/``no_trades``. ``covered`` is the half-open range of minute
    starts ``[start, end)`` the response proves complete: a minute inside it without a candle
    had no trades. ``next_since`` is the cursor for the next page (Kraken ``last``), or None
    when there is nothing more to page. ``used_weight`` is the budget use the exchange
    reported (Binance ``X-MBX-USED-WEIGHT-1M``), for the shared rate limiter.
    """

    candles: list[Candle]
    covered: tuple[int, int]
    next_since: str | None = None
    used_weight: float | None = None


@dataclass(frozen=True, slots=True)
class Trade:
    """One public trade (Kraken ``Trades``), used to rebuild candles beyond the OHLC window."""

    ts_ms: int
    price: str
    volume: str
    trade_id: int | None = None


@dataclass(frozen=True, slots=True)
class TradePage:
    trades: list[Trade]
    next_since: str  # Kraken's ``last`` cursor (ns since epoch, as text)
    server_last_ms: int  # the cursor as milliseconds, to know when paging reached a minute


@dataclass(frozen=True, slots=True)
class ListedPair:
    """One pair as the exchange lists it (Binance ``exchangeInfo``, Kraken ``AssetPairs``)."""

    pair: Pair
    ws_native: str
    rest_native: str
    rest_key: str  # Kraken's result key (``XXBTZUSD``); Binance: same as rest_native
    trading: bool = True


# --------------------------------------------------------------------------------------------
# control events from a WebSocket


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The exchange acknowledged a subscription (Binance ``{"result":null}``, Kraken ack)."""

    pairs: tuple[Pair, ...]
    req_id: int | None = None


@dataclass(frozen=True, slots=True)
class SubscribeFailed:
    """A subscription was refused; ``fatal`` when retrying cannot help (unlisted pair)."""

    pairs: tuple[Pair, ...]
    message: str
    fatal: bool = True


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A keep-alive from the exchange; ``ts_ms`` when it carries a timestamp."""

    ts_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Pong:
    req_id: int | None = None


@dataclass(frozen=True, slots=True)
class ExchangeStatus:
    """Kraken's ``status`` channel and the like: the system state (``online``, ``maintenance``)."""

    state: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """An error reply that is not about a specific subscription."""

    message: str
    req_id: int | None = None


@dataclass(frozen=True, slots=True)
class Malformed:
    """A frame that could not be understood: counted, logged with ``snippet``, skipped."""

    reason: str
    snippet: str


@dataclass(slots=True)
class Frame:
    """Everything one inbound WebSocket frame carried.

    ``candles`` are normalized candle events (``is_final`` only when the frame itself proves
    it, e.g. Binance ``k.x``); ``stamp_ms`` is the exchange's own time for the frame (Binance
    ``E``, Kraken's message ``timestamp``), which the runtime uses as finality evidence for
    Kraken; ``controls`` are the control events.
    """

    candles: list[Candle] = field(default_factory=list)
    controls: list[object] = field(default_factory=list)
    stamp_ms: int | None = None


class ExchangeAdapter(Protocol):
    """What ``klined.exchanges.binance.Binance`` and ``klined.exchanges.kraken.Kraken`` provide."""

    name: str
    limits: Limits

    # symbols
    def native(self, pair: Pair) -> str: ...
    def canonical(self, native: str) -> Pair | None: ...
    def learn_listing(self, listing: dict[Pair, ListedPair]) -> None: ...

    # WebSocket
    def ws_endpoint(self, base_url: str, pairs: list[Pair]) -> str: ...
    def subscribe_messages(self, pairs: list[Pair], req_id: int) -> list[str]: ...
    def ping_message(self, req_id: int) -> str | None: ...
    def parse_frame(self, data: str | bytes, *, session_id: str, received_ms: int) -> Frame: ...

    # REST
    def listing_request(self) -> RestRequest: ...
    def parse_listing(
        self, status: int, headers: dict[str, str], body: bytes
    ) -> dict[Pair, ListedPair]: ...
    def candles_request(self, pair: Pair, start_ms: int, end_ms: int) -> RestRequest: ...
    def parse_candles(
        self,
        request: RestRequest,
        status: int,
        headers: dict[str, str],
        body: bytes,
        *,
        now_ms: int,
    ) -> CandlePage: ...
