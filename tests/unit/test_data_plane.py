"""The data plane without sockets: downstream, exchange and upstream on scripted transports.

As httpcore tests its protocols with scripted bytes: a client's bytes go into a
real :class:`Downstream`, the exchange admits with the real memory store and
balancing, and each backend connection is a real :class:`Upstream` whose
transport records what the gateway wrote; the test plays the backend's part by
feeding it bytes. The hand-over to the relay is injected, so a ``101`` ends at
the point where the sockets would go to C.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from typing import Any

import pytest

from wsgate.admission import Limits
from wsgate.admission.memory import MemoryStore
from wsgate.balancing import cookie_token, make_policy
from wsgate.config import Config, build_config
from wsgate.gateway.access_log import AccessLog, RequestLog
from wsgate.gateway.admit import Admission
from wsgate.gateway.connector import ConnectFailed, Connector
from wsgate.gateway.downstream import PIPELINE_LIMIT, Downstream
from wsgate.gateway.handoff import Handoff, Receiver
from wsgate.gateway.plane import Plane, Route
from wsgate.gateway.session import Sessions
from wsgate.gateway.stats import Stats
from wsgate.gateway.upstream import Upstream
from wsgate.upstreams.pool import Backend, BackendPool


class ScriptedTransport(asyncio.Transport):
    """Records what the protocol writes and how it pauses; closes as a real one would."""

    def __init__(self, peer: tuple[str, int] = ("127.0.0.9", 50000)):
        super().__init__()
        self.peer = peer
        self.written = bytearray()
        self.paused = False
        self.pauses = 0
        self.closed = False
        self.aborted = False
        self.protocol: asyncio.BaseProtocol | None = None
        self.slow_close = False  # the socket closes only when the test says (lose())

    def attach(self, protocol: asyncio.Protocol) -> None:
        self.protocol = protocol
        protocol.connection_made(self)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.written += data

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False

    def is_reading(self) -> bool:
        return not self.paused

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self._lose()

    def abort(self) -> None:
        self.aborted = True
        self._lose()

    def _lose(self) -> None:
        if not self.closed:
            self.closed = True
            if not self.slow_close:
                self.lose()

    def lose(self) -> None:
        """The socket is closed now: the protocol hears of it on the next loop iteration."""
        protocol = self.protocol
        assert protocol is not None
        asyncio.get_running_loop().call_soon(protocol.connection_lost, None)


class ScriptedConnector(Connector):
    """Backends that refuse or accept as scripted; each accepted connection is recorded."""

    def __init__(self, refuse: set[str] | None = None):
        super().__init__(connect_timeout=1.0)
        self.refuse = refuse or set()
        self.hold: asyncio.Future[None] | None = None  # a connect that waits on this
        self.tried: list[str] = []
        self.opened: list[tuple[Upstream, ScriptedTransport]] = []

    async def acquire(self, backend: Backend, *, pooled: bool) -> Upstream:
        self.tried.append(backend.id)
        if pooled:
            idle = self._idle.get(backend.id)
            if idle:
                return idle.pop()
        if self.hold is not None:
            await self.hold
        if backend.id in self.refuse:
            raise ConnectFailed("connect failed: [Errno 111] Connection refused")
        upstream = Upstream(backend, self.forget)
        transport = ScriptedTransport(peer=(backend.host, backend.port))
        transport.attach(upstream)
        self.opened.append((upstream, transport))
        return upstream


class HandOvers:
    """Stands where the relay stands: records the sockets it would be given."""

    def __init__(self) -> None:
        self.given: list[tuple[Any, ...]] = []

    def __call__(self, receiver: Receiver, *sockets_and_spare: Any) -> Handoff | None:
        client_transport, backend_transport, rest, _spare = sockets_and_spare
        self.given.append((receiver, client_transport, backend_transport, rest))
        return None


class NoSpares:
    """Far from the open-files limit: no spare is ever needed."""

    def take(self) -> bool:
        return False

    def refill_soon(self) -> None:
        pass


class Rig:
    """One gateway's data plane on scripted transports, with the memory store."""

    def __init__(self, config: Config, connector: ScriptedConnector):
        self.config = config
        self.store = MemoryStore(Limits())
        self.stats = Stats()
        self.out = io.BytesIO()
        self.log = RequestLog("test", self.stats, out=AccessLog(self.out))
        self.pool = BackendPool(config.limits.max_connections_per_backend)
        assert isinstance(config.backends, list)
        self.pool.update(config.backends, initial=True)
        self.admission = Admission(
            config, self.store, self.pool, make_policy(config.balance), self.stats
        )
        self.admission.pool_changed()
        self.connector = connector
        self.hand_overs = HandOvers()
        self.sessions = Sessions(self.stats, self.log, NoSpares(), hand_over=self.hand_overs)
        self.sessions.loop = asyncio.get_running_loop()
        connector.start(asyncio.get_running_loop())
        route = Route(self.pool, self.admission)
        self.plane = Plane(
            asyncio.get_running_loop(), config, self.stats, self.log, connector,
            self.sessions, lambda head: route,
        )  # fmt: skip
        self.downstreams: set[Downstream] = set()

    def client(self) -> tuple[Downstream, ScriptedTransport]:
        down = Downstream(self.plane, self.downstreams)
        transport = ScriptedTransport()
        transport.attach(down)
        return down, transport

    def held(self) -> dict[str, int]:
        """Slots the store holds, by backend (what a release must bring to zero)."""
        return {b: n for b, n in self.store.local_counts().items() if n}

    def log_lines(self) -> list[dict[str, Any]]:
        self.log.flush()
        return [json.loads(line) for line in self.out.getvalue().splitlines()]


def make_config(backends: int = 1, **extra: Any) -> Config:
    data: dict[str, Any] = {
        "backends": [{"address": f"127.0.0.1:{9001 + i}", "id": f"b{i}"} for i in range(backends)],
        "balance": "round_robin",
        "limits": {"max_connections_per_backend": 2},
    }
    data.update(extra)
    return build_config(data)


async def until(condition: Callable[[], object], what: str) -> None:
    """Let the loop run until ``condition`` holds (bounded: these steps take no time)."""
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


GET = b"GET /a HTTP/1.1\r\nHost: gw\r\n\r\n"
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)
SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)
OK_HELLO = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def responses(written: bytes | bytearray) -> list[bytes]:
    """The status lines of the responses in what the client received."""
    return [line for line in bytes(written).split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]


# -- downstream ----------------------------------------------------------------------------


async def test_pipelined_requests_beyond_the_limit_stop_reading() -> None:
    rig = Rig(make_config(), ScriptedConnector())
    rig.connector.hold = asyncio.get_running_loop().create_future()  # nothing gets answered
    down, client = rig.client()
    down.data_received(GET * PIPELINE_LIMIT)
    assert not client.paused  # up to the limit, pipelining is fine
    down.data_received(GET)
    assert client.paused and len(down.pending) == PIPELINE_LIMIT + 1
    client.close()
    await until(lambda: down.task is None, "the exchange ended with the client")
    assert rig.held() == {}


async def test_a_client_leaving_mid_connect_gives_the_slot_back() -> None:
    rig = Rig(make_config(), ScriptedConnector())
    rig.connector.hold = asyncio.get_running_loop().create_future()
    down, client = rig.client()
    down.data_received(UPGRADE)
    await until(lambda: rig.connector.tried, "a connect began")
    assert rig.held() == {"b0": 1}  # admitted, the connect pending
    client.close()
    await until(lambda: down.task is None, "the exchange ended")
    assert rig.held() == {}
    assert rig.connector.opened == []  # the connect never finished
    assert client.written == b""


async def test_a_client_leaving_mid_request_frees_the_slot_once_the_backend_socket_closes() -> None:
    rig = Rig(make_config(), ScriptedConnector())
    down, client = rig.client()
    down.data_received(GET)
    await until(lambda: rig.connector.opened, "the backend was connected")
    _, backend = rig.connector.opened[0]
    backend.slow_close = True
    client.close()
    await until(lambda: down.task is None, "the exchange ended")
    assert backend.aborted
    assert rig.held() == {"b0": 1}  # the backend still counts the request it was sent
    backend.lose()
    await until(lambda: not rig.held(), "the slot was freed")
    [line] = rig.log_lines()
    assert line["outcome"] == "client_closed"


# -- exchange and upstream -----------------------------------------------------------------


async def test_a_head_response_carries_no_body_and_the_client_connection_stays() -> None:
    rig = Rig(make_config(), ScriptedConnector())
    down, client = rig.client()
    down.data_received(b"HEAD /a HTTP/1.1\r\nHost: gw\r\n\r\n")
    await until(lambda: rig.connector.opened, "the backend was connected")
    upstream, backend = rig.connector.opened[0]
    assert bytes(backend.written).startswith(b"HEAD /a HTTP/1.1\r\n")
    # A HEAD response announces a body it does not carry; the next response follows.
    upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    await until(lambda: down.task is None, "the exchange ended")
    assert client.written.startswith(b"HTTP/1.1 200 OK\r\n")
    assert client.written.endswith(b"\r\n\r\n")  # the head, and nothing after it
    assert b"Content-Length: 5" in client.written and b"chunked" not in client.written
    assert not client.closed and rig.held() == {}
    # httptools cannot skip the announced body: that backend connection is not reused.
    assert backend.aborted
    down.data_received(GET)
    await until(lambda: len(rig.connector.opened) == 2, "the next request got a new connection")
    upstream, backend = rig.connector.opened[1]
    upstream.data_received(OK_HELLO)
    await until(lambda: client.written.endswith(b"hello"), "the next response arrived")
    assert responses(client.written) == [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK"]


async def test_an_upgrade_is_handed_over_with_the_backends_early_bytes() -> None:
    rig = Rig(make_config(), ScriptedConnector())
    down, client = rig.client()
    down.data_received(UPGRADE)
    await until(lambda: rig.connector.opened, "the backend was connected")
    upstream, backend = rig.connector.opened[0]
    sent = bytes(backend.written)
    assert b"Upgrade: websocket" in sent and b"X-Forwarded-For: 127.0.0.9" in sent
    upstream.data_received(SWITCHING + b"\x81\x02hi")  # a first frame right after the 101
    assert responses(client.written) == [b"HTTP/1.1 101 Switching Protocols"]
    [(session, client_transport, backend_transport, rest)] = rig.hand_overs.given
    assert (client_transport, backend_transport, rest) == (client, backend, b"\x81\x02hi")
    assert down.upgraded and down not in rig.downstreams
    assert rig.held() == {"b0": 1}  # the session holds the slot
    await until(lambda: down.task is None, "the exchange task ended")
    assert rig.held() == {"b0": 1}  # still: the exchange committed it to the session
    session.finish("backend_closed")
    session.finish("client_closed")  # a second end changes nothing
    assert rig.held() == {}
    [line] = rig.log_lines()
    assert (line["kind"], line["status"], line["outcome"]) == ("websocket", 101, "backend_closed")


async def test_a_refusing_backend_answers_502_and_frees_the_slot() -> None:
    rig = Rig(make_config(), ScriptedConnector(refuse={"b0"}))
    down, client = rig.client()
    down.data_received(UPGRADE)
    await until(lambda: down.task is None, "the exchange ended")
    assert responses(client.written) == [b"HTTP/1.1 502 Bad Gateway"]
    assert b'"error": "backend_unreachable"' in client.written
    backend = rig.pool.get("b0")
    assert backend is not None and backend.connect_failures_total == 1
    assert rig.held() == {}
    [line] = rig.log_lines()
    assert (line["status"], line["outcome"]) == (502, "backend_unreachable")


async def test_a_refused_connect_is_retried_on_the_next_candidate() -> None:
    rig = Rig(make_config(backends=2), ScriptedConnector())
    first = rig.pool.candidates()[0].backend_id
    rig.connector.refuse = {first}
    down, client = rig.client()
    down.data_received(GET)
    await until(lambda: rig.connector.opened, "a backend was connected")
    assert len(rig.connector.tried) == 2 and rig.connector.tried[0] == first
    upstream, _ = rig.connector.opened[0]
    assert upstream.backend.id != first
    assert rig.held() == {upstream.backend.id: 1}  # the refused one's slot is back already
    upstream.data_received(OK_HELLO)
    await until(lambda: down.task is None, "the exchange ended")
    assert client.written.startswith(b"HTTP/1.1 200 OK\r\n") and client.written.endswith(b"hello")
    assert rig.held() == {}
    [line] = rig.log_lines()
    assert (line["backend"], line["outcome"]) == (upstream.backend.id, "ok")


async def test_the_affinity_cookie_names_the_backend_that_answered() -> None:
    config = make_config(backends=2, affinity={"by": "cookie", "cookie": "gw"})
    rig = Rig(config, ScriptedConnector())
    # The first candidate refuses: the cookie must name the second, which answered.
    first = rig.pool.candidates()[0].backend_id
    rig.connector.refuse = {first}
    down, client = rig.client()
    down.data_received(UPGRADE)
    await until(lambda: rig.connector.opened, "a backend was connected")
    upstream, _ = rig.connector.opened[0]
    answered = upstream.backend.id
    assert answered != first
    upstream.data_received(SWITCHING)
    assert f"Set-Cookie: gw={cookie_token(answered)};".encode() in client.written
    assert rig.hand_overs.given
    # A client that comes back with the cookie goes to that backend and is not told again.
    rig.connector.refuse = set()
    again, client2 = rig.client()
    again.data_received(
        UPGRADE.replace(b"\r\n\r\n", f"\r\nCookie: gw={cookie_token(answered)}\r\n\r\n".encode())
    )
    await until(lambda: len(rig.connector.opened) == 2, "the second client was connected")
    upstream2, _ = rig.connector.opened[1]
    assert upstream2.backend.id == answered
    upstream2.data_received(SWITCHING)
    assert responses(client2.written) == [b"HTTP/1.1 101 Switching Protocols"]
    assert b"Set-Cookie" not in client2.written


async def test_a_backend_that_closes_before_answering_gets_a_502_on_the_client() -> None:
    rig = Rig(make_config(), ScriptedConnector())
    down, client = rig.client()
    down.data_received(GET)
    await until(lambda: rig.connector.opened, "the backend was connected")
    _, backend = rig.connector.opened[0]
    backend.close()
    await until(lambda: down.task is None, "the exchange ended")
    assert responses(client.written) == [b"HTTP/1.1 502 Bad Gateway"]
    assert client.closed and rig.held() == {}
    [line] = rig.log_lines()
    assert line["outcome"] == "backend_failed"


@pytest.mark.parametrize("status", [400, 431])
async def test_a_bad_request_is_answered_without_admission(status: int) -> None:
    rig = Rig(make_config(max_head_size=1024), ScriptedConnector())
    down, client = rig.client()
    if status == 400:
        down.data_received(UPGRADE.replace(b"websocket", b"h2c"))
    else:
        down.data_received(b"GET / HTTP/1.1\r\nX-Big: " + b"x" * 2048)
    await until(lambda: client.closed, "the client connection closed")
    assert responses(client.written)[0].startswith(b"HTTP/1.1 %d" % status)
    assert rig.connector.tried == [] and rig.held() == {}
