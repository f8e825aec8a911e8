"""Floods against the compiled core: memory, loop latency and read pauses stay bounded.

- A peer that floods packets we must answer (QoS 1/2 PUBLISH, PUBREL) while
  never reading our answers: we stop reading once our write side is paused,
  so the flood backs up into the kernel instead of our acknowledgements
  piling up in memory; reading resumes when the peer
  reads again, and every packet is answered.
- An inbound flood leaves the loop free for timers between bursts of reads
  (loose bound: the box is shared; benches/ carries the real figure).
- Idle connections hold a small read buffer, not the large one.
- Reasons to pause reading (backpressure, coalescing, write side full) do
  not resume each other.

The flooding peer (tests/flood_peer.py) runs in a process of its own, so
neither its memory nor its use of the GIL counts against the client.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

import cascade_fast

pytestmark = pytest.mark.skipif(not cascade_fast.EXTENSIONS_LOADED, reason="compiled core not loaded (pure leg)")

psutil = pytest.importorskip("psutil")

from test_fast_adversarial import _run, both_loops  # noqa: E402
from test_fast_protocol import ScriptedPeer, _connector, _eventually, _publish  # noqa: E402

#: The connector's default write_buffer_limit: the transport's high-water mark.
WRITE_LIMIT = 1 << 20

PEER = str(Path(__file__).with_name("flood_peer.py"))
CYCLES = 31
TOTAL = 65535 * CYCLES  # ~2M packets to answer


class _FloodPeer:
    """tests/flood_peer.py in its own process: ``async with _FloodPeer(kind) as peer``."""

    def __init__(self, kind: str, *, reads: bool) -> None:
        self.args = [kind, "--cycles", str(CYCLES), *(["--reads"] if reads else [])]
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0

    async def __aenter__(self) -> _FloodPeer:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, PEER, *self.args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        assert line.startswith(b"PORT "), line
        self.port = int(line.split()[1])
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    def start_reading(self) -> None:
        self.proc.stdin.write(b"read\n")

    async def all_answered(self, timeout: float) -> None:
        """Wait until the peer has read an answer to every packet of its flood."""
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        assert line == f"ANSWERED {TOTAL}\n".encode(), line


@both_loops
@pytest.mark.parametrize("kind", ["qos1-publish", "qos2-publish", "pubrel"])
def test_a_flood_whose_answers_are_never_read_stops_our_reading(loop_factory, kind):
    """~2M packets to answer, the peer reading none of the answers: write side paused, reading stops, the sender blocks; it reads again and every packet is answered."""

    async def scenario(errors: list) -> None:
        from cascade_fast.connector import FastMqttConnector

        received = 0

        def on_message(topic: str, data: Any) -> None:
            nonlocal received
            received += 1

        async with _FloodPeer(kind, reads=False) as peer:
            conn = FastMqttConnector("127.0.0.1", peer.port, keepalive=0, read_coalesce=0.0)
            process = psutil.Process()
            try:
                await conn.connect()
                rss_before = process.memory_info().rss
                await conn.subscribe("f/#", on_message, qos=1, raw=True)
                await _eventually(lambda: conn.stats()["write_paused"] == 1, 30, "write side paused")
                # Stopped reading, short of the end of the flood (the kernel takes
                # several MB of it, and of our answers, before the write side pauses).
                reads = -1
                while reads != conn.stats()["reads"]:
                    reads = conn.stats()["reads"]
                    await asyncio.sleep(0.3)
                proto = conn._protocol
                assert proto.read_pauses != 0 and conn.stats()["write_paused"] == 1
                if kind != "pubrel":
                    assert received < TOTAL, received
                # Unsent answers: at most the high-water mark plus one read's
                # answers and a write batch, not the flood's size.
                assert proto.write_pending < WRITE_LIMIT + 256 * 1024 + 65536, proto.write_pending
                assert process.memory_info().rss - rss_before < 32 * 2**20

                peer.start_reading()
                await peer.all_answered(60)
                await _eventually(lambda: conn.stats()["write_paused"] == 0 and proto.read_pauses == 0, 10, "reading again")
                if kind == "qos1-publish":
                    assert received == TOTAL
                elif kind == "qos2-publish":
                    assert received == 65535  # §4.3.3: a kept packet id is a duplicate
                assert conn.stats()["protocol_errors"] == 0
            finally:
                await conn.disconnect()

    _run(loop_factory, scenario)


def test_an_inbound_flood_leaves_the_loop_to_timers_between_reads():
    """uvloop reads up to 32 x 256 KiB per iteration: a PUBREL flood decoded inline must still let a 1 ms timer run (loose bound)."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        from cascade_fast.connector import FastMqttConnector

        worst = 0.0
        done = False

        async def probe() -> None:
            nonlocal worst
            while not done:
                start = time.perf_counter()
                await asyncio.sleep(0.001)
                worst = max(worst, time.perf_counter() - start - 0.001)

        async with _FloodPeer("pubrel", reads=True) as peer:
            conn = FastMqttConnector("127.0.0.1", peer.port, keepalive=0, read_coalesce=0.0)
            try:
                await conn.connect()
                task = asyncio.get_running_loop().create_task(probe())
                await conn.subscribe("f/#", lambda topic, data: None, qos=1)
                await peer.all_answered(60)
                done = True
                await task
            finally:
                await conn.disconnect()
        # Unbounded, one iteration decodes up to 32 reads of 256 KiB (~2M PUBRELs, seconds); bounded, a few ms.
        assert worst < 0.25, f"the loop stalled {worst * 1e3:.0f} ms"

    uvloop.run(scenario())


async def test_idle_connectors_hold_a_small_read_buffer(broker):
    """200 idle connections to one Mosquitto: at most 64 KB each in this process (allocator and RSS)."""
    from cascade_fast.connector import FastMqttConnector

    count = 200
    process = psutil.Process()
    gc.collect()
    tracemalloc.start()
    try:
        traced_before = tracemalloc.get_traced_memory()[0]
        rss_before = process.memory_info().rss
        conns = [FastMqttConnector(broker.host, broker.port, keepalive=60) for _ in range(count)]
        for i in range(0, count, 50):
            await asyncio.gather(*(c.connect() for c in conns[i : i + 50]))
        await asyncio.sleep(0.5)  # presence published and acknowledged: idle
        gc.collect()
        traced = (tracemalloc.get_traced_memory()[0] - traced_before) / count
        rss = (process.memory_info().rss - rss_before) / count
    finally:
        tracemalloc.stop()
    try:
        assert all(c.is_connected for c in conns)
        assert traced <= 64_000, f"{traced:.0f} bytes traced per idle connector"
        assert rss <= 64_000, f"{rss:.0f} bytes of RSS per idle connector"
    finally:
        await asyncio.gather(*(c.disconnect() for c in conns))


async def test_a_read_that_fills_the_small_buffer_switches_to_the_large_one_and_back():
    """A burst gets the large buffer (a read filled the 16 KiB one); it is freed once the flow stops."""
    async with ScriptedPeer() as peer:
        conn = _connector(peer, keepalive=0, read_coalesce=0.0)
        await conn.connect()
        got: list[str] = []
        await conn.subscribe("b/#", lambda topic, data: got.append(topic), raw=True)
        proto = conn._protocol
        assert len(proto.get_buffer(-1)) == 16 * 1024
        burst = b"".join(_publish(f"b/{i}", b"x" * 200) for i in range(5000))  # ~1 MiB in one write
        peer.send(burst)
        await _eventually(lambda: len(got) == 5000, timeout=10, what="the burst delivered")
        assert len(proto.get_buffer(-1)) > 16 * 1024  # sized to the read budget at this pace, up to 256 KiB
        await _eventually(lambda: len(proto.get_buffer(-1)) == 16 * 1024, timeout=10, what="the large buffer freed")
        peer.send(_publish("b/after", b"{}"))
        await _eventually(lambda: got[-1] == "b/after", what="delivery after the switch back")
        await conn.disconnect()


@both_loops
def test_one_pause_reason_never_resumes_reading_another_holds(loop_factory):
    """Backpressure holds reading through a coalescing timer; a full write side holds it past the end of backpressure."""

    async def scenario(errors: list) -> None:
        async with ScriptedPeer() as peer:
            conn = _connector(peer, keepalive=0, high_water=3, low_water=1, read_coalesce=0.01)
            await conn.connect()
            release = asyncio.Event()
            got: list[str] = []

            async def slow(topic: str, data: Any) -> None:
                got.append(topic)
                await release.wait()

            await conn.subscribe("p/#", slow, raw=True)
            proto = conn._protocol
            peer.send(b"".join(_publish(f"p/{i}", b"x") for i in range(6)))
            await _eventually(lambda: conn.stats()["paused"] == 1, what="backpressure pause")
            proto._coalesce_resume()  # the coalescing timer fires while backpressure holds reading
            await asyncio.sleep(0.05)  # and any real one too
            reads = conn.stats()["reads"]
            peer.send(_publish("p/early", b"x"))
            await asyncio.sleep(0.1)
            assert conn.stats()["reads"] == reads, "read while backpressure held reading"

            proto.pause_writing()  # the transport's write buffer is full
            release.set()
            await _eventually(lambda: conn.stats()["queue_depth"] == 0, what="queue drained")
            assert conn.stats()["paused"] == 0  # backpressure is over...
            await asyncio.sleep(0.1)
            assert conn.stats()["reads"] == reads, "read while the write side held reading"  # ...the write side is not
            assert proto.read_pauses != 0

            proto.resume_writing()
            assert proto.read_pauses == 0
            await _eventually(lambda: "p/early" in got, what="delivery after the write side resumed")
            assert got == [f"p/{i}" for i in range(6)] + ["p/early"]
            await conn.disconnect()

    _run(loop_factory, scenario)
