"""
What the fuzz tests of SCRAM's two sides share (tests/test_fuzz_scram.py,
tests/test_fuzz_console.py): a key derivation that runs at once and keeps
count, a verifier for a password, and client-first messages close to
valid ones.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from twisted.internet import defer
from twisted.python.failure import Failure

from pgtls_twisted.protocol._scram import (
    SCRAM_SHA_256,
    SCRAM_SHA_256_PLUS,
    ScramKeys,
    derive_keys,
    prepare_password,
)
from pgtls_twisted.protocol._scramserver import Verifier
from support.unit import result

#: The most iterations a client side accepts in the fuzz tests (they derive
#: keys in every example, so the counts stay small).
MAX_ITERATIONS = 16


class Runner:
    """
    Derives at once (a L{pgtls_twisted.protocol._scram.Runner}), and
    remembers every iteration count it was asked for: none may be above
    L{MAX_ITERATIONS}, whatever a server claimed.
    """

    def __init__(self) -> None:
        self.iterations: list[int] = []

    def __call__(self, f: Any, *args: Any) -> defer.Deferred[Any]:
        if args:
            self.iterations.append(args[2])
            assert args[2] <= MAX_ITERATIONS, "derivation above the limit"
        return defer.maybeDeferred(f, *args)


def outcome(d: defer.Deferred[Any]) -> Any:
    """What C{d} fired with, a failure raised."""
    value = result(d)
    if isinstance(value, Failure):
        value.raiseException()
    return value


def verifier(password: str, salt: bytes, iterations: int) -> tuple[Verifier, ScramKeys]:
    """The verifier of C{password} a server keeps, and the keys behind it."""
    keys = derive_keys(prepare_password(password), salt, iterations)
    return Verifier(iterations, salt, keys.stored_key, keys.server_key), keys


_FLAGS = st.sampled_from(["n", "y", "p=tls-server-end-point", "p=tls-unique", "p", "", "x", "n=u"])
_CLIENT_NONCES = st.sampled_from(["abc", "", "a,b", "é", "a b", "\x7f", "~!"]) | st.text(max_size=6)


@st.composite
def client_firsts(draw: st.DrawFn) -> tuple[str, bytes]:
    """A mechanism and a client-first message, each part right, wrong or malformed."""
    mechanism = draw(st.sampled_from([SCRAM_SHA_256, SCRAM_SHA_256_PLUS, "PLAIN", ""]))
    header = draw(_FLAGS) + "," + draw(st.sampled_from(["", "a=x", "a=", "x"])) + ","
    bare = draw(st.sampled_from(["n=", "n=u", "", "m=x,n="])) + ",r=" + draw(_CLIENT_NONCES)
    extensions = draw(st.sampled_from(["", ",x=y", ",", ",r=again"]))
    return mechanism, (header + bare + extensions).encode("utf-8", "surrogatepass")
