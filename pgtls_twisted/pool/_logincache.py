# -*- test-case-name: tests.test_logincache,tests.test_identity -*-
"""
What pgtls keeps of a client's login, for pools whose connections log in
as the client's own role (C{identity = "client"}), and for how long.

PostgreSQL checks a user's password once, over the temporary connection
of its first login through pgtls. pgtls keeps, in memory only, what that
password comes to for the server's verifier: the SCRAM keys (ClientKey,
ServerKey, with the server's salt and iteration count; RFC 5802/7677) or,
for an MD5 role, the MD5 hash; never the password. With them it can:

 - answer later logins of the user itself (pgtls is then the SCRAM server,
   bound to its own certificate), for C{auth_cache_ttl} after the server
   last checked the password (L{LoginCache.fresh});
 - log in to the server as the user for every new pooled connection, for
   as long as the server accepts the keys (L{LoginCache.secret}).

A server that refuses the keys (the password changed), C{FORGET}, a
reload, or the TTL ends that: the next login goes to the server again.
Keys never reach a log, a metric, SHOW output or the disk: their reprs
hide them, and nothing here writes anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from pgtls_twisted.protocol._md5 import Md5Secret
from pgtls_twisted.protocol._scram import ScramKeys

#: What pgtls can log in with as a user.
Secret = ScramKeys | Md5Secret


@dataclass(eq=False)
class CachedLogin:
    """
    One user's login to one database, as the server accepted it.

    @ivar parameters: the server's ParameterStatus messages at that login,
        in order: what a later login answered by pgtls reports.
    @ivar minor: the protocol minor version the server spoke.
    @ivar verifiedAt: when the server last checked the password.
    """

    secret: Secret
    parameters: list[tuple[str, str]]
    minor: int
    verifiedAt: float


class LoginCache:
    """
    The logins of one route's pools, by (user, database): a user's first
    login to each database goes to the server.
    """

    def __init__(self, clock: IReactorTime, ttl: float) -> None:
        self._clock = clock
        self.ttl = ttl
        self._logins: dict[tuple[str, str], CachedLogin] = {}

    def __len__(self) -> int:
        return len(self._logins)

    def remember(
        self,
        user: str,
        database: str,
        secret: Secret,
        parameters: list[tuple[str, str]],
        minor: int,
    ) -> None:
        """The server has just accepted this user's password."""
        self._logins[(user, database)] = CachedLogin(
            secret, parameters, minor, self._clock.seconds()
        )

    def fresh(self, user: str, database: str) -> CachedLogin | None:
        """The login pgtls may answer itself, if the server checked it recently enough."""
        login = self._logins.get((user, database))
        if login is None or not self.ttl:
            return None
        age = self._clock.seconds() - login.verifiedAt
        if not 0 <= age < self.ttl:
            return None
        return login

    def secret(self, user: str, database: str) -> Secret | None:
        """
        What to log in to the server with as C{user}, however old: the
        server checks it on every connection, and refuses it once the
        password changed (then L{evict}).
        """
        login = self._logins.get((user, database))
        return None if login is None else login.secret

    def evict(self, user: str) -> int:
        """Forget every login of C{user}; how many there were."""
        keys = [key for key in self._logins if key[0] == user]
        for key in keys:
            del self._logins[key]
        return len(keys)

    def prune(self, inUse: set[tuple[str, str]]) -> None:
        """
        Drop the logins too old to answer one and whose pool is gone: no
        pooled connection will log in with them, so nothing needs them.
        """
        now = self._clock.seconds()
        for key, login in list(self._logins.items()):
            if key not in inUse and not 0 <= now - login.verifiedAt < self.ttl:
                del self._logins[key]

    def clear(self) -> int:
        """Forget everything (a reload, C{FORGET ALL}); how many there were."""
        count = len(self._logins)
        self._logins.clear()
        return count
