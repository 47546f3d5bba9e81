"""
End-to-end: real clients (psycopg with libpq 18, psql) through pgtls to real
PostgreSQL 15, one test per behaviour of the core issue.
"""

from __future__ import annotations

import os
import signal
import time

import psycopg
import pytest
import pytest_twisted
from support.dsn import client_dsn
from support.proxy import route, running, start_proxy
from support.waiting import sleep
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread

from pgtls_twisted.testing.cluster import (
    MD5_PASSWORD,
    MD5_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
    TRUST_USER,
)

SSL_ROW = (
    "SELECT s.ssl, current_user FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
    "WHERE pid = pg_backend_pid()"
)


def fetch(dsn, sql, *args):
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        return conn.execute(sql, *args).fetchall()


def connect_error(dsn):
    """The error message psycopg reports when connecting fails."""
    try:
        psycopg.connect(dsn, connect_timeout=10).close()
    except psycopg.OperationalError as e:
        return str(e)
    raise AssertionError("connection unexpectedly succeeded")


# -- 1, 4: TLS both ways and authentication -------------------------------------


@pytest_twisted.ensureDeferred
async def test_verify_full_scram_through_two_tls_legs(pki, pg_tls, tmp_path):
    """The default libpq client (channel_binding=prefer) logs in with SCRAM."""
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        rows = await deferToThread(fetch, client_dsn(proxy, pki, channel_binding="prefer"), SSL_ROW)
        assert rows == [(True, SCRAM_USER)]


@pytest_twisted.ensureDeferred
async def test_wrong_password_gets_the_servers_own_error(pki, pg_tls, tmp_path):
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        text = await deferToThread(connect_error, client_dsn(proxy, pki, password="wrong"))
        assert f'password authentication failed for user "{SCRAM_USER}"' in text


@pytest_twisted.ensureDeferred
async def test_md5_is_relayed_unchanged(pki, pg_tls, tmp_path):
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        rows = await deferToThread(
            fetch, client_dsn(proxy, pki, user=MD5_USER, password=MD5_PASSWORD), SSL_ROW
        )
        assert rows == [(True, MD5_USER)]
        bad = await deferToThread(
            connect_error, client_dsn(proxy, pki, user=MD5_USER, password="nope")
        )
        assert "password authentication failed" in bad


@pytest_twisted.ensureDeferred
async def test_trust_is_relayed(pki, pg_tls, tmp_path):
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        rows = await deferToThread(
            fetch, client_dsn(proxy, pki, user=TRUST_USER, password=None), SSL_ROW
        )
        assert rows == [(True, TRUST_USER)]


@pytest_twisted.ensureDeferred
async def test_plaintext_client_tls_backend_strips_plus(pki, pg_tls, tmp_path):
    """
    libpq aborts when -PLUS is offered over a plaintext connection; pgtls
    strips it, and the client logs in with plain SCRAM ('n' flag).
    """
    async with running(tmp_path, [route(pki, pg_tls, listener={"tls": "allow"})]) as proxy:
        dsn = proxy.dsn(user=SCRAM_USER, password=SCRAM_PASSWORD, sslmode="disable")
        assert await deferToThread(fetch, dsn, SSL_ROW) == [(True, SCRAM_USER)]


@pytest_twisted.ensureDeferred
async def test_tls_client_plaintext_backend_relays_scram(pki, pg_plain, tmp_path):
    """Over a plaintext backend leg the server offers no -PLUS: relayed as is."""
    async with running(tmp_path, [route(pki, pg_plain)]) as proxy:
        rows = await deferToThread(fetch, client_dsn(proxy, pki, channel_binding="prefer"), SSL_ROW)
        assert rows == [(False, SCRAM_USER)]
        bad = await deferToThread(connect_error, client_dsn(proxy, pki, password="x"))
        assert "password authentication failed" in bad


@pytest_twisted.ensureDeferred
async def test_channel_binding_require_is_refused_by_libpq(pki, pg_tls, tmp_path):
    """Documented limit: pgtls asks for a password, so binding cannot be required."""
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        text = await deferToThread(connect_error, client_dsn(proxy, pki, channel_binding="require"))
        assert "channel binding" in text


@pytest_twisted.ensureDeferred
async def test_unknown_database_error_is_relayed(pki, pg_tls, tmp_path):
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        text = await deferToThread(connect_error, client_dsn(proxy, pki, dbname="no_such_db"))
        assert 'database "no_such_db" does not exist' in text


# -- 2, 5: policy and the pump ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_plaintext_client_refused_on_require_listener(pki, pg_tls, tmp_path):
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        dsn = proxy.dsn(user=SCRAM_USER, password=SCRAM_PASSWORD, sslmode="disable")
        text = await deferToThread(connect_error, dsn)
        assert "pgtls: this listener requires TLS (sslmode=require or stronger)" in text


@pytest_twisted.ensureDeferred
async def test_close_propagates_both_ways(pki, pg_tls, tmp_path):
    proxy = start_proxy([route(pki, pg_tls)], tmp_path)
    dsn = client_dsn(proxy, pki, application_name="pgtls-close-test")
    try:

        def count():
            return int(
                pg_tls.psql(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgtls-close-test'"
                ).strip()
            )

        # The client leaves: the backend session ends.
        await deferToThread(fetch, dsn, "SELECT 1")
        for _ in range(50):
            if await deferToThread(count) == 0:
                break
            await sleep(0.1)
        assert await deferToThread(count) == 0

        # The backend is terminated: the client is told, with the server's own 57P01.
        conn = await deferToThread(psycopg.connect, dsn)
        pid = (await deferToThread(lambda: conn.execute("SELECT pg_backend_pid()").fetchone()))[0]
        await deferToThread(pg_tls.psql, f"SELECT pg_terminate_backend({pid})")

        def after():
            try:
                conn.execute("SELECT 1")
            except psycopg.OperationalError as e:
                return e
            finally:
                conn.close()

        err = await deferToThread(after)
        assert err is not None and "terminating connection due to administrator command" in str(err)
        await sleep(0.2)
        assert len(proxy.route().clients) == 0
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_tcp_nodelay_on_both_legs(pki, pg_tls, tmp_path):
    import socket

    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        conn = await deferToThread(psycopg.connect, client_dsn(proxy, pki))
        try:
            [client] = proxy.route().clients
            server = client.session.server
            for transport in (client.transport, server.transport):
                sock = transport.getHandle()
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            await deferToThread(conn.close)


@pytest_twisted.ensureDeferred
async def test_copy_from_stdin_50k_rows(pki, pg_tls, tmp_path):
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:

        def copy_in():
            with psycopg.connect(client_dsn(proxy, pki, dbname="app")) as conn:
                conn.execute("CREATE TEMP TABLE t (id int, name text)")
                with conn.cursor().copy("COPY t (id, name) FROM STDIN") as copy:
                    for i in range(50_000):
                        copy.write_row((i, f"row {i}"))
                return conn.execute("SELECT count(*), sum(id) FROM t").fetchone()

        assert await deferToThread(copy_in) == (50_000, sum(range(50_000)))


@pytest_twisted.ensureDeferred
async def test_extended_protocol_and_pipeline(pki, pg_tls, tmp_path):
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:

        def run():
            with psycopg.connect(client_dsn(proxy, pki)) as conn:
                with conn.pipeline():
                    curs = [conn.execute("SELECT %s::int * 2", (i,)) for i in range(100)]
                return [c.fetchone()[0] for c in curs]

        assert await deferToThread(run) == [i * 2 for i in range(100)]


# -- 6: cancel --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cancel_inside_tls(pki, pg_tls, tmp_path):
    """
    psycopg's cancel_safe() is libpq 17's PQcancelCreate: SSLRequest, TLS,
    then the CancelRequest inside TLS. (The legacy, plaintext PQcancel is
    tested through psql below: psycopg's cancel() holds the GIL while it
    waits, which would freeze the in-process proxy.)
    """
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        conn = await deferToThread(psycopg.connect, client_dsn(proxy, pki), autocommit=True)

        def sleep_query():
            try:
                conn.execute("SELECT pg_sleep(30)")
            except psycopg.errors.QueryCanceled as e:
                return e
            return None

        query = deferToThread(sleep_query)
        await sleep(0.5)
        await deferToThread(conn.cancel_safe)
        started = time.monotonic()
        err = await query
        assert err is not None and "canceling statement due to user request" in str(err)
        assert time.monotonic() - started < 10
        # The session goes on after the cancel.
        assert (await deferToThread(lambda: conn.execute("SELECT 42").fetchone())) == (42,)
        await deferToThread(conn.close)


@pytest_twisted.ensureDeferred
async def test_psql_ctrl_c_cancels(pki, pg_tls, tmp_path):
    """psql's SIGINT handler sends a plaintext CancelRequest (PQcancel)."""
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        from twisted.internet import protocol

        done = defer.Deferred()

        class Collect(protocol.ProcessProtocol):
            out = b""

            def outReceived(self, data):
                self.out += data

            def errReceived(self, data):
                self.out += data

            def processEnded(self, reason):
                done.callback(self.out)

        env = dict(os.environ, PGPASSWORD=SCRAM_PASSWORD)
        args = ["psql", client_dsn(proxy, pki, password=None), "-c", "SELECT pg_sleep(30)"]
        proc = reactor.spawnProcess(Collect(), "psql", args, env=env)
        await sleep(1.5)
        proc.signalProcess(signal.SIGINT)
        out = await done
        assert b"canceling statement due to user request" in out


@pytest_twisted.ensureDeferred
async def test_cancel_with_a_wrong_key_does_nothing(pki, pg_tls, tmp_path):
    from pgtls_twisted.protocol import _wire as wire

    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        conn = await deferToThread(psycopg.connect, client_dsn(proxy, pki))
        [client] = proxy.route().clients
        # The backend's own PID, which the client is given; and the
        # backend's own key, which only pgtls knows: honoured is a key
        # pgtls minted, never the server's.
        pid, real = client.session._backendKey
        assert pid == conn.info.backend_pid

        def forged_cancel(key):
            import socket

            with socket.create_connection(("127.0.0.1", proxy.port()), timeout=5) as s:
                s.sendall(wire.CancelRequest(pid, key).encode())
                return s.recv(10)

        query = deferToThread(lambda: conn.execute("SELECT pg_sleep(1.5), 'finished'").fetchone())
        await sleep(0.3)
        assert await deferToThread(forged_cancel, b"\0\0\0\0") == b""
        assert await deferToThread(forged_cancel, real) == b""
        assert (await query)[1] == "finished"
        await deferToThread(conn.close)


# -- 7: failures reach the client ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_backend_refused(pki, pg_tls, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy = start_proxy(
        [route(pki, pg_tls, name="dead", backend={"address": f"127.0.0.1:{port}"})], tmp_path
    )
    try:
        text = await deferToThread(connect_error, client_dsn(proxy, pki))
        assert 'pgtls route "dead"' in text and "connection refused" in text
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_backend_timeout(pki, pg_tls, tmp_path):
    """A backend that accepts TCP and never answers the SSLRequest."""
    from twisted.internet.protocol import Factory, Protocol

    silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    port = silent.getHost().port
    backend = {"address": f"127.0.0.1:{port}", "connect_timeout": "1s"}
    proxy = start_proxy([route(pki, pg_tls, name="slow", backend=backend)], tmp_path)
    try:
        started = time.monotonic()
        text = await deferToThread(connect_error, client_dsn(proxy, pki))
        assert 'pgtls route "slow"' in text and "timeout expired" in text
        assert time.monotonic() - started < 5
    finally:
        await proxy.stop()
        await silent.stopListening()


@pytest.mark.parametrize(
    ("cert", "mode", "expected"),
    [
        ("server_other_ca", "verify-full", "unknown CA"),
        ("server_other_ca", "verify-ca", "unknown CA"),
        ("server_expired", "verify-full", "certificate has expired"),
        (
            "server_wrong_host",
            "verify-full",
            'server certificate for "db.example.com, db2.example.com" does not match host name "localhost"',
        ),
        ("server_cn_only", "verify-full", "no subjectAltName"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_backend_verification_failures(pki, pg_tls, tmp_path, cert, mode, expected):
    from support.tlsbackend import tls_backend

    fake = tls_backend(pki, cert)
    backend = {"address": f"127.0.0.1:{fake.getHost().port}", "tls": mode}
    proxy = start_proxy([route(pki, pg_tls, name="strict", backend=backend)], tmp_path)
    try:
        text = await deferToThread(connect_error, client_dsn(proxy, pki))
        assert 'pgtls route "strict": backend TLS verification failed' in text
        assert expected in text
    finally:
        await proxy.stop()
        await fake.stopListening()


@pytest.mark.parametrize(
    ("cert", "mode"),
    [
        ("server_wrong_host", "verify-ca"),
        ("server_cn_only", "verify-ca"),
        ("server_other_ca", "require"),
        ("server_expired", "require"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_weaker_modes_accept_what_they_do_not_check(pki, pg_tls, tmp_path, cert, mode):
    """verify-ca skips the host name, require skips everything: the fake backend gets the startup."""
    from support.tlsbackend import tls_backend

    fake = tls_backend(pki, cert)
    backend = {"address": f"127.0.0.1:{fake.getHost().port}", "tls": mode}
    proxy = start_proxy([route(pki, pg_tls, backend=backend)], tmp_path)
    try:
        text = await deferToThread(connect_error, client_dsn(proxy, pki))
        # The fake answers the StartupMessage with its own FATAL.
        assert "fake backend got the startup packet" in text
    finally:
        await proxy.stop()
        await fake.stopListening()


# -- 8: logging, and two routes at once ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_open_and_close_events(pki, pg_tls, tmp_path, events):
    proxy = start_proxy([route(pki, pg_tls, name="logged")], tmp_path)
    try:
        await deferToThread(fetch, client_dsn(proxy, pki), "SELECT repeat('x', 1000)")
        for _ in range(50):
            if any("close" in (e.get("log_format") or "") for e in events):
                break
            await sleep(0.05)
    finally:
        await proxy.stop()
    opens = [e for e in events if (e.get("log_format") or "").startswith("conn={conn} open")]
    closes = [e for e in events if (e.get("log_format") or "").startswith("conn={conn} close")]
    assert opens and closes
    close = closes[0]
    assert close["conn"] == opens[0]["conn"]
    assert close["route"] == "logged" and close["peer"].startswith("127.0.0.1:")
    assert close["client_tls"]["version"] == "TLSv1.3" and close["client_tls"]["cipher"]
    assert close["backend_tls"]["version"] == "TLSv1.3"
    assert close["bytes_out"] > 1000 and close["bytes_in"] > 0
    assert close["duration"] >= 0 and close["reason"] == "client closed"
    assert close["user"] == SCRAM_USER
    # Never a password.
    assert not any(SCRAM_PASSWORD in repr(e) for e in events)


@pytest_twisted.ensureDeferred
async def test_two_routes_at_once(pki, pg_tls, pg_plain, tmp_path):
    proxy = start_proxy(
        [route(pki, pg_tls, name="tls"), route(pki, pg_plain, name="plain")], tmp_path
    )
    try:
        assert proxy.port("tls") != proxy.port("plain")
        conn_a = await deferToThread(
            psycopg.connect,
            client_dsn(proxy, pki).replace(f"port={proxy.port()}", f"port={proxy.port('tls')}"),
        )
        conn_b = await deferToThread(
            psycopg.connect,
            client_dsn(proxy, pki, "plain"),
        )
        a = await deferToThread(lambda: conn_a.execute(SSL_ROW).fetchone())
        b = await deferToThread(lambda: conn_b.execute(SSL_ROW).fetchone())
        assert a == (True, SCRAM_USER) and b == (False, SCRAM_USER)
        await deferToThread(conn_a.close)
        await deferToThread(conn_b.close)
    finally:
        await proxy.stop()


def login_error(proxy, pki, user=SCRAM_USER, password=SCRAM_PASSWORD, database="postgres"):
    """The ErrorResponse fields a raw TLS client gets when its login fails."""
    from support import rawclient

    sock = rawclient.request_tls(rawclient.connect(proxy.port()), pki.cert("ca"))
    try:
        rawclient.startup_cleartext(sock, user, password, database)
    except rawclient.ServerError as e:
        return e.fields
    finally:
        sock.close()
    raise AssertionError("login unexpectedly succeeded")


@pytest_twisted.ensureDeferred
async def test_sqlstates_of_failures(pki, pg_tls, tmp_path):
    """The SQLSTATEs (which psycopg does not expose for connection errors)."""
    import socket

    from support.tlsbackend import tls_backend

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    fake = tls_backend(pki, "server_other_ca")
    routes = [
        route(pki, pg_tls, name="ok"),
        route(pki, pg_tls, name="dead", backend={"address": f"127.0.0.1:{closed_port}"}),
        route(
            pki, pg_tls, name="untrusted", backend={"address": f"127.0.0.1:{fake.getHost().port}"}
        ),
    ]
    proxy = start_proxy(routes, tmp_path)
    try:

        class One:
            def __init__(self, name):
                self.name = name

            def port(self):
                return proxy.port(self.name)

        wrong = await deferToThread(login_error, One("ok"), pki, password="wrong")
        assert (wrong["S"], wrong["C"]) == ("FATAL", "28P01")
        nodb = await deferToThread(login_error, One("ok"), pki, database="nope")
        assert nodb["C"] == "3D000"
        dead = await deferToThread(login_error, One("dead"), pki)
        assert (dead["S"], dead["C"]) == ("FATAL", "08001")
        untrusted = await deferToThread(login_error, One("untrusted"), pki)
        assert (untrusted["S"], untrusted["C"]) == ("FATAL", "08006")
        assert "unknown CA" in untrusted["M"]
    finally:
        await proxy.stop()
        await fake.stopListening()
