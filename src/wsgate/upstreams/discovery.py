"""Backends that come and go: snapshots from DNS or from a file, and what changed.

A *source* observes the complete list of backends at one moment (a snapshot).
``async for backends in source.snapshots()`` gives the first snapshot as soon as
one is seen, then every later one that differs, and keeps the last good one
through failures: a DNS server that does not answer or a half-written file
never empties the pool, while an authoritative "no such name" or a file that
lists ``[]`` does. :func:`diff_backends` tells what two snapshots differ by.

Backend ids are stable across snapshots: for DNS, ``IP:port`` (``[IPv6]:port``);
for a file, the ``id`` of each entry, or its address when it has none.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import yaml
from pydantic import TypeAdapter, ValidationError

from wsgate.config import (
    BackendEntry,
    BackendSpec,
    DnsDiscovery,
    FileDiscovery,
    parse_address,
)
from wsgate.upstreams.dns import DnsFailure, resolve_addresses, system_nameserver

__all__ = [
    "BackendChanges",
    "BackendSource",
    "DiscoveryError",
    "DnsSource",
    "FileSource",
    "diff_backends",
    "parse_backend_list",
    "source_for",
    "specs_from_addresses",
]

log = logging.getLogger("wsgate.discovery")

# The same shapes and checks as the config's static ``backends`` list.
_BACKEND_LIST = TypeAdapter(list[BackendEntry])

# A refresh of 0 is accepted by the config; polling that often would only spin.
_MIN_REFRESH = 0.05


class DiscoveryError(Exception):
    """A source could not produce a snapshot; the message is one line for the log."""


@dataclass(frozen=True, slots=True)
class BackendChanges:
    """How a new snapshot differs from the previous one, by backend id."""

    added: tuple[BackendSpec, ...]  # ids not in the previous snapshot, in their new order
    removed: tuple[BackendSpec, ...]  # ids gone, as they were
    kept: tuple[BackendSpec, ...]  # ids in both, as they are now
    updated: tuple[BackendSpec, ...]  # the kept ones whose address or cap changed

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.updated)


def diff_backends(
    previous: Iterable[BackendSpec], current: Iterable[BackendSpec]
) -> BackendChanges:
    """Compare two snapshots by backend id.

    Raises:
        ValueError: ``current`` names one id twice.
    """
    before = {spec.backend_id: spec for spec in previous}
    now: dict[str, BackendSpec] = {}
    for spec in current:
        if spec.backend_id in now:
            raise ValueError(f"backend id {spec.backend_id!r} appears twice")
        now[spec.backend_id] = spec
    kept = tuple(spec for backend_id, spec in now.items() if backend_id in before)
    return BackendChanges(
        added=tuple(spec for backend_id, spec in now.items() if backend_id not in before),
        removed=tuple(spec for backend_id, spec in before.items() if backend_id not in now),
        kept=kept,
        updated=tuple(spec for spec in kept if spec != before[spec.backend_id]),
    )


def specs_from_addresses(addresses: Iterable[str], port: int) -> list[BackendSpec]:
    """One backend per IP address, with the id ``IP:port`` (``[IPv6]:port``)."""
    specs: dict[str, BackendSpec] = {}
    for ip in addresses:
        address = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        specs.setdefault(address, BackendSpec(address=address))
    return list(specs.values())


def parse_backend_list(content: str | bytes, origin: str) -> list[BackendSpec]:
    """Read a backends file: a YAML list in the form of the config's static ``backends``.

    Raises:
        DiscoveryError: naming ``origin`` and the first problem.
    """
    if not content.strip():
        # Often a file caught between truncation and write: never read as "no backends".
        raise DiscoveryError(f"backends file {origin} is empty; write [] for no backends")
    try:
        data = yaml.safe_load(content)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise DiscoveryError(f"backends file {origin} is not valid YAML{where}") from None
    if not isinstance(data, list):
        raise DiscoveryError(
            f"backends file {origin} must be a list of host:port or {{address, id, "
            "max_connections}} entries"
        )
    try:
        backends = _BACKEND_LIST.validate_python(data)
    except ValidationError as error:
        raise DiscoveryError(f"backends file {origin}: {_describe(error)}") from None
    seen: set[str] = set()
    for backend in backends:
        if backend.backend_id in seen:
            raise DiscoveryError(
                f"backends file {origin}: backend id {backend.backend_id!r} appears twice"
            )
        seen.add(backend.backend_id)
    return backends


def _describe(error: ValidationError) -> str:
    """``entry 2, address: expected host:port, got 'x'`` (entries counted from 1)."""
    first = error.errors()[0]
    index, *fields = (part for part in first["loc"] if not str(part).startswith("function-"))
    where = ", ".join([f"entry {int(index) + 1}", *map(str, fields)])
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    if not fields:
        return f"{where}: expected host:port or {{address, id, max_connections}}"
    return f"{where}: {first['msg'].removeprefix('Value error, ')}"


class BackendSource(Protocol):
    """Where the backends come from when they are not a static list."""

    refresh: float

    async def observe(self) -> list[BackendSpec]:
        """The backends seen now; raises DiscoveryError when none can be seen."""
        ...

    def snapshots(self) -> AsyncGenerator[list[BackendSpec], None]:
        """Every new snapshot, checked every ``refresh`` seconds, until cancelled."""
        ...


class DnsSource:
    """The A and AAAA records of a name (a headless Service), one backend per address."""

    def __init__(self, config: DnsDiscovery, *, attempt_timeout: float = 2.0):
        self.config = config
        self.refresh = max(config.refresh, _MIN_REFRESH)
        self.server = (
            parse_address(config.server, default_host="127.0.0.1")
            if config.server
            else system_nameserver()
        )
        # Two tries must fit in one refresh, or refreshes would pile up behind them.
        self.attempt_timeout = min(attempt_timeout, max(self.refresh / 2, 0.2))

    def __str__(self) -> str:
        host, port = self.server
        return f"DNS {self.config.name} (server {host}:{port})"

    async def observe(self) -> list[BackendSpec]:
        try:
            addresses = await resolve_addresses(
                self.config.name, self.server, attempt_timeout=self.attempt_timeout
            )
        except DnsFailure as error:
            raise DiscoveryError(f"DNS discovery failed: {error}") from None
        return specs_from_addresses(addresses, self.config.port)

    def snapshots(self) -> AsyncGenerator[list[BackendSpec], None]:
        return _snapshots(self)


class FileSource:
    """A YAML list of backends in a file, read again when its content changes.

    Writers should replace the file atomically (write elsewhere, then rename), as
    Kubernetes does for mounted ConfigMaps; a half-written file that happens to be
    valid YAML cannot be told from a complete one.
    """

    def __init__(self, config: FileDiscovery):
        self.path = Path(config.path)
        self.refresh = max(config.refresh, _MIN_REFRESH)
        self._content: bytes | None = None
        self._specs: list[BackendSpec] = []

    def __str__(self) -> str:
        return f"file {self.path}"

    async def observe(self) -> list[BackendSpec]:
        # A small file read in full costs less than trusting mtimes, which can
        # miss a rewrite within the same tick.
        try:
            content = self.path.read_bytes()
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise DiscoveryError(f"cannot read backends file {self.path}: {reason}") from None
        if content != self._content:
            self._specs = parse_backend_list(content, str(self.path))
            self._content = content
        return list(self._specs)

    def snapshots(self) -> AsyncGenerator[list[BackendSpec], None]:
        return _snapshots(self)


def source_for(config: DnsDiscovery | FileDiscovery) -> DnsSource | FileSource:
    """The source that follows ``backends: {dns: ...}`` or ``backends: {file: ...}``."""
    return DnsSource(config) if isinstance(config, DnsDiscovery) else FileSource(config)


async def _snapshots(source: BackendSource) -> AsyncGenerator[list[BackendSpec], None]:
    last: Sequence[BackendSpec] | None = None
    failure: str | None = None  # logged once, until it changes or heals
    while True:
        try:
            specs = await source.observe()
        except DiscoveryError as error:
            if str(error) != failure:
                kept = "no backends yet" if last is None else f"the {len(last)} backends seen last"
                log.warning("%s; keeping %s", error, kept)
                failure = str(error)
        else:
            if failure is not None:
                log.info("%s answers again: %d backends", source, len(specs))
                failure = None
            if specs != last:
                last = specs
                yield list(specs)
        await asyncio.sleep(source.refresh)
