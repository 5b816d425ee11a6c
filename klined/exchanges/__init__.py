"""Exchange adapters (sans-I/O) and their registry.

``get_adapter("binance", overrides)`` returns a :class:`~klined.exchanges.base.ExchangeAdapter`;
``adapter_for(name, exchange_config)`` does the same straight from the config section.
"""

from __future__ import annotations

from klined.config import ExchangeConfig, SymbolOverride
from klined.errors import UsageError
from klined.exchanges.base import ExchangeAdapter
from klined.exchanges.binance import Binance
from klined.exchanges.kraken import Kraken
from klined.exchanges.listing import check_listing
from klined.exchanges.trades import aggregate_trades
from klined.model import Pair

ADAPTERS: dict[str, type[Binance] | type[Kraken]] = {"binance": Binance, "kraken": Kraken}

__all__ = [
    "ADAPTERS",
    "Binance",
    "ExchangeAdapter",
    "Kraken",
    "adapter_for",
    "aggregate_trades",
    "check_listing",
    "get_adapter",
    "overrides_from_config",
]


def get_adapter(name: str, overrides: dict[Pair, SymbolOverride] | None = None) -> ExchangeAdapter:
    """The adapter for exchange ``name`` with the per-pair symbol overrides."""
    try:
        cls = ADAPTERS[name]
    except KeyError:
        known = ", ".join(sorted(ADAPTERS))
        raise UsageError(f"unknown exchange {name!r}; known exchanges: {known}") from None
    return cls(overrides)


def overrides_from_config(cfg: ExchangeConfig) -> dict[Pair, SymbolOverride]:
    """The config's ``symbols`` table keyed by canonical pair (keys were validated at load)."""
    return {Pair.parse(key): ov for key, ov in cfg.symbols.items()}


def adapter_for(name: str, cfg: ExchangeConfig) -> ExchangeAdapter:
    return get_adapter(name, overrides_from_config(cfg))
