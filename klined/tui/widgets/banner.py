"""The red line at the top that says, in words, what cannot be reached and what to do."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


class ProblemBanner(Static):
    """Shows one line per current problem (``daemon``, ``database``); hidden when all is well."""

    DEFAULT_CSS = """
    ProblemBanner {
        height: auto;
        max-height: 4;
        background: $error 25%;
        color: $text;
        padding: 0 1;
        display: none;
    }
    ProblemBanner.-shown { display: block; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__("", **kwargs)  # type: ignore[arg-type]
        self.problems: dict[str, str] = {}

    def set_problem(self, area: str, message: str | None) -> None:
        if message:
            self.problems[area] = message
        else:
            self.problems.pop(area, None)
        text = Text()
        for i, msg in enumerate(self.problems.values()):
            if i:
                text.append("\n")
            text.append("⚠ ", style="bold")
            text.append(msg)
        self.update(text)
        self.set_class(bool(self.problems), "-shown")
