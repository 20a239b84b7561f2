"""The plain listener's batch accept, on real sockets: what each connection is
given back with, what is skipped, and the open-files limit.

Every case judges by the far side: the bytes a client sent, the address it
sent them from, and whether the descriptor it was given answers it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from descriptors import open_descriptors, open_files_limit

from wsgate.gateway._accept import accept_batch


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    """A plain listener's socket: non-blocking, Nagle off, queued once bytes are in."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
    yield sock
    sock.close()


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


def connect(listening: socket.socket, clients: list[socket.socket], source: str) -> socket.socket:
    client = socket.socket()
    client.bind((source, 0))
    client.connect(listening.getsockname())
    clients.append(client)
    return client


def accept_all(listening: socket.socket, count: int, limit: int = 128) -> list:
    """What accept_batch gives back for ``count`` connections known to be on their way."""
    taken: list = []
    deadline = time.monotonic() + 5
    while len(taken) < count and time.monotonic() < deadline:
        taken += accept_batch(listening.fileno(), limit, 8192)
        if len(taken) < count:
            time.sleep(0.01)
    return taken


def test_each_connection_comes_with_its_peer_and_what_it_sent(
    listening: socket.socket, clients: list[socket.socket]
) -> None:
    sent = {}
    for index in range(6):
        client = connect(listening, clients, f"127.0.0.{2 + index % 3}")
        data = b"GET /%d HTTP/1.1\r\n\r\n" % index
        client.sendall(data)
        sent[client.getsockname()] = (client, data)
    taken = accept_all(listening, len(sent))
    assert {peer: data for _, peer, data in taken} == {
        peer: data for peer, (_, data) in sent.items()
    }
    for fd, peer, _ in taken:
        with socket.socket(fileno=fd) as accepted:
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            accepted.sendall(b"yours")  # the descriptor is the connection of that client
            client, _ = sent[peer]
            client.settimeout(5)
            assert client.recv(10) == b"yours"


def test_a_batch_takes_no_more_than_its_limit_and_leaves_the_rest_waiting(
    listening: socket.socket, clients: list[socket.socket]
) -> None:
    for index in range(5):
        connect(listening, clients, "127.0.0.2").sendall(b"%d" % index)
    time.sleep(0.05)  # all five queued
    first = accept_batch(listening.fileno(), 2, 8192)
    rest = accept_all(listening, 3)
    assert len(first) == 2 and len(rest) == 3
    assert sorted(data for _, _, data in first + rest) == [b"0", b"1", b"2", b"3", b"4"]
    assert accept_batch(listening.fileno(), 128, 8192) == []  # nothing waits: no error
    for fd, _, _ in first + rest:
        os.close(fd)


def test_what_is_read_is_at_most_the_read_size_and_the_rest_stays_in_the_socket(
    listening: socket.socket, clients: list[socket.socket]
) -> None:
    connect(listening, clients, "127.0.0.2").sendall(b"abcdef")
    time.sleep(0.05)
    [(fd, _, data)] = accept_batch(listening.fileno(), 128, 4)
    with socket.socket(fileno=fd) as accepted:
        accepted.settimeout(5)
        assert data == b"abcd" and accepted.recv(10) == b"ef"


def test_a_client_that_sent_nothing_or_closed_comes_with_no_bytes(
    clients: list[socket.socket],
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listening:  # no deferred accept here
        listening.setblocking(False)
        silent = connect(listening, clients, "127.0.0.2")
        closed = connect(listening, clients, "127.0.0.3")
        closed.shutdown(socket.SHUT_WR)
        taken = accept_all(listening, 2)
        assert sorted(peer[0] for _, peer, _ in taken) == ["127.0.0.2", "127.0.0.3"]
        assert [data for _, _, data in taken] == [b"", b""]
        for fd, peer, _ in taken:
            with socket.socket(fileno=fd) as accepted:
                accepted.settimeout(5)
                if peer[0] == "127.0.0.3":
                    assert accepted.recv(10) == b""  # its end, left for the transport
                else:
                    silent.sendall(b"late")
                    assert accepted.recv(10) == b"late"


def test_a_client_reset_before_its_first_byte_is_skipped_and_closed(
    clients: list[socket.socket],
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listening:
        listening.setblocking(False)
        reset = connect(listening, clients, "127.0.0.2")
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset.close()
        connect(listening, clients, "127.0.0.3").sendall(b"still here")
        time.sleep(0.05)
        before = open_descriptors()
        taken = accept_batch(listening.fileno(), 128, 8192)
        assert [(peer[0], data) for _, peer, data in taken] == [("127.0.0.3", b"still here")]
        assert open_descriptors() == before + 1  # the reset one was closed, not kept
        os.close(taken[0][0])


def test_an_ipv6_peer_is_spelt_as_getpeername_spells_it(clients: list[socket.socket]) -> None:
    try:
        listening = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with listening:
        listening.setblocking(False)
        client = socket.socket(socket.AF_INET6)
        clients.append(client)
        client.connect(listening.getsockname()[:2])
        client.sendall(b"six")
        [(fd, peer, data)] = accept_all(listening, 1)
        with socket.socket(fileno=fd) as accepted:
            assert (peer, data) == (accepted.getpeername(), b"six")
            assert peer == client.getsockname()


def test_out_of_descriptors_raises_at_once_and_loses_no_connection(
    listening: socket.socket, clients: list[socket.socket]
) -> None:
    for index in range(3):
        connect(listening, clients, "127.0.0.2").sendall(b"%d" % index)
    time.sleep(0.05)
    with open_files_limit(0), pytest.raises(OSError) as raised:
        accept_batch(listening.fileno(), 128, 8192)
    assert raised.value.errno == errno.EMFILE
    with open_files_limit(1):
        one = accept_batch(listening.fileno(), 128, 8192)  # the second accept fails: one back
        assert len(one) == 1
    rest = accept_all(listening, 2)
    assert sorted(data for _, _, data in one + rest) == [b"0", b"1", b"2"]
    for fd, _, _ in one + rest:
        os.close(fd)


def test_what_is_no_listening_socket_is_an_error_and_leaks_nothing() -> None:
    before = open_descriptors()
    with socket.socket() as unbound, pytest.raises(OSError):
        accept_batch(unbound.fileno(), 128, 8192)
    with pytest.raises(ValueError):
        accept_batch(0, 1, 0)
    assert open_descriptors() == before
