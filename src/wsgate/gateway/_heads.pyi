Fields = list[tuple[bytes, bytes]]
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
