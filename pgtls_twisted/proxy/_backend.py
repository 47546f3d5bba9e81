# -*- test-case-name: tests.test_proxy,tests.test_attacks,tests.test_security_backend -*-
"""
The backend leg: pgtls connecting to the real server, as libpq would.

A route's L{BackendConnector} is all a session, a pool or a cancel needs
to reach its server: L{BackendConnector.connect} opens a TCP connection
(through an endpoint, L{IStreamClientEndpoint}, from a factory it is
given), negotiates encryption according to C{backend.tls} (libpq's sslmode
meanings), verifies the server, and hands back a L{ServerProtocol} ready
for a startup packet. Every failure becomes a L{BackendError} whose text is
fit for the client's ErrorResponse.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import (
    ConnectionRefusedError,
    DNSLookupError,
    TimeoutError,
)
from twisted.internet.interfaces import IStreamClientEndpoint, ISystemHandle, ITCPTransport
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.proxy._derivation import DerivationThreads
from pgtls_twisted.proxy._leg import Decrypted, Leg, Phase
from pgtls_twisted.tls._contexts import BackendTLS, BackendVerification, describe_tls
from pgtls_twisted.tls._lean import Corker, TLSLayer

if TYPE_CHECKING:
    from pgtls_twisted.config import BackendConfig
    from pgtls_twisted.proxy._interfaces import MetricsRecorder


class BackendError(Exception):
    """
    The backend could not be reached or trusted.

    @ivar sqlstate: 08001 (could not establish) or 08006 (failure of an
        established or encrypting connection), as libpq uses them.
    """

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


class ServerProtocol(Leg):
    """
    One connection to the backend.

    Before it is ready it answers to its L{BackendConnector.connect}
    Deferred; after, to whoever sets C{deliver} and C{onLost} (a session, a
    server login, or a cancel).

    Its L{Phase}: NEGOTIATING while its SSLRequest awaits the server's
    answer, TLS_HANDSHAKE, READY once handed over (whatever runs on it
    then, a startup included, is its user's business), CLOSING and CLOSED.

    @ivar tlsInfo: TLS version and cipher, or C{None} for plaintext.
    """

    def __init__(self, connector: BackendConnector, ready: defer.Deferred[ServerProtocol]) -> None:
        super().__init__()
        self.connector = connector
        self.clock = connector.clock
        self.mode = connector.config.tls
        self._ready: defer.Deferred[ServerProtocol] | None = ready
        self.tlsInfo: dict[str, str | None] | None = None
        self.connectedAt: float | None = None
        self.verification = BackendVerification()
        self.deliver = self._unexpected

    # -- establishing --------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self.connectedAt = self.clock.seconds()
        keep_alive(self.transport, self.connector.config)
        if self.mode == "disable":
            self._succeed()
            return
        self.transport.write(wire.SSL_REQUEST)

    def dataReceived(self, data: bytes) -> None:
        if self.phase is not Phase.NEGOTIATING:
            self.deliver(data)
            return
        # The answer to the SSLRequest: each branch below leaves NEGOTIATING.
        answer = data[:1]
        if len(data) != 1 and answer in (b"S", b"N"):
            # CVE-2021-23222: whatever follows the one-byte answer was not
            # protected by the TLS session we are about to start.
            self._fail("08006", "received unencrypted data after SSL response")
        elif answer == b"S":
            self.phase = Phase.TLS_HANDSHAKE
            self.tls = self.connector.tls.attach(self, Decrypted(self))
            self.out = self.tls
        elif answer == b"N":
            if self.mode == "prefer":
                self._succeed()
            else:
                self._fail(
                    "08001", f"server does not support SSL, but backend.tls is {self.mode!r}"
                )
        elif answer == b"E":
            # CVE-2024-10977: an error sent before TLS is unauthenticated;
            # its text is never shown to anyone.
            self._fail("08001", "server answered the SSL request with an error")
        else:
            self._fail("08001", f"server sent an invalid response to the SSL request ({answer!r})")

    def handshakeCompleted(self) -> None:
        conn = self.tls.getHandle()
        problem = self.connector.creator.check_hostname(conn)
        if problem is not None:
            self._fail("08006", f"backend TLS verification failed: {problem}")
            return
        self.tlsInfo = describe_tls(conn)
        self._succeed()

    def _succeed(self) -> None:
        ready, self._ready = self._ready, None
        if ready is not None and not ready.called:
            self.phase = Phase.READY
            ready.callback(self)
        else:
            # connect_timeout expired while we were negotiating.
            self.close()

    def _fail(self, sqlstate: str, message: str) -> None:
        ready, self._ready = self._ready, None
        self._beginClosing()
        self.transport.abortConnection()
        if ready is not None and not ready.called:
            ready.errback(BackendError(sqlstate, message))

    def _unexpected(self, data: bytes) -> None:
        # Bytes before anyone listens (e.g. after a plaintext 'N'): a
        # server never speaks first, so this is a protocol violation.
        self._fail("08006", "backend sent data before the startup packet")

    # -- lifecycle -------------------------------------------------------------

    def appConnectionLost(self, reason: Failure) -> None:
        ready, self._ready = self._ready, None
        if ready is not None:
            self._gone()
            if not ready.called:
                ready.errback(_explain_handshake_failure(self, reason))
            return
        super().appConnectionLost(reason)


def _explain_handshake_failure(leg: ServerProtocol, reason: Failure) -> BackendError:
    """Turn a connection lost before the leg was ready into words."""
    if leg.verification.chain_error is not None:
        return BackendError(
            "08006", f"backend TLS verification failed: {leg.verification.chain_error}"
        )
    if leg.tls is not None:
        text = str(reason.value)
        minimum = leg.connector.config.min_tls_version
        if (
            "protocol" in text.lower()
            and "version" in text.lower()
            or "unsupported protocol" in text.lower()
        ):
            return BackendError(
                "08006",
                f"backend TLS handshake failed: the server cannot use TLS {minimum} or later "
                f"(backend.min_tls_version = {minimum!r})",
            )
        return BackendError("08006", f"backend TLS handshake failed: {_openssl_reason(reason)}")
    return BackendError("08006", "backend closed the connection during startup")


def _openssl_reason(reason: Failure) -> str:
    value = reason.value
    args = getattr(value, "args", ())
    if args and isinstance(args[0], list) and args[0]:
        # pyOpenSSL errors: [(library, function, reason), ...]
        return "; ".join(str(item[-1]) for item in args[0])
    return str(value) or reason.type.__name__


def keep_alive(transport: Any, config: BackendConfig) -> None:
    """
    Set C{backend.keepalives}, C{keepalives_idle} and C{tcp_user_timeout}
    on a new server connection's socket (a TCP transport's; in-memory
    ones in unit tests have none). Options the system lacks are left at
    its defaults.
    """
    if not ITCPTransport.providedBy(transport):
        return
    if config.keepalives:
        transport.setTcpKeepAlive(True)
    if not ISystemHandle.providedBy(transport):
        return  # iosim's FakeTransport: TCP-like, no socket
    sock = transport.getHandle()
    options = []
    if config.keepalives and config.keepalives_idle:
        options.append(("TCP_KEEPIDLE", max(1, round(config.keepalives_idle))))
    if config.tcp_user_timeout:
        options.append(("TCP_USER_TIMEOUT", max(1, round(config.tcp_user_timeout * 1000))))
    for name, value in options:
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


#: Makes the endpoint of one backend connection: given the host, the port
#: and C{backend.connect_timeout}.
EndpointFactory = Callable[[str, int, float], IStreamClientEndpoint]


def tcp_endpoints(reactor: Any) -> EndpointFactory:
    """
    The default L{EndpointFactory}: L{TCP4ClientEndpoint}, which is
    C{reactor.connectTCP} as an endpoint, so host names are resolved as
    ever (C{reactor.resolve}, the first IPv4 address; an IPv6 literal is
    used as such) and a failure is one of C{connectTCP}'s, which
    L{_explain_connect_failure} puts into words. (L{HostnameEndpoint}
    would try every address, IPv6 ones included, and fail in its own way.)
    """

    def endpoint(host: str, port: int, timeout: float) -> IStreamClientEndpoint:
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)

    return endpoint


class _LegFactory(Factory):
    """Builds the one L{ServerProtocol} of a connection attempt, and remembers it."""

    noisy = False

    def __init__(self, connector: BackendConnector, ready: defer.Deferred[ServerProtocol]) -> None:
        self.connector = connector
        self.ready = ready
        self.leg: ServerProtocol | None = None

    def buildProtocol(self, addr: object) -> ServerProtocol:
        self.leg = ServerProtocol(self.connector, self.ready)
        return self.leg


def _explain_connect_failure(backend: BackendConfig, reason: Failure) -> BackendError:
    """
    Words for an endpoint's failure to connect: the C{twisted.internet.error}
    exceptions of a refused connection, a timeout and a host name that does
    not resolve, as libpq words them; anything else by its own message.
    """
    where = f"{backend.host}:{backend.port}"
    if reason.check(ConnectionRefusedError):
        return BackendError("08001", f"could not connect to backend {where}: connection refused")
    if reason.check(TimeoutError, defer.TimeoutError):
        return BackendError("08001", f"could not connect to backend {where}: timeout expired")
    if reason.check(DNSLookupError):
        return BackendError("08001", f"could not translate backend host name {backend.host!r}")
    return BackendError(
        "08001", f"could not connect to backend {where}: {reason.getErrorMessage()}"
    )


class BackendConnector:
    """
    How one route reaches its server: the backend configuration, the TLS
    client context (reloadable), the reactor and clock, where TCP
    connections come from, where SCRAM keys are derived, and where
    failures and connect times are counted. Given to sessions, pools and
    cancels instead of the route itself.

    @ivar name: the route's name, for messages and metric labels.
    @ivar creator: the L{BackendTLS} (contexts, host name checks).
    @ivar tls: the L{TLSLayer} that puts TLS under a live connection.
    @ivar endpoints: makes the endpoint of each connection.
    @ivar derivations: where the SCRAM keys of logins to this server are
        derived: its C{run} is the exchange's runner
        (L{pgtls_twisted.protocol._scram.Runner}).
    """

    def __init__(
        self,
        name: str,
        config: BackendConfig,
        reactor: Any,
        metrics: MetricsRecorder,
        *,
        endpoints: EndpointFactory | None = None,
        derivations: DerivationThreads | None = None,
        corker: Corker | None = None,
    ) -> None:
        """
        @param endpoints: where TCP connections come from (tests give
            in-memory ones); by default L{tcp_endpoints} on C{reactor}.
        @param derivations: the process's derivation threads, shared by
            its routes; by default threads of this connector's own.
        @param corker: the client legs' (see L{Corker}).
        """
        self.name = name
        self.config = config
        self.reactor = reactor
        self.clock = reactor
        self.metrics = metrics
        self.creator = BackendTLS(config)
        self.tls = TLSLayer(self.creator, True, reactor, corker=corker)
        self.endpoints = endpoints if endpoints is not None else tcp_endpoints(reactor)
        self.derivations = derivations if derivations is not None else DerivationThreads(reactor)

    def connect(self) -> defer.Deferred[ServerProtocol]:
        """
        Connect to the backend and negotiate encryption.

        C{backend.connect_timeout} covers the TCP connect, the SSL
        negotiation and the TLS handshake together.

        @return: a Deferred firing with the ready L{ServerProtocol}, or
            failing with L{BackendError}.
        """
        backend = self.config
        ready: defer.Deferred[ServerProtocol] = defer.Deferred()
        factory = _LegFactory(self, ready)
        endpoint = self.endpoints(backend.host, backend.port, backend.connect_timeout)
        # The leg itself fires `ready` (once encryption is settled); the
        # endpoint's own Deferred only says whether TCP connected.
        attempt = endpoint.connect(factory)

        def notConnected(reason: Failure) -> None:
            # (Once the timer below has given up, and cancelled the
            # attempt, there is nothing more to tell.)
            if not ready.called:
                ready.errback(_explain_connect_failure(backend, reason))

        attempt.addCallbacks(lambda leg: None, notConnected)

        def expired() -> None:
            if not ready.called:
                ready.errback(
                    BackendError(
                        "08001",
                        f"could not connect to backend {backend.host}:{backend.port}: "
                        f"timeout expired after {backend.connect_timeout:g}s",
                    )
                )
                if factory.leg is None:
                    attempt.cancel()  # still connecting: stop
                else:
                    factory.leg.transport.loseConnection()  # negotiating: drop it

        timer = self.clock.callLater(backend.connect_timeout, expired)
        started = self.clock.seconds()

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure):
                self.metrics.backendFailed(self.name, result.getErrorMessage())
            else:
                self.metrics.backendConnected(self.name, self.clock.seconds() - started)
            return result

        ready.addBoth(done)
        return ready
