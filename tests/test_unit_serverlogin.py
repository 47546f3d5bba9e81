"""
pgtls logging in as a pool's service user
(L{pgtls_twisted.pool._serverlogin.ServerLogin}) on a real backend leg,
against a server played by the test: what pgtls writes (C{server} events)
and what the login's Deferred fires with. SCRAM is checked by an
independent server side (L{support.unit.ScramServerSide}); its key
derivation is held (L{support.unit.HeldDerivations}) until the test says.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from support.unit import (
    Scene,
    ScramServerSide,
    certificate_binding,
    login_ok,
    md5_request,
    result,
    sasl_continue,
    sasl_final,
    unit_reactor,
)
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from pgtls_twisted.pool._serverlogin import LoginResult, ServerLogin, ServerLoginError
from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.testing.pki import PKI

reactor = pytest.fixture(unit_reactor, name="reactor")


def make_scene(pki: PKI, tmp_path: Path, reactor: MemoryReactorClock, **backend: Any) -> Scene:
    return Scene(pki, tmp_path, reactor, None, backend=backend)


@pytest.fixture
def scene(pki: PKI, tmp_path: Path, reactor: MemoryReactorClock) -> Scene:
    """A plaintext backend."""
    return make_scene(pki, tmp_path, reactor)


@pytest.fixture
def tls_scene(pki: PKI, tmp_path: Path, reactor: MemoryReactorClock) -> Scene:
    """A verified TLS backend."""
    return make_scene(pki, tmp_path, reactor, tls="verify-full", root_ca=str(pki.cert("ca")))


def start(scene: Scene, password: str | None = "svc-pw", **kwargs: Any) -> tuple[ServerLogin, Any]:
    """A login as C{svc} to database C{app}, on a new backend connection."""
    ready = scene.route.backend.connect()
    if scene.route.config.backend.tls == "disable":
        backend: Any = scene.backends.accept()
    else:
        backend = scene.accept_tls()
    assert result(ready) is backend.leg
    login = ServerLogin(
        backend.leg, "svc", "app", password, {"application_name": "pgtls"}, **kwargs
    )
    return login, backend


def failure(login: ServerLogin) -> ServerLoginError:
    outcome = result(login.done)
    assert isinstance(outcome, Failure), f"the login succeeded: {outcome!r}"
    error = outcome.value
    assert isinstance(error, ServerLoginError)
    return error


def scram_exchange(scene: Scene, backend: Any, scram: ScramServerSide) -> None:
    """From the SASLInitialResponse pgtls sent to its client-final."""
    _, clientFirst = wire.parse_sasl_initial_response(backend.messages[-1][1])
    backend.send(sasl_continue(scram.first(clientFirst)))
    scene.derivations.complete()  # the keys are derived: client-final goes
    scene.flush()


def scram_login(scene: Scene, backend: Any, scram: ScramServerSide, offer: list[str]) -> str:
    """
    A whole SCRAM login, the server offering C{offer}.

    @return: the mechanism pgtls chose.
    """
    backend.send(wire.authentication_sasl(offer))
    mechanism, _ = wire.parse_sasl_initial_response(backend.messages[-1][1])
    scram_exchange(scene, backend, scram)
    backend.send(sasl_final(scram.final(backend.messages[-1][1])) + login_ok())
    return mechanism


# ---------------------------------------------------------------------------
# Logins that succeed


def test_trust(scene: Scene) -> None:
    login, backend = start(scene)
    assert backend.transport.framer.startup() == wire.StartupMessage(
        3, 0, {"user": "svc", "database": "app", "application_name": "pgtls"}
    )
    backend.send(login_ok(pid=7, key=b"abcd", server_version="17.2", TimeZone="UTC"))

    assert result(login.done) == LoginResult(
        parameters={"server_version": "17.2", "TimeZone": "UTC"}, backendKey=(7, b"abcd")
    )
    assert scene.events == [("server", "startup")]


def test_md5(scene: Scene) -> None:
    login, backend = start(scene)
    backend.send(md5_request(b"\x01\x02\x03\x04"))
    backend.send(login_ok())

    inner = hashlib.md5(b"svc-pwsvc").hexdigest().encode()
    expected = b"md5" + hashlib.md5(inner + b"\x01\x02\x03\x04").hexdigest().encode() + b"\0"
    assert backend.messages[1] == (b"p", expected)
    assert scene.events == [("server", "startup"), ("server", "p")]
    assert isinstance(result(login.done), LoginResult)


def test_cleartext_over_a_verified_backend(tls_scene: Scene) -> None:
    login, backend = start(tls_scene)
    backend.send(wire.AUTHENTICATION_CLEARTEXT_PASSWORD)
    backend.send(login_ok())
    assert backend.messages[1] == (b"p", b"svc-pw\0")
    assert isinstance(result(login.done), LoginResult)


def test_scram_over_a_plaintext_backend(scene: Scene) -> None:
    login, backend = start(scene)
    scram = ScramServerSide("svc-pw")
    mechanism = scram_login(scene, backend, scram, ["SCRAM-SHA-256"])

    assert scene.events == [("server", "startup"), ("server", "p"), ("server", "p")]
    assert (mechanism, scram.header) == ("SCRAM-SHA-256", "n,,")
    assert isinstance(result(login.done), LoginResult)


def test_scram_plus_binds_to_the_backend_certificate(pki: PKI, tls_scene: Scene) -> None:
    login, backend = start(tls_scene)
    scram = ScramServerSide("svc-pw", binding=certificate_binding(pki))
    mechanism = scram_login(tls_scene, backend, scram, ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
    assert (mechanism, scram.header) == ("SCRAM-SHA-256-PLUS", "p=tls-server-end-point,,")
    assert isinstance(result(login.done), LoginResult)


def test_scram_over_tls_without_plus_says_y(tls_scene: Scene) -> None:
    """A server that can bind would see the C{y}: someone stripped its -PLUS offer."""
    login, backend = start(tls_scene)
    scram = ScramServerSide("svc-pw")
    mechanism = scram_login(tls_scene, backend, scram, ["SCRAM-SHA-256"])
    assert (mechanism, scram.header) == ("SCRAM-SHA-256", "y,,")
    assert isinstance(result(login.done), LoginResult)


# ---------------------------------------------------------------------------
# Logins that fail


def test_error_from_the_server(scene: Scene) -> None:
    login, backend = start(scene)
    backend.send(md5_request())
    backend.send(wire.error_response("28P01", 'password authentication failed for user "svc"'))

    error = failure(login)
    assert (error.sqlstate, error.message) == (
        "28P01",
        'password authentication failed for user "svc"',
    )
    assert error.fields["S"] == "FATAL"
    assert scene.events == [("server", "startup"), ("server", "p"), ("server", "close")]


def test_connection_lost_during_login(scene: Scene) -> None:
    login, backend = start(scene)
    backend.send(md5_request())
    backend.lose()
    error = failure(login)
    assert (error.sqlstate, error.message) == (
        "08006",
        "backend closed the connection during login",
    )


def test_cleartext_refused_over_a_plaintext_backend(scene: Scene) -> None:
    login, backend = start(scene)
    backend.send(wire.AUTHENTICATION_CLEARTEXT_PASSWORD)
    error = failure(login)
    assert error.sqlstate == "28000"
    assert "refusing to send it" in error.message
    # The password was not sent.
    assert scene.events == [("server", "startup"), ("server", "close")]


def test_require_auth_refuses_another_method(
    pki: PKI, tmp_path: Path, reactor: MemoryReactorClock
) -> None:
    scene = make_scene(pki, tmp_path, reactor, require_auth="scram-sha-256")
    login, backend = start(scene)
    backend.send(md5_request())
    error = failure(login)
    assert (error.sqlstate, error.message) == (
        "28000",
        'authentication method requirement "scram-sha-256" failed:'
        " server requested a hashed password",
    )
    assert scene.events == [("server", "startup"), ("server", "close")]


def test_a_method_pgtls_cannot_use(scene: Scene) -> None:
    login, backend = start(scene)
    backend.send(wire.authentication(7))  # GSSAPI
    error = failure(login)
    assert (error.sqlstate, error.message) == (
        "28000",
        "backend asked for an authentication method pgtls cannot use (code 7)",
    )


def test_no_password_configured(scene: Scene) -> None:
    login, backend = start(scene, password=None)
    backend.send(md5_request())
    error = failure(login)
    assert error.message == (
        "backend login failed: the server asked for a password and none is configured"
    )
    assert scene.events == [("server", "startup"), ("server", "close")]


def test_password_required_but_never_asked(scene: Scene) -> None:
    """The admin console's C{backend} authentication: a C{trust} server proves nothing."""
    login, backend = start(scene, passwordRequired=True)
    backend.send(login_ok())
    assert failure(login).message == "backend login failed: the server did not ask for a password"


def test_scram_with_a_wrong_server_signature(scene: Scene) -> None:
    login, backend = start(scene)
    scram = ScramServerSide("svc-pw")
    backend.send(wire.authentication_sasl(["SCRAM-SHA-256"]))
    scram_exchange(scene, backend, scram)
    backend.send(sasl_final(b"v=" + b"A" * 44))
    error = failure(login)
    assert (error.sqlstate, error.message) == (
        "08006",
        "backend login failed: incorrect server signature",
    )
    assert scene.events[-1] == ("server", "close")


def test_scram_accepted_without_the_server_proving_anything(scene: Scene) -> None:
    login, backend = start(scene)
    scram = ScramServerSide("svc-pw")
    backend.send(wire.authentication_sasl(["SCRAM-SHA-256"]))
    scram_exchange(scene, backend, scram)
    backend.send(login_ok())  # no SASLFinal
    assert failure(login).message == (
        "backend login failed: server accepted the login without proving it knows the password"
    )


def test_scram_iteration_limit(pki: PKI, tmp_path: Path, reactor: MemoryReactorClock) -> None:
    scene = make_scene(pki, tmp_path, reactor, max_scram_iterations=4096)
    login, backend = start(scene)
    scram = ScramServerSide("svc-pw", iterations=4097)
    backend.send(wire.authentication_sasl(["SCRAM-SHA-256"]))
    _, clientFirst = wire.parse_sasl_initial_response(backend.messages[-1][1])
    backend.send(sasl_continue(scram.first(clientFirst)))

    # Refused before any key is derived.
    error = failure(login)
    assert error.sqlstate == "28000"
    assert error.message == (
        "backend login failed: backend asked for 4097 SCRAM iterations,"
        " more than backend.max_scram_iterations = 4096"
    )
    assert scene.events == [("server", "startup"), ("server", "p"), ("server", "close")]


def test_a_server_that_stalls_is_given_up_at_the_login_timeout(scene: Scene) -> None:
    """A server that never answers must not hold the pool's slot for ever."""
    from pgtls_twisted.pool._serverlogin import LOGIN_TIMEOUT

    login, backend = start(scene)
    backend.send(md5_request())
    scene.reactor.advance(LOGIN_TIMEOUT - 1)
    assert not login.done.called
    scene.reactor.advance(1)
    error = failure(login)
    assert error.sqlstate == "08006"
    assert error.message == f"backend login did not complete within {LOGIN_TIMEOUT:g}s"
    assert ("server", "close") in scene.events


def test_a_finished_login_leaves_no_timer(scene: Scene) -> None:
    login, backend = start(scene)
    backend.send(login_ok())
    assert login.done.called
    pending = [getattr(call.func, "__name__", "") for call in scene.reactor.getDelayedCalls()]
    assert "_expired" not in pending
