"""
pgtls as a user runs it: C{twist pgtls} and C{twistd pgtls} (in the
foreground or daemonized) as child processes of the test, from this
virtualenv's console scripts.

Everything here blocks: a test that runs the reactor calls it with
L{support.waiting.in_thread}. Tests whose proxy is another process are
plain blocking tests, and call it directly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from support.configfile import on_port, write_config
from support.net import accepting, free_port
from support.proxy import route
from support.waiting import eventually

#: Where this virtualenv's console scripts (C{twist}, C{twistd}) are.
BIN = Path(sys.executable).parent

#: How the suite runs pgtls unless a test says otherwise.
TWIST = ("twist", "--log-format", "text", "pgtls")


def command(program: str, *args: str) -> list[str]:
    """The argument list that runs this virtualenv's C{program} with C{args}."""
    return [str(BIN / program), *args]


def run(program: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """
    Run C{program} (C{twist}, C{twistd}) to completion: its output, as text.
    C{kwargs} go to L{subprocess.run}; it times out after 30 seconds.
    """
    kwargs.setdefault("timeout", 30)
    return subprocess.run(command(program, *args), capture_output=True, text=True, **kwargs)


def pgtls_cli(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """
    Run C{python -m pgtls_twisted ARGS} (C{check}, C{admin-verifier}, ...)
    to completion: its output, as text. C{kwargs} go to L{subprocess.run};
    it times out after 60 seconds.
    """
    kwargs.setdefault("timeout", 60)
    env = dict(os.environ, PYTHONPATH="")
    return subprocess.run(
        [sys.executable, "-m", "pgtls_twisted", *args],
        capture_output=True,
        text=True,
        env=env,
        **kwargs,
    )


class ProxyProcess:
    """
    C{twist --log-format text pgtls --config FILE} (or another C{command})
    as a child process, its output going to a file that L{log} reads while
    it runs.

    @ivar proc: the process.
    @ivar logpath: its output: stdout, and stderr too unless C{stderr_apart}.
    @ivar errpath: its stderr, if C{stderr_apart}.
    """

    def __init__(
        self,
        config: Path,
        cwd: Path,
        command: tuple[str, ...] = TWIST,
        *,
        logpath: Path | None = None,
        stderr_apart: bool = False,
    ) -> None:
        self.logpath = logpath or cwd / f"pgtls-{time.monotonic_ns()}.out"
        self.errpath = self.logpath.with_suffix(".err") if stderr_apart else None
        # Unbuffered, so the log says what happened so far while it runs.
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.logpath, "ab") as out:
            err = open(self.errpath, "ab") if self.errpath else None  # noqa: SIM115
            try:
                self.proc = subprocess.Popen(
                    [str(BIN / command[0]), *command[1:], "--config", str(config)],
                    cwd=cwd,
                    stdout=out,
                    stderr=err or subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
            finally:
                if err is not None:
                    err.close()
        self.pid = self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def log(self) -> str:
        """Its output so far."""
        try:
            return self.logpath.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def errors(self) -> str:
        """Its stderr so far (with C{stderr_apart}; otherwise it is in L{log})."""
        assert self.errpath is not None, "stderr goes to the log"
        return self.errpath.read_text(errors="replace")

    def mark(self) -> int:
        """Where the log ends now, for L{wait_log}'s C{since}."""
        return len(self.log())

    def wait_log(self, text: str, timeout: float = 10.0, since: int = 0) -> str:
        """Wait until C{text} appears in the log after C{since}; the log from there."""

        def logged() -> str | None:
            exited = self.proc.poll() is not None  # first: then the log read next is complete
            tail = self.log()[since:]
            if text in tail:
                return tail
            if exited:
                raise AssertionError(
                    f"pgtls exited ({self.proc.returncode}) without logging {text!r}"
                )
            return None

        try:
            return str(eventually(logged, timeout, f"{text!r} logged"))
        except AssertionError as e:
            raise AssertionError(f"{e}:\n{self.log()}") from None

    def check_running(self) -> None:
        """
        @raise AssertionError: it has exited (with its log in the message).
        """
        if self.proc.poll() is not None:
            raise AssertionError(f"pgtls exited with {self.proc.returncode}:\n{self.log()}")

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

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, as a service manager stops it; SIGKILL after C{timeout}. Its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def close(self) -> None:
        """Kill it if it is still running (SIGKILL: tests that stop it check how)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def wait_for_port(port: int, proxy: ProxyProcess | None = None, timeout: float = 20.0) -> None:
    """Wait until something listens on C{port}; fail at once if C{proxy} exits meanwhile."""

    def up() -> bool:
        if proxy is not None:
            proxy.check_running()
        return accepting(port)

    eventually(up, timeout, f"something listens on {port}")


def ran_until_signal(returncode: int | None, signum: int = signal.SIGTERM) -> bool:
    """C{twist} exits 0, or re-raises the signal it stopped on."""
    return returncode in (0, -signum)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def daemon(config: Path, cwd: Path) -> tuple[int, Path, Path]:
    """
    C{twistd --pidfile --logfile pgtls --config FILE}: a daemon, as an
    init script starts it. Its pid (once it wrote its pid file), pid file
    and log file.
    """
    pidfile, logfile = cwd / "pgtls.pid", cwd / "pgtls.log"
    subprocess.run(
        command(
            "twistd",
            "--pidfile",
            str(pidfile),
            "--logfile",
            str(logfile),
            "pgtls",
            "--config",
            str(config),
        ),
        cwd=cwd,
        check=True,
        timeout=30,
    )
    eventually(pidfile.exists, 10, "the pid file")
    return int(pidfile.read_text()), pidfile, logfile


def run_pgtls(
    command: tuple[str, ...] | list[str],
    tmp_path: Path,
    pki: Any,
    cluster: Any,
    clients: Callable[[int], None],
    **top: Any,
) -> tuple[str, str, int]:
    """
    Start C{command} on one route in front of C{cluster} with C{top} as
    the rest of its configuration, run C{clients(port)} against it, stop
    it with SIGTERM: its stdout, stderr and exit status.
    """
    port = free_port()
    path = write_config(tmp_path / "pgtls.toml", [on_port(route(pki, cluster), port)], **top)
    proc = ProxyProcess(path, tmp_path, tuple(command), stderr_apart=True)
    try:
        wait_for_port(port, proc)
        clients(port)
    finally:
        proc.stop()
    out, err = proc.log(), proc.errors()
    assert ran_until_signal(proc.returncode), (proc.returncode, out, err)
    return out, err, proc.returncode
