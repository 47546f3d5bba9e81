"""
The pgtls benchmark suite (issue 6): pgtls against direct PostgreSQL and
PgBouncer on this machine, with the same TLS on every hop.

Run it as C{bench/run} (see C{bench/run --help}); this module is its body.
One run:

 1. makes a throwaway PKI and a PostgreSQL cluster with TLS
    (L{pgtls_twisted.testing}), and C{pgbench -i} at a small scale;
 2. starts pgtls (C{.venv/bin/twist pgtls}, a separate process) with three
    routes, pass-through, session pool and transaction pool, each with
    client TLS required and C{verify-full} TLS to the backend; and
    PgBouncer with a session-mode and a transaction-mode database, client
    TLS required with the same certificate, C{server_tls_sslmode =
    verify-full} to the same backend. For the connection-rate case only
    (issue 13), a second pair in which neither proxy asks the server about
    a login: a pgtls transaction pool with C{identity = "client"}, its
    login cache warmed by one login before each run, and a PgBouncer
    whose C{auth_file} holds the user's SCRAM secret from C{pg_authid};
 3. runs pgbench against every target, interleaved: each round runs every
    case on every target (in an order rotated per round), so that machine
    noise hits every target alike, and the medians over rounds are
    reported;
 4. measures resources on fresh proxy processes: RSS with 1,000 and 5,000
    idle logged-in TLS clients, and RSS growth while one client reads a
    1 GB result slowly (flow control);
 5. optionally (C{--profile}) profiles pgtls with cProfile under
    C{pgbench -S -c 16} on each route;
 6. writes the raw pgbench output, a JSON file of every number and a
    markdown report under C{bench/results/<date>/}, and (for a full,
    unfiltered run) C{bench/RESULTS.md}.

Every server runs on 127.0.0.1 only, every load is bounded in time, and
everything started is stopped at the end, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgtls_twisted.testing.cluster import (
    APP_DB,
    POOL_PASSWORD,
    POOL_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
    PostgresCluster,
)
from pgtls_twisted.testing.pki import make_pki

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV_BIN = Path(sys.executable).parent
SERVER_OS_USER = "postgres"

#: Server connections per pool, the same for pgtls and PgBouncer. Session
#: pools must cover the largest client count (64), or clients would wait.
SESSION_POOL_SIZE = 80
TX_POOL_SIZE = 20

#: What pgtls and PgBouncer allow at once (the idle-client figure needs 5,000).
MAX_CLIENTS = 6000


# -- cases and targets ------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    clients: int
    args: tuple[str, ...]
    #: Also run on the workers = 2 pgtls, when workers exist.
    workers: bool = False
    description: str = ""


#: pgbench's cases. C{-M prepared} (named prepared statements, issue 12) runs
#: at -c 1 and -c 16 only, and is compared with the same target's unnamed
#: statements (-M extended, -M simple) at the same client count.
CASES = [
    Case(
        f"S-{mode}-c{c}", c, ("-S", "-M", mode), workers=c >= 16, description=f"-S -M {mode} -c {c}"
    )
    for mode in ("simple", "extended", "prepared")
    for c in (1, 16, 64)
    if mode != "prepared" or c <= 16
] + [
    Case("tpcb-c16", 16, (), description="TPC-B-like (default script) -c 16"),
    Case("connect-S-c8", 8, ("-C", "-S"), description="-C -S -c 8 (new TLS connection per tx)"),
]

SMOKE_CASES = ("S-simple-c1", "S-extended-c16", "S-prepared-c16", "tpcb-c16", "connect-S-c8")

#: What PostgreSQL says when a client's named statement went to another
#: server connection than the one it was prepared on: a pooler without
#: prepared-statement support in transaction mode.
NAMED_STATEMENT_ERROR = re.compile(r'prepared statement "[^"]*" (?:already exists|does not exist)')


@dataclass
class Target:
    name: str
    port: int
    database: str
    #: Which process's CPU and RSS to report ("pgtls", "pgtls-w2", "pgbouncer", None).
    proxy: str | None
    #: The PgBouncer target this one is compared with.
    baseline: str | None
    workers: bool = False
    #: Keeps a client's named prepared statements (C{-M prepared}); a
    #: target without them fails that case, and the cell says unsupported.
    prepared: bool = True
    #: Glob patterns of the cases this target runs.
    cases: tuple[str, ...] = ("*",)
    #: One login through the target before each run: it warms a login
    #: cache (C{identity = "client"}), so that the run measures warm logins.
    warm: bool = False


@dataclass
class Run:
    case: str
    target: str
    round: int
    tps: float | None = None
    lat_avg_ms: float | None = None
    lat_p99_ms: float | None = None
    proxy_cpu_pct: float | None = None
    proxy_sys_pct: float | None = None
    proxy_us_per_tx: float | None = None
    transactions: int | None = None
    failed: int = 0
    error: str | None = None
    #: The run failed because the target has no named prepared statements.
    unsupported: bool = False
    #: The server's C{connection authorized} log lines during the run
    #: (C{--log-connections}): every server login, whoever made it.
    server_logins: int | None = None
    server_logins_per_ktx: float | None = None


@dataclass
class Bench:
    args: argparse.Namespace
    base: Path
    out: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    resources: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    cluster: PostgresCluster | None = None
    targets: list[Target] = field(default_factory=list)
    workers: bool = False
    pki: Any = None
    pgbouncer: str = "pgbouncer"
    ports: dict[str, int] = field(default_factory=dict)
    ports2: dict[str, int] = field(default_factory=dict)
    portsBase: dict[str, int] = field(default_factory=dict)
    bouncerPort: int = 0
    #: pgtls with the C{identity = "client"} transaction pool (issue 13).
    clientPort: int = 0
    #: PgBouncer whose auth_file holds the SCRAM secret, not the password.
    bouncerScramPort: int = 0
    #: PgBouncer's version, as (major, minor).
    bouncerVersion: tuple[int, int] = (0, 0)


# -- small helpers ----------------------------------------------------------------


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(
    port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout:g}s")


def tree(pid: int) -> list[int]:
    """C{pid} and its descendants (a pgtls with workers is several processes)."""
    pids = [pid]
    for p in pids:
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    pids.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return pids


def rss_kib(pid: int) -> int:
    """VmRSS of C{pid} and its descendants, in KiB."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of C{pid} and its descendants."""
    user = system = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def command_output(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# -- setting up -------------------------------------------------------------------


def give(path: Path) -> None:
    """Hand a file or directory to the OS user PgBouncer runs as."""
    if os.geteuid() == 0:
        shutil.chown(path, SERVER_OS_USER, SERVER_OS_USER)


def ensure_pgbouncer() -> str:
    exe = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None
    )
    if exe is None:
        if os.geteuid() != 0:
            raise SystemExit("pgbouncer is not installed: apt-get install pgbouncer")
        log("pgbouncer not found: apt-get install -y pgbouncer")
        subprocess.run(["apt-get", "install", "-y", "-q", "pgbouncer"], check=True)
        exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    return exe


def pgbouncer_version(exe: str) -> tuple[int, int]:
    """
    PgBouncer's (major, minor): 1.21 is the first with named prepared
    statements in transaction mode (C{max_prepared_statements}), and
    Debian 12 has 1.18.
    """
    m = re.search(r"PgBouncer (\d+)\.(\d+)", command_output([exe, "--version"]))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def setup_cluster(b: Bench) -> None:
    pki = make_pki(b.base / "pki")
    b.pki = pki
    log("starting PostgreSQL with TLS")
    conf = {"max_connections": "600", "max_prepared_transactions": "0"}
    if b.args.log_connections:
        conf["log_connections"] = "on"
    cluster = PostgresCluster(b.base, ssl=True, pki=pki, name="pg", extra_conf=conf)
    b.cluster = cluster
    cluster.start()
    log(f"pgbench -i -s {b.args.scale}")
    result = subprocess.run(
        [
            "pgbench",
            "-i",
            "-q",
            "-s",
            str(b.args.scale),
            "-h",
            str(cluster.socket_dir),
            "-p",
            str(cluster.port),
            "-U",
            SCRAM_USER,
            APP_DB,
        ],
        capture_output=True,
        text=True,
        env=pg_env(),
    )
    if result.returncode != 0:
        raise RuntimeError(f"pgbench -i failed:\n{result.stdout}{result.stderr}")
    # The pools' service user runs the pooled queries; pgbench always runs
    # with -n (no vacuum), so it needs no ownership.
    cluster.psql(
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {POOL_USER};\n"
        "VACUUM ANALYZE;",
        dbname=APP_DB,
    )


def pg_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", PGGSSENCMODE="disable", PGCONNECT_TIMEOUT="30")
    env.update(extra)
    return env


def pgtls_config(
    b: Bench, ports: dict[str, int], workers: int | None, metricsPort: int | None = None
) -> str:
    assert b.cluster is not None
    pki = b.pki
    pw = b.base / "pool.pw"
    # pgtls refuses a password file others can read: make it 0600 before
    # the password is in it.
    pw.touch(mode=0o600)
    pw.chmod(0o600)
    pw.write_text(POOL_PASSWORD + "\n")
    head = f"workers = {workers}\n" if workers else ""
    text = head + 'log_level = "info"\n'
    if metricsPort:
        text += f'[metrics]\nbind_address = "127.0.0.1:{metricsPort}"\n'
    routes = (
        ("pass", None),
        ("session", "session"),
        ("tx", "transaction"),
        ("tx-client", "transaction"),
    )
    for name, pool in routes:
        if name not in ports:
            continue
        text += f"""
[[proxy]]
name = "{name}"
[proxy.listener]
bind_address = "127.0.0.1:{ports[name]}"
server_cert = "{pki.cert("server")}"
server_key = "{pki.key("server")}"
tls = "require"
max_clients = {MAX_CLIENTS}
[proxy.backend]
address = "{b.cluster.host}:{b.cluster.port}"
tls = "verify-full"
root_ca = "{pki.cert("ca")}"
server_name = "localhost"
"""
        if name == "tx-client":
            # Pools per (user, database) logging in as the client, with
            # the keys kept from its first login (auth_cache_ttl: default).
            text += f"""[proxy.pool]
mode = "{pool}"
identity = "client"
max_size = {TX_POOL_SIZE}
"""
        elif pool:
            size = SESSION_POOL_SIZE if pool == "session" else TX_POOL_SIZE
            text += f"""[proxy.pool]
mode = "{pool}"
service_user = "{POOL_USER}"
service_password_file = "{pw}"
max_size = {size}
"""
    return text


def workers_supported(b: Bench, ports: dict[str, int]) -> bool:
    """Does C{pgtls check} accept a top-level C{workers = 2}?"""
    path = b.base / "workers-check.toml"
    path.write_text(pgtls_config(b, ports, workers=2))
    result = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "pgtls_twisted", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        # Not the checkout's directory: `python -m` would import the
        # checkout's package, and twist runs the installed one.
        cwd=b.base,
    )
    return result.returncode == 0


def start_pgtls(
    b: Bench,
    key: str,
    ports: dict[str, int],
    workers: int | None = None,
    source: Path | None = None,
    metricsPort: int | None = None,
) -> None:
    path = b.base / f"{key}.toml"
    path.write_text(pgtls_config(b, ports, workers, metricsPort))
    logfile = open(b.base / f"{key}.log", "ab")  # noqa: SIM115 - lives as long as the process
    command = ["--log-format", "text", "pgtls", "--config", str(path)]
    if source:
        # That tree's plugin, which may name a module the installed one lacks.
        here = Path(__file__).resolve().parent
        command = [
            str(VENV_BIN / "python"),
            str(here / "twist_from_source.py"),
            str(source),
            *command,
        ]
    else:
        command = [str(VENV_BIN / "twist"), *command]
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=logfile,
        stderr=subprocess.STDOUT,
        # --baseline-src: that tree's pgtls_twisted (and plugin) come first.
        env=dict(os.environ, PYTHONPATH=str(source)) if source else None,
    )
    b.procs[key] = proc
    for port in ports.values():
        wait_listening(port, proc, f"pgtls ({key})")


def scram_secret(b: Bench, user: str) -> str:
    """C{user}'s password verifier as PostgreSQL stores it (SCRAM or MD5)."""
    assert b.cluster is not None
    secret = b.cluster.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{user}'")
    if not secret.startswith(("SCRAM-SHA-256$", "md5")):
        raise RuntimeError(f"{user} has no SCRAM or MD5 password in pg_authid")
    return secret


def start_pgbouncer(b: Bench, port: int, key: str = "pgbouncer", secret: str | None = None) -> None:
    """
    PgBouncer as C{key}. With C{secret}, its auth_file holds that password
    verifier (copied from pg_authid) instead of the password, and it has
    only the transaction-mode database: it checks logins against the
    verifier and logs in to the server with the client's SCRAM proof (or the
    MD5 hash), as PgBouncer's docs advise for an auth_file without
    passwords.
    """
    assert b.cluster is not None
    pki = b.pki
    d = b.base / key
    d.mkdir(exist_ok=True)
    give(d)
    for name, src in (("server.crt", pki.cert("server")), ("ca.crt", pki.cert("ca"))):
        shutil.copy(src, d / name)
        give(d / name)
    shutil.copy(pki.key("server"), d / "server.key")
    os.chmod(d / "server.key", 0o600)
    give(d / "server.key")
    (d / "userlist.txt").write_text(f'"{SCRAM_USER}" "{secret or SCRAM_PASSWORD}"\n')
    os.chmod(d / "userlist.txt", 0o600)
    give(d / "userlist.txt")
    pg = b.cluster
    authType = "md5" if secret and secret.startswith("md5") else "scram-sha-256"
    session = (
        ""
        if secret
        else f"{APP_DB} = host={pg.host} port={pg.port} dbname={APP_DB} pool_mode=session pool_size={SESSION_POOL_SIZE}\n"
    )
    ini = f"""\
[databases]
{session}{APP_DB}_tx = host={pg.host} port={pg.port} dbname={APP_DB} pool_mode=transaction pool_size={TX_POOL_SIZE}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
logfile = {d}/pgbouncer.log
pidfile = {d}/pgbouncer.pid
auth_type = {authType}
auth_file = {d}/userlist.txt
max_client_conn = {MAX_CLIENTS}
ignore_startup_parameters = extra_float_digits
client_tls_sslmode = require
client_tls_cert_file = {d}/server.crt
client_tls_key_file = {d}/server.key
server_tls_sslmode = verify-full
server_tls_ca_file = {d}/ca.crt
"""
    if b.bouncerVersion >= (1, 21):
        # As pgtls's default pool.max_prepared_statements (PgBouncer's own
        # default from 1.24; before, 0: off).
        ini += "max_prepared_statements = 200\n"
    (d / "pgbouncer.ini").write_text(ini)
    give(d / "pgbouncer.ini")
    as_user: dict[str, Any] = {}
    if os.geteuid() == 0:
        # PgBouncer refuses to run as root.
        as_user = {"user": SERVER_OS_USER, "group": SERVER_OS_USER, "extra_groups": []}
    proc = subprocess.Popen(
        [b.pgbouncer, str(d / "pgbouncer.ini")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(d / "stderr.log", "ab"),  # noqa: SIM115
        cwd=d,
        **as_user,
    )
    b.procs[key] = proc
    wait_listening(port, proc, key)


def stop(b: Bench, key: str) -> None:
    proc = b.procs.pop(key, None)
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT if key.startswith("pgbouncer") else signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def start_all(b: Bench) -> None:
    b.ports = {
        "pass": free_port(),
        "session": free_port(),
        "tx": free_port(),
    }
    b.bouncerPort = free_port()
    log("starting pgtls and pgbouncer")
    start_pgtls(b, "pgtls", b.ports)
    start_pgbouncer(b, b.bouncerPort)
    # Issue 13's pair, as separate processes, so that the existing targets
    # run exactly as before.
    b.clientPort = free_port()
    start_pgtls(b, "pgtls-client", {"tx-client": b.clientPort})
    b.bouncerScramPort = free_port()
    start_pgbouncer(b, b.bouncerScramPort, "pgbouncer-scram", scram_secret(b, SCRAM_USER))
    if b.args.baseline_src:
        b.portsBase = {k: free_port() for k in ("pass", "session", "tx")}
        start_pgtls(b, "pgtls-base", b.portsBase, source=b.args.baseline_src)
    if b.workers:
        b.ports2 = {k: free_port() for k in ("pass", "session", "tx")}
        b.metricsW2 = free_port()
        try:
            start_pgtls(b, "pgtls-w2", b.ports2, workers=2, metricsPort=b.metricsW2)
        except RuntimeError as e:
            stop(b, "pgtls-w2")
            tail = (b.base / "pgtls-w2.log").read_text(errors="replace").strip().splitlines()[-3:]
            note = (
                f"workers = 2 skipped: pgtls check accepts it but the process failed ({e}): "
                + " / ".join(tail)
            )
            log(note)
            b.notes.append(note)
            b.workers = False


def stop_all(b: Bench) -> None:
    for key in list(b.procs):
        stop(b, key)


def make_targets(b: Bench) -> list[Target]:
    assert b.cluster is not None
    ports, bp = b.ports, b.bouncerPort
    targets = [
        Target("direct", b.cluster.port, APP_DB, None, None),
        Target("pgbouncer-session", bp, APP_DB, "pgbouncer", "pgbouncer-session"),
        Target(
            "pgbouncer-tx",
            bp,
            APP_DB + "_tx",
            "pgbouncer",
            "pgbouncer-tx",
            prepared=b.bouncerVersion >= (1, 21),
        ),
        Target("pgtls-pass", ports["pass"], APP_DB, "pgtls", "pgbouncer-session"),
        Target("pgtls-session", ports["session"], APP_DB, "pgtls", "pgbouncer-session"),
        Target("pgtls-tx", ports["tx"], APP_DB, "pgtls", "pgbouncer-tx"),
        # The connection rate when neither proxy asks the server about a
        # login (issue 13): per-login costs only, no temporary connection.
        Target(
            "pgbouncer-tx-scram",
            b.bouncerScramPort,
            APP_DB + "_tx",
            "pgbouncer-scram",
            "pgbouncer-tx-scram",
            prepared=b.bouncerVersion >= (1, 21),
            cases=("connect-*",),
        ),
        Target(
            "pgtls-tx-client",
            b.clientPort,
            APP_DB,
            "pgtls-client",
            "pgbouncer-tx-scram",
            cases=("connect-*",),
            warm=True,
        ),
    ]
    if b.args.baseline_src:
        pb = b.portsBase
        targets += [
            Target("pgtls-pass-base", pb["pass"], APP_DB, "pgtls-base", "pgbouncer-session"),
            Target("pgtls-session-base", pb["session"], APP_DB, "pgtls-base", "pgbouncer-session"),
            Target("pgtls-tx-base", pb["tx"], APP_DB, "pgtls-base", "pgbouncer-tx"),
        ]
    if b.workers:
        p2 = b.ports2
        targets += [
            Target("pgtls-pass-w2", p2["pass"], APP_DB, "pgtls-w2", "pgbouncer-session", True),
            Target(
                "pgtls-session-w2", p2["session"], APP_DB, "pgtls-w2", "pgbouncer-session", True
            ),
            Target("pgtls-tx-w2", p2["tx"], APP_DB, "pgtls-w2", "pgbouncer-tx", True),
        ]
    return targets


# -- running pgbench --------------------------------------------------------------


def p99_from_logs(prefix: Path) -> tuple[float | None, int]:
    """The 99th percentile latency (ms) in pgbench's per-transaction logs, and the count."""
    latencies: list[int] = []
    for path in prefix.parent.glob(prefix.name + ".*"):
        with open(path) as f:
            for line in f:
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[2].isdigit():
                    latencies.append(int(parts[2]))
        path.unlink()
    if not latencies:
        return None, 0
    latencies.sort()
    return latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] / 1000.0, len(latencies)


def client_env(b: Bench) -> dict[str, str]:
    """What every benchmark client connects with: the user's password, verify-full TLS."""
    return pg_env(
        PGPASSWORD=SCRAM_PASSWORD, PGSSLMODE="verify-full", PGSSLROOTCERT=str(b.pki.cert("ca"))
    )


def connect_args(target: Target) -> list[str]:
    """How a client (pgbench, psql) reaches C{target}, as pgbench's user."""
    return ["-h", "127.0.0.1", "-p", str(target.port), "-U", SCRAM_USER, target.database]


def warm_up(b: Bench, target: Target) -> str | None:
    """
    One login through C{target} (psql, as pgbench's user): a cold login
    cache goes to the server and keeps the keys, a warm one is answered by
    the proxy, so the run that follows logs in warm. The error, if any.
    """
    assert b.cluster is not None
    psql = b.cluster.bindir / "psql"
    psqlExe = str(psql) if psql.exists() else "psql"
    cmd = [psqlExe, "-X", "-At", "-c", "SELECT current_user", *connect_args(target)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=client_env(b), timeout=60)
    if result.returncode != 0 or result.stdout.strip() != SCRAM_USER:
        return f"warm-up login failed: {(result.stderr or result.stdout).strip()[:300]}"
    return None


def server_log_size(b: Bench) -> int:
    assert b.cluster is not None
    try:
        return b.cluster.log_path.stat().st_size
    except OSError:
        return 0


def server_logins_since(b: Bench, offset: int) -> int:
    """C{connection authorized} lines the server logged after C{offset} (log_connections)."""
    assert b.cluster is not None
    with open(b.cluster.log_path, "rb") as f:
        f.seek(offset)
        return f.read().count(b"connection authorized: ")


def run_pgbench(b: Bench, case: Case, target: Target, rnd: int) -> Run:
    run = Run(case.name, target.name, rnd)
    if target.warm:
        run.error = warm_up(b, target)
        if run.error:
            return run
    logs = b.base / "pgbench-logs"
    logs.mkdir(exist_ok=True)
    prefix = logs / f"{case.name}.{target.name}"
    cmd = [
        "pgbench",
        "-n",
        "-T",
        str(b.args.duration),
        "-c",
        str(case.clients),
        "-j",
        str(min(case.clients, 2)),
        *case.args,
        "-l",
        f"--log-prefix={prefix}",
        *connect_args(target),
    ]
    env = client_env(b)
    proxy = b.procs.get(target.proxy) if target.proxy else None
    if proxy is not None and proxy.poll() is not None:
        raise RuntimeError(f"{target.proxy} died (status {proxy.returncode})")
    cpu0 = cpu_seconds(proxy.pid) if proxy else (0.0, 0.0)
    cpuUsed = 0.0
    logOffset = server_log_size(b)
    t0 = time.monotonic()
    try:
        result = subprocess.run(
            cmd, capture_output=True, text=True, env=env, cwd=logs, timeout=b.args.duration + 180
        )
        output, code = result.stdout + result.stderr, result.returncode
    except subprocess.TimeoutExpired as e:
        output, code = f"{e.stdout or ''}{e.stderr or ''}\ntimed out", -1
    elapsed = time.monotonic() - t0
    if b.args.log_connections:
        # The server writes its log itself: give the last lines a moment.
        time.sleep(0.5)
        run.server_logins = server_logins_since(b, logOffset)
    if proxy is not None:
        user, system = cpu_seconds(proxy.pid)
        run.proxy_cpu_pct = 100.0 * (user + system - sum(cpu0)) / elapsed
        run.proxy_sys_pct = 100.0 * (system - cpu0[1]) / elapsed
        cpuUsed = user + system - sum(cpu0)
    raw = b.out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / f"{case.name}__{target.name}__r{rnd}.txt").write_text(
        "$ " + " ".join(cmd) + "\n" + output
    )
    m = re.search(r"^tps = ([\d.]+)", output, re.M)
    if m:
        run.tps = float(m.group(1))
    m = re.search(r"^latency average = ([\d.]+) ms", output, re.M)
    if m:
        run.lat_avg_ms = float(m.group(1))
    m = re.search(r"^number of transactions actually processed: (\d+)", output, re.M)
    if m:
        run.transactions = int(m.group(1))
        if proxy is not None and run.transactions:
            run.proxy_us_per_tx = cpuUsed / run.transactions * 1e6
    m = re.search(r"^number of failed transactions: (\d+)", output, re.M)
    if m:
        run.failed = int(m.group(1))
    run.lat_p99_ms, _ = p99_from_logs(prefix)
    if run.server_logins is not None and run.transactions:
        run.server_logins_per_ktx = run.server_logins / run.transactions * 1000
    if code != 0 or run.tps is None:
        lines = [line for line in output.splitlines() if "error" in line.lower()]
        run.error = (lines[0] if lines else output.strip().splitlines()[-1:] or ["?"])[0][:300]
        if code != 0 and run.tps is not None:
            run.error = f"exit {code}: {run.error}"
        prepares = "prepared" in case.args
        found = NAMED_STATEMENT_ERROR.search(output)
        if prepares and not target.prepared and found:
            run.unsupported = True
            start = output.rfind("\n", 0, found.start()) + 1
            end = output.find("\n", found.end())
            run.error = output[start : end if end >= 0 else None].strip()[:300]
    return run


def selected(patterns: list[str] | None, name: str) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def plan(b: Bench) -> tuple[list[Case], list[Target], set[str]]:
    """The cases, targets and resource tests to run, after --smoke and --only."""
    cases = [c for c in CASES if not b.args.smoke or c.name in SMOKE_CASES]
    targets = b.targets
    resources = {"idle", "slowread", "balance"}
    only = b.args.only
    if only:
        pats = [p for item in only for p in item.split(",") if p]
        caseNames = [c.name for c in CASES]
        targetNames = [t.name for t in targets]
        casePats = [p for p in pats if fnmatch.filter(caseNames, p)]
        targetPats = [p for p in pats if fnmatch.filter(targetNames, p)]
        resPats = [p for p in pats if fnmatch.filter(sorted(resources), p)]
        unknown = set(pats) - set(casePats) - set(targetPats) - set(resPats)
        if unknown:
            raise SystemExit(
                f"--only: {', '.join(sorted(unknown))} match no case, target or resource test; "
                f"cases: {', '.join(caseNames)}; targets: {', '.join(targetNames)}; "
                "resources: idle, slowread, balance"
            )
        if casePats or targetPats:
            cases = [c for c in cases if selected(casePats or None, c.name)]
            targets = [t for t in targets if selected(targetPats or None, t.name)]
        else:
            cases = []
        resources = {r for r in resources if selected(resPats, r)} if resPats else set()
    return cases, targets, resources


def runs_case(target: Target, case: Case) -> bool:
    return (not target.workers or case.workers) and any(
        fnmatch.fnmatchcase(case.name, p) for p in target.cases
    )


def run_rounds(b: Bench, cases: list[Case], targets: list[Target]) -> None:
    total = sum(len([t for t in targets if runs_case(t, c)]) for c in cases) * b.args.rounds
    done = 0
    started = time.monotonic()
    for rnd in range(1, b.args.rounds + 1):
        for case in cases:
            ts = [t for t in targets if runs_case(t, case)]
            shift = (rnd - 1) % len(ts) if ts else 0
            for target in ts[shift:] + ts[:shift]:
                run = run_pgbench(b, case, target, rnd)
                b.runs.append(run)
                done += 1
                left = (time.monotonic() - started) / done * (total - done)
                shown = f"{run.tps:9.1f} tps" if run.tps is not None else "   failed"
                lat = f" avg {run.lat_avg_ms:.3f} ms" if run.lat_avg_ms is not None else ""
                p99 = f" p99 {run.lat_p99_ms:.3f} ms" if run.lat_p99_ms is not None else ""
                cpu = (
                    f" proxy {run.proxy_cpu_pct:.0f}% cpu ({run.proxy_sys_pct:.0f}% sys,"
                    f" {run.proxy_us_per_tx or 0:.0f} us/tx)"
                    if run.proxy_cpu_pct is not None
                    else ""
                )
                err = f"  ERROR {run.error}" if run.error else ""
                if run.server_logins is not None:
                    err = f" server logins {run.server_logins}" + err
                if run.unsupported:
                    err = f"  UNSUPPORTED {run.error}"
                log(
                    f"r{rnd} {case.name:16} {target.name:18}{shown}{lat}{p99}{cpu}{err}"
                    f"  [{done}/{total}, ~{left / 60:.0f} min left]"
                )


# -- resource figures -------------------------------------------------------------


def clients_cmd(b: Bench, mode: str, port: int, database: str, *extra: str) -> list[str]:
    pki = b.pki
    return [
        str(VENV_BIN / "python"),
        str(BENCH / "clients.py"),
        mode,
        "--port",
        str(port),
        "--ca",
        str(pki.cert("ca")),
        "--user",
        SCRAM_USER,
        "--password",
        SCRAM_PASSWORD,
        "--database",
        database,
        *extra,
    ]


def idle_clients(
    b: Bench, proxyKey: str, port: int, database: str, counts: list[int]
) -> dict[str, Any]:
    """RSS of a proxy with C{counts} idle logged-in TLS clients (cumulative)."""
    proc = b.procs[proxyKey]
    client = subprocess.Popen(
        clients_cmd(b, "idle", port, database, "--concurrency", "16"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdin is not None and client.stdout is not None
    result: dict[str, Any] = {}

    def connect(n: int) -> str:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(f"connect {n}\n")
        client.stdin.flush()
        return client.stdout.readline().strip()

    try:
        # Warm up: the first sessions load code and fill caches that every
        # later one shares; they stay connected and are part of the baseline.
        warm = connect(20)
        time.sleep(1.0)
        base = rss_kib(proc.pid)
        result["baseline_kib"] = base
        result["warmup"] = warm
        have = 0
        for n in counts:
            t0 = time.monotonic()
            answer = connect(n - have)
            have = n
            time.sleep(1.0)
            rss = rss_kib(proc.pid)
            parts = answer.split()
            failed = int(parts[2]) if len(parts) > 2 else -1
            result[str(n)] = {
                "rss_kib": rss,
                "per_client_kib": (rss - base) / n,
                "login_seconds": time.monotonic() - t0 - 1.0,
                "client_said": answer,
                "failed": failed,
            }
            log(
                f"{proxyKey}: {n} idle TLS clients: RSS {rss / 1024:.1f} MiB, "
                f"{(rss - base) / n:.1f} KiB per client ({answer})"
            )
    finally:
        try:
            client.stdin.write("exit\n")
            client.stdin.close()
            client.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            client.kill()
    return result


def slow_reader(b: Bench, proxyKey: str, port: int, database: str) -> dict[str, Any]:
    """RSS growth of a proxy while one client reads a large result slowly."""
    proc = b.procs[proxyKey]
    rows = b.args.slow_rows
    query = f"SELECT repeat('x', 1000) FROM generate_series(1, {rows})"
    rate = b.args.slow_rate * 1024 * 1024
    base = rss_kib(proc.pid)
    peak = base
    client = subprocess.Popen(
        clients_cmd(b, "slowread", port, database, "--query", query, "--rate", str(rate)),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdout is not None
    deadline = time.monotonic() + rows * 1010 / rate * 3 + 120
    while client.poll() is None and time.monotonic() < deadline:
        peak = max(peak, rss_kib(proc.pid))
        time.sleep(0.2)
    if client.poll() is None:
        client.kill()
    out = client.stdout.read().strip().splitlines()
    client.wait()
    result = {
        "rows": rows,
        "bytes": rows * 1000,
        "rate_mib_s": b.args.slow_rate,
        "baseline_kib": base,
        "peak_kib": peak,
        "growth_kib": peak - base,
        "client_said": out[-1] if out else "",
        "status": client.returncode,
    }
    log(
        f"{proxyKey}: slow reader of {rows * 1000 / 1e9:.2f} GB: RSS {base / 1024:.1f} -> peak "
        f"{peak / 1024:.1f} MiB (+{(peak - base) / 1024:.1f} MiB); client: {result['client_said']}"
    )
    return result


def run_resources(b: Bench, which: set[str]) -> None:
    # Fresh processes, so that what the benchmark rounds allocated is not
    # counted, nor their pooled server connections.
    stop_all(b)
    start_all(b)
    counts = [100, 300] if b.args.smoke else [1000, 5000]
    if "idle" in which:
        log(f"idle clients: pgtls transaction-pool route, {counts}")
        b.resources["idle_pgtls"] = idle_clients(b, "pgtls", b.ports["tx"], APP_DB, counts)
        if b.args.baseline_src:
            log(f"idle clients: pgtls-base transaction-pool route, {counts}")
            b.resources["idle_pgtls_base"] = idle_clients(
                b, "pgtls-base", b.portsBase["tx"], APP_DB, counts
            )
        log(f"idle clients: pgbouncer transaction mode, {counts}")
        b.resources["idle_pgbouncer"] = idle_clients(
            b, "pgbouncer", b.bouncerPort, APP_DB + "_tx", counts
        )
    if "slowread" in which:
        if "idle" in which:
            # Fresh again: memory freed by the idle clients stays in the
            # process and would absorb (hide) any growth. (start_all picks
            # new ports: read them only after it.)
            stop_all(b)
            start_all(b)
        b.resources["slow_pgtls"] = slow_reader(b, "pgtls", b.ports["pass"], APP_DB)
        b.resources["slow_pgbouncer"] = slow_reader(b, "pgbouncer", b.bouncerPort, APP_DB)
    if "balance" in which and b.workers:
        b.resources["balance"] = reuseport_balance(b)


def accepted_by_worker(b: Bench) -> dict[str, float]:
    """pgtls-w2's accepted client connections so far, per worker (its metrics page)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{b.metricsW2}/metrics", timeout=10) as page:
        text = page.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"pgtls_client_connections_accepted_total\{(.*)\} ([\d.e+]+)$", line)
        if m and 'route="pass"' in m.group(1):
            worker = re.search(r'worker="(\d+)"', m.group(1))
            if worker:
                found[worker.group(1)] = float(m.group(2))
    return found


def reuseport_balance(b: Bench) -> dict[str, Any]:
    """
    How the kernel spreads new connections over pgtls-w2's two workers
    (C{SO_REUSEPORT}): C{pgbench -C -S -c 8} on its pass-through route, the
    connections each worker accepted, and each worker's CPU time.
    """
    log("SO_REUSEPORT balance: pgbench -C -S -c 8 on pgtls-w2")
    proc = b.procs["pgtls-w2"]
    workers = [pid for pid in tree(proc.pid) if pid != proc.pid]
    cpu0 = {pid: sum(cpu_seconds(pid)) for pid in workers}
    before = accepted_by_worker(b)
    case = Case("connect-S-c8", 8, ("-C", "-S"))
    target = Target("pgtls-pass-w2", b.ports2["pass"], APP_DB, "pgtls-w2", None, True)
    run = run_pgbench(b, case, target, 0)
    after = accepted_by_worker(b)
    accepted = {w: after.get(w, 0) - before.get(w, 0) for w in sorted(after)}
    total = sum(accepted.values()) or 1
    return {
        "tps": run.tps,
        "error": run.error,
        "accepted": accepted,
        "shares": {w: n / total for w, n in accepted.items()},
        "worker_cpu_s": [round(sum(cpu_seconds(pid)) - cpu0[pid], 2) for pid in workers],
    }


# -- profiling --------------------------------------------------------------------


def cprofile_summary(path: Path, transactions: int, top: int = 25) -> str:
    """The top functions by own time, with calls per transaction."""
    import io
    import pstats

    stats = pstats.Stats(str(path))
    rows = []
    total = 0.0
    for (filename, line, name), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        total += tottime
        where = f"{Path(filename).name}:{line}" if line else filename
        rows.append((tottime, cumtime, ncalls, f"{name} ({where})"))
    rows.sort(reverse=True)
    out = io.StringIO()
    calls = sum(r[2] for r in rows)
    tx = max(transactions, 1)
    out.write(
        f"{transactions} transactions; {calls / tx:.0f} Python-level calls and "
        f"{total / tx * 1e6:.0f} us of profiled time per transaction\n\n"
    )
    out.write(" own%   cum%  calls/tx  function\n")
    for tottime, cumtime, ncalls, name in rows[:top]:
        out.write(
            f"{100 * tottime / total:5.1f} {100 * cumtime / total:6.1f} {ncalls / tx:9.2f}  {name}\n"
        )
    return out.getvalue()


def run_profiles(b: Bench) -> None:
    """
    pgtls under cProfile (a separate process): C{pgbench -S -c 16} on each
    route, and C{-C -S -c 8} (connection setup) on the pass-through route
    and on the warm login cache's route (C{pgtls-tx-client}).
    """
    byName = {c.name: c for c in CASES}
    plans = [(byName["S-simple-c16"], t) for t in b.targets if t.proxy == "pgtls"]
    plans += [
        (byName["connect-S-c8"], t)
        for t in b.targets
        if t.name in ("pgtls-pass", "pgtls-tx-client")
    ]
    portsOf = {"pgtls": b.ports, "pgtls-client": {"tx-client": b.clientPort}}
    for key in portsOf:
        stop(b, key)
    for case, target in plans:
        key = target.proxy
        assert key in portsOf
        name = f"{target.name}-{case.name}"
        prof = b.out / f"profile-{name}.prof"
        logfile = open(b.base / "pgtls-profile.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [
                str(VENV_BIN / "python"),
                str(BENCH / "cprofile_twist.py"),
                str(prof),
                "--log-format",
                "text",
                "pgtls",
                "--config",
                str(b.base / f"{key}.toml"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=subprocess.STDOUT,
        )
        b.procs[key] = proc
        for port in portsOf[key].values():
            wait_listening(port, proc, "pgtls under cProfile")
        run = run_pgbench(b, case, target, 0)
        stop(b, key)
        text = (
            f"pgbench {case.description} on {target.name} under cProfile: {run.tps or 0:.0f} tps\n"
        )
        if prof.exists():
            text += cprofile_summary(prof, run.transactions or 0)
        else:
            text += "(no profile written)"
        b.profiles[name] = text
        (b.out / f"profile-{name}.txt").write_text(text)
        log(f"profile of {name} in {prof}")
    for key, ports in portsOf.items():
        start_pgtls(b, key, ports)


# -- reporting --------------------------------------------------------------------


def versions(b: Bench) -> dict[str, str]:
    import OpenSSL
    from OpenSSL import SSL

    import twisted

    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    assert b.cluster is not None
    return {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "nproc": str(os.cpu_count()),
        "ram": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "pyopenssl": OpenSSL.__version__,
        "openssl (pyOpenSSL)": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
        "pgbouncer": command_output([b.pgbouncer, "--version"]).splitlines()[0],
        "postgresql": command_output([str(b.cluster.bindir / "postgres"), "--version"]),
        "pgbench": command_output(["pgbench", "--version"]),
        "pgtls commit": command_output(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]),
    }


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "–" if v is None else format(v, spec)


#: The per-run figures summarised as medians.
METRICS = (
    "tps",
    "lat_avg_ms",
    "lat_p99_ms",
    "proxy_cpu_pct",
    "proxy_sys_pct",
    "proxy_us_per_tx",
    "server_logins",
    "server_logins_per_ktx",
)


def summary(b: Bench) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per case and target: medians over rounds."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for run in b.runs:
        if run.round == 0:
            continue
        cell = out.setdefault(run.case, {}).setdefault(run.target, {})
        for key in METRICS:
            value = getattr(run, key)
            if value is not None and run.error is None:
                cell.setdefault(key + "_all", []).append(value)  # type: ignore[arg-type, union-attr]
    for cases in out.values():
        for cell in cases.values():
            for key in METRICS:
                cell[key] = median(cell.get(key + "_all") or [])  # type: ignore[arg-type]
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def unnamed_cases(case: Case) -> list[tuple[str, str]]:
    """
    For a C{-M prepared} case, the same target's unnamed-statement cases at
    the same client count that its tps is compared with: (label, case name).
    """
    if "prepared" not in case.args:
        return []
    return [(f"× own -M {m}", f"S-{m}-c{case.clients}") for m in ("extended", "simple")]


def unsupported_runs(b: Bench, case: str, target: str) -> list[Run]:
    return [r for r in b.runs if r.case == case and r.target == target and r.unsupported]


def results_table(b: Bench, med: dict[str, Any]) -> str:
    targets = {t.name: t for t in b.targets}
    lines = []
    for case in CASES:
        if case.name not in med:
            continue
        rows = med[case.name]
        direct = rows.get("direct", {})
        own = unnamed_cases(case)
        logins = any(cell.get("server_logins") is not None for cell in rows.values())
        lines += [
            f"**{case.description}** (`{case.name}`)",
            "",
            "| target | tps | × PgBouncer | × direct "
            + "".join(f"| {label} " for label, _ in own)
            + "| avg ms | p99 ms | +avg ms vs direct | proxy CPU % (sys) | proxy CPU µs/tx "
            + ("| server logins per run (per 1000 tx) " if logins else "")
            + "|",
            "|---|---:|---:|---:|"
            + "---:|" * len(own)
            + "---:|---:|---:|---:|---:|"
            + ("---:|" if logins else ""),
        ]
        footnotes = []
        for name, t in targets.items():
            if name not in rows:
                continue
            cell = rows[name]
            base = rows.get(t.baseline or "", {})
            added = (
                cell["lat_avg_ms"] - direct["lat_avg_ms"]
                if cell.get("lat_avg_ms") is not None and direct.get("lat_avg_ms") is not None
                else None
            )
            runs = [r for r in b.runs if r.case == case.name and r.target == name and r.round]
            unsupported = unsupported_runs(b, case.name, name)
            errors = [r.error for r in runs if r.error and not r.unsupported]
            err = f" ({len(errors)} failed runs)" if errors else ""
            tps = fmt(cell["tps"], ".0f")
            if unsupported:
                tps = "unsupported" if cell["tps"] is None else tps + " (unsupported)"
                err += f" ({len(unsupported)} of {len(runs)} runs unsupported)"
                footnotes.append(f"- {name}: unsupported: `{unsupported[0].error}`")
            elif own and not t.prepared and cell["tps"] is not None:
                tps += " (no support)"
                footnotes.append(
                    f"- {name}: passed without named prepared statements: each client kept "
                    "finding its statement on the server connection it was given (luck: one "
                    "client, or an idle pool that hands back the same connection)"
                )
            if base.get("tps") is None and unsupported_runs(b, case.name, t.baseline or ""):
                vsBase = "unsupported"
            else:
                vsBase = fmt(ratio(cell["tps"], base.get("tps")), ".2f") if t.baseline else "–"
            vsOwn = "".join(
                f"| {fmt(ratio(cell['tps'], med.get(other, {}).get(name, {}).get('tps')), '.2f')} "
                for _, other in own
            )
            lines.append(
                f"| {name}{err} | {tps} "
                f"| {vsBase} "
                f"| {fmt(ratio(cell['tps'], direct.get('tps')), '.2f')} "
                f"{vsOwn}"
                f"| {fmt(cell['lat_avg_ms'], '.3f')} | {fmt(cell['lat_p99_ms'], '.3f')} "
                f"| {fmt(added, '+.3f') if name != 'direct' else '–'} "
                f"| {fmt(cell['proxy_cpu_pct'], '.0f')} ({fmt(cell['proxy_sys_pct'], '.0f')}) "
                f"| {fmt(cell['proxy_us_per_tx'], '.0f')} "
                + (
                    f"| {fmt(cell['server_logins'], '.0f')} "
                    f"({fmt(cell['server_logins_per_ktx'], '.1f')}) "
                    if logins
                    else ""
                )
                + "|"
            )
        if footnotes:
            lines += ["", *footnotes]
        lines.append("")
    return "\n".join(lines)


def target_checks(b: Bench, med: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for each of issue 6's targets that was measured."""
    checks: list[tuple[str, str, str]] = []

    def tps(case: str, target: str) -> float | None:
        return med.get(case, {}).get(target, {}).get("tps")

    def lat(case: str, target: str) -> float | None:
        return med.get(case, {}).get(target, {}).get("lat_avg_ms")

    def verdict(value: float | None, goal: float, higher: bool = True) -> str:
        if value is None:
            return "not measured"
        ok = value >= goal if higher else value <= goal
        return "met" if ok else "MISSED"

    for mode in ("simple", "extended"):
        case = f"S-{mode}-c16"
        for name, base, goal in (
            ("pgtls-pass", "pgbouncer-session", 0.9),
            ("pgtls-session", "pgbouncer-session", 0.9),
            ("pgtls-tx", "pgbouncer-tx", 0.8),
        ):
            r = ratio(tps(case, name), tps(case, base))
            checks.append(
                (
                    f"{name} `-S -M {mode} -c 16` ≥ {goal}× {base}",
                    fmt(r, ".2f") + "×",
                    verdict(r, goal),
                )
            )
    for name, base in (
        ("pgtls-pass", "pgbouncer-session"),
        ("pgtls-session", "pgbouncer-session"),
        ("pgtls-tx", "pgbouncer-tx"),
    ):
        r = ratio(tps("connect-S-c8", name), tps("connect-S-c8", base))
        checks.append(
            (f"{name} `-C` connection rate ≥ 1.0× {base}", fmt(r, ".2f") + "×", verdict(r, 1.0))
        )
    # Issue 13: warm login cache against PgBouncer's auth_file; neither
    # contacts the server per login.
    r = ratio(tps("connect-S-c8", "pgtls-tx-client"), tps("connect-S-c8", "pgbouncer-tx-scram"))
    if r is not None:
        checks.append(
            (
                "pgtls-tx-client (warm cache) `-C` connection rate ≥ 1.0× pgbouncer-tx-scram "
                "(issue 13)",
                fmt(r, ".2f") + "×",
                verdict(r, 1.0),
            )
        )
    for mode in ("simple", "extended"):
        case = f"S-{mode}-c1"
        d = lat(case, "direct")
        for name, base in (
            ("pgtls-pass", "pgbouncer-session"),
            ("pgtls-session", "pgbouncer-session"),
            ("pgtls-tx", "pgbouncer-tx"),
        ):
            mine, theirs = lat(case, name), lat(case, base)
            r = (
                (mine - d) / (theirs - d)
                if None not in (mine, theirs, d) and theirs - d > 0  # type: ignore[operator]
                else None
            )
            shown = (
                f"+{mine - d:.3f} ms vs +{theirs - d:.3f} ms = {r:.2f}×"  # type: ignore[operator]
                if r is not None
                else "–"
            )
            checks.append(
                (
                    f"{name} `-M {mode} -c 1` added latency ≤ 1.5× {base}'s",
                    shown,
                    verdict(r, 1.5, higher=False),
                )
            )
    idle = b.resources.get("idle_pgtls", {})
    for n in ("1000", "5000", "100", "300"):
        if n in idle:
            per = idle[n]["per_client_kib"]
            checks.append(
                (
                    f"idle TLS client ≤ 64 KiB RSS each ({n} clients)",
                    f"{per:.1f} KiB",
                    verdict(per, 64, higher=False),
                )
            )
    slow = b.resources.get("slow_pgtls")
    if slow:
        growth = slow["growth_kib"] / 1024
        checks.append(
            (
                f"slow {slow['bytes'] / 1e9:.2f} GB reader RSS growth < 32 MiB",
                f"{growth:.1f} MiB",
                verdict(growth, 32, higher=False),
            )
        )
    return checks


def resources_table(b: Bench) -> str:
    lines = []
    for key, label in (
        ("idle_pgtls", "pgtls (transaction-pool route)"),
        ("idle_pgtls_base", "pgtls-base (transaction-pool route)"),
        ("idle_pgbouncer", "PgBouncer (transaction mode)"),
    ):
        r = b.resources.get(key)
        if not r:
            continue
        if not lines:
            lines += [
                "| proxy | idle TLS clients | RSS MiB | baseline MiB | KiB per client | login time s | failed logins |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
        for n, cell in r.items():
            if not isinstance(cell, dict):
                continue
            lines.append(
                f"| {label} | {n} | {cell['rss_kib'] / 1024:.1f} | {r['baseline_kib'] / 1024:.1f} "
                f"| {cell['per_client_kib']:.1f} | {cell['login_seconds']:.1f} | {cell['failed']} |"
            )
    if lines:
        lines.append("")
    balance = b.resources.get("balance")
    if balance:
        shares = ", ".join(
            f"worker {w}: {int(balance['accepted'][w])} ({100 * s:.0f} %)"
            for w, s in balance["shares"].items()
        )
        lines += [
            "SO_REUSEPORT balance (`pgbench -C -S -c 8` on pgtls-w2's pass-through route):",
            f"{shares}; workers' CPU seconds {balance['worker_cpu_s']}; "
            f"{fmt(balance['tps'])} connections/s{'; ' + balance['error'] if balance['error'] else ''}.",
            "",
        ]
    slow = [(k, b.resources[k]) for k in ("slow_pgtls", "slow_pgbouncer") if k in b.resources]
    if slow:
        lines += [
            "| proxy (slow reader) | result | read rate MiB/s | RSS before MiB | peak MiB | growth MiB | client |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for key, r in slow:
            name = "pgtls pass-through" if key == "slow_pgtls" else "PgBouncer session"
            lines.append(
                f"| {name} | {r['bytes'] / 1e9:.2f} GB | {r['rate_mib_s']} | {r['baseline_kib'] / 1024:.1f} "
                f"| {r['peak_kib'] / 1024:.1f} | {r['growth_kib'] / 1024:.1f} | `{r['client_said']}` |"
            )
        lines.append("")
    return "\n".join(lines)


def prepared_note(b: Bench) -> str:
    """What the C{-M prepared} tables mean, and why PgBouncer's cell may be empty."""
    version = ".".join(map(str, b.bouncerVersion))
    if b.bouncerVersion >= (1, 21):
        bouncer = (
            f"PgBouncer {version} runs with `max_prepared_statements = 200`, as pgtls's "
            "default `pool.max_prepared_statements`."
        )
    else:
        bouncer = (
            f"PgBouncer {version} has no prepared-statement support in transaction mode "
            "(1.21 added `max_prepared_statements`, on by default from 1.24): a client's "
            "named statement reaches whichever server connection is free, and pgbench "
            "`-M prepared` through it fails with `prepared statement ... already exists` or "
            "`... does not exist`. Such a cell is `unsupported` (with pgbench's first error "
            "line under the table) and has no figures; one that happened to pass (one client "
            "kept getting the server connection it prepared on) is luck, not support."
        )
    return (
        "`-M prepared`: pgbench prepares its statement by name once per connection and "
        "then only binds and executes it. `× own -M extended` and `× own -M simple` divide "
        "a target's `-M prepared` tps by its own tps with unnamed statements at the same "
        "client count, in the same run. " + bouncer
    )


#: What issue 13's pair of targets is.
LOGIN_CACHE_NOTE = (
    "`pgtls-tx-client` and `pgbouncer-tx-scram` (connection-rate case only, issue 13) are "
    "transaction pools in which neither proxy asks the server about a login. "
    '`pgtls-tx-client`: a transaction pool with `identity = "client"` (no service user, '
    "`auth_cache_ttl` default 10 min), its own pgtls process; one psql login before each run "
    "warms its login cache (the server checks the password once, pgtls keeps the SCRAM keys), "
    "so that every pgbench login is answered by pgtls from the cached keys and its queries run "
    "on pooled connections logged in as the user. `pgbouncer-tx-scram`: a second PgBouncer, "
    "transaction mode, whose `auth_file` holds the user's SCRAM secret copied from "
    "`pg_authid` (no password; `auth_type = scram-sha-256`): it checks logins against the "
    "secret and logs in to the server with the client's SCRAM proof. `pgbouncer-tx` and "
    "`pgtls-tx`, by contrast, keep the password (PgBouncer's auth_file) or check every login "
    "over a temporary server connection (pgtls's service-user pool)."
)


def write_report(b: Bench, info: dict[str, str], started: float) -> Path:
    med = summary(b)
    minutes = (time.monotonic() - started) / 60
    lines = [
        "# pgtls benchmark results",
        "",
        f"Written by `bench/run` ({' '.join(sys.argv[1:]) or 'defaults'}) in {minutes:.0f} min: "
        f"{b.args.rounds} interleaved round(s) of {b.args.duration} s per pgbench run, "
        f"pgbench scale {b.args.scale}; figures are medians over the rounds.",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    lines += [
        "",
        "Every client connects with `sslmode=verify-full` (TLS 1.3). `direct` is PostgreSQL "
        "itself; pgtls and PgBouncer require TLS from clients (same certificate) and use "
        "`verify-full` TLS to the same PostgreSQL. Pools: session "
        f"{SESSION_POOL_SIZE}, transaction {TX_POOL_SIZE} server connections, in both. "
        "`× PgBouncer` compares pass-through and session pool with PgBouncer session mode, "
        "and the transaction pool with PgBouncer transaction mode. `proxy CPU %` is the proxy "
        "process's CPU time over the run's wall time (100 = one core).",
        "",
    ]
    if any(c.startswith("S-prepared-") for c in med):
        lines += [prepared_note(b), ""]
    if any(t in rows for rows in med.values() for t in ("pgtls-tx-client", "pgbouncer-tx-scram")):
        lines += [LOGIN_CACHE_NOTE, ""]
    if b.notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in b.notes] + [""]
    checks = target_checks(b, med)
    if checks:
        lines += [
            "## Targets (issues 6 and 13)",
            "",
            "| target | measured | verdict |",
            "|---|---|---|",
        ]
        lines += [f"| {t} | {m} | {v} |" for t, m, v in checks]
        lines.append("")
    table = results_table(b, med)
    if table:
        lines += ["## Throughput and latency", "", table]
    res = resources_table(b)
    if res:
        lines += ["## Resources", "", res]
    for name, text in b.profiles.items():
        lines += [f"## Profile: {name}", "", "```", text, "```", ""]
    text = "\n".join(lines)
    (b.out / "RESULTS.md").write_text(text)
    (b.out / "results.json").write_text(
        json.dumps(
            {
                "info": info,
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(b.args).items()},
                "runs": [vars(r) for r in b.runs],
                "medians": {
                    c: {
                        t: {k: v for k, v in cell.items() if not k.endswith("_all")}
                        for t, cell in rows.items()
                    }
                    for c, rows in med.items()
                },
                "resources": b.resources,
                "notes": b.notes,
            },
            indent=1,
        )
    )
    return b.out / "RESULTS.md"


def installed_matches_checkout() -> list[str]:
    """Source files that differ between the checkout and the installed package."""
    import pgtls_twisted

    installed = Path(pgtls_twisted.__file__).parent
    different = []
    for src in sorted((ROOT / "pgtls_twisted").rglob("*.py")):
        other = installed / src.relative_to(ROOT / "pgtls_twisted")
        if not other.exists() or other.read_bytes() != src.read_bytes():
            different.append(str(src.relative_to(ROOT)))
    return different


# -- main -------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run",
        description="Benchmark pgtls against direct PostgreSQL and PgBouncer (see bench/pgtls_bench.py).",
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--duration", type=int, default=5, help="seconds per pgbench run (default 5)")
    p.add_argument("--scale", type=int, default=10, help="pgbench scale (default 10)")
    p.add_argument(
        "--only",
        action="append",
        metavar="PATTERNS",
        help="comma-separated glob patterns of cases (S-simple-c16, S-prepared-c16, tpcb-c16, "
        "connect-S-c8, ...), "
        "targets (direct, pgbouncer-session, pgbouncer-tx, pgtls-pass, pgtls-session, pgtls-tx; "
        "for connect-* only: pgbouncer-tx-scram, pgtls-tx-client) "
        "and resource tests (idle, slowread); only what matches runs",
    )
    p.add_argument(
        "--log-connections",
        action="store_true",
        help="run PostgreSQL with log_connections = on and count each run's server logins "
        "(its 'connection authorized' lines): a column of the tables",
    )
    p.add_argument(
        "--smoke", action="store_true", help="a quick check that everything works (~2 min)"
    )
    p.add_argument(
        "--profile", action="store_true", help="also py-spy pgtls under -S -c 16 per route"
    )
    p.add_argument(
        "--slow-rows",
        type=int,
        default=None,
        help="rows of 1000 bytes for the slow reader (default 1,000,000)",
    )
    p.add_argument(
        "--slow-rate", type=float, default=64, help="slow reader's pace in MiB/s (default 64)"
    )
    p.add_argument(
        "--baseline-src",
        type=Path,
        default=None,
        metavar="DIR",
        help="also run a pgtls whose pgtls_twisted is imported from DIR (a checkout of another "
        "commit), as targets pgtls-*-base: an interleaved A/B of a change",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (cluster, logs)"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="results directory (default bench/results/<date>)"
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds = 1 if "--rounds" not in (argv or sys.argv) else args.rounds
        args.duration = 2 if "--duration" not in (argv or sys.argv) else args.duration
        args.scale = 1 if "--scale" not in (argv or sys.argv) else args.scale
    if args.slow_rows is None:
        args.slow_rows = 20_000 if args.smoke else 1_000_000
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    # Thousands of idle clients need as many descriptors, in pgtls, PgBouncer
    # and the client process, which all inherit this limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 2 * MAX_CLIENTS:
        log(f"WARNING: RLIMIT_NOFILE is {hard}: too few for the 5,000 idle clients test")
    if shutil.which("pgbench") is None:
        raise SystemExit("pgbench not found: apt-get install postgresql-client")
    day = datetime.date.today().isoformat()
    out = args.out or BENCH / "results" / (day + ("-smoke" if args.smoke else ""))
    out.mkdir(parents=True, exist_ok=True)
    for old in (out / "raw").glob("*.txt") if (out / "raw").exists() else ():
        old.unlink()
    base = Path(tempfile.mkdtemp(prefix="pgtls-bench-"))
    base.chmod(0o755)  # the postgres OS user must reach the cluster inside
    b = Bench(args, base, out)
    b.pgbouncer = ensure_pgbouncer()
    b.bouncerVersion = pgbouncer_version(b.pgbouncer)

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    stale = installed_matches_checkout()
    if stale:
        note = (
            "the installed pgtls_twisted differs from the checkout in "
            + ", ".join(stale)
            + ": this run measured the installed code (run `make install` to measure the checkout)"
        )
        log("WARNING: " + note)
        b.notes.append(note)
    with open("/proc/loadavg") as f:
        load0 = f.read().split()[:3]
    try:
        setup_cluster(b)
        info = versions(b)
        probe = {k: free_port() for k in ("pass", "session", "tx")}
        b.workers = workers_supported(b, probe)
        if b.workers:
            log("pgtls accepts workers = 2: also running a workers=2 pgtls for -c 16 and -c 64")
        else:
            msg = "workers = 2 skipped: `pgtls check` does not accept a `workers` key (workers are not implemented yet)"
            log(msg)
            b.notes.append(msg)
        start_all(b)
        b.targets = make_targets(b)
        cases, targets, resources = plan(b)
        if cases and targets:
            log(
                f"{len(cases)} case(s) x {len(targets)} target(s) x {args.rounds} round(s), {args.duration} s each"
            )
            run_rounds(b, cases, targets)
            if "pgtls" in b.procs:
                b.resources["pgtls_rss_after_rounds_kib"] = rss_kib(b.procs["pgtls"].pid)
        if args.profile:
            run_profiles(b)
        if resources:
            run_resources(b, resources)
        with open("/proc/loadavg") as f:
            load1 = f.read().split()[:3]
        info["load average before / after"] = f"{' '.join(load0)} / {' '.join(load1)}"
        report = write_report(b, info, started)
        print()
        print(report.read_text())
        if not args.smoke and not args.only and args.out is None:
            shutil.copy(report, BENCH / "RESULTS.md")
            log(f"wrote {BENCH / 'RESULTS.md'}")
        log(f"results in {out} ({(time.monotonic() - started) / 60:.1f} min)")
        return 0
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    finally:
        stop_all(b)
        if b.cluster is not None:
            try:
                b.cluster.stop()
            except Exception as e:  # noqa: BLE001 - fall back to an immediate stop
                log(f"cluster stop failed ({e}); stopping immediately")
                subprocess.run(
                    [
                        "runuser",
                        "-u",
                        SERVER_OS_USER,
                        "--",
                        str(b.cluster.bindir / "pg_ctl"),
                        "-D",
                        str(b.cluster.data_dir),
                        "stop",
                        "-m",
                        "immediate",
                    ],
                    check=False,
                )
        if args.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
