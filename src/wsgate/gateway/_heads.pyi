from collections.abc import Iterable

Field = tuple[bytes, bytes]
Fields = list[Field]
Index = dict[bytes, list[bytes]]

def upgrade_request(
    data: bytes, max_head_size: int, dropped: frozenset[bytes], /
) -> tuple[bytes, bytes, Fields, Index, bytes, int] | None:
    """The upgrade request head at the start of ``data``, if it is of the plain shape and
    a valid WebSocket handshake; None for any other bytes.

    Gives its method, target, fields, their index (lower-cased name: values), the
    fields whose lower-cased names are not in ``dropped`` as lines joined by CRLF,
    and the offset just past the head."""

def switching_response(
    data: bytes, dropped: frozenset[bytes], /
) -> tuple[bytes, Fields, Index, bytes, int] | None:
    """The 101 head at the start of ``data`` (reason, fields, index, the fields not in
    ``dropped`` as lines, its end), if it is of the plain shape; None for any other bytes."""

def write_upgrade_request(
    method: bytes,
    target: bytes,
    has_host: bool,
    end_to_end: bytes,
    upgrade_field: bytes | None,
    client_ip: str,
    proto: str,
    request_id: str,
    backend_host: str,
    /,
) -> bytes:
    """The upgrade request head the backend is sent, as ``head.render_request`` writes it.

    ``has_host``: whether the request had a Host field (else ``backend_host`` is sent);
    ``upgrade_field``: its first Upgrade value or None; ``end_to_end``: its forwarded
    fields as lines joined by CRLF."""

def write_switching_response(
    reason: bytes, end_to_end: bytes, upgrade_field: bytes | None, extra: Iterable[Field], /
) -> bytes:
    """The 101 head the client is sent, as ``head.render_response`` writes it: the reason
    ("Switching Protocols" when empty), the forwarded fields, Connection and Upgrade (its
    first value or None), then ``extra``'s (name, value) tuples."""
