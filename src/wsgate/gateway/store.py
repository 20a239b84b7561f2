"""The admission store the config names, and what the gateway asks of it beyond admitting.

:func:`open_store` builds the embedded memory store or the Redis store shared
by replicas. :func:`watch_excess` and :func:`refresh_counts` are the two
things the gateway needs that only the Redis store does today; they are the
only place that tells the stores apart.
"""

from __future__ import annotations

from collections.abc import Callable

from wsgate.admission import AdmissionStore, Limits
from wsgate.admission.memory import MemoryStore
from wsgate.config import Config

__all__ = ["limits_of", "open_store", "refresh_counts", "watch_excess"]


def limits_of(config: Config) -> Limits:
    limits = config.limits
    return Limits(
        connect_rate=limits.connect_rate,
        client_connect_rate=limits.client_connect_rate,
        max_connections_per_client=limits.max_connections_per_client,
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


def watch_excess(store: AdmissionStore, on_excess: Callable[[str, int], None]) -> None:
    """Be told ``(backend_id, count)`` when the shared state finds this replica over a cap.

    Only a shared store can find that (after it re-registered this replica's
    slots); the memory store never does.
    """
    if store.kind == "redis":
        from wsgate.admission.redis import RedisStore

        if isinstance(store, RedisStore):
            store.on_excess = on_excess


async def refresh_counts(store: AdmissionStore) -> None:
    """Make ``store.global_counts()`` as fresh as the store can (one round trip for Redis)."""
    await store.refresh()
