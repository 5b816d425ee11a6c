"""A protocol-faithful Binance US / Kraken simulator over a deterministic seeded market.

Tests, benchmarks and ``klined demo`` run klined against it; it is also the executable
documentation of what klined's clients must survive (see ``faults.py``). Start one with
:func:`run_simulator`; compare what klined stored with ``sim.market.truth(...)`` and
``sim.log``.
"""

from klined.sim.clock import SimClock
from klined.sim.config import SimConfig
from klined.sim.faults import FaultPlan, FaultRule, FiredFault
from klined.sim.log import SentEvent, SimLog, SimStats
from klined.sim.market import (
    BINANCE_USDT_PAIRS,
    DEFAULT_PAIRS,
    Market,
    PairSpec,
    TruthCandle,
    TruthTrade,
    synthetic_pairs,
)
from klined.sim.server import Simulator, run_simulator

__all__ = [
    "BINANCE_USDT_PAIRS",
    "DEFAULT_PAIRS",
    "FaultPlan",
    "FaultRule",
    "FiredFault",
    "Market",
    "PairSpec",
    "SentEvent",
    "SimClock",
    "SimConfig",
    "SimLog",
    "SimStats",
    "Simulator",
    "TruthCandle",
    "TruthTrade",
    "run_simulator",
    "synthetic_pairs",
]
