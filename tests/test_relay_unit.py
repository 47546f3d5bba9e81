"""
The relay (L{pgtls_twisted.proxy._relay}) on real sockets (socket pairs)
with a reactor that only records what is registered: bytes both ways,
counted; flow control (a destination that takes no more stops the
source's reading, and memory stays at one read); TLS in memory BIOs
through OpenSSL's own calls, with a close_notify and garbage handed to the
leg's TLS protocol; and handing the sockets back.

Real PostgreSQL through the relay is C{test_relay.py}.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.proxy import _relay
from pgtls_twisted.proxy._relay import READ_SIZE, Relay
from pgtls_twisted.proxy._stats import ConnectionStats
from pgtls_twisted.testing.pki import PKI


class Reactor:
    """What the relay asks of a reactor (C{IReactorFDSet}), recorded."""

    def __init__(self) -> None:
        self.readers: set[Any] = set()
        self.writers: set[Any] = set()

    def addReader(self, r: Any) -> None:
        self.readers.add(r)

    def removeReader(self, r: Any) -> None:
        self.readers.discard(r)

    def addWriter(self, w: Any) -> None:
        self.writers.add(w)

    def removeWriter(self, w: Any) -> None:
        self.writers.discard(w)


class Transport:
    """A TCP transport as the relay hands a socket back to it."""

    connected = True

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.reading = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def startReading(self) -> None:
        self.reading = True

    def connectionLost(self, reason: Failure) -> None:
        self.lost = reason


class TLS:
    """A leg's TLS protocol, as the relay hands a close_notify or an error to it."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def peerClosed(self) -> None:
        self.events.append("close_notify")

    def failed(self, failure: Failure) -> None:
        self.events.append(failure)


class Leg:
    def __init__(self, tls: TLS | None = None) -> None:
        self.transport = Transport()
        self.tls = tls
        self.handBack: Any = None


def _pair() -> tuple[socket.socket, socket.socket]:
    """(the peer's socket, the proxy's non-blocking one), with small buffers."""
    app, proxy = socket.socketpair()
    for s in (app, proxy):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    proxy.setblocking(False)
    app.setblocking(False)
    return app, proxy


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket, socket.socket, socket.socket]]:
    clientApp, clientProxy = _pair()
    serverApp, serverProxy = _pair()
    yield clientApp, clientProxy, serverApp, serverProxy
    for s in (clientApp, clientProxy, serverApp, serverProxy):
        s.close()


def _recvAll(s: socket.socket) -> bytes:
    got = b""
    while True:
        try:
            chunk = s.recv(1 << 20)
        except BlockingIOError:
            return got
        if not chunk:
            return got
        got += chunk


def _plainRelay(sockets: Any) -> tuple[Relay, Reactor, Leg, Leg]:
    _, clientProxy, _, serverProxy = sockets
    reactor, client, server = Reactor(), Leg(), Leg()
    relay = Relay(reactor, ConnectionStats(), b"")
    relay.start((client, clientProxy, None), (server, serverProxy, None))
    return relay, reactor, client, server


def test_plaintext_both_ways_counted_and_at_ready(sockets: Any) -> None:
    clientApp, _, serverApp, _ = sockets
    relay, reactor, client, server = _plainRelay(sockets)
    one, other = relay.ends
    assert reactor.readers == {one, other}
    assert client.handBack == relay.stop and server.handBack == relay.stop
    query = wire.message(b"Q", b"select 1\0")
    clientApp.send(query)
    one.doRead()
    assert _recvAll(serverApp) == query
    answer = wire.message(b"C", b"SELECT 1\0") + wire.message(b"Z", b"I")
    serverApp.send(answer)
    other.doRead()
    assert _recvAll(clientApp) == answer
    assert (relay.stats.bytes_in, relay.stats.bytes_out) == (len(query), len(answer))
    assert relay.atReady()
    serverApp.send(b"D\0\0\0\x05")
    other.doRead()
    assert not relay.atReady()


def test_slow_reader_stops_the_source_and_memory_stays_bounded(sockets: Any) -> None:
    """
    The client reads nothing: the server's socket stops being read once
    the client's socket is full, with at most one read held; when the
    client reads again, everything arrives, in order.
    """
    clientApp, _, serverApp, _ = sockets
    relay, reactor, _, _ = _plainRelay(sockets)
    one, other = relay.ends
    sent = bytearray()
    block = bytes(range(256)) * 256
    most = 0
    for _ in range(200):
        try:
            sent += block[: serverApp.send(block)]
        except BlockingIOError:
            pass
        if other in reactor.readers:
            other.doRead()
        most = max(most, len(one.out))
    assert other not in reactor.readers and other.stalled
    assert one in reactor.writers
    assert 0 < most <= READ_SIZE + 1024  # one read, and its records' overhead
    received = bytearray()
    while len(received) < len(sent):
        received += _recvAll(clientApp)
        if one in reactor.writers:
            one.doWrite()
        if other in reactor.readers:
            other.doRead()
    assert received == sent
    assert other in reactor.readers and one not in reactor.writers


def test_stop_hands_back_what_is_unsent(sockets: Any) -> None:
    clientApp, _, serverApp, _ = sockets
    relay, reactor, client, server = _plainRelay(sockets)
    one, other = relay.ends
    block = b"x" * 65536
    for _ in range(50):
        try:
            serverApp.send(block)
        except BlockingIOError:
            pass
        if other in reactor.readers:
            other.doRead()
    held = bytes(one.out)
    assert held
    relay.stop()
    assert not reactor.readers and not reactor.writers and not relay.running
    assert client.transport.written == [held] and one.out == b""
    assert client.transport.reading and server.transport.reading
    assert client.handBack is None
    relay.stop()  # twice is harmless
    assert client.transport.written == [held]


def test_end_of_file_hands_back(sockets: Any) -> None:
    """A FIN is left for Twisted's own read to find: the relay just lets go."""
    clientApp, _, _, _ = sockets
    relay, reactor, client, _ = _plainRelay(sockets)
    clientApp.shutdown(socket.SHUT_WR)
    relay.ends[0].doRead()
    assert not relay.running and client.transport.reading and not reactor.readers


def test_reactor_dropping_a_descriptor_closes_its_transport(sockets: Any) -> None:
    """An exception in C{doRead}, or the reactor stopping: hand back, then the transport closes."""
    relay, reactor, client, server = _plainRelay(sockets)
    reason = Failure(ConnectionLost())
    for end in relay.ends:
        end.connectionLost(reason)
    assert not relay.running and not reactor.readers
    assert client.transport.lost is reason and server.transport.lost is reason


# -- TLS in memory BIOs --------------------------------------------------------


def _tlsPair(pki: PKI) -> tuple[SSL.Connection, SSL.Connection]:
    """(the peer's client connection, the proxy's server one), handshaken in memory."""
    serverContext = SSL.Context(SSL.TLS_METHOD)
    serverContext.use_certificate_file(str(pki.cert("server")))
    serverContext.use_privatekey_file(str(pki.key("server")))
    clientContext = SSL.Context(SSL.TLS_METHOD)
    proxy, peer = SSL.Connection(serverContext, None), SSL.Connection(clientContext, None)
    proxy.set_accept_state()
    peer.set_connect_state()
    for _ in range(10):
        for a, b in ((peer, proxy), (proxy, peer)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                b.bio_write(a.bio_read(1 << 20))
            except SSL.WantReadError:
                pass
    # The proxy's NewSessionTickets, read by the peer.
    try:
        peer.recv(1)
    except SSL.WantReadError:
        pass
    return peer, proxy


def _tlsRelay(sockets: Any, pki: PKI) -> tuple[Relay, Reactor, Leg, SSL.Connection]:
    _, clientProxy, _, serverProxy = sockets
    peer, proxy = _tlsPair(pki)
    reactor, client, server = Reactor(), Leg(TLS()), Leg()
    relay = Relay(reactor, ConnectionStats(), b"")
    relay.start((client, clientProxy, proxy), (server, serverProxy, None))
    return relay, reactor, client, peer


def _seal(peer: SSL.Connection, data: bytes) -> bytes:
    peer.sendall(data)
    return peer.bio_read(1 << 22)


def _open(peer: SSL.Connection, sealed: bytes) -> bytes:
    if sealed:
        peer.bio_write(sealed)
    got = b""
    while True:
        try:
            got += peer.recv(1 << 16)
        except SSL.WantReadError:
            return got


def test_tls_both_ways_through_openssl_calls(sockets: Any, pki: PKI) -> None:
    clientApp, _, serverApp, _ = sockets
    relay, reactor, _, peer = _tlsRelay(sockets, pki)
    one, other = relay.ends
    query = wire.message(b"Q", b"select 1\0") * 3000  # several records
    sealed = memoryview(_seal(peer, query))
    received = b""
    while len(received) < len(query):
        if sealed:
            try:
                sealed = sealed[clientApp.send(sealed) :]
            except BlockingIOError:
                pass
        if one in reactor.readers:
            one.doRead()
        received += _recvAll(serverApp)
    assert received == query
    answer = b"Z\0\0\0\x05I"
    serverApp.send(answer)
    other.doRead()
    assert _open(peer, _recvAll(clientApp)) == answer
    assert relay.stats.bytes_in == len(query) and relay.atReady()


def test_tls_slow_reader_bounded(sockets: Any, pki: PKI) -> None:
    """The TLS client reads nothing: the server's socket stops being read."""
    clientApp, _, serverApp, _ = sockets
    relay, reactor, _, peer = _tlsRelay(sockets, pki)
    one, other = relay.ends
    block = b"D" * 65536
    sent = 0
    most = 0
    for _ in range(200):
        try:
            sent += serverApp.send(block)
        except BlockingIOError:
            pass
        if other in reactor.readers:
            other.doRead()
        most = max(most, len(one.out))
    assert other.stalled and other not in reactor.readers and one in reactor.writers
    assert 0 < most <= READ_SIZE + 1024  # one read, and its records' overhead
    received = 0
    while received < sent:
        received += len(_open(peer, _recvAll(clientApp)))
        if one in reactor.writers:
            one.doWrite()
        if other in reactor.readers:
            other.doRead()
    assert received == sent


def test_tls_close_notify_goes_to_the_tls_protocol(sockets: Any, pki: PKI) -> None:
    clientApp, _, _, _ = sockets
    relay, reactor, client, peer = _tlsRelay(sockets, pki)
    try:
        peer.shutdown()
    except SSL.Error:
        pass
    clientApp.send(peer.bio_read(1 << 16))
    relay.ends[0].doRead()
    assert not relay.running and not reactor.readers
    assert client.tls.events == ["close_notify"]


def test_tls_garbage_goes_to_the_tls_protocol_as_an_error(sockets: Any, pki: PKI) -> None:
    clientApp, _, _, _ = sockets
    relay, _, client, _ = _tlsRelay(sockets, pki)
    clientApp.send(b"\x17\x03\x03\x00\x20" + b"\0" * 32)
    relay.ends[0].doRead()
    assert not relay.running
    [failure] = client.tls.events
    assert failure.check(SSL.Error)
    # The error queue is left clean for pyOpenSSL's next call.
    assert _relay.opensslLib.ERR_peek_error() == 0


def test_only_tcp_legs_on_a_descriptor_reactor_can_be_relayed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    L{_relay.possible}: in-memory transports (unit tests' iosim), a reactor
    without C{IReactorFDSet}, or a verdict without the relay's names keep
    the pump.
    """
    from twisted.internet import reactor
    from twisted.internet.testing import StringTransport

    from pgtls_twisted.tls import _private

    leg = Leg()
    leg.transport = StringTransport()  # type: ignore[assignment]
    assert not _relay.possible(leg, leg, reactor)
    assert not _relay.possible(Leg(), Leg(), object())
    tcp = Leg()
    tcp.transport = _private.SAMPLES["a twisted.internet.tcp.Connection"]()  # type: ignore[assignment]
    assert not _relay.possible(
        tcp, tcp, reactor
    )  # a bare tcp.Connection is neither Server nor Client
    monkeypatch.setattr(_private, "verdict", lambda: _private.Verdict(missing=_private.RELIED_ON))
    assert not _relay.possible(Leg(), Leg(), reactor)
