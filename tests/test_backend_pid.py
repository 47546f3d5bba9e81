"""
Pass-through transparency: a client of a pass-through route is given the
backend's own process ID (only the secret key is pgtls's), so what an
application does with it behaves as directly against the server:
C{backend_pid} is C{pg_backend_pid()}, C{pg_terminate_backend} ends the
right session, a NOTIFY to oneself carries one's own PID, and cancels still
work. Real PostgreSQL 15 behind TLS, psycopg (libpq 18) in front over TLS,
in its default settings unless a test says otherwise; the 3.2 key format,
which PostgreSQL 15 does not speak, with a scripted backend that does.

The same across two workers is in test_workers.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
import pytest_twisted
from support.dsn import app_dsn, client_dsn
from support.fakebackend import FakeBackend, FakeConnection
from support.pooling import admin, pooled_route
from support.proxy import route, running
from support.waiting import in_thread, sleep, until

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.testing.cluster import SCRAM_PASSWORD, SCRAM_USER

#: The connection's own TLS state, as the server sees it.
SSL_OF_SELF = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


def direct_dsn(cluster: Any, pki: Any) -> str:
    """The same user straight to the server, over TLS."""
    return cluster.dsn(
        user=SCRAM_USER,
        password=SCRAM_PASSWORD,
        sslmode="verify-ca",
        sslrootcert=pki.cert("ca"),
        connect_timeout=10,
    )


@pytest.mark.parametrize(
    "protocol",
    [
        pytest.param({}, id="default"),
        # libpq 18 asks for 3.2; PostgreSQL 15 negotiates it down to 3.0.
        pytest.param({"max_protocol_version": "latest"}, id="latest"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_backend_pid_is_the_servers(pki, pg_tls, tmp_path, protocol):
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:

        def look() -> tuple[int, int, bool, bool]:
            with psycopg.connect(client_dsn(proxy, pki, **protocol)) as conn:
                (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone()
                (ssl,) = conn.execute(SSL_OF_SELF).fetchone()
                return conn.info.backend_pid, pid, conn.pgconn.ssl_in_use, ssl

        client_sees, server_says, client_tls, backend_tls = await in_thread(look)
        assert client_sees == server_says
        assert client_tls and backend_tls


@pytest_twisted.ensureDeferred
async def test_a_transaction_pool_still_mints_pids(pki, pg_tls, tmp_path):
    """A pooled client has no single backend: its PID is pgtls's."""
    async with running(tmp_path, [pooled_route(pki, pg_tls)]) as proxy:

        def look() -> tuple[int, int]:
            with psycopg.connect(app_dsn(proxy, pki)) as conn:
                conn.prepare_threshold = None
                return conn.info.backend_pid, conn.execute("SELECT pg_backend_pid()").fetchone()[0]

        client_sees, server_says = await in_thread(look)
        assert client_sees != server_says


def terminate_self(dsn: str) -> tuple[type[BaseException], str | None, bool]:
    """C{pg_terminate_backend(pg_backend_pid())}: what the client gets."""
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    except psycopg.Error as e:
        return type(e), e.sqlstate, conn.closed
    finally:
        conn.close()
    raise AssertionError("the session survived its own termination")


def terminate_by_pid(dsn: str, cluster: Any) -> tuple[bool, type[BaseException], bool]:
    """
    Another session of the same user ends this one by the PID the client
    was given (psycopg's own tests do this), then the client finds out.
    """
    victim = psycopg.connect(dsn, autocommit=True)
    pid = victim.info.backend_pid
    try:
        with psycopg.connect(dsn, autocommit=True) as other:
            (ended,) = other.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone()
        with admin(cluster) as look:
            deadline = time.monotonic() + 10
            while look.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone():
                assert time.monotonic() < deadline, f"backend {pid} still there"
                time.sleep(0.05)
        try:
            victim.execute("SELECT 1")
        except psycopg.OperationalError as e:
            return ended, type(e), victim.closed
        raise AssertionError("the terminated session still answers")
    finally:
        victim.close()


@pytest_twisted.ensureDeferred
async def test_pg_terminate_backend_as_directly_against_the_server(pki, pg_tls, tmp_path):
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        direct, through = direct_dsn(pg_tls, pki), client_dsn(proxy, pki)

        expected = await in_thread(terminate_self, direct)
        assert expected == (psycopg.errors.AdminShutdown, "57P01", True)
        assert await in_thread(terminate_self, through) == expected

        ended, error, closed = await in_thread(terminate_by_pid, direct, pg_tls)
        assert ended and closed and issubclass(error, psycopg.OperationalError)
        ended, error, closed = await in_thread(terminate_by_pid, through, pg_tls)
        # With a minted PID the server would answer false ("PID ... is
        # not a PostgreSQL backend process") and the session would live on.
        assert ended and closed and issubclass(error, psycopg.OperationalError)
        # pgtls saw its client go with its backend.
        assert await until(lambda: not proxy.route().clients, fail=False)


def notify_self(dsn: str) -> tuple[int, int, int, str]:
    """LISTEN, NOTIFY on the same channel: the sender's PID, as the client gets it."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("LISTEN pgtls_pid")
        conn.execute("NOTIFY pgtls_pid, 'hello'")
        (notify,) = list(conn.notifies(timeout=5, stop_after=1))
        (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone()
        return notify.pid, conn.info.backend_pid, pid, notify.payload


@pytest_twisted.ensureDeferred
async def test_a_notify_to_oneself_carries_ones_own_pid(pki, pg_tls, tmp_path):
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        sender, mine, server_says, payload = await in_thread(notify_self, client_dsn(proxy, pki))
        assert sender == mine == server_says and payload == "hello"


@pytest_twisted.ensureDeferred
async def test_cancel_of_pg_sleep_with_the_servers_pid(pki, pg_tls, tmp_path):
    """
    libpq 17's PQcancelCreate (psycopg's cancel_safe), inside TLS. (The
    plaintext PQcancel, psycopg's cancel(), holds the GIL while it waits,
    which would freeze this in-process proxy: it is tested across workers,
    and through psql in test_proxy.)
    """
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        conn = await in_thread(psycopg.connect, client_dsn(proxy, pki), autocommit=True)
        try:
            (pid,) = await in_thread(lambda: conn.execute("SELECT pg_backend_pid()").fetchone())
            assert conn.info.backend_pid == pid

            def sleep_query() -> BaseException | None:
                try:
                    conn.execute("SELECT pg_sleep(10)")
                except psycopg.errors.QueryCanceled as e:
                    return e
                return None

            query = in_thread(sleep_query)
            await sleep(0.5)
            started = time.monotonic()
            await in_thread(conn.cancel_safe)
            err = await query
            assert err is not None and "canceling statement due to user request" in str(err)
            assert time.monotonic() - started < 5
            assert (await in_thread(lambda: conn.execute("SELECT 42").fetchone())) == (42,)
        finally:
            await in_thread(conn.close)


@pytest.mark.parametrize("identity", ["service", "client"])
@pytest_twisted.ensureDeferred
async def test_a_session_pool_gives_its_servers_pid(pki, pg_tls, tmp_path, identity):
    """
    Session mode: the client keeps one server connection for its whole
    life, so it is told that server's process ID (cold and warm logins),
    and its cancels and NOTIFYs line up with it.
    """
    table = pooled_route(pki, pg_tls, mode="session")
    if identity == "client":
        for key in ("service_user", "service_password"):
            del table["pool"][key]
        table["pool"]["identity"] = "client"
    async with running(tmp_path, [table]) as proxy:
        dsn = app_dsn(proxy, pki)
        for _ in range(2):  # the second login is answered from the cache
            sender, mine, server_says, payload = await in_thread(notify_self, dsn)
            assert sender == mine == server_says and payload == "hello"
        conn = await in_thread(psycopg.connect, dsn, autocommit=True)
        try:

            def sleep_query() -> BaseException | None:
                try:
                    conn.execute("SELECT pg_sleep(10)")
                except psycopg.errors.QueryCanceled as e:
                    return e
                return None

            query = in_thread(sleep_query)
            await sleep(0.5)
            await in_thread(conn.cancel_safe)
            assert await query is not None
        finally:
            await in_thread(conn.close)


# -- the protocol 3.2 key format ------------------------------------------------------

#: What the scripted 3.2 server issues: its PID and a 32-byte key (PostgreSQL 18's length).
FAKE_PID = 31337
FAKE_KEY = bytes(range(100, 132))


def protocol_32_server(conn: FakeConnection, data: bytes) -> None:
    """
    A server that speaks protocol 3.2: a login as trust, a BackendKeyData
    with a 32-byte key; a CancelRequest is recorded and its connection
    closed (as PostgreSQL does once it has acted on it).
    """
    if conn.state.get("answered"):
        return
    parsed = wire.parse_startup_packet(conn.received)
    if parsed is None:
        return
    packet = parsed[0]
    conn.state["answered"] = True
    conn.state["packet"] = packet
    if isinstance(packet, wire.CancelRequest):
        conn.transport.loseConnection()  # type: ignore[union-attr]
        return
    assert isinstance(packet, wire.StartupMessage)
    status = [
        ("server_version", "18.0"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ]
    conn.write(
        wire.AUTHENTICATION_OK
        + b"".join(wire.parameter_status(k, v) for k, v in status)
        + wire.backend_key_data(FAKE_PID, FAKE_KEY)
        + wire.ready_for_query()
    )


@pytest.mark.parametrize("version", ["3.2", "latest"])
@pytest_twisted.ensureDeferred
async def test_a_protocol_32_client_gets_the_pid_and_a_long_minted_key(pki, tmp_path, version):
    """
    libpq 18 with C{max_protocol_version} asks for 3.2; the server grants
    it and issues a 32-byte key. The client is given the server's PID and
    32 bytes minted by pgtls; its cancel (inside TLS) reaches the server
    with the server's own key.
    """
    fake = FakeBackend(protocol_32_server).start()
    try:
        async with running(tmp_path, [route(pki, fake)]) as proxy:
            dsn = client_dsn(proxy, pki, max_protocol_version=version)
            conn = await in_thread(psycopg.connect, dsn, autocommit=True)
            try:
                login = fake.connections[0].state["packet"]
                assert (login.major, login.minor) == (3, 2)
                assert conn.info.full_protocol_version == 30002
                assert conn.info.backend_pid == FAKE_PID
                # The key the client was given: as long as the server's, not its.
                [(minted, _)] = proxy.route().cancels._entries[FAKE_PID]
                assert len(minted) == 32 and minted != FAKE_KEY

                await in_thread(conn.cancel_safe)
                await until(lambda: len(fake.connections) == 2)
                await fake.connections[1].closed
                cancel = fake.connections[1].state["packet"]
                assert cancel == wire.CancelRequest(FAKE_PID, FAKE_KEY)
            finally:
                await in_thread(conn.close)
    finally:
        await fake.stop()
