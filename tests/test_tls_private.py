"""
The private names of Twisted and pyOpenSSL that pgtls relies on
(L{pgtls_twisted.tls._private}): a canary per name, which fails naming the
attribute when an upgrade removes it, and the public fallback that
pgtls then selects, run for real: in memory, and end to end through a
pass-through route to the suite's PostgreSQL with TLS on both legs.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import OpenSSL
import psycopg
import pytest
import pytest_twisted
from OpenSSL import SSL
from support.fakes import FakePGClient, make_route, pump_client, sessions, startup_message
from support.proxy import route, running
from twisted.copyright import version as twistedVersion
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.test.iosim import FakeTransport, connect
from zope.interface import implementer

from pgtls_twisted.testing.cluster import SCRAM_PASSWORD, SCRAM_USER
from pgtls_twisted.testing.pki import PKI
from pgtls_twisted.tls import _contexts, _private
from pgtls_twisted.tls._lean import (
    PUBLIC_PROTOCOL,
    Corker,
    LeanTLSProtocol,
    TLSLayer,
    chooseProtocol,
)
from pgtls_twisted.tls._private import (
    FALLBACKS,
    GROUPS,
    LEAN_OVERRIDES,
    LEAN_TLS,
    RELIED_ON,
    SAMPLES,
    Reliance,
    Verdict,
    directSender,
    missing,
)

VERSIONS = f"Twisted {twistedVersion}, pyOpenSSL {OpenSSL.__version__}"

#: Every private name gone: both features fall back.
NOTHING_PRIVATE = Verdict(missing=RELIED_ON)

# -- Canaries ------------------------------------------------------------------


@pytest.mark.parametrize("reliance", RELIED_ON, ids=str)
def test_relied_on_name_is_there(reliance: Reliance) -> None:
    """
    Each name of L{RELIED_ON} exists on a real object of the installed
    Twisted or pyOpenSSL, in the state pgtls uses it in.
    """
    owner = SAMPLES[reliance.owner]()
    assert hasattr(owner, reliance.name), (
        f"{reliance} is gone from the installed libraries ({VERSIONS}): pgtls now uses "
        f"{FALLBACKS[reliance.feature]} for the {reliance.feature}. "
        "See pgtls_twisted/tls/_private.py."
    )


def test_installed_libraries_need_no_fallback() -> None:
    """The verdict on the installed libraries: every private feature usable."""
    verdict = _private.verdict()
    assert verdict.missing == (), ", ".join(map(str, verdict.missing))
    assert verdict.leanTLS and verdict.groups


def test_lean_protocol_overrides_exactly_what_is_listed() -> None:
    """
    The base class names C{LeanTLSProtocol} redefines are the ones listed
    (so the canaries cover every override), and the names it adds do not
    shadow anything of the base class, on the class or on a connected
    instance.
    """
    base = set(dir(TLSMemoryBIOProtocol))
    own = {name for name in vars(LeanTLSProtocol) if not name.startswith("__")}
    assert own & base == set(LEAN_OVERRIDES)

    def connected(protocol: TLSMemoryBIOProtocol) -> set[str]:
        protocol.makeConnection(StringTransport())
        return set(vars(protocol))

    factory = TLSMemoryBIOFactory(_private._ProbeCreator(), False, Factory(), clock=Clock())
    lean = LeanTLSProtocol(factory, Protocol(), clock=Clock(), corker=Corker())
    added = connected(lean) - connected(TLSMemoryBIOProtocol(factory, Protocol()))
    assert added and not added & base, added & base


@implementer(IOpenSSLClientConnectionCreator)
class _ClientCreator:
    def __init__(self) -> None:
        self.context = SSL.Context(SSL.TLS_CLIENT_METHOD)

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.context, None)


def test_base_class_sends_through_flushSendBIO() -> None:
    """
    Overriding C{_flushSendBIO} catches the base class's sends: a client's
    ClientHello leaves through it, not past it.
    """
    flushed: list[bytes] = []

    class Recording(TLSMemoryBIOProtocol):
        def _flushSendBIO(self) -> None:
            out = self._tlsConnection.bio_read(65536)
            flushed.append(out)
            self.transport.write(out)

    transport = StringTransport()
    factory = TLSMemoryBIOFactory(_ClientCreator(), True, Factory(), clock=Clock())
    Recording(factory, Protocol()).makeConnection(transport)
    assert flushed and flushed[0][:1] == b"\x16"  # a TLS handshake record
    assert transport.value() == b"".join(flushed)


class _Noting(Protocol):
    """Notes what L{directSender} makes of its transport, then closes."""

    def __init__(self, noted: list[object]) -> None:
        self.noted = noted

    def connectionMade(self) -> None:
        self.noted.append(directSender(self.transport))
        self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_reactor_tcp_transports_take_the_direct_path() -> None:
    """
    The reactor's TCP transports, both ends, are the ones L{directSender}
    writes to directly; otherwise the lean protocol would quietly queue
    every byte in the transport.
    """
    from twisted.internet import reactor

    accepted: list[object] = []
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(lambda: _Noting(accepted))
    )
    try:
        connected: list[object] = []
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        await endpoint.connect(Factory.forProtocol(lambda: _Noting(connected)))
        while not accepted:
            await deferLater(reactor, 0.01)
    finally:
        await port.stopListening()
    assert connected[0] is not None and accepted[0] is not None
    assert directSender(StringTransport()) is None


# -- The corker -----------------------------------------------------------------


@implementer(IOpenSSLServerConnectionCreator)
class _ServerCreator:
    def __init__(self, pki: PKI) -> None:
        self.context = SSL.Context(SSL.TLS_SERVER_METHOD)
        self.context.use_certificate_chain_file(str(pki.cert("server")))
        self.context.use_privatekey_file(str(pki.key("server")))

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.context, None)


class _Leg(Protocol):
    """A raw connection that puts TLS under C{inner} as soon as it is made."""

    def __init__(self, layer: TLSLayer, inner: Protocol) -> None:
        self.layer = layer
        self.inner = inner

    def connectionMade(self) -> None:
        self.tls = self.layer.attach(self, self.inner)

    def connectionLost(self, reason: Any = None) -> None:
        self.tls.connectionLost(reason)


class _Inner(Protocol):
    """Keeps what it receives, and writes it on to C{relay} if set."""

    def __init__(self) -> None:
        self.received = b""
        self.relay: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.relay is not None:
            self.relay.write(data)


def _tlsPair(pki: PKI, clock: Clock, corker: Corker) -> tuple[_Inner, _Inner, Any, Any]:
    """A lean TLS client and server over iosim, handshake done."""
    client, server = _Inner(), _Inner()
    make = functools.partial(LeanTLSProtocol, clock=clock, corker=corker)
    clientLeg = _Leg(TLSLayer(_ClientCreator(), True, clock, make), client)
    serverLeg = _Leg(TLSLayer(_ServerCreator(pki), False, clock, make), server)
    clientIO = FakeTransport(clientLeg, isServer=False)
    pump = connect(
        serverLeg, FakeTransport(serverLeg, isServer=True), clientLeg, clientIO, clock=clock
    )
    pump.flush()
    return client, server, pump, clientIO


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "separate"])
def test_writes_caused_by_a_chunk_leave_with_it(pki: PKI, shared: bool) -> None:
    """
    A chunk received on one connection that causes a write on another (the
    pump's case) sends that write as soon as the chunk has been handled,
    when both share a L{Corker}; with separate ones the write waits for a
    scheduled call, as Twisted's own TLS protocol always makes it wait.
    """
    clock = Clock()
    corker = Corker()
    client1, server1, pump1, _ = _tlsPair(pki, clock, corker)
    client2, server2, pump2, client2IO = _tlsPair(pki, clock, corker if shared else Corker())
    server1.relay = client2.transport
    client1.transport.write(b"SELECT 1")
    clock.advance(0)  # a write made outside any chunk leaves on the next turn
    pump1.flush(advanceClock=False)
    assert server1.received == b"SELECT 1"
    assert bool(client2IO.stream) is shared
    assert bool(clock.getDelayedCalls()) is not shared
    pump2.flush()
    assert server2.received == b"SELECT 1"


# -- The verdict and the choice ------------------------------------------------


def test_missing_names_each_missing_name() -> None:
    """L{missing} reports names an owner lacks, and every name of an owner it cannot make."""
    relied = (
        Reliance(LEAN_TLS, "box", "here"),
        Reliance(LEAN_TLS, "box", "_gone"),
        Reliance(GROUPS, "unmade", "anything"),
    )
    box = type("Box", (), {"here": 1})()
    assert missing(relied, {"box": box}) == relied[1:]


def test_verdict_per_feature_and_one_warning() -> None:
    gone = Reliance(LEAN_TLS, "twisted.protocols.tls.TLSMemoryBIOProtocol", "_tlsConnection")
    verdict = Verdict(missing=(gone,))
    assert not verdict.leanTLS and verdict.groups
    events: list[dict[str, Any]] = []
    verdict.warn(Logger(observer=events.append))
    Verdict().warn(Logger(observer=events.append))
    [event] = events

    assert event["log_level"] == LogLevel.warn
    assert formatEvent(event) == (
        "the installed Twisted or pyOpenSSL lacks "
        "twisted.protocols.tls.TLSMemoryBIOProtocol._tlsConnection; using Twisted's "
        "public TLS protocol (for the lean TLS protocol) instead"
    )


def test_choice_follows_the_verdict() -> None:
    clock = Clock()
    corker = Corker()
    lean = chooseProtocol(clock, corker, verdict=Verdict())
    assert lean.func is LeanTLSProtocol  # type: ignore[attr-defined]
    assert lean.keywords == {"clock": clock, "corker": corker}  # type: ignore[attr-defined]
    # Without one, a layer gets a corker of its own, never a process-wide one.
    mine = chooseProtocol(clock, verdict=Verdict()).keywords["corker"]  # type: ignore[attr-defined]
    assert isinstance(mine, Corker) and mine is not corker
    assert chooseProtocol(clock, verdict=NOTHING_PRIVATE) is PUBLIC_PROTOCOL
    onlyGroups = Verdict(missing=tuple(r for r in RELIED_ON if r.feature == GROUPS))
    assert chooseProtocol(clock, verdict=onlyGroups).func is LeanTLSProtocol  # type: ignore[attr-defined]
    assert PUBLIC_PROTOCOL is TLSMemoryBIOFactory.protocol


def test_layer_takes_the_protocol_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """TLSLayer's default is the verdict's choice; a given protocol wins over it."""
    creator = _private._ProbeCreator()
    assert TLSLayer(creator, False, Clock()).protocol.func is LeanTLSProtocol  # type: ignore[attr-defined]
    assert TLSLayer(creator, False, Clock(), TLSMemoryBIOProtocol).protocol is TLSMemoryBIOProtocol
    monkeypatch.setattr(_private, "verdict", lambda: NOTHING_PRIVATE)
    assert TLSLayer(creator, False, Clock()).protocol is PUBLIC_PROTOCOL


def _group(serverContext: SSL.Context) -> str | None:
    """The key exchange group a default client negotiates with C{serverContext}, in memory."""
    server = SSL.Connection(serverContext, None)
    server.set_accept_state()
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_connect_state()
    for _ in range(10):
        for one, other in ((client, server), (server, client)):
            try:
                one.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                other.bio_write(one.bio_read(65536))
            except SSL.WantReadError:
                pass
    return server.get_group_name()


@pytest.mark.parametrize(
    "verdict, group",
    [(Verdict(), "x25519"), (NOTHING_PRIVATE, "secp256r1")],
    ids=["private", "fallback"],
)
def test_groups_and_their_fallback(
    pki: PKI, monkeypatch: pytest.MonkeyPatch, verdict: Verdict, group: str
) -> None:
    """X25519 first through the private binding; P-256 alone without it."""
    monkeypatch.setattr(_private, "verdict", lambda: verdict)
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_chain_file(str(pki.cert("server")))
    ctx.use_privatekey_file(str(pki.key("server")))
    _contexts._set_groups(ctx)
    assert _group(ctx) == group


# -- The fallback, for real ----------------------------------------------------


def test_fallback_tls_session_in_memory(
    pki: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A route's client leg through Twisted's own TLS protocol, over iosim."""
    monkeypatch.setattr(_private, "verdict", lambda: NOTHING_PRIVATE)
    route_ = make_route(pki, tmp_path)
    raw = startup_message("alice", database="shop")
    client = FakePGClient(pki.cert("ca"), route_.clock, alpn=[b"postgresql"], onHandshake=raw)
    server, serverIO, _ = pump_client(route_, client)
    assert type(server.tls) is PUBLIC_PROTOCOL
    assert client.plaintext == b"S"
    [(proto, startup)] = sessions(route_)
    assert proto is server and startup.encode() == raw
    assert server.tls.negotiatedProtocol == b"postgresql"
    assert server.tls.getHandle().get_group_name() == "secp256r1"
    assert not serverIO.disconnecting and client.lostReason is None


#: 10 rows of 1 MiB: more than the sockets buffer, so flow control engages.
BIG = "SELECT repeat('x', 1048576) FROM generate_series(1, 10)"


def _read_slowly(conn: psycopg.Connection[Any]) -> list[int]:
    """The sizes of C{BIG}'s rows, pausing after the first so that the proxy must hold back."""
    sizes = []
    for row in conn.cursor().stream(BIG):
        if not sizes:
            time.sleep(1)
        sizes.append(len(row[0]))
    return sizes


@pytest_twisted.ensureDeferred
async def test_fallback_carries_a_real_pass_through_session(
    pki: PKI, pg_tls: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    As if every private name were gone: both legs use Twisted's own TLS
    protocol and the listener offers P-256 only, and a real client logs
    in with SCRAM, runs a query, and reads 10 MiB slowly, through flow
    control (the server leg is paused while the client lags).
    """
    monkeypatch.setattr(_private, "verdict", lambda: NOTHING_PRIVATE)
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        dsn = proxy.dsn(
            user=SCRAM_USER,
            password=SCRAM_PASSWORD,
            sslmode="verify-full",
            sslrootcert=pki.cert("ca"),
        )
        conn = await deferToThread(psycopg.connect, dsn, connect_timeout=10)
        try:
            [client] = proxy.route().clients
            server = client.session.server
            assert type(client.tls) is PUBLIC_PROTOCOL
            assert type(server.tls) is PUBLIC_PROTOCOL
            assert client.tls.getHandle().get_group_name() == "secp256r1"
            pauses: list[None] = []
            pause = server.transport.pauseProducing
            monkeypatch.setattr(
                server.transport, "pauseProducing", lambda: (pauses.append(None), pause())
            )
            rows = await deferToThread(
                lambda: conn.execute(
                    "SELECT ssl, current_user FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                ).fetchall()
            )
            assert rows == [(True, SCRAM_USER)]
            assert await deferToThread(_read_slowly, conn) == [1048576] * 10
            assert pauses, "the server leg was never paused"
            assert await deferToThread(lambda: conn.execute("SELECT 1").fetchall()) == [(1,)]
        finally:
            await deferToThread(conn.close)
