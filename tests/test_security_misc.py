"""
Issue 10, item 8, the smaller security items, against the suite's real
PostgreSQL clusters with real clients (psycopg, psql) where a real client
can do what the test needs, and raw sockets where it cannot:

 1. private keys and password files that others can read are refused, at
    load, at reload and by the certificate refresh (PostgreSQL's rule);
 2. C{pool.service_password_file}: the first line is the password;
 3. C{replication} on a pooled route: FATAL 08P01 before any backend is
    contacted; pass-through routes forward it;
 4. session-mode reset: a client that leaves mid-transaction gets its
    server connection rolled back and reset, not closed;
 5. the certificate verify callbacks find their leg through pgtls's own
    connection object, not through Twisted's app data.
"""

from __future__ import annotations

import os
import pwd
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
import pytest_twisted
from cryptography import x509
from OpenSSL import SSL
from support.admin import psql
from support.configfile import write_config
from support.dsn import app_dsn
from support.fakebackend import FakeBackend
from support.pooling import pooled_route
from support.proxy import route, running, start_from_file
from support.rawclient import connect, read_fatal, request_tls, served_serial, startup_message
from support.waiting import in_thread, until
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import eventAsText, formatEvent, globalLogPublisher

from pgtls_twisted.config import (
    BackendConfig,
    ConfigError,
    ListenerConfig,
    load_config,
    parse_config,
)
from pgtls_twisted.protocol._parameters import replication_kind
from pgtls_twisted.testing.cluster import (
    APP_DB,
    POOL_PASSWORD,
    POOL_USER,
    SCRAM_USER,
)
from pgtls_twisted.testing.pki import PKI, write_leaf
from pgtls_twisted.tls._contexts import (
    BackendTLS,
    LegConnection,
    ServerTLS,
    _record_client_verify,
    _record_server_verify,
)
from pgtls_twisted.tls._lean import TLSLayer


def error_text(events: list[dict[str, Any]]) -> str:
    return "\n".join(eventAsText(e, includeTimestamp=False) for e in events)


# ---------------------------------------------------------------------------
# 1. Private keys and password files


RULE = (
    "it must have permissions u=rw (0600) or less if owned by the user pgtls runs as,"
    " or u=rw,g=r (0640) or less if owned by root"
)

NOBODY = pwd.getpwnam("nobody").pw_uid

# (owner uid, mode, accepted). Root-owned files and files of other users can
# only be made by root (the suite's CI runs as root); otherwise the files
# are the test user's own, which the same rule covers as "not root".
if os.geteuid() == 0:
    MODES = [
        (0, 0o644, False),  # world-readable
        (0, 0o604, False),
        (0, 0o660, False),  # group-writable
        (0, 0o640, True),  # root may share a key with a group (ssl-cert)
        (0, 0o600, True),
        (NOBODY, 0o640, False),  # only root's files may be group-readable
        (NOBODY, 0o600, True),
        (NOBODY, 0o400, True),
    ]
else:  # pragma: no cover - the suite runs as root in CI
    MODES = [
        (os.geteuid(), 0o644, False),
        (os.geteuid(), 0o640, False),
        (os.geteuid(), 0o600, True),
    ]

SECRET_KEYS = ["listener.server_key", "backend.client_key", "pool.service_password_file"]


def secret_copy(pki: PKI, tmp_path: Path, key: str, uid: int, mode: int) -> Path:
    """A copy of a key (or a password file) with the given owner and mode."""
    path = tmp_path / f"secret-{key}"
    if key == "pool.service_password_file":
        path.write_text(POOL_PASSWORD + "\n")
    else:
        shutil.copy(pki.key("proxy_client" if key.startswith("backend") else "server"), path)
    if uid != os.geteuid():
        os.chown(path, uid, -1)
    path.chmod(mode)
    return path


def document(pki: PKI, key: str, secret: Path) -> dict[str, Any]:
    """A one-route configuration whose C{key} names C{secret}."""
    table: dict[str, Any] = {
        "listener": {
            "bind_address": "127.0.0.1:0",
            "server_cert": str(pki.cert("server")),
            "server_key": str(pki.key("server")),
        },
        "backend": {"address": "127.0.0.1:5432"},
    }
    section, name = key.split(".")
    if section == "backend":
        table["backend"]["client_cert"] = str(pki.cert("proxy_client"))
    if section == "pool":
        table["pool"] = {"service_user": POOL_USER}
    table.setdefault(section, {})[name] = str(secret)
    return {"proxy": [table]}


@pytest.mark.parametrize("key", SECRET_KEYS)
@pytest.mark.parametrize(("uid", "mode", "accepted"), MODES)
def test_secret_files_must_not_be_readable_by_others(pki, tmp_path, key, uid, mode, accepted):
    """PostgreSQL's rule: 0600 or less, or 0640 or less for a file of root's."""
    secret = secret_copy(pki, tmp_path, key, uid, mode)
    data = document(pki, key, secret)
    if accepted:
        parse_config(data, base_dir=tmp_path)
        return
    with pytest.raises(ConfigError) as raised:
        parse_config(data, base_dir=tmp_path)
    assert raised.value.messages == (
        f'[[proxy]] #1: {key}: file "{secret}" has group or world access'
        f" (mode {mode:04o}, owner uid {uid}); {RULE}",
    )


@pytest.mark.allow_logged_errors
@pytest_twisted.ensureDeferred
async def test_reload_refuses_a_key_made_readable_by_others(
    pki, pg_tls, tmp_path, no_logged_errors
):
    """A reload reads the files again, and a loosened key refuses it: nothing changes."""
    key = tmp_path / "server.key"
    shutil.copy(pki.key("server"), key)
    table = route(pki, pg_tls, listener={"server_key": str(key)})
    path = write_config(tmp_path / "routes.toml", [table])
    proxy = start_from_file(path)
    try:
        before = proxy.route()
        key.chmod(0o644)
        with pytest.raises(ConfigError) as raised:
            proxy.service.reloadFromFile()
        assert raised.value.messages == (
            f'{path}: [[proxy]] #1 "app": listener.server_key: file "{key}" has group or'
            f" world access (mode 0644, owner uid {os.geteuid()}); {RULE}",
        )
        assert proxy.route() is before
        assert "reload refused, nothing changed" in error_text(no_logged_errors)
        key.chmod(0o600)
        assert load_config(path).routes[0].listener.server_key == key
    finally:
        await proxy.stop()


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


@pytest.mark.allow_logged_errors
@pytest_twisted.ensureDeferred
async def test_certificate_refresh_refuses_a_key_made_readable(
    pki, pg_tls, tmp_path, no_logged_errors
):
    """
    The refresh treats a key others can read like a broken file: the last
    good context stays and an error says why. A chmod alone is noticed
    (it leaves the modification time alone), and so is a rotation whose
    new key is readable; making the key private again loads it.
    """
    own = PKI(tmp_path / "pki")
    shutil.copytree(pki.directory, own.directory)
    sans = ["DNS:localhost", "IP:127.0.0.1"]
    cert, key = write_leaf(own, "rotating", sans)
    listener = {"server_cert": str(cert), "server_key": str(key), "cert_refresh_interval": "1s"}
    ca = own.cert("ca")

    async def wait_for_error(count: int) -> str:
        await until(
            lambda: len(no_logged_errors) >= count, 3, "the loosened key reported", interval=0.1
        )
        return error_text(no_logged_errors[count - 1 : count])

    async with running(tmp_path, [route(own, pg_tls, listener=listener)]) as proxy:
        port = proxy.port()
        first = serial_of(cert)
        assert await deferToThread(served_serial, port, ca) == first

        key.chmod(0o644)
        text = await wait_for_error(1)
        assert "keeping the previous listener TLS context" in text, text
        assert f'listener server key: file "{key}" has group or world access (mode 0644' in text

        # On the reactor thread: the refresh cannot run between the writes.
        write_leaf(own, "rotating", sans)
        key.chmod(0o644)
        second = serial_of(cert)
        assert second != first
        await wait_for_error(2)
        assert await deferToThread(served_serial, port, ca) == first

        key.chmod(0o600)
        await until(
            lambda: in_thread(served_serial, port, ca).addCallback(lambda s: s == second),
            3,
            "the private key loaded again",
            interval=0.1,
        )


def test_test_pki_writes_private_keys(pki):
    """The suite's PKI (and so the demo, which uses it) writes keys 0600."""
    keys = sorted(pki.directory.glob("*.key"))
    assert keys
    assert {path.name: path.stat().st_mode & 0o777 for path in keys} == {
        path.name: 0o600 for path in keys
    }


# ---------------------------------------------------------------------------
# 2. service_password_file: the first line


def test_service_password_file_first_line_only(pki, tmp_path):
    secret = tmp_path / "pool.pw"
    secret.write_text("first\r\nsecond\n")
    secret.chmod(0o600)
    data = document(pki, "pool.service_password_file", secret)
    pool = parse_config(data, base_dir=tmp_path).routes[0].pool
    assert pool is not None and pool.service_password == "first"


@pytest_twisted.ensureDeferred
async def test_pool_logs_in_with_the_password_files_first_line(pki, pg_tls, tmp_path):
    secret = tmp_path / "pool.pw"
    secret.touch(mode=0o600)
    secret.write_text(f"{POOL_PASSWORD}\nthis line is not part of the password\n")
    table = pooled_route(pki, pg_tls, service_password_file=str(secret))
    del table["pool"]["service_password"]
    async with running(tmp_path, [table]) as proxy:

        def run() -> str:
            with psycopg.connect(app_dsn(proxy, pki), autocommit=True) as conn:
                return conn.execute("SELECT current_user").fetchone()[0]

        assert await deferToThread(run) == POOL_USER


# ---------------------------------------------------------------------------
# 3. replication


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("database", "logical"),
        ("true", "physical"),
        ("TRUE", "physical"),
        ("t", "physical"),
        ("tr", "physical"),
        ("on", "physical"),
        ("yes", "physical"),
        ("y", "physical"),
        ("1", "physical"),
        ("false", None),
        ("f", None),
        ("off", None),
        ("of", None),
        ("no", None),
        ("n", None),
        ("0", None),
        (None, None),
    ],
)
def test_replication_values_read_as_postgresql_does(value, kind):
    assert replication_kind(value) == kind


@pytest.mark.parametrize("value", ["", "o", "database ", "Database", "2", "truex", "ja", "tru\xe9"])
def test_replication_values_postgresql_refuses(value):
    with pytest.raises(ValueError):
        replication_kind(value)


def raw_fatal(port: int, ca: Path, **params: str) -> dict[str, str]:
    """TLS, a StartupMessage with C{params}, and the FATAL error that must follow."""
    with connect(port) as raw, request_tls(raw, ca) as sock:
        sock.sendall(startup_message(SCRAM_USER, APP_DB, **params))
        return read_fatal(sock)


@pytest.mark.allow_logged_errors
@pytest_twisted.ensureDeferred
async def test_pooled_route_refuses_replication_before_any_backend(pki, pg_tls, tmp_path):
    """
    psql asking for logical or physical replication gets FATAL 08P01, and
    the backend (a recorder relaying to the real server) never hears of it;
    a false value is no replication, and an invalid one gets PostgreSQL's
    own 22023.
    """
    recorder = FakeBackend(relay_to=(pg_tls.host, pg_tls.port)).start()
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)  # type: ignore[arg-type]
    try:
        async with running(tmp_path, [pooled_route(pki, recorder, "session")]) as proxy:
            name = proxy.route().name
            base = app_dsn(proxy, pki)
            for value in ("database", "true"):
                out, err, code = await psql(f"{base} replication={value}", "IDENTIFY_SYSTEM")
                assert code != 0
                assert "FATAL:  pgtls: replication connections cannot be pooled" in err, err
                assert f'Route "{name}" pools server connections' in err, err
            fields = await deferToThread(raw_fatal, proxy.port(), pki.cert("ca"), replication="on")
            assert (fields["C"], fields["M"]) == (
                "08P01",
                "pgtls: replication connections cannot be pooled",
            )
            fields = await deferToThread(raw_fatal, proxy.port(), pki.cert("ca"), replication="x")
            assert (fields["C"], fields["M"]) == (
                "22023",
                'invalid value for parameter "replication": "x"',
            )
            assert recorder.connections == []
            stats = proxy.route().metrics.stats[name]
            assert stats.refused["protocol"] == 4
            refusals = [
                formatEvent(e)
                for e in seen
                if " refused " in formatEvent(e)
                and "08P01 pgtls: replication connections cannot be pooled" in formatEvent(e)
            ]
            assert len(refusals) == 3 and f"route={name}" in refusals[0], refusals

            out, err, code = await psql(f"{base} replication=off", "SELECT current_user")
            assert (code, out.splitlines()) == (0, ["current_user", POOL_USER]), err
            assert recorder.connections
    finally:
        globalLogPublisher.removeObserver(seen.append)  # type: ignore[arg-type]
        await recorder.stop()


def ensure_replication_role(cluster: Any) -> tuple[str, str]:
    """A role allowed to replicate (the suite's roles are not), made once."""
    name, password = "pgtls_replicator", "replicator_pw"
    cluster.psql(
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}')"
        f" THEN CREATE ROLE {name} LOGIN REPLICATION; END IF; END $$;"
        " SET password_encryption = 'scram-sha-256';"
        f" ALTER ROLE {name} PASSWORD '{password}'"
    )
    return name, password


@pytest_twisted.ensureDeferred
async def test_pass_through_forwards_replication(pki, pg_tls, tmp_path):
    """
    A pass-through route forwards the parameter: psql opens a logical
    replication connection and runs IDENTIFY_SYSTEM, a walsender command;
    physical replication reaches the server, whose pg_hba.conf (which has
    no replication lines) refuses it with its own message.
    """
    user, password = await deferToThread(ensure_replication_role, pg_tls)
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        base = app_dsn(proxy, pki, user=user, password=password)
        out, err, code = await psql(f"{base} replication=database", "IDENTIFY_SYSTEM")
        assert code == 0, err
        header, row = out.splitlines()
        assert header == "systemid,timeline,xlogpos,dbname"
        assert row.endswith(f",{APP_DB}")
        out, err, code = await psql(f"{base} replication=true", "IDENTIFY_SYSTEM")
        assert code != 0
        assert "no pg_hba.conf entry for replication connection" in err, err


# ---------------------------------------------------------------------------
# 4. Session-mode reset


@pytest_twisted.ensureDeferred
async def test_session_mode_client_leaving_mid_transaction_keeps_the_connection(
    pki, pg_tls, tmp_path
):
    """
    ROLLBACK and DISCARD ALL run as two Queries: one Query of both is an
    implicit transaction, where DISCARD ALL always fails and the
    connection was closed. The next client gets the same server process,
    clean: no transaction, no temporary table, no session setting.
    """
    async with running(tmp_path, [pooled_route(pki, pg_tls, "session", max_size=1)]) as proxy:

        def leave_in_a_transaction() -> int:
            conn = psycopg.connect(app_dsn(proxy, pki), autocommit=True)
            conn.execute("CREATE TEMP TABLE mine (x int)")
            conn.execute("SET work_mem = '7MB'")
            conn.execute("BEGIN")
            conn.execute("INSERT INTO mine VALUES (1)")
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            conn.close()
            return int(pid)

        def next_client() -> tuple[Any, ...]:
            with psycopg.connect(app_dsn(proxy, pki), autocommit=True) as conn:
                row = conn.execute(
                    "SELECT pg_backend_pid(), current_setting('work_mem'),"
                    " (SELECT count(*) FROM pg_class WHERE relname = 'mine'),"
                    " now() = statement_timestamp()"
                ).fetchone()
                return (*row, conn.info.transaction_status)

        first = await deferToThread(leave_in_a_transaction)
        pid, work_mem, temp_tables, fresh_transaction, status = await deferToThread(next_client)
        assert pid == first, "the server connection was closed instead of reset"
        assert work_mem != "7MB" and temp_tables == 0 and fresh_transaction
        assert status == psycopg.pq.TransactionStatus.IDLE
        [pool] = proxy.route().pools.pools.values()
        assert pool.size == 1


# ---------------------------------------------------------------------------
# 5. The verify callbacks find their leg


def listener_config(pki: PKI, mtls: bool = True) -> ListenerConfig:
    return ListenerConfig(
        bind_address="127.0.0.1:0",
        host="127.0.0.1",
        port=0,
        server_cert=pki.cert("server"),
        server_key=pki.key("server"),
        mtls=mtls,
        client_ca=pki.cert("client_ca"),
    )


def test_connection_creators_give_the_connection_its_leg(pki):
    """Both creators copy the leg from the TLS protocol to their connection."""
    leg = SimpleNamespace(verifyError=None)
    conn = ServerTLS(listener_config(pki)).serverConnectionForTLS(SimpleNamespace(leg=leg))
    assert isinstance(conn, LegConnection) and conn.leg is leg
    backend = BackendConfig(address="127.0.0.1:5432", host="127.0.0.1", port=5432, tls="require")
    conn = BackendTLS(backend).clientConnectionForTLS(SimpleNamespace(leg=leg))
    assert isinstance(conn, LegConnection) and conn.leg is leg


def test_leg_survives_twisteds_own_app_data(pki):
    """
    Twisted's connection factory sets the app data to its TLS protocol
    after the creator returns; the leg is on the connection anyway, and
    Twisted's app data is left as Twisted made it.
    """
    clock = MemoryReactorClock()
    for creator, is_client in (
        (ServerTLS(listener_config(pki)), False),
        (
            BackendTLS(
                BackendConfig(address="127.0.0.1:5432", host="127.0.0.1", port=5432, tls="require")
            ),
            True,
        ),
    ):
        outer = Protocol()
        outer.makeConnection(StringTransport())
        tls = TLSLayer(creator, is_client, clock).attach(outer, Protocol())
        conn = tls.getHandle()
        assert isinstance(conn, LegConnection)
        assert conn.leg is outer
        assert conn.get_app_data() is tls


def test_verify_callbacks_report_to_the_leg(pki):
    leg = SimpleNamespace(verifyError=None, verification=SimpleNamespace(chain_error=None))
    conn = ServerTLS(listener_config(pki)).serverConnectionForTLS(SimpleNamespace(leg=leg))
    assert _record_client_verify(conn, None, 20, 0, 0) is True
    assert leg.verifyError == "unable to get local issuer certificate (unknown CA)"
    assert _record_server_verify(conn, None, 10, 0, 0) is False
    assert leg.verification.chain_error == "certificate has expired"


def test_client_verify_without_a_leg_fails_closed(pki):
    """
    The callback lets a failed chain through the handshake only to report
    it to the leg; with nobody to report to, it must fail the handshake,
    not forget the failure.
    """
    conn = SSL.Connection(ServerTLS(listener_config(pki)).context, None)
    assert _record_client_verify(conn, None, 20, 0, 0) is False
    assert _record_client_verify(conn, None, 0, 0, 1) is True


@pytest.mark.parametrize("app_data", ["twisted", "replaced"])
@pytest_twisted.ensureDeferred
async def test_client_certificate_of_another_ca_is_refused(
    pki, pg_tls, tmp_path, monkeypatch, app_data
):
    """
    On an mtls listener a certificate from another CA passes the TLS
    handshake (the verify callback only records why it failed) and is
    refused with FATAL 28000 after it: nothing but the callback catches
    it. "replaced" runs the same with Twisted's app data not what Twisted
    sets today (as a future Twisted might store), which pgtls must not need.
    """
    if app_data == "replaced":
        original = SSL.Connection.set_app_data
        monkeypatch.setattr(
            SSL.Connection, "set_app_data", lambda self, data: original(self, object())
        )
    listener = {"mtls": True, "client_ca": str(pki.cert("client_ca"))}
    async with running(tmp_path, [route(pki, pg_tls, listener=listener)]) as proxy:

        def attempt(cert: str) -> str:
            try:
                client = app_dsn(proxy, pki, sslcert=pki.cert(cert), sslkey=pki.key(cert))
                with psycopg.connect(client) as conn:
                    return str(conn.execute("SELECT current_user").fetchone()[0])
            except psycopg.OperationalError as e:
                return str(e)

        text = await deferToThread(attempt, "client_other_ca")
        assert (
            "pgtls: client certificate refused: unable to get local issuer certificate"
            " (unknown CA)" in text
        ), text
        assert proxy.route().metrics.stats[proxy.route().name].refused["client_certificate"] == 1
        assert await deferToThread(attempt, "client") == SCRAM_USER
