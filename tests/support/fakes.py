"""
Fakes for deterministic tests of the client leg, without sockets or a
running reactor: a route on a L{MemoryReactorClock}, a string transport
that behaves like a real TCP transport where it matters, and a fake
PostgreSQL client that negotiates real TLS over L{twisted.test.iosim}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from zope.interface import implementer

from pgtls_twisted.config import parse_config
from pgtls_twisted.ops._metrics import Metrics
from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.proxy._cancel import CancelRegistry
from pgtls_twisted.proxy._frontend import ClientProtocol
from pgtls_twisted.proxy._route import Route
from pgtls_twisted.testing.pki import PKI

#: The address every fake client connects from.
CLIENT_ADDRESS = IPv4Address("TCP", "127.0.0.1", 5555)


def startup_message(user: str = "alice", **params: str) -> bytes:
    """A protocol 3.0 StartupMessage for C{user} (plus any other parameters)."""
    return wire.encode_startup_message({"user": user, **params})


def make_route(
    pki: PKI,
    tmp_path: Path,
    *,
    listener: dict[str, Any] | None = None,
    backend: dict[str, Any] | None = None,
    reactor: MemoryReactorClock | None = None,
) -> Route:
    """
    A L{Route} built from a real configuration (the PKI's C{server}
    certificate, a backend that is never connected to) on a
    L{MemoryReactorClock}, with C{startSession} replaced by a recorder: the
    calls are in C{route.sessions} as C{(client, startup)} tuples.
    """
    table = {
        "name": "test",
        "listener": {
            "bind_address": "127.0.0.1:0",
            "server_cert": str(pki.cert("server")),
            "server_key": str(pki.key("server")),
            **(listener or {}),
        },
        "backend": {"address": "127.0.0.1:1", "tls": "disable", **(backend or {})},
    }
    config = parse_config({"proxy": [table]}, base_dir=tmp_path).routes[0]
    clock = reactor or MemoryReactorClock()
    route = Route(config, clock, CancelRegistry(), Metrics(clock=clock))
    sessions: list[tuple[ClientProtocol, wire.StartupMessage]] = []
    route.sessions = sessions  # type: ignore[attr-defined]
    route.startSession = lambda client, startup: sessions.append(  # type: ignore[method-assign]
        (client, startup)
    )
    return route


def sessions(route: Route) -> list[tuple[ClientProtocol, wire.StartupMessage]]:
    """The C{startSession} calls recorded on a route from L{make_route}."""
    return route.sessions  # type: ignore[attr-defined, no-any-return]


class ClientTransport(StringTransport):
    """
    A L{StringTransport} as the proxy sees an accepted TCP connection.

    Two differences from the plain one, both to match
    L{twisted.internet.abstract.FileDescriptor}: C{unregisterProducer}
    without a producer is a no-op rather than an error, and pausing after
    C{loseConnection} is allowed (C{lenient}). C{aborted} tells
    C{abortConnection} (drop at once) from C{loseConnection} (graceful).
    """

    def __init__(self) -> None:
        super().__init__(peerAddress=CLIENT_ADDRESS, lenient=True)

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None

    @property
    def aborted(self) -> bool:
        return bool(self.disconnected)


def connect_client(route: Route) -> tuple[ClientProtocol, ClientTransport]:
    """A new client connection to C{route}, on a L{ClientTransport}."""
    proto = cast(ClientProtocol, route.factory().buildProtocol(None))
    transport = ClientTransport()
    proto.makeConnection(transport)
    return proto, transport


def feed(proto: Protocol, data: bytes, chunk: int | None = None) -> None:
    """Deliver C{data} to C{proto}, in chunks of C{chunk} bytes if given."""
    step = chunk or len(data) or 1
    for i in range(0, len(data), step):
        proto.dataReceived(data[i : i + step])


def error_fields(data: bytes) -> dict[str, str]:
    """
    The fields of the one ErrorResponse that C{data} must consist of.
    """
    reader = wire.MessageReader()
    reader.feed(data)
    msg = reader.next()
    assert msg is not None, f"no complete message in {data!r}"
    mtype, body = msg
    assert mtype == b"E", f"expected an ErrorResponse, got {mtype!r}"
    assert reader.drain() == b"", f"bytes after the ErrorResponse in {data!r}"
    return wire.parse_error_fields(body)


# ---------------------------------------------------------------------------
# A fake PostgreSQL client with real TLS, for iosim


@implementer(IHandshakeListener)
class _Inside(Protocol):
    """The fake client's protocol inside TLS."""

    def __init__(self, client: FakePGClient) -> None:
        self.client = client

    def handshakeCompleted(self) -> None:
        self.client.handshakeDone = True
        if self.client.onHandshake is not None:
            self.client.sendTLS(self.client.onHandshake)

    def dataReceived(self, data: bytes) -> None:
        self.client.decrypted += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.client.lostReason = reason


class FakePGClient(Protocol):
    """
    A libpq-like client: it sends an SSLRequest (or, with C{direct}, starts
    TLS at once) and, on C{S}, wraps itself in TLS exactly as a real client
    would, reading nothing but that one byte in plaintext.

    @ivar plaintext: bytes received before TLS.
    @ivar decrypted: application bytes received inside TLS.
    @ivar onHandshake: bytes to send inside TLS once the handshake is done.
    @ivar lostReason: the failure the connection (inside TLS, if any) was
        lost with, or C{None} while it is open.
    """

    def __init__(
        self,
        ca: Path,
        clock: Any,
        *,
        direct: bool = False,
        alpn: list[bytes] | None = None,
        onHandshake: bytes | None = None,
        hostname: str = "localhost",
    ) -> None:
        self.options = optionsForClientTLS(
            hostname,
            trustRoot=Certificate.loadPEM(ca.read_bytes()),
            acceptableProtocols=alpn,
        )
        self.clock = clock
        self.direct = direct
        self.onHandshake = onHandshake
        self.plaintext = b""
        self.decrypted = b""
        self.tls: TLSMemoryBIOProtocol | None = None
        self.handshakeDone = False
        self.lostReason: Failure | None = None

    def connectionMade(self) -> None:
        if self.direct:
            self.startTLS()
        else:
            self.transport.write(wire.SSL_REQUEST)

    def dataReceived(self, data: bytes) -> None:
        self.plaintext += data
        if self.tls is None and self.plaintext == b"S":
            self.startTLS()

    def startTLS(self) -> None:
        factory = TLSMemoryBIOFactory(self.options, True, Factory(), clock=self.clock)
        tls = factory.protocol(factory, _Inside(self))
        self.tls = tls
        tls.makeConnection(self.transport)
        self.dataReceived = tls.dataReceived  # type: ignore[method-assign]

    def sendTLS(self, data: bytes) -> None:
        assert self.tls is not None
        self.tls.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.tls is not None:
            self.tls.connectionLost(reason)
        else:
            self.lostReason = reason

    @property
    def negotiatedProtocol(self) -> bytes | None:
        return self.tls.negotiatedProtocol if self.tls is not None else None

    def alert(self) -> str:
        """The TLS error the connection was lost with, as text ("" if none)."""
        if self.lostReason is None or not self.lostReason.check(SSL.Error):
            return ""
        return str(self.lostReason.value)


def pump_client(route: Route, client: FakePGClient) -> tuple[ClientProtocol, FakeTransport, IOPump]:
    """
    Connect C{client} to a new connection of C{route} over iosim, on the
    route's clock, and move bytes until both sides are quiet.
    """
    server = cast(ClientProtocol, route.factory().buildProtocol(None))
    serverIO = FakeTransport(server, isServer=True, peerAddress=CLIENT_ADDRESS)
    clientIO = FakeTransport(client, isServer=False)
    pump = connect(server, serverIO, client, clientIO, greet=False, clock=route.clock)
    pump.flush()
    return server, serverIO, pump
