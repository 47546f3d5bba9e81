"""
Graceful shutdown (issue #5, item 5), through a real C{twist pgtls} (and
C{twistd}) process and its signals: SIGTERM stops accepting at once and
lets sessions finish for up to C{shutdown_timeout} (transaction-mode
clients until their transaction ends), then closes the rest with FATAL
57P01; SIGINT closes everything at once; the admin console's SHUTDOWN is
SIGTERM; SIGUSR1/SIGUSR2 pause and resume.

The proxy is a child process, so the clients are plain blocking psycopg
(and raw sockets where a client must stop half-way through its startup).
"""

from __future__ import annotations

import os
import re
import select
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import rawclient
from support.configfile import on_port, write_config
from support.dsn import client_dsn
from support.net import free_port, refused
from support.pooling import pooled_route
from support.processes import ProxyProcess, daemon, pid_alive, ran_until_signal, wait_for_port
from support.proxy import route
from support.waiting import eventually

from pgtls_twisted.testing.cluster import APP_DB, SCRAM_USER, TRUST_USER

ADMIN_SHUTDOWN = "terminating connection due to administrator command"


def start(processes, tmp_path: Path, routes: list[dict[str, Any]], **top: Any) -> ProxyProcess:
    path = write_config(tmp_path / "routes.toml", routes, **top)
    proc = ProxyProcess(path, tmp_path)
    processes.append(proc)
    for table in routes:
        wait_for_port(int(table["listener"]["bind_address"].rsplit(":", 1)[1]), proc)
    return proc


def one(conn: psycopg.Connection, sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


NOTICES: dict[int, list[tuple[str | None, str | None]]] = {}


def connect(port: int, pki: Any, **kwargs: Any) -> psycopg.Connection:
    """A client that remembers the notices it got (see L{assert_admin_shutdown})."""
    autocommit = kwargs.pop("autocommit", True)
    conn = psycopg.connect(client_dsn(port, pki, **kwargs), autocommit=autocommit)
    notices = NOTICES.setdefault(id(conn), [])
    notices.clear()
    conn.add_notice_handler(lambda d: notices.append((d.sqlstate, d.message_primary)))
    return conn


def told(conn: psycopg.Connection, timeout: float) -> bool:
    """Whether the proxy sent C{conn} something (its goodbye) within C{timeout}."""
    ready, _, _ = select.select([conn.pgconn.socket], [], [], timeout)
    return bool(ready)


def assert_admin_shutdown(conn: psycopg.Connection) -> None:
    """
    C{conn} was closed with FATAL 57P01: its next query fails with it, or,
    when libpq read the FATAL while idle (in the same read as the last
    ReadyForQuery), it handed it to the notice handler, as it does with
    PostgreSQL's own, and the next query finds the connection closed.
    """
    with pytest.raises(psycopg.OperationalError) as raised:
        conn.execute("SELECT 1")
    if raised.value.sqlstate is not None:
        assert isinstance(raised.value, psycopg.errors.AdminShutdown), repr(raised.value)
        assert ADMIN_SHUTDOWN in str(raised.value)
    else:
        assert ("57P01", ADMIN_SHUTDOWN) in NOTICES.get(id(conn), []), (
            repr(raised.value),
            NOTICES.get(id(conn)),
        )


def draining(proc: ProxyProcess, timeout: str, since: int = 0) -> None:
    """Wait for the log line that starts the drain (how many connections: whatever was open)."""
    tail = proc.wait_log("shutting down: ", since=since)
    assert re.search(r"shutting down: \d+ connections get up to " + timeout + " to finish", tail), (
        tail
    )


def refused_within(port: int, since: float, limit: float) -> float:
    """Wait until connections to C{port} are refused; how long after C{since} that was."""
    eventually(lambda: refused(port), limit + 2, f"port {port} refuses connections")
    took = time.monotonic() - since
    assert took < limit, f"still accepting {took:.2f}s after the signal"
    return took


def pooled(pki: Any, cluster: Any, port: int, mode: str = "transaction") -> dict[str, Any]:
    table = on_port(pooled_route(pki, cluster, mode), port)
    table["name"] = "pool"
    return table


# ---------------------------------------------------------------------------
# SIGTERM


def test_sigterm_stops_accepting_and_waits_for_the_session(pki, pg_tls, tmp_path, processes):
    port = free_port()
    proc = start(processes, tmp_path, [on_port(route(pki, pg_tls), port)], shutdown_timeout="20s")
    session = connect(port, pki)
    pid = one(session, "SELECT pg_backend_pid()")

    sent = proc.signal(signal.SIGTERM)
    draining(proc, "20s")
    refused_within(port, sent, 1.0)
    # The session goes on as long as it likes (well within the timeout).
    for _ in range(3):
        assert one(session, "SELECT pg_backend_pid()") == pid
        session.execute("SELECT pg_sleep(0.2)")
    assert proc.running()

    closed = time.monotonic()
    session.close()
    code = proc.wait_exit(10)
    assert time.monotonic() - closed < 3.0, "the process waited for more than its sessions"
    assert ran_until_signal(code), proc.log()
    assert "shutdown deadline" not in proc.log()


def test_sigterm_deadline_closes_the_sessions_left_with_57P01(pki, pg_tls, tmp_path, processes):
    port = free_port()
    proc = start(processes, tmp_path, [on_port(route(pki, pg_tls), port)], shutdown_timeout="2s")
    idle = connect(port, pki)
    pid = one(idle, "SELECT pg_backend_pid()")
    busy = connect(port, pki)
    one(busy, "SELECT 1")
    outcome: dict[str, Any] = {}

    def long_query() -> None:
        try:
            busy.execute("SELECT pg_sleep(4)")
            outcome["busy"] = "finished"
        except psycopg.Error as e:
            outcome["busy"] = e

    sent = proc.signal(signal.SIGTERM)
    draining(proc, "2s")
    worker = threading.Thread(target=long_query)
    worker.start()
    time.sleep(0.3)
    assert one(idle, "SELECT pg_backend_pid()") == pid  # still served
    assert told(idle, 5.0), "the idle session was not told anything"
    told_after = time.monotonic() - sent
    assert 1.8 < told_after < 3.5, told_after
    assert_admin_shutdown(idle)
    worker.join(10)
    # Mid-query at the deadline: cut (a FATAL would land in the middle of
    # the server's messages), but cut.
    assert isinstance(outcome.get("busy"), psycopg.OperationalError), outcome
    code = proc.wait_exit(5)
    assert ran_until_signal(code), proc.log()
    assert time.monotonic() - sent < 5.0
    assert re.search(r"shutdown deadline: closing \d+ remaining connections \(57P01\)", proc.log())


def test_sigterm_lets_a_transaction_mode_client_finish_its_transaction(
    pki, pg_tls, tmp_path, processes
):
    """
    In transaction mode a client inside a transaction at SIGTERM can finish
    it (and it is committed); it is then closed with 57P01. A client with
    no transaction open is closed at once.
    """
    port = free_port()
    proc = start(processes, tmp_path, [pooled(pki, pg_tls, port)], shutdown_timeout="20s")
    table = f"shutdown_{uuid.uuid4().hex[:8]}"
    in_tx = connect(port, pki, dbname=APP_DB, autocommit=False)
    in_tx.execute(f"CREATE TABLE {table} (v text)")
    in_tx.commit()
    in_tx.execute(f"INSERT INTO {table} VALUES ('before')")
    idle = connect(port, pki, dbname=APP_DB)
    assert one(idle, "SELECT 1") == 1

    sent = proc.signal(signal.SIGTERM)
    draining(proc, "20s")
    refused_within(port, sent, 1.0)
    assert told(idle, 2.0), "the idle transaction-mode client was not let go at once"
    assert_admin_shutdown(idle)

    # The transaction goes on, to its end.
    time.sleep(0.5)
    in_tx.execute(f"INSERT INTO {table} VALUES ('after')")
    assert told(in_tx, 0) is False
    in_tx.commit()
    assert told(in_tx, 2.0), "the client was not let go at the end of its transaction"
    assert_admin_shutdown(in_tx)
    rows = pg_tls.psql(f"SELECT v FROM {table} ORDER BY v", dbname=APP_DB)
    pg_tls.psql(f"DROP TABLE {table}", dbname=APP_DB)
    assert rows.splitlines() == ["after", "before"]
    code = proc.wait_exit(5)
    assert ran_until_signal(code), proc.log()
    assert time.monotonic() - sent < 10.0
    assert "shutdown deadline" not in proc.log()


def test_a_connection_that_had_not_started_is_served(pki, pg_tls, tmp_path, processes):
    """
    A client accepted before SIGTERM but still in its startup (TLS done, no
    StartupMessage yet) is served when it sends it, as the sessions open
    at SIGTERM are: a balancer that handed it a client can no longer send
    that client elsewhere. (It was refused with 57P03 before issue 15.)
    """
    port = free_port()
    proc = start(processes, tmp_path, [on_port(route(pki, pg_tls), port)], shutdown_timeout="20s")
    sock = rawclient.request_tls(rawclient.connect(port), pki.cert("ca"))
    # Let the proxy see the handshake through.
    time.sleep(0.3)

    sent = proc.signal(signal.SIGTERM)
    draining(proc, "20s")
    refused_within(port, sent, 1.0)
    rawclient.startup_cleartext(sock, TRUST_USER, "")
    assert rawclient.simple_query(sock, "SELECT 7") == [("7",)]
    sock.close()
    code = proc.wait_exit(5)
    assert ran_until_signal(code), proc.log()
    assert "shutdown deadline" not in proc.log()


@pytest.mark.parametrize(
    "signum", [signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2], ids=["HUP", "USR1", "USR2"]
)
def test_handled_signals_during_the_drain_do_not_kill_it(pki, pg_tls, tmp_path, processes, signum):
    """
    A SIGHUP (a reload, logrotate) or SIGUSR1/2 arriving while the process
    drains must not end it; a reload then must not start listening again.
    """
    port, added_port = free_port(), free_port()
    app = on_port(route(pki, pg_tls, name="app"), port)
    proc = start(processes, tmp_path, [app], shutdown_timeout="20s")
    session = connect(port, pki)
    sent = proc.signal(signal.SIGTERM)
    draining(proc, "20s")
    refused_within(port, sent, 1.0)

    added = on_port(route(pki, pg_tls, name="added"), added_port)
    changed = on_port(route(pki, pg_tls, name="app", listener={"max_clients": 3}), port)
    write_config(tmp_path / "routes.toml", [changed, added], shutdown_timeout="20s")
    proc.signal(signum)
    time.sleep(0.5)
    assert proc.running(), f"{signal.Signals(signum).name} ended the drain:\n{proc.log()}"
    assert refused(added_port), "a reload during the shutdown started listening"
    assert refused(port)
    assert one(session, "SELECT 1") == 1
    session.close()
    assert ran_until_signal(proc.wait_exit(5)), proc.log()


def test_sigint_during_the_drain_closes_every_session_at_once(pki, pg_tls, tmp_path, processes):
    port = free_port()
    proc = start(processes, tmp_path, [on_port(route(pki, pg_tls), port)], shutdown_timeout="4s")
    session = connect(port, pki)
    proc.signal(signal.SIGTERM)
    draining(proc, "4s")
    assert one(session, "SELECT 1") == 1

    sent = proc.signal(signal.SIGINT)
    code = proc.wait_exit(15)
    took = time.monotonic() - sent
    assert code in (0, -signal.SIGINT, -signal.SIGTERM, 1), proc.log()
    assert took < 3.0, f"SIGINT during the drain: exit {took:.1f}s later"
    assert_admin_shutdown(session)


def test_idle_clients_let_go_do_not_hold_up_the_exit(pki, pg_tls, tmp_path, processes):
    """
    Transaction mode: the idle client is told 57P01 at once; the one in a
    transaction commits and leaves. Nothing is left to wait for, so the
    process exits, whether or not the idle client ever reads its goodbye.
    """
    port = free_port()
    proc = start(processes, tmp_path, [pooled(pki, pg_tls, port)], shutdown_timeout="4s")
    idle = connect(port, pki, dbname=APP_DB)
    one(idle, "SELECT 1")
    in_tx = connect(port, pki, dbname=APP_DB, autocommit=False)
    one(in_tx, "SELECT 1")
    proc.signal(signal.SIGTERM)
    draining(proc, "4s")
    assert told(idle, 2.0)  # its goodbye is there, unread
    in_tx.commit()
    in_tx.close()
    left = time.monotonic()
    proc.wait_exit(15)
    took = time.monotonic() - left
    assert took < 3.0, f"exit {took:.1f}s after the last session ended"
    assert_admin_shutdown(idle)


def test_shutdown_timeout_changed_by_sighup_takes_effect(pki, pg_tls, tmp_path, processes):
    port = free_port()
    app = on_port(route(pki, pg_tls), port)
    proc = start(processes, tmp_path, [app], shutdown_timeout="60s")
    session = connect(port, pki)
    write_config(tmp_path / "routes.toml", [app], shutdown_timeout="1s")
    mark = proc.mark()
    proc.signal(signal.SIGHUP)
    proc.wait_log("reload:", since=mark)

    sent = proc.signal(signal.SIGTERM)
    draining(proc, "1s")
    assert told(session, 4.0)
    assert_admin_shutdown(session)
    assert ran_until_signal(proc.wait_exit(5)), proc.log()
    assert time.monotonic() - sent < 5.0


# ---------------------------------------------------------------------------
# SIGINT


def test_sigint_closes_every_session_at_once(pki, pg_tls, tmp_path, processes):
    direct_port, pool_port = free_port(), free_port()
    proc = start(
        processes,
        tmp_path,
        [on_port(route(pki, pg_tls, name="direct"), direct_port), pooled(pki, pg_tls, pool_port)],
        shutdown_timeout="60s",
    )
    direct = connect(direct_port, pki)
    one(direct, "SELECT 1")
    idle = connect(pool_port, pki, dbname=APP_DB)
    one(idle, "SELECT 1")
    in_tx = connect(pool_port, pki, dbname=APP_DB, autocommit=False)
    one(in_tx, "SELECT 1")  # a transaction is open

    sent = proc.signal(signal.SIGINT)
    code = proc.wait_exit(5)
    took = time.monotonic() - sent
    assert took < 3.0, took
    assert code in (0, -signal.SIGINT, 1), proc.log()
    assert "SIGINT: closing every session now" in proc.log()
    for conn in (direct, idle, in_tx):
        assert_admin_shutdown(conn)


# ---------------------------------------------------------------------------
# twistd, the admin console, pause


def test_twistd_daemon_drains_on_sigterm(pki, pg_tls, tmp_path):
    port = free_port()
    config = write_config(
        tmp_path / "routes.toml", [on_port(route(pki, pg_tls), port)], shutdown_timeout="20s"
    )
    pid, pidfile, logfile = daemon(config, tmp_path)
    try:
        wait_for_port(port)
        session = connect(port, pki)
        sent = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        eventually(lambda: "shutting down: " in logfile.read_text(), 5)
        refused_within(port, sent, 1.0)
        time.sleep(0.5)
        assert one(session, "SELECT 1") == 1
        assert pid_alive(pid) and pidfile.exists()
        session.close()
        eventually(lambda: not pidfile.exists(), 5, "the pid file removed")
        eventually(lambda: not pid_alive(pid), 5, "the daemon gone")
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    log = logfile.read_text()
    assert "session started" in log and "shutdown deadline" not in log


def test_admin_shutdown_is_sigterm(pki, pg_tls, tmp_path, processes):
    port = free_port()
    proc = start(
        processes,
        tmp_path,
        [on_port(route(pki, pg_tls), port)],
        shutdown_timeout="20s",
        admin={"auth": "backend", "users": [SCRAM_USER]},
    )
    session = connect(port, pki)
    pid = one(session, "SELECT pg_backend_pid()")
    admin = connect(port, pki, dbname="pgtls")
    sent = time.monotonic()
    cur = admin.execute("SHUTDOWN")
    assert cur.statusmessage == "SHUTDOWN"
    draining(proc, "20s")
    refused_within(port, sent, 1.0)
    # The console session was let go; the other one goes on.
    assert told(admin, 2.0)
    admin.close()
    time.sleep(0.3)
    assert one(session, "SELECT pg_backend_pid()") == pid
    assert proc.running()
    session.close()
    assert ran_until_signal(proc.wait_exit(5)), proc.log()
    assert "shutdown deadline" not in proc.log()


def test_admin_shutdown_does_not_wait_for_the_console(pki, pg_tls, tmp_path, processes):
    port = free_port()
    proc = start(
        processes,
        tmp_path,
        [on_port(route(pki, pg_tls), port)],
        shutdown_timeout="4s",
        admin={"auth": "backend", "users": [SCRAM_USER]},
    )
    admin = connect(port, pki, dbname="pgtls")
    session = connect(port, pki)
    one(session, "SELECT 1")
    admin.execute("SHUTDOWN")  # and then the operator looks elsewhere
    draining(proc, "4s")
    session.close()
    left = time.monotonic()
    proc.wait_exit(15)
    took = time.monotonic() - left
    assert took < 3.0, f"exit {took:.1f}s after the last session ended"
    admin.close()


def test_sigusr1_pauses_and_sigusr2_resumes(pki, pg_tls, tmp_path, processes):
    port = free_port()
    proc = start(processes, tmp_path, [pooled(pki, pg_tls, port)], shutdown_timeout="1s")
    logged_in = connect(port, pki, dbname=APP_DB)
    assert one(logged_in, "SELECT 1") == 1
    done: dict[str, Any] = {}

    def query(name: str, conn_factory: Any) -> None:
        try:
            conn = conn_factory()
            done[name] = (one(conn, "SELECT 42"), time.monotonic())
            conn.close()
        except Exception as e:  # reported by the assertions below
            done[name] = (e, time.monotonic())

    mark = proc.mark()
    proc.signal(signal.SIGUSR1)
    proc.wait_log("route=pool paused", since=mark)
    threads = [
        threading.Thread(target=query, args=("logged in", lambda: logged_in)),
        threading.Thread(target=query, args=("new", lambda: connect(port, pki, dbname=APP_DB))),
    ]
    for t in threads:
        t.start()
    time.sleep(1.5)
    assert done == {}, "a query ran on a paused route"

    resumed = proc.signal(signal.SIGUSR2)
    for t in threads:
        t.join(10)
    assert set(done) == {"logged in", "new"}, done
    for name, (value, when) in done.items():
        assert value == 42, (name, value)
        assert when >= resumed, name
    proc.wait_log("route=pool resumed", since=mark)
    proc.signal(signal.SIGTERM)
    assert ran_until_signal(proc.wait_exit(10)), proc.log()


def test_reload_during_a_drain_changes_nothing(pki, pg_tls, tmp_path):
    """An embedder calling reload() while the proxy drains gets a note, and no new listener."""
    from pgtls_twisted.app._service import make_service
    from pgtls_twisted.config import parse_config

    data = {"proxy": [route(pki, pg_tls, name="app")], "shutdown_timeout": "0s"}
    service = make_service(parse_config(data, base_dir=tmp_path))
    service.draining = True
    added = {"proxy": [route(pki, pg_tls, name="app"), route(pki, pg_tls, name="added")]}
    notes = service.reload(parse_config(added, base_dir=tmp_path))
    assert notes == ["reload ignored: pgtls is shutting down"]
    assert list(service.groups) == ["app"]
