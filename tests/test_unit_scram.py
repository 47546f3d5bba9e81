"""
The client side of SCRAM-SHA-256 (L{pgtls_twisted.protocol._scram.ScramLogin})
against a server computed from RFC 5802 in the test
(L{support.unit.ScramServerSide}): the channel-binding flag each case
calls for, the checks of the server's messages, and the iteration limit,
enforced before any key is derived. The derivation runs through a
recording runner instead of a thread.
"""

from __future__ import annotations

from typing import Any

import pytest
from support.unit import ScramServerSide, result
from twisted.internet import defer

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.protocol._scram import (
    SCRAM_SHA_256,
    SCRAM_SHA_256_PLUS,
    ScramLogin,
    ScramLoginError,
    ScramPolicyError,
    derive_keys,
    prepare_password,
)

BINDING = b"\x42" * 32


class Runner:
    """Runs the derivation at once, recording each call: C{(function, iterations)}."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, int]] = []

    def __call__(self, f: Any, password: bytes, salt: bytes, iterations: int) -> Any:
        self.calls.append((f, iterations))
        return defer.succeed(f(password, salt, iterations))


def client_first(login: ScramLogin, password: str) -> bytes:
    """The client-first-message of L{ScramLogin.start}'s SASLInitialResponse."""
    message = login.start(password)
    mechanism, data = wire.parse_sasl_initial_response(message[5:])
    assert mechanism == login.mechanism
    return data


def client_final(login: ScramLogin, serverFirst: bytes, run: Any = None) -> bytes:
    message = result(login.challenge(serverFirst, run or Runner()))
    assert isinstance(message, bytes), message
    assert message[:1] == b"p"
    return message[5:]


def exchange(login: ScramLogin, server: ScramServerSide, password: str = "pencil") -> None:
    """A whole exchange; the server checks the client's proof and binding."""
    first = server.first(client_first(login, password))
    final = server.final(client_final(login, first))
    login.finish(final)


# ---------------------------------------------------------------------------
# The exchange, and its channel-binding flag


def test_exchange_without_tls() -> None:
    login = ScramLogin([SCRAM_SHA_256], None, tls=False, maxIterations=100_000)
    server = ScramServerSide("pencil")
    assert not login.done
    exchange(login, server)
    assert login.done
    assert (login.mechanism, server.header) == (SCRAM_SHA_256, "n,,")


def test_plus_binds_to_the_certificate() -> None:
    login = ScramLogin(
        [SCRAM_SHA_256_PLUS, SCRAM_SHA_256], BINDING, tls=True, maxIterations=100_000
    )
    server = ScramServerSide("pencil", binding=BINDING)
    exchange(login, server)
    assert (login.mechanism, server.header) == (SCRAM_SHA_256_PLUS, "p=tls-server-end-point,,")


def test_tls_without_a_plus_offer_says_y() -> None:
    """The server fails the login if it can bind: its -PLUS offer was stripped."""
    login = ScramLogin([SCRAM_SHA_256], BINDING, tls=True, maxIterations=100_000)
    server = ScramServerSide("pencil")
    exchange(login, server)
    assert (login.mechanism, server.header) == (SCRAM_SHA_256, "y,,")


def test_plus_offered_but_no_binding_possible_says_n() -> None:
    login = ScramLogin([SCRAM_SHA_256_PLUS, SCRAM_SHA_256], None, tls=True, maxIterations=100_000)
    server = ScramServerSide("pencil")
    exchange(login, server)
    assert (login.mechanism, server.header) == (SCRAM_SHA_256, "n,,")


def test_no_supported_mechanism() -> None:
    with pytest.raises(ScramLoginError, match=r"no supported SASL mechanism \(SCRAM-SHA-1\)"):
        ScramLogin(["SCRAM-SHA-1"], None, tls=False, maxIterations=100_000)


def test_the_proof_depends_on_the_password() -> None:
    """(The computed server does check.)"""
    login = ScramLogin([SCRAM_SHA_256], None, tls=False, maxIterations=100_000)
    server = ScramServerSide("pencil")
    with pytest.raises(AssertionError, match="wrong proof"):
        exchange(login, server, password="crayon")


def test_empty_user_name_and_a_fresh_nonce() -> None:
    """PostgreSQL takes the startup packet's user: libpq sends C{n=}."""
    firsts = [
        client_first(ScramLogin([SCRAM_SHA_256], None, tls=False, maxIterations=4096), "pencil")
        for _ in range(2)
    ]
    for first in firsts:
        assert first.startswith(b"n,,n=,r=")
        assert len(first) == len(b"n,,n=,r=") + 24  # 18 random bytes, base64
    assert firsts[0] != firsts[1]


def test_the_derivation_gets_the_prepared_password() -> None:
    login = ScramLogin([SCRAM_SHA_256], None, tls=False, maxIterations=100_000)
    server = ScramServerSide("IX", iterations=4096)
    run = Runner()
    # U+00AD (soft hyphen) is mapped to nothing by SASLprep, as the server does.
    first = server.first(client_first(login, "I\u00adX"))
    login.finish(server.final(client_final(login, first, run)))
    assert run.calls == [(derive_keys, 4096)]
    assert login.done


@pytest.mark.parametrize(
    "password, prepared",
    [
        ("pencil", b"pencil"),
        ("I\u00adX", b"IX"),
        ("\u2168", b"IX"),  # ROMAN NUMERAL NINE, NFKC
        ("a\u0007b", "a\u0007b".encode()),  # prohibited: used raw
        (b"\xff\xfe", b"\xff\xfe"),  # not UTF-8: used raw
    ],
)
def test_prepare_password(password: str | bytes, prepared: bytes) -> None:
    assert prepare_password(password) == prepared


# ---------------------------------------------------------------------------
# The server's messages


def started(maxIterations: int = 100_000) -> tuple[ScramLogin, str]:
    """A login that has sent client-first; and its nonce."""
    login = ScramLogin([SCRAM_SHA_256], None, tls=False, maxIterations=maxIterations)
    nonce = client_first(login, "pencil").decode().rpartition("r=")[2]
    return login, nonce


def test_bad_server_signature() -> None:
    login = ScramLogin([SCRAM_SHA_256], None, tls=False, maxIterations=100_000)
    server = ScramServerSide("pencil")
    client_final(login, server.first(client_first(login, "pencil")))
    with pytest.raises(ScramLoginError, match="incorrect server signature"):
        login.finish(b"v=" + b"A" * 44)
    assert not login.done


def test_server_error_in_server_final() -> None:
    login = ScramLogin([SCRAM_SHA_256], None, tls=False, maxIterations=100_000)
    server = ScramServerSide("pencil")
    client_final(login, server.first(client_first(login, "pencil")))
    with pytest.raises(ScramLoginError, match="error received from server.*: invalid-proof"):
        login.finish(b"e=invalid-proof")


@pytest.mark.parametrize(
    "serverFirst, problem",
    [
        ("r=OTHER{n}x,s=c2FsdA==,i=4096", "nonce mismatch"),
        ("r={n},s=c2FsdA==,i=4096", "nonce mismatch"),  # no server part
        ("r={n}x,s=c2FsdA==,i=4096,x=1", "server-first-message"),
        ("r={n}x,i=4096,s=c2FsdA==", "s= expected"),
        ("r={n}x,s=*,i=4096", "invalid salt"),
        ("r={n}x,s=,i=4096", "invalid salt or iteration count"),
        ("r={n}x,s=c2FsdA==,i=0", "invalid iteration count"),
        ("r={n}x,s=c2FsdA==,i=-1", "invalid salt or iteration count"),
        ("r={n}x,s=c2FsdA==,i=4k", "invalid salt or iteration count"),
    ],
)
def test_malformed_server_first(serverFirst: str, problem: str) -> None:
    login, nonce = started()
    run = Runner()
    with pytest.raises(ScramLoginError, match=problem):
        login.challenge(serverFirst.format(n=nonce).encode(), run)
    assert run.calls == []


def test_server_first_not_ascii() -> None:
    login, _ = started()
    with pytest.raises(ScramLoginError, match="not ASCII"):
        login.challenge("r=é".encode(), Runner())


def test_iteration_limit_is_checked_before_deriving() -> None:
    login, nonce = started(maxIterations=10_000)
    run = Runner()
    with pytest.raises(ScramPolicyError) as caught:
        login.challenge(f"r={nonce}x,s=c2FsdA==,i=10001".encode(), run)
    assert caught.value.sqlstate == "28000"
    assert str(caught.value) == (
        "backend asked for 10001 SCRAM iterations, more than backend.max_scram_iterations = 10000"
    )
    assert run.calls == []


def test_iteration_limit_itself_is_allowed() -> None:
    login, nonce = started(maxIterations=10_000)
    run = Runner()
    client_final(login, f"r={nonce}x,s=c2FsdA==,i=10000".encode(), run)
    assert run.calls == [(derive_keys, 10_000)]


def test_messages_out_of_order() -> None:
    login = ScramLogin([SCRAM_SHA_256], None, tls=False, maxIterations=100_000)
    with pytest.raises(ScramLoginError, match="unexpected SASL continue"):
        login.challenge(b"r=x,s=c2FsdA==,i=4096", Runner())
    with pytest.raises(ScramLoginError, match="SASL final before"):
        login.finish(b"v=AAAA")
    login, nonce = started()
    client_final(login, f"r={nonce}x,s=c2FsdA==,i=4096".encode())
    # The password is gone once client-final is built: no second challenge.
    with pytest.raises(ScramLoginError, match="unexpected SASL continue"):
        login.challenge(f"r={nonce}x,s=c2FsdA==,i=4096".encode(), Runner())
