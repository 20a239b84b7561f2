"""A small DNS server on loopback for discovery tests (dnslib parses and builds the packets)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import struct

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSError, DNSRecord

__all__ = ["TinyDns"]


class TinyDns:
    """A DNS server answering A and AAAA queries from ``records``, over UDP and TCP.

    UDP answers larger than the client's EDNS0 payload size (512 bytes without
    EDNS0) are sent truncated, as real servers do, so the client must ask by TCP.
    """

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}  # name -> IPv4 and IPv6 addresses
        self.failing: dict[str, int] = {}  # qtype -> rcode to answer instead
        self.silent = False  # drop every query
        self.seen: list[tuple[str, str]] = []  # (transport, qtype) of each query
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    def answer(self, packet: bytes, transport: str) -> bytes | None:
        try:
            query = DNSRecord.parse(packet)
        except DNSError:
            return None
        qtype = QTYPE.get(query.q.qtype)
        self.seen.append((transport, qtype))
        if self.silent:
            return None
        reply = query.reply()
        name = str(query.q.qname).rstrip(".").lower()
        if qtype in self.failing:
            reply.header.rcode = self.failing[qtype]
        elif name not in self.records:
            reply.header.rcode = RCODE.NXDOMAIN
        else:
            for text in self.records[name]:
                ip = ipaddress.ip_address(text)
                if qtype == "A" and ip.version == 4:
                    reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(text), ttl=1))
                if qtype == "AAAA" and ip.version == 6:
                    reply.add_answer(RR(query.q.qname, QTYPE.AAAA, rdata=AAAA(text), ttl=1))
        data: bytes = reply.pack()
        if transport == "udp":
            limit = max([512, *(opt.rclass for opt in query.ar if opt.rtype == QTYPE.OPT)])
            if len(data) > limit:
                reply.rr = []
                reply.header.tc = 1
                data = reply.pack()
        return data

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # TCP first on a free port, then UDP on the same number.
        self._tcp = await asyncio.start_server(self._serve_tcp, "127.0.0.1", 0)
        self.port = self._tcp.sockets[0].getsockname()[1]
        server = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                reply = server.answer(data, "udp")
                if reply is not None:
                    self.transport.sendto(reply, addr)  # type: ignore[attr-defined]

        self._udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=("127.0.0.1", self.port))

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            (size,) = struct.unpack("!H", await reader.readexactly(2))
            reply = self.answer(await reader.readexactly(size), "tcp")
            if reply is not None:
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        writer.close()

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
