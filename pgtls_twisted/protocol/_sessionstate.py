# -*- test-case-name: tests.test_sessionstate -*-
"""
Which statements leave state in a server session that the next client of a
transaction pool would inherit?

A client of a transaction pool that runs C{SET app.tenant_id = 'A'},
creates a temporary table or takes a session advisory lock leaves it
behind for whichever client its server connection serves next. So pgtls
reads the text of every Query and Parse message in transaction mode, and
L{classify} says whether it creates such state (the client must be pinned
to its server connection, or refused: L{pgtls_twisted.protocol._refusal})
and whether it drops
the connection's prepared statements (C{DISCARD ALL}, C{DEALLOCATE ALL}),
pgtls's own included.

The rules are lexical, on L{pgtls_twisted.protocol._sqllex}'s tokens: a
keyword is a word in any case, never in a literal, a quoted identifier
or a comment. Of several statements, the first that creates state gives
the reason.

 - C{SET}/C{SET SESSION} of any parameter but those pgtls re-applies
   (L{pgtls_twisted.protocol._txstate.TRACKED_PARAMETERS}, C{SET TIME
   ZONE}, C{SET NAMES}); C{SET ROLE}, C{SET SESSION AUTHORIZATION} and
   C{CHARACTERISTICS}; not C{SET LOCAL}, C{SET TRANSACTION}, C{SET
   CONSTRAINTS}, which end with the transaction. C{RESET} likewise, and
   C{RESET ALL}.
 - C{LISTEN}; C{PREPARE} (not C{PREPARE TRANSACTION}); C{DECLARE ... WITH
   HOLD}; C{LOAD}.
 - C{CREATE [OR REPLACE] [GLOBAL|LOCAL] TEMP|TEMPORARY ...}, C{SELECT ...
   INTO TEMP}, a C{CREATE} of an object in C{pg_temp}; not a table C{ON
   COMMIT DROP}, gone when the transaction ends.
 - Calls anywhere of C{pg_advisory_lock}, C{pg_try_advisory_lock} and
   their C{_shared} forms (not the C{_xact_} ones), and of C{set_config}
   unless its third argument is literally true or its first names a
   tracked parameter (a C{$3} or an expression may be false: it pins).
 - C{EXPLAIN [ANALYZE] [(...)]} is looked through, analysing or not.
 - A C{DO} block's body, which runs now, is read as PL/pgSQL: statements
   start after C{;}, C{BEGIN}, C{THEN}, C{ELSE}, C{LOOP} (C{UPDATE t SET
   x} is no C{SET}), and the literals of a statement that C{EXECUTE}s are
   read as SQL. A body in another language pins if any word of it could
   matter. The reason is C{DO block (SET app.x)}.

It cannot see into a function (which a C{CALL} or a C{SELECT} may run),
SQL assembled at run time from pieces that split a keyword, a function
named by a C{U&"..."} identifier with escapes, or backslash escapes in
plain literals under C{standard_conforming_strings = off}. It is a guard
for applications unaware of the pool, not a barrier against a client
that wants to leave state behind, and it errs towards pinning (a
C{pg_advisory_lock(1)} under a plain C{EXPLAIN} or in a C{CREATE VIEW}).

Pure Python, no Twisted. Linear in the text's length: a pass over its
tokens, one more per level of nested text (at most L{MAX_DEPTH}). A text
with no word that could matter (most texts) is not lexed (L{_hasWord}),
and verdicts are memoised.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from hashlib import blake2b
from typing import NamedTuple

from pgtls_twisted.protocol._sqllex import (
    PUNCT,
    QUOTED,
    STRING,
    WORD,
    Token,
    ascii_lower,
    dollar_body,
    significant,
)
from pgtls_twisted.protocol._txstate import canonicalParameter


class Verdict(NamedTuple):
    """
    What a statement text does to the session it runs in.

    @ivar pin: why the text creates session state (the first reason, naming
        the statement: C{"SET app.tenant_id"}, C{"LISTEN"},
        C{"pg_advisory_lock"}), or C{None} if it creates none that pgtls
        can see.
    @ivar deallocates: the text runs C{DISCARD ALL} or C{DEALLOCATE [PREPARE]
        ALL}, which drop every prepared statement of the connection,
        pgtls's own included.
    """

    pin: str | None = None
    deallocates: bool = False


#: The verdict of a text that does nothing to the session.
NOTHING = Verdict()

#: How many levels of nested text (a C{DO} body, a literal it executes) are
#: read; deeper, a text that has any word that could matter pins.
MAX_DEPTH = 4

#: The longest name a reason quotes (PostgreSQL truncates identifiers to 63 bytes).
_NAME_LIMIT = 63
#: The prefilter's first stage: every word any rule looks for contains one
#: of these (C{set} is in C{set_config} and C{reset}, C{temp} in C{pg_temp}).
_STEMS = tuple("set temp listen prepare declare load discard deallocate advisory".split())

#: Its second stage: those words, in lower case, when no identifier character is
#: just after (the lexer's words end there); L{_hasWord} checks what comes before.
_WORDS = re.compile(
    r"(?:set|reset|listen|prepare|declare|temp|temporary|pg_temp(?:_[0-9]+)?|load|discard"
    r"|deallocate|set_config|pg_(?:try_)?advisory_lock(?:_shared)?)"
    r"(?![a-z0-9_$\x80-\U0010ffff])"
)

#: The words after which a C{SET} may start a statement (PL/pgSQL's, C{EXPLAIN}'s);
#: a C{$} before one may end a dollar quote's opening tag (C{$$BEGIN}).
_STARTERS = re.compile(
    r"(?<![a-z0-9_\x80-\U0010ffff])(?:begin|then|else|loop|explain|analy[sz]e|verbose)\Z"
)

#: Session-level advisory lock functions (the C{_xact_} ones end with the transaction).
_ADVISORY = frozenset(
    "pg_advisory_lock pg_advisory_lock_shared pg_try_advisory_lock pg_try_advisory_lock_shared".split()
)

#: Words that start a PL/pgSQL statement in the middle of a C{;}-separated piece.
_PLPGSQL_STARTS = frozenset({"begin", "then", "else", "loop"})

#: The data-modifying verbs after which C{INTO} names no new table.
_NOT_SELECT = frozenset({"insert", "update", "delete", "merge"})

#: Words that may follow C{SELECT ... INTO temp} when C{temp} is a table's name.
_AFTER_INTO_TABLE = frozenset(
    "from where group having window union intersect except order limit offset fetch for".split()
)


def classify(sql: str) -> Verdict:
    """
    What the whole text of a Query or Parse message does to the session.

    Never raises, whatever C{sql} holds (cut, unterminated, NUL, any
    character). Memoised by a digest of the text, not the text: a pool sees
    the same texts again and again (a digest costs less than the
    prefilter), and some are megabytes long.
    """
    key = blake2b(sql.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    verdict = _MEMO.get(key)
    if verdict is None:
        verdict = _verdict(sql, 0, False) if _hasWord(sql) else NOTHING
        if len(_MEMO) >= MEMO_SIZE:
            _MEMO.clear()
        _MEMO[key] = verdict
    return verdict


#: How many verdicts are remembered; when full, all are forgotten.
MEMO_SIZE = 4096
_MEMO: dict[bytes, Verdict] = {}


def _hasWord(text: str) -> bool:
    """
    Whether C{text} has a word some rule looks for where the lexer could
    see one: after no letter, C{_} or non-ASCII character (C{OFFSET} is no
    C{SET}); a C{SET} not right after a word or quoted identifier
    (C{UPDATE t SET}) unless the word may end a PL/pgSQL statement or
    C{EXPLAIN}'s options, or the text has a comment. It never misses a word
    the rules see (a test checks it), and most texts are not lexed.
    C{str.lower} folds more than PostgreSQL (ASCII only), but keeps each
    character in its class (identifier character or not).
    """
    lowered = text.lower()
    if not any(map(lowered.__contains__, _STEMS)):
        return False
    commented = "--" in lowered or "/*" in lowered
    for match in _WORDS.finditer(lowered):
        start = match.start()
        before = lowered[start - 1] if start else " "
        if "a" <= before <= "z" or before == "_" or before >= "\x80":
            continue
        if commented or match.group() != "set" or not _afterAWord(lowered, start):
            return True
    return False


def _afterAWord(lowered: str, start: int) -> bool:
    """Whether C{start} follows, after spaces, a word or a quoted identifier that ends no statement."""
    end = start
    while end and lowered[end - 1] in " \t\n\r\f\v":
        end -= 1
    last = lowered[end - 1] if end else ";"
    if last == '"':
        return True
    if not ("a" <= last <= "z" or "0" <= last <= "9" or last == "_" or last >= "\x80"):
        return False
    return _STARTERS.search(lowered, max(end - 8, 0), end) is None


def _verdict(sql: str, depth: int, plpgsql: bool) -> Verdict:
    """
    The verdict on C{sql}, read as SQL or as a PL/pgSQL body, C{depth}
    levels of nesting down. Statements end at a C{;} outside parentheses
    (inside, it parts a rule's actions; with unbalanced parentheses the
    text is a syntax error and runs nothing).
    """
    pin: str | None = None
    deallocates = False
    statement: list[Token] = []
    level = 0
    for token in significant(sql):
        if token.kind == PUNCT:
            char = sql[token.start]
            if char == "(":
                level += 1
            elif char == ")":
                level = max(level - 1, 0)
            elif char == ";" and level == 0:
                pin, deallocates = _judge(sql, statement, depth, plpgsql, pin, deallocates)
                statement = []
                continue
        elif plpgsql and level == 0 and token.kind == WORD and token.name(sql) in _PLPGSQL_STARTS:
            pin, deallocates = _judge(sql, statement, depth, plpgsql, pin, deallocates)
            statement = []
            continue
        statement.append(token)
    pin, deallocates = _judge(sql, statement, depth, plpgsql, pin, deallocates)
    if pin is None and not deallocates:
        return NOTHING
    return Verdict(pin, deallocates)


def _judge(
    sql: str, statement: list[Token], depth: int, plpgsql: bool, pin: str | None, deallocates: bool
) -> tuple[str | None, bool]:
    """Fold one statement's findings into the text's C{(pin, deallocates)} so far."""
    if not statement:
        return pin, deallocates
    reason, drops = _Statement(sql, statement, depth).leading()
    if pin is None:
        if reason is None:
            reason = _calls(sql, statement)
        if reason is None and plpgsql:
            reason = _executed(sql, statement, depth)
        pin = reason
    return pin, deallocates or drops


class _Statement:
    """The significant tokens of one statement, and the rules on how it starts."""

    def __init__(self, sql: str, tokens: list[Token], depth: int) -> None:
        self.sql = sql
        self.tokens = tokens
        self.depth = depth

    def word(self, i: int) -> str | None:
        """The keyword at C{i} (lower case), or C{None}: quoted identifiers are no keywords."""
        if i < len(self.tokens) and self.tokens[i].kind == WORD:
            return self.tokens[i].name(self.sql)
        return None

    def punct(self, i: int) -> str | None:
        if i < len(self.tokens) and self.tokens[i].kind == PUNCT:
            return self.sql[self.tokens[i].start]
        return None

    def leading(self) -> tuple[str | None, bool]:
        """C{(reason, deallocates)} from the statement's first words."""
        i = 0
        while self.word(i) == "explain":
            i = self._explained(i + 1)
        first = self.word(i)
        if first == "set":
            return self._set(i + 1), False
        if first == "reset":
            return self._reset(i + 1), False
        if first == "listen":
            return "LISTEN", False
        if first == "prepare":
            if self.word(i + 1) == "transaction" and self._kind(i + 2) == STRING:
                return None, False
            return "PREPARE", False
        if first == "declare":
            return self._declare(i + 1), False
        if first == "load":
            return "LOAD", False
        if first == "create":
            return self._create(i + 1), False
        if first in ("select", "with") or self.punct(i) == "(":
            return self._selectInto(i), False
        if first == "do":
            return self._do(i + 1), False
        if first == "discard":
            return None, self.word(i + 1) == "all"
        if first == "deallocate":
            j = i + 2 if self.word(i + 1) == "prepare" else i + 1
            return None, self.word(j) == "all"
        return None, False

    def _kind(self, i: int) -> str | None:
        return self.tokens[i].kind if i < len(self.tokens) else None

    def _levels(self, i: int) -> Iterator[tuple[int, int]]:
        """Each token's index from C{i} on, with how deep in parentheses it is (from C{i})."""
        level = 0
        for j in range(i, len(self.tokens)):
            char = self.punct(j)
            level -= char == ")"
            yield j, level
            level += char == "("

    def _explained(self, i: int) -> int:
        """Where the statement under C{EXPLAIN}'s options starts."""
        if self.punct(i) == "(":
            closing = next((j for j, level in self._levels(i + 1) if level < 0), len(self.tokens))
            return closing + 1
        while self.word(i) in ("analyze", "analyse", "verbose"):
            i += 1
        return i

    def _name(self, i: int) -> str | None:
        """A possibly qualified name (C{app.tenant_id}) starting at C{i}."""
        parts: list[str] = []
        while i < len(self.tokens) and self.tokens[i].kind in (WORD, QUOTED):
            parts.append(self.tokens[i].name(self.sql) or "")
            if self.punct(i + 1) != ".":
                break
            i += 2
        return ".".join(parts) if parts else None

    def _set(self, i: int) -> str | None:
        what = self.word(i)
        if what == "local":
            return None
        if what == "session":
            after = self.word(i + 1)
            if after == "authorization":
                return "SET SESSION AUTHORIZATION"
            if after == "characteristics":
                return "SET SESSION CHARACTERISTICS"
            i += 1
            what = after
        if what in ("transaction", "constraints"):
            return None
        if what == "role":
            return "SET ROLE"
        if what == "names" or (what == "time" and self.word(i + 1) == "zone"):
            return None
        if what == "xml" and self.word(i + 1) == "option":
            return "SET XML OPTION"
        return _parameter("SET", self._name(i))

    def _reset(self, i: int) -> str | None:
        what = self.word(i)
        if what == "all":
            return "RESET ALL"
        if what == "role":
            return "RESET ROLE"
        if what == "session" and self.word(i + 1) == "authorization":
            return "RESET SESSION AUTHORIZATION"
        if what == "transaction" or (what == "time" and self.word(i + 1) == "zone"):
            return None
        return _parameter("RESET", self._name(i))

    def _declare(self, i: int) -> str | None:
        """C{WITH HOLD} among the options, before the C{FOR} of the query."""
        while i < len(self.tokens) and self.word(i) != "for":
            if self.word(i) == "with" and self.word(i + 1) == "hold":
                return "DECLARE ... WITH HOLD"
            i += 1
        return None

    def _create(self, i: int) -> str | None:
        if self.word(i) == "or" and self.word(i + 1) == "replace":
            i += 2
        if self.word(i) in ("global", "local"):
            i += 1
        if self.word(i) in ("temp", "temporary"):
            i += 1
            while self.word(i) in ("unlogged", "recursive"):
                i += 1
            kind = self.word(i)
            if kind == "table" and self._onCommitDrop(i + 1):
                return None
            if kind in ("table", "view", "sequence"):
                return f"CREATE TEMPORARY {kind.upper()}"
            return "CREATE TEMPORARY"
        # An object named in pg_temp: its name comes before any "(" or AS.
        while i < len(self.tokens) and self.punct(i) != "(" and self.word(i) != "as":
            if self._inTemporarySchema(i):
                return "CREATE ... pg_temp"
            i += 1
        return None

    def _inTemporarySchema(self, i: int) -> bool:
        token = self.tokens[i]
        if token.kind not in (WORD, QUOTED) or self.punct(i + 1) != ".":
            return False
        return (
            re.fullmatch(r"pg_temp(?:_[0-9]+)?", token.name(self.sql) or "", re.ASCII) is not None
        )

    def _onCommitDrop(self, i: int) -> bool:
        """C{ON COMMIT DROP} among a table's options (outside parentheses, before C{AS})."""
        for j, level in self._levels(i):
            word = self.word(j) if level == 0 else None
            if word == "as":
                return False
            if word == "on" and self.word(j + 1) == "commit" and self.word(j + 2) == "drop":
                return True
        return False

    def _selectInto(self, i: int) -> str | None:
        """C{SELECT ... INTO TEMP t}: a new temporary table."""
        for j, level in self._levels(i):
            word = self.word(j)
            if level == 0 and word in _NOT_SELECT:
                return None
            if word == "into" and self._intoTemporary(j + 1):
                return "SELECT ... INTO TEMPORARY"
        return None

    def _intoTemporary(self, i: int) -> bool:
        scoped = self.word(i) in ("local", "global")
        if scoped:
            i += 1
        if i < len(self.tokens) and self._inTemporarySchema(i):
            return True
        if self.word(i) not in ("temp", "temporary"):
            return False
        if scoped or self.word(i + 1) == "table":
            return True
        # INTO TEMP t is a temporary table t; INTO temp FROM ... is a table named temp.
        if self._kind(i + 1) == QUOTED:
            return True
        after = self.word(i + 1)
        return after is not None and after not in _AFTER_INTO_TABLE

    def _do(self, i: int) -> str | None:
        """C{DO [LANGUAGE l] body [LANGUAGE l]}: what the body would do."""
        body: Token | None = None
        language = "plpgsql"
        while i < len(self.tokens):
            token = self.tokens[i]
            if self.word(i) == "language" and i + 1 < len(self.tokens):
                named = self.tokens[i + 1]
                language = ascii_lower(named.name(self.sql) or _literalValue(self.sql, named) or "")
                i += 2
                continue
            if token.kind == STRING:
                body = token
            i += 1
        if body is None:
            return None
        reason = _nested(self.sql, body, self.depth, True if language == "plpgsql" else None, "")
        if reason is None:
            return None
        return f"DO block ({reason})" if reason else "DO block"


def _parameter(command: str, name: str | None) -> str | None:
    """The reason C{SET name} or C{RESET name} pins: none for a tracked parameter."""
    if name is None:
        return command
    if canonicalParameter(name) is not None:
        return None
    return f"{command} {_printable(name, _NAME_LIMIT)}"


def _printable(text: str, limit: int) -> str:
    """C{text} as a message can quote it: printable ASCII, at most C{limit} characters and C{...}."""
    shown = "".join(c if " " <= c <= "~" else "?" for c in text[: limit + 1])
    return shown if len(shown) <= limit else shown[:limit] + "..."


def _nested(sql: str, literal: Token, depth: int, plpgsql: bool | None, unread: str) -> str | None:
    """
    Why the text inside C{literal} (a C{DO} body, a literal that PL/pgSQL
    executes) pins, read as PL/pgSQL or as SQL (C{plpgsql} C{None}: in a
    language not read). Not read (that, C{E'...'} with escapes, deeper than
    L{MAX_DEPTH}), any word that could matter pins, as C{unread}.
    """
    text = _literalValue(sql, literal)
    readable = text is not None
    if text is None:
        text = sql[literal.start : literal.end]
    if not _hasWord(text):
        return None
    if not readable or plpgsql is None or depth >= MAX_DEPTH:
        return unread
    return _verdict(text, depth + 1, plpgsql).pin


def _executed(sql: str, statement: list[Token], depth: int) -> str | None:
    """In a PL/pgSQL statement that C{EXECUTE}s, what its literals would do as SQL."""
    if not any(t.kind == WORD and t.name(sql) == "execute" for t in statement):
        return None
    for token in statement:
        if token.kind == STRING:
            reason = _nested(sql, token, depth, False, "EXECUTE")
            if reason is not None:
                return reason
    return None


class _SetConfig:
    """The first two tokens of each argument of a C{set_config(...)} call, as they go by."""

    def __init__(self) -> None:
        self.arguments: list[list[Token]] = [[]]

    def note(self, token: Token) -> None:
        """C{token} is part of the current argument (a parenthesis stands for its contents)."""
        if len(self.arguments) <= 3 and len(self.arguments[-1]) < 2:
            self.arguments[-1].append(token)

    def forSession(self, sql: str) -> bool:
        """Whether the call may set its parameter for the session (not for a tracked one)."""
        if len(self.arguments) != 3:
            return False  # Not three arguments: an error, that sets nothing.
        name, _, local = self.arguments
        if len(local) == 1 and _boolean(sql, local[0]):
            return False
        return len(name) != 1 or canonicalParameter(_literalValue(sql, name[0]) or "") is None


def _calls(sql: str, statement: list[Token]) -> str | None:
    """
    A call of a session advisory lock function, or of C{set_config} for
    the session, anywhere in C{statement}: one pass, with a stack of the
    open parentheses (so that the arguments of nested calls stay apart).
    """
    stack: list[_SetConfig | None] = []
    previous: Token | None = None
    for token in statement:
        call = stack[-1] if stack else None
        if token.kind == PUNCT and sql[token.start] in "(),":
            char = sql[token.start]
            if char == "(":
                if call is not None:
                    call.note(token)
                name = previous.name(sql) if previous is not None else None
                if name in _ADVISORY:
                    return name
                stack.append(_SetConfig() if name == "set_config" else None)
            elif char == ")":
                if stack:
                    done = stack.pop()
                    if done is not None and done.forSession(sql):
                        return "set_config(..., false)"
            elif call is not None:
                call.arguments.append([])
        elif call is not None:
            call.note(token)
        previous = token
    return None


def _literalValue(sql: str, token: Token) -> str | None:
    """
    The value of a string literal C{token}, when it is simple to know:
    C{'...'}, C{N'...'}, C{E'...'} without backslashes, or dollar-quoted.
    C{None} for anything else (other kinds, escapes, a literal continued
    over lines, one the text ends inside).
    """
    if token.kind != STRING or not token.complete:
        return None
    span = dollar_body(sql, token)
    if span is not None:
        return sql[span[0] : span[1]]
    text = sql[token.start : token.end]
    if text[0] == "'":
        body = text[1:-1]
    elif text[0] in "eEnN" and text[1:2] == "'":
        body = text[2:-1]
        if "\\" in body:
            return None
    else:
        return None
    if "'" in body.replace("''", ""):
        return None
    return body.replace("''", "'")


def _boolean(sql: str, token: Token) -> bool | None:
    """A literal boolean as PostgreSQL's C{boolin} reads it (C{'f'}, C{'off'}, ...), or C{None}."""
    if token.kind == WORD:
        return {"true": True, "false": False}.get(token.name(sql) or "")
    text = _literalValue(sql, token)
    if text is None:
        return None
    value = ascii_lower(text.strip(" \t\n\r\f\v"))
    if not value:
        return None
    if value in ("1", "on") or "true".startswith(value) or "yes".startswith(value):
        return True
    if value in ("0", "of", "off") or "false".startswith(value) or "no".startswith(value):
        return False
    return None
