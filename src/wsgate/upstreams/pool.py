"""The backends the gateway knows, with their health and what they hold.

Health has two sources. Active checks (:mod:`.health`) flip ``healthy`` after
``healthy_threshold`` successes or ``unhealthy_threshold`` failures. Passive
ejection takes a backend out for a while after consecutive connect failures or
5xx answers to upgrades, doubling the time on each repeat without a success
in between (up to :data:`MAX_EJECTION`). A backend that has
left discovery is ``draining``: no new connections, live ones closed gently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from wsgate.admission import Candidate
from wsgate.config import BackendSpec, BackendTlsConfig, PassiveHealthConfig, parse_address

__all__ = ["MAX_EJECTION", "Backend", "BackendPool"]

log = logging.getLogger("wsgate.upstreams")

# Doubling stops here, so a backend that keeps failing is retried every few minutes.
MAX_EJECTION = 300.0


@dataclass(eq=False)
class Backend:
    id: str
    host: str
    port: int
    max_connections: int | None = None  # overrides the default cap
    healthy: bool = True
    draining: bool = False
    ejected_until: float = 0.0
    ejections: int = 0
    ejection_streak: int = 0  # ejections since the last success: each one lasts twice as long
    consecutive_failures: int = 0  # passive: connect failures / 5xx on upgrade
    check_successes: int = 0
    check_failures: int = 0
    admitted_total: int = 0
    rejected_total: int = 0
    connect_failures_total: int = 0
    own_tls: BackendTlsConfig | None = None  # its spec's tls key, as written
    tls: BackendTlsConfig | None = None  # TLS toward it (its own tls, or backend_tls)
    # Live connections on this replica; the proxy registers them for drain/rebalance.
    connections: set[Any] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def cap(self, default: int) -> int:
        return self.max_connections if self.max_connections is not None else default

    def available(self, now: float) -> bool:
        return self.healthy and not self.draining and now >= self.ejected_until

    @classmethod
    def from_spec(
        cls,
        spec: BackendSpec,
        *,
        healthy: bool = True,
        default_tls: BackendTlsConfig | None = None,
    ) -> Backend:
        host, port = parse_address(spec.address)
        backend = cls(spec.backend_id, host, port, spec.max_connections, healthy=healthy)
        backend.own_tls = spec.tls
        backend.tls = _tls_of(spec.tls, default_tls)
        return backend


def _tls_of(
    own: BackendTlsConfig | None, default: BackendTlsConfig | None
) -> BackendTlsConfig | None:
    """The backend's own ``tls``, else the pool's ``backend_tls``; None for plain TCP."""
    chosen = own if own is not None else default
    return chosen if chosen is not None and chosen.enabled else None


class BackendPool:
    def __init__(
        self,
        default_cap: int,
        passive: PassiveHealthConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._default_cap = default_cap
        self.passive = passive
        self.default_tls: BackendTlsConfig | None = None  # backend_tls; a reload may change it
        self._clock = clock
        self._backends: dict[str, Backend] = {}
        self._ejected: set[str] = set()  # ids whose ejection has not been seen to end
        self.on_change: list[Callable[[], None]] = []
        # The candidates, made again only after a change (the store sees the same
        # sequence until then, so it never compares pools on the admission path).
        self._candidates: tuple[Candidate, ...] | None = None
        self._candidate_ids: frozenset[str] = frozenset()
        self._candidates_until = 0.0  # the next end of an ejection among them

    @property
    def default_cap(self) -> int:
        return self._default_cap

    @default_cap.setter
    def default_cap(self, cap: int) -> None:
        self._default_cap = cap
        self.changed()

    def changed(self) -> None:
        """A backend's health, drain, ejection or cap changed: make the candidates again."""
        self._candidates = None

    def __iter__(self) -> Iterator[Backend]:
        return iter(list(self._backends.values()))

    def __len__(self) -> int:
        return len(self._backends)

    def get(self, backend_id: str) -> Backend | None:
        return self._backends.get(backend_id)

    def candidates(self) -> tuple[Candidate, ...]:
        """The backends that may take new connections, in configured order.

        The same tuple until something changes (see :meth:`changed`) or an
        ejection ends.
        """
        now = self._clock()
        if self._candidates is None or now >= self._candidates_until:
            default = self._default_cap
            self._candidates = tuple(
                Candidate(b.id, b.cap(default)) for b in self._backends.values() if b.available(now)
            )
            self._candidate_ids = frozenset(c.backend_id for c in self._candidates)
            ends = [b.ejected_until for b in self._backends.values() if b.ejected_until > now]
            self._candidates_until = min(ends, default=float("inf"))
        return self._candidates

    def is_candidate(self, backend_id: str) -> bool:
        """Whether the backend may take new connections now."""
        self.candidates()
        return backend_id in self._candidate_ids

    def caps(self) -> dict[str, int]:
        return {b.id: b.cap(self._default_cap) for b in self._backends.values()}

    def update(
        self, specs: Iterable[BackendSpec], *, initial: bool = False
    ) -> tuple[list[Backend], list[Backend]]:
        """Make the pool match ``specs``; return (added, removed).

        Backends that appear after start wait for a passing health check, so
        they get connections only once they answer. Removed backends are marked
        draining and kept while they still hold connections.
        """
        wanted = {spec.backend_id: spec for spec in specs}
        added: list[Backend] = []
        removed: list[Backend] = []
        for backend_id, spec in wanted.items():
            current = self._backends.get(backend_id)
            host, port = parse_address(spec.address)
            if current is None:
                backend = Backend.from_spec(spec, healthy=initial, default_tls=self.default_tls)
                self._backends[backend_id] = backend
                added.append(backend)
            else:
                current.host, current.port = host, port
                current.max_connections = spec.max_connections
                current.own_tls = spec.tls
                current.tls = _tls_of(spec.tls, self.default_tls)  # new connections only
                if current.draining:
                    current.draining = False
                    log.info("backend %s is back in discovery", backend_id)
        for backend_id, backend in list(self._backends.items()):
            if backend_id not in wanted and not backend.draining:
                backend.draining = True
                removed.append(backend)
        self.forget_drained()
        self.changed()  # caps and addresses may have changed too
        if added or removed:
            for callback in self.on_change:
                callback()
        return added, removed

    def set_default_tls(self, default: BackendTlsConfig | None) -> None:
        """A new ``backend_tls``: for new connections to every backend without its own."""
        self.default_tls = default
        for backend in self._backends.values():
            backend.tls = _tls_of(backend.own_tls, default)

    def forget_drained(self) -> None:
        for backend_id, backend in list(self._backends.items()):
            if backend.draining and not backend.connections:
                del self._backends[backend_id]
                self.changed()

    # Passive outlier detection
    def record_success(self, backend: Backend) -> None:
        backend.consecutive_failures = 0
        backend.ejection_streak = 0

    def record_failure(self, backend: Backend, why: str) -> None:
        backend.consecutive_failures += 1
        passive = self.passive
        if passive is None or backend.consecutive_failures < passive.consecutive_failures:
            return
        backend.ejections += 1
        backend.ejection_streak += 1
        duration = min(
            passive.ejection * 2 ** (backend.ejection_streak - 1),
            max(passive.ejection, MAX_EJECTION),
        )
        backend.ejected_until = self._clock() + duration
        self.changed()
        backend.consecutive_failures = 0
        self._ejected.add(backend.id)
        log.warning(
            "backend %s ejected for %.0fs after %d consecutive failures (last: %s)",
            backend.id, duration, passive.consecutive_failures, why,
        )  # fmt: skip

    def end_ejections(self) -> list[Backend]:
        """The backends whose ejection has run out since the last call (logged)."""
        now = self._clock()
        ended = []
        for backend_id in list(self._ejected):
            backend = self._backends.get(backend_id)
            if backend is None:
                self._ejected.discard(backend_id)
            elif now >= backend.ejected_until:
                self._ejected.discard(backend_id)
                ended.append(backend)
                log.info("backend %s is back after its ejection", backend_id)
        return ended
