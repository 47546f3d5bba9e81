"""
Fakes for the unit tests of the protocol logic (sessions, pooled
sessions, logins, cancels, the pump): no sockets, no PostgreSQL, no
running reactor.

Every fake writes into one list of events, in the order things happen, so
that a test states a whole exchange at once, as magic-wormhole's tests do::

    assert events == [
        ("server", "startup"),
        ("client", "R:5"),
        ("server", "p"),
        ("client", "R:0"),
        ("client", "Z:I"),
    ]

An event is C{(who, what)}. C{who} names a transport (C{client},
C{server}, ...) or a fake (C{pool}); for a transport, C{what} is:

 - a message written to it, as L{label} names it: its type letter, with
   the request code of an Authentication (C{"R:5"}), the status of a
   ReadyForQuery (C{"Z:I"}) or the SQLSTATE of an ErrorResponse
   (C{"E:08006"}); the untyped first packet of a backend connection is
   C{"startup"}, C{"ssl"} or C{"cancel"};
 - C{"close"} (C{loseConnection}) or C{"abort"} (C{abortConnection}).

Backend connections are the real thing: the route's
L{pgtls_twisted.proxy._backend.BackendConnector} connects through the
endpoints of L{Backends} (its endpoint factory), and the test completes (or
refuses) each connection attempt with a real L{ServerProtocol} on a
recording transport (L{Wire}). Where TLS matters, L{Scene.accept_tls} and
L{Scene.tls_client} run real TLS over L{twisted.test.iosim} instead,
recording what pgtls sends inside it the same way. An attempt the
connector gives up (its C{connect_timeout} expired) is the event
C{("backends", "cancelled")}.

SCRAM: L{ScramServerSide} is the server side computed from RFC 5802 (not
pgtls's own), and the route's derivation threads are L{HeldDerivations},
which derive a key only when the test asks (L{HeldDerivations.complete}),
so that exchanges stay in a fixed order.

The reactor (L{unit_reactor}) is a L{MemoryReactorClock}, whose clock runs
the deadlines.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from zope.interface import implementer

from pgtls_twisted.config import parse_config
from pgtls_twisted.pool._pool import PooledServer
from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.proxy._backend import EndpointFactory, ServerProtocol
from pgtls_twisted.proxy._cancel import CancelRegistry
from pgtls_twisted.proxy._derivation import DerivationThreads
from pgtls_twisted.proxy._frontend import ClientProtocol
from pgtls_twisted.proxy._route import Route
from pgtls_twisted.proxy._stats import ConnectionStats
from pgtls_twisted.testing.pki import PKI
from pgtls_twisted.tls._lean import TLSLayer
from support.fakes import CLIENT_ADDRESS, FakePGClient, pump_client, startup_message
from support.unit_scram import ScramServerSide, certificate_binding

#: One thing that happened: C{(who, what)}.
Event = tuple[str, str]

# ---------------------------------------------------------------------------
# Recording what is written


def label(mtype: bytes, body: bytes) -> str:
    """A message as an event names it (see the module docstring)."""
    if mtype == b"":
        parsed = wire.parse_startup_packet(body)
        assert parsed is not None, f"incomplete startup packet {body!r}"
        packet = parsed[0]
        if isinstance(packet, wire.SSLRequest):
            return "ssl"
        if isinstance(packet, wire.CancelRequest):
            return "cancel"
        return "startup"
    if mtype == b"R":
        return f"R:{wire.auth_code(body)}"
    if mtype == b"Z":
        return f"Z:{body.decode('ascii')}"
    if mtype == b"E":
        return f"E:{wire.parse_error_fields(body).get('C')}"
    return mtype.decode("ascii")


class Framer:
    """
    Splits a byte stream into messages and records each as an event.

    @param untyped: the first packet has no type byte (a startup packet,
        an SSLRequest or a CancelRequest: the first thing pgtls writes to
        a backend).
    @ivar messages: C{(type, body)} of each message, in order; the untyped
        packet's type is C{b""} and its body the whole packet.
    """

    def __init__(self, name: str, events: list[Event], *, untyped: bool = False) -> None:
        self.name = name
        self.events = events
        self.messages: list[tuple[bytes, bytes]] = []
        self._untyped = untyped
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data
        while (msg := self._next()) is not None:
            self.messages.append(msg)
            self.events.append((self.name, label(*msg)))

    def _next(self) -> tuple[bytes, bytes] | None:
        buf = self._buf
        if self._untyped:
            if len(buf) < 4 or len(buf) < int.from_bytes(buf[:4], "big"):
                return None
            length = int.from_bytes(buf[:4], "big")
            packet = bytes(buf[:length])
            del buf[:length]
            self._untyped = False
            return b"", packet
        if len(buf) < 5 or len(buf) < 1 + int.from_bytes(buf[1:5], "big"):
            return None
        end = 1 + int.from_bytes(buf[1:5], "big")
        mtype, body = bytes(buf[:1]), bytes(buf[5:end])
        del buf[:end]
        return mtype, body

    def bodies(self, mtype: bytes) -> list[bytes]:
        """The bodies of the messages of type C{mtype}, in order."""
        return [body for t, body in self.messages if t == mtype]

    def startup(self) -> wire.StartupPacket:
        """The untyped first packet, parsed."""
        assert self.messages and self.messages[0][0] == b"", "no startup packet was written"
        parsed = wire.parse_startup_packet(self.messages[0][1])
        assert parsed is not None
        return parsed[0]


class Wire(StringTransport):
    """
    A L{StringTransport} that records each whole message written to it,
    and its closing, as events; it behaves like a TCP transport where the
    legs rely on it (unregistering no producer and pausing after
    C{loseConnection} are allowed).
    """

    def __init__(
        self, name: str, events: list[Event], *, untyped: bool = False, peer: Any = None
    ) -> None:
        super().__init__(peerAddress=peer, lenient=True)
        self.name = name
        self.events = events
        self.framer = Framer(name, events, untyped=untyped)

    @property
    def messages(self) -> list[tuple[bytes, bytes]]:
        return self.framer.messages

    def write(self, data: bytes) -> None:
        super().write(data)
        self.framer.feed(data)

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.events.append((self.name, "close"))
        self.disconnecting = True

    def abortConnection(self) -> None:
        if not self.disconnected:
            self.events.append((self.name, "abort"))
        self.disconnected = self.disconnecting = True

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


# ---------------------------------------------------------------------------
# The reactor, and the SCRAM derivations


def unit_reactor() -> MemoryReactorClock:
    """
    A fresh L{MemoryReactorClock} for one test. A test module makes it its
    C{reactor} fixture with
    C{reactor = pytest.fixture(unit_reactor, name="reactor")}.
    """
    return MemoryReactorClock()


class HeldDerivations(DerivationThreads):
    """
    Derivation threads (L{pgtls_twisted.proxy._derivation}) that start no
    thread: each SCRAM key derivation pgtls asks for is held until the
    test runs it (L{complete}), in the test's own thread, so that an
    exchange goes in one fixed order and a test can look at it while a
    derivation is pending.

    @ivar held: the derivations asked for and not run yet, oldest first:
        the function, its arguments, and the Deferred pgtls waits on.
    """

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor)
        self.held: list[tuple[Callable[..., Any], tuple[Any, ...], defer.Deferred[Any]]] = []

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        done: defer.Deferred[Any] = defer.Deferred()
        self.held.append((f, args, done))
        return done

    @property
    def working(self) -> bool:
        return bool(self.held)

    def complete(self) -> None:
        """Run the oldest held derivation: its Deferred fires with its result (or failure)."""
        assert self.held, "no key derivation is waiting"
        f, args, done = self.held.pop(0)
        defer.maybeDeferred(f, *args).chainDeferred(done)


# ---------------------------------------------------------------------------
# Metrics, sessions and pools


class RecordingMetrics:
    """A L{MetricsRecorder} that records its calls: C{(method, args...)}."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def accepted(self, route: str) -> None:
        self.calls.append(("accepted", route))

    def refused(self, route: str, reason: str) -> None:
        self.calls.append(("refused", route, reason))

    def handshakeDone(self, route: str, seconds: float, version: str, cipher: str) -> None:
        self.calls.append(("handshakeDone", route))

    def backendConnected(self, route: str, seconds: float) -> None:
        self.calls.append(("backendConnected", route))

    def backendFailed(self, route: str, message: str) -> None:
        self.calls.append(("backendFailed", route, message))

    def cancelRequest(self, route: str, outcome: str) -> None:
        self.calls.append(("cancelRequest", route, outcome))

    def pooledLogin(self, route: str, answer: str) -> None:
        self.calls.append(("pooledLogin", route, answer))

    def clientClosed(self, route: str, database: str | None, stats: ConnectionStats) -> None:
        self.calls.append(("clientClosed", route, database))

    def pooled(self, route: str, database: str) -> _Figures:
        self.calls.append(("pooled", route, database))
        return _Figures(self)

    def poolDropped(self, route: str, database: str) -> None:
        self.calls.append(("poolDropped", route, database))

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] == name]


class _Figures:
    def __init__(self, metrics: RecordingMetrics) -> None:
        self._metrics = metrics

    def waited(self, seconds: float) -> None:
        self._metrics.calls.append(("waited",))

    def queryDone(self, seconds: float) -> None:
        self._metrics.calls.append(("queryDone",))

    def transactionDone(self, seconds: float) -> None:
        self._metrics.calls.append(("transactionDone",))

    def pinned(self, kind: str) -> None:
        self._metrics.calls.append(("pinned", kind))

    def timedOut(self, timeout: str) -> None:
        self._metrics.calls.append(("timedOut", timeout))


class Starter:
    """
    A L{SessionStarter} that starts one kind of session (no admin console)
    and keeps them, for the test to look at.
    """

    def __init__(self, kind: Callable[[Any, Any, wire.StartupMessage], Any]) -> None:
        self.kind = kind
        self.sessions: list[Any] = []

    def console(self, startup: wire.StartupMessage) -> bool:
        return False

    def start(self, host: Any, client: Any, startup: wire.StartupMessage) -> None:
        session = self.kind(host, client, startup)
        self.sessions.append(session)
        session.start()


class FakePool:
    """
    A pool that hands out servers only when the test says (L{give}), and
    records what a session asks of it as C{("pool", what)} events:
    C{acquire}, C{cancelled} (the acquire Deferred), C{release} or
    C{release dirty}, C{lost}, C{cancelDone}.
    """

    def __init__(self, name: str, events: list[Event]) -> None:
        self.name = name
        self.events = events
        self.sessions = 0
        self.waiting: list[defer.Deferred[PooledServer]] = []
        self.released: list[PooledServer] = []

    def takeIdle(self) -> PooledServer | None:
        """Nothing is idle here: every server is handed out by L{give}."""
        return None

    def acquire(self) -> defer.Deferred[PooledServer]:
        self.events.append(("pool", "acquire"))
        d: defer.Deferred[PooledServer] = defer.Deferred(
            lambda _: self.events.append(("pool", "cancelled"))
        )
        self.waiting.append(d)
        return d

    def give(self, server: PooledServer) -> None:
        self.waiting.pop(0).callback(server)

    def refuse(self, error: Exception) -> None:
        self.waiting.pop(0).errback(error)

    def release(self, server: PooledServer) -> None:
        self.events.append(("pool", "release dirty" if server.dirty else "release"))
        self.released.append(server)

    def lost(self, server: PooledServer) -> None:
        self.events.append(("pool", "lost"))

    def cancelDone(self, server: PooledServer) -> None:
        self.events.append(("pool", "cancelDone"))

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass


class FakePools:
    """A pool manager whose pools are given (C{pool}) or L{FakePool}s."""

    def __init__(self, events: list[Event], pool: Any = None) -> None:
        self.events = events
        self.pool = pool
        self.pools: dict[str, Any] = {}

    def poolFor(self, database: str, user: str | None = None) -> Any:
        if database not in self.pools:
            self.pools[database] = self.pool or FakePool(f"svc/{database}", self.events)
        return self.pools[database]


# ---------------------------------------------------------------------------
# Routes, clients and backends


def unit_route(
    pki: PKI,
    tmp_path: Path,
    reactor: MemoryReactorClock,
    starter: Any,
    *,
    listener: dict[str, Any] | None = None,
    backend: dict[str, Any] | None = None,
    pool: dict[str, Any] | None = None,
    pools: Any = None,
    cancels: CancelRegistry | None = None,
    endpoints: EndpointFactory | None = None,
    derivations: DerivationThreads | None = None,
) -> Route:
    """
    A L{Route} from a real configuration on C{reactor}: a listener that
    takes plaintext clients too (C{tls = "allow"}), a plaintext backend at
    127.0.0.1:5432, and C{[proxy.pool]} when C{pool} is given (service user
    C{svc}), with C{pools} as its pool manager. Its metrics are a
    L{RecordingMetrics}.

    @param endpoints: where its backend connections come from
        (L{Backends.endpoint}); by default TCP on C{reactor} (that is,
        never connected).
    @param derivations: its SCRAM derivation threads (L{HeldDerivations});
        by default its own.
    """
    table: dict[str, Any] = {
        "name": "test",
        "listener": {
            "bind_address": "127.0.0.1:0",
            "server_cert": str(pki.cert("server")),
            "server_key": str(pki.key("server")),
            "tls": "allow",
            **(listener or {}),
        },
        "backend": {"address": "127.0.0.1:5432", "tls": "disable", **(backend or {})},
    }
    if pool is not None:
        table["pool"] = {"service_user": "svc", "service_password": "svc-pw", **pool}
    config = parse_config({"proxy": [table]}, base_dir=tmp_path).routes[0]
    return Route(
        config,
        reactor,
        cancels if cancels is not None else CancelRegistry(),
        RecordingMetrics(),
        starter=starter,
        pools=(lambda route: pools) if pools is not None else None,
        endpoints=endpoints,
        derivations=derivations,
    )


class Client:
    """One client connection to a route, on a L{Wire} named C{name}."""

    def __init__(self, route: Route, events: list[Event], name: str = "client") -> None:
        self.proto = cast(ClientProtocol, route.factory().buildProtocol(None))
        self.transport = Wire(name, events, peer=CLIENT_ADDRESS)
        self.proto.makeConnection(self.transport)

    @property
    def messages(self) -> list[tuple[bytes, bytes]]:
        return self.transport.messages

    def send(self, *data: bytes) -> None:
        self.proto.dataReceived(b"".join(data))

    def lose(self) -> None:
        self.proto.connectionLost(Failure(ConnectionDone()))

    def cancel_request(self) -> wire.CancelRequest:
        """A CancelRequest with the (minted) key the client was given."""
        pid, key = wire.parse_backend_key_data(self.transport.framer.bodies(b"K")[0])
        return wire.CancelRequest(pid, key)

    def error(self) -> dict[str, str]:
        """The fields of the last message written to the client, an ErrorResponse."""
        mtype, body = self.messages[-1]
        assert mtype == b"E", f"the last message is {mtype!r}, not an ErrorResponse"
        return wire.parse_error_fields(body)


class Backend:
    """One backend connection the test accepted: the real leg and its transport."""

    def __init__(self, leg: ServerProtocol, transport: Wire) -> None:
        self.leg = leg
        self.transport = transport

    @property
    def messages(self) -> list[tuple[bytes, bytes]]:
        return self.transport.messages

    def send(self, *data: bytes) -> None:
        self.leg.dataReceived(b"".join(data))

    def lose(self) -> None:
        self.leg.connectionLost(Failure(ConnectionDone()))


@implementer(IStreamClientEndpoint)
class Attempt:
    """
    One backend connection attempt: the endpoint a L{Backends} made for the
    connector, the factory the connector gave it, and (C{connected}) the
    Deferred the connector waits on, which the test fires.

    @ivar address: the C{(host, port)} the endpoint was made for.
    """

    def __init__(self, backends: Backends, host: str, port: int) -> None:
        self._backends = backends
        self.address = (host, port)
        self.factory: IProtocolFactory | None = None
        self.connected: defer.Deferred[Any] = defer.Deferred(self._cancel)

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[Any]:
        self.factory = factory
        self._backends.attempts.append(self)
        self._backends.waiting.append(self)
        return self.connected

    def _cancel(self, connected: defer.Deferred[Any]) -> None:
        # (The Deferred then fails with CancelledError, as an endpoint's does.)
        self._backends.waiting.remove(self)
        self._backends.events.append(("backends", "cancelled"))


class Backends:
    """
    The connections a L{BackendConnector} opened through L{endpoint} (its
    endpoint factory), in order; the test completes each with L{accept}
    (or L{Scene.accept_tls}) or fails it with L{refuse}.

    @ivar attempts: every connection attempt, in order.
    @ivar waiting: those not yet accepted, refused or given up.
    """

    def __init__(self, events: list[Event]) -> None:
        self.events = events
        self.attempts: list[Attempt] = []
        self.waiting: list[Attempt] = []

    def endpoint(self, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
        """The connector's endpoint factory (an C{EndpointFactory})."""
        return Attempt(self, host, port)

    @property
    def pending(self) -> int:
        return len(self.waiting)

    def take(self) -> Attempt:
        assert self.waiting, "nothing is connecting to the backend"
        return self.waiting.pop(0)

    def build(self) -> tuple[ServerProtocol, Attempt]:
        """The leg of the next connection attempt, not connected yet."""
        attempt = self.take()
        assert attempt.factory is not None
        leg = attempt.factory.buildProtocol(None)
        assert isinstance(leg, ServerProtocol)
        return leg, attempt

    def accept(self, name: str = "server", *, untyped: bool = True) -> Backend:
        """
        Complete the next connection attempt.

        @param untyped: the first thing pgtls will write is a startup
            packet (a login or a cancel), not a message.
        """
        leg, attempt = self.build()
        transport = Wire(name, self.events, untyped=untyped)
        leg.makeConnection(transport)
        attempt.connected.callback(leg)
        return Backend(leg, transport)

    def refuse(self) -> None:
        self.take().connected.errback(Failure(ConnectionRefusedError()))


class Scene:
    """
    One route on a L{MemoryReactorClock}, whose clients start sessions of
    C{kind} (L{Starter}), the backend connections it opens (L{Backends}),
    its SCRAM key derivations (L{HeldDerivations}), and the list every fake
    records into.
    """

    def __init__(
        self,
        pki: PKI,
        tmp_path: Path,
        reactor: MemoryReactorClock,
        kind: Any,
        *,
        events: list[Event] | None = None,
        **route: Any,
    ) -> None:
        """
        @param events: the list to record into (one the route's pool
            manager records into too), else a new one.
        @param route: as L{unit_route} takes them.
        """
        self.reactor = reactor
        self.events: list[Event] = events if events is not None else []
        self.starter = Starter(kind)
        self.backends = Backends(self.events)
        self.derivations = HeldDerivations(reactor)
        self.route = unit_route(
            pki,
            tmp_path,
            reactor,
            self.starter,
            endpoints=self.backends.endpoint,
            derivations=self.derivations,
            **route,
        )
        self.metrics = cast(RecordingMetrics, self.route.metrics)
        self.pki = pki
        #: The iosim connections (TLS ones), each with what to do after it moved bytes.
        self.pumps: list[tuple[IOPump, Callable[[], None]]] = []

    def flush(self) -> None:
        """Move bytes on every iosim connection until all are quiet."""
        moved = True
        while moved:
            moved = False
            for pump, after in self.pumps:
                if pump.flush():
                    moved = True
                after()

    def accept_tls(self, cert: str = "server", name: str = "server") -> TLSBackend:
        """
        Complete the next backend connection attempt with a peer that runs
        TLS with the PKI's certificate C{cert}, over iosim.
        """
        leg, attempt = self.backends.build()
        peer = TLSBackendPeer(self.pki, cert, self.reactor, name, self.events)
        pump = connect(
            peer,
            FakeTransport(peer, isServer=True),
            leg,
            FakeTransport(leg, isServer=False),
            greet=False,
            clock=self.reactor,
        )
        attempt.connected.callback(leg)
        self.pumps.append((pump, lambda: None))
        self.flush()
        return TLSBackend(leg, peer, self.flush)

    def tls_client(self, user: str = "alice", name: str = "client", **parameters: str) -> TLSClient:
        """A client over real TLS that has sent its StartupMessage."""
        return TLSClient(self, startup_message(user, **parameters), name)

    def connect(self, name: str = "client") -> Client:
        """A plaintext client connection that has sent nothing yet."""
        return Client(self.route, self.events, name)

    def start(self, user: str = "alice", name: str = "client", **parameters: str) -> Client:
        """A plaintext client that has sent its StartupMessage (its session has started)."""
        client = self.connect(name)
        client.send(startup_message(user, **parameters))
        return client

    @property
    def session(self) -> Any:
        """The last session started."""
        return self.starter.sessions[-1]


def pooled_server(
    route: Route,
    backends: Backends,
    name: str = "pooled",
    *,
    parameters: dict[str, str] | None = None,
    key: tuple[int, bytes] = (4242, b"real"),
) -> tuple[PooledServer, Backend]:
    """
    A server connection as a pool holds it once logged in: a real backend
    leg (through the route's connector) wrapped in a L{PooledServer}.
    """
    ready: list[ServerProtocol] = []
    route.backend.connect().addCallback(ready.append)
    backend = backends.accept(name, untyped=False)
    assert ready == [backend.leg]
    server = PooledServer(
        backend.leg,
        created=route.clock.seconds(),
        parameters=dict(parameters or {}),
        backendKey=key,
    )
    return server, backend


def result(d: defer.Deferred[Any]) -> Any:
    """What C{d} has fired with (a L{Failure} if it failed); it must have."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


# ---------------------------------------------------------------------------
# PostgreSQL's messages


def login_ok(pid: int = 4242, key: bytes = b"real", **parameters: str) -> bytes:
    """What a server sends after a successful login: AuthenticationOk to ReadyForQuery."""
    status = b"".join(wire.parameter_status(k, v) for k, v in parameters.items())
    return (
        wire.AUTHENTICATION_OK + status + wire.backend_key_data(pid, key) + wire.ready_for_query()
    )


def md5_request(salt: bytes = b"salt") -> bytes:
    return wire.authentication(wire.AUTH_MD5_PASSWORD, salt)


def password(text: str) -> bytes:
    """A PasswordMessage."""
    return wire.message(b"p", text.encode() + b"\0")


def query(sql: str) -> bytes:
    return wire.message(b"Q", sql.encode() + b"\0")


def answer(tag: str = "SELECT 1", status: bytes = b"I") -> bytes:
    """A simple query's result: a row, CommandComplete, ReadyForQuery."""
    return (
        wire.row_description([("x", wire.TEXT_OID)])
        + wire.data_row(["1"])
        + wire.command_complete(tag)
        + wire.ready_for_query(status)
    )


def sasl_continue(data: bytes) -> bytes:
    return wire.authentication(wire.AUTH_SASL_CONTINUE, data)


def sasl_final(data: bytes) -> bytes:
    return wire.authentication(wire.AUTH_SASL_FINAL, data)


# ---------------------------------------------------------------------------
# A backend that speaks TLS, over iosim


@implementer(IOpenSSLServerConnectionCreator)
class _ServerCreator:
    def __init__(self, ctx: SSL.Context) -> None:
        self.ctx = ctx

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self.ctx, None)


class _Decrypted(Protocol):
    def __init__(self, framer: Framer) -> None:
        self.framer = framer

    def dataReceived(self, data: bytes) -> None:
        self.framer.feed(data)


class TLSBackendPeer(Protocol):
    """
    The far end of a backend connection that answers the SSLRequest with
    C{S} and runs TLS with one of the PKI's certificates; what pgtls sends
    inside is recorded by a L{Framer} named C{name}.
    """

    def __init__(self, pki: PKI, cert: str, reactor: Any, name: str, events: list[Event]):
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.use_certificate_chain_file(str(pki.cert(cert)))
        ctx.use_privatekey_file(str(pki.key(cert)))
        self.layer = TLSLayer(_ServerCreator(ctx), False, reactor)
        self.framer = Framer(name, events, untyped=True)
        self.tls: Any = None

    @property
    def messages(self) -> list[tuple[bytes, bytes]]:
        return self.framer.messages

    def dataReceived(self, data: bytes) -> None:
        assert data == wire.SSL_REQUEST, f"expected an SSLRequest, got {data!r}"
        self.transport.write(b"S")  # type: ignore[union-attr]
        self.tls = self.layer.attach(self, _Decrypted(self.framer))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.tls is not None:
            self.tls.connectionLost(reason)


class TLSBackend:
    """A backend connection over real TLS: the leg, and the peer pgtls talks to."""

    def __init__(self, leg: ServerProtocol, peer: TLSBackendPeer, flush: Callable[[], None]):
        self.leg = leg
        self.peer = peer
        self._flush = flush

    @property
    def messages(self) -> list[tuple[bytes, bytes]]:
        return self.peer.messages

    def send(self, *data: bytes) -> None:
        self.peer.tls.write(b"".join(data))
        self._flush()


class TLSClient:
    """
    A libpq-like client over real TLS (L{support.fakes.FakePGClient} over
    iosim) that sends C{startup} once its handshake is done; what pgtls
    sends it inside TLS is recorded by a L{Framer} named C{name}.
    """

    def __init__(self, scene: Scene, startup: bytes, name: str = "client") -> None:
        self.fake = FakePGClient(scene.pki.cert("ca"), scene.reactor, onHandshake=startup)
        self.framer = Framer(name, scene.events)
        self._seen = 0
        self._flush = scene.flush
        self.proto, _, pump = pump_client(scene.route, self.fake)
        scene.pumps.append((pump, self._read))
        scene.flush()

    @property
    def messages(self) -> list[tuple[bytes, bytes]]:
        return self.framer.messages

    def _read(self) -> None:
        new = self.fake.decrypted[self._seen :]
        self._seen += len(new)
        self.framer.feed(new)

    def send(self, *data: bytes) -> None:
        self.fake.sendTLS(b"".join(data))
        self._flush()


__all__ = [
    "Attempt",
    "Backend",
    "Backends",
    "Client",
    "Event",
    "FakePool",
    "FakePools",
    "Framer",
    "HeldDerivations",
    "RecordingMetrics",
    "Scene",
    "ScramServerSide",
    "Starter",
    "TLSBackend",
    "TLSClient",
    "Wire",
    "answer",
    "certificate_binding",
    "label",
    "login_ok",
    "md5_request",
    "password",
    "pooled_server",
    "query",
    "result",
    "sasl_continue",
    "sasl_final",
    "startup_message",
    "unit_reactor",
    "unit_route",
]
