"""Pieces both connectors share, so their behaviour cannot drift apart.

The reference connector (`PyMqttConnector`, aiomqtt) and the fast one
(`cascade_fast.FastMqttConnector`) differ in how bytes move; everything a
user can observe about payloads, presence, handles, logging and counters is
defined once here.
"""

from __future__ import annotations

import logging
import os
import platform
import random
import time
from typing import Any, Awaitable, Callable, Protocol, Union, runtime_checkable

import orjson

logger = logging.getLogger("cascade.connectors.mqtt")

#: What `publish` accepts: dict/list go as JSON, the rest as they are.
Payload = Union[dict, list, bytes, bytearray, memoryview, str, None]
#: `callback(topic, data)`; a plain function or a coroutine function.
Callback = Callable[[str, Any], Union[None, Awaitable[None]]]

#: Counters every connector's `stats()` returns (connectors may add more).
STAT_KEYS = (
    "received",
    "dispatched",
    "decode_errors",
    "callback_errors",
    "published",
    "publish_errors",
    "dropped",
    "reconnects",
)

ONLINE_PAYLOAD = b'{"status":"online"}'
OFFLINE_PAYLOAD = b'{"status":"offline"}'


def status_topic(source_id: str) -> str:
    """Presence topic: birth, Last Will and graceful-offline all go here."""
    return f"cascade/status/{source_id}"


def default_source_id() -> str:
    """`{host}-{pid}`, as Cascade names its telemetry source."""
    return f"{platform.node()}-{os.getpid()}"


def encode_payload(payload: Payload) -> bytes:
    """Bytes to put on the wire for a `publish` payload.

    dict and list are JSON (orjson); bytes-like and str go as they are;
    None and empty values give an empty payload, which clears a retained
    message. Anything else is a `TypeError` at the call.
    """
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, (dict, list)):
        return orjson.dumps(payload)
    if isinstance(payload, str):
        return payload.encode("utf-8")
    if isinstance(payload, (bytearray, memoryview)):
        return bytes(payload)
    if payload is None:
        return b""
    raise TypeError(f"payload must be dict, list, bytes, bytearray, memoryview, str or None, not {type(payload).__name__}")


def decode_payload(payload: bytes) -> Any:
    """Decode a received payload once for every subscriber: empty -> ``{}``.

    Raises `orjson.JSONDecodeError` (a `ValueError`) when it is not JSON.
    """
    if not payload:
        return {}
    return orjson.loads(payload)


class RateLimitedLog:
    """Logs at most `burst` records per `interval` seconds for each key.

    Per-message failures (bad JSON, a raising callback) can come 100k times
    a second; the log says how many were suppressed instead of flooding.
    """

    __slots__ = ("_logger", "_interval", "_burst", "_windows")

    def __init__(self, log: logging.Logger = logger, interval: float = 10.0, burst: int = 5) -> None:
        self._logger = log
        self._interval = interval
        self._burst = burst
        # key -> [window start, records logged in the window, suppressed]
        self._windows: dict[str, list] = {}

    def log(self, key: str, level: int, msg: str, *args: Any, exc_info: Any = None) -> bool:
        """Log unless `key` is over its budget; returns whether it logged."""
        now = time.monotonic()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self._interval:
            suppressed = window[2] if window is not None else 0
            window = self._windows[key] = [now, 0, 0]
            if suppressed:
                self._logger.warning("%s: %d similar messages suppressed in the last %.0f s", key, suppressed, self._interval)
        if window[1] >= self._burst:
            window[2] += 1
            return False
        window[1] += 1
        self._logger.log(level, msg, *args, exc_info=exc_info)
        return True


#: A connection that lasted this long counts as a success: the reconnect
#: delays start over only then. One that dies sooner (a retained message
#: the client cannot take, another client taking the session over) keeps
#: the backoff growing, so it can never reconnect at full speed for ever.
STABLE_CONNECTION = 10.0


class Backoff:
    """Jittered exponential reconnect delays ("full jitter"), capped.

    The n-th delay is uniform in [initial/2, min(cap, initial * 2**n)], so a
    fleet that lost its broker at once does not come back at once. A CONNACK
    does not reset the sequence; a connection that stayed up
    `stable_after` seconds does (see `succeeded`).
    """

    __slots__ = ("initial", "cap", "stable_after", "_attempt", "_random", "_up_since")

    def __init__(
        self,
        initial: float = 0.1,
        cap: float = 30.0,
        *,
        rng: random.Random | None = None,
        stable_after: float = STABLE_CONNECTION,
    ) -> None:
        if initial <= 0 or cap < initial:
            raise ValueError(f"reconnect delays need 0 < initial <= cap, got initial={initial!r} cap={cap!r}")
        self.initial = initial
        self.cap = cap
        self.stable_after = stable_after
        self._attempt = 0
        self._random = rng or random.Random()
        self._up_since: float | None = None

    def next_delay(self) -> float:
        """The delay before the next attempt (after a loss, or a failed attempt)."""
        uptime = self.uptime()
        self._up_since = None
        if uptime is not None and uptime >= self.stable_after:
            self._attempt = 0
        ceiling = min(self.cap, self.initial * (2 ** min(self._attempt, 32)))
        self._attempt += 1
        return self._random.uniform(self.initial / 2, ceiling)

    def succeeded(self) -> None:
        """A connection got its CONNACK; the delays reset once it has lasted `stable_after` seconds."""
        self._up_since = time.monotonic()

    def uptime(self) -> float | None:
        """Seconds since the last `succeeded()` (None before one, or after `next_delay`)."""
        return None if self._up_since is None else time.monotonic() - self._up_since

    def reset(self) -> None:
        """Start over (a new `connect()` call)."""
        self._attempt = 0
        self._up_since = None


def log_closed_early(log: RateLimitedLog, uptime: float, reason: object, client_id: str) -> None:
    """Say why a connection the broker closed soon after accepting it is not retried at once.

    MQTT 3.1.1 §3.1.4: a broker closes an existing connection when another
    client connects with the same client id. Reconnecting at once would take
    the session back, and the two would take turns for ever.
    """
    log.log(
        "closed_early",
        logging.WARNING,
        "the broker closed the connection %.1f s after accepting it (%s): another client with client id %r "
        "may have taken the session over; reconnecting with backoff",
        uptime,
        reason or "closed",
        client_id,
    )


class SubscriptionHandle:
    """What `subscribe` returns; `await handle.unsubscribe()` ends delivery.

    Unsubscribing twice is a no-op. The connector unsubscribes from the
    broker when the last handle of a filter goes.
    """

    __slots__ = ("topic_filter", "callback", "raw", "is_coroutine", "active", "_connector", "__weakref__")

    def __init__(self, connector: Any, topic_filter: str, callback: Callback, *, raw: bool = False) -> None:
        import inspect

        self._connector = connector
        self.topic_filter = topic_filter
        self.callback = callback
        self.raw = raw
        self.is_coroutine = inspect.iscoroutinefunction(callback) or inspect.iscoroutinefunction(
            getattr(callback, "__call__", None)
        )
        self.active = True

    async def unsubscribe(self) -> None:
        if not self.active:
            return
        self.active = False
        await self._connector._remove_subscription(self)

    def __repr__(self) -> str:
        state = "active" if self.active else "unsubscribed"
        return f"<SubscriptionHandle {self.topic_filter!r} {state}>"


@runtime_checkable
class Connector(Protocol):
    """What Cascade needs from a connector; both implementations satisfy it."""

    async def connect(self) -> None: ...

    async def disconnect(self) -> None: ...

    async def publish(self, topic: str, payload: Payload, qos: int = 0, retain: bool = False) -> None: ...

    async def subscribe(self, topic_filter: str, callback: Callback) -> SubscriptionHandle: ...

    async def flush(self, timeout: float | None = None) -> None: ...

    def stats(self) -> dict[str, int]: ...
