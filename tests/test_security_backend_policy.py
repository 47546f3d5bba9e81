"""
Issue 10, item 5, as configuration and as pure logic: C{backend.tls}
defaults to C{verify-full} and C{verify-ca} needs C{root_ca};
C{backend.require_auth} has libpq's syntax; and L{LoginGuard} accepts and
refuses the sequences of authentication requests libpq does, and never
lets a cleartext password go over a leg that is not verified TLS.

No server here: the same rules against a real one are in
test_security_backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pgtls_twisted.config import ConfigError, describe_config, parse_config
from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.protocol._authpolicy import LoginGuard, parse_require_auth

# ---------------------------------------------------------------------------
# 5. backend.tls defaults to verify-full; verify-ca needs root_ca


def _doc(tmp_path: Path, **backend: Any) -> dict[str, Any]:
    for name in ("server.crt", "server.key", "ca.crt"):
        (tmp_path / name).write_text("dummy\n")
    (tmp_path / "server.key").chmod(0o600)
    return {
        "proxy": [
            {
                "listener": {
                    "bind_address": "127.0.0.1:0",
                    "server_cert": "server.crt",
                    "server_key": "server.key",
                },
                "backend": {"address": "db.internal:5432", **backend},
            }
        ]
    }


def test_backend_tls_default_is_verify_full(tmp_path: Path) -> None:
    """Nothing said: the server must prove it is db.internal, against the system CAs."""
    (config_route,) = parse_config(_doc(tmp_path), base_dir=tmp_path).routes
    assert config_route.backend.tls == "verify-full"
    assert config_route.backend.root_ca is None
    text = describe_config(parse_config(_doc(tmp_path), base_dir=tmp_path))
    assert "tls verify-full (TLS required; certificate chain and host name verified)" in text
    assert "system CAs" in text


@pytest.mark.parametrize("mode", ["disable", "prefer", "require"])
def test_weaker_modes_still_available_when_named(tmp_path: Path, mode: str) -> None:
    (config_route,) = parse_config(_doc(tmp_path, tls=mode), base_dir=tmp_path).routes
    assert config_route.backend.tls == mode


def test_verify_ca_requires_root_ca(tmp_path: Path) -> None:
    """As libpq 16: verify-ca against every public CA would accept anyone's certificate."""
    with pytest.raises(ConfigError) as info:
        parse_config(_doc(tmp_path, tls="verify-ca"), base_dir=tmp_path)
    (message,) = info.value.messages
    assert message.startswith('[[proxy]] #1: backend.root_ca: required with tls = "verify-ca"')
    (ok,) = parse_config(
        _doc(tmp_path, tls="verify-ca", root_ca="ca.crt"), base_dir=tmp_path
    ).routes
    assert ok.backend.root_ca == tmp_path / "ca.crt"


# ---------------------------------------------------------------------------
# 5. backend.require_auth: libpq's syntax


@pytest.mark.parametrize(
    ("text", "allowed"),
    [
        ("scram-sha-256", {10}),
        ("password", {3}),
        ("md5,scram-sha-256", {5, 10}),
        ("none", {0}),
        ("scram-sha-256, none", {0, 10}),
        ("gss", {7, 8}),
        ("sspi", {8, 9}),
        ("!password", {0, 5, 7, 8, 9, 10}),
        ("!password,!md5", {0, 7, 8, 9, 10}),
        ("!none", {3, 5, 7, 8, 9, 10}),
        ("!gss", {0, 3, 5, 8, 9, 10}),
        ("!gss,!sspi", {0, 3, 5, 10}),
    ],
)
def test_require_auth_syntax(text: str, allowed: set[int]) -> None:
    assert parse_require_auth(text).allowed == allowed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("md5,!password", 'negative require_auth method "!password" cannot be mixed'),
        ("!md5,password", 'require_auth method "password" cannot be mixed with negative'),
        ("md5,md5", 'require_auth method "md5" is specified more than once'),
        ("!md5,!md5", 'require_auth method "md5" is specified more than once'),
        ("scram", 'invalid require_auth method "scram"'),
        ("md5,", 'invalid require_auth method ""'),
        ("!", 'invalid require_auth method ""'),
        ("SCRAM-SHA-256", 'invalid require_auth method "SCRAM-SHA-256"'),
    ],
)
def test_require_auth_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_doc(tmp_path, require_auth=text), base_dir=tmp_path)
    (problem,) = info.value.messages
    assert problem.startswith("[[proxy]] #1: backend.require_auth: ")
    assert message in problem


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (4095, "must be at least 4096"),
        (0, "must be at least 4096"),
        ("100000", 'expected an integer, got "100000"'),
        (True, "expected an integer, got boolean true"),
    ],
)
def test_max_scram_iterations_values(tmp_path: Path, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_doc(tmp_path, max_scram_iterations=value), base_dir=tmp_path)
    (problem,) = info.value.messages
    assert problem.startswith("[[proxy]] #1: backend.max_scram_iterations: ")
    assert message in problem


def test_describe_shows_the_backend_auth_policy(tmp_path: Path) -> None:
    doc = _doc(tmp_path, tls="require", require_auth="scram-sha-256", max_scram_iterations=8192)
    text = describe_config(parse_config(doc, base_dir=tmp_path))
    assert (
        "auth require_auth scram-sha-256; cleartext passwords refused (leg not verified);"
        " SCRAM iterations <= 8192"
    ) in text
    text = describe_config(parse_config(_doc(tmp_path), base_dir=tmp_path))
    assert "auth any method; SCRAM iterations <= 100000" in text


# ---------------------------------------------------------------------------
# 5. LoginGuard: the sequences libpq accepts and refuses


def _sequence(guard: LoginGuard, *codes: int) -> str | None:
    for code in codes:
        refusal = guard.refusal(code)
        if refusal is not None:
            return refusal
    return None


SASL = (wire.AUTH_SASL, wire.AUTH_SASL_CONTINUE, wire.AUTH_SASL_FINAL, wire.AUTH_OK)


@pytest.mark.parametrize(
    ("require_auth", "codes", "refusal"),
    [
        (None, (wire.AUTH_OK,), None),
        (None, SASL, None),
        ("scram-sha-256", SASL, None),
        ("scram-sha-256", (wire.AUTH_OK,), "server did not complete authentication"),
        # SASL with the final message skipped: not complete either.
        (
            "scram-sha-256",
            (wire.AUTH_SASL, wire.AUTH_SASL_CONTINUE, wire.AUTH_OK),
            "server did not complete authentication",
        ),
        ("scram-sha-256", (wire.AUTH_MD5_PASSWORD,), "server requested a hashed password"),
        ("none", (wire.AUTH_OK,), None),
        ("none", SASL, "server requested SASL authentication"),
        ("md5,none", (wire.AUTH_MD5_PASSWORD, wire.AUTH_OK), None),
        ("!md5", (wire.AUTH_OK,), None),
        ("!md5", SASL, None),
        ("!md5", (wire.AUTH_MD5_PASSWORD,), "server requested a hashed password"),
        ("!none", (wire.AUTH_OK,), "server did not complete authentication"),
        ("!none", SASL, None),
        ("md5", (9,), "server requested SSPI authentication"),
        ("md5", (6,), "server requested an unknown authentication type"),
        ("gss", (7, 8, 8, 0), None),
    ],
)
def test_login_guard_follows_libpq(
    require_auth: str | None, codes: tuple[int, ...], refusal: str | None
) -> None:
    guard = LoginGuard(require_auth, "verify-full", tls=True)
    got = _sequence(guard, *codes)
    if refusal is None:
        assert got is None
    else:
        assert got == f'authentication method requirement "{require_auth}" failed: {refusal}'


@pytest.mark.parametrize(
    ("mode", "tls", "how"),
    [
        ("disable", False, "a plaintext"),
        ("prefer", False, "a plaintext"),
        ("prefer", True, "an unverified"),
        ("require", True, "an unverified"),
    ],
)
@pytest.mark.parametrize("require_auth", [None, "password", "!md5"])
def test_no_cleartext_password_over_an_unverified_leg(
    mode: str, tls: bool, how: str, require_auth: str | None
) -> None:
    """Whatever require_auth says: the rule has no switch."""
    guard = LoginGuard(require_auth, mode, tls)
    assert guard.refusal(wire.AUTH_CLEARTEXT_PASSWORD) == (
        f'backend asked for a cleartext password over {how} connection (backend.tls = "{mode}");'
        " refusing to send it"
    )
    # MD5 is not affected (unless require_auth says so).
    assert LoginGuard(None, mode, tls).refusal(wire.AUTH_MD5_PASSWORD) is None


@pytest.mark.parametrize("mode", ["verify-ca", "verify-full"])
def test_cleartext_password_allowed_over_verified_tls(mode: str) -> None:
    guard = LoginGuard(None, mode, tls=True)
    assert _sequence(guard, wire.AUTH_CLEARTEXT_PASSWORD, wire.AUTH_OK) is None
    # ... unless require_auth forbids it.
    refusal = LoginGuard("!password", mode, tls=True).refusal(wire.AUTH_CLEARTEXT_PASSWORD)
    assert refusal == (
        'authentication method requirement "!password" failed:'
        " server requested a cleartext password"
    )


@pytest.mark.parametrize("require_auth", [None, "scram-sha-256"])
@pytest.mark.parametrize("code", [wire.AUTH_SASL_CONTINUE, wire.AUTH_SASL_FINAL])
def test_sasl_continuation_without_a_sasl_start_is_refused(
    require_auth: str | None, code: int
) -> None:
    """
    A "final" SASL message with no exchange before it would otherwise pass
    for an authentication (and the AuthenticationOk behind it with it).
    """
    guard = LoginGuard(require_auth, "require", tls=True)
    refusal = guard.refusal(code)
    assert refusal is not None and refusal.endswith("server did not complete authentication")
