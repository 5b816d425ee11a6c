"""What the simulator actually sent, and its counters.

:class:`SimLog` records every candle event that went out over a WebSocket (after faults: a
dropped or replaced message is not in it, a duplicated one is in it twice with ``duplicate``
set), so an integration test can prove that every event the simulator sent reached the lake
exactly once. :class:`SimStats` counts requests, rate-limit refusals and connections.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import msgspec

from klined.sim.faults import FiredFault

if TYPE_CHECKING:
    from klined.sim.market import Agg, Market


class SentEvent(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One candle event as sent. Numbers are plain decimal strings (as truth renders them).

    ``is_final`` is what the payload says (Binance ``k.x``; always false for Kraken, which has
    no final flag); ``last_update`` is the simulator's knowledge that no later update of this
    minute follows on a healthy connection (Binance finals, Kraken's last trade of a minute).
    ``event_ms`` is the payload's own time (Binance ``E``, Kraken ``timestamp``), ``sent_ms``
    the wall time of the send and ``sent_sim_ms`` the sim time of the send.
    """

    exchange: str
    pair: str
    minute: int
    kind: str  # "update" | "final" | "snapshot"
    is_final: bool
    last_update: bool
    open: str
    high: str
    low: str
    close: str
    volume: str
    quote_volume: str | None
    vwap: str | None
    trades: int
    connection: int
    seq: int  # candle message number on the connection (from 1)
    event_ms: int
    sent_ms: int
    sent_sim_ms: int
    duplicate: bool = False
    delayed: bool = False


class _Sent(NamedTuple):
    """The compact form kept per sent event; numbers are formatted only when read."""

    exchange: str
    pair: str
    minute: int
    kind: str
    final: bool
    agg: Agg | None
    connection: int
    seq: int
    event_ms: int
    sent_ms: int
    sent_sim_ms: int
    duplicate: bool
    delayed: bool


class SimLog:
    """An append-only, queryable record of sent candle events (cheap to append)."""

    def __init__(self, market: Market, enabled: bool = True) -> None:
        self.market = market
        self.enabled = enabled
        self._raw: list[_Sent] = []
        self._cache: list[SentEvent] = []

    def record(
        self,
        exchange: str,
        pair: str,
        minute: int,
        kind: str,
        final: bool,
        agg: Agg | None,
        *,
        connection: int,
        seq: int,
        event_ms: int,
        sent_ms: int,
        sent_sim_ms: int,
        duplicate: bool = False,
        delayed: bool = False,
    ) -> None:
        if self.enabled:
            raw = _Sent(exchange, pair, minute, kind, final, agg, connection, seq, event_ms,
                        sent_ms, sent_sim_ms, duplicate, delayed)  # fmt: skip
            self._raw.append(raw)

    def _event(self, raw: _Sent) -> SentEvent:
        truth = self.market.candle(raw.exchange, raw.pair, raw.minute, raw.agg)
        binance = raw.exchange == "binance"
        return SentEvent(
            exchange=raw.exchange,
            pair=raw.pair,
            minute=raw.minute,
            kind=raw.kind,
            is_final=raw.final and binance,
            last_update=raw.final,
            open=truth.open,
            high=truth.high,
            low=truth.low,
            close=truth.close,
            volume=truth.volume,
            quote_volume=truth.quote_volume if binance else None,
            vwap=None if binance else truth.vwap,
            trades=truth.trades,
            connection=raw.connection,
            seq=raw.seq,
            event_ms=raw.event_ms,
            sent_ms=raw.sent_ms,
            sent_sim_ms=raw.sent_sim_ms,
            duplicate=raw.duplicate,
            delayed=raw.delayed,
        )

    @property
    def events(self) -> list[SentEvent]:
        """Every sent candle event, in send order."""
        if len(self._cache) < len(self._raw):
            self._cache.extend(self._event(r) for r in self._raw[len(self._cache) :])
        return self._cache

    def __len__(self) -> int:
        return len(self._raw)

    def __iter__(self) -> Iterator[SentEvent]:
        return iter(self.events)

    def query(
        self,
        *,
        exchange: str | None = None,
        pair: str | None = None,
        minute: int | None = None,
        is_final: bool | None = None,
        connection: int | None = None,
        kind: str | None = None,
    ) -> list[SentEvent]:
        return [
            e
            for e in self.events
            if (exchange is None or e.exchange == exchange)
            and (pair is None or e.pair == pair)
            and (minute is None or e.minute == minute)
            and (is_final is None or e.is_final == is_final)
            and (connection is None or e.connection == connection)
            and (kind is None or e.kind == kind)
        ]

    def finals(self, exchange: str | None = None, pair: str | None = None) -> list[SentEvent]:
        return self.query(exchange=exchange, pair=pair, is_final=True)

    def last_updates(
        self, exchange: str | None = None, pair: str | None = None
    ) -> dict[tuple[str, str, int], SentEvent]:
        """The last event sent per (exchange, pair, minute), in send order."""
        out: dict[tuple[str, str, int], SentEvent] = {}
        for e in self.query(exchange=exchange, pair=pair):
            out[(e.exchange, e.pair, e.minute)] = e
        return out

    def minutes(self, exchange: str, pair: str) -> list[int]:
        return sorted({r.minute for r in self._raw if r.exchange == exchange and r.pair == pair})

    def to_jsonl(self) -> bytes:
        enc = msgspec.json.Encoder()
        return b"".join(enc.encode(e) + b"\n" for e in self.events)

    def clear(self) -> None:
        self._raw.clear()
        self._cache.clear()


@dataclass
class ConnectionInfo:
    exchange: str
    number: int  # nth connection to this exchange, from 1
    path: str
    opened_ms: int
    closed_ms: int | None = None
    close_reason: str = ""
    subscriptions: list[str] = field(default_factory=list)
    scheduled: int = 0  # candle events due on this connection (fault ``message`` numbers)
    messages: int = 0  # candle messages actually sent


@dataclass
class SimStats:
    """Counters for tests: ``requests['binance']``, ``http_429``, ``http_418``..."""

    requests: Counter[str] = field(default_factory=Counter)  # per exchange
    endpoints: Counter[str] = field(default_factory=Counter)  # per "exchange path"
    http_429: int = 0
    http_418: int = 0
    http_5xx: int = 0
    kraken_rate_limited: int = 0
    archive_requests: int = 0  # Binance archive files and checksums asked for
    connections: Counter[str] = field(default_factory=Counter)  # opened, per exchange
    ws_messages: Counter[str] = field(default_factory=Counter)  # candle messages sent
    connection_log: list[ConnectionInfo] = field(default_factory=list)
    #: every fault that fired (the same list as ``sim.faults.fired``)
    faults: list[FiredFault] = field(default_factory=list)

    def open_connections(self, exchange: str | None = None) -> list[ConnectionInfo]:
        return [
            c
            for c in self.connection_log
            if c.closed_ms is None and (exchange is None or c.exchange == exchange)
        ]

    def connections_of(self, exchange: str) -> Iterable[ConnectionInfo]:
        return (c for c in self.connection_log if c.exchange == exchange)
