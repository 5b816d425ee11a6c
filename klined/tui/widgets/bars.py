"""Completeness cells: a stacked bar per hour (like the Looker chart) and a one-cell heat map.

Both are Rich ``Text`` meant for a DataTable cell two columns wide: one glyph and one gap, so
hours stay distinguishable. A bar is ``rows`` lines of half blocks (two "pixels" per line,
foreground on top, background below), stacked bottom-up in :data:`CATEGORIES` order, so a
healthy hour is all green and what is not final shows on top where the eye lands.
"""

from __future__ import annotations

from rich.style import Style
from rich.text import Text

from klined.tui.present import CATEGORIES, allocate, fmt_pct, heat_level
from klined.tui.sources import HourCompleteness

CATEGORY_COLOR: dict[str, str] = {
    "ws_final": "#3fb950",
    "rest": "#58a6ff",
    "archive": "#a371f7",
    "trades": "#39c5cf",
    "no_trades": "#8b949e",
    "ws_partial": "#d29922",
    "missing": "#f85149",
}

HEAT_COLOR: dict[str, str] = {
    "complete": "#3fb950",
    "partial": "#d29922",
    "gaps": "#db6d28",
    "bad": "#f85149",
    "pending": "#a5b4c8",
    "none": "#6e7681",
}

#: an hour the chain has not processed yet: hatched, so it reads as "not looked at", apart
#: from red (looked at, missing) and from "·" (not covered)
PENDING_GLYPH = "░"
_PENDING = Style(color=HEAT_COLOR["pending"])

#: indexes into CATEGORIES that must never be rounded away
_KEEP = (CATEGORIES.index("ws_partial"), CATEGORIES.index("missing"))
_EMPTY = Style(color="#6e7681", dim=True)


def stacked_bar(h: HourCompleteness | None, rows: int = 3, width: int = 2) -> Text:
    """A vertical bar ``rows`` lines tall of the hour's six counts, ``width - 1`` wide.

    The bar is ``2 * rows - 1`` half-line pixels tall: the top half of the first line stays
    empty, so bars of neighbouring rows never merge into one column.
    """
    glyphs, gap = max(width - 1, 1), " " * (1 if width > 1 else 0)
    if h is None or h.expected <= 0:
        lines = [" " * glyphs + gap] * (rows - 1) + ["·" * glyphs + gap]
        return Text("\n".join(lines), style=_EMPTY)
    if h.pending:
        lines = [" " * glyphs + gap] + [PENDING_GLYPH * glyphs + gap] * (rows - 1)
        return Text("\n".join(lines), style=_PENDING)
    px: list[str | None] = []
    for name, cells in zip(CATEGORIES, allocate(h.counts(), rows * 2 - 1, _KEEP), strict=True):
        px.extend([CATEGORY_COLOR[name]] * cells)
    px.append(None)
    text = Text()
    for line in range(rows):
        top, bottom = px[2 * (rows - line) - 1], px[2 * (rows - line) - 2]
        if top is None:
            text.append("▄" * glyphs, Style(color=bottom))
        elif top == bottom:
            text.append("█" * glyphs, Style(color=top))
        else:
            text.append("▀" * glyphs, Style(color=top, bgcolor=bottom))
        text.append(gap + ("\n" if line < rows - 1 else ""))
    return text


def heat_cell(h: HourCompleteness | None, width: int = 2) -> Text:
    glyphs, gap = max(width - 1, 1), " " * (1 if width > 1 else 0)
    level = heat_level(h)
    if level == "none":
        return Text("·" * glyphs + gap, style=_EMPTY)
    if level == "pending":
        return Text(PENDING_GLYPH * glyphs + gap, style=_PENDING)
    return Text("█" * glyphs + gap, style=Style(color=HEAT_COLOR[level]))


def rate_text(rate: float | None, width: int = 5) -> Text:
    """``99.7%`` coloured like the heat map would colour it."""
    if rate is None:
        return Text("—".rjust(width), style=_EMPTY)
    if rate >= 1.0:
        color = HEAT_COLOR["complete"]
    elif rate >= 0.99:
        color = HEAT_COLOR["partial"]
    elif rate >= 0.9:
        color = HEAT_COLOR["gaps"]
    else:
        color = HEAT_COLOR["bad"]
    return Text(fmt_pct(rate).rjust(width), style=Style(color=color))


def legend(heat: bool) -> Text:
    """The key to the colours, short enough for an 80-column line."""
    text = Text()
    if heat:
        items = [
            ("complete", "complete"),
            ("partial", "provisional"),
            ("gaps", "≤10% missing"),
            ("bad", ">10% missing"),
        ]
        for level, label in items:
            text.append("█", Style(color=HEAT_COLOR[level]))
            text.append(f" {label}  ")
        gap, space = "  ", " "
    else:
        # seven categories, pending and n/a must fit 80 columns: each name right after its
        # colour, the colours keep them apart
        gap, space = " ", ""
        for name in CATEGORIES:
            text.append("█", Style(color=CATEGORY_COLOR[name]))
            text.append(f"{name}{gap}")
    text.append(PENDING_GLYPH, _PENDING)
    text.append(f"{space}pending{gap}")
    text.append("·", _EMPTY)
    text.append(f"{space}n/a")
    return text


def counts_text(h: HourCompleteness) -> Text:
    """``ws_final 55 · rest 3 · missing 2`` with each name in its colour (zeros left out)."""
    text = Text()
    if h.pending:
        text.append("pending", _PENDING)
        text.append(f": not processed by the chain yet, its {h.missing} minutes count as missing")
        return text
    parts = [(n, v) for n, v in zip(CATEGORIES, h.counts(), strict=True) if v]
    for i, (name, value) in enumerate(parts):
        if i:
            text.append(" · ", _EMPTY)
        text.append(name, Style(color=CATEGORY_COLOR[name]))
        text.append(f" {value}")
    if not parts:
        text.append("no minutes counted", _EMPTY)
    return text
