"""The shared store: admission state in Redis, decided by one script per step.

state.lua     the rules of the shared state (read its header first)
script.py     the script's calls: typed arguments and decoded replies
connection.py the connection (commands packed by hiredis, no retries)
pipeline.py   calls batched while others are out, bounded and counted
sync.py       whether Redis can be trusted: the replica's state machine, no I/O
lease.py      renewals and re-registrations
store.py      RedisStore, the store contract over all of it (theory of operation)
"""

from __future__ import annotations

from wsgate.admission.redis.connection import HiredisPackingConnection, StateUnavailable, connect
from wsgate.admission.redis.script import SCRIPT, key_prefix, run_script
from wsgate.admission.redis.store import OnFailure, RedisStore, default_replica_id
from wsgate.admission.redis.sync import SyncState

__all__ = [
    "SCRIPT",
    "HiredisPackingConnection",
    "OnFailure",
    "RedisStore",
    "StateUnavailable",
    "SyncState",
    "connect",
    "default_replica_id",
    "key_prefix",
    "run_script",
]
