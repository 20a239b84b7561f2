from typing import Any

def accept_batch(
    listen_fd: int, limit: int, read_size: int, /
) -> list[tuple[int, tuple[Any, ...] | None, bytes]]:
    """Up to ``limit`` waiting connections: (descriptor, peer, first bytes) each."""
