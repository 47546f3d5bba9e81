"""
A pass-through session (L{pgtls_twisted.proxy._session.Session}) from the
client's StartupMessage to the byte pump, without sockets: the client leg
on a recording transport, the backend leg a real L{ServerProtocol} that the
route's connector opened through an in-memory endpoint
(L{support.unit.Backends}), or, where TLS matters, one that runs real TLS
over iosim. Each test states the exact sequence of what was written to
whom (see L{support.unit}).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.unit import (
    Backend,
    Client,
    Scene,
    ScramServerSide,
    answer,
    certificate_binding,
    login_ok,
    md5_request,
    password,
    query,
    sasl_continue,
    sasl_final,
    startup_message,
    unit_reactor,
)
from twisted.internet.testing import MemoryReactorClock

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.proxy._session import Session
from pgtls_twisted.testing.pki import PKI

reactor = pytest.fixture(unit_reactor, name="reactor")


@pytest.fixture
def scene(pki: PKI, tmp_path: Path, reactor: MemoryReactorClock) -> Scene:
    return Scene(pki, tmp_path, reactor, Session, backend={"connect_timeout": "2s"})


def logged_in(scene: Scene) -> tuple[Client, Backend]:
    """A client whose session has started (its pump runs); the events are cleared."""
    client = scene.start()
    server = scene.backends.accept()
    server.send(login_ok())
    scene.events.clear()
    return client, server


# ---------------------------------------------------------------------------
# Startup


def test_startup_waits_for_the_backend_then_is_relayed(scene: Scene) -> None:
    client = scene.start("alice", database="app", application_name="psql")
    # Nothing is read from the client while its backend is being connected.
    assert client.transport.producerState == "paused"
    assert [attempt.address for attempt in scene.backends.attempts] == [("127.0.0.1", 5432)]
    assert scene.events == []

    server = scene.backends.accept()

    assert scene.events == [("server", "startup")]
    assert server.transport.framer.startup() == wire.StartupMessage(
        3, 0, {"user": "alice", "database": "app", "application_name": "psql"}
    )
    assert client.transport.producerState == "producing"
    assert scene.metrics.named("backendConnected") == [("backendConnected", "test")]


def test_bytes_sent_before_the_backend_is_ready_follow_the_startup(scene: Scene) -> None:
    client = scene.connect()
    client.send(startup_message() + password("pipelined"))
    client.send(query("select 1"))
    scene.backends.accept()
    assert scene.events == [("server", "startup"), ("server", "p"), ("server", "Q")]


def test_trust_login_with_the_backends_pid_and_a_minted_key(scene: Scene) -> None:
    client = scene.start()
    server = scene.backends.accept()
    server.send(login_ok(pid=4242, key=b"real", server_version="17.2"))

    assert scene.events == [
        ("server", "startup"),
        ("client", "R:0"),
        ("client", "S"),
        ("client", "K"),
        ("client", "Z:I"),
    ]
    minted = client.cancel_request()
    # The backend's own process ID; never its key: one as long, minted by pgtls.
    assert minted.pid == 4242 and len(minted.key) == 4 and minted.key != b"real"
    assert scene.route.cancels.lookup(minted) is scene.session


def test_md5_is_relayed_unchanged(scene: Scene) -> None:
    client = scene.start()
    server = scene.backends.accept()
    server.send(md5_request(b"\x01\x02\x03\x04"))
    client.send(password("md5" + "0" * 32))
    server.send(login_ok())

    assert scene.events == [
        ("server", "startup"),
        ("client", "R:5"),
        ("server", "p"),
        ("client", "R:0"),
        ("client", "K"),
        ("client", "Z:I"),
    ]
    assert client.messages[0] == (b"R", b"\x00\x00\x00\x05\x01\x02\x03\x04")
    assert server.messages[1] == (b"p", b"md5" + b"0" * 32 + b"\0")


def test_sasl_over_a_plaintext_backend_is_relayed_unchanged(scene: Scene) -> None:
    """pgtls runs SCRAM itself only between two TLS legs: here it relays it."""
    client = scene.start()
    server = scene.backends.accept()
    server.send(wire.authentication_sasl(["SCRAM-SHA-256"]))
    client.send(wire.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"))
    server.send(sasl_continue(b"r=abcdef,s=c2FsdA==,i=4096"))
    client.send(wire.sasl_response(b"c=biws,r=abcdef,p=cHJvb2Y="))
    server.send(sasl_final(b"v=c2lnbmF0dXJl") + login_ok())

    assert scene.events == [
        ("server", "startup"),
        ("client", "R:10"),
        ("server", "p"),
        ("client", "R:11"),
        ("server", "p"),
        ("client", "R:12"),
        ("client", "R:0"),
        ("client", "K"),
        ("client", "Z:I"),
    ]
    assert client.messages[1] == (b"R", b"\x00\x00\x00\x0br=abcdef,s=c2FsdA==,i=4096")


def test_cleartext_password_refused_over_a_plaintext_backend(scene: Scene) -> None:
    client = scene.start()
    scene.backends.accept().send(wire.AUTHENTICATION_CLEARTEXT_PASSWORD)

    assert scene.events == [
        ("server", "startup"),
        ("client", "E:28000"),
        ("client", "close"),
        ("server", "close"),
    ]
    assert client.error()["M"] == (
        'pgtls route "test": backend asked for a cleartext password over a plaintext'
        ' connection (backend.tls = "disable"); refusing to send it'
    )


def test_require_auth_refuses_another_method(
    pki: PKI, tmp_path: Path, reactor: MemoryReactorClock
) -> None:
    scene = Scene(pki, tmp_path, reactor, Session, backend={"require_auth": "scram-sha-256"})
    client = scene.start()
    scene.backends.accept().send(md5_request())

    assert scene.events == [
        ("server", "startup"),
        ("client", "E:28000"),
        ("client", "close"),
        ("server", "close"),
    ]
    assert client.error()["M"] == (
        'pgtls route "test": authentication method requirement "scram-sha-256" failed:'
        " server requested a hashed password"
    )


def test_error_response_is_relayed_and_the_backend_closing_adds_nothing(scene: Scene) -> None:
    client = scene.start()
    server = scene.backends.accept()
    error = wire.error_response("28P01", 'password authentication failed for user "alice"')
    server.send(md5_request(), error)
    server.lose()

    assert scene.events == [
        ("server", "startup"),
        ("client", "R:5"),
        ("client", "E:28P01"),
        ("client", "close"),
    ]
    assert client.transport.value().endswith(error)


def test_backend_lost_before_ready_for_query_is_08006(scene: Scene) -> None:
    client = scene.start()
    server = scene.backends.accept()
    server.send(wire.AUTHENTICATION_OK)
    server.lose()

    assert scene.events == [
        ("server", "startup"),
        ("client", "R:0"),
        ("client", "E:08006"),
        ("client", "close"),
    ]
    assert client.error()["M"] == 'pgtls route "test": backend closed the connection unexpectedly'


def test_backend_refusing_the_connection_is_08001(scene: Scene) -> None:
    client = scene.start()
    scene.backends.refuse()

    assert scene.events == [("client", "E:08001"), ("client", "close")]
    assert client.error()["M"] == (
        'pgtls route "test": could not connect to backend 127.0.0.1:5432: connection refused'
    )
    assert scene.metrics.named("backendFailed") != []


def test_backend_connect_timeout_gives_the_connection_attempt_up(scene: Scene) -> None:
    client = scene.start()
    scene.reactor.advance(2)
    assert scene.events == [
        ("client", "E:08001"),
        ("client", "close"),
        ("backends", "cancelled"),  # no late connection will come
    ]
    assert client.error()["M"].endswith("timeout expired after 2s")
    assert scene.backends.pending == 0


def test_backend_connect_timeout_closes_a_connection_still_negotiating(
    pki: PKI, tmp_path: Path, reactor: MemoryReactorClock
) -> None:
    backend = {"connect_timeout": "2s", "tls": "require"}
    scene = Scene(pki, tmp_path, reactor, Session, backend=backend)
    client = scene.start()
    scene.backends.accept()  # connected in time; the SSLRequest is never answered
    scene.reactor.advance(2)

    assert scene.events == [
        ("server", "ssl"),
        ("client", "E:08001"),
        ("client", "close"),
        ("server", "close"),
    ]
    assert client.error()["M"].endswith("timeout expired after 2s")


def test_backend_protocol_violation_is_08006(scene: Scene) -> None:
    client = scene.start()
    scene.backends.accept().send(b"R\x00\x00\x00\x02")
    assert scene.events == [
        ("server", "startup"),
        ("client", "E:08006"),
        ("client", "close"),
        ("server", "close"),
    ]
    assert client.error()["M"].startswith("backend protocol violation: invalid message length")


def test_client_protocol_violation_during_login_is_08p01(scene: Scene) -> None:
    client = scene.start()
    server = scene.backends.accept()
    server.send(md5_request())
    client.send(b"p\x00\x00\x00\x01")
    assert scene.events[2:] == [("client", "E:08P01"), ("client", "close"), ("server", "close")]


# ---------------------------------------------------------------------------
# The client leaving


def test_client_gone_before_the_backend_is_ready(scene: Scene) -> None:
    client = scene.start()
    client.lose()
    scene.backends.accept()
    # The late leg is closed at once: no startup packet is sent for nobody.
    assert scene.events == [("server", "close")]


def test_client_gone_during_login_closes_the_backend(scene: Scene) -> None:
    client = scene.start()
    scene.backends.accept().send(md5_request())
    client.lose()
    assert scene.events == [("server", "startup"), ("client", "R:5"), ("server", "close")]


def test_terminate_during_login_is_not_forwarded(scene: Scene) -> None:
    client = scene.start()
    scene.backends.accept().send(md5_request())
    client.send(wire.TERMINATE)
    assert scene.events == [
        ("server", "startup"),
        ("client", "R:5"),
        ("server", "close"),
        ("client", "close"),
    ]


# ---------------------------------------------------------------------------
# After ReadyForQuery: the pump


def test_pump_starts_at_ready_for_query(scene: Scene) -> None:
    client = scene.start()
    server = scene.backends.accept()
    # What the server sends behind the ReadyForQuery goes through the pump.
    notice = wire.notice_response("hello")
    server.send(login_ok() + notice)
    client.send(query("select 1"))
    server.send(answer())

    assert scene.events == [
        ("server", "startup"),
        ("client", "R:0"),
        ("client", "K"),
        ("client", "Z:I"),
        ("client", "N"),
        ("server", "Q"),
        ("client", "T"),
        ("client", "D"),
        ("client", "C"),
        ("client", "Z:I"),
    ]
    # Flow control both ways.
    assert client.transport.producer is not None
    assert server.transport.producer is not None


def test_a_query_pipelined_behind_the_password_is_relayed_in_order(scene: Scene) -> None:
    client = scene.start()
    server = scene.backends.accept()
    server.send(md5_request())
    client.send(password("md5x") + query("select 1"))
    server.send(login_ok())
    assert scene.events[2:] == [
        ("server", "p"),
        ("server", "Q"),
        ("client", "R:0"),
        ("client", "K"),
        ("client", "Z:I"),
    ]


def test_backend_closing_after_startup_closes_the_client_without_an_error(scene: Scene) -> None:
    client, server = logged_in(scene)
    server.lose()
    assert scene.events == [("client", "close")]


def test_client_closing_after_startup_closes_the_backend(scene: Scene) -> None:
    client, server = logged_in(scene)
    client.lose()
    assert scene.events == [("server", "close")]


def test_shutdown_deadline_at_ready_for_query_says_57p01(scene: Scene) -> None:
    client, server = logged_in(scene)
    client.proto.terminate()
    assert scene.events == [("client", "E:57P01"), ("client", "close"), ("server", "close")]


def test_shutdown_deadline_mid_result_cuts_no_message(scene: Scene) -> None:
    client, server = logged_in(scene)
    client.send(query("select 1"))
    server.send(answer()[:-6])  # everything but the ReadyForQuery
    client.proto.terminate()
    assert scene.events == [
        ("server", "Q"),
        ("client", "T"),
        ("client", "D"),
        ("client", "C"),
        ("server", "close"),
        ("client", "close"),
    ]


def test_shutdown_deadline_during_login_says_57p01(scene: Scene) -> None:
    client = scene.start()
    scene.backends.accept()
    client.proto.terminate()
    assert scene.events == [
        ("server", "startup"),
        ("client", "E:57P01"),
        ("client", "close"),
        ("server", "close"),
    ]


# ---------------------------------------------------------------------------
# Cancelling


def test_minted_key_cancels_the_backends_real_key(scene: Scene) -> None:
    client = scene.start()
    scene.backends.accept().send(login_ok(pid=4242, key=b"real"))
    scene.events.clear()

    scene.connect("canceller").send(client.cancel_request().encode())
    cancel = scene.backends.accept("cancel")

    assert scene.events == [("canceller", "close"), ("cancel", "cancel")]
    assert cancel.transport.framer.startup() == wire.CancelRequest(4242, b"real")
    assert scene.metrics.named("cancelRequest") == [("cancelRequest", "test", "forwarded")]


def test_a_protocol_32_key_is_minted_as_long_and_cancels(scene: Scene) -> None:
    """A 3.2 backend's 32-byte key: the client gets the PID and 32 bytes of pgtls's."""
    real = bytes(range(32))
    client = scene.start()
    scene.backends.accept().send(login_ok(pid=4242, key=real))
    scene.events.clear()
    minted = client.cancel_request()
    assert minted.pid == 4242 and len(minted.key) == 32 and minted.key != real

    scene.connect("canceller").send(minted.encode())
    cancel = scene.backends.accept("cancel")
    assert cancel.transport.framer.startup() == wire.CancelRequest(4242, real)


def test_a_second_backend_key_replaces_the_first(scene: Scene) -> None:
    client = scene.start()
    server = scene.backends.accept()
    server.send(
        wire.AUTHENTICATION_OK
        + wire.backend_key_data(4242, b"old!")
        + wire.backend_key_data(4242, b"real")
        + wire.ready_for_query()
    )
    first, second = (
        wire.CancelRequest(*wire.parse_backend_key_data(body))
        for body in client.transport.framer.bodies(b"K")
    )
    assert scene.route.cancels.lookup(first) is None
    assert scene.route.cancels.lookup(second) is scene.session
    assert len(scene.route.cancels) == 1


def test_a_finished_session_forgets_its_key(scene: Scene) -> None:
    client = scene.start()
    scene.backends.accept().send(login_ok())
    client.lose()

    scene.connect("canceller").send(client.cancel_request().encode())

    assert scene.backends.pending == 0
    assert scene.metrics.named("cancelRequest") == [("cancelRequest", "test", "ignored")]


# ---------------------------------------------------------------------------
# A TLS backend, and a TLS client (real TLS over iosim)


@pytest.fixture
def tls_scene(pki: PKI, tmp_path: Path, reactor: MemoryReactorClock) -> Scene:
    backend = {"tls": "verify-full", "root_ca": str(pki.cert("ca"))}
    return Scene(pki, tmp_path, reactor, Session, backend=backend)


def test_cleartext_password_relayed_over_a_verified_backend(tls_scene: Scene) -> None:
    client = tls_scene.start()
    server = tls_scene.accept_tls()
    server.send(wire.AUTHENTICATION_CLEARTEXT_PASSWORD)
    client.send(password("secret"))
    tls_scene.flush()
    server.send(login_ok())

    assert tls_scene.events == [
        ("server", "startup"),
        ("client", "R:3"),
        ("server", "p"),
        ("client", "R:0"),
        ("client", "K"),
        ("client", "Z:I"),
    ]
    assert server.messages[1] == (b"p", b"secret\0")


def test_cleartext_password_refused_over_an_unverified_backend(
    pki: PKI, tmp_path: Path, reactor: MemoryReactorClock
) -> None:
    scene = Scene(pki, tmp_path, reactor, Session, backend={"tls": "require"})
    client = scene.start()
    scene.accept_tls().send(wire.AUTHENTICATION_CLEARTEXT_PASSWORD)
    assert client.error()["C"] == "28000"
    assert "over an unverified connection" in client.error()["M"]


def test_plaintext_client_does_not_see_plus_mechanisms(tls_scene: Scene) -> None:
    client = tls_scene.start()
    tls_scene.accept_tls().send(wire.authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))
    assert client.messages == [(b"R", wire.authentication_sasl(["SCRAM-SHA-256"])[5:])]


def test_only_plus_mechanisms_for_a_plaintext_client_is_28000(tls_scene: Scene) -> None:
    client = tls_scene.start()
    tls_scene.accept_tls().send(wire.authentication_sasl(["SCRAM-SHA-256-PLUS"]))
    assert client.error()["C"] == "28000"
    assert client.error()["M"] == "backend offers only channel-bound SASL mechanisms"


def test_pgtls_runs_scram_between_two_tls_legs(pki: PKI, tls_scene: Scene) -> None:
    """
    Both legs are TLS: pgtls asks the client for its password inside TLS
    and runs SCRAM-SHA-256-PLUS itself, bound to the backend's certificate;
    the client is told AuthenticationOk only once the server has proven it
    knows the password.
    """
    client = tls_scene.tls_client("alice", database="app")
    server = tls_scene.accept_tls()
    scram = ScramServerSide("secret", binding=certificate_binding(pki))

    server.send(wire.authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))
    client.send(password("secret"))
    mechanism, clientFirst = wire.parse_sasl_initial_response(server.messages[-1][1])
    server.send(sasl_continue(scram.first(clientFirst)))
    tls_scene.derivations.complete()  # the keys are derived: client-final goes
    tls_scene.flush()
    server.send(sasl_final(scram.final(server.messages[-1][1])) + login_ok())

    assert tls_scene.events == [
        ("server", "startup"),
        ("client", "R:3"),
        ("server", "p"),
        ("server", "p"),
        ("client", "R:0"),
        ("client", "K"),
        ("client", "Z:I"),
    ]
    assert mechanism == "SCRAM-SHA-256-PLUS"
    assert scram.header == "p=tls-server-end-point,,"


def test_pgtls_scram_with_a_wrong_server_signature_is_08006(pki: PKI, tls_scene: Scene) -> None:
    client = tls_scene.tls_client()
    server = tls_scene.accept_tls()
    scram = ScramServerSide("secret", binding=certificate_binding(pki))
    server.send(wire.authentication_sasl(["SCRAM-SHA-256-PLUS"]))
    client.send(password("secret"))
    server.send(
        sasl_continue(scram.first(wire.parse_sasl_initial_response(server.messages[-1][1])[1]))
    )
    tls_scene.derivations.complete()
    tls_scene.flush()
    server.send(sasl_final(b"v=" + b"A" * 44))

    assert tls_scene.events[-1] == ("client", "E:08006")
    fields = wire.parse_error_fields(client.messages[-1][1])
    assert fields["M"] == "backend authentication failed: incorrect server signature"


def test_a_client_refused_while_its_backend_connects_sends_the_server_nothing(
    pki: PKI, tmp_path: Path, reactor: MemoryReactorClock
) -> None:
    """
    The client's startup deadline passes while the backend is still being
    connected: the client is told, and when the backend connects after
    all, not a byte goes to it (before the fix the StartupMessage did).
    """
    scene = Scene(
        pki,
        tmp_path,
        reactor,
        Session,
        listener={"startup_timeout": "1s"},
        backend={"connect_timeout": "10s"},
    )
    client = scene.start()
    scene.reactor.advance(1)
    assert client.error()["C"] == "08006"
    server = scene.backends.accept()
    assert server.transport.value() == b""
    assert ("server", "close") in scene.events


@pytest.mark.parametrize(
    "message",
    [b"R\x00\x00\x00\x06\x00\x00", b"K\x00\x00\x00\x07abc"],
    ids=["short-authentication", "short-key-data"],
)
def test_a_backend_message_that_does_not_parse_is_08006(scene: Scene, message: bytes) -> None:
    """A well-framed message with a body that does not parse: a clean 08006, no traceback."""
    client = scene.start()
    scene.backends.accept().send(message)
    assert ("client", "E:08006") in scene.events
    assert client.error()["M"].startswith("backend protocol violation")
