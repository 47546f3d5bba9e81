"""
C{workers = 2}, what the workers serve together: the supervisor, its
workers sharing every port, sessions spread over both and cancel requests
that land on the other worker (forged ones too), one metrics page for all,
and the admin console's PAUSE/RESUME and SHOW answering for every worker.

These tests share one supervisor (C{shared}) and leave it as they found
it: they compare its counters before and after rather than reading
absolute values. Tests that signal, kill or reconfigure pgtls get one of
their own, in test_workers_lifecycle.

pgtls runs as C{twist pgtls --config FILE} (a separate process), so the
clients here are plain blocking psycopg calls. Which worker serves a
session is found from the client's socket (L{support.supervised.worker_of}).
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
from support.supervised import (
    CANCELED,
    Supervised,
    connect,
    run_in_threads,
    session_on,
    start_supervised,
    worker_of,
)
from support.waiting import eventually


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


def server(cluster: Any) -> psycopg.Connection:
    """A superuser connection straight to the cluster (Unix socket), to look from its side."""
    return psycopg.connect(
        cluster.dsn(host=str(cluster.socket_dir), user="postgres"), autocommit=True
    )


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


# -- the backend's own PID on both workers ------------------------------------------


def notify_self(conn: psycopg.Connection) -> int:
    conn.execute("LISTEN pgtls_pid")
    conn.execute("NOTIFY pgtls_pid")
    (notify,) = list(conn.notifies(timeout=5, stop_after=1))
    return notify.pid


def cancel_pg_sleep(conn: psycopg.Connection, look: psycopg.Connection, plaintext: bool) -> None:
    """A pg_sleep(10) in C{conn}, cancelled (libpq's PQcancel, or PQcancelCreate) once it runs."""
    result: list[str] = []

    def sleep() -> None:
        try:
            conn.execute("SELECT pg_sleep(10)")
        except psycopg.errors.QueryCanceled as e:
            result.append(str(e))
        else:
            result.append("not cancelled")

    runner = threading.Thread(target=sleep, daemon=True)
    runner.start()
    eventually(
        lambda: look.execute(
            "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND state = 'active'",
            [conn.info.backend_pid],
        ).fetchone(),
        10,
        "pg_sleep(10) to run",
    )
    started = time.monotonic()
    if plaintext:
        conn.cancel()
    else:
        conn.cancel_safe()
    runner.join(10)
    assert result and CANCELED in result[0], result
    assert time.monotonic() - started < 5


def test_pass_through_clients_see_their_backends_pid_and_cancel_across_workers(shared, pki, pg_tls):
    """
    On either worker a pass-through client is given its backend's own PID,
    a NOTIFY to itself carries it, and a cancel of pg_sleep(10) works
    wherever its new connection lands: rounds of one cancel per worker's
    session (plaintext PQcancel and PQcancelCreate in turn) until one has
    had to be passed on to the other worker.
    """
    counted = shared.scrape()
    sessions = [session_on(shared, pki, 0), session_on(shared, pki, 1)]

    def relayed() -> float:
        name = "pgtls_cancel_requests_total"
        return shared.scrape().total(name, route="app", outcome="relayed") - counted.total(
            name, route="app", outcome="relayed"
        )

    cancelled = 0
    try:
        with server(pg_tls) as look:
            for conn in sessions:
                (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone()
                assert conn.info.backend_pid == pid
                assert notify_self(conn) == pid
            for n in range(10):
                for conn in sessions:
                    cancel_pg_sleep(conn, look, plaintext=bool(n % 2))
                    cancelled += 1
                if relayed() >= 1:
                    break
            assert relayed() >= 1, "no cancel landed on the other worker in 10 rounds"
        for conn in sessions:
            assert conn.execute("SELECT 42").fetchone() == (42,)
    finally:
        for conn in sessions:
            conn.close()
    scrape = shared.scrape()

    def cancels(**labels: str) -> float:
        name = "pgtls_cancel_requests_total"
        return scrape.total(name, **labels) - counted.total(name, **labels)

    assert cancels(route="app", outcome="forwarded") == cancelled
    assert cancels(route="app", outcome="ignored") == 0


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


def test_a_cancel_whose_key_no_worker_could_have_minted_is_ignored_where_it_lands(shared):
    """
    Keys of 1 to 3 bytes (protocol 3.2 allows them) carry no worker
    number: not passed on, just ignored, and nothing to warn about.
    """
    counted, logged = shared.scrape(), len(shared.log())
    for length in (1, 2, 3, 3):
        send_cancel(shared.ports["app"], 0x1234, b"\7" * length)
    time.sleep(0.5)
    scrape = shared.scrape()

    def cancels(**labels: str) -> float:
        name = "pgtls_cancel_requests_total"
        return scrape.total(name, **labels) - counted.total(name, **labels)

    assert cancels(outcome="relayed") == 0
    assert cancels(outcome="ignored") == 4
    warnings = [line for line in shared.log()[logged:].splitlines() if "#warn]" in line]
    assert not [w for w in warnings if "cancel" in w], warnings


# -- logs ------------------------------------------------------------------------------


def test_workers_run_the_supervisors_reactor(shared):
    """C{twist pgtls} runs pgtls's reactor, and so does every worker it starts."""
    lines = [line for line in shared.log().splitlines() if "reactor: " in line]
    assert len(lines) == 3, lines
    assert all("ShortDispatchReactor" in line for line in lines), lines


def test_a_scrape_adds_no_log_lines(shared):
    shared.scrape()
    time.sleep(0.3)
    before = shared.log()
    for _ in range(3):
        shared.scrape()
    time.sleep(0.3)
    added = shared.log()[len(before) :].splitlines()
    assert added == [], added[:4]
