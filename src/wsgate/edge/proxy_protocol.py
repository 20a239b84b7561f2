"""The PROXY protocol header, versions 1 and 2, read incrementally without sockets.

A load balancer that terminates nothing (an AWS NLB, HAProxy in TCP mode) can
begin each connection with a header that names the client it came from. The
rules this reader keeps, from the protocol's specification:

- The header is the first thing on the connection and comes whole before any
  other byte; it may arrive split across reads, so the reader keeps what it
  has until the header is complete (or cannot become one).
- Version 1 is one line of text, ``PROXY TCP4|TCP6|UNKNOWN ...\\r\\n``, at most
  107 bytes. Version 2 is binary: a 12-byte signature, a version/command byte,
  a family/transport byte, a 16-bit length, the addresses, then TLVs. The first
  byte tells them apart (``P`` or ``\\r``), so no guessing is needed.
- Nothing is guessed: bytes that are neither version's signature, a header
  that is malformed, or longer than it may be are refused, never read as HTTP.
- ``UNKNOWN`` (v1), the ``LOCAL`` command and the ``UNSPEC`` or ``UNIX``
  families (v2) carry no client address: the connection is valid and its
  client is the peer itself. Load balancers' health checks look like this.
- TLVs (v2) are skipped. A v2 header is at most :data:`MAX_V2_SIZE` bytes here:
  the specification allows 64 KiB of TLVs, which no load balancer sends, and
  a bound keeps one connection from holding that much before a request.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "MAX_V1_SIZE",
    "MAX_V2_SIZE",
    "V1_SIGNATURE",
    "V2_SIGNATURE",
    "ProxyError",
    "ProxyErrorKind",
    "ProxyHeader",
    "ProxyHeaderReader",
    "encode_v1",
    "encode_v2",
    "starts_like_proxy_header",
]

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_V1_SIZE = 107  # "PROXY TCP6 " + two longest IPv6 + two ports + spaces + CRLF
MAX_V2_SIZE = 4096
_V2_FIXED = 16  # signature, version/command, family/transport, length

# v2 family/transport byte: the high nibble is the address family, the low the transport.
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0, 1, 2, 3
_STREAM = 1
_ADDRESS_SIZE = {_AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}


class ProxyErrorKind(StrEnum):
    """Why a connection's PROXY header was refused (a metric label)."""

    MALFORMED = "malformed"
    TOO_LONG = "too_long"
    NOT_PROXY = "not_proxy"  # a trusted peer sent something else first
    TIMEOUT = "timeout"  # the header did not complete in time (seen by the I/O layer)
    UNTRUSTED = "untrusted"  # a header from a peer not allowed to send one


class ProxyError(Exception):
    """A header that is not (and cannot become) a valid one."""

    def __init__(self, kind: ProxyErrorKind, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete header. ``source`` is None when it carries no client address."""

    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None = None


def starts_like_proxy_header(data: bytes) -> bool:
    """Whether the first bytes of a connection are (the start of) a PROXY header."""
    if not data:
        return False
    signature = V1_SIGNATURE if data[:1] == b"P" else V2_SIGNATURE
    size = min(len(data), len(signature))
    # A lone "P" could be PUT or POST: only a whole signature counts as a header.
    return size == len(signature) and data[:size] == signature


class ProxyHeaderReader:
    """Feed the connection's first bytes until :meth:`feed` returns the header.

    After that, :attr:`rest` holds the bytes that followed it (the request).
    """

    __slots__ = ("_buffer", "header", "rest")

    def __init__(self) -> None:
        self._buffer = b""
        self.header: ProxyHeader | None = None
        self.rest = b""

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Add bytes; the header once complete, None while more are needed.

        Raises:
            ProxyError: the bytes are not, and cannot become, a valid header.
        """
        if self.header is not None:
            raise RuntimeError("the header is already complete")
        buffer = self._buffer + data
        self._buffer = buffer
        if not buffer:
            return None
        if buffer[:1] == b"P":
            header, size = _read_v1(buffer)
        elif buffer[:1] == b"\r":
            header, size = _read_v2(buffer)
        else:
            raise ProxyError(ProxyErrorKind.NOT_PROXY, "the connection did not begin with a header")
        if header is None:
            return None
        self.header = header
        self.rest = buffer[size:]
        self._buffer = b""
        return header


def _check_prefix(buffer: bytes, signature: bytes) -> bool:
    """Whether ``buffer`` holds all of ``signature``; raises when it cannot become it."""
    size = min(len(buffer), len(signature))
    if buffer[:size] != signature[:size]:
        raise ProxyError(ProxyErrorKind.NOT_PROXY, "the connection did not begin with a header")
    return size == len(signature)


def _read_v1(buffer: bytes) -> tuple[ProxyHeader | None, int]:
    if not _check_prefix(buffer, V1_SIGNATURE):
        return None, 0
    window = buffer[:MAX_V1_SIZE]
    end = window.find(b"\r\n")
    line = window if end < 0 else window[:end]
    if end < 0 and line.endswith(b"\r"):
        line = line[:-1]  # its LF may be in the next read
    if b"\n" in line or b"\r" in line:
        raise ProxyError(ProxyErrorKind.MALFORMED, "v1 header line not ended by CRLF")
    if end < 0:
        if len(window) >= MAX_V1_SIZE:
            raise ProxyError(ProxyErrorKind.TOO_LONG, f"v1 header longer than {MAX_V1_SIZE} bytes")
        return None, 0
    parts = line.split(b" ")
    if parts[1] == b"UNKNOWN":
        return ProxyHeader(1, None), end + 2  # whatever follows UNKNOWN is ignored
    if len(parts) != 6:
        raise ProxyError(ProxyErrorKind.MALFORMED, "v1 header needs protocol, addresses, ports")
    _, protocol, source, destination, source_port, destination_port = parts
    if protocol == b"TCP4":
        version = 4
    elif protocol == b"TCP6":
        version = 6
    else:
        raise ProxyError(ProxyErrorKind.MALFORMED, "v1 protocol must be TCP4, TCP6 or UNKNOWN")
    return (
        ProxyHeader(
            1,
            (_v1_address(source, version), _v1_port(source_port)),
            (_v1_address(destination, version), _v1_port(destination_port)),
        ),
        end + 2,
    )


def _v1_address(text: bytes, version: int) -> str:
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyError(ProxyErrorKind.MALFORMED, "v1 address is not an IP address") from None
    if address.version != version:
        raise ProxyError(ProxyErrorKind.MALFORMED, f"v1 address is not IPv{version}")
    return str(address)


def _v1_port(text: bytes) -> int:
    # Decimal, no sign, no leading zero: what a sender writes for a number 0..65535.
    if not (text.isdigit() and text.isascii() and 0 < len(text) <= 5) or (
        len(text) > 1 and text[:1] == b"0"
    ):
        raise ProxyError(ProxyErrorKind.MALFORMED, "v1 port is not a number 0-65535")
    port = int(text)
    if port > 65535:
        raise ProxyError(ProxyErrorKind.MALFORMED, "v1 port is not a number 0-65535")
    return port


def _read_v2(buffer: bytes) -> tuple[ProxyHeader | None, int]:
    if not _check_prefix(buffer, V2_SIGNATURE) or len(buffer) < _V2_FIXED:
        return None, 0
    version_command, family_transport, length = struct.unpack_from("!BBH", buffer, 12)
    if version_command >> 4 != 2:
        raise ProxyError(ProxyErrorKind.MALFORMED, "v2 header of an unknown version")
    command = version_command & 0x0F
    if command > 1:
        raise ProxyError(ProxyErrorKind.MALFORMED, "v2 command is neither LOCAL nor PROXY")
    size = _V2_FIXED + length
    if size > MAX_V2_SIZE:
        raise ProxyError(ProxyErrorKind.TOO_LONG, f"v2 header longer than {MAX_V2_SIZE} bytes")
    family, transport = family_transport >> 4, family_transport & 0x0F
    if family > _AF_UNIX or transport > 2:
        raise ProxyError(ProxyErrorKind.MALFORMED, "v2 family or transport unknown")
    if command == 1 and length < _ADDRESS_SIZE.get(family, 0):
        raise ProxyError(ProxyErrorKind.MALFORMED, "v2 length too short for its addresses")
    if len(buffer) < size:
        return None, 0
    if command == 0 or family in (_AF_UNSPEC, _AF_UNIX):
        # LOCAL (a health check of the balancer's own), or no IP to speak of.
        return ProxyHeader(2, None), size
    if transport != _STREAM:
        raise ProxyError(ProxyErrorKind.MALFORMED, "v2 header for a datagram, on a stream")
    body = buffer[_V2_FIXED:size]
    if family == _AF_INET:
        src, dst, src_port, dst_port = struct.unpack_from("!4s4sHH", body)
    else:
        src, dst, src_port, dst_port = struct.unpack_from("!16s16sHH", body)
    return (
        ProxyHeader(
            2,
            (str(ipaddress.ip_address(src)), src_port),
            (str(ipaddress.ip_address(dst)), dst_port),
        ),
        size,
    )


def encode_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None = None) -> bytes:
    """A v1 header (``UNKNOWN`` when ``source`` is None); for tests and load generators."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    version = ipaddress.ip_address(source[0]).version
    return (
        f"PROXY TCP{version} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
    ).encode("ascii")


def encode_v2(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None = None,
    *,
    tlvs: bytes = b"",
) -> bytes:
    """A v2 header: PROXY with both addresses, or LOCAL when ``source`` is None."""
    if source is None or destination is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, len(tlvs)) + tlvs
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(destination[0])
    family = _AF_INET if src.version == 4 else _AF_INET6
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1]) + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family << 4 | _STREAM, len(body)) + body
