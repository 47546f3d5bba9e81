"""
Issue 10, item 3: nothing is created for a client that has not logged in.

Before the fix, a pooled client that merely named a database got a pool,
metric series and a C{SHOW STATS} row for it, before any password: twenty
connections naming random 2 KB database names grew C{/metrics} by
megabytes for good, and with C{min_size > 0} the reaper opened service-user
connections to those names.
"""

from __future__ import annotations

import random
import string

import pytest_twisted
from support import rawclient
from support.admin import scrape
from support.dsn import app_dsn
from support.pooling import pooled_route
from support.proxy import start_proxy
from support.waiting import in_thread, sleep

from pgtls_twisted.testing.cluster import APP_DB, SCRAM_USER

METRICS = {"bind_address": "127.0.0.1:0"}


def made_up_login(port: int, ca: str, database: str) -> str | None:
    """(Blocking.) A wrong password for a database name nobody has: the SQLSTATE."""
    sock = rawclient.request_tls(rawclient.connect(port), ca)
    try:
        rawclient.startup_cleartext(sock, SCRAM_USER, "wrong password", database=database)
    except rawclient.ServerError as e:
        return e.fields.get("C")
    finally:
        sock.close()
    return None


@pytest_twisted.ensureDeferred
async def test_unauthenticated_names_create_nothing(pki, pg_tls, tmp_path):
    table = pooled_route(pki, pg_tls, min_size=1, idle_timeout="1s")
    proxy = start_proxy([table], tmp_path, metrics=METRICS)
    try:
        route = proxy.route()
        # One failed login first: the route's own series (handshakes,
        # backend connects) exist from then on, whatever the names.
        await in_thread(made_up_login, proxy.port(), str(pki.cert("ca")), "first")
        before = len((await scrape(proxy)).text)
        names = ["".join(random.choices(string.ascii_lowercase, k=2048)) for _ in range(20)]
        for name in names:
            code = await in_thread(made_up_login, proxy.port(), str(pki.cert("ca")), name)
            assert code == "28P01"
        await sleep(0.5)
        assert route.pools.pools == {}
        page = (await scrape(proxy)).text
        assert not any(name in page for name in names)
        assert len(page) < before + 200, (before, len(page))
        stats = route.metrics.stats[route.name]
        assert not set(names) & (set(stats.databases) | set(stats.closedBytes))
        # A real login still gets its pool and its series.
        import psycopg

        def work() -> None:
            with psycopg.connect(app_dsn(proxy, pki)) as conn:
                conn.execute("SELECT 1")

        await in_thread(work)
        assert set(route.pools.pools) == {APP_DB}
        assert f'database="{APP_DB}"' in (await scrape(proxy)).text
    finally:
        await proxy.stop()


def test_database_labels_are_capped_and_freed() -> None:
    from twisted.internet.task import Clock

    from pgtls_twisted.ops._metrics import MAX_DATABASE_LABELS, OTHER_DATABASES, Metrics

    metrics = Metrics(clock=Clock())
    names = [f"db{i}" for i in range(MAX_DATABASE_LABELS + 20)]
    for name in names:
        metrics.pooled("r", name).transactionDone(0.001)
    rows = metrics.stats["r"].databases
    assert len(rows) == MAX_DATABASE_LABELS + 1
    assert rows[OTHER_DATABASES][0] == 20
    text = metrics.text().decode()
    assert 'database="db0"' in text and f'database="{OTHER_DATABASES}"' in text
    assert f'database="db{MAX_DATABASE_LABELS}"' not in text
    # A dropped pool takes its series and row along, and frees its label.
    metrics.poolDropped("r", "db0")
    assert "db0" not in metrics.stats["r"].databases
    assert 'database="db0"' not in metrics.text().decode()
    assert metrics.databaseLabel("r", "newcomer") == "newcomer"
    assert metrics.databaseLabel("r", "another") == OTHER_DATABASES
    # "(other)" itself is never dropped.
    metrics.poolDropped("r", f"db{MAX_DATABASE_LABELS + 5}")
    assert OTHER_DATABASES in metrics.stats["r"].databases


def test_a_clock_stepping_back_records_no_negative_duration() -> None:
    """Durations are wall-clock differences; a step backwards records 0, not less."""
    from twisted.internet.task import Clock

    from pgtls_twisted.ops._metrics import Metrics

    metrics = Metrics(clock=Clock())
    figures = metrics.pooled("r", "db")
    figures.waited(-5.0)
    figures.queryDone(-1.0)
    figures.transactionDone(-1.0)
    metrics.handshakeDone("r", -2.0, "TLSv1.3", "x")
    metrics.backendConnected("r", -2.0)
    assert metrics.stats["r"].databases["db"] == [1, 1, 0, 0, 0]
    text = metrics.text().decode()
    assert "-" not in "".join(line.split()[-1] for line in text.splitlines() if "_sum{" in line)
