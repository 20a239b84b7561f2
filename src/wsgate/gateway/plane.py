"""What the connections of the data plane are given: the shared parts, and a route.

The data plane (:mod:`.downstream`, :mod:`.exchange`, :mod:`.upstream`,
:mod:`.session`) never sees the :class:`~wsgate.gateway.server.Gateway`. Each
client connection is given one :class:`Plane`, which names everything it may
use; each request is given the :class:`Route` that ``Plane.route_for`` picks
for its head, and so its pool and its admission. The gateway fills the plane,
and writes only ``config`` (on reload) and ``draining``; the data plane reads.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from wsgate.config import Config
from wsgate.gateway.access_log import RequestLog
from wsgate.gateway.admit import Admission
from wsgate.gateway.connector import Connector
from wsgate.gateway.head import RequestHead
from wsgate.gateway.session import Sessions
from wsgate.gateway.stats import Stats
from wsgate.upstreams.pool import BackendPool

__all__ = ["ClientAddress", "Plane", "Route"]


@dataclass(eq=False, slots=True)
class Route:
    """Where a request goes: a pool of backends and the admission that guards it,
    and what this replica answered on it (the data plane counts)."""

    pool: BackendPool
    admission: Admission
    name: str = "default"
    admitted_total: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # by reason


class ClientAddress:
    """Who the client is: the connection's peer address.

    The downstream asks once per connection (:meth:`of_connection`, or
    :meth:`of_peer` for a socket accepted without a transport) and once per
    request (:meth:`of_request`); a resolver that trusts a PROXY header or
    ``X-Forwarded-For`` from known proxies answers differently.
    """

    def of_connection(self, transport: asyncio.Transport) -> str:
        return self.of_peer(transport.get_extra_info("peername"))

    def of_peer(self, peername: tuple[str, int] | None) -> str:
        """The client of a connection from ``peername`` (a socket's, or None if unknown)."""
        return peername[0] if peername else ""

    def of_request(self, peer: str, head: RequestHead) -> str:
        return peer


@dataclass(eq=False, slots=True)
class Plane:
    """Everything a client connection and its exchanges may use."""

    loop: asyncio.AbstractEventLoop
    config: Config
    stats: Stats
    log: RequestLog
    connector: Connector
    sessions: Sessions
    route_for: Callable[[RequestHead], Route | None]  # None: no route matches (404)
    client_address: ClientAddress = field(default_factory=ClientAddress)
    draining: bool = False
