"""`PyMqttConnector`: the pure-Python reference connector, on aiomqtt 2.x.

This is the baseline Cascade users have today, made correct and complete:
it defines, together with the behaviour test suite, what the compiled
`cascade_fast.FastMqttConnector` must do. It stays deliberately plain (one
supervisor task, one aiomqtt client per connection, the pure-Python topic
trie) so that it is easy to trust; speed is the fast connector's job.

Layout (asyncpg's split between `Connection` and its protocol): the public
`PyMqttConnector` is a thin handle over an `_Engine` that owns all state and
the supervisor task. The task references only the engine, so a connector the
user forgot to disconnect can still be garbage collected; its `__del__` then
emits a `ResourceWarning` and aborts the engine (the broker publishes the
Last Will), as asyncio transports do.

Where aiomqtt's behaviour does not fit the contract, the connector works
around it; each workaround says why at the place it is made:

- aiomqtt's `publish()` waits for PUBACK (QoS 1) or for the write (QoS 0),
  one round trip per call; publishing is fire-and-forget here, so we call the
  wrapped paho client's non-blocking `publish()` and learn from paho's
  chained `on_publish` which publishes were written or acknowledged.
- paho re-sends unacknowledged QoS 1/2 publishes after a reconnect, but only
  within one paho client, and a fresh client is made per connection (below).
  The connector therefore keeps every QoS 1/2 publish itself (topic, payload,
  QoS, retain) until the broker acknowledges it, and publishes the whole
  queue again, in order, on each new connection.
- aiomqtt reports every connect failure as `MqttError(str(exc))` raised
  ``from None``; the original `OSError` is still in ``__context__`` and is
  re-raised so callers can catch `ConnectionError`/`OSError`/`TimeoutError`.
- aiomqtt registers the socket writer from a deferred callback, which fails
  with EBADF when the connection dropped meanwhile; ours checks first.
- paho parses leniently (it delivers a PUBLISH with U+0000 in its topic,
  accepts a second CONNACK, retries a refused CONNACK with MQTT 3.1) and
  aiomqtt ignores a disconnection before CONNACK (connect() then waits for
  the whole timeout): `_paho_guard.PacketGuard` runs every packet through
  the project's decoder before paho handles it, and paho's on_disconnect is
  chained to fail the CONNACK wait at once (`_watch_handshake`).
- A CONNACK that never comes leaves aiomqtt's socket open, and a client whose
  connection was lost keeps a `_connected` future that is already done (so
  re-entering it would not wait for the next CONNACK); a fresh
  `aiomqtt.Client` is therefore made for every connection attempt, and a
  failed or lost one is closed hard.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
import ssl
import warnings
import weakref
from typing import Any, Callable

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError, MqttError

from cascade_fast import codec
from cascade_fast._errors import ConnectRefusedError, ProtocolError, SubscribeRefusedError
from cascade_fast._topics_py import MAX_REMAINING_LENGTH, TopicTrie, validate_filter, validate_payload_size, validate_qos, validate_topic

from ._common import (
    OFFLINE_PAYLOAD,
    ONLINE_PAYLOAD,
    STAT_KEYS,
    Backoff,
    Callback,
    Payload,
    RateLimitedLog,
    SubscriptionHandle,
    decode_payload,
    default_source_id,
    encode_payload,
    log_closed_early,
    logger,
    status_topic,
)
from ._paho_guard import PacketGuard

__all__ = ["PyMqttConnector"]

#: paho turns a MQTT 3.1.1 CONNACK return code into an MQTT 5 reason code
#: (`paho.mqtt._packet.convert_connack_rc_to_reason_code`); map it back by
#: name so `ConnectRefusedError.return_code` is the 3.1.1 value (§3.2.2.3).
_CONNACK_RETURN_CODES = {
    "Unsupported protocol version": 1,
    "Client identifier not valid": 2,
    "Server unavailable": 3,
    "Bad user name or password": 4,
    "Not authorized": 5,
}

#: aiomqtt.Client options the connector sets itself; passing them in
#: ``**kwargs`` would silently change presence or identity, so they are
#: ignored with the unknown ones.
_MANAGED_OPTIONS = frozenset(
    {
        "hostname",
        "port",
        "username",
        "password",
        "identifier",
        "will",
        "clean_session",
        "keepalive",
        "tls_context",
        "timeout",
        # MQTT 3.1.1 only: the packet validation (_paho_guard) is 3.1.1's.
        "protocol",
        # The connector bounds outgoing QoS 1/2 messages itself (max_queued).
        "max_queued_outgoing_messages",
    }
)
#: Everything else aiomqtt.Client accepts is passed through.
_PASSTHROUGH_OPTIONS = frozenset(inspect.signature(aiomqtt.Client.__init__).parameters) - {"self"} - _MANAGED_OPTIONS

#: Unknown option names already warned about (the warning is logged once per
#: process and name, so a fleet of connectors does not repeat it).
_warned_options: set[str] = set()

#: Unwritten QoS 0 publishes beyond which `publish()` waits: backpressure
#: instead of unbounded memory.
_MAX_UNWRITTEN = 1000
#: Default bound of the QoS 1/2 queue (``max_queued``): unacknowledged
#: messages, in flight plus waiting (contract).
DEFAULT_MAX_QUEUED = 10_000
#: `disconnect()` waits at most this long for pending publishes (contract).
_DISCONNECT_FLUSH_TIMEOUT = 5.0
#: `flush(None)` waits at most this long (contract).
_DEFAULT_FLUSH_TIMEOUT = 30.0
#: SUBACK codes at or above this are failures (MQTT 3.1.1 §3.9.3: 0x80).
_SUBACK_FAILURE = 0x80


class _ConnackTimeout(TimeoutError):
    """paho closed the connection for keepalive before CONNACK (raised to callers as TimeoutError)."""


def _mark_retrieved(future: asyncio.Future[Any]) -> None:
    """Done callback: read the outcome, so an unread exception is never logged."""
    if not future.cancelled():
        future.exception()


def _being_cancelled() -> bool:
    """Whether the current task was asked to stop (Python < 3.11 cannot tell: assume so)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0


def _suback_code(code: Any) -> int:
    """An int from whatever aiomqtt returned for one filter (a paho ReasonCode or an int)."""
    return int(getattr(code, "value", code))


class _Queued:
    """One QoS 1/2 publish, kept until the broker acknowledges it (whatever connection that takes)."""

    __slots__ = ("topic", "data", "qos", "retain", "sent")

    def __init__(self, topic: str, data: bytes, qos: int, retain: bool) -> None:
        self.topic = topic
        self.data = data
        self.qos = qos
        self.retain = retain
        # Handed to some connection already: `published` counts it once.
        self.sent = False


class _Engine:
    """State and background work of one connector; the supervisor task references only this.

    Owns the topic trie and the subscriptions, the counters, the current
    aiomqtt client and the publishes awaiting confirmation. Runs on one event
    loop: nothing here is thread-safe, nor needs to be.
    """

    def __init__(
        self,
        *,
        hostname: str,
        port: int,
        client_id: str,
        source_id: str,
        username: str | None,
        password: str | None,
        keepalive: int,
        tls_context: ssl.SSLContext | None,
        clean_session: bool,
        reconnect_delay: float,
        max_reconnect_delay: float,
        connect_timeout: float,
        max_queued: int,
        max_packet_size: int | None,
        client_options: dict[str, Any],
    ) -> None:
        # Fail at construction, not at the first reconnect, on bad delays.
        Backoff(reconnect_delay, max_reconnect_delay)
        if isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued < 1:
            raise ValueError(f"max_queued must be a positive int, not {max_queued!r}")
        self._max_queued = max_queued
        self.hostname = hostname
        self.port = port
        self.client_id = client_id
        self.source_id = source_id
        self.status_topic = status_topic(source_id)
        self._username = username
        self._password = password
        self._keepalive = keepalive
        self._tls_context = tls_context
        self._clean_session = clean_session
        self._reconnect_delay = reconnect_delay
        self._max_reconnect_delay = max_reconnect_delay
        self._connect_timeout = connect_timeout
        # paho reads every packet whole and cannot skip one, so by default
        # the reference accepts every size MQTT allows (§2.2.3), as paho does.
        self._max_packet_size = MAX_REMAINING_LENGTH if max_packet_size is None else max_packet_size
        # Fail at construction on a bad limit, as for the delays.
        codec.Decoder(self._max_packet_size)
        self._client_options = client_options

        self._counters: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        # Connections closed for a packet MQTT 3.1.1 says must be rejected.
        self._counters["protocol_errors"] = 0
        # Connections the broker closed soon after CONNACK (a takeover?).
        self._counters["closed_early"] = 0
        self._log = RateLimitedLog(logger)

        # Local subscriptions: the trie maps each filter to its handles (in
        # subscription order, which is the order callbacks are called in);
        # `_filters` keeps the same handles per filter for bookkeeping.
        self._trie = TopicTrie()
        self._filters: dict[str, list[SubscriptionHandle]] = {}
        self._filter_qos: dict[str, int] = {}
        # Filters the broker acknowledged on the current connection, and the
        # SUBSCRIBEs in flight (filter -> future of {filter: SUBACK code}).
        self._acked: set[str] = set()
        self._inflight_sub: dict[str, asyncio.Future[dict[str, int | None]]] = {}

        # The client of the current connection, set from CONNACK until loss.
        self._client: aiomqtt.Client | None = None
        # The same client once it has been handed the queue below (after
        # CONNACK and re-subscription): new QoS 1/2 publishes go straight to
        # it; before that they wait in the queue, behind the older ones.
        self._ready: aiomqtt.Client | None = None
        # QoS 1/2 publishes not yet acknowledged, in publish order: sequence
        # number -> message. They outlive connections and are published
        # again on every new one; the supervisor drops (and counts) what is
        # left when it ends.
        self._outbox: dict[int, _Queued] = {}
        self._next_seq = 0
        # mid -> sequence number of the queued messages handed to the current connection.
        self._mids: dict[int, int] = {}
        # mid -> paho MQTTMessageInfo of QoS 0 publishes not yet written
        # (lost with their connection, MQTT 3.1.1 §4.3.1).
        self._unwritten: dict[int, paho.MQTTMessageInfo] = {}
        # Resolved (and replaced) whenever a publish is confirmed or lost.
        self._progress: asyncio.Future[None] | None = None

        self._supervisor: asyncio.Task[None] | None = None
        self._first_connect: asyncio.Future[None] | None = None
        self._closing = False
        self._aborted = False
        # disconnect() was awaited by a callback (inside the supervisor task,
        # which cannot wait for itself): the supervisor ends once the
        # callback returns, without dispatching or reconnecting.
        self._stopped_by_callback = False

    # ------------------------------------------------------------------ state

    @property
    def running(self) -> bool:
        """Whether the supervisor task is alive (connected, connecting or backing off)."""
        return self._supervisor is not None and not self._supervisor.done()

    @property
    def connected(self) -> bool:
        return self._client is not None

    def stats(self) -> dict[str, int]:
        stats = dict(self._counters)
        client = self._client
        # Deliveries received but not yet dispatched: they wait in aiomqtt's
        # queue while a coroutine callback runs.
        stats["queue_depth"] = len(client.messages) if client is not None else 0
        stats["connected"] = int(client is not None)
        stats["queued"] = len(self._outbox)
        stats["subscriptions"] = sum(len(handles) for handles in self._filters.values())
        return stats

    # -------------------------------------------------------------- lifecycle

    async def connect(self) -> None:
        task = self._supervisor
        if task is not None and not task.done():
            if not self._closing:
                # Connected or connecting: share the first attempt's outcome.
                assert self._first_connect is not None
                await asyncio.shield(self._first_connect)
                return
            # A disconnect() is in progress: let it finish, then start anew.
            if task is asyncio.current_task():
                raise RuntimeError("connect() from the callback that called disconnect(): call it after the callback returns")
            await asyncio.wait([task])
        loop = asyncio.get_running_loop()
        first = loop.create_future()
        # Mark the outcome as retrieved even if the caller is gone by then,
        # so asyncio never logs "Future exception was never retrieved".
        first.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._first_connect = first
        self._aborted = False
        self._supervisor = task = loop.create_task(
            self._supervise(first), name=f"cascade.mqtt supervisor {self.client_id}"
        )
        try:
            await asyncio.shield(first)
        except BaseException:
            # The first attempt failed (the supervisor has returned) or our
            # caller was cancelled (stop the attempt): either way no task is
            # left behind.
            if not task.done():
                task.cancel()
            await asyncio.wait([task])
            if self._supervisor is task:
                self._supervisor = None
            raise

    async def disconnect(self) -> None:
        task = self._supervisor
        if task is None:
            return
        if task is asyncio.current_task():
            # Awaited by a callback, which runs in the supervisor task.
            await self._disconnect_from_callback()
            return
        if self._closing:
            # Another disconnect() is doing the work; wait for it.
            await asyncio.wait([task])
            return
        self._closing = True
        try:
            if not task.done():
                await self._drain()
        finally:
            # The supervisor's cleanup sends DISCONNECT and closes the socket
            # (and counts what is still queued as dropped).
            if not task.done():
                task.cancel()
            await asyncio.wait([task])
            if self._supervisor is task:
                self._supervisor = None
            self._closing = False
            if not task.cancelled() and task.exception() is not None:
                logger.error("supervisor of %s ended with an error", self.client_id, exc_info=task.exception())

    async def _drain(self) -> None:
        """disconnect()'s wait (5 s in all): the queue acknowledged, then ``offline`` announced.

        The queue is waited for even while disconnected: a reconnect within
        the bound still delivers it. ``offline`` goes last, on whatever
        connection is up by then.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _DISCONNECT_FLUSH_TIMEOUT
        try:
            await self.flush(_DISCONNECT_FLUSH_TIMEOUT)
        except TimeoutError as exc:
            logger.debug("disconnect from %s:%d: %s", self.hostname, self.port, exc)
        client = self._client
        if client is None:
            return
        # A Last Will is not sent on a clean DISCONNECT (MQTT 3.1.1 §3.14.4),
        # so watchers learn of it from this instead.
        offline = self._send_presence(client, OFFLINE_PAYLOAD)
        if offline is not None:
            await self._wait_until(lambda: offline.is_published() or self._client is not client, deadline)

    async def _disconnect_from_callback(self) -> None:
        """disconnect() inside a callback: close the connection now, end the supervisor after the callback.

        The supervisor task runs the callback, so it can neither be
        cancelled (the callback would get CancelledError from its own
        disconnect()) nor waited for. The connection is closed here, cleanly
        (offline presence, pending publishes, DISCONNECT); the supervisor
        then stops dispatching and returns instead of reconnecting.
        """
        if self._closing:
            return
        self._closing = True
        self._stopped_by_callback = True
        client = self._client
        if client is None:
            return
        await self._drain()
        self._connection_lost(client)
        await self._close(client, graceful=not self._aborted)

    def abort(self) -> None:
        """Stop without DISCONNECT (so the broker sends the Last Will); safe from `__del__`."""
        self._aborted = True
        task = self._supervisor
        if task is None or task.done():
            return
        loop = task.get_loop()
        if not loop.is_closed():
            # __del__ may run on any thread, at any point of the loop.
            loop.call_soon_threadsafe(task.cancel)

    # ------------------------------------------------------------- supervisor

    async def _supervise(self, first_connect: asyncio.Future[None]) -> None:
        """Connect, dispatch until the connection is lost, back off, repeat; until cancelled.

        The only owner of the aiomqtt clients: every client is opened and
        closed here, so a connection can never outlive the task.
        """
        backoff = Backoff(self._reconnect_delay, self._max_reconnect_delay)
        try:
            while True:
                client = self._new_client()
                try:
                    await self._open(client)
                except Exception as exc:
                    if not first_connect.done():
                        # The first failure belongs to the connect() caller.
                        first_connect.set_exception(exc)
                        return
                    self._log.log(
                        "reconnect-failed",
                        logging.WARNING,
                        "reconnect to %s:%d failed: %s",
                        self.hostname,
                        self.port,
                        exc,
                    )
                    await asyncio.sleep(backoff.next_delay())
                    continue
                # Not a reset: only a connection that lasts resets the delays.
                backoff.succeeded()
                protocol_errors = self._counters["protocol_errors"]
                if first_connect.done():
                    self._counters["reconnects"] += 1
                    logger.info("reconnected to %s:%d as %s", self.hostname, self.port, self.client_id)
                lost: BaseException | None = None
                try:
                    try:
                        await self._on_connack(client)
                    except (ConnectionError, MqttError) as exc:
                        lost = exc
                    else:
                        if not first_connect.done():
                            first_connect.set_result(None)
                        lost = await self._message_loop(client)
                finally:
                    self._connection_lost(client)
                    await self._close(client, graceful=lost is None and not self._aborted)
                if self._stopped_by_callback:
                    return
                # Before anything the next connection brings, in arrival order.
                await self._dispatch_received(client)
                if not first_connect.done():
                    # The first connection broke before it was usable.
                    first_connect.set_exception(lost)
                    return
                uptime = backoff.uptime()
                if uptime is not None and uptime < backoff.stable_after and protocol_errors == self._counters["protocol_errors"]:
                    self._counters["closed_early"] += 1
                    log_closed_early(self._log, uptime, lost, self.client_id)
                else:
                    logger.warning("connection to %s:%d lost (%s); reconnecting", self.hostname, self.port, lost)
                await asyncio.sleep(backoff.next_delay())
        finally:
            if self._stopped_by_callback:
                # That disconnect() is complete: the connector may connect anew.
                self._stopped_by_callback = False
                self._closing = False
            if not first_connect.done():
                # disconnect() or abort() while the first attempt was running.
                first_connect.set_exception(ConnectionError("the connector was closed while connecting"))
            self._drop_queue()

    def _new_client(self) -> aiomqtt.Client:
        """A fresh aiomqtt client with our Last Will, for one connection attempt."""
        client = aiomqtt.Client(
            self.hostname,
            self.port,
            username=self._username,
            password=self._password,
            identifier=self.client_id,
            # Presence: the broker publishes this if we vanish without DISCONNECT.
            will=aiomqtt.Will(self.status_topic, OFFLINE_PAYLOAD, qos=1, retain=True),
            clean_session=self._clean_session,
            keepalive=self._keepalive,
            tls_context=self._tls_context,
            # aiomqtt's timeout bounds the CONNACK wait (and SUBACK/UNSUBACK).
            timeout=self._connect_timeout,
            protocol=aiomqtt.ProtocolVersion.V311,
            **self._client_options,
        )
        inner = client._client  # the wrapped paho client (see the module docstring)
        # paho's own TCP connect timeout (default 5 s) follows ours.
        inner.connect_timeout = self._connect_timeout
        guard = PacketGuard(inner, self._max_packet_size, self._on_protocol_error)
        self._watch_handshake(client, guard)
        # Chain paho's on_publish: aiomqtt keeps its own bookkeeping, we learn
        # which fire-and-forget publishes were written or acknowledged.
        aiomqtt_on_publish = inner.on_publish
        on_confirmed = self._on_publish_confirmed

        def on_publish(c: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
            aiomqtt_on_publish(c, userdata, mid, reason_code, properties)
            on_confirmed(client, mid)

        inner.on_publish = on_publish
        inner.on_socket_register_write = self._guarded_register_write(client)
        return client

    def _on_protocol_error(self, error: ProtocolError) -> None:
        """The packet guard found a violation; paho closes the connection next."""
        self._counters["protocol_errors"] += 1
        self._log.log(
            "protocol-error",
            logging.ERROR,
            "MQTT protocol error from %s:%d, closing the connection: %s",
            self.hostname,
            self.port,
            error,
        )

    def _watch_handshake(self, client: aiomqtt.Client, guard: PacketGuard) -> None:
        """Fail the CONNACK wait as soon as the connection closes before CONNACK.

        aiomqtt ignores a disconnection before CONNACK (its on_disconnect
        returns early), so connect() would wait for the whole timeout and
        raise a bare TimeoutError, and a reconnect attempt whose socket paho
        had already closed would hold the supervisor for connect_timeout
        even after the broker came back. paho's on_disconnect is chained:
        when the CONNACK wait is still open, it fails with the reason the
        guard saw (a refusal, a protocol error), paho's keepalive (paho
        applies it to the CONNACK wait too: a limit of the reference, the
        wait ends at the earlier of connect_timeout and about keepalive +
        1 s), or the broker having closed.
        """
        inner = client._client
        aiomqtt_on_disconnect = inner.on_disconnect
        hostname, port, keepalive = self.hostname, self.port, self._keepalive

        def fail_connack_wait(reason: Any) -> None:
            waiter = client._connected
            if waiter.done() or guard.return_code == 0:
                # Answered, or accepted (aiomqtt replaces the future later).
                return
            error: OSError
            if guard.return_code:
                error = ConnectRefusedError(guard.return_code)
            elif getattr(reason, "getName", lambda: None)() == "Keep alive timeout":
                error = _ConnackTimeout(f"no CONNACK from {hostname}:{port} within {keepalive} s (keepalive)")
            elif guard.error is not None:
                error = ConnectionError(f"protocol error from {hostname}:{port} before CONNACK: {guard.error}")
                error.__cause__ = guard.error
            else:
                error = ConnectionError(f"the broker at {hostname}:{port} closed the connection before CONNACK")
            waiter.add_done_callback(_mark_retrieved)
            waiter.set_exception(error)

        def on_disconnect(c: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
            aiomqtt_on_disconnect(c, userdata, flags, reason_code, properties)
            # paho may report from the executor thread that connects.
            client._loop.call_soon_threadsafe(fail_connack_wait, reason_code)

        inner.on_disconnect = on_disconnect

    @staticmethod
    def _guarded_register_write(client: aiomqtt.Client) -> Any:
        """paho's on_socket_register_write, as aiomqtt's but safe against a socket closed meanwhile.

        aiomqtt defers ``loop.add_writer(fd)`` with call_soon_threadsafe
        (paho may call from the executor thread that connects). When the
        connection drops before the deferred call runs, add_writer hits a
        closed (or, worse, reused) file descriptor and the loop's exception
        handler reports EBADF. The deferred call here first checks that the
        socket is still the client's and still has bytes to write.
        """
        loop = client._loop

        def register_write(paho_client: paho.Client, userdata: Any, sock: Any) -> None:
            def on_writable() -> None:
                # As aiomqtt: a write error means the connection broke.
                try:
                    paho_client.loop_write()
                except Exception as exc:
                    if not client._disconnected.done():
                        client._disconnected.set_exception(exc)

            def register() -> None:
                # Closed meanwhile: nothing to do. Written meanwhile (paho
                # then unregistered already): a writer added now would spin.
                if paho_client.socket() is not sock or not paho_client.want_write():
                    return
                try:
                    loop.add_writer(sock.fileno(), on_writable)
                except RuntimeError as exc:
                    # uvloop: the descriptor's poll handle is dead (libuv
                    # reports POLLERR as EBADF, uvloop closes the handle but
                    # keeps it registered until remove_reader). The socket is
                    # broken: close it, which also drops the dead handle, and
                    # wake whoever waits on this connection.
                    error = ConnectionError(f"socket poll failed: {exc}")
                    paho_client._sock_close()
                    for waiter in (client._connected, client._disconnected):
                        if not waiter.done():
                            waiter.set_exception(error)
                            break

            loop.call_soon_threadsafe(register)

        return register_write

    async def _open(self, client: aiomqtt.Client) -> None:
        """Connect `client`, turning aiomqtt's errors into the contract's exceptions."""
        # aiomqtt keeps the reason of a connection loss in `_disconnected`
        # and only its message iterator reads it; a loss between CONNACK and
        # the end of __aenter__ is even dropped by replacing the future. Mark
        # every such future retrieved, so asyncio never logs "Future
        # exception was never retrieved" for a loss we handle anyway.
        original = client._disconnected
        original.add_done_callback(_mark_retrieved)
        try:
            await client.__aenter__()
        except OSError:
            # Closed, refused or timed out before CONNACK (see _watch_handshake).
            self._close_hard(client)
            raise
        except MqttConnectError as exc:
            code = exc.rc
            if hasattr(code, "getName"):  # a paho ReasonCode
                return_code = _CONNACK_RETURN_CODES.get(code.getName(), code.value)
            else:
                return_code = int(code or 0)
            raise ConnectRefusedError(return_code) from None
        except MqttError as exc:
            # Whether the TCP connection was made (before it is closed below).
            tcp_connected = client._client.socket() is not None
            # aiomqtt leaves the socket open when CONNACK does not come in
            # time, or when sending CONNECT failed after the TCP connect (a
            # broker going down); its reader stays registered on the loop, and
            # once the socket is garbage collected a new connection reusing
            # the descriptor number finds a dead poll handle (uvloop: "the
            # handler is closed"). Close it here, whatever went wrong.
            self._close_hard(client)
            # aiomqtt raises MqttError(str(os_error)) from None; the OSError
            # (ConnectionRefusedError, socket timeout, DNS failure) is kept in
            # __context__ and is what the contract promises the caller.
            # A timeout says what timed out and where (aiomqtt's CONNACK wait
            # leaves a bare asyncio TimeoutError in __context__).
            cause = exc.__context__
            if isinstance(cause, _ConnackTimeout):
                # Ours (_watch_handshake), which aiomqtt took for its own timeout.
                raise TimeoutError(str(cause)) from None
            if isinstance(cause, TimeoutError) or "timed out" in str(exc):
                what = "no CONNACK from" if tcp_connected else "TCP connect to"
                raise TimeoutError(
                    f"{what} {self.hostname}:{self.port} within {self._connect_timeout:g} s (connect_timeout)"
                ) from None
            if isinstance(cause, OSError):
                raise cause from None
            raise ConnectionError(f"cannot connect to {self.hostname}:{self.port}: {exc}") from None
        if client._disconnected is not original:
            client._disconnected.add_done_callback(_mark_retrieved)
        if not client._client.is_connected():
            # Lost between CONNACK and here (a session takeover, say): aiomqtt
            # forgot the loss, and its message iterator would wait forever on
            # a connection that is gone. Count it as a failed attempt.
            self._close_hard(client)
            raise ConnectionError(f"connection to {self.hostname}:{self.port} lost right after CONNACK")

    async def _on_connack(self, client: aiomqtt.Client) -> None:
        """After every CONNACK: announce presence, re-subscribe every filter, send the queue, and check the first two were answered.

        The broker's PUBACK for the birth message and its SUBACK prove the
        connection works both ways. Without them (within connect_timeout)
        the connection is unusable even though CONNACK came (seen with
        aiomqtt on uvloop when a socket's poll handle dies), and
        ConnectionError makes the supervisor reconnect instead of keeping a
        connection that will never deliver.
        """
        self._client = client
        self._acked.clear()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._connect_timeout
        birth = self._send_presence(client, ONLINE_PAYLOAD)
        filters = list(self._filters)
        results = await self._broker_subscribe(client, filters) if filters else {}
        if any(code is None for code in results.values()):
            raise ConnectionError(f"no SUBACK from {self.hostname}:{self.port} within {self._connect_timeout:g} s")
        for topic_filter, code in results.items():
            if code is not None and code >= _SUBACK_FAILURE:
                # Nobody to raise to: the callbacks stay registered and the
                # filter is tried again on the next connection.
                logger.error(
                    "broker %s:%d refused the re-subscription to %r (SUBACK 0x%02x); retried on the next reconnect",
                    self.hostname,
                    self.port,
                    topic_filter,
                    code,
                )
        if birth is None or self._client is not client:
            raise ConnectionError(f"connection to {self.hostname}:{self.port} lost right after CONNACK")
        self._send_queue(client)
        await self._wait_until(lambda: birth.is_published() or self._client is not client, deadline)
        if not birth.is_published():
            raise ConnectionError(f"no PUBACK from {self.hostname}:{self.port} within {self._connect_timeout:g} s")

    async def _message_loop(self, client: aiomqtt.Client) -> BaseException | None:
        """Dispatch messages in arrival order until the connection is lost; returns why (None: disconnect() from a callback)."""
        try:
            async for message in client.messages:
                await self._dispatch(message.topic.value, message.payload)
                if self._stopped_by_callback:
                    return None
        except MqttError as exc:
            return exc
        return ConnectionError("message iterator ended")  # pragma: no cover - aiomqtt never ends it

    async def _dispatch_received(self, client: aiomqtt.Client) -> None:
        """Dispatch what the lost connection received but aiomqtt had not handed out yet.

        paho acknowledged these QoS 1 messages on arrival (MQTT 3.1.1
        §4.3.2), so the broker will not send them again, even to a
        persistent session: dropped here, they would be lost.
        """
        queue = client._queue  # aiomqtt's message queue (its iterator stops at the loss)
        while not queue.empty():
            message = queue.get_nowait()
            await self._dispatch(message.topic.value, message.payload)

    def _connection_lost(self, client: aiomqtt.Client) -> None:
        """Forget the connection's state: unwritten QoS 0 publishes are lost (and counted), the queue stays."""
        if self._client is client:
            self._client = None
            self._ready = None
            # The queued messages are published again on the next connection.
            self._mids.clear()
        self._acked.clear()
        lost = len(self._unwritten)
        if lost:
            # QoS 0 promises at most once (MQTT 3.1.1 §4.3.1): gone with the connection.
            self._counters["publish_errors"] += lost
            self._log.log(
                "publish-lost",
                logging.WARNING,
                "%d QoS 0 publishes were not written before the connection to %s:%d closed",
                lost,
                self.hostname,
                self.port,
            )
            self._unwritten.clear()
        if self._outbox and not self._closing:
            logger.info("%d unacknowledged QoS 1/2 publishes are kept for the next connection", len(self._outbox))
        self._wake()

    def _drop_queue(self) -> None:
        """The supervisor ends: whatever is still queued will never be sent; count and log it."""
        left = len(self._outbox)
        self._outbox.clear()
        self._mids.clear()
        self._ready = None
        if left:
            self._counters["dropped"] += left
            logger.warning(
                "%d QoS 1/2 publishes to %s:%d were not acknowledged before the connector closed; counted as dropped",
                left,
                self.hostname,
                self.port,
            )
        self._wake()

    async def _close(self, client: aiomqtt.Client, *, graceful: bool) -> None:
        """Close `client`: DISCONNECT when the connection is alive and wanted, else hard."""
        try:
            if graceful and not client._disconnected.done():
                await asyncio.wait_for(client.__aexit__(None, None, None), timeout=min(self._connect_timeout, 5.0))
        except (MqttError, OSError, asyncio.TimeoutError) as exc:
            logger.debug("graceful disconnect from %s:%d failed: %s", self.hostname, self.port, exc)
        finally:
            self._close_hard(client)
            misc = client._misc_task
            if misc is not None and not misc.done():
                # aiomqtt's keepalive task; it is cancelled from a thread-safe
                # callback, so finish it here for a deterministic shutdown.
                misc.cancel()
                await asyncio.wait([misc])

    @staticmethod
    def _close_hard(client: aiomqtt.Client) -> None:
        """Close the socket without DISCONNECT (paho unregisters it from the loop first)."""
        client._client._sock_close()

    # --------------------------------------------------------------- dispatch

    async def _dispatch(self, topic: str, payload: bytes) -> None:
        """Deliver one PUBLISH to every matching callback, in subscription order."""
        counters = self._counters
        counters["received"] += 1
        handles = self._trie.match(topic)
        if not handles:
            return
        data: Any = None
        decoded = False
        undecodable = False
        for handle in handles:
            # Checked per callback: an unsubscribe made by an earlier
            # callback of this very message stops delivery at once, and so
            # does a disconnect().
            if self._stopped_by_callback:
                return
            if not handle.active:
                continue
            if handle.raw:
                arg: Any = payload
            else:
                if not decoded:
                    decoded = True
                    try:
                        data = decode_payload(payload)
                    except ValueError as exc:
                        undecodable = True
                        counters["decode_errors"] += 1
                        self._log.log(
                            "decode-error",
                            logging.WARNING,
                            "payload on %r is not JSON (%s); %d bytes not delivered to JSON callbacks",
                            topic,
                            exc,
                            len(payload),
                        )
                if undecodable:
                    continue
                arg = data
            awaited = False
            try:
                result = handle.callback(topic, arg)
                if handle.is_coroutine or inspect.isawaitable(result):
                    # Strict order: this callback finishes before the next
                    # callback (or the next message) starts.
                    awaited = True
                    await result
            except asyncio.CancelledError:
                # A BaseException: uncaught, it would end the supervisor
                # silently. Raised by the callback itself it is a callback
                # error like any other; only a cancellation of this task
                # (disconnect(), abort(), loop shutdown), which can reach
                # us only at an await, goes through.
                if awaited and _being_cancelled():
                    raise
                self._callback_failed(handle, topic)
            except Exception:
                self._callback_failed(handle, topic)
            else:
                counters["dispatched"] += 1

    def _callback_failed(self, handle: SubscriptionHandle, topic: str) -> None:
        """Count and log (rate-limited) the exception a callback raised; delivery goes on."""
        self._counters["callback_errors"] += 1
        self._log.log(
            "callback-error",
            logging.ERROR,
            "callback %r for %r raised on a message to %r",
            handle.callback,
            handle.topic_filter,
            topic,
            exc_info=True,
        )

    # ---------------------------------------------------------------- publish

    async def publish(self, topic: str, payload: Payload, qos: int, retain: bool) -> None:
        validate_topic(topic)
        qos = validate_qos(qos)
        data = encode_payload(payload)
        validate_payload_size(topic, len(data), qos)
        if qos:
            await self._enqueue(_Queued(topic, data, qos, bool(retain)))
        else:
            await self._send_qos0(topic, data, bool(retain))

    def _accepting(self) -> bool:
        """Whether a QoS 1/2 publish is queued: the connector runs (connected or reconnecting) and is not closing."""
        if self._closing:
            return self._client is not None
        return self.running

    async def _enqueue(self, message: _Queued) -> None:
        """Queue one QoS 1/2 publish, and send it at once when the connection is ready.

        While connected and the queue is full, waits for acknowledgements
        (backpressure); while disconnected and full, drops it (counted).
        """
        while len(self._outbox) >= self._max_queued and self._client is not None:
            await self._wait_progress(None)
        if not self._accepting():
            self._drop(message.topic, "not connected to %s:%d")
            return
        if len(self._outbox) >= self._max_queued:
            self._drop(message.topic, f"{self._max_queued} QoS 1/2 publishes queued while disconnected from %s:%d")
            return
        seq = self._next_seq
        self._next_seq = seq + 1
        self._outbox[seq] = message
        client = self._ready
        if client is not None:
            self._hand_over(client, seq, message)

    def _drop(self, topic: str, why: str) -> None:
        """Count and log (rate-limited) a publish that is not sent; `why` has %s:%d for the broker."""
        self._counters["dropped"] += 1
        self._log.log(
            "publish-dropped",
            logging.WARNING,
            f"{why}: publish to %r dropped",
            self.hostname,
            self.port,
            topic,
        )

    def _send_queue(self, client: aiomqtt.Client) -> None:
        """Publish the whole queue on a new connection, in order, before any newer publish.

        With clean_session False this is the re-send MQTT 3.1.1 §4.4 asks
        for (under new packet ids: the paho client that knew the old ones is
        gone); with clean_session True, the broker dropped them with the
        session. Either way a message the broker did receive may arrive
        twice: at least once.
        """
        for seq, message in list(self._outbox.items()):
            self._hand_over(client, seq, message)
        self._ready = client

    def _hand_over(self, client: aiomqtt.Client, seq: int, message: _Queued) -> None:
        """Give one queued message to paho, which sends it (within its in-flight window) and keeps order."""
        # paho's publish only queues the packet (the loop writes it), so this
        # does not block; aiomqtt's publish() would wait for the PUBACK.
        info = client._client.publish(message.topic, message.data, message.qos, message.retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            # Not taken (paho's own queue limit): it waits for the next connection.
            self._log.log("publish-error", logging.WARNING, "publish to %r not queued by paho: %s", message.topic, paho.error_string(info.rc))
            return
        # NO_CONN: the connection is going; the supervisor will notice and
        # the message is sent again on the next one.
        self._mids[info.mid] = seq
        if not message.sent:
            message.sent = True
            self._counters["published"] += 1

    async def _send_qos0(self, topic: str, data: bytes, retain: bool) -> None:
        """Hand one QoS 0 PUBLISH to paho without waiting for it: counts, never raises for network state."""
        while len(self._unwritten) >= _MAX_UNWRITTEN and self._client is not None:
            # Backpressure: wait for the socket instead of buffering without bound.
            await self._wait_progress(None)
        client = self._client
        if client is None:
            self._drop(topic, "not connected to %s:%d")
            return
        info = client._client.publish(topic, data, 0, retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            self._counters["publish_errors"] += 1
            self._log.log(
                "publish-error",
                logging.WARNING,
                "publish to %r failed: %s",
                topic,
                paho.error_string(info.rc),
            )
            return
        self._counters["published"] += 1
        if not info.is_published():
            self._unwritten[info.mid] = info

    def _send_presence(self, client: aiomqtt.Client, payload: bytes) -> paho.MQTTMessageInfo | None:
        """Publish presence (QoS 1, retained) on `client`; not queued and not counted: it belongs to one connection."""
        info = client._client.publish(self.status_topic, payload, 1, True)
        return info if info.rc == paho.MQTT_ERR_SUCCESS else None

    def _on_publish_confirmed(self, client: aiomqtt.Client, mid: int) -> None:
        """paho's on_publish: written (QoS 0), PUBACK (QoS 1) or PUBCOMP (QoS 2) arrived."""
        if client is not self._client:
            return  # a closed connection's late callback; its mids mean nothing now
        seq = self._mids.pop(mid, None)
        if seq is not None:
            self._outbox.pop(seq, None)
        else:
            self._unwritten.pop(mid, None)
        # Also for presence messages, whose waiters check their MQTTMessageInfo.
        self._wake()

    def _wake(self) -> None:
        progress = self._progress
        if progress is not None:
            self._progress = None
            if not progress.done():
                progress.set_result(None)

    async def _wait_progress(self, timeout: float | None) -> None:
        """Wait until some publish is confirmed or lost (asyncio.TimeoutError after `timeout`)."""
        if self._progress is None:
            self._progress = asyncio.get_running_loop().create_future()
        # Shielded: one waiter timing out must not cancel the shared future.
        await asyncio.wait_for(asyncio.shield(self._progress), timeout)

    async def _wait_until(self, done: Callable[[], bool], deadline: float) -> bool:
        """Wait until `done()` holds, checked at every publish progress; False once the loop time passes `deadline`."""
        loop = asyncio.get_running_loop()
        while not done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await self._wait_progress(remaining)
            except asyncio.TimeoutError:
                pass
        return True

    def _unacknowledged(self, before: int) -> int:
        """Queued messages older than sequence number `before` (the queue is in sequence order)."""
        count = 0
        for seq in self._outbox:
            if seq >= before:
                break
            count += 1
        return count

    async def flush(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        limit = _DEFAULT_FLUSH_TIMEOUT if timeout is None else timeout
        deadline = loop.time() + limit
        # Everything published so far: QoS 1/2 below this sequence number,
        # and the QoS 0 publishes not yet written (those lost with their
        # connection, counted as publish_errors, are not waited for).
        before = self._next_seq
        unwritten = list(self._unwritten.items())

        def done() -> bool:
            nonlocal unwritten
            unwritten = [(mid, info) for mid, info in unwritten if self._unwritten.get(mid) is info]
            # The oldest queued message is the first key.
            return not unwritten and next(iter(self._outbox), before) >= before

        if not await self._wait_until(done, deadline):
            pending = self._unacknowledged(before) + len(unwritten)
            raise TimeoutError(f"flush: {pending} publishes not acknowledged within {limit:g} s")

    # ---------------------------------------------------------- subscriptions

    async def subscribe(
        self, owner: Any, topic_filter: str, callback: Callback, qos: int, raw: bool
    ) -> SubscriptionHandle:
        validate_filter(topic_filter)
        qos = validate_qos(qos)
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        handle = SubscriptionHandle(owner, topic_filter, callback, raw=raw)
        handles = self._filters.get(topic_filter)
        if handles is None:
            self._filters[topic_filter] = handles = []
            # A filter has one broker subscription; its first handle sets the QoS.
            self._filter_qos[topic_filter] = qos
        handles.append(handle)
        self._trie.add(topic_filter, handle)

        client = self._client
        if client is None or topic_filter in self._acked:
            # Not connected: sent on (re)connect. Already subscribed: one
            # broker subscription serves every handle of the filter.
            return handle
        try:
            inflight = self._inflight_sub.get(topic_filter)
            if inflight is not None:
                results = await asyncio.shield(inflight)
            else:
                results = await self._broker_subscribe(client, [topic_filter])
        except BaseException:
            # Cancelled while waiting for SUBACK: the caller never gets the
            # handle, so it must not stay registered.
            handle.active = False
            self._forget(handle)
            raise
        code = results.get(topic_filter)
        if code is not None and code >= _SUBACK_FAILURE:
            handle.active = False
            self._forget(handle)
            raise SubscribeRefusedError(topic_filter)
        # code None: the connection went away before SUBACK; the filter stays
        # registered and is subscribed again on reconnect.
        return handle

    async def _broker_subscribe(self, client: aiomqtt.Client, filters: list[str]) -> dict[str, int | None]:
        """One SUBSCRIBE for `filters`; returns each filter's SUBACK code (None: no SUBACK)."""
        future: asyncio.Future[dict[str, int | None]] = asyncio.get_running_loop().create_future()
        for topic_filter in filters:
            self._inflight_sub[topic_filter] = future
        results: dict[str, int | None] = dict.fromkeys(filters)
        try:
            codes = await client.subscribe([(f, self._filter_qos[f]) for f in filters])
            results = {f: _suback_code(c) for f, c in zip(filters, codes)}
        except MqttError as exc:
            # Lost connection or no SUBACK in time: the supervisor's next
            # connection subscribes again.
            logger.debug("SUBSCRIBE %r got no SUBACK: %s", filters, exc)
        finally:
            # Also on cancellation: concurrent subscribe() calls waiting on
            # this future must wake up, with "no SUBACK".
            if not future.done():
                future.set_result(results)
            for topic_filter in filters:
                if self._inflight_sub.get(topic_filter) is future:
                    del self._inflight_sub[topic_filter]
            if client is self._client:
                for topic_filter, code in results.items():
                    if code is not None and code < _SUBACK_FAILURE and topic_filter in self._filters:
                        self._acked.add(topic_filter)
        return results

    async def remove_subscription(self, handle: SubscriptionHandle) -> None:
        handle.active = False
        topic_filter = handle.topic_filter
        if not self._forget(handle):
            return
        client = self._client
        if client is None or topic_filter not in self._acked:
            return
        # The last handle of the filter went: UNSUBSCRIBE (MQTT 3.1.1 §3.10).
        self._acked.discard(topic_filter)
        try:
            await client.unsubscribe(topic_filter)
        except MqttError as exc:
            # The connection is going away; with it the broker subscription
            # (clean session) or our claim to it (a new connection only
            # subscribes to registered filters).
            logger.debug("UNSUBSCRIBE %r got no UNSUBACK: %s", topic_filter, exc)

    def _forget(self, handle: SubscriptionHandle) -> bool:
        """Remove `handle` locally; True when it was the filter's last handle."""
        topic_filter = handle.topic_filter
        self._trie.remove(topic_filter, handle)
        handles = self._filters.get(topic_filter)
        if handles is None:
            return False
        try:
            handles.remove(handle)
        except ValueError:
            return False
        if handles:
            return False
        del self._filters[topic_filter]
        del self._filter_qos[topic_filter]
        return True


class PyMqttConnector:
    """Cascade's MQTT connector in pure Python (aiomqtt): the reference implementation.

    Publishes are fire-and-forget (counted in `stats()`, never raising for
    network state), subscriptions survive reconnects, presence is announced
    on ``cascade/status/{source_id}`` with a retained Last Will. The
    behaviour is the one `cascade_fast.FastMqttConnector` has; the test
    suite in ``tests/test_connector_*.py`` runs against both.

    Every packet from the broker is checked against MQTT 3.1.1 (the rules
    of `cascade_fast.codec.Decoder`, and CONNACK first and once); a
    violation, or a packet whose remaining length exceeds
    ``max_packet_size`` (None: no limit below MQTT's 256 MiB, as in paho,
    which buffers every packet whole and so cannot skip an oversized
    PUBLISH as the fast connector does), closes the connection, counts
    ``protocol_errors`` and reconnects.

    ``**kwargs`` are passed through to `aiomqtt.Client` (for example
    ``max_queued_incoming_messages``); an option aiomqtt does not know, or one
    the connector manages itself, is logged once at WARNING and ignored.

    Delivery of publishes across disconnects (the same in both connectors):

    - QoS 1/2 is at least once across reconnects. A publish the broker has
      not acknowledged (in flight when the connection drops, or made while
      the connector runs but is reconnecting) is kept in a queue and
      published again after the reconnect, before any newer publish and in
      the original order; one the broker did receive may arrive twice. This
      holds with clean_session True and False (with False, MQTT 3.1.1 §4.4:
      unacknowledged messages are sent again; here under new packet ids,
      and a QoS 2 message cut after PUBREC is published again rather than
      released, so it too is at least once, not exactly once).
    - ``max_queued`` (default 10,000) bounds that queue: unacknowledged
      QoS 1/2 messages, in flight plus waiting. When it is full, publish()
      waits for acknowledgements while connected; while disconnected the
      publish is dropped, counted in ``stats()["dropped"]`` and logged
      (rate-limited). ``stats()["queued"]`` is the queue's length.
    - QoS 0 is at most once: dropped (counted) while disconnected, counted
      as ``publish_errors`` if its connection closes before it is written.
    - publish() before the first connect() or after disconnect() is dropped
      and counted, whatever the QoS.
    - flush() returns only once every QoS 1/2 publish made before it was
      acknowledged by the broker; otherwise it raises TimeoutError saying
      how many are not.
    - disconnect() waits up to 5 s for the queue (a reconnect within that
      time still delivers it), then counts what is left in ``dropped``.
    """

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
        tls_context: ssl.SSLContext | None = None,
        clean_session: bool = True,
        reconnect_delay: float = 0.1,
        max_reconnect_delay: float = 30.0,
        connect_timeout: float = 10.0,
        max_queued: int = DEFAULT_MAX_QUEUED,
        max_packet_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        source_id = source_id or default_source_id()
        # Unique per connector: two connectors with one client id would kick
        # each other off the broker (MQTT 3.1.1 §3.1.4).
        client_id = client_id or f"{source_id}-{secrets.token_hex(4)}"
        options: dict[str, Any] = {}
        for name, value in kwargs.items():
            if name in _PASSTHROUGH_OPTIONS:
                options[name] = value
            elif name not in _warned_options:
                _warned_options.add(name)
                # Only the name: the value could be a secret.
                logger.warning(
                    "PyMqttConnector ignores the option %r (%s)",
                    name,
                    "set by the connector itself" if name in _MANAGED_OPTIONS else "not an aiomqtt.Client option",
                )
        self._engine = _Engine(
            hostname=hostname,
            port=port,
            client_id=client_id,
            source_id=source_id,
            username=username,
            password=password,
            keepalive=keepalive,
            tls_context=tls_context,
            clean_session=clean_session,
            reconnect_delay=reconnect_delay,
            max_reconnect_delay=max_reconnect_delay,
            connect_timeout=connect_timeout,
            max_queued=max_queued,
            max_packet_size=max_packet_size,
            client_options=options,
        )
        # Handles reach the connector through a weak proxy, so the handles the
        # engine stores do not keep a forgotten connector alive.
        self._proxy = weakref.proxy(self)

    @property
    def source_id(self) -> str:
        return self._engine.source_id

    @property
    def client_id(self) -> str:
        return self._engine.client_id

    @property
    def hostname(self) -> str:
        return self._engine.hostname

    @property
    def port(self) -> int:
        return self._engine.port

    @property
    def connected(self) -> bool:
        """True from CONNACK until the connection is lost or closed."""
        return self._engine.connected

    async def connect(self) -> None:
        """Connect (idempotent); the first failure raises, later ones are retried by themselves.

        Raises `ConnectRefusedError` for a non-zero CONNACK, `ConnectionError`
        or `OSError` when the broker is unreachable, `TimeoutError` after
        ``connect_timeout`` (applied to the TCP connect and to the CONNACK
        wait). Returns once CONNACK arrived and the broker acknowledged the
        presence announcement and the filters subscribed so far.
        """
        await self._engine.connect()

    async def disconnect(self) -> None:
        """Wait (5 s at most) for pending publishes, announce ``offline``, DISCONNECT; idempotent.

        QoS 1/2 publishes still unacknowledged then are counted as ``dropped`` (and logged).
        """
        await self._engine.disconnect()

    async def publish(self, topic: str, payload: Payload = None, qos: int = 0, retain: bool = False) -> None:
        """Send `payload` to `topic`, fire-and-forget.

        dict/list go as JSON, bytes-like and str as they are, None or empty
        as an empty payload (which clears a retained message). An invalid
        topic or QoS is a `ValueError`, an unsupported payload a `TypeError`;
        network trouble is never raised: QoS 1/2 is queued while reconnecting
        (see the class docstring), the rest is counted (``dropped`` when not
        connected or the queue is full, ``publish_errors`` when sending
        fails) and logged. It waits only for backpressure: while
        ``max_queued`` QoS 1/2 publishes, or 1000 QoS 0 ones, are pending on
        a live connection.
        """
        await self._engine.publish(topic, payload, qos, retain)

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every publish so far is acknowledged (QoS 1/2) or written (QoS 0).

        QoS 1/2 publishes are waited for across reconnects; QoS 0 ones lost
        with a connection are not (they are counted as ``publish_errors``).
        Raises `TimeoutError` ("flush: N publishes not acknowledged within
        T s") after `timeout` seconds (None: 30 s).
        """
        await self._engine.flush(timeout)

    async def subscribe(
        self, topic_filter: str, callback: Callback, *, qos: int = 1, raw: bool = False
    ) -> SubscriptionHandle:
        """Call ``callback(topic, data)`` for every message matching `topic_filter`.

        `data` is the decoded JSON (empty payload -> ``{}``), or the payload
        bytes when `raw`. When connected, waits for the broker's SUBACK and
        raises `SubscribeRefusedError` if it refused; otherwise the filter is
        subscribed on (re)connect. An invalid filter is a `ValueError`.
        """
        return await self._engine.subscribe(self._proxy, topic_filter, callback, qos, raw)

    async def _remove_subscription(self, handle: SubscriptionHandle) -> None:
        """Called by `SubscriptionHandle.unsubscribe()`."""
        await self._engine.remove_subscription(handle)

    def stats(self) -> dict[str, int]:
        """Counters (`_common.STAT_KEYS`, ``protocol_errors``) plus ``queue_depth``, ``connected`` (0/1) and ``queued`` (unacknowledged QoS 1/2)."""
        return self._engine.stats()

    async def __aenter__(self) -> PyMqttConnector:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.disconnect()

    def __repr__(self) -> str:
        engine = getattr(self, "_engine", None)
        if engine is None:
            return f"<{type(self).__name__} (not initialised)>"
        state = "connected" if engine.connected else ("connecting" if engine.running else "disconnected")
        return f"<{type(self).__name__} {engine.hostname}:{engine.port} client_id={engine.client_id!r} {state}>"

    def __del__(self, _warn: Any = warnings.warn) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None and engine.running:
            # Like an unclosed asyncio transport: say so, and do not leave
            # the connection (and its task) running with nobody to stop it.
            _warn(f"unclosed connector {self!r}; call disconnect()", ResourceWarning, source=self)
            engine.abort()
