"""
Issue 10, item 7: the cost of SCRAM towards the backend. PBKDF2 runs in a
thread within C{backend.max_scram_iterations}, so a hostile server cannot
stall the reactor; nothing else moves while the keys are derived; and a
client or server that leaves meanwhile is handled. For client logins and
for L{ServerLogin} (the pool's service login and the admin console's).

The server is a scripted TLS server speaking SCRAM
(L{FakeScramBackend}): no real server asks for ten million iterations.
"""

from __future__ import annotations

import struct
import time
from typing import Any

import pytest
import pytest_twisted
from support import rawclient
from support.proxy import route, running
from support.scram import (
    SERVICE_LOGIN_THREADS,
    ScramServerSide,
    ServerContext,
    fatal_of,
    initial_response,
    service_login,
)
from support.waiting import in_thread, until
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall

from pgtls_twisted.pool._serverlogin import ServerLoginError
from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.proxy._derivation import DerivationThreads
from pgtls_twisted.proxy._session import MAX_HELD_DURING_LOGIN
from pgtls_twisted.testing.pki import PKI

# ---------------------------------------------------------------------------
# A scripted TLS server that speaks SCRAM, for what no real server does


class FakeScramBackend(Factory):
    """
    A TLS PostgreSQL server (the PKI's C{server} certificate) that offers
    SCRAM-SHA-256 only and answers as told. Quacks like a cluster for
    L{support.proxy.route} (verify-full against the test CA).

    @ivar eager: send server-first, server-final, AuthenticationOk,
        BackendKeyData and ReadyForQuery in one write, without waiting for
        client-final (the proof is checked when it comes).
    @ivar closeAfterFirst: hang up right after server-first.
    @ivar refuseFinal: answer client-final with FATAL 28P01.
    """

    host = "127.0.0.1"
    ssl = True
    noisy = False

    def __init__(self, pki: PKI, iterations: int, password: str = "secret") -> None:
        self.tlsOptions = ServerContext(pki, "server")
        self.iterations = iterations
        self.password = password
        # Derived now, not on the reactor while a test watches it; a count
        # pgtls must refuse is never derived.
        self.salted = None
        if iterations <= 5_000_000:
            self.salted = ScramServerSide(password, iterations).salted_password()
        self.eager = False
        self.closeAfterFirst = False
        self.refuseFinal = False
        self.connections: list[_FakeScramConnection] = []
        self.port_: Any = reactor.listenTCP(0, self, interface="127.0.0.1")

    @property
    def port(self) -> int:
        return int(self.port_.getHost().port)

    def buildProtocol(self, addr: Any) -> _FakeScramConnection:
        conn = _FakeScramConnection(self)
        self.connections.append(conn)
        return conn

    async def stop(self) -> None:
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.abortConnection()
        await defer.maybeDeferred(self.port_.stopListening)


class _FakeScramConnection(Protocol):
    def __init__(self, factory: FakeScramBackend) -> None:
        self.factory = factory
        self.scram = ScramServerSide(factory.password, factory.iterations, salted=factory.salted)
        self.buffer = b""
        self.reader: wire.MessageReader | None = None
        #: Every typed message received after the startup packet, in order.
        self.received: list[bytes] = []
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.reader is not None:
            self.reader.feed(data)
            self._messages()
            return
        self.buffer += data
        if len(self.buffer) < 4:
            return
        (length,) = struct.unpack_from("!I", self.buffer)
        if len(self.buffer) < length:
            return
        packet, self.buffer = self.buffer[:length], self.buffer[length:]
        if packet == wire.SSL_REQUEST:
            self.transport.write(b"S")
            self.transport.startTLS(self.factory.tlsOptions)
            return
        self.reader = wire.MessageReader()
        self.transport.write(wire.authentication_sasl(["SCRAM-SHA-256"]))
        self.dataReceived(self.buffer)

    def _messages(self) -> None:
        assert self.reader is not None
        while (msg := self.reader.next()) is not None:
            mtype, body = msg
            self.received.append(mtype)
            if mtype == b"p" and len(self.received) == 1:
                self._first(initial_response(wire.message(mtype, body))[1])
            elif mtype == b"p" and len(self.received) == 2:
                self._final(body)

    def _first(self, clientFirst: bytes) -> None:
        out = [wire.authentication(wire.AUTH_SASL_CONTINUE, self.scram.server_first(clientFirst))]
        if self.factory.eager:
            # client-final without its proof is predictable: c=eSws (the y
            # flag, no -PLUS offered over TLS) and the combined nonce.
            nonce = self.scram._serverFirst.split(",")[0][2:]
            final = self.scram.sign(f"c=eSws,r={nonce}")
            out += [wire.authentication(wire.AUTH_SASL_FINAL, final), *_LOGGED_IN]
        self.transport.write(b"".join(out))
        if self.factory.closeAfterFirst:
            self.transport.loseConnection()

    def _final(self, clientFinal: bytes) -> None:
        if self.factory.refuseFinal:
            self.transport.write(
                wire.error_response("28P01", "fake: password authentication failed")
            )
            self.transport.loseConnection()
            return
        signature = self.scram.server_final(clientFinal)
        if not self.factory.eager:
            self.transport.write(
                wire.authentication(wire.AUTH_SASL_FINAL, signature) + b"".join(_LOGGED_IN)
            )

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


_LOGGED_IN = (
    wire.AUTHENTICATION_OK,
    wire.backend_key_data(1234, b"\0\0\0\1"),
    wire.ready_for_query(),
)


class ReactorWatch:
    """The longest the reactor went without running a 10 ms timer."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._last = time.monotonic()
        self._loop = LoopingCall(self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        self.worst = max(self.worst, now - self._last)
        self._last = now

    def __enter__(self) -> ReactorWatch:
        self._last = time.monotonic()
        self._loop.start(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._tick()
        self._loop.stop()


def raw_login(port: int, pki: PKI, password: str, *, pipelined: bytes = b"") -> dict[str, Any]:
    """
    Log in over TLS as "alice" with a raw client; pgtls asks for the
    password (it runs SCRAM itself). C{pipelined} is sent right behind the
    password. Returns the FATAL fields, or the login's result.
    """
    sock = rawclient.connect(port)
    with rawclient.request_tls(sock, pki.cert("ca")) as tls:
        tls.sendall(rawclient.startup_message("alice", "db"))
        mtype, body = rawclient.read_message(tls)
        assert (mtype, wire.auth_code(body)) == (b"R", wire.AUTH_CLEARTEXT_PASSWORD), body
        tls.sendall(rawclient.password_message(password) + pipelined)
        while True:
            mtype, body = rawclient.read_message(tls)
            if mtype == b"E":
                return wire.parse_error_fields(body)
            if mtype == b"Z":
                return {"ready": True}


async def until_threads_idle(threads: DerivationThreads) -> None:
    """Until no SCRAM derivation is running."""
    await until(lambda: not threads.working, timeout=30)


# ---------------------------------------------------------------------------
# 7. Key derivation off the reactor thread


@pytest_twisted.ensureDeferred
async def test_huge_iteration_count_refused_without_stalling(pki, tmp_path):
    """
    A hostile server asks for 10 million iterations (scramp's own cap; old
    code computed them on the reactor thread, stalling every route for
    seconds). Refused at once with 28000; the reactor never stops.
    """
    fake = FakeScramBackend(pki, 10_000_000)
    try:
        async with running(tmp_path, [route(pki, fake)]) as proxy:
            with ReactorWatch() as watch:
                fields = await in_thread(raw_login, proxy.port(), pki, "secret")
            assert fatal_of(fields) == (
                "28000",
                'pgtls route "app": backend asked for 10000000 SCRAM iterations, more than'
                " backend.max_scram_iterations = 100000",
            )
            assert watch.worst < 0.5
            (conn,) = fake.connections
            await conn.closed
            assert conn.received == [b"p"]  # client-first only: nothing derived
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_allowed_derivation_runs_off_the_reactor(pki, tmp_path):
    """
    Within a raised limit, 3 million iterations take the better part of a
    second of PBKDF2: in a thread, while the reactor keeps ticking; the
    login then completes (the fake checks the proof).
    """
    fake = FakeScramBackend(pki, 3_000_000)
    table = route(pki, fake, backend={"max_scram_iterations": 10_000_000})
    try:
        async with running(tmp_path, [table]) as proxy:
            started = time.monotonic()
            with ReactorWatch() as watch:
                assert await in_thread(raw_login, proxy.port(), pki, "secret") == {"ready": True}
            took = time.monotonic() - started
            assert watch.worst < min(0.5, took / 2), (watch.worst, took)
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_messages_wait_for_client_final(pki, tmp_path):
    """
    While the keys are derived nothing else moves: the client's Query
    pipelined behind its password reaches the server after client-final,
    and the server's eager SASLFinal/AuthenticationOk/ReadyForQuery (sent
    before client-final) are read only after it.
    """
    fake = FakeScramBackend(pki, 500_000)
    fake.eager = True
    table = route(pki, fake, backend={"max_scram_iterations": 500_000})
    try:
        async with running(tmp_path, [table]) as proxy:
            query = rawclient.query_message("SELECT 1")
            got = await in_thread(raw_login, proxy.port(), pki, "secret", pipelined=query)
            assert got == {"ready": True}
            (conn,) = fake.connections
            await until(lambda: len(conn.received) >= 3, timeout=10)
            assert conn.received[:3] == [b"p", b"p", b"Q"]
            assert conn.scram.clientFinal.startswith(b"c=eSws,")
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_client_leaving_during_derivation(pki, tmp_path):
    """The session ends at once; the late result is dropped without a word."""
    fake = FakeScramBackend(pki, 3_000_000)
    table = route(pki, fake, backend={"max_scram_iterations": 10_000_000})

    def log_in(port: int) -> Any:
        tls = rawclient.request_tls(rawclient.connect(port), pki.cert("ca"))
        tls.sendall(rawclient.startup_message("alice", "db"))
        rawclient.read_message(tls)
        tls.sendall(rawclient.password_message("secret"))
        return tls

    try:
        async with running(tmp_path, [table]) as proxy:
            tls = await in_thread(log_in, proxy.port())
            (client,) = proxy.route().clients
            await until(lambda: client.session._deriving, timeout=10)
            tls.close()
            (conn,) = fake.connections
            await conn.closed.addTimeout(2, reactor)  # long before the derivation ends
            assert client.session._deriving
            await until_threads_idle(proxy.route().backend.derivations)
            assert conn.received == [b"p"]
            assert not proxy.route().clients
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_server_leaving_during_derivation(pki, tmp_path):
    fake = FakeScramBackend(pki, 3_000_000)
    fake.closeAfterFirst = True
    table = route(pki, fake, backend={"max_scram_iterations": 10_000_000})
    try:
        async with running(tmp_path, [table]) as proxy:
            fields = await in_thread(raw_login, proxy.port(), pki, "secret")
            assert fatal_of(fields) == (
                "08006",
                'pgtls route "app": backend closed the connection unexpectedly',
            )
            await until_threads_idle(proxy.route().backend.derivations)
            assert not proxy.route().clients
    finally:
        await fake.stop()


# ---------------------------------------------------------------------------
# ServerLogin directly (the pool's service login, and the admin console's)


@pytest_twisted.ensureDeferred
async def test_service_login_derives_off_the_reactor(pki, tmp_path):
    fake = FakeScramBackend(pki, 3_000_000)
    table = route(pki, fake, backend={"max_scram_iterations": 10_000_000})
    try:
        started = time.monotonic()
        with ReactorWatch() as watch:
            result = await service_login(tmp_path, table, "svc", "secret")
        took = time.monotonic() - started
        assert result.backendKey == (1234, b"\0\0\0\1")
        assert watch.worst < min(0.5, took / 2), (watch.worst, took)
        assert fake.connections[0].scram.clientFinal.startswith(b"c=eSws,")
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_service_login_huge_iterations_refused(pki, tmp_path):
    fake = FakeScramBackend(pki, 10_000_000)
    try:
        with ReactorWatch() as watch:
            with pytest.raises(ServerLoginError) as info:
                await service_login(tmp_path, route(pki, fake), "svc", "secret")
        assert (info.value.sqlstate, info.value.message) == (
            "28000",
            "backend login failed: backend asked for 10000000 SCRAM iterations, more than"
            " backend.max_scram_iterations = 100000",
        )
        assert watch.worst < 0.5
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_service_login_server_leaving_during_derivation(pki, tmp_path):
    fake = FakeScramBackend(pki, 3_000_000)
    fake.closeAfterFirst = True
    table = route(pki, fake, backend={"max_scram_iterations": 10_000_000})
    try:
        with pytest.raises(ServerLoginError) as info:
            await service_login(tmp_path, table, "svc", "secret")
        assert (info.value.sqlstate, info.value.message) == (
            "08006",
            "backend closed the connection during login",
        )
        await until_threads_idle(SERVICE_LOGIN_THREADS)
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_client_pipelining_too_much_during_scram(pki, tmp_path):
    """
    What a client pipelines behind its password waits until the session
    starts (the server expects only pgtls's SASL messages meanwhile), but
    not without bound.
    """
    fake = FakeScramBackend(pki, 3_000_000)
    table = route(pki, fake, backend={"max_scram_iterations": 10_000_000})
    # Just over the limit, so that pgtls has read it all when it refuses
    # (a close with unread data would be a reset, and the error lost).
    junk = rawclient.query_message("SELECT 1") * (MAX_HELD_DURING_LOGIN // 14 + 1)
    try:
        async with running(tmp_path, [table]) as proxy:
            fields = await in_thread(raw_login, proxy.port(), pki, "secret", pipelined=junk)
            assert fatal_of(fields) == (
                "08P01",
                "pgtls: too much data from the client before authentication completed",
            )
            (conn,) = fake.connections
            await conn.closed
            assert b"Q" not in conn.received
            await until_threads_idle(proxy.route().backend.derivations)
    finally:
        await fake.stop()
