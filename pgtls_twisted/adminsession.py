# -*- test-case-name: tests.test_admin -*-
"""
The admin console's side of the protocol: a client whose startup packet
names C{admin.database} talks to pgtls itself, not to a backend.

Who may: the user must be in C{admin.users}. With C{listener.mtls} on, the
verified client certificate's CN must be that user, and nothing else is
asked. Otherwise the password is checked by the route's backend, exactly as
for any session (same SCRAM termination, same TLS rules), on a temporary
connection to C{admin.auth_database}; at that connection's first
ReadyForQuery pgtls closes it and the client is in the console.

The console speaks the simple query protocol (what psql and PgBouncer's
console use); extended-protocol messages get an error until their Sync.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer

from . import __version__, wire
from .admin import AdminCommands, AdminError, Result
from .logs import Logger
from .redact import redact
from .session import Session

if TYPE_CHECKING:
    from .config import AdminConfig
    from .frontend import ClientProtocol
    from .route import Route


class AdminSession(Session):
    """One admin console client."""

    _log = Logger()

    def __init__(
        self, route: Route, client: ClientProtocol, startup: wire.StartupMessage, admin: AdminConfig
    ) -> None:
        super().__init__(route, client, startup)
        self.admin = admin
        self._reader = wire.MessageReader()
        self._failedUntilSync = False
        #: A query is being answered (with workers, other workers are asked):
        #: later messages wait in the reader.
        self._busy = False
        self._looping = False

    def start(self) -> None:
        user = self.startup.user
        client = self.client
        if user not in self.admin.users:
            client.refused("admin_denied")
            client.fail("28000", f'pgtls: user "{user}" may not use the admin console')
            return
        if self.route.config.listener.mtls and client.tls is not None:
            cert = client.tls.getHandle().get_peer_certificate(as_cryptography=True)
            cn = _common_name(cert)
            if cn != user:
                client.refused("admin_denied")
                client.fail(
                    "28000",
                    f'pgtls: admin console: certificate CN "{cn}" does not match user "{user}"',
                )
                return
            out = client.out
            out.write(wire.AUTHENTICATION_OK)
            for name, value in _PARAMETERS:
                out.write(wire.parameter_status(name, value))
            out.write(wire.ready_for_query())
            self._console("client certificate")
            return
        # The password is the backend's to check, on a temporary connection.
        parameters = {k: v for k, v in self.startup.parameters.items() if k != "replication"}
        parameters["database"] = self.admin.auth_database
        version = (self.startup.major << 16) | self.startup.minor
        raw = wire.encode_startup_message(parameters, version)
        self.startup = wire.StartupMessage(self.startup.major, self.startup.minor, parameters, raw)
        super().start()

    def _startPump(self) -> None:
        """The backend accepted the login: drop it and open the console."""
        server, self.server = self.server, None
        assert server is not None
        server.onLost = None
        server.close()
        if self._mintedPid is not None:
            self.route.cancels.forget(self._mintedPid)
            self._mintedPid = None
        self._backendKey = None
        early = self._clientReader.drain()
        self._console("password checked by the backend")
        if early:
            self._fromClient(early)

    def _console(self, how: str) -> None:
        self._started(" admin console ({how})", how=how)
        self.client.deliver = self._fromClient
        self.client.onLost = self._clientLost
        self.client.transport.resumeProducing()
        pending = bytes(self.client.pending)
        self.client.pending = bytearray()
        if pending:
            self._fromClient(pending)

    def cancelTarget(self) -> None:
        return None

    # -- the console ---------------------------------------------------------------

    def _fromClient(self, data: bytes) -> None:
        self._reader.feed(data)
        self._looping = True
        try:
            while not self._done and not self._busy:
                try:
                    msg = self._reader.next()
                except wire.ProtocolViolation as e:
                    self._abandon("08P01", e.message)
                    return
                if msg is None:
                    return
                self._message(*msg)
        finally:
            self._looping = False

    def _message(self, mtype: bytes, body: bytes) -> None:
        out = self.client.out
        if mtype == b"X":
            self._finish("client terminated")
        elif mtype == b"Q":
            sql = wire.query_text(body)
            self._log.info(
                "conn={conn} admin console user={user}: {sql}",
                conn=self.client.connId,
                user=self.startup.user,
                sql=redact(sql[:200]),
            )
            results = AdminCommands(self.route.process).run(sql)
            self._busy = True
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
            self._abandon("08P01", f"pgtls admin console: unexpected message type {mtype!r}")

    def _answer(self, results: list[Result | AdminError]) -> None:
        self._busy = False
        if self._done:
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
        self._busy = False
        self._abandon("XX000", "pgtls admin console: internal error")

    def drain(self) -> None:
        """An open console must not hold up a shutdown: closed at once."""
        self.terminate()

    def terminate(self) -> None:
        if self.client.startupDone:
            self.client.fail("57P01", "terminating connection due to administrator command")
            self._finish("pgtls shutdown")
        else:
            super().terminate()


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


def _common_name(cert: Any) -> str | None:
    if cert is None:
        return None
    from cryptography.x509.oid import NameOID

    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = cns[0].value if cns else None
    return value if isinstance(value, str) else None
