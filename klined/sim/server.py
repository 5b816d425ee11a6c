"""Running the simulator: :func:`run_simulator` for tests, the demo and ``klined sim``.

Each exchange is one aiohttp application (its WebSocket and REST paths together) on its own
loopback port; both run on the current asyncio event loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from aiohttp import web
from loguru import logger

from klined.sim import archive, binance, kraken
from klined.sim.clock import SimClock, wall_ms
from klined.sim.config import SIM_EXCHANGES, SimConfig
from klined.sim.conn import WsConnection
from klined.sim.faults import FaultEngine
from klined.sim.log import SimLog, SimStats
from klined.sim.market import Market
from klined.sim.ratelimit import (
    BINANCE_BAN_S,
    BINANCE_WEIGHT_PER_MINUTE,
    KRAKEN_COUNTER_MAX,
    KRAKEN_DECAY_PER_S,
    BinanceWeightLimiter,
    KrakenCounterLimiter,
)


class Simulator:
    """A running simulator: URLs, the market (ground truth), the sent-event log and stats."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = cfg = config or SimConfig()
        self.clock = cfg.clock or SimClock.realtime()
        self.market = Market(
            cfg.seed,
            cfg.specs,
            quiet_every=cfg.quiet_every,
            genesis_ms=cfg.genesis_ms,
            cache_minutes=cfg.market_cache_minutes,
        )
        self.log = SimLog(self.market, cfg.log_events)
        self.stats = SimStats()
        self.faults = FaultEngine(cfg.faults, cfg.seed)
        self.stats.faults = self.faults.fired
        self.listing = {ex: cfg.listing(ex) for ex in SIM_EXCHANGES}
        #: native symbol -> canonical pair, per exchange (Binance ``BTCUSD``)
        self.native_index = {"binance": {binance.native(p): p for p in self.listing["binance"]}}
        #: every name Kraken REST accepts for a listed pair (key, altname, wsname, v2 name)
        self.kraken_rest_index: dict[str, str] = {}
        for p in self.listing["kraken"]:
            n = kraken.names(p)
            for alias in (n["key"], n["altname"], n["wsname"], n["ws2"]):
                self.kraken_rest_index[alias.upper()] = p
        self.kraken_ws_index = {kraken.names(p)["ws2"]: p for p in self.listing["kraken"]}
        ts = cfg.rate_limit_time_scale
        self.binance_limiter = BinanceWeightLimiter(
            BINANCE_WEIGHT_PER_MINUTE * cfg.rate_limit_scale,
            60.0 / ts,
            ban_after=cfg.binance_ban_after,
            ban_s=BINANCE_BAN_S / ts,
        )
        self.kraken_limiter = KrakenCounterLimiter(
            KRAKEN_COUNTER_MAX * cfg.rate_limit_scale, KRAKEN_DECAY_PER_S * ts
        )
        #: Binance US's published kline archive, served from the market
        self.binance_archive = archive.BinanceArchive(self)
        self.connections: set[WsConnection] = set()
        self.stopping = anyio.Event()
        self._runners: list[web.AppRunner] = []
        self.ports: dict[str, int] = {}

    # -- URLs ------------------------------------------------------------------------------------

    @property
    def binance_ws_url(self) -> str:
        return f"ws://{self.config.host}:{self.ports['binance']}"

    @property
    def binance_rest_url(self) -> str:
        return f"http://{self.config.host}:{self.ports['binance']}"

    @property
    def binance_archive_url(self) -> str:
        """The archive's base URL, as ``exchanges.binance.archive_url`` wants it."""
        return f"http://{self.config.host}:{self.ports['binance_archive']}{archive.PREFIX}"

    @property
    def kraken_ws_url(self) -> str:
        return f"ws://{self.config.host}:{self.ports['kraken']}/v2"

    @property
    def kraken_rest_url(self) -> str:
        return f"http://{self.config.host}:{self.ports['kraken']}"

    def urls(self, exchange: str) -> tuple[str, str]:
        """``(ws_url, rest_url)`` as klined's ``[exchanges.*]`` config wants them."""
        if exchange == "binance":
            return self.binance_ws_url, self.binance_rest_url
        return self.kraken_ws_url, self.kraken_rest_url

    def config_snippet(self) -> str:
        """A ready-to-paste ``klined.toml`` fragment pointing klined at this simulator."""
        lines = []
        for ex in SIM_EXCHANGES:
            ws, rest = self.urls(ex)
            lines += [f"[exchanges.{ex}]", f'ws_url = "{ws}"', f'rest_url = "{rest}"']
            if ex == "binance":
                lines.append(f'archive_url = "{self.binance_archive_url}"')
            lines.append("")
        return "\n".join(lines)

    # -- connections (called by the servers) -----------------------------------------------------

    def open_connection(
        self, exchange: str, request: web.Request, ws: web.WebSocketResponse
    ) -> WsConnection:
        self.stats.connections[exchange] += 1
        conn = WsConnection(self, exchange, self.stats.connections[exchange], request, ws)
        self.connections.add(conn)
        self.stats.connection_log.append(conn.info)
        logger.debug("sim {}: connection {} opened {}", exchange, conn.number, request.path_qs)
        return conn

    def close_connection(self, conn: WsConnection) -> None:
        self.connections.discard(conn)
        conn.info.closed_ms = wall_ms()
        logger.debug(
            "sim {}: connection {} closed ({})", conn.exchange, conn.number, conn.info.close_reason
        )

    def subscribe_fault(self, exchange: str, connection: int, pair: str) -> bool:
        fired = self.faults.on_subscribe(exchange, connection, pair)
        if fired is None:
            return False
        self.faults.record(
            fired[0], fired[1], exchange, wall_ms(), sim_ms=self.clock.now_ms(),
            connection=connection, pair=pair,
        )  # fmt: skip
        return True

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        apps = {
            "binance": binance.build_app(self),
            "kraken": kraken.build_app(self),
            "binance_archive": archive.build_app(self, self.binance_archive),
        }
        ports = {
            "binance": self.config.binance_port,
            "kraken": self.config.kraken_port,
            "binance_archive": self.config.binance_archive_port,
        }
        for name, app in apps.items():
            # long combined-stream URLs (``/stream?streams=`` with hundreds of streams)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0, max_line_size=65536)
            await runner.setup()
            self._runners.append(runner)
            site = web.TCPSite(runner, self.config.host, ports[name], reuse_address=True)
            await site.start()
            server = site._server
            sockets = getattr(server, "sockets", None) or []
            self.ports[name] = sockets[0].getsockname()[1] if sockets else ports[name]
        logger.info(
            "simulator up: binance {} (archive {}) kraken {} (seed {}, speed {})",
            self.binance_rest_url, self.binance_archive_url, self.kraken_rest_url,
            self.config.seed, self.clock.speed,
        )  # fmt: skip

    async def stop(self) -> None:
        self.stopping.set()
        for conn in list(self.connections):
            await conn.close(1001, "", reason="simulator stopped")
        for runner in self._runners:
            with anyio.move_on_after(5), contextlib.suppress(Exception):
                await runner.cleanup()
        self._runners.clear()


@asynccontextmanager
async def run_simulator(config: SimConfig | None = None) -> AsyncIterator[Simulator]:
    """Start both exchanges on loopback; stop them (bounded, shielded) on exit."""
    sim = Simulator(config)
    try:
        await sim.start()
        yield sim
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await sim.stop()
