# -*- test-case-name: tests.test_proxy,tests.test_pooling_faults -*-
"""
Query cancellation through the proxy.

Clients never see a backend's real cancel key: every session is given a
key minted here (in pass-through mode as in pool mode, so one mechanism
serves both), and a CancelRequest is honoured only for a key this process
minted. That keeps the proxy from being a way to fire arbitrary cancel
keys at the backend, and it is what lets a pool point a client's key at
whichever server connection currently runs its query.

Keys are secrets: they are compared in constant time and never logged.

With C{workers = N}, a CancelRequest arrives on whichever process the
kernel picks for the new connection (SO_REUSEPORT), not necessarily the
one running the session. The low byte of every minted PID is the number
of the worker that minted it, so the receiving worker knows where to pass
the request on (L{CancelRegistry.relay}, set by
L{pgtls_twisted.app._workers}); a request is passed on at most once, so a
forged PID cannot make workers bounce it between them.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.proxy._leg import discard

if TYPE_CHECKING:
    from pgtls_twisted.proxy._backend import BackendConnector
    from pgtls_twisted.proxy._interfaces import CancelTargetInfo, SessionHost


class CancelTarget(Protocol):
    """Whatever a minted key stands for (a session)."""

    def cancelTarget(self) -> CancelTargetInfo | None:
        """
        The backend connector, PID and key to cancel now, if any, and what
        to call once the cancel has been delivered (or has failed).
        """


#: Bits of a minted PID that carry the worker number.
WORKER_BITS = 8
_WORKER_MASK = (1 << WORKER_BITS) - 1


def worker_of(pid: int) -> int:
    """The worker that minted C{pid}."""
    return pid & _WORKER_MASK


class CancelRegistry:
    """
    Minted keys of the live sessions of this process.

    @ivar worker: this process's worker number, carried in every PID.
    @ivar relay: passes a request to another worker: called with the
        worker number and the request; C{None} without workers.
    """

    _log = Logger()

    def __init__(self, worker: int = 0) -> None:
        self._entries: dict[int, tuple[bytes, CancelTarget]] = {}
        self.worker = worker
        self.workers = 1
        self.relay: Callable[[int, wire.CancelRequest, SessionHost | None], None] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def mint(self, target: CancelTarget, keyLength: int) -> tuple[int, bytes]:
        """
        A fresh (pid, key) for C{target}, with a key as long as the one the
        backend issued (4 bytes in protocol 3.0; 3.2 allows up to 256).
        """
        keyLength = max(4, min(keyLength, wire.MAX_CANCEL_KEY_LENGTH))
        while True:
            high = secrets.randbelow((0x7FFFFFFF >> WORKER_BITS) - 1) + 1
            pid = (high << WORKER_BITS) | self.worker
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

    def cancel(
        self,
        request: wire.CancelRequest,
        conn: int,
        via: SessionHost | None,
        relayed: bool = False,
    ) -> None:
        """
        Forward C{request} to the backend of the session it names, if any.

        @param conn: the id of the connection it came on, for the log.
        @param via: the route it came on (for metrics), if any.
        @param relayed: it was passed on by another worker (and must not
            be passed on again).
        """
        target = self.lookup(request)
        where = target.cancelTarget() if target is not None else None
        metrics = via.metrics if via is not None else None
        if where is None:
            owner = worker_of(request.pid)
            if (
                not relayed
                and owner != self.worker
                and owner < self.workers
                and self.relay is not None
            ):
                self._log.info(
                    "conn={conn} cancel request passed to worker {owner}", conn=conn, owner=owner
                )
                if metrics is not None:
                    metrics.cancelRequest(via.name, "relayed")
                self.relay(owner, request, via)
                return
            self._log.info(
                "conn={conn} cancel request for an unknown or idle session ignored", conn=conn
            )
            if metrics is not None:
                metrics.cancelRequest(via.name, "ignored")
            return
        backend, pid, key, done = where
        self._log.info(
            "conn={conn} cancel request forwarded to route={route} backend_pid={pid}",
            conn=conn,
            route=backend.name,
            pid=pid,
        )
        backend.metrics.cancelRequest(backend.name, "forwarded")
        forward_cancel(backend, wire.CancelRequest(pid, key), done, conn)


#: How long a forwarded cancel may wait for the server to close the
#: connection (to have acted on it) before pgtls closes it.
CANCEL_WAIT = 10.0


def forward_cancel(
    backend: BackendConnector,
    request: wire.CancelRequest,
    done: Callable[[], None] | None = None,
    conn: int = 0,
) -> None:
    """
    Send C{request} over a new backend connection, following the route's
    backend TLS mode like every other backend connection.
    """

    def send(server: Any) -> defer.Deferred[None]:
        # The server closes the connection once it has acted on the
        # request: only then is the cancel no longer in flight (a pool
        # hands the cancelled server connection on no sooner).
        acted: defer.Deferred[None] = defer.Deferred()
        server.deliver = discard
        server.onLost = lambda reason: None if acted.called else acted.callback(None)
        server.out.write(request.encode())
        timer = backend.clock.callLater(CANCEL_WAIT, server.close)

        def stopTimer(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        return acted.addBoth(stopTimer)

    def failed(failure: Any) -> None:
        CancelRegistry._log.warn(
            "conn={conn} route={route} could not forward cancel request: {error}",
            conn=conn,
            route=backend.name,
            error=failure.getErrorMessage(),
        )

    d = backend.connect().addCallbacks(send, failed)
    if done is not None:
        d.addBoth(lambda _: done())
