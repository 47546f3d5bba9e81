"""
Configuration documents for the tests of L{pgtls_twisted.config}
(test_config, test_config_values, test_config_cli): a full one and a
minimal one, the dummy files their file keys point at (conftest's C{certs}
fixture writes them), and parsing that returns the messages of a refusal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pgtls_twisted.config import (
    Config,
    ConfigError,
    parse_config,
)

FILE_KEYS = {
    "listener": ("server_cert", "server_key", "client_ca", "client_crl"),
    "backend": ("root_ca", "client_cert", "client_key"),
    "pool": ("service_password_file",),
}
DUMMY_FILES = (
    "server.crt",
    "server.key",
    "clients-ca.crt",
    "clients.crl",
    "backend-ca.crt",
    "proxy.crt",
    "proxy.key",
)


def write_dummy_files(directory: Path) -> Path:
    """Dummy files for every file key, in C{directory} (0600: keys must be private)."""
    for name in DUMMY_FILES:
        (directory / name).write_text(f"dummy {name}\n")
        (directory / name).chmod(0o600)
    return directory


def minimal_route(**listener: Any) -> dict[str, Any]:
    """A route with only the required keys, plus any listener overrides."""
    return {
        "listener": {
            "bind_address": "127.0.0.1:6432",
            "server_cert": "server.crt",
            "server_key": "server.key",
            **listener,
        },
        "backend": {"address": "db.internal:5432"},
    }


def minimal_doc(**listener: Any) -> dict[str, Any]:
    return {"proxy": [minimal_route(**listener)]}


def parse(doc: dict[str, Any], base_dir: Path) -> Config:
    return parse_config(doc, path=Path("routes.toml"), base_dir=base_dir)


def errors_of(doc: dict[str, Any], base_dir: Path) -> list[str]:
    """The messages L{parse_config} raises for C{doc}; fails if it accepts it."""
    with pytest.raises(ConfigError) as info:
        parse(doc, base_dir)
    assert str(info.value) == "\n".join(info.value.messages)
    return list(info.value.messages)


def single_error(doc: dict[str, Any], base_dir: Path) -> str:
    messages = errors_of(doc, base_dir)
    assert len(messages) == 1, messages
    return messages[0]


FULL_CONFIG = """\
log_level = "warning"

[[proxy]]
name = "app"
[proxy.listener]
bind_address = "0.0.0.0:6432"
server_cert = "server.crt"
server_key = "server.key"
tls = "allow"
min_tls_version = "1.3"
ciphers = "ECDHE+AESGCM"
mtls = true
client_ca = "clients-ca.crt"
client_crl = "clients.crl"
cert_user_match = true
direct_tls = false
cert_refresh_interval = "24h"
startup_timeout = "15s"
max_clients = 50
[proxy.backend]
address = "db.internal:5433"
tls = "verify-full"
root_ca = "backend-ca.crt"
server_name = "pg.example.com"
connect_timeout = "2500ms"
min_tls_version = "1.3"
client_cert = "proxy.crt"
client_key = "proxy.key"

[[proxy]]
name = "reports"
[proxy.listener]
bind_address = "[::1]:0"
server_cert = "server.crt"
server_key = "server.key"
cert_refresh_interval = "30min"
startup_timeout = 5
[proxy.backend]
address = "[2001:db8::1]:5432"
tls = "disable"
connect_timeout = 1.5
"""
