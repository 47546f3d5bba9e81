"""
The admin console (issue #5, item 1): psql and psycopg against pgtls
itself, over the same listeners and the same authentication as every
session, in front of the suite's real PostgreSQL cluster.

Column names are PgBouncer's where the concept is the same; the values
are checked against what real clients did (transactions run, a client
queued behind a busy pool, the backend pid a session sees).
"""

from __future__ import annotations

import os
import signal
import socket
import time

import psycopg
import pytest
import pytest_twisted
from support import rawclient
from support.admin import psql, query, show
from support.configfile import on_port, write_config
from support.dsn import admin_dsn, app_dsn, client_dsn
from support.net import free_port, refused
from support.pooling import pooled_route
from support.processes import ProxyProcess, wait_for_port
from support.proxy import route, start_from_file, start_proxy
from support.waiting import in_thread, sleep, until
from twisted.internet.threads import deferToThread

from pgtls_twisted.testing.cluster import (
    APP_DB,
    CERT_USER,
    MD5_PASSWORD,
    MD5_USER,
    POOL_PASSWORD,
    POOL_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
)

POOLED = "pool-transaction"

POOLS_COLUMNS = [
    "database",
    "user",
    "cl_active",
    "cl_waiting",
    "sv_active",
    "sv_idle",
    "sv_used",
    "sv_login",
    "maxwait",
    "maxwait_us",
    "pool_mode",
]
CLIENTS_COLUMNS = [
    "type",
    "user",
    "database",
    "state",
    "addr",
    "port",
    "local_addr",
    "local_port",
    "connect_time",
    "request_time",
    "wait",
    "wait_us",
]
SERVERS_COLUMNS = [
    "type",
    "user",
    "database",
    "state",
    "addr",
    "port",
    "local_addr",
    "local_port",
    "connect_time",
]
STATS_COLUMNS = [
    "database",
    "total_xact_count",
    "total_query_count",
    "total_received",
    "total_sent",
    "total_xact_time",
    "total_query_time",
    "total_wait_time",
    "avg_xact_time",
    "avg_query_time",
    "avg_wait_time",
]


def local_port(conn: psycopg.Connection) -> int:
    """The client-side port of a psycopg connection (how SHOW CLIENTS sees it)."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        return int(sock.getsockname()[1])
    finally:
        sock.close()


def connect(dsn: str) -> psycopg.Connection:
    """(Blocking.) An autocommit psycopg connection."""
    return psycopg.connect(dsn, autocommit=True)


def start(pki, cluster, tmp_path, *, pool: dict | None = None, **top):
    """A pass-through route "app" and a transaction-pooled route, with the console on."""
    top.setdefault("admin", {"auth": "backend", "users": [SCRAM_USER]})
    return start_proxy(
        [route(pki, cluster), pooled_route(pki, cluster, **(pool or {}))], tmp_path, **top
    )


# ---------------------------------------------------------------------------
# SHOW


@pytest_twisted.ensureDeferred
async def test_show_commands_have_pgbouncer_columns(pki, pg_tls, tmp_path):
    proxy = start(pki, pg_tls, tmp_path)
    try:
        pooled = await in_thread(connect, app_dsn(proxy, pki, POOLED))
        plain = await in_thread(connect, client_dsn(proxy, pki, "app"))
        await in_thread(pooled.execute, "SELECT 1")
        await in_thread(plain.execute, "SELECT 1")
        dsn = admin_dsn(proxy, pki, "app")

        header, rows = await show(dsn, "ROUTES")
        assert header[:4] == ["name", "listen_addr", "listen_port", "backend"]
        assert {"pool_mode", "clients", "max_clients", "paused"} <= set(header)
        by_name = {r["name"]: r for r in rows}
        assert set(by_name) == {"app", POOLED}
        assert by_name["app"]["listen_port"] == str(proxy.port("app"))
        assert by_name[POOLED]["listen_port"] == str(proxy.port(POOLED))
        assert by_name["app"]["backend"] == f"{pg_tls.host}:{pg_tls.port}"
        assert by_name["app"]["pool_mode"] == "pass-through"
        assert by_name[POOLED]["pool_mode"] == "transaction"
        assert by_name[POOLED]["clients"] == "1"
        # The console's own connection is a client of "app".
        assert by_name["app"]["clients"] == "2"
        assert by_name["app"]["paused"] == "0"

        header, rows = await show(dsn, "POOLS")
        assert header[: len(POOLS_COLUMNS)] == POOLS_COLUMNS
        assert len(rows) == 1
        pool = rows[0]
        assert (pool["database"], pool["user"], pool["pool_mode"]) == (
            APP_DB,
            POOL_USER,
            "transaction",
        )
        assert (pool["cl_active"], pool["cl_waiting"]) == ("1", "0")
        # Between transactions the one server connection is back in the pool.
        assert (pool["sv_active"], pool["sv_idle"], pool["sv_used"], pool["sv_login"]) == (
            "0",
            "0",
            "1",
            "0",
        )

        header, rows = await show(dsn, "CLIENTS")
        assert header[: len(CLIENTS_COLUMNS)] == CLIENTS_COLUMNS
        mine = {r["port"]: r for r in rows}
        row = mine[str(await in_thread(local_port, plain))]
        assert (row["type"], row["user"], row["database"], row["state"]) == (
            "C",
            SCRAM_USER,
            "postgres",
            "active",
        )
        assert (row["addr"], row["local_port"]) == ("127.0.0.1", str(proxy.port("app")))
        assert row["tls"].startswith("TLSv1.3/")
        row = mine[str(await in_thread(local_port, pooled))]
        assert (row["user"], row["database"], row["local_port"]) == (
            SCRAM_USER,
            APP_DB,
            str(proxy.port(POOLED)),
        )

        header, rows = await show(dsn, "SERVERS")
        assert header[: len(SERVERS_COLUMNS)] == SERVERS_COLUMNS
        assert "remote_pid" in header
        users = sorted((r["user"], r["database"]) for r in rows)
        assert users == [(POOL_USER, APP_DB), (SCRAM_USER, "postgres")]
        assert all(r["type"] == "S" for r in rows)
        assert all(r["addr"] == "127.0.0.1" and r["port"] == str(pg_tls.port) for r in rows)

        header, rows = await show(dsn, "STATS")
        assert header[: len(STATS_COLUMNS)] == STATS_COLUMNS
        assert "pgtls" not in {r["database"] for r in rows}
        stats = {(r["route"], r["database"]): r for r in rows}
        assert set(stats) == {("app", "postgres"), (POOLED, APP_DB)}
        # Pass-through: bytes counted, transactions not (messages are not parsed).
        assert int(stats["app", "postgres"]["total_received"]) > 0
        assert int(stats["app", "postgres"]["total_sent"]) > 0
        assert stats["app", "postgres"]["total_xact_count"] == "0"
        assert stats[POOLED, APP_DB]["total_xact_count"] == "1"

        header, rows = await show(dsn, "CONFIG")
        assert header == ["key", "value", "default", "changeable"]
        config = {r["key"]: r for r in rows}
        assert config["admin.users"]["value"] == SCRAM_USER
        assert config[f"proxy.{POOLED}.pool.service_user"]["value"] == POOL_USER
        assert config[f"proxy.{POOLED}.pool.max_size"]["value"] == "5"
        assert config["workers"]["changeable"] == "no"

        header, rows = await show(dsn, "VERSION")
        assert header == ["version"] and len(rows) == 1
        assert rows[0]["version"].startswith("pgtls ")

        out, err, code = await psql(dsn, "SHOW HELP")
        assert code == 0, err
        for command in ("SHOW ROUTES", "RELOAD", "PAUSE", "RESUME", "SHUTDOWN"):
            assert command in err

        # The console is on every listener, pooled ones too.
        _, rows = await show(admin_dsn(proxy, pki, POOLED), "VERSION")
        assert rows[0]["version"].startswith("pgtls ")

        # Nothing secret anywhere: no password, no minted cancel key.
        minted = {str(pooled.info.backend_pid), str(plain.info.backend_pid)}
        for what in ("ROUTES", "POOLS", "CLIENTS", "SERVERS", "STATS", "CONFIG", "VERSION"):
            out, err, code = await psql(dsn, f"SHOW {what}")
            assert code == 0, err
            for secret in (POOL_PASSWORD, SCRAM_PASSWORD):
                assert secret not in out + err, (what, secret)
            assert not minted & set(out.replace("\n", ",").split(",")), what
        await in_thread(pooled.close)
        await in_thread(plain.close)
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_show_stats_counts_a_pooled_clients_transactions(pki, pg_tls, tmp_path):
    proxy = start(pki, pg_tls, tmp_path)
    try:

        def work():
            with connect(app_dsn(proxy, pki, POOLED)) as conn:
                for n in range(3):
                    conn.execute("SELECT %s::int", (n,))
                for _ in range(2):
                    with conn.transaction():
                        conn.execute("SELECT 1")

        # 3 single-statement transactions, then 2 of BEGIN; SELECT; COMMIT.
        await in_thread(work)
        dsn = admin_dsn(proxy, pki, "app")

        async def stats():
            _, rows = await show(dsn, "STATS")
            return {(r["route"], r["database"]): r for r in rows}

        rows = await stats()
        row = rows[(POOLED, APP_DB)]
        assert (row["total_xact_count"], row["total_query_count"]) == ("5", "9")
        for column in ("total_received", "total_sent", "total_xact_time", "total_query_time"):
            assert int(row[column]) > 0, column
        assert int(row["avg_xact_time"]) == int(row["total_xact_time"]) // 5
        assert int(row["avg_query_time"]) == int(row["total_query_time"]) // 9
        # Counts add up across clients.
        await in_thread(work)
        row = (await stats())[(POOLED, APP_DB)]
        assert (row["total_xact_count"], row["total_query_count"]) == ("10", "18")
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_a_queued_client_shows_as_waiting(pki, pg_tls, tmp_path):
    proxy = start(pki, pg_tls, tmp_path, pool={"max_size": 1})
    try:
        holder = await in_thread(connect, app_dsn(proxy, pki, POOLED))
        waiter = await in_thread(connect, app_dsn(proxy, pki, POOLED))
        waiter_port = await in_thread(local_port, waiter)
        holder_port = await in_thread(local_port, holder)
        await in_thread(holder.execute, "BEGIN")
        await in_thread(holder.execute, "SELECT 1")
        queued = deferToThread(lambda: waiter.execute("SELECT 42").fetchone())
        dsn = admin_dsn(proxy, pki, "app")

        async def pools():
            _, rows = await show(dsn, "POOLS")
            return rows[0] if rows and rows[0]["cl_waiting"] == "1" else None

        pool = await until(pools, fail=False)
        assert pool is not None, "the second client never showed as waiting"
        assert (pool["cl_active"], pool["cl_waiting"], pool["sv_active"]) == ("1", "1", "1")
        assert (pool["sv_idle"], pool["sv_used"]) == ("0", "0")
        _, clients = await show(dsn, "CLIENTS")
        by_port = {r["port"]: r for r in clients}
        assert by_port[str(waiter_port)]["state"] == "waiting"
        assert by_port[str(holder_port)]["state"] == "active"
        await sleep(1.1)
        _, rows = await show(dsn, "POOLS")
        assert int(rows[0]["maxwait"]) >= 1
        _, clients = await show(dsn, "CLIENTS")
        assert int({r["port"]: r for r in clients}[str(waiter_port)]["wait"]) >= 1
        _, servers = await show(dsn, "SERVERS")
        (server,) = servers
        # The busy server is linked to the client holding it.
        holder_id = by_port[str(holder_port)]["id"]
        assert (server["state"], server["link"]) == ("active", holder_id)
        assert not queued.called
        await in_thread(holder.execute, "COMMIT")
        assert await queued == (42,)
        _, rows = await show(dsn, "POOLS")
        assert (rows[0]["cl_waiting"], rows[0]["sv_active"], rows[0]["sv_used"]) == ("0", "0", "1")
        await in_thread(holder.close)
        await in_thread(waiter.close)
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_show_servers_has_the_backend_pid_the_client_sees(pki, pg_tls, tmp_path):
    proxy = start(pki, pg_tls, tmp_path, pool={"max_size": 1})
    try:
        plain = await in_thread(connect, client_dsn(proxy, pki, "app"))
        pid, port = await in_thread(
            lambda: plain.execute("SELECT pg_backend_pid(), inet_client_port()").fetchone()
        )
        client_port = await in_thread(local_port, plain)
        pooled = await in_thread(connect, app_dsn(proxy, pki, POOLED))
        (pooled_pid,) = await in_thread(
            lambda: pooled.execute("SELECT pg_backend_pid()").fetchone()
        )
        dsn = admin_dsn(proxy, pki, "app")
        _, servers = await show(dsn, "SERVERS")
        _, clients = await show(dsn, "CLIENTS")
        by_pid = {r["remote_pid"]: r for r in servers}
        # pgtls hands clients a minted cancel PID, never the backend's...
        assert plain.info.backend_pid != pid
        # ...but the console shows the real one, as the backend knows it.
        server = by_pid[str(pid)]
        assert (server["user"], server["database"], server["state"], server["route"]) == (
            SCRAM_USER,
            "postgres",
            "active",
            "app",
        )
        assert server["local_port"] == str(port)
        assert server["tls"].startswith("TLSv1.3/")
        client = {r["port"]: r for r in clients}[str(client_port)]
        assert server["link"] == client["id"]
        pooled_server = by_pid[str(pooled_pid)]
        assert (pooled_server["user"], pooled_server["database"]) == (POOL_USER, APP_DB)
        assert pooled_server["route"] == POOLED
        await in_thread(plain.close)
        await in_thread(pooled.close)

        async def gone():
            _, rows = await show(dsn, "SERVERS")
            return str(pid) not in {r["remote_pid"] for r in rows}

        assert await until(gone, fail=False), "the closed session's server is still listed"
    finally:
        await proxy.stop()


# ---------------------------------------------------------------------------
# Who may


def raw_admin_login(port, ca, user, password, **tls):
    """(Blocking.) Log in to the console with the raw client: the server error's fields, or None."""
    sock = rawclient.request_tls(rawclient.connect(port), ca, **tls)
    try:
        rawclient.startup_cleartext(sock, user, password, database="pgtls")
    except rawclient.ServerError as e:
        return e.fields
    finally:
        sock.close()
    return None


@pytest_twisted.ensureDeferred
async def test_only_admin_users_get_in(pki, pg_tls, tmp_path):
    proxy = start(pki, pg_tls, tmp_path)
    try:
        port, ca = proxy.port("app"), pki.cert("ca")
        # Not in admin.users, though the password is right: refused exactly
        # as a wrong password is (names must not be told apart).
        fields = await in_thread(raw_admin_login, port, ca, MD5_USER, MD5_PASSWORD)
        assert fields is not None
        assert (fields["S"], fields["C"]) == ("FATAL", "28P01")
        assert fields["M"] == f'password authentication failed for user "{MD5_USER}"'
        out, err, code = await psql(
            admin_dsn(proxy, pki, "app", user=MD5_USER, password=MD5_PASSWORD), "SHOW VERSION"
        )
        assert code != 0 and "password authentication failed" in err
        # An admin user with a wrong password: the backend says no.
        fields = await in_thread(raw_admin_login, port, ca, SCRAM_USER, "not-the-password")
        assert fields is not None
        assert (fields["S"], fields["C"]) == ("FATAL", "28P01")
        assert f'password authentication failed for user "{SCRAM_USER}"' in fields["M"]
        # The right password, raw client too.
        assert await in_thread(raw_admin_login, port, ca, SCRAM_USER, SCRAM_PASSWORD) is None
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_nobody_gets_in_with_empty_users(pki, pg_tls, tmp_path):
    proxy = start(pki, pg_tls, tmp_path, admin={"auth": "backend", "users": []})
    try:
        fields = await in_thread(
            raw_admin_login, proxy.port("app"), pki.cert("ca"), SCRAM_USER, SCRAM_PASSWORD
        )
        assert fields is not None and fields["C"] == "28P01"
        # And the admin database name is not passed on to the backend.
        _, rows = await in_thread(
            query, client_dsn(proxy, pki, "app", dbname="postgres"), "SELECT 1"
        )
        assert rows == [(1,)]
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_admin_by_client_certificate(pki, pg_tls, tmp_path):
    listener = {"mtls": True, "client_ca": str(pki.cert("client_ca"))}
    proxy = start_proxy(
        [route(pki, pg_tls, name="mtls", listener=listener)],
        tmp_path,
        admin={"auth": "cert", "users": [CERT_USER, SCRAM_USER]},
    )
    try:
        good = {"sslcert": pki.cert("client"), "sslkey": pki.key("client")}
        # CN cert_user = user cert_user: in, with no password at all.
        dsn = admin_dsn(proxy, pki, "mtls", user=CERT_USER, password=None, **good)
        _, rows = await show(dsn, "VERSION")
        assert rows[0]["version"].startswith("pgtls ")
        fields = await in_thread(
            raw_admin_login,
            proxy.port("mtls"),
            pki.cert("ca"),
            CERT_USER,
            "",
            cert=pki.cert("client"),
            key=pki.key("client"),
        )
        assert fields is None
        # An admin user whose name is not the certificate's CN: refused,
        # even with the right password.
        out, err, code = await psql(
            admin_dsn(proxy, pki, "mtls", user=SCRAM_USER, **good), "SHOW VERSION"
        )
        assert code != 0 and "certificate authentication failed" in err, err
        fields = await in_thread(
            raw_admin_login,
            proxy.port("mtls"),
            pki.cert("ca"),
            SCRAM_USER,
            SCRAM_PASSWORD,
            cert=pki.cert("client"),
            key=pki.key("client"),
        )
        assert fields is not None and (fields["S"], fields["C"]) == ("FATAL", "28000")
        # A certificate for someone else (CN someone_else) as cert_user.
        fields = await in_thread(
            raw_admin_login,
            proxy.port("mtls"),
            pki.cert("ca"),
            CERT_USER,
            "",
            cert=pki.cert("client_wrong_user"),
            key=pki.key("client_wrong_user"),
        )
        assert fields is not None and fields["C"] == "28000"
        assert fields["M"] == f'pgtls: certificate authentication failed for user "{CERT_USER}"'
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_the_console_follows_the_listeners_tls_policy(pki, pg_tls, tmp_path):
    proxy = start_proxy(
        [route(pki, pg_tls), route(pki, pg_tls, name="open", listener={"tls": "allow"})],
        tmp_path,
        admin={"auth": "backend", "users": [SCRAM_USER]},
    )
    try:
        # A plaintext console session on a "require" listener: refused.
        out, err, code = await psql(admin_dsn(proxy, pki, "app", sslmode="disable"), "SHOW VERSION")
        assert code != 0 and "requires TLS" in err, err
        # On an "allow" listener too: the console is TLS only, whatever
        # the listener lets sessions do (issue 10).
        out, err, code = await psql(
            admin_dsn(proxy, pki, "open", sslmode="disable"), "SHOW VERSION"
        )
        assert code != 0 and "admin console requires TLS" in err, err
        _, rows = await show(admin_dsn(proxy, pki, "open"), "CLIENTS")
        (me,) = [r for r in rows if r["database"] == "pgtls"]
        assert me["route"] == "open" and me["tls"].startswith("TLSv1.3/")
        out, err, code = await psql(admin_dsn(proxy, pki, "open", password="wrong"), "SHOW VERSION")
        assert code != 0 and "password authentication failed" in err, err
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_an_open_console_holds_no_backend_connection(pki, pg_tls, tmp_path):
    proxy = start(
        pki,
        pg_tls,
        tmp_path,
        admin={"auth": "backend", "users": [SCRAM_USER], "auth_database": APP_DB},
    )
    try:
        probe = "pgtls_admin_probe"

        async def backends():
            return int(
                await in_thread(
                    pg_tls.psql,
                    f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{probe}'",
                )
            )

        async def none_left():
            return await backends() == 0

        admin = await in_thread(connect, admin_dsn(proxy, pki, "app", application_name=probe))
        assert await until(none_left, fail=False), "the password check's connection was kept open"
        assert (await in_thread(lambda: admin.execute("SHOW VERSION").fetchone()))[0]
        await in_thread(admin.close)
        # admin.auth_database is where the password is checked.
        proxy2 = start(
            pki,
            pg_tls,
            tmp_path,
            admin={"auth": "backend", "users": [SCRAM_USER], "auth_database": "no_such_database"},
        )
        try:
            # The backend's refusal, whatever it says, is a failed password
            # check to the client (its reason is in pgtls's log).
            fields = await in_thread(
                raw_admin_login, proxy2.port("app"), pki.cert("ca"), SCRAM_USER, SCRAM_PASSWORD
            )
            assert fields is not None and fields["C"] == "28P01", fields
        finally:
            await proxy2.stop()
    finally:
        await proxy.stop()


# ---------------------------------------------------------------------------
# The protocol


@pytest_twisted.ensureDeferred
async def test_unknown_command_is_an_error_and_the_session_goes_on(pki, pg_tls, tmp_path):
    proxy = start(pki, pg_tls, tmp_path)
    try:
        dsn = admin_dsn(proxy, pki, "app")
        out, err, code = await psql(dsn, "SHOW NONSENSE", "DROP TABLE x", "SHOW VERSION")
        assert "unknown command: SHOW NONSENSE" in err
        assert "unknown command: DROP TABLE x" in err
        assert "pgtls " in out

        def run():
            with connect(dsn) as conn:
                try:
                    conn.execute("SELECT 1")
                except psycopg.errors.SyntaxError as e:
                    error = (e.sqlstate, e.diag.severity, e.diag.message_detail)
                else:
                    error = None
                return error, conn.execute("show version").fetchone()[0]

        error, version = await in_thread(run)
        assert error == ("42601", "ERROR", "try SHOW HELP")
        assert version.startswith("pgtls ")

        def raw():
            sock = rawclient.request_tls(rawclient.connect(proxy.port("app")), pki.cert("ca"))
            try:
                rawclient.startup_cleartext(sock, SCRAM_USER, SCRAM_PASSWORD, database="pgtls")
                # Like PostgreSQL: statements after a failing one are not run.
                try:
                    rawclient.simple_query(sock, "SHOW VERSION; BOGUS; SHOW ROUTES")
                except rawclient.ServerError as e:
                    failed = e.fields
                else:
                    failed = None
                empty = rawclient.simple_query(sock, ";")
                routes = rawclient.simple_query(sock, "show routes;")
                return failed, empty, routes
            finally:
                sock.close()

        failed, empty, routes = await in_thread(raw)
        assert failed is not None and (failed["S"], failed["C"]) == ("ERROR", "42601")
        assert empty == []
        assert {r[0] for r in routes} == {"app", POOLED}
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_extended_protocol_is_refused_and_the_connection_stays_usable(pki, pg_tls, tmp_path):
    proxy = start(pki, pg_tls, tmp_path)
    try:
        dsn = admin_dsn(proxy, pki, "app")

        def run():
            errors = []
            with connect(dsn) as conn:
                for attempt in (
                    lambda: conn.execute("SHOW %s", ("VERSION",)),
                    lambda: conn.execute("SHOW VERSION", prepare=True),
                    lambda: conn.execute("SHOW ROUTES", binary=True),
                ):
                    try:
                        attempt()
                    except psycopg.Error as e:
                        errors.append((e.sqlstate, e.diag.severity))
                    else:
                        errors.append(None)
                    # Still usable, with the simple protocol.
                    assert conn.execute("SHOW VERSION").fetchone()[0].startswith("pgtls ")
            return errors

        assert await in_thread(run) == [("0A000", "ERROR")] * 3
    finally:
        await proxy.stop()


# ---------------------------------------------------------------------------
# PAUSE / RESUME


@pytest_twisted.ensureDeferred
async def test_pause_holds_new_work_until_resume(pki, pg_tls, tmp_path):
    proxy = start(pki, pg_tls, tmp_path)
    try:
        dsn = admin_dsn(proxy, pki, "app")
        admin = await in_thread(connect, dsn)
        notices = []
        admin.add_notice_handler(lambda d: notices.append(d.message_primary))
        logged_in = await in_thread(connect, app_dsn(proxy, pki, POOLED))
        await in_thread(logged_in.execute, "SELECT 1")

        with pytest.raises(psycopg.errors.UndefinedObject) as info:
            await in_thread(admin.execute, "PAUSE nosuchroute")
        assert info.value.sqlstate == "42704" and "nosuchroute" in str(info.value)

        await in_thread(admin.execute, f'PAUSE "{POOLED}"')
        assert notices[-1] == f"paused: {POOLED}"
        _, rows = await show(dsn, "ROUTES")
        assert {r["name"]: r["paused"] for r in rows} == {"app": "0", POOLED: "1"}
        _, rows = await show(dsn, "POOLS")
        assert rows[0]["paused"] == "1"

        def new_client():
            with connect(app_dsn(proxy, pki, POOLED)) as conn:
                return conn.execute("SELECT 'new'").fetchone()[0]

        fresh = deferToThread(new_client)
        old = deferToThread(lambda: logged_in.execute("SELECT 'old'").fetchone()[0])
        # Pass-through "app" is not paused.
        _, rows = await in_thread(query, client_dsn(proxy, pki, "app"), "SELECT 3")
        assert rows == [(3,)]
        await sleep(1.0)
        assert not fresh.called and not old.called
        await in_thread(admin.execute, f"RESUME {POOLED}")
        assert notices[-1] == f"resumed: {POOLED}"
        assert await old == "old"
        assert await fresh == "new"

        # PAUSE without a route pauses every route; the console stays open.
        await in_thread(admin.execute, "PAUSE")
        assert notices[-1] == f"paused: app, {POOLED}"
        held = deferToThread(query, client_dsn(proxy, pki, "app"), "SELECT 4")
        _, rows = await show(dsn, "ROUTES")
        assert {r["paused"] for r in rows} == {"1"}
        await sleep(0.5)
        assert not held.called
        await in_thread(admin.execute, "RESUME")
        assert (await held)[1] == [(4,)]
        await in_thread(logged_in.close)
        await in_thread(admin.close)
    finally:
        await proxy.stop()


# ---------------------------------------------------------------------------
# RELOAD


@pytest.mark.allow_logged_errors
@pytest_twisted.ensureDeferred
async def test_reload_from_the_console(pki, pg_tls, tmp_path, no_logged_errors):
    path = tmp_path / "pgtls.toml"
    app = route(pki, pg_tls)
    write_config(path, [app], admin={"auth": "backend", "users": [SCRAM_USER]})
    proxy = start_from_file(path)
    try:
        dsn = admin_dsn(proxy, pki, "app")
        admin = await in_thread(connect, dsn)
        notices = []
        admin.add_notice_handler(lambda d: notices.append(d.message_primary))
        client = await in_thread(connect, client_dsn(proxy, pki, "app"))

        # Nothing changed: still a reload, certificates re-read.
        await in_thread(admin.execute, "RELOAD")
        assert notices == ["no route changed; certificates re-read"]

        write_config(
            path,
            [app, route(pki, pg_tls, name="extra")],
            admin={"auth": "backend", "users": [SCRAM_USER]},
        )
        notices.clear()
        await in_thread(admin.execute, "RELOAD")
        assert any('route "extra" added' in n for n in notices), notices
        _, rows = await show(dsn, "ROUTES")
        assert {r["name"] for r in rows} == {"app", "extra"}
        _, rows = await in_thread(query, client_dsn(proxy, pki, "extra"), "SELECT 5")
        assert rows == [(5,)]
        # The session on the unchanged route was not touched.
        assert (await in_thread(lambda: client.execute("SELECT 6").fetchone())) == (6,)

        # An invalid file: ERROR F0000, the problem in the DETAIL, nothing changes.
        broken = route(pki, pg_tls, name="broken", listener={"tls": "requried"})
        write_config(path, [app, broken], admin={"auth": "backend", "users": [SCRAM_USER]})
        with pytest.raises(psycopg.Error) as info:
            await in_thread(admin.execute, "RELOAD")
        error = info.value
        assert (error.sqlstate, error.diag.severity) == ("F0000", "ERROR")
        assert "not reloaded" in error.diag.message_primary
        assert 'listener.tls: expected one of "require", "allow", got "requried"' in (
            error.diag.message_detail or ""
        )
        # ...and the log says exactly what is wrong, as an error.
        (logged,) = no_logged_errors
        text = logged["log_format"].format(**logged)
        assert text.startswith("reload refused, nothing changed: ")
        assert f'{path}: [[proxy]] #2 "broken": listener.tls: expected one of' in text
        _, rows = await show(dsn, "ROUTES")
        assert {r["name"] for r in rows} == {"app", "extra"}
        _, rows = await in_thread(query, client_dsn(proxy, pki, "extra"), "SELECT 7")
        assert rows == [(7,)]
        # The console session itself goes on after the error.
        assert (await in_thread(lambda: admin.execute("SHOW VERSION").fetchone()))[0].startswith(
            "pgtls "
        )

        # Removing a route: it stops listening; a console session on it goes on.
        extra_port = proxy.port("extra")
        on_extra = await in_thread(connect, admin_dsn(proxy, pki, "extra"))
        on_extra.add_notice_handler(lambda d: notices.append(d.message_primary))
        write_config(path, [app], admin={"auth": "backend", "users": [SCRAM_USER]})
        notices.clear()
        await in_thread(on_extra.execute, "RELOAD")
        assert any('route "extra" removed' in n for n in notices), notices
        # (The socket is closed a reactor turn after the answer: a connection
        # made in between is reset, so poll.)
        assert await until(lambda: in_thread(refused, extra_port), fail=False), "still listening"
        rows = await in_thread(lambda: on_extra.execute("SHOW ROUTES").fetchall())
        states = {r[0]: r[10] for r in rows}
        assert states == {"app": "active", "extra": "retired"}
        await in_thread(on_extra.close)

        async def extra_gone():
            _, rows = await show(dsn, "ROUTES")
            return {r["name"] for r in rows} == {"app"}

        assert await until(extra_gone, fail=False)
        await in_thread(client.close)
        await in_thread(admin.close)
    finally:
        await proxy.stop()


@pytest.mark.allow_logged_errors
@pytest_twisted.ensureDeferred
async def test_reload_that_cannot_listen_changes_nothing(pki, pg_tls, tmp_path, no_logged_errors):
    path = tmp_path / "pgtls.toml"
    admin = {"auth": "backend", "users": [SCRAM_USER]}
    write_config(path, [route(pki, pg_tls)], admin=admin)
    proxy = start_from_file(path)
    busy = socket.socket()
    try:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = busy.getsockname()[1]
        write_config(
            path,
            [
                route(pki, pg_tls, listener={"max_clients": 7}),
                route(pki, pg_tls, name="second"),
                route(pki, pg_tls, name="busy", listener={"bind_address": f"127.0.0.1:{taken}"}),
            ],
            admin=admin,
        )
        dsn = admin_dsn(proxy, pki, "app")
        out, err, code = await psql(dsn, "RELOAD", "SHOW ROUTES")
        assert "configuration not reloaded" in err, err
        assert f'route "busy": cannot listen on 127.0.0.1:{taken}' in err, err
        _, rows = await show(dsn, "ROUTES")
        assert [(r["name"], r["max_clients"]) for r in rows] == [("app", "1000")]
        assert len(no_logged_errors) == 1
    finally:
        busy.close()
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_reload_changes_who_may_use_the_console(pki, pg_tls, tmp_path):
    path = tmp_path / "pgtls.toml"
    routes = [route(pki, pg_tls)]
    write_config(path, routes, admin={"auth": "backend", "users": [SCRAM_USER]})
    proxy = start_from_file(path)
    try:
        port, ca = proxy.port("app"), pki.cert("ca")
        admin = await in_thread(connect, admin_dsn(proxy, pki, "app"))
        assert (await in_thread(raw_admin_login, port, ca, MD5_USER, MD5_PASSWORD))["C"] == "28P01"
        write_config(path, routes, admin={"auth": "backend", "users": [MD5_USER]})
        notices = []
        admin.add_notice_handler(lambda d: notices.append(d.message_primary))
        await in_thread(admin.execute, "RELOAD")
        assert "admin settings changed" in notices
        assert await in_thread(raw_admin_login, port, ca, MD5_USER, MD5_PASSWORD) is None
        fields = await in_thread(raw_admin_login, port, ca, SCRAM_USER, SCRAM_PASSWORD)
        assert fields is not None and fields["C"] == "28P01"
        # Without [admin] the console's name is just a database name again.
        write_config(path, routes)
        await in_thread(admin.execute, "RELOAD")
        fields = await in_thread(raw_admin_login, port, ca, SCRAM_USER, SCRAM_PASSWORD)
        assert fields is not None and fields["C"] == "3D000", fields
        await in_thread(admin.close)
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_resume_after_a_reload_releases_clients_queued_on_the_old_route(
    pki, pg_tls, tmp_path
):
    path = tmp_path / "pgtls.toml"
    admin = {"auth": "backend", "users": [SCRAM_USER]}
    write_config(path, [pooled_route(pki, pg_tls, acquire_timeout="2s")], admin=admin)
    proxy = start_from_file(path)
    try:
        console = await in_thread(connect, admin_dsn(proxy, pki))
        client = await in_thread(connect, app_dsn(proxy, pki, POOLED))
        await in_thread(client.execute, "SELECT 1")
        await in_thread(console.execute, f"PAUSE {POOLED}")
        queued = deferToThread(lambda: client.execute("SELECT 'queued'").fetchone()[0])
        await sleep(0.3)
        assert not queued.called
        # A reload changes the paused route (a new Route for new connections);
        # the logged-in client stays on the old one, queued.
        write_config(
            path, [pooled_route(pki, pg_tls, acquire_timeout="2s", max_size=2)], admin=admin
        )
        await in_thread(console.execute, "RELOAD")
        await in_thread(console.execute, f"RESUME {POOLED}")
        started = time.monotonic()
        try:
            result = await queued
        except psycopg.Error as e:
            result = f"{e.sqlstate} {e}"
        waited = time.monotonic() - started
        assert result == "queued" and waited < 1, (result, waited)
        await in_thread(client.close)
        await in_thread(console.close)
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_a_paused_route_stays_paused_across_a_reload(pki, pg_tls, tmp_path):
    path = tmp_path / "pgtls.toml"
    admin = {"auth": "backend", "users": [SCRAM_USER]}
    write_config(path, [route(pki, pg_tls)], admin=admin)
    proxy = start_from_file(path)
    try:
        console = await in_thread(connect, admin_dsn(proxy, pki))
        await in_thread(console.execute, "PAUSE app")
        write_config(path, [route(pki, pg_tls, listener={"max_clients": 50})], admin=admin)
        await in_thread(console.execute, "RELOAD")
        rows = await in_thread(lambda: console.execute("SHOW ROUTES").fetchall())
        # The old route lives on, retired, while it has sessions (this console).
        assert [(r[0], r[9], r[10]) for r in rows] == [
            ("app", 1, "active"),
            ("app", 1, "retired"),
        ], rows
        await in_thread(console.execute, "RESUME")
        await in_thread(console.close)
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_reload_without_a_file_is_an_error(pki, pg_tls, tmp_path):
    proxy = start(pki, pg_tls, tmp_path)
    try:
        out, err, code = await psql(admin_dsn(proxy, pki, "app"), "RELOAD", "SHOW VERSION")
        assert "F0000" in err or "not reloaded" in err, err
        assert "not started from a configuration file" in err
        assert "pgtls " in out
    finally:
        await proxy.stop()


# ---------------------------------------------------------------------------
# SHUTDOWN (a real `twist pgtls` process: SHUTDOWN stops the reactor)


def test_shutdown_from_the_console(pki, pg_tls, tmp_path):
    port = free_port()
    path = write_config(
        tmp_path / "pgtls.toml",
        [on_port(route(pki, pg_tls), port)],
        admin={"auth": "backend", "users": [SCRAM_USER]},
        log_format="text",
    )
    proc = ProxyProcess(path, tmp_path, ("twist", "pgtls"))
    try:
        wait_for_port(port, proc)
        session = psycopg.connect(client_dsn(port, pki), autocommit=True)
        admin = psycopg.connect(admin_dsn(port, pki))
        admin.autocommit = True
        cur = admin.execute("SHUTDOWN")
        assert cur.statusmessage == "SHUTDOWN"
        # The process ends by itself, cleanly.
        assert proc.wait_exit(10) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
        # The open session was closed (shutdown_timeout 0s).
        with pytest.raises(psycopg.OperationalError):
            session.execute("SELECT 1")
        session.close()
        admin.close()
    finally:
        proc.stop()
        out = proc.log()
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "SHUTDOWN" in out
    assert SCRAM_PASSWORD not in out


@pytest_twisted.ensureDeferred
async def test_many_pipelined_queries_are_all_answered(pki, pg_tls, tmp_path):
    """3,000 Query messages in one write: every one answered, in order, nothing recursing."""
    proxy = start(pki, pg_tls, tmp_path)
    try:

        def raw():
            sock = rawclient.request_tls(rawclient.connect(proxy.port("app")), pki.cert("ca"))
            try:
                rawclient.startup_cleartext(sock, SCRAM_USER, SCRAM_PASSWORD, database="pgtls")
                count = 3000
                sock.sendall(rawclient.query_message("SHOW VERSION") * count)
                ready = 0
                while ready < count:
                    mtype, _ = rawclient.read_message(sock)
                    assert mtype in (b"T", b"D", b"C", b"Z"), mtype
                    ready += mtype == b"Z"
                return rawclient.simple_query(sock, "SHOW VERSION")
            finally:
                sock.close()

        rows = await in_thread(raw)
        assert rows[0][0].startswith("pgtls ")
    finally:
        await proxy.stop()
