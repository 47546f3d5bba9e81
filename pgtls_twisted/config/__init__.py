"""
The configuration: a TOML file (or a mapping) in, frozen dataclasses out,
with every problem reported at once, before anything binds.

This is public API: L{load_config}, L{parse_config}, the dataclasses, and
L{describe_config} (what C{pgtls check} prints).

It is built in layers, each importing only those before it:
L{_model <pgtls_twisted.config._model>} (the dataclasses, where each
default is written once), L{_values <pgtls_twisted.config._values>} (the
value parsers), L{_schema <pgtls_twisted.config._schema>} (the tables of
keys, and the rules between them), L{_load <pgtls_twisted.config._load>}
(reading a file, the rules across routes) and
L{_describe <pgtls_twisted.config._describe>} (the summary).
"""

from pgtls_twisted.config._describe import describe_config
from pgtls_twisted.config._load import load_config, parse_config
from pgtls_twisted.config._model import (
    ADMIN_AUTH_METHODS,
    BACKEND_TLS_MODES,
    DEFAULT_CIPHERS,
    LISTENER_TLS_MODES,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_INSTANCE,
    MAX_WORKERS,
    POOL_MODES,
    TLS_VERSIONS,
    AdminConfig,
    BackendConfig,
    ClusterConfig,
    Config,
    ConfigError,
    ListenerConfig,
    MetricsConfig,
    PoolConfig,
    RouteConfig,
    ScramVerifier,
)
from pgtls_twisted.config._values import (
    format_duration,
    parse_address,
    parse_duration,
    read_verifiers,
    secret_file_problem,
)

__all__ = [
    "ADMIN_AUTH_METHODS",
    "BACKEND_TLS_MODES",
    "DEFAULT_CIPHERS",
    "LISTENER_TLS_MODES",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MAX_INSTANCE",
    "MAX_WORKERS",
    "POOL_MODES",
    "TLS_VERSIONS",
    "AdminConfig",
    "BackendConfig",
    "Config",
    "ConfigError",
    "ListenerConfig",
    "ClusterConfig",
    "MetricsConfig",
    "PoolConfig",
    "RouteConfig",
    "ScramVerifier",
    "describe_config",
    "format_duration",
    "load_config",
    "parse_address",
    "parse_config",
    "parse_duration",
    "read_verifiers",
    "secret_file_problem",
]
