# -*- test-case-name: tests.test_reactor -*-
"""
The reactor pgtls runs on: Twisted's epoll reactor with a short dispatch
path for the relay's descriptors
(L{ShortDispatchReactor<pgtls_twisted.tls._private.ShortDispatchReactor>}).

Why a reactor of our own: once a session's bytes go through the relay
(L{pgtls_twisted.proxy._relay}), Twisted's per-event dispatch is a large
part of what is left, about 15 Python calls per transaction against the
relay's own 50 or so (C{callWithLogger}, two C{callWithContext}s and
C{_doReadOrWrite} for each readable event). The short path calls the
relay's C{doRead} directly and leaves every other event to Twisted.
C{bench/results/2026-12-02-issue14-dispatch} has the measurement.

How it is chosen:
 - C{twist pgtls} and C{twistd pgtls} install it when no reactor was
   chosen (L{installUnlessChosen}, from the plugin's options), before
   C{twist} would install its default; C{--reactor=pgtls} names it, and
   C{--reactor=epoll} (or any other) keeps Twisted's own;
 - the workers of C{workers = N} run the reactor their supervisor runs;
 - an application that embeds pgtls chooses its own reactor: the relay
   works on any L{IReactorFDSet<twisted.internet.interfaces.IReactorFDSet>},
   only without the short path.

Off Linux, or when the Twisted names it relies on are gone (a warning
says which), it is Twisted's default reactor.
"""

from __future__ import annotations

import sys

#: C{twist --reactor} name (C{twisted/plugins/pgtls_plugin.py}).
NAME = "pgtls"


def install() -> None:
    """Install the short dispatch reactor, or Twisted's default where it cannot be."""
    from pgtls_twisted.tls._private import ShortDispatchReactor, shortDispatchUsable

    if ShortDispatchReactor is None or not shortDispatchUsable():
        from twisted.internet import default

        default.install()
        return
    from twisted.internet.main import installReactor

    installReactor(ShortDispatchReactor())


def installUnlessChosen() -> None:
    """L{install}, unless a reactor is installed already (C{--reactor}, or an embedding application)."""
    if "twisted.internet.reactor" not in sys.modules:
        install()


def isShortDispatch(reactor: object) -> bool:
    """Whether C{reactor} is pgtls's own (so that workers run the same)."""
    from pgtls_twisted.tls._private import ShortDispatchReactor

    return ShortDispatchReactor is not None and isinstance(reactor, ShortDispatchReactor)
