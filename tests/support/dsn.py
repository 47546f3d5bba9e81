"""
libpq connection strings for clients of the proxy under test.

A client connects to C{localhost} (the name the suite's server certificate
carries) and, unless a test says otherwise, as a careful user would: the
SCRAM user of L{pgtls_twisted.testing.cluster}, C{sslmode=verify-full}
against the suite's CA, and a connect timeout, so that a proxy that never
answers fails the test rather than hanging it.
"""

from __future__ import annotations

from typing import Any, Protocol

from pgtls_twisted.testing.cluster import APP_DB, SCRAM_PASSWORD, SCRAM_USER
from pgtls_twisted.testing.pki import PKI


class Listening(Protocol):
    """A proxy whose routes listen on ports (L{support.proxy.RunningProxy})."""

    def port(self, name: str | None = None) -> int: ...


def dsn(port: int, **params: Any) -> str:
    """
    A connection string to C{localhost:port}, database C{postgres} unless
    C{params} say otherwise; parameters given as C{None} are left out.
    """
    merged: dict[str, Any] = {"host": "localhost", "port": port, "dbname": "postgres"}
    merged.update(params)
    return " ".join(f"{k}={v}" for k, v in merged.items() if v is not None)


def client_params(pki: PKI, **extra: Any) -> dict[str, Any]:
    """A careful client's parameters (see the module docstring), updated with C{extra}."""
    params: dict[str, Any] = dict(
        user=SCRAM_USER,
        password=SCRAM_PASSWORD,
        sslmode="verify-full",
        sslrootcert=pki.cert("ca"),
        connect_timeout=10,
    )
    params.update(extra)
    return params


def client_dsn(at: int | Listening, pki: PKI, name: str | None = None, **extra: Any) -> str:
    """
    A careful client's connection string to port C{at}, or to route
    C{name} (the first if C{None}) of the proxy C{at}.
    """
    port = at if isinstance(at, int) else at.port(name)
    return dsn(port, **client_params(pki, **extra))


def app_dsn(at: int | Listening, pki: PKI, name: str | None = None, **extra: Any) -> str:
    """L{client_dsn} on the clusters' application database, C{APP_DB}."""
    return client_dsn(at, pki, name, **{"dbname": APP_DB, **extra})


def admin_dsn(at: int | Listening, pki: PKI, name: str | None = None, **extra: Any) -> str:
    """L{client_dsn} on the admin console (database C{pgtls}) of C{name}'s listener."""
    return client_dsn(at, pki, name, **{"dbname": "pgtls", **extra})
