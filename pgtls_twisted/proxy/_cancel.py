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

Behind a load balancer, the new connection a CancelRequest comes on may
reach another pgtls instance altogether. With C{[cluster] instance = I},
the first byte of every minted key is I (1 to 255) and the worker number
moves to the next three bytes (L{instance_of}, L{worker_of}); a request
whose key names another instance is passed to that instance's listener
(C{[cluster] peers}, L{pgtls_twisted.proxy._peers}) as an ordinary
CancelRequest, which that instance applies as it would its own. The
receiver never passes such a request on again: a key it receives from a
peer names the receiver itself, unless the peers are misconfigured, and
L{pgtls_twisted.proxy._peers} also refuses to forward one request twice
in a short while. A cluster costs 8 more bits of a 3.0 key (24 random
bits with one worker).

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

from pgtls_twisted.config import MAX_INSTANCE
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


def _workerSpan(clustered: bool) -> int:
    """How many head numbers carry the worker: all four bytes, or the last three."""
    return _HEAD_SPAN >> 8 if clustered else _HEAD_SPAN


def worker_of(key: bytes, workers: int, clustered: bool = False) -> int | None:
    """
    The worker, of C{workers}, that minted C{key}; C{None} for a key too
    short to be one pgtls minted (protocol 3.2 lets a client send 1 to 3
    bytes).

    @param clustered: keys carry an instance number (C{[cluster]}).
    """
    if len(key) < HEAD_LENGTH:
        return None
    return int.from_bytes(key[:HEAD_LENGTH], "big") % _workerSpan(clustered) % workers


def instance_of(key: bytes) -> int | None:
    """
    The C{[cluster] instance} that minted C{key} (its first byte); C{None}
    for a key too short to be one pgtls minted.
    """
    if len(key) < HEAD_LENGTH:
        return None
    return key[0]


def key_entropy(workers: int, keyLength: int = HEAD_LENGTH, clustered: bool = False) -> float:
    """
    The random bits in a minted key of C{keyLength} bytes with C{workers}
    workers: the head is uniform over the numbers below 2**32 (2**24 in a
    cluster, whose instance takes the first byte) that are the worker's
    number modulo C{workers}.
    """
    return math.log2(_workerSpan(clustered) // workers) + 8 * (keyLength - HEAD_LENGTH)


class CancelRegistry:
    """
    Minted keys of the live sessions of this process.

    @ivar worker: this process's worker number, carried in every key.
    @ivar workers: how many workers there are (set once by
        L{pgtls_twisted.app._workers}, before any session; a reload cannot
        change it).
    @ivar relay: passes a request to another worker: called with the
        worker number and the request; C{None} without workers.
    @ivar instance: this instance's C{[cluster] instance}, carried in
        every key; 0 outside a cluster (set before any session, by
        L{pgtls_twisted.app._service}; a reload cannot change it).
    @ivar toPeer: passes a request to another instance: called with the
        instance number, the request, the connection id, the route it came
        on and the client's address; C{None} outside a cluster.
    """

    _log = Logger()

    def __init__(self, worker: int = 0) -> None:
        #: Process ID to the (key, target) of every session that has it.
        self._entries: dict[int, list[tuple[bytes, CancelTarget]]] = {}
        self.worker = worker
        self.workers = 1
        self.instance = 0
        self.relay: Callable[[int, wire.CancelRequest, SessionHost | None], None] | None = None
        self.toPeer: (
            Callable[[int, wire.CancelRequest, int, SessionHost | None, Any], None] | None
        ) = None

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
        if not 0 <= self.instance <= MAX_INSTANCE:
            raise ValueError(f"instance {self.instance}")
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
        workers, instance = self.workers, self.instance
        span = _workerSpan(instance != 0)
        head = secrets.randbelow(span // workers) * workers + self.worker
        head += instance * span
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
        client: Any = None,
    ) -> None:
        """
        Forward C{request} to the backend of the session it names, if any.

        @param conn: the id of the connection it came on, for the log.
        @param via: the route it came on (for metrics), if any.
        @param relayed: it was passed on by another worker (and must not
            be passed on again).
        @param client: the client's address (from a PROXY header, if
            any), which a request passed to another instance carries.
        """
        target = self.lookup(request)
        where = target.cancelTarget() if target is not None else None
        metrics = via.metrics if via is not None else None
        if where is None:
            clustered = self.instance != 0
            home = instance_of(request.key) if clustered else None
            if home is not None and home != self.instance:
                # Another instance's key (or a forged one): that instance
                # will look it up, or drop it as unknown.
                if not relayed and self.toPeer is not None:
                    self.toPeer(home, request, conn, via, client)
                    return
                owner = None
            else:
                owner = worker_of(request.key, self.workers, clustered)
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
