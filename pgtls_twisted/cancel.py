# -*- test-case-name: tests.test_cancel -*-
"""
Query cancellation through the proxy.

Clients never see a backend's real cancel key: every session is given a
key minted here (in pass-through mode as in pool mode, so one mechanism
serves both), and a CancelRequest is honoured only for a key this process
minted. That keeps the proxy from being a way to fire arbitrary cancel
keys at the backend, and it is what lets a pool point a client's key at
whichever server connection currently runs its query.

Keys are secrets: they are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer

from . import wire
from .logs import Logger

if TYPE_CHECKING:
    from .route import Route


class CancelTarget(Protocol):
    """Whatever a minted key stands for (a session)."""

    def cancelTarget(self) -> tuple[Route, int, bytes, Callable[[], None] | None] | None:
        """
        The route, backend PID and backend key to cancel now, if any, and
        what to call once the cancel has been delivered (or has failed).
        """


class CancelRegistry:
    """Minted keys of the live sessions of this process."""

    _log = Logger()

    def __init__(self) -> None:
        self._entries: dict[int, tuple[bytes, CancelTarget]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def mint(self, target: CancelTarget, keyLength: int) -> tuple[int, bytes]:
        """
        A fresh (pid, key) for C{target}, with a key as long as the one the
        backend issued (4 bytes in protocol 3.0; 3.2 allows up to 256).
        """
        keyLength = max(4, min(keyLength, wire.MAX_CANCEL_KEY_LENGTH))
        while True:
            pid = secrets.randbelow(0x7FFFFFFF - 1) + 1
            if pid not in self._entries:
                break
        key = secrets.token_bytes(keyLength)
        self._entries[pid] = (key, target)
        return pid, key

    def forget(self, pid: int) -> None:
        self._entries.pop(pid, None)

    def lookup(self, request: wire.CancelRequest) -> CancelTarget | None:
        entry = self._entries.get(request.pid)
        if entry is None or not hmac.compare_digest(entry[0], request.key):
            return None
        return entry[1]

    def cancel(self, request: wire.CancelRequest, client: Any) -> None:
        """Forward C{request} to the backend of the session it names, if any."""
        target = self.lookup(request)
        where = target.cancelTarget() if target is not None else None
        if where is None:
            self._log.info(
                "conn={conn} cancel request for an unknown or idle session ignored",
                conn=client.connId,
            )
            return
        route, pid, key, done = where
        self._log.info(
            "conn={conn} cancel request forwarded to route={route} backend_pid={pid}",
            conn=client.connId,
            route=route.name,
            pid=pid,
        )
        forward_cancel(route, wire.CancelRequest(pid, key), done)


#: How long a forwarded cancel may wait for the server to close the
#: connection (to have acted on it) before pgtls closes it.
CANCEL_WAIT = 10.0


def forward_cancel(
    route: Route, request: wire.CancelRequest, done: Callable[[], None] | None = None
) -> None:
    """
    Send C{request} over a new backend connection, following the route's
    backend TLS mode like every other backend connection.
    """
    from .backend import connect_backend
    from .leg import discard

    def send(server: Any) -> defer.Deferred[None]:
        # The server closes the connection once it has acted on the
        # request: only then is the cancel no longer in flight (a pool
        # hands the cancelled server connection on no sooner).
        acted: defer.Deferred[None] = defer.Deferred()
        server.deliver = discard
        server.onLost = lambda reason: None if acted.called else acted.callback(None)
        server.out.write(request.encode())
        timer = route.clock.callLater(CANCEL_WAIT, server.close)

        def stopTimer(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        return acted.addBoth(stopTimer)

    def failed(failure: Any) -> None:
        CancelRegistry._log.warn(
            "route={route} could not forward cancel request: {error}",
            route=route.name,
            error=failure.getErrorMessage(),
        )

    d = connect_backend(route).addCallbacks(send, failed)
    if done is not None:
        d.addBoth(lambda _: done())
