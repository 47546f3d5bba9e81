"""
Helpers for the reload and shutdown tests: configuration files written
from the same route tables as L{support.proxy.route}, an in-process proxy
started from such a file (so that C{reloadFromFile} has a file to read),
and C{twist pgtls} as a child process whose log can be read while it runs.

Everything here that touches a socket or a child process blocks: from a
test that runs the reactor, call it with L{deferToThread}.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pgtls_twisted.testing.cluster import SCRAM_PASSWORD, SCRAM_USER
from support import rawclient
from support.proxy import toml_text

BIN = Path(sys.executable).parent

# ---------------------------------------------------------------------------
# Configuration files


def write_config(path: Path, routes: list[dict[str, Any]], **top: Any) -> Path:
    """Write a configuration file with C{routes} as its C{[[proxy]]} tables."""
    data: dict[str, Any] = {"log_level": "info", **top, "proxy": routes}
    path.write_text(toml_text(data))
    return path


def on_port(table: dict[str, Any], port: int) -> dict[str, Any]:
    """C{table} (a route from L{support.proxy.route}) listening on 127.0.0.1:C{port}."""
    table["listener"]["bind_address"] = f"127.0.0.1:{port}"
    return table


# ---------------------------------------------------------------------------
# Sockets and clients


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def refused(port: int) -> bool:
    """Whether a TCP connection to 127.0.0.1:C{port} is refused now."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        # Queued on a listener that was closing: reset, as README says
        # (SO_REUSEPORT); the port is no longer served either way.
        return True
    return False


def accepting(port: int) -> bool:
    return not refused(port)


def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll C{check} until it returns something true (blocking)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout}s: {what or check}")
        time.sleep(0.05)


def wait_for_port(port: int, proxy: ProxyProcess | None = None, timeout: float = 20.0) -> None:
    def up() -> bool:
        if proxy is not None and proxy.proc.poll() is not None:
            raise AssertionError(f"pgtls exited with {proxy.proc.returncode}:\n{proxy.log()}")
        return accepting(port)

    eventually(up, timeout, f"something listens on {port}")


def client_dsn(port: int, pki: Any, dbname: str = "postgres", **extra: Any) -> str:
    """A verify-full libpq DSN for SCRAM_USER through the proxy's port C{port}."""
    params: dict[str, Any] = dict(
        host="localhost",
        port=port,
        dbname=dbname,
        user=SCRAM_USER,
        password=SCRAM_PASSWORD,
        sslmode="verify-full",
        sslrootcert=pki.cert("ca"),
        connect_timeout=10,
    )
    params.update(extra)
    return " ".join(f"{k}={v}" for k, v in params.items() if v is not None)


def served_serial(pki: Any, port: int) -> int:
    """The serial number of the certificate the listener on C{port} shows."""
    from cryptography import x509

    sock = rawclient.request_tls(rawclient.connect(port), pki.cert("ca"))
    try:
        der = sock.getpeercert(binary_form=True)
        assert der is not None
        return int(x509.load_der_x509_certificate(der).serial_number)
    finally:
        sock.close()


def backend_alive(cluster: Any, pid: int) -> bool:
    """Whether the server process C{pid} of C{cluster} still exists."""
    return cluster.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") == "1"


# ---------------------------------------------------------------------------
# twist pgtls as a child process


class ProxyProcess:
    """
    C{twist --log-format text pgtls --config FILE}, its output (stdout and
    stderr) going to a file that L{log} reads while it runs.
    """

    def __init__(self, config: Path, cwd: Path, command: tuple[str, ...] | None = None) -> None:
        if command is None:
            command = ("twist", "--log-format", "text", "pgtls")
        self.logpath = cwd / f"pgtls-{time.monotonic_ns()}.out"
        self._out = open(self.logpath, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [str(BIN / command[0]), *command[1:], "--config", str(config)],
            cwd=cwd,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.logpath.read_text()

    def mark(self) -> int:
        """Where the log ends now, for L{wait_log}'s C{since}."""
        return len(self.log())

    def wait_log(self, text: str, timeout: float = 10.0, since: int = 0) -> str:
        """Wait until C{text} appears in the log after C{since}; the log from there."""
        deadline = time.monotonic() + timeout
        while True:
            tail = self.log()[since:]
            if text in tail:
                return tail
            if self.proc.poll() is not None:
                tail = self.log()[since:]
                if text in tail:
                    return tail
                raise AssertionError(
                    f"pgtls exited ({self.proc.returncode}) without logging {text!r}:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged within {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def signal(self, signum: int) -> float:
        """Send C{signum}; the monotonic time it was sent."""
        self.proc.send_signal(signum)
        return time.monotonic()

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pgtls still running {timeout}s later:\n{self.log()}") from None

    def close(self) -> None:
        """Stop the process if it is still running (SIGKILL: tests that stop it check how)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._out.close()


def ran_until_signal(returncode: int, signum: int = signal.SIGTERM) -> bool:
    """C{twist} exits 0, or re-raises the signal it stopped on."""
    return returncode in (0, -signum)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
