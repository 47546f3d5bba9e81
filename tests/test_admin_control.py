"""
The admin console's commands that change things (issue #5, item 1):
PAUSE and RESUME hold and release new work, RELOAD re-reads the file the
proxy was started from (and refuses, changing nothing, what it cannot
apply), and SHUTDOWN stops a real C{twist pgtls} process.

As in test_admin: psql and psycopg against an in-process proxy in front
of the real cluster (L{support.admin}).
"""

from __future__ import annotations

import signal
import socket
import time

import psycopg
import pytest
import pytest_twisted
from support.admin import POOLED, connect, psql, query, raw_admin_login, show, start
from support.configfile import on_port, write_config
from support.dsn import admin_dsn, app_dsn, client_dsn
from support.net import free_port, refused
from support.pooling import pooled_route
from support.processes import ProxyProcess, wait_for_port
from support.proxy import route, start_from_file
from support.waiting import in_thread, sleep, until
from twisted.internet.threads import deferToThread

from pgtls_twisted.testing.cluster import (
    MD5_PASSWORD,
    MD5_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
)

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
