"""QoS 1 across disconnects: queued while reconnecting, re-sent after a cut, bounded, flushed, counted.

The contract (both connectors' class docstrings): QoS 1/2 publishes the
broker has not acknowledged, in flight at a connection loss or made while
reconnecting, are kept in a queue bounded by ``max_queued`` and delivered
after the reconnect in their original order (at least once); ``flush()``
never returns while one is unacknowledged; what cannot be kept is counted
in ``stats()["dropped"]``. The witness is mosquitto_sub (`Watcher`), which
shares no code with either connector.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets

import orjson
import pytest

from broker import Mosquitto
from observer import Watcher, eventually
from proxy import TcpProxy

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.usefixtures("loop_guard")]

#: Seconds to wait for deliveries that should come promptly once the broker is back.
DELIVERY_TIMEOUT = 20.0


def numbers(watcher: Watcher) -> list[int]:
    """The ``n`` of every message the watcher received, in arrival order (duplicates included)."""
    return [orjson.loads(message.payload)["n"] for message in watcher.messages]


def first_arrivals(received: list[int]) -> list[int]:
    """`received` without repeats, each number where it first arrived."""
    return list(dict.fromkeys(received))


async def delivered(watcher: Watcher, expected: range) -> list[int]:
    """Wait until the watcher saw every number of `expected`; returns the first-arrival order."""
    await eventually(lambda: set(expected) <= set(numbers(watcher)), DELIVERY_TIMEOUT, what=f"all of {expected} delivered")
    return first_arrivals(numbers(watcher))


class _Outage:
    """A persistent broker with a persistent witness on `topic`, which the test stops and restarts.

    The witness's session and the messages queued for it survive the
    graceful restart, so what the connector publishes right after its
    reconnect is seen however the two race back.
    """

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.broker = Mosquitto(persistence=True)
        self.witness = Watcher(self.broker, topic, client_id=f"witness-{secrets.token_hex(4)}", clean_session=False)

    async def __aenter__(self) -> _Outage:
        self.broker.start()
        try:
            await self.witness.__aenter__()
        except BaseException:
            self.broker.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self.witness.__aexit__(*exc_info)
        finally:
            self.broker.close()

    async def stop(self, connector) -> None:
        """Stop the broker gracefully and wait until the connector noticed."""
        await asyncio.to_thread(self.broker.stop)
        await eventually(lambda: connector.stats()["connected"] == 0, what="connection loss noticed")

    async def start(self) -> None:
        """Start the broker again on its port (the connector reconnects by itself)."""
        await asyncio.to_thread(self.broker.restart)


async def publish_numbers(connector, topic: str, numbers: range) -> None:
    """QoS 1 publishes of ``{"n": n}``, each returning at once (asserted: none may wait for the network)."""
    for n in numbers:
        await asyncio.wait_for(connector.publish(topic, {"n": n}, qos=1), 5)


async def test_qos1_published_during_an_outage_is_delivered_after_it(connector_factory):
    """QoS 1 publishes made while the broker is down arrive in order after it is back; flush raises until then."""
    topic = f"durable/outage/{secrets.token_hex(4)}"
    async with _Outage(topic) as outage:
        connector = connector_factory(outage.broker)
        await connector.connect()
        await outage.stop(connector)
        before = connector.stats()

        await publish_numbers(connector, topic, range(20))
        assert connector.stats()["queued"] == 20
        with pytest.raises(TimeoutError, match=r"\b20 publishes not acknowledged\b"):
            await connector.flush(timeout=1)

        await outage.start()
        await connector.flush(timeout=DELIVERY_TIMEOUT)
        assert await delivered(outage.witness, range(20)) == list(range(20))
        after = connector.stats()
        assert after["queued"] == 0
        assert after["dropped"] == before["dropped"]
        assert after["publish_errors"] == before["publish_errors"]
        assert after["reconnects"] >= 1


async def test_flush_during_an_outage_never_returns(connector_factory, private_broker):
    """flush() with 20 QoS 1 publishes no broker received raises TimeoutError naming them, however often it is asked."""
    connector = connector_factory(private_broker)
    await connector.connect()
    await asyncio.to_thread(private_broker.stop)
    await eventually(lambda: connector.stats()["connected"] == 0, what="connection loss noticed")
    await publish_numbers(connector, "durable/never", range(20))
    for timeout in (0, 0.2, 1):
        with pytest.raises(TimeoutError, match=r"\b20 publishes not acknowledged within"):
            await connector.flush(timeout=timeout)


@pytest.mark.parametrize("clean_session", [True, False], ids=["clean", "persistent"])
async def test_qos1_in_flight_at_a_link_cut_is_delivered_after_the_reconnect(connector_factory, broker, clean_session):
    """A burst cut mid-way (unacknowledged messages on the wire) is delivered whole after the reconnect, in order."""
    topic = f"durable/cut/{secrets.token_hex(4)}"
    count = 600  # under Mosquitto's default 1000 queued per client: the witness never loses one
    async with Watcher(broker, topic) as witness, TcpProxy(broker) as proxy:
        connector = connector_factory(proxy, clean_session=clean_session, client_id=f"cut-{secrets.token_hex(4)}")
        await connector.connect()
        in_flight = None
        for n in range(count):
            await connector.publish(topic, {"n": n}, qos=1)
            if n % 20 == 0:
                await asyncio.sleep(0)  # let the burst reach the wire
            if n == count // 2:
                in_flight = connector.stats()["queued"]
                proxy.cut()
        assert in_flight, "nothing was unacknowledged at the cut: the test proves nothing"
        await connector.flush(timeout=DELIVERY_TIMEOUT)
        assert await delivered(witness, range(count)) == list(range(count))
        stats = connector.stats()
        assert stats["reconnects"] >= 1 and proxy.accepted >= 2
        assert stats["queued"] == stats["dropped"] == stats["publish_errors"] == 0


async def test_queue_bound_drops_the_excess_while_disconnected(connector_factory):
    """max_queued=50: 80 QoS 1 publishes during an outage keep the first 50 (delivered later) and count 30 dropped."""
    topic = f"durable/bound/{secrets.token_hex(4)}"
    async with _Outage(topic) as outage:
        connector = connector_factory(outage.broker, max_queued=50)
        await connector.connect()
        await outage.stop(connector)
        before = connector.stats()
        await publish_numbers(connector, topic, range(80))
        stats = connector.stats()
        assert stats["queued"] == 50
        assert stats["dropped"] - before["dropped"] == 30

        await outage.start()
        await connector.flush(timeout=DELIVERY_TIMEOUT)
        assert await delivered(outage.witness, range(50)) == list(range(50))
        assert not set(numbers(outage.witness)) & set(range(50, 80))
        assert connector.stats()["dropped"] - before["dropped"] == 30


async def test_full_queue_makes_publish_wait_while_connected(connector_factory, private_broker):
    """max_queued=5 on a live but stalled connection: the 6th QoS 1 publish waits for room instead of dropping."""
    connector = connector_factory(private_broker, max_queued=5)
    await connector.connect()
    await connector.flush(timeout=5)
    before = connector.stats()
    private_broker.pause()
    try:
        await publish_numbers(connector, "durable/full", range(5))
        sixth = asyncio.ensure_future(connector.publish("durable/full", {"n": 5}, qos=1))
        done, _ = await asyncio.wait([sixth], timeout=0.5)
        assert not done, "publish() returned while the queue was full and the connection alive"
    finally:
        private_broker.resume()
    await asyncio.wait_for(sixth, DELIVERY_TIMEOUT)
    await connector.flush(timeout=DELIVERY_TIMEOUT)
    after = connector.stats()
    assert after["dropped"] == before["dropped"]
    assert after["queued"] == 0


async def test_disconnect_during_an_outage_counts_the_queue_as_dropped(connector_factory, private_broker, caplog):
    """disconnect() with 7 QoS 1 publishes queued and no broker: after its bounded wait they are counted and logged."""
    connector = connector_factory(private_broker)
    await connector.connect()
    await asyncio.to_thread(private_broker.stop)
    await eventually(lambda: connector.stats()["connected"] == 0, what="connection loss noticed")
    before = connector.stats()
    await publish_numbers(connector, "durable/abandoned", range(7))
    with caplog.at_level(logging.WARNING, logger="cascade.connectors.mqtt"):
        await asyncio.wait_for(connector.disconnect(), 15)  # waits 5 s for the queue
    after = connector.stats()
    assert after["dropped"] - before["dropped"] == 7
    assert after["queued"] == 0
    assert any(
        re.search(r"\b7\b", record.getMessage()) for record in caplog.records if record.levelno >= logging.WARNING
    ), "the dropped count was not logged"
