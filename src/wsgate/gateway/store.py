"""The admission store the config names: embedded memory, or Redis shared by replicas.

The rest of the gateway sees only the contract
(:class:`~wsgate.admission.AdmissionStore`); this is the one place that
knows which stores there are.
"""

from __future__ import annotations

from wsgate.admission import AdmissionStore, Limits
from wsgate.admission.memory import MemoryStore
from wsgate.config import Config

__all__ = ["limits_of", "open_store"]


def limits_of(config: Config) -> Limits:
    limits = config.limits
    return Limits(
        connect_rate=limits.connect_rate,
        client_connect_rate=limits.client_connect_rate,
        no_capacity_retry_after=limits.retry_after,
    )


def open_store(config: Config, replica_id: str) -> AdmissionStore:
    """The store the config names: embedded memory, or Redis shared by replicas."""
    state = config.state
    if state.store == "memory":
        return MemoryStore(limits_of(config))
    from wsgate.admission.redis import RedisStore

    return RedisStore(
        state.store,
        namespace=state.namespace,
        replica_id=replica_id,
        lease_ttl=state.lease_ttl,
        timeout=state.timeout,
        on_failure=state.on_failure,
        limits=limits_of(config),
    )
