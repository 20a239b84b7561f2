"""The edge's side of a client connection, as the data plane is given it.

- :class:`TrustedClientAddress` is the plane's client-address resolver: the
  connection's client, then each request's, through ``trusted_proxies``.
- :class:`EdgeDownstream` is a client connection that came through the
  :class:`~wsgate.gateway.edge_listener.EdgeListener`: it knows its client from the
  PROXY header (or the peer), speaks ``https`` when its transport is TLS, and
  refuses a PROXY header from a source not trusted to send one (``400``).
"""

from __future__ import annotations

import asyncio

from wsgate.edge.client_address import ClientResolver, canonical_address
from wsgate.edge.proxy_protocol import ProxyErrorKind, starts_like_proxy_header
from wsgate.gateway.downstream import Downstream
from wsgate.gateway.edge_listener import EdgeStats
from wsgate.gateway.exchange import Client
from wsgate.gateway.head import RequestHead
from wsgate.gateway.plane import ClientAddress, Plane

__all__ = ["EdgeDownstream", "TrustedClientAddress"]


class TrustedClientAddress(ClientAddress):
    """The peer, written one way; each request's client through the trusted proxies."""

    def __init__(self, resolver: ClientResolver):
        self.resolver = resolver

    def of_peer(self, peername: tuple[str, int] | None) -> str:
        return canonical_address(super().of_peer(peername))

    def of_request(self, peer: str, head: RequestHead) -> str:
        return self.resolver(peer, head)


class EdgeDownstream(Downstream):
    """A client connection whose client the edge listener already knows."""

    def __init__(
        self,
        plane: Plane,
        connections: set[Client],
        client: str,
        *,
        stats: EdgeStats,
        refuse_proxy_header: bool,
    ):
        super().__init__(plane, connections)
        self.edge_client = client
        self.edge_stats = stats
        self.refuse_proxy_header = refuse_proxy_header

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.client_ip = self.edge_client  # the PROXY header's, or the peer's
        if transport.get_extra_info("sslcontext") is not None:
            self.proto = "https"

    def data_received(self, data: bytes) -> None:
        if self.refuse_proxy_header:
            self.refuse_proxy_header = False  # the first bytes only: a header comes first
            if starts_like_proxy_header(data):
                self.edge_stats.proxy_errors[ProxyErrorKind.UNTRUSTED] += 1
                self.answer_bad_request(400, "a PROXY header from a source not trusted to send one")
                return
        super().data_received(data)
