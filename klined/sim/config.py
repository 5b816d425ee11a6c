"""How a simulator run is set up (:class:`SimConfig`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from klined.model import Pair
from klined.sim.clock import SimClock
from klined.sim.faults import FaultPlan
from klined.sim.market import (
    BINANCE_USDT_PAIRS,
    DEFAULT_PAIRS,
    GENESIS_MS,
    QUIET_EVERY,
    PairSpec,
)

SIM_EXCHANGES = ("binance", "kraken")

#: 2025-01-01T00:00:00Z: Binance's spot archives are in microseconds from here on
ARCHIVE_MICROS_FROM = 1_735_689_600_000


@dataclass(kw_only=True)
class SimConfig:
    """Everything a run of the simulator needs; every field has a sensible default.

    Times named ``*_ms`` are sim-clock milliseconds; durations named ``*_s`` are wall seconds
    (connection-level timers), except where noted.
    """

    seed: int = 1
    #: pairs the market knows and both exchanges list (canonical ``BASE/QUOTE``)
    pairs: Sequence[str] = DEFAULT_PAIRS
    #: extra pairs only Binance lists
    binance_extra_pairs: Sequence[str] = BINANCE_USDT_PAIRS
    #: explicit listing per exchange (overrides ``pairs`` + extras for that exchange)
    listed: Mapping[str, Sequence[str]] | None = None
    #: market overrides per pair (price, precisions, liquidity)
    specs: Mapping[str, PairSpec] = field(default_factory=dict)
    quiet_every: int = QUIET_EVERY
    genesis_ms: int = GENESIS_MS
    #: (exchange, pair, minute) entries the market keeps computed (~3 KB each)
    market_cache_minutes: int = 50_000

    #: None: real time (now, speed 1)
    clock: SimClock | None = None
    #: "realtime" (events as the sim clock reaches them) or "replay" (a past range, fast)
    mode: str = "realtime"
    replay_from: int | None = None
    replay_to: int | None = None
    #: after the replay range: "close" the connection or keep it "idle"
    replay_end: str = "close"

    faults: FaultPlan = field(default_factory=FaultPlan)

    rate_limits: bool = True
    #: budget multiplier (Binance weight per window, Kraken counter max)
    rate_limit_scale: float = 1.0
    #: time compression of windows, decay and bans (60: a Binance "minute" is 1 wall second)
    rate_limit_time_scale: float = 1.0
    #: Binance: over-limit requests after a 429 (while it is in force) before a 418 ban
    binance_ban_after: int = 2

    host: str = "127.0.0.1"
    binance_port: int = 0
    kraken_port: int = 0

    #: Binance kline push period while a minute is open (sim ms)
    binance_update_ms: int = 2000
    #: push every period even without new trades (default: only when the candle changed)
    binance_push_unchanged: bool = False
    #: how long after the minute ends the final ``x:true`` event is stamped/sent (sim ms)
    binance_final_delay_ms: int = 5
    #: a well-formed stream for an unlisted symbol: "silent" (as Binance) or "error"
    binance_unknown_symbol: str = "silent"
    binance_max_streams: int = 1024
    #: incoming messages (text, ping, pong) per second before Binance drops the connection; 0: off
    binance_max_incoming_per_s: float = 5.0
    binance_ping_interval_s: float = 180.0
    binance_pong_timeout_s: float = 600.0
    binance_connection_lifetime_s: float = 86_400.0

    #: Binance US's archive (``sim.archive``): on its own port, like its own host
    binance_archive_port: int = 0
    #: a month's file appears this many sim days after the month (days: the next day)
    binance_archive_monthly_delay_days: int = 0
    #: files from this sim time on have microsecond timestamps (Binance: 2025-01-01)
    binance_archive_micros_from: int = ARCHIVE_MICROS_FROM
    #: which files start with a header row: "never", "always" or "mixed" (a seeded half)
    binance_archive_header: str = "mixed"

    kraken_heartbeat_s: float = 1.0
    #: minutes of candles in the ohlc subscribe snapshot (traded ones; at least the last one)
    kraken_snapshot_minutes: int = 5
    kraken_ohlc_window: int = 720
    #: quiet minutes in REST OHLC: "omit" them or show them "flat" (zero volume, vwap 0)
    kraken_ohlc_quiet: str = "omit"

    #: record every sent candle event in ``sim.log``
    log_events: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("realtime", "replay"):
            raise ValueError("mode must be 'realtime' or 'replay'")
        if self.mode == "replay" and (
            self.replay_from is None or self.replay_to is None or self.replay_to <= self.replay_from
        ):
            raise ValueError("replay mode needs replay_from < replay_to (ms)")
        if self.replay_end not in ("close", "idle"):
            raise ValueError("replay_end must be 'close' or 'idle'")
        if self.binance_unknown_symbol not in ("silent", "error"):
            raise ValueError("binance_unknown_symbol must be 'silent' or 'error'")
        if self.binance_archive_header not in ("never", "always", "mixed"):
            raise ValueError("binance_archive_header must be 'never', 'always' or 'mixed'")
        if self.kraken_ohlc_quiet not in ("omit", "flat"):
            raise ValueError("kraken_ohlc_quiet must be 'omit' or 'flat'")
        for p in [*self.pairs, *self.binance_extra_pairs, *(self.listed or {}).get("binance", ())]:
            Pair.parse(p)

    def listing(self, exchange: str) -> list[str]:
        """The pairs ``exchange`` lists, canonical, in order."""
        if self.listed is not None and exchange in self.listed:
            names = list(self.listed[exchange])
        else:
            names = list(self.pairs)
            if exchange == "binance":
                names += [p for p in self.binance_extra_pairs if p not in names]
        return [str(Pair.parse(p)) for p in names]
