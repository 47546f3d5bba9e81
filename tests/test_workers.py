"""
C{workers = 2}: the supervisor, its workers sharing every port, cancel
requests that land on the other worker, one metrics page for all, a
worker killed and replaced, SIGHUP, SIGTERM and the admin console's
PAUSE/RESUME reaching every worker.

pgtls runs as C{twist pgtls --config FILE} (a separate process), so the
clients here are plain blocking psycopg calls. Which worker serves a
session is visible from the client: the low byte of the (minted) backend
PID the client is given is the worker's number.

Tests that signal, kill or reconfigure pgtls get a supervisor of their
own (C{supervised}); the others share one (C{shared}) and compare its
counters before and after rather than reading absolute values.
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
from support.configfile import write_config
from support.dsn import app_dsn
from support.net import free_ports
from support.pooling import pooled_route
from support.processes import ProxyProcess
from support.proxy import route
from support.supervised import Supervised, alive, cmdline, worker_processes
from support.waiting import eventually

from pgtls_twisted.testing.cluster import SCRAM_USER

SHUTDOWN_TIMEOUT = 2.0
CANCELED = "canceling statement due to user request"


def worker_of(conn: psycopg.Connection) -> int:
    """The worker serving C{conn}: the low byte of the PID pgtls minted for it."""
    return conn.info.backend_pid & 0xFF


def routes_for(pki: Any, cluster: Any, ports: list[int]) -> list[dict[str, Any]]:
    """A pass-through route "app" and a transaction-pool route "pool"."""
    app = route(pki, cluster, name="app", listener={"bind_address": f"127.0.0.1:{ports[0]}"})
    pool = pooled_route(pki, cluster, max_size=30)
    pool["name"] = "pool"
    pool["listener"]["bind_address"] = f"127.0.0.1:{ports[1]}"
    return [app, pool]


def start_supervised(pki: Any, cluster: Any, directory: Any) -> Supervised:
    app, pool, metrics = free_ports(3)
    proxy = Supervised(
        directory,
        routes_for(pki, cluster, [app, pool]),
        metrics,
        workers=2,
        shutdown_timeout=f"{SHUTDOWN_TIMEOUT:g}s",
        log_level="info",
        admin={"auth": "backend", "users": [SCRAM_USER]},
    )
    try:
        proxy.start()
    except BaseException:
        proxy.stop()
        raise
    proxy.worker_pids()
    return proxy


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


@pytest.fixture(scope="module")
def _shared(pki, pg_tls, tmp_path_factory) -> Iterator[Supervised]:
    proxy = start_supervised(pki, pg_tls, tmp_path_factory.mktemp("shared"))
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def shared(_shared: Supervised) -> Supervised:
    """
    pgtls with two workers, shared by the tests that leave it as they
    found it (they compare counters before and after, never absolutes):
    each starts once the previous test's sessions are gone.
    """
    _shared.check_running()
    eventually(
        lambda: _shared.scrape().total("pgtls_client_connections_active") == 0,
        10,
        "the previous test's sessions to close",
    )
    return _shared


def connect(proxy: Supervised, pki: Any, name: str = "app", **extra: Any) -> psycopg.Connection:
    return psycopg.connect(app_dsn(proxy.ports[name], pki, **extra), autocommit=True)


def server(cluster: Any) -> psycopg.Connection:
    """A superuser connection straight to the cluster (Unix socket), to look from its side."""
    return psycopg.connect(
        cluster.dsn(host=str(cluster.socket_dir), user="postgres"), autocommit=True
    )


def run_in_threads(fn: Any, items: list[Any], timeout: float) -> list[Any]:
    """C{fn(item)} for every item at once; results (or exceptions) in order."""
    results: list[Any] = [None] * len(items)

    def run(i: int, item: Any) -> None:
        try:
            results[i] = fn(item)
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, x), daemon=True) for i, x in enumerate(items)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [i for i, t in enumerate(threads) if t.is_alive()]
    assert not stuck, f"still running after {timeout}s: {stuck}"
    return results


def spread(proxy: Supervised, pki: Any, name: str, count: int) -> list[psycopg.Connection]:
    """
    C{count} sessions on route C{name}, and more if need be until both
    workers serve some (the kernel picks; 60 tries at most).
    """
    conns: list[psycopg.Connection] = []
    try:
        while len(conns) < count or {worker_of(c) for c in conns} != {0, 1}:
            assert len(conns) < 60, f"every session on worker {worker_of(conns[0])}"
            conns.append(connect(proxy, pki, name))
    except BaseException:
        for conn in conns:
            conn.close()
        raise
    return conns


def session_on(proxy: Supervised, pki: Any, worker: int, tries: int = 40) -> psycopg.Connection:
    """A pass-through session served by C{worker} (connecting until one lands there)."""
    others = []
    try:
        for _ in range(tries):
            conn = connect(proxy, pki)
            if worker_of(conn) == worker:
                return conn
            others.append(conn)
    finally:
        for conn in others:
            conn.close()
    raise AssertionError(f"no connection reached worker {worker} in {tries} tries")


def cancel_all(sessions: list[psycopg.Connection]) -> None:
    """A pg_sleep(30) in every session, each cancelled (plaintext cancel): all cancelled fast."""

    def sleep(conn: psycopg.Connection) -> str:
        try:
            conn.execute("SELECT pg_sleep(30)")
        except psycopg.errors.QueryCanceled as e:
            return str(e)
        return "not cancelled"

    results: list[Any] = []
    runner = threading.Thread(
        target=lambda: results.extend(run_in_threads(sleep, sessions, timeout=20)), daemon=True
    )
    runner.start()
    time.sleep(0.5)
    started = time.monotonic()
    for conn in sessions:
        conn.cancel()
    runner.join(20)
    assert time.monotonic() - started < 10
    assert all(isinstance(r, str) and CANCELED in r for r in results), results
    for conn in sessions:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def send_cancel(port: int, pid: int, key: bytes) -> None:
    """A plaintext CancelRequest on a connection of its own; waits for the proxy to close it."""
    from pgtls_twisted.protocol import _wire as wire

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(wire.CancelRequest(pid, key).encode())
        assert sock.recv(1) == b""


def show_routes_by_worker(proxy: Supervised, pki: Any, tries: int = 40) -> dict[int, dict]:
    """SHOW ROUTES from each worker (admin sessions land on either): worker to route rows."""
    found: dict[int, dict] = {}
    for _ in range(tries):
        with connect(proxy, pki, dbname="pgtls") as admin:
            cur = admin.execute("SHOW ROUTES")
            columns = [d.name for d in cur.description]
            rows = [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]
        # Every worker's routes, whichever worker answered.
        for row in rows:
            found.setdefault(int(row["worker"]), {})[row["name"]] = row
        if len(found) == 2:
            return found
    raise AssertionError(f"admin sessions reached only workers {sorted(found)}")


# -- sessions on both workers, cancels across them ---------------------------------------


def test_sessions_spread_over_both_workers_and_every_cancel_works(shared, pki, pg_tls):
    counted = shared.scrape()
    per_route = 12
    sessions: list[tuple[str, psycopg.Connection]] = []
    try:
        for name in ("app", "pool"):
            for conn in spread(shared, pki, name, per_route):
                sessions.append((name, conn))
                assert conn.execute("SELECT 1").fetchone() == (1,)
        owners = {
            name: {worker_of(c) for n, c in sessions if n == name} for name in ("app", "pool")
        }
        assert owners == {"app": {0, 1}, "pool": {0, 1}}, owners

        # The proxy's own view agrees: both workers have active clients on each route.
        scrape = shared.scrape()
        for name in ("app", "pool"):
            for worker in ("0", "1"):
                expected = sum(1 for n, c in sessions if n == name and worker_of(c) == int(worker))
                assert (
                    scrape.total("pgtls_client_connections_active", route=name, worker=worker)
                    == expected
                )

        # A pg_sleep(30) in every session at once, then a cancel for each.
        def sleep(item: tuple[str, psycopg.Connection]) -> tuple[str, float]:
            _, conn = item
            started = time.monotonic()
            try:
                conn.execute("SELECT pg_sleep(30)")
            except psycopg.errors.QueryCanceled as e:
                return str(e), time.monotonic() - started
            return "not cancelled", time.monotonic() - started

        results: list[Any] = []
        runner = threading.Thread(
            target=lambda: results.extend(run_in_threads(sleep, sessions, timeout=25)),
            daemon=True,
        )
        runner.start()
        with server(pg_tls) as look:

            def all_sleeping() -> bool:
                row = look.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE state = 'active' AND query = 'SELECT pg_sleep(30)'"
                ).fetchone()
                return row is not None and row[0] == len(sessions)

            eventually(all_sleeping, 10, "every session to run pg_sleep(30)")
        cancelled_at = time.monotonic()

        # Half with libpq's legacy plaintext PQcancel, half with the
        # encrypted PQcancelCreate (libpq 17): both kinds cross workers.
        def cancel(item: tuple[int, tuple[str, psycopg.Connection]]) -> None:
            i, (_, conn) = item
            if i % 2:
                conn.cancel()
            else:
                conn.cancel_safe()

        errors = [r for r in run_in_threads(cancel, list(enumerate(sessions)), 15) if r]
        assert not errors, errors
        runner.join(20)
        assert not runner.is_alive()
        took = time.monotonic() - cancelled_at
        assert len(results) == len(sessions)
        for (name, conn), result in zip(sessions, results, strict=True):
            assert not isinstance(result, BaseException), (name, worker_of(conn), result)
            message, _ = result
            assert CANCELED in message, (name, worker_of(conn), message)
        assert took < 10, f"cancels took {took:.1f}s"

        # Every session goes on.
        for _, conn in sessions:
            assert conn.execute("SELECT 42").fetchone() == (42,)
    finally:
        for _, conn in sessions:
            conn.close()

    # Every cancel was forwarded exactly once, by the worker that owns the
    # session; those that reached the other worker first were relayed.
    scrape = shared.scrape()

    def cancels(**labels: str) -> float:
        name = "pgtls_cancel_requests_total"
        return scrape.total(name, **labels) - counted.total(name, **labels)

    assert cancels(outcome="forwarded") == len(sessions)
    assert cancels(outcome="ignored") == 0
    assert 1 <= cancels(outcome="relayed") < len(sessions), scrape.find(
        "pgtls_cancel_requests_total"
    )
    for name in ("app", "pool"):
        assert cancels(route=name, outcome="forwarded") == sum(1 for n, _ in sessions if n == name)


# -- one metrics page ------------------------------------------------------------------


def test_one_metrics_page_for_both_workers(shared, pki):
    counted = shared.scrape()
    sessions = spread(shared, pki, "app", 8) + spread(shared, pki, "pool", 8)
    names = ["app" if c.info.port == shared.ports["app"] else "pool" for c in sessions]
    try:
        for conn in sessions:
            conn.execute("SELECT 1")
        owners = [(name, worker_of(c)) for name, c in zip(names, sessions, strict=True)]
        assert set(owners) == {(n, w) for n in ("app", "pool") for w in (0, 1)}, owners
        scrape = shared.scrape()
    finally:
        for conn in sessions:
            conn.close()

    # One family per name: the workers' series are merged, not repeated.
    families = [f.name for f in scrape.families]
    assert len(families) == len(set(families)), sorted(n for n in families if families.count(n) > 1)
    types = [line.split()[2] for line in scrape.text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), sorted(t for t in types if types.count(t) > 1)
    # No series twice (same name and labels).
    keys = [(s.name, tuple(sorted(s.labels.items()))) for s in scrape.samples]
    assert len(keys) == len(set(keys)), [k for k in keys if keys.count(k) > 1][:5]

    # Every series but the supervisor's own count of running workers says whose it is.
    for sample in scrape.samples:
        if sample.name != "pgtls_workers_running":
            assert sample.labels.get("worker") in ("0", "1"), sample
    for name in (
        "pgtls_client_connections_accepted_total",
        "pgtls_client_connections_active",
        "pgtls_tls_handshake_seconds_count",
        "pgtls_backend_connect_seconds_count",
        "pgtls_process_start_time_seconds",
        "pgtls_process_resident_memory_bytes",
        "pgtls_worker_restarts_total",
    ):
        assert scrape.workers(name) == {"0", "1"}, name
    for route_name in ("app", "pool"):
        for worker in (0, 1):
            expected = owners.count((route_name, worker))
            labels = {"route": route_name, "worker": str(worker)}
            got = scrape.total("pgtls_client_connections_accepted_total", **labels)
            got -= counted.total("pgtls_client_connections_accepted_total", **labels)
            assert got == expected, (route_name, worker, got, expected)
            active = scrape.total(
                "pgtls_client_connections_active", route=route_name, worker=str(worker)
            )
            assert active == expected, (route_name, worker, active, expected)
    assert scrape.total("pgtls_pool_server_connections", route="pool") > 0
    assert scrape.total("pgtls_workers_running") == 2
    assert scrape.total("pgtls_worker_restarts_total") == 0

    # What the supervisor asks the workers goes through sockets only they can reach.
    run_dir = shared.run_dir()
    assert os.stat(run_dir).st_mode & 0o777 == 0o700
    for worker in (0, 1):
        control = os.path.join(run_dir, f"worker-{worker}.sock")
        assert os.stat(control).st_mode & 0o777 == 0o600, oct(os.stat(control).st_mode)


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
        stopped_at = time.monotonic()
        supervised.signal(signal.SIGTERM)
        # Both workers stop accepting at once...
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


def test_pause_and_resume_reach_both_workers(shared, pki):
    with connect(shared, pki, dbname="pgtls") as admin:
        admin.execute("PAUSE app")
    paused = show_routes_by_worker(shared, pki)
    for worker in (0, 1):
        assert int(paused[worker]["app"]["paused"]) == 1, (worker, paused)
        assert int(paused[worker]["pool"]["paused"]) == 0, (worker, paused)

    # New sessions wait on both workers.
    held: list[Any] = []
    runner = threading.Thread(
        target=lambda: held.extend(
            run_in_threads(lambda _: connect(shared, pki), list(range(12)), timeout=20)
        ),
        daemon=True,
    )
    runner.start()
    time.sleep(1.5)
    assert runner.is_alive() and not held, "sessions started while the route was paused"
    try:
        with connect(shared, pki, dbname="pgtls") as admin:
            admin.execute("RESUME app")
        runner.join(15)
        assert not runner.is_alive()
        assert all(isinstance(c, psycopg.Connection) for c in held), held
        assert {worker_of(c) for c in held} == {0, 1}
        for conn in held:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        runner.join(15)
        for conn in held:
            if isinstance(conn, psycopg.Connection):
                conn.close()
    resumed = show_routes_by_worker(shared, pki)
    for worker in (0, 1):
        assert int(resumed[worker]["app"]["paused"]) == 0, (worker, resumed)

    # SIGUSR1 / SIGUSR2 to the supervisor: every route, every worker.
    shared.signal(signal.SIGUSR1)
    eventually(
        lambda: all(
            int(r["paused"]) == 1
            for rows in show_routes_by_worker(shared, pki).values()
            for r in rows.values()
        ),
        10,
        "every route paused on both workers",
        interval=0.2,
    )
    shared.signal(signal.SIGUSR2)
    eventually(
        lambda: all(
            int(r["paused"]) == 0
            for rows in show_routes_by_worker(shared, pki).values()
            for r in rows.values()
        ),
        10,
        "every route resumed on both workers",
        interval=0.2,
    )


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


# -- forged cancel requests ------------------------------------------------------------


def test_a_cancel_with_a_wrong_key_is_counted_as_ignored_wherever_it_lands(shared, pki):
    counted = shared.scrape()
    sessions = [session_on(shared, pki, 0), session_on(shared, pki, 1)]
    try:
        forged = 0
        for conn in sessions:
            for _ in range(10):
                send_cancel(shared.ports["app"], conn.info.backend_pid, b"\0\1\2\3")
                forged += 1
        time.sleep(0.5)
        for conn in sessions:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        scrape = shared.scrape()
    finally:
        for conn in sessions:
            conn.close()

    def cancels(**labels: str) -> float:
        name = "pgtls_cancel_requests_total"
        return scrape.total(name, **labels) - counted.total(name, **labels)

    assert cancels(outcome="forwarded") == 0
    assert cancels(outcome="relayed") > 0
    assert cancels(outcome="ignored") == forged, scrape.find("pgtls_cancel_requests_total")


def test_a_cancel_for_a_worker_that_does_not_exist_is_ignored(shared):
    counted, logged = shared.scrape(), len(shared.log())
    for _ in range(4):
        send_cancel(shared.ports["app"], (0x1234 << 8) | 7, b"\0\1\2\3")
    time.sleep(0.5)
    scrape = shared.scrape()

    def cancels(**labels: str) -> float:
        name = "pgtls_cancel_requests_total"
        return scrape.total(name, **labels) - counted.total(name, **labels)

    assert cancels(outcome="relayed") == 0
    assert cancels(outcome="ignored") == 4
    warnings = [line for line in shared.log()[logged:].splitlines() if "#warn]" in line]
    assert not [w for w in warnings if "cancel" in w], warnings


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


def test_a_scrape_adds_no_log_lines(shared):
    shared.scrape()
    time.sleep(0.3)
    before = shared.log()
    for _ in range(3):
        shared.scrape()
    time.sleep(0.3)
    added = shared.log()[len(before) :].splitlines()
    assert added == [], added[:4]


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


def test_the_console_answers_for_every_worker(shared, pki):
    """
    SHOW POOLS/STATS/CLIENTS/SERVERS/ROUTES have every worker's rows,
    whichever worker the console landed on: one row per pool in POOLS and
    STATS (summed), so an exporter sees steady counters.
    """

    def show(what: str) -> list[dict[str, Any]]:
        with connect(shared, pki, dbname="pgtls") as admin:
            cur = admin.execute(f"SHOW {what}")
            columns = [d.name for d in cur.description]
            return [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]

    def pool_stats() -> dict[str, Any]:
        rows = [r for r in show("STATS") if r["route"] == "pool"]
        assert len(rows) <= 1, rows
        return rows[0] if rows else {"total_xact_count": 0}

    before = int(pool_stats()["total_xact_count"])
    sessions = spread(shared, pki, "pool", 6)
    try:
        for conn in sessions:
            conn.execute("SELECT 1")
        workers_used = {worker_of(c) for c in sessions}
        assert workers_used == {0, 1}
        for _ in range(4):  # whichever worker answers, the same figures
            after = int(pool_stats()["total_xact_count"])
            assert after - before == len(sessions)
            pools = [r for r in show("POOLS") if r["route"] == "pool"]
            assert len(pools) == 1 and int(pools[0]["cl_active"]) >= len(sessions), pools
            clients = [r for r in show("CLIENTS") if r["route"] == "pool"]
            assert len(clients) >= len(sessions)
            assert {int(r["id"]) % 2 for r in clients} == {0, 1}, "clients of both workers"
            servers = [r for r in show("SERVERS") if r["route"] == "pool"]
            assert servers, servers
            assert {int(r["worker"]) for r in show("ROUTES")} == {0, 1}
    finally:
        for conn in sessions:
            conn.close()
