"""Memory stays bounded when a slow async callback falls behind a flood.

A peer in a thread floods the connector with pre-encoded PUBLISH packets
through a blocking socket (its own memory is allocated up front and does
not grow); the callback sleeps on every message. The connector must stop
reading past `high_water` queued deliveries, so the flood backs up into the
kernel socket buffers and the sender blocks, instead of turning into
Python objects. Then the callback speeds up and every message must arrive,
in order: pausing loses nothing. The assertions are on bounds (queue depth,
RSS growth, bytes the sender could push), never on timing.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

import cascade_fast

pytestmark = pytest.mark.skipif(not cascade_fast.EXTENSIONS_LOADED, reason="compiled core not loaded (pure leg)")

psutil = pytest.importorskip("psutil")

from cascade_fast import _codec_py as wire  # noqa: E402
from flood_peer import handshake  # noqa: E402

MESSAGES = 150_000
HIGH_WATER = 1_000
LOW_WATER = 250
#: What the connector may hold beyond HIGH_WATER: the rest of the chunk being
#: decoded when the mark was crossed (uvloop reads at most 256 KiB at once,
#: ~1,100 of these packets).
CHUNK_SLACK = 2_000


def _payload(i: int) -> bytes:
    return b'{"seq":%d,"pad":"%s"}' % (i, b"x" * 180)


class _FloodPeer(threading.Thread):
    """Accepts one client, answers CONNECT/SUBSCRIBE, then sendall()s the whole flood."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.blob = b"".join(wire.encode_publish(f"flood/{i % 7}", _payload(i)) for i in range(MESSAGES))
        self.sent = 0
        self.finished = threading.Event()
        self.conn: socket.socket | None = None

    def run(self) -> None:
        conn, _ = self.listener.accept()
        self.conn = conn
        decoder = wire.Decoder()
        if not handshake(conn, decoder, granted_qos=0):
            return
        view = memoryview(self.blob)
        try:
            while self.sent < len(view):
                self.sent += conn.send(view[self.sent : self.sent + 65536])
        except OSError:
            return
        self.finished.set()
        # Acknowledge the OFFLINE presence disconnect() publishes, until the client closes.
        try:
            while data := conn.recv(65536):
                for packet in decoder.feed(data):
                    if packet.type == "PUBLISH" and packet.qos == 1:
                        conn.sendall(wire.encode_puback(packet.packet_id))
        except OSError:
            pass

    def close(self) -> None:
        for sock in (self.conn, self.listener):
            if sock is not None:
                sock.close()


@pytest.mark.parametrize("read_coalesce", [0.0, 0.001], ids=["no-coalescing", "read-coalescing"])
async def test_slow_async_callback_pauses_reading_and_memory_stays_flat(read_coalesce):
    """A flood into a slow coroutine callback: queue depth and RSS stay bounded, reading pauses, nothing is lost."""
    await _slow_callback_flood(read_coalesce)


def test_slow_async_callback_flood_on_uvloop():
    """The same flood on uvloop, whose pause_reading/resume_reading are its own."""
    uvloop = pytest.importorskip("uvloop")
    uvloop.run(_slow_callback_flood(0.001))


async def _slow_callback_flood(read_coalesce: float) -> None:
    from cascade_fast.connector import FastMqttConnector

    peer = _FloodPeer()
    peer.start()
    process = psutil.Process()
    conn = FastMqttConnector(
        "127.0.0.1", peer.port, keepalive=0, high_water=HIGH_WATER, low_water=LOW_WATER, read_coalesce=read_coalesce
    )
    seqs: list[int] = []
    slow = True
    max_depth = 0

    async def on_message(topic, data):
        nonlocal max_depth
        seqs.append(data["seq"])
        max_depth = max(max_depth, conn.stats()["queue_depth"])
        if slow:
            await asyncio.sleep(0.001)

    try:
        await conn.connect()
        rss_before = process.memory_info().rss
        await conn.subscribe("flood/#", on_message, qos=0)
        # Slow phase: ~1,000 messages/s at best, against a sender that could push 150k at once.
        for _ in range(30):
            await asyncio.sleep(0.05)
        stats = conn.stats()
        rss_slow = process.memory_info().rss
        assert stats["pauses"] >= 1 and stats["paused"] == 1, stats
        assert max_depth <= HIGH_WATER + CHUNK_SLACK, max_depth
        assert not peer.finished.is_set(), "the sender was never blocked: nothing pushed back"
        assert peer.sent < len(peer.blob) // 2, (peer.sent, len(peer.blob))
        # Without backpressure the unread half of the flood alone would be ~40 MB of Python objects.
        assert rss_slow - rss_before < 25 * 2**20, (rss_before, rss_slow)

        # Fast phase: everything arrives, in order, and reading resumes.
        slow = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while len(seqs) < MESSAGES and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert seqs == list(range(MESSAGES))
        final = conn.stats()
        assert final["paused"] == 0 and final["queue_depth"] == 0
        assert final["received"] == MESSAGES and final["dispatched"] == MESSAGES
    finally:
        await asyncio.wait_for(conn.disconnect(), 10)
        peer.close()
        peer.join(5)


class _StallingPeer(threading.Thread):
    """Answers CONNECT and the birth, then stops reading until `resume` is set, then drains."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.resume = threading.Event()
        self.received = 0
        self.conn: socket.socket | None = None

    def run(self) -> None:
        conn, _ = self.listener.accept()
        self.conn = conn
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        decoder = wire.Decoder()
        birth_acked = False
        while not birth_acked:
            data = conn.recv(4096)
            if not data:
                return
            for packet in decoder.feed(data):
                if packet.type == "CONNECT":
                    conn.sendall(wire.encode_connack(False, 0))
                elif packet.type == "PUBLISH" and packet.qos == 1:
                    conn.sendall(wire.encode_puback(packet.packet_id))
                    birth_acked = True
        self.resume.wait(30)
        try:
            while data := conn.recv(1 << 20):
                self.received += len(data)
                for packet in decoder.feed(data):
                    if packet.type == "PUBLISH" and packet.qos == 1:  # disconnect()'s OFFLINE
                        conn.sendall(wire.encode_puback(packet.packet_id))
        except OSError:
            pass

    def close(self) -> None:
        for sock in (self.conn, self.listener):
            if sock is not None:
                sock.close()


async def test_publishes_wait_while_the_peer_does_not_read():
    """QoS 0 publishes into a stalled socket wait past write_buffer_limit (none dropped); they resume when it drains."""
    await _stalled_publisher()


def test_publishes_wait_while_the_peer_does_not_read_on_uvloop():
    """The same stalled peer on uvloop, whose write buffer and pause_writing are its own."""
    uvloop = pytest.importorskip("uvloop")
    uvloop.run(_stalled_publisher())


async def _stalled_publisher() -> None:
    from cascade_fast.connector import FastMqttConnector

    peer = _StallingPeer()
    peer.start()
    limit = 256 * 1024
    conn = FastMqttConnector("127.0.0.1", peer.port, keepalive=0, write_buffer_limit=limit)
    payload = {"pad": "x" * 1000}
    total = 20_000  # ~20 MB: far more than the socket buffers and the limit hold
    done = 0

    async def producer():
        nonlocal done
        for _ in range(total):
            await conn.publish("stall/x", payload)
            done += 1

    try:
        await conn.connect()
        task = asyncio.ensure_future(producer())
        for _ in range(20):
            await asyncio.sleep(0.05)
        assert not task.done()
        stats = conn.stats()
        assert stats["write_paused"] == 1, stats
        assert done < total // 2, done
        pending = conn._session.protocol.write_pending
        assert pending <= limit + 2 * 65536, pending  # the limit plus at most one batch in flight
        assert stats["dropped"] == 0 and stats["publish_errors"] == 0
        peer.resume.set()
        await asyncio.wait_for(task, 60)
        await conn.flush(timeout=30)
        assert conn.stats()["published"] == total  # presence is not counted
    finally:
        peer.resume.set()
        await asyncio.wait_for(conn.disconnect(), 10)
        peer.close()
        peer.join(5)
