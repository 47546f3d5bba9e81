"""Helpers shared by the pooling tests: a pooled route and a client DSN."""

from __future__ import annotations

from typing import Any

from pgtls_twisted.testing.cluster import (
    APP_DB,
    POOL_PASSWORD,
    POOL_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
)
from support.proxy import route


def pooled_route(pki: Any, cluster: Any, mode: str = "transaction", **pool: Any) -> dict[str, Any]:
    """A route in front of C{cluster} pooling as the cluster's service user."""
    table = route(pki, cluster, name=f"pool-{mode}")
    table["pool"] = {
        "mode": mode,
        "service_user": POOL_USER,
        "service_password": POOL_PASSWORD,
        "max_size": 5,
        "acquire_timeout": "10s",
        **pool,
    }
    return table


def dsn(
    proxy: Any,
    pki: Any,
    user: str = SCRAM_USER,
    password: str = SCRAM_PASSWORD,
    dbname: str = APP_DB,
    **extra: Any,
) -> str:
    """A verify-full libpq DSN for a client of the proxy's (first) route."""
    params: dict[str, Any] = dict(
        user=user,
        password=password,
        dbname=dbname,
        sslmode="verify-full",
        sslrootcert=pki.cert("ca"),
        connect_timeout=10,
    )
    params.update(extra)
    return str(proxy.dsn(**params))
