"""
The supervisor's check of a C{workers = N} configuration binds every
listening address once before starting the workers (so that a bad address
makes C{twist} exit non-zero). It must only bind: a socket that listens,
even for a moment, joins the port's C{SO_REUSEPORT} group, and the kernel
hands it connections (of clients of the pgtls already serving that port,
during a deploy on the same ports; or a health check asking whether the
new one is up) that are reset when it closes. bench/faults found it: its
"is pgtls up yet" connect was accepted by the check's socket, and the next
one was refused while the workers were still starting.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor

from pgtls_twisted.app._workers import check_config
from pgtls_twisted.config import ConfigError, parse_config
from pgtls_twisted.testing.pki import PKI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(pki: PKI, tmp_path: Path, port: int) -> Any:
    table = {
        "name": "app",
        "listener": {
            "bind_address": f"127.0.0.1:{port}",
            "server_cert": str(pki.cert("server")),
            "server_key": str(pki.key("server")),
        },
        "backend": {"address": "127.0.0.1:5432", "tls": "disable"},
    }
    return parse_config({"workers": 2, "proxy": [table]}, base_dir=tmp_path)


def test_the_bind_check_never_listens(pki: PKI, tmp_path: Path) -> None:
    port = free_port()
    check_config(config(pki, tmp_path, port), reactor, bind=True)
    # Nothing listens on the port now, nor was left to close later.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_the_bind_check_still_finds_a_port_it_cannot_share(pki: PKI, tmp_path: Path) -> None:
    with socket.socket() as taken:
        # Listening without SO_REUSEPORT: no one may share it.
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f'route "app": .*127.0.0.1:{port}'):
            check_config(config(pki, tmp_path, port), reactor, bind=True)


def test_the_bind_check_shares_a_port_with_a_running_pgtls(pki: PKI, tmp_path: Path) -> None:
    """A deploy on the same ports: the old pgtls listens with SO_REUSEPORT."""
    with socket.socket() as old:
        old.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        old.bind(("127.0.0.1", 0))
        old.listen()
        port = old.getsockname()[1]
        check_config(config(pki, tmp_path, port), reactor, bind=True)
