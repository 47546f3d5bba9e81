"""
Live reload (issue #5, item 4): SIGHUP (or L{ProxyService.reload} /
L{ProxyService.reloadFromFile} in process) re-reads the configuration.
Added routes start listening, removed ones stop accepting and drain,
changed ones take the new settings for new connections, sessions on
unchanged routes are not touched; an invalid file changes nothing and the
log says exactly what is wrong; certificates and C{log_level} reload too.

The in-process tests run the proxy on the test's reactor, with real
psycopg clients in threads; the SIGHUP tests run C{twist pgtls} as a
child process, with blocking clients.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import threading
import time
from typing import Any

import psycopg
import pytest
import pytest_twisted
from support import rawclient
from support.configfile import on_port, write_config
from support.dsn import client_dsn
from support.net import accepting, free_port, refused
from support.pooling import pooled_route
from support.processes import ProxyProcess, ran_until_signal, wait_for_port
from support.proxy import route, start_from_file
from support.rawclient import served_serial
from support.waiting import eventually, in_thread, until_in_thread

from pgtls_twisted.config import ConfigError, load_config
from pgtls_twisted.ops._logs import LogLevels
from pgtls_twisted.testing.cluster import APP_DB
from pgtls_twisted.testing.pki import write_leaf


def one(conn: psycopg.Connection, sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


def connect(port: int, pki: Any, **kwargs: Any) -> psycopg.Connection:
    return psycopg.connect(client_dsn(port, pki, **kwargs), autocommit=True)


def connect_error(port: int, pki: Any, **kwargs: Any) -> psycopg.OperationalError:
    try:
        psycopg.connect(client_dsn(port, pki, **kwargs)).close()
    except psycopg.OperationalError as e:
        return e
    raise AssertionError(f"a connection to port {port} was accepted")


def pooled(pki: Any, cluster: Any, name: str, **pool: Any) -> dict[str, Any]:
    table = pooled_route(pki, cluster, "transaction", **pool)
    table["name"] = name
    return table


def ssl_answers(socks: list[socket.socket]) -> list[Any]:
    """Send an SSLRequest on each socket: pgtls's answers (C{S}), or what went wrong."""
    out: list[Any] = []
    for sock in socks:
        try:
            sock.sendall(rawclient.SSL_REQUEST)
            out.append(sock.recv(1))
        except OSError as e:
            out.append(type(e).__name__)
        finally:
            sock.close()
    return out


def backend_alive(cluster: Any, pid: int) -> bool:
    """Whether the server process C{pid} of C{cluster} still exists."""
    return cluster.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") == "1"


@pytest.fixture
def proxies():
    """In-process proxies to stop after the test, however it ends."""
    started: list[Any] = []
    yield started
    for proxy in started:
        # Tests stop theirs (and check how); this is for the failing ones.
        if proxy.service.running:
            proxy.service.shutdown(0)


# ---------------------------------------------------------------------------
# In process: ProxyService.reload / reloadFromFile


@pytest_twisted.ensureDeferred
async def test_added_route_listens_and_unchanged_route_is_untouched(pki, pg_tls, tmp_path, proxies):
    app = route(pki, pg_tls, name="app")
    path = write_config(tmp_path / "routes.toml", [app], shutdown_timeout="0s")
    proxy = start_from_file(path)
    proxies.append(proxy)
    app_port, app_route = proxy.port("app"), proxy.route("app")
    session = await in_thread(connect, app_port, pki)
    pid = await in_thread(one, session, "SELECT pg_backend_pid()")

    added = route(pki, pg_tls, name="added")
    notes = proxy.service.reload(load_config(write_config(path, [app, added])))

    assert notes == ['route "added" added: listening on 127.0.0.1:0']
    added_port = proxy.port("added")
    assert added_port != app_port
    client = await in_thread(connect, added_port, pki)
    assert await in_thread(one, client, "SELECT current_user") == "scram_user"
    await in_thread(client.close)
    # The unchanged route: same Route, same socket, same session.
    assert proxy.route("app") is app_route
    assert proxy.port("app") == app_port
    assert await in_thread(one, session, "SELECT pg_backend_pid()") == pid
    await in_thread(session.close)
    await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_removed_pooled_route_stops_accepting_and_drains(pki, pg_tls, tmp_path, proxies):
    """
    A removed route refuses new connections at once; the session it has goes
    on (on the same pool); when that session ends, the route's pooled server
    connections are closed. The other route's session is not touched.
    """
    app = route(pki, pg_tls, name="app")
    gone = pooled(pki, pg_tls, "gone")
    path = write_config(tmp_path / "routes.toml", [app, gone], shutdown_timeout="0s")
    proxy = start_from_file(path)
    proxies.append(proxy)
    app_port, gone_port = proxy.port("app"), proxy.port("gone")
    app_route, gone_route = proxy.route("app"), proxy.route("gone")
    kept = await in_thread(connect, app_port, pki)
    kept_pid = await in_thread(one, kept, "SELECT pg_backend_pid()")
    client = await in_thread(connect, gone_port, pki, dbname=APP_DB)
    server_pid = await in_thread(one, client, "SELECT pg_backend_pid()")

    write_config(path, [app], shutdown_timeout="0s")
    notes = proxy.service.reloadFromFile()

    assert notes == ['route "gone" removed: stopped listening, its sessions go on']
    assert [r.name for r in proxy.service.liveRoutes()] == ["app", "gone"]
    await until_in_thread(lambda: refused(gone_port), 2, "the removed route refuses")
    # The open session goes on, on the retired route's own pool.
    assert await in_thread(one, client, "SELECT pg_backend_pid()") == server_pid
    assert await in_thread(one, client, "SELECT current_user") == "pool_user"
    assert gone_route in proxy.service.retired
    # Its pools are still reaped (idle_timeout, max_lifetime) while it lives on.
    assert gone_route.reaper is not None and gone_route.reaper.running
    # Sessions on the unchanged route are not touched.
    assert proxy.route("app") is app_route
    assert await in_thread(one, kept, "SELECT pg_backend_pid()") == kept_pid

    await in_thread(client.close)
    await until_in_thread(
        lambda: not backend_alive(pg_tls, server_pid), 5, "the pooled server connection closed"
    )
    assert gone_route not in proxy.service.retired
    assert not gone_route.reaper.running
    assert gone_route.pools.pools == {}
    assert [r.name for r in proxy.service.liveRoutes()] == ["app"]
    assert await in_thread(one, kept, "SELECT 1") == 1
    await in_thread(kept.close)
    await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_changed_route_applies_to_new_connections_only(
    pki, pg_tls, pg_plain, tmp_path, proxies
):
    """
    The backend and listener.max_clients change: new connections reach the
    new backend under the new limit, on the same listening socket; the
    session opened before goes on against the old backend.
    """
    app = route(pki, pg_tls, name="app", listener={"max_clients": 5})
    other = route(pki, pg_tls, name="other")
    path = write_config(tmp_path / "routes.toml", [app, other], shutdown_timeout="0s")
    proxy = start_from_file(path)
    proxies.append(proxy)
    port, old_route = proxy.port("app"), proxy.route("app")
    listener_port = old_route.port
    before = await in_thread(connect, port, pki)
    before_pid = await in_thread(one, before, "SELECT pg_backend_pid()")
    assert await in_thread(one, before, "SELECT inet_server_port()") == pg_tls.port
    bystander = await in_thread(connect, proxy.port("other"), pki)
    bystander_pid = await in_thread(one, bystander, "SELECT pg_backend_pid()")

    changed = route(pki, pg_plain, name="app", listener={"max_clients": 1})
    notes = proxy.service.reload(load_config(write_config(path, [changed, other])))
    # Clients connecting during the reload (the kernel completes their
    # handshakes before the reactor turns again) are served, not reset.
    during = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(8)]
    assert await in_thread(ssl_answers, during) == [b"S"] * len(during)

    assert notes == ['route "app" changed: new connections use the new settings']
    # Same address: the same listening socket, not a new one on the same port.
    assert proxy.port("app") == port
    new_route = proxy.route("app")
    assert new_route is not old_route and new_route.port is listener_port
    after = await in_thread(connect, port, pki)
    assert await in_thread(one, after, "SELECT inet_server_port()") == pg_plain.port
    error = await in_thread(connect_error, port, pki)
    assert 'FATAL:  pgtls: sorry, too many clients already on route "app" (max_clients = 1)' in str(
        error
    )
    # The session from before the reload is still on the old backend.
    assert await in_thread(one, before, "SELECT inet_server_port()") == pg_tls.port
    assert await in_thread(one, before, "SELECT pg_backend_pid()") == before_pid
    assert await in_thread(one, bystander, "SELECT pg_backend_pid()") == bystander_pid
    assert old_route in proxy.service.retired
    await in_thread(before.close)
    await until_in_thread(lambda: old_route not in proxy.service.retired, 5)
    for conn in (after, bystander):
        await in_thread(conn.close)
    await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_changed_bind_address_moves_the_listener(pki, pg_tls, tmp_path, proxies):
    app = route(pki, pg_tls, name="app")
    path = write_config(tmp_path / "routes.toml", [app], shutdown_timeout="0s")
    proxy = start_from_file(path)
    proxies.append(proxy)
    old_port = proxy.port("app")
    session = await in_thread(connect, old_port, pki)
    pid = await in_thread(one, session, "SELECT pg_backend_pid()")

    new_port = free_port()
    notes = proxy.service.reload(load_config(write_config(path, [on_port(app, new_port)])))

    assert notes == ['route "app" changed: new connections use the new settings']
    assert proxy.port("app") == new_port
    await until_in_thread(lambda: refused(old_port), 2, "the old address refuses")
    client = await in_thread(connect, new_port, pki)
    assert await in_thread(one, client, "SELECT 1") == 1
    assert await in_thread(one, session, "SELECT pg_backend_pid()") == pid
    for conn in (client, session):
        await in_thread(conn.close)
    await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_renamed_route_on_the_same_address(pki, pg_tls, tmp_path, proxies):
    """
    A rename on the same address hands the listening socket to the new
    route: new connections go to it, and the old route's session goes on.
    """
    port = free_port()
    old = on_port(route(pki, pg_tls, name="old-name"), port)
    path = write_config(tmp_path / "routes.toml", [old], shutdown_timeout="0s")
    proxy = start_from_file(path)
    proxies.append(proxy)
    old_route = proxy.route("old-name")
    session = await in_thread(connect, port, pki)
    pid = await in_thread(one, session, "SELECT pg_backend_pid()")

    new = on_port(route(pki, pg_tls, name="new-name"), port)
    notes = proxy.service.reload(load_config(write_config(path, [new])))

    assert notes == [
        'route "old-name" renamed "new-name": sessions go on, new connections use the new settings'
    ]
    assert proxy.port("new-name") == port
    new_route = proxy.route("new-name")
    client = await in_thread(connect, port, pki)
    assert await in_thread(one, client, "SELECT 1") == 1
    assert len(new_route.clients) == 1 and len(old_route.clients) == 1
    assert await in_thread(one, session, "SELECT pg_backend_pid()") == pid
    for conn in (client, session):
        await in_thread(conn.close)
    await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_renaming_a_route_resets_no_connection(pki, pg_tls, tmp_path, proxies):
    port = free_port()
    old = on_port(route(pki, pg_tls, name="old-name"), port)
    path = write_config(tmp_path / "routes.toml", [old], shutdown_timeout="0s")
    proxy = start_from_file(path)
    proxies.append(proxy)
    config = load_config(write_config(path, [on_port(route(pki, pg_tls, name="new-name"), port)]))

    proxy.service.reload(config)
    # Clients connecting during the reload: the kernel completes their
    # handshakes at once, before the reactor turns again.
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(16)]

    try:
        assert await in_thread(ssl_answers, socks) == [b"S"] * len(socks)
    finally:
        await proxy.stop()


def _bad_files(tmp_path, pki, pg_tls, path, case):
    """The routes of an invalid file, its text, and the exact problem lines."""
    app = route(pki, pg_tls, name="app", listener={"max_clients": 7})
    extra_port = free_port()
    extra = on_port(route(pki, pg_tls, name="extra"), extra_port)
    held = None
    if case == "toml":
        write_config(path, [app, extra])
        text = path.read_text()
        lines = text.count("\n")
        path.write_text(text + "[[proxy]\n")
        expected = [
            re.compile(
                re.escape(f"{path}: invalid TOML: ")
                + r".+ \(at line "
                + str(lines + 1)
                + r", column \d+\)"
            )
        ]
    elif case == "unknown key":
        extra["listener"]["max_client"] = 3
        write_config(path, [app, extra])
        expected = [
            f'{path}: [[proxy]] #2 "extra": listener.max_client: unknown key; did you mean "max_clients"?'
        ]
    elif case == "missing cert":
        missing = tmp_path / "missing.crt"
        extra["listener"]["server_cert"] = str(missing)
        write_config(path, [app, extra])
        expected = [
            f'{path}: [[proxy]] #2 "extra": listener.server_cert: file not found: {missing}'
        ]
    elif case == "unusable cert":
        garbage = tmp_path / "garbage.crt"
        garbage.write_text("not a certificate\n")
        extra["listener"]["server_cert"] = str(garbage)
        write_config(path, [app, extra])
        expected = [
            re.compile(
                re.escape(f'route "extra": listener server certificate {garbage}: ')
                + r".*no start line.*"
            )
        ]
    else:
        assert case == "port in use"
        held = socket.socket()
        held.bind(("127.0.0.1", extra_port))
        held.listen(1)
        write_config(path, [app, extra])
        expected = [
            re.compile(
                re.escape(f'route "extra": cannot listen on 127.0.0.1:{extra_port}: ')
                + r".*[Aa]ddress already in use.*"
            )
        ]
    return extra_port, expected, held


def _matches(expected: Any, line: str) -> bool:
    if isinstance(expected, str):
        return line == expected
    return expected.fullmatch(line) is not None


@pytest.mark.allow_logged_errors
@pytest.mark.parametrize(
    "case", ["toml", "unknown key", "missing cert", "unusable cert", "port in use"]
)
@pytest_twisted.ensureDeferred
async def test_invalid_file_changes_nothing(pki, pg_tls, tmp_path, proxies, no_logged_errors, case):
    """
    The invalid file also adds a route and changes the existing one: none of
    it is applied, the error says exactly what is wrong, and the same lines
    are logged.
    """
    from twisted.logger import formatEvent

    app = route(pki, pg_tls, name="app", listener={"max_clients": 5})
    path = write_config(tmp_path / "routes.toml", [app], shutdown_timeout="0s")
    proxy = start_from_file(path)
    proxies.append(proxy)
    port, app_route, config = proxy.port("app"), proxy.route("app"), proxy.service.config
    session = await in_thread(connect, port, pki)
    pid = await in_thread(one, session, "SELECT pg_backend_pid()")
    extra_port, expected, held = _bad_files(tmp_path, pki, pg_tls, path, case)
    try:
        with pytest.raises(ConfigError) as raised:
            proxy.service.reloadFromFile()
        problems = str(raised.value).splitlines()
        assert len(problems) == len(expected), problems
        for want, got in zip(expected, problems, strict=True):
            assert _matches(want, got), (want, got)
        logged = [formatEvent(e) for e in no_logged_errors]
        assert len(logged) == len(expected), logged
        for want, got in zip(expected, logged, strict=True):
            prefix = "reload refused, nothing changed: "
            assert got.startswith(prefix), got
            assert _matches(want, got[len(prefix) :]), (want, got)
        # Nothing changed.
        assert proxy.service.config is config
        assert list(proxy.service.groups) == ["app"]
        assert proxy.route("app") is app_route
        assert proxy.port("app") == port
        if held is None:
            assert await in_thread(refused, extra_port)
        client = await in_thread(connect, port, pki)
        assert await in_thread(one, client, "SELECT 1") == 1
        await in_thread(client.close)
        assert await in_thread(one, session, "SELECT pg_backend_pid()") == pid
    finally:
        if held is not None:
            held.close()
    await in_thread(session.close)
    await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_log_level_applies_on_reload(pki, pg_tls, tmp_path, proxies):
    from twisted.logger import formatEvent, globalLogPublisher

    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if str(event.get("log_namespace", "")).startswith("pgtls_twisted"):
            lines.append(formatEvent(event))

    app = route(pki, pg_tls, name="app")
    path = write_config(tmp_path / "routes.toml", [app], shutdown_timeout="0s")
    # The output filter twist would put in front of its observer.
    levels = LogLevels("info")
    proxy = start_from_file(path, logLevels=levels)
    proxies.append(proxy)
    port = proxy.port("app")
    observe = levels.filtered(observe)
    globalLogPublisher.addObserver(observe)
    try:
        notes = proxy.service.reload(
            load_config(write_config(path, [app], shutdown_timeout="0s", log_level="warn"))
        )
        assert notes == ["log_level is now warn"]
        del lines[:]
        quiet = await in_thread(connect, port, pki)
        await in_thread(quiet.close)
        # Warnings still get through: a plaintext client on a TLS-only listener.
        error = await in_thread(connect_error, port, pki, sslmode="disable")
        assert "this listener requires TLS" in str(error)
        assert not [line for line in lines if "session started" in line], lines
        assert [line for line in lines if "refused" in line and "28000" in line], lines

        proxy.service.reload(
            load_config(write_config(path, [app], shutdown_timeout="0s", log_level="info"))
        )
        assert any("reload: log_level is now info" in line for line in lines), lines
        loud = await in_thread(connect, port, pki)
        await in_thread(loud.close)
        assert [line for line in lines if "session started" in line], lines
    finally:
        globalLogPublisher.removeObserver(observe)
    await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_admin_settings_apply_on_reload(pki, pg_tls, tmp_path, proxies):
    app = route(pki, pg_tls, name="app")
    path = write_config(tmp_path / "routes.toml", [app], shutdown_timeout="0s")
    proxy = start_from_file(path)
    proxies.append(proxy)
    port = proxy.port("app")
    # No console yet: "pgtls" is just a database name the server does not have.
    error = await in_thread(connect_error, port, pki, dbname="pgtls")
    assert 'database "pgtls" does not exist' in str(error)

    notes = proxy.service.reload(
        load_config(
            write_config(
                path,
                [app],
                shutdown_timeout="0s",
                admin={"auth": "backend", "users": ["scram_user"]},
            )
        )
    )
    assert notes == ["admin settings changed"]
    console = await in_thread(connect, port, pki, dbname="pgtls")
    rows = await in_thread(lambda: console.execute("SHOW ROUTES").fetchall())
    assert [row[0] for row in rows] == ["app"]
    await in_thread(console.close)
    await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_reload_keeps_a_paused_route_paused(pki, pg_tls, tmp_path, proxies):
    pool = pooled(pki, pg_tls, "pool")
    path = write_config(tmp_path / "routes.toml", [pool], shutdown_timeout="0s")
    proxy = start_from_file(path)
    proxies.append(proxy)
    port = proxy.port("pool")
    proxy.service.setPaused(None, True)

    def query() -> Any:
        try:
            with connect(port, pki, dbname=APP_DB) as conn:
                return one(conn, "SELECT 42")
        except psycopg.Error as e:
            return e

    held = in_thread(query)
    await until_in_thread(lambda: proxy.route("pool")._held, 5, "the client is held")
    pool["listener"]["max_clients"] = 50
    notes = proxy.service.reload(load_config(write_config(path, [pool], shutdown_timeout="0s")))
    assert notes == ['route "pool" changed: new connections use the new settings']
    still_paused = proxy.route("pool").paused
    later = in_thread(query)
    await in_thread(time.sleep, 1.0)
    waited = {"held before the reload": not held.called, "new": not later.called}
    # Resume everything (the retired route too), so that both clients end.
    for paused_route in proxy.service.liveRoutes():
        paused_route.setPaused(False)
    results = {"held before the reload": await held, "new": await later}
    await proxy.stop()
    assert waited == {"held before the reload": True, "new": True}, results
    assert still_paused, "the reload resumed the route"
    assert results == {"held before the reload": 42, "new": 42}


# ---------------------------------------------------------------------------
# twist pgtls and SIGHUP


def _hammer(port: int, stop: threading.Event, counts: dict[str, int]) -> None:
    """
    Connect to C{port} over and over until told to stop, each time asking
    for TLS and expecting pgtls's C{S}: a connection the kernel accepted on
    a listener that then closed would be reset instead.
    """
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(rawclient.SSL_REQUEST)
                answer = sock.recv(1)
            counts["served" if answer == b"S" else "other"] += 1
        except ConnectionRefusedError:
            counts["refused"] += 1
        except OSError:
            counts["other"] += 1
        time.sleep(0.002)


def _certificate_serial(path) -> int:
    from cryptography import x509

    return int(x509.load_pem_x509_certificate(path.read_bytes()).serial_number)


def test_sighup_applies_added_removed_and_changed_routes(pki, pg_tls, tmp_path, processes):
    """
    One SIGHUP: a route added, a pooled route removed, a route changed
    (max_clients and its certificate files) on the same address, a route
    left alone. A client connecting to the changed route all along is
    never refused.
    """
    keep_port, change_port, gone_port, new_port = (free_port() for _ in range(4))
    keep = on_port(route(pki, pg_tls, name="keep"), keep_port)
    change = on_port(route(pki, pg_tls, name="change", listener={"max_clients": 100}), change_port)
    gone = on_port(pooled(pki, pg_tls, "gone"), gone_port)
    path = write_config(tmp_path / "routes.toml", [keep, change, gone], shutdown_timeout="1s")
    proc = ProxyProcess(path, tmp_path)
    processes.append(proc)
    for port in (keep_port, change_port, gone_port):
        wait_for_port(port, proc)
    k = psycopg.connect(client_dsn(keep_port, pki), autocommit=True)
    c = psycopg.connect(client_dsn(change_port, pki), autocommit=True)
    g = psycopg.connect(client_dsn(gone_port, pki, dbname=APP_DB), autocommit=True)
    k_pid, c_pid = one(k, "SELECT pg_backend_pid()"), one(c, "SELECT pg_backend_pid()")
    g_server = one(g, "SELECT pg_backend_pid()")
    keep_serial, change_serial = (
        served_serial(keep_port, pki.cert("ca")),
        served_serial(change_port, pki.cert("ca")),
    )

    new_cert, new_key = write_leaf(pki, "reload_sighup", ["DNS:localhost", "IP:127.0.0.1"])
    change["listener"].update(max_clients=50, server_cert=str(new_cert), server_key=str(new_key))
    new = on_port(route(pki, pg_tls, name="new"), new_port)
    write_config(path, [keep, change, new], shutdown_timeout="1s")
    stop, counts = threading.Event(), {"served": 0, "refused": 0, "other": 0}
    hammer = threading.Thread(target=_hammer, args=(change_port, stop, counts))
    hammer.start()
    try:
        time.sleep(0.2)
        mark = proc.mark()
        proc.signal(signal.SIGHUP)
        log = proc.wait_log('reload: route "change" changed', since=mark)
        time.sleep(0.3)
    finally:
        stop.set()
        hammer.join(10)
    assert counts["refused"] == 0 and counts["other"] == 0, counts
    assert counts["served"] > 20, counts
    log = proc.log()[mark:]
    assert "SIGHUP: re-reading the configuration" in log
    assert 'reload: route "gone" removed: stopped listening, its sessions go on' in log
    assert f'reload: route "new" added: listening on 127.0.0.1:{new_port}' in log
    assert 'reload: route "change" changed: new connections use the new settings' in log
    assert "keep" not in log

    # Added: listening. Removed: refusing.
    n = psycopg.connect(client_dsn(new_port, pki), autocommit=True)
    assert one(n, "SELECT 1") == 1
    n.close()
    eventually(lambda: refused(gone_port), 2, "the removed route refuses")
    # Changed: new certificate for new handshakes; the old session goes on.
    assert (
        served_serial(change_port, pki.cert("ca")) == _certificate_serial(new_cert) != change_serial
    )
    assert one(c, "SELECT pg_backend_pid()") == c_pid
    fresh = psycopg.connect(client_dsn(change_port, pki), autocommit=True)
    assert one(fresh, "SELECT 1") == 1
    fresh.close()
    # Unchanged: same certificate, same session.
    assert served_serial(keep_port, pki.cert("ca")) == keep_serial
    assert one(k, "SELECT pg_backend_pid()") == k_pid
    # The removed route's session goes on; when it ends, its pool is closed.
    assert one(g, "SELECT pg_backend_pid()") == g_server
    g.close()
    eventually(
        lambda: not backend_alive(pg_tls, g_server), 5, "the pool of the removed route closed"
    )
    for conn in (k, c):
        conn.close()
    proc.signal(signal.SIGTERM)
    assert ran_until_signal(proc.wait_exit(10))


@pytest.mark.parametrize("case", ["toml", "unknown key and missing cert"])
def test_sighup_with_an_invalid_file_changes_nothing(pki, pg_tls, tmp_path, processes, case):
    port, extra_port = free_port(), free_port()
    app = on_port(route(pki, pg_tls, name="app"), port)
    path = write_config(tmp_path / "routes.toml", [app], shutdown_timeout="1s")
    proc = ProxyProcess(path, tmp_path)
    processes.append(proc)
    wait_for_port(port, proc)
    session = psycopg.connect(client_dsn(port, pki), autocommit=True)
    pid = one(session, "SELECT pg_backend_pid()")
    serial = served_serial(port, pki.cert("ca"))

    # The bad file changes the app route's certificate and adds a route too.
    rotated, rotated_key = write_leaf(pki, "reload_invalid", ["DNS:localhost", "IP:127.0.0.1"])
    changed = on_port(route(pki, pg_tls, name="app"), port)
    changed["listener"].update(server_cert=str(rotated), server_key=str(rotated_key))
    extra = on_port(route(pki, pg_tls, name="extra"), extra_port)
    missing = tmp_path / "missing.key"
    if case == "toml":
        write_config(path, [changed, extra], shutdown_timeout="1s")
        path.write_text(path.read_text().replace('name = "extra"', 'name = "extra'))
        expected = [f"{path}: invalid TOML: "]
    else:
        extra["listener"]["bind_adress"] = extra["listener"].pop("bind_address")
        extra["listener"]["server_key"] = str(missing)
        write_config(path, [changed, extra], shutdown_timeout="1s")
        expected = [
            f'{path}: [[proxy]] #2 "extra": listener.bind_address: missing (this key is required)\n',
            f'{path}: [[proxy]] #2 "extra": listener.server_key: file not found: {missing}\n',
            f'{path}: [[proxy]] #2 "extra": listener.bind_adress: unknown key; did you mean "bind_address"?\n',
        ]
    mark = proc.mark()
    proc.signal(signal.SIGHUP)
    proc.wait_log("reload refused, nothing changed: ", since=mark)
    time.sleep(0.3)
    log = proc.log()[mark:]
    refusals = [
        line.split("reload refused, nothing changed: ", 1)[1] + "\n"
        for line in log.splitlines()
        if "reload refused, nothing changed: " in line
    ]
    assert len(refusals) == len(expected), log
    if case == "toml":
        assert refusals[0].startswith(expected[0]) and "(at line " in refusals[0], log
    else:
        assert sorted(refusals) == sorted(expected), log
    assert "reload:" not in log
    # Nothing changed: no new listener, the old certificate, the same session.
    assert refused(extra_port)
    assert served_serial(port, pki.cert("ca")) == serial
    assert one(session, "SELECT pg_backend_pid()") == pid
    assert proc.running()

    # Fixed, the same change applies.
    extra = on_port(route(pki, pg_tls, name="extra"), extra_port)
    write_config(path, [changed, extra], shutdown_timeout="1s")
    mark = proc.mark()
    proc.signal(signal.SIGHUP)
    proc.wait_log(f'reload: route "extra" added: listening on 127.0.0.1:{extra_port}', since=mark)
    wait_for_port(extra_port, proc, timeout=2)
    assert served_serial(port, pki.cert("ca")) == _certificate_serial(rotated)
    assert one(session, "SELECT pg_backend_pid()") == pid
    session.close()
    proc.signal(signal.SIGTERM)
    assert ran_until_signal(proc.wait_exit(10))


def test_sighup_applies_log_level(pki, pg_tls, tmp_path, processes):
    port = free_port()
    app = on_port(route(pki, pg_tls, name="app"), port)
    path = write_config(tmp_path / "routes.toml", [app], shutdown_timeout="1s")
    proc = ProxyProcess(path, tmp_path)
    processes.append(proc)
    wait_for_port(port, proc)

    def session() -> None:
        psycopg.connect(client_dsn(port, pki)).close()

    session()
    proc.wait_log("session started")

    write_config(path, [app], shutdown_timeout="1s", log_level="warn")
    mark = proc.mark()
    proc.signal(signal.SIGHUP)
    proc.wait_log("SIGHUP: re-reading the configuration", since=mark)
    session()
    # A warning still gets through, and it comes after the session above.
    try:
        psycopg.connect(client_dsn(port, pki, sslmode="disable")).close()
    except psycopg.OperationalError:
        pass
    log = proc.wait_log("28000 pgtls: this listener requires TLS", since=mark)
    assert "session started" not in log, log
    assert " open peer=" not in log, log

    write_config(path, [app], shutdown_timeout="1s", log_level="info")
    mark = proc.mark()
    proc.signal(signal.SIGHUP)
    proc.wait_log("reload: log_level is now info", since=mark)
    session()
    proc.wait_log("session started", since=mark)
    proc.signal(signal.SIGTERM)
    assert ran_until_signal(proc.wait_exit(10))


def test_sighup_reloads_certificates_with_the_configuration(pki, pg_tls, tmp_path, processes):
    """
    Certificates reload with the configuration: a SIGHUP whose file names a
    new certificate serves it; the files of an unchanged route are re-read
    too (see also test_commands.test_sighup_reloads_certificates).
    """
    certs = tmp_path / "certs"
    certs.mkdir()
    cert, key = certs / "server.crt", certs / "server.key"
    shutil.copy(pki.cert("server"), cert)
    shutil.copy(pki.key("server"), key)
    a_port, b_port = free_port(), free_port()
    a = on_port(
        route(pki, pg_tls, name="a", listener={"server_cert": str(cert), "server_key": str(key)}),
        a_port,
    )
    b = on_port(route(pki, pg_tls, name="b"), b_port)
    path = write_config(tmp_path / "routes.toml", [a, b], shutdown_timeout="1s")
    proc = ProxyProcess(path, tmp_path)
    processes.append(proc)
    wait_for_port(a_port, proc)
    wait_for_port(b_port, proc)
    a_serial, b_serial = (
        served_serial(a_port, pki.cert("ca")),
        served_serial(b_port, pki.cert("ca")),
    )

    # a: same configuration, new file contents. b: a new file, and a new limit.
    rotated_a, rotated_a_key = write_leaf(pki, "reload_files_a", ["DNS:localhost", "IP:127.0.0.1"])
    shutil.copy(rotated_a, cert)
    shutil.copy(rotated_a_key, key)
    rotated_b, rotated_b_key = write_leaf(pki, "reload_files_b", ["DNS:localhost", "IP:127.0.0.1"])
    b["listener"].update(server_cert=str(rotated_b), server_key=str(rotated_b_key), max_clients=9)
    write_config(path, [a, b], shutdown_timeout="1s")
    mark = proc.mark()
    proc.signal(signal.SIGHUP)
    proc.wait_log('reload: route "b" changed', since=mark)
    assert served_serial(a_port, pki.cert("ca")) == _certificate_serial(rotated_a) != a_serial
    assert served_serial(b_port, pki.cert("ca")) == _certificate_serial(rotated_b) != b_serial
    conn = psycopg.connect(client_dsn(b_port, pki), autocommit=True)
    assert one(conn, "SELECT 1") == 1
    conn.close()
    assert accepting(a_port)
    proc.signal(signal.SIGTERM)
    assert ran_until_signal(proc.wait_exit(10))


@pytest_twisted.ensureDeferred
async def test_a_removed_paused_route_is_resumed(pki, pg_tls, tmp_path, proxies):
    """
    Nothing could RESUME a route the file no longer names: its queued
    pooled sessions are let go instead of timing out.
    """
    gone = pooled(pki, pg_tls, "gone")
    app = route(pki, pg_tls, name="app")
    path = write_config(tmp_path / "routes.toml", [app, gone], shutdown_timeout="0s")
    proxy = start_from_file(path)
    proxies.append(proxy)
    client = await in_thread(connect, proxy.port("gone"), pki, dbname=APP_DB)
    assert await in_thread(one, client, "SELECT 1") == 1
    proxy.service.setPaused("gone", True)
    gone_route = proxy.route("gone")
    query = in_thread(one, client, "SELECT 2")
    write_config(path, [app], shutdown_timeout="0s")
    proxy.service.reloadFromFile()
    assert not gone_route.paused
    assert await query == 2
    await in_thread(client.close)
    await proxy.stop()
