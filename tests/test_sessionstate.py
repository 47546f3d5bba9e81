"""
Which statement texts create session state (pgtls_twisted.protocol._sessionstate),
issue 12 item 2: the rules one by one, what never matches (literals,
comments, quoted identifiers), hostile input, the refusal statement, and
an oracle: real PostgreSQL says which statements leave a session changed.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from support.fuzz import fuzz

from pgtls_twisted.protocol import _sessionstate as sessionstate
from pgtls_twisted.protocol._refusal import HINT, refusal
from pgtls_twisted.protocol._sessionstate import NOTHING, Verdict, classify
from pgtls_twisted.protocol._txstate import TRACKED_PARAMETERS
from pgtls_twisted.testing.cluster import SUPERUSER, PostgresCluster

FUZZ = fuzz(400)


def uncached(sql: str) -> Verdict:
    """The verdict without the prefilter and the cache: every text lexed."""
    return sessionstate._verdict(sql, 0, False)


# ---------------------------------------------------------------------------
# The rules

PINS = [
    # SET and RESET of untracked parameters, in any case and spacing.
    ("SET app.tenant_id = 'A'", "SET app.tenant_id"),
    ("set App.Tenant_Id to 'A'", "SET app.tenant_id"),
    ('SET "App"."Tenant" = 1', "SET App.Tenant"),
    ("SET SESSION statement_timeout = '1ms'", "SET statement_timeout"),
    ("SET search_path TO evil, public", "SET search_path"),
    ("SET SCHEMA 'evil'", "SET schema"),
    ("SET XML OPTION DOCUMENT", "SET XML OPTION"),
    ("SET ROLE admin", "SET ROLE"),
    ("SET SESSION ROLE admin", "SET ROLE"),
    ("SET SESSION AUTHORIZATION bob", "SET SESSION AUTHORIZATION"),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", "SET SESSION CHARACTERISTICS"),
    ("SET", "SET"),
    ("SET = 1", "SET"),
    ("RESET ALL", "RESET ALL"),
    ("RESET ROLE", "RESET ROLE"),
    ("RESET SESSION AUTHORIZATION", "RESET SESSION AUTHORIZATION"),
    ("RESET statement_timeout", "RESET statement_timeout"),
    ("RESET", "RESET"),
    # The others.
    ("LISTEN jobs", "LISTEN"),
    ('listen "Jobs"', "LISTEN"),
    ("PREPARE q (int) AS SELECT $1", "PREPARE"),
    ("PREPARE transaction AS SELECT 1", "PREPARE"),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "DECLARE ... WITH HOLD"),
    ("DECLARE c BINARY NO SCROLL CURSOR WITH HOLD FOR SELECT 1", "DECLARE ... WITH HOLD"),
    ("LOAD 'auto_explain'", "LOAD"),
    # Temporary objects.
    ("CREATE TEMP TABLE t (x int)", "CREATE TEMPORARY TABLE"),
    ("create temporary table t (x int) on commit delete rows", "CREATE TEMPORARY TABLE"),
    ("CREATE GLOBAL TEMPORARY TABLE t (x int)", "CREATE TEMPORARY TABLE"),
    ("CREATE LOCAL TEMP TABLE t (x int)", "CREATE TEMPORARY TABLE"),
    ("CREATE TEMP UNLOGGED TABLE t (x int)", "CREATE TEMPORARY TABLE"),
    ("CREATE TEMP TABLE t AS SELECT 1 AS on_commit_drop", "CREATE TEMPORARY TABLE"),
    ("CREATE TEMP VIEW v AS SELECT 1", "CREATE TEMPORARY VIEW"),
    ("CREATE OR REPLACE TEMP VIEW v AS SELECT 1", "CREATE TEMPORARY VIEW"),
    ("CREATE TEMP RECURSIVE VIEW v (n) AS SELECT 1", "CREATE TEMPORARY VIEW"),
    ("CREATE TEMPORARY SEQUENCE s", "CREATE TEMPORARY SEQUENCE"),
    ("CREATE TABLE pg_temp.t (x int)", "CREATE ... pg_temp"),
    ("CREATE FUNCTION pg_temp.f() RETURNS int AS 'SELECT 1' LANGUAGE sql", "CREATE ... pg_temp"),
    ('CREATE INDEX ON "pg_temp_3".t (x)', "CREATE ... pg_temp"),
    ("SELECT 1 AS x INTO TEMP t", "SELECT ... INTO TEMPORARY"),
    ("SELECT * INTO TEMPORARY TABLE t FROM s", "SELECT ... INTO TEMPORARY"),
    ("SELECT * INTO LOCAL TEMP t FROM s", "SELECT ... INTO TEMPORARY"),
    ('SELECT * INTO TEMP "t" FROM s', "SELECT ... INTO TEMPORARY"),
    ("SELECT * INTO pg_temp.t FROM s", "SELECT ... INTO TEMPORARY"),
    ("WITH s AS (SELECT 1) SELECT * INTO TEMP t FROM s", "SELECT ... INTO TEMPORARY"),
    ("(SELECT 1 INTO TEMP t)", "SELECT ... INTO TEMPORARY"),
    # Session advisory locks, anywhere, qualified or quoted.
    ("SELECT pg_advisory_lock(1)", "pg_advisory_lock"),
    ("select PG_ADVISORY_LOCK_SHARED(1, 2)", "pg_advisory_lock_shared"),
    ("SELECT pg_catalog.pg_try_advisory_lock(1)", "pg_try_advisory_lock"),
    ('SELECT "pg_try_advisory_lock_shared" (1)', "pg_try_advisory_lock_shared"),
    ("SELECT x FROM t WHERE pg_advisory_lock(t.id) IS NOT NULL", "pg_advisory_lock"),
    ("INSERT INTO t SELECT pg_advisory_lock(1)", "pg_advisory_lock"),
    # set_config for the session, or perhaps so.
    ("SELECT set_config('app.x', 'y', false)", "set_config(..., false)"),
    ("SELECT pg_catalog.set_config('app.x', 'y', FALSE)", "set_config(..., false)"),
    ("SELECT set_config('app.x', 'y', 'f')", "set_config(..., false)"),
    ("SELECT set_config('app.x', 'y', ' OFF ')", "set_config(..., false)"),
    ("SELECT set_config('app.x', 'y', $$no$$)", "set_config(..., false)"),
    ("SELECT set_config('app.x', 'y', '0')", "set_config(..., false)"),
    ("SELECT set_config('app.x', 'y', $3)", "set_config(..., false)"),
    ("SELECT set_config($1, $2, $3)", "set_config(..., false)"),
    ("SELECT set_config('app.x', 'y', coalesce($1, true))", "set_config(..., false)"),
    ("SELECT set_config('app.x', 'y', true::boolean)", "set_config(..., false)"),
    ("SELECT set_config('app.x', 'y', 'maybe')", "set_config(..., false)"),
    ("SELECT set_config(lower('TimeZone'), 'UTC', false)", "set_config(..., false)"),
    ("SELECT f(set_config('a.b', 'c', false), true)", "set_config(..., false)"),
    # EXPLAIN is looked through.
    ("EXPLAIN ANALYZE SELECT pg_advisory_lock(1)", "pg_advisory_lock"),
    ("EXPLAIN (ANALYZE, BUFFERS) CREATE TEMP TABLE t AS SELECT 1", "CREATE TEMPORARY TABLE"),
    ("explain analyse verbose select 1 into temp t", "SELECT ... INTO TEMPORARY"),
    # Comments and case do not hide a statement.
    ("/* hello */ SeT -- there\n app.x = 1", "SET app.x"),
    ("/* a /* nested */ comment */ LISTEN x", "LISTEN"),
    # Several statements: the first reason wins.
    ("SELECT 1; SET app.x = 1; LISTEN y", "SET app.x"),
    ("BEGIN; SET app.x = 1; COMMIT", "SET app.x"),
    ("SET LOCAL a.b = 1; SET TimeZone = 'UTC'; LISTEN y", "LISTEN"),
    ("SELECT 1;;;LISTEN y;", "LISTEN"),
    ("SELECT pg_advisory_xact_lock(1); SELECT pg_advisory_lock(2)", "pg_advisory_lock"),
    # Names are shown printable and short.
    ('SET "a\x01b" = 1', "SET a?b"),
    ("SET a" + "b" * 100 + " = 1", "SET a" + "b" * 62 + "..."),
]

DOES_NOT_PIN = [
    "",
    "SELECT 1",
    "SELECT * FROM t LIMIT 10 OFFSET 20",
    "INSERT INTO payload (load, reset_at) VALUES (1, now())",
    "UPDATE t SET x = 1 WHERE id = $1",
    "UPDATE t SET reset = true",
    # Transaction-scoped, or re-applied by pgtls.
    "SET LOCAL app.tenant_id = 'A'",
    "set local role admin",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SET TRANSACTION SNAPSHOT '00000003-0000001B-1'",
    "SET CONSTRAINTS ALL DEFERRED",
    "SET client_encoding TO 'UTF8'",
    "SET DateStyle = ISO, MDY",
    "SET \"timezone\" = 'UTC'",
    "SET SESSION TimeZone TO 'UTC'",
    "SET intervalstyle = postgres",
    "SET standard_conforming_strings = on",
    "SET application_name = 'x'",
    "SET TIME ZONE 'Europe/Paris'",
    "SET SESSION TIME ZONE LOCAL",
    "SET NAMES 'UTF8'",
    "RESET TimeZone",
    "RESET TIME ZONE",
    "RESET application_name",
    "RESET TRANSACTION ISOLATION LEVEL",
    "UNLISTEN *",
    "PREPARE TRANSACTION 'gid-1'",
    "COMMIT PREPARED 'gid-1'",
    "EXECUTE q(1)",
    "DEALLOCATE q",
    "DECLARE c CURSOR FOR SELECT 1",
    "DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1",
    "DECLARE c CURSOR FOR WITH hold AS (SELECT 1) SELECT * FROM hold",
    "CREATE TEMP TABLE t (x int) ON COMMIT DROP",
    "CREATE TEMPORARY TABLE t (x int DEFAULT 1, CHECK (x > 0)) ON COMMIT DROP AS SELECT 1",
    "CREATE TABLE temp (x int)",
    "CREATE TABLE t AS SELECT * FROM pg_temp.x",
    "CREATE UNLOGGED TABLE t (x int)",
    "SELECT 1 AS x INTO temp",
    "SELECT x INTO temp FROM s",
    "SELECT x INTO temp.t FROM s",
    "SELECT x INTO t FROM temp",
    "INSERT INTO temp VALUES (1)",
    "INSERT INTO temp TABLE other",
    "WITH s AS (SELECT 1) INSERT INTO temp SELECT * FROM s",
    "SELECT pg_advisory_xact_lock(1), pg_try_advisory_xact_lock_shared(2)",
    "SELECT pg_advisory_unlock(1), pg_advisory_unlock_all()",
    "SELECT pg_advisory_lock",
    "SELECT set_config('app.x', 'y', true)",
    "SELECT set_config('app.x', 'y', 'on')",
    "SELECT set_config('app.x', 'y', ' t ')",
    "SELECT set_config('app.x', 'y', E'yes')",
    "SELECT set_config('app.x', 'y', '1')",
    "SELECT set_config('TimeZone', 'UTC', false)",
    "SELECT set_config('application_name', $1, $2)",
    "SELECT set_config('app.x', 'y')",
    "SELECT set_config('app.x', 'y', false, 1)",
    "SELECT set_config",
    "SELECT set_config('app.x', 'y', false",
    "EXPLAIN SELECT 1",
    "EXPLAIN (ANALYZE) UPDATE t SET x = 1",
    "DISCARD PLANS",
    "DISCARD TEMP",
    "CALL proc()",
    # Never in a literal, a comment or a quoted identifier.
    "SELECT 'SET app.x = 1'",
    "SELECT E'\\'; SET app.x = 1; --'",
    "SELECT $$LISTEN x$$, $a$ pg_advisory_lock(1) $a$",
    "SELECT 1 -- ; SET app.x = 1",
    "SELECT 1 /* ; LISTEN x; /* nested */ ; LOAD 'x' */",
    'SELECT "set", "listen" FROM t',
    'SELECT 1; "SET" app.x = 1',
    "SELECT 'pg_advisory_lock(1)'",
    'SELECT "PG_ADVISORY_LOCK"(1)',
    # A function body is not looked into: it runs when called.
    "CREATE FUNCTION f() RETURNS void AS $$ SET app.x = 1 $$ LANGUAGE sql",
    "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'SELECT set_config(''a.b'', ''c'', false)'",
    # Semicolons in parentheses part a rule's actions.
    "CREATE RULE r AS ON INSERT TO t DO ALSO (NOTIFY x; NOTIFY y)",
    # A syntax error runs nothing: unbalanced parentheses hide what follows.
    "SELECT (1; SET app.x = 1",
]


@pytest.mark.parametrize(("sql", "reason"), PINS)
def test_pins(sql: str, reason: str) -> None:
    assert classify(sql) == Verdict(reason, False)
    assert uncached(sql) == Verdict(reason, False)


@pytest.mark.parametrize("sql", DOES_NOT_PIN)
def test_does_not_pin(sql: str) -> None:
    assert classify(sql) is NOTHING
    assert uncached(sql) == NOTHING


@pytest.mark.parametrize(
    "sql",
    [
        "DISCARD ALL",
        "discard all;",
        "DEALLOCATE ALL",
        "DEALLOCATE PREPARE ALL",
        "SELECT 1; DEALLOCATE all",
        "/* x */ Discard -- y\n ALL",
    ],
)
def test_deallocates(sql: str) -> None:
    assert classify(sql) == Verdict(None, True)


def test_deallocates_and_pins_together() -> None:
    assert classify("SET app.x = 1; DISCARD ALL") == Verdict("SET app.x", True)
    assert classify("DISCARD ALL; LISTEN x") == Verdict("LISTEN", True)
    for sql in ['DEALLOCATE "all"', "DEALLOCATE q", "DISCARD PLANS", "SELECT 'DISCARD ALL'"]:
        assert classify(sql) is NOTHING


# ---------------------------------------------------------------------------
# DO blocks: the body runs now, and is read as PL/pgSQL


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("DO $$BEGIN SET app.x = 1; END$$", "DO block (SET app.x)"),
        (
            "DO $$BEGIN PERFORM set_config('a.b', 'c', false); END$$",
            "DO block (set_config(..., false))",
        ),
        ("DO 'BEGIN PERFORM pg_advisory_lock(1); END'", "DO block (pg_advisory_lock)"),
        ("DO $$BEGIN IF x THEN LISTEN y; END IF; END$$", "DO block (LISTEN)"),
        ("DO $$BEGIN IF x THEN NULL; ELSE RESET ALL; END IF; END$$", "DO block (RESET ALL)"),
        (
            "DO $$BEGIN LOOP CREATE TEMP TABLE t (x int); END LOOP; END$$",
            "DO block (CREATE TEMPORARY TABLE)",
        ),
        (
            "DO $$DECLARE n int; BEGIN SELECT 1 INTO TEMP t; END$$",
            "DO block (SELECT ... INTO TEMPORARY)",
        ),
        (
            "DO $d$BEGIN EXECUTE 'SET search_path = ' || quote_ident(s); END$d$",
            "DO block (SET search_path)",
        ),
        ("DO $$BEGIN EXECUTE format('SET %I = %L', n, v); END$$", "DO block (SET)"),
        ("DO $$BEGIN EXECUTE $x$LISTEN y$x$; END$$", "DO block (LISTEN)"),
        (
            "DO $$BEGIN FOR r IN EXECUTE 'SELECT pg_advisory_lock(1)' LOOP END LOOP; END$$",
            "DO block (pg_advisory_lock)",
        ),
        ("DO $$BEGIN EXECUTE E'SET x\\n= 1'; END$$", "DO block (EXECUTE)"),
        (
            "DO $$BEGIN EXECUTE 'DO $b$BEGIN SET a.b = 1; END$b$'; END$$",
            "DO block (DO block (SET a.b))",
        ),
        ("DO LANGUAGE plpython3u $$plpy.execute('SET a.b = 1')$$", "DO block"),
        ("DO $$plpy.execute('LISTEN x')$$ LANGUAGE 'plperl'", "DO block"),
        ("DO E'BEGIN SET a.b = 1; END\\n'", "DO block"),
        ("DO $$BEGIN PERFORM 1; END$$; SET a.b = 1", "SET a.b"),
    ],
)
def test_do_blocks(sql: str, reason: str) -> None:
    assert classify(sql) == Verdict(reason, False)


@pytest.mark.parametrize(
    "sql",
    [
        "DO $$BEGIN UPDATE t SET x = 1; END$$",
        "DO $$DECLARE reset_at timestamptz; BEGIN UPDATE t SET x = 1 WHERE y = reset_at; END$$",
        "DO $$BEGIN RAISE NOTICE 'SET app.x = 1'; END$$",
        "DO $$BEGIN SET LOCAL app.x = 1; PERFORM set_config('a.b', 'c', true); END$$",
        "DO $$BEGIN PERFORM pg_advisory_xact_lock(1); END$$",
        "DO $$BEGIN CREATE TEMP TABLE t (x int) ON COMMIT DROP; END$$",
        "DO LANGUAGE plpgsql $$BEGIN EXECUTE 'UPDATE t SET x = 1'; END$$",
        "DO $$BEGIN NULL; END$$",
        "DO LANGUAGE plpython3u $$plpy.notice('hello')$$",
    ],
)
def test_do_blocks_that_do_not_pin(sql: str) -> None:
    assert classify(sql) is NOTHING


def test_deep_nesting_pins_without_reading() -> None:
    """Past MAX_DEPTH, a word that could matter pins, unread."""
    inner = "SET a.b = 1"
    for level in range(sessionstate.MAX_DEPTH + 2):
        body, executed = f"$b{level}$", f"$e{level}$"
        inner = f"DO {body}BEGIN EXECUTE {executed}{inner}{executed}; END{body}"
    verdict = classify(inner)
    assert verdict.pin is not None and verdict.pin.startswith("DO block (DO block")
    assert classify(inner.replace("SET a.b = 1", "SELECT 1")) is NOTHING


# ---------------------------------------------------------------------------
# The prefilter and the cache


def test_the_common_path_is_not_lexed(monkeypatch: pytest.MonkeyPatch) -> None:
    def lexed(*args: Any) -> Verdict:
        raise AssertionError("lexed")

    monkeypatch.setattr(sessionstate, "_verdict", lexed)
    for sql in ["SELECT a, b FROM t WHERE c = $1", "INSERT INTO t VALUES (1)", "SELECT 1 OFFSET 5"]:
        assert classify(sql) is NOTHING


@pytest.mark.parametrize(
    ("sql", "lexed"),
    [
        ("UPDATE t SET x = 1", False),
        ('UPDATE ONLY "T" AS u SET x = 1', False),
        ("INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET x = 2", False),
        ("ALTER TABLE t ALTER COLUMN c SET DEFAULT 1", False),
        ("SELECT payload, offset_ms, settings, reset_at FROM t OFFSET 3", False),
        ("SELECT pg_advisory_xact_lock(1)", False),
        ("SET x = 1", True),
        ("SELECT 1; set x = 1", True),
        ("UPDATE t SET x = 1 -- a comment anywhere means lexing", True),
        ("UPDATE t /* here too */ SET x = 1", True),
        ("DO $$BEGIN SET x = 1; END$$", True),
        ("DO $$BEGIN UPDATE t SET x = 1; END$$", False),
        ("DO $$BEGIN IF a THEN SET x = 1; END IF; END$$", True),
        ("DO $$BEGIN EXECUTE $q$SET x = 1$q$; END$$", True),
        ("EXPLAIN ANALYZE SET x", True),
        ("SELECT 1 OFFSET 2; RESET x", True),
        ("SELECT set_config('a', 'b', false)", True),
    ],
)
def test_the_prefilter(sql: str, lexed: bool) -> None:
    assert sessionstate._hasWord(sql) is lexed


def test_answers_are_memoised_by_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessionstate, "_MEMO", {})
    sql = "SET app.memo = 1 -- " + "x" * 100_000
    first = classify(sql)
    assert classify("".join(list(sql))) is first  # an equal text, another object
    assert list(sessionstate._MEMO.values()) == [first]
    assert all(len(key) == 16 for key in sessionstate._MEMO)  # not the texts
    assert classify("SELECT 1") is NOTHING and len(sessionstate._MEMO) == 2
    assert classify("SELECT '\udc80' -- lone surrogate; SET") is NOTHING


def test_the_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessionstate, "_MEMO", {})
    monkeypatch.setattr(sessionstate, "MEMO_SIZE", 3)
    for n in range(7):
        assert classify(f"SET app.x{n} = 1") == Verdict(f"SET app.x{n}")
        assert len(sessionstate._MEMO) <= 3


#: Text built from the pieces the rules and the lexer care about.
_PIECES = st.sampled_from(
    [
        "set", "SET", "sEt", "reset", "listen", "prepare", "declare", "temp", "TEMPORARY",
        "pg_temp", "load", "discard", "deallocate", "all", "do", "set_config",
        "pg_advisory_lock", "pg_try_advisory_lock_shared", "explain", "analyze", "create",
        "select", "into", "with", "hold", "on", "commit", "drop", "local", "session", "role",
        "execute", "begin", "then", "false", "true", "'f'", "'", '"', "$$", "$a$", "$1",
        "--", "/*", "*/", "\n", " ", ";", "(", ")", ",", ".", "::", "E'", "U&", "\\", "x", "_",
        "1", "é", "\x00", "update", "t", '"t"', "else", "loop", "verbose", "$x$", "a$",
    ]
)  # fmt: skip
_TEXT = st.lists(st.one_of(_PIECES, st.characters()), max_size=60).map("".join)


@FUZZ
@given(_TEXT)
@example("$1set app.x = 1")
@example("SELECT 1set_config('a', 'b', false)")
@example("DO $$BEGIN$$;SET a = 1")
@example("set_config(set_config(,,,")
def test_any_text_gets_a_verdict_and_the_prefilter_never_hides_one(sql: str) -> None:
    verdict = uncached(sql)
    assert isinstance(verdict, Verdict)
    assert verdict.pin is None or (isinstance(verdict.pin, str) and verdict.pin)
    assert classify(sql) == verdict
    if not sessionstate._hasWord(sql):
        assert verdict == NOTHING
    else:
        assert any(stem in sql.lower() for stem in sessionstate._STEMS)


@FUZZ
@given(_TEXT)
def test_nothing_inside_a_literal_or_a_comment_counts(text: str) -> None:
    assert classify("SELECT $q$" + text.replace("$q", "") + "$q$") is NOTHING
    assert classify("SELECT 1 /* " + text.replace("/*", "").replace("*/", "") + " */") is NOTHING
    assert classify("SELECT 1 -- " + text.replace("\n", "").replace("\r", "")) is NOTHING
    assert classify("SELECT 'x" + text.replace("'", "''") + "'") is NOTHING


#: Texts built to make a careless classifier slow (quadratic or worse).
_HOSTILE = {
    "set words": lambda n: "SET " * (n // 4),
    "set statements": lambda n: "SET a.b = 1;" * (n // 12),
    "open parentheses": lambda n: "SELECT " + "(" * n,
    "nested set_config": lambda n: "SELECT " + "set_config(" * (n // 11),
    "set_config arguments": lambda n: "SELECT set_config(" + "'a'," * (n // 4) + "false)",
    "closed set_config": lambda n: "SELECT " + "set_config('a', 'b', false) + " * (n // 30),
    "explains": lambda n: "EXPLAIN " * (n // 8) + "SET a.b = 1",
    "explain options": lambda n: "EXPLAIN " + "(" * (n // 2),
    "intos": lambda n: "SELECT 1 " + "INTO temp " * (n // 10),
    "withs": lambda n: "DECLARE c " + "WITH " * (n // 5),
    "on commit": lambda n: "CREATE TEMP TABLE t " + "ON COMMIT " * (n // 10),
    "qualified names": lambda n: "SET " + "a." * (n // 2) + "b",
    "pg_temp names": lambda n: "CREATE TABLE " + "x " * (n // 2),
    "unlocks": lambda n: "SELECT " + "pg_advisory_unlock(1), " * (n // 23),
    "do executes": lambda n: "DO $$BEGIN " + "EXECUTE 'SET a.b';" * (n // 18) + " END$$",
    "do begins": lambda n: "DO $$" + "begin " * (n // 6) + "$$",
    "do strings": lambda n: "DO $$BEGIN EXECUTE " + "'x' || " * (n // 7) + "'SET a';END$$",
    "nested dos": lambda n: (
        "DO $$ " + "EXECUTE 'DO $a$ EXECUTE ''SET x'' $a$'; " * (n // 40) + "$$"
    ),
    "unterminated": lambda n: "SET a = '" + "x" * n,
    "quotes": lambda n: "SET a = " + "'x';" * (n // 4),
}


def _cost(sql: str) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        uncached(sql)
        best = min(best, time.perf_counter() - started)
    return best


@pytest.mark.parametrize("shape", sorted(_HOSTILE))
def test_work_is_linear_in_the_length_of_the_text(shape: str) -> None:
    make = _HOSTILE[shape]
    small, large = _cost(make(5_000)), _cost(make(50_000))
    # Ten times the text: about ten times the work (quadratic would be 100).
    assert large < 35 * small + 0.05, (shape, small, large)


def test_the_modules_are_pure() -> None:
    """No Twisted, no I/O: they import only these."""
    import ast

    from pgtls_twisted.protocol import _refusal

    allowed = {
        "__future__",
        "re",
        "collections.abc",
        "hashlib",
        "typing",
        "pgtls_twisted.protocol._redact",
        "pgtls_twisted.protocol._sessionstate",
        "pgtls_twisted.protocol._sqllex",
        "pgtls_twisted.protocol._txstate",
    }
    for module in (sessionstate, _refusal):
        tree = ast.parse(open(module.__file__ or "", encoding="utf-8").read())
        imported = {
            node.module if isinstance(node, ast.ImportFrom) else alias.name
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in node.names
        }
        assert imported <= allowed, (module.__name__, imported)


# ---------------------------------------------------------------------------
# The refusal


def test_the_refusal_is_a_do_block_that_raises_0A000() -> None:
    sql = refusal("SET app.tenant_id")
    message = (
        "pgtls: SET app.tenant_id would pin the client to one server connection in transaction"
        ' pooling, and pool.pinning = "refuse"'
    )
    assert sql == (
        "DO $pgtls$BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', "
        f"MESSAGE = '{message}', HINT = '{HINT}'; END$pgtls$"
    )
    assert sql.isascii() and classify(sql) is NOTHING


def test_the_refusal_quotes_anything_safely() -> None:
    reason = "SET \"it's\\ $pgtls$ \x00\u00e9\n" + "x" * 500
    sql = refusal(reason, "SET a = 'it''s' $pgtls1$;\x00 ALTER ROLE bob PASSWORD 'secret'")
    assert sql.isascii() and "\x00" not in sql and "secret" not in sql
    assert sql.startswith("DO $pgtls2$BEGIN ") and sql.endswith("; END$pgtls2$")
    assert sql.count("$pgtls2$") == 2
    shown = ("SET \"it's\\ $pgtls$ ???" + "x" * 500)[:200] + "..."
    quoted = shown.replace("'", "''").replace("\\", "\\\\")
    assert f"MESSAGE = E'pgtls: {quoted} would pin" in sql


def superuser(cluster: PostgresCluster) -> psycopg.Connection[Any]:
    """A connection as the cluster's superuser, that prepares no statements of its own."""
    conn = psycopg.connect(
        cluster.dsn(host=str(cluster.socket_dir), user=SUPERUSER),
        autocommit=True,
        connect_timeout=10,
    )
    conn.prepare_threshold = None
    return conn


@pytest.mark.parametrize("cursor", [psycopg.Cursor, psycopg.ClientCursor], ids=["parse", "query"])
def test_the_server_raises_the_refusal(pg_plain: PostgresCluster, cursor: Any) -> None:
    reason = "SET \"it's\\$pgtls$ \u00e9"
    statement = "SET \"it's\\$pgtls$ \u00e9\" = 1;\n ALTER ROLE bob PASSWORD 'secret'"
    with superuser(pg_plain) as conn:
        # Its literals mean the same whatever standard_conforming_strings is.
        conn.execute("SET standard_conforming_strings = off")
        with pytest.raises(psycopg.errors.FeatureNotSupported) as caught:
            cursor(conn).execute(refusal(reason, statement))
        diag = caught.value.diag
        assert diag.sqlstate == "0A000"
        assert diag.message_primary == (
            "pgtls: SET \"it's\\$pgtls$ ? would pin the client to one server connection in"
            ' transaction pooling, and pool.pinning = "refuse"'
        )
        assert diag.message_hint == HINT
        assert diag.message_detail == (
            "Statement: SET \"it's\\$pgtls$ ?\" = 1; ALTER ROLE bob PASSWORD '***'"
        )
        assert conn.execute("SELECT 1").fetchone() == (1,)


# ---------------------------------------------------------------------------
# The oracle: which statements leave a session other than it was?

#: What a client could see of its session: settings (tracked ones aside, which pgtls
#: re-applies, and PL/pgSQL's, defined when it is first loaded), those of the custom
#: ones below that are set, temporary objects, channels, prepared statements,
#: cursors, advisory locks, roles.
_FINGERPRINT = """
SELECT
  ARRAY(
    SELECT name || '=' || setting FROM pg_settings
    WHERE lower(name) <> ALL(%s) AND name NOT LIKE 'plpgsql.%%' ORDER BY 1
  ),
  ARRAY(
    SELECT coalesce(current_setting('app.' || name, true), '')
    FROM unnest('{tenant_id,x,y,z,q}'::text[]) AS name
  ),
  (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema())
    + (SELECT count(*) FROM pg_proc WHERE pronamespace = pg_my_temp_schema()),
  ARRAY(SELECT pg_listening_channels() ORDER BY 1),
  (SELECT count(*) FROM pg_prepared_statements),
  (SELECT count(*) FROM pg_cursors),
  (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()),
  current_user, session_user
"""

LEAKS = [
    "SET app.tenant_id = 'A'",
    "SET statement_timeout = '1h'",
    "set session search_path = public, pg_catalog",
    "SET ROLE trust_user",
    "SET SESSION AUTHORIZATION trust_user",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "SET XML OPTION DOCUMENT",
    "LISTEN sstate_oracle",
    "PREPARE sstate_oracle AS SELECT 1",
    "DECLARE sstate_oracle CURSOR WITH HOLD FOR SELECT 1",
    "CREATE TEMP TABLE t (x int)",
    "CREATE TEMP TABLE t (x int) ON COMMIT DELETE ROWS",
    "CREATE GLOBAL TEMPORARY TABLE t (x int)",
    "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
    "CREATE TEMP SEQUENCE s",
    "SELECT 1 AS x INTO TEMP t",
    "SELECT 1 AS x INTO TEMPORARY TABLE t",
    "CREATE TABLE pg_temp.t (x int)",
    "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "SELECT pg_advisory_lock(912345)",
    "SELECT pg_catalog.pg_try_advisory_lock_shared(912345)",
    "SELECT set_config('app.x', 'y', false)",
    "SELECT set_config('app.x', 'y', 'off')",
    "EXPLAIN ANALYZE CREATE TEMP TABLE t AS SELECT 1",
    "EXPLAIN (ANALYZE, COSTS OFF) SELECT pg_advisory_lock(912345)",
    "DO $$BEGIN PERFORM set_config('app.y', '1', false); END$$",
    "DO $$BEGIN IF true THEN SET search_path = public; END IF; END$$",
    "DO $$BEGIN EXECUTE 'LISTEN sstate_oracle'; END$$",
    "/* c */ set  App.X = 1",
    "SELECT 1; SET app.z = 1",
    "BEGIN; SET app.q = 1; COMMIT",
    "BEGIN; LISTEN sstate_oracle; COMMIT",
]

SAFE = [
    "SELECT 1",
    "SET LOCAL app.x = 1",
    "BEGIN; SET LOCAL app.x = 1; SET LOCAL ROLE trust_user; COMMIT",
    "SET TIME ZONE 'UTC'",
    "SET NAMES 'UTF8'",
    "SET application_name = 'x'",
    "SET DateStyle = 'ISO, DMY'",
    "SET IntervalStyle = iso_8601",
    "RESET TimeZone",
    "BEGIN; SET TRANSACTION READ ONLY; COMMIT",
    "BEGIN; SET CONSTRAINTS ALL DEFERRED; COMMIT",
    "UNLISTEN *",
    "SELECT pg_advisory_xact_lock(912345)",
    "SELECT pg_advisory_unlock_all()",
    "SELECT set_config('app.x', 'y', true)",
    "SELECT set_config('TimeZone', 'UTC', false)",
    "SELECT set_config('app.x', 'y', 't')",
    "BEGIN; DECLARE c CURSOR FOR SELECT 1; COMMIT",
    "BEGIN; DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1; COMMIT",
    "CREATE TEMP TABLE t (x int) ON COMMIT DROP",
    "BEGIN; CREATE TEMP TABLE t (x int) ON COMMIT DROP; COMMIT",
    "DROP TABLE IF EXISTS temp; SELECT 1 AS x INTO temp; DROP TABLE temp",
    "SELECT 'SET app.x = 1', $$LISTEN x$$",
    "SELECT 1 -- ; SET app.x = 1",
    "DO $$BEGIN CREATE TEMP TABLE t (x int) ON COMMIT DROP; END$$",
    "DO $$BEGIN RAISE NOTICE 'SET app.x = 1'; END$$",
    "DISCARD ALL",
    "DEALLOCATE ALL",
]


def _leaves_state(cluster: PostgresCluster, sql: str) -> bool:
    """Whether running C{sql} (as a simple Query) on a new session changes its fingerprint."""
    tracked = [name.lower() for name in TRACKED_PARAMETERS]
    with superuser(cluster) as conn:
        before = conn.execute(_FINGERPRINT, [tracked]).fetchall()
        psycopg.ClientCursor(conn).execute(sql)
        after = conn.execute(_FINGERPRINT, [tracked]).fetchall()
    return before != after


@pytest.mark.parametrize("sql", LEAKS)
def test_what_leaves_state_on_the_server_pins(pg_plain: PostgresCluster, sql: str) -> None:
    assert _leaves_state(pg_plain, sql)
    assert classify(sql).pin is not None


@pytest.mark.parametrize("sql", SAFE)
def test_what_leaves_no_state_on_the_server_does_not_pin(
    pg_plain: PostgresCluster, sql: str
) -> None:
    assert not _leaves_state(pg_plain, sql)
    assert classify(sql).pin is None
