"""
Tests for L{pgtls_twisted.config} and the C{pgtls check} command.

Most tests build the TOML document as a dict and call L{parse_config}
directly, with C{path=Path("routes.toml")} so that messages start with
C{routes.toml: } and can be compared exactly; file keys point at dummy files
in C{tmp_path} (their contents do not matter here).
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from support.processes import pgtls_cli

from pgtls_twisted import __main__ as cli
from pgtls_twisted.config import (
    DEFAULT_CIPHERS,
    AdminConfig,
    BackendConfig,
    Config,
    ConfigError,
    ListenerConfig,
    PoolConfig,
    RouteConfig,
    describe_config,
    format_duration,
    load_config,
    parse_address,
    parse_config,
    parse_duration,
)
from pgtls_twisted.protocol._scram import make_verifier

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "etc" / "routes.toml"

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


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    """Dummy files for every file key, in C{tmp_path} (0600: keys must be private)."""
    for name in DUMMY_FILES:
        (tmp_path / name).write_text(f"dummy {name}\n")
        (tmp_path / name).chmod(0o600)
    return tmp_path


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


# ---------------------------------------------------------------------------
# Whole configurations
# ---------------------------------------------------------------------------


def test_full_config(certs: Path) -> None:
    """Every key is read, converted and resolved against the config's directory."""
    path = certs / "routes.toml"
    path.write_text(FULL_CONFIG)
    config = load_config(path)
    assert config.log_level == "warn"
    assert config.path == path
    app, reports = config.routes
    assert app == RouteConfig(
        name="app",
        listener=ListenerConfig(
            bind_address="0.0.0.0:6432",
            host="0.0.0.0",
            port=6432,
            server_cert=certs / "server.crt",
            server_key=certs / "server.key",
            tls="allow",
            min_tls_version="1.3",
            ciphers="ECDHE+AESGCM",
            mtls=True,
            client_ca=certs / "clients-ca.crt",
            client_crl=certs / "clients.crl",
            cert_user_match=True,
            direct_tls=False,
            cert_refresh_interval=86400.0,
            startup_timeout=15.0,
            max_clients=50,
        ),
        backend=BackendConfig(
            address="db.internal:5433",
            host="db.internal",
            port=5433,
            tls="verify-full",
            root_ca=certs / "backend-ca.crt",
            server_name="pg.example.com",
            connect_timeout=2.5,
            min_tls_version="1.3",
            client_cert=certs / "proxy.crt",
            client_key=certs / "proxy.key",
        ),
    )
    assert reports.name == "reports"
    assert (reports.listener.host, reports.listener.port) == ("::1", 0)
    assert reports.listener.cert_refresh_interval == 1800.0
    assert reports.listener.startup_timeout == 5.0
    assert (reports.backend.host, reports.backend.port) == ("2001:db8::1", 5432)
    assert reports.backend.server_name == "2001:db8::1"
    assert reports.backend.tls == "disable"
    assert reports.backend.connect_timeout == 1.5


def test_minimal_config_defaults(certs: Path) -> None:
    """Only the required keys: everything else takes the documented default."""
    config = parse(minimal_doc(), certs)
    assert config.log_level == "info"
    assert config.path == Path(os.path.abspath("routes.toml"))
    (route,) = config.routes
    assert route.name == "proxy-1"
    lst, be = route.listener, route.backend
    assert (lst.host, lst.port) == ("127.0.0.1", 6432)
    assert lst.server_cert == certs / "server.crt"
    assert lst.tls == "require"
    assert lst.min_tls_version == "1.2"
    assert lst.ciphers == DEFAULT_CIPHERS
    assert lst.mtls is False
    assert lst.client_ca is None
    assert lst.client_crl is None
    assert lst.cert_user_match is False
    assert lst.direct_tls is True
    assert lst.cert_refresh_interval == 3600.0
    assert lst.startup_timeout == 60.0
    assert lst.max_clients == 1000
    assert be == BackendConfig(address="db.internal:5432", host="db.internal", port=5432)
    assert be.tls == "verify-full"
    assert be.root_ca is None
    assert be.server_name == "db.internal"
    assert be.connect_timeout == 10.0
    assert be.min_tls_version == "1.2"
    assert be.client_cert is None
    assert be.client_key is None
    assert be.require_auth is None
    assert be.max_scram_iterations == 100_000


def test_default_names_use_position(certs: Path) -> None:
    second = minimal_route()
    second["listener"]["bind_address"] = "127.0.0.1:6433"
    config = parse({"proxy": [minimal_route(), second]}, certs)
    assert [r.name for r in config.routes] == ["proxy-1", "proxy-2"]


def test_ipv6_backend_host_without_brackets(certs: Path) -> None:
    """The host of a bracketed IPv6 address is usable as-is, and is the server_name default."""
    doc = minimal_doc(bind_address="[::]:6432")
    doc["proxy"][0]["backend"]["address"] = "[fd00::5]:5432"
    (route,) = parse(doc, certs).routes
    assert (route.listener.host, route.listener.port) == ("::", 6432)
    assert (route.backend.host, route.backend.port) == ("fd00::5", 5432)
    assert route.backend.server_name == "fd00::5"


def test_backend_config_fills_server_name() -> None:
    """Built directly (as other modules' tests do), server_name still defaults to host."""
    assert BackendConfig(address="h:1", host="h", port=1).server_name == "h"
    assert BackendConfig(address="h:1", host="h", port=1, server_name="x").server_name == "x"


def test_parse_config_without_path(certs: Path) -> None:
    """Without a file, messages have no file prefix and Config.path is None."""
    config = parse_config(minimal_doc(), base_dir=certs)
    assert config.path is None
    with pytest.raises(ConfigError) as info:
        parse_config({"log_level": "loud", **minimal_doc()}, base_dir=certs)
    assert str(info.value).startswith("log_level: ")


def test_parse_config_base_dir_defaults_to_working_directory(
    certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(certs)
    (route,) = parse_config(minimal_doc()).routes
    assert route.listener.server_cert == certs / "server.crt"


# ---------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------


def test_relative_paths_are_relative_to_config_dir(
    certs: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not to the working directory: the result must not depend on where pgtls starts."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    monkeypatch.chdir(elsewhere)
    (certs / "tls").mkdir()
    (certs / "tls" / "a.crt").write_text("x")
    path = certs / "routes.toml"
    path.write_text(
        "[[proxy]]\n[proxy.listener]\n"
        'bind_address = "127.0.0.1:0"\n'
        'server_cert = "tls/a.crt"\n'
        f'server_key = "{certs / "server.key"}"\n'
        'client_ca = "./clients-ca.crt"\n'
        '[proxy.backend]\naddress = "db:5432"\n'
    )
    (route,) = load_config(os.path.relpath(path)).routes
    assert route.listener.server_cert == certs / "tls" / "a.crt"
    assert route.listener.server_key == certs / "server.key"
    assert route.listener.client_ca == certs / "clients-ca.crt"
    assert route.listener.server_cert.is_absolute()


def test_config_path_is_absolute(certs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kept absolute so a reload finds the file after the process changes directory."""
    monkeypatch.chdir(certs)
    Path("routes.toml").write_text(FULL_CONFIG)
    assert load_config("routes.toml").path == certs / "routes.toml"


def test_symlinks_are_not_resolved(certs: Path) -> None:
    """Certificate rotation swaps link targets; the configured path must stay the link."""
    (certs / "v1").mkdir()
    (certs / "v1" / "tls.crt").write_text("x")
    (certs / "live.crt").symlink_to(certs / "v1" / "tls.crt")
    (route,) = parse(minimal_doc(server_cert="live.crt"), certs).routes
    assert route.listener.server_cert == certs / "live.crt"


@pytest.mark.parametrize("section", ["listener", "backend"])
def test_every_file_key_must_exist(certs: Path, section: str) -> None:
    for key in FILE_KEYS[section]:
        doc = minimal_doc()
        doc["proxy"][0][section][key] = "missing.pem"
        messages = errors_of(doc, certs)
        assert messages[0] == (
            f"routes.toml: [[proxy]] #1: {section}.{key}: file not found: {certs / 'missing.pem'}"
        )


def test_file_key_directory(certs: Path) -> None:
    (certs / "dir.crt").mkdir()
    message = single_error(minimal_doc(server_cert="dir.crt"), certs)
    assert message == (
        f"routes.toml: [[proxy]] #1: listener.server_cert: not a regular file: {certs / 'dir.crt'}"
    )


def test_file_key_cannot_open(certs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check opens the file, so ACLs and the like count, not just the mode bits."""
    real_open = Path.open

    def fake_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self.name == "server.key":
            raise PermissionError(13, "Permission denied")
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", fake_open)
    message = single_error(minimal_doc(), certs)
    assert message == (
        f"routes.toml: [[proxy]] #1: listener.server_key: cannot read {certs / 'server.key'}:"
        " Permission denied"
    )


def test_file_key_url(certs: Path) -> None:
    """The Rust pgtls fetched certificates over HTTP(S); say so rather than "not found"."""
    message = single_error(minimal_doc(server_cert="https://vault/cert.pem"), certs)
    assert message.startswith('routes.toml: [[proxy]] #1: listener.server_cert: "https://vault')
    assert "URLs are not supported" in message


def test_file_key_empty(certs: Path) -> None:
    message = single_error(minimal_doc(server_key=""), certs)
    assert message == "routes.toml: [[proxy]] #1: listener.server_key: must not be empty"


# ---------------------------------------------------------------------------
# Durations
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("10s", 10.0),
        ("5m", 300.0),
        ("30min", 1800.0),
        ("1h", 3600.0),
        ("24h", 86400.0),
        ("1d", 86400.0),
        ("30", 30.0),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("10 s", 10.0),
        (" 7s ", 7.0),
        (30, 30.0),
        (2.5, 2.5),
        ("1ms", 0.001),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "invalid duration"),
        ("s", "invalid duration"),
        ("10x", "invalid duration"),
        ("10S", "invalid duration"),
        ("1h30m", "invalid duration"),
        ("-5s", "invalid duration"),
        ("ten", "invalid duration"),
        ("0", "must be greater than 0"),
        ("0s", "must be greater than 0"),
        (0, "must be greater than 0"),
        (0.0, "must be greater than 0"),
        (-1, "must be greater than 0"),
        (float("inf"), "must be finite"),
        (float("nan"), "must be finite"),
        (True, "got boolean true"),
        ([10], "got an array"),
        (None, "expected a duration"),
    ],
)
def test_parse_duration_rejects(value: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_duration(value)


def test_parse_duration_allow_zero() -> None:
    assert parse_duration("0s", allow_zero=True) == 0.0
    with pytest.raises(ValueError, match="0 or more"):
        parse_duration(-1, allow_zero=True)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.5, "500ms"),
        (10, "10s"),
        (90, "90s"),
        (300, "5m"),
        (3600, "1h"),
        (86400, "1d"),
        (2.5, "2.5s"),
    ],
)
def test_format_duration_round_trips(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("key", ["cert_refresh_interval", "startup_timeout"])
def test_listener_duration_errors_name_key(certs: Path, key: str) -> None:
    message = single_error(minimal_doc(**{key: "0s"}), certs)
    assert message == (
        f'routes.toml: [[proxy]] #1: listener.{key}: invalid duration "0s": must be greater than 0'
    )


def test_backend_duration_error_names_key(certs: Path) -> None:
    doc = minimal_doc()
    doc["proxy"][0]["backend"]["connect_timeout"] = "soon"
    message = single_error(doc, certs)
    assert message.startswith(
        'routes.toml: [[proxy]] #1: backend.connect_timeout: invalid duration "soon"'
    )


# ---------------------------------------------------------------------------
# Addresses
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:6432", ("0.0.0.0", 6432)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("localhost:5432", ("localhost", 5432)),
        ("db-1.internal:65535", ("db-1.internal", 65535)),
        ("[::]:6432", ("::", 6432)),
        ("[::1]:5432", ("::1", 5432)),
        ("[2001:db8::1]:1", ("2001:db8::1", 1)),
        ("[fe80::1%eth0]:5432", ("fe80::1%eth0", 5432)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("::1:5432", "must be in brackets"),
        ("2001:db8::1", "must be in brackets"),
        ("db.internal", "missing port"),
        ("db.internal:", "missing port"),
        ("[::1]", "missing port"),
        ("[::1]:", "missing port"),
        ("[::1]5432", "missing port"),
        ("[::1:5432", 'missing "]"'),
        ("[db.internal]:5432", "only for IPv6"),
        ("[]:5432", "empty host"),
        (":5432", "empty host"),
        ("db:65536", "outside 0..65535"),
        ("db:99999999", "outside 0..65535"),
        ("db:-1", "not a number"),
        ("db:+1", "not a number"),
        ("db:http", "not a number"),
        ("db: 5432", "expected"),
        ("", "expected"),
        ("unix/sock:5432", "not a host name"),
    ],
)
def test_parse_address_rejects(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_address(text)


def test_bind_address_error_names_key(certs: Path) -> None:
    message = single_error(minimal_doc(bind_address="::1:6432"), certs)
    assert message.startswith(
        'routes.toml: [[proxy]] #1: listener.bind_address: invalid address "::1:6432"'
    )


def test_backend_port_zero(certs: Path) -> None:
    """Port 0 makes sense for a listener (ephemeral), never for a connection."""
    doc = minimal_doc()
    doc["proxy"][0]["backend"]["address"] = "db:0"
    message = single_error(doc, certs)
    assert message == (
        'routes.toml: [[proxy]] #1: backend.address: invalid address "db:0":'
        " port 0 cannot be connected to"
    )


# ---------------------------------------------------------------------------
# Unknown keys and types
# ---------------------------------------------------------------------------


def test_unknown_top_level_key(certs: Path) -> None:
    doc = {"log_levle": "info", **minimal_doc()}
    message = single_error(doc, certs)
    assert message == 'routes.toml: log_levle: unknown key; did you mean "log_level"?'


def test_unknown_route_key(certs: Path) -> None:
    doc = minimal_doc()
    doc["proxy"][0]["nmae"] = "app"
    message = single_error(doc, certs)
    assert message == 'routes.toml: [[proxy]] #1: nmae: unknown key; did you mean "name"?'


def test_unknown_listener_key_suggests(certs: Path) -> None:
    doc = minimal_doc()
    doc["proxy"][0]["name"] = "app"
    doc["proxy"][0]["listener"]["mtsl"] = True
    message = single_error(doc, certs)
    assert (
        message
        == 'routes.toml: [[proxy]] #1 "app": listener.mtsl: unknown key; did you mean "mtls"?'
    )


def test_unknown_key_without_suggestion(certs: Path) -> None:
    doc = minimal_doc()
    doc["proxy"][0]["backend"]["zzz"] = 1
    assert single_error(doc, certs) == "routes.toml: [[proxy]] #1: backend.zzz: unknown key"


def test_misspelt_required_key(certs: Path) -> None:
    """The misspelling is reported, and so is the key it failed to set."""
    doc = minimal_doc()
    doc["proxy"][0]["listener"]["bind_adress"] = doc["proxy"][0]["listener"].pop("bind_address")
    assert errors_of(doc, certs) == [
        'routes.toml: [[proxy]] #1: listener.bind_adress: unknown key; did you mean "bind_address"?',
        "routes.toml: [[proxy]] #1: listener.bind_address: missing (this key is required)",
    ]


def test_key_in_wrong_section(certs: Path) -> None:
    doc = minimal_doc()
    doc["proxy"][0]["listener"]["root_ca"] = "backend-ca.crt"
    message = single_error(doc, certs)
    assert message == (
        "routes.toml: [[proxy]] #1: listener.root_ca: unknown key; it belongs in [proxy.backend]"
    )


def test_key_directly_under_proxy(certs: Path) -> None:
    doc = minimal_doc()
    doc["proxy"][0]["bind_address"] = "x:1"
    message = single_error(doc, certs)
    assert message == (
        "routes.toml: [[proxy]] #1: bind_address: unknown key; it belongs in [proxy.listener]"
    )


def test_old_tls_enabled_key(certs: Path) -> None:
    doc = minimal_doc()
    doc["proxy"][0]["backend"]["tls_enabled"] = True
    message = single_error(doc, certs)
    assert message.startswith("routes.toml: [[proxy]] #1: backend.tls_enabled: unknown key; ")
    assert '"verify-full"' in message


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("mtls", "true", 'expected true or false, got "true"'),
        ("mtls", 1, "expected true or false, got integer 1"),
        ("direct_tls", "no", 'expected true or false, got "no"'),
        ("cert_user_match", 0, "expected true or false, got integer 0"),
        ("max_clients", True, "expected an integer of at least 1, got boolean true"),
        ("max_clients", "100", 'expected an integer of at least 1, got "100"'),
        ("max_clients", 10.0, "expected an integer of at least 1, got float 10.0"),
        ("max_clients", 0, "expected an integer of at least 1, got 0"),
        ("max_clients", -3, "expected an integer of at least 1, got -3"),
        ("ciphers", ["ECDHE"], "expected a string, got an array"),
        ("ciphers", " ", "must not be empty"),
        ("server_cert", 5, "expected a string, got integer 5"),
        ("server_cert", {"path": "x"}, "expected a string, got a table"),
        ("bind_address", 6432, 'expected a string such as "0.0.0.0:6432", got integer 6432'),
        (
            "tls",
            "requried",
            'expected one of "require", "allow", got "requried"; did you mean "require"?',
        ),
        (
            "tls",
            "REQUIRE",
            'expected one of "require", "allow", got "REQUIRE"; did you mean "require"?',
        ),
        ("tls", "prefer", 'expected one of "require", "allow", got "prefer"'),
        ("tls", True, 'expected one of "require", "allow", got boolean true'),
        ("min_tls_version", "1.1", 'expected one of "1.2", "1.3", got "1.1"'),
        (
            "min_tls_version",
            1.3,
            'expected one of "1.2", "1.3", got float 1.3; write it as a string: "1.3"',
        ),
    ],
)
def test_listener_value_errors(certs: Path, key: str, value: object, reason: str) -> None:
    message = single_error(minimal_doc(**{key: value}), certs)
    assert message == f"routes.toml: [[proxy]] #1: listener.{key}: {reason}"


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("tls", "verify_full", 'got "verify_full"; did you mean "verify-full"?'),
        (
            "tls",
            "allow",
            'expected one of "disable", "prefer", "require", "verify-ca", "verify-full", got "allow"',
        ),
        ("tls", False, "got boolean false"),
        ("server_name", "", "must not be empty"),
        ("server_name", "[::1]", "without brackets"),
        ("server_name", "a b", "is not a host name"),
        ("server_name", 1, "expected a string, got integer 1"),
        ("address", ["db", 5432], 'expected a string such as "0.0.0.0:6432", got an array'),
        ("min_tls_version", "TLSv1.3", 'got "TLSv1.3"'),
        ("connect_timeout", "0", "must be greater than 0"),
    ],
)
def test_backend_value_errors(certs: Path, key: str, value: object, reason: str) -> None:
    doc = minimal_doc()
    doc["proxy"][0]["backend"][key] = value
    message = single_error(doc, certs)
    assert message.startswith(f"routes.toml: [[proxy]] #1: backend.{key}: ")
    assert reason in message


@pytest.mark.parametrize("mode", ["disable", "prefer", "require", "verify-ca", "verify-full"])
def test_backend_tls_modes(certs: Path, mode: str) -> None:
    doc = minimal_doc()
    doc["proxy"][0]["backend"]["tls"] = mode
    if mode == "verify-ca":
        doc["proxy"][0]["backend"]["root_ca"] = "backend-ca.crt"
    assert parse(doc, certs).routes[0].backend.tls == mode


@pytest.mark.parametrize(
    ("value", "level"),
    [
        ("debug", "debug"),
        ("info", "info"),
        ("warn", "warn"),
        ("warning", "warn"),
        ("WARNING", "warn"),
        ("Error", "error"),
    ],
)
def test_log_levels(certs: Path, value: str, level: str) -> None:
    assert parse({"log_level": value, **minimal_doc()}, certs).log_level == level


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("trace", 'expected one of "debug", "info", "warn", "error", got "trace"'),
        ("pgtls=debug", "filter directives from the Rust pgtls are not supported"),
        (3, "got integer 3"),
    ],
)
def test_log_level_errors(certs: Path, value: object, reason: str) -> None:
    message = single_error({"log_level": value, **minimal_doc()}, certs)
    assert message.startswith("routes.toml: log_level: ")
    assert reason in message


# ---------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("doc", [{}, {"proxy": []}, {"log_level": "info"}])
def test_at_least_one_route(certs: Path, doc: dict[str, Any]) -> None:
    assert single_error(doc, certs) == "routes.toml: at least one [[proxy]] route is required"


def test_proxy_written_as_single_table(certs: Path) -> None:
    message = single_error({"proxy": minimal_route()}, certs)
    assert message.startswith("routes.toml: proxy: expected an array of tables, got a table;")
    assert "[[proxy]]" in message


def test_proxy_not_tables(certs: Path) -> None:
    assert single_error({"proxy": "x"}, certs) == (
        'routes.toml: proxy: expected an array of tables ([[proxy]]), got "x"'
    )
    assert single_error({"proxy": [1]}, certs) == (
        "routes.toml: [[proxy]] #1: expected a table, got integer 1"
    )


@pytest.mark.parametrize("section", ["listener", "backend"])
def test_missing_section(certs: Path, section: str) -> None:
    doc = minimal_doc()
    del doc["proxy"][0][section]
    assert single_error(doc, certs) == (
        f"routes.toml: [[proxy]] #1: {section}: missing [proxy.{section}] table"
    )


@pytest.mark.parametrize("section", ["listener", "backend"])
def test_section_wrong_type(certs: Path, section: str) -> None:
    doc = minimal_doc()
    doc["proxy"][0][section] = "db:5432"
    assert single_error(doc, certs) == (
        f'routes.toml: [[proxy]] #1: {section}: expected a table ([proxy.{section}]), got "db:5432"'
    )


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("listener", "bind_address"),
        ("listener", "server_cert"),
        ("listener", "server_key"),
        ("backend", "address"),
    ],
)
def test_required_keys(certs: Path, section: str, key: str) -> None:
    doc = minimal_doc()
    doc["proxy"][0]["name"] = "app"
    del doc["proxy"][0][section][key]
    assert single_error(doc, certs) == (
        f'routes.toml: [[proxy]] #1 "app": {section}.{key}: missing (this key is required)'
    )


def test_route_name_errors(certs: Path) -> None:
    doc = minimal_doc()
    doc["proxy"][0]["name"] = 7
    assert single_error(doc, certs) == (
        "routes.toml: [[proxy]] #1: name: expected a string, got integer 7"
    )
    doc["proxy"][0]["name"] = ""
    assert single_error(doc, certs) == "routes.toml: [[proxy]] #1: name: must not be empty"


def test_errors_name_route_by_index_and_name(certs: Path) -> None:
    """The index is always there (names can repeat or be missing); the name when it exists."""
    second = minimal_route(tls="requried")
    second["name"] = "app"
    second["listener"]["bind_address"] = "127.0.0.1:6433"
    message = single_error({"proxy": [minimal_route(), second]}, certs)
    assert message == (
        'routes.toml: [[proxy]] #2 "app": listener.tls: expected one of "require", "allow",'
        ' got "requried"; did you mean "require"?'
    )


def test_all_problems_are_reported(certs: Path) -> None:
    """One `pgtls check` run shows every problem, in file order."""
    first = minimal_route(tls="x", max_clients=0)
    second = minimal_route()
    second["backend"]["address"] = "nope"
    messages = errors_of({"log_level": "x", "proxy": [first, second]}, certs)
    assert [m.split(": ")[1:3] for m in messages] == [
        ["log_level", 'expected one of "debug", "info", "warn", "error", got "x"'],
        ["[[proxy]] #1", "listener.tls"],
        ["[[proxy]] #1", "listener.max_clients"],
        ["[[proxy]] #2", "backend.address"],
    ]


def test_optional_section_machinery(certs: Path) -> None:
    """
    Future tables ([proxy.pool], [admin]) are schema entries; an optional
    one that is absent yields None, a present one is checked like the rest.
    """
    from pgtls_twisted.config import _config as module

    section = module._Section(
        {"size": module._Key(module._positive_int, 10)}, build=dict, required=False
    )
    sections = {"pool": section}
    report = module._Report(prefix="routes.toml: ")
    assert module._parse_sections(sections, {}, "x: ", certs, report) == {"pool": None}
    parsed = module._parse_sections(sections, {"pool": {}}, "x: ", certs, report)
    assert module._build_sections(sections, parsed) == {"pool": {"size": 10}}
    module._parse_sections(sections, {"pool": {"size": 0, "sise": 1}}, "x: ", certs, report)
    assert report.messages == [
        'routes.toml: x: pool.sise: unknown key; did you mean "size"?',
        "routes.toml: x: pool.size: expected an integer of at least 1, got 0",
    ]


# ---------------------------------------------------------------------------
# Rules between keys and between routes
# ---------------------------------------------------------------------------


def test_mtls_requires_client_ca(certs: Path) -> None:
    assert single_error(minimal_doc(mtls=True), certs) == (
        "routes.toml: [[proxy]] #1: listener.client_ca: required when mtls = true"
    )


def test_cert_user_match_requires_mtls(certs: Path) -> None:
    message = single_error(minimal_doc(cert_user_match=True, client_ca="clients-ca.crt"), certs)
    assert message.startswith(
        "routes.toml: [[proxy]] #1: listener.cert_user_match: requires mtls = true"
    )


def test_client_crl_requires_client_ca(certs: Path) -> None:
    message = single_error(minimal_doc(client_crl="clients.crl"), certs)
    assert message.startswith("routes.toml: [[proxy]] #1: listener.client_crl: requires client_ca")


def test_mtls_complete(certs: Path) -> None:
    doc = minimal_doc(
        mtls=True, client_ca="clients-ca.crt", client_crl="clients.crl", cert_user_match=True
    )
    lst = parse(doc, certs).routes[0].listener
    assert (lst.mtls, lst.cert_user_match) == (True, True)
    assert lst.client_crl == certs / "clients.crl"


def test_client_ca_without_mtls_is_accepted(certs: Path) -> None:
    lst = parse(minimal_doc(client_ca="clients-ca.crt"), certs).routes[0].listener
    assert (lst.mtls, lst.client_ca) == (False, certs / "clients-ca.crt")


def test_cross_key_rules_skip_broken_values(certs: Path) -> None:
    """A missing client_ca file is one problem, not also "mtls needs client_ca"."""
    messages = errors_of(minimal_doc(mtls=True, client_ca="gone.crt"), certs)
    assert len(messages) == 1
    assert "listener.client_ca: file not found" in messages[0]


@pytest.mark.parametrize(
    ("present", "missing"), [("client_cert", "client_key"), ("client_key", "client_cert")]
)
def test_backend_client_cert_and_key_go_together(certs: Path, present: str, missing: str) -> None:
    doc = minimal_doc()
    doc["proxy"][0]["backend"][present] = "proxy.crt"
    assert single_error(doc, certs) == (
        f"routes.toml: [[proxy]] #1: backend.{missing}: required when {present} is set"
    )


def test_duplicate_route_names(certs: Path) -> None:
    first, second = minimal_route(), minimal_route(bind_address="127.0.0.1:6433")
    first["name"] = second["name"] = "app"
    assert single_error({"proxy": [first, second]}, certs) == (
        'routes.toml: [[proxy]] #2 "app": name: "app" is already used by [[proxy]] #1 "app"'
    )


def test_duplicate_of_default_name(certs: Path) -> None:
    first, second = minimal_route(), minimal_route(bind_address="127.0.0.1:6433")
    second["name"] = "proxy-1"
    message = single_error({"proxy": [first, second]}, certs)
    assert message == (
        'routes.toml: [[proxy]] #2 "proxy-1": name: "proxy-1" is already used by [[proxy]] #1'
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("127.0.0.1:6432", "127.0.0.1:6432"),
        ("localhost:6432", "LOCALHOST:6432"),
        ("[::1]:6432", "[0:0:0:0:0:0:0:1]:6432"),
        ("0.0.0.0:6432", "127.0.0.1:6432"),
        ("10.0.0.1:6432", "0.0.0.0:6432"),
        ("[::]:6432", "[::1]:6432"),
        ("[::]:6432", "127.0.0.1:6432"),
        ("0.0.0.0:6432", "[::]:6432"),
    ],
)
def test_duplicate_bind(certs: Path, first: str, second: str) -> None:
    routes = [minimal_route(bind_address=first), minimal_route(bind_address=second)]
    assert single_error({"proxy": routes}, certs) == (
        f'routes.toml: [[proxy]] #2: listener.bind_address: "{second}" conflicts with'
        f' "{first}" of [[proxy]] #1'
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("127.0.0.1:0", "127.0.0.1:0"),
        ("127.0.0.1:6432", "127.0.0.1:6433"),
        ("127.0.0.1:6432", "127.0.0.2:6432"),
        ("0.0.0.0:6432", "[::1]:6432"),
        ("db-a:6432", "db-b:6432"),
    ],
)
def test_distinct_binds(certs: Path, first: str, second: str) -> None:
    routes = [minimal_route(bind_address=first), minimal_route(bind_address=second)]
    assert len(parse({"proxy": routes}, certs).routes) == 2


# ---------------------------------------------------------------------------
# load_config: reading the file
# ---------------------------------------------------------------------------


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"cannot read config file: {path}: No such file or directory"


def test_config_file_is_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^cannot read config file: "):
        load_config(tmp_path)


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text('log_level = "info"\n[[proxy]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 2" in message


def test_duplicate_toml_key(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text('log_level = "info"\nlog_level = "debug"\n')
    with pytest.raises(ConfigError, match="invalid TOML: .*line 2"):
        load_config(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_bytes(b'log_level = "\xff"\n')
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_config(path)


def test_load_config_messages_name_file_as_given(certs: Path) -> None:
    path = certs / "routes.toml"
    path.write_text(FULL_CONFIG.replace('tls = "allow"', 'tls = "sometimes"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f'{path}: [[proxy]] #1 "app": listener.tls: ')


# ---------------------------------------------------------------------------
# describe_config
# ---------------------------------------------------------------------------


def test_describe_config(certs: Path) -> None:
    path = certs / "routes.toml"
    path.write_text(FULL_CONFIG)
    text = describe_config(load_config(path))
    assert f"config     {path}" in text
    assert "log_level  warn" in text
    assert 'route "app"' in text
    assert "listen     0.0.0.0:6432" in text
    assert "client tls allow" in text
    assert "direct TLS refused" in text
    assert f"client certs required, CA {certs / 'clients-ca.crt'}" in text
    assert "CN must equal the user name" in text
    assert "50 clients, startup timeout 15s; 64 logins at once, 16 per address" in text
    assert "checked for changes every 1d" in text
    assert "backend    db.internal:5433, tls verify-full" in text
    assert "server_name pg.example.com" in text
    assert f"client cert {certs / 'proxy.crt'}" in text
    assert "connect timeout 2.5s" in text
    assert 'route "reports"' in text
    assert "listen     [::1]:0" in text
    assert "backend    [2001:db8::1]:5432, tls disable (plaintext)" in text
    assert text.index('route "app"') < text.index('route "reports"')


def test_describe_defaults(certs: Path) -> None:
    text = describe_config(parse(minimal_doc(), certs))
    assert 'route "proxy-1"' in text
    assert "client tls require (plaintext sessions refused); TLS >= 1.2" in text
    assert "tls verify-full (TLS required; certificate chain and host name verified)" in text
    assert "server_name db.internal; TLS >= 1.2; system CAs" in text
    assert "connect timeout 10s" in text


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def test_cli_check_ok(certs: Path) -> None:
    path = certs / "routes.toml"
    path.write_text(FULL_CONFIG)
    result = pgtls_cli("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert 'route "app"' in result.stdout
    assert 'route "reports"' in result.stdout
    assert "0.0.0.0:6432" in result.stdout
    assert "configuration OK: 2 routes" in result.stdout


def test_cli_check_invalid(certs: Path) -> None:
    path = certs / "routes.toml"
    path.write_text(FULL_CONFIG.replace("mtls = true", "mtsl = true"))
    result = pgtls_cli("check", "-c", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert f'{path}: [[proxy]] #1 "app": listener.mtsl: unknown key' in result.stderr
    assert "configuration is invalid" in result.stderr


def test_cli_check_missing_file(tmp_path: Path) -> None:
    result = pgtls_cli("check", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 1
    assert "cannot read config file" in result.stderr


def test_cli_version() -> None:
    from pgtls_twisted._version import __version__

    result = pgtls_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"pgtls {__version__}"


def test_cli_usage_errors() -> None:
    assert pgtls_cli().returncode == 2
    result = pgtls_cli("check")
    assert result.returncode == 2
    assert "--config" in result.stderr


def test_main_in_process(certs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """main() returns the status instead of exiting, even for argparse's own exits."""
    path = certs / "routes.toml"
    path.write_text(FULL_CONFIG)
    assert cli.main(["check", "--config", str(path)]) == 0
    assert 'route "app"' in capsys.readouterr().out
    path.write_text("log_level = 1\n")
    assert cli.main(["check", "--config", str(path)]) == 1
    assert "log_level" in capsys.readouterr().err
    assert cli.main(["--version"]) == 0
    assert cli.main(["bogus"]) == 2


# ---------------------------------------------------------------------------
# The shipped sample, etc/routes.toml
# ---------------------------------------------------------------------------


def sample_with_real_files(tmp_path: Path) -> dict[str, Any]:
    """The sample, with every file key pointing at a dummy file in tmp_path."""
    data = tomllib.loads(SAMPLE.read_text())
    data = copy.deepcopy(data)
    for route in data["proxy"]:
        for section, keys in FILE_KEYS.items():
            for key in keys:
                if key in route.get(section, {}):
                    target = tmp_path / Path(route[section][key]).name
                    target.write_text("dummy\n")
                    target.chmod(0o600)
                    route[section][key] = str(target)
    if "password_file" in data.get("admin", {}):
        target = tmp_path / Path(data["admin"]["password_file"]).name
        target.write_text(f"ops:{make_verifier('ops-password')}\n")
        target.chmod(0o600)
        data["admin"]["password_file"] = str(target)
    return data


def test_sample_parses(tmp_path: Path) -> None:
    """The shipped sample must stay valid as the schema changes."""
    config = parse_config(sample_with_real_files(tmp_path), path=SAMPLE, base_dir=tmp_path)
    assert [r.name for r in config.routes] == ["app", "reporting", "pooled"]
    assert describe_config(config)


def test_sample_shows_every_key(tmp_path: Path) -> None:
    """Every key of the schema appears, uncommented, in at least one route of the sample."""
    data = tomllib.loads(SAMPLE.read_text())
    top = {f.name for f in fields(Config)} - {"routes", "path", "admin", "metrics"}
    assert top <= set(data)
    assert {f.name for f in fields(AdminConfig)} - {"verifiers"} == set(data["admin"])
    assert {"bind_address"} == set(data["metrics"])
    for section, cls in (("listener", ListenerConfig), ("backend", BackendConfig)):
        expected = {f.name for f in fields(cls)} - {"host", "port"}
        shown = set().union(*(route[section].keys() for route in data["proxy"]))
        assert expected == shown, section
    pool_keys = {f.name for f in fields(PoolConfig)} - {"service_password", "password_source"}
    pool_keys |= {"service_password_file"}
    shown_pool = set().union(*(route.get("pool", {}).keys() for route in data["proxy"]))
    assert pool_keys == shown_pool


def test_sample_first_route_is_all_defaults(tmp_path: Path) -> None:
    """The sample says its first route sets every key to its default; keep that true."""
    data = tomllib.loads(SAMPLE.read_text())
    config = parse_config(sample_with_real_files(tmp_path), path=SAMPLE, base_dir=tmp_path)
    first = config.routes[0]
    for key in ("log_level", "log_format", "workers"):
        assert data[key] == Config.__dataclass_fields__[key].default
    assert config.shutdown_timeout == Config.__dataclass_fields__["shutdown_timeout"].default
    assert config.admin is not None and config.admin.database == AdminConfig.database
    for section, cls in (("listener", ListenerConfig), ("backend", BackendConfig)):
        defaults = {f.name: f.default for f in fields(cls)}
        parsed = getattr(first, section)
        for key in data["proxy"][0][section]:
            if key in ("bind_address", "server_cert", "server_key", "address"):
                continue
            assert getattr(parsed, key) == defaults[key], f"{section}.{key}"


def pool_doc(**pool: Any) -> dict[str, Any]:
    doc = minimal_doc()
    doc["proxy"][0]["pool"] = {"service_user": "svc", **pool}
    return doc


def test_pool_defaults_and_password_sources(certs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    route = parse(pool_doc(), certs).routes[0]
    assert route.pool is not None
    assert (route.pool.mode, route.pool.max_size, route.pool.min_size) == ("transaction", 5, 0)
    assert route.pool.acquire_timeout == 30 and route.pool.reset_query == "DISCARD ALL"
    assert route.pool.service_password is None and route.pool.password_source is None
    assert parse(minimal_doc(), certs).routes[0].pool is None
    (certs / "pool.pw").write_text("s3cret\n")
    (certs / "pool.pw").chmod(0o600)
    from_file = parse(pool_doc(service_password_file="pool.pw"), certs).routes[0].pool
    assert from_file is not None and from_file.service_password == "s3cret"
    assert "s3cret" not in repr(from_file)
    monkeypatch.setenv("PGTLS_TEST_POOL_PW", "from-env")
    from_env = parse(pool_doc(service_password_env="PGTLS_TEST_POOL_PW"), certs).routes[0].pool
    assert from_env is not None and from_env.password_source == "env"
    assert from_env.service_password == "from-env"


def test_pool_errors(certs: Path) -> None:
    (certs / "pool.pw").write_text("x\n")
    (certs / "pool.pw").chmod(0o600)
    both = single_error(pool_doc(service_password="a", service_password_file="pool.pw"), certs)
    assert "pool.service_password" in both and "conflicts with service_password_file" in both
    missing = single_error(pool_doc(service_password_env="PGTLS_SURELY_UNSET_VARIABLE"), certs)
    assert "environment variable PGTLS_SURELY_UNSET_VARIABLE is not set" in missing
    sizes = single_error(pool_doc(min_size=6, max_size=5), certs)
    assert "pool.min_size: must not exceed max_size (5)" in sizes
    mode = single_error(pool_doc(mode="statement"), certs)
    assert "pool.mode" in mode
    no_user = single_error({"proxy": [{**minimal_route(), "pool": {}}]}, certs)
    assert "pool.service_user" in no_user


# ---------------------------------------------------------------------------
# Operations: log_format, workers, shutdown_timeout, [admin], [metrics]
# ---------------------------------------------------------------------------


def test_operations_defaults(certs: Path) -> None:
    config = parse(minimal_doc(), certs)
    assert (config.log_format, config.workers, config.shutdown_timeout) == ("text", 1, 30.0)
    assert config.admin is None and config.metrics is None


def test_operations_keys(certs: Path) -> None:
    doc = {
        **minimal_doc(),
        "log_format": "JSON",
        "workers": "auto",
        "shutdown_timeout": "0s",
        "admin": {"auth": "scram", "users": ["ops", "dba"], "database": "console"},
        "metrics": {"bind_address": "127.0.0.1:9187"},
    }
    verifiers = certs / "admins"
    verifiers.write_text(f"ops:{make_verifier('pw')}\n")
    verifiers.chmod(0o600)
    doc["admin"]["password_file"] = str(verifiers)
    config = parse(doc, certs)
    assert config.log_format == "json"
    assert 1 <= config.workers <= 64
    assert config.shutdown_timeout == 0
    assert config.admin is not None
    assert (config.admin.auth, config.admin.database) == ("scram", "console")
    assert (config.admin.users, config.admin.password_file) == (("ops", "dba"), verifiers)
    assert list(config.admin.verifiers) == ["ops"]
    assert config.metrics is not None
    assert (config.metrics.host, config.metrics.port) == ("127.0.0.1", 9187)
    summary = describe_config(config)
    assert 'admin      database "console" for ops, dba; auth scram' in summary
    assert "metrics    http://127.0.0.1:9187/metrics" in summary


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"workers": 0}, "routes.toml: workers: must be between 1 and 64, got 0"),
        ({"workers": 65}, "routes.toml: workers: must be between 1 and 64, got 65"),
        ({"workers": "many"}, 'routes.toml: workers: expected a number of processes or "auto"'),
        ({"log_format": "xml"}, 'routes.toml: log_format: expected one of "text", "json"'),
        ({"shutdown_timeout": "-1s"}, "routes.toml: shutdown_timeout: invalid duration"),
        (
            {"admin": {"auth": "cert", "users": "ops"}},
            "routes.toml: admin.users: expected a list of user names",
        ),
        (
            {"admin": {"auth": "cert", "users": [""]}},
            "routes.toml: admin.users: expected user names",
        ),
        ({"admin": {"users": ["ops"]}}, "routes.toml: admin.auth: missing (this key is required)"),
        (
            {"admin": {"auth": "cert"}},
            'routes.toml: admin.auth: is "cert", but no listener has a client_ca',
        ),
        (
            {
                "admin": {"auth": "backend"},
                "proxy": [{**minimal_route(), "backend": {"address": "db:5432", "tls": "require"}}],
            },
            'routes.toml: admin.auth: is "backend", but no route has backend.tls = "verify-full"',
        ),
        (
            {"admin": {"auth": "scram"}},
            'routes.toml: admin.password_file: required when auth = "scram"',
        ),
        (
            {
                "admin": {"auth": "cert", "user": ["ops"]},
                "proxy": [minimal_route(client_ca="clients-ca.crt")],
            },
            'routes.toml: admin.user: unknown key; did you mean "users"?',
        ),
        ({"metrics": {}}, "routes.toml: metrics.bind_address: missing (this key is required)"),
        ({"metrics": "127.0.0.1:9187"}, "routes.toml: metrics: expected a table ([metrics])"),
    ],
)
def test_operations_errors(certs: Path, extra: dict[str, Any], expected: str) -> None:
    assert single_error({**minimal_doc(), **extra}, certs).startswith(expected)
