"""
pgtls: a protocol-aware TLS-terminating proxy and connection pooler for
PostgreSQL, on Twisted.

Embedding::

    from twisted.application import service
    from pgtls_twisted import load_config, make_service

    application = service.Application("my-app")
    make_service(load_config("routes.toml")).setServiceParent(application)

The package is in layers, each importing only the ones below it:
L{pgtls_twisted.protocol} (pure codecs and state machines),
L{pgtls_twisted.config}, L{pgtls_twisted.tls}, L{pgtls_twisted.proxy} (the
two legs, sessions, the pump, cancels), L{pgtls_twisted.pool},
L{pgtls_twisted.ops} (admin console, metrics, logs) and
L{pgtls_twisted.app} (services, the plugin, workers). Modules whose names
start with an underscore are not API; what is, is listed here and in
L{pgtls_twisted.config}.
"""

from pgtls_twisted._version import __version__
from pgtls_twisted.app._service import ProxyService, make_service
from pgtls_twisted.config import Config, ConfigError, load_config, parse_config
from pgtls_twisted.ops._logs import LogLevels

__all__ = [
    "Config",
    "ConfigError",
    "LogLevels",
    "ProxyService",
    "__version__",
    "load_config",
    "make_service",
    "parse_config",
]
