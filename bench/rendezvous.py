"""The cost of one rendezvous choice against pool size: grouped, and plain for reference.

The ``hash`` policy and affinity by ``ip`` or ``header`` make one rendezvous
choice per connection. Plain rendezvous hashes the key with every backend;
wsgate's (:mod:`wsgate.balancing.rendezvous`) picks a group, then a backend in
it. This times both on this machine for N = 4, 100, 1,000, 5,000 and 10,000
backends (medians of ``--rounds`` rounds of ``--choices`` choices, distinct
keys), and how long indexing a changed pool takes.

    .venv/bin/python -m bench.rendezvous [--rounds 5] [--choices 2000] [--out bench/results]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.results import write_results
from wsgate.admission import Candidate
from wsgate.balancing.rendezvous import Rendezvous

__all__ = ["main"]

SIZES = (4, 100, 1_000, 5_000, 10_000)


def plain_top(candidates: Sequence[Candidate], key: str) -> str | None:
    """Plain highest random weight: one hash of the key with each backend."""
    best: tuple[int, str] | None = None
    for candidate in candidates:
        name = candidate.backend_id
        digest = hashlib.blake2b(f"{key}\x00{name}".encode(), digest_size=8).digest()
        scored = (int.from_bytes(digest, "big"), name)
        if best is None or scored > best:
            best = scored
    return None if best is None else best[1]


def _per_choice_us(choose: object, keys: list[str], rounds: int) -> float:
    assert callable(choose)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for key in keys:
            choose(key)
        times.append((time.perf_counter() - started) / len(keys) * 1e6)
    return statistics.median(times)


def measure(size: int, rounds: int, choices: int) -> dict[str, float]:
    candidates = tuple(Candidate(f"pod-{i}", 4) for i in range(size))
    keys = [f"10.{i // 250 % 250}.{i % 250}.{i // 62500}" for i in range(choices)]
    grouped = Rendezvous()
    grouped.top(candidates, "warm")
    plain_keys = keys[: max(20, choices * 100 // max(size, 100))]  # plain is slow: fewer
    started = time.perf_counter()
    Rendezvous().top(tuple(candidates), "index")
    index_ms = (time.perf_counter() - started) * 1e3
    return {
        "backends": size,
        "grouped_us": _per_choice_us(lambda k: grouped.top(candidates, k), keys, rounds),
        "plain_us": _per_choice_us(lambda k: plain_top(candidates, k), plain_keys, rounds),
        "index_ms": index_ms,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rendezvous", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--choices", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None, help="write rendezvous.md/.json here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.choices < 1:
        parser.exit(2, "python -m bench.rendezvous: --rounds and --choices must be at least 1\n")
    rows = [measure(size, args.rounds, args.choices) for size in SIZES]
    lines = [
        "# One rendezvous choice against pool size",
        "",
        f"- When: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; command: "
        f"`python -m bench.rendezvous {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- Medians of {args.rounds} rounds; per choice, distinct keys.",
        "",
        "| backends | grouped (µs) | plain (µs) | plain / grouped | indexing a new pool (ms) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['backends']:,} | {row['grouped_us']:,.1f} | {row['plain_us']:,.1f} | "
            f"{row['plain_us'] / row['grouped_us']:,.1f}x | {row['index_ms']:,.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        write_results(args.out, "rendezvous", text, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
