"""
pgtls's reactor (L{pgtls_twisted.app._reactor}): Twisted's epoll reactor
whose C{doPoll} dispatches the relay's descriptors directly
(L{pgtls_twisted.tls._private.ShortDispatchReactor}).

These tests drive a second, never-run reactor of that class by hand
(C{doPoll(0)}) on socket pairs, so they see exactly what one poll does.
The whole suite runs on the installed one (C{tests/conftest.py}): every
relay test goes through the short path.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.epollreactor import EPollReactor
from twisted.python.failure import Failure

from pgtls_twisted.app import _reactor
from pgtls_twisted.tls import _private
from pgtls_twisted.tls._private import SHORT_DISPATCH_TYPES, ShortDispatchReactor


class _Descriptor:
    """A socket's reader and writer that records what the reactor did to it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.calls: list[str] = []
        self.lost: list[Failure] = []
        self.readResult: Any = None
        self.raiseOnRead: BaseException | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "test descriptor"

    def doRead(self) -> Any:
        self.calls.append("read")
        if self.raiseOnRead is not None:
            raise self.raiseOnRead
        try:
            self.sock.recv(1024)
        except BlockingIOError:
            pass
        return self.readResult

    def doWrite(self) -> Any:
        self.calls.append("write")
        return None

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)


class _Short(_Descriptor):
    """A descriptor of a class the reactor dispatches directly."""


@pytest.fixture
def reactor() -> Iterator[Any]:
    SHORT_DISPATCH_TYPES.add(_Short)
    r = ShortDispatchReactor()
    try:
        yield r
    finally:
        SHORT_DISPATCH_TYPES.discard(_Short)

        waker = getattr(r, "waker", None)
        if waker is not None:
            waker.connectionLost(None)
        r._poller.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    one, other = socket.socketpair()
    one.setblocking(False)
    with one, other:
        yield one, other


@pytest.fixture
def layers(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every event that goes through Twisted's own path (C{callWithLogger})."""
    seen: list[object] = []
    original = _private.legacyLog.callWithLogger

    def counting(logger: object, func: Any, *args: Any) -> Any:
        seen.append(logger)
        return original(logger, func, *args)

    monkeypatch.setattr(_private.legacyLog, "callWithLogger", counting)
    return seen


def test_the_suite_runs_on_it() -> None:
    """C{tests/conftest.py} installed pgtls's reactor (unless told not to)."""
    from twisted.internet import reactor as installed

    if os.environ.get("PGTLS_TEST_REACTOR", "pgtls") == "pgtls":
        assert type(installed) is ShortDispatchReactor
        assert _reactor.isShortDispatch(installed)
    assert isinstance(installed, EPollReactor)


def test_short_descriptors_skip_twisted_layers(reactor, pair, layers) -> None:
    one, other = pair
    short = _Short(one)
    reactor.addReader(short)
    other.send(b"x")
    reactor.doPoll(0)
    assert short.calls == ["read"]
    assert layers == []


def test_other_descriptors_take_twisted_path(reactor, pair, layers) -> None:
    one, other = pair
    plain = _Descriptor(one)
    reactor.addReader(plain)
    other.send(b"x")
    reactor.doPoll(0)
    assert plain.calls == ["read"]
    assert layers == [plain]


def test_writable_short_descriptor(reactor, pair, layers) -> None:
    one, _ = pair
    short = _Short(one)
    reactor.addWriter(short)
    reactor.doPoll(0)
    assert short.calls == ["write"]
    assert layers == []


@pytest.mark.allow_logged_errors
def test_exception_in_short_path_is_logged_and_disconnects(reactor, pair, no_logged_errors) -> None:
    """As Twisted's C{_doReadOrWrite} does: log, remove, C{connectionLost}."""
    one, other = pair
    short = _Short(one)
    short.raiseOnRead = ZeroDivisionError("boom")
    reactor.addReader(short)
    other.send(b"x")
    reactor.doPoll(0)
    assert len(short.lost) == 1
    assert short.lost[0].check(ZeroDivisionError)
    assert short not in reactor.getReaders()
    failures = [e.get("log_failure") or e.get("failure") for e in no_logged_errors]
    assert [f.check(ZeroDivisionError) for f in failures] == [ZeroDivisionError]


def test_reason_from_do_read_disconnects(reactor, pair) -> None:
    from twisted.internet.main import CONNECTION_DONE

    one, other = pair
    short = _Short(one)
    short.readResult = CONNECTION_DONE
    reactor.addReader(short)
    other.send(b"x")
    reactor.doPoll(0)
    assert len(short.lost) == 1
    assert short not in reactor.getReaders()


def test_hang_up_with_nothing_to_read_takes_twisted_path(reactor, pair, layers) -> None:
    """A hang-up (or error) with no data is Twisted's to handle, for every descriptor."""
    one, other = pair
    short = _Short(one)
    reactor.addWriter(short)
    other.close()
    reactor.doPoll(0)
    # The peer's close is EPOLLHUP with EPOLLOUT (and no EPOLLIN for a writer).
    assert layers == [short]


def test_canary_names_are_there() -> None:
    """Names what disappeared from Twisted's epoll reactor, if anything did."""
    gone = _private.missing(
        tuple(r for r in _private.RELIED_ON if r.feature == _private.SHORT_DISPATCH)
    )
    assert gone == (), f"Twisted no longer has {', '.join(map(str, gone))}"


def _inChild(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_install_falls_back_without_the_names() -> None:
    """A Twisted without the names gets its own default reactor, and a warning."""
    out = _inChild(
        "import sys\n"
        "from twisted.logger import globalLogBeginner, textFileLogObserver\n"
        "globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])\n"
        "from pgtls_twisted.tls import _private\n"
        "_private.RELIED_ON += (_private.Reliance(_private.SHORT_DISPATCH, "
        "_private._EPOLL_INSTANCE, '_gone'),)\n"
        "from pgtls_twisted.app._reactor import install\n"
        "install()\n"
        "from twisted.internet import reactor\n"
        "print('installed', type(reactor).__name__)\n"
    )
    assert "installed EPollReactor" in out
    assert "an EPollReactor._gone" in out
    assert "Twisted's epoll reactor as it is" in out


def test_install_unless_chosen_respects_a_choice() -> None:
    out = _inChild(
        "from twisted.internet import selectreactor\n"
        "selectreactor.install()\n"
        "from pgtls_twisted.app._reactor import installUnlessChosen\n"
        "installUnlessChosen()\n"
        "from twisted.internet import reactor\n"
        "print(type(reactor).__name__)\n"
    )
    assert out == "SelectReactor"


def test_install_when_nothing_chosen() -> None:
    out = _inChild(
        "from pgtls_twisted.app._reactor import installUnlessChosen\n"
        "installUnlessChosen()\n"
        "from twisted.internet import reactor\n"
        "print(type(reactor).__name__)\n"
    )
    assert out == "ShortDispatchReactor"
