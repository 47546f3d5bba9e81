"""
A configuration described in words, for C{pgtls check}: seeing the effective
defaults (above all the TLS policy on each side) is how a user catches a
configuration that is valid but not what they meant.
"""

from __future__ import annotations

from pgtls_twisted.config._model import Config, RouteConfig
from pgtls_twisted.config._values import _show, format_duration

__all__ = ["describe_config"]

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
    if be.keepalives:
        idle = format_duration(be.keepalives_idle) if be.keepalives_idle else "the system's idle"
        alive = f"keepalives after {idle}"
    else:
        alive = "no keepalives"
    unacked = (
        format_duration(be.tcp_user_timeout) if be.tcp_user_timeout else "the system's timeout"
    )
    lines.append(
        f"             connect timeout {format_duration(be.connect_timeout)};"
        f" {alive}; unacknowledged data dropped after {unacked}"
    )
    pool = route.pool
    if pool is None:
        lines.append("  pooling    none (1:1 pass-through)")
    else:
        if pool.identity == "service":
            who = f"as {pool.service_user} ({pool.password_source or 'no password'})"
        else:
            ttl = format_duration(pool.auth_cache_ttl) if pool.auth_cache_ttl else "off"
            who = f"as each client's own role (login cache {ttl})"
        lines.append(
            f"  pooling    {pool.mode} mode {who},"
            f" {pool.min_size}..{pool.max_size} connections per"
            f" {'database' if pool.identity == 'service' else '(user, database)'},"
            f" wait {format_duration(pool.acquire_timeout)}"
        )
        shared = [
            f"{value} per {scope}"
            for scope, value in (
                ("database", pool.max_db_connections),
                ("user", pool.max_user_connections),
            )
            if value
        ]
        if shared:
            lines.append(f"             connections across pools: at most {', '.join(shared)}")
        if pool.mode == "transaction":
            prepared = (
                f"up to {pool.max_prepared_statements} prepared statements per connection"
                if pool.max_prepared_statements
                else "named prepared statements pin"
            )
            lines.append(f"             session state: {pool.pinning}; {prepared}")
        timeouts = [
            f"{key} {format_duration(value)}"
            for key, value in (
                ("client_idle", pool.client_idle_timeout),
                ("idle_transaction", pool.idle_transaction_timeout),
                ("query", pool.query_timeout),
            )
            if value
        ]
        if timeouts:
            lines.append(f"             timeouts: {', '.join(timeouts)}")
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
    if config.cluster is not None:
        cluster = config.cluster
        others = [
            f"{n} at {address}"
            for n, address in enumerate(cluster.peers, 1)
            if n != cluster.instance
        ]
        lines.append(
            f"cluster    instance {cluster.instance};"
            f" cancels passed to {', '.join(others) if others else 'no peers'}"
        )
    for route in config.routes:
        lines.append("")
        lines.extend(_describe_route(route))
    return "\n".join(lines) + "\n"
