"""
The real-driver matrix of tests/test_drivers.py: which drivers run which
scenarios, what each needs installed, the three proxies (pass-through,
session pool, transaction pool) and the child processes that run a
driver's scenarios through one of them.

Each driver is a program of its own language under tests/drivers/ (Python
through C{run.py}, pgjdbc through C{Matrix.java} compiled here by
C{javac}, node-postgres and postgres.js under C{node/}), run once per
route: it runs all its scenarios and prints one JSON line per scenario
(tests/drivers/harness.py describes the contract), and each line is the
result of one test. The three routes run side by side, each its own
C{twist pgtls} process, each walking the drivers one after the other.

Everything here blocks; the tests that use it do not run the reactor.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgtls_twisted.testing.cluster import APP_DB, SCRAM_PASSWORD, SCRAM_USER
from support.configfile import on_port, write_config
from support.net import free_ports
from support.pooling import pooled_route
from support.processes import ProxyProcess, wait_for_port
from support.proxy import route

#: The programs, and node/ with its package.json (node_modules by `make test`).
PROGRAMS = Path(__file__).resolve().parent.parent / "drivers"
NODE_DIR = PROGRAMS / "node"
NODE_PACKAGES = ("pg", "postgres", "pg-copy-streams")
#: pgjdbc as Debian's libpostgresql-jdbc-java installs it.
JDBC_JAR = Path(os.environ.get("PGTLS_JDBC_JAR", "/usr/share/java/postgresql.jar"))
PYTHON_MODULES = ("psycopg", "psycopg2", "asyncpg", "pg8000", "sqlalchemy")

ROUTES = ("passthrough", "session", "transaction")
ALL = ("many", "pipeline", "copy", "failed_tx", "cancel", "listen", "leak")

#: Scenario settings: clients side by side, and how often each repeats its
#: statements: past every driver's prepare threshold (psycopg and pgjdbc
#: prepare at the 5th or 6th execution; asyncpg, pg8000's prepare(),
#: node-postgres named queries and postgres.js at the first).
CLIENTS = 10
REPEAT = 8
#: The main pools' sizes. A session pool holds a server connection for as
#: long as its client stays connected, and SQLAlchemy's pool keeps up to one
#: connection per thread open: fewer than CLIENTS would leave some waiting
#: for good. The transaction pool shares 5 among them all.
MAX_SIZE = {"session": CLIENTS + 4, "transaction": 5}
#: Seconds a scenario may take before it is reported as stuck: a whole run
#: (7 scenarios at most) stays within pytest's 180 s per test, which is as
#: long as a test may wait for its driver's run.
SCENARIO_TIMEOUT = 15.0


@dataclass(frozen=True)
class Driver:
    """
    @ivar kind: C{"python"}, C{"java"} or C{"node"}: how its program runs.
    @ivar scenarios: those its public API has (no cancel in pg8000 and
        node-postgres; SQLAlchemy has no COPY, cancel or LISTEN of its own).
    """

    name: str
    kind: str
    scenarios: tuple[str, ...]


DRIVERS = {
    d.name: d
    for d in (
        Driver("psycopg", "python", ALL),
        Driver("psycopg2", "python", ("many", "copy", "failed_tx", "cancel", "listen", "leak")),
        Driver("asyncpg", "python", ALL),
        Driver("pg8000", "python", ("many", "copy", "failed_tx", "listen", "leak")),
        Driver("sqlalchemy_psycopg", "python", ("many", "pipeline", "failed_tx", "leak")),
        Driver("sqlalchemy_asyncpg", "python", ("many", "pipeline", "failed_tx", "leak")),
        Driver("pgjdbc", "java", ALL),
        Driver("node_pg", "node", tuple(s for s in ALL if s != "cancel")),
        Driver("postgresjs", "node", ALL),
    )
}


def missing_tools() -> list[str]:
    """What the matrix needs and this machine lacks, said so that it can be fixed."""
    missing = [
        f"Python module {m!r} (the pyproject.toml 'test' extra: make install)"
        for m in PYTHON_MODULES
        if importlib.util.find_spec(m) is None
    ]
    for tool in ("java", "javac", "node"):
        if shutil.which(tool) is None:
            missing.append(f"{tool!r} on PATH (a JDK and Node.js: .ci/run installs them)")
    if not JDBC_JAR.is_file():
        missing.append(f"{JDBC_JAR} (apt-get install libpostgresql-jdbc-java, as .ci/run does)")
    for package in NODE_PACKAGES:
        if not (NODE_DIR / "node_modules" / package / "package.json").is_file():
            missing.append(f"npm package {package!r} in {NODE_DIR} (make test runs npm ci)")
    return missing


def compile_java(out: Path) -> str:
    """Compile Matrix.java into C{out} with javac; the classpath to run it."""
    result = subprocess.run(
        ["javac", "-cp", str(JDBC_JAR), "-d", str(out), str(PROGRAMS / "Matrix.java")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise RuntimeError(f"javac failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return f"{out}{os.pathsep}{JDBC_JAR}"


@dataclass
class Outcome:
    ok: bool
    error: str | None
    seconds: float


@dataclass
class RouteProxy:
    """One route's C{twist pgtls}: its main port and one leak port per driver."""

    mode: str
    process: ProxyProcess
    port: int
    leak_ports: dict[str, int]


def start_route(mode: str, pki: Any, cluster: Any, directory: Path) -> RouteProxy:
    """
    C{twist pgtls} with route C{main} in front of C{cluster} (pass-through,
    or a pool of C{mode} of C{MAX_SIZE}) and a route per driver for its
    leak scenario (pools of max_size 1: client B gets client A's server
    connection). A leak route per driver, so one driver's leak cannot
    reach the next driver's client A.
    """

    def table(name: str, max_size: int) -> dict[str, Any]:
        if mode == "passthrough":
            return route(pki, cluster, name=name)
        t = pooled_route(pki, cluster, mode=mode, max_size=max_size)
        t["name"] = name
        return t

    ports = free_ports(1 + len(DRIVERS))
    leak_ports = dict(zip(DRIVERS, ports[1:], strict=True))
    routes = [on_port(table("main", MAX_SIZE.get(mode, 0)), ports[0])]
    routes += [on_port(table(f"leak-{d}", max_size=1), p) for d, p in leak_ports.items()]
    directory.mkdir(parents=True, exist_ok=True)
    config = write_config(directory / "pgtls.toml", routes)
    process = ProxyProcess(config, directory, logpath=directory / "pgtls.log")
    try:
        for port in ports:
            wait_for_port(port, process)
    except BaseException:
        process.close()
        raise
    return RouteProxy(mode, process, ports[0], leak_ports)


def command(driver: Driver, java_classpath: str) -> list[str]:
    if driver.kind == "python":
        return [sys.executable, str(PROGRAMS / "run.py"), driver.name]
    if driver.kind == "java":
        return ["java", "-cp", java_classpath, "Matrix"]
    return ["node", str(NODE_DIR / f"{driver.name}.js")]


def run_driver(
    driver: Driver, proxy: RouteProxy, pki: Any, java_classpath: str
) -> dict[str, Outcome]:
    """
    Run C{driver}'s program through C{proxy}: an outcome per scenario. One
    that the program never reported (it crashed, or was killed at its
    deadline) fails with what the program printed.
    """
    index = list(DRIVERS).index(driver.name)
    env = dict(
        os.environ,
        MATRIX_DRIVER=driver.name,
        MATRIX_HOST="localhost",
        MATRIX_PORT=str(proxy.port),
        MATRIX_LEAK_PORT=str(proxy.leak_ports[driver.name]),
        MATRIX_DB=APP_DB,
        MATRIX_USER=SCRAM_USER,
        MATRIX_PASSWORD=SCRAM_PASSWORD,
        MATRIX_CA=str(pki.cert("ca")),
        MATRIX_PREFIX=f"drv_{driver.name}_{proxy.mode}",
        MATRIX_LOCK_KEY=str(7000 + 100 * ROUTES.index(proxy.mode) + index),
        MATRIX_SCENARIOS=",".join(driver.scenarios),
        MATRIX_CLIENTS=str(CLIENTS),
        MATRIX_REPEAT=str(REPEAT),
        MATRIX_TIMEOUT=str(SCENARIO_TIMEOUT),
    )
    env.pop("PYTHONPATH", None)
    deadline = SCENARIO_TIMEOUT * len(driver.scenarios) + 30
    try:
        done = subprocess.run(
            command(driver, java_classpath),
            capture_output=True,
            text=True,
            env=env,
            cwd=PROGRAMS,
            timeout=deadline,
            stdin=subprocess.DEVNULL,
        )
        stdout, stderr, status = done.stdout, done.stderr, f"exited {done.returncode}"
    except subprocess.TimeoutExpired as e:
        stdout, stderr = _text(e.stdout), _text(e.stderr)
        status = f"killed after {deadline:g}s"
    outcomes: dict[str, Outcome] = {}
    for line in stdout.splitlines():
        report = _report(line)
        if report is not None:
            outcomes[report["scenario"]] = Outcome(
                bool(report["ok"]), report.get("error"), float(report.get("seconds", 0))
            )
    for scenario in driver.scenarios:
        if scenario not in outcomes:
            tail = (stdout + stderr)[-3000:]
            outcomes[scenario] = Outcome(False, f"no report: the program {status}:\n{tail}", 0.0)
    return outcomes


def _report(line: str) -> dict[str, Any] | None:
    """A scenario's report, or C{None} for anything else a driver printed (notices)."""
    if not line.startswith('{"scenario"'):
        return None
    try:
        report = json.loads(line)
    except ValueError:
        return None
    return report if isinstance(report, dict) and "ok" in report else None


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


class Matrix:
    """
    The proxies of the routes the C{wanted} (driver, route) pairs use, and
    those pairs' runs, started at once: a route's runs one after the other
    (so that a cell's failure is its driver's alone), the routes side by
    side.
    """

    def __init__(
        self, pki: Any, cluster: Any, directory: Path, wanted: list[tuple[str, str]]
    ) -> None:
        self.directory = directory
        self.java_classpath = compile_java(directory / "classes")
        self.proxies: dict[str, RouteProxy] = {}
        try:
            for mode in ROUTES:
                if any(m == mode for _, m in wanted):
                    self.proxies[mode] = start_route(mode, pki, cluster, directory / mode)
        except BaseException:
            for proxy in self.proxies.values():
                proxy.process.close()
            raise
        self._seconds: dict[tuple[str, str], float] = {}
        self._executors = {mode: ThreadPoolExecutor(1, f"matrix-{mode}") for mode in self.proxies}
        self._runs: dict[tuple[str, str], Future[dict[str, Outcome]]] = {
            (name, mode): self._executors[mode].submit(self._run, name, mode, pki)
            for name, mode in wanted
        }

    def _run(self, driver: str, mode: str, pki: Any) -> dict[str, Outcome]:
        start = time.monotonic()
        try:
            return run_driver(DRIVERS[driver], self.proxies[mode], pki, self.java_classpath)
        finally:
            self._seconds[(driver, mode)] = round(time.monotonic() - start, 3)

    def outcome(self, driver: str, mode: str, scenario: str) -> Outcome:
        """The cell's outcome, once its driver's run through C{mode} is over."""
        return self._runs[(driver, mode)].result(timeout=900)[scenario]

    def timings(self) -> dict[str, Any]:
        """Seconds per finished run and per scenario, for the report written at L{close}."""
        report: dict[str, Any] = {}
        for (driver, mode), future in self._runs.items():
            if future.done() and not future.cancelled() and future.exception() is None:
                outcomes = future.result()
                report[f"{driver}-{mode}"] = {
                    "seconds": self._seconds.get((driver, mode)),
                    **{name: {"ok": o.ok, "seconds": o.seconds} for name, o in outcomes.items()},
                }
        return report

    def log(self, mode: str) -> Path:
        return self.proxies[mode].process.logpath

    def close(self) -> None:
        for future in self._runs.values():
            future.cancel()
        for executor in self._executors.values():
            executor.shutdown(wait=True)
        for proxy in self.proxies.values():
            proxy.process.stop()
        (self.directory / "report.json").write_text(json.dumps(self.timings(), indent=1))
