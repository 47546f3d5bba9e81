"""
Tests for L{pgtls_twisted.config}: whole configurations, paths, the
structure of the document, the rules between keys and between routes, and
reading the file (L{load_config}).

Most tests build the TOML document as a dict and call L{parse_config}
directly, with C{path=Path("routes.toml")} so that messages start with
C{routes.toml: } and can be compared exactly; file keys point at dummy files
in C{tmp_path} (their contents do not matter here): the C{certs} fixture and
L{support.configdocs}. The values of single keys are tested in
test_config_values; describing a configuration, the C{pgtls check}
command and the shipped sample in test_config_cli.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from support.configdocs import (
    FILE_KEYS,
    FULL_CONFIG,
    errors_of,
    minimal_doc,
    minimal_route,
    parse,
    single_error,
)

from pgtls_twisted.config import (
    DEFAULT_CIPHERS,
    BackendConfig,
    ConfigError,
    ListenerConfig,
    RouteConfig,
    load_config,
    parse_config,
)

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
    from pgtls_twisted.config import _schema as module

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
# [proxy.pool] identity
# ---------------------------------------------------------------------------


def _pooled(pool: dict) -> dict:
    doc = minimal_doc()
    doc["proxy"][0]["pool"] = pool
    return doc


def test_identity_follows_service_user(certs: Path) -> None:
    assert parse(_pooled({"service_user": "svc"}), certs).routes[0].pool.identity == "service"
    own = parse(_pooled({}), certs).routes[0].pool
    assert (own.identity, own.service_user, own.auth_cache_ttl) == ("client", None, 600.0)
    assert parse(_pooled({"auth_cache_ttl": "0s"}), certs).routes[0].pool.auth_cache_ttl == 0


def test_identity_errors(certs: Path) -> None:
    assert errors_of(_pooled({"identity": "service"}), certs) == [
        'routes.toml: [[proxy]] #1: pool.service_user: required when identity = "service"'
    ]
    assert errors_of(
        _pooled({"identity": "client", "service_user": "svc", "service_password": "x"}), certs
    ) == [
        'routes.toml: [[proxy]] #1: pool.service_user: only used with identity = "service"',
        'routes.toml: [[proxy]] #1: pool.service_password: only used with identity = "service"',
    ]
