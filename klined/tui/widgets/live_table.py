"""A DataTable refreshed in place, so periodic updates never clear it and never flicker.

Rows are *positions* (row keys ``"0"``, ``"1"``, ...); :meth:`LiveTable.sync` writes each
position's cells and touches only the cells whose content changed, adds or removes rows at the
end, and moves the cursor so it stays on the item the operator had selected, wherever the new
order put it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import RenderableType
from rich.text import Text
from textual.widgets import DataTable

#: (key, label, width or None for automatic), as :meth:`LiveTable.set_columns` takes them
Columns = list[tuple[str, str, int | None]]


def with_last_column(
    width: int, columns: Columns, key: str, label: str, minimum: int = 12
) -> Columns:
    """``columns`` and a last one taking what is left of ``width``: less the others, their
    padding (a cell on each side of every column) and the vertical scrollbar's column."""
    used = sum((w or 0) + 2 for _, _, w in columns) + 2 + 1
    return [*columns, (key, label, max(minimum, width - used))]


def same_cell(a: object, b: object) -> bool:
    if isinstance(a, Text) and isinstance(b, Text):
        return a.plain == b.plain and a.style == b.style and a.spans == b.spans
    return a == b


class LiveTable(DataTable[Any]):
    """DataTable with :meth:`sync`; ``item_keys[i]`` names what row ``i`` shows."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.item_keys: list[str] = []
        self._shown: list[tuple[RenderableType, ...]] = []
        self._column_keys: list[str] = []

    def set_columns(self, columns: Sequence[tuple[str, str, int | None]]) -> None:
        """(key, label, width or None for automatic); drops every row."""
        self.clear(columns=True)
        self.item_keys, self._shown = [], []
        self._column_keys = [key for key, _, _ in columns]
        for key, label, width in columns:
            self.add_column(label, key=key, width=width)

    @property
    def selected_key(self) -> str | None:
        if 0 <= self.cursor_row < len(self.item_keys):
            return self.item_keys[self.cursor_row]
        return None

    def sync(self, rows: Sequence[tuple[str, Sequence[RenderableType]]], height: int = 1) -> None:
        selected = self.selected_key
        old_count = len(self._shown)
        shown: list[tuple[RenderableType, ...]] = []
        for index, (_, cells) in enumerate(rows):
            new = tuple(cells)
            shown.append(new)
            if index >= old_count:
                self.add_row(*new, key=str(index), height=height)
                continue
            old = self._shown[index]
            for column, before, after in zip(self._column_keys, old, new, strict=True):
                if not same_cell(before, after):
                    self.update_cell(str(index), column, after, update_width=False)
        for index in range(old_count - 1, len(rows) - 1, -1):
            self.remove_row(str(index))
        self._shown = shown
        self.item_keys = [key for key, _ in rows]
        if selected is not None and selected in self.item_keys:
            position = self.item_keys.index(selected)
            if position != self.cursor_row:
                self.move_cursor(row=position, animate=False)

    def cell_text(self, row: int, column: str) -> str:
        """What a cell shows, as plain text (for tests and for the detail lines)."""
        value = self._shown[row][self._column_keys.index(column)]
        return value.plain if isinstance(value, Text) else str(value)

    def column_texts(self, column: str) -> list[str]:
        return [self.cell_text(i, column) for i in range(len(self._shown))]
