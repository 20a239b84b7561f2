def upgrade_request(
    data: bytes, max_head_size: int, /
) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], int] | None:
    """The upgrade request head at the start of ``data`` (method, target, fields, its end),
    if it is of the plain shape; None for any other bytes."""

def switching_response(data: bytes, /) -> tuple[bytes, list[tuple[bytes, bytes]], int] | None:
    """The 101 head at the start of ``data`` (reason, fields, its end), if it is of the
    plain shape; None for any other bytes."""
