"""Plain-data presentation rules for the dashboard: formatting, ordering, filtering, bucketing.

Kept free of Textual (and of Rich) so the rules that decide what an operator sees first can be
tested directly, without a running app.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from klined.model import HOUR_MS, to_datetime
from klined.status import PairStatus, StreamState
from klined.tui.sources import HourCompleteness, JobRun

#: lower = worse; problems sort first
STATE_SEVERITY: dict[str, int] = {
    StreamState.DOWN: 0,
    StreamState.STALE: 1,
    StreamState.BACKOFF: 2,
    StreamState.UNLISTED: 3,
    StreamState.NO_DATA: 3,
    StreamState.CONNECTING: 4,
    StreamState.CONNECTED: 5,
}

STREAM_SORTS: tuple[str, ...] = ("problems", "pair", "age", "rate", "reconnects")

#: the completeness counts in klined.model.COMPLETENESS_ORDER, then what is missing
CATEGORIES: tuple[str, ...] = (
    "ws_final", "rest", "archive", "trades", "no_trades", "ws_partial", "missing",
)  # fmt: skip

STEPS: tuple[str, ...] = ("flush", "bronze", "gapfill", "silver", "gold", "completeness")

WINDOWS: tuple[int, ...] = (6, 12, 24, 48, 72, 168)


# -- formatting -------------------------------------------------------------------------------


def fmt_span(ms: int | None) -> str:
    """A duration for a narrow column: ``850ms``, ``4.2s``, ``3m05s``, ``2h10m``, ``3d04h``."""
    if ms is None:
        return "—"
    ms = max(ms, 0)
    if ms < 1000:
        return f"{ms}ms"
    s = ms / 1000
    if s < 10:
        return f"{s:.1f}s"
    if s < 60:
        return f"{int(s)}s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def fmt_age(now_ms: int, then_ms: int | None) -> str:
    return "—" if then_ms is None else fmt_span(now_ms - then_ms)


def fmt_rate(per_s: float) -> str:
    if per_s <= 0:
        return "0"
    if per_s < 0.1:
        return "<0.1"
    return f"{per_s:.1f}" if per_s < 100 else f"{per_s:.0f}"


def fmt_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit in ("B", "KiB") else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover


def fmt_count(n: int | None) -> str:
    if n is None:
        return "—"
    if n < 10_000:
        return str(n)
    if n < 1_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1_000_000:.1f}M"


def fmt_hm(ms: int | None) -> str:
    return "—" if ms is None else to_datetime(ms).strftime("%H:%M")


def fmt_hms(ms: int | None) -> str:
    return "—" if ms is None else to_datetime(ms).strftime("%H:%M:%S")


def fmt_hour(ms: int | None) -> str:
    """``11-26 13:00``: an hour for a table row."""
    return "—" if ms is None else to_datetime(ms).strftime("%m-%d %H:%M")


def fmt_when(ms: int | None) -> str:
    """``2026-11-26 13:00 UTC``: a full time for a sentence."""
    return "—" if ms is None else to_datetime(ms).strftime("%Y-%m-%d %H:%M UTC")


def fmt_pct(rate: float | None) -> str:
    if rate is None:
        return "—"
    if rate >= 1.0:
        return "100%"
    return f"{min(rate * 100, 99.9):.1f}%"


def one_line(text: str, width: int = 200) -> str:
    """Errors can be multi-line tracebacks; a table cell wants the first meaningful line."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


# -- streams ----------------------------------------------------------------------------------


def severity(p: PairStatus) -> int:
    return STATE_SEVERITY.get(p.state, 4)


def stream_sort_key(p: PairStatus, sort: str, now_ms: int) -> tuple[object, ...]:
    name = (p.exchange, p.symbol)
    if sort == "pair":
        return name
    if sort == "age":
        age = now_ms - p.last_message_ms if p.last_message_ms is not None else 1 << 62
        return (-age, *name)
    if sort == "rate":
        return (p.messages_per_s, *name)
    if sort == "reconnects":
        return (-p.reconnects, *name)
    # problems: worst state first, then the ones that reconnect most, then by name
    return (severity(p), -p.reconnects, *name)


def parse_filter(text: str) -> list[str]:
    return [t for t in text.lower().split() if t]


def stream_matches(p: PairStatus, terms: Sequence[str]) -> bool:
    """Every term must appear in exchange, pair, state or last error (case-insensitive)."""
    if not terms:
        return True
    hay = f"{p.exchange} {p.symbol} {p.symbol.replace('/', '')} {p.state} {p.last_error}".lower()
    return all(t in hay for t in terms)


def order_streams(
    pairs: Iterable[PairStatus], *, sort: str, reverse: bool, filter_text: str, now_ms: int
) -> list[PairStatus]:
    terms = parse_filter(filter_text)
    chosen = [p for p in pairs if stream_matches(p, terms)]
    chosen.sort(key=lambda p: stream_sort_key(p, sort, now_ms), reverse=reverse)
    return chosen


def final_lag_ms(p: PairStatus, now_ms: int) -> int | None:
    """How far the last final minute trails the last closed minute (0 = up to date)."""
    if p.last_final_minute_ms is None:
        return None
    last_closed = now_ms - now_ms % 60_000 - 60_000
    return max(last_closed - p.last_final_minute_ms, 0)


# -- completeness -----------------------------------------------------------------------------


def allocate(counts: Sequence[int], slots: int, keep: Iterable[int] = ()) -> list[int]:
    """Split ``slots`` cells between categories in proportion to ``counts``.

    Largest remainder, so the cells always add up to ``slots``; categories listed in ``keep``
    (missing, partial) get at least one cell when they are non-zero, so a single missing
    minute is never rounded away - it is what the operator is looking for.
    """
    total = sum(counts)
    if total <= 0 or slots <= 0:
        return [0] * len(counts)
    exact = [c * slots / total for c in counts]
    cells = [int(x) for x in exact]
    order = sorted(range(len(counts)), key=lambda i: (-(exact[i] - cells[i]), i))
    for i in order[: slots - sum(cells)]:
        cells[i] += 1
    for i in keep:
        if counts[i] > 0 and cells[i] == 0:
            donor = max(range(len(cells)), key=lambda j: (j not in keep, cells[j], -j))
            if cells[donor] > 1 or (cells[donor] == 1 and donor not in keep):
                cells[donor] -= 1
                cells[i] += 1
    return cells


def heat_level(h: HourCompleteness | None) -> str:
    """``none`` (no row: the pair was not covered then) / ``pending`` (not processed yet, all
    missing) / ``complete`` / ``partial`` (all there, some provisional) / ``gaps`` (up to 10%
    missing) / ``bad``."""
    if h is None or h.expected <= 0:
        return "none"
    if h.pending:
        return "pending"
    if h.complete >= h.expected:
        return "complete"
    if h.missing == 0:
        return "partial"
    if h.missing <= h.expected // 10:
        return "gaps"
    return "bad"


@dataclass
class PairHours:
    """One exchange/pair across the window, hour by hour."""

    exchange: str
    symbol: str
    hours: dict[int, HourCompleteness] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.exchange}:{self.symbol}"

    def totals(self) -> HourCompleteness:
        sums = [0] * (len(CATEGORIES) + 1)
        for h in self.hours.values():
            for i, v in enumerate((h.expected, *h.counts())):
                sums[i] += v
        expected, ws_final, rest, archive, trades, no_trades, ws_partial, missing = sums
        return HourCompleteness(
            self.exchange, self.symbol, 0, expected, ws_final, rest, archive, trades, no_trades,
            ws_partial, missing,
        )  # fmt: skip

    @property
    def rate(self) -> float | None:
        t = self.totals()
        return t.rate if t.expected else None

    @property
    def pending(self) -> int:
        """Hours the chain has not processed yet."""
        return sum(1 for h in self.hours.values() if h.pending)


def window_hours(now_ms: int, hours: int) -> list[int]:
    """The last ``hours`` closed hours, oldest first (the current hour is still filling)."""
    last = now_ms - now_ms % HOUR_MS - HOUR_MS
    return [last - i * HOUR_MS for i in range(hours - 1, -1, -1)]


def group_pairs(rows: Iterable[HourCompleteness], worst_first: bool = True) -> list[PairHours]:
    by_pair: dict[tuple[str, str], PairHours] = {}
    for r in rows:
        ph = by_pair.get((r.exchange, r.symbol))
        if ph is None:
            ph = by_pair[(r.exchange, r.symbol)] = PairHours(r.exchange, r.symbol)
        ph.hours[r.hour_ms] = r
    pairs = list(by_pair.values())
    if worst_first:
        pairs.sort(key=lambda p: (p.rate if p.rate is not None else 2.0, p.exchange, p.symbol))
    else:
        pairs.sort(key=lambda p: (p.exchange, p.symbol))
    return pairs


def exchange_rates(rows: Iterable[HourCompleteness]) -> dict[str, tuple[int, int]]:
    """exchange -> (complete minutes, expected minutes) over the rows given; a pending hour's
    minutes are expected and not complete."""
    sums: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in rows:
        sums[r.exchange][0] += r.complete
        sums[r.exchange][1] += r.expected
    return {ex: (v[0], v[1]) for ex, v in sorted(sums.items())}


def pending_hours(rows: Iterable[HourCompleteness]) -> int:
    """Distinct hours with at least one pending row (the chain has not caught up on them)."""
    return len({r.hour_ms for r in rows if r.pending})


def short_error(text: str) -> str:
    """An error for a narrow cell: one line, without a leading exception class name when a
    message follows it ("ConnectionClosedError: no close frame" -> "no close frame")."""
    flat = " ".join(text.split())
    head, sep, rest = flat.partition(": ")
    if sep and rest and head.isidentifier() and head[:1].isupper():
        return rest
    return flat


def fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, an ellipsis marking the cut."""
    if width <= 0:
        return ""
    return text if len(text) <= width else text[: width - 1] + "…"


# -- jobs -------------------------------------------------------------------------------------


@dataclass
class HourRuns:
    """The runs of one hour: the latest per step, and every attempt (newest first)."""

    hour_ms: int | None
    latest: dict[str, JobRun] = field(default_factory=dict)
    runs: list[JobRun] = field(default_factory=list)

    @property
    def key(self) -> str:
        return str(self.hour_ms)


def group_runs(runs: Iterable[JobRun], max_hours: int = 72) -> list[HourRuns]:
    """Runs grouped by hour, newest hour first."""
    by_hour: dict[int | None, HourRuns] = {}
    for run in sorted(runs, key=lambda r: r.run_id, reverse=True):
        hr = by_hour.get(run.hour_ms)
        if hr is None:
            hr = by_hour[run.hour_ms] = HourRuns(run.hour_ms)
        hr.runs.append(run)
        hr.latest.setdefault(run.step, run)
    ordered = sorted(by_hour.values(), key=lambda h: h.hour_ms or 0, reverse=True)
    return ordered[:max_hours]


def steps_of(groups: Iterable[HourRuns]) -> list[str]:
    """The known chain steps in chain order, then any others the ledger mentions."""
    seen = {step for g in groups for step in g.latest}
    return [*STEPS, *sorted(seen - set(STEPS))]
