"""``klined sim``: the Binance US + Kraken simulator on loopback, and its ground truth."""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path

import anyio
import click
import msgspec

from klined.model import DAY_MS, MINUTE_MS, Pair, floor_minute, iso, parse_time
from klined.sim import FaultPlan, Market, SimClock, SimConfig, run_simulator
from klined.sim.archive import write_binance, write_kraken_zip
from klined.sim.config import SIM_EXCHANGES
from klined.sim.market import DEFAULT_PAIRS, synthetic_pairs

__all__ = ["sim_command"]


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
            click.echo(f"         archive {sim.binance_archive_url}")
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


@sim_command.command("archive")
@click.argument("exchange", type=click.Choice(list(SIM_EXCHANGES)))
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="Binance: the archive's root folder (use file://<out> as archive_url). "
    "Kraken: the zip to write.",
)
@click.option("--from", "from_", required=True, help="First day (UTC).")
@click.option("--to", "to", required=True, help="End day, exclusive.")
@click.option("--pairs", default=None, help="Comma-separated pairs, or N for N synthetic pairs.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--daily", is_flag=True, help="Binance: daily files only (no monthly ones).")
def archive_command(
    exchange: str, out: Path, from_: str, to: str, pairs: str | None, seed: int, daily: bool
) -> None:
    """Write the simulated market's published history: Binance US's archive layout (zips and
    .CHECKSUM files) or a Kraken OHLCVT zip, for `klined import` without a network."""
    start = _time_option(from_, "--from") or 0
    end = _time_option(to, "--to") or 0
    start -= start % DAY_MS
    end -= end % DAY_MS
    if end <= start:
        raise click.UsageError("--to must be at least one whole day after --from")
    market = Market(seed, cache_minutes=10)
    chosen = _pairs_option(pairs)
    if exchange == "binance":
        files = write_binance(market, out, chosen, start, end, monthly=not daily, seed=seed)
        click.echo(f'{len(files)} files under {out} (archive_url = "file://{out.resolve()}")')
    else:
        path = write_kraken_zip(market, out, chosen, start, end)
        click.echo(f"wrote {path} ({len(chosen)} pairs, intervals 1, 5 and 60 minutes)")
