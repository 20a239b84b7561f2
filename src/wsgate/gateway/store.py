"""The admission store the config names: embedded memory, or Redis shared by replicas.

The rest of the gateway sees only the contract
(:class:`~wsgate.admission.AdmissionStore`); this is the one place that
knows which stores there are.
"""

from __future__ import annotations

from typing import Protocol

from wsgate.admission import AdmissionStore, Limits
from wsgate.admission.memory import MemoryStore
from wsgate.config import Config, LimitsConfig

__all__ = ["limits_of", "open_store"]


class _HasLimits(Protocol):
    @property
    def limits(self) -> LimitsConfig: ...


def limits_of(config: _HasLimits) -> Limits:
    """What a store enforces, from the ``limits`` of the config or of a route."""
    limits = config.limits
    return Limits(
        connect_rate=limits.connect_rate,
        client_connect_rate=limits.client_connect_rate,
        max_connections_per_client=limits.max_connections_per_client,
        no_capacity_retry_after=limits.retry_after,
    )


def open_store(
    config: Config,
    replica_id: str,
    *,
    limits: _HasLimits | None = None,
    namespace: str | None = None,
) -> AdmissionStore:
    """The store the config names: embedded memory, or Redis shared by replicas.

    A route's store enforces the route's ``limits`` and keeps its state under
    the route's ``namespace`` (see :func:`wsgate.routing.route_namespace`).
    """
    state = config.state
    enforced = limits_of(limits or config)
    if not state.shared:
        return MemoryStore(enforced)
    from wsgate.admission.redis import RedisStore
    from wsgate.admission.redis.connection import state_target

    return RedisStore(
        state_target(state),
        namespace=namespace or state.namespace,
        replica_id=replica_id,
        lease_ttl=state.lease_ttl,
        timeout=state.timeout,
        on_failure=state.on_failure,
        limits=enforced,
        departure_check=state.departure_check,
    )
