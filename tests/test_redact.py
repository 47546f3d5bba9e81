"""
Unit tests of the SQL lexer (pgtls_twisted.protocol._sqllex) and of password
redaction (pgtls_twisted.protocol._redact), issue 10 item 6: every quoting form
PostgreSQL has, cut texts, and hostile input.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from support.fuzz import fuzz

from pgtls_twisted.protocol import _sqllex as sqllex
from pgtls_twisted.protocol._redact import MARKER, redact
from pgtls_twisted.protocol._sqllex import (
    COMMENT,
    NUMBER,
    OPERATOR,
    OTHER,
    PARAM,
    PUNCT,
    QUOTED,
    STRING,
    WHITESPACE,
    WORD,
    significant,
    tokens,
)

FUZZ = fuzz(400)


def lexed(sql: str) -> list[tuple[str, str]]:
    """The significant tokens of C{sql} as C{(kind, text)}."""
    return [(t.kind, t.text(sql)) for t in significant(sql)]


# ---------------------------------------------------------------------------
# The lexer: one test per quoting rule


def test_plain_literal_doubles_quotes_and_keeps_backslashes():
    # standard_conforming_strings = on: a backslash is an ordinary character.
    sql = r"SELECT 'it''s', 'a\' , 'b'"
    assert lexed(sql) == [
        (WORD, "SELECT"),
        (STRING, "'it''s'"),
        (PUNCT, ","),
        (STRING, r"'a\'"),
        (PUNCT, ","),
        (STRING, "'b'"),
    ]


@pytest.mark.parametrize("prefix", ["E", "e"])
def test_escape_string_backslash_quote(prefix):
    sql = prefix + r"'a\'b\\' x"
    assert lexed(sql) == [(STRING, prefix + r"'a\'b\\'"), (WORD, "x")]
    sql = prefix + r"'a''b' x"
    assert lexed(sql) == [(STRING, prefix + "'a''b'"), (WORD, "x")]


def test_prefixed_literals_and_identifiers():
    sql = "N'n' B'101' X'ff' U&'d\\0061t' U&\"d\\0061t\" u&'x'"
    assert lexed(sql) == [
        (STRING, "N'n'"),
        (STRING, "B'101'"),
        (STRING, "X'ff'"),
        (STRING, "U&'d\\0061t'"),
        (QUOTED, 'U&"d\\0061t"'),
        (STRING, "u&'x'"),
    ]
    # A prefix only counts right before the quote, at the start of a word.
    assert lexed("ee'x' e 'y'") == [(WORD, "ee"), (STRING, "'x'"), (WORD, "e"), (STRING, "'y'")]


def test_a_literal_continued_on_another_line_is_one_literal():
    sql = "SELECT 'a'\n  'b' -- note\n 'c', 'd' 'e'"
    assert lexed(sql) == [
        (WORD, "SELECT"),
        (STRING, "'a'\n  'b' -- note\n 'c'"),
        (PUNCT, ","),
        # No newline between: two literals (a syntax error for PostgreSQL).
        (STRING, "'d'"),
        (STRING, "'e'"),
    ]
    assert lexed("E'a\\''\n'b\\'c' x") == [(STRING, "E'a\\''\n'b\\'c'"), (WORD, "x")]


def test_dollar_quotes_with_and_without_tags():
    sql = "$$a 'b' $x$ c$$ $fn$ $$ not the end $fn$ $_1$x$_1$ $1 $2x"
    assert lexed(sql) == [
        (STRING, "$$a 'b' $x$ c$$"),
        (STRING, "$fn$ $$ not the end $fn$"),
        (STRING, "$_1$x$_1$"),
        (PARAM, "$1"),
        (PARAM, "$2"),
        (WORD, "x"),
    ]
    # A tag cannot start with a digit, and is case-sensitive.
    assert lexed("$1a$ $A$ x $a$ y $A$") == [
        (PARAM, "$1"),
        (WORD, "a$"),
        (STRING, "$A$ x $a$ y $A$"),
    ]
    # Inside an identifier, $ is an identifier character, not a quote.
    assert lexed("foo$$bar 'x'") == [(WORD, "foo$$bar"), (STRING, "'x'")]
    assert lexed("$ $a") == [(OTHER, "$"), (OTHER, "$"), (WORD, "a")]


def test_quoted_identifiers():
    sql = 'SELECT "a""b", "password", "x'
    found = list(significant(sql))
    assert [(t.kind, t.text(sql)) for t in found] == [
        (WORD, "SELECT"),
        (QUOTED, '"a""b"'),
        (PUNCT, ","),
        (QUOTED, '"password"'),
        (PUNCT, ","),
        (QUOTED, '"x'),
    ]
    assert [t.name(sql) for t in found] == ["select", 'a"b', None, "password", None, "x"]
    assert [t.complete for t in found] == [True, True, True, True, True, False]


def test_comments_nest_and_end_lines():
    sql = "a /* one /* two */ still */ b -- c 'd\n e /*/ f */ g /* x */* y */ h /*/*/ i"
    assert lexed(sql) == [
        (WORD, "a"),
        (WORD, "b"),
        (WORD, "e"),
        (WORD, "g"),
        (OPERATOR, "*"),
        (WORD, "y"),
        (OPERATOR, "*/"),
        (WORD, "h"),
    ]
    comments = [t.text(sql) for t in tokens(sql) if t.kind == COMMENT]
    # The last one opens twice and closes once: it runs to the end.
    assert comments == ["/* one /* two */ still */", "-- c 'd", "/*/ f */", "/* x */", "/*/*/ i"]
    assert lexed("-- a\rb") == [(WORD, "b")]


def test_an_operator_stops_where_a_comment_starts():
    assert lexed("a+-- c\n-b <>/* c */= 1 @>'x'") == [
        (WORD, "a"),
        (OPERATOR, "+"),
        (OPERATOR, "-"),
        (WORD, "b"),
        (OPERATOR, "<>"),
        (OPERATOR, "="),
        (NUMBER, "1"),
        (OPERATOR, "@>"),
        (STRING, "'x'"),
    ]


def test_cut_texts_end_inside_a_token():
    for sql, kind in [
        ("SELECT 'abc", STRING),
        ("SELECT E'ab\\'", STRING),
        ("SELECT 'ab''", STRING),
        ("SELECT $t$abc $t", STRING),
        ('SELECT "ab', QUOTED),
        ("SELECT /* a /* b */", COMMENT),
    ]:
        last = list(tokens(sql))[-1]
        assert (last.kind, last.complete, last.end) == (kind, False, len(sql)), sql


def test_other_characters_and_words():
    sql = "SELECT x.y, 1.5e3, .5, café, _a1$ FROM t WHERE a[1] :: int \\ {"
    kinds = lexed(sql)
    assert (WORD, "café") in kinds and (WORD, "_a1$") in kinds
    assert (NUMBER, "1.5e3") in kinds and (NUMBER, ".5") in kinds
    assert kinds[-2:] == [(OTHER, "\\"), (OTHER, "{")]
    assert [t.kind for t in tokens("a \t\n\r\f\vb")] == [WORD, WHITESPACE, WORD]


def test_word_names_fold_ascii_only():
    sql = "PassWord ÉTÉ"
    assert [t.name(sql) for t in significant(sql)] == ["password", "ÉtÉ"]


# ---------------------------------------------------------------------------
# Redaction

REDACTED = [
    ("ALTER ROLE bob PASSWORD 'secret'", "ALTER ROLE bob PASSWORD '***'"),
    ("alter role bob with login password 'secret' valid until 'infinity'",
     "alter role bob with login password '***' valid until 'infinity'"),
    ("CREATE ROLE bob PASSWORD 'sec''ret' LOGIN", "CREATE ROLE bob PASSWORD '***' LOGIN"),
    ("CREATE USER bob WITH ENCRYPTED PASSWORD 'secret'",
     "CREATE USER bob WITH ENCRYPTED PASSWORD '***'"),
    ("ALTER USER bob PASSWORD E'sec\\'ret' LOGIN", "ALTER USER bob PASSWORD '***' LOGIN"),
    ("ALTER USER bob PASSWORD e'sec\\\\' LOGIN", "ALTER USER bob PASSWORD '***' LOGIN"),
    ("ALTER USER bob PASSWORD $$sec'ret$$", "ALTER USER bob PASSWORD '***'"),
    ("ALTER USER bob PASSWORD $pw$sec$$ret$pw$ LOGIN", "ALTER USER bob PASSWORD '***' LOGIN"),
    ("ALTER USER bob PASSWORD U&'sec\\0072et'", "ALTER USER bob PASSWORD '***'"),
    ("ALTER USER bob PASSWORD N'secret'", "ALTER USER bob PASSWORD '***'"),
    ("ALTER ROLE bob PASSWORD /* why */ -- not\n 'secret'",
     "ALTER ROLE bob PASSWORD /* why */ -- not\n '***'"),
    ("ALTER ROLE bob PASSWORD 'sec'\n'ret' LOGIN", "ALTER ROLE bob PASSWORD '***' LOGIN"),
    ("ALTER ROLE bob PASSWORD 'SCRAM-SHA-256$4096:abc=$def=:ghi='",
     "ALTER ROLE bob PASSWORD '***'"),
    ("CREATE USER MAPPING FOR bob SERVER s OPTIONS (user 'bob', password 'secret')",
     "CREATE USER MAPPING FOR bob SERVER s OPTIONS (user 'bob', password '***')"),
    ("CREATE USER MAPPING FOR bob SERVER s OPTIONS (password 'secret', user 'bob')",
     "CREATE USER MAPPING FOR bob SERVER s OPTIONS (password '***', user 'bob')"),
    ("ALTER USER MAPPING FOR bob SERVER s OPTIONS (SET password 'secret', ADD PASSWORD 'x')",
     "ALTER USER MAPPING FOR bob SERVER s OPTIONS (SET password '***', ADD PASSWORD '***')"),
    ('CREATE SERVER s FOREIGN DATA WRAPPER w OPTIONS (host \'h\', "password" \'secret\')',
     'CREATE SERVER s FOREIGN DATA WRAPPER w OPTIONS (host \'h\', "password" \'***\')'),
    ("CREATE SUBSCRIPTION s CONNECTION 'host=h password=secret' PUBLICATION p",
     "CREATE SUBSCRIPTION s CONNECTION '***' PUBLICATION p"),
    # Several statements in one Query, each redacted.
    ("SELECT 1; ALTER ROLE a PASSWORD 'one';ALTER ROLE b PASSWORD 'two'; SELECT 'password'",
     "SELECT 1; ALTER ROLE a PASSWORD '***';ALTER ROLE b PASSWORD '***'; SELECT 'password'"),
    # Statements in a dollar-quoted body (a migration's DO block).
    ("DO $$ BEGIN IF NOT EXISTS (SELECT) THEN CREATE ROLE app LOGIN PASSWORD 'secret'; "
     "END IF; END $$",
     "DO $$ BEGIN IF NOT EXISTS (SELECT) THEN CREATE ROLE app LOGIN PASSWORD '***'; "
     "END IF; END $$"),
    ("DO $a$ BEGIN EXECUTE $b$ALTER ROLE x PASSWORD 'secret'$b$; END $a$",
     "DO $a$ BEGIN EXECUTE $b$ALTER ROLE x PASSWORD '***'$b$; END $a$"),
]  # fmt: skip


@pytest.mark.parametrize(("sql", "expected"), REDACTED)
def test_redacts_passwords(sql, expected):
    assert redact(sql) == expected
    assert redact(expected) == expected


NOT_REDACTED = [
    "SELECT password FROM users WHERE password = 'x' AND name = 'bob'",
    "SELECT 'PASSWORD ''x'''",
    "SELECT E'PASSWORD \\'x\\''",
    "SELECT $$ PASSWORD $$, 'x'",
    "SELECT /* PASSWORD */ 'x'",
    "SELECT 1 -- PASSWORD\n, 'x'",
    'SELECT "PASSWORD ""x""" FROM t',
    "ALTER ROLE bob PASSWORD NULL",
    "ALTER ROLE bob LOGIN CONNECTION LIMIT 5",
    "UPDATE t SET password = 'x'",
    "SELECT passwords 'x', my_password 'y', t.password_hash",
    "SELECT password, 'x' FROM t",
]


@pytest.mark.parametrize("sql", NOT_REDACTED)
def test_leaves_other_texts_alone(sql):
    assert redact(sql) == sql


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER ROLE bob PASSWORD 'hunter2-secret' LOGIN",
        "ALTER ROLE bob PASSWORD E'hunter2\\'-secret' LOGIN",
        "ALTER ROLE bob PASSWORD $tag$hunter2-secret$tag$ LOGIN",
        "ALTER ROLE bob PASSWORD 'hunter2-'\n'secret' LOGIN",
        "CREATE USER MAPPING FOR bob SERVER s OPTIONS (password 'hunter2-secret')",
    ],
)
def test_a_text_cut_inside_the_literal_is_redacted_to_its_end(sql):
    start = sql.index("hunter2") - 1
    while sql[start - 1] not in " (":
        start -= 1  # back to the literal's first character ($tag$, E')
    end = sql.index(" LOGIN") if "LOGIN" in sql else len(sql) - 1
    for cut in range(sql.index("hunter2"), end + 1):
        assert redact(sql[:cut]).rstrip() == sql[:start] + MARKER, sql[:cut]


def test_a_cut_before_the_literal_leaves_nothing_to_redact():
    assert redact("ALTER ROLE bob PASSWORD") == "ALTER ROLE bob PASSWORD"
    assert redact("ALTER ROLE bob PASSWO") == "ALTER ROLE bob PASSWO"


# ---------------------------------------------------------------------------
# Hostile input: any text, linear time

#: Characters that mean something to the lexer, over-represented.
_SPECIAL = st.sampled_from(list("'\"$/*-\\eEuU&nNbBxX\n\r\t ;(),:.0123456789=+") + ["password"])
_TEXT = st.lists(st.one_of(_SPECIAL, st.characters()), max_size=80).map("".join)


@FUZZ
@given(_TEXT)
@example("$a$ $a")
@example("/*/*/")
@example("E'\\")
@example("U&")
def test_any_text_lexes_into_tokens_that_cover_it(sql):
    found = list(tokens(sql))
    assert "".join(t.text(sql) for t in found) == sql
    assert all(t.end > t.start for t in found)
    assert all(t.complete or t.end == len(sql) for t in found)


@FUZZ
@given(_TEXT)
def test_redact_never_raises_and_is_stable(sql):
    once = redact(sql)
    assert redact(once) == once
    if "password" not in sql.lower() and "connection" not in sql.lower():
        assert once is sql


_LITERALS = [
    lambda s: "'" + s.replace("'", "''") + "'",
    lambda s: "E'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'",
    lambda s: "U&'" + s.replace("'", "''") + "'",
    lambda s: "$q$" + s.replace("$", "") + "$q$",
]


@FUZZ
@given(
    st.text(min_size=1, max_size=40),
    st.sampled_from(range(len(_LITERALS))),
    st.sampled_from(["", "SELECT 1; ", "/* c */ ", "-- c\n"]),
    st.sampled_from(["", " LOGIN", "; SELECT 'x'", " -- done"]),
    st.sampled_from(["PASSWORD", "password", "ENCRYPTED PASSWORD"]),
)
def test_no_password_survives_whatever_it_holds(secret, form, before, after, keyword):
    literal = _LITERALS[form](secret)
    sql = f"{before}ALTER ROLE bob {keyword} {literal}{after}"
    assert redact(sql) == f"{before}ALTER ROLE bob {keyword} {MARKER}{after}"
    options = f"{before}CREATE USER MAPPING FOR bob SERVER s OPTIONS (user 'u', password {literal})"
    assert redact(options).endswith(f"password {MARKER})")


#: Texts built to make a careless lexer slow (quadratic or worse).
_HOSTILE = {
    "nested comments": lambda n: "/*" * n,
    "comment closers": lambda n: "*/" * n,
    "doubled quotes": lambda n: "'" + "''" * n,
    "backslashes": lambda n: "E'" + "\\" * n,
    "long dollar tags": lambda n: "$" + "a" * (n // 4) + "$" + ("a" * (n // 4 - 1) + "$") * 3,
    "dollar tag starts": lambda n: "$a$" + "$a" * n,
    "whitespace after a literal": lambda n: "'a'\n" + " " * n + "x",
    "comments after a literal": lambda n: "'a'" + "\n--x" * (n // 4),
    "operators and comments": lambda n: "+/**/" * (n // 5),
    "dashes": lambda n: "'a' " + "-" * n,
    "password words": lambda n: "password " * (n // 9),
    "password literals": lambda n: "password 'x' " * (n // 13),
    "dollar bodies": lambda n: "password " + "$a$" * (n // 3),
    "quoted identifiers": lambda n: '"' + '""' * n,
    "line comments": lambda n: "--x\n" * (n // 4),
}


def _cost(sql: str) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in tokens(sql):
            pass
        redact(sql)
        best = min(best, time.perf_counter() - started)
    return best


@pytest.mark.parametrize("shape", sorted(_HOSTILE))
def test_work_is_linear_in_the_length_of_the_text(shape):
    make = _HOSTILE[shape]
    small, large = _cost(make(5_000)), _cost(make(50_000))
    # Ten times the text: about ten times the work (quadratic would be 100).
    assert large < 35 * small + 0.05, (shape, small, large)
    for sql in (make(5_000), make(1_000)):
        assert "".join(t.text(sql) for t in tokens(sql)) == sql


def test_lexer_and_redaction_are_pure_python():
    """Reusable anywhere (no Twisted, no I/O): they import only these."""
    import ast

    from pgtls_twisted.protocol import _redact as redact_module

    allowed = {"__future__", "re", "collections.abc", "typing", "pgtls_twisted.protocol._sqllex"}
    for module in (sqllex, redact_module):
        tree = ast.parse(open(module.__file__, encoding="utf-8").read())
        imported = {
            node.module if isinstance(node, ast.ImportFrom) else alias.name
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in node.names
        }
        assert imported <= allowed, (module.__name__, imported)
