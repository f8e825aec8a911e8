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
