"""
Prometheus metrics (issue #5, item 2): real clients do things to an
in-process proxy, then C{/metrics} is scraped over HTTP and parsed with
prometheus_client's own parser, and each series is checked (per route,
with the C{worker="0"} label) against what the clients did.
"""

from __future__ import annotations

import time

import psycopg
import pytest
import pytest_twisted
from support import rawclient
from support.admin import Scrape, health, metrics_port, scrape, show
from support.configfile import write_config
from support.dsn import admin_dsn, app_dsn, client_dsn
from support.net import free_port, refused
from support.pooling import pooled_route
from support.proxy import route, start_from_file, start_proxy
from support.waiting import in_thread, sleep, until
from twisted.internet.threads import deferToThread

from pgtls_twisted.testing.cluster import (
    APP_DB,
    MD5_PASSWORD,
    MD5_USER,
    SCRAM_USER,
)

METRICS = {"bind_address": "127.0.0.1:0"}
POOLED = "pool-transaction"
REASONS = (
    "tls_required",
    "handshake_failure",
    "client_certificate",
    "limit",
    "protocol",
    "startup_timeout",
    "shutdown",
    "admin_denied",
)


def connect(dsn: str) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True)


def connect_error(dsn: str) -> str:
    """(Blocking.) The error text of a connection attempt that must fail."""
    try:
        psycopg.connect(dsn).close()
    except psycopg.OperationalError as e:
        return str(e)
    raise AssertionError(f"connected: {dsn}")


async def scrape_until(proxy, check, timeout: float = 5.0) -> Scrape:
    """
    Scrape until C{check(scrape)} holds (counts of closing connections lag
    a little); the last page either way, for the caller's assertions.
    """
    pages: list[Scrape] = []

    async def holds() -> bool:
        pages.append(await scrape(proxy))
        return bool(check(pages[-1]))

    await until(holds, timeout, interval=0.1, fail=False)
    return pages[-1]


@pytest_twisted.ensureDeferred
async def test_metrics_page_is_prometheus_text(pki, pg_tls, tmp_path):
    proxy = start_proxy([route(pki, pg_tls)], tmp_path, metrics=METRICS)
    try:
        page = await scrape(proxy)
        # Every series of the issue is there from the start, at zero.
        for name in (
            "pgtls_client_connections_accepted",
            "pgtls_client_connections_active",
            "pgtls_client_connections_refused",
            "pgtls_process_resident_memory_bytes",
        ):
            assert name in page.families, name
        assert page.value("pgtls_client_connections_accepted_total", route="app") == 0
        assert page.value("pgtls_client_connections_active", route="app") == 0
        for reason in REASONS:
            assert (
                page.value("pgtls_client_connections_refused_total", route="app", reason=reason)
                == 0
            )
        assert page.value("pgtls_process_resident_memory_bytes") > 1_000_000
        assert page.value("pgtls_process_start_time_seconds") <= time.time()
        # No "_created" series.
        assert "_created" not in page.text
        # Every series carries the worker label.
        assert all(s.labels.get("worker") == "0" for s in page.samples)
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_connections_tls_and_bytes(pki, pg_tls, tmp_path):
    proxy = start_proxy([route(pki, pg_tls)], tmp_path, metrics=METRICS)
    try:
        dsn = client_dsn(proxy, pki, "app")
        tls12 = client_dsn(proxy, pki, "app", ssl_max_protocol_version="TLSv1.2")
        conns = [await in_thread(connect, d) for d in (dsn, dsn, tls12)]
        for conn in conns:
            await in_thread(conn.execute, "SELECT 1")
        page = await scrape(proxy)
        assert page.value("pgtls_client_connections_accepted_total", route="app") == 3
        assert page.value("pgtls_client_connections_active", route="app") == 3
        handshakes = {
            (s.labels["protocol"], s.labels["cipher"]): s.value
            for s in page.find("pgtls_tls_handshakes_total", route="app")
        }
        assert handshakes.pop(("TLSv1.3", "TLS_AES_256_GCM_SHA384")) == 2
        ((protocol, cipher), count) = handshakes.popitem()
        assert (protocol, count) == ("TLSv1.2", 1) and cipher.startswith("ECDHE-"), cipher
        assert page.value("pgtls_tls_handshake_seconds_count", route="app") == 3
        assert page.value("pgtls_tls_handshake_seconds_sum", route="app") > 0
        assert page.value("pgtls_backend_connect_seconds_count", route="app") == 3
        received = page.value("pgtls_client_received_bytes_total", route="app")
        sent = page.value("pgtls_client_sent_bytes_total", route="app")
        assert received > 0 and sent > 0

        # A 100 kB answer is 100 kB more sent; its query is a few bytes received.
        sql = "SELECT repeat('x', 100000)"
        await in_thread(conns[0].execute, sql)
        page = await scrape(proxy)
        more_sent = page.value("pgtls_client_sent_bytes_total", route="app") - sent
        more_received = page.value("pgtls_client_received_bytes_total", route="app") - received
        assert 100_000 < more_sent < 101_000
        assert more_received == 5 + len(sql) + 1

        # Closed connections leave the gauge, and their bytes stay counted.
        before = page
        for conn in conns:
            await in_thread(conn.close)
        page = await scrape_until(
            proxy, lambda p: p.value("pgtls_client_connections_active", route="app") == 0
        )
        assert page.value("pgtls_client_connections_active", route="app") == 0
        assert page.value("pgtls_client_connections_accepted_total", route="app") == 3
        for name in ("pgtls_client_sent_bytes_total", "pgtls_client_received_bytes_total"):
            assert page.value(name, route="app") >= before.value(name, route="app"), name
    finally:
        await proxy.stop()


def garbage_after_ssl_request(port: int) -> bytes:
    """(Blocking.) SSLRequest, 'S', then bytes that are not TLS: what comes back before the close."""
    sock = rawclient.connect(port)
    try:
        sock.sendall(rawclient.SSL_REQUEST)
        assert rawclient.recv_exact(sock, 1) == b"S"
        sock.sendall(b"\x16\x03\x01\x00\x05hello" + b"GET / HTTP/1.0\r\n\r\n")
        return rawclient.read_until_close(sock)
    finally:
        sock.close()


def bad_length(port: int) -> bytes:
    """(Blocking.) A startup packet claiming 3 bytes: what comes back before the close."""
    sock = rawclient.connect(port)
    try:
        sock.sendall(rawclient.length_word(3, b"\0\0\0\0"))
        return rawclient.read_until_close(sock)
    finally:
        sock.close()


def silent(port: int) -> bytes:
    """(Blocking.) Connect, say nothing, wait for pgtls to give up."""
    sock = rawclient.connect(port)
    try:
        return rawclient.read_until_close(sock)
    finally:
        sock.close()


def hold_and_refuse(dsn: str) -> str:
    """(Blocking.) One client holds the only slot; the error a second one gets."""
    with connect(dsn):
        return connect_error(dsn)


@pytest_twisted.ensureDeferred
async def test_refusals_by_reason(pki, pg_tls, tmp_path):
    mtls = {"mtls": True, "client_ca": str(pki.cert("client_ca"))}
    proxy = start_proxy(
        [
            route(pki, pg_tls),
            route(pki, pg_tls, name="limited", listener={"max_clients": 1}),
            route(pki, pg_tls, name="mtls", listener=mtls),
            route(pki, pg_tls, name="slow", listener={"startup_timeout": "0.3s"}),
        ],
        tmp_path,
        metrics=METRICS,
        admin={"auth": "backend", "users": [SCRAM_USER]},
    )
    try:
        expected = {
            ("app", "tls_required"): 1,
            ("app", "handshake_failure"): 2,
            ("app", "admin_denied"): 1,
            ("limited", "limit"): 1,
            ("mtls", "client_certificate"): 1,
            ("app", "protocol"): 1,
            ("slow", "startup_timeout"): 1,
        }
        # tls_required: a plaintext client on a "require" listener.
        text = await in_thread(connect_error, client_dsn(proxy, pki, "app", sslmode="disable"))
        assert "requires TLS" in text
        # handshake_failure: a client that does not trust pgtls's certificate...
        text = await in_thread(
            connect_error, client_dsn(proxy, pki, "app", sslrootcert=pki.cert("other_ca"))
        )
        assert "certificate verify failed" in text
        # ...and one that sends garbage instead of a ClientHello.
        await in_thread(garbage_after_ssl_request, proxy.port("app"))
        # admin_denied: a user not in admin.users opening the console.
        text = await in_thread(
            connect_error,
            admin_dsn(proxy, pki, "app", user=MD5_USER, password=MD5_PASSWORD),
        )
        assert "password authentication failed" in text
        # limit: max_clients = 1 and one client connected.
        text = await in_thread(hold_and_refuse, client_dsn(proxy, pki, "limited"))
        assert "too many clients" in text
        # client_certificate: mtls without a certificate.
        text = await in_thread(connect_error, client_dsn(proxy, pki, "mtls"))
        assert "requires a valid client certificate" in text

        # protocol: an impossible startup packet length.
        await in_thread(bad_length, proxy.port("app"))
        # startup_timeout: a client that connects and says nothing.
        await in_thread(silent, proxy.port("slow"))

        def refused(page, name, reason):
            return page.value("pgtls_client_connections_refused_total", route=name, reason=reason)

        page = await scrape_until(
            proxy, lambda p: all(refused(p, *key) == n for key, n in expected.items())
        )
        for name in ("app", "limited", "mtls", "slow"):
            for reason in REASONS:
                assert refused(page, name, reason) == expected.get((name, reason), 0), (
                    name,
                    reason,
                )
        # Refused connections were accepted first.
        assert page.value("pgtls_client_connections_accepted_total", route="app") == 5
        assert page.value("pgtls_client_connections_accepted_total", route="limited") == 2
        assert page.value("pgtls_client_connections_accepted_total", route="mtls") == 1
        # The handshakes that failed are not counted as handshakes.
        assert page.get("pgtls_tls_handshake_seconds_count", route="app") == 1  # the admin
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_backend_connect_failures(pki, pg_tls, tmp_path):
    down = route(pki, pg_tls, name="down", backend={"address": f"127.0.0.1:{free_port()}"})
    proxy = start_proxy([route(pki, pg_tls), down], tmp_path, metrics=METRICS)
    try:
        for _ in range(2):
            text = await in_thread(connect_error, client_dsn(proxy, pki, "down"))
            assert "Connection refused" in text or "connection refused" in text
        await in_thread(lambda: connect(client_dsn(proxy, pki, "app")).close())
        page = await scrape(proxy)
        assert (
            page.value("pgtls_backend_connect_failures_total", route="down", reason="refused") == 2
        )
        assert page.get("pgtls_backend_connect_seconds_count", route="down") == 0
        assert page.find("pgtls_backend_connect_failures_total", route="app") == []
        assert page.value("pgtls_backend_connect_seconds_count", route="app") == 1
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_cancel_requests_by_outcome(pki, pg_tls, tmp_path):
    proxy = start_proxy([route(pki, pg_tls)], tmp_path, metrics=METRICS)
    try:
        conn = await in_thread(connect, client_dsn(proxy, pki, "app"))

        def slow():
            try:
                conn.execute("SELECT pg_sleep(20)")
            except psycopg.errors.QueryCanceled:
                return "cancelled"
            return "finished"

        running = deferToThread(slow)
        await sleep(0.5)
        await in_thread(conn.cancel_safe)
        assert await running == "cancelled"

        def bogus_cancel():
            sock = rawclient.connect(proxy.port("app"))
            try:
                sock.sendall(rawclient.cancel_request(12345, b"\0\1\2\3"))
                return rawclient.read_until_close(sock)
            finally:
                sock.close()

        assert await in_thread(bogus_cancel) == b""
        page = await scrape_until(
            proxy,
            lambda p: p.get("pgtls_cancel_requests_total", route="app", outcome="ignored") == 1,
        )
        assert page.value("pgtls_cancel_requests_total", route="app", outcome="forwarded") == 1
        assert page.value("pgtls_cancel_requests_total", route="app", outcome="ignored") == 1
        await in_thread(conn.close)
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_pool_metrics(pki, pg_tls, tmp_path):
    proxy = start_proxy(
        [pooled_route(pki, pg_tls, max_size=1)],
        tmp_path,
        metrics=METRICS,
        admin={"auth": "backend", "users": [SCRAM_USER]},
    )
    labels = {"route": POOLED, "database": APP_DB}
    try:
        dsn = app_dsn(proxy, pki, POOLED)
        holder = await in_thread(connect, dsn)
        waiter = await in_thread(connect, dsn)
        for n in range(3):
            await in_thread(holder.execute, "SELECT %s::int", (n,))
        page = await scrape(proxy)
        assert page.value("pgtls_pool_transaction_seconds_count", **labels) == 3
        assert page.value("pgtls_pool_query_seconds_count", **labels) == 3
        assert page.value("pgtls_pool_wait_seconds_count", **labels) == 3
        assert page.value("pgtls_pool_clients", **labels) == 2
        assert page.value("pgtls_pool_clients_waiting", **labels) == 0
        states = {
            s.labels["state"]: s.value for s in page.find("pgtls_pool_server_connections", **labels)
        }
        assert states == {"active": 0, "idle": 0, "used": 1, "login": 0}

        # One client holds the only server in a transaction; the other queues.
        await in_thread(holder.execute, "BEGIN")
        await in_thread(holder.execute, "SELECT 1")
        queued = deferToThread(lambda: waiter.execute("SELECT 42").fetchone())
        page = await scrape_until(
            proxy, lambda p: p.value("pgtls_pool_clients_waiting", **labels) == 1
        )
        assert page.value("pgtls_pool_clients_waiting", **labels) == 1
        assert page.value("pgtls_pool_server_connections", state="active", **labels) == 1
        assert page.value("pgtls_pool_server_connections", state="used", **labels) == 0
        await sleep(0.5)
        await in_thread(holder.execute, "COMMIT")
        assert await queued == (42,)

        page = await scrape(proxy)
        assert page.value("pgtls_pool_clients_waiting", **labels) == 0
        # 3 + (BEGIN; SELECT; COMMIT) + the waiter's one.
        assert page.value("pgtls_pool_transaction_seconds_count", **labels) == 5
        assert page.value("pgtls_pool_query_seconds_count", **labels) == 7
        assert page.value("pgtls_pool_wait_seconds_count", **labels) == 5
        # The waiter waited for the whole transaction: at least half a second.
        assert page.value("pgtls_pool_wait_seconds_sum", **labels) >= 0.5
        long_waits = page.value("pgtls_pool_wait_seconds_bucket", le="+Inf", **labels) - (
            page.value("pgtls_pool_wait_seconds_bucket", le="0.25", **labels)
        )
        assert long_waits == 1
        assert page.value("pgtls_pool_transaction_seconds_sum", **labels) >= 0.5

        # The admin console's SHOW STATS agrees.
        _, rows = await show(admin_dsn(proxy, pki, POOLED), "STATS")
        (row,) = [r for r in rows if r["route"] == POOLED]
        assert (row["total_xact_count"], row["total_query_count"]) == ("5", "7")
        assert int(row["total_wait_time"]) >= 500_000
        await in_thread(holder.close)
        await in_thread(waiter.close)
        page = await scrape_until(proxy, lambda p: p.value("pgtls_pool_clients", **labels) == 0)
        assert page.value("pgtls_pool_clients", **labels) == 0
    finally:
        await proxy.stop()


@pytest.mark.parametrize("path", ["/", "/other"])
@pytest_twisted.ensureDeferred
async def test_only_metrics_is_served(pki, pg_tls, tmp_path, path):
    import urllib.error
    import urllib.request

    proxy = start_proxy([route(pki, pg_tls)], tmp_path, metrics=METRICS)
    try:
        url = f"http://127.0.0.1:{metrics_port(proxy)}{path}"

        def fetch():
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    return response.status
            except urllib.error.HTTPError as e:
                return e.code

        assert await in_thread(fetch) == 404
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_reload_moves_the_metrics_endpoint(pki, pg_tls, tmp_path):

    path = tmp_path / "pgtls.toml"
    routes = [route(pki, pg_tls)]
    admin = {"auth": "backend", "users": [SCRAM_USER]}
    write_config(path, routes, admin=admin, metrics=METRICS)
    proxy = start_from_file(path)
    try:
        old = metrics_port(proxy)
        await in_thread(lambda: connect(client_dsn(proxy, pki, "app")).close())
        assert (await scrape(old)).value(
            "pgtls_client_connections_accepted_total", route="app"
        ) == 1
        new = free_port()
        write_config(path, routes, admin=admin, metrics={"bind_address": f"127.0.0.1:{new}"})
        admin_conn = await in_thread(connect, admin_dsn(proxy, pki, "app"))
        notices = []
        admin_conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        await in_thread(admin_conn.execute, "RELOAD")
        assert "metrics endpoint changed" in notices
        # The same counters, now on the new address only.
        page = await scrape(new)
        assert page.value("pgtls_client_connections_accepted_total", route="app") == 2
        assert await until(lambda: in_thread(refused, old), fail=False), (
            "old metrics port still open"
        )
        await in_thread(admin_conn.close)
    finally:
        await proxy.stop()


@pytest.mark.allow_logged_errors
@pytest_twisted.ensureDeferred
async def test_reload_to_a_busy_metrics_port_changes_nothing(pki, pg_tls, tmp_path):
    import socket

    path = tmp_path / "pgtls.toml"
    admin = {"auth": "backend", "users": [SCRAM_USER]}
    write_config(path, [route(pki, pg_tls)], admin=admin, metrics=METRICS)
    proxy = start_from_file(path)
    busy = socket.socket()
    try:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = busy.getsockname()[1]
        before = metrics_port(proxy)
        write_config(
            path,
            [route(pki, pg_tls), route(pki, pg_tls, name="extra")],
            admin=admin,
            metrics={"bind_address": f"127.0.0.1:{taken}"},
        )

        def reload():
            with connect(admin_dsn(proxy, pki, "app")) as conn:
                try:
                    conn.execute("RELOAD")
                except psycopg.Error as e:
                    return (e.sqlstate, e.diag.message_primary, e.diag.message_detail)
            return None

        def show_routes():
            with connect(admin_dsn(proxy, pki, "app")) as conn:
                return sorted(r[0] for r in conn.execute("SHOW ROUTES").fetchall())

        error = await in_thread(reload)
        routes = await in_thread(show_routes)
        # Like any reload that cannot be applied: an error, and nothing changed.
        assert error is not None and error[0] == "F0000", error
        assert str(taken) in (error[2] or ""), error
        assert routes == ["app"]
        page = await scrape(before)
        assert page.value("pgtls_client_connections_accepted_total", route="app") == 2
    finally:
        busy.close()
        await proxy.stop()


def stuffed_ssl_request(port: int) -> bytes:
    """(Blocking.) An SSLRequest with plaintext bytes right behind it (CVE-2021-23214)."""
    sock = rawclient.connect(port)
    try:
        sock.sendall(rawclient.SSL_REQUEST + rawclient.startup_message(SCRAM_USER))
        return rawclient.read_until_close(sock)
    finally:
        sock.close()


def ssl_request_inside_tls(port: int, ca) -> bytes:
    """(Blocking.) A second SSLRequest inside TLS: what comes back before the close."""
    sock = rawclient.request_tls(rawclient.connect(port), ca)
    try:
        sock.sendall(rawclient.SSL_REQUEST)
        return rawclient.read_until_close(sock)
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_every_protocol_refusal_is_counted(pki, pg_tls, tmp_path):
    proxy = start_proxy([route(pki, pg_tls)], tmp_path, metrics=METRICS)
    try:
        answer = await in_thread(stuffed_ssl_request, proxy.port("app"))
        assert answer.startswith(b"S") or b"08P01" in answer, answer
        answer = await in_thread(ssl_request_inside_tls, proxy.port("app"), pki.cert("ca"))
        page = await scrape_until(
            proxy,
            lambda p: p.value("pgtls_client_connections_active", route="app") == 0,
        )
        assert page.value("pgtls_client_connections_accepted_total", route="app") == 2
        assert (
            page.value("pgtls_client_connections_refused_total", route="app", reason="protocol")
            == 2
        )
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_health_turns_unhealthy_when_a_drain_begins(pki, pg_tls, tmp_path):
    """
    C{/health} is 200 while the proxy takes clients, and 503 from the start
    of a graceful shutdown while sessions still run (issue 15: a balancer
    stops sending new clients), until the process is gone.
    """
    proxy = start_proxy([route(pki, pg_tls)], tmp_path, metrics=METRICS, shutdown_timeout="10s")
    conn = None
    try:
        assert await health(proxy) == (200, "ok\n")
        conn = await in_thread(connect, client_dsn(proxy, pki))
        stopping = proxy.service.stopService()
        assert await health(proxy) == (503, "draining\n")
        # The session already open goes on meanwhile.
        assert await in_thread(lambda: conn.execute("SELECT 1").fetchone()) == (1,)
        await in_thread(conn.close)
        conn = None
        await stopping
    finally:
        if conn is not None:
            await in_thread(conn.close)
        await proxy.stop()
