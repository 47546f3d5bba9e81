# -*- test-case-name: tests.test_pool_timeouts,tests.test_pooling_timeouts -*-
"""
The timeouts that protect a pool from its clients, as PgBouncer's keys of
the same names (C{[proxy.pool]}, each off at 0):

 - C{client_idle_timeout}: a logged-in client that has sent nothing for
   that long, with no request running and outside a transaction, is closed
   with PostgreSQL's own C{idle_session_timeout} error (FATAL 57P05);
 - C{idle_transaction_timeout}: a client idle inside a transaction (its
   last ReadyForQuery said C{T} or C{E}, and it has sent nothing since) is
   closed with PostgreSQL's C{idle_in_transaction_session_timeout} error
   (FATAL 25P03); its server connection is rolled back and returned, as
   for any client that leaves in a transaction (C{PooledSession._giveBack});
 - C{query_timeout}: a request (a Query, or an extended batch up to its
   Sync) that has run on its server connection that long is cancelled
   exactly as a client's CancelRequest would be
   (C{PooledSession.cancelTarget}, L{forward_cancel}): the client gets the
   server's own 57014 and goes on. Still unanswered after the same time
   again (at most L{CANCEL_GRACE}), the client gets FATAL 57014 and its
   server connection is closed, not reused. The clock starts when the
   request reaches a server connection: waiting for one is
   C{acquire_timeout}'s business.

A pooled session tells its L{SessionTimeouts} four things: the client sent
bytes (L{SessionTimeouts.sent}), held requests reached the server
(L{SessionTimeouts.attached}), a ReadyForQuery came (L{SessionTimeouts.ready})
and the session ended (L{SessionTimeouts.stop}). Client bytes come often,
so L{SessionTimeouts.sent} only stores a time: the one L{IDelayedCall} is
armed for the earliest deadline that may apply, and when it fires it looks
at the deadline again (the client may have sent something since) and
re-arms, rather than being moved per message. With all three keys at 0 a
session has no L{SessionTimeouts} at all (L{SessionTimeouts.create}).
"""

from __future__ import annotations

from collections.abc import Sized
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger, LogLevel

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.proxy._cancel import forward_cancel
from pgtls_twisted.proxy._session import SessionPhase

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from pgtls_twisted.protocol._txstate import TransactionTracker
    from pgtls_twisted.proxy._interfaces import PoolFigures

CLIENT_IDLE = "client_idle_timeout"
IDLE_TRANSACTION = "idle_transaction_timeout"
QUERY = "query_timeout"

#: The longest wait, after C{query_timeout}'s cancel, for the request to
#: be answered before the client is closed (shorter with a shorter
#: C{query_timeout}: the same time again). A server acts on a cancel
#: within milliseconds; one that has not after this is stuck, or the
#: request is not running at all (a client that opened an extended batch
#: and stalled before its Sync: a cancel is ignored while the server
#: waits for input).
CANCEL_GRACE = 5.0


def _quiet(tracker: TransactionTracker) -> bool:
    """Nothing is owed on the server connection: no request running."""
    return not tracker.pendingSyncs and not tracker.batchOpen and tracker.inCopy is None


class SessionTimeouts:
    """
    The timeouts of one pooled session (L{pgtls_twisted.pool._session.PooledSession}).

    @ivar busy: a request of the client's is outstanding: sent, not yet
        answered by the ReadyForQuery that leaves the connection quiet.
    @ivar requestSince: when the outstanding request reached its server
        connection (C{None} while it waits for one).
    @ivar cancelledAt: when C{query_timeout} cancelled it, if it did.
    @ivar quietSince: when the client last sent something or was last
        answered, whichever is later: its idle clocks run from there.
    @ivar status: the transaction status of the last ReadyForQuery that
        left the connection quiet.
    """

    _log = Logger()

    def __init__(
        self,
        session: Any,
        figures: PoolFigures,
        clientIdle: float,
        idleTransaction: float,
        query: float,
    ) -> None:
        self._session = session
        self._figures = figures
        self._clock: IReactorTime = session.route.clock
        self._clientIdle = clientIdle
        self._idleTransaction = idleTransaction
        self._query = query
        self._grace = min(query, CANCEL_GRACE)
        self._call: IDelayedCall | None = None
        #: When C{_call} fires.
        self._at = 0.0
        self.busy = False
        self.requestSince: float | None = None
        self.cancelledAt: float | None = None
        self.quietSince = now = self._clock.seconds()
        self.status = "I"
        if clientIdle:
            self._arm(now + clientIdle, now)

    @classmethod
    def create(cls, session: Any, figures: PoolFigures) -> SessionTimeouts | None:
        """The timeouts of a session that has just logged in; C{None} when all are off."""
        config = session.route.config.pool
        if not (
            config.client_idle_timeout or config.idle_transaction_timeout or config.query_timeout
        ):
            return None
        return cls(
            session,
            figures,
            config.client_idle_timeout,
            config.idle_transaction_timeout,
            config.query_timeout,
        )

    # -- events ------------------------------------------------------------------

    def sent(self, messages: Sized) -> None:
        """
        The client sent bytes, completing C{messages} (maybe none): called
        for every chunk, so it mostly stores a time.
        """
        self.quietSince = now = self._clock.seconds()
        if messages and not self.busy:
            self.busy = True
            if self._session.phase is SessionPhase.ATTACHED:
                self._requestStarted(now)

    def attached(self) -> None:
        """The client's held bytes went to the server connection just attached."""
        if self.busy and self.requestSince is None:
            self._requestStarted(self._clock.seconds())

    def ready(self, tracker: TransactionTracker) -> None:
        """A ReadyForQuery reached the client; C{tracker} has seen it."""
        now = self._clock.seconds()
        if not _quiet(tracker):
            # The next pipelined request runs from now.
            self._requestStarted(now)
            return
        self._wentQuiet(tracker.transactionStatus, now)

    def stop(self) -> None:
        """The session ended."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    # -- the clock -------------------------------------------------------------------

    def _requestStarted(self, now: float) -> None:
        self.requestSince = now
        self.cancelledAt = None
        if self._query:
            self._arm(now + self._query, now)

    def _wentQuiet(self, status: str, now: float) -> None:
        self.busy = False
        self.requestSince = self.cancelledAt = None
        self.status = status
        self.quietSince = now
        limit = self._clientIdle if status == "I" else self._idleTransaction
        if limit:
            self._arm(now + limit, now)

    def _arm(self, when: float, now: float) -> None:
        """Make sure the timer fires no later than C{when}."""
        call = self._call
        if call is None:
            self._call = self._clock.callLater(max(0.0, when - now), self._fire)
            self._at = when
        elif when < self._at:
            call.reset(max(0.0, when - now))
            self._at = when

    def _due(self) -> tuple[float, str] | None:
        """The deadline that applies now, and whose it is; C{None} for none."""
        if self.busy:
            if self.requestSince is None or not self._query:
                return None
            if self.cancelledAt is not None:
                return self.cancelledAt + self._grace, QUERY
            return self.requestSince + self._query, QUERY
        if self.status == "I":
            limit, which = self._clientIdle, CLIENT_IDLE
        else:
            limit, which = self._idleTransaction, IDLE_TRANSACTION
        if not limit:
            return None
        return self.quietSince + limit, which

    def _fire(self) -> None:
        self._call = None
        due = self._due()
        if due is None:
            return
        when, which = due
        now = self._clock.seconds()
        if now < when:
            self._arm(when, now)
            return
        if which == QUERY:
            self._queryExpired(now)
        elif which == IDLE_TRANSACTION:
            self._fired(which, now - self.quietSince, "closing the client")
            self._session.endForTimeout(
                "25P03", "terminating connection due to idle-in-transaction timeout", dirty=False
            )
        else:
            self._fired(which, now - self.quietSince, "closing the client", LogLevel.info)
            self._session.endForTimeout(
                "57P05", "terminating connection due to idle-session timeout", dirty=False
            )

    def _queryExpired(self, now: float) -> None:
        assert self.requestSince is not None
        session = self._session
        attachment = session.attachment
        if attachment is not None and _quiet(attachment.tracker):
            # Messages that wanted no answer (a CopyDone outside COPY):
            # nothing runs after all.
            self._wentQuiet(attachment.tracker.transactionStatus, now)
            return
        if self.cancelledAt is None:
            self._fired(QUERY, now - self.requestSince, "cancel sent")
            self.cancelledAt = now
            self._arm(now + self._grace, now)
            where = session.cancelTarget()
            if where is not None:
                backend, pid, key, done = where
                forward_cancel(backend, wire.CancelRequest(pid, key), done, session.client.connId)
            return
        self._log.warn(
            "conn={conn} pool={pool} query_timeout: not answered {grace:.3f}s after the cancel,"
            " closing the client and its server connection",
            conn=session.client.connId,
            pool=session.pool.name,
            grace=now - self.cancelledAt,
        )
        session.endForTimeout("57014", "pgtls: query_timeout", dirty=True)

    def _fired(
        self, which: str, elapsed: float, action: str, level: LogLevel = LogLevel.warn
    ) -> None:
        """Log and count a timeout that fired."""
        session = self._session
        self._figures.timedOut(which)
        self._log.emit(
            level,
            "conn={conn} pool={pool} {timeout} after {elapsed:.3f}s: {action}",
            conn=session.client.connId,
            pool=session.pool.name,
            timeout=which,
            elapsed=elapsed,
            action=action,
        )
