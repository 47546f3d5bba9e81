"""
Fuzzing the admin console: the SQL of its commands
(L{pgtls_twisted.ops._commands.AdminCommands}) and the messages of its
clients, from the first SASL message to any query
(L{pgtls_twisted.ops._console.AdminSession}).

The console parses what any TLS client sends before it is authenticated,
and then commands that can stop the proxy. For any input:

 - a command text gives results or an error, never an exception, and a
   C{stats} user's text never reaches a control method (reload, pause,
   forget, shutdown), however it is written;
 - a session's messages, cut into any chunks, never raise out of the
   session nor reach its last-resort handler (which logs an error: a
   parser letting an unexpected exception through); it answers with
   messages pgtls's own reader frames, and an ErrorResponse it can parse;
 - pgtls's SCRAM client logs in to the console with the password of the
   verifier, and then every Query and Sync gets its ReadyForQuery.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st
from support.fuzz import CUTS, FUZZ, fuzz, read_messages, split_at
from support.fuzzscram import MAX_ITERATIONS, Runner, client_firsts, outcome, verifier
from support.logcapture import captured
from twisted.internet.task import Clock

from pgtls_twisted.config import AdminConfig, Config
from pgtls_twisted.ops._commands import AdminCommands, AdminError, Result
from pgtls_twisted.ops._console import AdminSession, Phase
from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.protocol._scram import ScramLogin


class Process:
    """The process a console runs in, with no routes, recording every control call."""

    def __init__(self) -> None:
        self.config = Config(routes=())
        self.worker = 0
        self.metrics = SimpleNamespace(stats={})
        self.reactor = Clock()
        self.calls: list[Any] = []

    def liveRoutes(self) -> list[Any]:
        return []

    def requestReload(self) -> list[str]:
        self.calls.append("reload")
        return []

    def requestPause(self, route: str | None, paused: bool) -> list[str]:
        self.calls.append(("pause", route, paused))
        if route not in (None, "app"):
            raise KeyError(route)
        return ["app"]

    def requestForget(self, user: str | None) -> list[str]:
        self.calls.append(("forget", user))
        return []

    def requestShutdown(self) -> None:
        self.calls.append("shutdown")

    def complete(self, results: list[Result | AdminError]) -> list[Result | AdminError]:
        return results


# -- command texts ---------------------------------------------------------------------

_WORDS = st.sampled_from(
    [
        "SHOW", "show", "ShOw", "HELP", "VERSION", "CLIENTS", "SERVERS", "POOLS", "STATS",
        "CONFIG", "ROUTES", "RELOAD", "PAUSE", "RESUME", "FORGET", "ALL", "SHUTDOWN", "app",
        "'app'", '"app"', "'", "__class__", "__init__", "_commands", ";", " ", "\t", "\n",
        "\u00a0", "\u2028", "\x1c", "\x00", "--", "/*", "help;", "SHOW\u00a0HELP", "ſhow",
    ]
)  # fmt: skip
_COMMANDS = st.lists(_WORDS | st.text(max_size=6), max_size=8).map(" ".join)
_CONTROLLING = ("RELOAD", "PAUSE", "RESUME", "FORGET", "SHUTDOWN")


@FUZZ
@given(_COMMANDS, st.sampled_from(["admin", "stats"]))
@example("SHOW __init__", "stats")
@example("show\u00a0clients; SHUTDOWN", "stats")
def test_any_command_text(sql: str, role: str) -> None:
    process = Process()
    results = AdminCommands(process, role).run(sql)  # type: ignore[arg-type]
    statements = [s for s in sql.split(";") if s.strip()]
    assert len(results) <= len(statements)
    errors = [r for r in results if isinstance(r, AdminError)]
    assert errors == results[len(results) - len(errors) :] and len(errors) <= 1
    for result in results:
        if isinstance(result, Result):
            assert all(len(row) == len(result.columns) for row in result.rows)
            assert result.tag in ("SHOW", *_CONTROLLING)
        else:
            assert len(result.sqlstate) == 5 and result.message
    if role == "stats":
        assert process.calls == [], "a stats user controlled the proxy"


# -- sessions ----------------------------------------------------------------------------


class Client:
    """The client leg an admin session talks to."""

    def __init__(self) -> None:
        handle = SimpleNamespace(get_certificate=lambda: None)
        self.tls = SimpleNamespace(getHandle=lambda: handle)
        self.pending = bytearray()
        self.deliver: Any = None
        self.onLost: Any = None
        self.written = bytearray()
        self.out = SimpleNamespace(write=self.written.extend)
        self.failed: list[tuple[str, str]] = []
        self.refusals: list[str] = []
        self.closed = False
        self.readingPaused = False
        self.connId = 1
        self.stats = SimpleNamespace(reason=None)
        self.verifyError = None
        self.session: Any = None

    def refused(self, why: str) -> None:
        self.refusals.append(why)

    def fail(self, sqlstate: str, text: str) -> None:
        self.failed.append((sqlstate, text))
        self.closed = True

    def close(self) -> None:
        self.closed = True

    def startupComplete(self) -> None:
        pass

    def pauseReading(self) -> None:
        self.readingPaused = True

    def resumeReading(self) -> None:
        self.readingPaused = False

    def said(self) -> list[tuple[bytes, bytes]]:
        """Everything written since the last call, framed by pgtls's reader."""
        messages = read_messages(bytes(self.written))
        self.written.clear()
        for mtype, body in messages:
            if mtype in (b"E", b"N"):
                fields = wire.parse_error_fields(body)
                assert len(fields["C"]) == 5 and fields["M"] and fields["S"]
        return messages


PASSWORD = "console-pw"


def session(user: str, iterations: int = 1) -> tuple[AdminSession, Client, Process]:
    """A console session for C{user}, started: the SCRAM offer is written."""
    process = Process()
    route = SimpleNamespace(
        config=SimpleNamespace(
            listener=SimpleNamespace(client_ca=None), backend=SimpleNamespace(tls="disable")
        ),
        process=process,
        name="admin-route",
        backend=None,
    )
    stored, _ = verifier(PASSWORD, b"console-salt", iterations)
    admin = AdminConfig(
        auth="scram",
        users=("root",),
        stats_users=("watcher",),
        verifiers={"root": stored, "watcher": stored},
    )
    client = Client()
    startup = wire.StartupMessage(3, 0, {"user": user, "database": "pgtls"})
    admin_session = AdminSession(route, client, startup, admin)  # type: ignore[arg-type]
    admin_session.start()
    return admin_session, client, process


def _sasl_responses() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.builds(lambda m: wire.sasl_initial_response(m[0], m[1]), client_firsts()),
        st.builds(wire.sasl_response, st.binary(max_size=40)),
    )


def _console_messages() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.builds(lambda sql: wire.message(b"Q", sql.encode("utf-8", "surrogatepass") + b"\0"), _COMMANDS),
        st.builds(lambda b: wire.message(b"Q", b), st.binary(max_size=20)),
        st.sampled_from([wire.message(b"S"), wire.message(b"H"), wire.message(b"P", b"\0\0\0\0")]),
        st.builds(
            wire.message,
            st.sampled_from([b"B", b"E", b"D", b"C", b"F", b"X", b"p", b"d", b"?"]),
            st.binary(max_size=8),
        ),
        st.sampled_from([b"Q\x7f\xff\xff\xff", b"Q\0\0\0\x03", b"Q\0\x10\0\x01"]),
    )  # fmt: skip


_AUTH_STREAMS = st.lists(_sasl_responses() | _console_messages(), max_size=4).map(b"".join)
_CONSOLE_STREAMS = st.lists(_console_messages(), max_size=6).map(b"".join)


def _errors(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("isError") or "log_failure" in e]


def _feed(admin_session: AdminSession, client: Client, stream: bytes, cuts: list[int]) -> None:
    with captured() as events:
        for chunk in split_at(stream, cuts):
            if client.closed:
                break
            client.deliver(chunk)
    assert _errors(events) == [], [e.get("log_format") for e in _errors(events)]


@FUZZ
@given(st.sampled_from(["root", "watcher", "stranger"]), _AUTH_STREAMS, CUTS)
def test_any_client_before_it_is_authenticated(user: str, stream: bytes, cuts: list[int]) -> None:
    admin_session, client, process = session(user)
    ((mtype, offer),) = client.said()
    assert mtype == b"R" and wire.auth_code(offer) == wire.AUTH_SASL
    _feed(admin_session, client, stream, cuts)
    client.said()
    # Nobody gets in without the password, and nobody controls anything.
    assert admin_session.phase is not Phase.CONSOLE
    assert process.calls == []
    if client.failed:
        ((sqlstate, _),) = client.failed
        assert sqlstate in ("08P01", "28P01")


def logged_in(user: str, iterations: int) -> tuple[AdminSession, Client, Process]:
    """A console session that pgtls's SCRAM client logged in to, as C{user}."""
    admin_session, client, process = session(user, iterations)
    ((_, offer),) = client.said()
    login = ScramLogin(wire.sasl_mechanisms(offer), None, tls=True, maxIterations=MAX_ITERATIONS)
    client.deliver(login.start(PASSWORD))
    ((_, serverFirst),) = client.said()
    client.deliver(outcome(login.challenge(serverFirst[4:], Runner())))
    messages = client.said()
    login.finish(messages[0][1][4:])
    assert login.done and admin_session.phase is Phase.CONSOLE
    assert [mtype for mtype, _ in messages[1:]] == [b"R", *[b"S"] * 7, b"Z"]
    return admin_session, client, process


@fuzz(200)
@given(st.sampled_from(["root", "watcher"]), st.integers(1, 4), _CONSOLE_STREAMS, CUTS)
def test_any_client_once_logged_in(
    user: str, iterations: int, stream: bytes, cuts: list[int]
) -> None:
    admin_session, client, process = logged_in(user, iterations)
    _feed(admin_session, client, stream, cuts)
    answers = client.said()
    if user == "watcher":
        assert process.calls == []
    if client.closed:
        return
    # Every Query and every Sync the session read got its ReadyForQuery.
    asked = wire.MessageReader()
    asked.feed(stream)
    requests = 0
    while (msg := asked.next()) is not None:
        requests += msg[0] in (b"Q", b"S")
    assert [mtype for mtype, _ in answers].count(b"Z") == requests
