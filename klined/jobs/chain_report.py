"""What a chain run reports: each step's outcome, each hour's, the run's (``klined chain``
prints its table), and the names of the steps it reports on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from klined.model import iso

#: The steps of one hour, in order, then ``publish``, once per run.
STEPS = ("flush", "bronze", "gapfill", "silver", "gold", "completeness", "publish")
#: Steps run once per run, after the hours.
RUN_STEPS = ("publish",)
#: The steps that turn bronze into silver/gold/completeness (what a backfill runs).
MERGE_STEPS = ("silver", "gold", "completeness")


@dataclass(slots=True)
class StepOutcome:
    step: str
    status: str  # ok | incomplete | failed | skipped
    rows: int = 0
    duration_s: float = 0.0
    error: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class HourOutcome:
    hour_ms: int
    exchange: str | None = None
    steps: list[StepOutcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No step failed (an ``incomplete`` gap-fill is reported apart: see
        :attr:`incomplete`)."""
        return all(s.status != "failed" for s in self.steps)

    @property
    def incomplete(self) -> bool:
        """A step ran but failed requests left minutes missing."""
        return any(s.status == "incomplete" for s in self.steps)

    @property
    def duration_s(self) -> float:
        return sum(s.duration_s for s in self.steps)


@dataclass(slots=True)
class ChainReport:
    trigger: str
    hours: list[HourOutcome] = field(default_factory=list)
    skipped: str = ""  # why (some of) the run did not happen (lock held elsewhere)
    not_run: list[int] = field(default_factory=list)  # hours left undone because of that
    started_ms: int = 0
    duration_s: float = 0.0
    publish: StepOutcome | None = None  # the run's publish step, when it ran

    @property
    def ok(self) -> bool:
        """Every hour ran, no step failed, no gap-fill was incomplete, publish did not fail."""
        published = self.publish is None or self.publish.status != "failed"
        return not self.skipped and all(h.ok and not h.incomplete for h in self.hours) and published

    def summary(self) -> str:
        parts = [f"{len(self.hours)} hour(s)"]
        failed = sum(1 for h in self.hours if not h.ok)
        incomplete = sum(1 for h in self.hours if h.ok and h.incomplete)
        if failed:
            parts.append(f"{failed} failed")
        if incomplete:
            parts.append(f"{incomplete} incomplete")
        parts.append(f"{self.duration_s:.1f}s")
        text = ", ".join(parts)
        if self.skipped:
            if not self.hours and self.publish is None:
                return f"skipped: {self.skipped}"
            text += f"; {len(self.not_run)} hour(s) not run: {self.skipped}"
        if self.publish is not None:
            text += f"; {self.publish_line()}"
        return text

    def publish_line(self) -> str:
        """``publish: 14 day file(s) written (120,000 rows), 2 unchanged`` or the failure."""
        p = self.publish
        if p is None:
            return ""
        if p.status == "failed":
            return f"publish FAILED: {p.error}"
        if p.status == "skipped":
            return f"publish skipped: {p.error}"
        d = p.details
        text = f"publish: {d.get('written', 0)} day file(s) written ({p.rows:,} rows)"
        if d.get("unchanged"):
            text += f", {d['unchanged']} unchanged"
        if d.get("removed"):
            text += f", {d['removed']} removed"
        return text

    def table(self, steps: Sequence[str] = STEPS) -> str:
        """One line per hour, one column per step: ``ok 1,234`` / ``incomplete`` / ``skipped``
        / ``FAILED``.

        A gap-fill that could not fetch everything says how many minutes are still missing;
        ``incomplete`` when requests failed (a later run may fill them; the reasons follow the
        table and are in ``ops.gapfill_attempts``), ``ok`` when the exchange has nothing more.
        """
        cols = [s for s in steps if any(o.step == s for h in self.hours for o in h.steps)]
        head = ["hour", *cols]
        rows = []
        for h in self.hours:
            cells = [iso(h.hour_ms) + (f" {h.exchange}" if h.exchange else "")]
            by_step = {o.step: o for o in h.steps}
            for s in cols:
                o = by_step.get(s)
                if o is None:
                    cells.append("-")
                elif o.status in ("ok", "incomplete"):
                    missing = o.details.get("missing") or 0
                    cells.append(
                        f"{o.status} {o.rows:,}" + (f" ({missing:,} missing)" if missing else "")
                    )
                elif o.status == "failed":
                    cells.append("FAILED")
                else:
                    cells.append("skipped")
            rows.append(cells)
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *rows]
        ]
        errors = [
            f"  {iso(h.hour_ms)} {o.step}: {o.error}"
            for h in self.hours
            for o in h.steps
            if o.status in ("failed", "incomplete")
        ]
        if errors:
            lines += ["", "errors:", *errors]
        if self.not_run:
            lines += ["", f"not run ({self.skipped}):", *(f"  {iso(h)}" for h in self.not_run)]
        if self.publish is not None:
            lines += ["", self.publish_line()]
        return "\n".join(line.rstrip() for line in lines)
