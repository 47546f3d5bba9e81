#!/usr/bin/env python3
"""
Ten thousand idle TLS clients on one pgtls (issue 15 item 6).

    bench/idle_clients.py                    # 10,000 clients, workers = 2
    bench/idle_clients.py --clients 500 --idle 5   # a quick check

Starts a throwaway PostgreSQL with TLS and one pgtls (C{twist pgtls},
C{workers = 2}) with a transaction-pool route (service user, pool of 20 per
worker), so that an idle logged-in client holds no server connection. Then,
from this one process (asyncio and the standard library's C{ssl}, not a
libpq connection each), it opens C{--clients} sessions, C{--concurrency} at
a time: TCP connect, SSLRequest, TLS handshake, StartupMessage, the
password, ReadyForQuery. Each then stays idle for C{--idle} seconds, after
which every one of them must still be open and answer C{SELECT 1}.

Measured: pgtls's RSS (supervisor and workers, from /proc) before and after,
per client; descriptors per process; the login rate while ramping; the TLS
handshake and the full login latency (p50, p99, max); the query answers at
the end; pgtls's own count of active clients (its metrics page). Raw samples
(one row per client, and every process sample) go to
C{bench/results/<date>-idle-clients/}, with a Markdown summary
(C{summary.md}) to paste into C{bench/RESULTS.md}.

Descriptors: pgtls does not change its RLIMIT_NOFILE; it runs with what it
inherits. This script raises its own limit (soft and hard, as root) to
C{--nofile} before starting pgtls, which inherits it, unless
C{--pgtls-nofile} sets pgtls's separately.
"""

import sys
from pathlib import Path

from _venv import reexec

reexec(__file__)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import csv  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
import ssl  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import loadkit as lk  # noqa: E402
from clients import LoginError, _context, _openSession, _readMessage  # noqa: E402

from pgtls_twisted.protocol import _wire as wire  # noqa: E402


@dataclass
class Session:
    index: int
    started: float
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    tcp_s: float = 0.0
    tls_s: float = 0.0
    login_s: float = 0.0
    done: float = 0.0
    error: str = ""
    query_s: float = 0.0
    query_ok: bool = False


async def login(s: Session, args: argparse.Namespace, ctx: ssl.SSLContext) -> None:
    """One session to ReadyForQuery, timing the TCP connect, the TLS handshake and the whole."""
    times: dict[str, float] = {}
    try:
        s.reader, s.writer = await _openSession(args, ctx, times)
    finally:
        s.started = times.get("start", 0.0)
    s.tcp_s = times["connected"] - s.started
    s.tls_s = times["tls_done"] - times["tls_start"]
    s.done = times["ready"]
    s.login_s = s.done - s.started


async def query(s: Session) -> None:
    """C{SELECT 1} on an idle session: one row and ReadyForQuery(I), no error."""
    assert s.reader is not None and s.writer is not None
    t0 = time.perf_counter()
    s.writer.write(wire.message(b"Q", b"SELECT 1\0"))
    rows = 0
    while True:
        mtype, body = await _readMessage(s.reader)
        if mtype == b"E":
            s.error = wire.parse_error_fields(body).get("M", "error")
        elif mtype == b"D":
            rows += 1
        elif mtype == b"Z":
            break
    s.query_s = time.perf_counter() - t0
    s.query_ok = rows == 1 and not s.error


async def run_all(
    sessions: list[Session], work, concurrency: int, timeout: float
) -> tuple[float, float]:
    """C{work(s)} for every session, C{concurrency} at a time; (first start, last end)."""
    limit = asyncio.Semaphore(concurrency)

    async def one(s: Session) -> None:
        async with limit:
            try:
                await asyncio.wait_for(work(s), timeout)
            except (OSError, LoginError, asyncio.IncompleteReadError, ssl.SSLError) as e:
                # An ErrorResponse read before the connection closed says more.
                s.error = s.error or f"{type(e).__name__}: {e}"[:200]
            except asyncio.TimeoutError:
                s.error = f"timeout ({timeout:g} s)"

    t0 = time.perf_counter()
    await asyncio.gather(*(one(s) for s in sessions))
    return t0, time.perf_counter()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def ms(v: float) -> str:
    return f"{v * 1000:.1f}"


async def settle(seconds: float) -> None:
    """Let pgtls finish what follows the last login (its log lines, freed buffers)."""
    await asyncio.sleep(seconds)


async def closed_down(root: int) -> list[tuple[float, int]]:
    """
    Wait until pgtls has closed the sessions the client closed: its
    descriptors stop falling (three samples 2 s apart alike), or 120 s.
    The (seconds, descriptors) samples.
    """
    closing: list[tuple[float, int]] = []
    c0 = time.perf_counter()
    while time.perf_counter() - c0 < 120:
        await asyncio.sleep(2)
        fds = int(lk.total(lk.sample(root), "fds"))
        closing.append((round(time.perf_counter() - c0, 1), fds))
        if len(closing) >= 3 and len({f for _, f in closing[-3:]}) == 1:
            break
    return closing


async def main_async(args: argparse.Namespace, setup: lk.Setup) -> dict:
    assert setup.proc is not None
    root = setup.proc.pid
    ctx = _context(str(setup.bench.pki.cert("ca")))
    result: dict = {"samples": {}}

    def snap(label: str) -> dict:
        s = lk.sample(root)
        result["samples"][label] = s
        lk.log(
            f"{label}: pgtls RSS {lk.total(s, 'rss_kib') / 1024:.1f} MiB, fds "
            + ", ".join(f"{k} {int(v['fds'])}" for k, v in s.items())
        )
        return s

    snap("started")
    # Warm-up: the first sessions load code and fill caches that every
    # later one shares; they stay connected and are part of the baseline.
    warm = [Session(-i - 1, 0.0) for i in range(args.warmup)]
    await run_all(warm, lambda s: login(s, args, ctx), 8, args.timeout)
    if any(s.writer is None for s in warm):
        raise RuntimeError(f"a warm-up login failed: {[s.error for s in warm if s.error][0]}")
    await settle(2)
    base = snap("baseline")
    setup.memsnapshot()
    load0 = lk.loadavg()
    cpu0 = {k: v["cpu_s"] for k, v in base.items()}
    lk.log(f"ramping to {args.clients} idle TLS clients, {args.concurrency} logins at a time")
    sessions = [Session(i, 0.0) for i in range(args.clients)]
    t0, t1 = await run_all(sessions, lambda s: login(s, args, ctx), args.concurrency, args.timeout)
    ok = [s for s in sessions if s.writer is not None]
    failed = [s for s in sessions if s.writer is None]
    lk.log(f"{len(ok)} logged in, {len(failed)} failed, in {t1 - t0:.1f} s")
    await settle(5)
    ramped = snap("connected")
    load1 = lk.loadavg()
    metrics1 = setup.metrics()
    gc.collect()
    lk.log(f"idle for {args.idle} s")
    await asyncio.sleep(args.idle)
    idle = snap("after idle")
    metrics2 = setup.metrics()
    # Login latency with the clients held, unqueued: one login at a time.
    probes = [Session(-100000 - i, 0.0) for i in range(args.probes)]
    await run_all(probes, lambda s: login(s, args, ctx), 1, args.timeout)
    for s in probes:
        if s.writer is not None:
            s.writer.write(wire.TERMINATE)
            s.writer.close()
    probed = [s for s in probes if s.writer is not None]
    lk.log(f"{len(probed)} of {len(probes)} one-at-a-time logins with the clients held")
    # Still there? A closed session is seen at EOF by its reader.
    open_ = [s for s in ok if not s.reader.at_eof() and not s.writer.is_closing()]  # type: ignore[union-attr]
    lk.log(f"{len(open_)} of {len(ok)} still open; SELECT 1 on each")
    q0, q1 = await run_all(open_, query, args.concurrency, args.timeout)
    answered = [s for s in open_ if s.query_ok]
    queried = snap("after queries")
    lk.log(f"{len(answered)} of {len(open_)} answered SELECT 1 in {q1 - q0:.1f} s")
    for s in ok:
        s.writer.write(wire.TERMINATE)  # type: ignore[union-attr]
        s.writer.close()  # type: ignore[union-attr]
    for s in warm:
        if s.writer is not None:
            s.writer.close()
    closing = await closed_down(root)
    closed = snap("after close")
    setup.memsnapshot()
    active = sum(
        v for k, v in setup.metrics().items() if k.startswith("pgtls_client_connections_active")
    )
    # Connect/close cycles on the same processes: memory that the clients
    # above freed is reused, so RSS that still grows cycle after cycle is
    # kept per connection (a leak), not the high-water mark of a peak.
    cycles = []
    for c in range(args.cycles):
        batch = [Session(-200000 - i, 0.0) for i in range(args.cycle_clients)]
        await run_all(batch, lambda s: login(s, args, ctx), args.concurrency, args.timeout)
        for s in batch:
            if s.writer is not None:
                s.writer.write(wire.TERMINATE)
                s.writer.close()
        await closed_down(root)
        after = snap(f"cycle {c + 1}")
        setup.memsnapshot()
        cycles.append(
            {
                "cycle": c + 1,
                "logged_in": sum(1 for s in batch if s.writer is not None),
                "rss_kib": lk.total(after, "rss_kib"),
                "fds": int(lk.total(after, "fds")),
            }
        )

    # -- figures -----------------------------------------------------------------
    done = sorted(s.done for s in ok)
    tls = [s.tls_s for s in ok]
    full = [s.login_s for s in ok]
    tcp = [s.tcp_s for s in ok]
    # Logins completed per second of the ramp, by whole second.
    perSecond: dict[int, int] = {}
    for d in done:
        perSecond[int(d - t0)] = perSecond.get(int(d - t0), 0) + 1
    seconds = sorted(perSecond.values())
    # The first and last seconds are partial.
    inner = [perSecond[k] for k in sorted(perSecond)[1:-1]]
    n = len(ok)
    grown = lk.total(ramped, "rss_kib") - lk.total(base, "rss_kib")
    cpu = {k: round(ramped[k]["cpu_s"] - cpu0.get(k, 0.0), 1) for k in ramped}
    errors: dict[str, int] = {}
    for s in failed + [s for s in open_ if not s.query_ok]:
        errors[s.error] = errors.get(s.error, 0) + 1
    result.update(
        clients=args.clients,
        workers=args.workers,
        concurrency=args.concurrency,
        warmup=args.warmup,
        idle_seconds=args.idle,
        logged_in=n,
        login_failures=len(failed),
        still_open=len(open_),
        answered=len(answered),
        errors=errors,
        ramp_seconds=round(t1 - t0, 2),
        logins_per_second=round(n / (done[-1] - t0), 1) if done else None,
        logins_per_second_median_1s=seconds[len(seconds) // 2] if seconds else None,
        logins_per_second_min_1s=min(inner) if inner else None,
        tcp_connect_ms={"p50": ms(pct(tcp, 0.5)), "p99": ms(pct(tcp, 0.99))},
        tls_handshake_ms={
            "p50": ms(pct(tls, 0.5)),
            "p99": ms(pct(tls, 0.99)),
            "max": ms(max(tls, default=0)),
        },
        login_ms={
            "p50": ms(pct(full, 0.5)),
            "p99": ms(pct(full, 0.99)),
            "max": ms(max(full, default=0)),
        },
        query_ms={
            "p50": ms(pct([s.query_s for s in answered], 0.5)),
            "p99": ms(pct([s.query_s for s in answered], 0.99)),
        },
        query_seconds=round(q1 - q0, 2),
        probes=len(probes),
        probe_failures=len(probes) - len(probed),
        probe_tls_ms={
            "p50": ms(pct([s.tls_s for s in probed], 0.5)),
            "p99": ms(pct([s.tls_s for s in probed], 0.99)),
        },
        probe_login_ms={
            "p50": ms(pct([s.login_s for s in probed], 0.5)),
            "p99": ms(pct([s.login_s for s in probed], 0.99)),
        },
        rss_base_kib=lk.total(base, "rss_kib"),
        rss_connected_kib=lk.total(ramped, "rss_kib"),
        rss_after_idle_kib=lk.total(idle, "rss_kib"),
        rss_after_queries_kib=lk.total(queried, "rss_kib"),
        rss_after_close_kib=lk.total(closed, "rss_kib"),
        fds_while_closing=closing,
        close_settled_s=closing[-1][0] if closing else None,
        active_after_close=active,
        cycles=cycles,
        rss_per_client_kib=round(grown / n, 1) if n else None,
        pgtls_cpu_seconds_during_ramp=cpu,
        pgtls_cpu_ms_per_login=round(sum(cpu.values()) / n * 1000, 2) if n else None,
        metrics_connected={
            k: v
            for k, v in metrics1.items()
            if k.startswith(("pgtls_client_connections_active", "pgtls_pool_server_connections"))
        },
        metrics_after_idle={
            k: v for k, v in metrics2.items() if k.startswith("pgtls_client_connections_active")
        },
        refused={
            k: v
            for k, v in metrics2.items()
            if k.startswith("pgtls_client_connections_refused_total")
        },
        load_average={"before": load0, "after ramp": load1, "end": lk.loadavg()},
        nofile={name: lk.nofile_limit(p["pid"]) for name, p in ramped.items()},
        client_rss_kib=lk._status(os.getpid()).get("VmRSS", 0),
    )
    with open(setup.out / "sessions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "start_s", "tcp_ms", "tls_ms", "login_ms", "query_ms", "error"])
        for s in sessions:
            w.writerow(
                [
                    s.index,
                    f"{s.started - t0:.4f}",
                    ms(s.tcp_s),
                    ms(s.tls_s),
                    ms(s.login_s),
                    ms(s.query_s),
                    s.error,
                ]
            )
    return result


def summary(r: dict, info: dict[str, str]) -> str:
    s = r["samples"]
    per = [
        f"{k} {v['rss_kib'] / 1024:.1f} MiB / {int(v['fds'])} fds"
        for k, v in s["connected"].items()
    ]
    base = [f"{k} {v['rss_kib'] / 1024:.1f} MiB" for k, v in s["baseline"].items()]
    lines = [
        f"`bench/idle_clients.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        f"({info['date']}, pgtls {info['pgtls commit']}, Python {info['python']}, "
        f"{info['openssl (pyOpenSSL)']}, {info['nproc']} cores shared with other work; "
        f"load average before / after the ramp / at the end: {r['load_average']['before']} / "
        f"{r['load_average']['after ramp']} / {r['load_average']['end']}).",
        "",
        f"One pgtls, `workers = {r['workers']}`, one transaction-pool route (service user, 20 server "
        f"connections per worker), `max_clients = {r['clients'] + 1000}`. One client process "
        f"(asyncio, the standard library's `ssl`) opened {r['clients']} sessions "
        f"{r['concurrency']} at a time after {r['warmup']} warm-up sessions: TCP connect, "
        "SSLRequest, TLS 1.3 handshake, StartupMessage, password, ReadyForQuery.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| logged in / failed | {r['logged_in']} / {r['login_failures']} |",
        f"| still open after {r['idle_seconds']} s idle / answered `SELECT 1` | "
        f"{r['still_open']} / {r['answered']} (in {r['query_seconds']} s, "
        f"p50 {r['query_ms']['p50']} ms, p99 {r['query_ms']['p99']} ms) |",
        "| pgtls's own count (`pgtls_client_connections_active`, after idle) | "
        + ", ".join(f"{int(v)}" for v in r["metrics_after_idle"].values())
        + " |",
        f"| RSS, supervisor + workers: baseline → {r['logged_in']} idle clients | "
        f"{r['rss_base_kib'] / 1024:.1f} → {r['rss_connected_kib'] / 1024:.1f} MiB |",
        f"| **RSS per idle client** | **{r['rss_per_client_kib']} KiB** |",
        f"| RSS after {r['idle_seconds']} s idle / after the queries / after all closed | "
        f"{r['rss_after_idle_kib'] / 1024:.1f} / {r['rss_after_queries_kib'] / 1024:.1f} / "
        f"{r['rss_after_close_kib'] / 1024:.1f} MiB |",
        f"| per process at baseline | {', '.join(base)} |",
        f"| after all closed ({r['close_settled_s']} s to settle; pgtls's active clients "
        f"{int(r['active_after_close'])}) | "
        + ", ".join(
            f"{k} {v['rss_kib'] / 1024:.1f} MiB / {int(v['fds'])} fds"
            for k, v in s["after close"].items()
        )
        + " |",
        f"| per process with the clients | {', '.join(per)} |",
        "| RLIMIT_NOFILE of each process (soft/hard) | "
        + ", ".join(f"{k} {v}" for k, v in r["nofile"].items())
        + " |",
        f"| **login rate while ramping** (whole ramp) | **{r['logins_per_second']} /s** "
        f"({r['ramp_seconds']} s; per second: median {r['logins_per_second_median_1s']}, "
        f"lowest {r['logins_per_second_min_1s']}) |",
        f"| pgtls CPU per login (all processes) | {r['pgtls_cpu_ms_per_login']} ms |",
        f"| TCP connect p50 / p99 | {r['tcp_connect_ms']['p50']} / {r['tcp_connect_ms']['p99']} ms |",
        f"| **TLS handshake** p50 / p99 / max | **{r['tls_handshake_ms']['p50']} / "
        f"{r['tls_handshake_ms']['p99']}** / {r['tls_handshake_ms']['max']} ms |",
        f"| **full login** (connect to ReadyForQuery) p50 / p99 / max | "
        f"**{r['login_ms']['p50']} / {r['login_ms']['p99']}** / {r['login_ms']['max']} ms |",
        f"| one login at a time with the {r['logged_in']} clients held ({r['probes']} logins, "
        f"{r['probe_failures']} failed): TLS handshake p50 / p99, full login p50 / p99 | "
        f"{r['probe_tls_ms']['p50']} / {r['probe_tls_ms']['p99']} ms, "
        f"{r['probe_login_ms']['p50']} / {r['probe_login_ms']['p99']} ms |",
        "| refusals counted by pgtls | "
        + (", ".join(f"`{k}` {int(v)}" for k, v in r["refused"].items() if v) or "none")
        + " |",
        f"| client process RSS | {r['client_rss_kib'] / 1024:.0f} MiB |",
    ]
    if r.get("cycles"):
        lines += [
            "",
            f"Then {len(r['cycles'])} cycles on the same processes, each opening "
            f"{r['cycles'][0]['logged_in']} sessions and closing them all: pgtls's RSS and "
            "descriptors after each cycle (all closed): "
            + ", ".join(f"{c['rss_kib'] / 1024:.1f} MiB / {c['fds']} fds" for c in r["cycles"])
            + ".",
        ]
    if r["errors"]:
        lines += ["", "Errors: " + "; ".join(f"{n} × `{e}`" for e, n in r["errors"].items())]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=32, help="logins at once (default 32)")
    p.add_argument("--warmup", type=int, default=20, help="sessions in the baseline (default 20)")
    p.add_argument("--idle", type=float, default=60, help="seconds idle before the check")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--probes", type=int, default=200, help="one-at-a-time logins with the clients held"
    )
    p.add_argument("--timeout", type=float, default=120, help="per login or query")
    p.add_argument("--nofile", type=int, default=65536, help="this process's RLIMIT_NOFILE")
    p.add_argument(
        "--pgtls-nofile", type=int, default=None, help="pgtls's RLIMIT_NOFILE (default: inherited)"
    )
    p.add_argument(
        "--cycles", type=int, default=0, help="connect/close cycles after the measurement"
    )
    p.add_argument("--cycle-clients", type=int, default=2000, help="sessions per cycle")
    p.add_argument(
        "--memtrace",
        action="store_true",
        help="pgtls under tracemalloc (bench/memtrace_twist.py, --workers 1): snapshots in "
        "the results directory after the baseline, after the close and after each cycle",
    )
    p.add_argument("--tag", default="", help="results in <date>-idle-clients-TAG")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--host", default="127.0.0.1")
    args = p.parse_args()
    limit = lk.raise_nofile(args.nofile)
    lk.log(f"RLIMIT_NOFILE {limit[0]}/{limit[1]} (pgtls: {args.pgtls_nofile or 'inherited'})")
    setup = lk.Setup(
        "idle-clients" + (f"-{args.tag}" if args.tag else ""),
        workers=args.workers,
        maxClients=args.clients + 1000,
        scale=1,
        pgtlsNofile=args.pgtls_nofile,
        keep=args.keep,
    )
    if args.memtrace:
        if args.workers != 1:
            raise SystemExit("--memtrace needs --workers 1")
        setup.memtrace = setup.base / "memtrace"
    try:
        setup.start()
        args.port = setup.port
        args.server_name = "localhost"
        args.user, args.password, args.database = lk.SCRAM_USER, lk.SCRAM_PASSWORD, lk.APP_DB
        info = setup.info()
        result = asyncio.run(main_async(args, setup))
        result["info"] = info
        lk.write_json(setup.out / "results.json", result)
        text = summary(result, info)
        (setup.out / "summary.md").write_text(text)
        if setup.memtrace is not None:
            for snapshot in sorted(setup.memtrace.glob("snapshot-*.txt")):
                (setup.out / snapshot.name).write_text(snapshot.read_text())
        print()
        print(text)
        lk.log(f"results in {setup.out}")
        ok = result["answered"] == args.clients
        return 0 if ok else 1
    finally:
        logtail = setup.pgtlsLog()
        if logtail.exists() and setup.out != Path():
            lines = logtail.read_text(errors="replace").splitlines()
            bad = [ln for ln in lines if " error" in ln.lower() or "traceback" in ln.lower()]
            (setup.out / "pgtls-log-errors.txt").write_text("\n".join(bad[:200]) + "\n")
        setup.stop()


if __name__ == "__main__":
    sys.exit(main())
