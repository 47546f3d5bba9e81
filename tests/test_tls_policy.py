"""
End-to-end tests of pgtls's TLS policy, against the real PostgreSQL 15
clusters of the suite, with real clients (psycopg on libpq 18, sslyze) and,
where a real client cannot misbehave on purpose, raw sockets and the stdlib
C{ssl} module:

 1. listener hardening (versions, ciphers, compression, resumption, and an
    sslyze scan against Mozilla's "intermediate" configuration);
 2. backend verification the way libpq does it (wildcards, IP SANs, a
    backend that cannot meet C{backend.min_tls_version});
 3. client certificates (C{mtls}, CRL, C{cert_user_match}) and the proxy's
    own client certificate for C{cert} authentication at the backend;
 4. direct TLS (PostgreSQL 17 C{sslnegotiation=direct}) and ALPN;
 5. protocol versions (3.2 negotiated down by PostgreSQL 15, 2.0 refused);
 6. certificate rotation;
 7. C{max_clients}.

What C{tests/test_proxy.py} already covers (chain failures, wrong host,
CN-only certificates, weaker modes) is not repeated here.

The proxy runs in-process on the reactor; every blocking client runs in a
thread (L{deferToThread}). psycopg's C{cancel()} holds the GIL and would
freeze the proxy: only C{cancel_safe()} is used.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_twisted
from cryptography import x509
from OpenSSL import SSL
from support import rawclient
from support.dsn import client_dsn
from support.proxy import RunningProxy, route, running
from support.rawclient import (
    SSL_REQUEST,
    ServerError,
    connect,
    raw_startup,
    read_fatal,
    read_until_close,
    recv_exact,
    request_tls,
    served_serial,
    simple_query,
    startup_cleartext,
    startup_message,
    tls_context,
    tls_wrap,
)
from support.tlsbackend import tls_backend
from support.waiting import sleep, until
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogLevel, eventAsText

from pgtls_twisted.testing.cluster import (
    CERT_USER,
    PROXY_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
)
from pgtls_twisted.testing.pki import PKI, write_leaf

REPO = Path(__file__).resolve().parents[1]

#: The sslyze console script; it lives in its own virtualenv because it
#: pins an older C{cryptography} than pgtls needs.
SSLYZE = os.environ.get("PGTLS_SSLYZE", str(REPO / ".venv-sslyze/bin/sslyze"))


# ---------------------------------------------------------------------------
# Helpers


def fetch(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql).fetchall()


def connect_error(dsn: str) -> str:
    """The error message psycopg reports when connecting fails."""
    try:
        psycopg.connect(dsn).close()
    except psycopg.OperationalError as e:
        return str(e)
    raise AssertionError("connection unexpectedly succeeded")


def raw_login(
    port: int,
    ca: Path,
    user: str = SCRAM_USER,
    password: str = SCRAM_PASSWORD,
    **tls: Any,
) -> dict[str, str] | list[tuple[str | None, ...]]:
    """
    SSLRequest, TLS (C{tls} as for L{tls_wrap}), login and C{SELECT
    current_user}: the rows, or the fields of the FATAL error the login got
    (after checking the connection then closed).
    """
    with connect(port) as raw, request_tls(raw, ca, **tls) as sock:
        try:
            startup_cleartext(sock, user, password)
        except ServerError as e:
            assert e.fields.get("S") == "FATAL", e.fields
            assert read_until_close(sock) == b""
            return e.fields
        return simple_query(sock, "SELECT current_user")


def handshake(port: int, ca: Path | None, **tls: Any) -> str:
    """
    SSLRequest and a TLS handshake only: C{"TLSv1.3 <cipher>"}, or
    C{"refused: <reason>"}.
    """
    with connect(port) as raw:
        raw.sendall(SSL_REQUEST)
        assert recv_exact(raw, 1) == b"S"
        try:
            sock = tls_wrap(raw, ca, **tls)
        except ssl.SSLError as e:
            return f"refused: {e.reason}"
        with sock:
            cipher = sock.cipher()
            assert cipher is not None
            return f"{sock.version()} {cipher[0]}"


def errors(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events logged at level error or above (C{Logger.error}, failures)."""
    return [
        e
        for e in events
        if e.get("log_level") in (LogLevel.error, LogLevel.critical) or "log_failure" in e
    ]


def own_pki(pki: PKI, tmp_path: Path) -> PKI:
    """A private copy of the session's PKI, for tests that mint or overwrite."""
    own = PKI(tmp_path / "pki")
    shutil.copytree(pki.directory, own.directory)
    return own


def server_side_tls(proxy: RunningProxy, name: str | None = None) -> SSL.Connection:
    """The proxy's end of its one open client connection."""
    [client] = proxy.route(name).clients
    return client.tls.getHandle()


def mtls_listener(pki: PKI, **extra: Any) -> dict[str, Any]:
    return {"mtls": True, "client_ca": str(pki.cert("client_ca")), **extra}


async def wait_clients(proxy: RunningProxy, count: int, name: str | None = None) -> None:
    await until(lambda: len(proxy.route(name).clients) == count, 3, f"{count} clients open")


# ---------------------------------------------------------------------------
# 1. Listener hardening


@pytest_twisted.ensureDeferred
async def test_real_client_negotiates_tls13_without_compression(pki, pg_tls, tmp_path):
    """psycopg gets TLS 1.3 by default; no TLS compression, seen from both ends."""
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        conn = await deferToThread(psycopg.connect, client_dsn(proxy, pki))
        try:
            server = server_side_tls(proxy)
            assert server.get_protocol_version_name() == "TLSv1.3"
            assert server.get_cipher_name().startswith("TLS_")
            assert (await deferToThread(lambda: conn.execute("SELECT 1").fetchone())) == (1,)
        finally:
            await deferToThread(conn.close)

        def stdlib() -> tuple[str | None, str | None]:
            with connect(proxy.port()) as raw, request_tls(raw, pki.cert("ca")) as sock:
                return sock.version(), sock.compression()

        assert await deferToThread(stdlib) == ("TLSv1.3", None)


@pytest_twisted.ensureDeferred
async def test_min_tls_version_13_refuses_tls12_clients(pki, pg_tls, tmp_path):
    listener = {"min_tls_version": "1.3"}
    async with running(tmp_path, [route(pki, pg_tls, listener=listener)]) as proxy:
        ca = pki.cert("ca")
        outcome = await deferToThread(
            handshake, proxy.port(), ca, maximum_version=ssl.TLSVersion.TLSv1_2
        )
        assert outcome == "refused: TLSV1_ALERT_PROTOCOL_VERSION"
        # A real client capped at TLS 1.2 is refused too ...
        text = await deferToThread(
            connect_error, client_dsn(proxy, pki, ssl_max_protocol_version="TLSv1.2")
        )
        assert "protocol version" in text
        # ... and one that may use TLS 1.3 is served.
        rows = await deferToThread(fetch, client_dsn(proxy, pki), "SELECT current_user")
        assert rows == [(SCRAM_USER,)]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("minimum", ["1.2", "1.3"])
@pytest_twisted.ensureDeferred
async def test_tls11_client_always_refused(pki, pg_tls, tmp_path, minimum):
    """
    A client that offers at most TLS 1.1 (with OpenSSL's security level
    lowered so it does send its ClientHello) gets the protocol_version
    alert whatever min_tls_version says.
    """
    listener = {"min_tls_version": minimum}
    async with running(tmp_path, [route(pki, pg_tls, listener=listener)]) as proxy:
        outcome = await deferToThread(
            handshake,
            proxy.port(),
            pki.cert("ca"),
            minimum_version=ssl.TLSVersion.TLSv1,
            maximum_version=ssl.TLSVersion.TLSv1_1,
            ciphers="DEFAULT:@SECLEVEL=0",
        )
        assert outcome == "refused: TLSV1_ALERT_PROTOCOL_VERSION"


def resume(port: int, ca: Path, version: ssl.TLSVersion, **cert: Any) -> tuple[bool, bool]:
    """
    Two sessions, the second offering the first one's TLS session:
    (whether the first got a session ticket, whether the second resumed).
    """
    ctx = tls_context(ca, minimum_version=version, maximum_version=version, **cert)
    session = None
    for _ in range(2):
        with connect(port) as raw:
            raw.sendall(SSL_REQUEST)
            assert recv_exact(raw, 1) == b"S"
            with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as sock:
                # Reading is what makes the client process (TLS 1.3)
                # NewSessionTicket messages, if the server sent any.
                startup_cleartext(sock, SCRAM_USER, SCRAM_PASSWORD)
                assert simple_query(sock, "SELECT 1") == [("1",)]
                if session is not None:
                    return session.has_ticket, sock.session_reused
                session = sock.session
                assert session is not None
    raise AssertionError("unreachable")


@pytest.mark.parametrize("mtls", [False, True], ids=["plain", "mtls"])
@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
@pytest_twisted.ensureDeferred
async def test_no_session_resumption(pki, pg_tls, tmp_path, version, mtls):
    """
    Like the PostgreSQL server, pgtls keeps no session cache and takes no
    stateless tickets: a second connection offering the first one's
    session gets a full handshake (and, with client certificates, is
    verified again rather than refused).
    """
    listener = mtls_listener(pki) if mtls else {}
    cert = {"cert": pki.cert("client"), "key": pki.key("client")} if mtls else {}
    async with running(tmp_path, [route(pki, pg_tls, listener=listener)]) as proxy:
        _, reused = await deferToThread(resume, proxy.port(), pki.cert("ca"), version, **cert)
        assert not reused


@pytest_twisted.ensureDeferred
async def test_no_session_ticket_in_tls12(pki, pg_tls, tmp_path):
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        has_ticket, _ = await deferToThread(
            resume, proxy.port(), pki.cert("ca"), ssl.TLSVersion.TLSv1_2
        )
        assert not has_ticket


@pytest_twisted.ensureDeferred
async def test_default_ciphers_tls12_forward_secret_aead_only(pki, pg_tls, tmp_path):
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        ca = pki.cert("ca")
        tls12 = {
            "minimum_version": ssl.TLSVersion.TLSv1_2,
            "maximum_version": ssl.TLSVersion.TLSv1_2,
        }
        outcome = await deferToThread(handshake, proxy.port(), ca, **tls12)
        version, cipher = outcome.split()
        assert version == "TLSv1.2"
        assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher), cipher
        for cbc in ("AES128-SHA", "ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384"):
            outcome = await deferToThread(handshake, proxy.port(), ca, ciphers=cbc, **tls12)
            assert outcome == "refused: SSLV3_ALERT_HANDSHAKE_FAILURE", (cbc, outcome)


@pytest_twisted.ensureDeferred
async def test_sslyze_mozilla_intermediate(pki, pg_tls, tmp_path):
    """
    sslyze (through PostgreSQL's STARTTLS, the SSLRequest) finds the
    listener compliant with Mozilla's "intermediate" configuration.

    sslyze needs its own virtualenv (it pins an older C{cryptography}):
    C{make} creates C{.venv-sslyze}, or set C{PGTLS_SSLYZE} to an sslyze
    executable. Missing is a failure, never a skip: a skipped scan would
    look like a passed one. Problems running the scan fail the test with
    L{pytest.fail}, so that the expected failure above covers nothing but
    the compliance verdict (an C{AssertionError}).
    """
    if not Path(SSLYZE).is_file():
        pytest.fail(
            f"sslyze not found at {SSLYZE}: create {REPO / '.venv-sslyze'} "
            "(python3 -m venv .venv-sslyze && .venv-sslyze/bin/pip install sslyze) "
            "or set PGTLS_SSLYZE to the sslyze executable"
        )
    timeout = shutil.which("timeout")
    if timeout is None:
        pytest.fail("coreutils timeout(1) is needed to bound the sslyze scan")
    listener = {"max_clients": 10_000}
    async with running(tmp_path, [route(pki, pg_tls, listener=listener)]) as proxy:
        target = f"127.0.0.1:{proxy.port()}"
        args = [
            *("-s", "KILL", "120", SSLYZE),
            *("--starttls", "postgres"),
            *("--mozilla_config", "intermediate"),
            *("--certinfo_ca_file", str(pki.cert("ca"))),
            *("--sni", "localhost"),
            target,
        ]
        # Not our PYTHONPATH: sslyze must see only its own virtualenv.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        out, err, code = await getProcessOutputAndValue(timeout, args, env=env)
    text = out.decode(errors="replace") + err.decode(errors="replace")
    if "COMPLIANCE AGAINST TLS CONFIGURATION" not in text or "SCANS COMPLETED" not in text:
        pytest.fail(f"the sslyze scan did not complete (exit status {code}):\n{text}")
    assert f"{target}: OK - Compliant." in text and code == 0, text


# ---------------------------------------------------------------------------
# 2. Backend verification, as libpq does it


@pytest.mark.parametrize(
    ("server_name", "accepted"),
    [("db.pgtls.test", True), ("a.db.pgtls.test", False), ("pgtls.test", False)],
)
@pytest_twisted.ensureDeferred
async def test_backend_wildcard_matches_one_label(pki, pg_tls, tmp_path, server_name, accepted):
    """C{*.pgtls.test} covers C{db.pgtls.test}, not a name two labels deeper, nor the apex."""
    fake = tls_backend(pki, "server_wildcard")
    backend = {
        "address": f"127.0.0.1:{fake.getHost().port}",
        "tls": "verify-full",
        "server_name": server_name,
    }
    try:
        async with running(tmp_path, [route(pki, pg_tls, name="wild", backend=backend)]) as proxy:
            text = await deferToThread(connect_error, client_dsn(proxy, pki))
    finally:
        await fake.stopListening()
    if accepted:
        assert "fake backend got the startup packet" in text
    else:
        assert 'pgtls route "wild": backend TLS verification failed' in text
        assert (
            f'server certificate for "*.pgtls.test" does not match host name "{server_name}"'
            in (text)
        )


@pytest.mark.parametrize(
    ("server_name", "accepted"), [(None, True), ("127.0.0.1", True), ("localhost", False)]
)
@pytest_twisted.ensureDeferred
async def test_backend_ip_address_san(pki, pg_tls, tmp_path, server_name, accepted):
    """
    A certificate with only C{IP:127.0.0.1}: accepted when the backend is
    addressed as 127.0.0.1 (C{server_name} defaults to the address's host),
    refused for a host name, even one that resolves there.
    """
    fake = tls_backend(pki, "server_ip_only")
    table = route(
        pki,
        pg_tls,
        name="ip",
        backend={"address": f"127.0.0.1:{fake.getHost().port}", "tls": "verify-full"},
    )
    del table["backend"]["server_name"]
    if server_name is not None:
        table["backend"]["server_name"] = server_name
    try:
        async with running(tmp_path, [table]) as proxy:
            assert proxy.route().config.backend.server_name == (server_name or "127.0.0.1")
            text = await deferToThread(connect_error, client_dsn(proxy, pki))
    finally:
        await fake.stopListening()
    if accepted:
        assert "fake backend got the startup packet" in text
    else:
        assert (
            'backend TLS verification failed: server certificate for "127.0.0.1" '
            'does not match host name "localhost"'
        ) in text


@pytest_twisted.ensureDeferred
async def test_backend_below_min_tls_version(pki, pg_tls, tmp_path):
    """
    A backend that cannot do TLS 1.3, on a route that requires it: the
    client is told why, with SQLSTATE 08006, and nothing is sent to the
    backend in the clear.
    """
    fake = tls_backend(pki, "server", max_version=SSL.TLS1_2_VERSION)
    backend = {"address": f"127.0.0.1:{fake.getHost().port}", "min_tls_version": "1.3"}
    expected = (
        'pgtls route "old": backend TLS handshake failed: the server cannot use TLS 1.3 '
        "or later (backend.min_tls_version = '1.3')"
    )
    try:
        async with running(tmp_path, [route(pki, pg_tls, name="old", backend=backend)]) as proxy:
            text = await deferToThread(connect_error, client_dsn(proxy, pki))
            assert expected in text
            fields = await deferToThread(raw_login, proxy.port(), pki.cert("ca"))
            assert isinstance(fields, dict)
            assert (fields["C"], fields["M"]) == ("08006", expected)
    finally:
        await fake.stopListening()


# ---------------------------------------------------------------------------
# 3. Client certificates


@pytest_twisted.ensureDeferred
async def test_mtls_certificate_and_password(pki, pg_tls, tmp_path):
    """A client certificate is on top of password authentication, not instead of it."""
    listener = mtls_listener(pki)
    async with running(tmp_path, [route(pki, pg_tls, listener=listener)]) as proxy:
        cert = {"sslcert": pki.cert("client"), "sslkey": pki.key("client")}
        rows = await deferToThread(fetch, client_dsn(proxy, pki, **cert), "SELECT current_user")
        assert rows == [(SCRAM_USER,)]
        text = await deferToThread(connect_error, client_dsn(proxy, pki, password="nope", **cert))
        assert f'password authentication failed for user "{SCRAM_USER}"' in text


@pytest.mark.parametrize(
    ("cert", "crl", "message"),
    [
        (None, False, "pgtls: connection requires a valid client certificate"),
        (
            "client_other_ca",
            False,
            "pgtls: client certificate refused: unable to get local issuer certificate (unknown CA)",
        ),
        pytest.param(
            "client_revoked",
            True,
            "pgtls: client certificate refused: certificate has been revoked",
        ),
    ],
    ids=["none", "other-ca", "revoked"],
)
@pytest_twisted.ensureDeferred
async def test_mtls_refusals(pki, pg_tls, tmp_path, cert, crl, message):
    listener = mtls_listener(pki)
    if crl:
        listener["client_crl"] = str(pki.client_crl)
    async with running(tmp_path, [route(pki, pg_tls, listener=listener)]) as proxy:
        extra = {} if cert is None else {"sslcert": pki.cert(cert), "sslkey": pki.key(cert)}
        text = await deferToThread(connect_error, client_dsn(proxy, pki, **extra))
        assert message in text
        tls = {} if cert is None else {"cert": pki.cert(cert), "key": pki.key(cert)}
        fields = await deferToThread(raw_login, proxy.port(), pki.cert("ca"), **tls)
        assert isinstance(fields, dict)
        assert (fields["C"], fields["M"]) == ("28000", message)
        if crl:
            # The CRL refuses only what it lists.
            good = {"sslcert": pki.cert("client"), "sslkey": pki.key("client")}
            rows = await deferToThread(fetch, client_dsn(proxy, pki, **good), "SELECT 1")
            assert rows == [(1,)]


@pytest.mark.parametrize(
    ("cert", "cn"), [("client", CERT_USER), ("client_wrong_user", "someone_else")]
)
@pytest_twisted.ensureDeferred
async def test_cert_user_match_refuses_other_names(pki, pg_tls, tmp_path, cert, cn):
    listener = mtls_listener(pki, cert_user_match=True)
    message = (
        f'pgtls: certificate authentication failed for user "{SCRAM_USER}": '
        f'certificate CN is "{cn}"'
    )
    async with running(tmp_path, [route(pki, pg_tls, listener=listener)]) as proxy:
        text = await deferToThread(
            connect_error, client_dsn(proxy, pki, sslcert=pki.cert(cert), sslkey=pki.key(cert))
        )
        assert message in text
        fields = await deferToThread(
            raw_login, proxy.port(), pki.cert("ca"), cert=pki.cert(cert), key=pki.key(cert)
        )
        assert isinstance(fields, dict)
        assert (fields["C"], fields["M"]) == ("28000", message)


@pytest_twisted.ensureDeferred
async def test_cert_user_match_accepts_matching_cn(pki, pg_tls, tmp_path):
    own = own_pki(pki, tmp_path)
    cert, key = write_leaf(
        own, "client_scram", [], issuer="client_ca", common_name=SCRAM_USER, usage="client"
    )
    listener = mtls_listener(own, cert_user_match=True)
    async with running(tmp_path, [route(own, pg_tls, listener=listener)]) as proxy:
        dsn = client_dsn(proxy, own, sslcert=cert, sslkey=key)
        assert await deferToThread(fetch, dsn, "SELECT current_user") == [(SCRAM_USER,)]


@pytest_twisted.ensureDeferred
async def test_proxy_client_certificate_for_backend_cert_auth(pki, pg_tls, tmp_path):
    """
    With C{backend.client_cert}, the backend authenticates the proxy by
    certificate (pg_hba C{cert} for C{pgtls_proxy}): the client gets a
    session without any password.
    """
    backend = {
        "client_cert": str(pki.cert("proxy_client")),
        "client_key": str(pki.key("proxy_client")),
    }
    async with running(tmp_path, [route(pki, pg_tls, backend=backend)]) as proxy:
        dsn = client_dsn(proxy, pki, user=PROXY_USER, password=None)
        rows = await deferToThread(
            fetch,
            dsn,
            "SELECT current_user, s.client_dn FROM pg_stat_ssl s WHERE pid = pg_backend_pid()",
        )
        assert rows == [(PROXY_USER, f"/CN={PROXY_USER}")]
    # Without it, the same login is refused by the server itself.
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        text = await deferToThread(
            connect_error, client_dsn(proxy, pki, user=PROXY_USER, password=None)
        )
        assert "connection requires a valid client certificate" in text


# ---------------------------------------------------------------------------
# 4. Direct TLS and ALPN


@pytest_twisted.ensureDeferred
async def test_direct_tls_real_client(pki, pg_tls, tmp_path):
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        dsn = client_dsn(proxy, pki, sslnegotiation="direct")
        assert await deferToThread(fetch, dsn, "SELECT current_user") == [(SCRAM_USER,)]
    async with running(tmp_path, [route(pki, pg_tls, listener={"direct_tls": False})]) as proxy:
        text = await deferToThread(connect_error, client_dsn(proxy, pki, sslnegotiation="direct"))
        assert "server closed the connection unexpectedly" in text, text
        # The negotiated path still works there.
        assert await deferToThread(fetch, client_dsn(proxy, pki), "SELECT 1") == [(1,)]


def direct(port: int, ca: Path, alpn: list[str] | None) -> str:
    """
    Direct TLS offering C{alpn}, then a StartupMessage: C{"alert: ..."}, or
    C{"closed after handshake: <bytes received>"}.
    """
    with connect(port) as raw:
        try:
            sock = tls_wrap(raw, ca, alpn=alpn)
        except ssl.SSLError as e:
            # Python 3.11 knows no reason code for OpenSSL 3's
            # no_application_protocol alert: match the text.
            return f"alert: {e.reason or e}"
        with sock:
            try:
                sock.sendall(startup_message(SCRAM_USER, "postgres"))
                return f"closed after handshake: {read_until_close(sock)!r}"
            except OSError:
                return "closed after handshake: b''"


@pytest_twisted.ensureDeferred
async def test_direct_tls_alpn(pki, pg_tls, tmp_path):
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        ca = pki.cert("ca")
        outcome = await deferToThread(direct, proxy.port(), ca, ["h2"])
        assert outcome.startswith("alert: ") and "no application protocol" in outcome, outcome
        assert await deferToThread(direct, proxy.port(), ca, None) == (
            "closed after handshake: b''"
        )

        # Offering postgresql among others is fine.
        def login() -> tuple[str | None, list[tuple[str | None, ...]]]:
            with connect(proxy.port()) as raw, tls_wrap(raw, ca, alpn=["h2", "postgresql"]) as s:
                startup_cleartext(s, SCRAM_USER, SCRAM_PASSWORD)
                return s.selected_alpn_protocol(), simple_query(s, "SELECT current_user")

        assert await deferToThread(login) == ("postgresql", [(SCRAM_USER,)])


class _BioSocket:
    """
    A TLS session driven by hand through an C{ssl.MemoryBIO} pair over a
    blocking socket, with the C{sendall}/C{recv} that L{rawclient} needs.
    """

    def __init__(self, sock: socket.socket, ca: Path, alpn: list[str] | None) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        ctx = tls_context(ca, alpn=alpn)
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    def client_hello(self) -> bytes:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return self.outgoing.read()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    def finish_handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise rawclient.Closed() from None
            else:
                self._flush()
                return

    def sendall(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def recv(self, n: int) -> bytes:
        while True:
            try:
                return self.tls.read(n)
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    return b""
            except ssl.SSLZeroReturnError:
                return b""


@pytest.mark.parametrize("negotiated", [False, True], ids=["direct", "negotiated"])
@pytest_twisted.ensureDeferred
async def test_client_hello_in_small_segments(pki, pg_tls, tmp_path, negotiated):
    """
    A ClientHello that arrives 1 to 10 bytes per TCP segment (the first
    segment a lone 0x16 on the direct path) still makes a session.
    """

    def fragmented(port: int, ca: Path) -> tuple[int, list[tuple[str | None, ...]]]:
        with connect(port) as sock:
            if negotiated:
                sock.sendall(SSL_REQUEST)
                assert recv_exact(sock, 1) == b"S"
            bio = _BioSocket(sock, ca, ["postgresql"])
            hello = bio.client_hello()
            rng = random.Random(len(hello))
            pos = segments = 0
            while pos < len(hello):
                size = 1 if pos == 0 else rng.randint(1, 10)
                sock.sendall(hello[pos : pos + size])
                pos += size
                segments += 1
                time.sleep(0.002)
            bio.finish_handshake()
            assert bio.tls.selected_alpn_protocol() == "postgresql"
            startup_cleartext(bio, SCRAM_USER, SCRAM_PASSWORD)  # type: ignore[arg-type]
            return segments, simple_query(bio, "SELECT current_user")  # type: ignore[arg-type]

    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        segments, rows = await deferToThread(fragmented, proxy.port(), pki.cert("ca"))
        assert segments > 20
        assert rows == [(SCRAM_USER,)]


# ---------------------------------------------------------------------------
# 5. Protocol versions


@pytest_twisted.ensureDeferred
async def test_protocol_32_client_negotiated_down_by_pg15(pki, pg_tls, tmp_path):
    """
    libpq 18 asking for protocol 3.2: PostgreSQL 15 answers with
    NegotiateProtocolVersion (relayed by pgtls), the session runs on 3.0,
    and a cancel through the proxy still reaches it.
    """
    assert psycopg.pq.version() >= 180000, "max_protocol_version needs libpq 18"
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        dsn = client_dsn(proxy, pki, max_protocol_version="3.2")
        conn = await deferToThread(psycopg.connect, dsn, autocommit=True)
        try:
            [client] = proxy.route().clients
            assert (client.startup.major, client.startup.minor) == (3, 2)
            assert conn.info.full_protocol_version == 30000
            assert (await deferToThread(lambda: conn.execute("SELECT 42").fetchone())) == (42,)

            def sleep_query() -> BaseException | None:
                try:
                    conn.execute("SELECT pg_sleep(30)")
                except psycopg.errors.QueryCanceled as e:
                    return e
                return None

            running_query = deferToThread(sleep_query)
            await sleep(0.5)
            await deferToThread(conn.cancel_safe)
            started = time.monotonic()
            err = await running_query
            assert err is not None and "canceling statement due to user request" in str(err)
            assert time.monotonic() - started < 10
            assert (await deferToThread(lambda: conn.execute("SELECT 1").fetchone())) == (1,)
        finally:
            await deferToThread(conn.close)


@pytest.mark.parametrize("inside_tls", [False, True], ids=["plaintext", "tls"])
@pytest_twisted.ensureDeferred
async def test_protocol_20_startup_refused(pki, pg_tls, tmp_path, inside_tls):
    def attempt(port: int, ca: Path) -> dict[str, str]:
        packet = raw_startup(b"user\0" + SCRAM_USER.encode() + b"\0\0", version=2 << 16)
        with connect(port) as raw:
            if inside_tls:
                with request_tls(raw, ca) as sock:
                    sock.sendall(packet)
                    return read_fatal(sock)
            raw.sendall(packet)
            return read_fatal(raw)

    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        fields = await deferToThread(attempt, proxy.port(), pki.cert("ca"))
        assert fields["C"] == "08P01"
        assert fields["M"].startswith("unsupported frontend protocol 2.0")


# ---------------------------------------------------------------------------
# 6. Certificate rotation


@pytest.mark.allow_logged_errors
@pytest_twisted.ensureDeferred
async def test_certificate_rotation(pki, pg_tls, tmp_path, events):
    own = own_pki(pki, tmp_path)
    sans = ["DNS:localhost", "IP:127.0.0.1"]
    cert, key = write_leaf(own, "rotating", sans)
    listener = {
        "server_cert": str(cert),
        "server_key": str(key),
        "cert_refresh_interval": "1s",
    }
    ca = own.cert("ca")

    def serial_of(path: Path) -> int:
        return x509.load_pem_x509_certificate(path.read_bytes()).serial_number

    async def wait_serial(port: int, serial: int) -> float:
        started = time.monotonic()
        while (seen := await deferToThread(served_serial, port, ca)) != serial:
            assert time.monotonic() - started < 2.5, f"still serving serial {seen}"
            await sleep(0.1)
        return time.monotonic() - started

    async with running(tmp_path, [route(own, pg_tls, listener=listener)]) as proxy:
        port = proxy.port()
        first = serial_of(cert)
        assert await deferToThread(served_serial, port, ca) == first
        old = await deferToThread(psycopg.connect, client_dsn(proxy, own))
        try:
            # On the reactor thread: the refresh timer cannot run between
            # the two files being written.
            write_leaf(own, "rotating", sans)
            second = serial_of(cert)
            assert second != first
            await wait_serial(port, second)
            assert (await deferToThread(lambda: old.execute("SELECT 7").fetchone())) == (7,)
            assert errors(events) == []

            cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
            await until(
                lambda: errors(events), 2.5, "a broken certificate file reported", interval=0.1
            )
            text = eventAsText(errors(events)[0], includeTimestamp=False)
            assert "keeping the previous listener TLS context" in text, text
            assert f"listener server certificate {cert}" in text
            # The last good certificate is still served, and sessions go on.
            assert await deferToThread(served_serial, port, ca) == second
            rows = await deferToThread(fetch, client_dsn(proxy, own), "SELECT current_user")
            assert rows == [(SCRAM_USER,)]
            assert (await deferToThread(lambda: old.execute("SELECT 8").fetchone())) == (8,)
        finally:
            await deferToThread(old.close)


# ---------------------------------------------------------------------------
# 7. max_clients


@pytest_twisted.ensureDeferred
async def test_max_clients(pki, pg_tls, tmp_path):
    routes = [
        route(pki, pg_tls, name="small", listener={"max_clients": 2}),
        route(pki, pg_tls, name="other", listener={"max_clients": 2}),
    ]
    async with running(tmp_path, routes) as proxy:
        small = proxy.port("small")
        ca = pki.cert("ca")
        conns = [
            await deferToThread(psycopg.connect, client_dsn(proxy, pki, "small")) for _ in range(2)
        ]
        try:
            message = 'pgtls: sorry, too many clients already on route "small" (max_clients = 2)'
            fields = await deferToThread(raw_login, small, ca)
            assert isinstance(fields, dict)
            assert (fields["C"], fields["M"]) == ("53300", message)
            text = await deferToThread(connect_error, client_dsn(proxy, pki, "small"))
            assert message in text
            # The other route is not affected.
            rows = await deferToThread(fetch, client_dsn(proxy, pki, "other"), "SELECT 1")
            assert rows == [(1,)]
            # The open sessions still work.
            for conn in conns:
                assert (await deferToThread(lambda c=conn: c.execute("SELECT 2").fetchone())) == (
                    2,
                )

            # A cancel request is served even when the route is full, as
            # PostgreSQL serves one when max_connections is reached.
            def sleep_query() -> str:
                try:
                    conns[0].execute("SELECT pg_sleep(30)")
                except psycopg.errors.QueryCanceled as e:
                    return str(e)
                return "not canceled"

            running_query = deferToThread(sleep_query)
            await sleep(0.5)
            await deferToThread(conns[0].cancel_safe)
            assert "canceling statement due to user request" in await running_query
            await deferToThread(conns[0].rollback)
            # One leaves: its slot is free again.
            await deferToThread(conns.pop().close)
            await wait_clients(proxy, 1, "small")
            assert await deferToThread(raw_login, small, ca) == [(SCRAM_USER,)]
        finally:
            for conn in conns:
                await deferToThread(conn.close)


@pytest_twisted.ensureDeferred
async def test_mtls_refuses_plaintext_clients_on_an_allow_listener(pki, pg_tls, tmp_path):
    """mtls means a certificate, always: tls = "allow" must not open a plaintext way round it."""
    listener = mtls_listener(pki, tls="allow")
    async with running(tmp_path, [route(pki, pg_tls, listener=listener)]) as proxy:
        text = await deferToThread(connect_error, client_dsn(proxy, pki, sslmode="disable"))
        assert "pgtls: connection requires a valid client certificate" in text
        cert = {"sslcert": pki.cert("client"), "sslkey": pki.key("client")}
        rows = await deferToThread(fetch, client_dsn(proxy, pki, **cert), "SELECT 1")
        assert rows == [(1,)]
