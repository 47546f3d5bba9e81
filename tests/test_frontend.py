"""
The client leg before its session (L{pgtls_twisted.proxy._frontend}): encryption
negotiation, the one startup packet, and the ways a connection is refused,
without sockets or a running reactor.

The first part drives L{ClientProtocol} byte by byte on a string transport;
the second runs real TLS between it and a libpq-like fake client over
L{twisted.test.iosim}, on the route's L{MemoryReactorClock}.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from OpenSSL import SSL
from support.fakes import (
    FakePGClient,
    connect_client,
    error_fields,
    feed,
    make_route,
    pump_client,
    sessions,
    startup_message,
)
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.proxy._leg import CLOSE_TIMEOUT, Phase
from pgtls_twisted.proxy._route import Route
from pgtls_twisted.testing.pki import PKI


@pytest.fixture
def route(pki: PKI, tmp_path: Path) -> Route:
    """A route whose listener requires TLS, with direct TLS on (the defaults), 5 s to start."""
    return make_route(pki, tmp_path, listener={"startup_timeout": "5s"})


@pytest.fixture
def allow_route(pki: PKI, tmp_path: Path) -> Route:
    """A route that also takes plaintext sessions."""
    return make_route(pki, tmp_path, listener={"tls": "allow"})


def client_hello(alpn: tuple[bytes, ...] = (b"postgresql",)) -> bytes:
    """A real TLS ClientHello, as a PostgreSQL 17 client with sslnegotiation=direct starts."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if alpn:
        ctx.set_alpn_protos(list(alpn))
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    return conn.bio_read(65536)


def assert_fatal(data: bytes, sqlstate: str, text: str | None = None) -> dict[str, str]:
    fields = error_fields(data)
    assert fields["S"] == fields["V"] == "FATAL"
    assert fields["C"] == sqlstate
    if text is not None:
        assert text in fields["M"]
    return fields


# ---------------------------------------------------------------------------
# SSLRequest and GSSENCRequest in plaintext


def test_ssl_request_answered_and_tls_started(route: Route) -> None:
    proto, transport = connect_client(route)
    assert proto.tls is None
    proto.dataReceived(wire.SSL_REQUEST)
    assert transport.value() == b"S"
    assert proto.tls is not None
    assert proto.out is proto.tls
    assert not transport.disconnecting
    # From now on the raw bytes go to the TLS engine, not the startup parser.
    assert proto.dataReceived == proto.tls.dataReceived


def test_ssl_request_in_one_byte_chunks(route: Route) -> None:
    proto, transport = connect_client(route)
    for byte in wire.SSL_REQUEST:
        assert proto.tls is None
        assert transport.value() == b""
        proto.dataReceived(bytes([byte]))
    assert transport.value() == b"S"
    assert proto.tls is not None


@pytest.mark.parametrize(
    "extra",
    [
        b"\0",
        startup_message(),
        wire.message(b"Q", b"select 1\0"),
        wire.SSL_REQUEST,
        client_hello(),
    ],
    ids=["one-byte", "startup", "query", "ssl-request", "client-hello"],
)
@pytest.mark.parametrize("split", [False, True], ids=["one-chunk", "split-request"])
def test_bytes_after_ssl_request_are_fatal(route: Route, extra: bytes, split: bool) -> None:
    """
    CVE-2021-23214: bytes pipelined after the SSLRequest were sent before
    any encryption; they are refused before C{S} is sent, like PgBouncer.
    """
    proto, transport = connect_client(route)
    if split:  # the request's tail arrives with the extra bytes
        proto.dataReceived(wire.SSL_REQUEST[:5])
        proto.dataReceived(wire.SSL_REQUEST[5:] + extra)
    else:
        proto.dataReceived(wire.SSL_REQUEST + extra)
    assert_fatal(transport.value(), "08P01", "received unencrypted data after SSL request")
    assert transport.disconnecting
    assert proto.tls is None
    assert sessions(route) == []
    # Anything more is ignored.
    proto.dataReceived(startup_message())
    assert sessions(route) == []


def test_gssenc_refused_then_ssl(route: Route) -> None:
    proto, transport = connect_client(route)
    proto.dataReceived(wire.GSSENC_REQUEST)
    assert transport.value() == b"N"
    assert proto.tls is None
    proto.dataReceived(wire.SSL_REQUEST)
    assert transport.value() == b"NS"
    assert proto.tls is not None


def test_gssenc_in_one_byte_chunks(route: Route) -> None:
    proto, transport = connect_client(route)
    feed(proto, wire.GSSENC_REQUEST + wire.SSL_REQUEST, chunk=1)
    assert transport.value() == b"NS"
    assert proto.tls is not None


def test_gssenc_twice_is_fatal(route: Route) -> None:
    proto, transport = connect_client(route)
    proto.dataReceived(wire.GSSENC_REQUEST)
    transport.clear()
    proto.dataReceived(wire.GSSENC_REQUEST)
    assert_fatal(transport.value(), "08P01", "duplicate GSSAPI encryption request")
    assert transport.disconnecting


@pytest.mark.parametrize("extra", [b"x", wire.SSL_REQUEST, startup_message()])
def test_bytes_after_gssenc_request_are_fatal(allow_route: Route, extra: bytes) -> None:
    proto, transport = connect_client(allow_route)
    proto.dataReceived(wire.GSSENC_REQUEST + extra)
    assert_fatal(
        transport.value(), "08P01", "received unencrypted data after GSSAPI encryption request"
    )
    assert transport.disconnecting
    assert sessions(allow_route) == []


def test_alternating_requests_cannot_loop(route: Route) -> None:
    """
    CVE-2026-6479: each request is allowed once. After GSSENC (N) and SSL
    (S) everything goes to TLS, so the rest of 10,000 alternations is only
    a failed TLS handshake: nothing more is answered in plaintext.
    """
    proto, transport = connect_client(route)
    proto.dataReceived(wire.GSSENC_REQUEST)
    proto.dataReceived(wire.SSL_REQUEST)
    assert transport.value() == b"NS"
    tls = proto.tls
    assert tls is not None
    transport.clear()
    for _ in range(5000):
        if transport.disconnecting:
            break
        proto.dataReceived(wire.GSSENC_REQUEST)
        proto.dataReceived(wire.SSL_REQUEST)
    # Only the TLS engine answered: an alert record, then the close.
    assert transport.value()[:1] in (b"", b"\x15")
    assert transport.disconnecting
    assert proto.tls is tls
    assert sessions(route) == []


def test_second_gssenc_after_refusal_is_fatal(route: Route) -> None:
    """The same without TLS in between: GSSENC, N, GSSENC is fatal at once."""
    proto, transport = connect_client(route)
    for _ in range(3):
        proto.dataReceived(wire.GSSENC_REQUEST)
    assert transport.value()[:1] == b"N"
    assert_fatal(transport.value()[1:], "08P01")
    assert transport.disconnecting


# ---------------------------------------------------------------------------
# A plaintext StartupMessage


def test_plaintext_startup_on_tls_only_listener(route: Route) -> None:
    proto, transport = connect_client(route)
    proto.dataReceived(startup_message("alice"))
    assert_fatal(transport.value(), "28000", "this listener requires TLS")
    assert transport.disconnecting
    assert sessions(route) == []


def test_plaintext_startup_after_gssenc_on_tls_only_listener(route: Route) -> None:
    proto, transport = connect_client(route)
    proto.dataReceived(wire.GSSENC_REQUEST)
    proto.dataReceived(startup_message("alice"))
    assert transport.value()[:1] == b"N"
    assert_fatal(transport.value()[1:], "28000", "this listener requires TLS")
    assert sessions(route) == []


def test_plaintext_startup_allowed(allow_route: Route) -> None:
    proto, transport = connect_client(allow_route)
    raw = startup_message("alice", database="shop")
    early = wire.message(b"Q", b"select 1\0")
    proto.dataReceived(raw + early)
    assert transport.value() == b""
    [(client, startup)] = sessions(allow_route)
    assert client is proto
    assert startup.encode() == raw
    assert (startup.user, startup.database) == ("alice", "shop")
    assert proto.startup is startup
    assert proto.stats.client_tls is None
    # Pipelined bytes wait for the session; the client is paused meanwhile.
    assert bytes(proto.pending) == early
    assert transport.producerState == "paused"
    assert len(sessions(allow_route)) == 1


def test_plaintext_bytes_after_startup_go_to_the_session(allow_route: Route) -> None:
    """
    Later chunks must reach C{deliver} like the first: C{pending} while the
    backend connects, then whatever the session put there (here, as
    L{pgtls_twisted.proxy._session} does for its first client message, a
    PasswordMessage).
    """
    proto, transport = connect_client(allow_route)
    proto.dataReceived(startup_message("alice"))
    assert len(sessions(allow_route)) == 1
    proto.dataReceived(b"more")
    assert not transport.disconnecting, proto.stats.reason
    assert bytes(proto.pending) == b"more"
    received: list[bytes] = []
    proto.deliver = received.append
    password = wire.message(b"p", b"secret\0")
    proto.dataReceived(password)
    assert received == [password]
    assert not transport.disconnecting, proto.stats.reason


def test_tls_bytes_after_startup_go_to_the_session(route: Route, pki: PKI) -> None:
    """The same inside TLS (which works): C{pending}, then the session's C{deliver}."""
    client = FakePGClient(
        pki.cert("ca"), route.clock, alpn=[b"postgresql"], onHandshake=startup_message()
    )
    server, serverIO, pump = pump_client(route, client)
    assert len(sessions(route)) == 1
    client.sendTLS(b"more")
    pump.flush()
    assert bytes(server.pending) == b"more"
    received: list[bytes] = []
    server.deliver = received.append
    password = wire.message(b"p", b"secret\0")
    client.sendTLS(password)
    pump.flush()
    assert received == [password]
    assert not serverIO.disconnecting


def test_plaintext_startup_in_one_byte_chunks(allow_route: Route) -> None:
    proto, transport = connect_client(allow_route)
    feed(proto, wire.GSSENC_REQUEST + startup_message("bob"), chunk=1)
    assert transport.value() == b"N"
    [(_, startup)] = sessions(allow_route)
    assert startup.user == "bob"
    assert bytes(proto.pending) == b""


def test_protocol_2_startup(allow_route: Route) -> None:
    proto, transport = connect_client(allow_route)
    proto.dataReceived(struct.pack("!II", 8 + 11, 2 << 16) + b"user\0bob\0\0\0")
    assert_fatal(transport.value(), "08P01", "unsupported frontend protocol 2.0")
    assert transport.disconnecting
    assert sessions(allow_route) == []


def test_startup_without_user(allow_route: Route) -> None:
    proto, transport = connect_client(allow_route)
    proto.dataReceived(wire.encode_startup_message({"database": "shop"}))
    assert_fatal(transport.value(), "28000", "no PostgreSQL user name")
    assert sessions(allow_route) == []


def test_max_clients(pki: PKI, tmp_path: Path) -> None:
    route = make_route(pki, tmp_path, listener={"tls": "allow", "max_clients": 1})
    first, _ = connect_client(route)
    second, transport = connect_client(route)
    assert route.clients == {first, second}
    second.dataReceived(startup_message())
    assert_fatal(transport.value(), "53300", "too many clients")
    assert sessions(route) == []
    # Once the others are gone, a new client gets its session.
    first.connectionLost(Failure(ConnectionDone()))
    second.connectionLost(Failure(ConnectionDone()))
    assert route.clients == set()
    third, transport = connect_client(route)
    third.dataReceived(startup_message())
    assert transport.value() == b""
    assert len(sessions(route)) == 1


# ---------------------------------------------------------------------------
# Dropped without a word


@pytest.mark.parametrize("length", [0, 4, 7, 10001, 0x7FFFFFFF, 0xFFFFFFFF])
def test_bad_startup_length_aborts(allow_route: Route, length: int) -> None:
    proto, transport = connect_client(allow_route)
    proto.dataReceived(struct.pack("!I", length))
    assert transport.value() == b""
    assert transport.aborted
    proto.dataReceived(b"\0" * 100)
    assert transport.value() == b""
    assert sessions(allow_route) == []


def test_bad_length_after_gssenc_aborts(route: Route) -> None:
    proto, transport = connect_client(route)
    proto.dataReceived(wire.GSSENC_REQUEST)
    proto.dataReceived(struct.pack("!I", 20000))
    assert transport.value() == b"N"
    assert transport.aborted


@pytest.mark.parametrize("keylen", [0, 257])
def test_cancel_request_with_bad_length(allow_route: Route, keylen: int) -> None:
    proto, transport = connect_client(allow_route)
    body = struct.pack("!I", 1) + b"k" * keylen
    proto.dataReceived(struct.pack("!II", 8 + len(body), wire.CANCEL_REQUEST_CODE) + body)
    assert transport.value() == b""
    assert transport.aborted


@pytest.mark.parametrize("tls_mode", ["require", "allow"])
def test_cancel_request_for_unknown_key(pki: PKI, tmp_path: Path, tls_mode: str) -> None:
    """
    Answered with nothing (like PostgreSQL) and forwarded nowhere: only keys
    this process minted are honoured. Plaintext cancels are accepted even on
    a TLS-only listener, since psql's Ctrl-C sends them that way.
    """
    route = make_route(pki, tmp_path, listener={"tls": tls_mode})
    proto, transport = connect_client(route)
    proto.dataReceived(wire.CancelRequest(1234, b"\1\2\3\4").encode())
    assert transport.value() == b""
    assert transport.disconnecting
    assert route.reactor.tcpClients == []
    assert sessions(route) == []
    assert proto.stats.reason == "cancel request"


def test_startup_deadline(route: Route) -> None:
    proto, transport = connect_client(route)
    route.clock.advance(4.9)
    assert not transport.disconnecting
    route.clock.advance(0.2)
    assert transport.aborted
    assert transport.value() == b""
    assert "startup did not complete" in proto.stats.reason


def test_startup_deadline_during_partial_packet(route: Route) -> None:
    proto, transport = connect_client(route)
    proto.dataReceived(startup_message()[:10])
    route.clock.advance(5)
    assert transport.aborted
    assert transport.value() == b""


def test_startup_deadline_during_tls_handshake(route: Route) -> None:
    proto, transport = connect_client(route)
    proto.dataReceived(wire.SSL_REQUEST)
    route.clock.advance(5)
    assert transport.aborted
    assert transport.value() == b"S"


def test_deadline_cancelled_when_connection_lost(route: Route) -> None:
    proto, transport = connect_client(route)
    assert route.clock.getDelayedCalls()
    proto.connectionLost(Failure(ConnectionDone()))
    assert route.clock.getDelayedCalls() == []
    assert proto not in route.clients


# ---------------------------------------------------------------------------
# Direct TLS, first byte


def test_direct_tls_started_with_the_bytes_read(route: Route) -> None:
    proto, transport = connect_client(route)
    proto.dataReceived(client_hello())
    assert proto.tls is not None
    # The ClientHello reached the TLS engine: the ServerHello is out.
    out = transport.value()
    assert out[:1] == bytes([wire.TLS_HANDSHAKE_RECORD])
    assert not transport.disconnecting


def test_direct_tls_first_byte_alone(route: Route) -> None:
    hello = client_hello()
    proto, transport = connect_client(route)
    proto.dataReceived(hello[:1])
    assert proto.tls is not None
    assert transport.value() == b""
    proto.dataReceived(hello[1:])
    assert transport.value()[:1] == bytes([wire.TLS_HANDSHAKE_RECORD])


def test_direct_tls_refused_when_off(pki: PKI, tmp_path: Path) -> None:
    route = make_route(pki, tmp_path, listener={"direct_tls": False, "tls": "allow"})
    proto, transport = connect_client(route)
    proto.dataReceived(client_hello())
    assert proto.tls is None
    assert transport.aborted
    assert transport.value() == b""


# ---------------------------------------------------------------------------
# Real TLS over iosim


def test_tls_session(route: Route, pki: PKI) -> None:
    raw = startup_message("alice", database="shop")
    client = FakePGClient(pki.cert("ca"), route.clock, alpn=[b"postgresql"], onHandshake=raw)
    server, serverIO, _ = pump_client(route, client)
    assert client.plaintext == b"S"
    [(proto, startup)] = sessions(route)
    assert proto is server
    assert startup.encode() == raw
    assert server.stats.client_tls["version"] == "TLSv1.3"
    assert server.tls.negotiatedProtocol == b"postgresql"
    assert client.negotiatedProtocol == b"postgresql"
    assert not serverIO.disconnecting
    assert client.lostReason is None


def test_tls_session_without_alpn(route: Route, pki: PKI) -> None:
    """After an SSLRequest, no ALPN is fine: older libpq, JDBC and others send none."""
    client = FakePGClient(pki.cert("ca"), route.clock, alpn=None, onHandshake=startup_message())
    server, _, _ = pump_client(route, client)
    assert len(sessions(route)) == 1
    assert server.tls.negotiatedProtocol is None


def test_tls_startup_in_pieces_with_pipelined_query(route: Route, pki: PKI) -> None:
    raw = startup_message("alice")
    query = wire.message(b"Q", b"select 1\0")
    client = FakePGClient(pki.cert("ca"), route.clock, alpn=[b"postgresql"])
    server, _, pump = pump_client(route, client)
    assert client.handshakeDone
    client.sendTLS(raw[:3])
    pump.flush()
    client.sendTLS(raw[3:] + query)
    pump.flush()
    [(_, startup)] = sessions(route)
    assert startup.encode() == raw
    assert bytes(server.pending) == query


@pytest.mark.parametrize(
    "request_, name",
    [(wire.SSL_REQUEST, "1234.5679"), (wire.GSSENC_REQUEST, "1234.5680")],
    ids=["ssl", "gssenc"],
)
@pytest.mark.parametrize("direct", [False, True], ids=["negotiated", "direct"])
def test_encryption_request_inside_tls(
    route: Route, pki: PKI, request_: bytes, name: str, direct: bool
) -> None:
    """
    No second negotiation inside TLS (T-SSL-TWICE), and never GSS over TLS
    (CVE-2026-14681): FATAL, over the encrypted channel.
    """
    client = FakePGClient(
        pki.cert("ca"), route.clock, direct=direct, alpn=[b"postgresql"], onHandshake=request_
    )
    server, serverIO, _ = pump_client(route, client)
    assert client.plaintext == (b"" if direct else b"S")
    assert_fatal(client.decrypted, "08P01", f"unsupported frontend protocol {name}")
    assert serverIO.disconnecting
    assert sessions(route) == []


def test_garbage_length_inside_tls(route: Route, pki: PKI) -> None:
    client = FakePGClient(
        pki.cert("ca"), route.clock, alpn=[b"postgresql"], onHandshake=b"\xff\xff\xff\xff"
    )
    server, serverIO, _ = pump_client(route, client)
    assert client.decrypted == b""
    assert serverIO.disconnecting
    assert sessions(route) == []


def test_plaintext_after_s_fails_the_handshake(route: Route, pki: PKI) -> None:
    """
    T-INJ-3: an attacker who waits for C{S} and then sends plaintext only
    gets a failed TLS handshake; the bytes are never parsed.
    """
    proto, transport = connect_client(route)
    proto.dataReceived(wire.SSL_REQUEST)
    assert transport.value() == b"S"
    transport.clear()
    proto.dataReceived(startup_message())
    assert sessions(route) == []
    assert transport.disconnecting


def test_direct_tls_session(route: Route, pki: PKI) -> None:
    raw = startup_message("alice")
    client = FakePGClient(
        pki.cert("ca"), route.clock, direct=True, alpn=[b"postgresql"], onHandshake=raw
    )
    server, serverIO, _ = pump_client(route, client)
    assert client.plaintext == b""
    assert client.negotiatedProtocol == b"postgresql"
    [(proto, startup)] = sessions(route)
    assert proto is server
    assert startup.encode() == raw
    assert server.stats.client_tls["version"] == "TLSv1.3"
    assert not serverIO.disconnecting


def test_direct_tls_without_alpn_is_dropped(route: Route, pki: PKI) -> None:
    """PostgreSQL: "received direct SSL connection request without ALPN"."""
    client = FakePGClient(
        pki.cert("ca"), route.clock, direct=True, alpn=None, onHandshake=startup_message()
    )
    server, serverIO, _ = pump_client(route, client)
    assert client.handshakeDone
    assert serverIO.disconnecting
    assert client.decrypted == b""
    assert client.lostReason is not None
    assert sessions(route) == []
    assert "ALPN" in server.stats.reason


@pytest.mark.parametrize("direct", [False, True], ids=["negotiated", "direct"])
def test_alpn_without_postgresql_is_refused(route: Route, pki: PKI, direct: bool) -> None:
    """
    A client offering ALPN without C{postgresql} gets the fatal
    no_application_protocol alert, on either path (PostgreSQL's C{alpn_cb}).
    """
    client = FakePGClient(
        pki.cert("ca"), route.clock, direct=direct, alpn=[b"h2"], onHandshake=startup_message()
    )
    server, serverIO, _ = pump_client(route, client)
    assert not client.handshakeDone
    assert "no application protocol" in client.alert()
    assert serverIO.disconnecting
    assert sessions(route) == []


# ---------------------------------------------------------------------------
# The phase: one answer to "where is this connection?"


def test_phases_through_tls(route: Route, pki: PKI) -> None:
    proto, transport = connect_client(route)
    assert proto.phase is Phase.NEGOTIATING
    client = FakePGClient(pki.cert("ca"), route.clock, alpn=[b"postgresql"])
    server, serverIO, pump = pump_client(route, client)
    assert server.phase is Phase.STARTUP
    client.sendTLS(startup_message())
    pump.flush()
    assert server.phase is Phase.AUTHENTICATING
    server.startupComplete()
    assert server.phase is Phase.READY
    server.close()
    assert (server.phase, server.reached) == (Phase.CLOSING, Phase.READY)
    server.connectionLost(Failure(ConnectionDone()))
    assert (server.phase, server.reached) == (Phase.CLOSED, Phase.READY)


def test_phases_in_plaintext(allow_route: Route) -> None:
    """A plaintext client's startup packet ends its negotiation: no STARTUP phase."""
    proto, transport = connect_client(allow_route)
    proto.dataReceived(wire.GSSENC_REQUEST)
    assert proto.phase is Phase.NEGOTIATING
    proto.dataReceived(startup_message())
    assert proto.phase is Phase.AUTHENTICATING
    proto.connectionLost(Failure(ConnectionDone()))
    assert (proto.phase, proto.reached) == (Phase.CLOSED, Phase.AUTHENTICATING)
    assert proto.stats.reason == "client closed"


def test_tls_handshake_phase(route: Route) -> None:
    proto, transport = connect_client(route)
    proto.dataReceived(wire.SSL_REQUEST)
    assert proto.phase is Phase.TLS_HANDSHAKE
    proto.connectionLost(Failure(ConnectionDone()))
    assert proto.reached is Phase.TLS_HANDSHAKE
    assert proto.stats.reason.startswith("TLS handshake failed")


def test_startup_deadline_while_closing_a_plaintext_refusal(route: Route) -> None:
    """
    A refusal before any startup packet is closing when the deadline comes:
    the client that does not answer the close is dropped then, as one that
    never spoke would be.
    """
    proto, transport = connect_client(route)
    proto.dataReceived(wire.SSL_REQUEST + b"x")
    assert proto.phase is Phase.CLOSING
    assert not transport.aborted
    route.clock.advance(5)
    assert transport.aborted


def test_startup_deadline_while_closing_after_startup(route: Route) -> None:
    """Once an ErrorResponse could be sent, a closing client keeps its close timeout."""
    proto, transport = connect_client(route)
    proto.dataReceived(startup_message())  # plaintext on a TLS-only listener
    assert_fatal(transport.value(), "28000")
    assert (proto.phase, proto.reached) == (Phase.CLOSING, Phase.AUTHENTICATING)
    route.clock.advance(5)
    assert not transport.aborted
    route.clock.advance(CLOSE_TIMEOUT)
    assert transport.aborted


@pytest.mark.parametrize("tls", [False, True], ids=["negotiating", "tls-handshake"])
def test_terminate_before_a_channel(route: Route, tls: bool) -> None:
    """Nothing can be said yet: dropped."""
    proto, transport = connect_client(route)
    if tls:
        proto.dataReceived(wire.SSL_REQUEST)
        transport.clear()
    proto.terminate()
    assert transport.aborted
    assert transport.value() == b""
    assert proto.phase is Phase.CLOSING


def test_terminate_after_startup_says_why(allow_route: Route) -> None:
    proto, transport = connect_client(allow_route)
    proto.dataReceived(startup_message())
    proto.terminate()
    assert_fatal(transport.value(), "57P01", "administrator command")
    assert proto.phase is Phase.CLOSING
    # Once closing, a second terminate says nothing more.
    transport.clear()
    proto.terminate()
    assert transport.value() == b""


def test_role_name_is_what_postgresql_logs_in_as() -> None:
    from pgtls_twisted.proxy._frontend import _role_name

    assert _role_name(b"alice") == b"alice"
    assert _role_name(b"v" * 63 + b"x") == b"v" * 63
    # Cut at 63 bytes without splitting a character (62 + a 2-byte char).
    assert _role_name(b"v" * 62 + "é".encode()) == b"v" * 62
    # Not UTF-8: no certificate can vouch for it.
    assert _role_name(b"a\xff") is None
