"""An independent MQTT observer for the behaviour tests: watches topics and publishes.

Built on Mosquitto's own command-line clients (``mosquitto_sub`` and
``mosquitto_pub``, Debian package ``mosquitto-clients``), in subprocesses: it
shares no code and no event loop with any connector under test, so what it
sees (a retained birth message, a Last Will, a publish) is the broker's word,
not the connector's. (An aiomqtt watcher in the test's loop was tried first;
on uvloop it occasionally stopped receiving after a broker restart, which
made it a flaky witness.)
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
from dataclasses import dataclass
from typing import Callable

__all__ = ["Received", "Recorder", "Watcher", "eventually"]

#: Default seconds to wait for something the broker should do promptly.
TIMEOUT = 10.0
#: mosquitto_sub's line for one message: retain flag, QoS, hex payload, topic
#: last (a topic may contain spaces, hex never does).
_FORMAT = "MSG %r %q %x %t"


def _client(name: str) -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    if not shutil.which(path):
        raise RuntimeError(f"{name} not found: apt-get install mosquitto-clients")
    return path


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int


class Watcher:
    """Subscribes to `filters` on `broker` and records every message, in arrival order.

    Use as ``async with Watcher(broker, "a/#") as w:``; the subscriptions
    are acknowledged (SUBACK) when the block starts. With
    ``clean_session=False`` (and a fixed `client_id`) the broker keeps the
    watcher's session; mosquitto_sub reconnects by itself, so with a
    persistent broker it sees what was published while the broker was down.
    """

    def __init__(self, broker, *filters: str, qos: int = 1, client_id: str | None = None, clean_session: bool = True) -> None:
        self._broker = broker
        self._filters = filters
        self._qos = qos
        self._client_id = client_id or f"watcher-{secrets.token_hex(4)}"
        self._clean_session = clean_session
        self.messages: list[Received] = []
        self._changed = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watcher:
        if not self._filters:
            return self  # publish-only
        command = [
            # Line-buffered, or the pipe would hold the lines back.
            _client("stdbuf"), "-oL", _client("mosquitto_sub"),
            "-h", self._broker.host, "-p", str(self._broker.port), "-V", "mqttv311",
            "-i", self._client_id, "-q", str(self._qos), "-d", "-F", _FORMAT,
        ]  # fmt: skip
        if not self._clean_session:
            command.append("-c")
        for topic_filter in self._filters:
            command += ["-t", topic_filter]
        self._proc = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="test watcher")
        try:
            await asyncio.wait_for(self._subscribed.wait(), TIMEOUT)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def _collect(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for raw in self._proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line.startswith("MSG "):
                _, retain, qos, payload, topic = line.split(" ", 4)
                self.messages.append(Received(topic, bytes.fromhex(payload), retain == "1", int(qos)))
                self._changed.set()
            elif line.startswith("Subscribed (mid:"):
                self._subscribed.set()

    async def __aexit__(self, *exc_info: object) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.terminate()
            await self._proc.wait()
        if self._task is not None:
            # stdout reaches EOF once the process is gone.
            await asyncio.wait([self._task], timeout=TIMEOUT)
            if not self._task.done():
                self._task.cancel()
                await asyncio.wait([self._task])

    async def wait_for(self, predicate: Callable[[Received], bool], timeout: float = TIMEOUT, *, since: int = 0) -> Received:
        """The first message from index `since` on (received or still to come) for which `predicate` holds."""
        seen = since

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
        """Publish with mosquitto_pub; returns once it exited (for QoS 1, after the broker's PUBACK)."""
        command = [
            _client("mosquitto_pub"), "-h", self._broker.host, "-p", str(self._broker.port), "-V", "mqttv311",
            "-i", f"publisher-{secrets.token_hex(4)}", "-q", str(qos), "-t", topic,
        ]  # fmt: skip
        if retain:
            command.append("-r")
        # -n: an empty (null) message; -s: the message is stdin, binary-safe.
        command.append("-s" if payload else "-n")
        proc = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        _, stderr = await asyncio.wait_for(proc.communicate(payload if payload else None), TIMEOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"mosquitto_pub failed ({proc.returncode}): {stderr.decode(errors='replace')}")


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
