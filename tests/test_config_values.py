"""
Tests for L{pgtls_twisted.config}, key by key: durations, addresses,
unknown keys and wrong types (each message names the key, and suggests the
one meant), the values of the listener and backend keys, pools, and the
operations keys (C{log_format}, C{workers}, C{shutdown_timeout},
C{[admin]}, C{[metrics]}).

Documents are dicts parsed against the dummy files of the C{certs}
fixture, as in test_config (L{support.configdocs}).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from support.configdocs import errors_of, minimal_doc, minimal_route, parse, single_error

from pgtls_twisted.config import (
    describe_config,
    format_duration,
    parse_address,
    parse_duration,
)
from pgtls_twisted.protocol._scram import make_verifier

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
# Pools
# ---------------------------------------------------------------------------


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
    no_user = single_error({"proxy": [{**minimal_route(), "pool": {"identity": "service"}}]}, certs)
    assert 'pool.service_user: required when identity = "service"' in no_user


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
    # One per CPU this process may run on (a container's cpuset), not the machine's.
    assert config.workers == min(64, len(os.sched_getaffinity(0)))
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
