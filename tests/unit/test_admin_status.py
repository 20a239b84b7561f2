"""``wsgate status`` drawn without a gateway: whole headers, names and numbers at any width."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from tests.unit.test_admin_snapshot import backend, snapshot

from wsgate.admin.snapshot import overview_json
from wsgate.admin.status import render

HEADERS = {"Backend", "Address", "Health", "Connections vs cap", "Connections", "Active/cap",
           "Active", "Here", "Cap", "Admitted", "Rejected", "Conn. fail"}  # fmt: skip
LOAD_HEADERS = ("Connections vs cap", "Connections", "Active/cap")
# What a table must keep at any width: a name, its health, its connections against its cap.
ALWAYS = ("Backend", "Health")


def drawn(overview: dict[str, Any], width: int) -> list[str]:
    """The lines ``wsgate status`` prints into a pipe that is ``width`` columns wide."""
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=False, color_system=None)
    console.print(render(overview, "http://127.0.0.1:9901", width=console.width))
    return out.getvalue().splitlines()


def header_cells(lines: list[str]) -> list[str]:
    row = next(line for line in lines if line.startswith("┃"))
    return [cell.strip() for cell in row.strip("┃").split("┃")]


def body_rows(lines: list[str]) -> list[list[str]]:
    """The rows of the first table (the backends)."""
    end = next(i for i, line in enumerate(lines) if line.startswith("└"))
    return [
        [c.strip() for c in line.strip("│").split("│")]
        for line in lines[:end]
        if line.startswith("│")
    ]


def overview_of(backends: list[Any]) -> dict[str, Any]:
    return overview_json(snapshot(backends=backends), [])


def check_whole(lines: list[str], backends: list[Any], width: int) -> list[str]:
    assert all(len(line) <= width for line in lines), "\n".join(lines)
    assert not any("…" in line for line in lines), "\n".join(lines)
    headers = header_cells(lines)
    assert set(headers) <= HEADERS and set(ALWAYS) <= set(headers), headers
    rows = body_rows(lines)
    assert len(rows) == len(backends)
    for row, b in zip(rows, backends, strict=True):
        cells = dict(zip(headers, row, strict=True))
        assert cells["Backend"] == b.id
        [load] = [cells[h] for h in LOAD_HEADERS if h in cells]
        assert re.search(rf"(^| ){b.active}/{b.max_connections}$", load)
        expected = {
            "Here": b.active_here, "Admitted": b.admitted_total,
            "Rejected": b.rejected_total, "Cap": b.max_connections,
        }  # fmt: skip
        for header, value in expected.items():
            if header in cells:
                assert cells[header] == str(value)
    return headers


@pytest.mark.parametrize("width", [80, 100, 160])
def test_the_table_fits_and_keeps_its_words(width: int) -> None:
    backends = [
        backend("pod-a"),
        backend("chat-7d9f8c6b5-x2k4q", active=1, active_here=1, admitted_total=123456),
        backend("pod-c", healthy=False, active=0, active_here=0, max_connections=10),
    ]
    headers = check_whole(drawn(overview_of(backends), width), backends, width)
    assert "Connections vs cap" in headers or width < 100
    if width >= 160:
        assert {"Address", "Active", "Cap", "Conn. fail"} <= set(headers)


def test_at_80_columns_the_bar_stays() -> None:
    lines = drawn(overview_of([backend("pod-a"), backend("pod-b")]), 80)
    headers = header_cells(lines)
    assert headers[:3] == ["Backend", "Health", "Connections"]
    assert all("█" in row[2] for row in body_rows(lines)), "\n".join(lines)
    assert {"Admitted", "Rejected"} <= set(header_cells(lines))


def test_summary_lines_break_between_items() -> None:
    lines = drawn(overview_of([backend("pod-a")]), 80)
    text = "\n".join(lines)
    for item in ("tokens 2.5/10 (refill 1/s)", "live replicas 3", "queued 0"):
        assert item in text


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1, max_size=28)
counts = st.integers(min_value=0, max_value=10**7)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.builds(
            lambda name, active, cap, admitted, rejected: backend(
                name,
                active=active,
                active_here=min(active, 1),
                max_connections=cap,
                admitted_total=admitted,
                rejected_total=rejected,
            ),
            names,
            st.integers(0, 999),
            st.integers(1, 999),
            counts,
            counts,
        ),
        min_size=1,
        max_size=6,
        unique_by=lambda b: b.id,
    ),
    st.sampled_from([80, 120]),
)
def test_any_pool_fits(backends: list[Any], width: int) -> None:
    check_whole(drawn(overview_of(backends), width), backends, width)


def test_routes_each_get_a_heading_and_their_own_table() -> None:
    from tests.unit.test_admin_snapshot import two_routes

    lines = drawn(overview_json(two_routes(), []), 80)
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    headings = [line for line in lines if line.startswith("route ")]
    assert len(headings) == 2, "\n".join(lines)
    assert headings[0].split()[:5] == ["route", "default", "any", "host", "/"]
    assert headings[1].split()[:4] == ["route", "chat", "chat.example.com", "/ws"]
    assert "active 1/2" in headings[1] and "queued 2" in headings[1]
    # Each heading is followed by its own table: default has pod-a and pod-b, chat pod-a and pod-c.
    tables: list[list[str]] = []
    open_table = False
    for line in lines:
        if line.startswith("route "):
            tables.append([])
            open_table = True
        elif line.startswith("└"):
            open_table = False
        elif line.startswith("│") and open_table:
            tables[-1].append(line.strip("│").split("│")[0].strip())
    assert tables == [["pod-a"], ["pod-a", "pod-c"]]
    tops = [line for line in lines if line.startswith("┏")]
    assert tops[0] == tops[1]  # the routes' tables line up


def test_one_default_route_draws_as_before() -> None:
    lines = drawn(overview_of([backend("pod-a")]), 80)
    assert not any(line.startswith("route ") for line in lines)
