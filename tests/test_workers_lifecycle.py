"""
C{workers = 2} through its lifecycle: a worker killed and replaced,
SIGHUP (and the console's RELOAD) reaching every worker or refused once,
SIGTERM draining every worker and SIGINT closing every session, the
console's SHUTDOWN, workers outliving a killed supervisor, the workers'
logs, and a configuration the workers cannot run.

Each test gets a supervisor of its own (C{supervised}), since it signals,
kills or reconfigures it; the tests that can share one are in
test_workers. As there, pgtls is a separate process and the clients are
plain blocking psycopg calls (L{support.supervised}).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from support.admin import http_get
from support.configfile import write_config
from support.net import free_ports
from support.processes import ProxyProcess
from support.proxy import route
from support.supervised import (
    SHUTDOWN_TIMEOUT,
    Supervised,
    alive,
    cancel_all,
    cmdline,
    connect,
    routes_for,
    run_in_threads,
    session_on,
    start_supervised,
    worker_of,
    worker_processes,
)
from support.waiting import eventually


@pytest.fixture
def supervised(pki, pg_tls, tmp_path) -> Iterator[Supervised]:
    """
    pgtls with two workers, of its own, for a test that signals, kills or
    reconfigures it; stopped (and anything left killed) afterwards.
    """
    proxy = start_supervised(pki, pg_tls, tmp_path)
    try:
        yield proxy
    finally:
        proxy.stop()


# -- a worker dies ---------------------------------------------------------------------


def test_a_killed_worker_is_started_again(supervised, pki):
    pids = supervised.worker_pids()
    assert set(pids) == {0, 1}, supervised.log()
    run_dir = supervised.run_dir()
    assert worker_processes(run_dir) == {pids[0]: 0, pids[1]: 1}
    victim, survivor = session_on(supervised, pki, 0), session_on(supervised, pki, 1)
    try:
        killed_at = time.time()
        os.kill(pids[0], signal.SIGKILL)
        eventually(lambda: not alive(pids[0]), 5, "the killed worker to be gone")
        # A zombie leader can still have threads (SCRAM key derivation)
        # that hold its listening socket until they exit; a connection the
        # kernel hands that socket meanwhile is reset (the SO_REUSEPORT
        # limitation README states). Reaped, the process holds nothing.
        eventually(lambda: "worker 0 died" in supervised.log(), 5, "the supervisor to reap it")

        # New connections keep working while worker 0 is down and restarting.
        connections = 0
        deadline = time.monotonic() + 10
        while connections < 10 or supervised.worker_pids().get(0) == pids[0]:
            assert time.monotonic() < deadline, supervised.log()
            with connect(supervised, pki) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
            connections += 1
        new_pid = supervised.worker_pids()[0]
        assert new_pid != pids[0]
        assert supervised.worker_pids()[1] == pids[1]
        assert "worker 0 died" in supervised.log()
        assert alive(new_pid) and "--index" in cmdline(new_pid)

        scrape = supervised.wait_ready()
        scrape = eventually(
            lambda: (s := supervised.scrape()).total("pgtls_workers_running") == 2 and s,
            10,
            "two workers running",
        )
        assert scrape.total("pgtls_worker_restarts_total", worker="0") == 1
        assert scrape.total("pgtls_worker_restarts_total", worker="1") == 0
        # The worker 0 reporting now is the new process.
        (started,) = scrape.find("pgtls_process_start_time_seconds", worker="0")
        assert started.value >= killed_at - 1
        assert worker_processes(run_dir) == {new_pid: 0, pids[1]: 1}

        # The survivor's session goes on; the dead worker's session is gone.
        assert survivor.execute("SELECT 2").fetchone() == (2,)
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")

        # The new worker 0 serves sessions, and cancels reach them from either worker.
        fresh = [session_on(supervised, pki, 0) for _ in range(4)]
        fresh += [session_on(supervised, pki, 1) for _ in range(4)]
        try:
            cancel_all(fresh)
        finally:
            for conn in fresh:
                conn.close()
    finally:
        victim.close()
        survivor.close()


# -- SIGHUP ----------------------------------------------------------------------------


def test_sighup_reloads_every_worker(supervised, pki, pg_tls):
    # A session on each worker, from before the reload.
    before = [session_on(supervised, pki, 0), session_on(supervised, pki, 1)]
    try:
        (extra_port,) = free_ports(1)
        extra = route(
            pki, pg_tls, name="extra", listener={"bind_address": f"127.0.0.1:{extra_port}"}
        )
        supervised.routes = [*supervised.routes, extra]
        supervised.write(supervised.routes)
        supervised.signal(signal.SIGHUP)
        supervised.wait_ready()
        log = supervised.log()
        assert log.count("SIGHUP: every worker re-reads the configuration") == 1
        assert log.count('reload: route "extra" added') == 2, log

        conns = []
        try:
            for _ in range(20):
                conn = connect(supervised, pki, "extra")
                assert conn.execute("SELECT 1").fetchone() == (1,)
                conns.append(conn)
            assert {worker_of(c) for c in conns} == {0, 1}
        finally:
            for conn in conns:
                conn.close()
        for conn in before:
            assert conn.execute("SELECT 3").fetchone() == (3,)
    finally:
        for conn in before:
            conn.close()


def test_sighup_with_an_invalid_file_is_reported_once_and_changes_nothing(supervised, pki, pg_tls):
    (extra_port,) = free_ports(1)
    extra = route(pki, pg_tls, name="extra", listener={"bind_address": f"127.0.0.1:{extra_port}"})
    extra["listener"]["tls"] = "requried"
    supervised.write([*supervised.routes, extra])
    supervised.signal(signal.SIGHUP)
    eventually(lambda: "reload refused" in supervised.log(), 10, "the reload to be refused")
    time.sleep(1.0)  # long enough for workers to have reported too, had they been asked
    log = supervised.log()
    refusals = [line for line in log.splitlines() if "reload refused" in line]
    assert len(refusals) == 1, refusals
    assert "requried" in refusals[0]
    assert "SIGHUP: every worker re-reads" not in log
    # Nothing changed: no new listener, the old ones serve on both workers.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", extra_port), timeout=1).close()
    for name in ("app", "pool"):
        conns = [connect(supervised, pki, name) for _ in range(10)]
        try:
            assert all(c.execute("SELECT 1").fetchone() == (1,) for c in conns)
        finally:
            for conn in conns:
                conn.close()
    scrape = supervised.scrape()
    assert not scrape.find("pgtls_client_connections_accepted_total", route="extra")
    assert scrape.total("pgtls_workers_running") == 2

    # The console's RELOAD says so, as with one process (F0000), and reloads nothing.
    with connect(supervised, pki, dbname="pgtls") as admin:
        with pytest.raises(psycopg.Error) as raised:
            admin.execute("RELOAD")
    assert raised.value.sqlstate == "F0000"
    assert "requried" in str(raised.value.diag.message_detail), raised.value.diag.message_detail
    assert "SIGHUP: every worker re-reads" not in supervised.log()


def test_sighup_with_an_unusable_certificate_is_reported_once(supervised, pki, pg_tls, tmp_path):
    """
    A certificate file that exists but is not a certificate passes the
    supervisor's check (which reads the TOML and checks that files exist),
    and fails when each worker builds its TLS context.
    """
    bogus = tmp_path / "bogus.crt"
    bogus.write_text("not a certificate\n")
    (extra_port,) = free_ports(1)
    extra = route(
        pki,
        pg_tls,
        name="extra",
        listener={"bind_address": f"127.0.0.1:{extra_port}", "server_cert": str(bogus)},
    )
    supervised.write([*supervised.routes, extra])
    supervised.signal(signal.SIGHUP)
    eventually(lambda: "reload refused" in supervised.log(), 10, "the reload to be refused")
    time.sleep(1.0)
    refusals = [line for line in supervised.log().splitlines() if "reload refused" in line]
    # Nothing changed, in either worker...
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", extra_port), timeout=1).close()
    with connect(supervised, pki) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # ...and the problem is reported once, as for any other invalid file.
    assert len(refusals) == 1, refusals


# -- SIGTERM, SIGINT -----------------------------------------------------------------


def test_sigterm_drains_every_worker_and_leaves_no_process(supervised, pki):
    run_dir = supervised.run_dir()
    pids = supervised.worker_pids()
    sessions = [session_on(supervised, pki, 0), session_on(supervised, pki, 1)]
    try:
        assert http_get(supervised.metrics_port, "/health")[::2] == (200, "ok\n")
        stopped_at = time.monotonic()
        supervised.signal(signal.SIGTERM)
        # The balancer's health check fails from the start of the drain...
        eventually(
            lambda: http_get(supervised.metrics_port, "/health")[::2] == (503, "draining\n"),
            SHUTDOWN_TIMEOUT / 2,
            "/health to say draining",
        )
        # ...both workers stop accepting at once...
        port = supervised.ports["app"]

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return True
            return False

        eventually(refused, SHUTDOWN_TIMEOUT / 2, "the listeners to close")
        # ...while their sessions go on, until the deadline.
        for conn in sessions:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert supervised.proc is not None
        code = supervised.proc.wait(SHUTDOWN_TIMEOUT + 8)
        took = time.monotonic() - stopped_at
        for conn in sessions:
            with pytest.raises(psycopg.OperationalError, match="administrator command"):
                conn.execute("SELECT 1")
    finally:
        for conn in sessions:
            conn.close()
    log = supervised.log()
    assert code in (0, -signal.SIGTERM), log
    assert SHUTDOWN_TIMEOUT - 0.5 <= took <= SHUTDOWN_TIMEOUT + 5, (took, log)
    assert not any(alive(pid) for pid in pids.values()), log
    assert worker_processes(run_dir) == {}
    assert not os.path.exists(run_dir)
    assert log.count("exited") >= 2, log


def test_sigint_closes_every_session_at_once(supervised, pki):
    """Sessions in the middle of a query on both workers get 57P01 at once, not at a deadline."""
    run_dir = supervised.run_dir()
    pids = supervised.worker_pids()
    sessions = [session_on(supervised, pki, 0), session_on(supervised, pki, 1)]

    def sleep(conn: psycopg.Connection) -> tuple[str, float]:
        try:
            conn.execute("SELECT pg_sleep(20)")
        except psycopg.OperationalError as e:
            return str(e), time.monotonic()
        return "not closed", time.monotonic()

    results: list[Any] = []
    runner = threading.Thread(
        target=lambda: results.extend(run_in_threads(sleep, sessions, timeout=25)), daemon=True
    )
    try:
        runner.start()
        time.sleep(0.5)
        started = time.monotonic()
        supervised.signal(signal.SIGINT)
        assert supervised.proc is not None
        supervised.proc.wait(SHUTDOWN_TIMEOUT + 8)
        exited = time.monotonic() - started
        runner.join(20)
    finally:
        for conn in sessions:
            conn.close()
    for message, when in results:
        assert "administrator command" in message, message
        assert when - started < SHUTDOWN_TIMEOUT - 0.5, when - started
    # Closing waits a moment for the clients' close_notify (CLOSE_GRACE), no more.
    assert exited < SHUTDOWN_TIMEOUT + 2, (exited, supervised.log())
    assert not any(alive(pid) for pid in pids.values())
    assert worker_processes(run_dir) == {}


def test_sigint_logs_no_errors(supervised, pki):
    # Idle sessions keep the workers busy closing for a moment (CLOSE_GRACE),
    # long enough for both signals to be handled.
    sessions = [session_on(supervised, pki, 0), session_on(supervised, pki, 1)]
    try:
        supervised.signal(signal.SIGINT)
        assert supervised.proc is not None
        supervised.proc.wait(SHUTDOWN_TIMEOUT + 8)
    finally:
        for conn in sessions:
            conn.close()
    bad = [
        line for line in supervised.log().splitlines() if "#critical]" in line or "#error]" in line
    ]
    assert not bad, bad


# -- the admin console -----------------------------------------------------------------


def test_console_reload_reaches_both_workers(supervised, pki, pg_tls):
    (extra_port,) = free_ports(1)
    extra = route(pki, pg_tls, name="extra", listener={"bind_address": f"127.0.0.1:{extra_port}"})
    supervised.routes = [*supervised.routes, extra]
    supervised.write(supervised.routes)
    with connect(supervised, pki, dbname="pgtls") as admin:
        admin.execute("RELOAD")
    supervised.wait_ready()
    conns = [connect(supervised, pki, "extra") for _ in range(20)]
    try:
        assert all(c.execute("SELECT 1").fetchone() == (1,) for c in conns)
        assert {worker_of(c) for c in conns} == {0, 1}
    finally:
        for conn in conns:
            conn.close()


def test_console_reload_with_an_unusable_certificate_is_an_error(supervised, pki, pg_tls, tmp_path):
    bogus = tmp_path / "bogus.crt"
    bogus.write_text("not a certificate\n")
    routes = [dict(r, listener=dict(r["listener"])) for r in supervised.routes]
    routes[0]["listener"]["server_cert"] = str(bogus)
    supervised.write(routes)
    with connect(supervised, pki, dbname="pgtls") as admin:
        with pytest.raises(psycopg.Error) as raised:
            admin.execute("RELOAD")
    assert raised.value.sqlstate == "F0000"


def test_console_shutdown_stops_supervisor_and_workers(supervised, pki):
    run_dir = supervised.run_dir()
    pids = supervised.worker_pids()
    with connect(supervised, pki, dbname="pgtls") as admin:
        admin.execute("SHUTDOWN")
    assert supervised.proc is not None
    code = supervised.proc.wait(SHUTDOWN_TIMEOUT + 8)
    assert code in (0, -signal.SIGTERM), supervised.log()
    assert not any(alive(pid) for pid in pids.values())
    assert worker_processes(run_dir) == {}


# -- the supervisor dies ---------------------------------------------------------------


def test_workers_of_a_killed_supervisor_drain_and_exit(supervised, pki):
    pids = supervised.worker_pids()
    run_dir = supervised.run_dir()
    session = session_on(supervised, pki, 1)
    try:
        assert supervised.proc is not None
        supervised.proc.kill()
        supervised.proc.wait(5)
        killed_at = time.monotonic()
        # The workers drain (SIGTERM from the kernel): the session goes on for a while...
        assert session.execute("SELECT 1").fetchone() == (1,)
        eventually(
            lambda: not any(alive(pid) for pid in pids.values()),
            SHUTDOWN_TIMEOUT + 8,
            "the orphaned workers to exit",
            interval=0.1,
        )
        assert time.monotonic() - killed_at >= SHUTDOWN_TIMEOUT - 0.5
        with pytest.raises(psycopg.OperationalError):
            session.execute("SELECT 1")
    finally:
        session.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", supervised.ports["app"]), timeout=1).close()
    # The workers took their control sockets with them; the (empty) run
    # directory is the dead supervisor's to remove, so the test does.
    assert os.listdir(run_dir) == []
    os.rmdir(run_dir)


# -- logs ------------------------------------------------------------------------------


def test_json_logs_carry_the_worker(pki, pg_tls, tmp_path):
    import json

    app, pool, metrics = free_ports(3)
    proxy = Supervised(
        tmp_path,
        routes_for(pki, pg_tls, [app, pool]),
        metrics,
        workers=2,
        shutdown_timeout="0s",
        log_format="json",
    )
    try:
        proxy.start()
        for conn in [session_on(proxy, pki, 0), session_on(proxy, pki, 1)]:
            conn.close()
        time.sleep(0.3)
    finally:
        proxy.stop()
    lines = [line for line in proxy.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    started = [r for r in records if "session started" in r.get("message", "")]
    assert {r.get("worker") for r in started} >= {0, 1}, started
    assert all("conn" in r for r in started)
    assert any("worker 0 started" in r.get("message", "") for r in records)


def test_text_logs_tell_the_workers_connections_apart(supervised, pki):
    for conn in [session_on(supervised, pki, 0), session_on(supervised, pki, 1)]:
        conn.close()
    time.sleep(0.3)
    opened = [
        line.split("] ", 1)[1] for line in supervised.log().splitlines() if " open peer=" in line
    ]
    ids = [line.split()[0] for line in opened]
    assert len(ids) == len(set(ids)), opened


# -- a configuration the workers cannot run --------------------------------------------


def test_workers_that_cannot_start_make_pgtls_exit_nonzero(pki, pg_tls, tmp_path):
    """
    As with one process (tests/test_commands.py), a certificate that
    cannot be used makes C{twist pgtls} exit non-zero and say why.
    """
    app, pool, metrics = free_ports(3)
    routes = routes_for(pki, pg_tls, [app, pool])
    bogus = tmp_path / "bogus.crt"
    bogus.write_text("not a certificate\n")
    routes[0]["listener"]["server_cert"] = str(bogus)
    config = write_config(
        tmp_path / "pgtls.toml",
        routes,
        workers=2,
        shutdown_timeout="0s",
        metrics={"bind_address": f"127.0.0.1:{metrics}"},
    )
    proc = ProxyProcess(config, tmp_path)
    try:
        code = proc.wait_exit(8)
    finally:
        proc.stop(20)
    assert code != 0
    assert "listener server certificate" in proc.log()
