"""
End-to-end attack resistance, part two: the startup. Hostile first
packets (T-LEN), cancel requests of odd lengths and garbage, slow clients
against the startup deadline (T-SLOW-*), connections that end abruptly at
every stage of the startup, and C{cert_user_match} against the name
PostgreSQL will actually use.

As in test_attacks (and with its helpers, L{support.attacks}): raw-socket
clients in threads against pgtls running in-process, a recording backend
that must see nothing of an attack, and a normal client that must still be
served afterwards.
"""

from __future__ import annotations

import random
import shutil
import socket
import struct
import time
from pathlib import Path

import pytest
import pytest_twisted
from support.attacks import (
    assert_still_serves,
    assert_tls_failure_bytes,
    assert_untouched,
    code_and_message,
    only_fatal,
    recorded,
    running,
    send_and_collect,
    tls_then,
    wait_no_clients,
)
from support.fakebackend import FakeBackend, answer_startup
from support.proxy import route
from support.rawclient import (
    SSL_REQUEST,
    cancel_request,
    client_hello,
    connect,
    length_word,
    raw_startup,
    read_message,
    read_until_close,
    readable,
    recv_exact,
    request_tls,
    startup_message,
    tls_wrap,
)
from support.waiting import sleep
from twisted.internet.threads import deferToThread

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.testing.cluster import MD5_USER, SCRAM_USER
from pgtls_twisted.testing.pki import PKI, write_leaf

#: The route startup_timeout of the slow-client tests, and how late the
#: proxy may be to enforce it.
STARTUP_TIMEOUT = 2.0
LATE = 2.0


# ---------------------------------------------------------------------------
# T-LEN: hostile first packets


@pytest.mark.parametrize(
    ("payload", "shut_write"),
    [
        pytest.param(length_word(4), False, id="len-4"),
        pytest.param(length_word(7, b"\0\0\0"), False, id="len-7"),
        pytest.param(length_word(10001, b"\x00\x03\x00\x00"), False, id="len-10001"),
        pytest.param(length_word(0xFFFFFFFF), False, id="len-0xFFFFFFFF"),
        pytest.param(length_word(0x80000008, b"\x00\x03\x00\x00"), False, id="len-bit31"),
        pytest.param(b"\x00\x00", True, id="truncated-header"),
        pytest.param(startup_message(MD5_USER, "postgres")[:20], True, id="truncated-body"),
        pytest.param(SSL_REQUEST[:5], True, id="truncated-ssl-request"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_len_bad_first_packet_closed_silently(pki, pg_tls, tmp_path, payload, shut_write):
    """
    [T-LEN] Impossible lengths are refused as soon as the length word is
    in, with no reply (as PostgreSQL does: nothing is buffered for them);
    a truncated packet followed by EOF is just a closed connection.
    """
    async with recorded(pki, pg_tls, tmp_path) as (proxy, recorder):
        data = await deferToThread(send_and_collect, proxy.port(), payload, shut_write=shut_write)
        assert data == b""
        await assert_untouched(recorder)
        await assert_still_serves(proxy, pki, recorder)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(length_word(4), id="len-4"),
        pytest.param(length_word(10001, b"\x00\x03\x00\x00"), id="len-10001"),
        pytest.param(length_word(0xFFFFFFFF), id="len-0xFFFFFFFF"),
        pytest.param(length_word(0x80000008, b"\x00\x03\x00\x00"), id="len-bit31"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_len_bad_packet_inside_tls_closed_silently(pki, pg_tls, tmp_path, payload):
    """[T-LEN] The same inside TLS: dropped, without even a close_notify's worth of data."""
    async with recorded(pki, pg_tls, tmp_path) as (proxy, recorder):
        data = await deferToThread(tls_then, proxy.port(), pki.cert("ca"), payload)
        assert data == b""
        await assert_untouched(recorder)
        await assert_still_serves(proxy, pki, recorder)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param(
            raw_startup(b""),
            ("08P01", "invalid startup packet layout: expected terminator as last byte"),
            id="empty-body",
        ),
        pytest.param(
            raw_startup(b"user\0alice\0"),
            ("08P01", "invalid startup packet layout: expected terminator as last byte"),
            id="no-final-terminator",
        ),
        pytest.param(
            raw_startup(b"user\0alice\0database\0\0"),
            ("08P01", "invalid startup packet layout: odd number of name/value strings"),
            id="odd-pairs",
        ),
        pytest.param(
            raw_startup(b"user\0alice\0\0x\0\0"),
            None,
            id="data-after-terminator",
        ),
        pytest.param(
            raw_startup(b"user\0\0\0"),
            ("28000", "no PostgreSQL user name specified in startup packet"),
            id="empty-user",
        ),
        pytest.param(
            raw_startup(b"\0"),
            ("28000", "no PostgreSQL user name specified in startup packet"),
            id="no-parameters",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_len_bad_startup_layout_fatal(pki, pg_tls, tmp_path, payload, expected):
    """[T-LEN] A malformed StartupMessage gets PostgreSQL's FATAL, and a close."""
    async with recorded(pki, pg_tls, tmp_path) as (proxy, recorder):
        data = await deferToThread(tls_then, proxy.port(), pki.cert("ca"), payload)
        fields = only_fatal(data)
        if expected is None:
            assert fields["C"] == "08P01", fields
            assert fields["M"].startswith("invalid startup packet layout"), fields
        else:
            assert code_and_message(fields) == expected
        await assert_untouched(recorder)
        await assert_still_serves(proxy, pki, recorder)


# ---------------------------------------------------------------------------
# Cancel requests and garbage


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(cancel_request(12345, b"\x01\x02\x03"), id="15-bytes"),
        pytest.param(cancel_request(12345, b"\x01\x02\x03\x04\x05"), id="17-bytes"),
        pytest.param(cancel_request(12345, b""), id="12-bytes-no-key"),
        pytest.param(cancel_request(12345, b"k" * 257), id="269-bytes-key-too-long"),
    ],
)
@pytest.mark.parametrize("inside_tls", [False, True], ids=["plaintext", "tls"])
@pytest_twisted.ensureDeferred
async def test_cancel_request_odd_lengths_closed_without_reply(
    pki, pg_tls, tmp_path, payload, inside_tls
):
    """
    A CancelRequest is never answered, whatever its key length; one that
    names no session reaches no backend.
    """
    async with recorded(pki, pg_tls, tmp_path) as (proxy, recorder):
        if inside_tls:
            data = await deferToThread(tls_then, proxy.port(), pki.cert("ca"), payload)
        else:
            data = await deferToThread(send_and_collect, proxy.port(), payload)
        assert data == b""
        await assert_untouched(recorder)
        await assert_still_serves(proxy, pki, recorder)


def _garbage() -> bytes:
    data = random.Random(1).randbytes(64)
    assert data[0] not in (0x00, wire.TLS_HANDSHAKE_RECORD)
    return data


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(_garbage(), id="random-64-bytes"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", id="http"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_garbage_closed_without_reply(pki, pg_tls, tmp_path, payload):
    """Not PostgreSQL at all: the proxy hangs up by itself, saying nothing."""
    async with recorded(pki, pg_tls, tmp_path) as (proxy, recorder):
        data = await deferToThread(send_and_collect, proxy.port(), payload)
        assert data == b""
        await assert_untouched(recorder)
        await assert_still_serves(proxy, pki, recorder)


@pytest_twisted.ensureDeferred
async def test_tls_record_garbage_fails_handshake(pki, pg_tls, tmp_path):
    """A first byte of 0x16 (direct TLS) followed by garbage: TLS alert at most."""
    async with recorded(pki, pg_tls, tmp_path) as (proxy, recorder):
        payload = b"\x16\x03\x01\x00\x20" + random.Random(3).randbytes(32)
        data = await deferToThread(send_and_collect, proxy.port(), payload)
        assert_tls_failure_bytes(data)
        await assert_untouched(recorder)
        await assert_still_serves(proxy, pki, recorder)


# ---------------------------------------------------------------------------
# T-SLOW-1/2/3: the startup deadline


def _slow_silent(port: int, ca: Path) -> tuple[float, bytes]:
    """T-SLOW-1: connect and send nothing."""
    with connect(port) as sock:
        start = time.monotonic()
        data = read_until_close(sock, timeout=STARTUP_TIMEOUT + LATE + 1)
        return time.monotonic() - start, data


def _slow_dribble(port: int, ca: Path) -> tuple[float, bytes]:
    """T-SLOW-2: a StartupMessage one byte every 0.5 s (it would take ~20 s)."""
    packet = startup_message(SCRAM_USER, "postgres", application_name="dribble")
    with connect(port) as sock:
        start = time.monotonic()
        for i in range(len(packet)):
            try:
                sock.sendall(packet[i : i + 1])
            except OSError:
                break
            if readable(sock, 0.5):
                break
            if time.monotonic() - start > STARTUP_TIMEOUT + LATE + 1:
                raise AssertionError("still open long after the startup deadline")
        else:
            raise AssertionError("the whole StartupMessage was accepted at a trickle")
        data = read_until_close(sock)
        return time.monotonic() - start, data


def _slow_partial_client_hello(port: int, ca: Path) -> tuple[float, bytes]:
    """T-SLOW-3: SSLRequest, C{S}, then half a ClientHello and a stall."""
    hello = client_hello()
    with connect(port) as sock:
        start = time.monotonic()
        sock.sendall(SSL_REQUEST)
        assert recv_exact(sock, 1) == b"S"
        sock.sendall(hello[: len(hello) // 2])
        data = read_until_close(sock, timeout=STARTUP_TIMEOUT + LATE + 1)
        return time.monotonic() - start, data


def _slow_after_handshake(port: int, ca: Path) -> tuple[float, bytes]:
    """TLS completes, then no StartupMessage: the proxy can say why, in TLS."""
    with connect(port) as raw:
        start = time.monotonic()
        with request_tls(raw, ca) as sock:
            data = read_until_close(sock, timeout=STARTUP_TIMEOUT + LATE + 1)
            return time.monotonic() - start, data


_SLOW_TEXT = f"pgtls: connection startup did not complete within {STARTUP_TIMEOUT:g}s"


@pytest.mark.parametrize(
    ("client", "fatal"),
    [
        pytest.param(_slow_silent, False, id="silent"),
        pytest.param(_slow_dribble, False, id="dribble-startup"),
        pytest.param(_slow_partial_client_hello, False, id="stalled-client-hello"),
        pytest.param(_slow_after_handshake, True, id="silent-after-handshake"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_slow_client_cut_off_at_startup_deadline(pki, pg_tls, tmp_path, client, fatal):
    """
    [T-SLOW-1/2/3] With startup_timeout = "2s", a client that stalls
    before its session starts is closed at the deadline (a total deadline,
    not an idle timer: the dribbler sends every 0.5 s), while a normal
    client connecting meanwhile is served at once.
    """
    async with recorded(pki, pg_tls, tmp_path, startup_timeout="2s") as (proxy, recorder):
        slow = deferToThread(client, proxy.port(), pki.cert("ca"))
        await sleep(0.3)
        await assert_still_serves(proxy, pki, recorder, all_gone=False)
        # Served while the slow client was still being held at bay.
        assert not slow.called, "the slow client was closed before the normal one was served"
        elapsed, data = await slow
        assert STARTUP_TIMEOUT - 0.2 <= elapsed <= STARTUP_TIMEOUT + LATE
        if fatal:
            assert code_and_message(only_fatal(data)) == ("08006", _SLOW_TEXT)
        elif client is _slow_partial_client_hello:
            assert_tls_failure_bytes(data)
        else:
            assert data == b""
        await wait_no_clients(proxy)
        # Only the normal client's connection reached the backend.
        assert len(recorder.connections) == 1


@pytest_twisted.ensureDeferred
async def test_slow_authentication_cut_off_at_startup_deadline(pki, pg_tls, tmp_path):
    """
    The deadline runs until the session starts, not just until the
    StartupMessage: a client that never answers the backend's password
    request gets FATAL 08006 at the deadline and the backend leg is closed.
    """

    def stall(port: int, ca: Path) -> tuple[float, tuple[bytes, bytes], bytes]:
        with connect(port) as raw:
            start = time.monotonic()
            with request_tls(raw, ca) as sock:
                sock.sendall(startup_message("staller", "db"))
                request = read_message(sock)
                data = read_until_close(sock, timeout=STARTUP_TIMEOUT + LATE + 1)
                return time.monotonic() - start, request, data

    # MD5, not cleartext: pgtls never relays a cleartext password request
    # over a plaintext backend leg (issue 10, item 5).
    md5_request = wire.authentication(wire.AUTH_MD5_PASSWORD, b"salt")
    fake = FakeBackend(answer_startup(md5_request)).start()
    routes = [
        route(pki, fake, name="evil", listener={"startup_timeout": "2s"}),
        route(pki, pg_tls, name="app"),
    ]
    async with running(tmp_path, routes, fake) as proxy:
        elapsed, request, data = await deferToThread(stall, proxy.port("evil"), pki.cert("ca"))
        assert request == (b"R", struct.pack("!I", wire.AUTH_MD5_PASSWORD) + b"salt")
        assert STARTUP_TIMEOUT - 0.2 <= elapsed <= STARTUP_TIMEOUT + LATE
        assert code_and_message(only_fatal(data)) == ("08006", _SLOW_TEXT)
        await fake.settle()
        assert len(fake.connections) == 1
        assert fake.received == startup_message("staller", "db")
        await wait_no_clients(proxy, "evil")
        await assert_still_serves(proxy, pki, name="app")


# ---------------------------------------------------------------------------
# Abrupt ends at every stage of the startup


def _eof_after_ssl_request(port: int, ca: Path) -> None:
    with connect(port) as sock:
        sock.sendall(SSL_REQUEST)
        assert recv_exact(sock, 1) == b"S"


def _eof_mid_client_hello(port: int, ca: Path) -> None:
    hello = client_hello()
    with connect(port) as sock:
        sock.sendall(SSL_REQUEST)
        assert recv_exact(sock, 1) == b"S"
        sock.sendall(hello[: len(hello) // 2])


def _eof_after_handshake(port: int, ca: Path) -> None:
    # Closing an SSLSocket sends no close_notify: a bare TCP FIN.
    with connect(port) as raw:
        request_tls(raw, ca).close()


def _eof_mid_startup(port: int, ca: Path) -> None:
    with connect(port) as raw, request_tls(raw, ca) as sock:
        sock.sendall(startup_message(MD5_USER, "postgres")[:10])


def _eof_after_startup(port: int, ca: Path) -> None:
    with connect(port) as raw, request_tls(raw, ca) as sock:
        sock.sendall(startup_message(MD5_USER, "postgres"))


def _eof_mid_authentication(port: int, ca: Path) -> None:
    with connect(port) as raw, request_tls(raw, ca) as sock:
        sock.sendall(startup_message(MD5_USER, "postgres"))
        assert read_message(sock)[0] == b"R"


def _reset_after_ssl_request(port: int, ca: Path) -> None:
    sock = connect(port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.sendall(SSL_REQUEST)
    assert recv_exact(sock, 1) == b"S"
    sock.close()


@pytest.mark.parametrize(
    "client",
    [
        pytest.param(_eof_after_ssl_request, id="after-ssl-request"),
        pytest.param(_eof_mid_client_hello, id="mid-client-hello"),
        pytest.param(_eof_after_handshake, id="after-handshake"),
        pytest.param(_eof_mid_startup, id="mid-startup"),
        pytest.param(_eof_after_startup, id="after-startup"),
        pytest.param(_eof_mid_authentication, id="mid-authentication"),
        pytest.param(_reset_after_ssl_request, id="reset-after-ssl-request"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_abrupt_client_exit_leaks_nothing(pki, pg_tls, tmp_path, client):
    """
    A client that vanishes at any point of the startup (PgBouncer's
    test_ssl_eof and friends): no error is logged, the client is
    forgotten, any backend connection made for it is closed and never got
    its StartupMessage unless the backend had already asked for a password,
    and the proxy goes on serving.
    """
    async with recorded(pki, pg_tls, tmp_path) as (proxy, recorder):
        for _ in range(3):
            await deferToThread(client, proxy.port(), pki.cert("ca"))
        await wait_no_clients(proxy)
        await recorder.settle()
        startup = startup_message(MD5_USER, "postgres")
        for conn in recorder.connections:
            # The client's transport is paused while its backend connects,
            # so the proxy may learn of the EOF only after forwarding the
            # StartupMessage; never anything more.
            assert bytes(conn.received) in (b"", startup)
        if client not in (_eof_after_startup, _eof_mid_authentication):
            assert recorder.connections == []
        await assert_still_serves(proxy, pki, recorder)


# ---------------------------------------------------------------------------
# cert_user_match against the name PostgreSQL will actually use


@pytest_twisted.ensureDeferred
async def test_cert_user_match_uses_the_name_postgres_will_use(pki, tmp_path):
    """
    A client certificate whose CN is 64 bytes long equals the StartupMessage's
    user name, but PostgreSQL truncates that name to its first 63 bytes, a
    different role: the proxy must refuse (FATAL 28000, as PostgreSQL's own
    cert authentication would), and send nothing to the backend. (Before
    the fix, a certificate for C{'v' * 63 + 'x'} logged in as C{'v' * 63}.)
    """
    own = PKI(tmp_path / "pki")
    shutil.copytree(pki.directory, own.directory)
    victim = "v" * 63
    claimed = victim + "x"
    cert, key = write_leaf(
        own, "long_cn", [], issuer="client_ca", common_name=claimed, usage="client"
    )
    listener = {"mtls": True, "client_ca": str(own.cert("client_ca")), "cert_user_match": True}
    recorder = FakeBackend().start()

    def attempt(port: int) -> bytes:
        with connect(port) as raw:
            raw.sendall(SSL_REQUEST)
            assert recv_exact(raw, 1) == b"S"
            with tls_wrap(raw, own.cert("ca"), cert=cert, key=key) as sock:
                sock.sendall(startup_message(claimed, "postgres"))
                try:
                    return read_until_close(sock, timeout=1)
                except TimeoutError:
                    return b""  # the proxy went on to the (silent) backend

    async with running(tmp_path, [route(own, recorder, listener=listener)], recorder) as proxy:
        data = await deferToThread(attempt, proxy.port())
        await assert_untouched(recorder)
        assert only_fatal(data)["C"] == "28000"
