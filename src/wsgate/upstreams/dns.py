"""A small DNS client for discovery: the A and AAAA records of one name.

It asks one server (the configured one, or the first ``nameserver`` of
/etc/resolv.conf) directly, over UDP with EDNS0, and again over TCP when the
answer comes back truncated, as a headless Service with many pods can make it.
The system resolver is not used: it would cache, apply search domains, and
hide the difference between "no such name" and "the server did not answer",
which discovery needs (the first empties the pool, the second must not).

Building queries and reading answers are plain functions; only
:func:`query` and :func:`resolve_addresses` do I/O.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from pathlib import Path

from dnslib import EDNS0, RCODE, DNSError, DNSRecord

__all__ = [
    "DNS_PORT",
    "DnsFailure",
    "build_query",
    "nameserver_from_resolv_conf",
    "query",
    "read_answer",
    "resolve_addresses",
    "system_nameserver",
]

DNS_PORT = 53
_EDNS_PAYLOAD = 4096  # what we can take over UDP; larger answers come truncated, then by TCP


class DnsFailure(Exception):
    """No usable answer (timeout, refusal, server failure); one line for the log."""


def nameserver_from_resolv_conf(text: str) -> str | None:
    """The first ``nameserver`` of a resolv.conf, or None if it names none."""
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            return words[1]
    return None


def system_nameserver(resolv_conf: Path = Path("/etc/resolv.conf")) -> tuple[str, int]:
    """The system's first nameserver; the local host when none is set (resolv.conf(5))."""
    try:
        host = nameserver_from_resolv_conf(resolv_conf.read_text())
    except OSError:
        host = None
    return host or "127.0.0.1", DNS_PORT


def build_query(name: str, qtype: str) -> DNSRecord:
    """A recursive query for ``name`` (taken as fully qualified) with a random id."""
    question = DNSRecord.question(name, qtype)
    question.add_ar(EDNS0(udp_len=_EDNS_PAYLOAD))
    return question


def read_answer(question: DNSRecord, reply: DNSRecord) -> list[str]:
    """The addresses a reply gives for the question's name and type.

    An NXDOMAIN or an empty NOERROR answer means there are none: an empty list.

    Raises:
        DnsFailure: the reply does not belong to the question, or the server failed.
    """
    if reply.header.id != question.header.id or reply.q != question.q:
        raise DnsFailure("the reply does not match the question")
    rcode = reply.header.rcode
    if rcode == RCODE.NXDOMAIN:
        return []
    if rcode != RCODE.NOERROR:
        raise DnsFailure(f"the server answered {RCODE.get(rcode)}")
    # The answer section holds only the records for this question: the name's
    # own records, or a CNAME chain leading to them.
    qtype = question.q.qtype
    return [
        ipaddress.ip_address(str(record.rdata)).compressed
        for record in reply.rr
        if record.rtype == qtype
    ]


class _ReplyCatcher(asyncio.DatagramProtocol):
    """Waits for the one datagram that answers ``question``; ignores strays."""

    def __init__(self, question: DNSRecord):
        self.question = question
        self.reply: asyncio.Future[DNSRecord] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        try:
            reply = DNSRecord.parse(data)
        except DNSError:
            return
        if reply.header.id == self.question.header.id and not self.reply.done():
            self.reply.set_result(reply)

    def error_received(self, exc: Exception) -> None:
        # On a connected socket this is the ICMP "port unreachable" of a dead server.
        if not self.reply.done():
            self.reply.set_exception(exc)


async def _ask_udp(question: DNSRecord, server: tuple[str, int]) -> DNSRecord:
    loop = asyncio.get_running_loop()
    transport, catcher = await loop.create_datagram_endpoint(
        lambda: _ReplyCatcher(question), remote_addr=server
    )
    try:
        transport.sendto(question.pack())
        return await catcher.reply
    finally:
        transport.close()


async def _ask_tcp(question: DNSRecord, server: tuple[str, int]) -> DNSRecord:
    reader, writer = await asyncio.open_connection(*server)
    try:
        packet = question.pack()
        writer.write(struct.pack("!H", len(packet)) + packet)
        (size,) = struct.unpack("!H", await reader.readexactly(2))
        return DNSRecord.parse(await reader.readexactly(size))
    finally:
        writer.close()


async def query(
    name: str,
    qtype: str,
    server: tuple[str, int],
    *,
    attempt_timeout: float = 2.0,
    attempts: int = 2,
) -> list[str]:
    """Ask ``server`` for the ``qtype`` (A or AAAA) records of ``name``.

    Raises:
        DnsFailure: no usable answer after ``attempts`` tries of ``attempt_timeout`` each.
    """
    problem = "no answer"
    for _ in range(attempts):
        question = build_query(name, qtype)
        try:
            async with asyncio.timeout(attempt_timeout):
                reply = await _ask_udp(question, server)
                if reply.header.tc:
                    reply = await _ask_tcp(question, server)
            return read_answer(question, reply)
        except TimeoutError:
            problem = f"no answer within {attempt_timeout:g}s"
        except (OSError, asyncio.IncompleteReadError, DNSError) as error:
            problem = getattr(error, "strerror", None) or str(error) or type(error).__name__
        except DnsFailure as error:
            problem = str(error)
    host, port = server
    raise DnsFailure(f"{qtype} {name} from {host}:{port}: {problem}")


async def resolve_addresses(
    name: str, server: tuple[str, int], *, attempt_timeout: float = 2.0, attempts: int = 2
) -> list[str]:
    """All IPv4 and IPv6 addresses of ``name``, without duplicates, in a stable order.

    Raises:
        DnsFailure: either query got no usable answer (a half answer is no answer).
    """
    answers = await asyncio.gather(
        query(name, "A", server, attempt_timeout=attempt_timeout, attempts=attempts),
        query(name, "AAAA", server, attempt_timeout=attempt_timeout, attempts=attempts),
        return_exceptions=True,
    )
    unique: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
        unique.update(ipaddress.ip_address(text) for text in answer)
    return [address.compressed for address in sorted(unique, key=_order)]


def _order(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[int, int]:
    return address.version, int(address)
