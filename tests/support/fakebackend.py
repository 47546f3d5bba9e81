"""
A fake PostgreSQL server for attack tests: a Twisted listener on
127.0.0.1:0 that records every byte the proxy sends it and answers as the
test scripts it to (C{S} followed by plaintext, an ErrorResponse instead of
C{S}/C{N}, ...), or relays to a real cluster while recording, so that one
route can serve both an attack (nothing may reach the backend) and a
normal client (which must).

It runs on the reactor, like the proxy; tests assert on it after their
blocking clients (in threads) are done, once L{FakeBackend.settle} says all
its connections are closed.

Usage::

    fake = FakeBackend(answer_ssl_request(b"S" + error)).start()
    ... route(pki, fake, backend={"tls": "require"}) ...
    await fake.settle()
    assert fake.received == wire.SSL_REQUEST
    await fake.stop()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.python.failure import Failure

from pgtls_twisted.protocol import _wire as wire

#: What a scripted fake does with each chunk it receives, after recording
#: it: C{script(connection, data)}. The connection's C{received} already
#: includes C{data}.
Script = Callable[["FakeConnection", bytes], None]


class FakeConnection(Protocol):
    """
    One connection from the proxy.

    @ivar received: every byte received, in order.
    @ivar chunks: the same, as the C{dataReceived} calls that brought them.
    @ivar closed: fires (with C{None}) when the connection is gone.
    """

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend
        self.received = bytearray()
        self.chunks: list[bytes] = []
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.lostReason: Failure | None = None
        self.state: dict[str, Any] = {}
        self._relay: Protocol | None = None
        self._relayPending = bytearray()

    def connectionMade(self) -> None:
        self.backend.connections.append(self)
        if self.backend.relay_to is not None:
            self._startRelay(*self.backend.relay_to)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.chunks.append(data)
        if self.backend.relay_to is not None:
            if self._relay is None:
                self._relayPending += data
            else:
                self._relay.transport.write(data)  # type: ignore[union-attr]
            return
        self.backend.script(self, data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lostReason = reason
        if self._relay is not None and self._relay.transport is not None:
            self._relay.transport.loseConnection()
        self.closed.callback(None)

    def write(self, data: bytes) -> None:
        """Send C{data} in one write (so it arrives in one chunk on loopback)."""
        self.transport.write(data)  # type: ignore[union-attr]

    # -- relaying to a real server ---------------------------------------------

    def _startRelay(self, host: str, port: int) -> None:
        from twisted.internet import reactor

        outer = self

        class _Out(Protocol):
            def connectionMade(self) -> None:
                if outer.closed.called:
                    # The proxy hung up while we were connecting.
                    self.transport.loseConnection()  # type: ignore[union-attr]
                    return
                outer._relay = self
                pending = bytes(outer._relayPending)
                outer._relayPending.clear()
                if pending:
                    self.transport.write(pending)  # type: ignore[union-attr]

            def dataReceived(self, data: bytes) -> None:
                outer.transport.write(data)  # type: ignore[union-attr]

            def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
                outer.transport.loseConnection()  # type: ignore[union-attr]

        class _OutFactory(ClientFactory):
            noisy = False

            def buildProtocol(self, addr: object) -> Protocol:
                return _Out()

            def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
                outer.transport.abortConnection()  # type: ignore[union-attr]

        reactor.connectTCP(host, port, _OutFactory(), timeout=5)  # type: ignore[attr-defined]


class _FakeFactory(Factory):
    noisy = False

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend

    def buildProtocol(self, addr: object) -> FakeConnection:
        return FakeConnection(self.backend)


class FakeBackend:
    """
    A scripted (or relaying) PostgreSQL server that records what it receives.

    Quacks enough like a L{PostgresCluster} (C{host}, C{port}, C{ssl}) for
    L{support.proxy.route}; C{ssl} is C{False}, so that route's backend is
    C{tls = "disable"} unless the test overrides it.

    @param script: what to do with received bytes; defaults to nothing.
    @param relay_to: C{(host, port)} of a real server to relay to instead.
    @ivar connections: every connection accepted, in order.
    """

    host = "127.0.0.1"
    ssl = False

    def __init__(self, script: Script | None = None, relay_to: tuple[str, int] | None = None):
        self.script: Script = script or record_only
        self.relay_to = relay_to
        self.connections: list[FakeConnection] = []
        self._port: Any = None

    def start(self) -> FakeBackend:
        from twisted.internet import reactor

        self._port = reactor.listenTCP(0, _FakeFactory(self), interface="127.0.0.1")  # type: ignore[attr-defined]
        return self

    @property
    def port(self) -> int:
        return int(self._port.getHost().port)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def received(self) -> bytes:
        """Everything received on every connection, concatenated."""
        return b"".join(bytes(c.received) for c in self.connections)

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait until every connection accepted so far is closed."""
        from twisted.internet import reactor

        pending = [c.closed for c in self.connections if not c.closed.called]
        if not pending:
            return
        d = defer.gatherResults(pending)
        d.addTimeout(timeout, reactor)  # type: ignore[arg-type]
        await d

    async def stop(self) -> None:
        for conn in self.connections:
            if conn.transport is not None and not conn.closed.called:
                conn.transport.abortConnection()  # type: ignore[attr-defined]
        port, self._port = self._port, None
        if port is not None:
            await defer.maybeDeferred(port.stopListening)
        await self.settle()


# ---------------------------------------------------------------------------
# Scripts


def record_only(conn: FakeConnection, data: bytes) -> None:
    """Say nothing; just record."""


def answer_ssl_request(reply: bytes) -> Script:
    """
    Answer an SSLRequest with C{reply}, all in one write: C{b"S"} plus a
    message to test injection, C{b"N"}, an ErrorResponse...
    """

    def script(conn: FakeConnection, data: bytes) -> None:
        if bytes(conn.received) == wire.SSL_REQUEST:
            conn.write(reply)

    return script


def answer_startup(*replies: bytes) -> Script:
    """
    A plaintext server (use with C{backend.tls = "disable"}): once a whole
    StartupMessage has arrived, send C{replies} in one write, then say
    nothing more.
    """

    def script(conn: FakeConnection, data: bytes) -> None:
        if conn.state.get("answered"):
            return
        parsed = wire.parse_startup_packet(conn.received)
        if parsed is not None:
            conn.state["answered"] = True
            conn.write(b"".join(replies))

    return script
