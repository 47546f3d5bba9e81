"""
Fuzzing SCRAM from both sides, MD5, and pgtls's own backend login.

pgtls parses SCRAM messages as a client (L{ScramLogin}, logging in to a
backend: server-first and server-final come from the server) and as a
server (L{ScramServer}, behind L{WarmLogin} and the admin console:
client-first and client-final come from any client), framed in
SASLInitialResponse and SASLResponse messages it parses too. Besides the
garbage fuzzing of tests/test_scramserver.py and
tests/test_security_scram.py, here:

 - messages close to valid ones (each attribute chosen from hostile
   values, then maybe a byte changed) raise only the module's own error;
 - an iteration count, however written, never reaches the key derivation
   above C{backend.max_scram_iterations};
 - the two sides are each other's round trip: pgtls's client logs in to
   pgtls's server for any password, salt, iteration count and binding,
   and both end up with the same ClientKey; a wrong password is refused;
 - L{WarmLogin} (the cached login pgtls answers) and L{ServerLogin} (the
   login pgtls makes) fed any messages in any chunks: the outcome is a
   success or their documented failure, never an exception, never the
   password in a message.
"""

from __future__ import annotations

import base64
import struct
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from support.fuzz import CUTS, FUZZ, fuzz, read_messages, split_at
from support.fuzzscram import MAX_ITERATIONS, Runner, client_firsts, outcome, verifier
from support.unit import result
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from pgtls_twisted.pool._logincache import CachedLogin
from pgtls_twisted.pool._serverlogin import (
    LOGIN_TIMEOUT,
    LoginResult,
    ServerLogin,
    ServerLoginError,
    md5_password,
)
from pgtls_twisted.pool._warmlogin import WarmLogin
from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.protocol._md5 import Md5Secret
from pgtls_twisted.protocol._scram import (
    SCRAM_SHA_256,
    SCRAM_SHA_256_PLUS,
    ScramKeys,
    ScramLogin,
    ScramLoginError,
    derive_keys,
    prepare_password,
)
from pgtls_twisted.protocol._scramserver import ScramAuthError, ScramServer
from pgtls_twisted.protocol._wire import ProtocolViolation

_PASSWORDS = st.text(
    st.characters(exclude_characters="\0", exclude_categories=("Cs",)), min_size=1, max_size=16
)
_SALTS = st.binary(min_size=1, max_size=24)
_ITERATIONS = st.integers(1, MAX_ITERATIONS)
_BINDINGS = st.none() | st.binary(min_size=1, max_size=64)


def started() -> tuple[ScramLogin, str]:
    """A client that sent client-first, and its nonce (read back from the message)."""
    login = ScramLogin([SCRAM_SHA_256], None, tls=False, maxIterations=MAX_ITERATIONS)
    mechanism, first = _initial(login.start("secret"))
    assert mechanism == login.mechanism
    return login, first.decode("ascii").rpartition("r=")[2]


def _initial(message: bytes) -> tuple[str, bytes]:
    """A SASLInitialResponse read back: the round trip of its framing."""
    assert message[:1] == b"p"
    (length,) = struct.unpack_from("!I", message, 1)
    assert length == len(message) - 1
    return wire.parse_sasl_initial_response(message[5:])


# -- the client side: server-first and server-final ------------------------------------

_B64 = st.binary(max_size=20).map(lambda b: base64.b64encode(b).decode())
_COUNTS = st.sampled_from(
    ["1", "16", "17", "0", "-1", "4096", "9" * 10, "9" * 11, "4294967296", " 4", "4 ", "\u0664",
     "0x10", "1e3", "", "00000000016", "+5"]
) | st.integers(0, 2**40).map(str)  # fmt: skip
_VALID_SUFFIXES = st.text("abcXYZ0189+/", min_size=1, max_size=8)
_VALID_SALTS = st.binary(min_size=1, max_size=16).map(lambda b: base64.b64encode(b).decode())
_VALID_COUNTS = st.integers(1, MAX_ITERATIONS).map(str)


@st.composite
def server_firsts(draw: st.DrawFn) -> tuple[str, int | None, int]:
    """
    C{r=...,s=...,i=...} as a template (C{<N>} stands for the client's
    nonce, C{<N-1>} for it cut short): valid, with one part hostile, with
    every part drawn from hostile values too, or valid with one byte to
    change once filled in (where, what).
    """
    shape = draw(st.sampled_from(["valid", "one hostile part", "any parts", "flipped"]))
    valid = ["r=<N>" + draw(_VALID_SUFFIXES), "s=" + draw(_VALID_SALTS), "i=" + draw(_VALID_COUNTS)]
    suffix = draw(st.sampled_from(["", "x", ",", "\u00e9"]) | st.text(max_size=4))
    hostile = [
        "r=" + draw(st.sampled_from(["<N>", suffix, "<N-1>" + suffix, "x<N>" + suffix])),
        "s=" + draw(_B64 | st.sampled_from(["", "!!", "c2FsdA", "=", "c2Fsd A=="])),
        "i=" + draw(_COUNTS),
    ]
    parts = valid
    if shape == "one hostile part":
        which = draw(st.integers(0, 2))
        parts = valid[:which] + [hostile[which]] + valid[which + 1 :]
    elif shape == "any parts":
        parts = [draw(st.sampled_from([v, h])) for v, h in zip(valid, hostile, strict=True)]
        parts += draw(st.lists(st.sampled_from(["e=x", "m=y", "", "i=1"]), max_size=2))
        if draw(st.booleans()):
            parts = draw(st.permutations(parts))
    flip = draw(st.integers(0, 1 << 16)) if shape == "flipped" else None
    return ",".join(parts), flip, draw(st.integers(0, 255))


def _fill(template: tuple[str, int | None, int], nonce: str) -> bytes:
    text, flip, byte = template
    raw = text.replace("<N-1>", nonce[:-1]).replace("<N>", nonce).encode("utf-8", "surrogatepass")
    if flip is not None and raw:
        at = flip % len(raw)
        raw = raw[:at] + bytes([byte]) + raw[at + 1 :]
    return raw


@FUZZ
@given(server_firsts())
@example(("r=<N>x,s=c2FsdA==,i=17", None, 0))
@example(("r=<N>x,s=c2FsdA==,i=16", None, 0))
def test_client_reads_any_server_first(template: tuple[str, int | None, int]) -> None:
    login, nonce = started()
    runner = Runner()
    try:
        final = outcome(login.challenge(_fill(template, nonce), runner))
    except ScramLoginError as e:
        assert e.sqlstate in ("08006", "28000")
        assert runner.iterations == [], "derived for a message it refused"
        return
    # Accepted: a count within the limit, and a client-final.
    assert len(runner.iterations) == 1 and 1 <= runner.iterations[0] <= MAX_ITERATIONS
    assert final[:1] == b"p" and b",p=" in final


_MUTATIONS = st.sampled_from(["junk", "error", "v=junk", "cut", "appended", "flipped", "none"])


@FUZZ
@given(_PASSWORDS, _SALTS, _ITERATIONS, _MUTATIONS, st.binary(max_size=40), st.integers(0, 60))
def test_client_reads_any_server_final(
    password: str, salt: bytes, iterations: int, mutation: str, junk: bytes, at: int
) -> None:
    """Only the server's signature (however base64 writes it) ends the exchange."""
    login, (_, final), _ = exchange(password, password, salt, iterations, None, tls=False)
    message = {
        "junk": junk,
        "error": b"e=" + junk,
        "v=junk": b"v=" + junk,
        "cut": final[: at % len(final)],
        "appended": final + junk,
        "flipped": final[: at % len(final)] + b"\xff" + final[at % len(final) + 1 :],
        "none": final,
    }[mutation]
    try:
        login.finish(message)
    except ScramLoginError:
        assert not login.done and mutation != "none"
        return
    assert login.done
    assert base64.b64decode(message[2:]) == base64.b64decode(final[2:])


# -- both sides: the round trip -------------------------------------------------------------


def exchange(
    password: str,
    known: str,
    salt: bytes,
    iterations: int,
    binding: bytes | None,
    *,
    tls: bool,
) -> tuple[ScramLogin, tuple[ScramServer, bytes], ScramKeys]:
    """
    pgtls's client against pgtls's server, up to the server-final message
    (not yet given to the client): the client, the server and that message,
    and the keys of the verifier (from the password C{known}).
    """
    stored, keys = verifier(known, salt, iterations)
    server = ScramServer(stored, binding)
    login = ScramLogin(server.mechanisms, binding, tls=tls, maxIterations=MAX_ITERATIONS)
    mechanism, first = _initial(login.start(password))
    serverFirst = server.clientFirst(mechanism, first)
    final = outcome(login.challenge(serverFirst, Runner()))
    assert final[:1] == b"p"
    return login, (server, server.clientFinal(final[5:])), keys


@fuzz(200)
@given(_PASSWORDS, _SALTS, _ITERATIONS, _BINDINGS, st.booleans())
@example("pässwörd", b"s", 1, b"\x01" * 32, True)
@example("\u00adx", b"s", 1, None, True)  # SASLprep maps the soft hyphen away
def test_pgtls_logs_in_to_pgtls(
    password: str, salt: bytes, iterations: int, binding: bytes | None, tls: bool
) -> None:
    login, (server, final), keys = exchange(password, password, salt, iterations, binding, tls=tls)
    assert login.mechanism == (SCRAM_SHA_256_PLUS if binding else SCRAM_SHA_256)
    login.finish(final)
    assert login.done
    assert server.clientKey == keys.client_key
    assert login.keys == keys


@fuzz(200)
@given(_PASSWORDS, _PASSWORDS, _SALTS, _BINDINGS)
def test_a_wrong_password_is_refused_by_the_server(
    password: str, other: str, salt: bytes, binding: bytes | None
) -> None:
    if prepare_password(password) == prepare_password(other):
        return
    with pytest.raises(ScramAuthError, match="wrong password"):
        exchange(other, password, salt, 1, binding, tls=True)


# -- the server side: client-first and client-final, in their messages ----------------------


def client_finals(cbind: bytes, nonce: str, proof: bytes) -> st.SearchStrategy[bytes]:
    """A client-final made of right, wrong and malformed parts."""
    channel = st.sampled_from([base64.b64encode(cbind).decode(), "biws", "eSws", "!!", ""])
    nonces = st.sampled_from([nonce, nonce + "x", nonce[:-1], ""])
    proofs = st.sampled_from(
        [base64.b64encode(proof).decode(), base64.b64encode(proof[:31]).decode(), "", "x", "=="]
    )
    return st.tuples(channel, nonces, proofs, st.sampled_from(["", ",p=", ",x=1"])).map(
        lambda p: f"c={p[0]},r={p[1]}{p[3]},p={p[2]}".encode()
    )


@FUZZ
@given(client_firsts(), _BINDINGS, st.data())
def test_server_reads_any_client_messages(
    first: tuple[str, bytes], binding: bytes | None, data: st.DataObject
) -> None:
    stored, _ = verifier("pw", b"salt", 1)
    server = ScramServer(stored, binding)
    mechanism, message = first
    try:
        serverFirst = server.clientFirst(mechanism, message)
    except ScramAuthError:
        return
    nonce = serverFirst.decode("ascii").split(",")[0][2:]
    header = message.decode().split(",", 2)
    cbind = f"{header[0]},{header[1]},".encode() + (binding or b"")
    final = data.draw(client_finals(cbind, nonce, b"\x07" * 32))
    with pytest.raises(ScramAuthError):
        server.clientFinal(final)


@FUZZ
@given(st.binary(max_size=40), st.sampled_from([0, 1, 5, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000]))
@example(b"SCRAM-SHA-256\0", 0xFFFFFFFF)
def test_a_sasl_initial_response_length_is_checked_against_the_bytes(
    body: bytes, claim: int
) -> None:
    """
    The Int32 before the client-first data must be exactly how many bytes
    follow (or -1 for none): a claim is compared, never waited for or
    allocated.
    """
    mechanism, _, rest = body.partition(b"\0")
    message = mechanism + b"\0" + struct.pack("!I", claim) + rest
    try:
        name, data = wire.parse_sasl_initial_response(message)
    except ProtocolViolation as e:
        assert e.sqlstate == "08P01"
        return
    assert data == rest
    assert claim == len(rest) or (claim == 0xFFFFFFFF and not rest)
    if mechanism.isascii():
        assert name == mechanism.decode()
        assert _initial(wire.sasl_initial_response(name, data)) == (name, data)


# -- WarmLogin: the cached login pgtls answers ------------------------------------------------


_CLIENT_MESSAGES = st.lists(
    st.one_of(
        st.builds(lambda b: wire.message(b"p", b), st.binary(max_size=40)),
        st.builds(lambda m: wire.sasl_initial_response(m[0], m[1]), client_firsts()),
        st.just(wire.message(b"p", b"secret\0")),
        st.builds(lambda b: wire.message(b"Q", b), st.binary(max_size=10)),
    ),
    max_size=3,
).map(b"".join)


class Warm:
    """A L{WarmLogin} for C{alice}, what it said and what it decided."""

    def __init__(self, secret: Any, binding: bytes | None) -> None:
        self.written: list[bytes] = []
        self.outcomes: list[tuple[Any, ...]] = []
        self.login = WarmLogin(
            SimpleNamespace(write=self.written.append),
            "alice",
            CachedLogin(secret, [("server_version", "18")], 2, 0.0),
            binding,
            lambda secret: self.outcomes.append(("ok", secret)),
            lambda sqlstate, text, why: self.outcomes.append(("failed", sqlstate, text, why)),
        )

    def said(self) -> tuple[bytes, bytes]:
        """The last message it wrote, read back."""
        (message,) = read_messages(self.written[-1])
        return message


@FUZZ
@given(st.booleans(), _BINDINGS, _CLIENT_MESSAGES, CUTS)
def test_warm_login_reads_any_client(
    md5: bool, binding: bytes | None, stream: bytes, cuts: list[int]
) -> None:
    secret: Any = (
        Md5Secret.fromPassword(b"secret", "alice") if md5 else derive_keys(b"secret", b"salt", 1)
    )
    warm = Warm(secret, binding)
    reader = wire.MessageReader()
    for chunk in split_at(stream, cuts):
        reader.feed(chunk)
        while not warm.outcomes and (msg := reader.next()) is not None:
            warm.login.message(*msg)
    for decided in warm.outcomes:
        if decided[0] == "failed":
            assert decided[1] in ("08P01", "28P01") and "secret" not in str(decided[1:3])
        else:
            assert decided[1] is secret


@fuzz(100)
@given(_PASSWORDS, _SALTS, _ITERATIONS, _BINDINGS)
def test_pgtls_client_logs_in_to_a_warm_login(
    password: str, salt: bytes, iterations: int, binding: bytes | None
) -> None:
    """Round trip: the keys pgtls's client derives are the ones the warm login checks."""
    keys = derive_keys(prepare_password(password), salt, iterations)
    warm = Warm(keys, binding)
    mtype, offer = warm.said()
    assert mtype == b"R" and wire.auth_code(offer) == wire.AUTH_SASL
    login = ScramLogin(wire.sasl_mechanisms(offer), binding, tls=True, maxIterations=MAX_ITERATIONS)
    warm.login.message(b"p", login.start(password)[5:])
    _, serverFirst = warm.said()
    assert wire.auth_code(serverFirst) == wire.AUTH_SASL_CONTINUE
    final = outcome(login.challenge(serverFirst[4:], Runner()))
    warm.login.message(b"p", final[5:])
    _, serverFinal = warm.said()
    assert wire.auth_code(serverFinal) == wire.AUTH_SASL_FINAL
    login.finish(serverFinal[4:])
    assert login.done and warm.outcomes == [("ok", keys)]


@fuzz(100)
@given(_PASSWORDS, st.text(max_size=10))
def test_md5_answers_round_trip(password: str, user: str) -> None:
    """The answer pgtls sends a server is the one its own check accepts, and only it."""
    secret = Md5Secret.fromPassword(password.encode(), user)
    warm = Warm(secret, None)
    _, request = warm.said()
    assert wire.auth_code(request) == wire.AUTH_MD5_PASSWORD
    salt = request[4:]
    answer = md5_password(user, password, salt)
    assert answer == secret.response(salt)
    assert not secret.check(answer[:-1], salt) and not secret.check(answer + b"0", salt)
    warm = Warm(Md5Secret.fromPassword(password.encode(), "alice"), None)
    _, request = warm.said()
    warm.login.message(b"p", md5_password("alice", password, request[4:]) + b"\0")
    assert warm.outcomes and warm.outcomes[0][0] == "ok"


# -- ServerLogin: pgtls logging in to a backend ---------------------------------------------

#: What no message may ever quote.
_PASSWORD = "pw-\u2603-0c1f9"


class Leg:
    """The backend leg a L{ServerLogin} drives: what it wrote, and whether it closed."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.tls = None
        self.deliver: Any = None
        self.onLost: Any = None
        self.out = SimpleNamespace(write=self.written.extend)
        self.clock = Clock()
        self.connector = SimpleNamespace(
            config=SimpleNamespace(
                require_auth=None, tls="disable", max_scram_iterations=MAX_ITERATIONS
            ),
            derivations=SimpleNamespace(run=Runner()),
            clock=self.clock,
        )

    def close(self) -> None:
        self.closed = True

    def sent(self) -> list[tuple[bytes, bytes]]:
        """The typed messages written since the last call (the startup packet skipped)."""
        if self.written[:1] == b"\0":
            parsed = wire.parse_startup_packet(self.written)
            assert parsed is not None
            del self.written[: parsed[1]]
        messages = read_messages(bytes(self.written))
        self.written.clear()
        return messages


_AUTH_CODES = st.sampled_from([0, 3, 5, 7, 8, 9, 10, 11, 12, 99, 0xFFFFFFFF])
_TEXT = st.text(st.characters(exclude_characters="\0", exclude_categories=("Cs",)), max_size=12)
_BACKEND_MESSAGES = st.lists(
    st.one_of(
        st.builds(wire.authentication, _AUTH_CODES, st.binary(max_size=12)),
        st.builds(
            wire.authentication_sasl,
            st.lists(st.sampled_from([SCRAM_SHA_256, SCRAM_SHA_256_PLUS, "X"]), max_size=2),
        ),
        st.builds(wire.parameter_status, _TEXT, _TEXT),
        st.builds(lambda b: wire.message(b"K", b), st.binary(max_size=300)),
        st.builds(lambda t: wire.error_response("28P01", t), _TEXT),
        st.builds(
            wire.message,
            st.sampled_from([b"N", b"v", b"Z", b"S", b"E", b"R", b"?"]),
            st.binary(max_size=8),
        ),
        st.sampled_from([b"R" + struct.pack("!I", 0x7FFFFFFF), b"R\0\0\0\x02", b"R\0\0"]),
    ),
    max_size=8,
).map(b"".join)


@FUZZ
@given(_BACKEND_MESSAGES, CUTS, st.booleans())
def test_server_login_reads_any_server(stream: bytes, cuts: list[int], password: bool) -> None:
    leg = Leg()
    login = ServerLogin(leg, "svc", "app", _PASSWORD if password else None, {})
    for chunk in split_at(stream, cuts):
        leg.deliver(chunk)
    if not login.done.called:
        leg.clock.advance(LOGIN_TIMEOUT)
    value = result(login.done)
    if isinstance(value, Failure):
        assert value.check(ServerLoginError), value
        error = value.value
        assert leg.closed
        assert _PASSWORD not in f"{error.message} {error.fields}"
    else:
        assert isinstance(value, LoginResult)


@fuzz(100)
@given(
    _PASSWORDS,
    _SALTS,
    _ITERATIONS,
    st.dictionaries(_TEXT, _TEXT, max_size=4),
    st.integers(0, 0xFFFFFFFF),
    st.binary(min_size=1, max_size=256),
    CUTS,
)
def test_server_login_round_trip(
    password: str,
    salt: bytes,
    iterations: int,
    parameters: dict[str, str],
    pid: int,
    key: bytes,
    cuts: list[int],
) -> None:
    """
    pgtls's login against a backend played by pgtls's own SCRAM server:
    what the server says (parameters, cancel key) is what the login
    learns, whatever chunks it comes in.
    """
    leg = Leg()
    login = ServerLogin(leg, "svc", "app", password, {"application_name": "pgtls"})
    startup = wire.parse_startup_packet(leg.written)
    assert startup is not None
    assert startup[0] == wire.StartupMessage(
        3, 0, {"user": "svc", "database": "app", "application_name": "pgtls"}
    )
    stored, _ = verifier(password, salt, iterations)
    server = ScramServer(stored, None)
    leg.deliver(wire.authentication_sasl(server.mechanisms))
    ((mtype, body),) = leg.sent()
    serverFirst = server.clientFirst(*wire.parse_sasl_initial_response(body))
    leg.deliver(wire.authentication(wire.AUTH_SASL_CONTINUE, serverFirst))
    ((mtype, body),) = leg.sent()
    assert mtype == b"p"
    rest = wire.authentication(wire.AUTH_SASL_FINAL, server.clientFinal(body))
    rest += wire.AUTHENTICATION_OK
    rest += b"".join(wire.parameter_status(n, v) for n, v in parameters.items())
    rest += wire.backend_key_data(pid, key) + wire.ready_for_query()
    for chunk in split_at(rest, cuts):
        leg.deliver(chunk)
    assert outcome(login.done) == LoginResult(parameters, (pid, key))
    assert not leg.closed and leg.sent() == []
