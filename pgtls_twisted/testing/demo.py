"""
C{make demo}: a throwaway PostgreSQL with TLS, pgtls in front of it, and
the psql line to try.

Everything lives in a temporary directory (the dev CA and certificates, the
cluster, the configuration) and is removed on Ctrl-C. pgtls itself runs as
a user would run it, C{twist pgtls --config routes.toml}, in a child
process. C{--check} runs psql through the proxy once and exits, which is
how the test suite proves the demo works.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pgtls_twisted.testing.cluster import SCRAM_PASSWORD, SCRAM_USER, PostgresCluster
from pgtls_twisted.testing.pki import make_pki


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_port(preferred: int) -> int:
    if preferred and _port_free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"pgtls exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"pgtls did not listen on {port} within {timeout:g}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument(
        "--port", type=int, default=6432, help="proxy port (default 6432, else a free one)"
    )
    parser.add_argument(
        "--check", action="store_true", help="run psql through the proxy once, then clean up"
    )
    args = parser.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="pgtls-demo-"))
    base.chmod(0o755)  # the postgres OS user must reach the cluster inside
    cluster = None
    proxy = None
    try:
        pki = make_pki(base / "pki")
        print("== starting a throwaway PostgreSQL with TLS ...", flush=True)
        cluster = PostgresCluster(base, ssl=True, pki=pki, name="pg")
        cluster.start()
        port = _pick_port(args.port)
        config = base / "routes.toml"
        config.write_text(
            f"""\
# Written by `make demo`: one route, client TLS required, backend verify-full.
[[proxy]]
name = "demo"
[proxy.listener]
bind_address = "127.0.0.1:{port}"
server_cert = "{pki.cert("server")}"
server_key = "{pki.key("server")}"
[proxy.backend]
address = "{cluster.host}:{cluster.port}"
tls = "verify-full"
root_ca = "{pki.cert("ca")}"
server_name = "localhost"
"""
        )
        twist = Path(sys.executable).with_name("twist")
        print(f"== starting: {twist} pgtls --config {config}", flush=True)
        proxy = subprocess.Popen(
            [str(twist), "--log-format", "text", "pgtls", "--config", str(config)],
            stdin=subprocess.DEVNULL,
        )
        _wait_for(port, proxy)
        dsn = (
            f"host=localhost port={port} dbname=postgres user={SCRAM_USER} "
            f"sslmode=verify-full sslrootcert={pki.cert('ca')}"
        )
        if args.check:
            sql = "SELECT 'through pgtls' AS hello, ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            result = subprocess.run(
                ["psql", dsn, "-c", sql],
                env=dict(os.environ, PGPASSWORD=SCRAM_PASSWORD),
                capture_output=True,
                text=True,
                timeout=30,
            )
            print(result.stdout + result.stderr, flush=True)
            return result.returncode
        print(
            f"""
pgtls is listening on 127.0.0.1:{port}, in front of PostgreSQL on {cluster.host}:{cluster.port}.
Try (password: {SCRAM_PASSWORD}):

    psql "{dsn}"

Press Ctrl-C to stop and remove everything.
""",
            flush=True,
        )
        try:
            while proxy.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        if proxy is not None and proxy.poll() is None:
            proxy.send_signal(signal.SIGTERM)
            try:
                proxy.wait(10)
            except subprocess.TimeoutExpired:
                proxy.kill()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
        print("== demo stopped and cleaned up", flush=True)


if __name__ == "__main__":
    sys.exit(main())
