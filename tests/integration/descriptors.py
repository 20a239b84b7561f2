"""This process's open descriptors, and its open-files limit, for the tests that
count what a part leaves open or meet that limit on purpose."""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterator


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def lowest_free_descriptor() -> int:
    """The number the next descriptor gets (the kernel gives the lowest free one)."""
    probe = os.open(os.devnull, os.O_RDONLY)
    os.close(probe)
    return probe


@contextlib.contextmanager
def open_files_limit(more: int = 0) -> Iterator[None]:
    """Room for ``more`` new descriptors from here on, and none after them
    (until a descriptor below the limit is closed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free_descriptor() + more, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
