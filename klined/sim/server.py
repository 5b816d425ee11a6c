"""Running the simulator: :func:`run_simulator` for tests and the demo, ``klined sim`` for people.

Each exchange is one aiohttp application (its WebSocket and REST paths together) on its own
loopback port; both run on the current asyncio event loop.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import click
import msgspec
from aiohttp import web
from loguru import logger

from klined.model import MINUTE_MS, Pair, floor_minute, iso, parse_time
from klined.sim import binance, kraken
from klined.sim.clock import SimClock, wall_ms
from klined.sim.config import SIM_EXCHANGES, SimConfig
from klined.sim.conn import WsConnection
from klined.sim.faults import FaultEngine, FaultPlan
from klined.sim.log import SimLog, SimStats
from klined.sim.market import DEFAULT_PAIRS, Market, synthetic_pairs
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
            lines += [f"[exchanges.{ex}]", f'ws_url = "{ws}"', f'rest_url = "{rest}"', ""]
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
        apps = {"binance": binance.build_app(self), "kraken": kraken.build_app(self)}
        ports = {"binance": self.config.binance_port, "kraken": self.config.kraken_port}
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
            "simulator up: binance {} kraken {} (seed {}, speed {})",
            self.binance_rest_url, self.kraken_rest_url, self.config.seed, self.clock.speed,
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


# ---------------------------------------------------------------------------------------------
# CLI


def _pairs_option(value: str | None) -> list[str]:
    if not value:
        return list(DEFAULT_PAIRS)
    if value.isdigit():
        return synthetic_pairs(int(value))
    try:
        return [str(Pair.parse(p)) for p in value.split(",") if p.strip()]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _time_option(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=name) from exc


@click.group("sim", invoke_without_command=True)
@click.option("--seed", type=int, default=1, show_default=True, help="Market seed.")
@click.option(
    "--speed", type=float, default=1.0, show_default=True, help="Sim seconds per wall second."
)
@click.option("--start", "start", default=None, help="Sim start time (ISO or date; default now).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--binance-port", type=int, default=8901, show_default=True, help="0: pick a free port."
)
@click.option(
    "--kraken-port", type=int, default=8902, show_default=True, help="0: pick a free port."
)
@click.option("--faults", "faults_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Fault plan (JSON or TOML with [[rules]]).")  # fmt: skip
@click.option("--pairs", default=None, help="Comma-separated pairs, or N for N synthetic pairs.")
@click.option(
    "--mode", type=click.Choice(["realtime", "replay"]), default="realtime", show_default=True
)
@click.option("--from", "from_", default=None, help="Replay range start (replay mode).")
@click.option("--to", "to", default=None, help="Replay range end, exclusive (replay mode).")
@click.option(
    "--replay-end",
    type=click.Choice(["close", "idle"]),
    default="idle",
    show_default=True,
    help="After the replay range: close connections or keep them idle.",
)
@click.option("--rate-limit-scale", type=float, default=1.0, show_default=True)
@click.pass_context
def sim_command(
    ctx: click.Context,
    seed: int,
    speed: float,
    start: str | None,
    host: str,
    binance_port: int,
    kraken_port: int,
    faults_path: str | None,
    pairs: str | None,
    mode: str,
    from_: str | None,
    to: str | None,
    replay_end: str,
    rate_limit_scale: float,
) -> None:
    """Run a Binance US + Kraken simulator on loopback until Ctrl-C."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        plan = FaultPlan.load(faults_path) if faults_path else FaultPlan()
        cfg = SimConfig(
            seed=seed,
            pairs=_pairs_option(pairs),
            clock=SimClock(_time_option(start, "--start"), speed),
            mode=mode,
            replay_from=_time_option(from_, "--from"),
            replay_to=_time_option(to, "--to"),
            replay_end=replay_end,
            faults=plan,
            rate_limit_scale=rate_limit_scale,
            host=host,
            binance_port=binance_port,
            kraken_port=kraken_port,
        )
    except (ValueError, OSError) as exc:
        raise click.UsageError(str(exc)) from exc

    async def main() -> None:
        async with run_simulator(cfg) as sim:
            click.echo(f"binance  ws {sim.binance_ws_url}  rest {sim.binance_rest_url}")
            click.echo(f"kraken   ws {sim.kraken_ws_url}  rest {sim.kraken_rest_url}")
            click.echo(f"sim clock {iso(sim.clock.now_ms())} x{sim.clock.speed:g}, seed {seed}")
            click.echo("\n# paste into klined.toml:\n" + sim.config_snippet())
            click.echo("Ctrl-C to stop.")
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
        click.echo(
            f"stopped: {sum(sim.stats.requests.values())} REST requests, "
            f"{sum(sim.stats.connections.values())} WS connections, {len(sim.log)} candle events"
        )

    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(main)


@sim_command.command("truth")
@click.option("--exchange", type=click.Choice(list(SIM_EXCHANGES)), required=True)
@click.option("--pair", "pair", required=True, help="Canonical pair, e.g. BTC/USD.")
@click.option("--from", "from_", required=True, help="First minute (ISO or date).")
@click.option("--to", "to", default=None, help="End, exclusive (default: --from + 1 hour).")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--trades", is_flag=True, help="Print the trades instead of the candles.")
def truth_command(
    exchange: str, pair: str, from_: str, to: str | None, seed: int, trades: bool
) -> None:
    """Print the simulator's ground-truth candles (or trades) as JSON lines."""
    try:
        canonical = str(Pair.parse(pair))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--pair") from exc
    start = floor_minute(_time_option(from_, "--from") or 0)
    end = _time_option(to, "--to") or start + 60 * MINUTE_MS
    market = Market(seed)
    enc = msgspec.json.Encoder()
    out = sys.stdout.buffer
    for m in range(start, end, MINUTE_MS):
        if trades:
            for t in market.trades(exchange, canonical, m):
                out.write(enc.encode(t) + b"\n")
        else:
            out.write(enc.encode(market.truth(exchange, canonical, m)) + b"\n")
    out.flush()
