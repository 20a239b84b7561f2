"""The benchmark: wsgate side by side with HAProxy and nginx, all fronting one echo backend.

Run it with ``python -m bench`` (``make bench``); ``--smoke`` runs a tiny version
that proves the harness still works. docs/performance.md explains the method.
"""

from __future__ import annotations

__all__: list[str] = []
