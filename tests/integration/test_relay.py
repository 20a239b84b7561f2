"""The C relay on its own: real TCP sockets on loopback, judged by what the far ends receive.

Each test builds two TCP connections, hands the relay one end of each (the
gateway's side) and plays the client and the backend on the other ends. The
relay moves bytes on its own thread; the tests call ``report()`` whenever its
descriptor is readable, as the event loop does, to hear of sessions that ended.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from descriptors import open_descriptors

from wsgate.gateway._relay import Link, Relay
from wsgate.gateway.frames import close_frame, masked_close_frame

CLIENT_CLOSE = close_frame(1001, "drain")
BACKEND_CLOSE = masked_close_frame(1001, "gateway closing", mask_key=b"abcd")


def frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """An unmasked frame, as a backend sends it."""
    size = len(payload)
    if size < 126:
        return bytes((0x80 | opcode, size)) + payload
    if size < 1 << 16:
        return bytes((0x80 | opcode, 126)) + struct.pack("!H", size) + payload
    return bytes((0x80 | opcode, 127)) + struct.pack("!Q", size) + payload


def tcp_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    outer = socket.create_connection(listener.getsockname())
    inner, _ = listener.accept()
    inner.setblocking(False)
    return outer, inner


@dataclass
class Bench:
    relay: Relay
    listener: socket.socket
    ended: list[tuple[str, str]] = field(default_factory=list)
    sockets: list[socket.socket] = field(default_factory=list)
    answers: list[tuple[str, bytes, int]] = field(default_factory=list)

    def session(
        self, name: str = "s", rest: bytes = b""
    ) -> tuple[socket.socket, socket.socket, Link]:
        """(client, backend, link): the far ends of a new relayed session."""
        client, client_inner = tcp_pair(self.listener)
        backend, backend_inner = tcp_pair(self.listener)
        self.sockets += [client, backend]
        # The relay takes its own descriptors, as the gateway hands them over.
        link = self.relay.add(client_inner.detach(), backend_inner.detach(), rest, name)
        return client, backend, link

    def pump(self, until: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            assert left > 0, "the relay did not get there in time"
            ready, _, _ = select.select([self.relay], [], [], min(left, 0.005))
            if ready:
                self.relay.report()

    def pump_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        self.pump(lambda: time.monotonic() >= deadline, timeout=seconds + 1)


@pytest.fixture
def bench() -> Iterator[Bench]:
    listener = socket.create_server(("127.0.0.1", 0))
    ended: list[tuple[str, str]] = []
    answers: list[tuple[str, bytes, int]] = []
    relay = Relay(
        lambda owner, outcome: ended.append((owner, outcome)),
        on_answer=lambda owner, answer, error: answers.append((owner, answer, error)),
        linger=0.5,
    )
    bench = Bench(relay, listener, ended, answers=answers)
    try:
        yield bench
    finally:
        relay.close()
        for sock in bench.sockets:
            sock.close()
        listener.close()


def receive(bench: Bench, sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes from ``sock``, pumping the relay meanwhile."""
    sock.setblocking(False)
    chunks: list[bytes] = []
    got = 0

    def enough() -> bool:
        nonlocal got
        try:
            chunk = sock.recv(min(1 << 20, size - got))
        except BlockingIOError:
            return got >= size
        if not chunk:
            return True
        chunks.append(chunk)
        got += len(chunk)
        return got >= size

    if size:
        bench.pump(enough)
    return b"".join(chunks)


def read_to_eof(bench: Bench, sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.setblocking(False)
    chunks: list[bytes] = []
    done = False

    def closed() -> bool:
        nonlocal done
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return False
        except ConnectionResetError:
            chunk = b""
        if chunk:
            chunks.append(chunk)
            return False
        done = True
        return True

    bench.pump(closed, timeout)
    return b"".join(chunks)


def test_bytes_pass_both_ways_in_order_and_are_counted(bench: Bench) -> None:
    client, backend, link = bench.session()
    upward = os.urandom(300_000)
    downward = b"".join(frame(os.urandom(n)) for n in (0, 1, 125, 126, 70_000, 200_000))
    client.sendall(upward)
    assert receive(bench, backend, len(upward)) == upward
    backend.sendall(downward)
    assert receive(bench, client, len(downward)) == downward
    assert (link.bytes_in, link.bytes_out) == (len(upward), len(downward))
    assert link.outcome is None and bench.ended == []


def test_rest_goes_to_the_client_first(bench: Bench) -> None:
    rest = frame(b"sent with the 101")
    client, backend, link = bench.session(rest=rest)
    backend.sendall(frame(b"then this"))
    expected = rest + frame(b"then this")
    assert receive(bench, client, len(expected)) == expected
    assert link.bytes_out == len(expected)


def test_a_reader_that_stops_stops_the_writer(bench: Bench) -> None:
    """Flow control: the relay holds at most one read; the backend's own sends block."""
    client, backend, _ = bench.session()
    backend.setblocking(False)
    payload = os.urandom(64 << 20)
    sent = 0
    # The client reads nothing. Keep the backend writing until its sends block for
    # a while: that happens only if the relay stopped reading it.
    blocked_since: float | None = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sent < len(payload):
        try:
            sent += backend.send(payload[sent : sent + 65536])
            blocked_since = None
        except BlockingIOError:
            blocked_since = blocked_since or time.monotonic()
            if time.monotonic() - blocked_since > 0.5:
                break
        ready, _, _ = select.select([bench.relay], [], [], 0)
        if ready:
            bench.relay.report()
    assert blocked_since is not None, "the backend never blocked: nothing held it back"
    assert sent < len(payload)
    # Now the client reads: every byte sent arrives, in order.
    backend.setblocking(True)
    got = receive(bench, client, sent)
    assert got == payload[:sent]


def test_backend_close_after_data_reaches_a_slow_client_whole(bench: Bench) -> None:
    client, backend, link = bench.session()
    data = os.urandom(8 << 20) + frame(b"\x03\xe8", opcode=0x8)
    backend.setblocking(True)
    backend.sendall(data[: 1 << 20])  # the rest goes while the client is not reading
    writer_done = False

    def write_rest() -> bool:
        nonlocal writer_done
        if not writer_done:
            backend.setblocking(False)
            try:
                view = memoryview(data)[write_rest.sent :]  # type: ignore[attr-defined]
                write_rest.sent += backend.send(view)  # type: ignore[attr-defined]
            except BlockingIOError:
                pass
            if write_rest.sent == len(data):  # type: ignore[attr-defined]
                backend.shutdown(socket.SHUT_WR)
                writer_done = True
        return writer_done

    write_rest.sent = 1 << 20  # type: ignore[attr-defined]
    # Read slowly from the client while the backend writes everything and closes.
    got = bytearray()
    client.setblocking(False)

    def all_arrived() -> bool:
        write_rest()
        try:
            chunk = client.recv(65536)
        except BlockingIOError:
            return False
        got.extend(chunk)
        return not chunk

    bench.pump(all_arrived, timeout=20)
    assert bytes(got) == data
    bench.pump(lambda: bool(bench.ended))
    assert bench.ended == [("s", "backend_closed")]
    assert link.bytes_out == len(data) and not link.lingering


def test_client_reset_ends_the_session_once_and_closes_the_backend(bench: Bench) -> None:
    client, backend, link = bench.session()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # an RST, not a FIN
    bench.pump(lambda: bool(bench.ended))
    assert bench.ended == [("s", "client_error")]
    assert read_to_eof(bench, backend) == b""
    assert link.outcome == "client_error"


def test_client_eof_is_client_closed(bench: Bench) -> None:
    client, backend, _ = bench.session()
    client.sendall(b"last words")
    client.shutdown(socket.SHUT_WR)
    assert read_to_eof(bench, backend) == b"last words"
    bench.pump(lambda: bool(bench.ended))
    assert bench.ended == [("s", "client_closed")]


def test_close_waits_for_the_frame_boundary(bench: Bench) -> None:
    client, backend, link = bench.session()
    big = frame(os.urandom(100_000))
    backend.sendall(big[:50_000])
    assert receive(bench, client, 50_000) == big[:50_000]
    assert link.close_gracefully(CLIENT_CLOSE, BACKEND_CLOSE)
    assert not link.close_gracefully(CLIENT_CLOSE, BACKEND_CLOSE)  # once
    # The rest of the frame, then another one. The close frame follows the last
    # whole frame of the read that completes the big one: "late" may pass if it came
    # in that read, and nothing after the close frame reaches the client.
    late = frame(b"late")
    backend.sendall(big[50_000:] + late)
    rest = big[50_000:]
    got = receive(bench, client, len(rest) + len(CLIENT_CLOSE))
    if got[len(rest) :].startswith(late[:1]):
        got += receive(bench, client, len(late))
    assert got in (rest + CLIENT_CLOSE, rest + late + CLIENT_CLOSE)
    assert receive(bench, backend, len(BACKEND_CLOSE)) == BACKEND_CLOSE
    # Client bytes after our close are dropped too, yet counted.
    client.sendall(b"ignored")
    backend.sendall(frame(b"also too late"))
    bench.pump_for(0.2)
    client.setblocking(False)
    with pytest.raises(BlockingIOError):
        client.recv(100)
    backend.setblocking(False)
    with pytest.raises(BlockingIOError):
        backend.recv(100)
    assert link.bytes_in == len(b"ignored")


def test_close_at_a_boundary_is_written_at_once(bench: Bench) -> None:
    client, backend, link = bench.session()
    backend.sendall(frame(b"whole"))
    assert receive(bench, client, 7) == frame(b"whole")
    link.close_gracefully(CLIENT_CLOSE, BACKEND_CLOSE)
    assert receive(bench, client, len(CLIENT_CLOSE)) == CLIENT_CLOSE
    assert receive(bench, backend, len(BACKEND_CLOSE)) == BACKEND_CLOSE


def test_no_second_close_when_the_backend_is_closing(bench: Bench) -> None:
    client, backend, link = bench.session()
    backend_close = frame(b"\x03\xe8bye", opcode=0x8)
    backend.sendall(backend_close)
    assert receive(bench, client, len(backend_close)) == backend_close
    link.close_gracefully(CLIENT_CLOSE, BACKEND_CLOSE)
    backend.shutdown(socket.SHUT_WR)
    assert read_to_eof(bench, client) == b""  # only the backend's close, no second one
    bench.pump(lambda: bool(bench.ended))
    assert bench.ended == [("s", "backend_closed")]


def test_finish_closes_both_without_a_report(bench: Bench) -> None:
    client, backend, link = bench.session()
    link.finish()
    assert read_to_eof(bench, client) == b"" and read_to_eof(bench, backend) == b""
    bench.pump_for(0.1)
    assert bench.ended == [] and link.outcome == "finished" and len(bench.relay) == 0


def test_a_stuck_flush_is_cut_after_linger(bench: Bench) -> None:
    """A client that half-closes and never reads: its session ends at once, and what
    waits for it is given up after the relay's linger."""
    before = open_descriptors()
    client, backend, link = bench.session()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    backend.setblocking(False)
    sent = 0
    chunk = os.urandom(65536)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # fill every buffer up to the relay's
        try:
            sent += backend.send(chunk)
        except BlockingIOError:
            bench.pump_for(0.05)
            try:
                sent += backend.send(chunk)
            except BlockingIOError:
                break
    client.shutdown(socket.SHUT_WR)
    bench.pump(lambda: bool(bench.ended))
    assert bench.ended == [("s", "client_closed")]
    assert link.lingering and bench.relay.lingering == 1
    bench.pump(lambda: not link.lingering, timeout=3)  # linger is 0.5 s here
    assert bench.relay.lingering == 0
    assert open_descriptors() == before + 2  # the far ends, still the test's to close


def test_sessions_opened_and_ended_leave_no_descriptor(bench: Bench) -> None:
    before = open_descriptors()
    for round_ in range(3):
        pairs = [bench.session(f"{round_}-{i}") for i in range(100)]
        for index, (client, backend, _) in enumerate(pairs):
            (client if index % 2 else backend).close()
        reported = 100 * (round_ + 1)
        bench.pump(lambda reported=reported: len(bench.ended) == reported)
        assert len(bench.relay) == 0
        for client, backend, _ in pairs:
            client.close()
            backend.close()
    assert open_descriptors() == before
    outcomes = {outcome for _, outcome in bench.ended}
    assert len(bench.ended) == 300 and outcomes == {"client_closed", "backend_closed"}


def test_closed_relay_refuses_and_closes_what_it_is_given(bench: Bench) -> None:
    bench.relay.close()
    before = open_descriptors()
    a, b = socket.socketpair()
    with pytest.raises(ValueError, match="closed"):
        bench.relay.add(a.detach(), os.dup(b.fileno()), b"", "late")
    assert open_descriptors() == before + 1  # b alone: the relay closed what it got
    b.close()


# -- dials: the backend's side opened by the relay ------------------------------------

UPGRADE = b"GET /ws HTTP/1.1\r\nHost: b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


def dial(bench: Bench, owner: str = "d", request: bytes = UPGRADE) -> tuple[Link, socket.socket]:
    """(link, backend): a dial to the bench's listener, and the backend's end of it."""
    host, port = bench.listener.getsockname()
    link = bench.relay.dial(host, port, request, owner)
    bench.listener.settimeout(5)
    backend, _ = bench.listener.accept()
    bench.sockets.append(backend)
    return link, backend


def client_pair(bench: Bench) -> tuple[socket.socket, int]:
    """(client, fd): a client connection and the gateway's descriptor of it."""
    client, inner = tcp_pair(bench.listener)
    bench.sockets.append(client)
    return client, inner.detach()


def test_a_dial_writes_the_request_and_reports_the_whole_answer_then_relays(
    bench: Bench,
) -> None:
    link, backend = dial(bench, "upgrade")
    backend.settimeout(5)
    assert receive(bench, backend, len(UPGRADE)) == UPGRADE
    early = frame(b"right after the 101")
    backend.sendall(SWITCHED + early)  # frames may come with the head
    bench.pump(lambda: bool(bench.answers))
    assert bench.answers == [("upgrade", SWITCHED + early, 0)]
    assert link.connected and len(bench.relay) == 0  # not a session until attached
    client, client_fd = client_pair(bench)
    link.attach(client_fd, b"HTTP/1.1 101 rewritten\r\n\r\n", early, "session")
    assert len(bench.relay) == 1
    expected = b"HTTP/1.1 101 rewritten\r\n\r\n" + early
    assert receive(bench, client, len(expected)) == expected
    client.sendall(b"up")
    assert receive(bench, backend, 2) == b"up"
    backend.sendall(frame(b"down"))
    assert receive(bench, client, len(frame(b"down"))) == frame(b"down")
    assert (link.bytes_in, link.bytes_out) == (2, len(early) + len(frame(b"down")))
    backend.close()
    bench.pump(lambda: bool(bench.ended))
    assert bench.ended == [("session", "backend_closed")]  # the attached owner hears


def test_a_request_larger_than_the_socket_takes_is_written_whole(bench: Bench) -> None:
    # Connected at once on loopback, the dial writes what the socket takes;
    # report() writes the rest once the backend reads.
    request = UPGRADE[:-2] + b"X-Big: " + b"b" * (8 << 20) + b"\r\n\r\n"
    _, backend = dial(bench, request=request)
    backend.settimeout(5)
    assert receive(bench, backend, len(request)) == request
    backend.sendall(SWITCHED)
    bench.pump(lambda: bool(bench.answers))
    assert bench.answers == [("d", SWITCHED, 0)]


def test_an_answer_is_reported_once_its_head_is_whole(bench: Bench) -> None:
    _, backend = dial(bench)
    assert receive(bench, backend, len(UPGRADE)) == UPGRADE
    for piece in (SWITCHED[:10], SWITCHED[10:-3], SWITCHED[-3:-1]):
        backend.sendall(piece)
        bench.pump_for(0.05)
        assert bench.answers == []
    backend.sendall(SWITCHED[-1:])
    bench.pump(lambda: bool(bench.answers))
    assert bench.answers == [("d", SWITCHED, 0)]


def test_a_refused_connect_is_reported_with_its_errno_and_leaves_no_descriptor(
    bench: Bench,
) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    host, port = closed.getsockname()
    closed.close()
    before = open_descriptors()
    link = bench.relay.dial(host, port, UPGRADE, "refused")
    bench.pump(lambda: bool(bench.answers))
    assert bench.answers == [("refused", b"", errno.ECONNREFUSED)]
    assert not link.connected and not link.abort()  # over already
    assert open_descriptors() == before


def test_a_backend_closing_before_its_head_ends_is_reported_as_cut(bench: Bench) -> None:
    _, backend = dial(bench)
    assert receive(bench, backend, len(UPGRADE)) == UPGRADE
    backend.sendall(b"HTTP/1.1 101 Sw")
    backend.close()
    bench.pump(lambda: bool(bench.answers))
    assert bench.answers == [("d", b"HTTP/1.1 101 Sw", -1)]


def test_an_answer_that_is_no_upgrade_gives_the_socket_back(bench: Bench) -> None:
    link, backend = dial(bench)
    assert receive(bench, backend, len(UPGRADE)) == UPGRADE
    refusal = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 12\r\n\r\n"
    backend.sendall(refusal)
    bench.pump(lambda: bool(bench.answers))
    assert bench.answers == [("d", refusal, 0)]
    taken = socket.socket(fileno=link.take())
    bench.sockets.append(taken)
    backend.sendall(b"not for you!")  # the body: the relay no longer reads this socket
    taken.settimeout(5)
    assert taken.recv(100) == b"not for you!"
    with pytest.raises(ValueError):
        link.take()
    taken.close()
    backend.settimeout(5)
    assert backend.recv(10) == b""
    assert bench.ended == []


def test_an_aborted_dial_closes_at_once_and_reports_nothing(bench: Bench) -> None:
    link, backend = dial(bench)
    assert receive(bench, backend, len(UPGRADE)) == UPGRADE
    assert link.abort()
    backend.settimeout(5)
    assert backend.recv(10) == b""  # closed now, not at the relay's leisure
    bench.pump_for(0.1)
    assert bench.answers == [] and bench.ended == []
    assert not link.abort()
    client, client_fd = client_pair(bench)
    with pytest.raises(ValueError):
        link.attach(client_fd, b"", b"", "late")  # the relay closed the descriptor
    client.settimeout(5)
    assert client.recv(10) == b""


def test_a_dial_still_connecting_can_be_aborted(bench: Bench) -> None:
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    host, port = full.getsockname()
    queued = []
    # An accept queue that is full drops the next handshakes: those connects hang.
    for _ in range(4):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex((host, port))
        queued.append(sock)
    before = open_descriptors()
    try:
        link = bench.relay.dial(host, port, UPGRADE, "hanging")
        bench.pump_for(0.2)
        assert not link.connected and bench.answers == []
        assert link.abort()
        assert open_descriptors() == before
    finally:
        for sock in queued:
            sock.close()
        full.close()


def test_a_head_that_never_ends_is_reported_at_the_limit(bench: Bench) -> None:
    _, backend = dial(bench)
    assert receive(bench, backend, len(UPGRADE)) == UPGRADE
    backend.sendall(b"HTTP/1.1 101 ok\r\nX: " + b"x" * 70_000)
    bench.pump(lambda: bool(bench.answers))
    [(_, answer, error)] = bench.answers
    assert error == 0 and 64 * 1024 <= len(answer) <= 70_000 + 20


def test_dials_answered_failed_taken_and_aborted_leave_no_descriptor(bench: Bench) -> None:
    before = open_descriptors()
    for round_ in range(3):
        dials = [dial(bench, f"{round_}-{i}") for i in range(40)]
        for _, backend in dials:
            backend.sendall(b"HTTP/1.1 101 ok\r\n\r\n")
        bench.pump(lambda round_=round_: len(bench.answers) == 40 * (round_ + 1))
        for index, (link, backend) in enumerate(dials):
            if index % 3 == 0:
                client, client_fd = client_pair(bench)
                link.attach(client_fd, b"", b"", f"s{index}")
                link.finish()
                client.close()
            elif index % 3 == 1:
                os.close(link.take())
            else:
                assert link.abort()
            backend.close()
        bench.pump_for(0.05)
        bench.sockets.clear()
    assert open_descriptors() == before


def test_sole_descriptors_closed_without_leaving_the_set_serve_their_numbers_again(
    bench: Bench,
) -> None:
    # A dial's socket and an arrival's (sole=True) are closed without EPOLL_CTL_DEL:
    # the close takes them out of the set. Their numbers come back at once for the
    # next sessions, which must hear their own bytes only, and each owner its end once.
    numbers: list[int] = []
    for round_ in range(30):
        link, backend = dial(bench, f"dial-{round_}")
        assert receive(bench, backend, len(UPGRADE)) == UPGRADE
        backend.sendall(SWITCHED)
        bench.pump(lambda round_=round_: len(bench.answers) == round_ + 1)
        client, client_fd = client_pair(bench)
        numbers.append(client_fd)
        link.attach(client_fd, b"", b"", f"s{round_}", True)
        message = frame(f"round {round_}".encode())
        client.sendall(message)
        assert receive(bench, backend, len(message)) == message
        backend.sendall(message)
        assert receive(bench, client, len(message)) == message
        client.close()  # the client leaves: the relay closes both of its sockets
        bench.pump(lambda round_=round_: len(bench.ended) == round_ + 1)
        backend.close()
        bench.sockets.clear()
    assert len(set(numbers)) < len(numbers)  # descriptors were numbered again
    assert bench.ended == [(f"s{r}", "client_closed") for r in range(30)]
    assert len(bench.relay) == 0


def test_dials_refuse_what_is_not_an_address(bench: Bench) -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        bench.relay.dial("localhost", 80, UPGRADE, "name")
    with pytest.raises(ValueError, match="not an IP address"):
        bench.relay.dial("127.0.0.1", 0, UPGRADE, "port")
    plain = Relay(lambda owner, outcome: None)
    try:
        with pytest.raises(ValueError, match="no dials"):
            plain.dial("127.0.0.1", 80, UPGRADE, "nobody to answer")
    finally:
        plain.close()


def test_closing_the_relay_closes_a_pending_dial(bench: Bench) -> None:
    _, backend = dial(bench)
    assert receive(bench, backend, len(UPGRADE)) == UPGRADE
    bench.relay.close()
    backend.settimeout(5)
    assert backend.recv(10) == b""


class _Recorder:
    """Stands where a Session stands for the hand-over: relays what it is given."""

    def __init__(self, relay: Relay):
        self.relay_ = relay
        self.link: Link | None = None
        self.finished: list[str] = []

    def relay(self, client_fd: int, backend_fd: int, rest: bytes) -> None:
        self.link = self.relay_.add(client_fd, backend_fd, rest, self)

    def finish(self, outcome: str) -> None:
        self.finished.append(outcome)

    # The spares (none here: far from the open-files limit).
    def take(self) -> bool:
        return False

    def refill_soon(self) -> None:
        pass  # none was taken


def test_handoff_waits_until_uvloop_has_written_what_it_holds() -> None:
    """Bytes uvloop still buffers for the client when the session starts go out first."""
    import asyncio

    import uvloop

    from wsgate.gateway.handoff import Handoff

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        accepted: asyncio.Queue[asyncio.Transport] = asyncio.Queue()

        class Accept(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                accepted.put_nowait(transport)  # type: ignore[arg-type]

        server = await loop.create_server(Accept, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()
        client = socket.create_connection(address)
        client_transport = await accepted.get()
        backend = socket.create_connection(address)
        backend_transport = await accepted.get()
        relay = Relay(lambda owner, outcome: owner.finish(outcome))
        loop.add_reader(relay.fileno(), relay.report)
        try:
            before = os.urandom(32 << 20)
            client_transport.write(before)  # far more than the kernel takes at once
            assert client_transport.get_write_buffer_size() > 0
            recorder = _Recorder(relay)
            handoff = Handoff(recorder, client_transport, backend_transport, b"rest", recorder)
            handoff.hand_over_when_written()
            assert recorder.link is None  # still waiting for uvloop
            backend.sendall(b"after")
            client.setblocking(False)
            got = bytearray()
            expected = before + b"rest" + b"after"
            while len(got) < len(expected):
                got += await asyncio.wait_for(loop.sock_recv(client, 1 << 20), 10)
            assert bytes(got) == expected
            assert recorder.link is not None and recorder.finished == []
            client.close()
            for _ in range(100):
                if recorder.finished:
                    break
                await asyncio.sleep(0.02)
            assert recorder.finished == ["client_closed"]
        finally:
            loop.remove_reader(relay.fileno())
            relay.close()
            client.close()
            backend.close()
            server.close()

    uvloop.run(scenario())


def test_a_relay_nobody_closed_or_refers_to_is_collected_with_its_thread_and_sockets() -> None:
    import gc

    def threads_and_descriptors() -> tuple[int, int]:
        return len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))

    class Owner:
        link: Link | None = None

    gc.collect()
    before = threads_and_descriptors()
    listener = socket.create_server(("127.0.0.1", 0))
    far_ends = []
    relay = Relay(lambda owner, outcome: None)
    for _ in range(3):
        client, client_inner = tcp_pair(listener)
        backend, backend_inner = tcp_pair(listener)
        far_ends += [client, backend]
        owner = Owner()  # owner and link refer to each other, as a session and its link do
        owner.link = relay.add(client_inner.detach(), backend_inner.detach(), b"", owner)
    del relay, owner
    gc.collect()
    # pthread_join returns once the thread's exit has begun; the kernel lists the
    # thread in /proc until its exit is over, a moment later.
    deadline = time.monotonic() + 2.0
    while (after := threads_and_descriptors())[0] > before[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    for sock in far_ends:
        sock.close()
    listener.close()
    # Only the test's own sockets are left: the relay's thread, its five descriptors
    # and the six sockets it was given are gone.
    assert after == (before[0], before[1] + 1 + len(far_ends))


def _voluntary_switches(tid: int) -> int:
    """How many times the thread ``tid`` has gone to sleep (each wake-up ends in one)."""
    with open(f"/proc/self/task/{tid}/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches line")


def test_dials_are_read_on_the_callers_thread_and_wake_the_relays_only_as_sessions() -> None:
    threads = set(os.listdir("/proc/self/task"))
    answers: list[tuple[str, bytes, int]] = []
    relay = Relay(
        lambda owner, outcome: None,
        on_answer=lambda owner, answer, error: answers.append((owner, answer, error)),
    )
    listener = socket.create_server(("127.0.0.1", 0))
    bench = Bench(relay, listener, answers=answers)
    try:
        (tid,) = (int(name) for name in set(os.listdir("/proc/self/task")) - threads)
        time.sleep(0.05)  # the relay's thread is waiting on its own set by now
        asleep = _voluntary_switches(tid)
        dialed = []
        for i in range(20):  # one after the other: each answer its own wake-up, if any
            link, backend = dial(bench, f"d{i}")
            assert receive(bench, backend, len(UPGRADE)) == UPGRADE
            backend.sendall(SWITCHED)
            bench.pump(lambda n=i + 1: len(answers) >= n)
            dialed.append((link, backend))
        assert answers == [(f"d{i}", SWITCHED, 0) for i in range(20)]
        # Twenty connects, requests and answers, and the relay's thread never woke.
        assert _voluntary_switches(tid) == asleep
        link, backend = dialed[0]
        client, client_fd = client_pair(bench)
        link.attach(client_fd, SWITCHED, b"", "session")
        assert receive(bench, client, len(SWITCHED)) == SWITCHED
        client.sendall(b"up")
        assert receive(bench, backend, 2) == b"up"  # moved by the relay's thread
        assert _voluntary_switches(tid) > asleep
    finally:
        relay.close()
        for sock in bench.sockets:
            sock.close()
        listener.close()
