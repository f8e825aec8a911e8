"""Faults, against a broker of the test's own: unreachable, refusing, stalled, restarted, killed."""

from __future__ import annotations

import asyncio
import logging
import secrets

import pytest

from broker import Mosquitto, free_port
from fake_broker import FakeBroker
from cascade.connectors.mqtt import _common
from cascade_fast._errors import ConnectRefusedError, SubscribeRefusedError
from observer import Recorder, Watcher, eventually
from proxy import TcpProxy

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.usefixtures("loop_guard")]


async def test_connect_to_a_closed_port_raises_promptly(connector_factory):
    """connect() to a port nobody listens on raises ConnectionError/OSError at once, and can be retried."""
    connector = connector_factory(port=free_port())
    loop = asyncio.get_running_loop()
    for _ in range(2):
        started = loop.time()
        with pytest.raises((ConnectionError, OSError)):
            await asyncio.wait_for(connector.connect(), 5)
        assert loop.time() - started < 4.0  # refused at once; generous for a loaded CI machine
        assert connector.stats()["connected"] == 0


async def test_connack_refusal_raises_connect_refused_error(connector_factory, caplog):
    """A non-zero CONNACK is ConnectRefusedError with the 3.1.1 return code; the password appears nowhere."""
    password = f"pw-{secrets.token_hex(8)}"
    with Mosquitto(extra_config="allow_anonymous false") as refusing:
        connector = connector_factory(refusing, username="cascade", password=password)
        with caplog.at_level(logging.DEBUG):
            with pytest.raises(ConnectRefusedError) as excinfo:
                await asyncio.wait_for(connector.connect(), 5)
        # No password file: Mosquitto refuses every client as not authorised.
        assert excinfo.value.return_code == 5  # MQTT 3.1.1 §3.2.2.3
        assert isinstance(excinfo.value, ConnectionError)
        assert connector.stats()["connected"] == 0
    # Never log (or raise) the password.
    assert password not in str(excinfo.value) and password not in repr(connector)
    assert not [r for r in caplog.records if password in r.getMessage()]


async def test_connect_times_out_when_the_broker_never_answers(connector_factory, private_broker):
    """A broker that accepts TCP but sends no CONNACK makes connect() raise TimeoutError after connect_timeout."""
    connector = connector_factory(private_broker, connect_timeout=0.3)
    private_broker.pause()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(connector.connect(), 8)
        assert loop.time() - started < 4.0  # 0.3 s + scheduling on a loaded machine
    finally:
        private_broker.resume()
    # The abandoned attempt left nothing behind: a new one just works.
    await asyncio.wait_for(connector.connect(), 5)
    assert connector.stats()["connected"] == 1


async def test_subscribe_refused_by_the_broker_raises_and_registers_nothing(connector_factory):
    """SUBACK 0x80 raises SubscribeRefusedError naming the filter; its callback is not registered, others work."""
    async with FakeBroker(refuse=lambda topic_filter: topic_filter.startswith("forbidden/")) as fake:
        connector = connector_factory(fake)
        await connector.connect()
        with pytest.raises(SubscribeRefusedError) as excinfo:
            await connector.subscribe("forbidden/#", Recorder("denied"))
        assert excinfo.value.topic_filter == "forbidden/#"
        first = await connector.subscribe("allowed/#", Recorder("one"))
        second = await connector.subscribe("allowed/#", Recorder("two"))
        # The refused filter was not kept: it is not subscribed again.
        with pytest.raises(SubscribeRefusedError):
            await connector.subscribe("forbidden/#", Recorder("denied again"))
        assert connector.stats()["connected"] == 1
        sent = [f for packet in fake.subscribes for f, _ in packet]
        assert sent.count("allowed/#") == 1  # two handles, one broker subscription
        assert sent.count("forbidden/#") == 2
        await first.unsubscribe()
        assert fake.unsubscribes == []  # a handle of the filter remains
        await second.unsubscribe()
        assert fake.unsubscribes == [["allowed/#"]]
        await connector.disconnect()


async def test_flush_times_out_when_the_broker_does_not_acknowledge(connector_factory, private_broker):
    """flush(timeout) raises TimeoutError while a QoS 1 publish is unacknowledged, and succeeds once it is."""
    connector = connector_factory(private_broker)
    await connector.connect()
    await connector.flush(timeout=5)
    private_broker.pause()
    try:
        await connector.publish("stalled/x", {"n": 1}, qos=1)
        with pytest.raises(TimeoutError):
            await connector.flush(timeout=0.2)
    finally:
        private_broker.resume()
    await connector.flush(timeout=10)
    assert connector.stats()["publish_errors"] == 0


@pytest.mark.parametrize("how", ["terminate", "kill"])
async def test_reconnects_and_resubscribes_after_a_broker_restart(connector_factory, private_broker, how):
    """After the broker restarts on its port: reconnect, presence re-announced, filters re-subscribed, delivery resumes."""
    topic = f"resume/{secrets.token_hex(4)}"
    # A short connect_timeout bounds how long a connection that came up
    # broken may take to be given up.
    connector = connector_factory(private_broker, connect_timeout=2.0)
    status = _common.status_topic(connector.source_id)
    recorder = Recorder()
    await connector.subscribe(topic, recorder)
    await connector.connect()
    await connector.publish(topic, {"before": True}, qos=1)
    await recorder.wait(1)

    private_broker.restart(kill=how == "kill")  # persistence off: the new broker knows nothing

    async with Watcher(private_broker, status) as watcher:
        # Only a re-announcement can put "online" on the fresh broker.
        await watcher.wait_for(lambda m: m.payload == _common.ONLINE_PAYLOAD)
        # Retained, so it arrives whether the re-subscription comes before or after it.
        await watcher.publish(topic, b'{"after": true}', retain=True)
        await recorder.wait_for({"after": True})
    assert recorder.data == [{"before": True}, {"after": True}]
    stats = connector.stats()
    assert stats["reconnects"] >= 1
    assert stats["connected"] == 1

    # Publishing works on the new connection too.
    echo = Recorder()
    await connector.subscribe(topic + "/echo", echo)
    await connector.publish(topic + "/echo", {"echo": 1}, qos=1)
    await echo.wait(1)


async def test_publish_during_an_outage_neither_raises_nor_blocks(connector_factory, private_broker):
    """While the broker is down, publish() neither raises nor blocks: QoS 0 is dropped and counted, QoS 1 is queued."""
    connector = connector_factory(private_broker)
    await connector.connect()
    private_broker.stop()
    await eventually(lambda: connector.stats()["connected"] == 0, what="connection loss noticed")
    before = connector.stats()
    await asyncio.wait_for(connector.publish("outage/x", {"n": 1}, qos=1), 1)
    await asyncio.wait_for(connector.publish("outage/x", {"n": 2}), 1)
    after = connector.stats()
    assert after["dropped"] - before["dropped"] == 1
    assert after["publish_errors"] == before["publish_errors"]
    assert after["queued"] - before["queued"] == 1  # delivered after the reconnect (test_connector_durability.py)
    assert after["published"] == before["published"]


async def test_network_cut_fires_the_will_then_presence_and_delivery_come_back(connector_factory, broker):
    """A cut connection (broker up): the Will says offline, the reconnect says online again, and delivery resumes."""
    topic = f"cut/{secrets.token_hex(4)}"
    async with TcpProxy(broker) as proxy, Watcher(broker) as outsider:
        connector = connector_factory(proxy)
        status = _common.status_topic(connector.source_id)
        recorder = Recorder()
        await connector.subscribe(topic, recorder)
        async with Watcher(broker, status) as watcher:
            await connector.connect()
            await watcher.wait_for(lambda m: m.payload == _common.ONLINE_PAYLOAD)
            mark = len(watcher.messages)

            proxy.cut()

            will = await watcher.wait_for(lambda m: m.payload == _common.OFFLINE_PAYLOAD, since=mark)
            back = await watcher.wait_for(lambda m: m.payload == _common.ONLINE_PAYLOAD, since=watcher.messages.index(will) + 1)
            assert back.topic == status
        try:
            # Retained, so it arrives whether the re-subscription comes before or after it.
            await outsider.publish(topic, b'{"after": "cut"}', retain=True)
            await recorder.wait_for({"after": "cut"})
        finally:
            await outsider.publish(topic, b"", retain=True)
        stats = connector.stats()
        assert stats["reconnects"] >= 1 and stats["connected"] == 1
        assert proxy.accepted >= 2
        await connector.disconnect()
