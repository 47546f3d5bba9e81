"""
Loading and validating the pgtls TOML configuration.

Everything here is pure: the only I/O is reading the configuration file and
checking that the files it names exist and can be opened.  Every problem is
reported as a L{ConfigError} I{before} anything binds a port, because a proxy
that starts with half of its routes, or with a security setting silently
ignored, is worse than one that refuses to start.

The file format is a superset of the Rust pgtls one (C{[[proxy]]} routes with
C{[proxy.listener]} and C{[proxy.backend]} tables), so users can bring their
existing files along.  Unlike the original, unknown keys are errors: a
misspelt C{mtls} must not quietly turn client authentication off.

The schema is table-driven (L{_TOP_LEVEL}, L{_ROUTE}, L{_LISTENER},
L{_BACKEND}): adding a key is adding a table entry plus a dataclass field of
the same name.  Adding a table is adding a schema, a dataclass and an entry
to L{_ROUTE_SECTIONS} (for C{[proxy.pool]}) or L{_TOP_SECTIONS} (for
C{[admin]}), plus the field of that name in L{RouteConfig} or L{Config}.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

from .authpolicy import parse_require_auth

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

__all__ = [
    "DEFAULT_CIPHERS",
    "BACKEND_TLS_MODES",
    "LISTENER_TLS_MODES",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "AdminConfig",
    "MetricsConfig",
    "TLS_VERSIONS",
    "BackendConfig",
    "Config",
    "ConfigError",
    "ListenerConfig",
    "RouteConfig",
    "describe_config",
    "format_duration",
    "load_config",
    "parse_address",
    "parse_config",
    "parse_duration",
]

DEFAULT_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!MD5:!DSS"
"""
The TLS 1.2 cipher list used when C{ciphers} is not set: forward-secret AEAD
suites only.  TLS 1.3 suites are not affected by it (they are all AEAD and
forward secret already).
"""

LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("text", "json")
#: The most worker processes C{workers} may ask for: the worker index is
#: carried in the low byte of every minted cancel PID (see L{pgtls_twisted.cancel}).
MAX_WORKERS = 64
LISTENER_TLS_MODES = ("require", "allow")
BACKEND_TLS_MODES = ("disable", "prefer", "require", "verify-ca", "verify-full")
#: PostgreSQL's default is 4096 (its C{scram_iterations}, 16+); 100,000
#: costs about 35 ms of one core per login, in a thread.
DEFAULT_MAX_SCRAM_ITERATIONS = 100_000
#: A smaller limit would refuse PostgreSQL's own default.
MIN_MAX_SCRAM_ITERATIONS = 4096
TLS_VERSIONS = ("1.2", "1.3")


class ConfigError(Exception):
    """
    The configuration cannot be used.

    C{str(error)} is the complete human-readable report, one problem per
    line, each naming the file, the route and the key, so that C{pgtls check}
    can print it unchanged and a user can fix every problem in one go.

    @ivar messages: the individual problems, in file order.
    """

    def __init__(self, messages: str | Iterable[str]) -> None:
        if isinstance(messages, str):
            messages = (messages,)
        self.messages: tuple[str, ...] = tuple(messages)
        super().__init__("\n".join(self.messages))


@dataclass(frozen=True)
class ListenerConfig:
    """
    The client-facing side of a route: where to listen and how TLS is offered.

    @ivar bind_address: the address as written in the file, for messages.
    @ivar host: the host part of C{bind_address}, without IPv6 brackets.
    @ivar port: the port; 0 asks the kernel for an ephemeral port (tests).
    @ivar server_cert: absolute path of the PEM certificate chain.
    @ivar server_key: absolute path of the PEM private key.
    @ivar tls: C{"require"}: plaintext sessions are refused; C{"allow"}:
        clients may also connect without TLS.
    @ivar min_tls_version: C{"1.2"} or C{"1.3"}.
    @ivar ciphers: the TLS 1.2 cipher list, in OpenSSL syntax.
    @ivar mtls: every client must present a certificate signed by
        C{client_ca}.
    @ivar client_ca: absolute path of the PEM bundle of client CAs, if any.
    @ivar client_crl: absolute path of a PEM CRL for client certificates.
    @ivar cert_user_match: the client certificate's CN must equal the user
        name in the StartupMessage.
    @ivar direct_tls: accept PostgreSQL 17 C{sslnegotiation=direct}.
    @ivar cert_refresh_interval: seconds between checks of the certificate
        files for changes.
    @ivar startup_timeout: seconds allowed for the startup packet, the TLS
        handshake and authentication, together.
    @ivar max_clients: the most client connections served at once.
    """

    bind_address: str
    host: str
    port: int
    server_cert: Path
    server_key: Path
    tls: str = "require"
    min_tls_version: str = "1.2"
    ciphers: str = DEFAULT_CIPHERS
    mtls: bool = False
    client_ca: Path | None = None
    client_crl: Path | None = None
    cert_user_match: bool = False
    direct_tls: bool = True
    cert_refresh_interval: float = 3600.0
    startup_timeout: float = 60.0
    max_clients: int = 1000


@dataclass(frozen=True)
class BackendConfig:
    """
    The PostgreSQL server a route forwards to, and how the proxy talks TLS
    to it.

    @ivar address: the address as written in the file, for messages.
    @ivar host: the host part of C{address}, without IPv6 brackets.
    @ivar port: the port.
    @ivar tls: a libpq C{sslmode}: C{"disable"}, C{"prefer"}, C{"require"},
        C{"verify-ca"} or C{"verify-full"} (the default: whoever answers
        must prove it is the server named, or no password reaches it).
    @ivar root_ca: absolute path of the CA bundle for the C{verify-*} modes;
        L{None} means the system trust store (C{verify-full} only:
        C{verify-ca} against every public CA would accept anyone's
        certificate, so it requires C{root_ca}, as libpq 16 does).
    @ivar server_name: the name sent as SNI and checked in C{verify-full};
        when constructed empty it becomes C{host}, so code and tests that
        build a L{BackendConfig} directly get the same default as the file.
    @ivar connect_timeout: seconds allowed for the TCP connect and the TLS
        handshake to the backend.
    @ivar min_tls_version: C{"1.2"} or C{"1.3"}.
    @ivar client_cert: absolute path of the proxy's own certificate, for
        PostgreSQL C{cert} authentication; set together with C{client_key}.
    @ivar client_key: absolute path of its private key.
    @ivar require_auth: libpq's C{require_auth}: the authentication methods
        the server may ask for (see L{pgtls_twisted.authpolicy}); L{None}
        allows all of them.
    @ivar max_scram_iterations: the most PBKDF2 iterations a server's SCRAM
        challenge may ask pgtls to compute.
    """

    address: str
    host: str
    port: int
    tls: str = "verify-full"
    root_ca: Path | None = None
    server_name: str = ""
    connect_timeout: float = 10.0
    min_tls_version: str = "1.2"
    client_cert: Path | None = None
    client_key: Path | None = None
    require_auth: str | None = None
    max_scram_iterations: int = DEFAULT_MAX_SCRAM_ITERATIONS

    def __post_init__(self) -> None:
        if not self.server_name:
            object.__setattr__(self, "server_name", self.host)


POOL_MODES = ("session", "transaction")


@dataclass(frozen=True)
class PoolConfig:
    """
    C{[proxy.pool]}: pooled server connections that log in as a service
    user (absent: 1:1 pass-through).

    @ivar service_password: resolved at load time from
        C{service_password_file}, C{service_password_env} or
        C{service_password}; never shown in reprs or logs.
    @ivar password_source: C{"file"}, C{"env"}, C{"literal"} or C{None}.
    """

    service_user: str
    mode: str = "transaction"
    service_password: str | None = field(default=None, repr=False)
    password_source: str | None = None
    max_size: int = 5
    min_size: int = 0
    acquire_timeout: float = 30.0
    idle_timeout: float = 1800.0
    max_lifetime: float = 3600.0
    reset_query: str = "DISCARD ALL"
    log_queries: bool = False


@dataclass(frozen=True)
class RouteConfig:
    """
    One C{[[proxy]]} entry: a listener and the backend it forwards to.

    @ivar name: unique among routes; used in logs and messages.
    @ivar pool: pooling, or C{None} for pass-through.
    """

    name: str
    listener: ListenerConfig
    backend: BackendConfig
    pool: PoolConfig | None = None


@dataclass(frozen=True)
class AdminConfig:
    """
    C{[admin]}: the admin console (absent: no console).

    @ivar database: the database name that, on any listener, opens the
        console instead of a backend session.
    @ivar users: who may use it; an empty list lets nobody in.
    @ivar auth_database: the backend database a password is checked
        against (the console's own name does not exist there).
    """

    database: str = "pgtls"
    users: tuple[str, ...] = ()
    auth_database: str = "postgres"


@dataclass(frozen=True)
class MetricsConfig:
    """C{[metrics]}: Prometheus C{/metrics} over HTTP (absent: not served)."""

    bind_address: str
    host: str = ""
    port: int = 0


@dataclass(frozen=True)
class Config:
    """
    A whole, validated configuration.

    @ivar routes: at least one route, in file order.
    @ivar log_level: one of L{LOG_LEVELS} (C{"warning"} is stored as
        C{"warn"}).
    @ivar log_format: one of L{LOG_FORMATS}.
    @ivar workers: processes sharing every listener (1: no supervisor).
    @ivar shutdown_timeout: how long SIGTERM lets sessions finish.
    @ivar path: the absolute path of the file it came from, if any, kept so a
        reload still finds it after the process changes directory.
    """

    routes: tuple[RouteConfig, ...]
    log_level: str = "info"
    log_format: str = "text"
    workers: int = 1
    shutdown_timeout: float = 30.0
    admin: AdminConfig | None = None
    metrics: MetricsConfig | None = None
    path: Path | None = None

    def route(self, name: str) -> RouteConfig | None:
        """The route called C{name}, if any."""
        for route in self.routes:
            if route.name == name:
                return route
        return None


# ---------------------------------------------------------------------------
# Durations and addresses
# ---------------------------------------------------------------------------

_DURATION_UNITS: dict[str, float] = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_DURATION_RE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[a-z]*)")


def parse_duration(value: object, *, allow_zero: bool = False) -> float:
    """
    Turn a configuration duration into seconds.

    Accepted: a number of seconds (TOML integer or float, or a string such as
    C{"30"}), or a string with one unit: C{ms}, C{s}, C{m}, C{min}, C{h},
    C{d} (C{"500ms"}, C{"10s"}, C{"5m"}, C{"30min"}, C{"1h"}, C{"1d"}).
    C{min} and bare seconds are what the Rust pgtls accepted, so its files
    keep working.

    @param value: the value read from TOML.
    @param allow_zero: whether 0 is meaningful for this setting; no current
        setting allows it, because a zero timeout or refresh interval would
        make every connection fail or spin.
    @return: the duration in seconds.
    @raise ValueError: with a message that says what is accepted.
    """
    if isinstance(value, bool):
        raise ValueError(f'expected a duration such as "10s", got {_show(value)}')
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip())
        if match is None or match["unit"] not in ("", *_DURATION_UNITS):
            raise ValueError(
                f"invalid duration {_show(value)}: expected a number of seconds, or a number"
                f" followed by one of {', '.join(_DURATION_UNITS)}"
                ' (for example "500ms", "10s", "5m", "1h")'
            )
        seconds = float(match["number"]) * _DURATION_UNITS.get(match["unit"], 1.0)
    else:
        raise ValueError(f'expected a duration such as "10s", got {_show(value)}')
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {_show(value)}: must be finite")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        bound = "0 or more" if allow_zero else "greater than 0"
        raise ValueError(f"invalid duration {_show(value)}: must be {bound}")
    return seconds


def format_duration(seconds: float) -> str:
    """
    Render seconds in the shortest unit L{parse_duration} reads back, so
    that C{pgtls check} output can be pasted into a configuration file.
    """
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds // size)}{unit}"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_.-]+")


def parse_address(text: str) -> tuple[str, int]:
    """
    Split C{"host:port"} or C{"[v6]:port"} into host and port.

    The brackets are required around IPv6 literals because otherwise the
    last colon is ambiguous (the Rust pgtls split at the first colon and so
    mangled them).  The host is returned without brackets, ready for
    C{listenTCP}/C{connectTCP} and for certificate checks.  Port 0 is
    accepted here; callers that need a real port say so.

    @param text: the address as written.
    @return: C{(host, port)}.
    @raise ValueError: when the address is malformed.
    """
    if not isinstance(text, str):
        raise ValueError(f'expected an address such as "host:5432", got {_show(text)}')
    if not text or any(ch.isspace() for ch in text):
        raise ValueError(f'invalid address {_show(text)}: expected "host:port" or "[ipv6]:port"')
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            raise ValueError(f'invalid address {_show(text)}: missing "]" after the IPv6 address')
        host, rest = text[1:end], text[end + 1 :]
        if not host:
            raise ValueError(f"invalid address {_show(text)}: empty host")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"invalid address {_show(text)}: brackets are only for IPv6 addresses,"
                f" and {_show(host)} is not one"
            ) from None
        if not rest.startswith(":") or rest == ":":
            raise ValueError(f'invalid address {_show(text)}: missing port (write "[{host}]:5432")')
        port_text = rest[1:]
    else:
        if text.count(":") > 1:
            raise ValueError(
                f"invalid address {_show(text)}: an IPv6 address must be in brackets,"
                ' for example "[::1]:5432"'
            )
        host, colon, port_text = text.partition(":")
        if not colon or not port_text:
            raise ValueError(f'invalid address {_show(text)}: missing port (write "host:5432")')
        if not host:
            raise ValueError(
                f'invalid address {_show(text)}: empty host (use "0.0.0.0" or "[::]" for all)'
            )
        if not _HOSTNAME_RE.fullmatch(host):
            raise ValueError(f"invalid address {_show(text)}: {_show(host)} is not a host name")
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"invalid address {_show(text)}: port {_show(port_text)} is not a number")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"invalid address {_show(text)}: port {port} is outside 0..65535")
    return host, port


# ---------------------------------------------------------------------------
# Value parsers used by the schema tables
# ---------------------------------------------------------------------------


class _Invalid(ValueError):
    """
    A value is wrong; the message says why, without saying where (the caller
    adds the file, route and key).
    """


_TOML_TYPE_NAMES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"),
    (int, "integer"),
    (float, "float"),
    (str, "string"),
    (datetime, "datetime"),
    (date, "date"),
    (time, "time"),
    (Mapping, "table"),
    (list, "array"),
)


def _show(value: object) -> str:
    """
    Render a TOML value the way the user wrote it, with its TOML type, so
    messages such as C{got integer 5} point at the mistake.
    """
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    for kind, name in _TOML_TYPE_NAMES:
        if isinstance(value, kind):
            if kind in (Mapping, list):
                return f"a {name}" if name == "table" else f"an {name}"
            return f"{name} {value}"
    return repr(value)


_Parser = Callable[[object, Path], Any]


def _string(value: object, base_dir: Path) -> str:
    """A non-empty string: an empty one is never a meaningful setting here."""
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_show(value)}")
    if not value.strip():
        raise _Invalid("must not be empty")
    return value


def _boolean(value: object, base_dir: Path) -> bool:
    """
    C{true} or C{false} only: accepting C{"yes"} or 1 would make C{mtls = "false"}
    mean true.
    """
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_show(value)}")
    return value


def _positive_int(value: object, base_dir: Path) -> int:
    """An integer of at least 1; TOML booleans are not integers here."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"expected an integer of at least 1, got {_show(value)}")
    if value < 1:
        raise _Invalid(f"expected an integer of at least 1, got {value}")
    return value


def _duration(value: object, base_dir: Path) -> float:
    try:
        return parse_duration(value)
    except ValueError as e:
        raise _Invalid(str(e)) from None


def _address(value: object, base_dir: Path) -> str:
    """A listen address: validated, kept as written (host and port are derived)."""
    if not isinstance(value, str):
        raise _Invalid(f'expected a string such as "0.0.0.0:6432", got {_show(value)}')
    try:
        parse_address(value)
    except ValueError as e:
        raise _Invalid(str(e)) from None
    return value


def _connect_address(value: object, base_dir: Path) -> str:
    """A backend address: like L{_address}, but port 0 cannot be connected to."""
    text = _address(value, base_dir)
    if parse_address(text)[1] == 0:
        raise _Invalid(f"invalid address {_show(text)}: port 0 cannot be connected to")
    return text


def _server_name(value: object, base_dir: Path) -> str:
    """A host name or IP address, without brackets, as SNI and certificate checks need it."""
    text = _string(value, base_dir)
    if text.startswith("["):
        raise _Invalid(f"{_show(text)}: write IPv6 addresses without brackets here")
    if any(ch.isspace() for ch in text):
        raise _Invalid(f"{_show(text)} is not a host name")
    return text


def _choice(
    choices: Sequence[str],
    aliases: Mapping[str, str] | None = None,
    fold_case: bool = False,
    suggest: bool = True,
) -> _Parser:
    """
    Make a parser for one of a fixed set of strings.

    @param aliases: extra accepted spellings and what they mean.
    @param fold_case: accept any letter case (for log levels, which people
        habitually write in capitals).
    @param suggest: offer the closest choice for a misspelling; off where
        "closest" means nothing (C{"1.1"} is not a typo of C{"1.3"}).
    """
    aliases = dict(aliases or {})
    expected = ", ".join(f'"{c}"' for c in choices)

    def parse(value: object, base_dir: Path) -> str:
        if not isinstance(value, str):
            hint = ""
            if not isinstance(value, bool) and str(value) in choices:
                hint = f'; write it as a string: "{value}"'
            raise _Invalid(f"expected one of {expected}, got {_show(value)}{hint}")
        key = value.lower() if fold_case else value
        if key in choices:
            return key
        if key in aliases:
            return aliases[key]
        message = f"expected one of {expected}, got {_show(value)}"
        close = difflib.get_close_matches(key.lower(), [*choices, *aliases], n=1)
        if suggest and close:
            message += f'; did you mean "{close[0]}"?'
        raise _Invalid(message)

    return parse


_log_level_choice = _choice(LOG_LEVELS, aliases={"warning": "warn"}, fold_case=True)


def _log_level(value: object, base_dir: Path) -> str:
    """
    A log level.  The Rust pgtls took C{tracing} filter directives such as
    C{"pgtls=debug"}; those get a specific hint rather than a bare refusal.
    """
    if isinstance(value, str) and ("=" in value or "," in value):
        raise _Invalid(
            f"expected one of {', '.join(_show(level) for level in LOG_LEVELS)},"
            f" got {_show(value)}; filter directives from the Rust pgtls are not supported,"
            " give a single level"
        )
    return _log_level_choice(value, base_dir)


_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _existing_file(value: object, base_dir: Path) -> Path:
    """
    A path to a regular file this process can open, made absolute.

    Relative paths are relative to the configuration file's directory, so a
    configuration and its certificates can be moved together and the result
    does not depend on the working directory (twistd may change it).
    Symbolic links are deliberately I{not} resolved: certificate rotation
    (Kubernetes secrets, certbot's C{live/} directory) swaps link targets,
    and the refresh logic must keep following the link.
    """
    text = _string(value, base_dir)
    if _URL_RE.match(text):
        raise _Invalid(
            f"{_show(text)}: URLs are not supported (the Rust pgtls fetched them);"
            " download the file and give its path"
        )
    path = base_dir / text
    if not path.exists():
        raise _Invalid(f"file not found: {path}")
    if not path.is_file():
        raise _Invalid(f"not a regular file: {path}")
    try:
        with path.open("rb"):
            pass
    except OSError as e:
        raise _Invalid(f"cannot read {path}: {e.strerror or e}") from None
    return path


# ---------------------------------------------------------------------------
# Schema tables
# ---------------------------------------------------------------------------


class _Required:
    """The marker for keys that have no default."""

    def __repr__(self) -> str:
        return "<required>"


_REQUIRED: Any = _Required()
_BAD: Any = object()  # stands in for a value that failed to parse


@dataclass(frozen=True)
class _Key:
    """
    One key of a section.

    @ivar parse: checks and converts the TOML value, raising L{_Invalid}.
    @ivar default: the value when the key is absent; L{_REQUIRED} if it must
        be present; L{None} for optional keys with no default.
    """

    parse: _Parser
    default: Any = None


def _workers(value: object, base_dir: Path) -> int:
    """A process count, or C{"auto"} for one per CPU."""
    if value == "auto":
        return max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f'expected a number of processes or "auto", got {_show(value)}')
    if not 1 <= value <= MAX_WORKERS:
        raise _Invalid(f"must be between 1 and {MAX_WORKERS}, got {value}")
    return value


def _duration_or_zero(value: object, base_dir: Path) -> float:
    try:
        return parse_duration(value, allow_zero=True)
    except ValueError as e:
        raise _Invalid(str(e)) from None


_TOP_LEVEL: dict[str, _Key] = {
    "log_level": _Key(_log_level, "info"),
    "log_format": _Key(_choice(LOG_FORMATS, fold_case=True), "text"),
    "workers": _Key(_workers, 1),
    "shutdown_timeout": _Key(_duration_or_zero, 30.0),
}

_ROUTE: dict[str, _Key] = {
    "name": _Key(_string, None),
}

_LISTENER: dict[str, _Key] = {
    "bind_address": _Key(_address, _REQUIRED),
    "server_cert": _Key(_existing_file, _REQUIRED),
    "server_key": _Key(_existing_file, _REQUIRED),
    "tls": _Key(_choice(LISTENER_TLS_MODES), "require"),
    "min_tls_version": _Key(_choice(TLS_VERSIONS, suggest=False), "1.2"),
    "ciphers": _Key(_string, DEFAULT_CIPHERS),
    "mtls": _Key(_boolean, False),
    "client_ca": _Key(_existing_file, None),
    "client_crl": _Key(_existing_file, None),
    "cert_user_match": _Key(_boolean, False),
    "direct_tls": _Key(_boolean, True),
    "cert_refresh_interval": _Key(_duration, 3600.0),
    "startup_timeout": _Key(_duration, 60.0),
    "max_clients": _Key(_positive_int, 1000),
}


def _require_auth(value: object, base_dir: Path) -> str:
    """libpq's C{require_auth} syntax, checked now rather than at the first login."""
    text = _string(value, base_dir)
    try:
        parse_require_auth(text)
    except ValueError as e:
        raise _Invalid(str(e)) from None
    return text


def _scram_iterations(value: object, base_dir: Path) -> int:
    """An iteration limit no lower than PostgreSQL's default count."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"expected an integer, got {_show(value)}")
    if value < MIN_MAX_SCRAM_ITERATIONS:
        raise _Invalid(
            f"must be at least {MIN_MAX_SCRAM_ITERATIONS} (PostgreSQL's default iteration"
            f" count), got {value}"
        )
    return value


_BACKEND: dict[str, _Key] = {
    "address": _Key(_connect_address, _REQUIRED),
    "tls": _Key(_choice(BACKEND_TLS_MODES), "verify-full"),
    "root_ca": _Key(_existing_file, None),
    "server_name": _Key(_server_name, None),
    "connect_timeout": _Key(_duration, 10.0),
    "min_tls_version": _Key(_choice(TLS_VERSIONS, suggest=False), "1.2"),
    "client_cert": _Key(_existing_file, None),
    "client_key": _Key(_existing_file, None),
    "require_auth": _Key(_require_auth, None),
    "max_scram_iterations": _Key(_scram_iterations, DEFAULT_MAX_SCRAM_ITERATIONS),
}


def _non_negative_int(value: object, base_dir: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"expected an integer, got {_show(value)}")
    if value < 0:
        raise _Invalid(f"must be 0 or more, got {value}")
    return value


def _any_string(value: object, base_dir: Path) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_show(value)}")
    return value


_POOL: dict[str, _Key] = {
    "mode": _Key(_choice(POOL_MODES), "transaction"),
    "service_user": _Key(_string, _REQUIRED),
    "service_password_file": _Key(_existing_file, None),
    "service_password_env": _Key(_string, None),
    "service_password": _Key(_any_string, None),
    "max_size": _Key(_positive_int, 5),
    "min_size": _Key(_non_negative_int, 0),
    "acquire_timeout": _Key(_duration, 30.0),
    "idle_timeout": _Key(_duration, 1800.0),
    "max_lifetime": _Key(_duration, 3600.0),
    "reset_query": _Key(_any_string, "DISCARD ALL"),
    "log_queries": _Key(_boolean, False),
}

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


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


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


def _check_listener(values: dict[str, Any], where: str, report: _Report) -> None:
    """The listener rules that involve more than one key."""
    if values["mtls"] is True and values["client_ca"] is None:
        report.add(f"{where}client_ca", "required when mtls = true")
    if values["cert_user_match"] is True and values["mtls"] is False:
        report.add(
            f"{where}cert_user_match",
            "requires mtls = true (without a verified client certificate there is no CN to match)",
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
    return BackendConfig(
        host=host, port=port, **{**values, "server_name": values["server_name"] or host}
    )


def _check_pool(values: dict[str, Any], where: str, report: _Report) -> None:
    """One password source at most; min_size within max_size; the env variable set."""
    sources = [
        k
        for k in ("service_password_file", "service_password_env", "service_password")
        if values[k] is not None
    ]
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
    password, source = None, None
    if path is not None:
        password, source = path.read_text().rstrip("\r\n"), "file"
    elif env is not None:
        password, source = os.environ[env], "env"
    elif literal is not None:
        password, source = literal, "literal"
    return PoolConfig(service_password=password, password_source=source, **values)


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


def _names(value: object, base_dir: Path) -> tuple[str, ...]:
    """A list of role names."""
    if not isinstance(value, list):
        raise _Invalid(f"expected a list of user names, got {_show(value)}")
    for item in value:
        if not isinstance(item, str) or not item:
            raise _Invalid(f"expected user names (non-empty strings), got {_show(item)}")
    return tuple(value)


_ADMIN: dict[str, _Key] = {
    "database": _Key(_string, "pgtls"),
    "users": _Key(_names, ()),
    "auth_database": _Key(_string, "postgres"),
}

_METRICS: dict[str, _Key] = {
    "bind_address": _Key(_address, _REQUIRED),
}


def _build_metrics(values: dict[str, Any]) -> MetricsConfig:
    host, port = parse_address(values["bind_address"])
    return MetricsConfig(host=host, port=port, **values)


_TOP_SECTIONS: dict[str, _Section] = {
    "admin": _Section(_ADMIN, lambda values: AdminConfig(**values), required=False),
    "metrics": _Section(_METRICS, _build_metrics, required=False),
}
"""
Top-level tables other than C{[[proxy]]}; the key is both the table name
and the L{Config} field it fills.
"""

_SECTION_TITLES: dict[str, str] = {
    **{name: f"[proxy.{name}]" for name in _ROUTE_SECTIONS},
    **{name: f"[{name}]" for name in _TOP_SECTIONS},
}


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


def _route_label(index: int, name: object) -> str:
    """C{[[proxy]] #2 "app"}: the index always (names can repeat or be wrong), the name if any."""
    if isinstance(name, str) and name.strip():
        return f"[[proxy]] #{index} {_show(name)}"
    return f"[[proxy]] #{index}"


def _parse_route(
    index: int, table: object, base_dir: Path, report: _Report
) -> tuple[str, RouteConfig | None]:
    """
    Parse one C{[[proxy]]} entry.

    @return: the route's label for messages, and the route, or L{None} when
        it has problems (already reported).
    """
    if not isinstance(table, Mapping):
        label = f"[[proxy]] #{index}"
        report.add(label, f"expected a table, got {_show(table)}")
        return label, None
    label = _route_label(index, table.get("name"))
    before = len(report.messages)
    top = _parse_table(table, _ROUTE, "proxy", f"{label}: ", base_dir, report, _ROUTE_SECTIONS)
    sections = _parse_sections(_ROUTE_SECTIONS, table, f"{label}: ", base_dir, report)
    if len(report.messages) != before:
        return label, None
    if top["name"] is None:
        top["name"] = f"proxy-{index}"
    return label, RouteConfig(**top, **_build_sections(_ROUTE_SECTIONS, sections))


def _binds_overlap(a: ListenerConfig, b: ListenerConfig) -> bool:
    """
    Whether two listeners would fight over a port.

    Port 0 never conflicts (each gets its own ephemeral port).  Wildcard
    addresses overlap with every address of their family, and C{::} also
    with IPv4 because Twisted leaves C{IPV6_V6ONLY} off, so Linux binds it
    dual-stack.  Host names are compared as written: resolving them would
    be I/O, and the bind would fail loudly anyway.
    """
    if a.port != b.port or a.port == 0:
        return False
    if a.host.lower() == b.host.lower():
        return True
    try:
        ip_a, ip_b = ipaddress.ip_address(a.host), ipaddress.ip_address(b.host)
    except ValueError:
        return False
    if ip_a == ip_b:
        return True
    for wild, other in ((ip_a, ip_b), (ip_b, ip_a)):
        if wild.is_unspecified and (wild.version == other.version or wild.version == 6):
            return True
    return False


def _check_routes(routes: Sequence[tuple[str, RouteConfig]], report: _Report) -> None:
    """Rules across routes: unique names, and no two listeners on one port."""
    seen: dict[str, str] = {}
    for label, route in routes:
        if route.name in seen:
            report.add(
                f"{label}: name", f"{_show(route.name)} is already used by {seen[route.name]}"
            )
        else:
            seen[route.name] = label
    for i, (label, route) in enumerate(routes):
        for other_label, other in routes[:i]:
            if _binds_overlap(route.listener, other.listener):
                report.add(
                    f"{label}: listener.bind_address",
                    f"{_show(route.listener.bind_address)} conflicts with"
                    f" {_show(other.listener.bind_address)} of {other_label}",
                )
                break


def parse_config(
    data: Mapping[str, Any], path: Path | None = None, base_dir: Path | None = None
) -> Config:
    """
    Validate already-parsed TOML data and build a L{Config}.

    Separate from L{load_config} so that callers and tests can build or
    rewrite configurations in memory.

    @param data: the TOML document as a mapping.
    @param path: the file it came from; named in every message, and stored
        (made absolute) in L{Config.path}.
    @param base_dir: the directory relative file paths are resolved
        against; defaults to C{path}'s directory, or the working directory.
    @raise ConfigError: listing every problem found.
    """
    if path is not None:
        path = Path(path)
    report = _Report(prefix=f"{path}: " if path is not None else "")
    if base_dir is None:
        base_dir = path.parent if path is not None else Path()
    base_dir = Path(os.path.abspath(base_dir))
    if not isinstance(data, Mapping):
        raise ConfigError(f"{report.prefix}expected a TOML document, got {_show(data)}")
    top = _parse_table(data, _TOP_LEVEL, "", "", base_dir, report, ("proxy", *_TOP_SECTIONS))
    sections = _parse_sections(_TOP_SECTIONS, data, "", base_dir, report)
    proxies = data.get("proxy")
    routes: list[tuple[str, RouteConfig]] = []
    if isinstance(proxies, Mapping):
        report.add(
            "proxy",
            "expected an array of tables, got a table; write [[proxy]] (two brackets) for each route",
        )
    elif proxies is not None and not isinstance(proxies, list):
        report.add("proxy", f"expected an array of tables ([[proxy]]), got {_show(proxies)}")
    elif not proxies:
        report.add("", "at least one [[proxy]] route is required")
    else:
        complete = True
        for index, table in enumerate(proxies, start=1):
            label, route = _parse_route(index, table, base_dir, report)
            if route is None:
                complete = False
            else:
                routes.append((label, route))
        if complete:
            _check_routes(routes, report)
    if report.messages:
        raise ConfigError(report.messages)
    return Config(
        routes=tuple(route for _, route in routes),
        path=Path(os.path.abspath(path)) if path is not None else None,
        **top,
        **_build_sections(_TOP_SECTIONS, sections),
    )


def load_config(path: str | os.PathLike[str]) -> Config:
    """
    Read, parse and validate a configuration file.

    @param path: the TOML file; relative paths inside it are relative to
        its directory.
    @raise ConfigError: when the file cannot be read, is not TOML, or is
        not a valid configuration.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file: {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 (TOML files must be): {e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    return parse_config(data, path=path)


# ---------------------------------------------------------------------------
# Human summary
# ---------------------------------------------------------------------------

_LISTENER_TLS_TEXT = {
    "require": "plaintext sessions refused",
    "allow": "plaintext sessions allowed",
}

_BACKEND_TLS_TEXT = {
    "disable": "plaintext",
    "prefer": "TLS if offered, else plaintext; certificate not verified",
    "require": "TLS required; certificate not verified",
    "verify-ca": "TLS required; certificate chain verified",
    "verify-full": "TLS required; certificate chain and host name verified",
}


def _describe_route(route: RouteConfig) -> list[str]:
    """The lines of L{describe_config} for one route."""
    lst, be = route.listener, route.backend
    direct = "direct TLS accepted" if lst.direct_tls else "direct TLS refused"
    lines = [
        f"route {_show(route.name)}",
        f"  listen     {lst.bind_address}",
        f"  client tls {lst.tls} ({_LISTENER_TLS_TEXT[lst.tls]}); TLS >= {lst.min_tls_version};"
        f" {direct}",
        f"  cert       {lst.server_cert} (key {lst.server_key}),"
        f" checked for changes every {format_duration(lst.cert_refresh_interval)}",
    ]
    if lst.mtls:
        mtls = f"  client certs required, CA {lst.client_ca}"
    elif lst.client_ca is not None:
        mtls = f"  client certs not required, CA {lst.client_ca}"
    else:
        mtls = "  client certs not required"
    if lst.client_crl is not None:
        mtls += f", CRL {lst.client_crl}"
    if lst.cert_user_match:
        mtls += "; CN must equal the user name"
    lines.append(mtls)
    lines.append(
        f"  limits     {lst.max_clients} clients,"
        f" startup timeout {format_duration(lst.startup_timeout)}"
    )
    lines.append(f"  backend    {be.address}, tls {be.tls} ({_BACKEND_TLS_TEXT[be.tls]})")
    if be.tls != "disable":
        trust = f"CA {be.root_ca}" if be.root_ca is not None else "system CAs"
        lines.append(
            f"             server_name {be.server_name}; TLS >= {be.min_tls_version}; {trust}"
        )
        if be.client_cert is not None:
            lines.append(f"             client cert {be.client_cert} (key {be.client_key})")
    auth = f"require_auth {be.require_auth}" if be.require_auth else "any method"
    if be.tls not in ("verify-ca", "verify-full"):
        auth += "; cleartext passwords refused (leg not verified)"
    lines.append(f"             auth {auth}; SCRAM iterations <= {be.max_scram_iterations}")
    lines.append(f"             connect timeout {format_duration(be.connect_timeout)}")
    pool = route.pool
    if pool is None:
        lines.append("  pooling    none (1:1 pass-through)")
    else:
        source = pool.password_source or "no password"
        lines.append(
            f"  pooling    {pool.mode} mode as {pool.service_user} ({source}),"
            f" {pool.min_size}..{pool.max_size} connections per database,"
            f" wait {format_duration(pool.acquire_timeout)}"
        )
    return lines


def describe_config(config: Config) -> str:
    """
    Summarise what a configuration will do, one block per route, for
    C{pgtls check}: seeing the effective defaults (above all the TLS
    policy on each side) is how a user catches a configuration that is
    valid but not what they meant.
    """
    lines = []
    if config.path is not None:
        lines.append(f"config     {config.path}")
    lines.append(f"log_level  {config.log_level}, log_format {config.log_format}")
    lines.append(
        f"processes  {config.workers} worker{'s' if config.workers != 1 else ''},"
        f" shutdown_timeout {format_duration(config.shutdown_timeout)}"
    )
    if config.admin is not None:
        users = ", ".join(config.admin.users) or "nobody"
        lines.append(f"admin      database {_show(config.admin.database)} for {users}")
    else:
        lines.append("admin      no console")
    if config.metrics is not None:
        lines.append(f"metrics    http://{config.metrics.bind_address}/metrics")
    for route in config.routes:
        lines.append("")
        lines.extend(_describe_route(route))
    return "\n".join(lines) + "\n"
