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
from support.configfile import on_port, write_config
from support.dsn import client_dsn
from support.net import free_port
from support.processes import ProxyProcess, daemon, pgtls_cli, run, wait_for_port
from support.proxy import route
from support.rawclient import served_serial
from support.waiting import eventually

from pgtls_twisted.testing.cluster import SCRAM_PASSWORD, SCRAM_USER


def config_file(tmp_path: Path, pki, cluster, port: int, **listener) -> Path:
    """A user's configuration file: one route "app" on C{port} in front of C{cluster}."""
    table = on_port(route(pki, cluster, listener=listener), port)
    return write_config(tmp_path / "routes.toml", [table], log_level="info")


def test_plugin_is_listed() -> None:
    out = run("twist", "--help", check=True).stdout
    assert "pgtls" in out
    out = run("twistd", "--help", check=True).stdout
    assert "pgtls" in out


@pytest.mark.parametrize(
    "command", [["twist", "--log-format", "text", "pgtls"], ["twistd", "-n", "pgtls"]]
)
def test_foreground_commands_serve_verify_full(pki, pg_tls, tmp_path, command) -> None:
    port = free_port()
    config = config_file(tmp_path, pki, pg_tls, port)
    proc = ProxyProcess(config, tmp_path, tuple(command))
    try:
        wait_for_port(port, proc)
        with psycopg.connect(client_dsn(port, pki)) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (SCRAM_USER,)
    finally:
        proc.stop()
        out = proc.log()
    # twist re-raises the signal it stopped on, as a well-behaved daemon does.
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "route=app listening on 127.0.0.1" in out
    assert SCRAM_PASSWORD not in out
    # No --reactor: pgtls's own (pgtls_twisted.app._reactor).
    assert "reactor: pgtls_twisted.tls._private.ShortDispatchReactor" in out, out


def test_another_reactor_can_be_chosen(pki, pg_tls, tmp_path) -> None:
    """
    C{--reactor=epoll} keeps Twisted's own epoll reactor, and a
    pass-through session (the relay, without the short dispatch path)
    works on it, big results included.
    """
    port = free_port()
    config = config_file(tmp_path, pki, pg_tls, port)
    proc = ProxyProcess(
        config, tmp_path, ("twist", "--reactor=epoll", "--log-format", "text", "pgtls")
    )
    try:
        wait_for_port(port, proc)
        with psycopg.connect(client_dsn(port, pki)) as conn:
            for _ in range(3):
                assert conn.execute("SELECT current_user").fetchone() == (SCRAM_USER,)
            rows = conn.execute("SELECT repeat('x', 1000) FROM generate_series(1, 5000)").fetchall()
            assert len(rows) == 5000
    finally:
        proc.stop()
        out = proc.log()
    assert "reactor: twisted.internet.epollreactor.EPollReactor" in out, out
    assert proc.returncode in (0, -signal.SIGTERM), out


def test_twistd_daemon_with_pidfile_and_logfile(pki, pg_tls, tmp_path) -> None:
    port = free_port()
    config = config_file(tmp_path, pki, pg_tls, port)
    pid, pidfile, logfile = daemon(config, tmp_path)
    try:
        wait_for_port(port)
        with psycopg.connect(client_dsn(port, pki)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        os.kill(pid, signal.SIGTERM)
        eventually(lambda: not pidfile.exists(), 15, "the pid file removed")
    assert not pidfile.exists()
    log = logfile.read_text()
    assert "route=app listening" in log and "session started" in log


def test_invalid_config_exits_nonzero_before_binding(pki, pg_tls, tmp_path) -> None:
    port = free_port()
    config = config_file(tmp_path, pki, pg_tls, port, tls="requried")
    result = run("twist", "pgtls", "--config", str(config))
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
    config = config_file(tmp_path, pki, pg_tls, port)
    config.write_text(config.read_text().replace(str(pki.cert("server")), str(bogus)))
    result = run("twist", "pgtls", "--config", str(config))
    assert result.returncode != 0
    assert "listener server certificate" in result.stdout + result.stderr


def test_check_command(pki, pg_tls, tmp_path) -> None:
    config = config_file(tmp_path, pki, pg_tls, 6543)
    result = pgtls_cli("check", "--config", str(config))
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
    config = config_file(tmp_path, pki, pg_tls, port)
    proc = ProxyProcess(config, tmp_path, ("twist", "pgtls"))
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
        proc.stop()
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


def test_sighup_reloads_certificates(pki, pg_tls, tmp_path) -> None:
    import shutil

    from pgtls_twisted.testing.pki import write_leaf

    certs = tmp_path / "certs"
    certs.mkdir()
    cert, key = certs / "server.crt", certs / "server.key"
    shutil.copy(pki.cert("server"), cert)
    shutil.copy(pki.key("server"), key)
    port = free_port()
    config = config_file(tmp_path, pki, pg_tls, port)
    config.write_text(
        config.read_text()
        .replace(str(pki.cert("server")), str(cert))
        .replace(str(pki.key("server")), str(key))
    )
    proc = ProxyProcess(config, tmp_path)
    try:
        wait_for_port(port, proc)
        before = served_serial(port, pki.cert("ca"))
        live = psycopg.connect(client_dsn(port, pki))
        new_cert, new_key = write_leaf(pki, "rotated", ["DNS:localhost", "IP:127.0.0.1"])
        shutil.copy(new_cert, cert)
        shutil.copy(new_key, key)
        proc.signal(signal.SIGHUP)
        eventually(
            lambda: served_serial(port, pki.cert("ca")) != before,
            10,
            "the new certificate served",
            interval=0.2,
        )
        # The session that started before the reload goes on.
        assert live.execute("SELECT 1").fetchone() == (1,)
        live.close()
    finally:
        proc.stop()
        out = proc.log()
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
