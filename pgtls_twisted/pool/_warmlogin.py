# -*- test-case-name: tests.test_identity,tests.test_logincache -*-
"""
A login pgtls answers itself, from what the server accepted last time
(L{pgtls_twisted.pool._logincache}): no temporary connection, no backend
fork, no password on any wire.

For a SCRAM role pgtls is the SCRAM-SHA-256 server, with the server's own
salt and iteration count, so the client's proof is the one it would send
the server. It offers C{SCRAM-SHA-256-PLUS} bound to its own certificate
(C{tls-server-end-point}), so libpq's C{channel_binding=require} and
C{require_auth=scram-sha-256} hold, and checks the proof against the
cached StoredKey; the ClientKey it recovers is what the pool logs in with.
For an MD5 role it sends its own MD5 challenge and checks the answer
against the cached hash.

Then it says what the server said at that login (AuthenticationOk, the
ParameterStatus set with the client's own startup parameters on top,
NegotiateProtocolVersion if the client asked for more than the server
speaks) with a cancel key of pgtls's, and ReadyForQuery.

A wrong password gets PostgreSQL's own answer, FATAL 28P01 C{password
authentication failed for user "..."}, and nothing reaches the server.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

from pgtls_twisted.pool._logincache import CachedLogin
from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.protocol._md5 import Md5Secret
from pgtls_twisted.protocol._scram import ScramKeys
from pgtls_twisted.protocol._scramserver import ScramAuthError, ScramServer, Verifier
from pgtls_twisted.protocol._txstate import canonicalParameter

#: PostgreSQL's SASL error text, and its 28P01.
_FAILED = 'password authentication failed for user "{user}"'


class WarmLogin:
    """
    The authentication exchange with one client, pgtls as the server: feed
    it the client's messages (L{message}); it calls C{succeeded(secret)}
    with what the pool should log in with, or C{failed(sqlstate, text,
    why)}.
    """

    def __init__(
        self,
        out: Any,
        user: str,
        cached: CachedLogin,
        binding: bytes | None,
        succeeded: Callable[[Any], None],
        failed: Callable[[str, str, str], None],
    ) -> None:
        self._out = out
        self._user = user
        self._cached = cached
        self._succeeded = succeeded
        self._failed = failed
        secret = cached.secret
        self._scram: ScramServer | None = None
        self._salt = b""
        if isinstance(secret, ScramKeys):
            verifier = Verifier(
                secret.iterations, secret.salt, secret.stored_key, secret.server_key
            )
            self._scram = ScramServer(verifier, binding)
            self._expect: Callable[[bytes, bytes], None] = self._scramFirst
            out.write(wire.authentication_sasl(self._scram.mechanisms))
        else:
            self._salt = os.urandom(4)
            self._expect = self._md5
            out.write(wire.authentication(wire.AUTH_MD5_PASSWORD, self._salt))

    def message(self, mtype: bytes, body: bytes) -> None:
        """One message from the client while it logs in."""
        if mtype != b"p":
            self._failed("08P01", f"expected a password response, got message type {mtype!r}", "")
            return
        try:
            self._expect(mtype, body)
        except (ScramAuthError, wire.ProtocolViolation) as e:
            self._failed("28P01", _FAILED.format(user=self._user), str(e))

    def _scramFirst(self, mtype: bytes, body: bytes) -> None:
        assert self._scram is not None
        mechanism, data = wire.parse_sasl_initial_response(body)
        serverFirst = self._scram.clientFirst(mechanism, data)
        self._expect = self._scramFinal
        self._out.write(wire.authentication(wire.AUTH_SASL_CONTINUE, serverFirst))

    def _scramFinal(self, mtype: bytes, body: bytes) -> None:
        scram, self._scram = self._scram, None
        assert scram is not None
        final = scram.clientFinal(body)
        keys = self._cached.secret
        assert isinstance(keys, ScramKeys) and scram.clientKey is not None
        self._out.write(wire.authentication(wire.AUTH_SASL_FINAL, final))
        self._succeeded(keys)

    def _md5(self, mtype: bytes, body: bytes) -> None:
        secret = self._cached.secret
        assert isinstance(secret, Md5Secret)
        if not secret.check(body.rstrip(b"\0"), self._salt):
            raise ScramAuthError("wrong password")
        self._succeeded(secret)


def reportedParameters(cached: CachedLogin, startup: wire.StartupMessage) -> list[tuple[str, str]]:
    """
    The ParameterStatus set a login answered by pgtls reports: the server's
    at the cached login, with the tracked parameters the client gave in its
    startup packet in place of the first client's (an C{application_name}
    it did not give is empty). The pool then brings each server connection
    in line with these, as after any login.
    """
    given = {}
    for name, value in startup.parameters.items():
        canonical = canonicalParameter(name)
        if canonical is not None:
            given[canonical] = value
    given.setdefault("application_name", "")
    reported = []
    for name, value in cached.parameters:
        canonical = canonicalParameter(name)
        if canonical is not None and canonical in given:
            value = given[canonical]
        reported.append((name, value))
    return reported


def startupAnswer(
    cached: CachedLogin,
    startup: wire.StartupMessage,
    reported: list[tuple[str, str]],
    minted: tuple[int, bytes] | None,
) -> bytes:
    """
    What the server would send after AuthenticationOk: NegotiateProtocolVersion
    when the client asked for more than the server speaks, the
    L{reportedParameters}, the cancel key pgtls minted, and ReadyForQuery
    (without C{minted}, neither: session mode says them once its server is
    known).
    """
    out = [wire.AUTHENTICATION_OK]
    minor = startup.version & 0xFFFF
    protocolOptions = sorted(k for k in startup.parameters if k.startswith("_pq_."))
    if minor > cached.minor or protocolOptions:
        body = struct.pack("!ii", min(minor, cached.minor), len(protocolOptions))
        body += b"".join(name.encode() + b"\0" for name in protocolOptions)
        out.append(wire.message(b"v", body))
    out.extend(wire.parameter_status(name, value) for name, value in reported)
    if minted is not None:
        out.append(wire.backend_key_data(*minted))
        out.append(wire.ready_for_query(b"I"))
    return b"".join(out)
