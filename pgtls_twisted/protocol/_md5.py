# -*- test-case-name: tests.test_logincache -*-
"""
PostgreSQL's MD5 password authentication, both sides, from the hash
PostgreSQL stores: C{md5(password || user)} in hex. With it pgtls can
answer a server's MD5 challenge as the user, and check a client's answer
to its own, without the password. Pure code.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Md5Secret:
    """An MD5 role's C{md5(password || user)}, in hex, as PostgreSQL stores it after C{md5}."""

    inner: bytes = field(repr=False)

    @classmethod
    def fromPassword(cls, password: bytes, user: str) -> Md5Secret:
        digest = hashlib.md5(password + user.encode())  # noqa: S324 (the protocol's)
        return cls(digest.hexdigest().encode())

    def response(self, salt: bytes) -> bytes:
        """The C{md5...} answer to a challenge with C{salt}."""
        return b"md5" + hashlib.md5(self.inner + salt).hexdigest().encode()  # noqa: S324

    def check(self, answer: bytes, salt: bytes) -> bool:
        """Whether a client's answer to C{salt} proves it knows the password."""
        return hmac.compare_digest(answer, self.response(salt))
