"""A listener that learns who the client is before HTTP: PROXY header, then TLS.

Used when the config has ``tls`` or ``proxy_protocol`` (otherwise the listener
is a :class:`~.listener.PlainListener`). Each accepted connection goes through,
in order:

1. From a source in ``proxy_protocol.trusted``: its PROXY header, read straight
   from the socket. The reader *peeks* and takes off the socket only the bytes
   of the header, so whatever follows it (a TLS ClientHello, a request) is
   still in the kernel for the next layer, whichever it is. A header not
   complete within ``proxy_protocol.timeout``, malformed, or missing closes the
   connection and is counted by kind. A source not trusted sends no header (a
   header from it is refused by the HTTP layer, see
   :func:`~wsgate.edge.proxy_protocol.starts_like_proxy_header`).
2. With ``tls``: the first bytes are peeked at. A connection that closes
   before sending any is let go uncounted; one that does not begin with a TLS
   handshake record is refused and counted (``plain_http`` gets a plain
   ``400``, anything else ``not_tls`` is closed). Then the handshake, with the
   context current *now*, so a reload applies to the next connection and never
   to a live one; its failures are counted by reason.
3. The connection's protocol, given the client's address (the PROXY header's,
   or the peer's) and whether it came with a header.

A connection that closes before sending anything (a load balancer's TCP health
check) is no error and is not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter
from collections.abc import Callable

from wsgate.edge.client_address import TrustedNetworks, canonical_address
from wsgate.edge.proxy_protocol import (
    MAX_V2_SIZE,
    ProxyError,
    ProxyErrorKind,
    ProxyHeader,
    ProxyHeaderReader,
)
from wsgate.edge.tls import ServingCertificate, handshake_failure_reason
from wsgate.gateway.head import error_response
from wsgate.gateway.listener import ACCEPT_BATCH, Listener

__all__ = ["EdgeListener", "EdgeStats"]

log = logging.getLogger("wsgate.edge")

_TLS_HANDSHAKE_RECORD = 0x16
_PLAIN_HTTP_ANSWER = error_response(
    400, "bad_request", detail="plain HTTP sent to the TLS port", close=True
)


class EdgeStats:
    """Counts of the edge, read by the metrics."""

    __slots__ = ("handshake_failures", "handshakes_total", "proxy_errors", "proxy_headers_total")

    def __init__(self) -> None:
        self.handshakes_total = 0
        self.handshake_failures: Counter[str] = Counter()
        self.proxy_headers_total = 0
        self.proxy_errors: Counter[str] = Counter()


class _ClosedEarly(Exception):
    """The connection closed before its header was complete."""

    def __init__(self, received: int):
        self.received = received


class EdgeListener(Listener):
    """Accepts on ``address`` (or ``sock``, already bound) and sets up each connection
    as the module docstring says."""

    def __init__(
        self,
        protocol_factory: Callable[[str, bool], asyncio.Protocol],
        address: str,
        *,
        stats: EdgeStats,
        sock: socket.socket | None = None,
        reuse_port: bool = False,
        tls: ServingCertificate | None = None,
        handshake_timeout: float = 10.0,
        proxy_sources: TrustedNetworks | None = None,
        proxy_timeout: float = 3.0,
    ):
        super().__init__(address, sock=sock, reuse_port=reuse_port)
        self.protocol_factory = protocol_factory
        self.stats = stats
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        self.proxy_sources = proxy_sources or TrustedNetworks()
        self.proxy_timeout = proxy_timeout

    def accept_some(self, listening: socket.socket) -> None:
        for accepted in range(ACCEPT_BATCH):
            try:
                conn, peername = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                if accepted == 0:
                    raise
                return  # met again, and raised, on the next call
            conn.setblocking(False)
            self.spawn(self._set_up(conn, canonical_address(peername[0])))

    async def _set_up(self, conn: socket.socket, peer: str) -> None:
        assert self._loop is not None
        client = peer
        proxied = peer in self.proxy_sources
        try:
            if proxied:
                header = await self._proxy_header(conn)
                if header is None:
                    conn.close()
                    return
                if header.source is not None:
                    client = canonical_address(header.source[0])
            await self._connect(conn, client, proxied)
        except asyncio.CancelledError:
            conn.close()
            raise

    async def _proxy_header(self, conn: socket.socket) -> ProxyHeader | None:
        """The connection's header, or None (closed and counted) when there is none."""
        kind: ProxyErrorKind | None = None
        try:
            async with asyncio.timeout(self.proxy_timeout):
                header = await self._read_header(conn)
        except ProxyError as error:
            kind = error.kind
        except TimeoutError:
            kind = ProxyErrorKind.TIMEOUT
        except _ClosedEarly as early:
            kind = ProxyErrorKind.MALFORMED if early.received else None
        except OSError:
            kind = None  # reset by the peer: nothing was refused
        else:
            self.stats.proxy_headers_total += 1
            return header
        if kind is not None:
            self.stats.proxy_errors[kind] += 1
        return None

    async def _read_header(self, conn: socket.socket) -> ProxyHeader:
        reader = ProxyHeaderReader()
        received = 0
        while True:
            await self._readable(conn)
            try:
                data = conn.recv(MAX_V2_SIZE, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                continue
            if not data:
                raise _ClosedEarly(received)
            header = reader.feed(data)
            # Take off the socket what the header used: while it is incomplete, all
            # that came; once complete, not a byte past it.
            used = len(data) - len(reader.rest) if header is not None else len(data)
            while used:
                used -= len(conn.recv(used))
            received += len(data)
            if header is not None:
                return header

    async def _readable(self, conn: socket.socket) -> None:
        assert self._loop is not None
        loop = self._loop
        ready = loop.create_future()
        fd = conn.fileno()
        loop.add_reader(fd, ready.set_result, None)
        try:
            await ready
        finally:
            loop.remove_reader(fd)

    async def _begins_with_tls(self, conn: socket.socket) -> bool:
        """Whether the first byte opens a TLS handshake (if not, refused and counted)."""
        try:
            async with asyncio.timeout(self.handshake_timeout):
                while True:
                    await self._readable(conn)
                    try:
                        first = conn.recv(16, socket.MSG_PEEK)
                    except (BlockingIOError, InterruptedError):
                        continue
                    break
        except TimeoutError:
            self.stats.handshake_failures["timeout"] += 1
            return False
        except OSError:
            return False  # reset before a byte came: nothing was refused
        if not first:
            return False  # connected and closed: a TCP health check or a port probe
        if first[0] == _TLS_HANDSHAKE_RECORD:
            return True
        if first.split(b" ", 1)[0].isalpha():
            self.stats.handshake_failures["plain_http"] += 1
            with contextlib.suppress(OSError):
                conn.send(_PLAIN_HTTP_ANSWER)
                conn.shutdown(socket.SHUT_WR)
                # Unread bytes at close make the kernel reset the connection, and a
                # reset can discard the answer before the client reads it.
                while conn.recv(65536):
                    pass
        else:
            self.stats.handshake_failures["not_tls"] += 1
        return False

    async def _connect(self, conn: socket.socket, client: str, proxied: bool) -> None:
        assert self._loop is not None
        tls = self.tls
        if tls is not None and not await self._begins_with_tls(conn):
            with contextlib.suppress(OSError):
                conn.close()
            return
        try:
            await self._loop.connect_accepted_socket(
                lambda: self.protocol_factory(client, proxied),
                conn,
                ssl=tls.context if tls is not None else None,
                ssl_handshake_timeout=self.handshake_timeout if tls is not None else None,
            )
        except asyncio.CancelledError:
            raise
        except Exception as error:
            with contextlib.suppress(OSError):
                conn.close()
            if tls is None:
                log.warning("cannot serve a connection from %s: %s", client, error)
                return
            self.stats.handshake_failures[handshake_failure_reason(error)] += 1
            return
        if tls is not None:
            self.stats.handshakes_total += 1
