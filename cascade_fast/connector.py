"""`FastMqttConnector`: the user-facing connector over the compiled protocol.

This is the plain-Python layer (asyncpg's ``connection.py`` to its Cython
protocol): lifecycle, the supervisor task that reconnects with backoff,
presence (Last Will, birth, graceful offline), the registry of
subscriptions, flush and stats. Bytes never pass through here: received
PUBLISH packets go from ``data_received`` through the decoder and the topic
trie to the callbacks inside `cascade_fast._protocol`, and publishes are
encoded and written there too.

Behaviour is the connector contract shared with `PyMqttConnector`.

Callbacks. Plain functions are called inline from ``data_received``. A
coroutine callback is started at once, in ``data_received`` too; when it
completes without suspending nothing is kept. When it suspends, it and
everything after it (the rest of the message's callbacks, later messages)
wait in order in a queue that one task drains, so every callback for
message N finishes before any for message N+1 starts. On Python 3.12+ the
start is ``asyncio.Task(coro, eager_start=True)``, so the first step runs
as a task like any other. On 3.10/3.11 the first step is driven by hand
(no task per message) and, until its first real suspension, runs with
``asyncio.current_task()`` None: ``asyncio.timeout()`` there raises
RuntimeError (counted in ``callback_errors``); wrap such code in
``asyncio.create_task`` or await something first. After the first
suspension the coroutine runs inside the drain task.

Implementation-specific options (keyword arguments):

``max_inflight`` (20)
    QoS 1/2 publishes awaiting acknowledgement; beyond it publish() waits
    for a slot (MQTT 3.1.1 §4.3, §4.6). 20 is paho's default and, more to
    the point, Mosquitto's default ``max_inflight_messages``, which it also
    applies to what it *receives*: past it, Mosquitto answers a QoS 1
    PUBLISH with a PUBACK and drops the message (MQTT 5 reason 0x97 "quota
    exceeded", invisible to a 3.1.1 client). Raise it only together with the
    broker's limit.
``high_water`` (10000) / ``low_water`` (high_water // 4)
    Deliveries queued behind a suspended coroutine callback at which the
    connection stops / resumes reading from the socket, so memory stays
    bounded under any flood (the broker buffers or drops, per its limits).
``write_buffer_limit`` (1 MiB)
    The transport's write-buffer high-water mark. Outgoing-buffer policy:
    a publish is always written (never dropped for a full buffer); while
    the buffer is above this mark, publish() waits, like
    `asyncio.StreamWriter.drain`, until it drains below a quarter of it.
    The wait cannot hang on a dead connection: keepalive closes it and a
    lost connection releases every waiter.
``write_batch_size`` (64 KiB)
    Publishes made in one loop iteration are written with one
    ``transport.write``; the batch is written at once when it grows past this.
``read_coalesce`` (0.001 s; 0 turns it off) / ``read_coalesce_below`` (16 KiB)
    Mosquitto writes each PUBLISH on its own, so under a flood a subscriber
    that keeps up pays a wakeup and a read per message or two, which costs
    more CPU than the message. When a read shorter than
    ``read_coalesce_below`` bytes comes less than ``read_coalesce`` seconds
    after the previous one (a flood, not an isolated message), reading
    stops for ``read_coalesce`` seconds so the next messages arrive in one
    read: at most ~1 ms of added latency, only during floods, for tens of
    times fewer reads (measured through Mosquitto: 5.4 -> 1.6 us of CPU per
    message). An isolated message is never delayed, large reads are left
    alone, and nothing is coalesced while acknowledgements are awaited
    (QoS 1/2 publishes in flight, SUBACK/UNSUBACK): they pace the window. uvloop timers have 1 ms resolution: smaller values round
    to 0 or 1 ms there.
``max_packet_size`` (1 MiB, the codec's default)
    The largest packet accepted from the broker, sized for telemetry: an
    announced 256 MiB packet must not cost 256 MiB. A larger PUBLISH is
    skipped as it arrives (its payload is never buffered), acknowledged at
    QoS 1/2 so the broker does not send it again, counted in
    ``stats()["oversized"]`` and logged; the connection stays up (a retained
    message too large would otherwise kill every connection right after
    its SUBACK). Any other packet that large is a protocol error.
``packet_timeout`` (30 s; 0 turns it off)
    How long an incomplete packet may take to arrive, from its first byte
    (or the previous complete packet): a peer trickling bytes cannot keep a
    connection and a half-read packet open for ever. Time while reading is
    paused by our own backpressure does not count. Past it the connection
    is dropped and re-established (counted in ``protocol_errors``).
``max_queued`` (10,000)
    Unacknowledged QoS 1/2 publishes kept (in flight plus waiting), also
    while disconnected; see `Session` in _protocol.pyx for the guarantee.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import warnings
import weakref
from typing import Any, Iterable

from cascade.connectors.mqtt._common import (
    OFFLINE_PAYLOAD,
    ONLINE_PAYLOAD,
    Backoff,
    Callback,
    Payload,
    RateLimitedLog,
    SubscriptionHandle,
    default_source_id,
    encode_payload,
    log_closed_early,
    logger,
    status_topic,
)

from . import codec
from ._errors import ConnectRefusedError, SubscribeRefusedError
from ._protocol import AsyncioMqttProtocol, Dispatcher, Session, Subscription
from ._topics_py import validate_filter, validate_qos
from .topics import TopicTrie

__all__ = ["FastMqttConnector"]

#: SUBACK return code for a refused subscription (MQTT 3.1.1 §3.9.3).
SUBACK_FAILURE = 0x80

_DEFAULTS: dict[str, Any] = {
    "max_inflight": 20,
    "max_queued": 10_000,
    "high_water": 10_000,
    "low_water": None,
    "write_buffer_limit": 1 << 20,
    "write_batch_size": 1 << 16,
    "max_packet_size": None,
    "read_coalesce": 0.001,
    "read_coalesce_below": 16384,
    "packet_timeout": 30.0,
}


class _Filter:
    """One topic filter subscribed at the broker, and the local subscriptions on it."""

    __slots__ = ("qos", "subs", "pending")

    def __init__(self, qos: int) -> None:
        self.qos = qos
        self.subs: list[Subscription] = []
        # Future of the SUBACK return codes while SUBSCRIBE is in flight.
        self.pending: asyncio.Future | None = None


class FastMqttConnector:
    """Cascade's MQTT connector on the compiled MQTT 3.1.1 protocol.

    Same constructor, methods and behaviour as `PyMqttConnector` (see the
    module docstring for the options only this implementation knows).
    """

    __slots__ = (
        "_hostname",
        "_port",
        "_client_id",
        "_source_id",
        "_username",
        "_password",
        "_keepalive",
        "_tls_context",
        "_clean_session",
        "_connect_timeout",
        "_backoff",
        "_options",
        "_status_topic",
        "_errlog",
        "_trie",
        "_session",
        "_dispatcher",
        "_filters",
        "_handles",
        "_protocol",
        "_supervisor",
        "_running",
        "_connect_lock",
        "_loop",
        "_reconnects",
        "_closed_early",
        "_proxy",
        "__weakref__",
    )

    def __init__(
        self,
        hostname: str = "localhost",
        port: int = 1883,
        *,
        client_id: str | None = None,
        source_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 60,
        tls_context: Any = None,
        clean_session: bool = True,
        reconnect_delay: float = 0.1,
        max_reconnect_delay: float = 30.0,
        connect_timeout: float = 10.0,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - set(_DEFAULTS))
        if unknown:
            # Switching implementations must never break a caller: warn, ignore.
            logger.warning("FastMqttConnector ignores unknown options: %s", ", ".join(unknown))
        options = {**_DEFAULTS, **{k: v for k, v in kwargs.items() if k in _DEFAULTS}}
        self._hostname = hostname
        self._port = port
        self._source_id = source_id or default_source_id()
        self._client_id = client_id or f"{self._source_id}-{secrets.token_hex(4)}"
        self._username = username
        self._password = password
        self._keepalive = keepalive
        self._tls_context = tls_context
        self._clean_session = bool(clean_session)
        self._connect_timeout = connect_timeout
        self._backoff = Backoff(reconnect_delay, max_reconnect_delay)
        self._options = options
        self._status_topic = status_topic(self._source_id)
        self._errlog = RateLimitedLog(logger)
        self._trie = TopicTrie()
        self._session = Session(
            max_inflight=options["max_inflight"],
            max_queued=options["max_queued"],
            clean_session=self._clean_session,
            encode_payload=encode_payload,
            errlog=self._errlog,
            logger=logger,
        )
        low = options["low_water"]
        self._dispatcher = Dispatcher(self._errlog, logger, options["high_water"], -1 if low is None else low)
        self._filters: dict[str, _Filter] = {}
        self._handles: dict[SubscriptionHandle, Subscription] = {}
        self._protocol: AsyncioMqttProtocol | None = None
        self._supervisor: asyncio.Task | None = None
        self._running = False
        self._connect_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reconnects = 0
        self._closed_early = 0
        # Handles reach the connector through a weak proxy: the trie (held by
        # the protocol, held by the loop) must not keep the connector alive,
        # or it could never be collected (and warned about) while connected.
        self._proxy = weakref.proxy(self)

    # -- introspection ----------------------------------------------------------

    @property
    def client_id(self) -> str:
        """The MQTT client identifier sent in CONNECT."""
        return self._client_id

    @property
    def source_id(self) -> str:
        """The source id naming this instance's presence topic."""
        return self._source_id

    @property
    def is_connected(self) -> bool:
        """True while a connection has its CONNACK."""
        proto = self._protocol
        return proto is not None and proto.connected

    def __repr__(self) -> str:
        state = "connected" if self.is_connected else ("reconnecting" if self._running else "disconnected")
        return f"<FastMqttConnector {self._client_id!r} {self._hostname}:{self._port} {state}>"

    # -- lifecycle --------------------------------------------------------------

    async def __aenter__(self) -> FastMqttConnector:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.disconnect()

    async def connect(self) -> None:
        """Connect (idempotent); later losses are reconnected automatically.

        Raises `ConnectRefusedError` for a non-zero CONNACK, `OSError` when
        the broker is unreachable and `TimeoutError` after `connect_timeout`.
        """
        if self._running:
            return
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._running:
                return
            loop = asyncio.get_running_loop()
            self._loop = loop
            self._session.set_loop(loop)
            self._dispatcher.set_loop(loop)
            self._dispatcher.reset()
            self._backoff.reset()
            proto = await self._open()
            self._backoff.succeeded()
            self._running = True
            self._session.accepting = True
            self._supervisor = loop.create_task(
                _supervise(weakref.ref(self), proto), name=f"cascade-fast supervisor {self._client_id}"
            )

    async def disconnect(self) -> None:
        """Go offline gracefully (idempotent): OFFLINE presence, pending publishes, DISCONNECT."""
        lock = self._connect_lock
        if lock is not None and lock.locked():
            # A connect() is in progress (bounded by connect_timeout): let it
            # finish, then undo it. Otherwise it would go online, and start the
            # supervisor, after this disconnect() had already returned.
            async with lock:
                pass
        supervisor, self._supervisor = self._supervisor, None
        self._running = False
        if supervisor is not None and supervisor is not asyncio.current_task():
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
        proto, self._protocol = self._protocol, None
        if proto is not None and proto.connected:
            # Clean shutdown: the broker will not send the Last Will, so say it ourselves.
            self._session.publish(self._status_topic, OFFLINE_PAYLOAD, 1, True, False)
            try:
                await self.flush(timeout=5.0)
            except TimeoutError:
                pass  # counted and logged by abandon() below
        left = self._session.abandon()
        if left:
            logger.warning("disconnect: %d unacknowledged QoS 1/2 publishes dropped (stats()['dropped'])", left)
        if proto is not None and proto.connected:
            proto.send_disconnect()
            try:
                await asyncio.wait_for(asyncio.shield(proto.closed), 1.0)
            except asyncio.TimeoutError:
                proto.abort()
        elif proto is not None:
            proto.abort()
        self._session.release_waiters()
        task = self._dispatcher.task
        if task is not None and task is asyncio.current_task():
            # Called from a callback: discard the queue, let this task finish itself.
            self._dispatcher.stop()
            self._dispatcher.reset()
        else:
            task = self._dispatcher.stop()
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
            self._dispatcher.reset()

    def __del__(self, _warn: Any = warnings.warn) -> None:
        # Like asyncio transports and asyncpg connections: a connector dropped
        # while connected leaks a socket and a task; say so, and clean up.
        if not getattr(self, "_running", False):
            return
        proto = self._protocol
        _warn(f"unclosed {self!r}; call `await connector.disconnect()` or use `async with`", ResourceWarning, source=self)
        try:
            if proto is not None:
                proto.abort()
            if self._supervisor is not None:
                self._supervisor.cancel()
        except Exception:  # the loop may already be closed
            pass

    async def _open(self) -> AsyncioMqttProtocol:
        """Connect, CONNECT/CONNACK, birth and re-subscribe, within connect_timeout."""
        try:
            return await asyncio.wait_for(self._handshake(), self._connect_timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"no connection to the MQTT broker at {self._hostname}:{self._port} within {self._connect_timeout} s"
            ) from None

    async def _handshake(self) -> AsyncioMqttProtocol:
        loop = self._loop
        proto: AsyncioMqttProtocol | None = None
        try:
            transport, proto = await loop.create_connection(
                self._new_protocol, self._hostname, self._port, ssl=self._tls_context
            )
            limit = self._options["write_buffer_limit"]
            transport.set_write_buffer_limits(high=limit, low=limit // 4)
            _, return_code = await proto.connack
            if return_code:
                raise ConnectRefusedError(return_code)
            self._protocol = proto
            await self._on_connected(proto)
            return proto
        except BaseException:
            if proto is not None:
                proto.abort()
                if self._protocol is proto:
                    self._protocol = None
            raise

    def _new_protocol(self) -> AsyncioMqttProtocol:
        opts = self._options
        return AsyncioMqttProtocol(
            self._loop,
            self._session,
            self._dispatcher,
            self._trie,
            self._connect_packet(),
            keepalive=float(self._keepalive or 0),
            write_batch=opts["write_batch_size"],
            max_packet_size=opts["max_packet_size"],
            read_coalesce=float(opts["read_coalesce"]),
            coalesce_below=int(opts["read_coalesce_below"]),
            packet_timeout=float(opts["packet_timeout"] or 0),
            errlog=self._errlog,
            logger=logger,
        )

    def _connect_packet(self) -> bytes:
        # MQTT 3.1.1 §3.1.2.5-§3.1.2.7: the Last Will is our OFFLINE presence,
        # QoS 1, retained, published by the broker if we vanish.
        password = self._password.encode("utf-8") if isinstance(self._password, str) else self._password
        return codec.encode_connect(
            self._client_id,
            clean_session=self._clean_session,
            keepalive=int(self._keepalive or 0),
            will_topic=self._status_topic,
            will_payload=OFFLINE_PAYLOAD,
            will_qos=1,
            will_retain=True,
            username=self._username,
            password=password,
        )

    async def _on_connected(self, proto: AsyncioMqttProtocol) -> None:
        """After every CONNACK: birth, then every registered filter again."""
        self._session.publish(self._status_topic, ONLINE_PAYLOAD, 1, True, False)
        if not self._filters:
            return
        filters = [(name, entry.qos) for name, entry in self._filters.items()]
        codes = await proto.subscribe(filters)
        for (name, _), code in zip(filters, codes):
            if code == SUBACK_FAILURE:
                logger.error("the broker refused the subscription to %r on reconnect; its callbacks are removed", name)
                self._drop_filter(name)

    def _connection_lost(self, reason: BaseException | None, closed_by_us: bool) -> None:
        """Called by the supervisor when the connection ended unasked."""
        self._protocol = None
        uptime = self._backoff.uptime()
        if not closed_by_us and uptime is not None and uptime < self._backoff.stable_after:
            self._closed_early += 1
            log_closed_early(self._errlog, uptime, reason, self._client_id)
            return
        self._errlog.log(
            "connection_lost", logging.WARNING, "connection to the MQTT broker lost (%s); reconnecting", reason or "closed"
        )

    # -- publish ----------------------------------------------------------------

    async def publish(self, topic: str, payload: Payload, qos: int = 0, retain: bool = False) -> None:
        """Publish `payload` (dict/list as JSON) on `topic`.

        Validates topic, QoS and payload type at the call (ValueError /
        TypeError); never raises for the connection's state (see stats()).
        Returns once the message is written or queued for the in-flight
        window; `flush()` waits for acknowledgements.
        """
        waiter = self._session.publish(topic, payload, qos, retain)
        if waiter is not None:
            await waiter

    async def publish_many(self, items: Iterable[tuple[str, Payload]], qos: int = 0, retain: bool = False) -> None:
        """Publish many ``(topic, payload)`` pairs; at QoS 0 they are encoded in one call."""
        if qos == 0:
            waiter = self._session.publish_batch(list(items), bool(retain))
            if waiter is not None:
                await waiter
            return
        for topic, payload in items:
            waiter = self._session.publish(topic, payload, qos, retain)
            if waiter is not None:
                await waiter

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every publish so far is acknowledged (QoS 1/2) and written (QoS 0).

        Raises TimeoutError after `timeout` seconds (None: 30 s).
        """
        loop = asyncio.get_running_loop()
        limit = 30.0 if timeout is None else float(timeout)
        deadline = loop.time() + limit
        acked = self._session.acknowledged()
        if acked is not None:
            try:
                await asyncio.wait_for(asyncio.shield(acked), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                acked.cancel()  # nobody waits on it now: the session may forget it
                raise TimeoutError(
                    f"flush: {self._session.queued_count} publishes not acknowledged within {limit} s"
                ) from None
        # asyncio has no event for "write buffer empty": poll, briefly.
        delay = 0.0005
        while True:
            proto = self._session.protocol
            if proto is None or not proto.write_pending:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"flush: {proto.write_pending} bytes not written within {limit} s")
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.01)

    # -- subscribe --------------------------------------------------------------

    async def subscribe(
        self, topic_filter: str, callback: Callback, *, qos: int = 1, raw: bool = False
    ) -> SubscriptionHandle:
        """Call ``callback(topic, data)`` for every message matching `topic_filter`.

        `data` is the decoded JSON payload, or the payload bytes with
        ``raw=True``. Raises ValueError for a bad filter or QoS, and
        `SubscribeRefusedError` when the broker answers SUBACK 0x80.
        """
        validate_filter(topic_filter)
        qos = validate_qos(qos)
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        handle = SubscriptionHandle(self._proxy, topic_filter, callback, raw=raw)
        sub = Subscription(callback, handle, bool(raw))
        entry = self._filters.get(topic_filter)
        new = entry is None
        if entry is None:
            entry = self._filters[topic_filter] = _Filter(qos)
        entry.subs.append(sub)
        self._handles[handle] = sub
        self._trie.add(topic_filter, sub)
        proto = self._protocol
        if proto is None or not proto.connected:
            return handle  # sent with the others after the next CONNACK
        if new:
            entry.pending = proto.subscribe([(topic_filter, qos)])
        fut = entry.pending
        if fut is None:
            return handle  # already acknowledged by the broker
        try:
            codes = await asyncio.shield(fut)
        except ConnectionError:
            return handle  # lost before SUBACK: re-subscribed after the reconnect
        except asyncio.CancelledError:
            # The caller has no handle to end it: a cancelled subscribe() leaves nothing behind.
            self._forget(handle)
            raise
        finally:
            if entry.pending is fut and fut.done():
                entry.pending = None
        if codes and codes[0] == SUBACK_FAILURE:
            self._drop_filter(topic_filter)
            raise SubscribeRefusedError(topic_filter)
        return handle

    async def _remove_subscription(self, handle: SubscriptionHandle) -> None:
        """`handle.unsubscribe()`: stop delivery now; UNSUBSCRIBE with the filter's last handle."""
        unsubscribed = self._forget(handle)
        if unsubscribed is not None:
            try:
                await unsubscribed
            except ConnectionError:
                pass  # the new connection will not subscribe it again

    def _forget(self, handle: SubscriptionHandle) -> asyncio.Future | None:
        """Stop delivery to `handle` now; UNSUBSCRIBE with the filter's last handle (its UNSUBACK future)."""
        handle.active = False
        sub = self._handles.pop(handle, None)
        if sub is None:
            return None
        sub.active = False
        name = handle.topic_filter
        self._trie.remove(name, sub)
        entry = self._filters.get(name)
        if entry is None:
            return None
        if sub in entry.subs:
            entry.subs.remove(sub)
        if entry.subs:
            return None
        del self._filters[name]
        proto = self._protocol
        if proto is None or not proto.connected:
            return None
        unsubscribed = proto.unsubscribe([name])
        unsubscribed.add_done_callback(_retrieve)
        return unsubscribed

    def _drop_filter(self, name: str) -> None:
        """Forget every subscription on `name` (refused by the broker)."""
        entry = self._filters.pop(name, None)
        if entry is None:
            return
        for sub in entry.subs:
            sub.active = False
            sub.handle.active = False
            self._handles.pop(sub.handle, None)
            self._trie.remove(name, sub)

    # -- stats ------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters since construction (the contract's keys plus this implementation's)."""
        d = self._dispatcher
        s = self._session
        proto = self._protocol
        return {
            "received": d.received,
            "dispatched": d.dispatched,
            "decode_errors": d.decode_errors,
            "callback_errors": d.callback_errors,
            "published": s.published,
            "queued": s.queued_count,
            "publish_errors": s.publish_errors,
            "dropped": s.dropped,
            "reconnects": self._reconnects,
            "closed_early": self._closed_early,
            "queue_depth": d.depth,
            "connected": int(proto is not None and proto.connected),
            "protocol_errors": s.protocol_errors,
            "inflight": s.inflight_count,
            "backlog": s.backlog_count,
            "resent": s.resent,
            "reads": s.reads,
            "paused": int(d.reading_paused),
            "pauses": d.pauses,
            "write_paused": int(proto is not None and proto.writing_paused),
            "undelivered": d.undelivered,
            "oversized": d.oversized,
            "subscriptions": len(self._handles),
        }


def _retrieve(future: asyncio.Future) -> None:
    """Mark a future's exception retrieved (nobody may await an UNSUBACK)."""
    if not future.cancelled():
        future.exception()


async def _supervise(ref: weakref.ReferenceType, proto: AsyncioMqttProtocol) -> None:
    """The connector's one background task: wait for the connection to end, reconnect.

    Holds the connector only by weak reference between steps, so a connector
    dropped while connected can be collected (and warns).
    """
    while True:
        closed = proto.closed
        # Shielded: cancelling the supervisor must not cancel the protocol's future.
        reason = await asyncio.shield(closed)
        closed_by_us = proto.close_reason is not None
        proto = None
        conn = ref()
        if conn is None or not conn._running:
            return
        conn._connection_lost(reason, closed_by_us)
        while True:
            delay = conn._backoff.next_delay()
            conn = None
            await asyncio.sleep(delay)
            conn = ref()
            if conn is None or not conn._running:
                return
            try:
                proto = await conn._open()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                conn._errlog.log(
                    "reconnect_failed",
                    logging.WARNING,
                    "reconnecting to %s:%s failed: %s",
                    conn._hostname,
                    conn._port,
                    exc,
                )
                continue
            if not conn._running:
                # disconnect() ran meanwhile; on Python < 3.12 its cancel can be
                # swallowed by wait_for() when _open() finished at the same moment.
                return
            conn._reconnects += 1
            conn._backoff.succeeded()
            logger.info("reconnected to the MQTT broker at %s:%s", conn._hostname, conn._port)
            conn = None
            break
