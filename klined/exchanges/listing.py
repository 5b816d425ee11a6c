"""Check configured pairs against an exchange's listing, with a useful suggestion for each miss.

A quote is never relabelled (USDT is not USD): when a pair is missing, klined names the listed
pairs of the same base so the user can configure one explicitly.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from klined.exchanges.base import ListedPair
from klined.model import Pair

#: When a quote is missing, alternatives are offered in this order first (then alphabetically).
_QUOTE_PREFERENCE = {
    "USD": ("USDT", "USDC", "USD1", "FDUSD", "TUSD", "DAI", "EUR"),
    "USDT": ("USD", "USDC"),
    "USDC": ("USD", "USDT"),
    "EUR": ("EURT", "USD", "USDT"),
}


def _rank(wanted: str, quote: str) -> tuple[int, str]:
    prefs = _QUOTE_PREFERENCE.get(wanted, ())
    return (prefs.index(quote) if quote in prefs else len(prefs), quote)


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def configured_natives(adapter: object) -> dict[Pair, str]:
    """The native names the config sets explicitly (``[exchanges.X.symbols."P"] native``)."""
    symbols = getattr(adapter, "symbols", None)
    overrides = getattr(symbols, "overrides", None) or {}
    return {pair: ov.native for pair, ov in overrides.items() if ov.native}


def check_listing(
    configured: list[Pair],
    listing: dict[Pair, ListedPair],
    *,
    exchange: str = "this exchange",
    natives: Mapping[Pair, str] | None = None,
) -> tuple[list[Pair], dict[Pair, str]]:
    """Split ``configured`` into listed pairs and ``{pair: message}`` for the others.

    A listed pair that is not trading (halted, cancel-only, delisting) is reported too: no
    candles will come for it. Messages suggest same-base pairs in another quote, or a close
    base name for a probable typo. ``natives`` are the configured native names (overrides):
    one the exchange does not use for the pair is reported too, since an exchange may accept
    a subscription to a name it does not list and then simply send nothing.
    """
    listed: list[Pair] = []
    problems: dict[Pair, str] = {}
    by_base: dict[str, list[Pair]] = {}
    for pair, info in listing.items():
        if info.trading:
            by_base.setdefault(pair.base, []).append(pair)
    by_native = {info.ws_native: info for info in listing.values()}
    for pair in configured:
        found = listing.get(pair)
        native = (natives or {}).get(pair, "")
        if native and (found is None or found.ws_native != native):
            other = by_native.get(native)
            if other is not None and other.pair != pair:
                problems[pair] = (
                    f"{pair}: the configured native name {native!r} is {other.pair} on "
                    f"{exchange}, not {pair}"
                )
                continue
            if found is not None:
                problems[pair] = (
                    f"{pair}: the configured native name {native!r} is not listed on {exchange};"
                    f" it lists {pair} as {found.ws_native!r} (fix exchanges.{exchange}.symbols."
                    f'"{pair}".native)'
                )
                continue
        if found is not None and found.trading:
            listed.append(pair)
            continue
        if found is not None:
            problems[pair] = (
                f"{pair} is listed on {exchange} but not trading now; skipped until it is"
            )
            continue
        others = sorted(by_base.get(pair.base, []), key=lambda p: _rank(pair.quote, p.quote))
        if others:
            names = [str(p) for p in others[:3]]
            verb = "is" if len(names) == 1 else "are"
            problems[pair] = (
                f"{pair} is not listed on {exchange}; {_join(names)} {verb} "
                "(configure it explicitly: a quote is never relabelled)"
            )
            continue
        close = difflib.get_close_matches(pair.base, list(by_base), n=1, cutoff=0.75)
        hint = ""
        if close:
            same_quote = [p for p in by_base[close[0]] if p.quote == pair.quote]
            guess = same_quote[0] if same_quote else by_base[close[0]][0]
            hint = f"; did you mean {guess}?"
        problems[pair] = f"{pair} is not listed on {exchange} (no {pair.base} pair is){hint}"
    return listed, problems
