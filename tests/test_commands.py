"""
pgtls as a user runs it: C{twist pgtls}, C{twistd pgtls} (foreground and
daemonized), the plugin found by Twisted after installation, and a proxy
process's memory while a client reads a large result slowly.

These tests start pgtls as a separate process, so they use blocking
clients directly.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from support import rawclient

from pgtls_twisted.testing.cluster import SCRAM_PASSWORD, SCRAM_USER

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"pgtls exited with {proc.returncode}:\n{out}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port} after {timeout}s")


def write_config(
    tmp_path: Path, pki, cluster, port: int, name: str = "app", extra: str = ""
) -> Path:
    path = tmp_path / "routes.toml"
    path.write_text(
        f"""
log_level = "info"
[[proxy]]
name = "{name}"
[proxy.listener]
bind_address = "127.0.0.1:{port}"
server_cert = "{pki.cert("server")}"
server_key = "{pki.key("server")}"
{extra}
[proxy.backend]
address = "{cluster.host}:{cluster.port}"
tls = "verify-full"
root_ca = "{pki.cert("ca")}"
server_name = "localhost"
"""
    )
    return path


def dsn(pki, port: int) -> str:
    return (
        f"host=localhost port={port} dbname=postgres user={SCRAM_USER} password={SCRAM_PASSWORD} "
        f"sslmode=verify-full sslrootcert={pki.cert('ca')} connect_timeout=10"
    )


def spawn(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        args,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.stdout.read() if proc.stdout else ""


def test_plugin_is_listed() -> None:
    out = subprocess.run(
        [str(BIN / "twist"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "pgtls" in out
    out = subprocess.run(
        [str(BIN / "twistd"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "pgtls" in out


@pytest.mark.parametrize(
    "command", [["twist", "--log-format", "text", "pgtls"], ["twistd", "-n", "pgtls"]]
)
def test_foreground_commands_serve_verify_full(pki, pg_tls, tmp_path, command) -> None:
    port = free_port()
    config = write_config(tmp_path, pki, pg_tls, port)
    proc = spawn([str(BIN / command[0]), *command[1:], "--config", str(config)], tmp_path)
    try:
        wait_for_port(port, proc)
        with psycopg.connect(dsn(pki, port)) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (SCRAM_USER,)
    finally:
        out = stop(proc)
    # twist re-raises the signal it stopped on, as a well-behaved daemon does.
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "route=app listening on 127.0.0.1" in out
    assert SCRAM_PASSWORD not in out


def test_twistd_daemon_with_pidfile_and_logfile(pki, pg_tls, tmp_path) -> None:
    port = free_port()
    config = write_config(tmp_path, pki, pg_tls, port)
    pidfile, logfile = tmp_path / "pgtls.pid", tmp_path / "pgtls.log"
    subprocess.run(
        [
            str(BIN / "twistd"),
            "--pidfile",
            str(pidfile),
            "--logfile",
            str(logfile),
            "pgtls",
            "--config",
            str(config),
        ],
        cwd=tmp_path,
        check=True,
        timeout=30,
    )
    deadline = time.monotonic() + 10
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = int(pidfile.read_text())
    try:
        wait_for_port(port)
        with psycopg.connect(dsn(pki, port)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not pidfile.exists()
    log = logfile.read_text()
    assert "route=app listening" in log and "session started" in log


def test_invalid_config_exits_nonzero_before_binding(pki, pg_tls, tmp_path) -> None:
    port = free_port()
    config = write_config(tmp_path, pki, pg_tls, port, extra='tls = "requried"')
    result = subprocess.run(
        [str(BIN / "twist"), "pgtls", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert (
        'listener.tls: expected one of "require", "allow", got "requried"'
        in result.stdout + result.stderr
    )
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1)


def test_unusable_certificate_exits_nonzero(pki, pg_tls, tmp_path) -> None:
    bogus = tmp_path / "bogus.crt"
    bogus.write_text("not a certificate\n")
    port = free_port()
    config = write_config(tmp_path, pki, pg_tls, port)
    config.write_text(config.read_text().replace(str(pki.cert("server")), str(bogus)))
    result = subprocess.run(
        [str(BIN / "twist"), "pgtls", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "listener server certificate" in result.stdout + result.stderr


def test_check_command(pki, pg_tls, tmp_path) -> None:
    config = write_config(tmp_path, pki, pg_tls, 6543)
    result = subprocess.run(
        [sys.executable, "-m", "pgtls_twisted", "check", "--config", str(config)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "app" in result.stdout and "127.0.0.1:6543" in result.stdout


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_slow_reader_keeps_proxy_memory_bounded(pki, pg_tls, tmp_path) -> None:
    """
    A client reads a 200 MB result slowly: flow control must hold the
    backend back instead of buffering the result in the proxy.
    """
    port = free_port()
    config = write_config(tmp_path, pki, pg_tls, port)
    proc = spawn([str(BIN / "twist"), "pgtls", "--config", str(config)], tmp_path)
    try:
        wait_for_port(port, proc)
        sock = rawclient.request_tls(rawclient.connect(port, timeout=60), pki.cert("ca"))
        rawclient.startup_cleartext(sock, SCRAM_USER, SCRAM_PASSWORD)
        baseline = rss_kib(proc.pid)
        sock.sendall(
            rawclient.query_message("SELECT repeat('x', 1000) FROM generate_series(1, 200000)")
        )
        total, peak = 0, baseline
        # Slowly for ~6 s (the backend could produce the whole result in
        # well under that), sampling the proxy's memory...
        slow_until = time.monotonic() + 6
        while time.monotonic() < slow_until:
            total += len(sock.recv(16384))
            time.sleep(0.01)
            peak = max(peak, rss_kib(proc.pid))
        slow_total = total
        # ...then the rest at full speed, to the end of the result.
        tail = b""
        while True:
            chunk = sock.recv(1 << 20)
            assert chunk, "connection closed before ReadyForQuery"
            total += len(chunk)
            tail = (tail + chunk)[-64:]
            if tail.endswith(b"Z\x00\x00\x00\x05I"):
                break
            peak = max(peak, rss_kib(proc.pid))
        sock.close()
    finally:
        stop(proc)
    assert total > 200_000 * 1000
    assert slow_total < 50_000_000, "the slow phase was not slow"
    growth_mib = (peak - baseline) / 1024
    assert growth_mib < 32, f"proxy RSS grew by {growth_mib:.1f} MiB"


def test_make_demo_serves_a_verify_full_psql_session() -> None:
    """`make demo --check`: the demo's own setup, with psql through the proxy."""
    result = subprocess.run(
        [sys.executable, "-m", "pgtls_twisted.testing.demo", "--check", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "through pgtls" in result.stdout and "TLSv1.3" in result.stdout
    assert "demo stopped and cleaned up" in result.stdout


def served_serial(pki, port: int) -> int:
    from cryptography import x509

    sock = rawclient.request_tls(rawclient.connect(port), pki.cert("ca"))
    try:
        return x509.load_der_x509_certificate(sock.getpeercert(binary_form=True)).serial_number
    finally:
        sock.close()


def test_sighup_reloads_certificates(pki, pg_tls, tmp_path) -> None:
    import shutil

    from pgtls_twisted.testing.pki import write_leaf

    certs = tmp_path / "certs"
    certs.mkdir()
    cert, key = certs / "server.crt", certs / "server.key"
    shutil.copy(pki.cert("server"), cert)
    shutil.copy(pki.key("server"), key)
    port = free_port()
    config = write_config(tmp_path, pki, pg_tls, port)
    config.write_text(
        config.read_text()
        .replace(str(pki.cert("server")), str(cert))
        .replace(str(pki.key("server")), str(key))
    )
    proc = spawn(
        [str(BIN / "twist"), "--log-format", "text", "pgtls", "--config", str(config)], tmp_path
    )
    try:
        wait_for_port(port, proc)
        before = served_serial(pki, port)
        live = psycopg.connect(dsn(pki, port))
        new_cert, new_key = write_leaf(pki, "rotated", ["DNS:localhost", "IP:127.0.0.1"])
        shutil.copy(new_cert, cert)
        shutil.copy(new_key, key)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        after = before
        while after == before and time.monotonic() < deadline:
            time.sleep(0.2)
            after = served_serial(pki, port)
        assert after != before
        # The session that started before the reload goes on.
        assert live.execute("SELECT 1").fetchone() == (1,)
        live.close()
    finally:
        out = stop(proc)
    assert "SIGHUP: re-reading the configuration" in out


def test_systemd_unit_reloads_with_sighup_and_checks_first() -> None:
    """etc/pgtls.service: what the README promises about it (systemd itself is not run here)."""
    import configparser

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(Path(__file__).resolve().parent.parent / "etc" / "pgtls.service")
    service = unit["Service"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["ExecStart"].split()[1:4] == ["pgtls", "--config", "/etc/pgtls/routes.toml"]
    assert service["ExecStartPre"].split()[1:3] == ["check", "--config"]
    assert service["KillSignal"] == "SIGTERM"
