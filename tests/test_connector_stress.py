"""Guarantees under stress, on both connectors and both loops, against a real Mosquitto.

Each test is one scenario of issue #11 that once broke a promise: a slow
consumer declared dead, reconnect storms, calls that raise but leave damage
behind, presence counted as the caller's publishes.
"""

from __future__ import annotations

import asyncio
import decimal
import fractions
import logging
import secrets

import pytest

from observer import Recorder, Watcher, eventually
from proxy import TcpProxy

pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("loop_guard")]


def unique(prefix: str) -> str:
    """A topic prefix no other test uses (the session broker is shared)."""
    return f"{prefix}/{secrets.token_hex(4)}"


# ------------------------------------------------------------- slow consumers


async def test_a_slow_consumer_keeps_its_session_through_a_burst(connector_factory, broker):
    """A coroutine callback that stalls for more than twice the keepalive during a burst (reading paused by
    backpressure in the fast connector) must not be declared dead: no Will, no reconnect, nothing lost."""
    topic = unique("slow")
    total = 5_000
    keepalive = 2  # Mosquitto drops a silent client after 1.5 x keepalive = 3 s
    stall = 3 * keepalive
    consumer = connector_factory(keepalive=keepalive, high_water=200)
    got: list[int] = []

    async def slow(topic_name: str, data: dict) -> None:
        if not got:
            await asyncio.sleep(stall)
        got.append(data["n"])

    async with Watcher(broker, f"cascade/status/{consumer.source_id}") as presence:
        await consumer.connect()
        await consumer.subscribe(topic, slow, qos=0)
        publisher = connector_factory()
        await publisher.connect()
        for n in range(total):
            await publisher.publish(topic, {"n": n})
        await publisher.flush(timeout=30)
        await eventually(lambda: len(got) == total, timeout=stall + 30, what="every message of the burst delivered")
        assert got == list(range(total))
        stats = consumer.stats()
        assert stats["reconnects"] == 0 and stats["connected"] == 1, stats
        offline = [m for m in presence.messages if b"offline" in m.payload]
        assert offline == [], "the broker published the Will of a consumer that was only slow"


# ----------------------------------------------------------- reconnect storms


async def test_a_client_id_taken_over_backs_off_instead_of_storming(connector_factory, broker, caplog):
    """Two connectors with one client id take the session from each other; each CONNACK must not reset the
    backoff, so they settle into slow turns instead of reconnecting at full speed, and the log says why."""
    client_id = f"shared-{secrets.token_hex(4)}"
    caplog.set_level(logging.WARNING, logger="cascade.connectors.mqtt")
    first = connector_factory(client_id=client_id, reconnect_delay=0.05, max_reconnect_delay=2.0)
    second = connector_factory(client_id=client_id, reconnect_delay=0.05, max_reconnect_delay=2.0)
    await first.connect()
    await second.connect()
    window = 5.0
    await asyncio.sleep(window)
    reconnects = first.stats()["reconnects"] + second.stats()["reconnects"]
    # Without backoff they take over about 6 times a second (60 in 5 s); the doubling delays (at most
    # 0.05 + 0.1 + 0.2 + 0.4 + 0.8 + 1.6 + 2 ... s per connector) allow at most a dozen each.
    assert 1 <= reconnects <= 24, reconnects
    assert any("taken the session over" in record.getMessage() for record in caplog.records), [
        record.getMessage() for record in caplog.records
    ]


# ---------------------------------------------------------------- bad calls


BAD_QOS = [
    pytest.param(1.0, id="float"),
    pytest.param(fractions.Fraction(1), id="fraction"),
    pytest.param(decimal.Decimal(1), id="decimal"),
    pytest.param(True, id="bool"),
    pytest.param("1", id="str"),
]


@pytest.mark.parametrize("qos", BAD_QOS)
async def test_subscribe_with_a_qos_that_is_not_an_int_raises_and_leaves_nothing(connector_factory, broker, qos):
    """subscribe(qos=1.0) raises TypeError at the call and registers nothing: later reconnects are unharmed."""
    topic = unique("badqos")
    async with TcpProxy(broker) as proxy:
        connector = connector_factory(proxy)
        await connector.connect()
        before = connector.stats()["subscriptions"]
        with pytest.raises(TypeError, match="qos must be an int"):
            await connector.subscribe(topic, Recorder(), qos=qos)
        assert connector.stats()["subscriptions"] == before
        recorder = Recorder()
        await connector.subscribe(topic, recorder)
        proxy.cut()
        await eventually(lambda: connector.stats()["reconnects"] >= 1 and connector.stats()["connected"] == 1,
                         what="reconnected after the cut")
        await connector.publish(topic, {"after": "reconnect"}, qos=1)
        await recorder.wait(1)
        assert recorder.data == [{"after": "reconnect"}]
        assert connector.stats()["subscriptions"] == before + 1


@pytest.mark.parametrize("qos", BAD_QOS)
async def test_publish_with_a_qos_that_is_not_an_int_raises_and_sends_nothing(connector_factory, qos):
    """publish(qos=1.0) is a TypeError at the call, never sent as QoS 1."""
    connector = connector_factory()
    await connector.connect()
    before = connector.stats()
    with pytest.raises(TypeError, match="qos must be an int"):
        await connector.publish(unique("badqos"), {"n": 1}, qos=qos)
    after = connector.stats()
    assert (after["published"], after["dropped"], after["publish_errors"]) == (
        before["published"],
        before["dropped"],
        before["publish_errors"],
    )


async def test_a_payload_too_large_for_one_packet_raises_value_error_at_the_call(connector_factory):
    """A payload no MQTT packet can carry (§2.2.3) is a ValueError at the call, not a counted error later."""
    topic = unique("huge")
    connector = connector_factory()
    await connector.connect()
    before = connector.stats()
    huge = bytes(268_435_455 - 2 - len(topic) + 1)  # one byte over at QoS 0
    with pytest.raises(ValueError, match="too large for one MQTT packet"):
        await connector.publish(topic, huge)
    del huge
    after = connector.stats()
    assert after["published"] == before["published"] and after["publish_errors"] == before["publish_errors"]
    assert connector.stats()["connected"] == 1


# ---------------------------------------------------------------- counters


async def test_published_counts_the_callers_messages_not_presence(connector_factory):
    """stats()['published'] counts the caller's publishes; the birth (and the offline message) are not theirs."""
    topic = unique("count")
    connector = connector_factory()
    await connector.connect()
    for n in range(3):
        await connector.publish(topic, {"n": n}, qos=n % 2)
    await connector.flush(timeout=10)
    assert connector.stats()["published"] == 3


async def test_a_retained_message_too_large_to_take_causes_no_reconnect_storm(connector_factory, connector_impl):
    """A retained QoS 1 message over the fast connector's max_packet_size (1 MiB by default) arrives after
    every SUBACK. It must not cost the connection: the fast connector acknowledges, skips and counts it; the
    reference (paho has no limit) delivers it. Either way messages after it flow and nothing reconnects."""
    topic = unique("retained-big")
    publisher = connector_factory()
    await publisher.connect()
    await publisher.publish(f"{topic}/big", b"[" + b"0," * (1 << 20) + b"0]", qos=1, retain=True)
    await publisher.flush(timeout=30)
    consumer = connector_factory()
    got: list[str] = []
    await consumer.subscribe(f"{topic}/#", lambda name, data: got.append(name), qos=1)
    await consumer.connect()
    await publisher.publish(f"{topic}/small", {"n": 1}, qos=1)
    await eventually(lambda: f"{topic}/small" in got, what="the message after the big one delivered")
    await asyncio.sleep(1.0)  # a storm would show as reconnects by now
    stats = consumer.stats()
    assert stats["reconnects"] == 0 and stats["connected"] == 1, stats
    if connector_impl == "fast":
        assert stats["oversized"] == 1 and got == [f"{topic}/small"]
    else:
        assert got == [f"{topic}/big", f"{topic}/small"]
    await publisher.publish(f"{topic}/big", b"", retain=True)  # clear it for the shared broker


async def test_a_subscribe_cancelled_while_waiting_for_its_suback_leaves_nothing(connector_factory, private_broker):
    """subscribe() cancelled before the SUBACK (the broker stalled): the caller has no handle, so nothing may stay
    registered; once the broker is back, messages on that filter reach no callback."""
    topic = unique("cancelled")
    connector = connector_factory(private_broker, keepalive=30)
    await connector.connect()
    before = connector.stats()["subscriptions"]
    got: list[object] = []
    private_broker.pause()
    try:
        pending = asyncio.ensure_future(connector.subscribe(topic, lambda name, data: got.append(data)))
        done, _ = await asyncio.wait([pending], timeout=0.3)
        assert not done, "subscribe() returned without a SUBACK"
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert connector.stats()["subscriptions"] == before
    finally:
        private_broker.resume()
    witness = Recorder()
    await connector.subscribe(f"{topic}/witness", witness)
    await connector.publish(topic, {"n": 1}, qos=1)
    await connector.publish(f"{topic}/witness", {"n": 2}, qos=1)
    await witness.wait(1)  # published after the first, on the same connection: the first had its chance
    await asyncio.sleep(0.2)
    assert got == []
    assert connector.stats()["subscriptions"] == before + 1
