# -*- test-case-name: tests.test_security_backend_policy,tests.test_security_backend -*-
"""
What a backend may ask pgtls for while it logs in, and what pgtls refuses.

Two rules, applied to every login pgtls makes or relays: a client's login
through a pass-through or pooled route (L{pgtls_twisted.proxy._session}, the
temporary connection of L{pgtls_twisted.pool._session}), and pgtls's own login as a
pool's service user (L{pgtls_twisted.pool._serverlogin}):

 - C{backend.require_auth}, with libpq's syntax and meaning: the methods the
   server may ask for (C{password}, C{md5}, C{gss}, C{sspi},
   C{scram-sha-256}, and C{none} for no authentication at all), or, with a
   C{!} before every element, the methods it may not. A server that asks
   for anything else is refused with libpq's own words.
 - Always, whatever C{require_auth} says: a cleartext password is never sent
   (or relayed to the client to send) over a backend leg that is not
   verified TLS (C{verify-ca} or C{verify-full}). Over such a leg the
   password would reach whoever answered the connection. There is no
   setting to turn this off: verify the backend, or have it use SCRAM.

Everything here is pure: no I/O and no Twisted, so the configuration
loader can use L{parse_require_auth} to check a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from pgtls_twisted.protocol import _wire as wire

# Authentication request codes beyond those L{wire} names (libpq's AUTH_REQ_*).
AUTH_GSS = 7
AUTH_GSS_CONTINUE = 8
AUTH_SSPI = 9

#: The requests each C{require_auth} method allows (libpq's fe-connect.c:
#: GSS continuation messages belong to both GSSAPI and SSPI).
_METHODS: dict[str, frozenset[int]] = {
    "password": frozenset({wire.AUTH_CLEARTEXT_PASSWORD}),
    "md5": frozenset({wire.AUTH_MD5_PASSWORD}),
    "gss": frozenset({AUTH_GSS, AUTH_GSS_CONTINUE}),
    "sspi": frozenset({AUTH_SSPI, AUTH_GSS_CONTINUE}),
    "scram-sha-256": frozenset({wire.AUTH_SASL}),
    "none": frozenset({wire.AUTH_OK}),
}
_EVERYTHING = frozenset().union(*_METHODS.values())

#: How libpq describes each request when refusing it (fe-auth.c).
_ASKED = {
    wire.AUTH_CLEARTEXT_PASSWORD: "server requested a cleartext password",
    wire.AUTH_MD5_PASSWORD: "server requested a hashed password",
    AUTH_GSS: "server requested GSSAPI authentication",
    AUTH_GSS_CONTINUE: "server requested GSSAPI authentication",
    AUTH_SSPI: "server requested SSPI authentication",
    wire.AUTH_SASL: "server requested SASL authentication",
}
_UNKNOWN = "server requested an unknown authentication type"
_INCOMPLETE = "server did not complete authentication"

#: The SQLSTATE of every refusal here: a permanent refusal of what the
#: server demands (invalid_authorization_specification, as PostgreSQL uses
#: for a pg_hba.conf rejection), not a connection failure that a driver's
#: retry logic (class 08) would try again.
REFUSED = "28000"

#: The backend modes in which pgtls has verified who it is talking to.
VERIFIED_MODES = ("verify-ca", "verify-full")


@dataclass(frozen=True)
class RequireAuth:
    """
    A parsed C{backend.require_auth}.

    @ivar text: the setting as written, for messages (libpq quotes it too).
    @ivar allowed: the authentication request codes the server may send;
        C{wire.AUTH_OK} among them means it may skip authentication.
    """

    text: str
    allowed: frozenset[int]


@lru_cache(maxsize=64)
def parse_require_auth(text: str) -> RequireAuth:
    """
    Read a C{require_auth} value as libpq 16 does: a comma-separated list
    of methods, all plain or all negated with C{!}, none repeated.

    @raise ValueError: with libpq's message for the problem.
    """
    items = [item.strip() for item in text.split(",")]
    negated = items[0].startswith("!")
    allowed = set(_EVERYTHING) if negated else set()
    seen: set[str] = set()
    for item in items:
        negative = item.startswith("!")
        method = item[1:] if negative else item
        if negative and not negated:
            raise ValueError(
                f'negative require_auth method "{item}" cannot be mixed with non-negative methods'
            )
        elif negated and not negative:
            raise ValueError(f'require_auth method "{item}" cannot be mixed with negative methods')
        if method not in _METHODS:
            raise ValueError(
                f'invalid require_auth method "{method}"'
                f" (expected {', '.join(_METHODS)}, or all of them preceded by !)"
            )
        if method in seen:
            raise ValueError(f'require_auth method "{method}" is specified more than once')
        seen.add(method)
        if negated:
            allowed -= _METHODS[method]
        else:
            allowed |= _METHODS[method]
    if negated:
        # GSS continuations stay allowed while either GSSAPI or SSPI is.
        if AUTH_GSS in allowed or AUTH_SSPI in allowed:
            allowed.add(AUTH_GSS_CONTINUE)
    return RequireAuth(text, frozenset(allowed))


class LoginGuard:
    """
    The check of one backend login: fed every authentication request the
    server sends, it says which one pgtls must refuse.

    @param requireAuth: C{backend.require_auth}, or C{None} (anything goes,
        but the cleartext rule still applies).
    @param mode: C{backend.tls}, named in the cleartext refusal.
    @param tls: whether this leg actually runs TLS (C{prefer} may not).
    """

    def __init__(self, requireAuth: str | None, mode: str, tls: bool) -> None:
        self._rule = parse_require_auth(requireAuth) if requireAuth is not None else None
        self._mode = mode
        self._verified = tls and mode in VERIFIED_MODES
        self._tls = tls
        self._authenticated = False
        #: A SASL exchange was allowed to start (its continuations need one).
        self._sasl = False

    def refusal(self, code: int) -> str | None:
        """
        The reason to refuse the server's authentication request C{code}
        (an AuthenticationOk included), or C{None} to let it through.
        """
        if code in (wire.AUTH_SASL_CONTINUE, wire.AUTH_SASL_FINAL):
            # Continuations of a SASL exchange already allowed; without one,
            # a "final" message would pass for an authentication.
            if not self._sasl:
                return (
                    _INCOMPLETE
                    if self._rule is None
                    else _requirement_failed(self._rule, _INCOMPLETE)
                )
            if code == wire.AUTH_SASL_FINAL:
                self._authenticated = True
            return None
        rule = self._rule
        if rule is not None and code not in rule.allowed:
            if code != wire.AUTH_OK:
                return _requirement_failed(rule, _ASKED.get(code, _UNKNOWN))
            if not self._authenticated:
                return _requirement_failed(rule, _INCOMPLETE)
        if code == wire.AUTH_CLEARTEXT_PASSWORD and not self._verified:
            how = "an unverified" if self._tls else "a plaintext"
            return (
                f"backend asked for a cleartext password over {how} connection"
                f' (backend.tls = "{self._mode}"); refusing to send it'
            )
        if code == wire.AUTH_SASL:
            self._sasl = True
        if code not in (wire.AUTH_OK, wire.AUTH_SASL):
            # A password answer (or a GSSAPI/SSPI exchange) is the
            # authentication; a SASL one is complete only at its final
            # message, where the server proves it knew the verifier.
            self._authenticated = True
        return None


def _requirement_failed(rule: RequireAuth, reason: str) -> str:
    return f'authentication method requirement "{rule.text}" failed: {reason}'
