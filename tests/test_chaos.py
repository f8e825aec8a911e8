"""Chaos: QoS 1 end to end while the broker restarts and the network fails, with nothing missing.

A persistent subscriber (clean_session False, fixed client id, QoS 1) and a
QoS 1 publisher, both through a `TcpProxy`, against a Mosquitto that keeps
sessions on disk. While the publisher sends numbered messages as fast as it
can, the broker is restarted gracefully three times and the link is cut
three times. At the end every number has reached the subscriber (duplicates
are allowed: QoS 1 is at least once) and the counters add up.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
from typing import Any

import pytest

from broker import Mosquitto
from observer import eventually
from proxy import TcpProxy

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.usefixtures("loop_guard")]

#: Faults, in order; each comes once both clients are back and traffic flowed again.
FAULTS = ("restart", "cut", "restart", "cut", "restart", "cut")
#: Seconds of traffic between two faults (at least).
FAULT_INTERVAL = 1.5
#: Messages the publisher must get acknowledged between faults, so each fault hits live traffic.
PROGRESS_BETWEEN_FAULTS = 200
#: The publisher's own flow control: it waits while this many of its
#: publishes are unacknowledged (well under max_queued), as a producer that
#: must not lose data does; otherwise it publishes as fast as it can.
HIGH_WATER = 5_000
#: The subscriber's session may hold every message published while it is
#: away (Mosquitto's default, 1000, would drop the rest: not a connector bug).
BROKER_CONFIG = "max_queued_messages 0\nmax_inflight_messages 20"
#: Bound for every wait in the test (reconnects, the final drain).
TIMEOUT = 30.0
#: The subscriber is given up on after this many seconds without a new message.
STALL = 5.0


class Publisher:
    """Publishes ``{"n": 0}``, ``{"n": 1}``, ... at QoS 1 until stopped; `count` is how many so far."""

    def __init__(self, connector: Any, topic: str) -> None:
        self.connector = connector
        self.topic = topic
        self.count = 0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        connector = self.connector
        while not self._stop.is_set():
            while connector.stats()["queued"] >= HIGH_WATER:
                await asyncio.sleep(0.005)
            await connector.publish(self.topic, {"n": self.count}, qos=1)
            self.count += 1
            if self.count % 50 == 0:
                await asyncio.sleep(0)  # the subscriber shares this loop

    def acknowledged(self) -> int:
        """Publishes so far that the broker acknowledged."""
        return self.count - self.connector.stats()["queued"]

    def stop(self) -> None:
        self._stop.set()


async def _caught_up(seen: collections.Counter[int], published: int) -> None:
    """Wait until the subscriber saw `published` distinct numbers, or made no progress for a while."""
    loop = asyncio.get_running_loop()
    last, since = len(seen), loop.time()
    while len(seen) < published and loop.time() - since < STALL:
        await asyncio.sleep(0.05)
        if len(seen) != last:
            last, since = len(seen), loop.time()


def _ranges(numbers: list[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"`` (at most 10 runs), for a readable failure."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    text = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs[:10])
    return text + (f", ... ({len(runs)} runs)" if len(runs) > 10 else "")


async def test_qos1_survives_broker_restarts_and_link_cuts(connector_factory):
    """3 graceful broker restarts and 3 link cuts under a full-speed QoS 1 stream: zero missing, counters add up."""
    topic = f"chaos/{secrets.token_hex(4)}"
    seen: collections.Counter[int] = collections.Counter()
    with Mosquitto(persistence=True, extra_config=BROKER_CONFIG) as broker:
        async with TcpProxy(broker) as proxy:
            subscriber = connector_factory(
                proxy, client_id=f"chaos-sub-{secrets.token_hex(4)}", clean_session=False, connect_timeout=3.0
            )
            await subscriber.subscribe(topic, lambda _topic, data: seen.update((data["n"],)), qos=1)
            await subscriber.connect()
            publisher_connector = connector_factory(proxy, connect_timeout=3.0)
            await publisher_connector.connect()
            publisher = Publisher(publisher_connector, topic)
            clients = (subscriber, publisher_connector)
            loop = asyncio.get_running_loop()
            task = loop.create_task(publisher.run(), name="chaos publisher")
            try:
                for fault in FAULTS:
                    # Live traffic for a while before every fault.
                    mark = publisher.acknowledged()
                    next_at = loop.time() + FAULT_INTERVAL
                    await eventually(
                        lambda: publisher.acknowledged() >= mark + PROGRESS_BETWEEN_FAULTS, TIMEOUT, what="traffic between faults"
                    )
                    await asyncio.sleep(max(0.0, next_at - loop.time()))
                    reconnects = [c.stats()["reconnects"] for c in clients]
                    if fault == "restart":
                        # SIGTERM: Mosquitto saves the sessions, then restarts on its port.
                        await asyncio.to_thread(broker.restart)
                    else:
                        proxy.cut()
                    # Both clients came back from this very fault (a stale
                    # "connected" could otherwise merge two faults into one).
                    await eventually(
                        lambda: all(c.stats()["reconnects"] > n and c.stats()["connected"] for c, n in zip(clients, reconnects)),
                        TIMEOUT,
                        what=f"both clients reconnected after the {fault}",
                    )
                await asyncio.sleep(FAULT_INTERVAL / 2)
            finally:
                publisher.stop()
                await asyncio.wait_for(task, TIMEOUT)

            published = publisher.count
            await publisher_connector.flush(timeout=TIMEOUT)
            await _caught_up(seen, published)
            missing = sorted(set(range(published)) - set(seen))
            assert not missing, f"{len(missing)} of {published} messages never arrived: {_ranges(missing)}"
            assert set(seen) == set(range(published))

            pub_stats = publisher_connector.stats()
            assert pub_stats["dropped"] == 0
            assert pub_stats["publish_errors"] == 0
            assert pub_stats["queued"] == 0
            assert pub_stats["published"] == published
            sub_stats = subscriber.stats()
            received = sub_stats["received"]
            unique = len(seen)
            duplicates = sum(seen.values()) - unique
            assert received >= published
            assert received - unique == duplicates
            assert sub_stats["dispatched"] == received
            print(f"chaos: {published} published, {received} received, {duplicates} duplicates")
