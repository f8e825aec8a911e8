"""Protocol duties of FastMqttConnector that need a peer which misbehaves on cue.

MQTT 3.1.1 rules checked here (each against `ScriptedPeer`, a loopback
server defined below that records what the client sends, decoded by the
pure-Python codec twin): inbound QoS 1/2 acknowledgements and exactly-once
QoS 2 delivery (§4.3.3), DUP re-sends after reconnect with a persistent
session (§4.4), the in-flight window, keepalive and dead-peer detection
(§3.1.2.10), CONNACK refusals (§3.2.2.3), malformed input, and the
dispatcher's eager coroutine stepping and ordering.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import warnings
from typing import Any, Callable

import pytest

import cascade_fast

pytestmark = pytest.mark.skipif(not cascade_fast.EXTENSIONS_LOADED, reason="compiled core not loaded (pure leg)")

from cascade_fast import _codec_py as wire  # noqa: E402
from cascade_fast._errors import ConnectRefusedError  # noqa: E402


def _connector(peer: "ScriptedPeer", **kwargs: Any):
    from cascade_fast.connector import FastMqttConnector

    return FastMqttConnector(**peer.kwargs(**kwargs))


async def _eventually(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s")
        await asyncio.sleep(0.005)


def _publish(topic: str, payload: bytes, qos: int = 0, packet_id: int | None = None, dup: bool = False) -> bytes:
    return wire.encode_publish(topic, payload, qos, False, dup, packet_id)


class ScriptedPeer:
    """``async with ScriptedPeer() as peer:`` listens on 127.0.0.1:`peer.port`."""

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        connack_code: int = 0,
        session_present: bool = False,
        ack_publish: bool = True,
        answer_ping: bool = True,
    ) -> None:
        self.connack_code = connack_code
        self.session_present = session_present
        self.ack_publish = ack_publish
        self.answer_ping = answer_ping
        #: Every packet received from the client, over all connections, in order.
        self.packets: list[Any] = []
        #: Connections accepted so far.
        self.connections = 0
        self._writer: asyncio.StreamWriter | None = None
        self._server: asyncio.AbstractServer | None = None
        self._changed = asyncio.Event()
        self.port = 0

    async def __aenter__(self) -> ScriptedPeer:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.drop()
        self._server.close()
        await self._server.wait_closed()

    def kwargs(self, **extra: Any) -> dict[str, Any]:
        """Connector keyword arguments for this peer (fast reconnects)."""
        return {"hostname": self.host, "port": self.port, "reconnect_delay": 0.05, "max_reconnect_delay": 0.2, **extra}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writer = writer
        decoder = wire.Decoder()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                for packet in decoder.feed(data):
                    self.packets.append(packet)
                    reply = self._answer(packet)
                    if reply:
                        writer.write(reply)
                self._changed.set()
        except (ConnectionError, wire.ProtocolError):
            pass
        finally:
            writer.close()
            self._changed.set()

    def _answer(self, packet: Any) -> bytes | None:
        kind = packet.type
        if kind == "CONNECT":
            return wire.encode_connack(self.session_present and not self.connack_code, self.connack_code)
        if kind == "SUBSCRIBE":
            return wire.encode_suback(packet.packet_id, [qos for _, qos in packet.topics])
        if kind == "UNSUBSCRIBE":
            return wire.encode_unsuback(packet.packet_id)
        if kind == "PINGREQ":
            return wire.encode_pingresp() if self.answer_ping else None
        if kind == "PUBLISH" and self.ack_publish:
            if packet.qos == 1:
                return wire.encode_puback(packet.packet_id)
            if packet.qos == 2:
                return wire.encode_pubrec(packet.packet_id)
        if kind == "PUBREL" and self.ack_publish:
            return wire.encode_pubcomp(packet.packet_id)
        return None

    def send(self, data: bytes) -> None:
        """Write raw bytes to the client on the current connection."""
        assert self._writer is not None, "no client connected"
        self._writer.write(data)

    def drop(self) -> None:
        """Cut the current connection (no DISCONNECT: an abrupt loss)."""
        if self._writer is not None:
            self._writer.transport.abort()
            self._writer = None

    async def wait_for(self, predicate: Callable[[Any], bool], *, count: int = 1, timeout: float = 5.0) -> list[Any]:
        """Wait until `count` received packets satisfy `predicate`; return them."""

        async def until() -> list[Any]:
            while True:
                found = [p for p in self.packets if predicate(p)]
                if len(found) >= count:
                    return found
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(until(), timeout)

    async def wait_connections(self, count: int, timeout: float = 5.0) -> None:
        """Wait until `count` connections were accepted and each sent CONNECT."""
        await self.wait_for(lambda p: p.type == "CONNECT", count=count, timeout=timeout)

    def of_type(self, kind: str) -> list[Any]:
        return [p for p in self.packets if p.type == kind]


@pytest.fixture
async def peer():
    """A scripted MQTT peer on a free loopback port."""
    async with ScriptedPeer() as server:
        yield server


@pytest.fixture
async def connected(peer):
    """A FastMqttConnector connected to `peer` (disconnected at teardown)."""
    conn = _connector(peer, keepalive=30)
    await conn.connect()
    yield conn
    await asyncio.wait_for(conn.disconnect(), 10)


# -- handshake ------------------------------------------------------------------------


async def test_connect_sends_will_and_birth(peer, connected):
    """CONNECT carries the OFFLINE Last Will (QoS 1, retained); ONLINE is published retained after CONNACK."""
    connect = peer.of_type("CONNECT")[0]
    status = f"cascade/status/{connected.source_id}"
    assert (connect.will_topic, connect.will_payload, connect.will_qos, connect.will_retain) == (
        status,
        b'{"status":"offline"}',
        1,
        True,
    )
    assert connect.client_id == connected.client_id and connect.clean_session
    [birth] = await peer.wait_for(lambda p: p.type == "PUBLISH" and p.topic == status)
    assert (birth.payload, birth.qos, birth.retain) == (b'{"status":"online"}', 1, True)


@pytest.mark.parametrize("code", [1, 2, 3, 4, 5])
async def test_refused_connack_raises_connect_refused(code):
    """A non-zero CONNACK return code is ConnectRefusedError(return_code) at connect() (§3.2.2.3)."""
    async with ScriptedPeer(connack_code=code) as peer:
        conn = _connector(peer)
        with pytest.raises(ConnectRefusedError) as excinfo:
            await conn.connect()
        assert excinfo.value.return_code == code
        assert conn.stats()["connected"] == 0
        await conn.disconnect()


# -- inbound QoS ---------------------------------------------------------------------


async def test_inbound_qos1_is_acknowledged_and_delivered(peer, connected):
    """A QoS 1 PUBLISH gets a PUBACK with its packet id and is delivered once."""
    got = []
    await connected.subscribe("q/#", lambda t, d: got.append(d))
    peer.send(_publish("q/1", b'{"n":1}', qos=1, packet_id=41))
    [ack] = await peer.wait_for(lambda p: p.type == "PUBACK")
    assert ack.packet_id == 41
    await _eventually(lambda: got == [{"n": 1}])


async def test_inbound_qos2_is_delivered_exactly_once(peer, connected):
    """A re-sent QoS 2 PUBLISH (DUP) before PUBREL is acknowledged again but not delivered again (§4.3.3)."""
    got = []
    await connected.subscribe("q/#", lambda t, d: got.append(d))
    peer.send(_publish("q/2", b'{"n":2}', qos=2, packet_id=7))
    peer.send(_publish("q/2", b'{"n":2}', qos=2, packet_id=7, dup=True))
    recs = await peer.wait_for(lambda p: p.type == "PUBREC", count=2)
    assert [r.packet_id for r in recs] == [7, 7]
    assert got == [{"n": 2}]
    peer.send(wire.encode_pubrel(7))
    [comp] = await peer.wait_for(lambda p: p.type == "PUBCOMP")
    assert comp.packet_id == 7
    # After PUBREL the id is free: the same id now carries a new message.
    peer.send(_publish("q/2", b'{"n":3}', qos=2, packet_id=7))
    await _eventually(lambda: got == [{"n": 2}, {"n": 3}])
    assert connected.stats()["received"] == 2


# -- outbound QoS --------------------------------------------------------------------


async def test_inflight_window_holds_publishes_until_acknowledged():
    """With max_inflight=2 and no PUBACKs, the third QoS 1 publish waits; an ack lets it go."""
    async with ScriptedPeer(ack_publish=False) as peer:
        conn = _connector(peer, max_inflight=2)
        await conn.connect()  # the birth takes one slot
        await conn.publish("w/1", {"n": 1}, qos=1)
        third = asyncio.ensure_future(conn.publish("w/2", {"n": 2}, qos=1))
        await asyncio.sleep(0.1)
        assert not third.done()
        assert conn.stats()["backlog"] == 1
        sent = await peer.wait_for(lambda p: p.type == "PUBLISH" and p.qos == 1, count=2)
        peer.send(wire.encode_puback(sent[0].packet_id))
        await asyncio.wait_for(third, 5)
        [held] = await peer.wait_for(lambda p: p.type == "PUBLISH" and p.topic == "w/2")
        assert held.packet_id not in {p.packet_id for p in sent[1:]}
        with pytest.raises(TimeoutError):
            await conn.flush(timeout=0.1)
        peer.ack_publish = True
        for p in peer.of_type("PUBLISH")[1:]:
            peer.send(wire.encode_puback(p.packet_id))
        await conn.flush(timeout=5)
        assert conn.stats()["inflight"] == 0
        peer.send(b"")  # keep the writer referenced until here
        conn_stats = conn.stats()
        # The birth took a slot but is presence, not one of the caller's publishes.
        assert conn_stats["published"] == 2 and conn_stats["publish_errors"] == 0
        await asyncio.wait_for(conn.disconnect(), 10)


async def test_persistent_session_resends_unacknowledged_with_dup():
    """clean_session=False: after a reconnect, unacked QoS 1 PUBLISH is re-sent with DUP=1, QoS 2 PUBREL re-sent (§4.4)."""
    async with ScriptedPeer(ack_publish=False) as peer:
        conn = _connector(peer, clean_session=False, client_id="persistent-test")
        await conn.connect()
        await conn.publish("r/1", {"n": 1}, qos=1)
        await conn.publish("r/2", {"n": 2}, qos=2)
        first = await peer.wait_for(lambda p: p.type == "PUBLISH" and p.topic.startswith("r/"), count=2)
        ids = {p.topic: p.packet_id for p in first}
        assert not any(p.dup for p in first)
        # The QoS 2 one gets as far as PUBREC -> PUBREL.
        peer.send(wire.encode_pubrec(ids["r/2"]))
        await peer.wait_for(lambda p: p.type == "PUBREL")
        peer.drop()
        await peer.wait_connections(2)
        resent = await peer.wait_for(lambda p: p.type == "PUBLISH" and p.topic == "r/1", count=2)
        assert resent[1].dup and resent[1].packet_id == ids["r/1"]
        rels = await peer.wait_for(lambda p: p.type == "PUBREL", count=2)
        assert rels[1].packet_id == ids["r/2"]
        assert not [p for p in peer.packets if p.type == "PUBLISH" and p.topic == "r/2" and p.dup]
        assert conn.stats()["reconnects"] == 1 and conn.stats()["resent"] == 3  # r/1, birth, PUBREL r/2
        peer.ack_publish = True
        for p in peer.of_type("PUBLISH"):
            if p.qos == 1:
                peer.send(wire.encode_puback(p.packet_id))
        peer.send(wire.encode_pubcomp(ids["r/2"]))
        await conn.flush(timeout=5)
        await asyncio.wait_for(conn.disconnect(), 10)


async def test_clean_session_resends_unacknowledged_after_the_reconnect():
    """clean_session=True: QoS 1 publishes lost with the connection unacknowledged are sent again (DUP=1), as paho does."""
    async with ScriptedPeer(ack_publish=False) as peer:
        conn = _connector(peer)
        await conn.connect()
        await conn.publish("c/1", {"n": 1}, qos=1)
        await peer.wait_for(lambda p: p.type == "PUBLISH" and p.topic == "c/1")
        with pytest.raises(TimeoutError, match="2 publishes not acknowledged"):  # c/1 and the birth
            await conn.flush(timeout=0.1)
        peer.drop()
        await peer.wait_connections(2)
        await _eventually(lambda: conn.stats()["connected"] == 1)
        [first, again] = await peer.wait_for(lambda p: p.type == "PUBLISH" and p.topic == "c/1", count=2)
        assert again.dup and not first.dup
        assert conn.stats()["publish_errors"] == 0 and conn.stats()["dropped"] == 0
        for p in peer.of_type("PUBLISH"):
            peer.send(wire.encode_puback(p.packet_id))
        peer.ack_publish = True
        await conn.flush(timeout=5)
        assert conn.stats()["queued"] == 0
        await asyncio.wait_for(conn.disconnect(), 10)


# -- keepalive and bad input ------------------------------------------------------------


async def test_unanswered_pingreq_closes_and_reconnects():
    """keepalive=1 and no PINGRESP: the connection is declared dead and re-established (§3.1.2.10)."""
    async with ScriptedPeer(answer_ping=False) as peer:
        conn = _connector(peer, keepalive=1)
        await conn.connect()
        await peer.wait_for(lambda p: p.type == "PINGREQ", timeout=3)
        await peer.wait_connections(2, timeout=6)
        await _eventually(lambda: conn.stats()["reconnects"] == 1)
        await asyncio.wait_for(conn.disconnect(), 10)


async def test_answered_pingreq_keeps_the_connection(peer):
    """With PINGRESPs coming, an idle keepalive=1 connection stays up."""
    conn = _connector(peer, keepalive=1)
    await conn.connect()
    await peer.wait_for(lambda p: p.type == "PINGREQ", count=2, timeout=5)
    assert peer.connections == 1 and conn.stats()["reconnects"] == 0
    await asyncio.wait_for(conn.disconnect(), 10)


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\x00\x00", id="reserved-type-0"),
        pytest.param(b"\x32\x80\x80\x80\x80\x01", id="5-byte-remaining-length"),
        pytest.param(b"\x36\x05\x00\x01a\x00\x01", id="qos-3"),
        pytest.param(b"\x20\x02\x00\x00", id="second-connack"),
        pytest.param(b"\x82\x05\x00\x01\x00\x01a", id="subscribe-from-server"),
    ],
)
async def test_malformed_input_closes_counts_and_reconnects(peer, connected, garbage):
    """Bad bytes from the broker: connection closed, protocol_errors += 1, reconnected; nothing reaches the loop."""
    loop = asyncio.get_running_loop()
    errors = []
    loop.set_exception_handler(lambda lp, ctx: errors.append(ctx))
    try:
        peer.send(garbage)
        await peer.wait_connections(2)
        await _eventually(lambda: connected.stats()["reconnects"] == 1)
        assert connected.stats()["protocol_errors"] == 1
        assert errors == []
    finally:
        loop.set_exception_handler(None)


async def test_publish_before_connack_is_a_protocol_error():
    """A PUBLISH ahead of CONNACK violates §3.2: connect() fails, the loop sees no exception."""

    async def serve(reader, writer):
        await reader.read(1024)
        writer.write(_publish("x", b"{}") + wire.encode_connack(False, 0))
        await reader.read(1024)  # until the client closes
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    from cascade_fast.connector import FastMqttConnector

    conn = FastMqttConnector("127.0.0.1", port, connect_timeout=2)
    with pytest.raises(ConnectionError):
        await conn.connect()
    assert conn.stats()["protocol_errors"] == 1
    server.close()
    await server.wait_closed()


# -- dispatch ---------------------------------------------------------------------------


async def test_coroutine_callback_that_does_not_suspend_runs_inline(peer, connected):
    """An async callback that never awaits anything finishes inside data_received: no task is kept."""
    seen = []
    tasks_during = []

    async def record(topic, data):
        seen.append(data["n"])
        tasks_during.append(connected._dispatcher.task)

    await connected.subscribe("d/#", record)
    peer.send(b"".join(_publish("d/x", b'{"n":%d}' % i) for i in range(50)))
    await _eventually(lambda: len(seen) == 50)
    assert seen == list(range(50))
    assert tasks_during == [None] * 50
    assert connected.stats()["dispatched"] == 50 and connected.stats()["queue_depth"] == 0


async def test_strict_order_with_suspending_coroutines(peer, connected):
    """Every callback for message N finishes before any callback for message N+1 starts, across suspensions."""
    log = []

    async def slow(topic, data):
        log.append(("slow-start", data["n"]))
        if data["n"] % 2 == 0:
            await asyncio.sleep(0.002)
        log.append(("slow-end", data["n"]))

    def plain(topic, data):
        log.append(("plain", data["n"]))

    async def tail(topic, data):
        log.append(("tail", data["n"]))

    await connected.subscribe("o/#", slow)
    await connected.subscribe("o/#", plain)
    await connected.subscribe("o/+", tail)
    peer.send(b"".join(_publish("o/x", b'{"n":%d}' % i) for i in range(20)))
    await _eventually(lambda: len(log) == 80)
    expected = []
    for i in range(20):
        expected += [("slow-start", i), ("slow-end", i), ("plain", i), ("tail", i)]
    assert log == expected
    await _eventually(lambda: connected.stats()["queue_depth"] == 0 and connected._dispatcher.task is None)
    assert connected.stats()["dispatched"] == 60


async def test_suspended_coroutine_gets_the_awaited_result_and_exception(peer, connected):
    """The future a callback suspended on is honoured: its result and its exception reach the coroutine."""
    loop = asyncio.get_running_loop()
    futures = [loop.create_future(), loop.create_future()]
    outcomes = []

    async def waiter(topic, data):
        try:
            outcomes.append(await futures[data["n"]])
        except KeyError as exc:
            outcomes.append(f"caught {exc!r}")
        outcomes.append(asyncio.current_task() is not None)

    await connected.subscribe("f/#", waiter)
    peer.send(_publish("f/x", b'{"n":0}') + _publish("f/x", b'{"n":1}'))
    await _eventually(lambda: connected.stats()["received"] == 2)
    await asyncio.sleep(0.01)
    assert outcomes == [] and connected.stats()["queue_depth"] == 1
    futures[0].set_result(42)
    await _eventually(lambda: len(outcomes) == 2)
    assert outcomes == [42, True]
    futures[1].set_exception(KeyError("k"))
    await _eventually(lambda: len(outcomes) == 4)
    assert outcomes[2:] == ["caught KeyError('k')", True]
    assert connected.stats()["callback_errors"] == 0


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager task start is Python 3.12+ (see FastMqttConnector docs)")
async def test_first_step_of_a_coroutine_callback_runs_in_a_task(peer, connected):
    """On 3.12+ the eagerly started callback is a task from its first line: asyncio.timeout() works there."""
    results = []

    async def timed(topic, data):
        async with asyncio.timeout(5):
            results.append(asyncio.current_task() is not None)
            if data["n"]:
                await asyncio.sleep(0.001)
        results.append(data["n"])

    await connected.subscribe("t/#", timed)
    peer.send(_publish("t/x", b'{"n":0}') + _publish("t/x", b'{"n":1}'))
    await _eventually(lambda: len(results) == 4)
    assert results == [True, 0, True, 1]
    assert connected.stats()["callback_errors"] == 0


async def test_callback_errors_are_counted_and_do_not_stop_delivery(peer, connected, caplog):
    """A raising callback (plain or async, before or after suspending) is counted; the others still run."""
    got = []

    def bad_plain(topic, data):
        raise RuntimeError("plain boom")

    async def bad_async(topic, data):
        if data["n"] == 1:
            await asyncio.sleep(0)
        raise RuntimeError("async boom")

    await connected.subscribe("e/#", bad_plain)
    await connected.subscribe("e/#", bad_async)
    await connected.subscribe("e/#", lambda t, d: got.append(d["n"]))
    with caplog.at_level(logging.ERROR, logger="cascade.connectors.mqtt"):
        peer.send(b"".join(_publish("e/x", b'{"n":%d}' % i) for i in range(3)))
        await _eventually(lambda: got == [0, 1, 2])
    stats = connected.stats()
    assert stats["callback_errors"] == 6 and stats["dispatched"] == 3
    assert "boom" in caplog.text


async def test_raw_and_json_subscribers_and_bad_json(peer, connected):
    """raw=True gets bytes; bad JSON is a decode error for JSON subscribers only; empty payload is {}."""
    raw, parsed = [], []
    await connected.subscribe("j/#", lambda t, d: raw.append(d), raw=True)
    await connected.subscribe("j/#", lambda t, d: parsed.append(d))
    peer.send(_publish("j/a", b"not json") + _publish("j/b", b"") + _publish("j/c", b"[1]"))
    await _eventually(lambda: len(raw) == 3)
    assert raw == [b"not json", b"", b"[1]"]
    assert parsed == [{}, [1]]
    assert connected.stats()["decode_errors"] == 1


async def test_unsubscribe_stops_queued_deliveries_at_once(peer, connected):
    """Deliveries already queued behind a suspended callback skip a callback unsubscribed meanwhile."""
    gate = asyncio.get_running_loop().create_future()
    later = []

    async def blocker(topic, data):
        if data["n"] == 0:
            await gate

    await connected.subscribe("u/#", blocker)
    handle = await connected.subscribe("u/#", lambda t, d: later.append(d["n"]))
    peer.send(b"".join(_publish("u/x", b'{"n":%d}' % i) for i in range(5)))
    await _eventually(lambda: connected.stats()["queue_depth"] == 5)
    await handle.unsubscribe()
    gate.set_result(None)
    await _eventually(lambda: connected.stats()["queue_depth"] == 0 and connected._dispatcher.task is None)
    assert later == []


async def test_disconnect_cancels_a_suspended_callback(peer):
    """disconnect() cancels the dispatcher task; queued deliveries are counted as undelivered; no task is left."""
    conn = _connector(peer)
    await conn.connect()
    cancelled = []

    async def forever(topic, data):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(data["n"])
            raise

    await conn.subscribe("z/#", forever)
    peer.send(b"".join(_publish("z/x", b'{"n":%d}' % i) for i in range(3)))
    await _eventually(lambda: conn.stats()["queue_depth"] == 2)
    await asyncio.wait_for(conn.disconnect(), 10)
    assert cancelled == [0]
    assert conn.stats()["undelivered"] == 2
    assert conn._dispatcher.task is None
    current = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t is not current and not t.done()] == []


async def test_read_coalescing_gathers_small_writes_into_few_reads(peer):
    """read_coalesce: PUBLISHes written one by one arrive in a few reads, all of them, in order."""
    conn = _connector(peer, read_coalesce=0.05)
    await conn.connect()
    got = []
    await conn.subscribe("rc/#", lambda t, d: got.append(d["n"]))
    await asyncio.sleep(0.1)  # let the handshake's reads settle
    before = conn.stats()["reads"]
    for i in range(20):
        peer.send(_publish("rc/x", b'{"n":%d}' % i))
        await asyncio.sleep(0.001)  # each its own TCP segment
    await _eventually(lambda: len(got) == 20)
    assert got == list(range(20))
    assert conn.stats()["reads"] - before <= 6, conn.stats()["reads"] - before
    await asyncio.wait_for(conn.disconnect(), 10)


async def test_read_coalescing_never_holds_data_already_read(peer):
    """Coalescing only postpones the next read: a message is delivered by the read that brings it."""
    conn = _connector(peer, read_coalesce=2.0)
    await conn.connect()
    got = asyncio.get_running_loop().create_future()
    await conn.subscribe("iso/#", lambda t, d: got.done() or got.set_result(d))
    await asyncio.sleep(0.2)
    peer.send(_publish("iso/x", b'{"n":1}'))
    assert await asyncio.wait_for(got, 1.0) == {"n": 1}
    await asyncio.wait_for(conn.disconnect(), 10)


# -- publish path -------------------------------------------------------------------------


async def test_publish_many_sends_every_item_in_order(peer, connected):
    """publish_many encodes a QoS 0 batch in one call; the peer receives every item, in order."""
    await connected.publish_many([(f"m/{i}", {"i": i}) for i in range(100)])
    got = await peer.wait_for(lambda p: p.type == "PUBLISH" and p.topic.startswith("m/"), count=100)
    assert [p.topic for p in got] == [f"m/{i}" for i in range(100)]
    assert wire.Decoder  # the peer decoded them with the pure twin
    assert connected.stats()["published"] == 100  # presence is not counted


async def test_publish_validates_before_anything_is_sent(peer, connected):
    """Bad topic, QoS or payload type raise at the call; a batch with one bad topic sends nothing."""
    with pytest.raises(ValueError, match="a/#"):
        await connected.publish("a/#", {})
    with pytest.raises(ValueError):
        await connected.publish("a/b", {}, qos=3)
    with pytest.raises(TypeError):
        await connected.publish("a/b", object())
    with pytest.raises(ValueError):
        await connected.publish_many([("ok/1", {}), ("bad/+", {})])
    await asyncio.sleep(0.05)
    assert not [p for p in peer.of_type("PUBLISH") if p.topic.startswith(("a/", "ok/"))]


async def test_publish_when_not_connected_is_dropped(peer, caplog):
    """Publishing before connect() never raises: dropped += 1 and a warning."""
    conn = _connector(peer)
    with caplog.at_level(logging.WARNING, logger="cascade.connectors.mqtt"):
        await conn.publish("x/y", {"a": 1})
        await conn.publish_many([("x/y", {}), ("x/z", {})])
    assert conn.stats()["dropped"] == 3
    assert "not connected" in caplog.text


def test_unknown_options_are_logged_once_and_ignored(caplog):
    """An option FastMqttConnector does not know is a single WARNING naming it, not an error."""
    from cascade_fast.connector import FastMqttConnector

    with caplog.at_level(logging.WARNING, logger="cascade.connectors.mqtt"):
        FastMqttConnector(transport="websockets", bogus=1, max_inflight=5)
    records = [r for r in caplog.records if "unknown options" in r.getMessage()]
    assert len(records) == 1
    assert "bogus" in records[0].getMessage() and "transport" in records[0].getMessage()
    assert "max_inflight" not in records[0].getMessage()


# -- lifecycle ------------------------------------------------------------------------------


async def test_garbage_collected_while_connected_warns(peer):
    """A connector dropped while connected is collectable and emits ResourceWarning; the broker sees the loss."""
    conn = _connector(peer)
    await conn.connect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del conn
        for _ in range(3):
            gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in caught), [str(w.message) for w in caught]
    # The connection was aborted (no DISCONNECT: the broker would send the Last Will).
    await asyncio.sleep(0.05)
    assert not peer.of_type("DISCONNECT")
    current = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t is not current and not t.done()] == []


async def test_disconnect_is_graceful_and_idempotent(peer):
    """disconnect(): OFFLINE retained QoS 1, then DISCONNECT; twice is fine; connect() works again."""
    conn = _connector(peer)
    await conn.connect()
    await conn.disconnect()
    await conn.disconnect()
    offline = [p for p in peer.of_type("PUBLISH") if p.payload == b'{"status":"offline"}']
    assert len(offline) == 1 and offline[0].retain and offline[0].qos == 1
    assert peer.packets[-1].type == "DISCONNECT"
    await conn.connect()
    assert conn.stats()["connected"] == 1
    await conn.disconnect()
    assert peer.connections == 2
