"""
pgtls with C{workers = N} as a user runs it: C{twist pgtls --config FILE}
in a child process (the supervisor), which starts the workers; its
processes as /proc shows them, its metrics, and clients that find out
which worker serves them.

The tests that use this are plain blocking tests: the proxy is another
process, so psycopg can be called directly. Which worker serves a session
is found from the client's socket: the worker process that holds its
other end (L{worker_of}, through /proc). (The PID a client sees is the
backend's own in pass-through mode; the worker is in its secret key,
which libpq does not show.)
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psycopg

from pgtls_twisted.testing.cluster import SCRAM_USER
from support.configfile import write_config
from support.dsn import app_dsn
from support.net import free_ports
from support.pooling import pooled_route
from support.processes import ProxyProcess
from support.proxy import route
from support.waiting import eventually

_STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


# -- /proc -----------------------------------------------------------------------------


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def alive(pid: int) -> bool:
    """Whether C{pid} exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def worker_processes(run_dir: str | None = None) -> dict[int, int]:
    """
    Live C{pgtls_twisted worker} processes found in /proc, as pid to
    worker index; only those of C{run_dir} if given.
    """
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        args = cmdline(int(entry.name))
        if "pgtls_twisted" not in args or "worker" not in args:
            continue
        if run_dir is not None and run_dir not in args:
            continue
        if not alive(int(entry.name)):
            continue
        found[int(entry.name)] = int(args[args.index("--index") + 1])
    return found


# -- metrics ---------------------------------------------------------------------------


class Scrape:
    """One C{/metrics} page, parsed with prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        self.text = text
        self.families = list(text_string_to_metric_families(text))
        self.samples = [s for f in self.families for s in f.samples]

    def find(self, name: str, **labels: str) -> list[Any]:
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def total(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.find(name, **labels))

    def workers(self, name: str, **labels: str) -> set[str]:
        return {s.labels.get("worker") for s in self.find(name, **labels)}


# -- the process -----------------------------------------------------------------------


class Supervised:
    """
    C{twist pgtls --config FILE} with C{workers} > 1, its log in a file.

    @ivar ports: route name to its (fixed) port.
    """

    def __init__(
        self,
        tmp_path: Path,
        routes: list[dict[str, Any]],
        metrics_port: int,
        **top: Any,
    ) -> None:
        self.tmp_path = tmp_path
        self.config_path = tmp_path / "pgtls.toml"
        self.log_path = tmp_path / "pgtls.log"
        self.metrics_port = metrics_port
        self.top = {"metrics": {"bind_address": f"127.0.0.1:{metrics_port}"}, **top}
        self.routes = routes
        self.write(routes)
        self.process: ProxyProcess | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen_pids: set[int] = set()

    def write(self, routes: list[dict[str, Any]], **top: Any) -> None:
        """(Re)write the configuration file."""
        write_config(self.config_path, routes, **{**self.top, **top})

    @property
    def ports(self) -> dict[str, int]:
        return {
            r["name"]: int(r["listener"]["bind_address"].rsplit(":", 1)[1]) for r in self.routes
        }

    def start(self, workers: Iterable[str] = ("0", "1")) -> None:
        self.process = ProxyProcess(self.config_path, self.tmp_path, logpath=self.log_path)
        self.proc = self.process.proc
        self.wait_ready(workers)

    def wait_ready(self, workers: Iterable[str] = ("0", "1"), timeout: float = 20.0) -> Scrape:
        """Until every worker serves every route (its metrics list them)."""
        wanted = set(workers)

        def ready() -> Scrape | None:
            self.check_running()
            try:
                scrape = self.scrape(timeout=2)
            except OSError:
                return None
            for name in self.ports:
                if not wanted <= scrape.workers(
                    "pgtls_client_connections_accepted_total", route=name
                ):
                    return None
            return scrape

        return eventually(ready, timeout, "every worker to serve every route", interval=0.1)

    def check_running(self) -> None:
        assert self.process is not None
        self.process.check_running()

    def log(self) -> str:
        return self.process.log() if self.process is not None else ""

    def started_workers(self) -> list[tuple[int, int]]:
        """Every C{worker N started (pid P)} log line so far, as (N, P)."""
        return [(int(n), int(p)) for n, p in _STARTED.findall(self.log())]

    def worker_pids(self) -> dict[int, int]:
        """Worker index to the pid of its latest start."""
        pids = dict(self.started_workers())
        self.seen_pids.update(pids.values())
        return pids

    def run_dir(self) -> str:
        match = re.search(r"run directory (\S+?)\)", self.log())
        assert match, self.log()
        return match.group(1)

    def scrape(self, timeout: float = 10.0) -> Scrape:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return Scrape(response.read().decode())

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait; SIGKILL whatever is left (supervisor and workers)."""
        if self.process is None:
            return None
        self.worker_pids()
        code = self.process.stop(timeout)
        self.kill_leftovers()
        return code

    def kill_leftovers(self) -> None:
        """SIGKILL worker processes this supervisor started that are still alive."""
        for pid in self.seen_pids:
            if alive(pid) and "worker" in cmdline(pid) and str(self.config_path) in cmdline(pid):
                os.kill(pid, signal.SIGKILL)


# -- a supervisor with two workers, and its clients -----------------------------------


#: The shutdown_timeout of L{start_supervised}'s configuration, in seconds.
SHUTDOWN_TIMEOUT = 2.0
#: What PostgreSQL says to a cancelled statement.
CANCELED = "canceling statement due to user request"


def _tcp_inode(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The inode of the IPv4 TCP socket from C{local} to C{remote} (/proc/net/tcp)."""

    def encoded(address: tuple[str, int]) -> str:
        # /proc/net/tcp: the address as a host-order 32-bit number, in hex.
        ip = socket.inet_aton(address[0])[::-1].hex().upper()
        return f"{ip}:{address[1]:04X}"

    wanted = (encoded(local), encoded(remote))
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if (fields[1], fields[2]) == wanted:
            return int(fields[9])
    return None


def worker_of(conn: psycopg.Connection) -> int:
    """
    The worker serving C{conn}: the worker process holding the proxy's end
    of its connection (found by socket inode in /proc).
    """
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        mine, theirs = sock.getsockname()[:2], sock.getpeername()[:2]
    inode = _tcp_inode(theirs, mine)
    assert inode is not None, f"no socket of pgtls's from {theirs} to {mine}"
    link = f"socket:[{inode}]"
    for pid, index in worker_processes().items():
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == link:
                    return index
            except OSError:
                continue
    raise AssertionError(f"no worker process holds {link}")


def routes_for(pki: Any, cluster: Any, ports: list[int]) -> list[dict[str, Any]]:
    """A pass-through route "app" and a transaction-pool route "pool"."""
    app = route(pki, cluster, name="app", listener={"bind_address": f"127.0.0.1:{ports[0]}"})
    pool = pooled_route(pki, cluster, max_size=30)
    pool["name"] = "pool"
    pool["listener"]["bind_address"] = f"127.0.0.1:{ports[1]}"
    return [app, pool]


def start_supervised(pki: Any, cluster: Any, directory: Any) -> Supervised:
    """
    pgtls with two workers in front of C{cluster} (L{routes_for}, the
    console on), started in C{directory}: every worker serves every route.
    """
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


def connect(proxy: Supervised, pki: Any, name: str = "app", **extra: Any) -> psycopg.Connection:
    return psycopg.connect(app_dsn(proxy.ports[name], pki, **extra), autocommit=True)


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
    eventually(
        lambda: all(
            conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.ACTIVE
            for conn in sessions
        ),
        10,
        "every query to be sent",
    )
    time.sleep(0.5)  # and to reach the server
    started = time.monotonic()
    for conn in sessions:
        conn.cancel()
    runner.join(20)
    assert time.monotonic() - started < 10
    assert all(isinstance(r, str) and CANCELED in r for r in results), results
    for conn in sessions:
        assert conn.execute("SELECT 1").fetchone() == (1,)
