"""
pgtls: a protocol-aware TLS-terminating proxy for PostgreSQL, on Twisted.

Embedding::

    from pgtls_twisted import load_config

    from pgtls_twisted import make_service
    make_service(load_config("routes.toml")).setServiceParent(application)

Where a byte goes, by module: L{frontend} (client leg: SSLRequest, TLS,
startup packet), L{session} (startup and authentication between the legs),
L{backend} (backend leg: SSLRequest, TLS, verification), L{pump}
(pass-through after startup), L{cancel} (CancelRequest), L{wire} (the
codec), L{tlsconfig} (TLS policy), L{route}/L{service} (listeners).
"""

from pgtls_twisted._version import __version__
from pgtls_twisted.app._service import make_service
from pgtls_twisted.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "__version__", "load_config", "make_service"]
