# -*- test-case-name: tests.test_proxy,tests.test_pooling_faults -*-
"""
Query cancellation through the proxy.

Clients never see a backend's real secret key: every session is given a
key minted here, and a CancelRequest is honoured only for a key this
process minted. That keeps the proxy from being a way to fire arbitrary
cancel keys at the backend, and it is what lets a pool point a client's
key at whichever server connection currently runs its query.

The process ID that goes with the key is the backend's own in pass-through
mode: the client's session is that backend's session, and applications
compare C{backend_pid} with C{pg_backend_pid()}, with a notification's
sender or with C{pg_stat_activity} (PostgreSQL shows every backend's PID to
anyone who can log in, so it is no secret). A pooled session has no single
backend and gets a random one. Either way a request is looked up by its
process ID, then its key is compared, in constant time, with the key of
every session of that process ID (sessions on different servers may share
one).

With C{workers = N}, a CancelRequest arrives on whichever process the
kernel picks for the new connection (SO_REUSEPORT), not necessarily the
one running the session. The first four bytes of every minted key, read
as a big-endian number, are the number of the worker that minted it
modulo N (L{worker_of}), so the receiving worker knows where to pass the
request on (L{CancelRegistry.relay}, set by L{pgtls_twisted.app._workers});
a request is passed on at most once, so a forged key cannot make workers
bounce it between them. That costs log2(N) bits of a 3.0 key's 32
(L{key_entropy}): nothing with one process, 1 bit with two, 6 with 64.

Keys are secrets: they are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import math
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


#: The bytes at the head of every minted key that carry the worker number:
#: as many as a protocol 3.0 key has, so the scheme is one for 3.0 and 3.2.
HEAD_LENGTH = 4
_HEAD_SPAN = 1 << (8 * HEAD_LENGTH)
#: The largest PID pgtls mints (PostgreSQL's PIDs are positive int32s).
MAX_MINTED_PID = 0x7FFFFFFF


def worker_of(key: bytes, workers: int) -> int | None:
    """
    The worker, of C{workers}, that minted C{key}; C{None} for a key too
    short to be one pgtls minted (protocol 3.2 lets a client send 1 to 3
    bytes).
    """
    if len(key) < HEAD_LENGTH:
        return None
    return int.from_bytes(key[:HEAD_LENGTH], "big") % workers


def key_entropy(workers: int, keyLength: int = HEAD_LENGTH) -> float:
    """
    The random bits in a minted key of C{keyLength} bytes with C{workers}
    workers: the head is uniform over the numbers below 2**32 that are the
    worker's number modulo C{workers}.
    """
    return math.log2(_HEAD_SPAN // workers) + 8 * (keyLength - HEAD_LENGTH)


class CancelRegistry:
    """
    Minted keys of the live sessions of this process.

    @ivar worker: this process's worker number, carried in every key.
    @ivar workers: how many workers there are (set once by
        L{pgtls_twisted.app._workers}, before any session; a reload cannot
        change it).
    @ivar relay: passes a request to another worker: called with the
        worker number and the request; C{None} without workers.
    """

    _log = Logger()

    def __init__(self, worker: int = 0) -> None:
        #: Process ID to the (key, target) of every session that has it.
        self._entries: dict[int, list[tuple[bytes, CancelTarget]]] = {}
        self.worker = worker
        self.workers = 1
        self.relay: Callable[[int, wire.CancelRequest, SessionHost | None], None] | None = None

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._entries.values())

    def mint(
        self, target: CancelTarget, keyLength: int, pid: int | None = None
    ) -> tuple[int, bytes]:
        """
        A (pid, key) for C{target}, with a key as long as the one the
        backend issued (4 bytes in protocol 3.0; 3.2 allows up to 256).

        @param pid: the process ID the client is to see: the backend's own
            (pass-through); C{None} mints a random one (a pooled session).
        """
        if not 0 <= self.worker < self.workers:
            raise ValueError(f"worker {self.worker} of {self.workers}")
        keyLength = max(HEAD_LENGTH, min(keyLength, wire.MAX_CANCEL_KEY_LENGTH))
        if pid is None:
            pid = secrets.randbelow(MAX_MINTED_PID) + 1
        entries = self._entries.setdefault(pid, [])
        while True:
            key = self._secret(keyLength)
            # Unique per PID, so that a key names one session. (Minting is
            # not driven by a guesser: no need for constant time here.)
            if all(key != other for other, _ in entries):
                break
        entries.append((key, target))
        return pid, key

    def _secret(self, length: int) -> bytes:
        workers = self.workers
        head = secrets.randbelow(_HEAD_SPAN // workers) * workers + self.worker
        return head.to_bytes(HEAD_LENGTH, "big") + secrets.token_bytes(length - HEAD_LENGTH)

    def forget(self, pid: int, target: CancelTarget) -> None:
        """The session C{target} is over: its key for C{pid} is no more."""
        entries = self._entries.get(pid)
        if entries is None:
            return
        entries[:] = [entry for entry in entries if entry[1] is not target]
        if not entries:
            del self._entries[pid]

    def lookup(self, request: wire.CancelRequest) -> CancelTarget | None:
        """
        The session whose (pid, key) C{request} carries. Every key of that
        PID is compared, all the way, so the time taken tells nothing of
        how much of a key was right, nor which one.
        """
        found = None
        for key, target in self._entries.get(request.pid, ()):
            if hmac.compare_digest(key, request.key) and found is None:
                found = target
        return found

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
            owner = worker_of(request.key, self.workers)
            if (
                not relayed
                and owner is not None
                and owner != self.worker
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
