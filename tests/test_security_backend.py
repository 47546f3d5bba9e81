"""
Issue 10, items 5 and 7, against a real server: safe defaults on the
backend leg, and SCRAM towards the backend.

 - C{backend.tls} defaults to C{verify-full}.
 - C{backend.require_auth} (libpq's) limits what the server may ask for, on
   every login pgtls makes or relays.
 - A cleartext password is never sent or relayed over a backend leg that is
   not verified TLS.
 - SCRAM over TLS without a -PLUS offer sends the C{y} flag, so a man in the
   middle who strips -PLUS is caught by the server.
 - C{backend.max_scram_iterations} bounds what a server may ask for.
 - A password SASLprep rejects is used raw, as libpq and PostgreSQL do.

Against a PostgreSQL cluster of this module's own (L{pg_auth}), whose
pg_hba.conf also has C{password} (cleartext) roles, with real clients
(psycopg) where a client behaves and raw sockets where the SQLSTATE matters.
The same rules without a server: test_security_backend_policy (the
configuration and L{LoginGuard}), test_security_scram (the client side of
SCRAM) and test_security_scram_derivation (PBKDF2 off the reactor).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_twisted
from support import rawclient
from support.dsn import app_dsn
from support.pooling import pooled_route
from support.proxy import route, running
from support.scram import ServerContext, fatal_of, service_login
from support.waiting import in_thread
from twisted.internet import defer, reactor
from twisted.internet import ssl as tssl
from twisted.internet.protocol import ClientFactory, Factory, Protocol

from pgtls_twisted.pool._serverlogin import ServerLoginError
from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.protocol._scram import prepare_password
from pgtls_twisted.testing.cluster import (
    APP_DB,
    MD5_PASSWORD,
    MD5_USER,
    POOL_PASSWORD,
    POOL_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
    TRUST_USER,
    PostgresCluster,
)
from pgtls_twisted.testing.pki import PKI

# ---------------------------------------------------------------------------
# A cluster with cleartext-password roles, and roles with odd SCRAM secrets

#: Authenticated with pg_hba.conf "password": the server asks for cleartext.
CLEARTEXT_USER = "sec_cleartext"
CLEARTEXT_PASSWORD = "cleartext_pw"
#: The same, as a pool's service user.
CLEARTEXT_SERVICE = "sec_cleartext_svc"
#: SCRAM verifiers made with more iterations than the default limit, and fewer.
HIGH_ITER_USER, HIGH_ITER_PASSWORD, HIGH_ITERATIONS = "sec_iter_high", "iter_pw", 200_000
LOW_ITER_USER, LOW_ITER_PASSWORD, LOW_ITERATIONS = "sec_iter_low", "iter_pw", 50_000
HIGH_ITER_SERVICE = "sec_iter_svc"
#: Passwords SASLprep rejects (PostgreSQL hashes them raw) and one it maps.
ODD_PASSWORDS = {
    # An ASCII control character: prohibited by SASLprep (C.2.1), but
    # PostgreSQL never SASLpreps pure ASCII.
    "sec_bell": "bell\x07pw",
    # An unassigned code point (A.1): prohibited, so used raw.
    "sec_unassigned": "un\u0378assigned",
    # Hebrew letters around Latin ones: a bidi violation, used raw.
    "sec_bidi": "\u05d0pw\u05d0",
    # A private-use character (C.3) and a C1 control (C.2.2): used raw.
    "sec_private": "pw\ue000\u0085",
    # Mapped, not rejected: soft hyphen to nothing, NBSP to a space, the
    # "fi" ligature to "fi" (NFKC). Both sides must SASLprep it alike.
    "sec_mapped": "so\u00adft\u00a0\ufb01x",
}
#: A pool service user whose password SASLprep rejects.
ODD_SERVICE, ODD_SERVICE_PASSWORD = "sec_odd_svc", "svc\x07pw\u0378"


def _e_literal(text: str) -> str:
    """An E'' SQL literal spelling every unusual character as an escape."""
    out = []
    for ch in text:
        if ch in "'\\":
            out.append(ch * 2)
        elif " " <= ch <= "~":
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}")
    return "E'" + "".join(out) + "'"


def scram_secret(password: str, iterations: int) -> str:
    """A pg_authid SCRAM-SHA-256 secret, computed here (PG 15 has no scram_iterations)."""
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", prepare_password(password), salt, iterations)
    stored = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server = hmac.digest(salted, b"Server Key", "sha256")

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored)}:{b64(server)}"


class _AuthCluster(PostgresCluster):
    """The suite's cluster, plus C{password} (cleartext) rules for two roles."""

    def _hba(self) -> str:
        lines = super()._hba().splitlines()
        extra = [
            f"host all {CLEARTEXT_USER},{CLEARTEXT_SERVICE} {net} password"
            for net in ("127.0.0.1/32", "::1/128")
        ]
        return "\n".join(lines[:2] + extra + lines[2:]) + "\n"


@pytest.fixture(scope="module")
def pg_auth(pg_base_dir: Path, pki: PKI) -> Iterator[PostgresCluster]:
    """A TLS cluster with this module's roles."""
    cluster = _AuthCluster(pg_base_dir, ssl=True, pki=pki, name="backendauth")
    cluster.start()
    try:
        roles = {
            CLEARTEXT_USER: _e_literal(CLEARTEXT_PASSWORD),
            CLEARTEXT_SERVICE: _e_literal(CLEARTEXT_PASSWORD),
            HIGH_ITER_USER: _e_literal(scram_secret(HIGH_ITER_PASSWORD, HIGH_ITERATIONS)),
            HIGH_ITER_SERVICE: _e_literal(scram_secret(HIGH_ITER_PASSWORD, HIGH_ITERATIONS)),
            LOW_ITER_USER: _e_literal(scram_secret(LOW_ITER_PASSWORD, LOW_ITERATIONS)),
            ODD_SERVICE: _e_literal(ODD_SERVICE_PASSWORD),
            **{user: _e_literal(password) for user, password in ODD_PASSWORDS.items()},
        }
        cluster.psql(
            "SET password_encryption = 'scram-sha-256';\n"
            + "".join(
                f"CREATE ROLE {user} LOGIN PASSWORD {secret};\n" for user, secret in roles.items()
            )
        )
        yield cluster
    finally:
        cluster.stop()


# ---------------------------------------------------------------------------
# Clients


def whoami(proxy: Any, pki: PKI, user: str, password: str, name: str | None = None) -> str:
    """Log in with psycopg through C{proxy} and ask the server who we are."""
    with psycopg.connect(app_dsn(proxy, pki, name, user=user, password=password)) as conn:
        row = conn.execute("SELECT current_user").fetchone()
        assert row is not None
        return str(row[0])


def psycopg_error(proxy: Any, pki: PKI, user: str, password: str, name: str | None = None) -> str:
    """What psycopg says when the login (or the first query) fails."""
    try:
        whoami(proxy, pki, user, password, name)
    except psycopg.OperationalError as e:
        return str(e)
    raise AssertionError("the login unexpectedly worked")


def raw_fatal(
    port: int, pki: PKI, user: str, password: str, query: str | None = None
) -> dict[str, str]:
    """
    Log in over TLS with a raw client and return the FATAL error that ends
    the login (or, with C{query}, the first query) and then the connection.
    """
    sock = rawclient.connect(port)
    with rawclient.request_tls(sock, pki.cert("ca")) as tls:
        try:
            rawclient.startup_cleartext(tls, user, password, APP_DB)
        except rawclient.ServerError as e:
            assert e.fields["S"] == "FATAL", e.fields
            assert rawclient.read_until_close(tls) == b""
            return e.fields
        assert query is not None, "the login unexpectedly worked"
        tls.sendall(rawclient.query_message(query))
        return rawclient.read_fatal(tls)


def auth_route(pki: PKI, cluster: Any, **backend: Any) -> dict[str, Any]:
    return route(pki, cluster, backend=backend)


# ---------------------------------------------------------------------------
# 5. backend.tls defaults to verify-full


@pytest_twisted.ensureDeferred
async def test_default_mode_refuses_an_unverifiable_backend(pki, pg_auth, tmp_path):
    """
    A route that names no mode and no CA verifies the server against the
    system trust store, which does not know the test CA: refused, where the
    old default (prefer) logged in over an unverified leg.
    """
    table = route(pki, pg_auth)
    del table["backend"]["tls"], table["backend"]["root_ca"]
    async with running(tmp_path, [table]) as proxy:
        fields = await in_thread(raw_fatal, proxy.port(), pki, SCRAM_USER, SCRAM_PASSWORD)
    code, message = fatal_of(fields)
    assert code == "08006"
    assert message.startswith('pgtls route "app": backend TLS verification failed:')
    assert "unknown CA" in message or "issuer" in message


@pytest_twisted.ensureDeferred
async def test_default_mode_with_root_ca_verifies_and_works(pki, pg_auth, tmp_path):
    table = route(pki, pg_auth)
    del table["backend"]["tls"]
    async with running(tmp_path, [table]) as proxy:
        assert proxy.config.routes[0].backend.tls == "verify-full"
        assert await in_thread(whoami, proxy, pki, SCRAM_USER, SCRAM_PASSWORD) == SCRAM_USER


# ---------------------------------------------------------------------------
# 5. require_auth against a real server, on every kind of login


@pytest.mark.parametrize(
    ("require_auth", "user", "password", "refusal"),
    [
        ("scram-sha-256", SCRAM_USER, SCRAM_PASSWORD, None),
        ("scram-sha-256", MD5_USER, MD5_PASSWORD, "server requested a hashed password"),
        ("scram-sha-256", TRUST_USER, "", "server did not complete authentication"),
        ("!md5", MD5_USER, MD5_PASSWORD, "server requested a hashed password"),
        ("!md5", TRUST_USER, "", None),
        ("none", TRUST_USER, "", None),
        ("none", SCRAM_USER, SCRAM_PASSWORD, "server requested SASL authentication"),
        ("md5,password", CLEARTEXT_USER, CLEARTEXT_PASSWORD, None),
        ("md5", CLEARTEXT_USER, CLEARTEXT_PASSWORD, "server requested a cleartext password"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_require_auth_on_client_logins(
    pki, pg_auth, tmp_path, require_auth, user, password, refusal
):
    """Pass-through: what the server asks the client for goes through require_auth first."""
    async with running(tmp_path, [auth_route(pki, pg_auth, require_auth=require_auth)]) as proxy:
        if refusal is None:
            assert await in_thread(whoami, proxy, pki, user, password) == user
            return
        fields = await in_thread(raw_fatal, proxy.port(), pki, user, password)
        assert fatal_of(fields) == (
            "28000",
            f'pgtls route "app": authentication method requirement "{require_auth}" failed:'
            f" {refusal}",
        )
        # A real client shows the same words.
        assert f'"{require_auth}" failed: {refusal}' in await in_thread(
            psycopg_error, proxy, pki, user, password
        )


@pytest_twisted.ensureDeferred
async def test_require_auth_on_the_pool_service_login(pki, pg_auth, tmp_path):
    """
    The client's own login (MD5) is allowed; the service user's (SCRAM) is
    not: the first query finds no server connection it may use.
    """
    table = pooled_route(pki, pg_auth)
    table["backend"]["require_auth"] = "md5"
    async with running(tmp_path, [table]) as proxy:
        fields = await in_thread(
            raw_fatal, proxy.port(), pki, MD5_USER, MD5_PASSWORD, query="SELECT 1"
        )
    assert fatal_of(fields) == (
        "28000",
        f'pgtls pool "{POOL_USER}/{APP_DB}": authentication method requirement "md5" failed:'
        " server requested SASL authentication",
    )


# ---------------------------------------------------------------------------
# 5. No cleartext password over a backend leg that is not verified TLS


@pytest.mark.parametrize(
    ("mode", "how"),
    [
        ("require", "an unverified"),
        ("prefer", "an unverified"),
        ("disable", "a plaintext"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_cleartext_request_not_relayed_over_unverified_leg(pki, pg_auth, tmp_path, mode, how):
    """
    The server's pg_hba.conf says "password": over a leg whose server is
    not verified, whoever answered would get the client's password. pgtls
    refuses before the client is even asked (old code relayed the request,
    and the client sent its password).
    """
    async with running(tmp_path, [auth_route(pki, pg_auth, tls=mode)]) as proxy:
        fields = await in_thread(raw_fatal, proxy.port(), pki, CLEARTEXT_USER, CLEARTEXT_PASSWORD)
        assert fatal_of(fields) == (
            "28000",
            f'pgtls route "app": backend asked for a cleartext password over {how} connection'
            f' (backend.tls = "{mode}"); refusing to send it',
        )
        # Other methods on the same leg are not affected.
        assert await in_thread(whoami, proxy, pki, MD5_USER, MD5_PASSWORD) == MD5_USER
        assert await in_thread(whoami, proxy, pki, SCRAM_USER, SCRAM_PASSWORD) == SCRAM_USER


@pytest.mark.parametrize("require_auth", [None, "password"])
@pytest_twisted.ensureDeferred
async def test_cleartext_request_relayed_over_verified_tls(pki, pg_auth, tmp_path, require_auth):
    """verify-full (or verify-ca): the server is who it claims, so it may ask."""
    backend = {} if require_auth is None else {"require_auth": require_auth}
    async with running(tmp_path, [auth_route(pki, pg_auth, **backend)]) as proxy:
        assert proxy.config.routes[0].backend.tls == "verify-full"
        got = await in_thread(whoami, proxy, pki, CLEARTEXT_USER, CLEARTEXT_PASSWORD)
        assert got == CLEARTEXT_USER


@pytest.mark.parametrize(
    ("mode", "how"), [("require", "an unverified"), ("disable", "a plaintext")]
)
@pytest_twisted.ensureDeferred
async def test_service_password_not_sent_over_unverified_leg(pki, pg_auth, tmp_path, mode, how):
    """
    Pooled: the service user's password is pgtls's own secret; it is not
    sent in cleartext to a server that was not verified (old code sent it).
    """
    table = pooled_route(
        pki, pg_auth, service_user=CLEARTEXT_SERVICE, service_password=CLEARTEXT_PASSWORD
    )
    table["backend"]["tls"] = mode
    async with running(tmp_path, [table]) as proxy:
        # The client's own login (MD5) goes through; the pool's does not.
        fields = await in_thread(
            raw_fatal, proxy.port(), pki, MD5_USER, MD5_PASSWORD, query="SELECT 1"
        )
    assert fatal_of(fields) == (
        "28000",
        f'pgtls pool "{CLEARTEXT_SERVICE}/{APP_DB}": backend asked for a cleartext password over'
        f' {how} connection (backend.tls = "{mode}"); refusing to send it',
    )


@pytest_twisted.ensureDeferred
async def test_service_password_sent_over_verified_tls(pki, pg_auth, tmp_path):
    table = pooled_route(
        pki, pg_auth, service_user=CLEARTEXT_SERVICE, service_password=CLEARTEXT_PASSWORD
    )
    async with running(tmp_path, [table]) as proxy:
        # Every pooled query runs as the service user.
        assert await in_thread(whoami, proxy, pki, SCRAM_USER, SCRAM_PASSWORD) == CLEARTEXT_SERVICE


# ---------------------------------------------------------------------------
# 7. SASLprep


@pytest.mark.parametrize("user", sorted(ODD_PASSWORDS))
@pytest_twisted.ensureDeferred
async def test_odd_passwords_through_pgtls_scram(pki, pg_auth, tmp_path, user):
    """
    Both legs TLS: pgtls runs SCRAM with the client's password. PostgreSQL
    made the verifier from the raw password where SASLprep failed; so must
    pgtls (old code: an uncaught ScramException, and a silent close).
    """
    async with running(tmp_path, [auth_route(pki, pg_auth)]) as proxy:
        assert await in_thread(whoami, proxy, pki, user, ODD_PASSWORDS[user]) == user


@pytest_twisted.ensureDeferred
async def test_odd_service_password(pki, pg_auth, tmp_path):
    """The pool's service user, whose password SASLprep rejects, logs in (old code could not)."""
    table = pooled_route(
        pki, pg_auth, service_user=ODD_SERVICE, service_password=ODD_SERVICE_PASSWORD
    )
    async with running(tmp_path, [table]) as proxy:
        assert await in_thread(whoami, proxy, pki, SCRAM_USER, SCRAM_PASSWORD) == ODD_SERVICE


@pytest.mark.parametrize("cluster", ["pg_auth", "pg_plain"])
@pytest.mark.parametrize("pooled", [False, True])
@pytest_twisted.ensureDeferred
async def test_scram_paths_still_work(pki, request, tmp_path, cluster, pooled):
    """
    TLS backend: pgtls runs SCRAM-SHA-256-PLUS for the client (and for the
    service user); plaintext backend: the client runs SCRAM itself, and the
    service user's login uses "n".
    """
    server = request.getfixturevalue(cluster)
    table = pooled_route(pki, server) if pooled else route(pki, server)
    expected = POOL_USER if pooled else SCRAM_USER
    async with running(tmp_path, [table]) as proxy:
        assert await in_thread(whoami, proxy, pki, SCRAM_USER, SCRAM_PASSWORD, table["name"]) == (
            expected
        )


# ---------------------------------------------------------------------------
# 7. The iteration limit against a real server (PostgreSQL 15 has no
# scram_iterations: the verifiers are made by scram_secret)


@pytest_twisted.ensureDeferred
async def test_iterations_above_the_limit_refused(pki, pg_auth, tmp_path):
    async with running(tmp_path, [auth_route(pki, pg_auth)]) as proxy:
        fields = await in_thread(raw_fatal, proxy.port(), pki, HIGH_ITER_USER, HIGH_ITER_PASSWORD)
        assert fatal_of(fields) == (
            "28000",
            f'pgtls route "app": backend asked for {HIGH_ITERATIONS} SCRAM iterations, more than'
            " backend.max_scram_iterations = 100000",
        )
        # Below the limit, a count other than PostgreSQL's default works.
        assert await in_thread(whoami, proxy, pki, LOW_ITER_USER, LOW_ITER_PASSWORD) == (
            LOW_ITER_USER
        )


@pytest_twisted.ensureDeferred
async def test_iterations_within_a_raised_limit_work(pki, pg_auth, tmp_path):
    table = auth_route(pki, pg_auth, max_scram_iterations=HIGH_ITERATIONS)
    async with running(tmp_path, [table]) as proxy:
        got = await in_thread(whoami, proxy, pki, HIGH_ITER_USER, HIGH_ITER_PASSWORD)
        assert got == HIGH_ITER_USER


@pytest.mark.parametrize("limit", [None, HIGH_ITERATIONS])
@pytest_twisted.ensureDeferred
async def test_iteration_limit_on_the_service_login(pki, pg_auth, tmp_path, limit):
    table = pooled_route(
        pki, pg_auth, service_user=HIGH_ITER_SERVICE, service_password=HIGH_ITER_PASSWORD
    )
    if limit is not None:
        table["backend"]["max_scram_iterations"] = limit
    async with running(tmp_path, [table]) as proxy:
        if limit is not None:
            got = await in_thread(whoami, proxy, pki, SCRAM_USER, SCRAM_PASSWORD)
            assert got == HIGH_ITER_SERVICE
            return
        fields = await in_thread(
            raw_fatal, proxy.port(), pki, SCRAM_USER, SCRAM_PASSWORD, query="SELECT 1"
        )
    assert fatal_of(fields) == (
        "28000",
        f'pgtls pool "{HIGH_ITER_SERVICE}/{APP_DB}": backend login failed: backend asked for'
        f" {HIGH_ITERATIONS} SCRAM iterations, more than backend.max_scram_iterations = 100000",
    )


# ---------------------------------------------------------------------------
# 5. The y flag against a real server: a man in the middle strips -PLUS


class StripPlus(Factory):
    """
    A TLS-terminating man in the middle in front of a real TLS cluster, with
    a certificate of its own (from another CA: what a C{require} leg
    accepts). With C{strip}, it removes SCRAM-SHA-256-PLUS from the server's
    offer, so that the client cannot bind to the certificate it sees (which
    is not the server's); without, it relays unchanged.
    """

    host = "127.0.0.1"
    ssl = True
    noisy = False

    def __init__(self, pki: PKI, upstream: PostgresCluster, strip: bool) -> None:
        self.serverOptions = ServerContext(pki, "server_other_ca")
        self.upstream = upstream
        self.strip = strip
        self.stripped = 0
        self.port_: Any = reactor.listenTCP(0, self, interface="127.0.0.1")

    @property
    def port(self) -> int:
        return int(self.port_.getHost().port)

    def buildProtocol(self, addr: Any) -> _Downstream:
        return _Downstream(self)

    async def stop(self) -> None:
        await defer.maybeDeferred(self.port_.stopListening)


class _Downstream(Protocol):
    """The side facing pgtls."""

    def __init__(self, mitm: StripPlus) -> None:
        self.mitm = mitm
        self.pending = b""
        self.up: _Upstream | None = None
        self.tls = False

    def dataReceived(self, data: bytes) -> None:
        if not self.tls:
            assert data == wire.SSL_REQUEST
            self.tls = True
            self.transport.write(b"S")
            self.transport.startTLS(self.mitm.serverOptions)
            factory = ClientFactory.forProtocol(lambda: _Upstream(self))
            reactor.connectTCP(self.mitm.upstream.host, self.mitm.upstream.port, factory)
            return
        if self.up is not None and self.up.ready:
            self.up.transport.write(data)
        else:
            self.pending += data

    def connectionLost(self, reason: Any = None) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.loseConnection()


class _Upstream(Protocol):
    """The side facing the real server, as a TLS client that verifies nothing."""

    def __init__(self, down: _Downstream) -> None:
        self.down = down
        self.ready = False
        self.reader = wire.MessageReader()

    def connectionMade(self) -> None:
        self.down.up = self
        self.transport.write(wire.SSL_REQUEST)

    def dataReceived(self, data: bytes) -> None:
        if not self.ready:
            assert data == b"S"
            self.ready = True
            self.transport.startTLS(tssl.CertificateOptions())
            self.transport.write(self.down.pending)
            return
        self.reader.feed(data)
        while (msg := self.reader.next()) is not None:
            mtype, body = msg
            if mtype == b"R" and wire.auth_code(body) == wire.AUTH_SASL and self.down.mitm.strip:
                kept = [m for m in wire.sasl_mechanisms(body) if not m.endswith("-PLUS")]
                self.down.mitm.stripped += 1
                self.down.transport.write(wire.authentication_sasl(kept))
            else:
                self.down.transport.write(wire.message(mtype, body))

    def connectionLost(self, reason: Any = None) -> None:
        self.down.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_stripped_plus_offer_is_detected_by_the_server(pki, pg_auth, tmp_path):
    """
    Old code answered a stripped offer with "n", and the man in the middle
    (which terminates both TLS sessions) got a logged-in session to read.
    With "y", PostgreSQL sees that the client would have bound and refuses.
    """
    mitm = StripPlus(pki, pg_auth, strip=True)
    table = route(pki, mitm, backend={"tls": "require"})
    try:
        async with running(tmp_path, [table]) as proxy:
            fields = await in_thread(raw_fatal, proxy.port(), pki, SCRAM_USER, SCRAM_PASSWORD)
        assert fatal_of(fields) == ("28000", "SCRAM channel binding negotiation error")
        assert mitm.stripped == 1
    finally:
        await mitm.stop()


@pytest_twisted.ensureDeferred
async def test_unstripped_man_in_the_middle_fails_the_binding(pki, pg_auth, tmp_path):
    """The control: left alone, -PLUS binds to the wrong certificate and fails."""
    mitm = StripPlus(pki, pg_auth, strip=False)
    table = route(pki, mitm, backend={"tls": "require"})
    try:
        async with running(tmp_path, [table]) as proxy:
            fields = await in_thread(raw_fatal, proxy.port(), pki, SCRAM_USER, SCRAM_PASSWORD)
        assert fields["C"] == "28000"
        assert "channel binding" in fields["M"]
    finally:
        await mitm.stop()


@pytest_twisted.ensureDeferred
async def test_stripped_plus_offer_detected_on_the_service_login(pki, pg_auth, tmp_path):
    mitm = StripPlus(pki, pg_auth, strip=True)
    table = route(pki, mitm, backend={"tls": "require"})
    try:
        with pytest.raises(ServerLoginError) as info:
            await service_login(tmp_path, table, POOL_USER, POOL_PASSWORD)
        assert (info.value.sqlstate, info.value.message) == (
            "28000",
            "SCRAM channel binding negotiation error",
        )
    finally:
        await mitm.stop()
