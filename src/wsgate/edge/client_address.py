"""Which address is the client's: the peer, or what trusted proxies say it is.

The peer of a connection (or the address in its PROXY header) is the client
unless it is one of ``trusted_proxies``. A trusted proxy appends the address it
received the request from to ``X-Forwarded-For`` (or RFC 7239 ``Forwarded:
for=``), so the list reads left to right from the farthest hop to the nearest:
everything left of the entry our trusted proxies wrote was written by whoever
sent the request, and can say anything. The client is therefore the right-most
entry that is not itself a trusted proxy; the left-most entry (what frameworks
that "trust the header" take) is the one a client forges.

The walk from the right stops at the first address that is not trusted, at an
entry that is not an address (``unknown``, an obfuscated ``_name``: the hop
before it is then the nearest known), or after :data:`MAX_HOPS` trusted
entries, so a header of 10,000 entries costs no more than one of 64.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from enum import StrEnum
from typing import Protocol

__all__ = [
    "MAX_HOPS",
    "ClientResolver",
    "ForwardingHeader",
    "TrustedNetworks",
    "canonical_address",
    "resolve_client",
]

MAX_HOPS = 64

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ForwardingHeader(StrEnum):
    """The request header trusted proxies write the client's address into."""

    X_FORWARDED_FOR = "x-forwarded-for"
    FORWARDED = "forwarded"


def _parse(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
    return address


def canonical_address(text: str) -> str:
    """An address written one way (IPv4-mapped IPv6 as IPv4); other text as it is."""
    if ":" not in text:
        # Text without a colon is IPv4 or no address at all, and the IPv4 parser
        # accepts only the canonical dotted quad: either way it comes back as it
        # is. Every connection of an IPv4 listener passes here, so it skips the
        # parse (several microseconds a connection).
        return text
    address = _parse(text)
    return text if address is None else str(address)


class TrustedNetworks:
    """A set of CIDR blocks, e.g. the load balancers' subnets."""

    __slots__ = ("_networks", "cidrs")

    def __init__(self, cidrs: Iterable[str] = ()):
        self.cidrs = tuple(cidrs)
        self._networks = tuple(ipaddress.ip_network(c, strict=False) for c in self.cidrs)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, address: object) -> bool:
        if isinstance(address, str):
            parsed = _parse(address)
        elif isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            parsed = address
        else:
            return False
        if parsed is None:
            return False
        return any(
            parsed.version == network.version and parsed in network for network in self._networks
        )


def _entry_address(entry: bytes, header: ForwardingHeader) -> IPAddress | None:
    """The address of one list entry (``for=`` of a Forwarded element), or None."""
    text = entry.strip()
    if header is ForwardingHeader.FORWARDED:
        node = None
        for pair in text.split(b";"):
            name, sep, value = pair.strip().partition(b"=")
            if sep and name.strip().lower() == b"for":
                node = value.strip()
                break
        if node is None:
            return None
        text = node
    text = text.strip(b'"')
    if text.startswith(b"["):
        text = text[1:].partition(b"]")[0]  # [2001:db8::1]:4711
    elif text.count(b":") == 1:
        text = text.partition(b":")[0]  # 192.0.2.43:47011
    try:
        return _parse(text.decode("ascii"))
    except UnicodeDecodeError:
        return None


def resolve_client(
    peer: str,
    header_values: Sequence[bytes],
    trusted: TrustedNetworks,
    header: ForwardingHeader = ForwardingHeader.X_FORWARDED_FOR,
) -> str:
    """The client's address.

    Args:
        peer: the connection's peer, or the address its PROXY header gave.
        header_values: every line of the forwarding header, in the order received
            (several lines are one list, joined in order).
        trusted: the proxies whose word is taken.
        header: which header ``header_values`` came from.
    """
    peer = canonical_address(peer)
    if not trusted or not header_values or peer not in trusted:
        return peer
    joined = b",".join(header_values)
    # Only the right-most MAX_HOPS entries are ever split off; the rest stays one piece.
    entries = joined.rsplit(b",", MAX_HOPS)
    nearest = peer
    for entry in reversed(entries[-MAX_HOPS:]):
        address = _entry_address(entry, header)
        if address is None:
            return nearest
        nearest = str(address)
        if address not in trusted:
            return nearest
    return nearest


class _Headers(Protocol):
    def values(self, name: bytes) -> Sequence[bytes]: ...


class ClientResolver:
    """What a client connection is given to name its client: the peer and a request head in,
    the client's address out. With no trusted proxies it answers the peer at once."""

    __slots__ = ("_name", "header", "trusted")

    def __init__(
        self,
        trusted_proxies: Iterable[str] = (),
        header: ForwardingHeader | str = ForwardingHeader.X_FORWARDED_FOR,
    ):
        self.trusted = TrustedNetworks(trusted_proxies)
        self.header = ForwardingHeader(header)
        self._name = self.header.value.encode()

    def __call__(self, peer: str, head: _Headers) -> str:
        if not self.trusted or peer not in self.trusted:
            return peer
        return resolve_client(peer, head.values(self._name), self.trusted, self.header)
