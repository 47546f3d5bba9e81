"""
A real load balancer in front of real pgtls processes, for the rolling
deploy tests (issue 15, item 3): Debian's HAProxy in TCP mode as a child
process in the foreground, on loopback ports, sending PROXY protocol v2
headers and checking every instance's C{/health}, and C{twist pgtls}
instances it balances over, each restartable on the same ports.

Everything here blocks: the tests that use it are plain blocking tests
(pgtls and HAProxy are other processes), as in L{support.supervised}.

HAProxy missing is an error, never a skip: C{.ci/run} installs it.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.admin import http_get
from support.configfile import write_config
from support.net import free_ports
from support.processes import ProxyProcess, ran_until_signal, wait_for_port
from support.waiting import eventually

#: Where Debian's package puts it (C{/usr/sbin} is not on every PATH).
HAPROXY_DEFAULT = "/usr/sbin/haproxy"


def haproxy_path() -> str:
    """
    The HAProxy executable.

    @raise RuntimeError: there is none (install Debian's C{haproxy}, as
        C{.ci/run} does): the rolling deploy tests must not pass unrun.
    """
    found = shutil.which("haproxy") or (
        HAPROXY_DEFAULT if os.access(HAPROXY_DEFAULT, os.X_OK) else None
    )
    if found is None:
        raise RuntimeError(
            "HAProxy not found (neither on PATH nor at /usr/sbin/haproxy): "
            "install Debian's 'haproxy' package (.ci/run does)"
        )
    return found


# -- pgtls instances -------------------------------------------------------------------


@dataclass
class Instance:
    """
    One pgtls instance (C{twist pgtls}, one process) with a fixed client
    port and metrics port, so that it can be stopped and started again
    where the balancer expects it. Every start logs to a file of its own.

    @ivar runs: every process started, the current one last.
    """

    name: str
    directory: Path
    routes: list[dict[str, Any]]
    top: dict[str, Any]
    port: int
    metrics_port: int
    runs: list[ProxyProcess] = field(default_factory=list)

    @property
    def process(self) -> ProxyProcess:
        return self.runs[-1]

    def start(self) -> ProxyProcess:
        """Start a new process; return it once it listens and says it is healthy."""
        self.directory.mkdir(parents=True, exist_ok=True)
        config = write_config(self.directory / "pgtls.toml", self.routes, **self.top)
        run = ProxyProcess(
            config, self.directory, logpath=self.directory / f"pgtls-{len(self.runs)}.log"
        )
        self.runs.append(run)
        wait_for_port(self.port, run)
        eventually(
            lambda: run.check_running() or self.health() == 200,
            20,
            f"{self.name}'s /health to say ok",
        )
        return run

    def health(self) -> int | None:
        """C{/health}'s status now (C{None}: nothing answers)."""
        try:
            return http_get(self.metrics_port, "/health")[0]
        except OSError:
            return None

    def close(self) -> None:
        for run in self.runs:
            run.close()


def make_instance(name: str, directory: Path, route: dict[str, Any], **top: Any) -> Instance:
    """
    An instance serving C{route} (a table of L{support.proxy.route}) on a
    free port of its own, its metrics on another, behind a balancer on
    this host: PROXY protocol from 127.0.0.0/8 only.
    """
    port, metrics = free_ports(2)
    table = {**route, "listener": dict(route["listener"])}
    table["listener"].update(
        bind_address=f"127.0.0.1:{port}",
        proxy_protocol=True,
        proxy_trusted=["127.0.0.0/8"],
    )
    top = {"metrics": {"bind_address": f"127.0.0.1:{metrics}"}, **top}
    return Instance(name, directory, [table], top, port, metrics)


# -- HAProxy ---------------------------------------------------------------------------

#: How often HAProxy checks every instance's /health: it sees a drain
#: within one interval (C{fall 1}) and a restarted instance within two.
CHECK_INTERVAL_MS = 200


def haproxy_config(port: int, stats: Path, instances: list[Instance]) -> str:
    """
    HAProxy's configuration: TCP mode, PROXY protocol v2 to every
    instance, C{/health} checked on the metrics port, and a refused
    connect retried on another instance at once (C{option redispatch 1}:
    every retry may go elsewhere, not only the last).
    """
    servers = "\n".join(
        f"    server {i.name} 127.0.0.1:{i.port} check port {i.metrics_port}" for i in instances
    )
    return f"""\
global
    stats socket {stats} mode 600 level admin
    log stderr format raw local0 info

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout check 1s
    retries 3
    option redispatch 1

frontend pg
    bind 127.0.0.1:{port}
    default_backend pgtls

backend pgtls
    balance roundrobin
    option httpchk GET /health
    http-check expect status 200
    default-server inter {CHECK_INTERVAL_MS}ms fall 1 rise 2 send-proxy-v2
{servers}
"""


class HAProxy:
    """
    HAProxy in the foreground (C{-db}: no daemon, no pid file), balancing
    over C{instances}, its stats socket and log in C{directory}.

    @ivar port: where clients connect.
    """

    def __init__(self, directory: Path, instances: list[Instance]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (self.port,) = free_ports(1)
        self.stats = directory / "haproxy.sock"
        self.config = directory / "haproxy.cfg"
        self.config.write_text(haproxy_config(self.port, self.stats, instances))
        self.logpath = directory / "haproxy.log"
        exe = haproxy_path()
        checked = subprocess.run(
            [exe, "-c", "-f", str(self.config)], capture_output=True, text=True, timeout=30
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        with open(self.logpath, "ab") as out:
            self.proc = subprocess.Popen(
                [exe, "-db", "-f", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=directory,
            )
        # Up when its runtime API answers (no test connection through it:
        # that would move its round robin on).
        eventually(self._answers, 10, "HAProxy's stats socket to answer")

    def _answers(self) -> bool:
        self.check_running()
        try:
            return "pgtls" in self.command("show stat")
        except OSError:
            return False

    def log(self) -> str:
        try:
            return self.logpath.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def command(self, line: str) -> str:
        """One command on the stats socket (the runtime API); its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """Each instance's row of C{show stat} (HAProxy's CSV statistics), by name."""
        text = self.command("show stat").lstrip("# ")
        return {
            r["svname"]: r
            for r in csv.DictReader(text.splitlines())
            if r["pxname"] == "pgtls" and r["svname"] not in ("FRONTEND", "BACKEND")
        }

    def statuses(self) -> dict[str, str]:
        """Each instance's status as HAProxy sees it now (C{UP}, C{DOWN}, C{UP 1/2}, ...)."""
        return {name: row["status"] for name, row in self.servers().items()}

    def sessions(self) -> dict[str, int]:
        """Each instance's connections through HAProxy now (C{scur})."""
        return {name: int(row["scur"]) for name, row in self.servers().items()}

    def wait_status(self, name: str, status: str, timeout: float = 10.0) -> None:
        """Until HAProxy's status of instance C{name} is C{status} (C{UP}, C{DOWN})."""
        self.check_running()
        eventually(
            lambda: self.statuses().get(name) == status,
            timeout,
            f"HAProxy to see {name} {status} (now {self.statuses()})",
            interval=0.02,
        )

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"HAProxy exited with {self.proc.returncode}:\n{self.log()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # a hard stop: no waiting for connections
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def drain_and_wait(instance: Instance, timeout: float) -> tuple[int, float, float]:
    """
    SIGTERM to C{instance}'s process and wait for it to exit: its exit
    status, when the signal was sent and when it had exited (monotonic).
    """
    run = instance.process
    sent = run.signal(signal.SIGTERM)
    code = run.wait_exit(timeout)
    assert ran_until_signal(code), run.log()
    return code, sent, time.monotonic()


# -- pgbench ---------------------------------------------------------------------------


def pgbench_path(cluster: Any) -> str:
    """pgbench: the cluster's own (same major version), else the one on PATH; an error if none."""
    own = Path(cluster.bindir) / "pgbench"
    if os.access(own, os.X_OK):
        return str(own)
    found = shutil.which("pgbench")
    if found is None:
        raise RuntimeError("pgbench not found: install Debian's 'postgresql-client' package")
    return found


class Pgbench:
    """
    pgbench as a child process, through the balancer: a custom script,
    TLS (C{verify-full} against the suite's CA, as the suite's clients),
    its output in files.
    """

    def __init__(
        self,
        cluster: Any,
        directory: Path,
        env: dict[str, str],
        script: str,
        *args: str,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.script = directory / "script.sql"
        self.script.write_text(script)
        self.outpath, self.errpath = directory / "pgbench.out", directory / "pgbench.err"
        self.argv = [pgbench_path(cluster), "-n", "-f", str(self.script), *args]
        with open(self.outpath, "wb") as out, open(self.errpath, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **env},
                cwd=directory,
            )

    def running(self) -> bool:
        return self.proc.poll() is None

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"pgbench ended too early ({self.proc.returncode}):\n{self.text()}"
            )

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"pgbench still running {timeout}s later:\n{self.text()}"
            ) from None

    def output(self) -> str:
        return self.outpath.read_text(errors="replace")

    def errors(self) -> str:
        return self.errpath.read_text(errors="replace")

    def text(self) -> str:
        return f"$ {' '.join(self.argv)}\n{self.output()}\n-- stderr:\n{self.errors()}"

    def number(self, label: str) -> int:
        """A count from pgbench's summary (C{number of failed transactions}, ...)."""
        for line in self.output().splitlines():
            if line.startswith(label + ":"):
                return int(line.split(":", 1)[1].split()[0])
        raise AssertionError(f"no {label!r} in pgbench's summary:\n{self.text()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
