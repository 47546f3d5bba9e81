"""
Issue 10, item 2: the admin console is authenticated by pgtls itself, over
TLS only, and does not depend on the weakest route.

Against the real C{pg_tls} cluster, whose C{pg_hba.conf} has C{trust} for
C{trust_user}: before the fix, naming that user on the console's database
opened it (and C{SHUTDOWN} stopped the proxy) without any password.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_twisted
from support import rawclient
from support.admin import psql, show
from support.dsn import admin_dsn
from support.processes import pgtls_cli
from support.proxy import route, start_proxy
from support.waiting import in_thread

from pgtls_twisted.config import ConfigError, parse_config
from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.protocol._scram import make_verifier
from pgtls_twisted.testing.cluster import (
    CERT_USER,
    MD5_PASSWORD,
    MD5_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
    TRUST_USER,
)

OPS, OPS_PASSWORD = "ops", "ops-secret"
WATCHER, WATCHER_PASSWORD = "watcher", "watcher-secret"


def password_file(tmp_path: Path, **passwords: str) -> Path:
    path = tmp_path / "admin-passwords"
    path.write_text("".join(f"{name}:{make_verifier(pw)}\n" for name, pw in passwords.items()))
    path.chmod(0o600)
    return path


def scram_admin(tmp_path: Path) -> dict[str, Any]:
    return {
        "auth": "scram",
        "users": [OPS],
        "stats_users": [WATCHER],
        "password_file": str(password_file(tmp_path, ops=OPS_PASSWORD, watcher=WATCHER_PASSWORD)),
    }


def login_transcript(port: int, ca: Path, user: str, password: str) -> list[Any]:
    """
    (Blocking.) What a client sees logging in to the console with a
    cleartext or SCRAM password: the authentication requests (codes and
    offered mechanisms, not the random parts) and the final error fields.
    """
    sock = rawclient.request_tls(rawclient.connect(port), ca)
    seen: list[Any] = []
    try:
        sock.sendall(rawclient.startup_message(user, "pgtls"))
        while True:
            mtype, body = rawclient.read_message(sock)
            if mtype == b"E":
                fields = wire.parse_error_fields(body)
                seen.append(("E", fields["S"], fields["C"], fields["M"].replace(user, "<user>")))
                return seen
            if mtype == b"Z":
                seen.append("Z")
                return seen
            if mtype != b"R":
                continue
            code = wire.auth_code(body)
            if code == wire.AUTH_CLEARTEXT_PASSWORD:
                seen.append(("R", code))
                sock.sendall(rawclient.password_message(password))
            elif code == wire.AUTH_SASL:
                seen.append(("R", code, wire.sasl_mechanisms(body)))
                from scramp import ScramClient

                client = ScramClient(["SCRAM-SHA-256"], "ignored", password)
                first = client.get_client_first().encode()
                sock.sendall(wire.sasl_initial_response("SCRAM-SHA-256", first))
                mtype, body = rawclient.read_message(sock)
                assert (mtype, wire.auth_code(body)) == (b"R", wire.AUTH_SASL_CONTINUE)
                seen.append(("R", wire.AUTH_SASL_CONTINUE))
                client.set_server_first(body[4:].decode())
                sock.sendall(wire.sasl_response(client.get_client_final().encode()))
            else:
                seen.append(("R", code))
    finally:
        sock.close()


# ---------------------------------------------------------------------------
# The trust hole, and the safe default


@pytest_twisted.ensureDeferred
async def test_a_trust_backend_does_not_open_the_console(pki, pg_tls, tmp_path):
    """
    C{trust_user} is trusted by the server's pg_hba.conf. With C{backend}
    authentication pgtls asks for a password and refuses a server that
    lets the user in without one: any password is refused, and SHUTDOWN
    cannot be reached.
    """
    proxy = start_proxy(
        [route(pki, pg_tls)], tmp_path, admin={"auth": "backend", "users": [TRUST_USER]}
    )
    try:
        dsn = admin_dsn(proxy, pki, user=TRUST_USER, password="anything")
        out, err, code = await psql(dsn, "SHUTDOWN")
        assert code != 0 and f'password authentication failed for user "{TRUST_USER}"' in err
        assert not proxy.service.draining
        # And the refusal looks exactly like a wrong password of a real admin.
        port, ca = proxy.port(), pki.cert("ca")
        trusted = await in_thread(login_transcript, port, ca, TRUST_USER, "x")
        stranger = await in_thread(login_transcript, port, ca, MD5_USER, MD5_PASSWORD)
        assert (
            trusted
            == stranger
            == [
                ("R", wire.AUTH_CLEARTEXT_PASSWORD),
                ("E", "FATAL", "28P01", 'password authentication failed for user "<user>"'),
            ]
        )
    finally:
        await proxy.stop()


def test_no_console_without_auth(tmp_path):
    """
    C{[admin]} without C{auth} is a configuration error (it used to mean
    "whatever the backend says"); without C{[admin]} there is no console.
    """
    doc = {
        "proxy": [
            {
                "listener": {
                    "bind_address": "127.0.0.1:0",
                    "server_cert": __file__,
                    "server_key": __file__,
                },
                "backend": {"address": "127.0.0.1:5432", "tls": "verify-full"},
            }
        ],
        "admin": {"users": ["ops"]},
    }
    with pytest.raises(ConfigError) as e:
        parse_config(doc)
    assert "admin.auth: missing (this key is required)" in str(e.value)


@pytest_twisted.ensureDeferred
async def test_backend_auth_only_through_a_verified_backend(pki, pg_tls, tmp_path):
    """On a route whose backend leg is not verify-full, backend authentication is refused."""
    unverified = route(pki, pg_tls, name="unverified", backend={"tls": "require"})
    proxy = start_proxy(
        [route(pki, pg_tls), unverified], tmp_path, admin={"auth": "backend", "users": [SCRAM_USER]}
    )
    try:
        out, err, code = await psql(admin_dsn(proxy, pki, "unverified"), "SHOW VERSION")
        assert code != 0 and 'whose backend.tls is "verify-full"' in err, err
        _, rows = await show(admin_dsn(proxy, pki, "app"), "VERSION")
        assert rows[0]["version"].startswith("pgtls ")
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_console_is_tls_only(pki, pg_tls, tmp_path):
    allow = route(pki, pg_tls, listener={"tls": "allow"})
    proxy = start_proxy([allow], tmp_path, admin=scram_admin(tmp_path))
    try:
        dsn = admin_dsn(proxy, pki, user=OPS, password=OPS_PASSWORD, sslmode="disable")
        out, err, code = await psql(dsn, "SHOW VERSION")
        assert code != 0 and "the admin console requires TLS" in err, err
    finally:
        await proxy.stop()


# ---------------------------------------------------------------------------
# SCRAM against a password file


@pytest_twisted.ensureDeferred
async def test_scram_console(pki, pg_tls, tmp_path):
    proxy = start_proxy([route(pki, pg_tls)], tmp_path, admin=scram_admin(tmp_path))
    try:
        # libpq 18 (psycopg's), bound to pgtls's own certificate, and
        # insisting on both.
        dsn = admin_dsn(
            proxy,
            pki,
            user=OPS,
            password=OPS_PASSWORD,
            channel_binding="require",
            require_auth="scram-sha-256",
        )

        def version() -> str:
            with psycopg.connect(dsn, autocommit=True) as conn:
                return str(conn.execute("SHOW VERSION").fetchone()[0])

        assert (await in_thread(version)).startswith("pgtls ")
        # psql (libpq 15) too.
        _, rows = await show(admin_dsn(proxy, pki, user=OPS, password=OPS_PASSWORD), "VERSION")
        assert rows[0]["version"].startswith("pgtls ")
        out, err, code = await psql(
            admin_dsn(proxy, pki, user=OPS, password="wrong"), "SHOW VERSION"
        )
        assert code != 0 and f'password authentication failed for user "{OPS}"' in err, err
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_scram_every_name_looks_alike(pki, pg_tls, tmp_path):
    """
    An admin with a wrong password, a name that exists nowhere, and a real
    PostgreSQL user with its right password: the same exchange (SASL
    offer, a challenge) and the same error.
    """
    proxy = start_proxy([route(pki, pg_tls)], tmp_path, admin=scram_admin(tmp_path))
    try:
        port, ca = proxy.port(), pki.cert("ca")
        transcripts = [
            await in_thread(login_transcript, port, ca, user, password)
            for user, password in ((OPS, "wrong"), ("nobody", "x"), (SCRAM_USER, SCRAM_PASSWORD))
        ]
        expected = [
            ("R", wire.AUTH_SASL, ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]),
            ("R", wire.AUTH_SASL_CONTINUE),
            ("E", "FATAL", "28P01", 'password authentication failed for user "<user>"'),
        ]
        assert transcripts == [expected] * 3
        assert await in_thread(login_transcript, port, ca, OPS, OPS_PASSWORD) == [
            ("R", wire.AUTH_SASL, ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]),
            ("R", wire.AUTH_SASL_CONTINUE),
            ("R", wire.AUTH_SASL_FINAL),
            ("R", wire.AUTH_OK),
            "Z",
        ]
    finally:
        await proxy.stop()


def _downgraded_login(port: int, ca: Path) -> dict[str, str]:
    """
    (Blocking.) A client that supports channel binding but was shown an
    offer without C{-PLUS} (someone in the middle removed it) says so with
    the C{y} flag: pgtls, which did offer it, must refuse.
    """
    from scramp import ScramClient

    sock = rawclient.request_tls(rawclient.connect(port), ca)
    try:
        sock.sendall(rawclient.startup_message(OPS, "pgtls"))
        mtype, body = rawclient.read_message(sock)
        assert wire.auth_code(body) == wire.AUTH_SASL
        client = ScramClient(["SCRAM-SHA-256"], "ignored", OPS_PASSWORD)
        first = "y" + client.get_client_first()[1:]
        sock.sendall(wire.sasl_initial_response("SCRAM-SHA-256", first.encode()))
        return rawclient.read_error(sock)
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_scram_downgrade_is_detected(pki, pg_tls, tmp_path):
    proxy = start_proxy([route(pki, pg_tls)], tmp_path, admin=scram_admin(tmp_path))
    try:
        fields = await in_thread(_downgraded_login, proxy.port(), pki.cert("ca"))
        assert (fields["S"], fields["C"]) == ("FATAL", "28P01")
    finally:
        await proxy.stop()


def test_admin_verifier_command(tmp_path):
    """C{python -m pgtls_twisted admin-verifier NAME} prints a line that verifies the password."""
    done = pgtls_cli("admin-verifier", "ops", input="s3cret\n", check=True)
    line = done.stdout.strip()
    assert line.startswith("ops:SCRAM-SHA-256$4096:")
    assert "s3cret" not in done.stdout + done.stderr
    path = tmp_path / "pw"
    path.write_text(line + "\n")
    from pgtls_twisted.config import read_verifiers

    verifier = read_verifiers(path)["ops"]
    from scramp import ScramMechanism

    salt, stored, server, _ = ScramMechanism().make_auth_info(
        "s3cret", iteration_count=4096, salt=verifier.salt
    )
    assert (stored, server) == (verifier.stored_key, verifier.server_key)


@pytest.mark.parametrize(
    "content, problem",
    [
        ("ops:md5abc\n", "line 1: expected SCRAM-SHA-256$"),
        ("ops\n", "line 1: expected name:SCRAM-SHA-256$"),
        (f"ops:{make_verifier('a')}\nops:{make_verifier('b')}\n", "line 2: 'ops' is listed twice"),
        ("ops:SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA\n", "line 1: not a SCRAM-SHA-256 verifier"),
    ],
)
def test_password_file_errors_never_show_the_line(tmp_path, content, problem):
    from pgtls_twisted.config import read_verifiers

    path = tmp_path / "pw"
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        read_verifiers(path)
    assert problem in str(e.value)
    assert "c2FsdA" not in str(e.value) and "md5abc" not in str(e.value)


# ---------------------------------------------------------------------------
# Roles


@pytest_twisted.ensureDeferred
async def test_stats_users_may_only_show(pki, pg_tls, tmp_path):
    proxy = start_proxy([route(pki, pg_tls)], tmp_path, admin=scram_admin(tmp_path))
    try:
        dsn = admin_dsn(proxy, pki, user=WATCHER, password=WATCHER_PASSWORD)
        for command in ("SHOW POOLS", "SHOW CLIENTS", "SHOW STATS", "SHOW CONFIG"):
            out, err, code = await psql(dsn, command)
            assert code == 0, (command, err)

        def refused(command: str) -> tuple[str | None, str]:
            with psycopg.connect(dsn, autocommit=True) as conn:
                try:
                    conn.execute(command)
                except psycopg.Error as e:
                    return e.sqlstate, str(e)
                return None, ""

        for command in ("SHUTDOWN", "RELOAD", "PAUSE", "RESUME app"):
            sqlstate, text = await in_thread(refused, command)
            assert sqlstate == "42501", (command, text)
        assert not proxy.service.draining
        assert not proxy.route().paused
        # An admin may.
        out, err, code = await psql(
            admin_dsn(proxy, pki, user=OPS, password=OPS_PASSWORD), "PAUSE", "RESUME"
        )
        assert code == 0, err
    finally:
        await proxy.stop()


# ---------------------------------------------------------------------------
# Certificates


@pytest_twisted.ensureDeferred
async def test_cert_console_needs_a_certificate_for_the_user(pki, pg_tls, tmp_path):
    """
    C{cert}: the listener's client_ca (mtls need not be on), a certificate
    from it whose CN is the user; nothing else is asked. Without a
    certificate, with a certificate from another CA, or for another name:
    one message for all.
    """
    listener = {"client_ca": str(pki.cert("client_ca"))}
    proxy = start_proxy(
        [route(pki, pg_tls, listener=listener), route(pki, pg_tls, name="no_ca")],
        tmp_path,
        admin={"auth": "cert", "users": [CERT_USER]},
    )
    try:
        good = {"sslcert": pki.cert("client"), "sslkey": pki.key("client")}
        _, rows = await show(
            admin_dsn(proxy, pki, "app", user=CERT_USER, password=None, **good), "VERSION"
        )
        assert rows[0]["version"].startswith("pgtls ")
        expected = f'pgtls: certificate authentication failed for user "{CERT_USER}"'
        others = [
            {"sslcert": pki.cert(name), "sslkey": pki.key(name)}
            for name in ("client_other_ca", "client_wrong_user")
        ]
        attempts = [
            admin_dsn(proxy, pki, "app", user=CERT_USER, password=None, **tls)
            for tls in ({}, *others)
        ]
        attempts.append(admin_dsn(proxy, pki, "no_ca", user=CERT_USER, password=None, **good))
        for dsn in attempts:
            out, err, code = await psql(dsn, "SHOW VERSION")
            assert code != 0 and expected in err, (dsn, err)
    finally:
        await proxy.stop()


def test_password_file_must_not_be_readable_by_others(tmp_path):
    path = password_file(tmp_path, ops="pw")
    path.chmod(0o644)
    doc = {
        "proxy": [
            {
                "listener": {
                    "bind_address": "127.0.0.1:0",
                    "server_cert": __file__,
                    "server_key": str(path),
                },
                "backend": {"address": "127.0.0.1:5432", "tls": "verify-full"},
            }
        ],
        "admin": {"auth": "scram", "users": ["ops"], "password_file": str(path)},
    }
    with pytest.raises(ConfigError) as e:
        parse_config(doc)
    assert f'admin.password_file: file "{path}" has group or world access' in str(e.value)


def _salt(port: int, ca: Path, user: str) -> bytes:
    """(Blocking.) The salt of the SCRAM server-first-message pgtls sends C{user}."""
    import base64

    from scramp import ScramClient

    sock = rawclient.request_tls(rawclient.connect(port), ca)
    try:
        sock.sendall(rawclient.startup_message(user, "pgtls"))
        rawclient.read_message(sock)  # AuthenticationSASL
        client = ScramClient(["SCRAM-SHA-256"], "ignored", "x")
        sock.sendall(
            wire.sasl_initial_response("SCRAM-SHA-256", client.get_client_first().encode())
        )
        _, body = rawclient.read_message(sock)
        fields = dict(part.split("=", 1) for part in body[4:].decode().split(","))
        return base64.b64decode(fields["s"])
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_made_up_salts_are_the_same_in_every_process(pki, pg_tls, tmp_path):
    """
    A made-up verifier's salt depends on the name and the password file
    only: two processes (two workers, or one restarted) give a name that
    does not exist the same salt, as a real name's never changes, and of
    the same length as the real ones.
    """
    admin = scram_admin(tmp_path)
    first = start_proxy([route(pki, pg_tls)], tmp_path, admin=admin)
    second = start_proxy([route(pki, pg_tls, name="other")], tmp_path, admin=admin)
    try:
        ca = pki.cert("ca")
        salts = [await in_thread(_salt, p.port(), ca, "nobody") for p in (first, second)]
        real = await in_thread(_salt, first.port(), ca, OPS)
        assert salts[0] == salts[1]
        assert len(salts[0]) == len(real)
        assert await in_thread(_salt, first.port(), ca, "nobody2") != salts[0]
    finally:
        await first.stop()
        await second.stop()
