"""The simulator's single ground truth: a deterministic, seeded market of trades.

Every trade of ``(exchange, pair, minute)`` is a pure function of ``(seed, exchange, pair,
minute)``, so any minute is computed on demand in O(trades) without walking history, and every
WebSocket update, final, REST candle and trade page the simulator serves is derived from the
same trades. Tests compare what klined stored against :meth:`Market.truth`.

Prices and quantities are held as integers (price ticks of ``10**-price_dp``, quantity steps of
``10**-qty_dp``) so aggregation is exact and fast; they are rendered as decimal strings only
at the edge. The price *level* of a pair is shared by both exchanges (a smooth sum of seeded
sines of log-price), each exchange adds its own per-trade jitter, liquidity and timing.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import msgspec

from klined.model import MINUTE_MS, floor_minute

#: The seed's 15 pairs (issue 2), listed on both simulated exchanges by default.
DEFAULT_PAIRS: tuple[str, ...] = (
    "ETH/USD", "SOL/USD", "BTC/USD", "LINK/USD", "APE/USD", "DOT/USD", "PEPE/USD", "TRUMP/USD",
    "PUMP/USD", "JUP/USD", "PENGU/USD", "REKT/USD", "FARTCOIN/USD", "WIF/USD", "KSM/USD",
)  # fmt: skip

#: Extra pairs only the simulated Binance US lists (a quote is never relabelled: USDT != USD).
BINANCE_USDT_PAIRS: tuple[str, ...] = ("BTC/USDT", "ETH/USDT", "SOL/USDT", "LINK/USDT", "DOT/USDT")

#: An illiquid pair trades at least once in every run of this many minutes, so the previous
#: close of a quiet minute is always found by a bounded backward search.
QUIET_EVERY = 30

#: Trade ids are ``minute_index * 1000 + k``: increasing, and computable without history.
MAX_TRADES_PER_MINUTE = 999

#: 2020-01-01T00:00:00Z: nothing trades before this (Kraken ``Trades?since=0`` starts here).
GENESIS_MS = 1_577_836_800_000


@dataclass(frozen=True, slots=True)
class PairSpec:
    """How one pair trades: typical price, precisions and liquidity (mean trades per minute)."""

    pair: str
    price: float
    price_dp: int
    qty_dp: int
    liquidity: float
    notional: float = 500.0  # typical trade size in quote units

    def __post_init__(self) -> None:
        if not (0 <= self.price_dp <= 12 and 0 <= self.qty_dp <= 8):
            raise ValueError(f"{self.pair}: price_dp must be 0..12 and qty_dp 0..8")
        if self.price <= 0 or self.liquidity < 0:
            raise ValueError(f"{self.pair}: price must be > 0 and liquidity >= 0")


def _spec(pair: str, price: float, pdp: int, qdp: int, liq: float, notional: float) -> PairSpec:
    return PairSpec(pair, price, pdp, qdp, liq, notional)


_KNOWN: dict[str, PairSpec] = {
    s.pair: s
    for s in (
        _spec("BTC/USD", 90000.0, 2, 5, 40.0, 2000.0),
        _spec("ETH/USD", 3000.0, 2, 4, 25.0, 1500.0),
        _spec("SOL/USD", 140.0, 2, 3, 20.0, 800.0),
        _spec("LINK/USD", 13.0, 3, 2, 8.0, 400.0),
        _spec("APE/USD", 0.5, 4, 2, 3.0, 200.0),
        _spec("DOT/USD", 2.5, 4, 3, 5.0, 300.0),
        _spec("PEPE/USD", 0.00000612, 8, 0, 6.0, 300.0),
        _spec("TRUMP/USD", 6.0, 3, 3, 4.0, 300.0),
        _spec("PUMP/USD", 0.003, 6, 0, 2.0, 150.0),
        _spec("JUP/USD", 0.4, 4, 2, 2.0, 150.0),
        _spec("PENGU/USD", 0.012, 6, 1, 3.0, 150.0),
        _spec("REKT/USD", 0.0000005, 10, 0, 0.6, 80.0),
        _spec("FARTCOIN/USD", 0.3, 4, 2, 2.0, 150.0),
        _spec("WIF/USD", 0.4, 4, 2, 3.0, 200.0),
        _spec("KSM/USD", 10.0, 3, 3, 0.8, 150.0),
        _spec("BTC/USDT", 90000.0, 2, 5, 30.0, 2000.0),
        _spec("ETH/USDT", 3000.0, 2, 4, 20.0, 1500.0),
        _spec("SOL/USDT", 140.0, 2, 3, 12.0, 800.0),
        _spec("LINK/USDT", 13.0, 3, 2, 5.0, 400.0),
        _spec("DOT/USDT", 2.5, 4, 3, 3.0, 300.0),
    )
}


def _h(*parts: object) -> int:
    """A stable 64-bit hash (Python's ``hash()`` of str is salted per process)."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


def derived_spec(pair: str) -> PairSpec:
    """A plausible spec for any pair without a preset (``P0001/USD``...), from its name only."""
    rng = random.Random(_h("spec", pair))
    price = 10 ** rng.uniform(-5.5, 4.5)
    pdp = max(2, min(10, 5 - math.floor(math.log10(price))))
    qdp = max(0, min(8, 8 - pdp))
    return PairSpec(
        pair=pair,
        price=price,
        price_dp=pdp,
        qty_dp=qdp,
        liquidity=10 ** rng.uniform(-0.4, 1.3),
        notional=10 ** rng.uniform(1.5, 3.3),
    )


def spec_for(pair: str, overrides: Mapping[str, PairSpec] | None = None) -> PairSpec:
    if overrides and pair in overrides:
        return overrides[pair]
    return _KNOWN.get(pair) or derived_spec(pair)


def synthetic_pairs(n: int, quote: str = "USD") -> list[str]:
    """``["P0001/USD", ...]``: many pairs for benches and scale tests."""
    return [f"P{i:04d}/{quote}" for i in range(1, n + 1)]


# ---------------------------------------------------------------------------------------------
# decimal rendering of scaled integers


def fmt_fixed(value: int, dp: int, pad_to: int = 0) -> str:
    """``value * 10**-dp`` as exact fixed-point text, with at least ``pad_to`` decimals."""
    if pad_to > dp:
        value *= 10 ** (pad_to - dp)
        dp = pad_to
    if dp == 0:
        return str(value)
    sign = "-" if value < 0 else ""
    digits = str(abs(value)).rjust(dp + 1, "0")
    return f"{sign}{digits[:-dp]}.{digits[-dp:]}"


def fmt_plain(value: int, dp: int) -> str:
    """Like :func:`fmt_fixed` but without trailing zeros (``klined.model.plain_decimal`` form)."""
    text = fmt_fixed(value, dp)
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


# ---------------------------------------------------------------------------------------------
# trades and aggregates


class RawTrade(NamedTuple):
    ts_ms: int
    trade_id: int
    price: int  # ticks
    qty: int  # steps
    buy: bool  # taker side


class Agg(NamedTuple):
    """An exact running aggregate of a minute's trades (integers in the pair's scales)."""

    n: int
    open: int
    high: int
    low: int
    close: int
    volume: int  # qty steps
    quote: int  # scale price_dp + qty_dp
    taker_volume: int
    taker_quote: int
    first_id: int
    last_id: int
    last_ts: int


def vwap_ticks(agg: Agg) -> int:
    """Quote volume / volume rounded half-even to the price tick."""
    div, rem = divmod(agg.quote, agg.volume)
    if 2 * rem > agg.volume or (2 * rem == agg.volume and div % 2):
        div += 1
    return div


class MinuteData:
    """One minute of one pair on one exchange: trades and their running aggregates."""

    __slots__ = ("minute", "prefix", "stamps", "trades")

    def __init__(self, minute: int, trades: list[RawTrade]) -> None:
        self.minute = minute
        self.trades = trades
        self.stamps = [t.ts_ms for t in trades]
        self.prefix: list[Agg] = []
        vol = quote = tv = tq = 0
        o = h = lo = 0
        first = 0
        for n, t in enumerate(trades, 1):
            if n == 1:
                o = h = lo = t.price
                first = t.trade_id
            elif t.price > h:
                h = t.price
            elif t.price < lo:
                lo = t.price
            q = t.price * t.qty
            vol += t.qty
            quote += q
            if t.buy:
                tv += t.qty
                tq += q
            self.prefix.append(
                Agg(n, o, h, lo, t.price, vol, quote, tv, tq, first, t.trade_id, t.ts_ms)
            )

    @property
    def total(self) -> Agg | None:
        return self.prefix[-1] if self.prefix else None

    def until(self, ts_ms: int) -> Agg | None:
        """The aggregate of the trades at or before ``ts_ms`` (None when there are none yet)."""
        i = bisect.bisect_right(self.stamps, ts_ms)
        return self.prefix[i - 1] if i else None

    def count_between(self, after_ms: int, upto_ms: int) -> int:
        """How many trades have ``after_ms < ts <= upto_ms``."""
        return bisect.bisect_right(self.stamps, upto_ms) - bisect.bisect_right(
            self.stamps, after_ms
        )


class TruthTrade(msgspec.Struct, frozen=True, kw_only=True):
    ts_ms: int
    trade_id: int
    price: str
    volume: str
    side: str  # "b" taker buy, "s" taker sell


class TruthCandle(msgspec.Struct, frozen=True, kw_only=True):
    """The true 1-minute candle; a quiet minute is flat at the previous close, zero volume,
    ``trades == 0``, ``no_trades`` true and no vwap. Numbers are plain decimal strings."""

    exchange: str
    pair: str
    interval_start: int
    open: str
    high: str
    low: str
    close: str
    volume: str
    quote_volume: str
    vwap: str | None
    trades: int
    no_trades: bool = False
    first_trade_id: int | None = None
    last_trade_id: int | None = None
    taker_buy_volume: str = "0"
    taker_buy_quote_volume: str = "0"


# ---------------------------------------------------------------------------------------------


class _PairModel:
    """Seeded shape of one pair's price level (shared by both exchanges)."""

    __slots__ = ("log_base", "offset", "spec", "waves")

    def __init__(self, seed: int, spec: PairSpec, quiet_every: int) -> None:
        rng = random.Random(_h(seed, "level", spec.pair))
        self.spec = spec
        self.log_base = math.log(spec.price)
        # (amplitude of log-price, period in minutes, phase): minutes to weeks
        self.waves = [
            (rng.uniform(0.0008, 0.002), rng.uniform(7, 19), rng.uniform(0, 6.3)),
            (rng.uniform(0.002, 0.006), rng.uniform(45, 140), rng.uniform(0, 6.3)),
            (rng.uniform(0.008, 0.02), rng.uniform(500, 1500), rng.uniform(0, 6.3)),
            (rng.uniform(0.02, 0.06), rng.uniform(5000, 20000), rng.uniform(0, 6.3)),
        ]
        self.offset = _h(seed, "quiet", spec.pair) % quiet_every

    def level(self, t_min: float) -> float:
        x = self.log_base
        for amp, period, phase in self.waves:
            x += amp * math.sin(6.283185307179586 * t_min / period + phase)
        return math.exp(x)


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 30:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit = math.exp(-lam)
    k, p = 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


class Market:
    """Deterministic trades and candles for any (exchange, pair, minute)."""

    def __init__(
        self,
        seed: int = 1,
        specs: Mapping[str, PairSpec] | None = None,
        *,
        quiet_every: int = QUIET_EVERY,
        genesis_ms: int = GENESIS_MS,
        cache_minutes: int = 50_000,
    ) -> None:
        self.seed = seed
        self.quiet_every = quiet_every
        self.genesis_ms = genesis_ms
        self._overrides = dict(specs or {})
        self._models: dict[str, _PairModel] = {}
        self._cache: OrderedDict[tuple[str, str, int], MinuteData] = OrderedDict()
        self._cache_max = cache_minutes

    # -- specs -----------------------------------------------------------------------------------

    def spec(self, pair: str) -> PairSpec:
        return self._model(pair).spec

    def _model(self, pair: str) -> _PairModel:
        model = self._models.get(pair)
        if model is None:
            model = _PairModel(self.seed, spec_for(pair, self._overrides), self.quiet_every)
            self._models[pair] = model
        return model

    # -- minutes ---------------------------------------------------------------------------------

    def minute(self, exchange: str, pair: str, minute_ms: int) -> MinuteData:
        """The trades of one minute (cached; ``minute_ms`` is floored to the minute)."""
        minute_ms = floor_minute(minute_ms)
        key = (exchange, pair, minute_ms)
        data = self._cache.get(key)
        if data is not None:
            self._cache.move_to_end(key)
            return data
        data = MinuteData(minute_ms, self._generate(exchange, pair, minute_ms))
        self._cache[key] = data
        if len(self._cache) > self._cache_max:
            self._cache.popitem(last=False)
        return data

    def _generate(self, exchange: str, pair: str, minute_ms: int) -> list[RawTrade]:
        if minute_ms < self.genesis_ms:
            return []
        model = self._model(pair)
        spec = model.spec
        index = minute_ms // MINUTE_MS
        rng = random.Random(_h(self.seed, exchange, pair, index))
        # a daily activity cycle around the pair's liquidity
        activity = math.exp(0.5 * math.sin(6.283185307179586 * index / 1440 + model.offset))
        n = _poisson(rng, spec.liquidity * activity / 1.13)
        if n == 0 and (index + model.offset) % self.quiet_every == 0:
            n = 1
        n = min(n, MAX_TRADES_PER_MINUTE)
        rand = rng.random
        offsets = sorted(int(rand() * MINUTE_MS) for _ in range(n))
        price_scale = 10**spec.price_dp
        qty_scale = 10**spec.qty_dp
        # the level is smooth: interpolate inside the minute instead of evaluating it per trade
        start = model.level(index)
        slope = (model.level(index + 1) - start) / MINUTE_MS
        size = spec.notional * qty_scale * price_scale
        trades = []
        exp = math.exp
        for k, off in enumerate(offsets):
            # triangular jitter of about +-0.07% around the level; a lognormal-ish trade size
            price = round(
                (start + slope * off) * (1 + (rand() + rand() - 1) * 0.0007) * price_scale
            )
            price = price if price > 0 else 1
            qty = round(size * exp((rand() + rand() + rand() - 1.5) * 1.6) / price)
            qty = qty if qty > 0 else 1
            trades.append(RawTrade(minute_ms + off, index * 1000 + k + 1, price, qty, rand() < 0.5))
        return trades

    # -- queries ---------------------------------------------------------------------------------

    def trades(self, exchange: str, pair: str, minute_ms: int) -> list[TruthTrade]:
        spec = self.spec(pair)
        return [
            TruthTrade(
                ts_ms=t.ts_ms,
                trade_id=t.trade_id,
                price=fmt_plain(t.price, spec.price_dp),
                volume=fmt_plain(t.qty, spec.qty_dp),
                side="b" if t.buy else "s",
            )
            for t in self.minute(exchange, pair, minute_ms).trades
        ]

    def iter_minutes(
        self, exchange: str, pair: str, start_ms: int, end_ms: int
    ) -> Iterator[MinuteData]:
        """Every minute of ``[start_ms, end_ms)`` in order, computed without the cache (long
        ranges, such as a month of archive files, would only churn it)."""
        for m in range(floor_minute(start_ms), end_ms, MINUTE_MS):
            data = self._cache.get((exchange, pair, m))
            yield data if data is not None else MinuteData(m, self._generate(exchange, pair, m))

    def last_traded(self, exchange: str, pair: str, before_ms: int) -> MinuteData | None:
        """The latest minute with trades that starts before ``before_ms`` (bounded search)."""
        m = floor_minute(before_ms - 1)
        for _ in range(self.quiet_every + 1):
            if m < self.genesis_ms:
                return None
            data = self.minute(exchange, pair, m)
            if data.trades:
                return data
            m -= MINUTE_MS
        raise AssertionError("quiet-minute guarantee violated")  # pragma: no cover

    def prev_close(self, exchange: str, pair: str, minute_ms: int) -> int:
        """Close (in ticks) of the last trade before ``minute_ms``; the level at genesis if none."""
        data = self.last_traded(exchange, pair, minute_ms)
        if data is not None and data.total is not None:
            return data.total.close
        model = self._model(pair)
        return max(1, round(model.level(minute_ms / MINUTE_MS) * 10**model.spec.price_dp))

    def candle(self, exchange: str, pair: str, minute_ms: int, agg: Agg | None) -> TruthCandle:
        """Render an aggregate (or a quiet minute, ``agg is None``) as a :class:`TruthCandle`."""
        spec = self.spec(pair)
        pdp, qdp = spec.price_dp, spec.qty_dp
        if agg is None:
            close = fmt_plain(self.prev_close(exchange, pair, minute_ms), pdp)
            return TruthCandle(
                exchange=exchange,
                pair=pair,
                interval_start=minute_ms,
                open=close,
                high=close,
                low=close,
                close=close,
                volume="0",
                quote_volume="0",
                vwap=None,
                trades=0,
                no_trades=True,
            )
        return TruthCandle(
            exchange=exchange,
            pair=pair,
            interval_start=minute_ms,
            open=fmt_plain(agg.open, pdp),
            high=fmt_plain(agg.high, pdp),
            low=fmt_plain(agg.low, pdp),
            close=fmt_plain(agg.close, pdp),
            volume=fmt_plain(agg.volume, qdp),
            quote_volume=fmt_plain(agg.quote, pdp + qdp),
            vwap=fmt_plain(vwap_ticks(agg), pdp),
            trades=agg.n,
            first_trade_id=agg.first_id,
            last_trade_id=agg.last_id,
            taker_buy_volume=fmt_plain(agg.taker_volume, qdp),
            taker_buy_quote_volume=fmt_plain(agg.taker_quote, pdp + qdp),
        )

    def truth(self, exchange: str, pair: str, minute_ms: int) -> TruthCandle:
        """The complete candle of a minute (regardless of the sim clock)."""
        minute_ms = floor_minute(minute_ms)
        return self.candle(exchange, pair, minute_ms, self.minute(exchange, pair, minute_ms).total)

    def truth_range(
        self, exchange: str, pair: str, start_ms: int, end_ms: int
    ) -> Iterator[TruthCandle]:
        """Truth for every minute in ``[start_ms, end_ms)``."""
        for m in range(floor_minute(start_ms), end_ms, MINUTE_MS):
            yield self.truth(exchange, pair, m)

    def pairs_specs(self, pairs: Sequence[str]) -> dict[str, PairSpec]:
        return {p: self.spec(p) for p in pairs}
