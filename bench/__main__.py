"""``python -m bench``: see :mod:`bench.suite`."""

from __future__ import annotations

import sys

from bench.suite import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
