# -*- test-case-name: tests.test_identity,tests.test_pooling -*-
"""
How a pooled session logs in: L{pgtls_twisted.proxy._session.Session}'s
startup over a temporary connection (the server checks the client's
credentials, and for C{identity = "client"} pgtls keeps what the password
comes to, L{pgtls_twisted.pool._logincache}), or, when that cache is warm,
pgtls answering the login itself (L{pgtls_twisted.pool._warmlogin}).
Either way the session then goes on in
L{pgtls_twisted.pool._session.PooledSession._loggedIn}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgtls_twisted.pool._logincache import CachedLogin
from pgtls_twisted.pool._pool import PooledServer
from pgtls_twisted.pool._warmlogin import WarmLogin, reportedParameters, startupAnswer
from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.proxy._session import Session, SessionPhase
from pgtls_twisted.tls._contexts import own_binding

if TYPE_CHECKING:
    from pgtls_twisted.proxy._frontend import ClientProtocol
    from pgtls_twisted.proxy._interfaces import SessionHost


class PooledLogin(Session):
    """
    The login half of a pooled session.

    @ivar identityClient: the pool logs in as the client's own role.
    """

    def __init__(
        self, route: SessionHost, client: ClientProtocol, startup: wire.StartupMessage
    ) -> None:
        super().__init__(route, client, startup)
        self.pools = route.pools
        #: The pool logs in as the client's own role (C{identity = "client"}).
        self.identityClient = route.config.pool.identity == "client"
        self.capture = self.identityClient
        #: The server's ParameterStatus messages during login, in order,
        #: and the protocol minor version it speaks: what a login cache
        #: keeps to answer the next login of this user itself.
        self._loginParameters: list[tuple[str, str]] = []
        self._serverMinor = startup.version & 0xFFFF
        #: pgtls answering the client's login itself, while it does.
        self._warm: WarmLogin | None = None
        #: Session mode: a client keeps one server connection for its whole
        #: life, so it is given that server's real process ID, as it would
        #: directly: BackendKeyData and ReadyForQuery wait for the server
        #: (L{_sayReady}, once the connection is prepared for it). The
        #: key length owed, while they do.
        self._owedKey: int | None = None
        self._sessionMode = route.config.pool.mode == "session"

    def _loggedIn(self, how: str = "") -> None:
        raise NotImplementedError

    def _sayReady(self, server: PooledServer) -> None:
        """
        The end of a session-mode client's login, held back until its
        server connection was known: BackendKeyData with that server's
        process ID (and a secret of pgtls's), then ReadyForQuery.
        """
        keyLength, self._owedKey = self._owedKey, None
        assert keyLength is not None
        pid = server.backendKey[0] if server.backendKey is not None else None
        self._clientKeyPid, key = self.route.cancels.mint(self, keyLength, pid)
        self.client.out.write(
            wire.backend_key_data(self._clientKeyPid, key) + wire.ready_for_query(b"I")
        )

    def start(self) -> None:
        """
        Log in: over a temporary connection, or (C{identity = "client"},
        the server accepted this user's password within C{auth_cache_ttl})
        answered by pgtls from what it kept then.
        """
        cached = None
        if self.identityClient:
            cached = self.pools.logins.fresh(self.startup.user, self.startup.database)
        if cached is None:
            super().start()
            return
        self.phase = SessionPhase.LOGGING_IN
        client = self.client
        client.onLost = self._clientLost
        tls = client.tls
        self._warm = WarmLogin(
            client.out,
            self.startup.user,
            cached,
            None if tls is None else own_binding(tls.getHandle()),
            lambda _: self._warmDone(cached),
            self._warmFailed,
        )
        self._readClient(self._warmData)

    def _warmData(self, data: bytes) -> None:
        reader = self._clientReader
        reader.feed(data)
        while self._warm is not None:
            try:
                msg = reader.next()
            except wire.ProtocolViolation as e:
                self._abandon("08P01", e.message)
                return
            if msg is None:
                return
            self._warm.message(*msg)

    def _warmFailed(self, sqlstate: str, text: str, why: str) -> None:
        self._warm = None
        self.route.metrics.pooledLogin(self.route.name, "cache_refused")
        self._log.info(
            "conn={conn} login refused by pgtls (cached keys) user={user}: {why}",
            conn=self.client.connId,
            user=self.startup.user,
            why=why or text,
        )
        self._abandon(sqlstate, text)

    def _warmDone(self, cached: CachedLogin) -> None:
        self._warm = None
        minor = min(self.startup.version & 0xFFFF, cached.minor)
        keyLength = 32 if minor >= 2 else 4
        reported = reportedParameters(cached, self.startup)
        for name, value in reported:
            self.params.serverReported(name, value)
        minted = None
        if self._sessionMode:
            self._owedKey = keyLength
        else:
            self._clientKeyPid, key = self.route.cancels.mint(self, keyLength, None)
            minted = (self._clientKeyPid, key)
        self.client.out.write(startupAnswer(cached, self.startup, reported, minted))
        self.route.metrics.pooledLogin(self.route.name, "cache")
        self._loggedIn(" login=cached")

    def _serverMessage(self, mtype: bytes, body: bytes) -> bool:
        if self._sessionMode:
            # (Its BackendKeyData is the temporary connection's: of no use.)
            if mtype == b"K":
                self._owedKey = max(4, len(body) - 4)
                return False
            if mtype == b"Z":
                if self._owedKey is None:
                    self._owedKey = 4
                return True
        if mtype == b"S":
            name, value = wire.parse_parameter_status(body)
            self.params.serverReported(name, value)
            self._loginParameters.append((name, value))
        elif mtype == b"v" and len(body) >= 4:
            self._serverMinor = int.from_bytes(body[:4], "big")
        return super()._serverMessage(mtype, body)

    def _startPump(self) -> None:
        """The temporary connection said ReadyForQuery: the login is done."""
        temp, self.server = self.server, None
        assert temp is not None
        temp.onLost = None
        temp.close()
        self.route.metrics.pooledLogin(self.route.name, "server")
        if self.identityClient:
            secret = self.md5Secret
            if self.scram is not None and self.scram.done:
                secret = self.scram.keys
            if secret is not None:
                self.pools.logins.remember(
                    self.startup.user,
                    self.startup.database,
                    secret,
                    self._loginParameters,
                    self._serverMinor,
                )
        self._loggedIn()
