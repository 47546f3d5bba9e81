"""
What a user reads about a configuration: L{describe_config}, the
C{pgtls check} command (C{python -m pgtls_twisted}), and the
shipped sample, C{etc/routes.toml}, which must stay valid and show every
key as the schema changes.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from support.configdocs import FILE_KEYS, FULL_CONFIG, minimal_doc, parse
from support.processes import pgtls_cli

from pgtls_twisted import __main__ as cli
from pgtls_twisted.config import (
    AdminConfig,
    BackendConfig,
    ClusterConfig,
    Config,
    ConfigError,
    ListenerConfig,
    PoolConfig,
    describe_config,
    load_config,
    parse_config,
)
from pgtls_twisted.protocol._scram import make_verifier

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "etc" / "routes.toml"


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
    assert (
        "connect timeout 10s; keepalives after the system's idle;"
        " unacknowledged data dropped after the system's timeout"
    ) in text


def test_describe_keepalives(certs: Path) -> None:
    doc = minimal_doc()
    doc["proxy"][0]["backend"].update(keepalives_idle="1min", tcp_user_timeout="30s")
    text = describe_config(parse(doc, certs))
    assert "keepalives after 1m; unacknowledged data dropped after 30s" in text
    doc["proxy"][0]["backend"].update(keepalives=False)
    assert "no keepalives; unacknowledged data dropped after 30s" in describe_config(
        parse(doc, certs)
    )


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
    top = {f.name for f in fields(Config)} - {"routes", "path", "admin", "metrics", "cluster"}
    assert top <= set(data)
    # A sample that clustered whoever copied it would cost a single instance
    # 8 bits of every cancel key: [cluster] is shown, but commented out.
    text = SAMPLE.read_text()
    assert "cluster" not in data and "\n# [cluster]\n" in text
    for key in (f.name for f in fields(ClusterConfig)):
        assert f"\n# {key} = " in text, key
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


def test_describe_transaction_pool(certs: Path) -> None:
    doc = minimal_doc()
    doc["proxy"][0]["pool"] = {
        "service_user": "svc",
        "pinning": "refuse",
        "max_prepared_statements": 50,
        "query_timeout": "30s",
    }
    text = describe_config(parse(doc, certs))
    assert "session state: refuse; up to 50 prepared statements per connection" in text
    assert "timeouts: query 30s" in text
    doc["proxy"][0]["pool"]["max_prepared_statements"] = 0
    assert "named prepared statements pin" in describe_config(parse(doc, certs))


def test_pool_limits_across_pools(certs: Path) -> None:
    """max_db_connections and max_user_connections: PgBouncer's keys, 0 (no limit) by default."""
    doc = minimal_doc()
    doc["proxy"][0]["pool"] = {"service_user": "svc"}
    pool = parse(doc, certs).routes[0].pool
    assert pool is not None and (pool.max_db_connections, pool.max_user_connections) == (0, 0)
    assert "across pools" not in describe_config(parse(doc, certs))
    doc["proxy"][0]["pool"].update(max_db_connections=20, max_user_connections=4)
    config = parse(doc, certs)
    assert "connections across pools: at most 20 per database, 4 per user" in describe_config(
        config
    )
    doc["proxy"][0]["pool"]["max_user_connections"] = -1
    with pytest.raises(ConfigError, match="pool.max_user_connections: must be 0 or more, got -1"):
        parse(doc, certs)
