"""Tables on the terminal that stay readable at any width, in a pipe as on a TTY.

Every command's table goes through `print_table`: the full table when it fits the console, otherwise the
columns marked essential with a line saying where the rest is, and below even that a vertical layout (one
block per row). Headers are never cut. A console that is not a terminal (CI logs, pipes) is 80 columns
wide unless COLUMNS says otherwise, so what a user pastes into an issue reads the same as on screen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    header: str
    justify: str = "right"
    essential: bool = False  # kept when the full table does not fit


def _width(columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> int:
    """Characters a rich table with these cells needs: cell widths, one space of padding each side, borders."""
    widths = [len(c.header) for c in columns]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(_plain(cell)))
    return sum(widths) + 3 * len(widths) + 1


def _plain(cell: str) -> str:
    from rich.text import Text

    return Text.from_markup(cell).plain


def print_table(
    console,
    title: str,
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    *,
    rest_in: str | None = None,
) -> None:
    """Print `rows` under `columns` on a rich `console`; `rest_in` names where the full table lives (a file)."""
    from rich.table import Table

    shown = list(range(len(columns)))
    dropped: list[str] = []
    if _width(columns, rows) > console.width:
        shown = [i for i, c in enumerate(columns) if c.essential or i == 0]
        dropped = [columns[i].header for i in range(len(columns)) if i not in shown]
    picked_cols = [columns[i] for i in shown]
    picked_rows = [[row[i] for i in shown] for row in rows]
    if _width(picked_cols, picked_rows) > console.width:
        _print_vertical(console, title, columns, rows)
        return
    table = Table(title=title, title_justify="left")
    for col in picked_cols:
        table.add_column(col.header, justify=col.justify, no_wrap=True)
    for row in picked_rows:
        table.add_row(*row)
    console.print(table)
    if dropped:
        where = f" (all of them in {rest_in})" if rest_in else ""
        console.print(f"columns left out at this width{where}:")
        # The names, broken only between them, so each dropped column's name stays whole on one line.
        lines = [""]
        for i, name in enumerate(dropped):
            piece = name + ("," if i + 1 < len(dropped) else "")
            if lines[-1] and len(lines[-1]) + 1 + len(piece) > console.width:
                lines.append(piece)
            else:
                lines[-1] = f"{lines[-1]} {piece}".lstrip()
        for line in lines:
            console.print(line, soft_wrap=True)


def _print_vertical(console, title: str, columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> None:
    console.print(title)
    pad = max(len(c.header) for c in columns)
    for row in rows:
        console.print(f"[bold]{row[0]}[/bold]")
        for col, cell in zip(columns[1:], row[1:], strict=True):
            console.print(f"  {col.header.ljust(pad)}  {cell}")
