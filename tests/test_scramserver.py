"""
pgtls as a SCRAM-SHA-256 server (L{pgtls_twisted.protocol._scramserver}), driven by
scramp's client (an independent implementation) and by hand-made hostile
messages.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scramp import ScramClient, ScramMechanism

from pgtls_twisted.protocol._scramserver import (
    SCRAM_SHA_256,
    SCRAM_SHA_256_PLUS,
    ScramAuthError,
    ScramServer,
    Verifier,
)

BINDING = b"\x01" * 32


def verifier(password: str = "pw") -> Verifier:
    salt, stored, server, iterations = ScramMechanism().make_auth_info(password, 4096)
    return Verifier(iterations, salt, stored, server)


def exchange(
    password: str, mechanism: str = SCRAM_SHA_256, binding: bytes | None = BINDING
) -> tuple[ScramClient, ScramServer]:
    server = ScramServer(verifier(), binding)
    cb = ("tls-server-end-point", binding) if mechanism == SCRAM_SHA_256_PLUS else None
    client = ScramClient([mechanism], "someone", password, channel_binding=cb)
    first = server.clientFirst(mechanism, client.get_client_first().encode())
    client.set_server_first(first.decode())
    return client, server


@pytest.mark.parametrize("mechanism", [SCRAM_SHA_256, SCRAM_SHA_256_PLUS])
def test_right_password(mechanism: str) -> None:
    client, server = exchange("pw", mechanism)
    final = server.clientFinal(client.get_client_final().encode())
    client.set_server_final(final.decode())  # the client checks our signature


def test_wrong_password() -> None:
    client, server = exchange("not-pw")
    with pytest.raises(ScramAuthError, match="wrong password"):
        server.clientFinal(client.get_client_final().encode())


def test_offer_depends_on_binding() -> None:
    assert ScramServer(verifier(), BINDING).mechanisms == [SCRAM_SHA_256_PLUS, SCRAM_SHA_256]
    assert ScramServer(verifier(), None).mechanisms == [SCRAM_SHA_256]
    with pytest.raises(ScramAuthError, match="invalid SASL authentication mechanism"):
        ScramServer(verifier(), None).clientFirst(
            SCRAM_SHA_256_PLUS, b"p=tls-server-end-point,,n=,r=x"
        )


def test_empty_user_name_as_libpq_sends_it() -> None:
    server = ScramServer(verifier(), None, nonce=b"s" * 18)
    first = server.clientFirst(SCRAM_SHA_256, b"n,,n=,r=clientnonce")
    assert first.startswith(b"r=clientnonce")


@pytest.mark.parametrize(
    "mechanism, message, problem",
    [
        # Someone removed -PLUS from the offer the client saw.
        (SCRAM_SHA_256, b"y,,n=,r=abc", "negotiation error"),
        (SCRAM_SHA_256_PLUS, b"n,,n=,r=abc", "negotiation error"),
        (SCRAM_SHA_256_PLUS, b"p=tls-unique,,n=,r=abc", "negotiation error"),
        (SCRAM_SHA_256, b"p=tls-server-end-point,,n=,r=abc", "unexpected channel binding flag"),
        (SCRAM_SHA_256, b"n,a=admin,n=,r=abc", "authorization identity"),
        (SCRAM_SHA_256, b"n,,r=abc,n=", 'expected attribute "n"'),
        (SCRAM_SHA_256, b"n,,r=abc", "missing attributes"),
        (SCRAM_SHA_256, b"n,,n=,r=", "invalid nonce"),
        (SCRAM_SHA_256, b"n", "no GS2 header"),
        (SCRAM_SHA_256, b"n,,n=,r=\xff", "not UTF-8"),
    ],
)
def test_bad_client_first(mechanism: str, message: bytes, problem: str) -> None:
    with pytest.raises(ScramAuthError, match=problem):
        ScramServer(verifier(), BINDING).clientFirst(mechanism, message)


def test_y_flag_is_fine_when_pgtls_cannot_bind() -> None:
    """Without a binding pgtls offered no -PLUS: "y" is then the truth."""
    ScramServer(verifier(), None).clientFirst(SCRAM_SHA_256, b"y,,n=,r=abc")


def test_binding_data_must_match() -> None:
    server = ScramServer(verifier(), BINDING)
    other = ("tls-server-end-point", b"\x02" * 32)
    client = ScramClient([SCRAM_SHA_256_PLUS], "x", "pw", channel_binding=other)
    client.set_server_first(
        server.clientFirst(SCRAM_SHA_256_PLUS, client.get_client_first().encode()).decode()
    )
    with pytest.raises(ScramAuthError, match="channel binding check failed"):
        server.clientFinal(client.get_client_final().encode())


def test_nonce_must_match() -> None:
    client, server = exchange("pw")
    final = client.get_client_final()
    tampered = final.replace("r=", "r=X", 1)
    with pytest.raises(ScramAuthError):
        server.clientFinal(tampered.encode())


def test_final_before_first() -> None:
    with pytest.raises(ScramAuthError, match="before the client-first"):
        ScramServer(verifier(), None).clientFinal(b"c=biws,r=x,p=AAAA")


def test_proof_of_the_wrong_length() -> None:
    client, server = exchange("pw")
    final = client.get_client_final()
    head = final.rpartition(",p=")[0]
    short = head + ",p=" + base64.b64encode(b"short").decode()
    with pytest.raises(ScramAuthError, match="wrong length"):
        server.clientFinal(short.encode())


@given(st.binary(max_size=200), st.binary(max_size=200))
def test_fuzz_only_scram_errors_escape(first: bytes, final: bytes) -> None:
    server = ScramServer(verifier(), BINDING)
    for mechanism in (SCRAM_SHA_256, SCRAM_SHA_256_PLUS):
        try:
            server.clientFirst(mechanism, first)
            server.clientFinal(final)
        except ScramAuthError:
            pass


@pytest.mark.parametrize("nonce", ["é", "a b", "\x7f", "\x00"])
def test_nonce_must_be_printable_ascii_without_commas(nonce: str) -> None:
    """RFC 5802's nonce: anything else is a clean refusal, never an uncaught error."""
    with pytest.raises(ScramAuthError, match="invalid nonce"):
        ScramServer(verifier(), None).clientFirst(SCRAM_SHA_256, f"n,,n=,r={nonce}".encode())
