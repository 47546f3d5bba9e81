#!/usr/bin/env python3
"""
A soak at a steady pgbench load through pgtls (issue 15 item 6).

    bench/soak.py                    # 10 minutes, workers = 2, rates calibrated
    bench/soak.py --duration 120     # a quick check

Starts a throwaway PostgreSQL with TLS (pgbench scale 10) and one pgtls
(C{twist pgtls}, C{workers = 2}) with a transaction-pool route (service
user, 20 server connections per worker). Three pgbench processes then run
through that route at the same time, each rate-limited (C{-R}), so that
the machine is loaded but not saturated:

 - C{tpcb}: the TPC-B-like default script with C{-M prepared}, 8 clients
   (transactions of several statements; the pool's named-statement
   rewriting and its per-connection statement cache);
 - C{select}: C{-S -M simple}, 8 clients;
 - C{connect}: C{-C -S}, 2 clients at C{--connect-rate} (a new TLS
   connection and login per transaction: the accept and login path).

Unless C{--rate-tpcb} and C{--rate-select} are given, the rates are half of
what the first two sustain together without C{-R} in a C{--calibrate}
second run (the machine near 100 % busy), so that the soak runs at about
half of it.

Every C{--interval} seconds (10) it samples, per pgtls process (supervisor
and each worker), RSS (from /proc/PID/status), open descriptors (/proc/PID/fd)
and CPU time, plus the machine's CPU use and pgtls's metrics (active
clients, server connections by state). The verdict compares the mean of
the first window after warm-up with the mean of the last window (see
C{--warmup}, C{--window}): flat when each is within 5 %.

Raw samples (CSV and JSON), pgbench's output and a Markdown summary
(C{summary.md}, for C{bench/RESULTS.md}) go to
C{bench/results/<date>-soak/}.
"""

import sys
from pathlib import Path

from _venv import reexec

reexec(__file__)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import argparse  # noqa: E402
import csv  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import loadkit as lk  # noqa: E402
import pgtls_bench as pb  # noqa: E402

#: Descriptors by which a window's mean may differ and still be flat, whatever
#: 5 % of it is: the C{connect} stream's 2 clients each come and go with one.
FD_SLACK = 2

#: (name, clients, pgbench arguments)
STREAMS = (
    ("tpcb", 8, ("-M", "prepared")),
    ("select", 8, ("-S", "-M", "simple")),
    ("connect", 2, ("-C", "-S")),
)


def pgbench(
    setup: lk.Setup, name: str, clients: int, extra: tuple[str, ...], seconds: int, rate: float
) -> subprocess.Popen[str]:
    cmd = [
        "pgbench",
        "-n",
        "-T",
        str(seconds),
        "-c",
        str(clients),
        "-j",
        str(min(clients, 2)),
        "-P",
        "10",
        *extra,
    ]
    if rate:
        cmd += ["-R", f"{rate:g}"]
    cmd += ["-h", "127.0.0.1", "-p", str(setup.port), "-U", lk.SCRAM_USER, lk.APP_DB]
    env = pb.pg_env(
        PGPASSWORD=lk.SCRAM_PASSWORD,
        PGSSLMODE="verify-full",
        PGSSLROOTCERT=str(setup.bench.pki.cert("ca")),
    )
    lk.log(f"{name}: {' '.join(cmd)}")
    out = open(setup.out / f"pgbench-{name}.txt", "w")  # noqa: SIM115 - closed by wait_all
    out.write("$ " + " ".join(cmd) + "\n")
    out.flush()
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, text=True)


def parse_pgbench(path: Path) -> dict[str, Any]:
    text = path.read_text()
    found: dict[str, Any] = {}
    for key, pattern in (
        ("tps", r"^tps = ([\d.]+)"),
        ("transactions", r"^number of transactions actually processed: (\d+)"),
        ("failed", r"^number of failed transactions: (\d+)"),
        ("late", r"^number of transactions above the [\d.]+ ms latency limit: (\d+)"),
        ("lat_avg_ms", r"^latency average = ([\d.]+) ms"),
        ("lat_stddev_ms", r"^latency stddev = ([\d.]+) ms"),
        ("lag_avg_ms", r"^rate limit schedule lag: avg ([\d.]+)"),
    ):
        m = re.search(pattern, text, re.M)
        if m:
            found[key] = float(m.group(1))
    errors = [ln for ln in text.splitlines() if "error" in ln.lower() or "abort" in ln.lower()]
    found["errors"] = errors[:10]
    return found


def run_streams(
    setup: lk.Setup, seconds: int, rates: dict[str, float], tag: str, interval: float = 0
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Run the pgbench streams (those with a rate, or all); sample every C{interval} s."""
    procs = {}
    for name, clients, extra in STREAMS:
        if name not in rates:
            continue
        procs[name] = pgbench(setup, f"{tag}-{name}", clients, extra, seconds, rates[name])
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    busy0, all0 = lk.machine_cpu()
    stack0 = stack_cpu(setup, procs)
    nextSample = started
    last = started
    assert setup.proc is not None
    while any(p.poll() is None for p in procs.values()):
        now = time.monotonic()
        if interval and now >= nextSample:
            busy, allj = lk.machine_cpu()
            stack = stack_cpu(setup, procs)
            cores = os.cpu_count() or 1
            row: dict[str, Any] = {
                "t": round(now - started, 1),
                "machine_cpu_pct": round(100 * (busy - busy0) / max(allj - all0, 1), 1),
                # pgtls, PostgreSQL and pgbench: this benchmark's own share.
                "stack_cpu_pct": round(100 * (stack - stack0) / max(now - last, 1e-3) / cores, 1),
                "load1": float(lk.loadavg().split()[0]),
                "processes": lk.sample(setup.proc.pid),
            }
            busy0, all0, stack0, last = busy, allj, stack, now
            try:
                m = setup.metrics()
                row["metrics"] = {
                    k: v
                    for k, v in m.items()
                    if k.startswith(
                        (
                            "pgtls_client_connections_active",
                            "pgtls_pool_server_connections",
                            "pgtls_pool_clients",
                            "pgtls_client_connections_accepted_total",
                        )
                    )
                }
            except OSError as e:
                row["metrics_error"] = str(e)
            samples.append(row)
            procs_ = row["processes"]
            lk.log(
                f"t={row['t']:5.0f}s cpu {row['machine_cpu_pct']:5.1f}% "
                f"(ours {row['stack_cpu_pct']:5.1f}%) "
                + " ".join(
                    f"{k.split('-')[0]}:{v['rss_kib'] / 1024:.1f}MiB/{int(v['fds'])}fd"
                    for k, v in procs_.items()
                )
            )
            nextSample += interval
        if setup.proc.poll() is not None:
            raise RuntimeError(f"pgtls exited with status {setup.proc.returncode}")
        time.sleep(0.2)
    busy, allj = lk.machine_cpu()
    results = {}
    for name, p in procs.items():
        results[name] = parse_pgbench(setup.out / f"pgbench-{tag}-{name}.txt")
        results[name]["status"] = p.returncode
    return results, samples


def stack_cpu(setup: lk.Setup, procs: dict[str, subprocess.Popen[str]]) -> float:
    """CPU seconds of pgtls, PostgreSQL (postmaster and backends) and the pgbench processes."""
    pids = pb.tree(setup.proc.pid) if setup.proc else []
    try:
        pidfile = setup.bench.cluster.data_dir / "postmaster.pid"
        pids += pb.tree(int(pidfile.read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        pass
    pids += [p.pid for p in procs.values() if p.poll() is None]
    return sum(sum(lk.cpu_of(pid)) for pid in pids)


def window(samples: list[dict[str, Any]], lo: float, hi: float) -> list[dict[str, Any]]:
    return [s for s in samples if lo <= s["t"] < hi]


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, value): units per second."""
    if len(points) < 2:
        return 0.0
    mt = statistics.fmean(t for t, _ in points)
    mv = statistics.fmean(v for _, v in points)
    den = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (v - mv) for t, v in points) / den if den else 0.0


def verdict(
    samples: list[dict[str, Any]], duration: float, warmup: float, span: float
) -> dict[str, Any]:
    first = window(samples, warmup, warmup + span)
    last = window(samples, duration - span, duration + 1)
    after = [s for s in samples if s["t"] >= warmup]
    names = list(samples[-1]["processes"]) if samples else []
    rows: dict[str, Any] = {}
    for name in [*names, "total"]:
        for key in ("rss_kib", "fds"):

            def value(s: dict[str, Any], name: str = name, key: str = key) -> float:
                ps = s["processes"]
                if name == "total":
                    return sum(p[key] for p in ps.values())
                return ps[name][key] if name in ps else float("nan")

            a = statistics.fmean(value(s) for s in first) if first else float("nan")
            b = statistics.fmean(value(s) for s in last) if last else float("nan")
            change = (b - a) / a if a else float("nan")
            rows[f"{name}.{key}"] = {
                "first": round(a, 1),
                "last": round(b, 1),
                "change_pct": round(100 * change, 2),
                "min": min(value(s) for s in after) if after else None,
                "max": max(value(s) for s in after) if after else None,
                "slope_per_min": round(60 * slope([(s["t"], value(s)) for s in after]), 2),
                # Descriptors: a few tens per worker, of which the connect
                # stream's clients hold up to FD_SLACK at any moment.
                "flat": abs(change) <= 0.05 or (key == "fds" and abs(b - a) <= FD_SLACK),
            }
    return {
        "first_window_s": [warmup, warmup + span],
        "last_window_s": [duration - span, duration],
        "samples_first": len(first),
        "samples_last": len(last),
        "rows": rows,
        "flat": all(r["flat"] for r in rows.values()),
    }


def write_samples(path: Path, samples: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "t_s",
                "process",
                "pid",
                "rss_kib",
                "rss_anon_kib",
                "fds",
                "cpu_s",
                "machine_cpu_pct",
                "stack_cpu_pct",
                "load1",
                "clients_active",
                "server_connections",
            ]
        )
        for s in samples:
            m = s.get("metrics", {})
            active = sum(v for k, v in m.items() if k.startswith("pgtls_client_connections_active"))
            servers = sum(v for k, v in m.items() if k.startswith("pgtls_pool_server_connections"))
            for name, p in s["processes"].items():
                w.writerow(
                    [
                        s["t"],
                        name,
                        p["pid"],
                        p["rss_kib"],
                        p["rss_anon_kib"],
                        p["fds"],
                        p["cpu_s"],
                        s["machine_cpu_pct"],
                        s["stack_cpu_pct"],
                        s["load1"],
                        int(active),
                        int(servers),
                    ]
                )


def summary(r: dict[str, Any], info: dict[str, str]) -> str:
    v = r["verdict"]
    cpu = [s["machine_cpu_pct"] for s in r["samples"] if s["t"] >= r["warmup"]]
    ours = [s["stack_cpu_pct"] for s in r["samples"] if s["t"] >= r["warmup"]]
    lines = [
        f"`bench/soak.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` "
        f"({info['date']}, pgtls {info['pgtls commit']}, Python {info['python']}, "
        f"{info['nproc']} cores shared with other work; load average before / after: "
        f"{r['load_average']['before']} / {r['load_average']['after']}).",
        "",
        f"One pgtls, `workers = {r['workers']}`, one transaction-pool route (service user, "
        f"{r['pool_size']} server connections per worker), for {r['duration'] / 60:g} minutes "
        f"under three rate-limited pgbench streams at once (calibration: "
        f"{r['calibration_text']}):",
        "",
        "| stream | pgbench | rate (tx/s) | tps | transactions | failed | latency avg ms | exit |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, clients, extra in STREAMS:
        p = r["pgbench"].get(name, {})
        lines.append(
            f"| {name} | `-c {clients} {' '.join(extra)}` | {r['rates'][name]:g} "
            f"| {p.get('tps', 0):.1f} | {int(p.get('transactions', 0))} | {int(p.get('failed', 0))} "
            f"| {p.get('lat_avg_ms', '–')} | {p.get('status')} |"
        )
    lines += [
        "",
        f"Machine CPU during the soak (after warm-up, all processes, /proc/stat): mean "
        f"{statistics.fmean(cpu):.0f} %, range {min(cpu):.0f}–{max(cpu):.0f} %; of which "
        f"pgtls, PostgreSQL and pgbench (their /proc/PID/stat) {statistics.fmean(ours):.0f} % "
        f"(range {min(ours):.0f}–{max(ours):.0f} %), the rest other work on the machine."
        if cpu
        else "",
        "",
        f"Sampled every {r['interval']:g} s. **Verdict**: the mean of the samples in "
        f"{v['first_window_s'][0]:g}–{v['first_window_s'][1]:g} s (the first window after "
        f"{r['warmup']:g} s of warm-up, {v['samples_first']} samples) against the mean in "
        f"{v['last_window_s'][0]:g}–{v['last_window_s'][1]:g} s (the last, "
        f"{v['samples_last']} samples), per process and summed; flat when every change is "
        f"within ±5 % (descriptors: or within ±{FD_SLACK}): "
        f"**{'flat' if v['flat'] else 'NOT flat'}**.",
        "",
        "| process | RSS first → last MiB | change | min–max MiB after warm-up | slope KiB/min "
        "| fds first → last | change | min–max fds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = sorted({k.split(".")[0] for k in v["rows"]}, key=lambda n: (n == "total", n))
    for name in names:
        rr, fd = v["rows"][f"{name}.rss_kib"], v["rows"][f"{name}.fds"]
        lines.append(
            f"| {name} | {rr['first'] / 1024:.1f} → {rr['last'] / 1024:.1f} "
            f"| {rr['change_pct']:+.1f} % | {rr['min'] / 1024:.1f}–{rr['max'] / 1024:.1f} "
            f"| {rr['slope_per_min']:+.0f} | {fd['first']:.1f} → {fd['last']:.1f} "
            f"| {fd['change_pct']:+.1f} % | {fd['min']:.0f}–{fd['max']:.0f} |"
        )
    end = r.get("after_load")
    if end:
        lines += [
            "",
            "10 s after the load stopped: "
            + ", ".join(
                f"{k} {p['rss_kib'] / 1024:.1f} MiB / {int(p['fds'])} fds" for k, p in end.items()
            )
            + f"; pgtls's clients active: {r.get('active_after_load')}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=int, default=600, help="seconds of soak (default 600)")
    p.add_argument("--interval", type=float, default=10, help="seconds between samples")
    p.add_argument("--warmup", type=float, default=120, help="seconds before the first window")
    p.add_argument("--window", type=float, default=120, help="seconds in each compared window")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--pool-size", type=int, default=20)
    p.add_argument("--rate-tpcb", type=float, default=None)
    p.add_argument("--rate-select", type=float, default=None)
    p.add_argument("--connect-rate", type=float, default=5, help="-C stream, tx/s (default 5)")
    p.add_argument("--calibrate", type=int, default=20, help="seconds of unthrottled calibration")
    p.add_argument("--share", type=float, default=0.4, help="of the calibrated rate (0.4)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args()
    if args.warmup + 2 * args.window > args.duration:
        args.warmup = args.duration / 5
        args.window = args.duration / 5
    lk.raise_nofile(65536)
    setup = lk.Setup(
        "soak", workers=args.workers, maxClients=1000, poolSize=args.pool_size, keep=args.keep
    )
    result: dict[str, Any] = {
        "workers": args.workers,
        "pool_size": args.pool_size,
        "duration": args.duration,
        "interval": args.interval,
        "warmup": args.warmup,
        "window": args.window,
    }
    try:
        setup.start()
        info = setup.info()
        rates = {"connect": args.connect_rate}
        if args.rate_tpcb is None or args.rate_select is None:
            lk.log(f"calibrating: {args.calibrate} s without -R (connect stream at its rate)")
            cal, calSamples = run_streams(
                setup,
                args.calibrate,
                {"tpcb": 0, "select": 0, "connect": args.connect_rate},
                "calibrate",
                interval=args.calibrate / 2,
            )
            result["calibration"] = cal
            rates["tpcb"] = round(args.share * cal["tpcb"].get("tps", 100))
            rates["select"] = round(args.share * cal["select"].get("tps", 100))
            calCpu = [s["machine_cpu_pct"] for s in calSamples[1:]]
            result["calibration_text"] = (
                f"{args.calibrate} s without `-R`: tpcb {cal['tpcb'].get('tps', 0):.0f} tps, "
                f"select {cal['select'].get('tps', 0):.0f} tps"
                + (f", machine CPU {max(calCpu):.0f} %" if calCpu else "")
                + f"; the soak runs {args.share:g}× those"
            )
        else:
            rates["tpcb"], rates["select"] = args.rate_tpcb, args.rate_select
            result["calibration_text"] = "rates given on the command line"
        if args.rate_tpcb is not None:
            rates["tpcb"] = args.rate_tpcb
        if args.rate_select is not None:
            rates["select"] = args.rate_select
        result["rates"] = rates
        time.sleep(5)
        result["load_average"] = {"before": lk.loadavg()}
        lk.log(f"soak: {args.duration} s at {rates}")
        res, samples = run_streams(setup, args.duration, rates, "soak", args.interval)
        result["pgbench"] = res
        result["samples"] = samples
        result["load_average"]["after"] = lk.loadavg()
        time.sleep(10)
        assert setup.proc is not None
        result["after_load"] = lk.sample(setup.proc.pid)
        result["active_after_load"] = sum(
            v for k, v in setup.metrics().items() if k.startswith("pgtls_client_connections_active")
        )
        result["verdict"] = verdict(samples, args.duration, args.warmup, args.window)
        result["info"] = info
        write_samples(setup.out / "samples.csv", samples)
        lk.write_json(setup.out / "results.json", result)
        text = summary(result, info)
        (setup.out / "summary.md").write_text(text)
        print()
        print(text)
        lk.log(f"results in {setup.out}")
        return 0 if result["verdict"]["flat"] else 1
    finally:
        setup.stop()


if __name__ == "__main__":
    sys.exit(main())
