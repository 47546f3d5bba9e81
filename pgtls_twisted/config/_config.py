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

import base64
import binascii
import difflib
import ipaddress
import math
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

from pgtls_twisted.protocol._authpolicy import parse_require_auth
from pgtls_twisted.protocol._scramserver import Verifier as ScramVerifier

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
    "ADMIN_AUTH_METHODS",
    "AdminConfig",
    "ScramVerifier",
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
    "secret_file_problem",
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
#: carried in the low byte of every minted cancel PID (see L{pgtls_twisted.proxy._cancel}).
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
    @ivar startup_timeout: seconds allowed from accept to a started
        session, all phases together (a PAUSE hold included).
    @ivar login_timeout: seconds allowed for the TLS handshake, the startup
        packet and authentication (a PAUSE hold not counted): what an
        unauthenticated client may take of a login slot.
    @ivar max_clients: the most client connections served at once.
    @ivar max_logins: the most connections logging in at once; more wait
        briefly for a slot, then get 53300.
    @ivar max_logins_per_address: the most connections logging in (or
        waiting to) from one client address; more get 53300 at once.
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
    login_timeout: float = 15.0
    max_clients: int = 1000
    max_logins: int = 64
    max_logins_per_address: int = 16


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
        the server may ask for (see L{pgtls_twisted.protocol._authpolicy}); L{None}
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


ADMIN_AUTH_METHODS = ("cert", "scram", "backend")


@dataclass(frozen=True)
class AdminConfig:
    """
    C{[admin]}: the admin console (absent: no console).

    @ivar auth: how pgtls authenticates console users, itself:
        C{"cert"} (a client certificate chaining to the listener's
        C{client_ca}, whose CN is the user), C{"scram"} (SCRAM-SHA-256
        against C{password_file}) or C{"backend"} (the password checked by
        logging in to the route's backend, only through a C{verify-full}
        backend leg). Required: there is no console without it.
    @ivar database: the database name that, on any listener, opens the
        console instead of a backend session.
    @ivar users: who may use every command; an empty list lets nobody in.
    @ivar stats_users: who may use C{SHOW} commands only.
    @ivar password_file: the file C{verifiers} were read from (C{scram}).
    @ivar verifiers: user name to SCRAM verifier, from C{password_file}.
    @ivar auth_database: the backend database a password is checked
        against with C{backend} (the console's own name does not exist
        there).
    """

    auth: str
    database: str = "pgtls"
    users: tuple[str, ...] = ()
    stats_users: tuple[str, ...] = ()
    password_file: Path | None = None
    verifiers: Mapping[str, ScramVerifier] = field(default_factory=dict, repr=False)
    auth_database: str = "postgres"

    def role(self, user: str) -> str | None:
        """C{"admin"}, C{"stats"} or C{None}: what C{user} may do."""
        if user in self.users:
            return "admin"
        if user in self.stats_users:
            return "stats"
        return None


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


def secret_file_problem(path: Path) -> str | None:
    """
    Why a private key or password file is too open, or C{None} when it is
    not: PostgreSQL's rule (libpq's form of it, which is the one that fits a
    process that may run as root): no group or world access when the file
    belongs to anyone but root, and at most group read when it belongs to
    root, so a key can be shared through a group such as C{ssl-cert}. A
    readable key is as good as the certificate itself to whoever reads it,
    so pgtls refuses to use one, as PostgreSQL and libpq do.

    Checked at load and reload (L{_secret_file}) and when certificate files
    are re-read at run time (L{pgtls_twisted.tls._contexts}), where a key that
    became readable keeps the last good context.

    @param path: the file; symbolic links are followed, as in PostgreSQL.
    """
    if os.name != "posix":  # pragma: no cover - no Unix modes to check
        return None
    try:
        st = path.stat()
    except OSError as e:
        return f"cannot read {path}: {e.strerror or e}"
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == 0:
        loose = mode & (stat.S_IWGRP | stat.S_IXGRP | stat.S_IRWXO)
    else:
        loose = mode & (stat.S_IRWXG | stat.S_IRWXO)
    if not loose:
        return None
    return (
        f'file "{path}" has group or world access (mode {mode:04o}, owner uid {st.st_uid});'
        " it must have permissions u=rw (0600) or less if owned by the user pgtls runs as,"
        " or u=rw,g=r (0640) or less if owned by root"
    )


def _secret_file(value: object, base_dir: Path) -> Path:
    """
    A private key or password file: an L{_existing_file} that passes
    L{secret_file_problem}.
    """
    path = _existing_file(value, base_dir)
    problem = secret_file_problem(path)
    if problem is not None:
        raise _Invalid(problem)
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
    "server_key": _Key(_secret_file, _REQUIRED),
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
    "login_timeout": _Key(_duration, 15.0),
    "max_clients": _Key(_positive_int, 1000),
    "max_logins": _Key(_positive_int, 64),
    "max_logins_per_address": _Key(_positive_int, 16),
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
    "client_key": _Key(_secret_file, None),
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
    "service_password_file": _Key(_secret_file, None),
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


def _first_line(path: Path) -> str:
    """
    A password file's first line, without its line ending: what README
    promises, so a file that goes on with a comment or a second secret
    does not turn into one long password.  Only C{\\n} (and a C{\\r}
    before it) ends the line: a password may contain any other character.
    """
    return path.read_text().split("\n", 1)[0].removesuffix("\r")


def _build_pool(values: dict[str, Any]) -> PoolConfig:
    values = dict(values)
    path = values.pop("service_password_file")
    env = values.pop("service_password_env")
    literal = values.pop("service_password")
    password, source = None, None
    if path is not None:
        password, source = _first_line(path), "file"
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
    "auth": _Key(_choice(ADMIN_AUTH_METHODS), _REQUIRED),
    "database": _Key(_string, "pgtls"),
    "users": _Key(_names, ()),
    "stats_users": _Key(_names, ()),
    "password_file": _Key(_secret_file, None),
    "auth_database": _Key(_string, "postgres"),
}

_VERIFIER_RE = re.compile(
    r"SCRAM-SHA-256\$(?P<iterations>[0-9]{1,10}):(?P<salt>[A-Za-z0-9+/]+=*)"
    r"\$(?P<stored>[A-Za-z0-9+/]+=*):(?P<server>[A-Za-z0-9+/]+=*)"
)


def parse_verifier(text: str) -> ScramVerifier:
    """
    A verifier in PostgreSQL's C{pg_authid} format,
    C{SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>} (base64).

    @raise ValueError: not one (the message never repeats the text: it is
        a secret).
    """
    match = _VERIFIER_RE.fullmatch(text)
    if match is None:
        raise ValueError(
            "expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>"
            " (PostgreSQL's pg_authid format)"
        )
    try:
        salt, stored, server = (
            base64.b64decode(match[k], validate=True) for k in ("salt", "stored", "server")
        )
    except binascii.Error:
        raise ValueError("invalid base64 in the verifier") from None
    iterations = int(match["iterations"])
    if iterations < 1 or len(stored) != 32 or len(server) != 32 or not salt:
        raise ValueError("not a SCRAM-SHA-256 verifier (bad iteration count or key length)")
    return ScramVerifier(iterations, salt, stored, server)


def read_verifiers(path: Path) -> dict[str, ScramVerifier]:
    """
    C{admin.password_file}: one C{name:verifier} per line (the verifier
    itself contains colons: the name ends at the first one); blank lines
    and lines starting with C{#} are skipped.

    @raise ValueError: naming the line, never its content.
    """
    verifiers: dict[str, ScramVerifier] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, verifier = line.partition(":")
        if not colon or not name:
            raise ValueError(f"{path} line {number}: expected name:SCRAM-SHA-256$...")
        if name in verifiers:
            raise ValueError(f"{path} line {number}: {name!r} is listed twice")
        try:
            verifiers[name] = parse_verifier(verifier)
        except ValueError as e:
            raise ValueError(f"{path} line {number}: {e}") from None
    return verifiers


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


_METRICS: dict[str, _Key] = {
    "bind_address": _Key(_address, _REQUIRED),
}


def _build_metrics(values: dict[str, Any]) -> MetricsConfig:
    host, port = parse_address(values["bind_address"])
    return MetricsConfig(host=host, port=port, **values)


_TOP_SECTIONS: dict[str, _Section] = {
    "admin": _Section(_ADMIN, _build_admin, _check_admin, required=False),
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


def _check_admin_routes(
    admin: Mapping[str, Any] | None, routes: Sequence[RouteConfig], report: _Report
) -> None:
    """
    A console that no listener could open is a mistake worth saying:
    C{cert} needs a listener with C{client_ca}, C{backend} a route whose
    backend leg is C{verify-full}.
    """
    if admin is None or any(value is _BAD for value in admin.values()):
        return
    if admin["auth"] == "cert" and not any(r.listener.client_ca for r in routes):
        report.add("admin.auth", 'is "cert", but no listener has a client_ca to verify with')
    if admin["auth"] == "backend" and not any(r.backend.tls == "verify-full" for r in routes):
        report.add(
            "admin.auth",
            'is "backend", but no route has backend.tls = "verify-full"'
            " (a password is only checked by a server pgtls has verified)",
        )


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
            _check_admin_routes(sections.get("admin"), [r for _, r in routes], report)
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
        f" startup timeout {format_duration(lst.startup_timeout)};"
        f" {lst.max_logins} logins at once, {lst.max_logins_per_address} per address,"
        f" login timeout {format_duration(lst.login_timeout)}"
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
        admin = config.admin
        users = ", ".join(admin.users) or "nobody"
        line = f"admin      database {_show(admin.database)} for {users}"
        if admin.stats_users:
            line += f" (SHOW only: {', '.join(admin.stats_users)})"
        lines.append(f"{line}; auth {admin.auth}")
    else:
        lines.append("admin      no console")
    if config.metrics is not None:
        lines.append(f"metrics    http://{config.metrics.bind_address}/metrics")
    for route in config.routes:
        lines.append("")
        lines.extend(_describe_route(route))
    return "\n".join(lines) + "\n"
