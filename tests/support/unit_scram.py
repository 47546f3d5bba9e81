"""
The server side of SCRAM-SHA-256 for the socketless tests
(L{support.unit}), written out from RFC 5802: independent of pgtls's own
L{pgtls_twisted.protocol._scramserver}, and of its password preparation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from pgtls_twisted.testing.pki import PKI
from pgtls_twisted.tls._contexts import channel_binding_data


def certificate_binding(pki: PKI, name: str = "server") -> bytes:
    """The C{tls-server-end-point} channel binding data of the PKI's certificate C{name}."""
    cert = x509.load_pem_x509_certificate(pki.cert(name).read_bytes())
    return channel_binding_data(cert.public_bytes(Encoding.DER))


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


class ScramServerSide:
    """
    A SCRAM-SHA-256 server for one exchange, as PostgreSQL runs it.

    @ivar header: the client's GS2 header (C{"n,,"}, C{"y,,"} or
        C{"p=tls-server-end-point,,"}), once L{first} has seen it.
    """

    def __init__(
        self,
        password: str,
        *,
        salt: bytes = b"pepper-and-salt!",
        iterations: int = 4096,
        nonce: str = "SeRvErNoNcE",
        binding: bytes | None = None,
    ) -> None:
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
        self.storedKey = hashlib.sha256(_hmac(salted, b"Client Key")).digest()
        self.serverKey = _hmac(salted, b"Server Key")
        self.salt = salt
        self.iterations = iterations
        self.serverNonce = nonce
        self.binding = binding
        self.header = ""
        self._bare = ""
        self._serverFirst = ""

    def first(self, clientFirst: bytes) -> bytes:
        """The client-first-message (GS2 header included) to server-first."""
        text = clientFirst.decode("ascii")
        flag, authzid, bare = text.split(",", 2)
        self.header = f"{flag},{authzid},"
        self._bare = bare
        clientNonce = dict(part.split("=", 1) for part in bare.split(","))["r"]
        salt = base64.b64encode(self.salt).decode()
        self._serverFirst = f"r={clientNonce}{self.serverNonce},s={salt},i={self.iterations}"
        return self._serverFirst.encode("ascii")

    def final(self, clientFinal: bytes) -> bytes:
        """
        Check client-final (channel binding data and proof).

        @return: server-final, carrying the server's signature.
        @raise AssertionError: the client got something wrong.
        """
        text = clientFinal.decode("ascii")
        withoutProof, _, proof = text.rpartition(",p=")
        attributes = dict(part.split("=", 1) for part in withoutProof.split(","))
        cbind = self.header.encode()
        if self.header.startswith("p="):
            assert self.binding is not None
            cbind += self.binding
        assert base64.b64decode(attributes["c"]) == cbind, "wrong channel binding data"
        authMessage = f"{self._bare},{self._serverFirst},{withoutProof}".encode()
        signature = _hmac(self.storedKey, authMessage)
        clientKey = bytes(a ^ b for a, b in zip(base64.b64decode(proof), signature, strict=True))
        assert hashlib.sha256(clientKey).digest() == self.storedKey, "wrong proof"
        return b"v=" + base64.b64encode(_hmac(self.serverKey, authMessage))
