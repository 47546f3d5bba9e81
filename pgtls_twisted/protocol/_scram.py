# -*- test-case-name: tests.test_security_scram,tests.test_security_scram_derivation,tests.test_security_backend -*-
"""
pgtls logging in to the backend with SCRAM-SHA-256 on the client's behalf.

Relayed unchanged through two TLS legs, SCRAM fails for every default libpq
client: the server offers SCRAM-SHA-256-PLUS, the client binds to the
I{proxy's} certificate, and the server finds the binding wrong; stripping
-PLUS only makes the server reject the client's C{y} flag (RFC 5802
downgrade detection) instead. So when both legs are TLS, pgtls asks the
client for its password (only ever inside the client's TLS session) and
runs SCRAM itself, bound to the backend's real certificate where -PLUS is
offered. The password lives only in this object and only until the
client-final message is built; it is never logged.

The client side of RFC 5802 is written out here rather than taken from
scramp's C{ScramClient}, because pgtls needs what libpq does and scramp
does not:

 - the C{y} channel-binding flag when the leg is TLS but the server offered
   no -PLUS, so that a man in the middle who strips -PLUS is caught by the
   server;
 - a password SASLprep rejects used as its raw bytes, as libpq and the
   server do (scramp raises);
 - an empty SCRAM user name (PostgreSQL takes the startup packet's), so no
   user name can fail SASLprep either;
 - the key derivation (PBKDF2, the costly part) handed to a runner (in
   production, threads: L{pgtls_twisted.proxy._derivation}), with the
   iteration count checked against C{backend.max_scram_iterations}
   before it starts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from scramp import ScramException, ScramMechanism
from scramp.utils import saslprep

from pgtls_twisted.protocol import _wire as wire

if TYPE_CHECKING:
    from twisted.internet import defer

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS = "SCRAM-SHA-256-PLUS"

#: Random bytes in the client nonce, as libpq (SCRAM_RAW_NONCE_LEN).
_NONCE_BYTES = 18

#: Runs C{f(*args)} somewhere and fires with its result.
Runner = Callable[..., "defer.Deferred[Any]"]


class ScramLoginError(Exception):
    """
    The exchange cannot go on: unsupported mechanisms or a bad server.

    @ivar sqlstate: what the client is told: 08006 for a server that broke
        the exchange, 28000 for a request pgtls refuses by policy.
    """

    sqlstate = "08006"


class ScramPolicyError(ScramLoginError):
    """The server asked for more than the configuration allows."""

    sqlstate = "28000"


def prepare_password(password: bytes | str) -> bytes:
    """
    The password as SCRAM hashes it: SASLprep'd (RFC 4013) when that
    succeeds, else the raw bytes, exactly as PostgreSQL's C{pg_saslprep}
    callers do on both sides (so a verifier made by C{ALTER ROLE ...
    PASSWORD} matches): pure ASCII and invalid UTF-8 are used as they are,
    and a string with a prohibited or unassigned character is used raw.
    """
    raw = password.encode("utf-8") if isinstance(password, str) else bytes(password)
    if raw.isascii():
        return raw
    try:
        return saslprep(raw.decode("utf-8")).encode("utf-8")
    except (UnicodeDecodeError, ScramException):
        return raw


def salted_password(password: bytes, salt: bytes, iterations: int) -> bytes:
    """RFC 5802's Hi(): PBKDF2-HMAC-SHA-256. The costly step; runs in a thread."""
    return hashlib.pbkdf2_hmac("sha256", password, salt, iterations)


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise ScramLoginError(f"malformed SCRAM message (invalid {what})") from None


def _attribute(part: str, name: str, message: str) -> str:
    if not part.startswith(name + "="):
        raise ScramLoginError(f"malformed SCRAM message ({name}= expected in {message})")
    return part[2:]


@dataclass(frozen=True)
class ScramKeys:
    """
    What a password comes to for one SCRAM verifier (RFC 5802): enough to
    log in (C{client_key}, C{server_key}, for that C{salt} and iteration
    count) and to check a client's proof (L{stored_key}), but not the
    password itself, which cannot be recovered from them.
    """

    salt: bytes
    iterations: int
    client_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    @property
    def stored_key(self) -> bytes:
        return hashlib.sha256(self.client_key).digest()


def derive_keys(password: bytes, salt: bytes, iterations: int) -> ScramKeys:
    """The costly step: PBKDF2 of the (SASLprep'd) password, then two HMACs."""
    salted = salted_password(password, salt, iterations)
    return ScramKeys(salt, iterations, _hmac(salted, b"Client Key"), _hmac(salted, b"Server Key"))


class ScramKeysStale(ScramLoginError):
    """
    The server's salt or iteration count is not the cached keys': the
    password was changed (or the role re-created) since they were derived.
    """

    sqlstate = "28P01"


class ScramLogin:
    """
    The client side of one SCRAM exchange, as a small state machine fed the
    bodies of the server's authentication messages.

    @ivar mechanism: the mechanism chosen from the server's offer.
    @ivar gs2Header: C{p=tls-server-end-point,,} (bound to the server's
        certificate), C{y,,} (the leg is TLS but the server offered no
        -PLUS: the server fails the login if it does support binding, so a
        stripped offer is caught) or C{n,,} (no TLS, or binding impossible
        although offered).
    @ivar done: the server proved it knows the verifier.
    """

    def __init__(
        self,
        offered: list[str],
        channelBinding: bytes | None,
        *,
        tls: bool,
        maxIterations: int,
    ) -> None:
        if channelBinding is not None and SCRAM_SHA_256_PLUS in offered:
            self.mechanism = SCRAM_SHA_256_PLUS
            self.gs2Header = b"p=tls-server-end-point,,"
            self._cbindInput = self.gs2Header + channelBinding
        elif SCRAM_SHA_256 in offered:
            self.mechanism = SCRAM_SHA_256
            self.gs2Header = b"y,," if tls and SCRAM_SHA_256_PLUS not in offered else b"n,,"
            self._cbindInput = self.gs2Header
        else:
            raise ScramLoginError(
                f"server offered no supported SASL mechanism ({', '.join(offered)})"
            )
        self._maxIterations = maxIterations
        self._nonce = _b64(secrets.token_bytes(_NONCE_BYTES))
        self._clientFirstBare = f"n=,r={self._nonce}"
        self._password: bytes | None = None
        self._keys: ScramKeys | None = None
        self._serverSignature: bytes | None = None
        #: The keys the exchange used, once derived (or given): what a
        #: login cache keeps instead of the password.
        self.keys: ScramKeys | None = None
        self.done = False

    def start(self, password: bytes | str) -> bytes:
        """@return: the SASLInitialResponse message carrying client-first."""
        self._password = prepare_password(password)
        return self._first()

    def startWithKeys(self, keys: ScramKeys) -> bytes:
        """
        Like L{start}, with keys derived at an earlier login instead of a
        password: no PBKDF2, and the server's salt and iteration count must
        be the keys' (L{ScramKeysStale} otherwise).
        """
        self._keys = keys
        return self._first()

    def _first(self) -> bytes:
        first = self.gs2Header + self._clientFirstBare.encode("ascii")
        return wire.sasl_initial_response(self.mechanism, first)

    def challenge(self, serverFirst: bytes, run: Runner) -> defer.Deferred[bytes]:
        """
        Check the server-first message, then derive the keys with C{run}
        (a thread, in production) and build client-final.

        @raise ScramLoginError: at once, before any derivation, for a
            malformed message; L{ScramPolicyError} for too many iterations.
        @return: a Deferred firing with the SASLResponse message carrying
            client-final.
        """
        if (self._password is None and self._keys is None) or self._serverSignature is not None:
            raise ScramLoginError("unexpected SASL continue message")
        try:
            text = serverFirst.decode("ascii")
        except UnicodeDecodeError:
            raise ScramLoginError("malformed SCRAM message (not ASCII)") from None
        nonce, salt, iterations = self._parseServerFirst(text)
        keys, self._keys = self._keys, None
        if keys is not None:
            if keys.salt != salt or keys.iterations != iterations:
                raise ScramKeysStale("the password changed since pgtls cached this user's keys")
            return run(lambda: keys).addCallback(self._clientFinal, text, nonce)
        password, self._password = self._password, None
        d = run(derive_keys, password, salt, iterations)
        return d.addCallback(self._clientFinal, text, nonce)

    def _parseServerFirst(self, text: str) -> tuple[str, bytes, int]:
        """C{r=<nonce>,s=<salt>,i=<iterations>}, nothing more (as libpq)."""
        parts = text.split(",")
        if len(parts) != 3:
            raise ScramLoginError("malformed SCRAM message (server-first-message)")
        nonce = _attribute(parts[0], "r", "server-first-message")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise ScramLoginError("invalid SCRAM response (nonce mismatch)")
        salt = _b64decode(_attribute(parts[1], "s", "server-first-message"), "salt")
        count = _attribute(parts[2], "i", "server-first-message")
        if not salt or not (count.isascii() and count.isdigit()) or len(count) > 10:
            raise ScramLoginError("malformed SCRAM message (invalid salt or iteration count)")
        iterations = int(count)
        if iterations < 1:
            raise ScramLoginError("malformed SCRAM message (invalid iteration count)")
        if iterations > self._maxIterations:
            raise ScramPolicyError(
                f"backend asked for {iterations} SCRAM iterations, more than"
                f" backend.max_scram_iterations = {self._maxIterations}"
            )
        return nonce, salt, iterations

    def _clientFinal(self, keys: ScramKeys, serverFirst: str, nonce: str) -> bytes:
        self.keys = keys
        withoutProof = f"c={_b64(self._cbindInput)},r={nonce}"
        authMessage = f"{self._clientFirstBare},{serverFirst},{withoutProof}".encode("ascii")
        signature = _hmac(keys.stored_key, authMessage)
        proof = bytes(a ^ b for a, b in zip(keys.client_key, signature, strict=True))
        self._serverSignature = _hmac(keys.server_key, authMessage)
        return wire.sasl_response(f"{withoutProof},p={_b64(proof)}".encode("ascii"))

    def finish(self, serverFinal: bytes) -> None:
        """Check the server's signature: it proves the server knew the verifier."""
        expected = self._serverSignature
        if expected is None:
            raise ScramLoginError("SASL final before the exchange reached it")
        try:
            text = serverFinal.decode("ascii")
        except UnicodeDecodeError:
            raise ScramLoginError("malformed SCRAM message (not ASCII)") from None
        if text.startswith("e="):
            raise ScramLoginError(f"error received from server in SCRAM exchange: {text[2:]}")
        signature = _b64decode(_attribute(text, "v", "server-final-message"), "server signature")
        self._serverSignature = None
        if not hmac.compare_digest(signature, expected):
            raise ScramLoginError("incorrect server signature")
        self.done = True


def make_verifier(password: str, iterations: int = 4096) -> str:
    """
    A SCRAM-SHA-256 verifier for C{password}, in PostgreSQL's
    C{pg_authid} format (what C{admin.password_file} holds): from it a
    password can be checked, not recovered.
    """
    salt, stored, server, count = ScramMechanism(SCRAM_SHA_256).make_auth_info(
        password, iteration_count=iterations
    )
    b64 = base64.b64encode
    return (
        f"SCRAM-SHA-256${count}:{b64(salt).decode()}${b64(stored).decode()}:{b64(server).decode()}"
    )
