"""
Rolling deploys with nothing dropped (issue 15, item 3): Debian's HAProxy
in TCP mode in front of two real C{twist pgtls} instances (PROXY protocol
v2, C{/health} checks every 200 ms, a refused connect retried on the other
instance), pgbench running through it, and each instance in turn drained
with SIGTERM, waited for, and started again.

* Transaction mode, C{pgbench -C} (a new connection per transaction, as
  an application's pool behind a balancer reconnects): no transaction
  fails, no client is aborted, and transactions go on during every drain.
  A client that keeps one connection cannot have "nothing dropped" in
  transaction mode: a drain lets it go at the end of its current
  transaction (README, Operations, Signals), so it gets 57P01 there and
  must reconnect.
* Session mode, pgbench's clients keep their connections: the sessions
  on the drained instance outlive C{shutdown_timeout} and are ended with
  FATAL 57P01, they alone; the other instance's go on, and a client that
  connects during the drain is served by the other instance.

Every wait is for a state (HAProxy's stats socket, C{/health}, a log
line, a row count), never a fixed sleep.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support.balancer import HAProxy, Instance, Pgbench, drain_and_wait, make_instance
from support.pooling import pooled_route
from support.waiting import eventually

from pgtls_twisted.testing.cluster import APP_DB, POOL_USER, SCRAM_PASSWORD, SCRAM_USER
from pgtls_twisted.testing.pki import PKI

#: The table every pgbench transaction adds a row to: the rows are the
#: transactions that committed, counted by the server, not by pgbench.
TABLE = "rolling_deploy"
ADMIN_SHUTDOWN = "terminating connection due to administrator command"
#: pgbench's run in transaction mode (-T): long enough for both instances' turns.
TRANSACTION_RUN = 15


@pytest.fixture(scope="module")
def table(pg_tls: Any) -> str:
    pg_tls.psql(
        f"DROP TABLE IF EXISTS {TABLE};"
        f"CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, mode text NOT NULL, client int NOT NULL);"
        f"GRANT SELECT, INSERT ON {TABLE} TO {POOL_USER}, {SCRAM_USER};"
        f"GRANT USAGE ON SEQUENCE {TABLE}_id_seq TO {POOL_USER}, {SCRAM_USER};",
        dbname=APP_DB,
    )
    return TABLE


def committed(cluster: Any, mode: str) -> int:
    """Transactions of C{mode}'s pgbench run that committed, as the server counts them."""
    return int(cluster.psql(f"SELECT count(*) FROM {TABLE} WHERE mode = '{mode}'", dbname=APP_DB))


def script(mode: str) -> str:
    """One transaction of three statements: it is let go at END, never inside."""
    return (
        "BEGIN;\n"
        f"INSERT INTO {TABLE} (mode, client) VALUES ('{mode}', :client_id);\n"
        "SELECT 1;\n"
        "END;\n"
    )


def client_env(pki: PKI, port: int) -> dict[str, str]:
    """libpq's settings for a client of the balancer: the suite's careful client."""
    return {
        "PGHOST": "localhost",
        "PGHOSTADDR": "127.0.0.1",
        "PGPORT": str(port),
        "PGUSER": SCRAM_USER,
        "PGPASSWORD": SCRAM_PASSWORD,
        "PGDATABASE": APP_DB,
        "PGSSLMODE": "verify-full",
        "PGSSLROOTCERT": str(pki.cert("ca")),
        "PGCONNECT_TIMEOUT": "10",
    }


class Deployment:
    """Two instances of one route and HAProxy in front of them, all in C{directory}."""

    def __init__(self, pki: PKI, cluster: Any, directory: Path, mode: str, **top: Any) -> None:
        self.pki, self.cluster, self.mode = pki, cluster, mode
        route = pooled_route(pki, cluster, mode=mode, max_size=10)
        self.instances: list[Instance] = [
            make_instance(name, directory / name, route, log_level="info", **top)
            for name in ("a", "b")
        ]
        self.haproxy: HAProxy | None = None
        for instance in self.instances:
            instance.start()
        self.haproxy = HAProxy(directory / "haproxy", self.instances)
        for instance in self.instances:
            self.haproxy.wait_status(instance.name, "UP")

    def env(self) -> dict[str, str]:
        assert self.haproxy is not None
        return client_env(self.pki, self.haproxy.port)

    def close(self) -> None:
        if self.haproxy is not None:
            self.haproxy.close()
        for instance in self.instances:
            instance.close()

    def logs(self) -> str:
        parts = [
            f"== {i.name} run {n}\n{r.log()}" for i in self.instances for n, r in enumerate(i.runs)
        ]
        if self.haproxy is not None:
            parts.append(f"== haproxy\n{self.haproxy.log()}")
        return "\n".join(parts)


@pytest.fixture
def deployment(pki: PKI, pg_tls: Any, tmp_path: Path, table: str) -> Iterator[Any]:
    """A factory of L{Deployment}s, closed after the test."""
    made: list[Deployment] = []

    def make(mode: str, **top: Any) -> Deployment:
        d = Deployment(pki, pg_tls, tmp_path / mode, mode, **top)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def grows(cluster: Any, mode: str, since: int, what: str, timeout: float = 10.0) -> int:
    """Until more than C{since} transactions of C{mode} committed; how many."""
    return eventually(
        lambda: (n := committed(cluster, mode)) > since and n, timeout, what, interval=0.05
    )


def wait_serving(run: Any, name: str) -> None:
    """Until C{run} (a pgtls process) has started a session."""
    eventually(lambda: " session started " in run.log(), 10, f"{name} to serve a client")


def assert_drained_and_exited(run: Any, port: int) -> None:
    """The log of a process that drained on SIGTERM: the signal, the listener closed, the end."""
    log = run.log()
    signalled = log.find("Received SIGTERM, shutting down.")
    closed = log.find(f"(TCP Port {port} Closed)")
    ended = log.find("Main loop terminated.")
    assert 0 <= signalled < closed < ended, log[-3000:]


def test_transaction_mode_drops_nothing(deployment: Any, pg_tls: Any, tmp_path: Path) -> None:
    """
    pgbench -C through the balancer while each instance in turn drains,
    exits and starts again: no failed transaction, no aborted client, and
    transactions commit while each instance is gone.
    """
    d = deployment("transaction", shutdown_timeout="5s")
    assert d.haproxy is not None
    bench = Pgbench(
        pg_tls,
        tmp_path / "pgbench-transaction",
        d.env(),
        script("transaction"),
        *("-C", "-c", "4", "-j", "2", "-T", str(TRANSACTION_RUN)),
    )
    cycles = []
    try:
        grows(pg_tls, "transaction", 0, "pgbench to get going")
        for instance in d.instances:
            run = instance.process
            # Both instances serve: this one too, before it is drained.
            wait_serving(run, instance.name)
            before = committed(pg_tls, "transaction")
            started = time.monotonic()
            drain_and_wait(instance, 10)
            d.haproxy.wait_status(instance.name, "DOWN")
            # The run goes on through the other instance while this one is gone.
            grows(pg_tls, "transaction", before, f"transactions while {instance.name} is down")
            bench.check_running()
            assert_drained_and_exited(run, instance.port)
            instance.start()
            d.haproxy.wait_status(instance.name, "UP")
            cycles.append(time.monotonic() - started)
        # The restarted instances take clients again.
        for instance in d.instances:
            wait_serving(instance.process, f"the restarted {instance.name}")
        # The deploy was over while pgbench still ran: every drain was under load.
        bench.check_running()
        code = bench.wait(TRANSACTION_RUN + 20)
    finally:
        bench.close()
    report = f"{bench.text()}\ncycles: {cycles}"
    assert code == 0, report
    assert bench.number("number of failed transactions") == 0, report
    assert "aborted" not in bench.errors(), report
    assert "error" not in bench.errors(), report
    # Every transaction pgbench counted committed, and no other did.
    assert bench.number("number of transactions actually processed") == committed(
        pg_tls, "transaction"
    ), report


#: Session mode's shutdown_timeout: how long the drained instance's
#: sessions go on before they are ended.
SESSION_DEADLINE = 2.0


#: pgbench's line for a client it gave up on; libpq's message, when it is
#: on the same line, after "query N: " (pgbench 15 prints it either there
#: or on the line before, as the connection broke sending or reading).
ABORTED = re.compile(
    r"pgbench: error: client (\d+) (?:script 0 )?aborted in command \d+"
    r"(?: query \d+: (.*)| \(SQL\) of script 0; perhaps the backend died while processing)$"
)


def ended_clients(stderr: str) -> set[int]:
    """
    The pgbench clients aborted with FATAL 57P01, from pgbench's stderr,
    which must say nothing else: no other error, no other reason.
    """
    fatal = f"FATAL:  {ADMIN_SHUTDOWN}"
    lines = stderr.splitlines()
    assert lines[-1:] == ["pgbench: error: Run was aborted; the above results are incomplete."]
    ended: list[int] = []
    i = 0
    while i < len(lines) - 1:
        if lines[i] == fatal and (m := ABORTED.match(lines[i + 1])) and m.group(2) is None:
            ended.append(int(m.group(1)))
            i += 2
            continue
        m = ABORTED.match(lines[i])
        assert m is not None and m.group(2) == fatal, f"not a 57P01: {lines[i]!r}"
        ended.append(int(m.group(1)))
        i += 1
    assert len(ended) == len(set(ended)), ended
    return set(ended)


def client(env: dict[str, str]) -> psycopg.Connection:
    """A new client of the balancer (psycopg, as pgbench's clients connect)."""
    return psycopg.connect(
        host=env["PGHOST"],
        hostaddr=env["PGHOSTADDR"],
        port=env["PGPORT"],
        user=env["PGUSER"],
        password=env["PGPASSWORD"],
        dbname=env["PGDATABASE"],
        sslmode=env["PGSSLMODE"],
        sslrootcert=env["PGSSLROOTCERT"],
        connect_timeout=10,
        autocommit=True,
    )


def local_port(conn: psycopg.Connection) -> int:
    """
    The client's port: what the instance serving it logs as its peer
    (from the PROXY header), which tells which instance that is.
    """
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        return int(sock.getsockname()[1])


def served_by(instance: Instance, conn: psycopg.Connection) -> bool:
    return f"open peer=127.0.0.1:{local_port(conn)} " in instance.process.log()


def probe(env: dict[str, str]) -> int:
    """A new client of the balancer, one query: its port (L{local_port})."""
    with client(env) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        return local_port(conn)


def session_on(env: dict[str, str], instance: Instance) -> psycopg.Connection:
    """A session through the balancer that it gave to C{instance}."""
    others = []
    try:
        for _ in range(4):
            conn = client(env)
            if served_by(instance, conn):
                return conn
            others.append(conn)
    finally:
        for conn in others:
            conn.close()
    raise AssertionError(f"HAProxy sent no new client to {instance.name}")


def test_session_mode_ends_only_the_sessions_that_outlive_the_drain(
    deployment: Any, pg_tls: Any, tmp_path: Path
) -> None:
    """
    pgbench's clients keep their sessions; each instance in turn drains:
    its sessions, which outlive shutdown_timeout, get FATAL 57P01 and
    nothing else, the other instance's go on, and a client that connects
    during the drain is served by the other instance.
    """
    d = deployment("session", shutdown_timeout=f"{SESSION_DEADLINE:g}s")
    assert d.haproxy is not None
    haproxy = d.haproxy
    bench = Pgbench(
        pg_tls,
        tmp_path / "pgbench-session",
        d.env(),
        script("session"),
        # It ends when its last client is ended (the second drain); -T is a bound.
        *("-c", "4", "-j", "2", "-T", "60"),
    )
    short: psycopg.Connection | None = None
    try:
        # Round robin: two sessions on each instance, for the whole run.
        eventually(
            lambda: haproxy.sessions() == {"a": 2, "b": 2},
            10,
            f"two sessions on each instance (now {haproxy.sessions()})",
        )
        grows(pg_tls, "session", 0, "pgbench to get going")
        a, b = d.instances
        # A session on a that ends during its drain, before the deadline: untouched.
        short = session_on(d.env(), a)
        for instance, other in [(a, b), (b, a)]:
            run = instance.process
            started = run.signal(signal.SIGTERM)
            eventually(lambda i=instance: i.health() == 503, 5, f"{instance.name} to say draining")
            # The drain began (its listener closed with it): a new client
            # goes to the other instance, whether HAProxy has seen the 503
            # yet or retries a refused connect there.
            port = probe(d.env())
            assert f"open peer=127.0.0.1:{port} " in other.process.log(), other.process.log()[
                -3000:
            ]
            assert f"peer=127.0.0.1:{port} " not in run.log()
            haproxy.wait_status(instance.name, "DOWN")
            assert run.running(), "the drain ended before the test could look at it"
            if instance is a:
                # The other instance's pgbench clients go on meanwhile.
                now = committed(pg_tls, "session")
                grows(pg_tls, "session", now, f"transactions while {instance.name} drains")
                assert short.execute("SELECT 2").fetchone() == (2,)
                short.close()
                assert run.running(), "the drain ended before the test could look at it"
            run.wait_exit(SESSION_DEADLINE + 10)
            took = time.monotonic() - started
            assert SESSION_DEADLINE - 0.3 <= took <= SESSION_DEADLINE + 5, took
            assert_drained_and_exited(run, instance.port)
            log = run.log()
            # On a, pgbench's two sessions and the short one; on b, pgbench's two.
            count = 3 if instance is a else 2
            assert f"shutting down: {count} connections get up to {SESSION_DEADLINE:g}s" in log, (
                log[-3000:]
            )
            assert "shutdown deadline: closing 2 remaining connections (57P01)" in log, log[-3000:]
            instance.start()
            haproxy.wait_status(instance.name, "UP")
        code = bench.wait(20)
    finally:
        bench.close()
        if short is not None:
            short.close()
    report = f"{bench.text()}\n{d.logs()[-5000:]}"
    # HAProxy took each instance out on its /health (503), not on a refused connect.
    for instance in d.instances:
        assert (
            f"Server pgtls/{instance.name} is DOWN, reason: Layer7 wrong status, code: 503"
            in haproxy.log()
        ), haproxy.log()
    assert code == 2, report  # pgbench: some clients were aborted
    assert ended_clients(bench.errors()) == {0, 1, 2, 3}, report
    assert bench.number("number of failed transactions") == 0, report
    processed = bench.number("number of transactions actually processed")
    # A transaction whose END was committed as its session was ended may not have been counted.
    assert processed <= committed(pg_tls, "session") <= processed + 4, report
