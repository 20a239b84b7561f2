"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from tinydns import TinyDns


@pytest.fixture
async def dns() -> AsyncIterator[TinyDns]:
    """A DNS server on loopback whose answers a test sets."""
    server = TinyDns()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
