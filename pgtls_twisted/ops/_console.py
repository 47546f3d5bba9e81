# -*- test-case-name: tests.test_admin,tests.test_admin_control,tests.test_security_admin -*-
"""
The admin console's side of the protocol: a client whose startup packet
names C{admin.database} talks to pgtls itself, not to a backend.

The console is a place to stop the proxy from, so it is guarded by pgtls
itself, never by whatever a backend's C{pg_hba.conf} happens to say:

 - B{TLS only}: a plaintext client is refused before anything else.
 - B{pgtls authenticates}, by C{admin.auth}:
   - C{cert}: a client certificate chaining to the listener's
     C{client_ca} (checked in the handshake), whose CN is the user;
   - C{scram}: SCRAM-SHA-256 (and C{-PLUS}, bound to pgtls's own
     certificate) against the verifiers of C{admin.password_file}, so no
     password is stored anywhere;
   - C{backend}: the client's password, asked for in cleartext inside its
     TLS session, is checked by logging in to the route's backend; only on
     a route whose backend leg is C{verify-full}, and a server that lets
     the user in without asking for a password fails the check.
 - B{Every name looks alike} until authenticated: a user who is not in
   C{admin.users} or C{admin.stats_users} goes through the same exchange
   (a SCRAM exchange against a made-up verifier, a password request) and
   gets the same error as a wrong password; only pgtls's log says which.
   (With C{backend}, the time to the answer still differs: only a real
   name costs a backend login. README says so.)
 - B{Roles}: C{admin.stats_users} may only C{SHOW}
   (L{pgtls_twisted.ops._commands.AdminCommands} checks every command).

The console speaks the simple query protocol (what psql and PgBouncer's
console use); extended-protocol messages get an error until their Sync.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from pgtls_twisted._version import __version__
from pgtls_twisted.ops._commands import AdminCommands, AdminError, Result
from pgtls_twisted.pool._serverlogin import LoginResult, ServerLogin, ServerLoginError
from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.protocol._redact import redact
from pgtls_twisted.protocol._scramserver import ScramAuthError, ScramServer, Verifier
from pgtls_twisted.proxy._backend import BackendError, ServerProtocol
from pgtls_twisted.tls._contexts import common_name, own_binding

if TYPE_CHECKING:
    from pgtls_twisted.config import AdminConfig
    from pgtls_twisted.proxy._frontend import ClientProtocol
    from pgtls_twisted.proxy._route import Route

#: The iteration count and salt length of made-up verifiers when the file
#: has none to copy (PostgreSQL's defaults).
_MOCK_ITERATIONS = 4096
_MOCK_SALT_BYTES = 16


class Phase(enum.Enum):
    """Where an admin console connection is."""

    AUTHENTICATING = "authenticating"
    CONSOLE = "console"
    CLOSED = "closed"


class AdminSession:
    """One admin console client."""

    _log = Logger()

    def __init__(
        self, route: Route, client: ClientProtocol, startup: wire.StartupMessage, admin: AdminConfig
    ) -> None:
        self.route = route
        self.client = client
        self.startup = startup
        self.admin = admin
        #: C{"admin"}, C{"stats"}, or C{None} for a name that may not use
        #: the console (which must not show until authentication fails).
        self.role = admin.role(startup.user)
        self.phase = Phase.AUTHENTICATING
        self._reader = wire.MessageReader()
        #: The login step waiting for the client's next message.
        self._expect: Callable[[bytes, bytes], None] | None = None
        self._scram: Any = None
        #: The SCRAM exchange is against a real verifier (not a made-up one).
        self._known = False
        self._failedUntilSync = False
        #: A message is being handled asynchronously (a backend login, a
        #: query answered by every worker): later ones wait in the reader.
        self._busy = False
        self._looping = False
        client.session = self

    # -- the login ---------------------------------------------------------------

    def start(self) -> None:
        client = self.client
        if client.tls is None:
            client.refused("admin_denied")
            client.fail(
                "28000", "pgtls: the admin console requires TLS (sslmode=require or stronger)"
            )
            return
        client.deliver = self._fromClient
        client.onLost = self._clientLost
        pending = bytes(client.pending)
        client.pending = bytearray()
        client.resumeReading()
        method = self.admin.auth
        if method == "cert":
            self._certificate()
        elif method == "scram":
            self._offerScram()
        else:
            self._askPassword()
        if pending and self.phase is not Phase.CLOSED:
            self._fromClient(pending)

    def _certificate(self) -> None:
        user = self.startup.user
        problem = None
        cert = self.client.tls.getHandle().get_peer_certificate(as_cryptography=True)
        if self.route.config.listener.client_ca is None:
            problem = "this listener has no client_ca"
        elif cert is None:
            problem = "no client certificate"
        elif self.client.verifyError is not None:
            problem = f"client certificate refused: {self.client.verifyError}"
        elif common_name(cert) != user:
            problem = f"certificate CN {common_name(cert)!r} is not the user name"
        elif self.role is None:
            problem = "not in admin.users or admin.stats_users"
        if problem is not None:
            self._loginFailed(
                "28000", f'pgtls: certificate authentication failed for user "{user}"', problem
            )
            return
        self._loggedIn("client certificate")

    # SCRAM, with pgtls as the server.

    def _offerScram(self) -> None:
        self._scram = ScramServer(self._verifier(), own_binding(self.client.tls.getHandle()))
        self._expect = self._scramFirst
        self.client.out.write(wire.authentication_sasl(self._scram.mechanisms))

    def _verifier(self) -> Verifier:
        """
        The user's verifier, or a made-up one that no password matches.
        A made-up salt must look like a real one, and stay the same for a
        name, in every worker and across restarts (a salt that changed
        would tell a made-up name from a real one): it is derived from the
        name and from the password file's secret keys, which an attacker
        does not have. Its length and iteration count are the file's most
        common ones.
        """
        user = self.startup.user
        verifiers = self.admin.verifiers
        verifier = verifiers.get(user) if self.role is not None else None
        if verifier is not None:
            self._known = True
            return verifier
        secret = hashlib.sha256()
        for name in sorted(verifiers):
            secret.update(verifiers[name].stored_key + verifiers[name].server_key)
        lengths = Counter(len(v.salt) for v in verifiers.values())
        counts = Counter(v.iterations for v in verifiers.values())
        size = lengths.most_common(1)[0][0] if lengths else _MOCK_SALT_BYTES
        salt = hmac.new(secret.digest(), user.encode("utf-8"), hashlib.sha512).digest()[:size]
        return Verifier(
            counts.most_common(1)[0][0] if counts else _MOCK_ITERATIONS,
            salt,
            os.urandom(32),
            os.urandom(32),
        )

    def _scramFirst(self, mtype: bytes, body: bytes) -> None:
        mechanism, data = wire.parse_sasl_initial_response(body)
        serverFirst = self._scram.clientFirst(mechanism, data)
        self._expect = self._scramFinal
        self.client.out.write(wire.authentication(wire.AUTH_SASL_CONTINUE, serverFirst))

    def _scramFinal(self, mtype: bytes, body: bytes) -> None:
        scram, self._scram = self._scram, None
        final = scram.clientFinal(body)
        if not self._known:
            raise ScramAuthError("no verifier for this user")
        self.client.out.write(wire.authentication(wire.AUTH_SASL_FINAL, final))
        self._loggedIn("SCRAM-SHA-256")

    # A password checked by the backend.

    def _askPassword(self) -> None:
        if self.route.config.backend.tls != "verify-full":
            self._loginFailed(
                "28000",
                "pgtls: admin console: backend authentication is only offered on routes"
                ' whose backend.tls is "verify-full"',
                "backend leg not verify-full",
            )
            return
        self._expect = self._password
        self.client.out.write(wire.AUTHENTICATION_CLEARTEXT_PASSWORD)

    def _password(self, mtype: bytes, body: bytes) -> None:
        password = wire.password_from_message(body)
        if self.role is None:
            self._passwordRefused("not in admin.users or admin.stats_users")
            return
        self._setBusy(True)
        legs: list[ServerProtocol] = []

        def login(leg: ServerProtocol) -> defer.Deferred[LoginResult]:
            legs.append(leg)
            return ServerLogin(
                leg, self.startup.user, self.admin.auth_database, password, {},
                passwordRequired=True,
            ).done  # fmt: skip

        def done(result: LoginResult | Failure) -> None:
            for leg in legs:
                leg.onLost = None
                leg.close()
            self._setBusy(False)
            if self.phase is Phase.CLOSED:
                return
            if not isinstance(result, Failure):
                self._loggedIn("password checked by the backend")
            elif result.check(ServerLoginError):
                self._passwordRefused(f"backend: {result.value.message}")
            elif result.check(BackendError):
                err = result.value
                self._loginFailed(
                    err.sqlstate, f'pgtls route "{self.route.name}": {err.message}', err.message
                )
            else:
                self._log.failure("conn={conn} admin login", result, conn=self.client.connId)
                self._loginFailed("XX000", "pgtls admin console: internal error", "error")
                return
            self._fromClient(b"")

        self.route.backend.connect().addCallback(login).addBoth(done)

    def _passwordRefused(self, why: str) -> None:
        self._loginFailed(
            "28P01", f'password authentication failed for user "{self.startup.user}"', why
        )

    # The outcome.

    def _loginFailed(self, sqlstate: str, text: str, why: str) -> None:
        """Refused: the client's message is the same whatever the reason; the log has it."""
        self._log.warn(
            "conn={conn} admin console login refused user={user}: {why}",
            conn=self.client.connId,
            user=self.startup.user,
            why=why,
        )
        self.phase = Phase.CLOSED
        self.client.refused("admin_denied")
        self.client.fail(sqlstate, text)

    def _loggedIn(self, how: str) -> None:
        self._expect = None
        self.phase = Phase.CONSOLE
        out = self.client.out
        out.write(wire.AUTHENTICATION_OK)
        for name, value in _PARAMETERS:
            out.write(wire.parameter_status(name, value))
        out.write(wire.ready_for_query())
        self.client.startupComplete()
        self._log.info(
            "conn={conn} session started route={route} user={user} database={database}"
            " admin console ({how}, role {role})",
            conn=self.client.connId,
            route=self.route.name,
            user=self.startup.user,
            database=self.startup.database,
            how=how,
            role=self.role,
        )

    def _setBusy(self, busy: bool) -> None:
        """
        While a message is answered asynchronously (a backend login, a
        query every worker answers), the client is not read: what it sends
        meanwhile waits in the socket, not in pgtls's memory.
        """
        self._busy = busy
        if self.phase is not Phase.CLOSED:
            if busy:
                self.client.pauseReading()
            else:
                self.client.resumeReading()

    def cancelTarget(self) -> None:
        return None

    # -- reading the client ----------------------------------------------------

    def _fromClient(self, data: bytes) -> None:
        self._reader.feed(data)
        self._looping = True
        try:
            while self.phase is not Phase.CLOSED and not self._busy:
                try:
                    msg = self._reader.next()
                    if msg is None:
                        return
                    self._message(*msg)
                except wire.ProtocolViolation as e:
                    self._abandon("08P01", e.message)
                    return
                except ScramAuthError as e:
                    self._passwordRefused(f"SCRAM: {e}")
                    return
                except Exception:
                    # Nothing a client sends may end in a bare close.
                    self._log.failure("conn={conn} admin console", conn=self.client.connId)
                    self._abandon("08P01", "pgtls admin console: invalid message")
                    return
        finally:
            self._looping = False

    def _message(self, mtype: bytes, body: bytes) -> None:
        if mtype == b"X":
            self._finish("client terminated")
        elif self.phase is Phase.AUTHENTICATING:
            if self._expect is None or mtype != b"p":
                raise wire.ProtocolViolation(
                    f"expected an authentication response, got message type {mtype!r}"
                )
            self._expect(mtype, body)
        else:
            self._consoleMessage(mtype, body)

    # -- the console ---------------------------------------------------------------

    def _consoleMessage(self, mtype: bytes, body: bytes) -> None:
        out = self.client.out
        if mtype == b"Q":
            sql = wire.query_text(body)
            self._log.info(
                "conn={conn} admin console user={user}: {sql}",
                conn=self.client.connId,
                user=self.startup.user,
                sql=redact(sql[:200]),
            )
            results = AdminCommands(self.route.process, self.role or "stats").run(sql)
            self._setBusy(True)
            d = defer.maybeDeferred(self.route.process.complete, results)
            d.addCallback(self._answer)
            d.addErrback(self._failedAnswer)
        elif mtype == b"S":
            self._failedUntilSync = False
            out.write(wire.ready_for_query())
        elif mtype in (b"P", b"B", b"E", b"D", b"C", b"H", b"F"):
            if not self._failedUntilSync:
                self._failedUntilSync = True
                out.write(
                    wire.error_response(
                        "0A000",
                        "pgtls admin console: only the simple query protocol is supported",
                        severity="ERROR",
                    )
                )
        else:
            raise wire.ProtocolViolation(f"pgtls admin console: unexpected message type {mtype!r}")

    def _answer(self, results: list[Result | AdminError]) -> None:
        self._setBusy(False)
        if self.phase is Phase.CLOSED:
            return
        out = self.client.out
        resume = not self._looping  # answered later: go on reading from here
        shutdown = False
        if not results:
            out.write(wire.message(b"I"))
        for result in results:
            if isinstance(result, AdminError):
                out.write(
                    wire.error_response(
                        result.sqlstate, result.message, severity="ERROR", detail=result.detail
                    )
                )
            else:
                out.write(_encode(result))
                shutdown = shutdown or result.tag == "SHUTDOWN"
        out.write(wire.ready_for_query())
        if shutdown:
            # Do not keep the shutdown waiting for this session.
            self._finish("admin SHUTDOWN")
            return
        if resume:
            self._fromClient(b"")

    def _failedAnswer(self, failure: Any) -> None:
        self._log.failure("conn={conn} admin console", failure, conn=self.client.connId)
        self._setBusy(False)
        self._abandon("XX000", "pgtls admin console: internal error")

    # -- ending ----------------------------------------------------------------------

    def drain(self) -> None:
        """An open console must not hold up a shutdown: closed at once."""
        self.terminate()

    def terminate(self) -> None:
        self._abandon("57P01", "terminating connection due to administrator command")

    def _abandon(self, sqlstate: str, text: str) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        self.client.fail(sqlstate, text)

    def _finish(self, reason: str) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        if self.client.stats.reason is None:
            self.client.stats.reason = reason
        self.client.close()

    def _clientLost(self, reason: Failure) -> None:
        self.phase = Phase.CLOSED


_PARAMETERS = (
    ("server_version", f"{__version__}/pgtls"),
    ("server_encoding", "UTF8"),
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO"),
    ("integer_datetimes", "on"),
    ("standard_conforming_strings", "on"),
    ("application_name", "pgtls admin"),
)


def _encode(result: Result) -> bytes:
    parts = [wire.notice_response(text) for text in result.notices]
    if result.columns:
        parts.append(wire.row_description(result.columns))
        parts.extend(wire.data_row(row) for row in result.rows)
        parts.append(wire.command_complete(result.tag))  # "SHOW", as PostgreSQL and PgBouncer
    else:
        parts.append(wire.command_complete(result.tag))
    return b"".join(parts)
