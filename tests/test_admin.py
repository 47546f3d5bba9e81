"""
The admin console (issue #5, item 1), what it shows and who may use it:
psql and psycopg against pgtls itself, over the same listeners and the same
authentication as every session, in front of the suite's real PostgreSQL
cluster. The commands that change things (PAUSE, RESUME, RELOAD,
SHUTDOWN) are in test_admin_control.

Column names are PgBouncer's where the concept is the same; the values
are checked against what real clients did (transactions run, a client
queued behind a busy pool, the backend pid a session sees).
"""

from __future__ import annotations

import os
import socket

import psycopg
import pytest_twisted
from support import rawclient
from support.admin import POOLED, connect, psql, query, raw_admin_login, show, start
from support.dsn import admin_dsn, app_dsn, client_dsn
from support.proxy import route, start_proxy
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

        # Nothing secret anywhere: no password, no minted cancel key (the
        # pooled client's PID is minted; the pass-through client's is the
        # backend's own, shown as remote_pid, and no secret).
        minted = {str(pooled.info.backend_pid)}
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
        # A pass-through client is given the backend's own PID (only its
        # cancel key is pgtls's), and the console shows the same.
        assert plain.info.backend_pid == pid
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
