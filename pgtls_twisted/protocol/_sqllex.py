# -*- test-case-name: tests.test_redact -*-
"""
A lexer for PostgreSQL's SQL: where each token starts and ends, not what
the statement means.

pgtls reads statement texts it did not write (the query log's peek of
Query and Parse messages) and must never misjudge where a string literal
or a comment starts and ends: a password hidden from a search over the
raw text by a comment, a dollar quote or an escaped quote would otherwise
reach a log. So the text is cut into tokens with PostgreSQL's own quoting
rules (C{src/backend/parser/scan.l}):

 - C{'...'} with C{''} for a quote; backslashes are not special
   (C{standard_conforming_strings = on}, the default since PostgreSQL 9.1);
 - C{E'...'} (or C{e'...'}) with backslash escapes (C{\\'}) as well;
 - C{N'...'} and C{U&'...'} (whose C{\\} escapes never hide a quote);
   C{B'...'} and C{X'...'}, which end at the first quote;
 - a literal continued on a later line (C{'a'} newline C{'b'} is one
   literal, C{'ab'}), as PostgreSQL joins them;
 - C{$$...$$} and C{$tag$...$tag$} (a tag is identifier characters, not
   starting with a digit, and not C{$}; C{$1} is a parameter);
 - C{"..."} and C{U&"..."} identifiers with C{""} for a quote;
 - C{--} comments to the end of the line and C{/* ... */} comments, which
   nest (C{/* a /* b */ c */} is one comment);
 - an operator never swallows the C{--} or C{/*} that starts a comment.

A statement may be cut anywhere (the query log sees at most 2 KiB of it):
a literal, identifier or comment that the text ends inside is a token
that runs to the end, with C{complete} false.

The lexer accepts any text: a character SQL has no use for is an L{OTHER}
token, never an exception, and the work done is linear in the length of
the text (every search resumes where the previous one stopped; no regular
expression here can backtrack over more than one character), so a hostile
statement costs no more than a long one.

Nothing here knows about Twisted: it is meant to be reused wherever
pgtls needs to recognise statements (for example which ones change
session state), by walking L{tokens} and looking at L{Token.name} of the
words.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import NamedTuple

# -- token kinds ---------------------------------------------------------------------

#: Spaces, tabs, newlines, form feeds, vertical tabs.
WHITESPACE = "whitespace"
#: C{-- ...} or C{/* ... */}.
COMMENT = "comment"
#: A keyword or an unquoted identifier (L{Token.name} folds it to lower case).
WORD = "word"
#: A double-quoted identifier, C{"..."} or C{U&"..."}.
QUOTED = "quoted"
#: Any string literal: quoted in any of the forms above, or dollar-quoted.
STRING = "string"
#: A numeric constant.
NUMBER = "number"
#: A positional parameter, C{$1}.
PARAM = "param"
#: An operator, C{=}, C{<>}, C{||}, C{->>}, ...
OPERATOR = "operator"
#: One of C{( ) [ ] , ; : .}: C{;} ends a statement.
PUNCT = "punct"
#: A character that has no place in SQL (C{\\}, C{{}, a control character, a
#: C{$} that starts nothing).
OTHER = "other"


class Token(NamedTuple):
    """
    One token: C{sql[start:end]}.

    @ivar complete: false when the text ended inside the token (a literal,
        quoted identifier or block comment that is not closed).
    """

    kind: str
    start: int
    end: int
    complete: bool = True

    def text(self, sql: str) -> str:
        return sql[self.start : self.end]

    def name(self, sql: str) -> str | None:
        """
        The identifier a L{WORD} or L{QUOTED} token names, as PostgreSQL
        would: a word folded to lower case (ASCII letters only, as
        PostgreSQL does for UTF-8), a quoted one unquoted. C{None} for
        other kinds. (C{U&"..."}'s escapes are not decoded.)
        """
        text = sql[self.start : self.end]
        if self.kind == WORD:
            return ascii_lower(text)
        if self.kind == QUOTED:
            opening = text.index('"')
            inner = text[opening + 1 : -1 if self.complete else None]
            return inner.replace('""', '"')
        return None


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(text: str) -> str:
    """C{text} with ASCII letters in lower case, and no other change (PostgreSQL's folding)."""
    return text.translate(_ASCII_LOWER)


# -- character classes (scan.l) ----------------------------------------------------------

_SPACE = " \t\n\r\f\v"
_NEWLINE = "\n\r"
_PUNCT = ",()[];:."
#: PostgreSQL's op_chars.
_OP_CHARS = "~!@#^&|`?+-*/%<>="
_DIGITS = "0123456789"

_WHITESPACE_RUN = re.compile(r"[ \t\n\r\f\v]+")
#: An identifier: a letter, C{_} or any non-ASCII character, then those, digits and C{$}.
_IDENTIFIER = re.compile(r"[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*")
#: A dollar-quote delimiter: C{$$} or C{$tag$}.
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*)?\$")
_PARAMETER = re.compile(r"\$[0-9]+")
#: A number, roughly (C{1}, C{1.5e10}, C{.5}, C{0x1F}, C{1_000}): what it is does not matter here.
_NUMBER = re.compile(r"\.?[0-9][0-9A-Za-z_.]*")
#: Operator characters, stopping before a C{--} or C{/*} (which start comments).
_OPERATOR = re.compile(r"(?:[~!@#^&|`?+*%<>=]|-(?!-)|/(?!\*))+")
_NEWLINE_CHAR = re.compile(r"[\n\r]")
_COMMENT_MARK = re.compile(r"/\*|\*/")
_QUOTE_OR_BACKSLASH = re.compile(r"['\\]")

# How a quoted literal's body is read.
_STANDARD, _BACKSLASH, _BITS = range(3)


def tokens(sql: str) -> Iterator[Token]:
    """Every token of C{sql}, in order; together they cover all of it."""
    pos, end = 0, len(sql)
    while pos < end:
        token = _token(sql, pos)
        yield token
        pos = token.end


def significant(sql: str) -> Iterator[Token]:
    """L{tokens} without whitespace and comments."""
    return (t for t in tokens(sql) if t.kind != WHITESPACE and t.kind != COMMENT)


def dollar_body(sql: str, token: Token) -> tuple[int, int] | None:
    """Where the text of a dollar-quoted L{STRING} is (C{None} for other tokens)."""
    if token.kind != STRING or sql[token.start] != "$":
        return None
    match = _DOLLAR_TAG.match(sql, token.start)
    assert match is not None
    tag = len(match.group())
    return token.start + tag, token.end - tag if token.complete else token.end


def _token(sql: str, pos: int) -> Token:
    """The token starting at C{pos} (at least one character long)."""
    c = sql[pos]
    nxt = sql[pos + 1 : pos + 2]
    if c in _SPACE:
        match = _WHITESPACE_RUN.match(sql, pos)
        assert match is not None
        return Token(WHITESPACE, pos, match.end())
    if c == "-" and nxt == "-":
        return Token(COMMENT, pos, _lineEnd(sql, pos))
    if c == "/" and nxt == "*":
        return _blockComment(sql, pos)
    if c == "'":
        return _literal(sql, pos, pos + 1, _STANDARD)
    if c == '"':
        return _quotedIdentifier(sql, pos, pos + 1)
    if nxt == "'":
        if c in "eE":
            return _literal(sql, pos, pos + 2, _BACKSLASH)
        if c in "nN":
            return _literal(sql, pos, pos + 2, _STANDARD)
        if c in "bBxX":
            return _literal(sql, pos, pos + 2, _BITS)
    if c in "uU" and nxt == "&":
        after = sql[pos + 2 : pos + 3]
        if after == "'":
            return _literal(sql, pos, pos + 3, _STANDARD)
        if after == '"':
            return _quotedIdentifier(sql, pos, pos + 3)
    if c == "$":
        return _dollar(sql, pos)
    match = _IDENTIFIER.match(sql, pos)
    if match is not None:
        return Token(WORD, pos, match.end())
    if c in _DIGITS or (c == "." and nxt and nxt in _DIGITS):
        match = _NUMBER.match(sql, pos)
        assert match is not None
        return Token(NUMBER, pos, match.end())
    if c in _PUNCT:
        return Token(PUNCT, pos, pos + 1)
    if c in _OP_CHARS:
        match = _OPERATOR.match(sql, pos)
        assert match is not None
        return Token(OPERATOR, pos, match.end())
    return Token(OTHER, pos, pos + 1)


def _lineEnd(sql: str, pos: int) -> int:
    """Where the line that C{pos} is on ends (at its newline, or the end of C{sql})."""
    newline = _NEWLINE_CHAR.search(sql, pos)
    return len(sql) if newline is None else newline.start()


def _blockComment(sql: str, start: int) -> Token:
    """C{/* ... */}, nesting as PostgreSQL's comments do."""
    depth, pos = 1, start + 2
    while True:
        mark = _COMMENT_MARK.search(sql, pos)
        if mark is None:
            return Token(COMMENT, start, len(sql), complete=False)
        pos = mark.end()
        depth += 1 if mark.group() == "/*" else -1
        if depth == 0:
            return Token(COMMENT, start, pos)


def _literal(sql: str, start: int, body: int, mode: int) -> Token:
    """A quoted literal whose body starts at C{body}, with its continuations."""
    pos = body
    while True:
        closed = _closingQuote(sql, pos, mode)
        if closed is None:
            return Token(STRING, start, len(sql), complete=False)
        quote = _continuation(sql, closed)
        if quote is None:
            return Token(STRING, start, closed)
        pos = quote + 1


def _closingQuote(sql: str, pos: int, mode: int) -> int | None:
    """Just past the quote that ends a literal's body (from C{pos}); C{None} if none does."""
    while True:
        if mode == _BACKSLASH:
            match = _QUOTE_OR_BACKSLASH.search(sql, pos)
            if match is None:
                return None
            at = match.start()
            if match.group() == "\\":
                pos = at + 2
                continue
        else:
            at = sql.find("'", pos)
            if at < 0:
                return None
        if mode != _BITS and sql.startswith("''", at):
            pos = at + 2
            continue
        return at + 1


def _continuation(sql: str, pos: int) -> int | None:
    """
    The quote that continues the literal ending at C{pos}, if any: only
    whitespace and C{--} comments between, at least one newline among
    them (PostgreSQL's C{quotecontinue}).
    """
    end = len(sql)
    newline = False
    while pos < end:
        c = sql[pos]
        if c in _NEWLINE:
            newline = True
            pos += 1
        elif c in _SPACE:
            pos += 1
        elif c == "-" and sql.startswith("--", pos):
            pos = _lineEnd(sql, pos)
        elif c == "'" and newline:
            return pos
        else:
            return None
    return None


def _quotedIdentifier(sql: str, start: int, body: int) -> Token:
    pos = body
    while True:
        at = sql.find('"', pos)
        if at < 0:
            return Token(QUOTED, start, len(sql), complete=False)
        if sql.startswith('""', at):
            pos = at + 2
            continue
        return Token(QUOTED, start, at + 1)


def _dollar(sql: str, start: int) -> Token:
    """A dollar-quoted literal, a parameter, or a lone C{$}."""
    tag = _DOLLAR_TAG.match(sql, start)
    if tag is not None:
        closing = sql.find(tag.group(), tag.end())
        if closing < 0:
            return Token(STRING, start, len(sql), complete=False)
        return Token(STRING, start, closing + len(tag.group()))
    parameter = _PARAMETER.match(sql, start)
    if parameter is not None:
        return Token(PARAM, start, parameter.end())
    return Token(OTHER, start, start + 1)
