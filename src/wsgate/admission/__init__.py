"""The admission contract: which backend may take one more connection, and when.

    admit(candidates, client_key) -> Admitted(backend, ticket) | Rejected(reason, retry_after)
    release(ticket)

Invariant: at every instant, for every backend, the live connections admitted to
it by all replicas together are at most its cap. A connect-rate token is spent
only by a connection that is admitted. Stores: :mod:`.memory` (one process) and
:mod:`.redis` (shared by replicas); both must pass the same test suite.
"""

from __future__ import annotations

from wsgate.admission.contract import (
    REJECT_STATUS,
    AdmissionStore,
    Admitted,
    Candidate,
    Limits,
    Reason,
    Rejected,
    Ticket,
    choose_backend,
)

__all__ = [
    "REJECT_STATUS",
    "AdmissionStore",
    "Admitted",
    "Candidate",
    "Limits",
    "Reason",
    "Rejected",
    "Ticket",
    "choose_backend",
]
