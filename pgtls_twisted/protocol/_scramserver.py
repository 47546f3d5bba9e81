# -*- test-case-name: tests.test_scramserver -*-
"""
pgtls as the SCRAM-SHA-256 server (RFC 5802, RFC 7677), in PostgreSQL's
dialect: what the admin console's C{scram} authentication speaks to libpq.

Why not C{scramp}'s server? PostgreSQL clients send an empty user name in
their messages (C{n=,}: the startup packet's user is the one that
counts), which C{scramp} refuses, and its messages must be checked byte
for byte against what the client proved, so they cannot be rewritten on
the way in. The server side is small: parse two messages, compare one
hash in constant time.

Channel binding is C{tls-server-end-point} to the certificate pgtls
showed the client. When pgtls can bind, it offers C{-PLUS}, and a client
that says C{y} ("I can bind, but you did not offer it") is refused: the
offer was tampered with. Pure code, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass, field

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS = "SCRAM-SHA-256-PLUS"
_BINDING_TYPE = "tls-server-end-point"
#: PostgreSQL's SCRAM_RAW_NONCE_LEN.
_NONCE_BYTES = 18


class ScramAuthError(Exception):
    """The exchange failed: a bad message, a bad binding, or a wrong password."""


@dataclass(frozen=True)
class Verifier:
    """What the server keeps of a password (PostgreSQL's C{rolpassword})."""

    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ScramAuthError(f"malformed SCRAM message: invalid base64 in {what}") from None


def _attributes(text: str, names: str) -> tuple[list[str], list[str]]:
    """
    Split C{text} at commas and check that its first attributes are
    C{names}, in order (C{"nr"}: C{n=...,r=...}).

    @return: their values, and whatever attributes follow (extensions).
    """
    parts = text.split(",")
    if len(parts) < len(names):
        raise ScramAuthError("malformed SCRAM message: missing attributes")
    values = []
    for part, name in zip(parts, names, strict=False):
        if part[:2] != f"{name}=":
            raise ScramAuthError(f'malformed SCRAM message: expected attribute "{name}"')
        values.append(part[2:])
    return values, parts[len(names) :]


class ScramServer:
    """
    One exchange: L{clientFirst}, then L{clientFinal}.

    @param verifier: the user's, or a made-up one (a name without a
        verifier must take the same path to the same failure).
    @param binding: the C{tls-server-end-point} data of the certificate
        pgtls presented, or C{None} when it cannot bind (no TLS, or a
        certificate without one hash algorithm).
    """

    def __init__(
        self, verifier: Verifier, binding: bytes | None, nonce: bytes | None = None
    ) -> None:
        self._verifier = verifier
        self._binding = binding
        self._serverNonce = _b64(nonce if nonce is not None else os.urandom(_NONCE_BYTES))
        self._header = ""
        self._clientFirstBare = ""
        self._serverFirst = ""
        self._nonce = ""
        #: The client's ClientKey, recovered from its proof once it is
        #: verified: with the verifier's ServerKey, what pgtls needs to log
        #: in to the server as that user (the password itself is not).
        self.clientKey: bytes | None = None

    @property
    def mechanisms(self) -> list[str]:
        """What to offer, best first."""
        return [SCRAM_SHA_256_PLUS, SCRAM_SHA_256] if self._binding is not None else [SCRAM_SHA_256]

    def clientFirst(self, mechanism: str, message: bytes) -> bytes:
        """
        The client-first-message of the SASLInitialResponse.

        @return: the server-first-message.
        @raise ScramAuthError: a mechanism not offered, a malformed message
            or a binding that does not fit the mechanism.
        """
        if mechanism not in self.mechanisms:
            raise ScramAuthError("client selected an invalid SASL authentication mechanism")
        text = _text(message)
        flag, _, rest = text.partition(",")
        authzid, comma, bare = rest.partition(",")
        if not comma:
            raise ScramAuthError("malformed SCRAM message: no GS2 header")
        if mechanism == SCRAM_SHA_256_PLUS:
            if flag != f"p={_BINDING_TYPE}":
                raise ScramAuthError(
                    "SCRAM channel binding negotiation error: -PLUS chosen without binding"
                )
        elif flag == "y":
            if self._binding is not None:
                # The client can bind and we offered -PLUS: it did not see
                # the offer, so someone removed it on the way.
                raise ScramAuthError(
                    "SCRAM channel binding negotiation error: the client saw no -PLUS offer"
                )
        elif flag != "n":
            raise ScramAuthError("malformed SCRAM message: unexpected channel binding flag")
        if authzid:
            raise ScramAuthError("client uses authorization identity, which is not supported")
        (_, clientNonce), _ = _attributes(bare, "nr")
        # RFC 5802: printable ASCII but ",".
        if not clientNonce or any(not "!" <= c <= "~" or c == "," for c in clientNonce):
            raise ScramAuthError("malformed SCRAM message: invalid nonce")
        self._header = f"{flag},{authzid},"
        self._clientFirstBare = bare
        self._nonce = clientNonce + self._serverNonce
        v = self._verifier
        self._serverFirst = f"r={self._nonce},s={_b64(v.salt)},i={v.iterations}"
        return self._serverFirst.encode("ascii")

    def clientFinal(self, message: bytes) -> bytes:
        """
        The client-final-message of the SASLResponse.

        @return: the server-final-message (the server's signature).
        @raise ScramAuthError: a bad binding, nonce or proof.
        """
        if not self._serverFirst:
            raise ScramAuthError("SCRAM client-final-message before the client-first-message")
        text = _text(message)
        withoutProof, sep, proofText = text.rpartition(",p=")
        if not sep:
            raise ScramAuthError("malformed SCRAM message: no proof")
        (channel, nonce), _ = _attributes(withoutProof, "cr")
        expected = self._header.encode("ascii")
        if self._header.startswith("p="):
            assert self._binding is not None
            expected += self._binding
        if not hmac.compare_digest(_unb64(channel, "channel binding"), expected):
            raise ScramAuthError("SCRAM channel binding check failed")
        if not hmac.compare_digest(nonce.encode(), self._nonce.encode()):
            raise ScramAuthError("SCRAM nonce mismatch")
        proof = _unb64(proofText, "proof")
        v = self._verifier
        authMessage = f"{self._clientFirstBare},{self._serverFirst},{withoutProof}".encode()
        signature = hmac.new(v.stored_key, authMessage, hashlib.sha256).digest()
        if len(proof) != len(signature):
            raise ScramAuthError("malformed SCRAM message: proof of the wrong length")
        clientKey = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(clientKey).digest(), v.stored_key):
            raise ScramAuthError("wrong password")
        self.clientKey = clientKey
        serverSignature = hmac.new(v.server_key, authMessage, hashlib.sha256).digest()
        return f"v={_b64(serverSignature)}".encode("ascii")


def _text(message: bytes) -> str:
    try:
        return message.decode("utf-8")
    except UnicodeDecodeError:
        raise ScramAuthError("malformed SCRAM message: not UTF-8") from None
