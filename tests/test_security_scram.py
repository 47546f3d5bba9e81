"""
The client side of SCRAM-SHA-256 towards the backend (L{ScramLogin}),
against L{support.scram.ScramServerSide}, without sockets: the GS2 header
it chooses (the C{y} flag over TLS when no -PLUS was offered, issue 10
item 5), the server's signature and iteration count checked, malformed
server messages refused cleanly, and passwords prepared as PostgreSQL
does (raw where SASLprep fails, item 7).
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.scram import ScramServerSide, initial_response
from twisted.internet import defer
from twisted.python.failure import Failure

from pgtls_twisted.protocol._scram import (
    ScramLogin,
    ScramLoginError,
    ScramPolicyError,
    prepare_password,
)


def sync_run(f: Any, *args: Any) -> defer.Deferred[Any]:
    """A runner that derives at once, for unit tests."""
    return defer.maybeDeferred(f, *args)


def result_of(d: defer.Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    (value,) = box
    if isinstance(value, Failure):
        value.raiseException()
    return value


def run_exchange(login: ScramLogin, server: ScramServerSide, password: str) -> tuple[str, bytes]:
    """A whole exchange; the mechanism chosen and the client-first data."""
    mechanism, first = initial_response(login.start(password))
    final = result_of(login.challenge(server.server_first(first), sync_run))
    login.finish(server.server_final(final[5:]))
    assert login.done
    return mechanism, first


# ---------------------------------------------------------------------------
# 5. The y flag: a TLS leg whose server offered no -PLUS


def test_scram_sends_y_over_tls_without_plus_offer() -> None:
    """
    libpq's downgrade detection: over TLS, an offer without -PLUS means
    someone may have stripped it, so the client says "y" (I support
    binding, you did not offer it) and the server refuses if it does
    support it. base64("y,,") is "eSws", in client-final's c=.
    """
    login = ScramLogin(["SCRAM-SHA-256"], None, tls=True, maxIterations=100_000)
    server = ScramServerSide("secret", 4096)
    mechanism, first = run_exchange(login, server, "secret")
    assert mechanism == "SCRAM-SHA-256"
    assert first.startswith(b"y,,n=,r=")
    assert server.clientFinal.startswith(b"c=eSws,r=")


@pytest.mark.parametrize(
    ("offered", "binding", "tls", "mechanism", "header", "c"),
    [
        # No TLS: nothing to bind to.
        (["SCRAM-SHA-256"], None, False, "SCRAM-SHA-256", b"n,,", "biws"),
        # TLS, -PLUS offered but no binding data (e.g. an Ed25519 certificate):
        # the server did offer it, so "y" would be a lie.
        (["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"], None, True, "SCRAM-SHA-256", b"n,,", "biws"),
        # TLS and -PLUS: bound to the server's certificate.
        (
            ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"],
            b"\x01" * 32,
            True,
            "SCRAM-SHA-256-PLUS",
            b"p=tls-server-end-point,,",
            base64.b64encode(b"p=tls-server-end-point,," + b"\x01" * 32).decode(),
        ),
    ],
)
def test_scram_gs2_header_choices(offered, binding, tls, mechanism, header, c) -> None:
    login = ScramLogin(offered, binding, tls=tls, maxIterations=100_000)
    server = ScramServerSide("secret", 4096, plus=binding)
    got, first = run_exchange(login, server, "secret")
    assert got == mechanism
    assert first.startswith(header + b"n=,r=")
    assert server.clientFinal.startswith(f"c={c},r=".encode())


def test_scram_refuses_a_wrong_server_signature() -> None:
    login = ScramLogin(["SCRAM-SHA-256"], None, tls=False, maxIterations=100_000)
    server = ScramServerSide("secret", 4096)
    _, first = initial_response(login.start("secret"))
    result_of(login.challenge(server.server_first(first), sync_run))
    with pytest.raises(ScramLoginError, match="incorrect server signature"):
        login.finish(b"v=" + base64.b64encode(b"\0" * 32))
    assert not login.done


def test_scram_iteration_limit_checked_before_any_derivation() -> None:
    login = ScramLogin(["SCRAM-SHA-256"], None, tls=True, maxIterations=100_000)
    _, first = initial_response(login.start("secret"))
    nonce = first.split(b"r=", 1)[1].decode()
    ran: list[Any] = []
    with pytest.raises(ScramPolicyError) as info:
        login.challenge(f"r={nonce}x,s=c2FsdA==,i=100001".encode(), lambda *a: ran.append(a))
    assert str(info.value) == (
        "backend asked for 100001 SCRAM iterations, more than backend.max_scram_iterations = 100000"
    )
    assert info.value.sqlstate == "28000"
    assert ran == []


@given(st.binary(max_size=300))
def test_scram_server_first_garbage_is_a_clean_error(data: bytes) -> None:
    """Whatever a server sends as server-first: ScramLoginError, never another exception."""
    login = ScramLogin(["SCRAM-SHA-256"], None, tls=True, maxIterations=100_000)
    login.start("secret")
    with pytest.raises(ScramLoginError):
        login.challenge(data, sync_run)


@pytest.mark.parametrize(
    "template",
    [
        "r={nonce},s=c2FsdA==,i=4096",  # the server added no nonce of its own
        "r=other{nonce}x,s=c2FsdA==,i=4096",
        "r={nonce}x,s=,i=4096",
        "r={nonce}x,s=!!!!,i=4096",
        "r={nonce}x,s=c2FsdA==,i=0",
        "r={nonce}x,s=c2FsdA==,i=-1",
        "r={nonce}x,s=c2FsdA==,i=99999999999999999999999",
        "r={nonce}x,s=c2FsdA==,i=4096,e=extra",
        "m=ext,r={nonce}x,s=c2FsdA==,i=4096",
        "r={nonce}x,i=4096,s=c2FsdA==",
    ],
)
def test_scram_server_first_malformed(template: str) -> None:
    login = ScramLogin(["SCRAM-SHA-256"], None, tls=True, maxIterations=100_000)
    _, first = initial_response(login.start("secret"))
    nonce = first.split(b"r=", 1)[1].decode()
    with pytest.raises(ScramLoginError):
        login.challenge(template.format(nonce=nonce).encode(), sync_run)


# ---------------------------------------------------------------------------
# 7. SASLprep


@pytest.mark.parametrize(
    ("password", "prepared"),
    [
        ("plain", b"plain"),
        ("bell\x07pw", b"bell\x07pw"),
        ("un\u0378assigned", "un\u0378assigned".encode()),
        ("\u05d0pw\u05d0", "\u05d0pw\u05d0".encode()),
        ("so\u00adft\u00a0\ufb01x", b"soft fix"),
        (b"caf\xe9", b"caf\xe9"),  # not UTF-8: raw, as PostgreSQL
        ("caf\u00e9", "caf\u00e9".encode()),
    ],
)
def test_prepare_password_as_postgresql(password: str | bytes, prepared: bytes) -> None:
    assert prepare_password(password) == prepared


@pytest.mark.parametrize("password", ["bell\x07pw", "un\u0378assigned", "\u05d0pw\u05d0"])
def test_scram_with_a_password_saslprep_rejects(password: str) -> None:
    """Old code raised scramp's ScramException out of ScramLogin.start."""
    login = ScramLogin(["SCRAM-SHA-256"], None, tls=True, maxIterations=100_000)
    run_exchange(login, ScramServerSide(password, 4096), password)
