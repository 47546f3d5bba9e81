"""
The configuration's model: the frozen dataclasses
L{pgtls_twisted.config.load_config} returns,
the sets of values a setting may take, and L{ConfigError}.

The dataclass fields are the one place a setting's default is written: the
schema (L{pgtls_twisted.config._schema}) reads each default from the field
of the same name, so a configuration file that leaves a key out and code
that builds a dataclass directly always agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

from pgtls_twisted.protocol._scramserver import Verifier as ScramVerifier

__all__ = [
    "ADMIN_AUTH_METHODS",
    "BACKEND_TLS_MODES",
    "DEFAULT_CIPHERS",
    "DEFAULT_MAX_SCRAM_ITERATIONS",
    "LISTENER_TLS_MODES",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MAX_INSTANCE",
    "MAX_WORKERS",
    "MIN_MAX_SCRAM_ITERATIONS",
    "PINNING_MODES",
    "POOL_IDENTITIES",
    "POOL_MODES",
    "TLS_VERSIONS",
    "AdminConfig",
    "BackendConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "ListenerConfig",
    "MetricsConfig",
    "PoolConfig",
    "RouteConfig",
    "ScramVerifier",
]

DEFAULT_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!MD5:!DSS"
"""
The TLS 1.2 cipher list used when C{ciphers} is not set: forward-secret AEAD
suites only.  TLS 1.3 suites are not affected by it (they are all AEAD and
forward secret already).
"""

LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("text", "json")
#: The most worker processes C{workers} may ask for: every minted cancel key
#: carries the worker's number, at the cost of log2(workers) of a protocol
#: 3.0 key's 32 random bits, so at most 6 (see L{pgtls_twisted.proxy._cancel}).
MAX_WORKERS = 64
#: The largest C{[cluster] instance}: the instance is the first byte of
#: every minted cancel key (see L{pgtls_twisted.proxy._cancel}).
MAX_INSTANCE = 255
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
    @ivar proxy_protocol: every connection must begin with a PROXY
        protocol header (v1 or v2) naming the client, and come from one
        of C{proxy_trusted}: a load balancer in front of pgtls.
    @ivar proxy_trusted: the networks a PROXY header is accepted from.
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
    proxy_protocol: bool = False
    proxy_trusted: tuple[IPv4Network | IPv6Network, ...] = ()


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
    @ivar keepalives: TCP keepalives on every server connection (libpq's
        C{keepalives}, PgBouncer's C{tcp_keepalive}; on by default in both).
    @ivar keepalives_idle: seconds of silence before the first probe (0:
        the system's, 2 hours on Linux).
    @ivar tcp_user_timeout: seconds sent data may stay unacknowledged
        before the connection is dropped (0: the system's, about 15
        minutes of retransmissions on Linux); on Linux it also bounds the
        keepalive probes.
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
    keepalives: bool = True
    keepalives_idle: float = 0.0
    tcp_user_timeout: float = 0.0

    def __post_init__(self) -> None:
        if not self.server_name:
            object.__setattr__(self, "server_name", self.host)


POOL_MODES = ("session", "transaction")
#: What a transaction pool does with a client that creates session state.
PINNING_MODES = ("pin", "refuse")
#: Whose role pooled server connections log in as.
POOL_IDENTITIES = ("service", "client")


@dataclass(frozen=True)
class PoolConfig:
    """
    C{[proxy.pool]}: pooled server connections (absent: 1:1 pass-through),
    logged in as a service user (C{identity = "service"}, the pooling
    seed's design) or as each client's own role (C{"client"}).

    @ivar identity: C{"service"} or C{"client"}; when the file does not
        say, C{"service"} if C{service_user} is set, else C{"client"}.
    @ivar auth_cache_ttl: seconds a client's login is answered from the
        keys cached at its last login checked by the server (C{identity =
        "client"}); 0: the server checks every login.
    @ivar service_password: resolved at load time from
        C{service_password_file}, C{service_password_env} or
        C{service_password}; never shown in reprs or logs.
    @ivar password_source: C{"file"}, C{"env"}, C{"literal"} or C{None}.
    @ivar client_idle_timeout: seconds; 0 is off, as are the other two
        timeouts (see L{pgtls_twisted.pool._timeouts}).
    @ivar max_db_connections: server connections per database across its
        users' pools, C{max_user_connections} per user across databases
        (PgBouncer's keys); 0 is no limit (see L{pgtls_twisted.pool._limits}).
    """

    service_user: str | None = None
    #: Always C{"service"} or C{"client"} once loaded (None only in the
    #: schema: "not given").
    identity: str | None = None
    auth_cache_ttl: float = 600.0
    mode: str = "transaction"
    service_password: str | None = field(default=None, repr=False)
    password_source: str | None = None
    max_size: int = 5
    min_size: int = 0
    max_db_connections: int = 0
    max_user_connections: int = 0
    acquire_timeout: float = 30.0
    idle_timeout: float = 1800.0
    max_lifetime: float = 3600.0
    reset_query: str = "DISCARD ALL"
    log_queries: bool = False
    max_prepared_statements: int = 200
    pinning: str = "pin"
    client_idle_timeout: float = 0.0
    idle_transaction_timeout: float = 0.0
    query_timeout: float = 0.0


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
class ClusterConfig:
    """
    C{[cluster]}: this process is one of several instances behind a load
    balancer (absent: it is alone).

    @ivar instance: this instance's number, 1 to L{MAX_INSTANCE}, unique in
        the cluster: it is carried in every cancel key this instance mints,
        so that a CancelRequest the balancer sends to another instance can
        be passed back here.
    @ivar peers: every instance's client listener address, in instance
        order (the Nth entry is instance N's); this instance's own entry is
        not used, so that every instance can be given the same list.
    """

    instance: int
    peers: tuple[str, ...] = ()

    def peer(self, instance: int) -> str | None:
        """The listener address of C{instance}, if the list has one (and it is not this one)."""
        if instance == self.instance or not 1 <= instance <= len(self.peers):
            return None
        return self.peers[instance - 1]


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
    cluster: ClusterConfig | None = None
    path: Path | None = None

    def route(self, name: str) -> RouteConfig | None:
        """The route called C{name}, if any."""
        for route in self.routes:
            if route.name == name:
                return route
        return None
