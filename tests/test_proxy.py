"""
End-to-end: real psycopg clients through pgtls to real PostgreSQL.
"""

from __future__ import annotations

import psycopg
import pytest_twisted
from support.proxy import route, start_proxy
from twisted.internet.threads import deferToThread

from pgtls_twisted.testing.cluster import SCRAM_PASSWORD, SCRAM_USER


@pytest_twisted.ensureDeferred
async def test_verify_full_scram_through_two_tls_legs(pki, pg_tls, tmp_path):
    proxy = start_proxy([route(pki, pg_tls)], tmp_path)
    try:
        dsn = proxy.dsn(
            user=SCRAM_USER,
            password=SCRAM_PASSWORD,
            sslmode="verify-full",
            sslrootcert=pki.cert("ca"),
        )

        def query():
            with psycopg.connect(dsn) as conn:
                return conn.execute(
                    "SELECT ssl, current_user FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE pid = pg_backend_pid()"
                ).fetchone()

        assert await deferToThread(query) == (True, SCRAM_USER)
    finally:
        await proxy.stop()
