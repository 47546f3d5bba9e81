"""
Helpers for the operations tests (admin console, metrics): a proxy with
the console on, psql and psycopg against the console, and scraping
C{/metrics}.

psql runs as a subprocess (L{getProcessOutputAndValue}) and psycopg and
urllib in threads, so the in-process proxy keeps answering meanwhile.
"""

from __future__ import annotations

import csv
import io
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue

from pgtls_twisted.testing.cluster import SCRAM_USER
from pgtls_twisted.testing.pki import PKI
from support import rawclient
from support.pooling import pooled_route
from support.proxy import RunningProxy, route, start_proxy

#: The name of the transaction-pooled route L{start} adds.
POOLED = "pool-transaction"

# ---------------------------------------------------------------------------
# The admin console


def connect(dsn: str) -> psycopg.Connection:
    """(Blocking.) An autocommit psycopg connection."""
    return psycopg.connect(dsn, autocommit=True)


def start(
    pki: PKI, cluster: Any, tmp_path: Path, *, pool: dict[str, Any] | None = None, **top: Any
) -> RunningProxy:
    """A pass-through route "app" and a transaction-pooled route, with the console on."""
    top.setdefault("admin", {"auth": "backend", "users": [SCRAM_USER]})
    return start_proxy(
        [route(pki, cluster), pooled_route(pki, cluster, **(pool or {}))], tmp_path, **top
    )


def raw_admin_login(
    port: int, ca: Path | str, user: str, password: str, **tls: Any
) -> dict[str, str] | None:
    """(Blocking.) Log in to the console with the raw client: the server error's fields, or None."""
    sock = rawclient.request_tls(rawclient.connect(port), ca, **tls)
    try:
        rawclient.startup_cleartext(sock, user, password, database="pgtls")
    except rawclient.ServerError as e:
        return e.fields
    finally:
        sock.close()
    return None


async def psql(dsn: str, *commands: str, csv_output: bool = True) -> tuple[str, str, int]:
    """
    Run psql with one C{-c} per command (one session for all of them);
    stdout, stderr (notices and errors) and the exit status.
    """
    args = [dsn, "-X", "-q"]
    if csv_output:
        args.append("--csv")
    for command in commands:
        args += ["-c", command]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    out, err, code = await getProcessOutputAndValue("psql", args, env=env, reactor=reactor)
    return out.decode(), err.decode(), code


async def show(dsn: str, what: str) -> tuple[list[str], list[dict[str, str]]]:
    """C{SHOW what} through psql: the column names and the rows as dicts."""
    out, err, code = await psql(dsn, f"SHOW {what}")
    assert code == 0, (what, err)
    rows = list(csv.reader(io.StringIO(out)))
    assert rows, (what, out, err)
    header = rows[0]
    return header, [dict(zip(header, row, strict=True)) for row in rows[1:]]


def query(dsn: str, sql: str, params: Any = None) -> tuple[list[str], list[tuple[Any, ...]]]:
    """(Blocking: run in a thread.) One statement on a new psycopg connection."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        columns = [d.name for d in cur.description] if cur.description else []
        return columns, cur.fetchall() if cur.description else []


# ---------------------------------------------------------------------------
# /metrics


def metrics_port(proxy: RunningProxy) -> int:
    """
    Where the in-process proxy serves C{/metrics}. There is no public
    accessor: this reads L{ProxyService}'s private metrics service.
    """
    port = proxy.service.metricsPort()
    assert port is not None, "/metrics is not served"
    return port


class Scrape:
    """One parsed C{/metrics} page."""

    def __init__(self, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def find(self, name: str, **labels: str) -> list[Any]:
        """The samples called C{name} whose labels include C{labels}."""
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        """The one sample C{name} with exactly these labels plus worker="0"."""
        labels.setdefault("worker", "0")
        found = [s for s in self.find(name, **labels) if set(s.labels) == set(labels)]
        assert len(found) == 1, (name, labels, [s for s in self.samples if s.name == name])
        return float(found[0].value)

    def get(self, name: str, default: float = 0.0, **labels: str) -> float:
        """Like L{value}, but C{default} when there is no such sample (yet)."""
        labels.setdefault("worker", "0")
        found = [s for s in self.find(name, **labels) if set(s.labels) == set(labels)]
        assert len(found) <= 1, (name, labels, found)
        return float(found[0].value) if found else default


def http_get(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    """(Blocking.) GET C{path}: status, content type and body, for error statuses too."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return (
                response.status,
                response.headers.get("Content-Type", ""),
                response.read().decode(),
            )
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


async def health(proxy: RunningProxy | int) -> tuple[int, str]:
    """GET C{/health} on the metrics port: status and body."""
    port = proxy if isinstance(proxy, int) else metrics_port(proxy)
    status, _, body = await deferToThread(http_get, port, "/health")
    return status, body


async def scrape(proxy: RunningProxy | int) -> Scrape:
    """
    GET C{/metrics} of C{proxy} (or on a port) with urllib in a thread,
    and parse it with prometheus_client's parser.
    """
    port = proxy if isinstance(proxy, int) else metrics_port(proxy)
    status, content_type, body = await deferToThread(http_get, port)
    assert status == 200, (status, body[:500])
    assert content_type.startswith("text/plain"), content_type
    return Scrape(body)
