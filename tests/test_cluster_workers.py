"""
Cancels across instances with workers (issue 15, item 2), as users run
it: two C{twist pgtls} instances with C{workers = 2} and one C{[cluster]}
peers list, behind Debian's HAProxy with PROXY protocol v2
(L{support.balancer}). Sessions are opened while HAProxy sends everything
to instance 1; then instance 1 is put in maintenance, so every cancel's
new connection (libpq's plaintext PQcancel, psycopg's C{cancel()}: the
balancer and pgtls are other processes here) reaches instance 2, which
passes it to instance 1, where it may land on either worker and is
relayed to the one that owns the session: every query is cancelled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
from support.admin import http_get
from support.balancer import HAProxy, make_instance
from support.dsn import app_dsn
from support.proxy import route
from support.supervised import Scrape, cancel_all
from support.waiting import eventually

from pgtls_twisted.testing.pki import PKI

CANCELED = "canceling statement due to user request"
SESSIONS = 6


def scrape(instance: Any) -> Scrape:
    return Scrape(http_get(instance.metrics_port, "/metrics")[2])


def test_cancels_reach_the_worker_of_another_instance(
    pki: PKI, pg_tls: Any, tmp_path: Path
) -> None:
    one, two = (
        make_instance(name, tmp_path / name, route(pki, pg_tls), workers=2, log_level="info")
        for name in ("one", "two")
    )
    peers = [f"127.0.0.1:{one.port}", f"127.0.0.1:{two.port}"]
    for number, instance in enumerate((one, two), 1):
        instance.top["cluster"] = {"instance": number, "peers": peers}
    balancer = None
    sessions: list[psycopg.Connection] = []
    try:
        for instance in (one, two):
            instance.start()
        balancer = HAProxy(tmp_path / "haproxy", [one, two])
        balancer.wait_status("one", "UP")
        balancer.wait_status("two", "UP")

        # Every session on instance 1 ...
        balancer.command("set server pgtls/two state maint")
        dsn = app_dsn(balancer.port, pki)
        sessions = [psycopg.connect(dsn, autocommit=True) for _ in range(SESSIONS)]
        assert scrape(one).total("pgtls_client_connections_accepted_total") >= SESSIONS
        # ... and every cancel on instance 2.
        balancer.command("set server pgtls/two state ready")
        balancer.wait_status("two", "UP")
        balancer.command("set server pgtls/one state maint")

        cancel_all(sessions)

        def outcomes(instance: Any) -> dict[str, float]:
            found = scrape(instance).find("pgtls_cancel_requests_total")
            totals: dict[str, float] = {}
            for sample in found:
                outcome = sample.labels["outcome"]
                totals[outcome] = totals.get(outcome, 0) + sample.value
            return {k: v for k, v in totals.items() if v}

        # Instance 2 passed every one on; instance 1 forwarded every one to
        # its server, after relaying those that reached the other worker.
        eventually(lambda: outcomes(one).get("forwarded") == SESSIONS, 10, "instance 1's count")
        assert outcomes(two) == {"peer": SESSIONS}
        assert set(outcomes(one)) <= {"forwarded", "relayed"}, outcomes(one)
        assert one.process.log().count("cancel request forwarded to route=") == SESSIONS

    finally:
        for conn in sessions:
            conn.close()
        if balancer is not None:
            balancer.close()
        one.close()
        two.close()
