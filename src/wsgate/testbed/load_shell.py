"""``wsgate load --interactive``: a prompt that opens, uses and closes sessions (seed 002).

Commands, one a line, from a terminal or a pipe::

    connect N     open N more sessions (refusals are retried in the background)
    send TEXT     send TEXT on every open session and print each answer
    status        sessions open, per pod, refusals, messages
    close N       close the N newest open sessions
    quit          close everything and print the report (also at end of input)
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Any

from wsgate.testbed.health import serve_health
from wsgate.testbed.load_plan import LoadPlan, answer_pod
from wsgate.testbed.load_ws import WebSocketLoad
from wsgate.testbed.report import LoadStats, build_report

__all__ = ["Command", "interactive", "parse_command"]

HELP = """commands:
  connect N     open N more sessions
  send TEXT     send TEXT on every open session and print the answers
  status        what is open, per pod, and what was refused
  close N       close the N newest open sessions
  quit          close everything and print the report"""


@dataclass(frozen=True)
class Command:
    name: str
    count: int = 0
    text: str = ""


def parse_command(line: str) -> Command | str:
    """A command, or the one-line complaint to print instead."""
    word, _, rest = line.strip().partition(" ")
    word = word.lower()
    rest = rest.strip()
    if not word:
        return Command("nothing")
    if word in ("quit", "exit", "q"):
        return Command("quit")
    if word in ("status", "help", "?"):
        return Command("help" if word == "?" else word)
    if word == "send":
        return Command("send", text=rest) if rest else "send needs some text: send TEXT"
    if word in ("connect", "close"):
        if not rest:
            return Command(word, count=1)
        if not rest.isdigit() or int(rest) < 1:
            return f"{word} needs a positive number: {word} N"
        return Command(word, count=int(rest))
    return f"unknown command {word!r}; try help"


def _stdin_lines(loop: asyncio.AbstractEventLoop, stdin: IO[str]) -> asyncio.Queue[str | None]:
    """Lines of ``stdin`` read by a daemon thread (a pipe or a file cannot be polled)."""
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:
        for line in stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line)
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=read, name="wsgate-load-stdin", daemon=True).start()
    return queue


def _status(load: WebSocketLoad) -> str:
    stats = load.stats
    pods = ", ".join(f"{pod}: {n}" for pod, n in sorted(stats.open_by_backend.items()) if n)
    trying = len(load.sessions) - stats.open
    refused = ", ".join(f"{status}: {n}" for status, n in sorted(stats.rejected.items()))
    return (
        f"open: {stats.open} ({pods or 'none'}); still trying: {trying}; "
        f"refused: {refused or 'none'}; messages: {stats.sent} sent, {stats.received} received"
    )


async def _connect(load: WebSocketLoad, count: int, out: IO[str]) -> None:
    fresh = [load.add_session(load.clients[index % len(load.clients)]) for index in range(count)]
    deadline = time.monotonic() + load.plan.connect_timeout + 1
    while time.monotonic() < deadline:
        if all(s.pod is not None or (s.task is not None and s.task.done()) for s in fresh):
            break
        await asyncio.sleep(0.02)
    opened = sum(1 for session in fresh if session.is_open)
    print(f"connect: {opened} of {count} open. {_status(load)}", file=out, flush=True)


async def _send(load: WebSocketLoad, text: str, out: IO[str]) -> None:
    asked = [(session, session.ask(text)) for session in load.open_sessions()]
    waiting = [future for _, future in asked if future is not None]
    if not waiting:
        print("send: no open session", file=out, flush=True)
        return
    await asyncio.wait(waiting, timeout=load.plan.answer_timeout)
    for session, future in asked:
        if future is None:
            continue
        if future.done() and not future.cancelled():
            answer = future.result()
            pod = answer_pod(answer) or session.pod or "?"
            print(f"[{session.number}] {pod}: {answer.decode(errors='replace')}", file=out)
        else:
            print(f"[{session.number}] no answer within {load.plan.answer_timeout}s", file=out)
    out.flush()


async def _close(load: WebSocketLoad, count: int, out: IO[str]) -> None:
    chosen = sorted(load.open_sessions(), key=lambda s: s.number)[-count:]
    for session in chosen:
        session.close()
    tasks = [session.task for session in chosen if session.task is not None]
    if tasks:
        await asyncio.wait(tasks, timeout=load.plan.answer_timeout)
    print(f"close: closed {len(chosen)}. {_status(load)}", file=out, flush=True)


async def interactive(
    plan: LoadPlan,
    stop: asyncio.Event,
    *,
    health: tuple[str, int] | None = None,
    stdin: IO[str] | None = None,
    out: IO[str] | None = None,
) -> dict[str, Any]:
    """Run the prompt until ``quit``, end of input or ``stop``; return the report."""
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    stats = LoadStats(mode="websocket", target=0)
    load = WebSocketLoad(plan, stats)
    started = time.monotonic()
    cleanup_health = await serve_health(*health) if health else None
    lines = _stdin_lines(asyncio.get_running_loop(), stdin)
    prompt = stdin.isatty()
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while True:
            if prompt:
                print("> ", end="", file=out, flush=True)
            reading = asyncio.ensure_future(lines.get())
            await asyncio.wait([reading, stopping], return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():
                reading.cancel()
                break
            line = reading.result()
            if line is None:
                break
            command = parse_command(line)
            if isinstance(command, str):
                print(command, file=out, flush=True)
                continue
            if command.name == "quit":
                break
            if command.name == "help":
                print(HELP, file=out, flush=True)
            elif command.name == "status":
                print(_status(load), file=out, flush=True)
            elif command.name == "connect":
                stats.target += command.count
                await _connect(load, command.count, out)
            elif command.name == "send":
                await _send(load, command.text, out)
            elif command.name == "close":
                await _close(load, command.count, out)
        stats.sample(time.monotonic() - started)
        await load.stop()
    finally:
        stopping.cancel()
        if cleanup_health is not None:
            await cleanup_health()
    return build_report(stats, elapsed=time.monotonic() - started, urls=plan.urls)
