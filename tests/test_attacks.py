"""
End-to-end attack resistance: raw-socket clients that misbehave on purpose
against pgtls running in-process, with a recording backend, checking what
the attacker sees, what reached the backend, and that the proxy still
serves a normal client afterwards.

The cases are those of the reference notes (tls-security.md sections 2.1 to
2.4): buffer stuffing on both legs (T-INJ-*), hostile startup lengths
(T-LEN), encryption request loops and repeats (T-NEG-LOOP, T-SSL-TWICE,
T-GSS-AFTER-TLS), slow clients (T-SLOW-*) and downgrades (T-DOWN-*).

Two kinds of backend stand behind the proxy here:

 - a I{recorder} (L{FakeBackend} relaying to the real C{pg_tls} cluster,
   with C{backend.tls = "disable"} so it sees plaintext): attacks on the
   client leg must leave it untouched, and the normal client that follows
   must reach it, which proves the recorder would have seen an attack that
   got through;
 - a I{scripted} fake that attacks the proxy's backend leg, on a route
   named C{evil}, next to a normal route C{app} to the real cluster.

Every blocking client runs in a thread (L{deferToThread}) with socket
timeouts; assertions on what it got are made back on the reactor thread.
"""

from __future__ import annotations

import random
import shutil
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_twisted
from support.fakebackend import FakeBackend, answer_ssl_request, answer_startup
from support.proxy import RunningProxy, route
from support.proxy import running as shared_running
from support.rawclient import (
    GSSENC_REQUEST,
    SSL_REQUEST,
    cancel_request,
    client_hello,
    connect,
    length_word,
    query_message,
    raw_startup,
    read_message,
    read_until_close,
    readable,
    recv_exact,
    request_tls,
    simple_query,
    startup_cleartext,
    startup_message,
    tls_wrap,
)
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.testing.cluster import MD5_PASSWORD, MD5_USER, SCRAM_PASSWORD, SCRAM_USER
from pgtls_twisted.testing.pki import PKI, write_leaf

#: The route startup_timeout of the slow-client tests, and how late the
#: proxy may be to enforce it.
STARTUP_TIMEOUT = 2.0
LATE = 2.0


# ---------------------------------------------------------------------------
# Helpers


async def sleep(seconds: float) -> None:
    from twisted.internet import reactor

    await deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


@asynccontextmanager
async def running(
    tmp_path: Path, routes: list[dict[str, Any]], *fakes: FakeBackend
) -> AsyncIterator[RunningProxy]:
    """The proxy for C{routes}; on exit it and C{fakes} are stopped."""
    try:
        async with shared_running(tmp_path, routes) as proxy:
            yield proxy
    finally:
        for fake in fakes:
            await fake.stop()


@asynccontextmanager
async def recorded(
    pki: Any, cluster: Any, tmp_path: Path, **listener: Any
) -> AsyncIterator[tuple[RunningProxy, FakeBackend]]:
    """
    One route C{app} whose backend is a recorder relaying (in plaintext,
    C{backend.tls = "disable"}) to C{cluster}.
    """
    recorder = FakeBackend(relay_to=(cluster.host, cluster.port)).start()
    async with running(tmp_path, [route(pki, recorder, listener=listener)], recorder) as proxy:
        yield proxy, recorder


def normal_login(proxy: RunningProxy, pki: Any, name: str | None = None) -> tuple[Any, ...]:
    """What a well-behaved user does: psycopg, verify-full, SCRAM."""
    dsn = proxy.dsn(
        name,
        user=SCRAM_USER,
        password=SCRAM_PASSWORD,
        sslmode="verify-full",
        sslrootcert=pki.cert("ca"),
        connect_timeout=5,
    )
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT current_user, 41 + 1").fetchone()
    assert row is not None
    return tuple(row)


async def assert_still_serves(
    proxy: RunningProxy,
    pki: Any,
    recorder: FakeBackend | None = None,
    name: str | None = None,
    *,
    all_gone: bool = True,
) -> None:
    """
    A normal client logs in and queries; if C{recorder} is the route's
    backend, it saw exactly that one more connection, starting with that
    client's StartupMessage (so it would have seen an attack's bytes too).
    With C{all_gone}, the route then forgets every client promptly: the
    attacker's connection too.
    """
    before = len(recorder.connections) if recorder is not None else 0
    assert await deferToThread(normal_login, proxy, pki, name) == (SCRAM_USER, 42)
    if recorder is not None:
        await recorder.settle()
        assert len(recorder.connections) == before + 1
        parsed = wire.parse_startup_packet(recorder.connections[-1].received)
        assert parsed is not None
        startup = parsed[0]
        assert isinstance(startup, wire.StartupMessage)
        assert startup.user == SCRAM_USER
    if all_gone:
        await wait_no_clients(proxy, name)


async def wait_no_clients(
    proxy: RunningProxy, name: str | None = None, timeout: float = 3.0
) -> float:
    """
    Wait until the route has forgotten every client connection; return how
    long that took.
    """
    start = time.monotonic()
    clients = proxy.route(name).clients
    while clients:
        waited = time.monotonic() - start
        assert waited < timeout, f"clients still open after {waited:.1f}s: " + ", ".join(
            str(c.stats.reason) for c in clients
        )
        await sleep(0.02)
    return time.monotonic() - start


async def assert_untouched(recorder: FakeBackend) -> None:
    """Nothing connected to the backend (given a moment to try)."""
    await sleep(0.1)
    assert recorder.connections == []
    assert recorder.received == b""


def only_fatal(data: bytes) -> dict[str, str]:
    """
    C{data}, all the client received until the close, is exactly one FATAL
    ErrorResponse: nothing before it (no C{S}, no C{N}) and nothing after.
    """
    assert data[:1] == b"E", f"expected an ErrorResponse, got {data[:64]!r}"
    (length,) = struct.unpack_from("!I", data, 1)
    assert len(data) == 1 + length, f"bytes besides one ErrorResponse: {data!r}"
    fields = wire.parse_error_fields(data[5:])
    assert fields.get("S") == "FATAL" and fields.get("V") == "FATAL", fields
    return fields


def code_and_message(fields: dict[str, str]) -> tuple[str | None, str | None]:
    return fields.get("C"), fields.get("M")


def assert_tls_failure_bytes(data: bytes) -> None:
    """A failed handshake: no bytes at all, or TLS alert records only."""
    pos = 0
    while pos < len(data):
        assert data[pos] == 0x15, f"not a TLS alert at offset {pos}: {data!r}"
        (length,) = struct.unpack_from("!H", data, pos + 3)
        pos += 5 + length
    assert pos == len(data), data


def send_and_collect(port: int, payload: bytes, *, shut_write: bool = False) -> bytes:
    """Send C{payload} in one write and return everything until the close."""
    with connect(port) as sock:
        sock.sendall(payload)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        return read_until_close(sock)


def tls_then(port: int, ca: Path, payload: bytes, *, direct: bool = False) -> bytes:
    """
    TLS (after an SSLRequest, or direct with ALPN C{postgresql}), then
    C{payload} inside it; everything received inside TLS until the close.
    """
    with connect(port) as raw:
        if direct:
            sock = tls_wrap(raw, ca, alpn=["postgresql"])
        else:
            sock = request_tls(raw, ca)
        with sock:
            sock.sendall(payload)
            return read_until_close(sock)


# ---------------------------------------------------------------------------
# T-INJ-1/2/3: buffer stuffing on the client leg


@pytest_twisted.ensureDeferred
async def test_inj1_plaintext_pipelined_after_ssl_request(pki, pg_tls, tmp_path):
    """
    [T-INJ-1] SSLRequest + StartupMessage + Query in one write: the
    plaintext tail would be taken as sent inside TLS (CVE-2021-23214), so
    the proxy refuses before answering C{S}.
    """
    async with recorded(pki, pg_tls, tmp_path) as (proxy, recorder):
        payload = (
            SSL_REQUEST + startup_message(MD5_USER, "postgres") + query_message("SELECT 'injected'")
        )
        data = await deferToThread(send_and_collect, proxy.port(), payload)
        assert code_and_message(only_fatal(data)) == (
            "08P01",
            "received unencrypted data after SSL request",
        )
        await assert_untouched(recorder)
        await assert_still_serves(proxy, pki, recorder)


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(bytes(random.Random(2).randbytes(40)), id="junk"),
        pytest.param(SSL_REQUEST, id="ssl-request"),
        pytest.param(startup_message(MD5_USER, "postgres"), id="startup"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_inj2_data_pipelined_after_gssenc_request(pki, pg_tls, tmp_path, tail):
    """[T-INJ-2] GSSENCRequest + anything in one write: refused before C{N}."""
    async with recorded(pki, pg_tls, tmp_path) as (proxy, recorder):
        data = await deferToThread(send_and_collect, proxy.port(), GSSENC_REQUEST + tail)
        assert code_and_message(only_fatal(data)) == (
            "08P01",
            "received unencrypted data after GSSAPI encryption request",
        )
        await assert_untouched(recorder)
        await assert_still_serves(proxy, pki, recorder)


@pytest_twisted.ensureDeferred
async def test_inj3_plaintext_after_s_instead_of_client_hello(pki, pg_tls, tmp_path):
    """
    [T-INJ-3] SSLRequest, wait for C{S}, then a plaintext StartupMessage and
    Query where the ClientHello belongs: the TLS handshake fails and the
    bytes are never taken as a startup packet.
    """

    def attack(port: int) -> tuple[bytes, bytes]:
        with connect(port) as sock:
            sock.sendall(SSL_REQUEST)
            answer = recv_exact(sock, 1)
            sock.sendall(startup_message(MD5_USER, "postgres") + query_message("SELECT 1"))
            return answer, read_until_close(sock)

    async with recorded(pki, pg_tls, tmp_path) as (proxy, recorder):
        answer, data = await deferToThread(attack, proxy.port())
        assert answer == b"S"
        assert_tls_failure_bytes(data)
        await assert_untouched(recorder)
        await assert_still_serves(proxy, pki, recorder)


# ---------------------------------------------------------------------------
# T-INJ-4/5, T-DOWN-2: a hostile backend answering the proxy's SSLRequest

#: A message a hostile server might inject in plaintext after its answer.
_INJECTED_AUTH_OK = wire.AUTHENTICATION_OK + wire.ready_for_query()
_INJECTED_ERROR = wire.error_response("28000", "injected by a man in the middle")


async def evil_backend_attempt(
    pki: Any, pg_tls: Any, tmp_path: Path, reply: bytes, mode: str
) -> tuple[bytes, FakeBackend, list[str]]:
    """
    A route C{evil} whose backend answers the proxy's SSLRequest with
    C{reply}, next to a normal route C{app}. A raw client does TLS and sends
    a StartupMessage on C{evil}; returns what it got, the fake (settled),
    and the text of everything the proxy logged meanwhile. The normal route
    is checked to still serve.
    """
    from twisted.logger import formatEvent, globalLogPublisher

    logged: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        logged.append(formatEvent(event))

    fake = FakeBackend(answer_ssl_request(reply)).start()
    routes = [
        route(pki, fake, name="evil", backend={"tls": mode}),
        route(pki, pg_tls, name="app"),
    ]
    globalLogPublisher.addObserver(observe)  # type: ignore[arg-type]
    try:
        async with running(tmp_path, routes, fake) as proxy:
            data = await deferToThread(
                tls_then, proxy.port("evil"), pki.cert("ca"), startup_message("mallory", "db")
            )
            await fake.settle()
            await assert_still_serves(proxy, pki, name="app")
    finally:
        globalLogPublisher.removeObserver(observe)  # type: ignore[arg-type]
    return data, fake, logged


@pytest.mark.parametrize(
    ("mode", "reply"),
    [
        pytest.param("require", b"S" + _INJECTED_ERROR, id="require-S+ErrorResponse"),
        pytest.param("require", b"S" + _INJECTED_AUTH_OK, id="require-S+AuthenticationOk"),
        pytest.param("prefer", b"S" + _INJECTED_AUTH_OK, id="prefer-S+AuthenticationOk"),
        pytest.param("prefer", b"N" + _INJECTED_AUTH_OK, id="prefer-N+AuthenticationOk"),
        pytest.param("prefer", b"N" + b"\x17junk", id="prefer-N+junk"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_inj4_backend_data_pipelined_after_ssl_answer(pki, pg_tls, tmp_path, mode, reply):
    """
    [T-INJ-4] The backend answers C{S} or C{N} plus plaintext in one write
    (CVE-2021-23222): the proxy fails the client with 08006 naming the
    route, and never sends the backend a startup packet.
    """
    data, fake, _ = await evil_backend_attempt(pki, pg_tls, tmp_path, reply, mode)
    assert code_and_message(only_fatal(data)) == (
        "08006",
        'pgtls route "evil": received unencrypted data after SSL response',
    )
    assert len(fake.connections) == 1
    assert fake.received == SSL_REQUEST


@pytest.mark.parametrize("mode", ["require", "prefer"])
@pytest_twisted.ensureDeferred
async def test_inj5_backend_error_instead_of_ssl_answer(pki, pg_tls, tmp_path, mode):
    """
    [T-INJ-5] The backend answers the SSLRequest with an ErrorResponse:
    unauthenticated text that must reach nobody (CVE-2024-10977), and no
    fallback to plaintext, even with C{prefer}.
    """
    secret = "SECRET-7f3a9c: please enter your password at evil.example"
    reply = wire.error_response("28P01", secret, detail=secret, hint=secret)
    data, fake, logged = await evil_backend_attempt(pki, pg_tls, tmp_path, reply, mode)
    assert code_and_message(only_fatal(data)) == (
        "08001",
        'pgtls route "evil": server answered the SSL request with an error',
    )
    assert b"SECRET" not in data
    assert not [line for line in logged if "SECRET" in line]
    # No second, plaintext attempt (libpq's old sslmode=prefer retry).
    assert len(fake.connections) == 1
    assert fake.received == SSL_REQUEST


@pytest.mark.parametrize("mode", ["require", "verify-ca", "verify-full"])
@pytest_twisted.ensureDeferred
async def test_down2_backend_refuses_ssl_when_required(pki, pg_tls, tmp_path, mode):
    """[T-DOWN-2] C{N} from the backend is fatal unless backend.tls is prefer."""
    fake = FakeBackend(answer_ssl_request(b"N")).start()
    backend: dict[str, Any] = {"tls": mode}
    if mode.startswith("verify"):
        backend["root_ca"] = str(pki.cert("ca"))
    routes = [route(pki, fake, name="evil", backend=backend), route(pki, pg_tls, name="app")]
    async with running(tmp_path, routes, fake) as proxy:
        data = await deferToThread(
            tls_then, proxy.port("evil"), pki.cert("ca"), startup_message("mallory", "db")
        )
        assert code_and_message(only_fatal(data)) == (
            "08001",
            f'pgtls route "evil": server does not support SSL, but backend.tls is {mode!r}',
        )
        await fake.settle()
        assert fake.received == SSL_REQUEST
        await assert_still_serves(proxy, pki, name="app")


@pytest_twisted.ensureDeferred
async def test_prefer_falls_back_to_plaintext_backend(pki, pg_plain, tmp_path):
    """
    With backend.tls = "prefer", a server without TLS (answering C{N}) is
    used in plaintext, as libpq's sslmode=prefer does.
    """

    def login() -> tuple[Any, ...]:
        dsn = proxy.dsn(
            user=SCRAM_USER,
            password=SCRAM_PASSWORD,
            sslmode="verify-full",
            sslrootcert=pki.cert("ca"),
            connect_timeout=5,
        )
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT current_user, coalesce((SELECT ssl FROM pg_stat_ssl"
                " WHERE pid = pg_backend_pid()), false)"
            ).fetchone()
        assert row is not None
        return tuple(row)

    async with running(tmp_path, [route(pki, pg_plain, backend={"tls": "prefer"})]) as proxy:
        assert await deferToThread(login) == (SCRAM_USER, False)


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
# T-SSL-TWICE, T-GSS-AFTER-TLS, T-NEG-LOOP


@pytest.mark.parametrize(
    ("request_bytes", "version"),
    [
        pytest.param(SSL_REQUEST, "1234.5679", id="ssl-twice"),
        pytest.param(GSSENC_REQUEST, "1234.5680", id="gss-after-tls"),
    ],
)
@pytest.mark.parametrize("direct", [False, True], ids=["negotiated", "direct"])
@pytest_twisted.ensureDeferred
async def test_encryption_request_inside_tls_is_fatal(
    pki, pg_tls, tmp_path, request_bytes, version, direct
):
    """
    [T-SSL-TWICE] [T-GSS-AFTER-TLS] An SSLRequest or GSSENCRequest inside
    TLS (negotiated or direct): FATAL 08P01 sent inside TLS, never C{S} or
    C{G} (CVE-2026-14681).
    """
    async with recorded(pki, pg_tls, tmp_path) as (proxy, recorder):
        data = await deferToThread(
            tls_then, proxy.port(), pki.cert("ca"), request_bytes, direct=direct
        )
        assert code_and_message(only_fatal(data)) == (
            "08P01",
            f"unsupported frontend protocol {version}: encryption is already in use",
        )
        await assert_untouched(recorder)
        await assert_still_serves(proxy, pki, recorder)


@pytest_twisted.ensureDeferred
async def test_neg_loop_second_gssenc_request_is_fatal(pki, pg_tls, tmp_path):
    """
    [T-NEG-LOOP] GSSENCRequest (answered C{N}), then another: each kind of
    request is allowed once (CVE-2026-6479), so the second is FATAL.
    """

    def attack(port: int) -> tuple[bytes, bytes]:
        with connect(port) as sock:
            sock.sendall(GSSENC_REQUEST)
            answer = recv_exact(sock, 1)
            sock.sendall(GSSENC_REQUEST)
            return answer, read_until_close(sock)

    async with recorded(pki, pg_tls, tmp_path) as (proxy, recorder):
        answer, data = await deferToThread(attack, proxy.port())
        assert answer == b"N"
        assert code_and_message(only_fatal(data)) == (
            "08P01",
            "pgtls: duplicate GSSAPI encryption request",
        )
        await assert_untouched(recorder)
        await assert_still_serves(proxy, pki, recorder)


@pytest.mark.parametrize(
    ("request_bytes", "version"),
    [
        pytest.param(SSL_REQUEST, "1234.5679", id="then-ssl"),
        pytest.param(GSSENC_REQUEST, "1234.5680", id="then-gss"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_neg_loop_gss_ssl_then_any_request_is_fatal(
    pki, pg_tls, tmp_path, request_bytes, version
):
    """
    [T-NEG-LOOP] GSSENCRequest (C{N}), SSLRequest (C{S}, TLS): one request
    of each kind is spent, so a third request of either kind is FATAL and
    the alternation cannot go on.
    """

    def attack(port: int, ca: Path) -> tuple[bytes, bytes]:
        with connect(port) as raw:
            raw.sendall(GSSENC_REQUEST)
            answer = recv_exact(raw, 1)
            with request_tls(raw, ca) as sock:
                sock.sendall(request_bytes)
                return answer, read_until_close(sock)

    async with recorded(pki, pg_tls, tmp_path) as (proxy, recorder):
        answer, data = await deferToThread(attack, proxy.port(), pki.cert("ca"))
        assert answer == b"N"
        assert code_and_message(only_fatal(data)) == (
            "08P01",
            f"unsupported frontend protocol {version}: encryption is already in use",
        )
        await assert_untouched(recorder)
        await assert_still_serves(proxy, pki, recorder)


@pytest_twisted.ensureDeferred
async def test_gssenc_then_ssl_then_login_works(pki, pg_tls, tmp_path):
    """
    The legitimate sequence (libpq's gssencmode=prefer without Kerberos):
    GSSENCRequest answered C{N}, SSLRequest, TLS, login. This is the control
    for the raw client: it logs in (MD5, relayed) and queries.
    """

    def login(port: int, ca: Path) -> list[tuple[str | None, ...]]:
        with connect(port) as raw:
            raw.sendall(GSSENC_REQUEST)
            assert recv_exact(raw, 1) == b"N"
            with request_tls(raw, ca) as sock:
                startup_cleartext(sock, MD5_USER, MD5_PASSWORD)
                return simple_query(sock, "SELECT current_user, 6 * 7")

    async with recorded(pki, pg_tls, tmp_path) as (proxy, recorder):
        assert await deferToThread(login, proxy.port(), pki.cert("ca")) == [(MD5_USER, "42")]
        await recorder.settle()
        assert len(recorder.connections) == 1
        assert bytes(recorder.connections[0].received).startswith(
            startup_message(MD5_USER, "postgres")
        )


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
# T-DOWN-1/4: plaintext and old TLS versions


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_down4_tls_1_1_client_hello_refused(pki, pg_tls, tmp_path):
    """
    [T-DOWN-4] A client offering at most TLS 1.1 (with OpenSSL's security
    level lowered so that it does send the ClientHello) gets the server's
    protocol_version alert; TLS 1.2 is still accepted.
    """

    def attempt(port: int, ca: Path, maximum: ssl.TLSVersion) -> str:
        with connect(port) as raw:
            raw.sendall(SSL_REQUEST)
            assert recv_exact(raw, 1) == b"S"
            try:
                sock = tls_wrap(
                    raw,
                    ca,
                    minimum_version=ssl.TLSVersion.TLSv1,
                    maximum_version=maximum,
                    ciphers="DEFAULT:@SECLEVEL=0",
                )
            except ssl.SSLError as e:
                return f"refused: {e.reason}"
            with sock:
                return f"accepted: {sock.version()}"

    async with recorded(pki, pg_tls, tmp_path) as (proxy, recorder):
        ca = pki.cert("ca")
        outcome = await deferToThread(attempt, proxy.port(), ca, ssl.TLSVersion.TLSv1_1)
        # The proxy's alert, not the client refusing to try: the hello was sent.
        assert outcome == "refused: TLSV1_ALERT_PROTOCOL_VERSION"
        outcome = await deferToThread(attempt, proxy.port(), ca, ssl.TLSVersion.TLSv1_2)
        assert outcome == "accepted: TLSv1.2"
        await assert_untouched(recorder)
        await assert_still_serves(proxy, pki, recorder)


@pytest_twisted.ensureDeferred
async def test_down1_plaintext_startup_on_require_listener(pki, pg_tls, tmp_path):
    """
    [T-DOWN-1] A plaintext StartupMessage on a listener that requires TLS:
    FATAL 28000 in plaintext, and no backend connection, so an
    sslmode=prefer client can never end up with a plaintext session.
    """
    async with recorded(pki, pg_tls, tmp_path) as (proxy, recorder):
        payload = startup_message(MD5_USER, "postgres") + query_message("SELECT 1")
        data = await deferToThread(send_and_collect, proxy.port(), payload)
        assert code_and_message(only_fatal(data)) == (
            "28000",
            "pgtls: this listener requires TLS (sslmode=require or stronger)",
        )
        await assert_untouched(recorder)
        await assert_still_serves(proxy, pki, recorder)


# ---------------------------------------------------------------------------
# T-DOWN-3: direct TLS and ALPN


def _direct(port: int, ca: Path, alpn: list[str] | None) -> tuple[str, bytes]:
    """
    Direct TLS offering C{alpn}, then a StartupMessage: how far it got
    (C{"handshake failed: ..."} or C{"handshake done"}) and what the
    client received inside TLS until the close.
    """
    with connect(port) as raw:
        try:
            sock = tls_wrap(raw, ca, alpn=alpn)
        except ssl.SSLError as e:
            return f"handshake failed: {e}", b""
        except OSError as e:
            return f"handshake failed: {type(e).__name__}", b""
        with sock:
            try:
                sock.sendall(startup_message(MD5_USER, "postgres"))
            except OSError:
                # The proxy may drop the connection before the send.
                return "handshake done", b""
            return "handshake done", read_until_close(sock)


@pytest_twisted.ensureDeferred
async def test_down3_direct_tls_without_alpn_dropped(pki, pg_tls, tmp_path):
    """
    [T-DOWN-3] Direct TLS (PostgreSQL 17 sslnegotiation=direct) without
    ALPN: the proxy drops the connection right after the handshake, and
    the StartupMessage the client sends is never read.
    """
    async with recorded(pki, pg_tls, tmp_path) as (proxy, recorder):
        outcome = await deferToThread(_direct, proxy.port(), pki.cert("ca"), None)
        assert outcome == ("handshake done", b"")
        await assert_untouched(recorder)
        await assert_still_serves(proxy, pki, recorder)


#: What PostgreSQL (and pgtls, by design: L{tlsconfig._select_alpn}) answers
#: a ClientHello offering only ALPN protocols other than C{postgresql}: a
#: fatal no_application_protocol (120) alert record.
_ALERT_NO_APPLICATION_PROTOCOL = b"\x15\x03\x03\x00\x02\x02\x78"


def _hello_with_alpn(port: int, alpn: list[str], negotiated: bool) -> bytes:
    with connect(port) as sock:
        if negotiated:
            sock.sendall(SSL_REQUEST)
            assert recv_exact(sock, 1) == b"S"
        sock.sendall(client_hello(alpn=alpn))
        return read_until_close(sock)


@pytest.mark.parametrize("negotiated", [False, True], ids=["direct", "negotiated"])
@pytest_twisted.ensureDeferred
async def test_down3_foreign_alpn_refused_with_alert(pki, pg_tls, tmp_path, negotiated):
    """
    [T-DOWN-3] A ClientHello offering only C{h2}, direct or after an
    SSLRequest: the handshake fails with exactly the no_application_protocol
    alert, nothing reaches the backend, and nothing is logged as an error
    (this used to crash in Twisted's C{_representsEOF}, which expects an
    OpenSSL error queue in the exception raised from the ALPN callback).
    """
    async with recorded(pki, pg_tls, tmp_path) as (proxy, recorder):
        data = await deferToThread(_hello_with_alpn, proxy.port(), ["h2"], negotiated)
        assert data == _ALERT_NO_APPLICATION_PROTOCOL
        await assert_untouched(recorder)
        await assert_still_serves(proxy, pki, recorder)


@pytest_twisted.ensureDeferred
async def test_direct_tls_refused_when_disabled(pki, pg_tls, tmp_path):
    """With listener.direct_tls = false a ClientHello gets no answer at all."""
    async with recorded(pki, pg_tls, tmp_path, direct_tls=False) as (proxy, recorder):
        outcome, data = await deferToThread(_direct, proxy.port(), pki.cert("ca"), ["postgresql"])
        assert outcome.startswith("handshake failed"), outcome
        await assert_untouched(recorder)
        await assert_still_serves(proxy, pki, recorder)


@pytest_twisted.ensureDeferred
async def test_direct_tls_with_alpn_logs_in(pki, pg_tls, tmp_path):
    """The control for the direct-TLS cases: ALPN postgresql, then a login."""

    def login(port: int, ca: Path) -> tuple[str | None, list[tuple[str | None, ...]]]:
        with connect(port) as raw, tls_wrap(raw, ca, alpn=["postgresql"]) as sock:
            startup_cleartext(sock, MD5_USER, MD5_PASSWORD)
            return sock.selected_alpn_protocol(), simple_query(sock, "SELECT current_user")

    async with recorded(pki, pg_tls, tmp_path) as (proxy, recorder):
        assert await deferToThread(login, proxy.port(), pki.cert("ca")) == (
            "postgresql",
            [(MD5_USER,)],
        )


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


# ---------------------------------------------------------------------------
# Refused clients must not hold their slot


@pytest.mark.parametrize(
    ("reply", "listener"),
    [
        pytest.param(b"N", {}, id="backend-refuses-ssl"),
        pytest.param(b"S" + _INJECTED_ERROR, {}, id="backend-injects"),
        pytest.param(None, {"startup_timeout": "1s"}, id="deadline-while-backend-silent"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_client_refused_for_backend_failure_is_released(pki, tmp_path, reply, listener):
    """
    A client refused because its backend failed (or did not answer before
    the startup deadline) is forgotten as soon as it hangs up, like any
    other refused client: it must not keep a max_clients slot and a socket
    until CLOSE_TIMEOUT. (Before the fix, the transport paused while the
    backend connected was never resumed, so the client's FIN went unread.)
    """
    fake = FakeBackend(answer_ssl_request(reply) if reply is not None else None).start()
    routes = [route(pki, fake, name="evil", listener=listener, backend={"tls": "require"})]
    async with running(tmp_path, routes, fake) as proxy:
        data = await deferToThread(
            tls_then, proxy.port("evil"), pki.cert("ca"), startup_message("mallory", "db")
        )
        assert only_fatal(data)["C"] in ("08001", "08006")
        await wait_no_clients(proxy, "evil", timeout=2.0)
