"""
Direct legs (L{pgtls_twisted.proxy._direct}) on socket pairs, with the
recording reactor of C{test_relay_unit.py}: what the peer sends is
delivered to the leg; what the session writes reaches the peer (in TLS
through OpenSSL's own calls); a full socket pauses the registered producer
until it drains, holding at most what was written; pausing the leg's
reading unregisters it, and resuming decrypts what OpenSSL already holds;
a producer and unsent bytes go back to the leg's own C{out} on hand-back;
a FIN, a close_notify or garbage hands back.

Real PostgreSQL through direct legs is C{test_direct.py}.
"""

from __future__ import annotations

from typing import Any

from test_relay_unit import TLS, Leg, Reactor, _open, _pair, _recvAll, _seal, _tlsPair

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.proxy._direct import DirectLeg
from pgtls_twisted.testing.pki import PKI


class Out:
    """A leg's own C{out} (its TLS protocol or TCP transport) as hand-back sees it."""

    def __init__(self) -> None:
        self.producers: list[Any] = []
        self.written: list[bytes] = []

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producers.append(producer)

    def unregisterProducer(self) -> None:
        self.producers.append(None)

    def write(self, data: bytes) -> None:
        self.written.append(data)


class Producer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")


class PooledLeg(Leg):
    def __init__(self, tls: TLS | None = None) -> None:
        super().__init__(tls)
        self.out = Out()
        self.delivered: list[bytes] = []
        self.deliver = self.delivered.append
        self.direct: Any = None
        self.producer: Any = None


def _direct(tls: Any = None, conn: Any = None, producer: Any = None) -> Any:
    app, proxy = _pair()
    reactor, leg = Reactor(), PooledLeg(tls)
    leg.producer = producer
    own = leg.out
    direct = DirectLeg(reactor, leg, proxy, conn)
    direct.start()
    return direct, reactor, leg, own, app, proxy


def test_plaintext_both_ways() -> None:
    direct, reactor, leg, _, app, proxy = _direct()
    with app, proxy:
        assert leg.out is direct and leg.direct is direct and direct in reactor.readers
        app.send(b"hello")
        direct.doRead()
        assert leg.delivered == [b"hello"]
        leg.out.write(b"world")
        assert _recvAll(app) == b"world"


def test_full_socket_pauses_the_producer_until_drained() -> None:
    producer = Producer()
    direct, reactor, leg, own, app, proxy = _direct(producer=producer)
    with app, proxy:
        # The producer registered with the leg's own out moved to the direct leg.
        assert own.producers == [None] and direct.producer is producer
        block = b"D" * 65536
        direct.write(block)
        assert direct.out and direct in reactor.writers
        assert producer.events == ["pause"]
        direct.write(block)  # a paused producer's last chunk is kept too
        assert producer.events == ["pause"]
        assert len(direct.out) <= 2 * len(block)
        received = 0
        while received < 2 * len(block):
            received += len(_recvAll(app))
            if direct in reactor.writers:
                direct.doWrite()
        assert received == 2 * len(block)
        assert producer.events == ["pause", "resume"] and direct not in reactor.writers


def test_pause_and_resume_reading() -> None:
    direct, reactor, _, _, app, proxy = _direct()
    with app, proxy:
        direct.pauseProducing()
        assert direct.paused and direct not in reactor.readers
        direct.resumeProducing()
        assert not direct.paused and direct in reactor.readers


def test_hand_back_gives_the_producer_and_unsent_bytes_to_the_transport() -> None:
    producer = Producer()
    direct, reactor, leg, own, app, proxy = _direct(producer=producer)
    with app, proxy:
        direct.write(b"D" * 300000)
        unsent = bytes(direct.out)
        assert unsent
        direct.stop()
        assert leg.out is own and leg.direct is None and leg.handBack is None
        assert own.producers == [None, producer]
        assert leg.transport.written == [unsent] and leg.transport.reading
        assert not reactor.readers and not reactor.writers
        # A write after the hand-back goes to the leg's own out.
        direct.write(b"late")
        assert own.written == [b"late"]


def test_end_of_file_hands_back() -> None:
    direct, reactor, leg, _, app, proxy = _direct()
    with proxy:
        app.close()
        direct.doRead()
        assert not direct.running and leg.transport.reading and leg.out is not direct


def test_tls_both_ways(pki: PKI) -> None:
    peer, conn = _tlsPair(pki)
    direct, _, leg, _, app, proxy = _direct(TLS(), conn)
    with app, proxy:
        query = wire.message(b"Q", b"select 1\0") * 3000  # several records
        sealed = memoryview(_seal(peer, query))
        while sealed:
            try:
                sealed = sealed[app.send(sealed) :]
            except BlockingIOError:
                pass
            direct.doRead()
        direct.doRead()
        assert b"".join(leg.delivered) == query
        answer = b"Z\0\0\0\x05I" * 10000
        leg.out.write(answer)
        got = b""
        while len(got) < len(answer):
            got += _open(peer, _recvAll(app))
            if direct.out:
                direct.doWrite()
        assert got == answer


def test_tls_resume_decrypts_what_openssl_holds(pki: PKI) -> None:
    """Bytes already in OpenSSL's incoming BIO raise no readable event: resuming delivers them."""
    peer, conn = _tlsPair(pki)
    direct, reactor, leg, _, app, proxy = _direct(TLS(), conn)
    with app, proxy:
        direct.pauseProducing()
        conn.bio_write(_seal(peer, b"x" * 50000))
        direct.resumeProducing()
        assert b"".join(leg.delivered) == b"x" * 50000
        assert direct in reactor.readers


def test_tls_close_notify_and_garbage(pki: PKI) -> None:
    peer, conn = _tlsPair(pki)
    tls = TLS()
    direct, _, _, _, app, proxy = _direct(tls, conn)
    with app, proxy:
        try:
            peer.shutdown()
        except Exception:
            pass
        app.send(peer.bio_read(1 << 16))
        direct.doRead()
        assert not direct.running and tls.events == ["close_notify"]
    peer, conn = _tlsPair(pki)
    tls = TLS()
    direct, _, _, _, app, proxy = _direct(tls, conn)
    with app, proxy:
        app.send(b"\x17\x03\x03\x00\x20" + b"\0" * 32)
        direct.doRead()
        assert not direct.running
        [failure] = tls.events
        assert failure.check(Exception)
