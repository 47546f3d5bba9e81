"""
The reload plan (L{pgtls_twisted.app._service.ProxyService.reload}) on a
L{MemoryReactorClock}: which routes are added, removed, changed, renamed or
left alone, which listening sockets are kept, bound or closed, and that a
configuration that cannot be applied changes nothing.

Routes bind with C{SO_REUSEPORT} (L{pgtls_twisted.app._listening}): a real
socket on 127.0.0.x, port 0, handed to the reactor's C{adoptStreamPort},
which L{ListeningReactor} records (and the socket is closed at once). No
connection is ever made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support.unit import Wire
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from pgtls_twisted.app._service import ProxyService
from pgtls_twisted.config import Config, ConfigError, parse_config
from pgtls_twisted.proxy._frontend import ClientProtocol
from pgtls_twisted.proxy._route import Route
from pgtls_twisted.testing.pki import PKI


class RecordedPort:
    """A listening port as L{ListeningReactor} hands it out."""

    def __init__(self, reactor: ListeningReactor, factory: Any, number: int) -> None:
        self.reactor = reactor
        self.factory = factory
        self.number = number
        self.listening = True

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 50000 + self.number)

    def stopListening(self) -> None:
        self.listening = False
        self.reactor.events.append(("stop", self.number))


class ListeningReactor(MemoryReactorClock):
    """
    Records each port adopted (C{("listen", n)}) and stopped
    (C{("stop", n)}), numbered in order from 1.
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, int]] = []
        self.ports: list[RecordedPort] = []

    def adoptStreamPort(self, fileno: int, addressFamily: Any, factory: Any) -> RecordedPort:
        port = RecordedPort(self, factory, len(self.ports) + 1)
        self.ports.append(port)
        self.events.append(("listen", port.number))
        return port


class Routes:
    """Configurations of routes named after the last byte of their 127.0.0.x address."""

    def __init__(self, pki: PKI, tmp_path: Path) -> None:
        self.pki = pki
        self.tmp_path = tmp_path

    def table(self, name: str, host: int, backend: str = "127.0.0.1:5432", **listener: Any) -> Any:
        return {
            "name": name,
            "listener": {
                "bind_address": f"127.0.0.{host}:0",
                "server_cert": str(self.pki.cert("server")),
                "server_key": str(self.pki.key("server")),
                **listener,
            },
            "backend": {"address": backend, "tls": "disable"},
        }

    def config(self, *tables: Any, **top: Any) -> Config:
        return parse_config({**top, "proxy": list(tables)}, base_dir=self.tmp_path)


@pytest.fixture
def routes(pki: PKI, tmp_path: Path) -> Routes:
    return Routes(pki, tmp_path)


@pytest.fixture
def reactor() -> ListeningReactor:
    return ListeningReactor()


def started(config: Config, reactor: ListeningReactor) -> ProxyService:
    service = ProxyService(config, reactor, serveMetrics=False)
    service.startService()
    return service


def route(service: ProxyService, name: str) -> Route:
    return service.groups[name].route


def port_of(service: ProxyService, name: str) -> RecordedPort:
    port = route(service, name).port
    assert isinstance(port, RecordedPort)
    return port


def served_by(port: RecordedPort) -> Route:
    """The route a new connection on C{port} would be served by."""
    client = port.factory.buildProtocol(None)
    assert isinstance(client, ClientProtocol)
    return client.route  # type: ignore[return-value]


def connect(route: Route) -> ClientProtocol:
    client = route.factory().buildProtocol(None)
    client.makeConnection(Wire("client", []))
    return client  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------


def test_every_route_listens_when_started(routes: Routes, reactor: ListeningReactor) -> None:
    service = started(routes.config(routes.table("a", 1), routes.table("b", 2)), reactor)
    assert reactor.events == [("listen", 1), ("listen", 2)]
    assert served_by(port_of(service, "a")) is route(service, "a")
    assert served_by(port_of(service, "b")) is route(service, "b")


def test_unchanged_configuration_touches_nothing(routes: Routes, reactor: ListeningReactor) -> None:
    service = started(routes.config(routes.table("a", 1)), reactor)
    before = route(service, "a")

    notes = service.reload(routes.config(routes.table("a", 1)))

    assert notes == ["no route changed; certificates re-read"]
    assert route(service, "a") is before
    assert reactor.events == [("listen", 1)]


def test_added_route_listens(routes: Routes, reactor: ListeningReactor) -> None:
    service = started(routes.config(routes.table("a", 1)), reactor)
    before = route(service, "a")

    notes = service.reload(routes.config(routes.table("a", 1), routes.table("b", 2)))

    assert notes == ['route "b" added: listening on 127.0.0.2:0']
    assert reactor.events == [("listen", 1), ("listen", 2)]
    assert served_by(port_of(service, "b")) is route(service, "b")
    assert route(service, "a") is before


def test_removed_route_stops_listening(routes: Routes, reactor: ListeningReactor) -> None:
    service = started(routes.config(routes.table("a", 1), routes.table("b", 2)), reactor)
    removed = route(service, "b")

    notes = service.reload(routes.config(routes.table("a", 1)))

    assert notes == ['route "b" removed: stopped listening, its sessions go on']
    assert reactor.events == [("listen", 1), ("listen", 2), ("stop", 2)]
    assert list(service.groups) == ["a"]
    assert removed.retired
    assert service.retired == set()  # it had no sessions


def test_removed_route_with_a_client_is_kept_until_it_leaves(
    routes: Routes, reactor: ListeningReactor
) -> None:
    service = started(routes.config(routes.table("a", 1), routes.table("b", 2)), reactor)
    removed = route(service, "b")
    client = connect(removed)

    service.reload(routes.config(routes.table("a", 1)))
    assert service.retired == {removed}
    assert service.liveRoutes() == [route(service, "a"), removed]

    client.connectionLost(Failure(ConnectionDone()))
    assert service.retired == set()


def test_changed_route_keeps_its_socket_for_new_connections(
    routes: Routes, reactor: ListeningReactor
) -> None:
    service = started(routes.config(routes.table("a", 1)), reactor)
    old = route(service, "a")
    client = connect(old)

    notes = service.reload(routes.config(routes.table("a", 1, backend="127.0.0.1:6543")))

    new = route(service, "a")
    assert notes == ['route "a" changed: new connections use the new settings']
    assert new is not old and new.config.backend.port == 6543
    # The same socket, now serving the new route: no connection is refused meanwhile.
    assert reactor.events == [("listen", 1)]
    assert served_by(reactor.ports[0]) is new
    assert new.port is reactor.ports[0] and old.port is None
    # The old route serves the sessions it has.
    assert old.retired and service.retired == {old}
    assert client.route is old


def test_changed_address_moves_the_listener(routes: Routes, reactor: ListeningReactor) -> None:
    service = started(routes.config(routes.table("a", 1)), reactor)

    notes = service.reload(routes.config(routes.table("a", 3)))

    assert notes == ['route "a" changed: new connections use the new settings']
    # The new socket is bound before the old one is closed.
    assert reactor.events == [("listen", 1), ("listen", 2), ("stop", 1)]
    assert served_by(port_of(service, "a")) is route(service, "a")


def test_renamed_route_takes_over_the_socket(routes: Routes, reactor: ListeningReactor) -> None:
    service = started(routes.config(routes.table("a", 1)), reactor)

    notes = service.reload(routes.config(routes.table("c", 1)))

    assert notes == ['route "a" renamed "c": sessions go on, new connections use the new settings']
    assert list(service.groups) == ["c"]
    assert reactor.events == [("listen", 1)]
    assert served_by(reactor.ports[0]) is route(service, "c")


def test_a_changed_paused_route_stays_paused(routes: Routes, reactor: ListeningReactor) -> None:
    service = started(routes.config(routes.table("a", 1)), reactor)
    service.setPaused("a", True)
    service.reload(routes.config(routes.table("a", 1, backend="127.0.0.1:6543")))
    assert route(service, "a").paused


def test_a_removed_paused_route_is_resumed(routes: Routes, reactor: ListeningReactor) -> None:
    """Nothing could RESUME it any more."""
    service = started(routes.config(routes.table("a", 1), routes.table("b", 2)), reactor)
    removed = route(service, "b")
    service.setPaused("b", True)
    service.reload(routes.config(routes.table("a", 1)))
    assert not removed.paused


def test_top_level_settings(routes: Routes, reactor: ListeningReactor) -> None:
    service = started(routes.config(routes.table("a", 1)), reactor)
    notes = service.reload(routes.config(routes.table("a", 1), log_level="debug", workers=2))
    assert notes == ["workers changed: takes effect after a restart", "log_level is now debug"]
    assert service.config.log_level == "debug"


def test_cluster_peers_change_at_once_and_the_instance_after_a_restart(
    routes: Routes, reactor: ListeningReactor
) -> None:
    """The instance is in every key minted so far; the peers list is only where requests go."""
    cluster = {"instance": 1, "peers": ["127.0.0.1:7001", "127.0.0.1:7002"]}
    service = started(routes.config(routes.table("a", 1), cluster=cluster), reactor)
    assert service.cancels.instance == 1

    moved = {**cluster, "peers": ["127.0.0.1:7001", "10.0.0.2:7002"]}
    notes = service.reload(routes.config(routes.table("a", 1), cluster=moved))
    assert notes == ["[cluster] peers changed"]
    assert service.cancels.toPeer.cluster.peers == ("127.0.0.1:7001", "10.0.0.2:7002")

    for changed in ({**moved, "instance": 2}, None):
        top = {} if changed is None else {"cluster": changed}
        notes = service.reload(routes.config(routes.table("a", 1), **top))
        assert notes == ["[cluster] instance changed: takes effect after a restart"]
        assert service.cancels.instance == 1
        assert service.cancels.toPeer.cluster.peers == ("127.0.0.1:7001", "10.0.0.2:7002")


# ---------------------------------------------------------------------------
# Reloads that change nothing


def test_a_bad_certificate_changes_nothing(
    routes: Routes, reactor: ListeningReactor, tmp_path: Path
) -> None:
    service = started(routes.config(routes.table("a", 1)), reactor)
    before = route(service, "a")
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate\n")

    config = routes.config(routes.table("a", 1), routes.table("b", 2, server_cert=str(bogus)))
    with pytest.raises(ConfigError, match='route "b"'):
        service.reload(config)

    assert list(service.groups) == ["a"] and route(service, "a") is before
    assert reactor.events == [("listen", 1)]


def test_a_route_that_cannot_listen_changes_nothing(
    routes: Routes, reactor: ListeningReactor
) -> None:
    service = started(routes.config(routes.table("a", 1)), reactor)
    unbindable = routes.table("c", 1)
    unbindable["listener"]["bind_address"] = "192.0.2.1:5432"  # not an address of this host

    config = routes.config(routes.table("a", 1), routes.table("b", 2), unbindable)
    with pytest.raises(ConfigError, match='route "c": cannot listen on 192.0.2.1:5432'):
        service.reload(config)

    # Route b's socket, bound first, was closed again.
    assert reactor.events == [("listen", 1), ("listen", 2), ("stop", 2)]
    assert list(service.groups) == ["a"]


def test_no_reload_while_shutting_down(routes: Routes, reactor: ListeningReactor) -> None:
    service = started(routes.config(routes.table("a", 1)), reactor)
    service.shutdown(30)
    notes = service.reload(routes.config(routes.table("a", 1), routes.table("b", 2)))
    assert notes == ["reload ignored: pgtls is shutting down"]
    assert ("listen", 2) not in reactor.events
