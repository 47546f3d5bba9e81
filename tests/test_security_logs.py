"""
Issue 10, item 6: secrets never reach a log, and clients cannot write
lines of their own into it.

 - The query log (C{log_queries}) redacts the literal after C{PASSWORD}
   and the value of a C{password} option (the lexer and its rules are
   tested in tests/test_redact.py), against real PostgreSQL through a
   pooled route.
 - What the query log keeps per client is bounded, however many requests
   a client pipelines and however many Parse messages it sends without a
   Sync.
 - Text logs escape control characters: a role or database name holding a
   newline or a terminal escape sequence does not forge or hide a line,
   under C{twist} and C{twistd}, and a multi-line statement stays on one
   line.
"""

from __future__ import annotations

import io
import re
import tracemalloc
import uuid
from typing import Any

import psycopg
import pytest_twisted
from psycopg.conninfo import make_conninfo
from support.dsn import app_dsn
from support.logcapture import captured, json_events
from support.pooling import pooled_route
from support.processes import run_pgtls
from support.proxy import start_proxy
from support.waiting import until
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from pgtls_twisted.ops import _logs as logs
from pgtls_twisted.pool._querylog import PEEK, QueryLog
from pgtls_twisted.testing.cluster import APP_DB, SCRAM_PASSWORD, SCRAM_USER

# ---------------------------------------------------------------------------
# The query log, unit


def new_log() -> QueryLog:
    return QueryLog(Clock(), conn=1, client="127.0.0.1:1", user="u", route="r", database="d")


def query(log: QueryLog, sql: bytes, length: int | None = None) -> None:
    body = sql + b"\0"
    log.clientMessage(ord("Q"), 4 + (len(body) if length is None else length), body[:PEEK])


def parse(log: QueryLog, sql: bytes) -> None:
    body = b"\0" + sql + b"\0\0\0"
    log.clientMessage(ord("P"), 4 + len(body), body[:PEEK])


def statements(events: list[dict[str, Any]]) -> list[str]:
    return [e["statement"] for e in events if "statement" in e]


def test_query_log_redacts_passwords_in_query_and_parse_texts():
    log = new_log()
    with captured() as events:
        query(log, b"ALTER ROLE bob PASSWORD 'hunter2'; SELECT 'password'")
        parse(log, b"CREATE USER MAPPING FOR bob SERVER s OPTIONS (user 'b', password 'hunter2')")
        log.clientMessage(ord("S"), 4, b"")
        log.readyForQuery()
        log.readyForQuery()
    assert statements(events) == [
        "ALTER ROLE bob PASSWORD '***'; SELECT 'password'",
        "CREATE USER MAPPING FOR bob SERVER s OPTIONS (user 'b', password '***')",
    ]
    assert "hunter2" not in repr(events)


def test_query_log_redacts_a_literal_the_peek_cuts():
    log = new_log()
    secret = b"hunter2" * PEEK
    with captured() as events:
        query(log, b"ALTER ROLE bob PASSWORD E'" + secret + b"'", length=len(secret) + 40)
        log.readyForQuery()
    assert statements(events) == ["ALTER ROLE bob PASSWORD '***'..."]


class Numbered:
    """
    The query log's own observer for a flood of C{SELECT <n>, ...}: keeps
    only each statement's number and whether it was timed, so that what
    the test keeps does not hide what the query log keeps (and the events
    do not reach Twisted's global buffer).
    """

    def __init__(self, log: QueryLog) -> None:
        self.numbers: list[int] = []
        self.untimed = 0
        log._log = Logger(namespace="pgtls_twisted.pool._querylog", observer=self)

    def __call__(self, event: dict[str, Any]) -> None:
        self.numbers.append(int(event["statement"].split()[1].rstrip(",")))
        self.untimed += event["duration_ms"] is None


def grown(flood) -> int:
    """How much memory C{flood()} left allocated."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        flood()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def numbered(i: int) -> bytes:
    return b"SELECT %d, '%s'" % (i, b"x" * (PEEK - 20))


def test_parse_after_parse_without_sync_keeps_memory_bounded():
    log = new_log()
    seen = Numbered(log)
    count = 5000

    def flood() -> None:
        for i in range(count):
            parse(log, numbered(i))

    # 5,000 texts of 2 KiB: 10 MB if every one were kept until the Sync.
    assert grown(flood) < 1_000_000
    log.clientMessage(ord("S"), 4, b"")
    log.readyForQuery()
    # None is lost: those that could not wait were logged as they came, untimed.
    assert sorted(seen.numbers) == list(range(count))
    assert 0 < seen.untimed < count


def test_pipelined_queries_keep_memory_bounded_and_all_get_logged():
    log = new_log()
    seen = Numbered(log)
    count = 5000

    def flood() -> None:
        for i in range(count):
            query(log, numbered(i))
            log.clientMessage(ord("S"), 4, b"")  # a Sync with no Parse
            log.clientMessage(ord("F"), 10, b"")  # a FunctionCall

    assert grown(flood) < 1_000_000
    for _ in range(3 * count):
        log.readyForQuery()
    log.readyForQuery()  # one too many: ignored
    # Each logged once: the first ones at their ReadyForQuery, the rest at once.
    assert sorted(seen.numbers) == list(range(count))
    assert seen.numbers[-64:] == list(range(64))
    assert 0 < seen.untimed < count


def test_untimed_statements_say_so_in_text():
    log = new_log()
    with captured() as events:
        for i in range(100):
            query(log, b"SELECT %d" % i)
    (first, *_) = events
    assert first["duration_ms"] is None
    out = io.StringIO()
    logs.text_line_observer(out)(first)
    assert "duration=untimed statement=SELECT " in out.getvalue()


# ---------------------------------------------------------------------------
# Text logs, unit


def test_escape_controls():
    assert logs.escape_controls("a\nb\rc\td\x1b[31me\x00\x7f\x85\u2028\u202e") == (
        "a\\nb\\rc\\td\\x1b[31me\\x00\\x7f\\x85\\u2028\\u202e"
    )
    ordinary = "user=café route=app path=C:\\dir {braces} 'quoted' \"x\" 日本"
    assert logs.escape_controls(ordinary) == ordinary


def text_lines(emit) -> str:
    out = io.StringIO()
    observer = logs.text_line_observer(out)
    emit(Logger(namespace="pgtls_twisted.test", observer=observer))
    return out.getvalue()


def test_text_lines_escape_control_characters_in_every_field():
    forged = "x\n2026-01-01T00:00:00+0000 [pgtls_twisted#info] conn=1 forged\x1b[2K{y}"
    text = text_lines(
        lambda log: log.info(
            "conn={conn} close user={user} database={database} statement={statement}",
            conn=7,
            user=forged,
            database="d\rb",
            statement="SELECT 1,\n  2",
        )
    )
    assert text.count("\n") == 1 and "\x1b" not in text and "\r" not in text, text
    assert "user=x\\n2026-01-01T00:00:00+0000 [pgtls_twisted#info] conn=1 forged\\x1b[2K{y}" in text
    assert "database=d\\rb statement=SELECT 1,\\n  2\n" in text


def test_text_lines_keep_tracebacks_on_lines_of_their_own():
    def emit(log):
        try:
            raise ValueError("boom")
        except ValueError:
            log.failure("conn={conn} user={user}", conn=3, user="a\nb")

    text = text_lines(emit)
    first, *rest = text.splitlines()
    assert first.endswith("conn=3 user=a\\nb")
    assert rest and all(line.startswith("\t") for line in rest)
    assert "ValueError: boom" in text


def test_configure_output_escapes_text_under_twist_and_twistd():
    levels = logs.LogLevels()
    parent: dict[str, Any] = {"fileLogObserverFactory": None}
    logs.configure_output(parent, "text", levels)
    out = io.StringIO()
    Logger(namespace="pgtls_twisted.t", observer=parent["fileLogObserverFactory"](out)).info(
        "user={user}", user="a\rb"
    )
    assert out.getvalue().rstrip("\n").endswith("user=a\\rb")
    twistd: dict[str, Any] = {"logfile": None, "logger": None, "nodaemon": True}
    logs.configure_output(twistd, "text", levels)
    assert twistd["logger"] == "pgtls_twisted.ops._logs.twistd_text_observer"
    # An observer named with twistd --logger is the operator's choice.
    chosen: dict[str, Any] = {"logfile": None, "logger": "my.observer"}
    logs.configure_output(chosen, "text", levels)
    assert chosen["logger"] == "my.observer"


def test_twistd_syslog_lines_are_escaped_too(monkeypatch):
    from twisted.python.syslog import SyslogObserver

    sent: list[str] = []
    monkeypatch.setattr(SyslogObserver, "openlog", lambda *args: None)
    monkeypatch.setattr(SyslogObserver, "syslog", lambda *args: sent.append(args[-1]))
    monkeypatch.setattr(
        logs, "_twistd_options", ({"syslog": True, "prefix": "pgtls"}, logs.LogLevels())
    )
    observer = logs.twistd_text_observer()
    Logger(namespace="pgtls_twisted.test", observer=observer).info(
        "conn={conn} close user={user}", conn=1, user="a\nforged"
    )
    # SyslogObserver sends each line of a message as a message of its own.
    assert sent == ["[-] conn=1 close user=a\\nforged"]


# ---------------------------------------------------------------------------
# End to end: real PostgreSQL, a pooled route, log_queries = true


def text_line(event: dict[str, Any]) -> str:
    """The event as a text log writes it."""
    out = io.StringIO()
    logs.text_line_observer(out)(event)
    return out.getvalue()


@pytest_twisted.ensureDeferred
async def test_passwords_never_reach_the_query_log(pki, pg_tls, tmp_path):
    tag = uuid.uuid4().hex[:8]
    secret = f"Sw0rdf1sh{tag}"
    service, probe, fdw, srv, srv2 = (
        f"redact_{n}_{tag}" for n in ("svc", "probe", "fdw", "s", "s2")
    )
    # The service user may create roles and user mappings (statements that
    # fail are logged as well, but these must really set a password).
    pg_tls.psql(
        f"CREATE ROLE {service} LOGIN CREATEROLE PASSWORD 'svc_pw';"
        f"CREATE FOREIGN DATA WRAPPER {fdw};"
        f"GRANT USAGE ON FOREIGN DATA WRAPPER {fdw} TO {service};"
        f"CREATE SERVER {srv} FOREIGN DATA WRAPPER {fdw};"
        f"GRANT USAGE ON FOREIGN SERVER {srv} TO {service};",
        dbname=APP_DB,
    )
    table = pooled_route(
        pki, pg_tls, log_queries=True, service_user=service, service_password="svc_pw"
    )
    try:
        with captured() as events:
            proxy = start_proxy([table], tmp_path)
            try:

                def run() -> None:
                    with psycopg.connect(app_dsn(proxy, pki), autocommit=True) as conn:
                        conn.execute(f"CREATE ROLE {probe} LOGIN PASSWORD '{secret}'")
                        conn.execute(f"ALTER ROLE {probe} PASSWORD '{secret}'")
                        conn.execute(
                            f"SELECT 1;\nALTER USER {probe} WITH ENCRYPTED PASSWORD E'{secret}\\''"
                        )
                        with conn.pipeline():  # extended protocol: a Parse
                            conn.execute(f"ALTER ROLE {probe} PASSWORD $pw${secret}$pw$")
                        conn.execute(f"DO $$ BEGIN ALTER ROLE {probe} PASSWORD '{secret}'; END $$")
                        conn.execute(
                            f"CREATE USER MAPPING FOR CURRENT_USER SERVER {srv} "
                            f"OPTIONS (user 'x', password '{secret}')"
                        )
                        conn.execute(
                            f"ALTER USER MAPPING FOR CURRENT_USER SERVER {srv} "
                            f"OPTIONS (SET password '{secret}')"
                        )
                        conn.execute(
                            f"CREATE SERVER {srv2} FOREIGN DATA WRAPPER {fdw} "
                            f"OPTIONS (host 'h', password '{secret}')"
                        )

                await deferToThread(run)
                await until(lambda: len(statements(events)) >= 8, fail=False)
            finally:
                await proxy.stop()
        # The statements ran, and set what they say.
        assert pg_tls.psql(
            f"SELECT rolpassword IS NOT NULL FROM pg_authid WHERE rolname = '{probe}';"
            f"SELECT array_to_string(umoptions, ',') FROM pg_user_mappings "
            f"WHERE srvname = '{srv}';"
            f"SELECT array_to_string(srvoptions, ',') FROM pg_foreign_server "
            f"WHERE srvname = '{srv2}'",
            dbname=APP_DB,
        ).splitlines() == ["t", f"user=x,password={secret}", f"host=h,password={secret}"]
    finally:
        pg_tls.psql(
            f"DROP OWNED BY {service} CASCADE; DROP SERVER IF EXISTS {srv} CASCADE;"
            f"DROP FOREIGN DATA WRAPPER IF EXISTS {fdw} CASCADE;"
            f"DROP ROLE IF EXISTS {probe}; DROP ROLE IF EXISTS {service};",
            dbname=APP_DB,
        )
    # Not in any event, as pgtls's own fields or as a JSON line.
    leaks = [e for e in events if secret in repr(e) or secret in logs.event_as_json_line(e)]
    assert not leaks, leaks
    logged = statements(events)
    assert len(logged) == 8, logged
    assert {e["kind"] for e in events if "statement" in e} == {"query", "parse"}
    assert f"ALTER ROLE {probe} PASSWORD '***'" in logged
    assert f"SELECT 1;\nALTER USER {probe} WITH ENCRYPTED PASSWORD '***'" in logged
    assert f"DO $$ BEGIN ALTER ROLE {probe} PASSWORD '***'; END $$" in logged
    assert any("OPTIONS (SET password '***')" in s for s in logged), logged
    # Nor in a text line; a statement on two lines is one line of text log.
    for event in events:
        assert secret not in text_line(event)
    (two,) = [e for e in events if e.get("statement", "").startswith("SELECT 1;")]
    text = text_line(two)
    assert text.count("\n") == 1 and "statement=SELECT 1;\\nALTER USER" in text


# ---------------------------------------------------------------------------
# End to end: twist and twistd write names with control characters escaped

#: A role name that, written raw, would end the line and start a forged one
#: (in red, after erasing the line the terminal shows).
EVIL_ROLE = "evil\n2026-01-01 [x] forged\x1b[2K\x1b[31m"
EVIL_DB = "no\rsuch\x1b]0;db"


def quoted(name: str) -> str:
    """An SQL quoted identifier."""
    return '"' + name.replace('"', '""') + '"'


def evil_clients(pki, seen: dict[str, Any]):
    def clients(port: int) -> None:
        common = dict(
            host="localhost",
            port=port,
            password="evil_pw",
            sslmode="verify-full",
            sslrootcert=str(pki.cert("ca")),
            connect_timeout=10,
        )
        with psycopg.connect(make_conninfo(user=EVIL_ROLE, dbname="postgres", **common)) as c:
            seen["user"] = c.execute("SELECT current_user").fetchone()[0]
        common["password"] = SCRAM_PASSWORD
        try:
            psycopg.connect(make_conninfo(user=SCRAM_USER, dbname=EVIL_DB, **common)).close()
        except psycopg.OperationalError as e:
            seen["refused"] = str(e)

    return clients


def check_text_log(out: str) -> None:
    assert "\x1b" not in out and "\r" not in out, out
    for line in out.splitlines():
        # Each line is an event (time first), or a traceback's continuation.
        assert re.match(r"\d{4}-\d\d-\d\dT|\t", line), line
        assert "forged" not in line or "evil\\n2026-01-01 [x] forged" in line, line
    assert "user=evil\\n2026-01-01 [x] forged\\x1b[2K\\x1b[31m" in out, out
    assert "database=no\\rsuch\\x1b]0;db" in out, out


def test_names_with_control_characters_stay_on_one_line_under_twist(pki, pg_tls, tmp_path):
    pg_tls.psql(f"CREATE ROLE {quoted(EVIL_ROLE)} LOGIN PASSWORD 'evil_pw'")
    seen: dict[str, Any] = {}
    try:
        out, _, _ = run_pgtls(["twist", "pgtls"], tmp_path, pki, pg_tls, evil_clients(pki, seen))
    finally:
        pg_tls.psql(f"DROP ROLE {quoted(EVIL_ROLE)}")
    assert seen["user"] == EVIL_ROLE and "does not exist" in seen["refused"]
    check_text_log(out)


def test_names_with_control_characters_stay_on_one_line_under_twistd(pki, pg_tls, tmp_path):
    pg_tls.psql(f"CREATE ROLE {quoted(EVIL_ROLE)} LOGIN PASSWORD 'evil_pw'")
    seen: dict[str, Any] = {}
    try:
        out, _, _ = run_pgtls(
            ["twistd", "-n", "pgtls"], tmp_path, pki, pg_tls, evil_clients(pki, seen)
        )
    finally:
        pg_tls.psql(f"DROP ROLE {quoted(EVIL_ROLE)}")
    assert seen["user"] == EVIL_ROLE
    check_text_log(out)


@pytest_twisted.ensureDeferred
async def test_json_logs_keep_the_exact_names(pki, pg_tls, tmp_path):
    """JSON lines need no escaping of their own: the values stay exact."""
    from support.proxy import route

    with json_events() as records:
        proxy = start_proxy([route(pki, pg_tls)], tmp_path)
        try:

            def run() -> None:
                try:
                    psycopg.connect(
                        make_conninfo(
                            proxy.dsn(),
                            user=SCRAM_USER,
                            password=SCRAM_PASSWORD,
                            dbname=EVIL_DB,
                            sslmode="verify-full",
                            sslrootcert=str(pki.cert("ca")),
                        )
                    ).close()
                except psycopg.OperationalError:
                    pass

            await deferToThread(run)
            await until(lambda: any(r.get("database") == EVIL_DB for r in records), fail=False)
        finally:
            await proxy.stop()
    (closed,) = [r for r in records if r.get("database") == EVIL_DB]
    assert EVIL_DB in closed["message"]
