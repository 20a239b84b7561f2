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
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from wsgate.admin.status_table import backend_table, packed
from wsgate.args import UsageError
from wsgate.routing import DEFAULT_ROUTE

__all__ = ["AdminUnreachable", "add_arguments", "admin_url", "fetch_overview", "render", "run"]

DEFAULT_ADMIN = "http://127.0.0.1:9901"
_REASON_STATUS = {
    "rate_limited": 429,
    "client_rate_limited": 429,
    "no_capacity": 503,
    "no_healthy_backend": 503,
    "state_unavailable": 503,
    "backend_unreachable": 502,
    "draining": 503,
    "overloaded": 503,
    "no_route": 404,
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


def _uptime(seconds: float) -> str:
    s = int(seconds)
    days, hours, minutes = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m{s % 60}s" if minutes else f"{s}s"


def _on_route(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda backend: bool(backend["route"] == name)


def _route_line(route: dict[str, Any], width: int) -> Text:
    """A route's heading: its name, what it matches, its totals."""
    match = route["match"]
    return packed(
        [
            Text.assemble(("route ", "dim"), (route["name"], "bold cyan")),
            Text((match["host"] or "any host") + " " + match["path_prefix"]),
            Text.assemble(("active ", "dim"), (f"{route['active']}/{route['capacity']}", "bold")),
            Text.assemble(("queued ", "dim"), str(route["queued"])),
            Text.assemble(("admitted ", "dim"), str(route["admitted_total"])),
            Text.assemble(("rejected ", "dim"), str(route["rejected_total"])),
        ],
        width,
        "  ",
    )


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
    head = packed(
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
    summary = packed(
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

    parts: list[RenderableType] = [head, summary]
    routes = overview.get("routes") or []
    if len(routes) > 1 or any(r["name"] != DEFAULT_ROUTE for r in routes):
        for route in routes:
            parts.append(_route_line(route, width))
            parts.append(backend_table(backends, width, only=_on_route(route["name"])))
    else:
        parts.append(backend_table(backends, width))
    parts.append(legend)
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
