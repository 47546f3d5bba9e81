"""
The cancel registry (L{pgtls_twisted.proxy._cancel}): minted keys (with
the backend's own PID, or a minted one), their constant-time check, the
worker number in every key and what it costs, forwarding a cancel to the
backend over a new connection (the route's real connector, through the
in-memory endpoints of L{support.unit.Backends}), and passing a request on
to another worker once, in the 3.0 and 3.2 key formats.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

import pytest
from support.unit import Scene, unit_reactor
from twisted.internet.testing import MemoryReactorClock

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.proxy._cancel import (
    CANCEL_WAIT,
    MAX_MINTED_PID,
    CancelRegistry,
    key_entropy,
    worker_of,
)
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


def registry_of(worker: int, workers: int) -> CancelRegistry:
    registry = CancelRegistry(worker)
    registry.workers = workers
    return registry


@pytest.mark.parametrize("worker, workers", [(0, 1), (0, 2), (1, 2), (2, 3), (7, 8), (63, 64)])
@pytest.mark.parametrize("length", [4, 32, 256])
def test_minted_keys_carry_the_worker_number(worker: int, workers: int, length: int) -> None:
    registry = registry_of(worker, workers)
    heads = set()
    for _ in range(50):
        pid, key = registry.mint(Target(), length)
        assert worker_of(key, workers) == worker
        assert 0 < pid <= MAX_MINTED_PID
        heads.add(key[:4])
    # The rest of the head is random: 50 draws of at least 26 bits differ.
    assert len(heads) == 50
    assert len(registry) == 50


def test_a_worker_number_the_registry_cannot_carry_is_refused() -> None:
    with pytest.raises(ValueError):
        registry_of(2, 2).mint(Target(), 4)


def test_the_backends_pid_is_kept_and_only_the_key_minted() -> None:
    registry = registry_of(1, 2)
    target = Target()
    pid, key = registry.mint(target, 4, pid=4242)
    assert pid == 4242 and len(key) == 4 and worker_of(key, 2) == 1
    assert registry.lookup(wire.CancelRequest(4242, key)) is target


@pytest.mark.parametrize(
    "workers, length, bits",
    [(1, 4, 32), (2, 4, 31), (4, 4, 30), (64, 4, 26), (1, 32, 256), (64, 32, 250), (64, 256, 2042)],
)
def test_what_the_worker_number_costs(workers: int, length: int, bits: int) -> None:
    """
    One process mints a 3.0 key as random as PostgreSQL's own (32 bits);
    N workers take log2(N) of them (26 left at the most, 64).
    """
    assert key_entropy(workers, length) == bits


def test_the_cost_of_a_worker_count_that_is_no_power_of_two() -> None:
    # The head is uniform over the numbers below 2**32 that are the worker
    # modulo 3: log2(2**32 // 3) bits, not a whole bit less than 31.
    assert 30.41 < key_entropy(3) < 30.42


@pytest.mark.parametrize("asked, length", [(4, 4), (1, 4), (32, 32), (256, 256), (1000, 256)])
def test_minted_keys_are_as_long_as_the_backends(asked: int, length: int) -> None:
    _, key = CancelRegistry().mint(Target(), asked)
    assert len(key) == length


def test_lookup_needs_the_whole_key_and_its_pid() -> None:
    registry = CancelRegistry()
    target = Target()
    pid, key = registry.mint(target, 4)
    other = bytes([key[0] ^ 1]) + key[1:]

    assert registry.lookup(wire.CancelRequest(pid, key)) is target
    assert registry.lookup(wire.CancelRequest(pid, other)) is None
    assert registry.lookup(wire.CancelRequest(pid, key[:3])) is None
    assert registry.lookup(wire.CancelRequest(pid, key + b"\0")) is None
    assert registry.lookup(wire.CancelRequest(pid ^ 1, key)) is None

    registry.forget(pid, target)
    registry.forget(pid, target)  # twice is harmless
    assert registry.lookup(wire.CancelRequest(pid, key)) is None
    assert len(registry) == 0


def test_sessions_of_the_same_pid_have_keys_of_their_own() -> None:
    """Two routes' backends on different servers may give two sessions one PID."""
    registry = CancelRegistry()
    one, two = Target(), Target()
    _, key1 = registry.mint(one, 4, pid=4242)
    _, key2 = registry.mint(two, 32, pid=4242)

    assert registry.lookup(wire.CancelRequest(4242, key1)) is one
    assert registry.lookup(wire.CancelRequest(4242, key2)) is two
    registry.forget(4242, one)
    assert registry.lookup(wire.CancelRequest(4242, key1)) is None
    assert registry.lookup(wire.CancelRequest(4242, key2)) is two
    assert len(registry) == 1


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


def test_every_key_of_a_pid_is_compared_whichever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not stopping at the first match: the time tells nothing of which session it was."""
    compared: list[bytes] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(a)
        return real(a, b)

    registry = CancelRegistry()
    first, second = Target(), Target()
    _, key1 = registry.mint(first, 4, pid=7)
    _, key2 = registry.mint(second, 4, pid=7)
    registry.mint(Target(), 4, pid=8)
    monkeypatch.setattr(hmac, "compare_digest", spy)

    assert registry.lookup(wire.CancelRequest(7, key1)) is first
    assert compared == [key1, key2]


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


def forged(worker: int, workers: int, length: int = 4) -> bytes:
    """A key no one minted whose head names C{worker} of C{workers}."""
    head = (0x5EED << 8) * workers + worker
    return head.to_bytes(4, "big") + b"\xee" * (length - 4)


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
    bad = forged(2, 3)
    # A forged request naming worker 2, relayed to worker 1 (say), is not
    # bounced on, whatever its key says.
    one.cancel(wire.CancelRequest(pid, bad), conn=1, via=scene.route, relayed=True)
    # Nor by its owner, whose key check it fails.
    two.cancel(wire.CancelRequest(pid, bad), conn=1, via=scene.route, relayed=True)

    for registry in (zero, one, two):
        assert registry.relay.calls == []  # type: ignore[union-attr]
    assert scene.metrics.named("cancelRequest") == [("cancelRequest", "test", "ignored")] * 2


@pytest.mark.parametrize("length", [1, 3])
def test_a_key_too_short_to_be_minted_is_not_passed_on(scene: Scene, length: int) -> None:
    """Protocol 3.2 lets a client send 1 to 3 bytes: no worker minted those."""
    zero, _ = registries(2)
    zero.cancel(wire.CancelRequest(4242, b"\1" * length), conn=1, via=scene.route)
    assert zero.relay.calls == []  # type: ignore[union-attr]
    assert scene.metrics.named("cancelRequest") == [("cancelRequest", "test", "ignored")]


def test_a_32_byte_key_of_another_worker_is_passed_on_and_forwarded(scene: Scene) -> None:
    """Protocol 3.2: the worker is at the head of the long key as of a short one."""
    zero, one, two = registries(3)
    target = target_on(scene, 4242, b"r" * 32)
    pid, key = two.mint(target, 32, pid=4242)
    request = wire.CancelRequest(pid, key)

    one.cancel(request, conn=1, via=scene.route)
    assert one.relay.calls == [(2, request, scene.route)]  # type: ignore[union-attr]

    two.cancel(request, conn=1, via=scene.route, relayed=True)
    cancel = scene.backends.accept("cancel")
    assert cancel.transport.framer.startup() == wire.CancelRequest(4242, b"r" * 32)


def test_an_unknown_key_of_this_worker_is_not_passed_on(scene: Scene) -> None:
    zero, _ = registries(2)
    pid, _ = zero.mint(Target(), 4)
    zero.cancel(wire.CancelRequest(pid, forged(0, 2)), conn=1, via=scene.route)
    assert zero.relay.calls == []  # type: ignore[union-attr]
    assert scene.metrics.named("cancelRequest") == [("cancelRequest", "test", "ignored")]


def test_a_forged_key_of_another_worker_is_passed_on_once_and_ignored_there(
    scene: Scene,
) -> None:
    zero, one = registries(2)
    request = wire.CancelRequest(4242, forged(1, 2))
    zero.cancel(request, conn=1, via=scene.route)
    one.cancel(request, conn=1, via=scene.route, relayed=True)
    assert zero.relay.calls == [(1, request, scene.route)]  # type: ignore[union-attr]
    assert one.relay.calls == []  # type: ignore[union-attr]
    assert scene.backends.pending == 0
    assert scene.metrics.named("cancelRequest") == [
        ("cancelRequest", "test", "relayed"),
        ("cancelRequest", "test", "ignored"),
    ]
