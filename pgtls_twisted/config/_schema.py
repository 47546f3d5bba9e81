"""
The schema: which keys each table of the configuration file may hold, how
each value is checked, and the rules between keys, all as data.

The schema is table-driven (L{_TOP_LEVEL}, L{_ROUTE}, L{_LISTENER},
L{_BACKEND}, L{_POOL}, L{_ADMIN}, L{_METRICS}, L{_CLUSTER}): adding a key is adding a
dataclass field of the same name, with its default, to
L{pgtls_twisted.config._model}, plus a table entry naming its parser.  The
default is written only in the field; L{_defaults_from} copies it into the
table.  Adding a table is adding a schema, a dataclass and an entry to
L{_ROUTE_SECTIONS} (for C{[proxy.pool]}) or L{_TOP_SECTIONS} (for
C{[admin]}), plus the field of that name in L{RouteConfig} or L{Config}.

Unknown keys are errors, as they were not in the Rust pgtls: a misspelt
C{mtls} must not quietly turn client authentication off.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgtls_twisted.config._model import (
    ADMIN_AUTH_METHODS,
    BACKEND_TLS_MODES,
    LISTENER_TLS_MODES,
    LOG_FORMATS,
    PINNING_MODES,
    POOL_IDENTITIES,
    POOL_MODES,
    TLS_VERSIONS,
    AdminConfig,
    BackendConfig,
    ClusterConfig,
    Config,
    ListenerConfig,
    MetricsConfig,
    PoolConfig,
    RouteConfig,
)
from pgtls_twisted.config._values import (
    _address,
    _any_string,
    _boolean,
    _choice,
    _connect_address,
    _connect_addresses,
    _duration,
    _duration_or_zero,
    _existing_file,
    _first_line,
    _instance,
    _Invalid,
    _log_level,
    _names,
    _networks,
    _non_negative_int,
    _Parser,
    _positive_int,
    _require_auth,
    _scram_iterations,
    _secret_file,
    _server_name,
    _show,
    _string,
    _workers,
    parse_address,
    read_verifiers,
)


class _Marker:
    """A named stand-in for a default that is not a value."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return f"<{self._name}>"


_REQUIRED: Any = _Marker("required")
"""The default of a key that must be present."""

_FROM_MODEL: Any = _Marker("from the model")
"""The default of a key whose default is its dataclass field's (see L{_defaults_from})."""

_BAD: Any = _Marker("bad")
"""Stands in for a value that was missing or failed to parse."""


@dataclass(frozen=True)
class _Key:
    """
    One key of a section.

    @ivar parse: checks and converts the TOML value, raising L{_Invalid}.
    @ivar default: the value when the key is absent; L{_REQUIRED} if it must
        be present; L{_FROM_MODEL} (until L{_defaults_from} replaces it) to
        take the default of the dataclass field of the same name.  Only keys
        that fill no field of their own, or a field that has no default,
        give a value here.
    """

    parse: _Parser
    default: Any = _FROM_MODEL


def _defaults_from(model: type[Any], keys: Mapping[str, _Key]) -> dict[str, _Key]:
    """
    A schema table whose defaults are those of C{model}'s fields, so that
    each default is written once, in the dataclass.

    @param model: the dataclass the table fills.
    @param keys: the table, with L{_FROM_MODEL} for each default to copy.
    @raise TypeError: when the table and the model disagree (a default
        given in both, a default to copy that the field does not have, a
        required key whose field has a default): a mistake in this module,
        caught at import rather than by a user.
    """
    fields = {f.name: f for f in dataclasses.fields(model)}
    table: dict[str, _Key] = {}
    for name, key in keys.items():
        spec = fields.get(name)
        default = dataclasses.MISSING if spec is None else spec.default
        if key.default is _FROM_MODEL:
            if default is dataclasses.MISSING:
                raise TypeError(f"{model.__name__} has no default for {name!r} to copy")
            key = dataclasses.replace(key, default=default)
        elif default is not dataclasses.MISSING:
            raise TypeError(
                f"{name!r} has a default in {model.__name__}: the schema must not give"
                f" another (found {key.default!r})"
            )
        table[name] = key
    return table


_TOP_LEVEL: dict[str, _Key] = _defaults_from(
    Config,
    {
        "log_level": _Key(_log_level),
        "log_format": _Key(_choice(LOG_FORMATS, fold_case=True)),
        "workers": _Key(_workers),
        "shutdown_timeout": _Key(_duration_or_zero),
    },
)

_ROUTE: dict[str, _Key] = _defaults_from(
    RouteConfig,
    {
        # None: named after its position (proxy-1) once the route is parsed.
        "name": _Key(_string, None),
    },
)

_LISTENER: dict[str, _Key] = _defaults_from(
    ListenerConfig,
    {
        "bind_address": _Key(_address, _REQUIRED),
        "server_cert": _Key(_existing_file, _REQUIRED),
        "server_key": _Key(_secret_file, _REQUIRED),
        "tls": _Key(_choice(LISTENER_TLS_MODES)),
        "min_tls_version": _Key(_choice(TLS_VERSIONS, suggest=False)),
        "ciphers": _Key(_string),
        "mtls": _Key(_boolean),
        "client_ca": _Key(_existing_file),
        "client_crl": _Key(_existing_file),
        "cert_user_match": _Key(_boolean),
        "direct_tls": _Key(_boolean),
        "cert_refresh_interval": _Key(_duration),
        "startup_timeout": _Key(_duration),
        "login_timeout": _Key(_duration),
        "max_clients": _Key(_positive_int),
        "max_logins": _Key(_positive_int),
        "max_logins_per_address": _Key(_positive_int),
        "proxy_protocol": _Key(_boolean),
        "proxy_trusted": _Key(_networks),
    },
)

_BACKEND: dict[str, _Key] = _defaults_from(
    BackendConfig,
    {
        "address": _Key(_connect_address, _REQUIRED),
        "tls": _Key(_choice(BACKEND_TLS_MODES)),
        "root_ca": _Key(_existing_file),
        "server_name": _Key(_server_name),
        "connect_timeout": _Key(_duration),
        "min_tls_version": _Key(_choice(TLS_VERSIONS, suggest=False)),
        "client_cert": _Key(_existing_file),
        "client_key": _Key(_secret_file),
        "require_auth": _Key(_require_auth),
        "max_scram_iterations": _Key(_scram_iterations),
        "keepalives": _Key(_boolean),
        "keepalives_idle": _Key(_duration_or_zero),
        "tcp_user_timeout": _Key(_duration_or_zero),
    },
)

_POOL: dict[str, _Key] = _defaults_from(
    PoolConfig,
    {
        "mode": _Key(_choice(POOL_MODES)),
        "service_user": _Key(_string),
        # Resolved from service_user when absent (see PoolConfig.identity).
        "identity": _Key(_choice(POOL_IDENTITIES)),
        "auth_cache_ttl": _Key(_duration_or_zero),
        # The three password sources fill one field, service_password.
        "service_password_file": _Key(_secret_file, None),
        "service_password_env": _Key(_string, None),
        "service_password": _Key(_any_string),
        "max_size": _Key(_positive_int),
        "min_size": _Key(_non_negative_int),
        # PgBouncer's keys of the same names; 0 is no limit.
        "max_db_connections": _Key(_non_negative_int),
        "max_user_connections": _Key(_non_negative_int),
        "acquire_timeout": _Key(_duration),
        "idle_timeout": _Key(_duration),
        "max_lifetime": _Key(_duration),
        "reset_query": _Key(_any_string),
        "log_queries": _Key(_boolean),
        "max_prepared_statements": _Key(_non_negative_int),
        "pinning": _Key(_choice(PINNING_MODES)),
        # PgBouncer's keys of the same names; 0 is off.
        "client_idle_timeout": _Key(_duration_or_zero),
        "idle_transaction_timeout": _Key(_duration_or_zero),
        "query_timeout": _Key(_duration_or_zero),
    },
)

_ADMIN: dict[str, _Key] = _defaults_from(
    AdminConfig,
    {
        "auth": _Key(_choice(ADMIN_AUTH_METHODS), _REQUIRED),
        "database": _Key(_string),
        "users": _Key(_names),
        "stats_users": _Key(_names),
        "password_file": _Key(_secret_file),
        "auth_database": _Key(_string),
    },
)

_METRICS: dict[str, _Key] = _defaults_from(
    MetricsConfig,
    {
        "bind_address": _Key(_address, _REQUIRED),
    },
)

_CLUSTER: dict[str, _Key] = _defaults_from(
    ClusterConfig,
    {
        "instance": _Key(_instance, _REQUIRED),
        "peers": _Key(_connect_addresses),
    },
)

_HINTS: dict[tuple[str, str], str] = {
    ("backend", "tls_enabled"): (
        'the Rust pgtls\'s tls_enabled is replaced by tls = "disable", "prefer", "require",'
        ' "verify-ca" or "verify-full"'
    ),
}
"""
Advice for keys that older pgtls versions had, keyed by (section, key); the
section is C{""} for the top level and C{"proxy"} for the route table.
"""


@dataclass
class _Report:
    """
    Collects problems so that one run of C{pgtls check} shows all of them.

    @ivar prefix: C{"routes.toml: "}, or empty when there is no file.
    """

    prefix: str
    messages: list[str] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        self.messages.append(f"{self.prefix}{where}: {reason}" if where else self.prefix + reason)


# ---------------------------------------------------------------------------
# Rules between keys, and building the dataclasses
# ---------------------------------------------------------------------------


def _check_listener(values: dict[str, Any], where: str, report: _Report) -> None:
    """The listener rules that involve more than one key."""
    if values["mtls"] is True and values["client_ca"] is None:
        report.add(f"{where}client_ca", "required when mtls = true")
    if values["cert_user_match"] is True and values["mtls"] is False:
        report.add(
            f"{where}cert_user_match",
            "requires mtls = true (without a verified client certificate there is no CN to match)",
        )
    if values["proxy_protocol"] is True and not values["proxy_trusted"]:
        report.add(
            f"{where}proxy_trusted",
            "required when proxy_protocol = true: the load balancers' networks "
            '(a header from anyone could claim any client address), e.g. ["10.0.0.0/8"]',
        )
    if values["client_crl"] not in (None, _BAD) and values["client_ca"] is None:
        report.add(f"{where}client_crl", "requires client_ca (a CRL needs the CA it belongs to)")


def _check_backend(values: dict[str, Any], where: str, report: _Report) -> None:
    """The backend rules that involve more than one key."""
    cert, key = values["client_cert"], values["client_key"]
    if cert is None and key not in (None, _BAD):
        report.add(f"{where}client_cert", "required when client_key is set")
    if key is None and cert not in (None, _BAD):
        report.add(f"{where}client_key", "required when client_cert is set")
    if values["tls"] == "verify-ca" and values["root_ca"] is None:
        report.add(
            f"{where}root_ca",
            'required with tls = "verify-ca": checking the chain against the system trust'
            " store without the host name accepts a certificate any public CA issued to"
            ' anyone (name the CA here, or use "verify-full")',
        )


def _build_listener(values: dict[str, Any]) -> ListenerConfig:
    host, port = parse_address(values["bind_address"])
    return ListenerConfig(host=host, port=port, **values)


def _build_backend(values: dict[str, Any]) -> BackendConfig:
    host, port = parse_address(values["address"])
    # An absent server_name is "", which BackendConfig turns into the host.
    return BackendConfig(host=host, port=port, **values)


def _check_pool(values: dict[str, Any], where: str, report: _Report) -> None:
    """
    A service user exactly with C{identity = "service"}; one password
    source at most; min_size within max_size; the env variable set.
    """
    sources = [
        k
        for k in ("service_password_file", "service_password_env", "service_password")
        if values[k] is not None
    ]
    identity, user = values["identity"], values["service_user"]
    if identity == "service" and user is None:
        report.add(f"{where}service_user", 'required when identity = "service"')
    elif identity == "client":
        for key in ("service_user", *sources):
            if values[key] is not None:
                report.add(f"{where}{key}", 'only used with identity = "service"')
    if len(sources) > 1:
        report.add(f"{where}{sources[1]}", f"conflicts with {sources[0]}: give one password source")
    env = values["service_password_env"]
    if env not in (None, _BAD) and env not in os.environ:
        report.add(f"{where}service_password_env", f"environment variable {env} is not set")
    if values["min_size"] not in (None, _BAD) and values["max_size"] not in (None, _BAD):
        if values["min_size"] > values["max_size"]:
            report.add(f"{where}min_size", f"must not exceed max_size ({values['max_size']})")
    path = values["service_password_file"]
    if path not in (None, _BAD):
        try:
            path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            report.add(f"{where}service_password_file", f"cannot read {path}: {e}")


def _build_pool(values: dict[str, Any]) -> PoolConfig:
    values = dict(values)
    path = values.pop("service_password_file")
    env = values.pop("service_password_env")
    literal = values.pop("service_password")
    if values["identity"] is None:
        values["identity"] = "service" if values["service_user"] is not None else "client"
    password, source = None, None
    if path is not None:
        password, source = _first_line(path), "file"
    elif env is not None:
        password, source = os.environ[env], "env"
    elif literal is not None:
        password, source = literal, "literal"
    return PoolConfig(service_password=password, password_source=source, **values)


def _check_admin(values: dict[str, Any], where: str, report: _Report) -> None:
    """A password file exactly with C{scram}, readable and well formed."""
    auth, path = values["auth"], values["password_file"]
    if auth == "scram" and path is None:
        report.add(f"{where}password_file", 'required when auth = "scram"')
    elif auth not in ("scram", _BAD) and path not in (None, _BAD):
        report.add(f"{where}password_file", 'only used with auth = "scram"')
    elif path not in (None, _BAD):
        try:
            values["verifiers"] = read_verifiers(path)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            report.add(f"{where}password_file", str(e))
    users, stats = values["users"], values["stats_users"]
    both = set(users) & set(stats) if _BAD not in (users, stats) else set()
    if both:
        report.add(f"{where}stats_users", f"{', '.join(sorted(both))} also in users")


def _build_admin(values: dict[str, Any]) -> AdminConfig:
    return AdminConfig(**values)


def _build_metrics(values: dict[str, Any]) -> MetricsConfig:
    host, port = parse_address(values["bind_address"])
    return MetricsConfig(host=host, port=port, **values)


def _check_cluster(values: dict[str, Any], where: str, report: _Report) -> None:
    """The peers list is in instance order: this instance must be in it, if it is given."""
    instance, peers = values["instance"], values["peers"]
    if _BAD in (instance, peers) or not peers:
        return
    if instance > len(peers):
        report.add(
            f"{where}peers",
            f"lists {len(peers)} instance(s), but this is instance {instance}: the list gives"
            " every instance's address in instance order (the Nth entry is instance N's)",
        )


def _build_cluster(values: dict[str, Any]) -> ClusterConfig:
    return ClusterConfig(**values)


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------


def _no_checks(values: dict[str, Any], where: str, report: _Report) -> None:
    """The default for sections whose keys are independent of each other."""


@dataclass(frozen=True)
class _Section:
    """
    A table inside each C{[[proxy]]}.

    @ivar schema: its keys.
    @ivar build: makes the dataclass from values that all parsed.
    @ivar check: reports the rules that involve more than one key; values
        that failed to parse are L{_BAD} and must be skipped, so one mistake
        is not reported twice.
    @ivar required: whether the table must be present; an absent optional
        table yields L{None} (for example, no C{[proxy.pool]} would mean no
        pooling, no C{[admin]} no admin endpoint).
    """

    schema: Mapping[str, _Key]
    build: Callable[[dict[str, Any]], Any]
    check: Callable[[dict[str, Any], str, _Report], None] = _no_checks
    required: bool = True


_ROUTE_SECTIONS: dict[str, _Section] = {
    "listener": _Section(_LISTENER, _build_listener, _check_listener),
    "backend": _Section(_BACKEND, _build_backend, _check_backend),
    "pool": _Section(_POOL, _build_pool, _check_pool, required=False),
}
"""
The tables inside each C{[[proxy]]}, in file order; the key is both the TOML
table name (C{[proxy.listener]}) and the L{RouteConfig} field it fills.
"""

_TOP_SECTIONS: dict[str, _Section] = {
    "admin": _Section(_ADMIN, _build_admin, _check_admin, required=False),
    "metrics": _Section(_METRICS, _build_metrics, required=False),
    "cluster": _Section(_CLUSTER, _build_cluster, _check_cluster, required=False),
}
"""
Top-level tables other than C{[[proxy]]}; the key is both the table name
and the L{Config} field it fills.
"""

_SECTION_TITLES: dict[str, str] = {
    **{name: f"[proxy.{name}]" for name in _ROUTE_SECTIONS},
    **{name: f"[{name}]" for name in _TOP_SECTIONS},
}


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


def _unknown_key(section: str, key: str, valid: Iterable[str]) -> str:
    """
    Explain an unknown key: an old pgtls key, a key that belongs in a
    sibling section, or a likely misspelling.
    """
    if (section, key) in _HINTS:
        return f"unknown key; {_HINTS[section, key]}"
    for other, spec in _ROUTE_SECTIONS.items():
        if other != section and key in spec.schema:
            return f"unknown key; it belongs in {_SECTION_TITLES[other]}"
    close = difflib.get_close_matches(key, list(valid), n=1)
    if close:
        return f'unknown key; did you mean "{close[0]}"?'
    return "unknown key"


def _parse_table(
    table: Mapping[str, Any],
    schema: Mapping[str, _Key],
    section: str,
    where: str,
    base_dir: Path,
    report: _Report,
    extra_keys: Iterable[str] = (),
) -> dict[str, Any]:
    """
    Check one table against its schema.

    @param section: the section's name for hints (C{""}, C{"proxy"},
        C{"listener"}, ...).
    @param where: the prefix for key names in messages, such as
        C{'[[proxy]] #1 "app": listener.'}.
    @param extra_keys: keys the caller handles itself (sub-tables).
    @return: every schema key mapped to its parsed value, its default, or
        L{_BAD} when it is missing or wrong.
    """
    valid = [*schema, *extra_keys]
    for key in table:
        if key not in valid:
            report.add(f"{where}{key}", _unknown_key(section, key, valid))
    values: dict[str, Any] = {}
    for key, spec in schema.items():
        if key not in table:
            if spec.default is _REQUIRED:
                report.add(f"{where}{key}", "missing (this key is required)")
                values[key] = _BAD
            else:
                values[key] = spec.default
            continue
        try:
            values[key] = spec.parse(table[key], base_dir)
        except _Invalid as e:
            report.add(f"{where}{key}", str(e))
            values[key] = _BAD
    return values


def _parse_sections(
    sections: Mapping[str, _Section],
    table: Mapping[str, Any],
    label: str,
    base_dir: Path,
    report: _Report,
) -> dict[str, Any]:
    """
    Parse the sub-tables of C{table} described by C{sections}.

    @param label: what precedes C{section.key} in messages (C{""} at the top
        level, C{'[[proxy]] #1 "app": '} in a route).
    @return: each section name mapped to its checked values (L{None} for an
        absent optional section); sections that are missing or not tables
        are left out, after being reported.
    """
    parsed: dict[str, Any] = {}
    for name, spec in sections.items():
        sub = table.get(name)
        if sub is None and not spec.required:
            parsed[name] = None
        elif sub is None:
            report.add(f"{label}{name}", f"missing {_SECTION_TITLES[name]} table")
        elif not isinstance(sub, Mapping):
            report.add(
                f"{label}{name}", f"expected a table ({_SECTION_TITLES[name]}), got {_show(sub)}"
            )
        else:
            where = f"{label}{name}."
            values = _parse_table(sub, spec.schema, name, where, base_dir, report)
            spec.check(values, where, report)
            parsed[name] = values
    return parsed


def _build_sections(sections: Mapping[str, _Section], parsed: Mapping[str, Any]) -> dict[str, Any]:
    """Build the dataclass of every section parsed without problems."""
    return {
        name: None if values is None else sections[name].build(values)
        for name, values in parsed.items()
    }
