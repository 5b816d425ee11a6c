"""Coloured words for states, so a problem is seen before it is read."""

from __future__ import annotations

from rich.text import Text

from klined.status import StreamState

STATE_STYLE: dict[str, str] = {
    StreamState.CONNECTED: "bold #3fb950",
    StreamState.CONNECTING: "#39c5cf",
    StreamState.BACKOFF: "bold #d29922",
    StreamState.STALE: "bold #db6d28",
    StreamState.UNLISTED: "#bc8cff",
    StreamState.NO_DATA: "bold #db6d28",
    StreamState.DOWN: "bold #f85149",
}

JOB_STYLE: dict[str, tuple[str, str]] = {
    "ok": ("✓", "#3fb950"),
    "incomplete": ("!", "bold #d29922"),  # ran, but failed requests left minutes missing
    "failed": ("✗", "bold #f85149"),
    "running": ("▶", "bold #39c5cf"),
    "skipped": ("–", "#8b949e"),
    "abandoned": ("✗", "#db6d28"),
}


def state_badge(state: str) -> Text:
    return Text(str(state), style=STATE_STYLE.get(state, ""))


def job_badge(status: str, detail: str = "") -> Text:
    """``✓ 1.2s`` for a step's latest run: glyph and colour by status, then a detail."""
    glyph, style = JOB_STYLE.get(status, ("?", "#d29922"))
    return Text(f"{glyph} {detail}".rstrip(), style=style)
