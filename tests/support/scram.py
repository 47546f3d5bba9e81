"""
Shared by the tests of SCRAM towards the backend (test_security_backend,
test_security_scram, test_security_scram_derivation): the server side of
SCRAM-SHA-256 as PostgreSQL runs it, a TLS server context from the suite's
PKI for scripted servers, and a L{ServerLogin} run as a pool runs it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from pgtls_twisted.config import parse_config
from pgtls_twisted.ops._metrics import Metrics
from pgtls_twisted.pool._serverlogin import ServerLogin
from pgtls_twisted.protocol._scram import prepare_password
from pgtls_twisted.proxy._backend import BackendConnector
from pgtls_twisted.proxy._derivation import DerivationThreads
from pgtls_twisted.testing.pki import PKI


def fatal_of(fields: dict[str, str]) -> tuple[str, str]:
    """The SQLSTATE and message of an ErrorResponse's fields."""
    return fields["C"], fields["M"]


# ---------------------------------------------------------------------------
# SCRAM: a server side to test the client against


class ScramServerSide:
    """
    The server side of SCRAM-SHA-256 as PostgreSQL runs it (it ignores the
    SCRAM user name, which libpq and pgtls leave empty), for fake servers.

    @ivar clientFirst: the client-first message received.
    @ivar clientFinal: the client-final message received.
    """

    def __init__(
        self,
        password: str,
        iterations: int,
        plus: bytes | None = None,
        salted: bytes | None = None,
    ) -> None:
        self.salt = b"pgtls-test-salt!"
        self.iterations = iterations
        self._password = prepare_password(password)
        self._plus = plus
        self._salted = salted
        self.clientFirst = b""
        self.clientFinal = b""
        self._serverFirst = ""
        self._bare = ""

    def salted_password(self) -> bytes:
        return hashlib.pbkdf2_hmac("sha256", self._password, self.salt, self.iterations)

    def server_first(self, clientFirst: bytes) -> bytes:
        self.clientFirst = clientFirst
        text = clientFirst.decode()
        flag, authzid, self._bare = text.split(",", 2)
        nonce = self._bare.split("r=", 1)[1]
        salt = base64.b64encode(self.salt).decode()
        self._serverFirst = f"r={nonce}server-nonce,s={salt},i={self.iterations}"
        return self._serverFirst.encode()

    def expected_cbind(self) -> bytes:
        header = self.clientFirst.split(b"n=", 1)[0]
        return header + (self._plus or b"") if header.startswith(b"p=") else header

    def server_final(self, clientFinal: bytes) -> bytes:
        """Check the proof as the server does; C{v=...} if it is right."""
        self.clientFinal = clientFinal
        without, proof = clientFinal.decode().rsplit(",p=", 1)
        assert without.startswith("c=" + base64.b64encode(self.expected_cbind()).decode() + ",")
        return self.sign(without, base64.b64decode(proof))

    def sign(self, without: str, proof: bytes | None = None) -> bytes:
        auth = f"{self._bare},{self._serverFirst},{without}".encode()
        salted = self._salted or self.salted_password()
        stored = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
        if proof is not None:
            signature = hmac.digest(stored, auth, "sha256")
            clientKey = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
            assert hashlib.sha256(clientKey).digest() == stored, "wrong client proof"
        serverKey = hmac.digest(salted, b"Server Key", "sha256")
        return b"v=" + base64.b64encode(hmac.digest(serverKey, auth, "sha256"))


def initial_response(message: bytes) -> tuple[str, bytes]:
    """The mechanism and data of a SASLInitialResponse message."""
    assert message[:1] == b"p"
    body = message[5:]
    end = body.index(b"\0")
    (length,) = struct.unpack_from("!i", body, end + 1)
    data = body[end + 5 :]
    assert len(data) == length
    return body[:end].decode(), data


@implementer(IOpenSSLServerConnectionCreator)
class ServerContext:
    """A TLS server with one of the PKI's certificates, for C{startTLS}."""

    def __init__(self, pki: PKI, name: str) -> None:
        self._ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        self._ctx.use_certificate_chain_file(str(pki.cert(name)))
        self._ctx.use_privatekey_file(str(pki.key(name)))

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._ctx, None)


#: Where L{service_login}'s connectors derive SCRAM keys.
SERVICE_LOGIN_THREADS = DerivationThreads(reactor)


async def service_login(
    tmp_path: Path, table: dict[str, Any], user: str, password: str, database: str = "postgres"
) -> Any:
    """Connect as the route's backend leg does and log in with L{ServerLogin}."""
    config = parse_config({"proxy": [table]}, base_dir=tmp_path).routes[0]
    connector = BackendConnector(
        config.name,
        config.backend,
        reactor,
        Metrics(clock=reactor),
        derivations=SERVICE_LOGIN_THREADS,
    )
    leg = await connector.connect()
    result = await ServerLogin(leg, user, database, password, {}).done
    leg.close()
    return result
