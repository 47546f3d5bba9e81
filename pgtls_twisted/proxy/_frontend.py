# -*- test-case-name: tests.test_frontend,tests.test_attacks,tests.test_attacks_startup -*-
"""
The client leg: everything a client sends before its session starts.

A client connection goes through, at most: a GSSENCRequest (answered
C{N}), an SSLRequest (answered C{S}, then TLS) or a direct TLS ClientHello,
and then exactly one startup packet inside the chosen layer: a
StartupMessage, which starts a L{pgtls_twisted.proxy._session.Session}, or a
CancelRequest, which is handed to L{pgtls_twisted.proxy._cancel}. Each request is
allowed once, so alternating requests cannot loop (CVE-2026-6479).

All parsing here is of startup packets, whose lengths are bounded before
any bytes are buffered for them.

Where the connection is, is its L{Phase}: NEGOTIATING, then (with TLS)
TLS_HANDSHAKE and STARTUP, AUTHENTICATING from its StartupMessage, READY
once its session has started, and CLOSING and CLOSED at the end. The
startup and login deadlines, L{ClientProtocol.terminate} and the admin
console read it.
"""

from __future__ import annotations

from ipaddress import ip_address
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.proxy._leg import CLOSE_TIMEOUT, Decrypted, Leg, Phase, discard
from pgtls_twisted.proxy._logins import TicketState, TooManyLogins, address_key
from pgtls_twisted.proxy._stats import ConnectionStats
from pgtls_twisted.tls import _private
from pgtls_twisted.tls._contexts import ALPN_POSTGRESQL, common_name, describe_tls

if TYPE_CHECKING:
    from pgtls_twisted.proxy._interfaces import SessionHost
    from pgtls_twisted.proxy._logins import Ticket


class ClientProtocol(Leg):
    """
    One client connection, from accept to close.

    C{deliver} is the startup parser until a session takes over.

    @ivar stats: what the close log line reports (L{ConnectionStats}),
        filled in by whoever learns it (this leg, the session, the pump).
    @ivar phase: where the connection is (L{Phase}).
    """

    _log = Logger()

    def __init__(self, route: SessionHost) -> None:
        super().__init__()
        self.route = route
        self.clock = route.clock
        self.connId = route.nextConnectionId()
        self.session: Any = None
        self.deliver = self._startupData
        self.verifyError: str | None = None
        self.startup: wire.StartupMessage | None = None
        self._buf = bytearray()
        #: A GSSENCRequest has been answered (C{N}). A fact within
        #: NEGOTIATING, not a phase of its own: the client may still send an
        #: SSLRequest or its startup packet, but not a second GSSENCRequest
        #: (CVE-2026-6479), nor begin TLS directly (a direct ClientHello can
        #: only be a connection's first bytes).
        self._gssAnswered = False
        #: TLS was begun directly (a ClientHello, no SSLRequest): not a
        #: phase but how TLS_HANDSHAKE was entered, which decides whether
        #: ALPN must have chosen C{postgresql} when it completes.
        self._directTLS = False
        self._deadline: Any = None
        #: The place at the route's L{LoginGate}, until logged in.
        self._ticket: Ticket | None = None
        self._loginDeadline: Any = None
        #: When it was accepted, by the route's clock (the close log line's
        #: duration, and the admin console's C{connect_time}).
        self.connectedAt: float = self.clock.seconds()
        self._tlsStarted = 0.0
        #: The client's address: the socket's peer, or what a PROXY header
        #: said (SHOW CLIENTS, the login gate).
        self.peerAddress: Any = None
        #: Bytes that followed a PROXY header, read once the login gate
        #: lets the client in.
        self._afterHeader = b""
        #: When the client last started a request (pooled sessions set it).
        self.lastRequest: float | None = None
        self.stats = ConnectionStats()

    # -- connection lifecycle ------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        peer = self.transport.getPeer()
        self.peerAddress = peer
        self.peer = _hostPort(peer)
        self.route.clientOpened(self)
        self.route.metrics.accepted(self.route.name)
        listener = self.route.config.listener
        if listener.proxy_protocol:
            self._awaitProxyHeader(peer, listener.proxy_trusted)
            return
        self._admit(peer)

    def _admit(self, peer: Any, via: str | None = None) -> None:
        """
        The client is known (its address, from the socket or a PROXY
        header): log it, and ask the login gate for a slot.
        """
        self._log.info(
            "conn={conn} open peer={peer} route={route}" + (" via={via}" if via else ""),
            conn=self.connId,
            peer=self.peer,
            route=self.route.name,
            via=via,
        )
        try:
            self._ticket = self.route.logins.arrive(
                address_key(str(getattr(peer, "host", "?"))), self._letIn
            )
        except TooManyLogins as e:
            self._refuseEarly(str(e))
            return
        if self._deadline is None:
            self._deadline = self.route.clock.callLater(
                self.route.config.listener.startup_timeout, self._startupExpired
            )
        # The login clock runs from accept, a wait for a login slot included.
        self.startLoginClock()
        if self._ticket.state is TicketState.WAITING:
            # Not a byte is read (nor a handshake done) until it is let in.
            self.pauseReading()

    def _letIn(self) -> None:
        """The login gate has a slot: read, starting with what followed a PROXY header."""
        self.resumeReading()
        early, self._afterHeader = self._afterHeader, b""
        if early and self.phase is Phase.NEGOTIATING:
            self.dataReceived(early)

    # -- PROXY protocol (listener.proxy_protocol) ------------------------------

    def _awaitProxyHeader(self, peer: Any, trusted: tuple[Any, ...]) -> None:
        """
        Behind a load balancer: the first bytes must be a PROXY header
        (parsed by Twisted's parsers, L{pgtls_twisted.tls._private}), and
        only a trusted peer may send one. Until it is whole, nothing else
        is looked at; the startup deadline runs from accept.
        """
        self._deadline = self.route.clock.callLater(
            self.route.config.listener.startup_timeout, self._startupExpired
        )
        if not _trusted(getattr(peer, "host", None), trusted):
            self._refuseProxy("connection from an address not in listener.proxy_trusted")
            return
        self._proxyParser: Any = None
        self._proxyHead = b""
        self.dataReceived = self._proxyHeaderData  # type: ignore[method-assign]

    def _proxyHeaderData(self, data: bytes) -> None:
        parser = self._proxyParser
        if parser is None:
            self._proxyHead += data
            parser = _private.proxyHeaderParser(self._proxyHead)
            if parser is None:
                return
            if parser is False:
                self._refuseProxy("no PROXY protocol header")
                return
            self._proxyParser = parser
            data, self._proxyHead = self._proxyHead, b""
        try:
            info, rest = parser.feed(data)
        except Exception as e:
            # InvalidProxyHeader and its kinds, or whatever else the
            # parser met in bytes it was not meant for.
            self._refuseProxy(f"invalid PROXY protocol header ({type(e).__name__})")
            return
        if info is None:
            return
        del self.dataReceived  # the class's own, from here on
        self._proxyParser = None
        balancer = self.peer
        source = info.source
        if source is not None and getattr(source, "host", None):
            # Not a LOCAL header (the balancer's own health check).
            self.peerAddress = source
            self.peer = _hostPort(source)
        self._afterHeader = rest or b""
        self._admit(self.peerAddress, via=balancer)
        if self.phase is Phase.NEGOTIATING and not self.readingPaused:
            self._letIn()

    def _refuseProxy(self, text: str) -> None:
        """A connection the PROXY protocol rules refuse: no channel to speak on, so dropped."""
        self.refused("proxy_protocol")
        self.abort(f"pgtls: {text}")

    def _refuseEarly(self, text: str) -> None:
        """
        Too many logins: refused before anything is read, with an
        ErrorResponse in plaintext, as PostgreSQL's postmaster answers
        when it cannot start a backend (a client reads it as the answer to
        its SSLRequest or StartupMessage).
        """
        self.refused("login_limit")
        self.stats.reason = f"53300 {text}"
        self._log.warn(
            "conn={conn} refused peer={peer} route={route}: 53300 {text}",
            conn=self.connId,
            peer=self.peer,
            route=self.route.name,
            text=text,
        )
        self._ignoreInput()
        self.transport.write(wire.error_response("53300", text))
        self.transport.loseConnection()
        self._closeTimer = self.clock.callLater(CLOSE_TIMEOUT, self.transport.abortConnection)

    def startLoginClock(self) -> None:
        """Start (or restart, after a PAUSE) the C{login_timeout} deadline."""
        self.stopLoginClock()
        if self._ticket is not None:
            self._loginDeadline = self.route.clock.callLater(
                self.route.config.listener.login_timeout, self._loginExpired
            )

    def stopLoginClock(self) -> None:
        if self._loginDeadline is not None and self._loginDeadline.active():
            self._loginDeadline.cancel()
        self._loginDeadline = None

    def _leaveGate(self) -> None:
        """Logged in, or gone: the login slot is free for the next client."""
        self.stopLoginClock()
        ticket, self._ticket = self._ticket, None
        if ticket is not None:
            self.route.logins.leave(ticket)

    def appConnectionLost(self, reason: Failure) -> None:
        """The client is gone (after TLS, if any, has shut down)."""
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self._leaveGate()
        if self.stats.reason is None:
            if self.reached is Phase.TLS_HANDSHAKE:
                self.stats.reason = f"TLS handshake failed: {_tls_error(reason)}"
                self.refused("handshake_failure")
            elif self.phase is Phase.CLOSING:
                self.stats.reason = "closed by pgtls"
            else:
                self.stats.reason = "client closed"
        self.route.clientClosed(self)
        super().appConnectionLost(reason)
        self._logClose()

    def startupComplete(self) -> None:
        """The session is established; the startup deadline no longer applies."""
        self.phase = Phase.READY
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self._leaveGate()

    def _startupExpired(self) -> None:
        self._deadline = None
        timeout = self.route.config.listener.startup_timeout
        self._expired(f"pgtls: connection startup did not complete within {timeout:g}s")

    def _loginExpired(self) -> None:
        self._loginDeadline = None
        ticket = self._ticket
        if ticket is not None and ticket.state is TicketState.WAITING:
            text = self.route.logins.refusal(ticket)
            self._leaveGate()
            self._refuseEarly(text)
            return
        timeout = self.route.config.listener.login_timeout
        self._expired(f"pgtls: login did not complete within {timeout:g}s (listener.login_timeout)")

    def _expired(self, text: str) -> None:
        self.refused("startup_timeout")
        if self.reached in (Phase.NEGOTIATING, Phase.TLS_HANDSHAKE):
            # No channel to speak on yet: dropped, even if a close (of a
            # refusal in plaintext, say) has begun meanwhile.
            self.abort(text)
        else:
            self.fail("08006", text)

    def _logClose(self) -> None:
        s = self.stats
        self._log.info(
            "conn={conn} close peer={peer} route={route} user={user} database={database} "
            "client_tls={client_tls} backend_tls={backend_tls} bytes_in={bytes_in} "
            "bytes_out={bytes_out} duration={duration:.3f}s reason={reason}",
            conn=self.connId,
            peer=self.peer,
            route=self.route.name,
            user=self.startup.user if self.startup else None,
            database=self.startup.database if self.startup else None,
            client_tls=s.client_tls,
            backend_tls=s.backend_tls,
            bytes_in=s.bytes_in,
            bytes_out=s.bytes_out,
            duration=self.clock.seconds() - self.connectedAt,
            reason=s.reason,
        )

    def refused(self, reason: str) -> None:
        """Count this connection as refused (see L{pgtls_twisted.ops._metrics.REFUSALS})."""
        self.route.metrics.refused(self.route.name, reason)

    # -- shutting down -------------------------------------------------------

    def drain(self) -> None:
        """The proxy is shutting down: finish what may be finished, then close."""
        if self.session is not None:
            self.session.drain()

    def terminate(self) -> None:
        """The shutdown deadline has passed: close now, telling the client why (57P01)."""
        phase = self.phase
        if phase in (Phase.CLOSING, Phase.CLOSED):
            return
        if self.session is not None:
            self.session.terminate()
        elif phase in (Phase.NEGOTIATING, Phase.TLS_HANDSHAKE):
            self.abort("pgtls is shutting down")
        else:
            self.fail("57P01", "terminating connection due to administrator command")

    # -- closing -------------------------------------------------------------

    def fail(self, sqlstate: str, text: str, detail: str | None = None) -> None:
        """Send a FATAL ErrorResponse (if a channel is open) and close."""
        if self.phase in (Phase.CLOSING, Phase.CLOSED):
            return
        if self.handBack is not None:
            self.handBack()
        self.stats.reason = f"{sqlstate} {text}"
        self._log.warn(
            "conn={conn} refused peer={peer} route={route}: {sqlstate} {text}",
            conn=self.connId,
            peer=self.peer,
            route=self.route.name,
            sqlstate=sqlstate,
            text=text,
        )
        self.out.write(wire.error_response(sqlstate, text, detail=detail))
        self.close()

    def abort(self, reason: str) -> None:
        """Drop the connection at once: nothing may be sent (or trusted)."""
        if self.handBack is not None:
            self.handBack()
        if self.stats.reason is None:
            self.stats.reason = reason
        self._log.warn(
            "conn={conn} dropped peer={peer} route={route}: {reason}",
            conn=self.connId,
            peer=self.peer,
            route=self.route.name,
            reason=reason,
        )
        self._ignoreInput()
        self.transport.abortConnection()

    def _ignoreInput(self) -> None:
        """Closing: whatever the client still sends is not looked at."""
        self._beginClosing()
        self.deliver = discard
        self.dataReceived = discard  # type: ignore[method-assign]

    # -- before TLS ----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Plaintext bytes before any TLS: encryption requests and the like."""
        buf = self._buf
        first = not buf and not self._gssAnswered
        buf += data
        if first and buf[0] == wire.TLS_HANDSHAKE_RECORD:
            self._startDirectTLS()
            return
        while buf:
            parsed = self._nextPacket()
            if parsed is None:
                return
            packet, used = parsed
            if isinstance(packet, wire.SSLRequest):
                if len(buf) != used:
                    # CVE-2021-23214: bytes pipelined after the request were
                    # sent before any encryption and must never be trusted.
                    self.refused("protocol")
                    self.fail("08P01", "received unencrypted data after SSL request")
                    return
                del buf[:used]
                self.transport.write(b"S")
                self._startTLS(b"")
                return
            if isinstance(packet, wire.GSSENCRequest):
                if self._gssAnswered:
                    self.refused("protocol")
                    self.fail("08P01", "pgtls: duplicate GSSAPI encryption request")
                    return
                if len(buf) != used:
                    self.refused("protocol")
                    self.fail("08P01", "received unencrypted data after GSSAPI encryption request")
                    return
                self._gssAnswered = True
                del buf[:used]
                self.transport.write(b"N")
                continue
            del buf[:used]
            self.stats.client_tls = None
            self.deliver = self._startupData
            # Plaintext from here on: what the socket delivers is
            # application data, routed like decrypted bytes would be.
            self.dataReceived = lambda data: self.deliver(data)  # type: ignore[method-assign]
            self._packet(packet, bytes(buf))
            buf.clear()
            return

    def _nextPacket(self) -> tuple[wire.StartupPacket, int] | None:
        """The next startup packet, or C{None} (incomplete, or refused)."""
        try:
            return wire.parse_startup_packet(self._buf)
        except wire.ProtocolViolation as e:
            self.refused("protocol")
            if e.sqlstate is None:
                self.abort(e.message)
            else:
                self.fail(e.sqlstate, e.message)
            return None

    def _startDirectTLS(self) -> None:
        if not self.route.config.listener.direct_tls:
            self.refused("protocol")
            self.abort("direct TLS connection refused: listener.direct_tls is off")
            return
        self._directTLS = True
        received = bytes(self._buf)
        self._buf.clear()
        self._startTLS(received)

    def _startTLS(self, received: bytes) -> None:
        self._tlsStarted = self.clock.seconds()
        self.phase = Phase.TLS_HANDSHAKE
        self.deliver = self._startupData
        self.tls = self.route.clientTLS.attach(self, Decrypted(self), received)
        if self.phase is not Phase.CLOSING:
            self.out = self.tls

    # -- inside TLS ----------------------------------------------------------

    def handshakeCompleted(self) -> None:
        if self.phase is Phase.TLS_HANDSHAKE:
            self.phase = Phase.STARTUP
        conn = self.tls.getHandle()
        info = self.stats.client_tls = describe_tls(conn)
        self.route.metrics.handshakeDone(
            self.route.name,
            self.clock.seconds() - self._tlsStarted,
            info["version"] or "",
            info["cipher"] or "",
        )
        if self._directTLS and self.tls.negotiatedProtocol != ALPN_POSTGRESQL:
            self.refused("protocol")
            self.abort("direct TLS connection without ALPN protocol negotiation extension")

    def _startupData(self, data: bytes) -> None:
        """Application bytes before the session: exactly one startup packet."""
        buf = self._buf
        buf += data
        parsed = self._nextPacket()
        if parsed is None:
            return
        packet, used = parsed
        rest = bytes(buf[used:])
        buf.clear()
        self._packet(packet, rest)

    def _packet(self, packet: wire.StartupPacket, rest: bytes) -> None:
        if isinstance(packet, (wire.SSLRequest, wire.GSSENCRequest)):
            code = (
                wire.SSL_REQUEST_CODE
                if isinstance(packet, wire.SSLRequest)
                else wire.GSSENC_REQUEST_CODE
            )
            self.refused("protocol")
            self.fail(
                "08P01",
                f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: encryption is already in use",
            )
        elif isinstance(packet, wire.CancelRequest):
            self.stats.reason = "cancel request"
            self.route.cancels.cancel(packet, self.connId, self.route, client=self.peerAddress)
            self.close()
        else:
            self._startupMessage(packet, rest)

    def _startupMessage(self, startup: wire.StartupMessage, rest: bytes) -> None:
        self.startup = startup
        self.phase = Phase.AUTHENTICATING
        listener = self.route.config.listener
        if self.tls is None and listener.tls == "require":
            self.refused("tls_required")
            self.fail("28000", "pgtls: this listener requires TLS (sslmode=require or stronger)")
            return
        if self.tls is None and listener.mtls:
            self.refused("client_certificate")
            self.fail("28000", "pgtls: connection requires a valid client certificate")
            return
        refusal = self.route.admission(self)
        if refusal is not None:
            sqlstate, text, reason = refusal
            self.refused(reason)
            self.fail(sqlstate, text)
            return
        if self.tls is not None:
            problem = self._clientCertificateProblem(startup.user.encode("utf-8"))
            if problem is not None:
                self.refused("client_certificate")
                self.fail("28000", problem)
                return
        # Nothing more is read from the client until its backend is ready.
        self.pauseReading()
        self.deliver = self._early
        self.pending = bytearray(rest)
        self.route.startSession(self, startup)

    def _clientCertificateProblem(self, user: bytes) -> str | None:
        listener = self.route.config.listener
        if not listener.mtls:
            return None
        cert = self.tls.getHandle().get_peer_certificate(as_cryptography=True)
        if cert is None:
            return "pgtls: connection requires a valid client certificate"
        if self.verifyError is not None:
            return f"pgtls: client certificate refused: {self.verifyError}"
        if listener.cert_user_match:
            cn = common_name(cert)
            role = _role_name(user)
            if role is None or cn is None or cn.encode("utf-8") != role:
                shown = user.decode("utf-8", "replace")
                return f'pgtls: certificate authentication failed for user "{shown}": certificate CN is "{cn}"'
        return None

    def _early(self, data: bytes) -> None:
        """Bytes that arrive while the backend is being connected."""
        self.pending += data


#: PostgreSQL's NAMEDATALEN - 1: longer names in the startup packet are cut.
_MAX_NAME_BYTES = 63


def _role_name(user: bytes) -> bytes | None:
    """
    The role PostgreSQL will log in for C{user} (the startup packet's raw
    bytes): cut to 63 bytes without splitting a character. A certificate
    must match that name exactly, not a longer one that merely starts the
    same way, nor a different byte string that decodes alike. C{None} for a
    name that is not UTF-8, which no certificate can vouch for.
    """
    try:
        user.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return user[:_MAX_NAME_BYTES].decode("utf-8", "ignore").encode("utf-8")


def _tls_error(reason: Failure | None) -> str:
    """The OpenSSL reason of a failed handshake, for the close log line."""
    if reason is None:
        return "connection lost"
    args = getattr(reason.value, "args", ())
    if args and isinstance(args[0], list) and args[0] and isinstance(args[0][0], tuple):
        return "; ".join(str(item[-1]) for item in args[0])
    return reason.getErrorMessage()


def _hostPort(address: Any) -> str:
    return f"{getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}"


def _trusted(host: str | None, networks: tuple[Any, ...]) -> bool:
    """Whether C{host} (a peer's address) is in one of C{networks}."""
    if host is None:
        return False
    try:
        address = ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return any(address in network for network in networks)
