"""
End-to-end attack resistance, part one: injection, negotiation and
downgrades. Raw-socket clients that misbehave on purpose, and scripted
backends that do, against pgtls running in-process, checking what the
attacker sees, what reached the backend, and that the proxy still serves a
normal client afterwards.

The cases are those of the reference notes (tls-security.md sections 2.1 to
2.4): buffer stuffing on both legs (T-INJ-*), encryption request loops and
repeats (T-NEG-LOOP, T-SSL-TWICE, T-GSS-AFTER-TLS) and downgrades
(T-DOWN-*); and a client refused because its backend failed must not keep
its slot. Hostile startup lengths, slow clients and abrupt ends are in
test_attacks_startup; the recorder and scripted backends, and the checks
both modules make, in L{support.attacks}.

Every blocking client runs in a thread (L{deferToThread}) with socket
timeouts; assertions on what it got are made back on the reactor thread.
"""

from __future__ import annotations

import random
import ssl
from pathlib import Path
from typing import Any

import psycopg
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
from support.dsn import client_dsn
from support.fakebackend import FakeBackend, answer_ssl_request
from support.proxy import route
from support.rawclient import (
    GSSENC_REQUEST,
    SSL_REQUEST,
    client_hello,
    connect,
    query_message,
    read_until_close,
    recv_exact,
    request_tls,
    simple_query,
    startup_cleartext,
    startup_message,
    tls_wrap,
)
from twisted.internet.threads import deferToThread

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.testing.cluster import MD5_PASSWORD, MD5_USER, SCRAM_USER

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
        dsn = client_dsn(proxy, pki, connect_timeout=5)
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


#: What PostgreSQL (and pgtls, by design: L{pgtls_twisted.tls._contexts._select_alpn}) answers
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
