"""Helpers shared by the pooling tests: a pooled route."""

from __future__ import annotations

from typing import Any

from pgtls_twisted.testing.cluster import POOL_PASSWORD, POOL_USER
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
