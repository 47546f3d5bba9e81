"""
What C{bench/idle_clients.py} and C{bench/soak.py} (issue 15 item 6) share:
a throwaway PostgreSQL with TLS (through L{pgtls_bench.setup_cluster}), one
pgtls process tree (C{twist pgtls}, C{workers = N}) with a single
transaction-pool route and a metrics page, and the per-process figures read
from C{/proc} (RSS, open descriptors, CPU time) and from the metrics page.

The machine these figures come from is shared: every report records the
load average before and after, and says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pgtls_bench as pb
from pgtls_bench import BENCH, VENV_BIN, log

from pgtls_twisted.testing.cluster import (
    APP_DB,
    POOL_PASSWORD,
    POOL_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
)

__all__ = [
    "APP_DB",
    "SCRAM_PASSWORD",
    "SCRAM_USER",
    "Setup",
    "loadavg",
    "log",
    "processes",
    "sample",
]


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def raise_nofile(wanted: int) -> tuple[int, int]:
    """
    Raise this process's RLIMIT_NOFILE to C{wanted} descriptors (soft and
    hard; raising the hard limit takes root, CAP_SYS_RESOURCE), or to the
    hard limit when that is not allowed. Returns the limit in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted, wanted
        except (ValueError, OSError):
            log(
                f"WARNING: cannot raise RLIMIT_NOFILE's hard limit {hard} to {wanted} (needs CAP_SYS_RESOURCE)"
            )
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def processes(root: int) -> dict[str, int]:
    """pgtls's processes by role: C{supervisor} and C{worker-<pid>}, or C{process}."""
    pids = pb.tree(root)
    if len(pids) == 1:
        return {"process": root}
    return {"supervisor": root, **{f"worker-{p}": p for p in pids[1:]}}


def _status(pid: int) -> dict[str, int]:
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    found[key] = int(value.split()[0])
    except OSError:
        pass
    return found


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def nofile_limit(pid: int) -> str:
    """A process's own 'Max open files' (soft/hard), from /proc/PID/limits."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    parts = line.split()
                    return f"{parts[3]}/{parts[4]}"
    except OSError:
        pass
    return "?"


def sample(root: int) -> dict[str, dict[str, float]]:
    """Per process of pgtls's tree: RSS (KiB, anonymous and file), descriptors, CPU seconds."""
    out: dict[str, dict[str, float]] = {}
    for name, pid in processes(root).items():
        st = _status(pid)
        user, system = cpu_of(pid)
        out[name] = {
            "pid": pid,
            "rss_kib": st.get("VmRSS", 0),
            "rss_anon_kib": st.get("RssAnon", 0),
            "hwm_kib": st.get("VmHWM", 0),
            "fds": fd_count(pid),
            "cpu_s": round(user + system, 2),
        }
    return out


def cpu_of(pid: int) -> tuple[float, float]:
    """One process's own user and system CPU seconds (not its children's)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0


def listening_sockets(port: int) -> int:
    """TCP sockets listening on C{port} (IPv4, this network namespace), from /proc/net/tcp."""
    count = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def total(s: dict[str, dict[str, float]], key: str) -> float:
    return sum(p[key] for p in s.values())


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


@dataclass
class Setup:
    """A PostgreSQL cluster and one pgtls tree with a transaction-pool route."""

    name: str
    workers: int
    maxClients: int
    poolSize: int = 20
    scale: int = 10
    #: pgtls's RLIMIT_NOFILE (soft = hard); None: what this process has.
    pgtlsNofile: int | None = None
    keep: bool = False
    #: Run pgtls under bench/memtrace_twist.py, writing snapshots here.
    memtrace: Path | None = None
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pgtls-load-")))
    bench: Any = None
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    metricsPort: int = 0
    out: Path = Path()

    def start(self) -> None:
        day = datetime.date.today().isoformat()
        self.out = BENCH / "results" / f"{day}-{self.name}"
        self.out.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)  # the postgres OS user must reach the cluster inside
        args = argparse.Namespace(scale=self.scale, log_connections=False)
        self.bench = pb.Bench(args, self.base, self.out)
        pb.setup_cluster(self.bench)
        self.port = pb.free_port()
        self.metricsPort = pb.free_port()
        self.startPgtls()

    def config(self) -> str:
        b = self.bench
        pki = b.pki
        pw = self.base / "pool.pw"
        pw.touch(mode=0o600)
        pw.chmod(0o600)
        pw.write_text(POOL_PASSWORD + "\n")
        return f"""\
workers = {self.workers}
log_level = "info"
[metrics]
bind_address = "127.0.0.1:{self.metricsPort}"

[[proxy]]
name = "tx"
[proxy.listener]
bind_address = "127.0.0.1:{self.port}"
server_cert = "{pki.cert("server")}"
server_key = "{pki.key("server")}"
tls = "require"
max_clients = {self.maxClients}
[proxy.backend]
address = "{b.cluster.host}:{b.cluster.port}"
tls = "verify-full"
root_ca = "{pki.cert("ca")}"
server_name = "localhost"
[proxy.pool]
mode = "transaction"
service_user = "{POOL_USER}"
service_password_file = "{pw}"
max_size = {self.poolSize}
"""

    def startPgtls(self) -> None:
        path = self.base / "pgtls.toml"
        path.write_text(self.config())
        (self.out / "pgtls.toml").write_text(self.config())
        logfile = open(self.base / "pgtls.log", "ab")  # noqa: SIM115 - lives as long as the process
        nofile = self.pgtlsNofile

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        command = ["--log-format", "text", "pgtls", "--config", str(path)]
        if self.memtrace is not None:
            command = [
                str(VENV_BIN / "python"),
                str(BENCH / "memtrace_twist.py"),
                str(self.memtrace),
                *command,
            ]
        else:
            command = [str(VENV_BIN / "twist"), *command]
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            preexec_fn=limit,
        )
        pb.wait_listening(self.port, self.proc, "pgtls")
        pb.wait_listening(self.metricsPort, self.proc, "pgtls metrics")
        # The supervisor binds every address once to check it, before the
        # workers start: wait until every worker has its own listening
        # socket, or the first connections are refused.
        deadline = time.monotonic() + 60
        while listening_sockets(self.port) < self.workers:
            if time.monotonic() > deadline:
                raise RuntimeError("pgtls's workers did not start listening")
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgtls exited with status {self.proc.returncode}")
            time.sleep(0.2)

    def memsnapshot(self) -> None:
        """With C{memtrace}: ask pgtls for a tracemalloc snapshot (SIGRTMIN+1), and let it write."""
        if self.memtrace is not None and self.proc is not None:
            before = len(list(self.memtrace.glob("snapshot-*.txt")))
            self.proc.send_signal(signal.SIGRTMIN + 1)
            deadline = time.monotonic() + 120
            while len(list(self.memtrace.glob("snapshot-*.txt"))) == before:
                if time.monotonic() > deadline:
                    log("WARNING: no tracemalloc snapshot within 120 s")
                    return
                time.sleep(0.5)

    def metrics(self) -> dict[str, float]:
        """The metrics page's series, summed over workers, keyed by name and labels (no worker)."""
        url = f"http://127.0.0.1:{self.metricsPort}/metrics"
        with urllib.request.urlopen(url, timeout=10) as page:
            text = page.read().decode()
        found: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            m = re.match(r"([a-zA-Z_:][\w:]*)(\{.*\})? ([-\d.e+naifNI]+)$", line)
            if not m:
                continue
            labels = re.sub(r'worker="\d+",?', "", m.group(2) or "").replace(",}", "}")
            key = m.group(1) + ("" if labels in ("", "{}") else labels)
            found[key] = found.get(key, 0.0) + float(m.group(3))
        return found

    def pgtlsLog(self) -> Path:
        return self.base / "pgtls.log"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.bench is not None and self.bench.cluster is not None:
            try:
                self.bench.cluster.stop()
            except Exception as e:  # noqa: BLE001 - report and go on cleaning up
                log(f"cluster stop failed: {e}")
        if self.keep:
            log(f"kept {self.base}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)

    def info(self) -> dict[str, str]:
        """The machine and versions, as bench/run records them."""
        b = self.bench
        b.pgbouncer = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        info = pb.versions(b)
        info.pop("pgbouncer", None)
        info["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        return info


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")
