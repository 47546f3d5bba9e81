# -*- test-case-name: tests.test_proxy,tests.test_frontend -*-
"""
A pass-through session: one client leg joined to one backend leg.

From the client's StartupMessage to the backend's first ReadyForQuery the
session reads every message both ways, because three things must happen
there:

 - authentication through two TLS legs (see L{pgtls_twisted.protocol._scram}): pgtls
   runs SCRAM itself when the backend asks for it over TLS and the client
   leg is TLS too; with a plaintext client and a TLS backend it strips
   C{-PLUS} from the offer; everything else is relayed unchanged, once
   L{pgtls_twisted.protocol._authpolicy} has allowed it (C{backend.require_auth}, and
   no cleartext password over a backend leg that is not verified TLS);
 - the secret key of the backend's BackendKeyData is replaced by one
   minted in L{pgtls_twisted.proxy._cancel}; its process ID is kept (see
   L{Session._clientPid});
 - errors and the backend's closing are turned into ErrorResponses.

After ReadyForQuery the session becomes a L{pgtls_twisted.proxy._pump.Pump},
and, as soon as both legs have nothing queued, a
L{pgtls_twisted.proxy._relay.Relay} where the legs allow one (TCP, the
lean TLS protocol, the private names it needs): the same bytes, at a
fraction of the CPU.

Where a session is, is its L{SessionPhase}.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.protocol._authpolicy import REFUSED, LoginGuard
from pgtls_twisted.protocol._md5 import Md5Secret
from pgtls_twisted.protocol._scram import (
    SCRAM_SHA_256_PLUS,
    ScramLogin,
    ScramLoginError,
    ScramPolicyError,
)
from pgtls_twisted.proxy._backend import BackendError, ServerProtocol
from pgtls_twisted.proxy._leg import Phase
from pgtls_twisted.proxy._pump import Pump
from pgtls_twisted.proxy._relay import Relay, possible, takeOver
from pgtls_twisted.tls._contexts import peer_binding

if TYPE_CHECKING:
    from pgtls_twisted.proxy._frontend import ClientProtocol
    from pgtls_twisted.proxy._interfaces import CancelTargetInfo, SessionHost

#: What a client may pipeline behind its password while pgtls runs SCRAM
#: for it (see L{Session._clientHeld}); more ends the login, so that an
#: unauthenticated client cannot make pgtls buffer without bound.
MAX_HELD_DURING_LOGIN = 64 * 1024

#: How often, and how far apart (seconds), a session tries to hand its
#: legs from the pump to a relay while one of them still has bytes queued
#: (a client that started with a large query, a slow reader): then it
#: stays with the pump.
HANDOVER_TRIES = 50
HANDOVER_INTERVAL = 0.1


class SessionPhase(enum.Enum):
    """
    Where a session is. Every session goes CONNECTING, LOGGING_IN, and
    ends CLOSED. In between, once the client has logged in, a pass-through
    session is PUMPING; a pooled one (L{pgtls_twisted.pool._session}) is
    IDLE, WAITING, RESTORING or ATTACHED, as its client comes and goes
    between server connections. (One enumeration for both kinds, so that
    the code they share reads one attribute.)
    """

    #: The backend connection (a temporary one, for a pooled session) is
    #: being opened; the client's bytes wait unread.
    CONNECTING = "connecting"
    #: The client's startup is relayed to the backend, SCRAM run by pgtls
    #: where it must be, up to the backend's first ReadyForQuery.
    LOGGING_IN = "logging in"
    #: Pass-through: the two legs are joined by a L{Pump}.
    PUMPING = "pumping"
    #: Pooled: logged in, holding no server connection and waiting for none.
    IDLE = "idle"
    #: Pooled: waiting for a server connection from the pool; the client's
    #: bytes are held.
    WAITING = "waiting"
    #: Pooled: a server connection is attached, and pgtls's own statement
    #: runs on it first (the client's session parameters are restored);
    #: the client's bytes are still held.
    RESTORING = "restoring"
    #: Pooled: the client's bytes flow to its server connection and back.
    ATTACHED = "attached"
    #: Finished: both legs are closed or closing (a pooled server
    #: connection being reset for its next client goes on on its own).
    CLOSED = "closed"


class Session:
    """
    @ivar phase: where the session is (L{SessionPhase}).
    @ivar server: the backend leg, once connected.
    @ivar scram: the proxy's own SCRAM exchange, when it runs one.
    @ivar guard: what the backend may ask for during login.
    @ivar capture: pgtls must learn what the client's password comes to (a
        pool that logs in as the client's own role): a TLS client is then
        asked for its password whenever the backend wants SCRAM or MD5,
        and pgtls answers the backend itself, keeping the SCRAM keys
        (L{scram}) or the MD5 hash (L{md5Secret}), never the password.
    @ivar md5Secret: with C{capture}, the client's MD5 hash once known.
    """

    _log = Logger()
    capture = False

    def __init__(
        self, route: SessionHost, client: ClientProtocol, startup: wire.StartupMessage
    ) -> None:
        self.route = route
        self.client = client
        self.startup = startup
        self.phase = SessionPhase.CONNECTING
        self.server: ServerProtocol | None = None
        self.scram: ScramLogin | None = None
        self.guard: LoginGuard | None = None
        self.md5Secret: Md5Secret | None = None
        self._awaitingPassword = False
        #: What to do with the password the client was asked for.
        self._onPassword: Callable[[bytes], None] | None = None
        #: The SCRAM keys are being derived in a thread: the server's
        #: messages wait in their reader until client-final is sent (the
        #: client's wait anyway, see L{_clientHeld}).
        self._deriving = False
        #: Bytes in the client's reader, not yet handled.
        self._heldBytes = 0
        self._clientReader = wire.MessageReader()
        self._serverReader = wire.MessageReader()
        self._backendKey: tuple[int, bytes] | None = None
        #: The process ID under which the client's key is registered.
        self._clientKeyPid: int | None = None
        self.pump: Pump | None = None
        self.relay: Relay | None = None
        self._handover: Any = None
        self._handoverTries = 0
        client.session = self

    # -- connecting ------------------------------------------------------------

    def start(self) -> None:
        self.client.onLost = self._clientLostEarly
        self.route.backend.connect().addCallbacks(self._backendReady, self._backendFailed)

    def _clientLostEarly(self, reason: Failure) -> None:
        self.phase = SessionPhase.CLOSED

    def _backendFailed(self, failure: Failure) -> None:
        if self.phase is SessionPhase.CLOSED:
            return
        if failure.check(BackendError):
            err = failure.value
            self.client.fail(err.sqlstate, f'pgtls route "{self.route.name}": {err.message}')
        else:
            self._log.failure(
                "conn={conn} unexpected error connecting to the backend",
                failure,
                conn=self.client.connId,
            )
            self.client.fail(
                "08001", f'pgtls route "{self.route.name}": could not connect to backend'
            )

    def _backendReady(self, server: ServerProtocol) -> None:
        if self.phase is SessionPhase.CLOSED:
            server.close()
            return
        if self.client.phase in (Phase.CLOSING, Phase.CLOSED):
            # The client was refused (its startup deadline) while the
            # backend was being connected: not a byte goes to the server.
            server.close()
            self._finish("client closed while the backend was being connected")
            return
        self.phase = SessionPhase.LOGGING_IN
        self.server = server
        backend = self.route.config.backend
        self.guard = LoginGuard(backend.require_auth, backend.tls, server.tls is not None)
        client = self.client
        client.stats.backend_tls = server.tlsInfo
        client.onLost = self._clientLost
        server.onLost = self._serverLost
        server.deliver = self._serverData
        server.out.write(self.startup.encode())
        self._readClient(self._clientData)

    def _readClient(self, deliver: Callable[[bytes], None]) -> None:
        """
        From now on the client's bytes go to C{deliver}, starting with what
        it sent while the session was getting ready (its reading was paused).
        """
        client = self.client
        client.deliver = deliver
        pending = bytes(client.pending)
        client.pending = bytearray()
        client.resumeReading()
        if pending:
            deliver(pending)

    # -- authentication phase ------------------------------------------------

    def _clientData(self, data: bytes) -> None:
        reader = self._clientReader
        reader.feed(data)
        self._heldBytes += len(data)
        while not self._clientHeld():
            try:
                msg = reader.next()
            except wire.ProtocolViolation as e:
                self._abandon("08P01", e.message)
                return
            if msg is None:
                return
            self._heldBytes -= 5 + len(msg[1])
            self._clientMessage(*msg)
            if self.phase is SessionPhase.CLOSED:
                return
        if self._clientHeld() and self._heldBytes > MAX_HELD_DURING_LOGIN:
            self._abandon(
                "08P01", "pgtls: too much data from the client before authentication completed"
            )

    def _clientHeld(self) -> bool:
        """
        Whether the client's messages must wait in their reader: from its
        password until the session starts when pgtls runs SCRAM itself. The
        server expects SASL responses then, and only pgtls sends those; what
        the client pipelined goes on once the session has started.
        """
        return self.scram is not None and not self._awaitingPassword

    def _clientMessage(self, mtype: bytes, body: bytes) -> None:
        assert self.server is not None
        if self._awaitingPassword:
            if mtype != b"p":
                self._abandon("08P01", f"expected a password response, got message type {mtype!r}")
                return
            self._awaitingPassword = False
            try:
                wire.password_from_message(body)
            except wire.ProtocolViolation as e:
                self._abandon("08P01", e.message)
                return
            onPassword, self._onPassword = self._onPassword, None
            assert onPassword is not None
            # The bytes as sent: PostgreSQL hashes those when they are not
            # valid UTF-8, and so must we.
            onPassword(body[:-1])
            return
        if mtype == b"X":
            self._finish("client terminated during startup")
            return
        self.server.out.write(wire.message(mtype, body))

    def _serverData(self, data: bytes) -> None:
        reader = self._serverReader
        reader.feed(data)
        while self.phase is not SessionPhase.CLOSED and not self._deriving:
            try:
                msg = reader.next()
                if msg is None:
                    return
                started = self._serverMessage(*msg)
            except wire.ProtocolViolation as e:
                # A bad length, or a message body that does not parse (a
                # short Authentication, a bad BackendKeyData).
                self._abandon("08006", f"backend protocol violation: {e.message}")
                return
            if started:
                self._startPump()
                return

    def _serverMessage(self, mtype: bytes, body: bytes) -> bool:
        """Handle one backend message; C{True} at the first ReadyForQuery."""
        out = self.client.out
        if mtype == b"R":
            self._authentication(body)
        elif mtype == b"K":
            pid, key = wire.parse_backend_key_data(body)
            self._backendKey = (pid, key)
            cancels = self.route.cancels
            if self._clientKeyPid is not None:
                # PostgreSQL sends one BackendKeyData; of more, the last wins.
                cancels.forget(self._clientKeyPid, self)
            self._clientKeyPid, mintedKey = cancels.mint(self, len(key), self._clientPid(pid))
            out.write(wire.backend_key_data(self._clientKeyPid, mintedKey))
        elif mtype == b"E":
            fields = wire.parse_error_fields(body)
            self.client.stats.reason = f"backend error {fields.get('C')} {fields.get('M')}"
            out.write(wire.message(mtype, body))
        elif mtype == b"Z":
            out.write(wire.message(mtype, body))
            return True
        else:
            out.write(wire.message(mtype, body))
        return False

    def _clientPid(self, serverPid: int) -> int | None:
        """
        The process ID the client is given with its minted key: the
        backend's own, since a pass-through session is that backend's
        session and applications compare it with C{pg_backend_pid()} and
        with a NOTIFY's sender (PostgreSQL shows it to every user anyway).
        A pooled session's login connection is not where its queries run,
        so there it is C{None}: a random one is minted.
        """
        return serverPid if self.route.pools is None else None

    def _authentication(self, body: bytes) -> None:
        assert self.server is not None and self.guard is not None
        out = self.client.out
        code = wire.auth_code(body)
        refusal = self.guard.refusal(code)
        if refusal is not None:
            self._abandon(REFUSED, f'pgtls route "{self.route.name}": {refusal}')
            return
        if self.scram is not None and code in (
            wire.AUTH_SASL_CONTINUE,
            wire.AUTH_SASL_FINAL,
            wire.AUTH_OK,
        ):
            try:
                if code == wire.AUTH_SASL_CONTINUE:
                    self._scramContinue(body[4:])
                elif code == wire.AUTH_SASL_FINAL:
                    self.scram.finish(body[4:])
                elif not self.scram.done:
                    raise ScramLoginError(
                        "server accepted the login without proving it knows the password"
                    )
                else:
                    out.write(wire.AUTHENTICATION_OK)
            except ScramLoginError as e:
                self._scramFailed(e)
            return
        if self.capture and self.client.tls is not None:
            if code == wire.AUTH_SASL:
                self._startScram(wire.sasl_mechanisms(body))
                return
            if code == wire.AUTH_MD5_PASSWORD:
                self._askPassword(lambda password: self._md5(password, body[4:8]))
                return
        if code == wire.AUTH_SASL and self.server.tls is not None:
            offered = wire.sasl_mechanisms(body)
            if self.client.tls is not None:
                self._startScram(offered)
                return
            # A plaintext client must not see -PLUS: libpq would (rightly)
            # take it as TLS stripped by a man in the middle.
            kept = [m for m in offered if not m.endswith("-PLUS")]
            if not kept:
                self._abandon("28000", "backend offers only channel-bound SASL mechanisms")
                return
            out.write(wire.authentication_sasl(kept))
            return
        out.write(wire.message(b"R", body))

    def _startScram(self, offered: list[str]) -> None:
        assert self.server is not None
        tls = self.server.tls
        binding = None
        if SCRAM_SHA_256_PLUS in offered and tls is not None:
            binding = peer_binding(tls.getHandle())
        backend = self.route.config.backend
        try:
            scram = self.scram = ScramLogin(
                offered, binding, tls=tls is not None, maxIterations=backend.max_scram_iterations
            )
        except ScramLoginError as e:
            self._abandon("28000", str(e))
            return
        self._askPassword(lambda password: self.server.out.write(scram.start(password)))

    def _askPassword(self, then: Callable[[bytes], None]) -> None:
        """Ask the client for its password (only ever inside its TLS session)."""
        self._awaitingPassword = True
        self._onPassword = then
        self.client.out.write(wire.AUTHENTICATION_CLEARTEXT_PASSWORD)

    def _md5(self, password: bytes, salt: bytes) -> None:
        """Answer the backend's MD5 challenge with the client's password, keeping the hash."""
        assert self.server is not None
        secret = self.md5Secret = Md5Secret.fromPassword(password, self.startup.user)
        self.server.out.write(wire.message(b"p", secret.response(salt) + b"\0"))

    def _scramContinue(self, serverFirst: bytes) -> None:
        """
        Derive the SCRAM keys off the reactor thread. Until client-final is
        sent nothing else is read from the server (nor from the client, see
        L{_clientHeld}), so no message can overtake it; a side that closes
        meanwhile ends the session as usual, and the late result is dropped.
        """
        assert self.scram is not None
        derivation = self.scram.challenge(serverFirst, self.route.backend.derivations.run)
        self._deriving = True
        derivation.addCallback(self._clientFinal).addErrback(self._derivationFailed)

    def _clientFinal(self, message: bytes) -> None:
        self._deriving = False
        if self.phase is SessionPhase.CLOSED:
            return
        assert self.server is not None
        self.server.out.write(message)
        # Go on with whatever the server sent in the meantime.
        self._serverData(b"")

    def _derivationFailed(self, failure: Failure) -> None:
        self._deriving = False
        if self.phase is SessionPhase.CLOSED:
            return
        self._log.failure(
            "conn={conn} SCRAM key derivation failed", failure, conn=self.client.connId
        )
        self._abandon("08006", "backend authentication failed: could not compute the SCRAM proof")

    def _scramFailed(self, error: ScramLoginError) -> None:
        if isinstance(error, ScramPolicyError):
            self._abandon(error.sqlstate, f'pgtls route "{self.route.name}": {error}')
        else:
            self._abandon(error.sqlstate, f"backend authentication failed: {error}")

    # -- after startup ---------------------------------------------------------

    def _startPump(self) -> None:
        server, client = self.server, self.client
        assert server is not None
        self._started()
        self.phase = SessionPhase.PUMPING
        self.pump = Pump(client, server, client.stats)
        self.pump.start()
        rest = self._serverReader.drain()
        if rest:
            server.deliver(rest)
        early = self._clientReader.drain()
        if early:
            client.deliver(early)
        if self.phase is SessionPhase.PUMPING and possible(client, server, self.route.reactor):
            # After this chunk's writes (the ReadyForQuery) have left.
            self._handover = self.route.clock.callLater(0, self._handOver)

    def _handOver(self) -> None:
        """Give both legs to a relay, or try again later (see L{HANDOVER_TRIES})."""
        self._handover = None
        if self.phase is not SessionPhase.PUMPING or self.pump is None:
            return
        self.relay = takeOver(
            self.client, self.server, self.client.stats, self.route.reactor, self.pump.tail
        )
        if self.relay is None:
            self._handoverTries += 1
            if self._handoverTries < HANDOVER_TRIES:
                self._handover = self.route.clock.callLater(HANDOVER_INTERVAL, self._handOver)

    def _started(self, format: str = "", **fields: Any) -> None:
        """Startup is over: no more startup deadline, and one log event."""
        self.client.startupComplete()
        self._log.info(
            "conn={conn} session started route={route} user={user} database={database}" + format,
            conn=self.client.connId,
            route=self.route.name,
            user=self.startup.user,
            database=self.startup.database,
            **fields,
        )

    def cancelTarget(self) -> CancelTargetInfo | None:
        if self._backendKey is None or self.phase is SessionPhase.CLOSED:
            return None
        return self.route.backend, self._backendKey[0], self._backendKey[1], None

    # -- shutting down -----------------------------------------------------------

    def drain(self) -> None:
        """
        The proxy is shutting down. A pass-through session is the client's
        own server session: it is left to finish until the deadline.
        """

    def terminate(self) -> None:
        """
        The shutdown deadline: close both legs, with PostgreSQL's FATAL
        57P01 to the client when it can be told without cutting into a
        message (during startup, which is parsed; after it, only when the
        last thing the server sent was a ReadyForQuery: the byte pump does
        not frame messages, see L{Pump.atReady}).
        """
        text = "terminating connection due to administrator command"
        if self.phase is not SessionPhase.PUMPING:
            self._abandon("57P01", text)
            return
        relay = self.relay
        if relay is not None:
            relay.stop()
        ready = (
            relay.atReady() if relay is not None else self.pump is not None and self.pump.atReady()
        )
        if ready:
            self.client.fail("57P01", text)
        self._finish("pgtls shutdown")

    # -- ending ----------------------------------------------------------------

    def _abandon(self, sqlstate: str, text: str) -> None:
        """A failure during startup: tell the client, close both legs."""
        if self.phase is SessionPhase.CLOSED:
            return
        self.client.fail(sqlstate, text)
        self._finish(text)

    def _finish(self, reason: str) -> None:
        if self.phase is SessionPhase.CLOSED:
            return
        self.phase = SessionPhase.CLOSED
        if self._handover is not None:
            self._handover.cancel()
            self._handover = None
        if self.relay is not None:
            self.relay.stop()
        if self._clientKeyPid is not None:
            self.route.cancels.forget(self._clientKeyPid, self)
        if self.client.stats.reason is None:
            self.client.stats.reason = reason
        if self.server is not None:
            self.server.close()
        self.client.close()

    def _clientLost(self, reason: Failure) -> None:
        self._finish("client closed")

    def _serverLost(self, reason: Failure) -> None:
        if self.phase is SessionPhase.LOGGING_IN:
            # The backend went away before the session started: without an
            # ErrorResponse of its own (those were relayed above) the
            # client must still learn why.
            if self.client.stats.reason is None:
                self.client.fail(
                    "08006",
                    f'pgtls route "{self.route.name}": backend closed the connection unexpectedly',
                )
        self._finish("backend closed")
