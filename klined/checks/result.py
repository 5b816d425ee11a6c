"""One row of ``klined check``: its outcome and the reason an operator can act on."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Outcome(enum.StrEnum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(slots=True)
class CheckResult:
    """One row of the table; ``details`` are extra lines under the reason (e.g. each pair)."""

    name: str
    outcome: Outcome
    reason: str
    details: list[str] = field(default_factory=list)
