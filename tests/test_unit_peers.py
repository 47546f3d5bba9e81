"""
Cancels across the instances of a cluster (issue 15, item 2), in memory:
the instance number in every minted key (L{pgtls_twisted.proxy._cancel}),
the registry's choice between this instance, another worker and another
instance, and L{pgtls_twisted.proxy._peers.PeerCancels}: where a request
goes, the PROXY header it carries when the listener expects one (read back
with Twisted's own parser), the memory that keeps a misconfigured cluster
from sending one request round, and the C{[cluster]} configuration.
The real thing, two instances behind a balancer, is L{tests.test_cluster}.
"""

from __future__ import annotations

from ipaddress import ip_address
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from support.configdocs import minimal_doc, parse, write_dummy_files
from support.unit import Scene, unit_reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.haproxy._v2parser import V2Parser

from pgtls_twisted.config import ClusterConfig, ConfigError, describe_config
from pgtls_twisted.protocol import _proxyheader
from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.proxy import _peers
from pgtls_twisted.proxy._cancel import CancelRegistry, instance_of, key_entropy, worker_of
from pgtls_twisted.proxy._peers import MEMORY, PeerCancels
from pgtls_twisted.testing.pki import PKI

reactor = pytest.fixture(unit_reactor, name="reactor")

CLIENT = IPv4Address("TCP", "203.0.113.7", 5555)


@pytest.fixture
def scene(pki: PKI, tmp_path: Path, reactor: MemoryReactorClock) -> Scene:
    return Scene(pki, tmp_path, reactor, None)


class Target:
    def cancelTarget(self) -> Any:
        return None


def clustered(instance: int, worker: int = 0, workers: int = 1) -> CancelRegistry:
    registry = CancelRegistry(worker)
    registry.workers = workers
    registry.instance = instance
    return registry


# ---------------------------------------------------------------------------
# Keys


@pytest.mark.parametrize("instance", [1, 2, 17, 255])
@pytest.mark.parametrize("worker, workers", [(0, 1), (1, 2), (2, 3), (63, 64)])
@pytest.mark.parametrize("length", [4, 32])
def test_every_key_names_its_instance_and_worker(
    instance: int, worker: int, workers: int, length: int
) -> None:
    registry = clustered(instance, worker, workers)
    for _ in range(200):
        _, key = registry.mint(Target(), length)
        assert len(key) == length
        assert instance_of(key) == instance
        assert worker_of(key, workers, clustered=True) == worker


def test_a_cluster_costs_eight_bits() -> None:
    assert key_entropy(1, clustered=True) == 24
    assert key_entropy(2, clustered=True) == 23
    assert key_entropy(1, 32, clustered=True) == 24 + 8 * 28


def test_outside_a_cluster_the_head_is_unchanged() -> None:
    """Instance 0 (no [cluster]) keeps the whole head random, as before."""
    registry = CancelRegistry()
    heads = {registry.mint(Target(), 4)[1][0] for _ in range(400)}
    assert len(heads) > 100


def test_a_key_of_a_bad_instance_is_not_minted() -> None:
    with pytest.raises(ValueError):
        clustered(256).mint(Target(), 4)


# ---------------------------------------------------------------------------
# The registry's choice


class ToPeer:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> None:
        self.calls.append(args)


def test_a_key_of_another_instance_goes_to_that_instance(scene: Scene) -> None:
    one, two = clustered(1), clustered(2)
    two.toPeer = ToPeer()
    two.relay = ToPeer()
    pid, key = one.mint(Target(), 4)
    request = wire.CancelRequest(pid, key)

    two.cancel(request, conn=7, via=scene.route, client=CLIENT)

    assert two.toPeer.calls == [(1, request, 7, scene.route, CLIENT)]
    assert two.relay.calls == []


def test_an_unknown_key_of_this_instance_stays_here(scene: Scene) -> None:
    """A key naming this instance is never sent to a peer: a forwarded request stops here."""
    one = clustered(1, worker=0, workers=2)
    one.toPeer, one.relay = ToPeer(), ToPeer()
    other = clustered(1, worker=1, workers=2)
    pid, key = other.mint(Target(), 4)
    one.cancel(wire.CancelRequest(pid, key), conn=1, via=scene.route)
    assert one.toPeer.calls == []
    # ... but goes to the worker that minted it.
    assert [call[0] for call in one.relay.calls] == [1]

    pid, key = one.mint(Target(), 4)
    one.cancel(wire.CancelRequest(pid, key + b""), conn=1, via=scene.route)
    forged = bytes([1]) + key[1:3] + bytes([key[3] ^ 2])
    one.cancel(wire.CancelRequest(pid, forged), conn=1, via=scene.route)
    assert one.toPeer.calls == []


def test_a_request_relayed_by_a_worker_is_not_sent_to_a_peer(scene: Scene) -> None:
    two = clustered(2)
    two.toPeer = ToPeer()
    pid, key = clustered(1).mint(Target(), 4)
    two.cancel(wire.CancelRequest(pid, key), conn=1, via=scene.route, relayed=True)
    assert two.toPeer.calls == []
    assert scene.metrics.named("cancelRequest") == [("cancelRequest", "test", "ignored")]


def test_a_short_key_goes_nowhere(scene: Scene) -> None:
    """Protocol 3.2 lets a client send a 1-byte key: too short to name an instance."""
    two = clustered(2)
    two.toPeer = ToPeer()
    two.cancel(wire.CancelRequest(5, b"\x01"), conn=1, via=scene.route)
    assert two.toPeer.calls == []


# ---------------------------------------------------------------------------
# Passing a request to a peer


def via(scene: Scene, proxy_protocol: bool) -> Any:
    """The route a request came on, with or without PROXY headers on its listener."""
    return SimpleNamespace(
        name="test",
        metrics=scene.metrics,
        config=SimpleNamespace(listener=SimpleNamespace(proxy_protocol=proxy_protocol)),
    )


def connect(reactor: MemoryReactorClock, peer: Any) -> tuple[Any, StringTransport]:
    """Complete the last connection attempt: the protocol and what it wrote."""
    host, port, factory, timeout, _ = reactor.tcpClients[-1]
    assert timeout == _peers.CONNECT_TIMEOUT
    protocol = factory.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    protocol.makeConnection(transport)
    return protocol, transport


PEERS = ("127.0.0.1:7001", "127.0.0.1:7002", "[::1]:7003")


def test_a_request_goes_to_the_peer_of_its_number(
    scene: Scene, reactor: MemoryReactorClock
) -> None:
    peers = PeerCancels(reactor, ClusterConfig(1, PEERS))
    request = wire.CancelRequest(99, b"\x02abc")
    peers(2, request, 5, via(scene, False), CLIENT)

    assert reactor.tcpClients[-1][:2] == ("127.0.0.1", 7002)
    protocol, transport = connect(reactor, IPv4Address("TCP", "127.0.0.1", 7002))
    # No header: the listener it came on expects none, so the peer's does not.
    assert transport.value() == request.encode()
    assert scene.metrics.named("cancelRequest") == [("cancelRequest", "test", "peer")]
    # The peer closes once it has acted; the wait is over.
    assert len(reactor.getDelayedCalls()) == 1
    protocol.connectionLost(None)
    assert reactor.getDelayedCalls() == []

    peers(3, wire.CancelRequest(99, b"\x03abc"), 5, via(scene, False), CLIENT)
    assert reactor.tcpClients[-1][:2] == ("::1", 7003)


def test_a_peer_that_does_not_close_is_closed(scene: Scene, reactor: MemoryReactorClock) -> None:
    PeerCancels(reactor, ClusterConfig(1, PEERS))(
        2, wire.CancelRequest(1, b"\x02abc"), 5, via(scene, False), None
    )
    _, transport = connect(reactor, IPv4Address("TCP", "127.0.0.1", 7002))
    reactor.advance(_peers.CLOSE_WAIT)
    assert transport.disconnecting or transport.disconnected


@pytest.mark.parametrize(
    "client, peer, source",
    [
        (CLIENT, IPv4Address("TCP", "127.0.0.1", 7002), ("203.0.113.7", 5555)),
        (
            IPv6Address("TCP", "2001:db8::7", 6000),
            IPv6Address("TCP", "::1", 7002),
            ("2001:db8::7", 6000),
        ),
        # A client over IPv6 to a peer over IPv4: the source is what counts.
        (
            IPv6Address("TCP", "2001:db8::7", 6000),
            IPv4Address("TCP", "127.0.0.1", 7002),
            ("2001:db8::7", 6000),
        ),
    ],
)
def test_behind_a_header_naming_the_client(
    scene: Scene, reactor: MemoryReactorClock, client: Any, peer: Any, source: Any
) -> None:
    request = wire.CancelRequest(99, b"\x02abc")
    PeerCancels(reactor, ClusterConfig(1, PEERS))(2, request, 5, via(scene, True), client)
    _, transport = connect(reactor, peer)

    info, rest = V2Parser().feed(transport.value())
    assert info is not None
    assert (ip_address(info.source.host), info.source.port) == (ip_address(source[0]), source[1])
    assert rest == request.encode()


def test_a_local_header_when_the_client_address_is_unknown(
    scene: Scene, reactor: MemoryReactorClock
) -> None:
    request = wire.CancelRequest(99, b"\x02abc")
    PeerCancels(reactor, ClusterConfig(1, PEERS))(2, request, 5, via(scene, True), None)
    _, transport = connect(reactor, IPv4Address("TCP", "127.0.0.1", 7002))
    info, rest = V2Parser().feed(transport.value())
    assert info is not None and info.source is None
    assert rest == request.encode()


def test_an_unlisted_instance_is_ignored(scene: Scene, reactor: MemoryReactorClock) -> None:
    peers = PeerCancels(reactor, ClusterConfig(1, PEERS))
    for home in (1, 4, 255):
        peers(home, wire.CancelRequest(1, bytes([home]) + b"abc"), 5, via(scene, False), None)
    assert reactor.tcpClients == []
    assert scene.metrics.named("cancelRequest") == [("cancelRequest", "test", "ignored")] * 3


def test_a_request_that_comes_back_is_not_passed_on_again(
    scene: Scene, reactor: MemoryReactorClock
) -> None:
    """
    Two instances numbered alike, or peers in the wrong order, would send a
    request round for ever: the second time within MEMORY seconds, it stops.
    """
    peers = PeerCancels(reactor, ClusterConfig(1, PEERS))
    request = wire.CancelRequest(99, b"\x02abc")
    peers(2, request, 5, via(scene, False), None)
    peers(2, request, 6, via(scene, False), None)
    assert len(reactor.tcpClients) == 1
    # Another request is not held back by it.
    peers(2, wire.CancelRequest(99, b"\x02abd"), 7, via(scene, False), None)
    assert len(reactor.tcpClients) == 2
    reactor.advance(MEMORY)
    peers(2, request, 8, via(scene, False), None)
    assert len(reactor.tcpClients) == 3


def test_the_memory_is_bounded(
    scene: Scene, reactor: MemoryReactorClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_peers, "MEMORY_SIZE", 8)
    peers = PeerCancels(reactor, ClusterConfig(1, PEERS))
    for n in range(50):
        peers(2, wire.CancelRequest(n, b"\x02abc"), 5, via(scene, False), None)
    assert len(peers._passed) <= 8
    assert len(reactor.tcpClients) == 50


# ---------------------------------------------------------------------------
# The header builder


@pytest.mark.parametrize(
    "source, destination",
    [
        (("10.1.2.3", 1), ("10.9.9.9", 6432)),
        (("::ffff:10.1.2.3", 65535), ("10.9.9.9", 6432)),
        (("2001:db8::1", 40000), ("2001:db8::2", 6432)),
        (("10.1.2.3", 1), None),
        (("10.1.2.3", 1), ("pgtls-2.example", 6432)),
    ],
)
def test_a_header_reads_back_with_twisteds_parser(source: Any, destination: Any) -> None:
    info, rest = V2Parser().feed(_proxyheader.proxy_header(source, destination) + b"after")
    assert info is not None and rest == b"after"
    expected = ip_address(source[0].removeprefix("::ffff:"))
    assert (ip_address(info.source.host), info.source.port) == (expected, source[1])


def test_a_header_needs_an_ip_address() -> None:
    with pytest.raises(ValueError):
        _proxyheader.proxy_header(("client.example", 1))
    with pytest.raises(ValueError):
        _proxyheader.proxy_header(("10.0.0.1", 70000))


# ---------------------------------------------------------------------------
# [cluster]


def config_with(cluster: Any, tmp_path: Path) -> Any:
    return parse({**minimal_doc(), "cluster": cluster}, write_dummy_files(tmp_path))


def test_cluster_configuration(tmp_path: Path) -> None:
    config = config_with({"instance": 2, "peers": ["10.0.0.1:6432", "pgtls-2:6432"]}, tmp_path)
    assert config.cluster is not None
    assert config.cluster.peer(1) == "10.0.0.1:6432"
    assert config.cluster.peer(2) is None  # itself
    assert config.cluster.peer(3) is None
    assert "cluster    instance 2; cancels passed to 1 at 10.0.0.1:6432" in describe_config(config)
    assert config_with({"instance": 1}, tmp_path).cluster.peers == ()


@pytest.mark.parametrize(
    "cluster, message",
    [
        ({}, "cluster.instance: missing"),
        ({"instance": 0}, "cluster.instance: must be between 1 and 255, got 0"),
        ({"instance": 256}, "must be between 1 and 255"),
        ({"instance": True}, "cluster.instance: expected an instance number"),
        ({"instance": 1, "peers": "a:1"}, "cluster.peers: expected a list"),
        ({"instance": 1, "peers": ["a:0"]}, "port 0 cannot be connected to"),
        ({"instance": 1, "peers": ["::1:5"]}, "must be in brackets"),
        ({"instance": 3, "peers": ["a:1", "b:1"]}, "lists 2 instance(s), but this is instance 3"),
        ({"instance": 1, "peer": []}, 'did you mean "peers"?'),
    ],
)
def test_cluster_configuration_errors(cluster: Any, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        config_with(cluster, tmp_path)
    assert message in str(caught.value)
