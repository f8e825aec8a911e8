"""An independent MQTT client for the behaviour tests: watches topics and publishes.

Built on plain aiomqtt, never on a connector under test, so what it sees (a
retained birth message, a Last Will, a publish) is the broker's word, not
the connector's.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from dataclasses import dataclass
from typing import Callable

import aiomqtt

__all__ = ["Received", "Recorder", "Watcher", "eventually"]

#: Default seconds to wait for something the broker should do promptly.
TIMEOUT = 10.0


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int


class Watcher:
    """Subscribes to `filters` on `broker` and records every message, in arrival order.

    Use as ``async with Watcher(broker, "a/#") as w:``; the subscriptions
    are acknowledged when the block starts.
    """

    def __init__(self, broker, *filters: str, qos: int = 1) -> None:
        self._broker = broker
        self._filters = filters
        self._qos = qos
        self.messages: list[Received] = []
        self._changed = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watcher:
        self._client = aiomqtt.Client(
            self._broker.host, self._broker.port, identifier=f"watcher-{secrets.token_hex(4)}", timeout=TIMEOUT
        )
        await self._client.__aenter__()
        for topic_filter in self._filters:
            await self._client.subscribe(topic_filter, qos=self._qos)
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="test watcher")
        return self

    async def _collect(self) -> None:
        assert self._client is not None
        with contextlib.suppress(aiomqtt.MqttError):
            async for message in self._client.messages:
                self.messages.append(Received(message.topic.value, bytes(message.payload), bool(message.retain), message.qos))
                self._changed.set()

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        if self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.__aexit__(None, None, None)

    async def wait_for(self, predicate: Callable[[Received], bool], timeout: float = TIMEOUT) -> Received:
        """The first message (already received or still to come) for which `predicate` holds."""
        seen = 0

        async def scan() -> Received:
            nonlocal seen
            while True:
                for message in self.messages[seen:]:
                    if predicate(message):
                        return message
                seen = len(self.messages)
                self._changed.clear()
                await self._changed.wait()

        try:
            return await asyncio.wait_for(scan(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"no matching message within {timeout} s; got {self.messages!r}") from None

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish and wait for the broker's acknowledgement (QoS 1 by default)."""
        assert self._client is not None
        await self._client.publish(topic, payload, qos=qos, retain=retain)


async def eventually(predicate: Callable[[], bool], timeout: float = TIMEOUT, what: str = "condition") -> None:
    """Wait (bounded) until `predicate()` holds; for state only observable by polling, like stats()."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s")
        await asyncio.sleep(0.01)


class Recorder:
    """A subscription callback that records ``(topic, data)`` calls and can be waited on.

    With `log` (a list shared by several recorders) each call is also
    appended there as ``(name, topic, data)``, which shows the order the
    connector called the callbacks in.
    """

    def __init__(self, name: str = "", log: list | None = None) -> None:
        self.name = name
        self.calls: list[tuple[str, object]] = []
        self._log = log
        self._changed = asyncio.Event()

    def __call__(self, topic: str, data: object) -> None:
        self.calls.append((topic, data))
        if self._log is not None:
            self._log.append((self.name, topic, data))
        self._changed.set()

    @property
    def data(self) -> list[object]:
        return [data for _, data in self.calls]

    async def wait(self, count: int, timeout: float = TIMEOUT) -> None:
        """Wait until at least `count` calls were recorded."""

        async def until() -> None:
            while len(self.calls) < count:
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(until(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"{self.name or 'callback'}: {len(self.calls)} calls within {timeout} s, expected {count}: {self.calls!r}") from None

    async def wait_for(self, data: object, timeout: float = TIMEOUT) -> None:
        """Wait until a call with `data` was recorded."""

        async def until() -> None:
            while data not in self.data:
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(until(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"{self.name or 'callback'}: no call with {data!r} within {timeout} s: {self.calls!r}") from None
