"""
The cancel registry (L{pgtls_twisted.proxy._cancel}): minted keys, their
constant-time check, the worker number in every PID, forwarding a cancel
to the backend over a new connection (the route's real connector, through
the in-memory endpoints of L{support.unit.Backends}), and passing a
request on to another worker once.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

import pytest
from support.unit import Scene, unit_reactor
from twisted.internet.testing import MemoryReactorClock

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.proxy._cancel import CANCEL_WAIT, CancelRegistry, worker_of
from pgtls_twisted.testing.pki import PKI

reactor = pytest.fixture(unit_reactor, name="reactor")


@pytest.fixture
def scene(pki: PKI, tmp_path: Path, reactor: MemoryReactorClock) -> Scene:
    """A route, for its backend connector and its metrics."""
    return Scene(pki, tmp_path, reactor, None)


class Target:
    """A session whose cancels go to C{info}, recording each time it is done."""

    def __init__(self, info: Any = None) -> None:
        self.info = info
        self.done: list[str] = []

    def cancelTarget(self) -> Any:
        return self.info

    def finished(self) -> None:
        self.done.append("done")


def target_on(scene: Scene, pid: int = 4242, key: bytes = b"real") -> Target:
    target = Target()
    target.info = (scene.route.backend, pid, key, target.finished)
    return target


# ---------------------------------------------------------------------------
# Minting and looking up


@pytest.mark.parametrize("worker", [0, 1, 7, 255])
def test_minted_pids_carry_the_worker_number(worker: int) -> None:
    registry = CancelRegistry(worker)
    for _ in range(50):
        pid, _ = registry.mint(Target(), 4)
        assert worker_of(pid) == worker
        assert 0 < pid <= 0x7FFFFFFF
        assert pid >> 8 > 0  # never a PID of 0..255
    assert len(registry) == 50


@pytest.mark.parametrize("asked, length", [(4, 4), (1, 4), (32, 32), (256, 256), (1000, 256)])
def test_minted_keys_are_as_long_as_the_backends(asked: int, length: int) -> None:
    _, key = CancelRegistry().mint(Target(), asked)
    assert len(key) == length


def test_lookup_needs_the_whole_key() -> None:
    registry = CancelRegistry()
    target = Target()
    pid, key = registry.mint(target, 4)
    other = bytes([key[0] ^ 1]) + key[1:]

    assert registry.lookup(wire.CancelRequest(pid, key)) is target
    assert registry.lookup(wire.CancelRequest(pid, other)) is None
    assert registry.lookup(wire.CancelRequest(pid, key[:3])) is None
    assert registry.lookup(wire.CancelRequest(pid, key + b"\0")) is None
    assert registry.lookup(wire.CancelRequest(pid + 256, key)) is None

    registry.forget(pid)
    registry.forget(pid)  # twice is harmless
    assert registry.lookup(wire.CancelRequest(pid, key)) is None
    assert len(registry) == 0


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    registry = CancelRegistry()
    pid, key = registry.mint(Target(), 4)
    registry.lookup(wire.CancelRequest(pid, b"nope"))
    assert compared == [(key, b"nope")]


# ---------------------------------------------------------------------------
# Forwarding


def cancelled(scene: Scene) -> Target:
    """A cancel for a session whose server has the key (4242, C{real}), on its way."""
    registry = CancelRegistry()
    target = target_on(scene, 4242, b"real")
    pid, key = registry.mint(target, 4)
    registry.cancel(wire.CancelRequest(pid, key), conn=1, via=scene.route)
    return target


def test_cancel_is_forwarded_with_the_real_key(scene: Scene) -> None:
    target = cancelled(scene)
    cancel = scene.backends.accept("cancel")

    assert scene.events == [("cancel", "cancel")]
    assert cancel.transport.framer.startup() == wire.CancelRequest(4242, b"real")
    assert scene.metrics.named("cancelRequest") == [("cancelRequest", "test", "forwarded")]
    # In flight until the server has acted on it (and closed the connection).
    assert target.done == []
    cancel.lose()
    assert target.done == ["done"]


def test_a_server_that_keeps_the_cancel_connection_open_is_closed(scene: Scene) -> None:
    target = cancelled(scene)
    cancel = scene.backends.accept("cancel")

    scene.reactor.advance(CANCEL_WAIT)

    assert scene.events == [("cancel", "cancel"), ("cancel", "close")]
    cancel.lose()
    assert target.done == ["done"]


def test_an_unreachable_backend_still_ends_the_cancel(scene: Scene) -> None:
    target = cancelled(scene)
    scene.backends.refuse()
    assert target.done == ["done"]
    assert scene.events == []


def test_unknown_key_is_ignored(scene: Scene) -> None:
    registry = CancelRegistry()
    pid, key = registry.mint(target_on(scene), 4)
    registry.cancel(wire.CancelRequest(pid, b"nope"), conn=1, via=scene.route)
    assert scene.backends.pending == 0
    assert scene.metrics.named("cancelRequest") == [("cancelRequest", "test", "ignored")]


def test_session_without_a_query_to_cancel_is_ignored(scene: Scene) -> None:
    registry = CancelRegistry()
    pid, key = registry.mint(Target(None), 4)
    registry.cancel(wire.CancelRequest(pid, key), conn=1, via=scene.route)
    assert scene.backends.pending == 0
    assert scene.metrics.named("cancelRequest") == [("cancelRequest", "test", "ignored")]


# ---------------------------------------------------------------------------
# Workers


class Relay:
    def __init__(self) -> None:
        self.calls: list[tuple[int, wire.CancelRequest, Any]] = []

    def __call__(self, worker: int, request: wire.CancelRequest, via: Any) -> None:
        self.calls.append((worker, request, via))


def registries(count: int) -> list[CancelRegistry]:
    """The registries of C{count} workers, each relaying through a L{Relay}."""
    result = []
    for worker in range(count):
        registry = CancelRegistry(worker)
        registry.workers = count
        registry.relay = Relay()
        result.append(registry)
    return result


def test_a_cancel_for_another_worker_is_passed_on_to_it(scene: Scene) -> None:
    zero, one = registries(2)
    pid, key = one.mint(target_on(scene), 4)
    request = wire.CancelRequest(pid, key)

    zero.cancel(request, conn=1, via=scene.route)

    assert zero.relay.calls == [(1, request, scene.route)]  # type: ignore[union-attr]
    assert scene.metrics.named("cancelRequest") == [("cancelRequest", "test", "relayed")]
    assert scene.backends.pending == 0

    # The owner forwards it.
    one.cancel(request, conn=1, via=scene.route, relayed=True)
    assert scene.backends.pending == 1


def test_a_relayed_cancel_is_never_passed_on_again(scene: Scene) -> None:
    zero, one, two = registries(3)
    pid, key = two.mint(Target(), 4)
    # A forged request naming worker 2, relayed to worker 1 (say), is not
    # bounced on, whatever its PID says.
    one.cancel(wire.CancelRequest(pid, b"forged"), conn=1, via=scene.route, relayed=True)
    # Nor by its owner, whose key check it fails.
    two.cancel(wire.CancelRequest(pid, b"forged"), conn=1, via=scene.route, relayed=True)

    for registry in (zero, one, two):
        assert registry.relay.calls == []  # type: ignore[union-attr]
    assert scene.metrics.named("cancelRequest") == [("cancelRequest", "test", "ignored")] * 2


def test_a_pid_of_no_worker_is_ignored(scene: Scene) -> None:
    zero, _ = registries(2)
    pid, key = CancelRegistry(5).mint(Target(), 4)
    zero.cancel(wire.CancelRequest(pid, key), conn=1, via=scene.route)
    assert zero.relay.calls == []  # type: ignore[union-attr]
    assert scene.metrics.named("cancelRequest") == [("cancelRequest", "test", "ignored")]


def test_an_unknown_key_of_this_worker_is_not_passed_on(scene: Scene) -> None:
    zero, _ = registries(2)
    pid, _ = zero.mint(Target(), 4)
    zero.cancel(wire.CancelRequest(pid, b"nope"), conn=1, via=scene.route)
    assert zero.relay.calls == []  # type: ignore[union-attr]
