"""
The backend connector (L{pgtls_twisted.proxy._backend}) on an in-memory
endpoint: what each way of failing to connect is called, and that
C{connect_timeout} covers the connect and the encryption negotiation
together, without sockets or a running reactor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support.fakes import make_route
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError, DNSLookupError, TimeoutError
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.proxy._backend import BackendConnector, BackendError, ServerProtocol
from pgtls_twisted.proxy._leg import Phase
from pgtls_twisted.testing.pki import PKI


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """
    An endpoint whose connection attempt the test decides: L{succeed}
    connects the protocol to a L{StringTransport}, L{fail} fails it.

    @ivar asked: the (host, port, timeout) it was made for.
    """

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.asked = (host, port, timeout)
        self.factory: IProtocolFactory | None = None
        self.cancelled = False
        self.attempt: defer.Deferred[Any] = defer.Deferred(self._cancel)

    def _cancel(self, attempt: defer.Deferred[Any]) -> None:
        self.cancelled = True
        attempt.errback(Failure(defer.CancelledError()))

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[Any]:
        self.factory = factory
        return self.attempt

    def succeed(self) -> tuple[ServerProtocol, StringTransport]:
        assert self.factory is not None
        leg = self.factory.buildProtocol(None)
        assert isinstance(leg, ServerProtocol)
        transport = StringTransport()
        leg.makeConnection(transport)
        self.attempt.callback(leg)
        return leg, transport

    def fail(self, error: Exception) -> None:
        self.attempt.errback(Failure(error))


class Recorded:
    """A metrics recorder that keeps the backend events."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def backendConnected(self, route: str, seconds: float) -> None:
        self.events.append(("connected", seconds))

    def backendFailed(self, route: str, message: str) -> None:
        self.events.append(("failed", message))


class Harness:
    """A connector to C{db.example:5433} on a L{Clock}, through L{FakeEndpoint}s."""

    def __init__(self, pki: PKI, tmp_path: Path, **backend: Any) -> None:
        settings = {"address": "db.example:5433", "connect_timeout": "3s", **backend}
        config = make_route(pki, tmp_path, backend=settings).config
        self.clock = Clock()
        self.metrics = Recorded()
        self.endpoints: list[FakeEndpoint] = []
        self.connector = BackendConnector(
            config.name, config.backend, self.clock, self.metrics, endpoints=self.endpoint
        )

    def endpoint(self, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
        endpoint = FakeEndpoint(host, port, timeout)
        self.endpoints.append(endpoint)
        return endpoint

    def connect(self) -> tuple[FakeEndpoint, list[Any]]:
        results: list[Any] = []
        self.connector.connect().addBoth(results.append)
        (endpoint,) = self.endpoints[-1:]
        return endpoint, results


def error_of(results: list[Any]) -> tuple[str, str]:
    [failure] = results
    assert isinstance(failure, Failure) and failure.check(BackendError), failure
    return failure.value.sqlstate, failure.value.message


def test_endpoint_asked_for_the_backend_and_its_timeout(pki: PKI, tmp_path: Path) -> None:
    h = Harness(pki, tmp_path, tls="disable")
    endpoint, results = h.connect()
    assert endpoint.asked == ("db.example", 5433, 3.0)
    assert results == []
    leg, transport = endpoint.succeed()
    assert results == [leg]
    assert leg.phase is Phase.READY
    assert transport.value() == b""  # no SSLRequest with tls = disable
    assert h.metrics.events == [("connected", 0.0)]
    assert h.clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    "error, message",
    [
        (
            ConnectionRefusedError(),
            "could not connect to backend db.example:5433: connection refused",
        ),
        (TimeoutError(), "could not connect to backend db.example:5433: timeout expired"),
        (DNSLookupError("db.example"), "could not translate backend host name 'db.example'"),
        (OSError("no route"), "could not connect to backend db.example:5433: no route"),
    ],
    ids=["refused", "timeout", "dns", "other"],
)
def test_connect_failures_in_words(
    pki: PKI, tmp_path: Path, error: Exception, message: str
) -> None:
    h = Harness(pki, tmp_path)
    endpoint, results = h.connect()
    endpoint.fail(error)
    assert error_of(results) == ("08001", message)
    assert h.metrics.events == [("failed", message)]
    assert h.clock.getDelayedCalls() == []


def test_timeout_while_connecting_cancels_the_attempt(pki: PKI, tmp_path: Path) -> None:
    h = Harness(pki, tmp_path)
    endpoint, results = h.connect()
    h.clock.advance(2.9)
    assert results == [] and not endpoint.cancelled
    h.clock.advance(0.1)
    assert error_of(results) == (
        "08001",
        "could not connect to backend db.example:5433: timeout expired after 3s",
    )
    assert endpoint.cancelled


def test_timeout_covers_the_encryption_negotiation(pki: PKI, tmp_path: Path) -> None:
    """Connected in time, but the SSLRequest is never answered: the same timeout."""
    h = Harness(pki, tmp_path, tls="require")
    endpoint, results = h.connect()
    h.clock.advance(2)
    leg, transport = endpoint.succeed()
    assert transport.value() == wire.SSL_REQUEST
    assert leg.phase is Phase.NEGOTIATING
    h.clock.advance(1)
    assert error_of(results)[1].endswith("timeout expired after 3s")
    assert transport.disconnecting
    assert not endpoint.cancelled


def test_plaintext_refused_by_a_require_leg(pki: PKI, tmp_path: Path) -> None:
    h = Harness(pki, tmp_path, tls="require")
    endpoint, results = h.connect()
    leg, transport = endpoint.succeed()
    leg.dataReceived(b"N")
    assert error_of(results) == (
        "08001",
        "server does not support SSL, but backend.tls is 'require'",
    )
    assert leg.phase is Phase.CLOSING
    assert transport.disconnected  # aborted


def test_prefer_goes_on_in_plaintext(pki: PKI, tmp_path: Path) -> None:
    h = Harness(pki, tmp_path, tls="prefer")
    endpoint, results = h.connect()
    leg, transport = endpoint.succeed()
    leg.dataReceived(b"N")
    assert results == [leg]
    assert leg.phase is Phase.READY
    assert leg.tls is None
