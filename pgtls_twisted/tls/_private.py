# -*- test-case-name: tests.test_tls_private,tests.test_fuzz_proxyheader -*-
"""
Every name pgtls uses that Twisted or pyOpenSSL does not promise to keep,
in one place, with the check that they are all still there.

Why rely on them at all: they are what makes
L{LeanTLSProtocol<pgtls_twisted.tls._lean.LeanTLSProtocol>} lean, and it
cut the pass-through route's CPU per transaction from 120 to 68 µs
(5,661 to 7,482 tps at C{pgbench -S -c 16}; the transaction pool from 185
to 143 µs; see C{bench/RESULTS.md}), mostly by sending encrypted bytes
straight to the socket and by asking OpenSSL how much is left to read
instead of reading until an exception. And pyOpenSSL has no public setter
for a list of key exchange groups.

B{The lean TLS protocol} relies on these (L{RELIED_ON}, feature
L{LEAN_TLS}):

 - of L{twisted.protocols.tls.TLSMemoryBIOProtocol}, which
   C{LeanTLSProtocol} subclasses: C{_tlsConnection} and C{_appSendBuffer}
   (set by C{makeConnection}: the L{OpenSSL.SSL.Connection}, and the
   writes held back during a handshake); C{_handshakeDone},
   C{_lostTLSConnection}, C{_aborted} and C{_producer} (the phase the base
   class is in, which decides whether a chunk takes the short path or the
   base class's own); C{_shutdownTLS}, C{_tlsShutdownFinished}, C{_write}
   and C{_bufferedWrite} (its handling of a peer's close_notify, of
   errors, and of writes made during a handshake); C{wrappedProtocol} and
   C{disconnecting} (public names of
   L{twisted.protocols.policies.ProtocolWrapper}, whose meaning the
   subclass relies on); and the methods it overrides, L{LEAN_OVERRIDES},
   among them C{_flushSendBIO}, which the base class calls wherever it
   has encrypted bytes to send (handshake, alerts, shutdown). The subclass
   uses these names itself: a function call here for each would cost what
   it saves;
 - of L{twisted.internet.tcp}: C{Server} and C{Client}, the transports
   whose socket may be written to directly, and of their
   L{twisted.internet.abstract.FileDescriptor} base C{dataBuffer},
   C{_tempDataLen}, C{_writeDisconnecting}, C{connected} and
   C{disconnecting}: whether the transport has nothing queued and is
   open, so that a direct C{send} can neither overtake nor outlive it
   (L{directSender});
 - of pyOpenSSL: C{OpenSSL._util.lib.BIO_get_mem_data} and
   C{OpenSSL._util.ffi.NULL} (pyOpenSSL's handle on C{cryptography}'s
   cffi binding of OpenSSL, which keeps only the functions pyOpenSSL
   itself uses), and a connection's memory BIOs C{_into_ssl} and
   C{_from_ssl}: how many bytes wait to be decrypted and to be sent
   (L{bytesToDecrypt}, L{bytesToSend}).

Without any of them, L{pgtls_twisted.tls._lean.TLSLayer} uses Twisted's
own TLS protocol instead (the one C{startTLS} gives,
L{twisted.protocols.tls.BufferingTLSTransport} today), through public
names only: slower, and otherwise the same.

B{The relay} (feature L{RELAY}, L{pgtls_twisted.proxy._relay}) carries a
pass-through session's bytes after its startup without Twisted's protocol
and transport layers, calling OpenSSL directly. It relies on
C{OpenSSL._util.lib}'s C{SSL_read}, C{SSL_write}, C{SSL_get_error},
C{SSL_pending}, C{BIO_read}, C{BIO_write}, C{BIO_get_mem_data},
C{ERR_clear_error} and the C{SSL_ERROR_*} codes it tells apart, on
C{OpenSSL._util.ffi}'s C{from_buffer} and C{NULL}, on a connection's
C{_ssl}, C{_into_ssl} and C{_from_ssl}, and on a TCP transport's
C{startReading} and the names L{directSender} reads (whether nothing is
queued). Without them (or without the lean TLS protocol, whose state it
checks before it takes over), sessions stay on the byte pump
(L{pgtls_twisted.proxy._pump.Pump}).

B{The key exchange groups} (feature L{GROUPS}) rely on
C{OpenSSL._util.lib.SSL_CTX_set1_curves_list} and a context's
C{_context}, to offer X25519, P-256 and P-384 (L{setGroups}). Without
them, contexts offer P-256 alone, through the public C{set_tmp_ecdh}.

B{The short dispatch reactor} (feature L{SHORT_DISPATCH},
L{ShortDispatchReactor}) is Twisted's epoll reactor with one change: its
C{doPoll} calls the relay's descriptors' C{doRead} and C{doWrite}
directly, skipping the C{callWithLogger}, C{callWithContext} and
C{_doReadOrWrite} layers (about 15 Python calls per transaction, a fifth
of what the relay itself makes). It relies on
L{twisted.internet.epollreactor.EPollReactor}'s C{doPoll} (which it
replaces), C{_doReadOrWrite} and C{_disconnectSelectable} (the way every
other event goes, and what an error in the short path goes to), its
C{_POLL_IN}, C{_POLL_OUT} and C{_POLL_DISCONNECTED}, and an instance's
C{_poller} and C{_selectables}. Without them it is Twisted's epoll
reactor as it is.

B{PROXY protocol headers} (feature L{PROXY_HEADER}, L{proxyHeaderParser})
are parsed by Twisted's own parsers, C{V1Parser} and C{V2Parser} of
L{twisted.protocols.haproxy}, whose public face is only C{proxyEndpoint}:
an endpoint wrapper that puts a protocol wrapper between pgtls and its
TCP transport, which the relay and the direct legs cannot take over (they
need the TCP transport itself), and which cannot tell trusted peers from
others before parsing. pgtls relies on their C{feed} and on
C{InvalidProxyHeader}. Without them there is no fallback: a route with
C{proxy_protocol = true} refuses to start, naming what is missing.

The first time TLS is set up, L{verdict} checks every name, on real
objects of the installed Twisted and pyOpenSSL, and logs one warning
naming whatever is missing. C{tests/test_tls_private.py} fails, naming
the attribute, if anything is.
"""

from __future__ import annotations

import errno
import functools
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from OpenSSL import SSL
from twisted.internet import tcp
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python import log as legacyLog
from zope.interface import implementer

try:
    from OpenSSL import _util
except ImportError:
    _util = None  # type: ignore[assignment]

try:
    from twisted.protocols.haproxy import _exceptions as _haproxyErrors
    from twisted.protocols.haproxy import _v1parser, _v2parser
except ImportError:
    _haproxyErrors = _v1parser = _v2parser = None  # type: ignore[assignment]

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # not Linux
    EPollReactor = None  # type: ignore[assignment, misc]

#: The features that rely on private names, each with its public fallback.
LEAN_TLS = "lean TLS protocol"
GROUPS = "key exchange groups"
RELAY = "direct relay"
SHORT_DISPATCH = "short dispatch reactor"
PROXY_HEADER = "PROXY protocol parser"

#: What each feature becomes without its private names.
FALLBACKS: Mapping[str, str] = MappingProxyType(
    {
        LEAN_TLS: "Twisted's public TLS protocol",
        GROUPS: "P-256 only",
        RELAY: "the byte pump",
        SHORT_DISPATCH: "Twisted's epoll reactor as it is",
        PROXY_HEADER: "nothing: routes with proxy_protocol = true refuse to start",
    }
)

_log = Logger()

# Where the names live: keys of L{SAMPLES}.
_TLS_PROTOCOL = "twisted.protocols.tls.TLSMemoryBIOProtocol"
_TLS_PROTOCOL_CONNECTED = "a connected twisted.protocols.tls.TLSMemoryBIOProtocol"
_TCP = "twisted.internet.tcp"
_TCP_CONNECTION = "a twisted.internet.tcp.Connection"
_LIB = "OpenSSL._util.lib"
_FFI = "OpenSSL._util.ffi"
_SSL_CONNECTION = "an OpenSSL.SSL.Connection with memory BIOs"
_SSL_CONTEXT = "an OpenSSL.SSL.Context"
_V1 = "twisted.protocols.haproxy._v1parser.V1Parser"
_V2 = "twisted.protocols.haproxy._v2parser.V2Parser"
_HAPROXY_ERRORS = "twisted.protocols.haproxy._exceptions"
_EPOLL = "twisted.internet.epollreactor.EPollReactor"
_EPOLL_INSTANCE = "an EPollReactor"


@dataclass(frozen=True)
class Reliance:
    """
    One name pgtls uses on an object whose owner does not promise to keep it.

    @ivar feature: what falls back without it (L{LEAN_TLS}, L{GROUPS}).
    @ivar owner: what has the name, in words (a key of L{SAMPLES}).
    @ivar name: the attribute.
    """

    feature: str
    owner: str
    name: str

    def __str__(self) -> str:
        return f"{self.owner}.{self.name}"


#: The methods of L{TLSMemoryBIOProtocol} that C{LeanTLSProtocol}
#: overrides. The public ones will not disappear, but the subclass relies
#: on how the base class uses them all, so C{tests/test_tls_private.py}
#: checks that these are exactly the base class names it redefines.
LEAN_OVERRIDES = (
    "makeConnection",
    "dataReceived",
    "write",
    "writeSequence",
    "_flushSendBIO",
    "loseConnection",
    "connectionLost",
)

#: What a TCP transport tells of whether it is open with nothing queued
#: (L{directSender}, L{idleSocket}), and its socket.
_IDLE_TRANSPORT = (
    "getHandle",
    "dataBuffer",
    "_tempDataLen",
    "_writeDisconnecting",
    "connected",
    "disconnecting",
)

#: What the short dispatch reactor uses of L{EPollReactor} itself.
_EPOLL_NAMES = (
    "doPoll",
    "_doReadOrWrite",
    "_disconnectSelectable",
    "_POLL_IN",
    "_POLL_OUT",
    "_POLL_DISCONNECTED",
)

#: Every name relied on, as data: L{verdict} and the canary tests both read it.
RELIED_ON: tuple[Reliance, ...] = (
    *(Reliance(LEAN_TLS, _TLS_PROTOCOL, name) for name in LEAN_OVERRIDES),
    *(
        Reliance(LEAN_TLS, _TLS_PROTOCOL, name)
        for name in (
            "_handshakeDone",
            "_lostTLSConnection",
            "_aborted",
            "_producer",
            "_shutdownTLS",
            "_tlsShutdownFinished",
            "_write",
            "_bufferedWrite",
        )
    ),
    *(
        Reliance(LEAN_TLS, _TLS_PROTOCOL_CONNECTED, name)
        for name in ("_tlsConnection", "_appSendBuffer", "wrappedProtocol", "disconnecting")
    ),
    Reliance(LEAN_TLS, _TCP, "Server"),
    Reliance(LEAN_TLS, _TCP, "Client"),
    *(Reliance(LEAN_TLS, _TCP_CONNECTION, name) for name in _IDLE_TRANSPORT),
    Reliance(LEAN_TLS, _LIB, "BIO_get_mem_data"),
    Reliance(LEAN_TLS, _FFI, "NULL"),
    Reliance(LEAN_TLS, _SSL_CONNECTION, "_into_ssl"),
    Reliance(LEAN_TLS, _SSL_CONNECTION, "_from_ssl"),
    *(
        Reliance(RELAY, _LIB, name)
        for name in (
            "SSL_read",
            "SSL_write",
            "SSL_get_error",
            "SSL_pending",
            "BIO_read",
            "BIO_write",
            "BIO_get_mem_data",
            "ERR_clear_error",
            "SSL_ERROR_WANT_READ",
            "SSL_ERROR_ZERO_RETURN",
        )
    ),
    Reliance(RELAY, _FFI, "from_buffer"),
    Reliance(RELAY, _FFI, "NULL"),
    *(Reliance(RELAY, _SSL_CONNECTION, name) for name in ("_ssl", "_into_ssl", "_from_ssl")),
    Reliance(RELAY, _TCP, "Server"),
    Reliance(RELAY, _TCP, "Client"),
    *(Reliance(RELAY, _TCP_CONNECTION, name) for name in (*_IDLE_TRANSPORT, "startReading")),
    Reliance(GROUPS, _LIB, "SSL_CTX_set1_curves_list"),
    Reliance(GROUPS, _SSL_CONTEXT, "_context"),
    *(Reliance(SHORT_DISPATCH, _EPOLL, name) for name in _EPOLL_NAMES),
    Reliance(PROXY_HEADER, _V1, "feed"),
    Reliance(PROXY_HEADER, _V2, "feed"),
    Reliance(PROXY_HEADER, _HAPROXY_ERRORS, "InvalidProxyHeader"),
    *(Reliance(SHORT_DISPATCH, _EPOLL_INSTANCE, name) for name in ("_poller", "_selectables")),
)


@implementer(IOpenSSLServerConnectionCreator)
class _ProbeCreator:
    """Server connections without a certificate: enough to start waiting for a ClientHello."""

    def __init__(self) -> None:
        self.context = SSL.Context(SSL.TLS_SERVER_METHOD)

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.context, None)


class _ProbeTransport:
    """What L{TLSMemoryBIOProtocol.makeConnection} needs of a transport."""

    def write(self, data: bytes) -> None:
        pass

    def loseConnection(self) -> None:
        pass

    def abortConnection(self) -> None:
        pass


def _connectedTLSProtocol() -> TLSMemoryBIOProtocol:
    tls = TLSMemoryBIOProtocol(
        TLSMemoryBIOFactory(_ProbeCreator(), False, Factory(), clock=Clock()), Protocol()
    )
    tls.makeConnection(_ProbeTransport())
    return tls


def _tcpConnection() -> tcp.Connection:
    one, other = socket.socketpair()
    with one, other:
        return tcp.Connection(one, Protocol(), reactor=Clock())  # type: ignore[arg-type]


def _epollReactor() -> object:
    """A throwaway epoll reactor, its file descriptors closed once made."""
    if EPollReactor is None:
        return None
    reactor: Any = EPollReactor()
    try:
        return reactor
    finally:
        waker = getattr(reactor, "waker", None)
        if waker is not None:
            waker.connectionLost(None)
        reactor._poller.close()


#: How to make the object each owner of L{RELIED_ON} stands for, from the
#: installed Twisted and pyOpenSSL: instance attributes are looked for on
#: instances in the state pgtls uses them in (a TLS protocol after
#: C{makeConnection}, a TCP transport around a socket, a connection with
#: memory BIOs).
SAMPLES: Mapping[str, Callable[[], object]] = MappingProxyType(
    {
        _TLS_PROTOCOL: lambda: TLSMemoryBIOProtocol,
        _TLS_PROTOCOL_CONNECTED: _connectedTLSProtocol,
        _TCP: lambda: tcp,
        _TCP_CONNECTION: _tcpConnection,
        _LIB: lambda: _util.lib,
        _FFI: lambda: _util.ffi,
        _SSL_CONNECTION: lambda: SSL.Connection(SSL.Context(SSL.TLS_METHOD), None),
        _SSL_CONTEXT: lambda: SSL.Context(SSL.TLS_METHOD),
        _EPOLL: lambda: EPollReactor,  # None (so every name missing) off Linux
        _V1: lambda: getattr(_v1parser, "V1Parser", None),
        _V2: lambda: getattr(_v2parser, "V2Parser", None),
        _HAPROXY_ERRORS: lambda: _haproxyErrors,
        _EPOLL_INSTANCE: _epollReactor,
    }
)


def samples(owners: set[str] | None = None) -> dict[str, object]:
    """
    The objects of L{SAMPLES} (only C{owners}, when given). One that cannot be made (C{OpenSSL._util}
    gone, a probe that a new Twisted refuses) is left out, so every name on
    it counts as missing.
    """
    found: dict[str, object] = {}
    for owner, make in SAMPLES.items():
        if owners is not None and owner not in owners:
            continue
        try:
            found[owner] = make()
        except Exception:
            _log.failure("cannot make {owner} to check its names", owner=owner)
    return found


def missing(
    relied: tuple[Reliance, ...] = RELIED_ON, found: Mapping[str, object] | None = None
) -> tuple[Reliance, ...]:
    """The names of C{relied} that the objects C{found} (by default L{samples}()) lack."""
    if found is None:
        found = samples()
    return tuple(r for r in relied if r.owner not in found or not hasattr(found[r.owner], r.name))


@dataclass(frozen=True)
class Verdict:
    """
    Which features may use their private names.

    @ivar missing: the names relied on that are not there.
    """

    missing: tuple[Reliance, ...] = ()

    def usable(self, feature: str) -> bool:
        """Whether every name C{feature} relies on is there."""
        return not any(r.feature == feature for r in self.missing)

    @property
    def leanTLS(self) -> bool:
        return self.usable(LEAN_TLS)

    @property
    def groups(self) -> bool:
        return self.usable(GROUPS)

    @property
    def proxyHeader(self) -> bool:
        return self.usable(PROXY_HEADER)

    @property
    def shortDispatch(self) -> bool:
        return self.usable(SHORT_DISPATCH)

    @property
    def relay(self) -> bool:
        """The direct relay needs its own names and the lean TLS protocol's."""
        return self.usable(RELAY) and self.usable(LEAN_TLS)

    def warn(self, log: Logger) -> None:
        """Log one warning, naming what is missing and what pgtls uses instead."""
        if not self.missing:
            return
        features = dict.fromkeys(r.feature for r in self.missing)
        log.warn(
            "the installed Twisted or pyOpenSSL lacks {names}; using {fallbacks} instead",
            names=", ".join(str(r) for r in self.missing),
            fallbacks=" and ".join(f"{FALLBACKS[f]} (for the {f})" for f in features),
        )


@functools.cache
def verdict() -> Verdict:
    """
    The verdict on the installed Twisted and pyOpenSSL: checked, and warned
    about, once per process, the first time TLS is set up (not at import,
    when no log observer may be listening yet).
    """
    found = Verdict(missing())
    found.warn(_log)
    return found


# -- The functions that use the names ------------------------------------------
# Valid only where verdict() says their feature is usable.

_lib: Any = getattr(_util, "lib", None)
#: For the relay (L{RELAY}): C{cryptography}'s cffi binding of OpenSSL as
#: pyOpenSSL holds it, and its FFI; C{None} when gone.
opensslLib: Any = _lib
opensslFFI: Any = getattr(_util, "ffi", None)
_memData: Any = getattr(_lib, "BIO_get_mem_data", None)
_NULL: Any = getattr(getattr(_util, "ffi", None), "NULL", None)


def bytesToDecrypt(conn: SSL.Connection) -> int:
    """
    Whether (non-zero) a connection has bytes to decrypt: in its incoming
    memory BIO, or already decrypted in OpenSSL's buffer. Asking is cheaper
    than the C{WantReadError} one more C{recv} would raise.
    """
    return _memData(conn._into_ssl, _NULL) or conn.pending()  # type: ignore[attr-defined, no-any-return]


def bytesToSend(conn: SSL.Connection) -> int:
    """How many encrypted bytes wait in a connection's outgoing memory BIO."""
    return _memData(conn._from_ssl, _NULL)  # type: ignore[attr-defined, no-any-return]


def directSender(transport: object) -> Callable[[bytes], bytes] | None:
    """
    For a TCP transport, a function that sends bytes straight to its socket
    when the transport has nothing queued and is open, and returns what the
    kernel did not take (all of it when the transport is busy), for the
    caller to give to C{transport.write}, which keeps ordering, flow
    control and error handling Twisted's. C{None} for any other transport
    (tests' in-memory ones, a TLS transport), which always gets
    C{transport.write}.
    """
    if type(transport) not in (tcp.Server, tcp.Client):
        return None
    t: Any = transport
    send = t.getHandle().send

    def sendNow(data: bytes) -> bytes:
        if (
            t.dataBuffer
            or t._tempDataLen
            or not t.connected
            or t.disconnecting
            or t._writeDisconnecting
        ):
            return data
        try:
            sent = send(data)
        except OSError:
            # Includes BlockingIOError; let Twisted meet any error in its
            # own write path.
            return data
        return data[sent:]

    return sendNow


def isTCP(transport: object) -> bool:
    """Whether C{transport} is one of Twisted's TCP transports, whose socket the relay may take."""
    return type(transport) in (tcp.Server, tcp.Client)


def idleSocket(transport: object) -> Any:
    """
    The socket of a TCP transport (C{tcp.Server} or C{tcp.Client}) that is
    open and has nothing queued, for the relay to take over; C{None} for
    any other transport, or one still busy.
    """
    if type(transport) not in (tcp.Server, tcp.Client):
        return None
    t: Any = transport
    if t.dataBuffer or t._tempDataLen or not t.connected or t.disconnecting:
        return None
    if t._writeDisconnecting:
        return None
    return t.getHandle()


def setGroups(ctx: SSL.Context, groups: bytes) -> bool:
    """
    Restrict C{ctx}'s key exchange groups to C{groups} (OpenSSL's list
    syntax) through C{SSL_CTX_set1_curves_list} (C{set1_groups_list}'s
    older name); pyOpenSSL's only public setter, C{set_tmp_ecdh}, takes a
    single curve.

    @return: whether it was done; the caller falls back when not.
    """
    if not verdict().groups:
        return False
    return bool(_lib.SSL_CTX_set1_curves_list(ctx._context, groups) == 1)  # type: ignore[attr-defined]


# -- The short dispatch reactor -------------------------------------------------

#: The descriptor classes L{ShortDispatchReactor} dispatches directly: the
#: relay's (L{pgtls_twisted.proxy._relay}) registers its own. Their
#: C{doRead} and C{doWrite} must not need Twisted's log context, and must
#: not return a reason unless they mean to be disconnected.
SHORT_DISPATCH_TYPES: set[type] = set()


def shortDispatchUsable() -> bool:
    """Whether every name L{ShortDispatchReactor} relies on is there (checked alone, cheaply)."""
    relied = tuple(r for r in RELIED_ON if r.feature == SHORT_DISPATCH)
    # Only the reactor's own samples: not a TLS protocol or a TCP
    # connection, made before anything is set up.
    found = missing(relied, samples({r.owner for r in relied}))
    if found:
        Verdict(found).warn(_log)
    return not found


if EPollReactor is not None:

    class ShortDispatchReactor(EPollReactor):  # type: ignore[misc, valid-type]
        """
        Twisted's epoll reactor, whose C{doPoll} calls the C{doRead} and
        C{doWrite} of descriptors of the L{SHORT_DISPATCH_TYPES} itself
        (see the module). Every other event, and a hang-up or error with
        nothing to read, takes Twisted's own path, and so does what the
        short path meets: an exception is logged and the descriptor
        disconnected, as C{_doReadOrWrite} does.

        Measured in C{bench/results/2026-12-02-issue14-dispatch}.
        """

        def doPoll(self, timeout: float | None) -> None:
            if timeout is None:
                timeout = -1
            try:
                events = self._poller.poll(timeout, len(self._selectables))
            except OSError as err:
                if err.errno == errno.EINTR:
                    return
                raise
            selectables = self._selectables
            short = SHORT_DISPATCH_TYPES
            readable, writable, gone = self._POLL_IN, self._POLL_OUT, self._POLL_DISCONNECTED
            for fd, event in events:
                selectable = selectables.get(fd)
                if selectable is None:
                    continue
                if type(selectable) not in short or (event & gone and not event & readable):
                    legacyLog.callWithLogger(selectable, self._doReadOrWrite, selectable, fd, event)
                    continue
                why = None
                inRead = False
                try:
                    if event & readable:
                        why = selectable.doRead()
                        inRead = True
                    if not why and event & writable:
                        why = selectable.doWrite()
                        inRead = False
                except BaseException:
                    why = sys.exc_info()[1]
                    legacyLog.err()
                if why:
                    self._disconnectSelectable(selectable, why, inRead)

        doIteration = doPoll

else:  # pragma: no cover - not Linux
    ShortDispatchReactor = None  # type: ignore[assignment, misc]


# -- PROXY protocol headers -------------------------------------------------------

#: The PROXY protocol's two signatures (the protocol's own constants).
PROXY_V1_SIGNATURE = b"PROXY "
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: A v2 header's fixed part (signature, version and command, family,
#: length): Twisted's C{V2Parser} refuses a first feed shorter than this.
PROXY_V2_FIXED = 16
#: What an invalid header raises, from Twisted's parsers.
InvalidProxyHeader: type[Exception] = getattr(_haproxyErrors, "InvalidProxyHeader", ValueError)


def proxyHeaderParser(head: bytes) -> Any:
    """
    A parser (with C{feed(data) -> (info, rest) | (None, None)}) for a
    PROXY header beginning with C{head}: Twisted's V1 or V2 one. C{None}
    while C{head} could still be either, or is a v2 header's fixed part
    not yet whole (the first feed must hold all of it: a header whose
    first 12 to 15 bytes came alone was refused); C{False} when it is
    neither. Valid only where L{verdict} says L{PROXY_HEADER} is usable.
    """
    for signature, needed, module, name in (
        (PROXY_V2_SIGNATURE, PROXY_V2_FIXED, _v2parser, "V2Parser"),
        (PROXY_V1_SIGNATURE, len(PROXY_V1_SIGNATURE), _v1parser, "V1Parser"),
    ):
        if head[: len(signature)] == signature[: len(head)]:
            if len(head) < needed:
                return None
            return getattr(module, name)()
    return False
