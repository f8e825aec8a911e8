"""Adversarial tests of the compiled core: callbacks that fight the dispatcher, hostile peers.

Each scenario is something a review of `cascade_fast/_protocol.pyx` found
worth proving: callbacks that unsubscribe, subscribe, publish, raise or
disconnect while the dispatcher iterates the topic trie's shared match list
(borrowed items, a length read before the loop), exceptions that must never
reach the event loop from ``data_received``, QoS 2 exactly-once across a
reconnect (MQTT 3.1.1 §4.3.3, §3.2.2.2), packet id wrap-around with ids still
in flight (§2.3.1), and malformed input. The callback scenarios run on the
default asyncio loop and on uvloop (their transports differ).
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any, Callable

import pytest

import cascade_fast

pytestmark = pytest.mark.skipif(not cascade_fast.EXTENSIONS_LOADED, reason="compiled core not loaded (pure leg)")

from cascade_fast import _codec_py as wire  # noqa: E402
from test_fast_protocol import ScriptedPeer, _connector, _eventually, _publish  # noqa: E402


def _loop_factories() -> list[Any]:
    factories = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return factories
    return [*factories, pytest.param(uvloop.new_event_loop, id="uvloop")]


both_loops = pytest.mark.parametrize("loop_factory", _loop_factories())


def _run(loop_factory: Callable[[], asyncio.AbstractEventLoop], scenario: Callable[[list], Any]) -> None:
    """Run `scenario(loop_errors)` on a fresh loop; fail if anything reached the loop's exception handler."""
    errors: list[dict] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        await scenario(errors)  # bounded by pytest-timeout; no wait_for task of its own

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())
    assert errors == [], errors


def _other_tasks() -> list[asyncio.Task]:
    current = asyncio.current_task()
    return [t for t in asyncio.all_tasks() if t is not current and not t.done()]


# -- callbacks that change the subscriptions while the dispatcher iterates ------------


@both_loops
def test_callback_unsubscribes_and_subscribes_while_the_match_list_is_iterated(loop_factory):
    """A callback drops half of 120 subscriptions and adds 40 mid-message: the dropped ones get nothing more at once, the new ones get every later message."""

    async def scenario(errors: list) -> None:
        async with ScriptedPeer() as peer:
            conn = _connector(peer, keepalive=30)
            await conn.connect()
            got: dict[str, list[int]] = {}
            handles: list[Any] = []
            added: list[Any] = []

            def recorder(name: str) -> Callable[[str, Any], None]:
                got[name] = []
                return lambda topic, data: got[name].append(data["n"])

            async def mutator(topic: str, data: Any) -> None:
                got.setdefault("mutator", []).append(data["n"])
                if data["n"] != 0:
                    return
                # Drop every odd subscription, most of them later in this very match list.
                for handle in handles[1::2]:
                    await handle.unsubscribe()
                gc.collect()  # the superseded match lists are garbage now; ours must still be alive
                for i in range(40):
                    added.append(await conn.subscribe("m/x", recorder(f"new{i}")))
                # A new filter waits for its SUBACK: the rest of this message is queued.
                added.append(await conn.subscribe("m/new/#", recorder("newfilter")))
                gc.collect()

            await conn.subscribe("m/#", mutator)
            for i in range(120):
                handles.append(await conn.subscribe(("m/#", "m/+", "m/x")[i % 3], recorder(f"h{i}")))
            peer.send(b"".join(_publish("m/x", b'{"n":%d}' % n) for n in range(10)))
            await _eventually(lambda: len(got.get("mutator", [])) == 10 and conn._dispatcher.task is None, what="delivery")
            await _eventually(lambda: len(got.get("h0", [])) == 10, what="delivery to h0")
            for i in range(120):
                assert got[f"h{i}"] == ([] if i % 2 else list(range(10))), i
            for i in range(40):
                assert got[f"new{i}"] == list(range(1, 10)), i
            assert got["newfilter"] == []
            assert conn.stats()["callback_errors"] == 0
            assert conn.stats()["reconnects"] == 0
            await conn.disconnect()
            assert _other_tasks() == []

    _run(loop_factory, scenario)


@both_loops
def test_callbacks_that_raise_publish_and_resubscribe_from_data_received(loop_factory):
    """Raising, re-entrant publishing and unsubscribe-then-resubscribe callbacks: every other callback gets every message, nothing reaches the loop."""

    async def scenario(errors: list) -> None:
        async with ScriptedPeer() as peer:
            conn = _connector(peer, keepalive=30)
            await conn.connect()
            seen: list[int] = []
            churned: list[int] = []
            box: dict[str, Any] = {}

            def boom(topic: str, data: Any) -> None:
                raise RuntimeError("callback failure")

            async def echo(topic: str, data: Any) -> None:
                await conn.publish("echo/out", data, qos=data["n"] % 2)

            async def churn(topic: str, data: Any) -> None:
                churned.append(data["n"])
                await box["handle"].unsubscribe()  # the filter's last handle: UNSUBSCRIBE, then SUBSCRIBE again
                box["handle"] = await conn.subscribe("c/+", churn)

            await conn.subscribe("c/#", boom)
            await conn.subscribe("c/#", echo)
            box["handle"] = await conn.subscribe("c/+", churn)
            await conn.subscribe("c/#", lambda t, d: seen.append(d["n"]))
            for n in range(50):
                peer.send(_publish("c/x", b'{"n":%d}' % n, qos=1, packet_id=n + 1))
            await _eventually(lambda: len(seen) == 50 and conn._dispatcher.task is None, what="delivery")
            assert seen == list(range(50))
            # The re-subscribed handle can only see messages matched after it was added again.
            assert churned and churned[0] == 0 and churned == sorted(churned)
            await peer.wait_for(lambda p: p.type == "PUBLISH" and p.topic == "echo/out", count=50)
            stats = conn.stats()
            assert stats["callback_errors"] == 50
            assert stats["reconnects"] == 0 and stats["protocol_errors"] == 0
            await conn.disconnect()
            assert _other_tasks() == []

    _run(loop_factory, scenario)


@both_loops
@pytest.mark.parametrize("kind", ["plain", "coroutine"])
def test_callback_raising_cancelled_error_is_a_callback_error(loop_factory, kind):
    """CancelledError (a BaseException) from a callback is counted like any callback error; it must not escape data_received and drop the connection."""

    async def scenario(errors: list) -> None:
        async with ScriptedPeer() as peer:
            conn = _connector(peer, keepalive=30)
            await conn.connect()
            seen: list[int] = []

            def plain(topic: str, data: Any) -> None:
                raise asyncio.CancelledError()

            async def coroutine(topic: str, data: Any) -> None:
                raise asyncio.CancelledError()

            await conn.subscribe("k/#", plain if kind == "plain" else coroutine)
            await conn.subscribe("k/#", lambda t, d: seen.append(d["n"]))
            peer.send(b"".join(_publish("k/x", b'{"n":%d}' % n) for n in range(5)))
            await _eventually(lambda: len(seen) == 5, what="delivery to the second callback")
            stats = conn.stats()
            assert stats["callback_errors"] == 5
            assert stats["reconnects"] == 0 and peer.connections == 1
            await conn.disconnect()

    _run(loop_factory, scenario)


@both_loops
def test_callback_that_disconnects_the_connector(loop_factory):
    """A coroutine callback awaiting disconnect(): clean shutdown, no reconnect, no task left, and connect() works again."""

    async def scenario(errors: list) -> None:
        async with ScriptedPeer() as peer:
            conn = _connector(peer, keepalive=30)
            await conn.connect()
            seen: list[int] = []
            done = asyncio.get_running_loop().create_future()

            async def stopper(topic: str, data: Any) -> None:
                if data["n"] == 0:
                    await conn.disconnect()
                    done.set_result(None)

            await conn.subscribe("d/#", stopper)
            await conn.subscribe("d/#", lambda t, d: seen.append(d["n"]))
            peer.send(b"".join(_publish("d/x", b'{"n":%d}' % n) for n in range(20)))
            await asyncio.wait_for(done, 10)
            await _eventually(lambda: conn._dispatcher.task is None, what="drain task end")
            await peer.wait_for(lambda p: p.type == "DISCONNECT")
            assert not conn.is_connected
            await asyncio.sleep(0.3)  # longer than the reconnect delay: nothing may reconnect
            assert peer.connections == 1
            assert _other_tasks() == []
            # Message 0's second callback ran at most once; later ones were discarded (counted).
            assert seen in ([], [0])
            await conn.connect()
            peer.send(_publish("d/x", b'{"n":99}'))
            await _eventually(lambda: 99 in seen, what="delivery after reconnect")
            await conn.disconnect()
            assert _other_tasks() == []

    _run(loop_factory, scenario)


# -- QoS 2 exactly-once across a reconnect (MQTT 3.1.1 §4.3.3, §3.2.2.2) --------------


@pytest.mark.parametrize("session_present", [True, False], ids=["session-kept", "session-lost"])
async def test_inbound_qos2_across_a_reconnect(session_present):
    """A QoS 2 PUBLISH re-sent after a reconnect is delivered once if the broker kept the session, and a new message reusing the id is delivered if it did not."""
    async with ScriptedPeer(session_present=session_present) as peer:
        conn = _connector(peer, keepalive=30, clean_session=False)
        await conn.connect()
        seen: list[int] = []
        await conn.subscribe("q/#", lambda t, d: seen.append(d["n"]), qos=2)
        peer.send(_publish("q/x", b'{"n":1}', qos=2, packet_id=7))
        await peer.wait_for(lambda p: p.type == "PUBREC" and p.packet_id == 7)
        peer.drop()  # lost before PUBREL: the client keeps id 7 (§4.3.3 method B)
        await peer.wait_connections(2)
        await _eventually(lambda: conn.is_connected, what="reconnect")
        await peer.wait_for(lambda p: p.type == "SUBSCRIBE", count=2)
        if session_present:
            # The broker re-sends the same message with DUP: acknowledged again, not delivered again.
            peer.send(_publish("q/x", b'{"n":1}', qos=2, packet_id=7, dup=True))
            await peer.wait_for(lambda p: p.type == "PUBREC" and p.packet_id == 7, count=2)
            peer.send(wire.encode_pubrel(7))
            await peer.wait_for(lambda p: p.type == "PUBCOMP" and p.packet_id == 7)
            peer.send(_publish("q/x", b'{"n":2}', qos=2, packet_id=7))
            await _eventually(lambda: seen == [1, 2], what="the next message on id 7")
        else:
            # No session at the broker (Session Present 0): id 7 is free again, a new message uses it.
            peer.send(_publish("q/x", b'{"n":2}', qos=2, packet_id=7))
            await _eventually(lambda: seen == [1, 2], what="the new message on id 7")
        assert conn.stats()["received"] == 2
        await conn.disconnect()


# -- packet ids (MQTT 3.1.1 §2.3.1) -----------------------------------------------------


class _Transport:
    """A transport that keeps what is written (the protocol unit tests need no socket)."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.out += data

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _protocol(loop: asyncio.AbstractEventLoop, trie: Any = None, **session: Any) -> tuple[Any, Any, _Transport]:
    """A connected `AsyncioMqttProtocol` over `_Transport` (CONNACK already fed), and its session."""
    import logging

    from cascade.connectors.mqtt._common import RateLimitedLog, encode_payload
    from cascade_fast._protocol import AsyncioMqttProtocol, Dispatcher, Session
    from cascade_fast._topics import TopicTrie
    from cascade_fast._topics_py import validate_topic

    log = logging.getLogger("cascade.connectors.mqtt")
    errlog = RateLimitedLog(log)
    options = {"max_inflight": 20, "clean_session": True, **session}
    sess = Session(validate_topic=validate_topic, encode_payload=encode_payload, errlog=errlog, logger=log, **options)
    sess.set_loop(loop)
    disp = Dispatcher(errlog, log)
    disp.set_loop(loop)
    proto = AsyncioMqttProtocol(
        loop, sess, disp, TopicTrie() if trie is None else trie, wire.encode_connect("c"),
        keepalive=0.0, write_batch=1, errlog=errlog, logger=log
    )
    transport = _Transport()
    proto.connection_made(transport)
    proto.data_received(wire.encode_connack(False, 0))
    assert proto.connected
    transport.out.clear()
    return proto, sess, transport


async def test_packet_ids_wrap_at_65535_and_skip_ids_still_awaiting_an_acknowledgement():
    """Past 65535 ids wrap to 1 (never 0) and skip the QoS 1/2 and SUBSCRIBE ids still unacknowledged."""
    from cascade_fast import codec

    proto, sess, transport = _protocol(asyncio.get_running_loop(), max_inflight=3)
    decoder = codec.Decoder()
    sess.publish("w/held", b"", 1)  # id 1, never acknowledged
    held_sub = proto.subscribe([("w/#", 1)])  # id 2, SUBACK never sent
    sess.publish("w/held2", b"", 2)  # id 3, PUBREC but never PUBCOMP
    proto.data_received(wire.encode_pubrec(3))
    (first, sub, second, rel) = decoder.feed(bytes(transport.out))
    assert (first.packet_id, sub.packet_id, second.packet_id, rel.type) == (1, 2, 3, "PUBREL")
    transport.out.clear()
    ids = []
    for _ in range(65535 + 10):
        assert sess.publish("w/x", b"", 1) is None  # the window has a free slot
        (packet,) = decoder.feed(bytes(transport.out))
        transport.out.clear()
        ids.append(packet.packet_id)
        proto.data_received(wire.encode_puback(packet.packet_id))
    assert 0 not in ids and {1, 2, 3}.isdisjoint(ids)
    assert ids[:2] == [4, 5] and ids[65531] == 65535 and ids[65532] == 4
    assert sess.inflight_count == 2 and not held_sub.done()


def _read(proto: Any, data: bytes) -> None:
    """Deliver `data` as a buffered transport does: into get_buffer(), then buffer_updated()."""
    view = proto.get_buffer(-1)
    view[: len(data)] = data
    proto.buffer_updated(len(data))


async def test_a_read_nested_in_a_read_never_overwrites_the_bytes_being_decoded():
    """asyncio's SSL transport may read again from inside a read (close() called by a callback).

    That read must not land in the buffer still being decoded, and its
    messages come after the ones already read, in arrival order.
    """
    from cascade_fast._protocol import Subscription
    from cascade_fast._topics import TopicTrie

    trie = TopicTrie()
    proto, sess, transport = _protocol(asyncio.get_running_loop(), trie=trie)
    got: list[tuple[str, object]] = []
    nested = [wire.encode_publish("n/2", b"second")]

    def callback(topic: str, data: object) -> None:
        got.append((topic, data))
        if nested:
            _read(proto, nested.pop())

    trie.add("n/#", Subscription(callback, None, True))
    _read(proto, wire.encode_publish("n/1", b"first") + wire.encode_publish("n/3", b"third"))

    assert got == [("n/1", b"first"), ("n/3", b"third"), ("n/2", b"second")]
    assert not transport.aborted and sess.protocol_errors == 0


# -- malformed or unexpected input from the broker -------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\x30\x05\x00\x02\xc3\x28x", id="publish-topic-invalid-utf8"),
        pytest.param(b"\x30\x05\x00\x02a\x00x", id="publish-topic-with-nul"),
        pytest.param(b"\x32\x05\x00\x01a\x00\x00", id="qos1-packet-id-0"),
        # Only a non-PUBLISH over the limit is malformed (an oversized PUBLISH is skipped).
        pytest.param(b"\x90\xff\xff\xff\x7f", id="remaining-length-over-max-packet-size"),
        pytest.param(b"\x40\x03\x00\x01\x00", id="puback-wrong-length"),
        pytest.param(b"\x90\x03\x00\x01\x03", id="suback-reserved-code"),
        pytest.param(b"\xde\xad\xbe\xef" * 64, id="random-garbage"),
    ],
)
@both_loops
def test_malformed_packets_close_count_log_and_reconnect(loop_factory, garbage, caplog):
    """Each malformed packet after CONNACK: closed, one protocol error counted and logged, reconnected; the loop sees nothing."""

    async def scenario(errors: list) -> None:
        async with ScriptedPeer() as peer:
            conn = _connector(peer, keepalive=30, max_packet_size=1 << 20)
            await conn.connect()
            seen: list[Any] = []
            await conn.subscribe("#", lambda t, d: seen.append(t))
            peer.send(garbage)
            await peer.wait_connections(2)
            await _eventually(lambda: conn.stats()["reconnects"] == 1 and conn.is_connected, what="reconnect")
            assert conn.stats()["protocol_errors"] == 1
            assert seen == []
            assert any("protocol error" in r.getMessage() for r in caplog.records)
            peer.send(_publish("ok/after", b"{}"))
            await _eventually(lambda: seen == ["ok/after"], what="delivery after the reconnect")
            await conn.disconnect()

    _run(loop_factory, scenario)


@pytest.mark.parametrize(
    "stray",
    [
        pytest.param(wire.encode_puback(4242), id="puback-unknown-id"),
        pytest.param(wire.encode_pubrec(4242), id="pubrec-unknown-id"),
        pytest.param(wire.encode_pubcomp(4242), id="pubcomp-unknown-id"),
        pytest.param(wire.encode_suback(4242, [1]), id="suback-unknown-id"),
        pytest.param(wire.encode_unsuback(4242), id="unsuback-unknown-id"),
        pytest.param(wire.encode_pubrel(4242), id="pubrel-unknown-id"),
    ],
)
@both_loops
def test_acknowledgements_for_unknown_ids_are_ignored(loop_factory, stray):
    """A well-formed acknowledgement for an id we do not await (a re-sent or forgotten one) is no protocol error, as in paho."""
    _run(loop_factory, lambda errors: _stray_scenario(stray))


async def _stray_scenario(stray: bytes) -> None:
    """Send `stray` then a PUBLISH: the PUBLISH is delivered on the same connection."""
    async with ScriptedPeer() as peer:
        conn = _connector(peer, keepalive=30)
        await conn.connect()
        seen: list[Any] = []
        await conn.subscribe("s/#", lambda t, d: seen.append(d))
        peer.send(stray + _publish("s/x", b'{"n":1}'))
        await _eventually(lambda: seen == [{"n": 1}], what="delivery after the stray packet")
        stats = conn.stats()
        assert stats["protocol_errors"] == 0 and stats["reconnects"] == 0 and stats["inflight"] == 0
        if stray[0] >> 4 == 6:  # PUBREL: always answered, so the broker can drop its state (§4.3.3)
            await peer.wait_for(lambda p: p.type == "PUBCOMP" and p.packet_id == 4242)
        if stray[0] >> 4 == 5:  # PUBREC: released anyway (§4.3.3)
            await peer.wait_for(lambda p: p.type == "PUBREL" and p.packet_id == 4242)
        await conn.disconnect()


@both_loops
def test_callback_in_the_drain_task_that_disconnects_keeps_running(loop_factory):
    """A callback already inside the dispatcher task may await disconnect() and keep awaiting afterwards: its own task is not cancelled under it."""

    async def scenario(errors: list) -> None:
        async with ScriptedPeer() as peer:
            conn = _connector(peer, keepalive=30)
            await conn.connect()
            steps: list[str] = []
            done = asyncio.get_running_loop().create_future()

            async def stopper(topic: str, data: Any) -> None:
                await asyncio.sleep(0)  # now running inside the drain task
                await conn.disconnect()
                steps.append("disconnected")
                await asyncio.sleep(0.01)  # still ours to finish
                steps.append("after")
                done.set_result(None)

            await conn.subscribe("e/#", stopper)
            peer.send(b"".join(_publish("e/x", b'{"n":%d}' % n) for n in range(5)))
            await asyncio.wait_for(done, 10)
            await _eventually(lambda: conn._dispatcher.task is None, what="drain task end")
            assert steps == ["disconnected", "after"]
            stats = conn.stats()
            assert stats["callback_errors"] == 0 and stats["undelivered"] == 4
            await asyncio.sleep(0.3)
            assert peer.connections == 1 and _other_tasks() == []

    _run(loop_factory, scenario)


# -- the publish path ---------------------------------------------------------------------


@pytest.mark.parametrize("queued", [False, True], ids=["window-free", "from-backlog"])
async def test_publish_that_cannot_be_encoded_takes_no_window_slot(queued):
    """A QoS 1 PUBLISH over the 256 MiB packet limit (§2.2.3) is counted as a publish error and holds no packet id or window slot, even when it waited in the backlog."""
    proto, sess, transport = _protocol(asyncio.get_running_loop(), max_inflight=1)
    huge = bytes(268_435_455)  # payload alone at the limit: topic and packet id push it over
    if queued:
        sess.publish("p/first", b"", 1)  # id 1 fills the window
        waiter = sess.publish("p/huge", huge, 1)
        assert waiter is not None and sess.backlog_count == 1
        proto.data_received(wire.encode_puback(1))  # frees the slot: the huge one is sent from the backlog
        assert proto.connected and waiter.done()
    else:
        assert sess.publish("p/huge", huge, 1) is None
    del huge
    assert sess.publish_errors == 1 and sess.inflight_count == 0 and sess.backlog_count == 0
    assert sess.acknowledged() is None  # flush() would not wait for it
    transport.out.clear()
    assert sess.publish("p/next", b"x", 1) is None  # the window is free
    from cascade_fast import codec

    (packet,) = codec.Decoder().feed(bytes(transport.out))
    assert packet.type == "PUBLISH" and packet.topic == "p/next"


async def test_window_waiters_and_flush_are_released_when_a_clean_session_connection_is_lost():
    """publish() calls waiting for a window slot and a pending flush() return when the connection is lost; the lost messages are counted."""
    async with ScriptedPeer(ack_publish=False) as peer:
        conn = _connector(peer, keepalive=30, max_inflight=2)
        await conn.connect()
        await peer.wait_for(lambda p: p.type == "PUBLISH")  # the birth message holds one slot
        await conn.publish("w/0", {"n": 0}, qos=1)
        waiting = [asyncio.ensure_future(conn.publish("w/x", {"n": n}, qos=1)) for n in range(1, 4)]
        flushing = asyncio.ensure_future(conn.flush(timeout=30))
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in waiting) and not flushing.done()
        peer.drop()
        await asyncio.wait_for(asyncio.gather(*waiting, flushing), 5)
        stats = conn.stats()
        assert stats["publish_errors"] == 2 and stats["dropped"] == 3
        assert stats["inflight"] == 0 and stats["backlog"] == 0
        await conn.disconnect()
        current = asyncio.current_task()
        assert [t for t in asyncio.all_tasks() if t is not current and not t.done()] == []


@both_loops
def test_disconnect_during_connect_wins(loop_factory):
    """disconnect() called while connect() is still in its handshake leaves the connector offline: no supervisor, no socket, DISCONNECT sent."""

    async def scenario(errors: list) -> None:
        async with ScriptedPeer() as peer:
            conn = _connector(peer, keepalive=30)
            connecting = asyncio.ensure_future(conn.connect())
            await asyncio.sleep(0)  # connect() is waiting for the TCP connection / CONNACK
            await conn.disconnect()
            await connecting
            assert not conn.is_connected and "disconnected" in repr(conn)
            await peer.wait_for(lambda p: p.type == "DISCONNECT")
            await asyncio.sleep(0.3)  # longer than the reconnect delay
            assert peer.connections == 1 and _other_tasks() == []

    _run(loop_factory, scenario)


async def test_flush_timeouts_do_not_accumulate_waiters():
    """Repeated flush() timeouts while acknowledgements never come leave no futures piling up in the session."""

    def futures() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is asyncio.Future)

    async with ScriptedPeer(ack_publish=False) as peer:
        conn = _connector(peer, keepalive=30)
        await conn.connect()  # the birth message stays unacknowledged
        before = futures()
        for _ in range(60):
            with pytest.raises(TimeoutError):
                await conn.flush(timeout=0.001)
        assert futures() - before <= 16
        peer.ack_publish = True
        peer.send(wire.encode_puback(1))  # the birth message, at last
        await conn.flush(timeout=5)
        await conn.disconnect()


@both_loops
def test_callback_returning_an_object_whose_getattr_raises(loop_factory):
    """A callback's odd return value (its __getattr__ raises) is ignored like any plain return value; it must not drop the connection."""

    class Odd:
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError(f"no {name} here")

    async def scenario(errors: list) -> None:
        async with ScriptedPeer() as peer:
            conn = _connector(peer, keepalive=30)
            await conn.connect()
            seen: list[int] = []
            await conn.subscribe("o/#", lambda t, d: Odd())
            await conn.subscribe("o/#", lambda t, d: seen.append(d["n"]))
            peer.send(b"".join(_publish("o/x", b'{"n":%d}' % n) for n in range(5)))
            await _eventually(lambda: len(seen) == 5, what="delivery")
            stats = conn.stats()
            assert stats["reconnects"] == 0 and stats["protocol_errors"] == 0
            assert stats["dispatched"] == 10 and stats["callback_errors"] == 0
            await conn.disconnect()

    _run(loop_factory, scenario)


async def test_window_waiters_are_released_when_a_persistent_session_connection_is_lost():
    """With clean_session=False a publish() waiting for a window slot returns on a lost connection (no hang through an outage); its message stays queued and is sent after the reconnect."""
    async with ScriptedPeer(ack_publish=False) as peer:
        conn = _connector(peer, keepalive=30, max_inflight=1, clean_session=False)
        await conn.connect()  # the unacknowledged birth message holds the only slot
        waiting = asyncio.ensure_future(conn.publish("pw/queued", {"n": 1}, qos=1))
        await asyncio.sleep(0.05)
        assert not waiting.done() and conn.stats()["backlog"] == 1
        peer.connack_code = 3  # "server unavailable": the outage lasts
        peer.drop()
        await asyncio.wait_for(waiting, 5)
        assert conn.stats()["backlog"] == 1 and conn.stats()["dropped"] == 0
        peer.connack_code = 0
        peer.ack_publish = True
        await _eventually(lambda: conn.is_connected, what="reconnect")
        await peer.wait_for(lambda p: p.type == "PUBLISH" and p.topic == "pw/queued")
        await conn.flush(timeout=5)
        await conn.disconnect()


class _MisackingPeer(ScriptedPeer):
    """Answers SUBSCRIBE wrongly (`mode`): with an UNSUBACK, or a SUBACK with an extra return code."""

    mode = "unsuback"

    def _answer(self, packet: Any) -> bytes | None:
        if packet.type == "SUBSCRIBE" and self.mode == "unsuback":
            return wire.encode_unsuback(packet.packet_id)
        if packet.type == "SUBSCRIBE" and self.mode == "extra-code":
            return wire.encode_suback(packet.packet_id, [qos for _, qos in packet.topics] + [0])
        return super()._answer(packet)


@pytest.mark.parametrize("mode", ["unsuback", "extra-code"])
async def test_wrong_acknowledgement_of_subscribe_is_a_protocol_error(mode):
    """An UNSUBACK answering a SUBSCRIBE, or a SUBACK whose return codes do not match its filters (§3.9.3), closes the connection as a protocol error; once the broker answers right, subscriptions work."""
    async with _MisackingPeer() as peer:
        peer.mode = mode
        conn = _connector(peer, keepalive=30)
        await conn.connect()
        seen: list[Any] = []
        await asyncio.wait_for(conn.subscribe("ms/#", lambda t, d: seen.append(d)), 5)  # lost before SUBACK: kept
        await _eventually(lambda: conn.stats()["protocol_errors"] >= 1, what="protocol error")
        peer.mode = "right"
        # Every misanswered connection counted once; the one after the switch is clean.
        await _eventually(
            lambda: conn.is_connected and conn.stats()["protocol_errors"] == peer.connections - 1, what="a clean connection"
        )
        await asyncio.sleep(0.1)  # its SUBACK
        peer.send(_publish("ms/x", b'{"n":1}'))
        await _eventually(lambda: seen == [{"n": 1}], what="delivery once subscribed")
        await conn.disconnect()
