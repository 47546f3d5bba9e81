# -*- test-case-name: tests.test_scram -*-
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
"""

from __future__ import annotations

import base64

from scramp import ScramClient, ScramException, ScramMechanism

from . import wire

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS = "SCRAM-SHA-256-PLUS"


class ScramLoginError(Exception):
    """The exchange cannot go on: unsupported mechanisms or a bad server."""


class ScramLogin:
    """
    The client side of one SCRAM exchange, as a small state machine fed the
    bodies of the server's authentication messages.

    @ivar mechanism: the mechanism chosen from the server's offer.
    """

    def __init__(self, offered: list[str], user: str, channelBinding: bytes | None) -> None:
        if channelBinding is not None and SCRAM_SHA_256_PLUS in offered:
            self.mechanism = SCRAM_SHA_256_PLUS
            binding = ("tls-server-end-point", channelBinding)
        elif SCRAM_SHA_256 in offered:
            self.mechanism = SCRAM_SHA_256
            binding = None
        else:
            raise ScramLoginError(
                f"server offered no supported SASL mechanism ({', '.join(offered)})"
            )
        self._binding = binding
        # PostgreSQL ignores the SCRAM user name (the startup packet's user
        # counts), but it must be a valid SASLprep string.
        self._user = user or "pgtls"
        self._client: ScramClient | None = None
        self.done = False

    def start(self, password: str) -> bytes:
        """@return: the SASLInitialResponse message carrying client-first."""
        try:
            self._client = ScramClient(
                [self.mechanism], self._user, password, channel_binding=self._binding
            )
        except ScramException:
            self._client = ScramClient(
                [self.mechanism], "pgtls", password, channel_binding=self._binding
            )
        first = self._client.get_client_first().encode()
        return wire.sasl_initial_response(self.mechanism, first)

    def challenge(self, serverFirst: bytes) -> bytes:
        """@return: the SASLResponse message carrying client-final."""
        if self._client is None:
            raise ScramLoginError("SASL continue before the exchange started")
        try:
            self._client.set_server_first(serverFirst.decode("utf-8"))
            final = self._client.get_client_final().encode()
        except (ScramException, UnicodeDecodeError) as e:
            raise ScramLoginError(f"invalid SCRAM server-first-message: {e}") from None
        return wire.sasl_response(final)

    def finish(self, serverFinal: bytes) -> None:
        """Check the server's signature: it proves the server knew the verifier."""
        if self._client is None:
            raise ScramLoginError("SASL final before the exchange started")
        try:
            self._client.set_server_final(serverFinal.decode("utf-8"))
        except (ScramException, UnicodeDecodeError) as e:
            raise ScramLoginError(f"invalid SCRAM server signature: {e}") from None
        self._client = None  # drop the password-derived state
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
