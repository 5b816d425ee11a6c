"""The simulator's market: deterministic, exact, and honest about quiet minutes."""

from __future__ import annotations

from decimal import Decimal

import msgspec
from click.testing import CliRunner

from klined.commands.sim import sim_command
from klined.model import MINUTE_MS, check_ohlcv, plain_decimal
from klined.sim.market import (
    DEFAULT_PAIRS,
    QUIET_EVERY,
    Market,
    derived_spec,
    fmt_fixed,
    fmt_plain,
    synthetic_pairs,
)

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def aggregate(trades: list) -> dict[str, object]:
    prices = [Decimal(t.price) for t in trades]
    vols = [Decimal(t.volume) for t in trades]
    quote = sum((p * v for p, v in zip(prices, vols, strict=True)), Decimal(0))
    return {
        "open": prices[0],
        "high": max(prices),
        "low": min(prices),
        "close": prices[-1],
        "volume": sum(vols, Decimal(0)),
        "quote_volume": quote,
        "trades": len(trades),
    }


def test_same_seed_same_market_any_order() -> None:
    a, b = Market(11), Market(11)
    later = b.truth("kraken", "BTC/USD", T0 + 500 * MINUTE_MS)  # computed first, out of order
    assert a.truth("kraken", "BTC/USD", T0 + 500 * MINUTE_MS) == later
    assert a.trades("binance", "ETH/USD", T0) == b.trades("binance", "ETH/USD", T0)
    assert Market(12).trades("binance", "ETH/USD", T0) != a.trades("binance", "ETH/USD", T0)
    # the two exchanges trade independently around a shared price level
    assert a.trades("binance", "BTC/USD", T0) != a.trades("kraken", "BTC/USD", T0)
    bin_close = Decimal(a.truth("binance", "BTC/USD", T0).close)
    kr_close = Decimal(a.truth("kraken", "BTC/USD", T0).close)
    assert abs(bin_close - kr_close) / bin_close < Decimal("0.01")


def test_truth_is_the_exact_aggregate_of_the_trades() -> None:
    market = Market(3)
    checked = 0
    for pair in DEFAULT_PAIRS:
        for i in range(30):
            minute = T0 + i * MINUTE_MS
            truth = market.truth("binance", pair, minute)
            trades = market.trades("binance", pair, minute)
            assert check_ohlcv(truth.open, truth.high, truth.low, truth.close, truth.volume) is None
            if not trades:
                continue
            checked += 1
            agg = aggregate(trades)
            assert all(minute <= t.ts_ms < minute + MINUTE_MS for t in trades)
            assert [t.ts_ms for t in trades] == sorted(t.ts_ms for t in trades)
            ids = [t.trade_id for t in trades]
            assert ids == list(range(ids[0], ids[0] + len(ids)))
            assert (truth.first_trade_id, truth.last_trade_id) == (ids[0], ids[-1])
            for field in ("open", "high", "low", "close", "volume", "quote_volume"):
                assert Decimal(getattr(truth, field)) == agg[field], (pair, minute, field)
            assert truth.trades == agg["trades"]
            vol = Decimal(truth.volume)
            assert truth.vwap is not None
            assert abs(Decimal(truth.vwap) - Decimal(truth.quote_volume) / vol) <= Decimal(
                1
            ).scaleb(-market.spec(pair).price_dp)
            # plain decimal strings, exactly as klined normalizes them
            assert truth.close == plain_decimal(truth.close)
    assert checked > 200


def test_quiet_minutes_are_flat_at_previous_close_and_bounded() -> None:
    market = Market(5)
    quiet = 0
    for pair in ("REKT/USD", "KSM/USD"):
        run = 0
        for i in range(600):
            minute = T0 + i * MINUTE_MS
            truth = market.truth("kraken", pair, minute)
            if not truth.no_trades:
                run = 0
                continue
            quiet += 1
            run += 1
            assert run < QUIET_EVERY
            assert truth.trades == 0 and truth.volume == "0" and truth.vwap is None
            assert truth.open == truth.high == truth.low == truth.close
            before = market.last_traded("kraken", pair, minute)
            assert before is not None
            prev = market.truth("kraken", pair, before.minute)
            assert truth.close == prev.close
    assert quiet > 100  # illiquid pairs really are quiet


def test_precision_per_pair() -> None:
    market = Market(1)
    pepe = market.truth("binance", "PEPE/USD", T0 + 3 * MINUTE_MS)
    assert pepe.close.startswith("0.00000")
    assert len(pepe.close.split(".")[1]) <= 8
    btc = market.truth("binance", "BTC/USD", T0)
    assert 50_000 < Decimal(btc.close) < 150_000 and len(btc.close.split(".")[-1]) <= 2
    assert fmt_fixed(5, 3) == "0.005" and fmt_fixed(123456, 2, pad_to=8) == "1234.56000000"
    assert fmt_plain(1200, 2) == "12" and fmt_plain(0, 4) == "0" and fmt_fixed(-5, 1) == "-0.5"


def test_synthetic_pairs_are_plausible() -> None:
    names = synthetic_pairs(1000)
    assert names[0] == "P0001/USD" and names[-1] == "P1000/USD" and len(set(names)) == 1000
    market = Market(9)
    for name in names[:50]:
        spec = derived_spec(name)
        assert spec.price_dp + spec.qty_dp <= 10 or spec.qty_dp == 0
        truth = market.truth("binance", name, T0)
        assert Decimal(truth.close) > 0


def test_truth_cli_dumps_json_lines() -> None:
    runner = CliRunner()
    result = runner.invoke(
        sim_command,
        [
            "truth",
            "--exchange",
            "kraken",
            "--pair",
            "btc/usd",
            "--from",
            "2026-01-01T00:00:00Z",
            "--to",
            "2026-01-01T00:05:00Z",
            "--seed",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 5
    first = msgspec.json.decode(lines[0])
    assert first == msgspec.to_builtins(Market(4).truth("kraken", "BTC/USD", T0))
    trades = runner.invoke(
        sim_command,
        ["truth", "--exchange", "binance", "--pair", "ETH/USD", "--from", "2026-01-01", "--trades"],
    )
    assert trades.exit_code == 0 and trades.output.count("\n") > 60
