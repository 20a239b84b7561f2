"""What a load run will do, without I/O: its shape, targets, addresses and delays.

The load generator's flags are parsed here into a :class:`LoadPlan` of plain
values (:func:`plan_from_args`), and every choice
of *when* (the wait before a message, the pause before a retry or a reconnect,
the pacing of connects) is a pure function of those values and a random
generator, so the rules are tested without sockets and without waiting.

The retry rule: after a refusal with ``Retry-After: S`` the next attempt comes
no sooner than ``S`` seconds, plus a random share of an exponential backoff
(``base * 2**attempt``, capped), so clients refused together do not come back
together.
"""

from __future__ import annotations

import argparse
import email.utils
import ipaddress
import json
import random
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from wsgate.config import ConfigError, parse_duration
from wsgate.testbed.stages import Schedule, parse_stages
from wsgate.testbed.storm import StormPlan
from wsgate.testbed.thresholds import Threshold, parse_threshold
from wsgate.wire import CloseCode

__all__ = [
    "RECONNECT_CODES",
    "ConnectPacer",
    "Interval",
    "LoadPlan",
    "Target",
    "answer_pod",
    "message_text",
    "parse_interval",
    "parse_retry_after",
    "parse_source_ips",
    "parse_target",
    "plan_from_args",
    "reconnect_delay",
    "refusal_reason",
    "retry_delay",
]


@dataclass(frozen=True)
class Interval:
    """A uniform random wait between ``low`` and ``high`` seconds."""

    low: float
    high: float

    def draw(self, rng: random.Random) -> float:
        return self.low if self.low == self.high else rng.uniform(self.low, self.high)

    def scaled(self, factor: float) -> Interval:
        return Interval(self.low * factor, self.high * factor)

    @property
    def back_to_back(self) -> bool:
        return self.high == 0


def parse_interval(text: str, flag: str = "--message-interval") -> Interval | None:
    """``10s-20s`` (uniform), ``5s`` (fixed), ``0`` (back to back), ``off`` (never: ``None``)."""
    value = text.strip().lower()
    if value in ("off", "none", "never"):
        return None
    low_text, sep, high_text = value.partition("-")
    try:
        low = parse_duration(low_text)
        high = parse_duration(high_text) if sep else low
    except ValueError as error:
        raise ConfigError(f"{flag}: {error} (write A-B like 10s-20s, or off)") from None
    if high < low:
        raise ConfigError(f"{flag}: the range {text!r} ends before it starts")
    return Interval(low, high)


def parse_source_ips(text: str) -> list[str]:
    """``127.0.0.2-127.0.0.11`` (an inclusive range) or a comma-separated list."""
    addresses: list[str] = []
    for part in (piece.strip() for piece in text.split(",")):
        if not part:
            continue
        first_text, sep, last_text = part.partition("-")
        try:
            first = ipaddress.ip_address(first_text.strip())
            last = ipaddress.ip_address(last_text.strip()) if sep else first
        except ValueError as error:
            raise ConfigError(f"--source-ips: {error}") from None
        if first.version != last.version or int(last) < int(first):
            raise ConfigError(f"--source-ips: {part!r} is not a range from low to high")
        if int(last) - int(first) >= 65536:
            raise ConfigError(f"--source-ips: {part!r} holds more than 65536 addresses")
        addresses.extend(str(ipaddress.ip_address(n)) for n in range(int(first), int(last) + 1))
    if not addresses:
        raise ConfigError("--source-ips: no address given")
    return addresses


@dataclass(frozen=True)
class Target:
    """Where one URL points: enough to open a socket and write a request line."""

    url: str
    scheme: str
    host: str
    port: int
    path: str

    @property
    def tls(self) -> bool:
        return self.scheme in ("wss", "https")

    @property
    def host_header(self) -> str:
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def parse_target(url: str, http: bool) -> Target:
    wanted = ("http", "https") if http else ("ws", "wss")
    parts = urlsplit(url)
    if parts.scheme not in wanted:
        mode = "--http mode takes http:// URLs" if http else "WebSocket mode takes ws:// URLs"
        hint = "" if http else " (add --http for plain HTTP requests)"
        raise ConfigError(f"{url!r}: {mode}{hint}")
    if not parts.hostname:
        raise ConfigError(f"{url!r}: no host")
    try:
        port = parts.port or (443 if parts.scheme in ("wss", "https") else 80)
    except ValueError as error:
        raise ConfigError(f"{url!r}: {error}") from None
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    return Target(url, parts.scheme, parts.hostname, port, path)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or an HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retry_delay(
    attempt: int,
    retry_after: float | None,
    rng: random.Random,
    *,
    base: float = 0.5,
    cap: float = 10.0,
) -> float:
    """The pause before retry number ``attempt + 1``: never less than ``retry_after``."""
    backoff = min(cap, base * (2 ** min(attempt, 30)))
    return (retry_after or 0.0) + rng.uniform(0.0, backoff)


def reconnect_delay(rng: random.Random, base: float = 1.0) -> float:
    """The pause before reopening a session the server closed (see :data:`RECONNECT_CODES`)."""
    return rng.uniform(0.5 * base, 1.5 * base)


class ConnectPacer:
    """Spaces connect attempts by ``1/rate`` seconds across all clients (``--connect-rate``)."""

    def __init__(self, rate: float) -> None:
        self.spacing = 1.0 / rate
        self._next = 0.0

    def wait(self, now: float) -> float:
        """Book the next slot and return how long to wait for it."""
        slot = max(now, self._next)
        self._next = slot + self.spacing
        return slot - now


def message_text(sequence: int, size: int) -> str:
    """A text message of exactly ``size`` bytes (at least the sequence number)."""
    head = f"msg-{sequence}"
    if size <= len(head):
        return head
    return head + " " + "x" * (size - len(head) - 1)


def answer_pod(payload: bytes) -> str | None:
    """The ``pod`` field of a backend's JSON answer, if it is one."""
    if payload[:1] != b"{":
        return None
    try:
        answer = json.loads(payload)
    except ValueError:
        return None
    pod = answer.get("pod") if isinstance(answer, dict) else None
    return str(pod) if pod is not None else None


def refusal_reason(body: bytes) -> str | None:
    """The ``error`` field of a refusal's JSON body (``rate_limited``, ``no_capacity``, ...)."""
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    reason = answer.get("error") if isinstance(answer, dict) else None
    return str(reason) if reason else None


# Closes a server makes on purpose, after which a client should come back: the
# gateway drains (1001), rebalances (1012) or is over capacity (1013).
RECONNECT_CODES = frozenset(
    {CloseCode.GOING_AWAY, CloseCode.SERVICE_RESTART, CloseCode.TRY_AGAIN_LATER}
)


@dataclass
class LoadPlan:
    """A load run, parsed and checked (the flags of ``wsgate load`` as values)."""

    targets: list[Target]
    clients: int = 1
    connections: int = 1
    connect_interval: float = 0.0
    connect_rate: float | None = None
    message_interval: Interval | None = field(default_factory=lambda: Interval(10.0, 20.0))
    message_size: int = 64
    duration: float | None = None
    source_ips: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    reconnect_codes: frozenset[int] = RECONNECT_CODES
    reconnect_delay: float = 1.0
    backoff_base: float = 0.5
    backoff_max: float = 10.0
    connect_timeout: float = 5.0
    answer_timeout: float = 10.0
    max_pending: int = 1000
    http: bool = False
    think: Interval = field(default_factory=lambda: Interval(1.0, 3.0))
    concurrency: int | None = None
    insecure: bool = False
    seed: int | None = None
    stages: Schedule | None = None
    storm: StormPlan | None = None
    thresholds: tuple[Threshold, ...] = ()

    @property
    def target_count(self) -> int:
        if self.http and self.concurrency is not None:
            return self.concurrency
        if self.stages is not None:
            return self.stages.peak
        return self.clients * self.connections

    @property
    def urls(self) -> list[str]:
        return [target.url for target in self.targets]

    def source_ip(self, index: int) -> str | None:
        return self.source_ips[index % len(self.source_ips)] if self.source_ips else None

    def target(self, index: int) -> Target:
        return self.targets[index % len(self.targets)]

    def ssl_context(self) -> ssl.SSLContext | None:
        if not any(target.tls for target in self.targets):
            return None
        context = ssl.create_default_context()
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def plan_from_args(args: argparse.Namespace) -> LoadPlan:
    targets = [parse_target(url, args.http) for url in args.urls]
    headers: dict[str, str] = {}
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            raise ConfigError(f"--header: expected 'Name: value', got {header!r}")
        headers[name.strip()] = value.strip()
    try:
        codes = frozenset(int(code) for code in args.reconnect_codes.split(",") if code.strip())
    except ValueError:
        raise ConfigError(
            f"--reconnect-codes: expected numbers like 1001,1012, got {args.reconnect_codes!r}"
        ) from None
    think = parse_interval(args.think, "--think") or Interval(0.0, 0.0)
    if args.connect_rate is not None and args.connect_rate <= 0:
        raise ConfigError("--connect-rate must be above 0")
    stages = parse_stages(args.stages) if args.stages else None
    storm = _storm_from_args(args, stages)
    if storm is not None:
        # A storm's sessions come back whatever ended them, a lost connection included.
        codes |= {CloseCode.ABNORMAL_CLOSURE}
    thresholds = tuple(parse_threshold(text) for text in args.threshold)
    for threshold in thresholds:
        if threshold.figure.storm and storm is None:
            raise ConfigError(f"--threshold {threshold.expression}: only a --storm run has it")
    if stages is not None and (args.http or args.interactive):
        raise ConfigError("--stages drives WebSocket sessions; leave out --http / --interactive")
    return LoadPlan(
        targets=targets,
        clients=args.clients,
        connections=args.connections,
        connect_interval=args.connect_interval,
        connect_rate=args.connect_rate,
        message_interval=parse_interval(args.message_interval),
        message_size=args.message_size,
        duration=args.duration,
        source_ips=parse_source_ips(args.source_ips) if args.source_ips else [],
        headers=headers,
        reconnect_codes=codes,
        reconnect_delay=args.reconnect_delay,
        backoff_base=args.backoff_base,
        backoff_max=args.backoff_max,
        connect_timeout=args.connect_timeout,
        answer_timeout=args.answer_timeout,
        max_pending=args.max_pending,
        http=args.http,
        think=think,
        concurrency=args.concurrency,
        insecure=args.insecure,
        seed=args.seed,
        stages=stages,
        storm=storm,
        thresholds=thresholds,
    )


def _storm_from_args(args: argparse.Namespace, stages: Schedule | None) -> StormPlan | None:
    if not args.storm:
        if args.storm_wait is not None:
            raise ConfigError("--storm-wait is part of a storm: add --storm")
        return None
    if args.http or args.interactive or stages is not None:
        raise ConfigError(
            "--storm holds WebSocket sessions; leave out --http, --interactive, --stages"
        )
    return StormPlan(
        sessions=args.clients * args.connections,
        hold=args.storm_hold,
        timeout=args.storm_timeout,
        wait_for=args.storm_wait,
    )
