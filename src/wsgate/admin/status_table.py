"""The backends' table of ``wsgate status``, drawn to fit the terminal's width.

A table that rich squeezes into too few columns cuts every header and name
short ("Hea…"). This one measures its columns instead and, when the width is
short, narrows the bar and leaves out the columns the rest already says, in a
fixed order; what it keeps is never cut.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

__all__ = ["BAR_WIDTH", "backend_table", "packed"]

BAR_WIDTH = 24


def _bar(active: int, here: int, cap: int, width: int) -> Text:
    scale = max(cap, active, 1)
    here = min(here, active)
    cells_here = round(width * here / scale)
    cells_all = round(width * active / scale)
    over = active > cap
    bar = Text()
    bar.append("█" * cells_here, style="red" if over else "bright_green")
    bar.append("█" * (cells_all - cells_here), style="red3" if over else "green4")
    bar.append("░" * (width - cells_all), style="grey35")
    bar.append(" ")
    bar.append_text(_count(active, cap))
    return bar


def _count(active: int, cap: int) -> Text:
    style = "bold red" if active > cap else "bold yellow" if active >= cap else "bold"
    return Text(f"{active}/{cap}", style=style)


def _health(backend: dict[str, Any]) -> Text:
    if backend.get("draining"):
        return Text("draining", style="cyan")
    if backend.get("ejected"):
        return Text("ejected", style="yellow")
    return Text("healthy", style="green") if backend["healthy"] else Text("unhealthy", style="red")


def packed(items: list[Text], width: int, gap: str = "   ") -> Text:
    """Items on as few lines as fit in ``width``, breaking only between items."""
    packed = Text()
    line = 0
    for item in items:
        if line and line + len(gap) + item.cell_len > width:
            packed.append("\n")
            line = 0
        elif line:
            packed.append(gap)
            line += len(gap)
        packed.append_text(item)
        line += item.cell_len
    return packed


@dataclass(slots=True)
class _Column:
    header: str
    cells: list[RenderableType]
    right: bool = False
    style: str = ""

    @property
    def width(self) -> int:
        return max([len(self.header), *(_cell_len(cell) for cell in self.cells)])


def _cell_len(cell: RenderableType) -> int:
    return cell.cell_len if isinstance(cell, Text) else len(str(cell))


# How the table gives way when the terminal is narrow, most informative first: the
# columns left out at each step, and the narrowest bar the step accepts (0: the bare
# count). Active and cap stay readable in the bar's "active/cap".
_LAYOUTS: tuple[tuple[frozenset[str], int], ...] = tuple(
    (frozenset(gone), bar)
    for gone, bar in (
        ((), 12),
        (("Address",), 12),
        (("Address", "Active", "Cap"), 10),
        (("Address", "Active", "Cap", "Conn. fail"), 6),
        (("Address", "Active", "Cap", "Conn. fail", "Here"), 6),
        (("Address", "Active", "Cap", "Conn. fail", "Here"), 0),
        (("Address", "Active", "Cap", "Conn. fail", "Here", "Rejected", "Admitted"), 0),
    )
)
_LOAD_HEADERS = ("Connections vs cap", "Connections", "Active/cap")
# A heavy-head table spends three cells per column (border, padding) and one more.
_CELLS_PER_COLUMN = 3


def _load_header(content: int) -> str:
    return next((h for h in _LOAD_HEADERS if len(h) <= content), _LOAD_HEADERS[-1])


def backend_table(
    backends: list[dict[str, Any]], width: int, only: Callable[[dict[str, Any]], bool] | None = None
) -> Table:
    """The backends' table at its most informative that fits in ``width`` columns.

    With ``only``, the rows are the backends it accepts, in columns laid out for
    all of ``backends``: the tables of several routes then line up.
    """
    numbers = [
        ("Active", "active"), ("Here", "active_here"), ("Cap", "max_connections"),
        ("Admitted", "admitted_total"), ("Rejected", "rejected_total"),
        ("Conn. fail", "connect_failures_total"),
    ]  # fmt: skip
    before = [
        _Column("Backend", [b["id"] for b in backends], style="bold"),
        _Column("Address", [b["address"] for b in backends], style="dim"),
        _Column("Health", [_health(b) for b in backends]),
    ]
    if not any(b["address"] != b["id"] for b in backends):
        before.pop(1)
    after = [
        _Column(name, [str(b.get(key, 0)) for b in backends], right=True) for name, key in numbers
    ]
    count_width = max([0, *(len(f"{b['active']}/{b['max_connections']}") for b in backends)])

    def load_width(bar: int) -> int:
        content = bar + 1 + count_width if bar else count_width
        return max(content, len(_load_header(content)))

    chosen_gone, chosen_bar = _LAYOUTS[-1][0], 0
    for gone, narrowest in _LAYOUTS:
        fixed = [c for c in before + after if c.header not in gone]
        room = width - _table_width(fixed) - _CELLS_PER_COLUMN
        fits = [bar for bar in range(BAR_WIDTH, narrowest - 1, -1) if load_width(bar) <= room]
        if narrowest == 0 and not fits and load_width(0) <= room:
            fits = [0]
        if fits:
            chosen_gone, chosen_bar = gone, fits[0]
            break
    content = chosen_bar + 1 + count_width if chosen_bar else count_width
    load = _Column(
        _load_header(content),
        [
            _bar(b["active"], b["active_here"], b["max_connections"], chosen_bar)
            if chosen_bar
            else _count(b["active"], b["max_connections"])
            for b in backends
        ],
    )
    chosen = [c for c in before if c.header not in chosen_gone] + [load]
    chosen += [c for c in after if c.header not in chosen_gone]
    table = Table(header_style="bold")
    for column in chosen:
        # Names and numbers are never cut short: a terminal narrower still folds them.
        table.add_column(
            column.header, style=column.style, no_wrap=True, overflow="fold",
            justify="right" if column.right else "left",
        )  # fmt: skip
    for backend, row in zip(backends, zip(*(c.cells for c in chosen), strict=True), strict=True):
        if only is None or only(backend):
            table.add_row(*row)
    return table


def _table_width(columns: list[_Column]) -> int:
    return sum(c.width for c in columns) + _CELLS_PER_COLUMN * len(columns) + 1
