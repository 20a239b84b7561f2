"""What the frame-boundary tracker costs on the relay's backend-to-client path.

Feeds a stream of equal frames, cut into reads of a fixed size as a transport
delivers them, and reports bytes/s and frames/s, next to the cost of the same
loop with no tracker (the floor any relay pays to hand a chunk on).

    .venv/bin/python bench/frames.py [--read-size 65536] [--seconds 1]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from wsgate.gateway.frames import FrameTracker
from wsgate.wire import Opcode, encode_frame

__all__ = ["main", "measure"]


def chunks_of(payload_size: int, read_size: int, total: int) -> tuple[list[bytes], int]:
    """About ``total`` bytes of frames cut into reads of ``read_size``; and the frame count."""
    one = encode_frame(Opcode.BINARY, bytes(payload_size), mask=False)
    count = max(1, total // len(one))
    stream = one * count
    return [stream[i : i + read_size] for i in range(0, len(stream), read_size)], count


def _noop(data: bytes) -> int:
    return -1


def measure(
    feed_factory: Callable[[], Callable[[bytes], int]], chunks: list[bytes], seconds: float
) -> float:
    """Seconds per pass over ``chunks`` (best of the passes that fit in ``seconds``)."""
    best = float("inf")
    deadline = time.perf_counter() + seconds
    passes = 0
    while passes < 3 or (time.perf_counter() < deadline and passes < 10_000):
        feed = feed_factory()
        start = time.perf_counter()
        for chunk in chunks:
            feed(chunk)
        best = min(best, time.perf_counter() - start)
        passes += 1
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--read-size", type=int, default=65536, help="bytes per read (default 65536)"
    )
    parser.add_argument("--total", type=int, default=8 << 20, help="bytes per pass (default 8 MiB)")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    args = parser.parse_args()
    print(f"reads of {args.read_size} B, {args.total >> 20} MiB per pass, best pass")
    columns = ("MB/s", 10), ("frames/s", 12), ("ns/frame", 9), ("ns/read", 9), ("floor ns/read", 14)
    print(f"{'payload':>8}", *(f"{name:>{width}}" for name, width in columns))
    for payload_size in (64, 16 * 1024):
        chunks, count = chunks_of(payload_size, args.read_size, args.total)
        size = sum(map(len, chunks))
        tracked = measure(lambda: FrameTracker().feed, chunks, args.seconds)
        floor = measure(lambda: _noop, chunks, args.seconds)
        print(
            f"{payload_size:>7}B {size / tracked / 1e6:>10.0f} {count / tracked:>12.3g}"
            f" {tracked / count * 1e9:>9.1f} {tracked / len(chunks) * 1e9:>9.0f}"
            f" {floor / len(chunks) * 1e9:>14.0f}"
        )


if __name__ == "__main__":
    main()
