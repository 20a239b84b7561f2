"""Where a benchmark's figures go: a Markdown table and its data, side by side."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["write_results"]


def write_results(out: Path, stem: str, markdown: str, document: object) -> None:
    """Write ``out/stem.md`` and ``out/stem.json`` (the folder made if missing)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(markdown)
    (out / f"{stem}.json").write_text(json.dumps(document, indent=2) + "\n")
