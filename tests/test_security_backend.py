"""
Issue 10, items 5 and 7: safe defaults on the backend leg, and the cost and
failures of SCRAM towards the backend.

 - C{backend.tls} defaults to C{verify-full}; C{verify-ca} needs C{root_ca}.
 - C{backend.require_auth} (libpq's) limits what the server may ask for, on
   every login pgtls makes or relays.
 - A cleartext password is never sent or relayed over a backend leg that is
   not verified TLS.
 - SCRAM over TLS without a -PLUS offer sends the C{y} flag, so a man in the
   middle who strips -PLUS is caught by the server.
 - PBKDF2 runs in a thread, within C{backend.max_scram_iterations}.
 - A password SASLprep rejects is used raw, as libpq and PostgreSQL do.

Against a PostgreSQL cluster of this module's own (L{pg_auth}), whose
pg_hba.conf also has C{password} (cleartext) roles, with real clients
(psycopg) where a client behaves, raw sockets where the SQLSTATE matters,
and scripted fake servers for what no real server does on purpose.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from OpenSSL import SSL
from support import rawclient
from support.pooling import pooled_route
from support.proxy import route, running
from twisted.internet import defer, reactor
from twisted.internet import ssl as tssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from zope.interface import implementer

from pgtls_twisted.config import ConfigError, describe_config, parse_config
from pgtls_twisted.ops._metrics import Metrics
from pgtls_twisted.pool._serverlogin import ServerLogin, ServerLoginError
from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.protocol._authpolicy import LoginGuard, parse_require_auth
from pgtls_twisted.protocol._scram import (
    ScramLogin,
    ScramLoginError,
    ScramPolicyError,
    prepare_password,
)
from pgtls_twisted.proxy._backend import BackendConnector
from pgtls_twisted.proxy._derivation import DerivationThreads
from pgtls_twisted.proxy._session import MAX_HELD_DURING_LOGIN
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
    with psycopg.connect(
        host="localhost",
        port=proxy.port(name),
        dbname=APP_DB,
        user=user,
        password=password,
        sslmode="verify-full",
        sslrootcert=str(pki.cert("ca")),
        connect_timeout=10,
    ) as conn:
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


def fatal_of(fields: dict[str, str]) -> tuple[str, str]:
    return fields["C"], fields["M"]


async def in_thread(f: Any, *args: Any, **kwargs: Any) -> Any:
    return await deferToThread(f, *args, **kwargs).addTimeout(60, reactor)


def auth_route(pki: PKI, cluster: Any, **backend: Any) -> dict[str, Any]:
    return route(pki, cluster, backend=backend)


# ---------------------------------------------------------------------------
# 5. backend.tls defaults to verify-full; verify-ca needs root_ca


def _doc(tmp_path: Path, **backend: Any) -> dict[str, Any]:
    for name in ("server.crt", "server.key", "ca.crt"):
        (tmp_path / name).write_text("dummy\n")
    (tmp_path / "server.key").chmod(0o600)
    return {
        "proxy": [
            {
                "listener": {
                    "bind_address": "127.0.0.1:0",
                    "server_cert": "server.crt",
                    "server_key": "server.key",
                },
                "backend": {"address": "db.internal:5432", **backend},
            }
        ]
    }


def test_backend_tls_default_is_verify_full(tmp_path: Path) -> None:
    """Nothing said: the server must prove it is db.internal, against the system CAs."""
    (config_route,) = parse_config(_doc(tmp_path), base_dir=tmp_path).routes
    assert config_route.backend.tls == "verify-full"
    assert config_route.backend.root_ca is None
    text = describe_config(parse_config(_doc(tmp_path), base_dir=tmp_path))
    assert "tls verify-full (TLS required; certificate chain and host name verified)" in text
    assert "system CAs" in text


@pytest.mark.parametrize("mode", ["disable", "prefer", "require"])
def test_weaker_modes_still_available_when_named(tmp_path: Path, mode: str) -> None:
    (config_route,) = parse_config(_doc(tmp_path, tls=mode), base_dir=tmp_path).routes
    assert config_route.backend.tls == mode


def test_verify_ca_requires_root_ca(tmp_path: Path) -> None:
    """As libpq 16: verify-ca against every public CA would accept anyone's certificate."""
    with pytest.raises(ConfigError) as info:
        parse_config(_doc(tmp_path, tls="verify-ca"), base_dir=tmp_path)
    (message,) = info.value.messages
    assert message.startswith('[[proxy]] #1: backend.root_ca: required with tls = "verify-ca"')
    (ok,) = parse_config(
        _doc(tmp_path, tls="verify-ca", root_ca="ca.crt"), base_dir=tmp_path
    ).routes
    assert ok.backend.root_ca == tmp_path / "ca.crt"


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
# 5. backend.require_auth: libpq's syntax


@pytest.mark.parametrize(
    ("text", "allowed"),
    [
        ("scram-sha-256", {10}),
        ("password", {3}),
        ("md5,scram-sha-256", {5, 10}),
        ("none", {0}),
        ("scram-sha-256, none", {0, 10}),
        ("gss", {7, 8}),
        ("sspi", {8, 9}),
        ("!password", {0, 5, 7, 8, 9, 10}),
        ("!password,!md5", {0, 7, 8, 9, 10}),
        ("!none", {3, 5, 7, 8, 9, 10}),
        ("!gss", {0, 3, 5, 8, 9, 10}),
        ("!gss,!sspi", {0, 3, 5, 10}),
    ],
)
def test_require_auth_syntax(text: str, allowed: set[int]) -> None:
    assert parse_require_auth(text).allowed == allowed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("md5,!password", 'negative require_auth method "!password" cannot be mixed'),
        ("!md5,password", 'require_auth method "password" cannot be mixed with negative'),
        ("md5,md5", 'require_auth method "md5" is specified more than once'),
        ("!md5,!md5", 'require_auth method "md5" is specified more than once'),
        ("scram", 'invalid require_auth method "scram"'),
        ("md5,", 'invalid require_auth method ""'),
        ("!", 'invalid require_auth method ""'),
        ("SCRAM-SHA-256", 'invalid require_auth method "SCRAM-SHA-256"'),
    ],
)
def test_require_auth_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_doc(tmp_path, require_auth=text), base_dir=tmp_path)
    (problem,) = info.value.messages
    assert problem.startswith("[[proxy]] #1: backend.require_auth: ")
    assert message in problem


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (4095, "must be at least 4096"),
        (0, "must be at least 4096"),
        ("100000", 'expected an integer, got "100000"'),
        (True, "expected an integer, got boolean true"),
    ],
)
def test_max_scram_iterations_values(tmp_path: Path, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_doc(tmp_path, max_scram_iterations=value), base_dir=tmp_path)
    (problem,) = info.value.messages
    assert problem.startswith("[[proxy]] #1: backend.max_scram_iterations: ")
    assert message in problem


def test_describe_shows_the_backend_auth_policy(tmp_path: Path) -> None:
    doc = _doc(tmp_path, tls="require", require_auth="scram-sha-256", max_scram_iterations=8192)
    text = describe_config(parse_config(doc, base_dir=tmp_path))
    assert (
        "auth require_auth scram-sha-256; cleartext passwords refused (leg not verified);"
        " SCRAM iterations <= 8192"
    ) in text
    text = describe_config(parse_config(_doc(tmp_path), base_dir=tmp_path))
    assert "auth any method; SCRAM iterations <= 100000" in text


# ---------------------------------------------------------------------------
# 5. LoginGuard: the sequences libpq accepts and refuses


def _sequence(guard: LoginGuard, *codes: int) -> str | None:
    for code in codes:
        refusal = guard.refusal(code)
        if refusal is not None:
            return refusal
    return None


SASL = (wire.AUTH_SASL, wire.AUTH_SASL_CONTINUE, wire.AUTH_SASL_FINAL, wire.AUTH_OK)


@pytest.mark.parametrize(
    ("require_auth", "codes", "refusal"),
    [
        (None, (wire.AUTH_OK,), None),
        (None, SASL, None),
        ("scram-sha-256", SASL, None),
        ("scram-sha-256", (wire.AUTH_OK,), "server did not complete authentication"),
        # SASL with the final message skipped: not complete either.
        (
            "scram-sha-256",
            (wire.AUTH_SASL, wire.AUTH_SASL_CONTINUE, wire.AUTH_OK),
            "server did not complete authentication",
        ),
        ("scram-sha-256", (wire.AUTH_MD5_PASSWORD,), "server requested a hashed password"),
        ("none", (wire.AUTH_OK,), None),
        ("none", SASL, "server requested SASL authentication"),
        ("md5,none", (wire.AUTH_MD5_PASSWORD, wire.AUTH_OK), None),
        ("!md5", (wire.AUTH_OK,), None),
        ("!md5", SASL, None),
        ("!md5", (wire.AUTH_MD5_PASSWORD,), "server requested a hashed password"),
        ("!none", (wire.AUTH_OK,), "server did not complete authentication"),
        ("!none", SASL, None),
        ("md5", (9,), "server requested SSPI authentication"),
        ("md5", (6,), "server requested an unknown authentication type"),
        ("gss", (7, 8, 8, 0), None),
    ],
)
def test_login_guard_follows_libpq(
    require_auth: str | None, codes: tuple[int, ...], refusal: str | None
) -> None:
    guard = LoginGuard(require_auth, "verify-full", tls=True)
    got = _sequence(guard, *codes)
    if refusal is None:
        assert got is None
    else:
        assert got == f'authentication method requirement "{require_auth}" failed: {refusal}'


@pytest.mark.parametrize(
    ("mode", "tls", "how"),
    [
        ("disable", False, "a plaintext"),
        ("prefer", False, "a plaintext"),
        ("prefer", True, "an unverified"),
        ("require", True, "an unverified"),
    ],
)
@pytest.mark.parametrize("require_auth", [None, "password", "!md5"])
def test_no_cleartext_password_over_an_unverified_leg(
    mode: str, tls: bool, how: str, require_auth: str | None
) -> None:
    """Whatever require_auth says: the rule has no switch."""
    guard = LoginGuard(require_auth, mode, tls)
    assert guard.refusal(wire.AUTH_CLEARTEXT_PASSWORD) == (
        f'backend asked for a cleartext password over {how} connection (backend.tls = "{mode}");'
        " refusing to send it"
    )
    # MD5 is not affected (unless require_auth says so).
    assert LoginGuard(None, mode, tls).refusal(wire.AUTH_MD5_PASSWORD) is None


@pytest.mark.parametrize("mode", ["verify-ca", "verify-full"])
def test_cleartext_password_allowed_over_verified_tls(mode: str) -> None:
    guard = LoginGuard(None, mode, tls=True)
    assert _sequence(guard, wire.AUTH_CLEARTEXT_PASSWORD, wire.AUTH_OK) is None
    # ... unless require_auth forbids it.
    refusal = LoginGuard("!password", mode, tls=True).refusal(wire.AUTH_CLEARTEXT_PASSWORD)
    assert refusal == (
        'authentication method requirement "!password" failed:'
        " server requested a cleartext password"
    )


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
# SCRAM: a server side to test the client against


class ScramServerSide:
    """
    The server side of SCRAM-SHA-256 as PostgreSQL runs it (it ignores the
    SCRAM user name, which libpq and pgtls leave empty), for fake servers.

    @ivar clientFirst: the client-first message received.
    @ivar clientFinal: the client-final message received.
    """

    def __init__(
        self,
        password: str,
        iterations: int,
        plus: bytes | None = None,
        salted: bytes | None = None,
    ) -> None:
        self.salt = b"pgtls-test-salt!"
        self.iterations = iterations
        self._password = prepare_password(password)
        self._plus = plus
        self._salted = salted
        self.clientFirst = b""
        self.clientFinal = b""
        self._serverFirst = ""
        self._bare = ""

    def salted_password(self) -> bytes:
        return hashlib.pbkdf2_hmac("sha256", self._password, self.salt, self.iterations)

    def server_first(self, clientFirst: bytes) -> bytes:
        self.clientFirst = clientFirst
        text = clientFirst.decode()
        flag, authzid, self._bare = text.split(",", 2)
        nonce = self._bare.split("r=", 1)[1]
        salt = base64.b64encode(self.salt).decode()
        self._serverFirst = f"r={nonce}server-nonce,s={salt},i={self.iterations}"
        return self._serverFirst.encode()

    def expected_cbind(self) -> bytes:
        header = self.clientFirst.split(b"n=", 1)[0]
        return header + (self._plus or b"") if header.startswith(b"p=") else header

    def server_final(self, clientFinal: bytes) -> bytes:
        """Check the proof as the server does; C{v=...} if it is right."""
        self.clientFinal = clientFinal
        without, proof = clientFinal.decode().rsplit(",p=", 1)
        assert without.startswith("c=" + base64.b64encode(self.expected_cbind()).decode() + ",")
        return self.sign(without, base64.b64decode(proof))

    def sign(self, without: str, proof: bytes | None = None) -> bytes:
        auth = f"{self._bare},{self._serverFirst},{without}".encode()
        salted = self._salted or self.salted_password()
        stored = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
        if proof is not None:
            signature = hmac.digest(stored, auth, "sha256")
            clientKey = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
            assert hashlib.sha256(clientKey).digest() == stored, "wrong client proof"
        serverKey = hmac.digest(salted, b"Server Key", "sha256")
        return b"v=" + base64.b64encode(hmac.digest(serverKey, auth, "sha256"))


def initial_response(message: bytes) -> tuple[str, bytes]:
    """The mechanism and data of a SASLInitialResponse message."""
    assert message[:1] == b"p"
    body = message[5:]
    end = body.index(b"\0")
    (length,) = struct.unpack_from("!i", body, end + 1)
    data = body[end + 5 :]
    assert len(data) == length
    return body[:end].decode(), data


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
# A scripted TLS server that speaks SCRAM, for what no real server does


@implementer(IOpenSSLServerConnectionCreator)
class ServerContext:
    """A TLS server with one of the PKI's certificates, for C{startTLS}."""

    def __init__(self, pki: PKI, name: str) -> None:
        self._ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        self._ctx.use_certificate_chain_file(str(pki.cert(name)))
        self._ctx.use_privatekey_file(str(pki.key(name)))

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._ctx, None)


class FakeScramBackend(Factory):
    """
    A TLS PostgreSQL server (the PKI's C{server} certificate) that offers
    SCRAM-SHA-256 only and answers as told. Quacks like a cluster for
    L{support.proxy.route} (verify-full against the test CA).

    @ivar eager: send server-first, server-final, AuthenticationOk,
        BackendKeyData and ReadyForQuery in one write, without waiting for
        client-final (the proof is checked when it comes).
    @ivar closeAfterFirst: hang up right after server-first.
    @ivar refuseFinal: answer client-final with FATAL 28P01.
    """

    host = "127.0.0.1"
    ssl = True
    noisy = False

    def __init__(self, pki: PKI, iterations: int, password: str = "secret") -> None:
        self.tlsOptions = ServerContext(pki, "server")
        self.iterations = iterations
        self.password = password
        # Derived now, not on the reactor while a test watches it; a count
        # pgtls must refuse is never derived.
        self.salted = None
        if iterations <= 5_000_000:
            self.salted = ScramServerSide(password, iterations).salted_password()
        self.eager = False
        self.closeAfterFirst = False
        self.refuseFinal = False
        self.connections: list[_FakeScramConnection] = []
        self.port_: Any = reactor.listenTCP(0, self, interface="127.0.0.1")

    @property
    def port(self) -> int:
        return int(self.port_.getHost().port)

    def buildProtocol(self, addr: Any) -> _FakeScramConnection:
        conn = _FakeScramConnection(self)
        self.connections.append(conn)
        return conn

    async def stop(self) -> None:
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.abortConnection()
        await defer.maybeDeferred(self.port_.stopListening)


class _FakeScramConnection(Protocol):
    def __init__(self, factory: FakeScramBackend) -> None:
        self.factory = factory
        self.scram = ScramServerSide(factory.password, factory.iterations, salted=factory.salted)
        self.buffer = b""
        self.reader: wire.MessageReader | None = None
        #: Every typed message received after the startup packet, in order.
        self.received: list[bytes] = []
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.reader is not None:
            self.reader.feed(data)
            self._messages()
            return
        self.buffer += data
        if len(self.buffer) < 4:
            return
        (length,) = struct.unpack_from("!I", self.buffer)
        if len(self.buffer) < length:
            return
        packet, self.buffer = self.buffer[:length], self.buffer[length:]
        if packet == wire.SSL_REQUEST:
            self.transport.write(b"S")
            self.transport.startTLS(self.factory.tlsOptions)
            return
        self.reader = wire.MessageReader()
        self.transport.write(wire.authentication_sasl(["SCRAM-SHA-256"]))
        self.dataReceived(self.buffer)

    def _messages(self) -> None:
        assert self.reader is not None
        while (msg := self.reader.next()) is not None:
            mtype, body = msg
            self.received.append(mtype)
            if mtype == b"p" and len(self.received) == 1:
                self._first(initial_response(wire.message(mtype, body))[1])
            elif mtype == b"p" and len(self.received) == 2:
                self._final(body)

    def _first(self, clientFirst: bytes) -> None:
        out = [wire.authentication(wire.AUTH_SASL_CONTINUE, self.scram.server_first(clientFirst))]
        if self.factory.eager:
            # client-final without its proof is predictable: c=eSws (the y
            # flag, no -PLUS offered over TLS) and the combined nonce.
            nonce = self.scram._serverFirst.split(",")[0][2:]
            final = self.scram.sign(f"c=eSws,r={nonce}")
            out += [wire.authentication(wire.AUTH_SASL_FINAL, final), *_LOGGED_IN]
        self.transport.write(b"".join(out))
        if self.factory.closeAfterFirst:
            self.transport.loseConnection()

    def _final(self, clientFinal: bytes) -> None:
        if self.factory.refuseFinal:
            self.transport.write(
                wire.error_response("28P01", "fake: password authentication failed")
            )
            self.transport.loseConnection()
            return
        signature = self.scram.server_final(clientFinal)
        if not self.factory.eager:
            self.transport.write(
                wire.authentication(wire.AUTH_SASL_FINAL, signature) + b"".join(_LOGGED_IN)
            )

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


_LOGGED_IN = (
    wire.AUTHENTICATION_OK,
    wire.backend_key_data(1234, b"\0\0\0\1"),
    wire.ready_for_query(),
)


class ReactorWatch:
    """The longest the reactor went without running a 10 ms timer."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._last = time.monotonic()
        self._loop = LoopingCall(self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        self.worst = max(self.worst, now - self._last)
        self._last = now

    def __enter__(self) -> ReactorWatch:
        self._last = time.monotonic()
        self._loop.start(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._tick()
        self._loop.stop()


def raw_login(port: int, pki: PKI, password: str, *, pipelined: bytes = b"") -> dict[str, Any]:
    """
    Log in over TLS as "alice" with a raw client; pgtls asks for the
    password (it runs SCRAM itself). C{pipelined} is sent right behind the
    password. Returns the FATAL fields, or the login's result.
    """
    sock = rawclient.connect(port)
    with rawclient.request_tls(sock, pki.cert("ca")) as tls:
        tls.sendall(rawclient.startup_message("alice", "db"))
        mtype, body = rawclient.read_message(tls)
        assert (mtype, wire.auth_code(body)) == (b"R", wire.AUTH_CLEARTEXT_PASSWORD), body
        tls.sendall(rawclient.password_message(password) + pipelined)
        while True:
            mtype, body = rawclient.read_message(tls)
            if mtype == b"E":
                return wire.parse_error_fields(body)
            if mtype == b"Z":
                return {"ready": True}


async def until(check: Any, timeout: float = 10.0) -> None:
    """Poll C{check} on the reactor until it is true."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout}s: {check}")
        d: defer.Deferred[None] = defer.Deferred()
        reactor.callLater(0.02, d.callback, None)
        await d


async def until_threads_idle(threads: DerivationThreads) -> None:
    """Until no SCRAM derivation is running in C{threads}."""
    await until(lambda: not threads.working, timeout=30)


# ---------------------------------------------------------------------------
# 7. Key derivation off the reactor thread


@pytest_twisted.ensureDeferred
async def test_huge_iteration_count_refused_without_stalling(pki, tmp_path):
    """
    A hostile server asks for 10 million iterations (scramp's own cap; old
    code computed them on the reactor thread, stalling every route for
    seconds). Refused at once with 28000; the reactor never stops.
    """
    fake = FakeScramBackend(pki, 10_000_000)
    try:
        async with running(tmp_path, [route(pki, fake)]) as proxy:
            with ReactorWatch() as watch:
                fields = await in_thread(raw_login, proxy.port(), pki, "secret")
            assert fatal_of(fields) == (
                "28000",
                'pgtls route "app": backend asked for 10000000 SCRAM iterations, more than'
                " backend.max_scram_iterations = 100000",
            )
            assert watch.worst < 0.5
            (conn,) = fake.connections
            await conn.closed
            assert conn.received == [b"p"]  # client-first only: nothing derived
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_allowed_derivation_runs_off_the_reactor(pki, tmp_path):
    """
    Within a raised limit, 3 million iterations take the better part of a
    second of PBKDF2: in a thread, while the reactor keeps ticking; the
    login then completes (the fake checks the proof).
    """
    fake = FakeScramBackend(pki, 3_000_000)
    table = route(pki, fake, backend={"max_scram_iterations": 10_000_000})
    try:
        async with running(tmp_path, [table]) as proxy:
            started = time.monotonic()
            with ReactorWatch() as watch:
                assert await in_thread(raw_login, proxy.port(), pki, "secret") == {"ready": True}
            took = time.monotonic() - started
            assert watch.worst < min(0.5, took / 2), (watch.worst, took)
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_messages_wait_for_client_final(pki, tmp_path):
    """
    While the keys are derived nothing else moves: the client's Query
    pipelined behind its password reaches the server after client-final,
    and the server's eager SASLFinal/AuthenticationOk/ReadyForQuery (sent
    before client-final) are read only after it.
    """
    fake = FakeScramBackend(pki, 500_000)
    fake.eager = True
    table = route(pki, fake, backend={"max_scram_iterations": 500_000})
    try:
        async with running(tmp_path, [table]) as proxy:
            query = rawclient.query_message("SELECT 1")
            got = await in_thread(raw_login, proxy.port(), pki, "secret", pipelined=query)
            assert got == {"ready": True}
            (conn,) = fake.connections
            await until(lambda: len(conn.received) >= 3)
            assert conn.received[:3] == [b"p", b"p", b"Q"]
            assert conn.scram.clientFinal.startswith(b"c=eSws,")
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_client_leaving_during_derivation(pki, tmp_path):
    """The session ends at once; the late result is dropped without a word."""
    fake = FakeScramBackend(pki, 3_000_000)
    table = route(pki, fake, backend={"max_scram_iterations": 10_000_000})

    def log_in(port: int) -> Any:
        tls = rawclient.request_tls(rawclient.connect(port), pki.cert("ca"))
        tls.sendall(rawclient.startup_message("alice", "db"))
        rawclient.read_message(tls)
        tls.sendall(rawclient.password_message("secret"))
        return tls

    try:
        async with running(tmp_path, [table]) as proxy:
            tls = await in_thread(log_in, proxy.port())
            (client,) = proxy.route().clients
            await until(lambda: client.session._deriving)
            tls.close()
            (conn,) = fake.connections
            await conn.closed.addTimeout(2, reactor)  # long before the derivation ends
            assert client.session._deriving
            await until_threads_idle(proxy.route().backend.derivations)
            assert conn.received == [b"p"]
            assert not proxy.route().clients
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_server_leaving_during_derivation(pki, tmp_path):
    fake = FakeScramBackend(pki, 3_000_000)
    fake.closeAfterFirst = True
    table = route(pki, fake, backend={"max_scram_iterations": 10_000_000})
    try:
        async with running(tmp_path, [table]) as proxy:
            fields = await in_thread(raw_login, proxy.port(), pki, "secret")
            assert fatal_of(fields) == (
                "08006",
                'pgtls route "app": backend closed the connection unexpectedly',
            )
            await until_threads_idle(proxy.route().backend.derivations)
            assert not proxy.route().clients
    finally:
        await fake.stop()


# ---------------------------------------------------------------------------
# ServerLogin directly (the pool's service login, and the admin console's)


#: Where L{service_login}'s connectors derive SCRAM keys.
SERVICE_LOGIN_THREADS = DerivationThreads(reactor)


async def service_login(
    tmp_path: Path, table: dict[str, Any], user: str, password: str, database: str = "postgres"
) -> Any:
    """Connect as the route's backend leg does and log in with L{ServerLogin}."""
    config = parse_config({"proxy": [table]}, base_dir=tmp_path).routes[0]
    connector = BackendConnector(
        config.name,
        config.backend,
        reactor,
        Metrics(clock=reactor),
        derivations=SERVICE_LOGIN_THREADS,
    )
    leg = await connector.connect()
    result = await ServerLogin(leg, user, database, password, {}).done
    leg.close()
    return result


@pytest_twisted.ensureDeferred
async def test_service_login_derives_off_the_reactor(pki, tmp_path):
    fake = FakeScramBackend(pki, 3_000_000)
    table = route(pki, fake, backend={"max_scram_iterations": 10_000_000})
    try:
        started = time.monotonic()
        with ReactorWatch() as watch:
            result = await service_login(tmp_path, table, "svc", "secret")
        took = time.monotonic() - started
        assert result.backendKey == (1234, b"\0\0\0\1")
        assert watch.worst < min(0.5, took / 2), (watch.worst, took)
        assert fake.connections[0].scram.clientFinal.startswith(b"c=eSws,")
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_service_login_huge_iterations_refused(pki, tmp_path):
    fake = FakeScramBackend(pki, 10_000_000)
    try:
        with ReactorWatch() as watch:
            with pytest.raises(ServerLoginError) as info:
                await service_login(tmp_path, route(pki, fake), "svc", "secret")
        assert (info.value.sqlstate, info.value.message) == (
            "28000",
            "backend login failed: backend asked for 10000000 SCRAM iterations, more than"
            " backend.max_scram_iterations = 100000",
        )
        assert watch.worst < 0.5
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_service_login_server_leaving_during_derivation(pki, tmp_path):
    fake = FakeScramBackend(pki, 3_000_000)
    fake.closeAfterFirst = True
    table = route(pki, fake, backend={"max_scram_iterations": 10_000_000})
    try:
        with pytest.raises(ServerLoginError) as info:
            await service_login(tmp_path, table, "svc", "secret")
        assert (info.value.sqlstate, info.value.message) == (
            "08006",
            "backend closed the connection during login",
        )
        await until_threads_idle(SERVICE_LOGIN_THREADS)
    finally:
        await fake.stop()


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


@pytest_twisted.ensureDeferred
async def test_client_pipelining_too_much_during_scram(pki, tmp_path):
    """
    What a client pipelines behind its password waits until the session
    starts (the server expects only pgtls's SASL messages meanwhile), but
    not without bound.
    """
    fake = FakeScramBackend(pki, 3_000_000)
    table = route(pki, fake, backend={"max_scram_iterations": 10_000_000})
    # Just over the limit, so that pgtls has read it all when it refuses
    # (a close with unread data would be a reset, and the error lost).
    junk = rawclient.query_message("SELECT 1") * (MAX_HELD_DURING_LOGIN // 14 + 1)
    try:
        async with running(tmp_path, [table]) as proxy:
            fields = await in_thread(raw_login, proxy.port(), pki, "secret", pipelined=junk)
            assert fatal_of(fields) == (
                "08P01",
                "pgtls: too much data from the client before authentication completed",
            )
            (conn,) = fake.connections
            await conn.closed
            assert b"Q" not in conn.received
            await until_threads_idle(proxy.route().backend.derivations)
    finally:
        await fake.stop()
