# -*- test-case-name: tests.test_redact -*-
"""
Passwords out of statement texts, before they are logged.

PostgreSQL takes passwords as string literals in a statement's text:

 - C{CREATE ROLE} / C{ALTER ROLE} / C{CREATE USER} / C{ALTER USER} ...
   C{[ENCRYPTED] PASSWORD '...'} (psql's C{\\password} sends the same,
   with a SCRAM verifier);
 - the C{password} option of C{CREATE}/C{ALTER USER MAPPING} and
   C{CREATE}/C{ALTER SERVER}: C{OPTIONS (user 'x', password '...')},
   C{OPTIONS (SET password '...')}, C{OPTIONS ("password" '...')}, and
   the same for C{sslpassword} (postgres_fdw's key passphrase);
 - C{CREATE}/C{ALTER SUBSCRIPTION} ... C{CONNECTION '...'}, a libpq
   connection string that often holds C{password=...}.

L{redact} replaces such a literal, whatever its quoting (C{'...'},
C{E'...'}, C{U&'...'}, C{$$...$$}, continued over lines), with
L{MARKER}. The rule is one, and lexical: a string literal whose
previous token (comments and whitespace aside) is the word C{password}
(in any case, quoted or not) or the keyword C{connection}. It finds the
literal with L{pgtls_twisted.protocol._sqllex}'s tokens, so a C{password} inside a
literal or a comment is left alone (C{SELECT 'PASSWORD ''x'''}), and so
is a column named C{password} (C{WHERE password = ...}, where the next
token is an operator). Statements inside a dollar-quoted body (a C{DO}
block, a function) are redacted by the same rule.

A text cut inside the literal (the query log sees only a statement's
first 2 KiB) is redacted to its end. Several statements in one text are
each redacted.

What this cannot see: a password built at run time
(C{EXECUTE 'ALTER ROLE x PASSWORD ' || quote_literal(...)}, or inside a
literal that is itself SQL, C{EXECUTE 'ALTER ROLE x PASSWORD ''s'''}),
passed as a Bind parameter (never logged anyway), in a connection string
given to a function (C{dblink_connect('... password=...')}), or written
with C{standard_conforming_strings = off} backslash escapes in a plain
literal.
"""

from __future__ import annotations

from pgtls_twisted.protocol._sqllex import (
    QUOTED,
    STRING,
    WORD,
    Token,
    ascii_lower,
    dollar_body,
    significant,
)

#: What a redacted literal becomes: still a literal, so the statement reads as before.
MARKER = "'***'"

#: How deep dollar-quoted bodies inside dollar-quoted bodies are searched
#: (each level lexes its text again, so the work stays linear).
MAX_DEPTH = 4

#: Words (lower case) whose next literal is a secret; any quoting for C{password}.
_SECRET_NAMES = frozenset({"password", "sslpassword"})
#: Keywords (unquoted only) whose next literal is a secret.
_SECRET_KEYWORDS = frozenset({"password", "sslpassword", "connection"})


def redact(sql: str) -> str:
    """C{sql} with every password literal replaced by L{MARKER}; never raises."""
    return _redact(sql, 0)


def _redact(sql: str, depth: int) -> str:
    lowered = sql.lower()
    if "password" not in lowered and "connection" not in lowered:
        # No token can name either: nothing to redact (the common case, fast).
        return sql
    out: list[str] = []
    copied = 0
    secretNext = False
    for token in significant(sql):
        replacement: str | None = None
        if token.kind == STRING:
            if secretNext:
                replacement = MARKER
            elif depth < MAX_DEPTH:
                replacement = _redactBody(sql, token, depth)
        if replacement is not None:
            out.append(sql[copied : token.start])
            out.append(replacement)
            copied = token.end
        secretNext = _namesASecret(sql, token)
    if not out:
        return sql
    out.append(sql[copied:])
    return "".join(out)


def _namesASecret(sql: str, token: Token) -> bool:
    """Whether the literal after C{token} is a secret."""
    if token.kind == WORD:
        return token.name(sql) in _SECRET_KEYWORDS
    if token.kind == QUOTED:
        # "Password" is not the option postgres_fdw reads, but cannot hurt to hide.
        return ascii_lower(token.name(sql) or "") in _SECRET_NAMES
    return False


def _redactBody(sql: str, token: Token, depth: int) -> str | None:
    """A dollar-quoted literal with its body redacted, or C{None} if nothing changed."""
    span = dollar_body(sql, token)
    if span is None:
        return None
    start, end = span
    body = sql[start:end]
    redacted = _redact(body, depth + 1)
    if redacted is body:
        return None
    return sql[token.start : start] + redacted + sql[end : token.end]
