# -*- test-case-name: tests.test_security_scram_derivation,tests.test_pooling -*-
"""
pgtls logging in to the backend under its own name (the pool's service
user), or as a client's role with what L{pgtls_twisted.pool._logincache}
kept of its password, on a backend leg that L{pgtls_twisted.proxy._backend.BackendConnector}
has made ready.

This is the client side of PostgreSQL's startup: send a StartupMessage,
answer the authentication request (cleartext, MD5, or SCRAM-SHA-256, bound
to the server's certificate with -PLUS when the leg is TLS), and collect
the ParameterStatus set and the BackendKeyData up to the first
ReadyForQuery. The password never leaves this module and is never logged.

What the server may ask for is the route's L{pgtls_twisted.protocol._authpolicy}
(C{backend.require_auth}; never the cleartext password over a leg that is
not verified TLS), and the SCRAM keys are derived in a thread, within
C{backend.max_scram_iterations}.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer

from pgtls_twisted.pool._logincache import Secret
from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.protocol._authpolicy import REFUSED, LoginGuard
from pgtls_twisted.protocol._md5 import Md5Secret
from pgtls_twisted.protocol._scram import (
    SCRAM_SHA_256_PLUS,
    ScramKeys,
    ScramLogin,
    ScramLoginError,
)
from pgtls_twisted.proxy._backend import BackendError
from pgtls_twisted.tls._contexts import peer_binding


@dataclass
class LoginResult:
    """What a finished login learned about its server session."""

    parameters: dict[str, str] = field(default_factory=dict)
    backendKey: tuple[int, bytes] | None = None


class ServerLoginError(BackendError):
    """The server refused the login; C{fields} holds its ErrorResponse, if any."""

    def __init__(self, sqlstate: str, message: str, fields: dict[str, str] | None = None) -> None:
        super().__init__(sqlstate, message)
        self.fields = fields or {}


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """PostgreSQL's MD5 response: md5(md5(password + user) + salt), hex, prefixed."""
    inner = hashlib.md5((password + user).encode()).hexdigest().encode()  # noqa: S324 (the protocol's)
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode()  # noqa: S324


#: How long pgtls's own login may take once the backend leg is ready
#: (PostgreSQL's default C{authentication_timeout}): a server that stalls
#: must not hold a pool's opening slot, or the console's check, for ever.
LOGIN_TIMEOUT = 60.0


class _Refused(Exception):
    """The server asked for something L{LoginGuard} does not allow."""


class ServerLogin:
    """
    Drive one login on a ready backend leg; L{done} fires with a L{LoginResult}.

    @param server: a L{pgtls_twisted.proxy._backend.ServerProtocol}; its
        connector's C{backend} configuration and SCRAM derivation threads
        are the ones used.
    """

    def __init__(
        self,
        server: Any,
        user: str,
        database: str,
        password: str | Secret | None,
        parameters: dict[str, str],
        passwordRequired: bool = False,
    ) -> None:
        """
        @param password: the password, or what a login cache kept of one
            (SCRAM keys, an MD5 hash), or C{None} (the server must not ask).
        @param passwordRequired: the login must prove the password: a
            server that lets the user in without asking for one (C{trust})
            fails it. For the admin console's C{backend} authentication,
            where the login I{is} the password check.
        """
        self._server = server
        self._passwordRequired = passwordRequired
        self._askedPassword = False
        self._user = user
        self._password = password
        self._reader = wire.MessageReader()
        self._scram: ScramLogin | None = None
        self._backend = server.connector.config
        self._derivations = server.connector.derivations
        self._guard = LoginGuard(
            self._backend.require_auth, self._backend.tls, server.tls is not None
        )
        #: The SCRAM keys are being derived: later messages wait in the reader.
        self._deriving = False
        self._result = LoginResult()
        self.done: defer.Deferred[LoginResult] = defer.Deferred()
        timer = server.connector.clock.callLater(LOGIN_TIMEOUT, self._expired)
        self.done.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
        startup = {"user": user, "database": database, **parameters}
        server.deliver = self._data
        server.onLost = self._lost
        server.out.write(wire.encode_startup_message(startup))

    def _data(self, data: bytes) -> None:
        self._reader.feed(data)
        while not self.done.called and not self._deriving:
            try:
                msg = self._reader.next()
                if msg is None:
                    return
                self._message(*msg)
            except _Refused as e:
                self._fail(REFUSED, str(e))
            except ScramLoginError as e:
                self._fail(e.sqlstate, f"backend login failed: {e}")
            except wire.ProtocolViolation as e:
                self._fail("08006", f"backend login failed: {e}")

    def _message(self, mtype: bytes, body: bytes) -> None:
        out = self._server.out
        if mtype == b"R":
            code = wire.auth_code(body)
            refusal = self._guard.refusal(code)
            if refusal is not None:
                raise _Refused(refusal)
            if code == wire.AUTH_OK:
                if self._passwordRequired and not self._askedPassword:
                    raise ScramLoginError("the server did not ask for a password")
                if self._scram is not None and not self._scram.done:
                    raise ScramLoginError(
                        "server accepted the login without proving it knows the password"
                    )
            elif code == wire.AUTH_CLEARTEXT_PASSWORD:
                out.write(wire.message(b"p", self._cleartext().encode() + b"\0"))
            elif code == wire.AUTH_MD5_PASSWORD:
                secret = self._secret()
                if isinstance(secret, Md5Secret):
                    answer = secret.response(body[4:8])
                elif isinstance(secret, str):
                    answer = md5_password(self._user, secret, body[4:8])
                else:
                    raise ScramLoginError("the server asks for MD5 and pgtls has SCRAM keys")
                out.write(wire.message(b"p", answer + b"\0"))
            elif code == wire.AUTH_SASL:
                secret = self._secret()
                self._scram = ScramLogin(
                    wire.sasl_mechanisms(body),
                    self._binding(body),
                    tls=self._server.tls is not None,
                    maxIterations=self._backend.max_scram_iterations,
                )
                if isinstance(secret, ScramKeys):
                    out.write(self._scram.startWithKeys(secret))
                elif isinstance(secret, str):
                    out.write(self._scram.start(secret))
                else:
                    raise ScramLoginError("the server asks for SCRAM and pgtls has an MD5 hash")
                self._password = None
            elif code == wire.AUTH_SASL_CONTINUE and self._scram is not None:
                derivation = self._scram.challenge(body[4:], self._run)
                self._deriving = True
                derivation.addCallback(self._clientFinal).addErrback(self._derivationFailed)
            elif code == wire.AUTH_SASL_FINAL and self._scram is not None:
                self._scram.finish(body[4:])
            else:
                self._fail(
                    "28000",
                    f"backend asked for an authentication method pgtls cannot use (code {code})",
                )
        elif mtype == b"S":
            name, value = wire.parse_parameter_status(body)
            self._result.parameters[name] = value
        elif mtype == b"K":
            self._result.backendKey = wire.parse_backend_key_data(body)
        elif mtype == b"E":
            fields = wire.parse_error_fields(body)
            self._fail(
                fields.get("C", "08006"), fields.get("M", "backend refused the login"), fields
            )
        elif mtype == b"Z":
            self._server.deliver = _unexpected
            self._server.onLost = None
            self.done.callback(self._result)
        # NoticeResponse and NegotiateProtocolVersion need nothing.

    def _clientFinal(self, message: bytes) -> None:
        """The keys are ready: send client-final, then read on."""
        self._deriving = False
        if self.done.called:
            return
        self._server.out.write(message)
        self._data(b"")

    def _derivationFailed(self, failure: Any) -> None:
        self._deriving = False
        self._fail("08006", f"backend login failed: {failure.getErrorMessage()}")

    def _secret(self) -> str | Secret:
        self._askedPassword = True
        if self._password is None:
            raise ScramLoginError("the server asked for a password and none is configured")
        return self._password

    def _cleartext(self) -> str:
        secret = self._secret()
        if not isinstance(secret, str):
            raise ScramLoginError(
                "the server asks for a cleartext password, which pgtls does not keep"
            )
        return secret

    def _run(self, f: Any, *args: Any) -> defer.Deferred[Any]:
        """Derive in a thread; keys already derived need no thread."""
        if not args:
            return defer.maybeDeferred(f)
        return self._derivations.run(f, *args)

    def _binding(self, body: bytes) -> bytes | None:
        if self._server.tls is None or SCRAM_SHA_256_PLUS not in wire.sasl_mechanisms(body):
            return None
        return peer_binding(self._server.tls.getHandle())

    def _fail(self, sqlstate: str, message: str, fields: dict[str, str] | None = None) -> None:
        self._password = None
        if not self.done.called:
            self._server.onLost = None
            self._server.close()
            self.done.errback(ServerLoginError(sqlstate, message, fields))

    def _expired(self) -> None:
        self._fail("08006", f"backend login did not complete within {LOGIN_TIMEOUT:g}s")

    def _lost(self, reason: Any) -> None:
        if not self.done.called:
            self.done.errback(
                ServerLoginError("08006", "backend closed the connection during login")
            )


def _unexpected(data: bytes) -> None:
    """Replaced by the pool as soon as the login is done."""
