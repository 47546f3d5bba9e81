"""
Logs (issue #5, item 3): C{log_format = "json"} gives one JSON object per
line with the connection id on every event of that connection, and
C{log_level} filters pgtls's own events.

The unit tests call L{pgtls_twisted.ops._logs} directly; the end-to-end ones
run C{twist pgtls} (and C{twistd -n pgtls}) as a separate process with a
real client, so they use blocking clients directly.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
from datetime import datetime
from typing import Any

import psycopg
import pytest_twisted
from support.dsn import client_dsn
from support.logcapture import json_events
from support.processes import run_pgtls
from support.proxy import route, start_proxy
from support.waiting import until
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, LogLevel

from pgtls_twisted.ops import _logs as logs
from pgtls_twisted.testing.cluster import SCRAM_PASSWORD, SCRAM_USER

# ---------------------------------------------------------------------------
# Unit: one event, one line


def emitted(emit) -> dict[str, Any]:
    """The one event C{emit(log)} sends through a pgtls L{logs.Logger}."""
    events: list[dict[str, Any]] = []
    log = Logger(namespace="pgtls_twisted.test", observer=events.append)
    emit(log)
    assert len(events) == 1, events
    return events[0]


def as_record(event: dict[str, Any]) -> dict[str, Any]:
    line = logs.event_as_json_line(event)
    assert line.endswith("\n") and line.count("\n") == 1, line
    record = json.loads(line)
    assert isinstance(record, dict)
    return record


def test_json_line_has_the_standard_fields_and_the_events_own():
    event = emitted(
        lambda log: log.info(
            "conn={conn} open peer={peer} route={route}", conn=7, peer="127.0.0.1:5", route="app"
        )
    )
    record = as_record(event)
    assert list(record)[:4] == ["time", "level", "namespace", "message"]
    assert record["level"] == "info"
    assert record["namespace"] == "pgtls_twisted.test"
    assert record["message"] == "conn=7 open peer=127.0.0.1:5 route=app"
    assert (record["conn"], record["peer"], record["route"]) == (7, "127.0.0.1:5", "app")
    when = datetime.fromisoformat(record["time"])
    assert when.utcoffset() is not None and when.utcoffset().total_seconds() == 0
    assert abs(when.timestamp() - event["log_time"]) < 0.001
    # Twisted's own bookkeeping fields are not copied.
    assert not [key for key in record if key.startswith("log_")]


def test_json_line_values_json_cannot_carry():
    class Thing:
        def __repr__(self) -> str:
            return "<thing>"

    event = emitted(
        lambda log: log.warn(
            "odd {thing} {text}",
            thing=Thing(),
            text='line one\nline "two"',
            raw=b"\x00\xff",
            flat={"version": "TLSv1.3", "bits": 256, "none": None},
            nested={"a": [1, 2]},
            many=[1, 2],
            ratio=0.5,
            flag=True,
            nothing=None,
        )
    )
    record = as_record(event)
    assert record["level"] == "warn"
    assert record["message"] == 'odd <thing> line one\nline "two"'
    assert record["thing"] == "<thing>"
    assert record["raw"] == repr(b"\x00\xff")
    assert record["flat"] == {"version": "TLSv1.3", "bits": 256, "none": None}
    assert record["nested"] == repr({"a": [1, 2]})
    assert record["many"] == repr([1, 2])
    assert (record["ratio"], record["flag"], record["nothing"]) == (0.5, True, None)


def test_json_line_of_a_failure_carries_the_traceback():
    def emit(log):
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            log.failure("conn={conn} unexpected error", conn=3)

    record = as_record(emitted(emit))
    assert record["level"] == "critical"
    assert record["message"] == "conn=3 unexpected error"
    assert record["conn"] == 3
    assert "ZeroDivisionError" in record["traceback"]
    assert "Traceback" in record["traceback"]


def test_json_line_of_a_bad_format_string_is_still_one_line():
    record = as_record(emitted(lambda log: log.info("conn={conn} {missing}", conn=1)))
    assert record["conn"] == 1
    assert "Unable to format event" in record["message"]


def test_log_level_filters_pgtls_events():
    events: list[dict[str, Any]] = []
    levels = logs.LogLevels("warn")
    observer = levels.filtered(events.append)
    log = Logger(namespace="pgtls_twisted.proxy._frontend.ClientProtocol", observer=observer)
    log.debug("d")
    log.info("i")
    log.warn("w")
    log.error("e")
    assert [e["log_level"] for e in events] == [LogLevel.warn, LogLevel.error]
    # Twisted's own events are twist --log-level's business, not log_level's.
    Logger(namespace="twisted.internet.tcp", observer=observer).info("t")
    assert [e["log_level"] for e in events][-1] == LogLevel.info
    events.clear()
    levels.setLevel("debug")
    log.debug("d")
    assert [e["log_level"] for e in events] == [LogLevel.debug]


def test_configure_output_for_twist():
    parent: dict[str, Any] = {"fileLogObserverFactory": None}
    levels = logs.LogLevels("info")

    def lines(log_format: str) -> str:
        logs.configure_output(parent, log_format, levels)
        out = io.StringIO()
        log = Logger(namespace="pgtls_twisted.test", observer=parent["fileLogObserverFactory"](out))
        log.debug("hidden")
        log.info("conn={conn} user={user}", conn=1, user="a\nb")
        return out.getvalue()

    # The configuration decides, not twist's "JSON when not a terminal".
    (record,) = [json.loads(line) for line in lines("json").splitlines()]
    assert record["user"] == "a\nb"
    # Text: Twisted's text lines, with control characters escaped.
    (line,) = lines("text").splitlines()
    assert line.endswith("conn=1 user=a\\nb")
    logs.configure_output(None, "json", levels)  # embedded: nothing to configure


def test_json_line_observer_writes_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    with path.open("w") as out:
        observer = logs.json_line_observer(out)
        log = Logger(namespace="pgtls_twisted.test", observer=observer)
        log.info("conn={conn} one", conn=1)
        log.info("conn={conn} two", conn=2)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["conn"], r["message"]) for r in records] == [(1, "conn=1 one"), (2, "conn=2 two")]


# ---------------------------------------------------------------------------
# End to end: twist pgtls, a real client, SIGTERM


def json_records(out: str) -> list[dict[str, Any]]:
    """Every line of C{out}, each of which must be one JSON object."""
    records = []
    for line in out.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert isinstance(record, dict), line
        assert {"time", "level", "namespace", "message"} <= set(record), line
        records.append(record)
    return records


def good_and_refused_client(pki, seen: dict[str, Any]):
    def clients(port: int) -> None:
        with psycopg.connect(client_dsn(port, pki)) as conn:
            seen["port"] = conn.execute("SELECT inet_client_port()").fetchone()[0]
            seen["peer_port"] = _local_port(conn)
            conn.execute("SELECT 1")
        try:
            psycopg.connect(client_dsn(port, pki, sslmode="disable")).close()
        except psycopg.OperationalError as e:
            seen["refused"] = str(e)

    return clients


def _local_port(conn: psycopg.Connection) -> int:
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        return int(sock.getsockname()[1])
    finally:
        sock.close()


def test_json_lines_carry_the_connection_id(pki, pg_tls, tmp_path):
    seen: dict[str, Any] = {}
    out, err, _ = run_pgtls(
        ["twist", "pgtls"],
        tmp_path,
        pki,
        pg_tls,
        good_and_refused_client(pki, seen),
        log_format="json",
    )
    records = json_records(out)
    assert "requires TLS" in seen["refused"]
    assert SCRAM_PASSWORD not in out + err
    # The client's connection: found by its address, then followed by id.
    peer = f"127.0.0.1:{seen['peer_port']}"
    (opened,) = [r for r in records if r.get("peer") == peer and " open " in r["message"]]
    conn = opened["conn"]
    assert isinstance(conn, int)
    mine = [r for r in records if r.get("conn") == conn]
    messages = [r["message"] for r in mine]
    assert any(" open " in m for m in messages), messages
    assert any(" session started " in m for m in messages), messages
    assert any(" close " in m for m in messages), messages
    # Every event that is about this connection carries its id as a field.
    about = [r for r in records if r["message"].startswith(f"conn={conn} ")]
    assert about == mine
    (closed,) = [r for r in mine if " close " in r["message"]]
    assert closed["bytes_in"] > 0 and closed["bytes_out"] > 0
    assert closed["user"] == SCRAM_USER and closed["route"] == "app"
    # The refused client is a connection of its own, with its own id.
    (refused,) = [r for r in records if " refused " in r["message"]]
    assert refused["level"] == "warn" and refused["conn"] != conn
    assert refused["sqlstate"] == "28000"
    for record in records:
        if record["message"].startswith("conn="):
            assert record["message"].startswith(f"conn={record['conn']} "), record
    # pgtls's own start-up lines are JSON too.
    assert any("listening on 127.0.0.1" in r["message"] for r in records)


def test_log_level_warn_leaves_out_info_events(pki, pg_tls, tmp_path):
    seen: dict[str, Any] = {}
    out, _, _ = run_pgtls(
        ["twist", "pgtls"],
        tmp_path,
        pki,
        pg_tls,
        good_and_refused_client(pki, seen),
        log_format="json",
        log_level="warn",
    )
    records = json_records(out)
    ours = [r for r in records if r["namespace"].startswith("pgtls_twisted")]
    assert ours, records
    assert {r["level"] for r in ours} <= {"warn", "error", "critical"}, ours
    assert [r for r in ours if " refused " in r["message"]], ours
    assert not [r for r in records if "session started" in r["message"]]


def test_text_is_the_default_even_without_a_terminal(pki, pg_tls, tmp_path):
    seen: dict[str, Any] = {}
    out, _, _ = run_pgtls(
        ["twist", "pgtls"], tmp_path, pki, pg_tls, good_and_refused_client(pki, seen)
    )
    lines = out.splitlines()
    assert lines
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            continue
        raise AssertionError(f"a JSON line in text output: {line!r}")
    assert any("route=app listening on 127.0.0.1" in line for line in lines), out
    assert any(" session started " in line for line in lines), out


def test_twistd_writes_json_lines_too(pki, pg_tls, tmp_path):
    seen: dict[str, Any] = {}
    out, _, _ = run_pgtls(
        ["twistd", "-n", "pgtls"],
        tmp_path,
        pki,
        pg_tls,
        good_and_refused_client(pki, seen),
        log_format="json",
    )
    records = json_records(out)
    assert any(" session started " in r["message"] for r in records)


# ---------------------------------------------------------------------------
# In process: every event of a connection, as JSON


def about(records: list[dict[str, Any]], conn: int) -> list[dict[str, Any]]:
    """The records whose message says they are about connection C{conn}."""
    return [r for r in records if re.match(rf"conn={conn}\b", r["message"])]


@pytest_twisted.ensureDeferred
async def test_pooled_session_events_all_carry_conn(pki, pg_tls, tmp_path):
    from support.pooling import pooled_route

    with json_events() as records:
        proxy = start_proxy([pooled_route(pki, pg_tls, log_queries=True)], tmp_path)
        try:

            def run():
                dsn = client_dsn(proxy, pki, dbname="app")
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                    conn.execute("SELECT %s::int", (2,))

            await deferToThread(run)
            await until(lambda: any(" close " in r["message"] for r in records), fail=False)
        finally:
            await proxy.stop()
    (opened,) = [r for r in records if " open " in r["message"]]
    conn = opened["conn"]
    mine = [r for r in records if r.get("conn") == conn]
    assert about(records, conn) == mine
    kinds = [r["message"].split()[1] for r in mine]
    assert kinds == ["open", "session", "query", "parse", "close"], kinds
    (started,) = [r for r in mine if "session started" in r["message"]]
    assert started["pool"] == "pool_user/app" and started["mode"] == "transaction"


@pytest_twisted.ensureDeferred
async def test_a_cancel_that_cannot_be_forwarded_is_logged_with_its_conn(pki, pg_tls, tmp_path):
    from support.relay import SlowRelay
    from twisted.internet import reactor

    relay = SlowRelay(reactor, pg_tls.host, pg_tls.port, 0)
    table = route(pki, pg_tls, backend={"address": relay.address})
    with json_events() as records:
        proxy = start_proxy([table], tmp_path)
        try:
            dsn = client_dsn(proxy, pki)
            conn = await deferToThread(psycopg.connect, dsn, autocommit=True)
            # The backend can no longer be reached; the session still can.
            await relay.stop()
            await deferToThread(conn.cancel_safe)
            await until(
                lambda: any("could not forward" in r["message"] for r in records), fail=False
            )
            await deferToThread(conn.close)
        finally:
            await proxy.stop()
    (forwarded,) = [r for r in records if "cancel request forwarded" in r["message"]]
    (failed,) = [r for r in records if "could not forward" in r["message"]]
    assert failed["level"] == "warn"
    assert failed.get("conn") == forwarded["conn"], failed
