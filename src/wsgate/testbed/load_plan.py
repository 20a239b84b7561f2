"""What a load run will do, without I/O: its shape, targets, addresses and delays.

The load generator's flags are parsed here into plain values, and every choice
of *when* (the wait before a message, the pause before a retry or a reconnect,
the pacing of connects) is a pure function of those values and a random
generator, so the rules are tested without sockets and without waiting.

The retry rule: after a refusal with ``Retry-After: S`` the next attempt comes
no sooner than ``S`` seconds, plus a random share of an exponential backoff
(``base * 2**attempt``, capped), so clients refused together do not come back
together.
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import random
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from wsgate.config import ConfigError, parse_duration

__all__ = [
    "ConnectPacer",
    "Interval",
    "Target",
    "answer_pod",
    "message_text",
    "parse_interval",
    "parse_retry_after",
    "parse_source_ips",
    "parse_target",
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
    """The pause before reopening a session the server closed (1001, 1012, 1013)."""
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
