"""
Unit tests of what pgtls keeps of a client's login (C{identity =
"client"}): the cache and its TTL, the MD5 hash, the SCRAM keys as a
client credential, and the login pgtls answers itself from them.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from pgtls_twisted.pool._logincache import LoginCache
from pgtls_twisted.pool._warmlogin import WarmLogin, reportedParameters, startupAnswer
from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.protocol._md5 import Md5Secret
from pgtls_twisted.protocol._scram import (
    SCRAM_SHA_256,
    SCRAM_SHA_256_PLUS,
    ScramKeys,
    ScramKeysStale,
    ScramLogin,
    derive_keys,
    prepare_password,
)
from pgtls_twisted.protocol._scramserver import ScramServer, Verifier

KEYS = derive_keys(prepare_password("secret"), b"0123456789abcdef", 4096)
PARAMS = [("server_version", "15.0"), ("application_name", "first"), ("DateStyle", "ISO, MDY")]


def now(f: Any, *args: Any) -> defer.Deferred[Any]:
    return defer.succeed(f(*args))


class Out:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def messages(self) -> list[tuple[bytes, bytes]]:
        reader = wire.MessageReader()
        reader.feed(self.data)
        self.data = b""
        out = []
        while (msg := reader.next()) is not None:
            out.append(msg)
        return out


def test_keys_hide_their_secrets() -> None:
    assert "client_key" not in repr(KEYS) and "server_key" not in repr(KEYS)
    assert repr(KEYS.client_key) not in repr(KEYS)
    assert "inner" not in repr(Md5Secret.fromPassword(b"pw", "u"))


def test_cache_ttl_evict_clear() -> None:
    clock = Clock()
    cache = LoginCache(clock, ttl=10)
    cache.remember("u", "db", KEYS, PARAMS, 0)
    assert cache.fresh("u", "db").secret is KEYS
    assert cache.fresh("u", "other") is None
    clock.advance(10)
    # Too old to answer a login, still what the pool logs in with.
    assert cache.fresh("u", "db") is None
    assert cache.secret("u", "db") is KEYS
    cache.remember("u", "db2", KEYS, PARAMS, 0)
    cache.remember("v", "db", KEYS, PARAMS, 0)
    assert cache.evict("u") == 2
    assert cache.secret("u", "db") is None and len(cache) == 1
    assert cache.clear() == 1 and len(cache) == 0


def test_ttl_zero_answers_nothing() -> None:
    cache = LoginCache(Clock(), ttl=0)
    cache.remember("u", "db", KEYS, PARAMS, 0)
    assert cache.fresh("u", "db") is None
    assert cache.secret("u", "db") is KEYS


def test_a_clock_that_went_back_is_not_fresh() -> None:
    clock = Clock()
    clock.advance(100)
    cache = LoginCache(clock, ttl=10)
    cache.remember("u", "db", KEYS, PARAMS, 0)
    clock.rightNow = 50
    assert cache.fresh("u", "db") is None


def test_md5_secret() -> None:
    secret = Md5Secret.fromPassword(b"md5_pw", "md5_user")
    salt = b"\x01\x02\x03\x04"
    # PostgreSQL's: md5(md5(password || user) || salt), as libpq sends it.
    import hashlib

    inner = hashlib.md5(b"md5_pwmd5_user").hexdigest().encode()
    expected = b"md5" + hashlib.md5(inner + salt).hexdigest().encode()
    assert secret.response(salt) == expected
    assert secret.check(expected, salt)
    assert not secret.check(expected, b"\0\0\0\0")


def scram_exchange(login: ScramLogin, server: ScramServer, start: bytes) -> None:
    mechanism, first = wire.parse_sasl_initial_response(start[5:])
    serverFirst = server.clientFirst(mechanism, first)
    final: list[bytes] = []
    login.challenge(serverFirst, now).addCallback(final.append)
    login.finish(server.clientFinal(final[0][5:]))


def test_login_with_keys_instead_of_the_password() -> None:
    verifier = Verifier(KEYS.iterations, KEYS.salt, KEYS.stored_key, KEYS.server_key)
    login = ScramLogin([SCRAM_SHA_256], None, tls=False, maxIterations=10_000)
    server = ScramServer(verifier, None)
    scram_exchange(login, server, login.startWithKeys(KEYS))
    assert login.done and login.keys is KEYS
    assert server.clientKey == KEYS.client_key


def test_password_login_exposes_its_keys() -> None:
    verifier = Verifier(KEYS.iterations, KEYS.salt, KEYS.stored_key, KEYS.server_key)
    login = ScramLogin([SCRAM_SHA_256], None, tls=False, maxIterations=10_000)
    scram_exchange(login, ScramServer(verifier, None), login.start("secret"))
    assert login.keys == KEYS


def test_keys_of_another_salt_are_stale() -> None:
    """The password changed: the server's salt is not the cached one."""
    other = derive_keys(prepare_password("new"), b"another salt....", 4096)
    verifier = Verifier(other.iterations, other.salt, other.stored_key, other.server_key)
    login = ScramLogin([SCRAM_SHA_256], None, tls=False, maxIterations=10_000)
    server = ScramServer(verifier, None)
    mechanism, first = wire.parse_sasl_initial_response(login.startWithKeys(KEYS)[5:])
    with pytest.raises(ScramKeysStale) as info:
        login.challenge(server.clientFirst(mechanism, first), now)
    assert info.value.sqlstate == "28P01"


def warm(secret: Any, binding: bytes | None = None) -> tuple[WarmLogin, Out, list[Any]]:
    out, results = Out(), []
    cache = LoginCache(Clock(), 60)
    cache.remember("u", "db", secret, PARAMS, 0)
    login = WarmLogin(
        out,
        "u",
        cache.fresh("u", "db"),
        binding,
        lambda s: results.append(("ok", s)),
        lambda code, text, why: results.append((code, text)),
    )
    return login, out, results


def test_warm_scram_login_with_channel_binding() -> None:
    binding = b"\x42" * 32
    login, out, results = warm(KEYS, binding)
    ((mtype, body),) = out.messages()
    assert wire.sasl_mechanisms(body) == [SCRAM_SHA_256_PLUS, SCRAM_SHA_256]
    client = ScramLogin(wire.sasl_mechanisms(body), binding, tls=True, maxIterations=10_000)
    login.message(b"p", client.start("secret")[5:])
    ((_, cont),) = out.messages()
    assert wire.auth_code(cont) == wire.AUTH_SASL_CONTINUE
    final: list[bytes] = []
    client.challenge(cont[4:], now).addCallback(final.append)
    login.message(b"p", final[0][5:])
    ((_, last),) = out.messages()
    client.finish(last[4:])
    assert client.done and results == [("ok", KEYS)]


@pytest.mark.parametrize("password", ["wrong", ""])
def test_warm_scram_wrong_password(password: str) -> None:
    login, out, results = warm(KEYS)
    ((_, body),) = out.messages()
    client = ScramLogin(wire.sasl_mechanisms(body), None, tls=True, maxIterations=10_000)
    login.message(b"p", client.start(password)[5:])
    ((_, cont),) = out.messages()
    final: list[bytes] = []
    client.challenge(cont[4:], now).addCallback(final.append)
    login.message(b"p", final[0][5:])
    assert results == [("28P01", 'password authentication failed for user "u"')]
    assert out.messages() == []


def test_warm_md5_login() -> None:
    secret = Md5Secret.fromPassword(b"pw", "u")
    login, out, results = warm(secret)
    ((_, body),) = out.messages()
    assert wire.auth_code(body) == wire.AUTH_MD5_PASSWORD
    salt = body[4:8]
    login.message(b"p", secret.response(salt) + b"\0")
    assert results == [("ok", secret)]
    login, out, results = warm(secret)
    login.message(b"p", b"md5" + b"0" * 32 + b"\0")
    assert results[0][0] == "28P01"


def test_garbage_is_a_failed_login_not_a_crash() -> None:
    login, out, results = warm(KEYS)
    login.message(b"p", b"\xff\xff")
    assert results[0][0] == "28P01"
    login, out, results = warm(KEYS)
    login.message(b"Q", b"SELECT 1\0")
    assert results[0][0] == "08P01"


def test_startup_answer() -> None:
    cache = LoginCache(Clock(), 60)
    cache.remember("u", "db", KEYS, PARAMS, 0)
    cached = cache.fresh("u", "db")
    startup = wire.StartupMessage(
        3, 2, {"user": "u", "database": "db", "DateStyle": "ISO", "_pq_.x": "1"}
    )
    reported = reportedParameters(cached, startup)
    assert reported == [
        ("server_version", "15.0"),
        ("application_name", ""),
        ("DateStyle", "ISO"),
    ]
    out = Out()
    out.write(startupAnswer(cached, startup, reported, (1234, b"k" * 4)))
    types = [m[0] for m in out.messages()]
    assert types == [b"R", b"v", b"S", b"S", b"S", b"K", b"Z"]
    out.write(startupAnswer(cached, startup, reported, (1234, b"k" * 4)))
    negotiate = out.messages()[1][1]
    assert struct.unpack_from("!ii", negotiate) == (0, 1) and negotiate.endswith(b"_pq_.x\0")


def test_scram_keys_equality_is_by_value() -> None:
    assert KEYS == ScramKeys(KEYS.salt, KEYS.iterations, KEYS.client_key, KEYS.server_key)


def test_prune_keeps_what_a_pool_may_need() -> None:
    clock = Clock()
    cache = LoginCache(clock, ttl=10)
    cache.remember("u", "db", KEYS, PARAMS, 0)
    cache.remember("v", "db", KEYS, PARAMS, 0)
    cache.prune(set())
    assert len(cache) == 2  # still fresh
    clock.advance(11)
    cache.prune({("u", "db")})
    assert cache.secret("u", "db") is KEYS and cache.secret("v", "db") is None
