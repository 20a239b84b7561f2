"""``wsgate status``: a running gateway's backends, rejections and state in the terminal.

It reads the admin API's ``/snapshot`` (what the dashboard shows) and draws it
with rich: a bar per backend (this replica's connections, other replicas',
free slots against the cap), rejection rates by reason, the state-store mode.
``--watch`` redraws in place every ``--interval`` seconds.

Exit codes: 0 when the picture was shown; 1 when the admin API cannot be
reached or does not answer like wsgate (the gateway may be down: a fact about
the world that scripts want to tell apart from a typo); 2 for usage mistakes,
a wrong or missing token included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from wsgate.args import UsageError

__all__ = ["AdminUnreachable", "add_arguments", "admin_url", "fetch_overview", "render", "run"]

DEFAULT_ADMIN = "http://127.0.0.1:9901"
BAR_WIDTH = 24
_REASON_STATUS = {
    "rate_limited": 429,
    "client_rate_limited": 429,
    "no_capacity": 503,
    "no_healthy_backend": 503,
    "state_unavailable": 503,
    "backend_unreachable": 502,
    "draining": 503,
    "overloaded": 503,
}


class AdminUnreachable(Exception):
    """The admin API did not answer (or not like wsgate's)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin",
        default=os.environ.get("WSGATE_ADMIN", DEFAULT_ADMIN),
        metavar="URL",
        help=f"the gateway's admin address (default $WSGATE_ADMIN or {DEFAULT_ADMIN})",
    )
    parser.add_argument(
        "--token", metavar="T", help="admin token (default $WSGATE_ADMIN_TOKEN, if set)"
    )
    parser.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    parser.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="seconds between refreshes"
    )
    parser.add_argument("--json", action="store_true", help="print the snapshot as JSON")


def admin_url(text: str) -> str:
    """``host:port`` or ``http(s)://host:port[/prefix]``, normalized without a trailing slash."""
    value = text.strip()
    if "://" not in value:
        value = "http://" + value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--admin wants host:port or an http:// URL, got {text!r}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise UsageError(f"--admin has a bad port: {text!r}") from None
    return value.rstrip("/")


def fetch_overview(base: str, token: str | None, timeout: float = 3.0) -> dict[str, Any]:
    """GET ``/snapshot``; raise :class:`AdminUnreachable` or :class:`UsageError` (token)."""
    headers = {"Accept": "application/json", "User-Agent": "wsgate-status"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"{base}/snapshot", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = json.loads(response.read())
    except urllib.error.HTTPError as error:
        if error.code == 401:
            if token:
                raise UsageError(f"the admin API at {base} refused the token") from None
            raise UsageError(
                f"the admin API at {base} needs a token: pass --token or set WSGATE_ADMIN_TOKEN"
            ) from None
        raise AdminUnreachable(
            f"the admin API at {base} answered {error.code} {error.reason}; "
            "is this a wsgate admin address?"
        ) from None
    except urllib.error.URLError as error:
        reason = getattr(error.reason, "strerror", None) or str(error.reason)
        raise AdminUnreachable(
            f"cannot reach the admin API at {base} ({reason}); "
            "is `wsgate serve` running with that --admin address?"
        ) from None
    except (OSError, TimeoutError) as error:
        raise AdminUnreachable(f"cannot reach the admin API at {base} ({error})") from None
    except ValueError:
        raise AdminUnreachable(
            f"the admin API at {base} did not answer JSON; is this a wsgate admin address?"
        ) from None
    if not isinstance(data, dict) or "backends" not in data:
        raise AdminUnreachable(f"{base}/snapshot is not a wsgate snapshot")
    return data


# -- drawing --------------------------------------------------------------------------------------
def _recent_rates(overview: dict[str, Any], seconds: float) -> tuple[float, dict[str, float]]:
    """Admissions per second and rejections per second by reason, averaged over ``seconds``."""
    cutoff = float(overview["time"]) - seconds
    recent = [p for p in overview["history"]["points"] if p["t"] > cutoff]
    if not recent:
        return 0.0, {}
    admitted = sum(p["admitted"] for p in recent) / len(recent)
    by_reason: dict[str, float] = {}
    for point in recent:
        for reason, rate in point["rejected"].items():
            by_reason[reason] = by_reason.get(reason, 0.0) + rate / len(recent)
    return admitted, by_reason


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


def _uptime(seconds: float) -> str:
    s = int(seconds)
    days, hours, minutes = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m{s % 60}s" if minutes else f"{s}s"


def _packed(items: list[Text], width: int, gap: str = "   ") -> Text:
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


def _backend_table(backends: list[dict[str, Any]], width: int) -> Table:
    """The backends' table at its most informative that fits in ``width`` columns."""
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
    for row in zip(*(c.cells for c in chosen), strict=True):
        table.add_row(*row)
    return table


def _table_width(columns: list[_Column]) -> int:
    return sum(c.width for c in columns) + _CELLS_PER_COLUMN * len(columns) + 1


def render(
    overview: dict[str, Any], source: str, problem: str | None = None, width: int = 160
) -> RenderableType:
    """The whole picture as one rich renderable, for a terminal ``width`` columns wide."""
    state = overview["state"]
    totals = overview["totals"]
    mode_style = "bold green" if state["mode"] == "ok" else "bold red"
    readiness = (
        ("draining", "yellow")
        if overview["draining"]
        else ("ready", "green")
        if overview["ready"]
        else ("not ready", "red")
    )
    head = _packed(
        [
            Text.assemble(
                ("wsgate ", "bold blue"), ("replica ", "dim"), (overview["replica"], "bold")
            ),
            Text.assemble(("store ", "dim"), state["store"], " ", (state["mode"], mode_style)),
            Text.assemble(("live replicas ", "dim"), str(state["live_replicas"])),
            Text.assemble(readiness),
            Text.assemble(("up ", "dim"), _uptime(overview["uptime"])),
            Text(source, style="dim"),
        ],
        width,
        "  ",
    )
    admitted_rate, rejected_rates = _recent_rates(overview, 60)
    rate = overview["connect_rate"]
    tokens = (
        f"{rate['tokens_available']:.1f}/{rate['burst']} (refill {rate['per_second']:g}/s)"
        if rate
        else "unlimited"
    )
    summary = _packed(
        [
            Text.assemble(
                ("active ", "dim"), (f"{totals['active']}/{totals['capacity']}", "bold"),
                f" (here {totals['active_here']})",
            ),
            Text.assemble(
                ("admitted ", "dim"), str(totals["admitted_total"]), f" ({admitted_rate:.2f}/s)"
            ),
            Text.assemble(
                ("rejected ", "dim"), str(totals["rejected_total"]),
                f" ({sum(rejected_rates.values()):.2f}/s)",
            ),
            Text.assemble(("tokens ", "dim"), tokens),
            Text.assemble(("sessions here ", "dim"), str(totals["sessions_here"])),
            Text.assemble(("queued ", "dim"), str(totals["queued"])),
        ],
        width,
    )  # fmt: skip

    backends = overview["backends"]
    legend = Text.assemble(
        ("█", "bright_green"), " this replica  ", ("█", "green4"), " other replicas  ",
        ("░", "grey35"), " free" if backends else " free   (no backends yet)",
    )  # fmt: skip

    parts: list[RenderableType] = [head, summary, _backend_table(backends, width), legend]
    rejected = {reason: n for reason, n in totals["rejected"].items() if n}
    if rejected:
        reasons = Table(header_style="bold")
        reasons.add_column("Rejected because", no_wrap=True)
        reasons.add_column("Status", justify="right")
        reasons.add_column("Total", justify="right")
        reasons.add_column("Last min /s", justify="right")
        for reason, count in sorted(rejected.items(), key=lambda item: -item[1]):
            status = _REASON_STATUS.get(reason, "")
            reasons.add_row(
                reason, str(status), str(count), f"{rejected_rates.get(reason, 0.0):.2f}"
            )
        parts.append(reasons)
    else:
        parts.append(Text("no rejections", style="dim"))
    if problem:
        parts.append(Text(problem, style="bold red"))
    return Group(*parts)


# -- the command ----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    base = admin_url(args.admin)
    token = args.token or os.environ.get("WSGATE_ADMIN_TOKEN") or None
    if args.interval <= 0:
        raise UsageError("--interval must be a positive number of seconds")
    try:
        overview = fetch_overview(base, token)
    except AdminUnreachable as error:
        print(f"wsgate status: error: {error}", file=sys.stderr)
        return 1
    console = Console()
    if not args.watch:
        if args.json:
            print(json.dumps(overview, indent=2))
        else:
            console.print(render(overview, base, width=console.width))
        return 0
    try:
        if args.json:
            _watch_json(base, token, overview, args.interval)
        else:
            _watch(console, base, token, overview, args.interval)
    except KeyboardInterrupt:
        pass
    return 0


def _watch(
    console: Console, base: str, token: str | None, overview: dict[str, Any], interval: float
) -> None:
    with Live(
        render(overview, base, width=console.width), console=console, auto_refresh=False
    ) as live:
        while True:
            time.sleep(interval)
            problem = None
            try:
                overview = fetch_overview(base, token)
            except AdminUnreachable as error:
                # Keep the last picture and say why it is stale; the gateway may come back.
                problem = f"{time.strftime('%H:%M:%S')} {error}"
            live.update(render(overview, base, problem, console.width), refresh=True)


def _watch_json(base: str, token: str | None, overview: dict[str, Any], interval: float) -> None:
    """One JSON document per line and refresh; failures go to stderr, not as stale data."""
    current: dict[str, Any] | None = overview
    while True:
        if current is not None:
            print(json.dumps(current, separators=(",", ":")), flush=True)
        time.sleep(interval)
        try:
            current = fetch_overview(base, token)
        except AdminUnreachable as error:
            current = None
            print(f"wsgate status: {error}", file=sys.stderr, flush=True)
