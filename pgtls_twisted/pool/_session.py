# -*- test-case-name: tests.test_pooling,tests.test_pooling_faults,tests.test_pooling_stress -*-
"""
A pooled session once logged in (L{pgtls_twisted.pool._login}): its
queries run on pooled server connections, the service user's or its own
role's.

Both directions are framed by their headers only
(L{pgtls_twisted.protocol._framing}); in transaction mode the statements
that matter are read too (L{pgtls_twisted.pool._statements}). A
L{pgtls_twisted.protocol._txstate.TransactionTracker} says when the server
connection may go back to the pool: when the client leaves (session mode),
or at every ReadyForQuery that leaves it idle (transaction mode, unless the
client is pinned). Nothing goes back dirty: a connection left mid-request
is closed, one left in a transaction is rolled back, and a session-mode or
pinned client's is reset.

Once logged in, the session's client leg, and each server leg it is
given, are read and written directly (L{pgtls_twisted.proxy._direct})
where the legs allow it: the session's code is the same either way.

Where a pooled session is, is its L{SessionPhase} (IDLE, WAITING,
RESTORING, ATTACHED once logged in), and the server connection it holds,
with what is known of that connection's stream, is one L{Attachment}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from pgtls_twisted.pool._attachment import Attachment, cut, serverSplitter
from pgtls_twisted.pool._internal import resetStatements, runEach, runInternal
from pgtls_twisted.pool._login import PooledLogin
from pgtls_twisted.pool._pool import Pool, PooledServer, PoolTimeout
from pgtls_twisted.pool._querylog import PEEK, QueryLog
from pgtls_twisted.pool._serverlogin import ServerLoginError
from pgtls_twisted.pool._statements import CLIENT_PEEK, StatementGuard, pinKind
from pgtls_twisted.pool._timeouts import SessionTimeouts
from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.protocol._framing import Event, MessageSplitter
from pgtls_twisted.protocol._txstate import (
    CLIENT_WATCH,
    ParameterTracker,
    TransactionTracker,
    parameterStatusFromPeek,
)
from pgtls_twisted.proxy._direct import adoptSoon
from pgtls_twisted.proxy._leg import discard
from pgtls_twisted.proxy._pump import join, separate
from pgtls_twisted.proxy._session import SessionPhase

if TYPE_CHECKING:
    from pgtls_twisted.proxy._frontend import ClientProtocol
    from pgtls_twisted.proxy._interfaces import CancelTargetInfo, PoolFigures, SessionHost

_TERMINATE = ord("X")
_READY = ord("Z")
_PARAMETER_STATUS = ord("S")
_ERROR = ord("E")
_PARSE_COMPLETE = ord("1")
_CLOSE_COMPLETE = ord("3")
#: Client bytes held while it waits for a server connection, before pgtls
#: stops reading from it.
_MAX_HELD = 256 * 1024
#: The phases of a session that has logged in and not finished: it counts
#: in its pool's C{sessions}.
_LOGGED_IN = frozenset(
    {SessionPhase.IDLE, SessionPhase.WAITING, SessionPhase.RESTORING, SessionPhase.ATTACHED}
)


class PooledSession(PooledLogin):
    """
    @ivar attachment: the server connection serving the client now, or
        C{None}.
    @ivar params: the session parameters the client should see on any server.
    """

    _log = Logger()
    #: The pool's client timeouts, once logged in; C{None} when all are off.
    timeouts: SessionTimeouts | None = None

    def __init__(
        self, route: SessionHost, client: ClientProtocol, startup: wire.StartupMessage
    ) -> None:
        super().__init__(route, client, startup)
        self.pools = route.pools
        #: The pool of the client's database: looked up (and so perhaps
        #: created) only once the server has accepted the client's login,
        #: so that names a client made up create nothing.
        self.pool: Pool | None = None
        self.transactionMode = route.config.pool.mode == "transaction"
        self.params = ParameterTracker(startup.parameters)
        self.attachment: Attachment | None = None
        self.queryLog: QueryLog | None = None
        #: What the client's statements do to its server (transaction mode).
        #: (Not C{guard}: that is the login's L{LoginGuard}.)
        self.stmts: StatementGuard | None = None
        peek: dict[bytes, int] = {}
        if route.config.pool.log_queries:
            self.queryLog = QueryLog(
                route.clock,
                conn=client.connId,
                client=client.peer,
                user=startup.user,
                route=route.name,
                database=startup.database,
            )
            peek = {b"Q": PEEK, b"P": PEEK}
        if self.transactionMode:
            self.stmts = StatementGuard(route.config.pool, self._pinned)
            peek = CLIENT_PEEK
        self._clientSplitter = MessageSplitter(CLIENT_WATCH, peek=peek or None)
        #: The pool's answer, while WAITING.
        self._waiting: defer.Deferred[PooledServer] | None = None
        #: Client chunks (and their messages) held while no server is attached.
        self._held: list[tuple[bytes, list[Event]]] = []
        self._heldBytes = 0
        #: The proxy is shutting down: in transaction mode the client goes
        #: at its next transaction boundary. Not a phase: a draining session
        #: may be in any of them, and goes on through them until then. A
        #: session that starts during the drain (its connection was
        #: accepted before it) is draining from the start.
        self._draining = bool(route.process is not None and route.process.draining)
        #: Transaction mode: the client has had a transaction since it
        #: logged in. A drain lets an idle client go at once only if so:
        #: one that has not (it logged in during the drain, or its first
        #: query is on its way) gets its first transaction, so that a
        #: client which connects for one transaction behind a balancer
        #: loses nothing to a rolling deploy.
        self._served = False
        #: Since when the client has waited for a server, while WAITING
        #: (the admin console shows it; the pool wait is timed from it).
        self.waitingSince: float | None = None
        self._queryStarted: float | None = None
        self._transactionStarted: float | None = None
        #: A connection that could not be prepared for this client was
        #: given back, and another asked for, once.
        self._retried = False
        self._figures: PoolFigures | None = None

    # -- the end of login ----------------------------------------------------------

    def _loggedIn(self, how: str = "") -> None:
        """The client is logged in: from now on it is served by pooled connections."""
        user = self.startup.user if self.identityClient else None
        self.pool = self.pools.poolFor(self.startup.database, user)
        self._figures = self.route.metrics.pooled(self.route.name, self.startup.database)
        self.timeouts = SessionTimeouts.create(self, self._figures)
        # A logged-in client may come back for a server any time: its pool
        # must not be dropped meanwhile (PoolManager.reap).
        self.pool.sessions += 1
        self.phase = SessionPhase.IDLE
        client = self.client
        self._started(
            " pool={pool} mode={mode}" + how, pool=self.pool.name, mode=self.route.config.pool.mode
        )
        client.deliver = self._fromClient
        client.onLost = self._clientLost
        self._checkQuoting()
        if self._owedKey is not None:
            # Session mode: the client's server connection now, so that its
            # BackendKeyData can carry that server's process ID.
            self._wait()
        early = self._clientReader.drain()
        if early:
            self._fromClient(early)

    def cancelTarget(self) -> CancelTargetInfo | None:
        attachment = self.attachment
        if attachment is None or self.phase is SessionPhase.CLOSED:
            return None
        server = attachment.server
        if server.backendKey is None:
            return None
        server.cancels += 1
        return (
            self.route.backend,
            server.backendKey[0],
            server.backendKey[1],
            lambda: self.pool.cancelDone(server),
        )

    # -- client to server ----------------------------------------------------------

    def _fromClient(self, data: bytes) -> None:
        try:
            out, events = self._clientSplitter.feed(data)
        except wire.ProtocolViolation as e:
            self._abandon("08P01", e.message)
            return
        if self.queryLog is not None:
            for _, mtype, length, peek in events:
                self.queryLog.clientMessage(mtype, length, peek)
        for i, event in enumerate(events):
            if event[1] == _TERMINATE:
                # Never forwarded: the server connection outlives this client.
                self._send(out[: event[0]], events[:i])
                self._finish("client terminated")
                return
        self._send(out, events)

    def _send(self, out: bytes, events: list[Event]) -> None:
        self.client.stats.bytes_in += len(out)
        if self.timeouts is not None:
            self.timeouts.sent(events)
        if events and self._queryStarted is None:
            self._queryStarted = self.client.lastRequest = now = self.route.clock.seconds()
            if self._transactionStarted is None:
                self._transactionStarted = now
        if self.phase is SessionPhase.ATTACHED:
            attachment = self.attachment
            assert attachment is not None
            self._forward(attachment, out, events)
            return
        if not out:
            return
        self._held.append((out, events))
        self._heldBytes += len(out)
        if self._heldBytes > _MAX_HELD:
            # Enough held for a client without a server: read no more. (Not
            # sooner: a paused socket would not notice the client leaving
            # the queue, Twisted #11168.)
            self.client.pauseReading()
        if self.phase is SessionPhase.IDLE:
            self._wait()

    def _wait(self) -> None:
        """Ask the pool for a server connection (IDLE to WAITING, or ATTACHED at once)."""
        server = self.pool.takeIdle()
        if server is not None:
            self._figures.waited(0.0)
            self._attach(server)
            return
        self.phase = SessionPhase.WAITING
        self.waitingSince = self.route.clock.seconds()
        self._waiting = self.pool.acquire()
        self._waiting.addCallbacks(self._acquired, self._notAcquired)

    def _forward(self, attachment: Attachment, out: bytes, events: list[Event]) -> None:
        """Send the server one chunk of the client's stream, its messages counted first."""
        stmts = self.stmts
        if stmts is None:
            tracker = attachment.tracker
            for event in events:
                tracker.clientMessage(event[1])
        else:
            try:
                out = stmts.forward(out, events, attachment.tracker, attachment.relay)
            except wire.ProtocolViolation as e:
                self._abandon("08P01", e.message)
                return
        if out:
            attachment.server.leg.out.write(out)

    def _pinned(self, reason: str) -> None:
        """The client created session state: it keeps its server connection until it leaves."""
        self._log.info(
            "conn={conn} pool={pool}: client pinned to its server connection: {reason}",
            conn=self.client.connId,
            pool=self.pool.name if self.pool is not None else self.startup.database,
            reason=reason,
        )
        if self._figures is not None:
            self._figures.pinned(pinKind(reason))

    def _checkQuoting(self) -> None:
        """See L{StatementGuard.checkParameters}."""
        if self.stmts is not None:
            self.stmts.checkParameters(self.params.values)

    def _acquired(self, server: PooledServer) -> None:
        assert self.waitingSince is not None
        self._figures.waited(self.route.clock.seconds() - self.waitingSince)
        self._waiting = None
        self.waitingSince = None
        if self.phase is SessionPhase.CLOSED:
            self.pool.release(server)
            return
        self._attach(server)

    def _notAcquired(self, failure: Failure) -> None:
        self._waiting = None
        self.waitingSince = None
        if self.phase is SessionPhase.CLOSED or failure.check(defer.CancelledError):
            return
        if failure.check(PoolTimeout):
            self._abandon("53300", f"pgtls: {failure.value}")
        elif failure.check(ServerLoginError):
            err = failure.value
            self._abandon(err.sqlstate, f'pgtls pool "{self.pool.name}": {err.message}')
        else:
            self._abandon("08001", f'pgtls pool "{self.pool.name}": {failure.getErrorMessage()}')

    # -- attaching and detaching ----------------------------------------------------

    def _attach(self, server: PooledServer) -> None:
        stmts = self.stmts
        relay = None if stmts is None else stmts.relayFor(server)
        attachment = server.spare
        if attachment is not None and attachment.renaming == (relay is not None):
            # Given back clean by the last client: its tracker is idle and
            # its splitter at a boundary, as new ones would be.
            server.spare = None
            attachment.reuse(relay)
        else:
            attachment = Attachment(server, splitter=serverSplitter(relay is not None))
            attachment.relay = relay
            attachment.renaming = relay is not None
        self.attachment = attachment
        server.holder = self
        leg = server.leg
        leg.onLost = self._attachedLost
        client = self.client
        join(client, leg)
        if leg.direct is None:
            adoptSoon(leg, self.route.reactor, self.route.clock)
        if client.direct is None:
            adoptSoon(client, self.route.reactor, self.route.clock)
        steps: list[str | bytes] = []
        if relay is not None and server.statements.unknown:
            # A client's DEALLOCATE (or an answer pgtls did not expect)
            # left what the connection has unknown: start again from none.
            server.statements.clear()
            steps.append("DEALLOCATE ALL")
        diff = self.params.differencesFrom(server.tracked)
        if diff:
            steps.append(ParameterTracker.applySQL(diff))
        if relay is not None:
            # The least recently used statements beyond the limit go now,
            # while nothing of this client's can be using them.
            closes = stmts.evictions(server)
            if closes is not None:
                steps.append(closes)
        if steps:
            self.phase = SessionPhase.RESTORING
            self._internalEach(steps, server, self._restored)
        else:
            self._flushHeld()

    def _restored(self) -> None:
        """
        The connection was brought in line for this client, or failed to
        be: then the client is not served on it (a parameter it did not
        get, client_encoding above all, would corrupt what it reads).
        """
        attachment = self.attachment
        if attachment is None:
            return
        if attachment.server.dirty:
            if not self._retried:
                # Once more, on another connection: a failure here can be
                # the last client's (a statement timeout that fired as its
                # reset ended cancels the next statement, in PostgreSQL).
                self._retried = True
                self.pool.release(self._detach())
                self._wait()
                return
            self._abandon(
                "08006",
                f'pgtls pool "{self.pool.name}": could not prepare a server connection'
                " for this session (see pgtls's log)",
            )
            return
        self._flushHeld()

    def _flushHeld(self) -> None:
        attachment = self.attachment
        assert attachment is not None
        self.phase = SessionPhase.ATTACHED
        if self._owedKey is not None:
            self._sayReady(attachment.server)
        leg = attachment.server.leg
        leg.deliver = self._fromServer
        held, self._held, self._heldBytes = self._held, [], 0
        for out, events in held:
            self._forward(attachment, out, events)
            if self.attachment is not attachment:
                return  # abandoned on a malformed message
        if self.timeouts is not None:
            self.timeouts.attached()
        if self.client.readingPaused:
            self.client.resumeReading()

    def _detach(self) -> PooledServer:
        """Let go of the attached server (back to IDLE, unless finishing)."""
        attachment = self.attachment
        assert attachment is not None
        self.attachment = None
        if self.phase is not SessionPhase.CLOSED:
            self.phase = SessionPhase.IDLE
        server = attachment.server
        leg = server.leg
        separate(self.client, leg)
        leg.deliver = discard
        leg.onLost = lambda reason: self.pool.lost(server)
        return server

    # -- server to client ----------------------------------------------------------

    def _fromServer(self, data: bytes) -> None:
        attachment = self.attachment
        assert attachment is not None
        splitter, tracker = attachment.splitter, attachment.tracker
        try:
            out, events = splitter.feed(data)
        except wire.ProtocolViolation as e:
            attachment.server.dirty = True
            self._abandon("08006", f"backend protocol violation: {e.message}")
            return
        relay = attachment.relay
        swallowed: list[int] | None = None
        for offset, mtype, length, peek in events:
            if mtype == _PARAMETER_STATUS:
                param = parameterStatusFromPeek(length, peek)
                if param is not None:
                    attachment.server.setParameter(*param)
                    self.params.serverReported(*param)
                    self._checkQuoting()
            elif mtype == _ERROR:
                if b"SFATAL\0" in peek:
                    attachment.saidFatal = True
                if relay is not None:
                    relay.error(tracker.answered)
                    if b"C26000\0" in peek or b"C42P05\0" in peek:
                        # A statement missing, or there already: pgtls's
                        # list of them was wrong; cleared before the next
                        # client.
                        attachment.server.statements.unknown = True
                tracker.serverMessage(mtype)
            elif mtype == _PARSE_COMPLETE or mtype == _CLOSE_COMPLETE:
                assert relay is not None
                swallow = (
                    relay.parseComplete() if mtype == _PARSE_COMPLETE else relay.closeComplete()
                )
                if swallow is None:
                    # An answer to nothing pgtls sent: its account of this
                    # stream is wrong, so the connection serves no one else.
                    attachment.server.dirty = True
                    tracker.pinned = tracker.pinned or "unexpected ParseComplete or CloseComplete"
                elif swallow:
                    # The answer to pgtls's own Parse or Close: a bodyless
                    # message, whole in this chunk (the splitter keeps back
                    # an incomplete header).
                    if swallowed is None:
                        swallowed = []
                    swallowed.append(offset)
            else:
                tracker.serverMessage(mtype, peek or None)
                if mtype == _READY:
                    if relay is not None:
                        relay.ready(tracker.answered)
                    self._ready(tracker)
        if swallowed is not None:
            out = cut(out, swallowed)
        self.client.stats.bytes_out += len(out)
        self.client.out.write(out)
        if (
            self.transactionMode
            and tracker.idle
            and self.stmts.pinned is None
            and splitter.atBoundary
            and self._clientSplitter.atBoundary
        ):
            server = self._detach()
            if not attachment.saidFatal:
                server.spare = attachment
            self.pool.release(server)
            self._served = True
            if self._draining:
                self._closeForShutdown()

    def _ready(self, tracker: TransactionTracker) -> None:
        """A ReadyForQuery: a query (and maybe a transaction) is over."""
        if self.queryLog is not None:
            self.queryLog.readyForQuery()
        if self.timeouts is not None:
            self.timeouts.ready(tracker)
        now = self.route.clock.seconds()
        if self._queryStarted is not None:
            self._figures.queryDone(now - self._queryStarted)
            self._queryStarted = now if tracker.pendingSyncs else None
        if tracker.transactionStatus == "I" and self._transactionStarted is not None:
            self._figures.transactionDone(now - self._transactionStarted)
            self._transactionStarted = None

    # -- shutting down ---------------------------------------------------------------

    def drain(self) -> None:
        """
        The proxy is shutting down: in transaction mode the client is let
        go at the end of its current transaction (now, if it is between
        two; at the end of its first if it has had none yet); in session
        mode its session runs on until the deadline.
        """
        self._draining = True
        if self.transactionMode and self.phase is SessionPhase.IDLE and self._served:
            # Between transactions: no server held, none waited for.
            self._closeForShutdown()

    def terminate(self) -> None:
        """The deadline: FATAL 57P01 where a message boundary allows, and close."""
        if self.phase in (SessionPhase.CONNECTING, SessionPhase.LOGGING_IN):
            super().terminate()
            return
        attachment = self.attachment
        if attachment is None or attachment.splitter.atBoundary:
            self.client.fail("57P01", "terminating connection due to administrator command")
        self._finish("pgtls shutdown")

    def endForTimeout(self, sqlstate: str, text: str, dirty: bool) -> None:
        """
        A pool timeout fired (L{pgtls_twisted.pool._timeouts}): FATAL where a
        message boundary allows, and close. The server connection goes back
        as for any client that leaves (rolled back if quiet), or, if
        C{dirty}, is closed.
        """
        attachment = self.attachment
        if attachment is not None and dirty:
            attachment.server.dirty = True
        if attachment is None or attachment.splitter.atBoundary:
            # Not client.fail: the timeout logged its own line.
            self.client.out.write(wire.error_response(sqlstate, text))
        self.client.stats.reason = f"{sqlstate} {text}"
        self._finish(text)

    def _closeForShutdown(self) -> None:
        self.client.fail("57P01", "terminating connection due to administrator command")
        self._finish("pgtls shutdown")

    # -- the proxy's own statements ----------------------------------------------------

    def _internal(self, server: PooledServer, sql: str, then: Any) -> None:
        """L{runInternal} for this session: see there."""
        runInternal(
            server, sql, then, lambda message: self._internalBroke(then, message), self._label()
        )

    def _internalEach(self, statements: list[str | bytes], server: PooledServer, then: Any) -> None:
        """L{runEach} for this session: see there."""
        runEach(
            statements,
            server,
            then,
            lambda message: self._internalBroke(then, message),
            self._label(),
        )

    def _internalBroke(self, then: Any, message: str) -> None:
        if self.phase is SessionPhase.CLOSED:
            # A reset after the client left: give it back (dirty, so it is
            # closed, not kept busy for ever).
            then()
        else:
            self._abandon("08006", f"backend protocol violation: {message}")

    def _label(self) -> dict[str, object]:
        return {"conn": self.client.connId, "pool": self.pool.name}

    # -- ending ----------------------------------------------------------------------

    def _finish(self, reason: str) -> None:
        if self.phase is SessionPhase.CLOSED:
            return
        if self.phase in _LOGGED_IN:
            self.pool.sessions -= 1
        if self.timeouts is not None:
            self.timeouts.stop()
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.cancel()
        if self.attachment is not None:
            self._giveBack(self.attachment)
        super()._finish(reason)

    def _giveBack(self, attachment: Attachment) -> None:
        """The client is leaving: return its server connection clean, or close it."""
        tracker = attachment.tracker
        quiet = (
            # pgtls's own SET still running: its answer is on the way, and
            # the next holder would read it as its own.
            self.phase is not SessionPhase.RESTORING
            and tracker.pendingSyncs == 0
            and tracker.inCopy is None
            and not tracker.batchOpen
            and tracker.pinned is None
            and self._clientSplitter.atBoundary
            and attachment.splitter.atBoundary
        )
        server = self._detach()
        if not quiet:
            # Mid-request: what the server is doing is unknown, so nobody
            # else may have it.
            server.dirty = True
            self.pool.release(server)
            return
        pinned = self.stmts is not None and self.stmts.pinned is not None
        if self.transactionMode and tracker.transactionStatus == "I" and not pinned:
            self.pool.release(server)
            return
        statements = []
        if tracker.transactionStatus != "I":
            statements.append("ROLLBACK")
        if not self.transactionMode or pinned:
            statements.extend(resetStatements(self.route.config.pool.reset_query, server, pinned))
        self._internalEach(statements, server, lambda: self._resetDone(server))

    def _resetDone(self, server: PooledServer) -> None:
        server.leg.deliver = discard
        server.leg.onLost = lambda reason: self.pool.lost(server)
        # Parameters are back to the service user's defaults after a reset.
        self.pool.release(server)

    def _attachedLost(self, reason: Failure) -> None:
        attachment = self.attachment
        if attachment is None:
            return
        self.attachment = None
        if self.phase is not SessionPhase.CLOSED:
            self.phase = SessionPhase.IDLE
        self.pool.lost(attachment.server)
        if self.phase is not SessionPhase.CLOSED:
            if attachment.saidFatal:
                self._finish("server connection closed by the server")
            else:
                self._abandon("08006", f'pgtls pool "{self.pool.name}": server connection lost')
