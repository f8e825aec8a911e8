# cython: language_level=3, boundscheck=False, wraparound=False
"""The MQTT 3.1.1 client protocol of `FastMqttConnector`, in Cython.

Layering (asyncpg's coreproto/protocol split):

- `MqttProtocol`: one connection. It is the codec's `PacketSink`, so the
  decoder calls `on_publish` / `on_packet` straight from `data_received`
  without building a tuple per PUBLISH. It owns the transport, the write
  batching, keepalive and the SUBACK/UNSUBACK futures.
- `Session`: the MQTT 3.1.1 §4.1 client session state (QoS 1/2 messages in
  flight, QoS 2 packet ids received) and the publish path; it outlives
  connections so unacknowledged messages can be re-sent after a reconnect.
- `Dispatcher`: calls callbacks; also outlives connections, so deliveries
  queued behind a suspended coroutine callback are not lost by a reconnect.
- `AsyncioMqttProtocol` mixes in `asyncio.BufferedProtocol` (the class the
  connector gives to `loop.create_connection`).

This module must not import `cascade.connectors` at import time:
`cascade_fast/__init__` loads it and `cascade.connectors.mqtt` imports
`cascade_fast`. The connector passes the shared pieces (the payload encoder,
the rate-limited log) in instead.
"""

from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE

from cascade_fast._debug cimport CASCADE_FAST_DEBUG

import asyncio
import collections
import logging
import sys
import types

from orjson import dumps as _json_dumps, loads as _json_loads

from cascade_fast import codec as _codec
from cascade_fast._errors import ProtocolError
from cascade_fast._topics_py import validate_payload_size as _validate_payload_size
from cascade_fast._topics_py import validate_qos as _validate_qos
from cascade_fast._topics_py import validate_topic as _validate_topic

cdef object _encode_publish = _codec.encode_publish
cdef object _encode_puback = _codec.encode_puback
cdef object _encode_pubrec = _codec.encode_pubrec
cdef object _encode_pubrel = _codec.encode_pubrel
cdef object _encode_pubcomp = _codec.encode_pubcomp
cdef object _encode_subscribe = _codec.encode_subscribe
cdef object _encode_unsubscribe = _codec.encode_unsubscribe
cdef bytes _PINGREQ = _codec.encode_pingreq()
cdef bytes _DISCONNECT = _codec.encode_disconnect()

cdef object _CoroutineType = types.CoroutineType
cdef object _Task = asyncio.Task
# Python 3.12+ starts a task eagerly itself (asyncio.Task(..., eager_start=True)):
# the first step then runs with the task as asyncio.current_task(), as it
# would inside the reference connector's task. Before 3.12 the first step is
# driven by hand (coro.send) and runs outside any task.
cdef bint _EAGER_TASKS = sys.version_info >= (3, 12)
cdef object _CancelledError = asyncio.CancelledError
cdef object _current_task = asyncio.current_task
cdef object _deque = collections.deque
cdef int _WARNING = logging.WARNING
cdef int _ERROR = logging.ERROR

# Markers for "payload not decoded yet" and "payload is not JSON".
cdef object _PENDING = object()
cdef object _UNDECODABLE = object()

cdef enum:
    # Outgoing.state (MQTT 3.1.1 §4.3.2, §4.3.3, sender side)
    OUT_QUEUED = 0      # waiting for a slot in the in-flight window
    OUT_SENT = 1        # PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2)
    OUT_RELEASED = 2    # QoS 2: PUBREL sent, waiting for PUBCOMP

cdef enum:
    # acknowledgement kinds given to Session._acked
    ACK_PUBACK = 1
    ACK_PUBREC = 2
    ACK_PUBCOMP = 3

cdef enum:
    # MqttProtocol.read_pauses: why the transport is not reading. Each reason
    # is set and cleared on its own; reading resumes only when none is left.
    PAUSE_BACKPRESSURE = 1  # the dispatcher's queue is past high_water
    PAUSE_COALESCE = 2      # read coalescing lets the kernel gather the next bytes
    PAUSE_WRITING = 4       # the transport's write buffer is full (pause_writing)
    PAUSE_BUDGET = 8        # read_budget seconds of reads done: one loop iteration for the rest

cdef enum:
    # MqttProtocol.state
    ST_CONNECTING = 0   # CONNECT sent, CONNACK not yet received
    ST_CONNECTED = 1    # CONNACK 0 received
    ST_CLOSING = 2      # refused, aborted or disconnecting; nothing more is delivered
    ST_CLOSED = 3       # connection_lost was called

#: A payload at least this long may not fit one packet: check it exactly
#: (MQTT 3.1.1 §2.2.3: 268,435,455 bytes of remaining length, less the
#: largest topic and the packet id).
cdef Py_ssize_t _PAYLOAD_CHECK_FROM = 268_435_455 - 65_539
#: Packet ids are 16-bit and never 0 (MQTT 3.1.1 §2.3.1).
cdef int _MAX_PACKET_ID = 65535
#: Validated topic names remembered per session (cleared when full).
cdef Py_ssize_t _TOPIC_CACHE_SIZE = 4096
#: Bytes the transport may read at once into a connection's buffer while
#: data flows (what uvloop reads at once into its own buffer for a plain Protocol).
cdef Py_ssize_t READ_BUFFER_SIZE = 256 * 1024
#: The buffer of a connection with little to read: a read that fills it
#: switches to the large one, so an idle connection does not hold 256 KiB.
cdef Py_ssize_t SMALL_READ_SIZE = 16 * 1024
#: Seconds between checks whether the large buffer is still needed; it is
#: freed after a period without a read that would have filled the small one.
cdef double SHRINK_CHECK = 1.0
#: The buffer of a read nested in a read (see MqttProtocol.get_buffer).
cdef Py_ssize_t NESTED_READ_SIZE = 64 * 1024


def _reraise(exc):
    raise exc


cdef extern from *:
    """
    #ifdef _WIN32
    #include <windows.h>
    static double cascade_monotonic(void) {
        LARGE_INTEGER freq, count;
        QueryPerformanceFrequency(&freq);
        QueryPerformanceCounter(&count);
        return (double)count.QuadPart / (double)freq.QuadPart;
    }
    #else
    #include <time.h>
    static double cascade_monotonic(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    }
    #endif
    """
    # A clock finer than uvloop's loop.time(), which counts whole milliseconds.
    double _monotonic "cascade_monotonic"() nogil


cdef inline _fail(fut, exc):
    # Fail `fut` without "Future exception was never retrieved" when nobody
    # awaits it any more (a cancelled connect or subscribe): awaiting it later
    # still raises.
    if not fut.done():
        fut.set_exception(exc)
        fut.exception()


cdef class Subscription:
    """The trie value for one `subscribe()` call."""

    def __init__(self, callback, handle, bint raw):
        self.callback = callback
        self.handle = handle
        self.raw = raw
        self.active = True

    def __repr__(self):
        return f"<Subscription {self.callback!r} raw={self.raw} active={self.active}>"


cdef class _Resume:
    """Awaitable that continues a coroutine which already ran its first step.

    The dispatcher drives a coroutine callback once with ``send(None)``
    straight from `data_received`. When that step suspends, the coroutine
    has yielded the future it waits on (with ``_asyncio_future_blocking``
    set), so it cannot be given to a `Task` as it is: the task's first step
    would resume it before that future is done. Awaiting `_Resume` first
    hands that very future to the task, which waits for it as if the
    coroutine had yielded it inside the task, then delegates every later
    step (send/throw/close) to the coroutine. This is Python 3.12's eager
    task start, done by hand so it also works on 3.10 and 3.11.
    """

    cdef object coro
    cdef object first
    cdef bint started

    def __cinit__(self, coro, first):
        self.coro = coro
        self.first = first

    def __await__(self):
        return self

    def __iter__(self):
        return self

    def __next__(self):
        if not self.started:
            self.started = True
            first = self.first
            self.first = None
            return first
        return self.coro.send(None)

    def send(self, value):
        if not self.started:
            return self.__next__()
        return self.coro.send(value)

    def throw(self, typ, val=None, tb=None):
        self.started = True
        self.first = None
        if val is None and tb is None:
            return self.coro.throw(typ)
        return self.coro.throw(typ, val, tb)

    def close(self):
        self.first = None
        return self.coro.close()


cdef class Dispatcher:
    """Calls every matching callback for each received PUBLISH, in order.

    Plain callbacks are called inline from `data_received`. A coroutine
    callback is stepped once inline; if it finishes (most do when they only
    record something) nothing is kept. If it suspends, it and everything
    after it (the rest of this message's callbacks and later messages) is
    queued and one task drains the queue, so every callback for message N
    finishes before any callback for message N+1 starts. Past `high_water`
    queued deliveries the connection stops reading (TCP backpressure to the
    broker); below `low_water` it reads again.
    """

    def __init__(self, errlog, logger, Py_ssize_t high_water=10000, Py_ssize_t low_water=-1):
        if high_water < 1:
            raise ValueError(f"high_water must be >= 1, got {high_water}")
        if low_water < 0:
            low_water = high_water // 4
        if low_water >= high_water:
            raise ValueError(f"low_water ({low_water}) must be below high_water ({high_water})")
        self.errlog = errlog
        self.logger = logger
        self.high_water = high_water
        self.low_water = low_water
        self.queue = _deque()

    @property
    def depth(self):
        """Deliveries waiting behind a suspended coroutine callback."""
        return len(self.queue)

    def set_loop(self, loop):
        self.loop = loop

    def attach_reader(self, MqttProtocol proto):
        """Make `proto` the connection backpressure pauses (after its CONNACK)."""
        self.reader = proto
        if self.reading_paused:
            proto._pause_reading(PAUSE_BACKPRESSURE)

    def detach_reader(self, MqttProtocol proto):
        if self.reader is proto:
            self.reader = None

    def stop(self):
        """Cancel the drain task and discard queued deliveries (disconnect()).

        Returns the cancelled task (or None) for the caller to await.
        """
        cdef object task = self.task
        cdef Py_ssize_t n = len(self.queue)
        if n:
            self.undelivered += n
            self.logger.warning("disconnect: %d queued deliveries discarded", n)
            self.queue.clear()
        self.reading_paused = False
        if task is not None and not task.done():
            if task is _current_task(self.loop):
                # disconnect() awaited by a callback running in this very task:
                # cancelling it would raise CancelledError at that callback's
                # next await. The queue is empty now, so the task ends by itself
                # once the callback returns.
                return None
            self.closing = True
            task.cancel()
            return task
        return None

    def reset(self):
        """Ready for a new connect() after stop()."""
        self.closing = False

    cdef int deliver(self, str topic, bytes payload, list subs) except -1:
        if self.task is not None:
            # A coroutine callback is suspended: keep arrival order.
            self._enqueue(topic, payload, subs, 0, _PENDING)
        else:
            self._run_inline(topic, payload, subs, 0, _PENDING)
        return 0

    cdef bint _run_inline(self, str topic, bytes payload, list subs, Py_ssize_t start, object decoded) except -1:
        """Call subs[start:]; False when a coroutine suspended (the rest is queued)."""
        cdef Py_ssize_t i
        cdef Py_ssize_t n = PyList_GET_SIZE(subs)
        cdef Subscription sub
        cdef object data
        cdef object result
        cdef object yielded
        for i in range(start, n):
            sub = <Subscription>PyList_GET_ITEM(subs, i)
            if not sub.active:
                continue
            if sub.raw:
                data = payload
            else:
                if decoded is _PENDING:
                    decoded = self._decode(topic, payload)
                if decoded is _UNDECODABLE:
                    continue
                data = decoded
            try:
                result = sub.callback(topic, data)
            except (Exception, _CancelledError) as exc:
                # CancelledError is a BaseException: uncaught, it would leave
                # data_received (asyncio/uvloop then abort the connection and
                # the rest of the read is lost). A callback raising it is a
                # failed callback like any other.
                self._failed(sub, topic, exc)
                continue
            if result is None:
                self.dispatched += 1
                continue
            if type(result) is _CoroutineType:
                if _EAGER_TASKS:
                    awaitable = _Task(result, loop=self.loop, eager_start=True)
                    if awaitable.done():
                        if awaitable.cancelled():
                            self._failed(sub, topic, _CancelledError("callback was cancelled"))
                        else:
                            exc = awaitable.exception()
                            if exc is None:
                                self.dispatched += 1
                            else:
                                self._failed(sub, topic, exc)
                        continue
                else:
                    try:
                        yielded = result.send(None)
                    except StopIteration:
                        self.dispatched += 1
                        continue
                    except (Exception, _CancelledError) as exc:  # see above
                        self._failed(sub, topic, exc)
                        continue
                    awaitable = _Resume(result, yielded)
            elif hasattr(type(result), "__await__"):
                # Some other awaitable (a Future, a Cython coroutine): let the task await it.
                # Looked up on the type, as `await` does: an instance __getattr__
                # (user code, here outside any try) is never called.
                awaitable = result
            else:
                # A plain callback's return value is ignored.
                self.dispatched += 1
                continue
            if i + 1 < n:
                self._enqueue(topic, payload, subs, i + 1, decoded)
            self.task = self.loop.create_task(_drain(self, sub, topic, awaitable))
            return False
        return True

    cdef object _decode(self, str topic, bytes payload):
        # Same rule as _common.decode_payload (empty -> {}), without the call.
        if not payload:
            return {}
        try:
            return _json_loads(payload)
        except ValueError as exc:
            self.decode_errors += 1
            self.errlog.log("decode_error", _WARNING, "payload on %r is not JSON (%s); not delivered to JSON subscribers", topic, exc)
            return _UNDECODABLE

    cdef int _failed(self, Subscription sub, str topic, object exc) except -1:
        self.callback_errors += 1
        self.errlog.log("callback_error", _ERROR, "callback %r raised for a message on %r", sub.callback, topic, exc_info=exc)
        return 0

    cdef int _enqueue(self, str topic, bytes payload, list subs, Py_ssize_t start, object decoded) except -1:
        self.queue.append((topic, payload, subs, start, decoded))
        if not self.reading_paused and len(self.queue) >= self.high_water:
            self._set_reading(True)
        return 0

    cdef tuple _pop(self):
        if CASCADE_FAST_DEBUG:
            # Only the drain task consumes the queue (strict order relies on it).
            if self.task is None:
                raise AssertionError("dispatcher queue consumed without a drain task")
        cdef tuple item = self.queue.popleft()
        if self.reading_paused and len(self.queue) <= self.low_water:
            self._set_reading(False)
        return item

    cdef int _set_reading(self, bint paused) except -1:
        cdef MqttProtocol proto = self.reader
        self.reading_paused = paused
        if paused:
            self.pauses += 1
        if proto is None:
            return 0
        if paused:
            proto._pause_reading(PAUSE_BACKPRESSURE)
        else:
            proto._resume_reading(PAUSE_BACKPRESSURE)
        return 0


async def _drain(Dispatcher self, Subscription sub, str topic, object awaitable):
    """The dispatcher task: finish the suspended callback, then the queue."""
    cdef tuple item
    cdef list subs
    cdef Py_ssize_t i, n, start
    cdef bytes payload
    try:
        try:
            await awaitable
        except _CancelledError:
            if self.closing:
                raise
            self._failed(sub, topic, _CancelledError("callback was cancelled"))
        except Exception as exc:
            self._failed(sub, topic, exc)
        else:
            self.dispatched += 1
        awaitable = None
        while self.queue:
            item = self._pop()
            topic = <str>item[0]
            payload = <bytes>item[1]
            subs = <list>item[2]
            start = <Py_ssize_t>item[3]
            decoded = item[4]
            item = None
            n = PyList_GET_SIZE(subs)
            for i in range(start, n):
                sub = <Subscription>PyList_GET_ITEM(subs, i)
                if not sub.active:
                    continue
                if sub.raw:
                    data = payload
                else:
                    if decoded is _PENDING:
                        decoded = self._decode(topic, payload)
                    if decoded is _UNDECODABLE:
                        continue
                    data = decoded
                try:
                    result = sub.callback(topic, data)
                    if result is not None and hasattr(type(result), "__await__"):
                        # Inside this task: a coroutine that does not suspend
                        # completes within this step.
                        await result
                except _CancelledError:
                    if self.closing:
                        raise
                    self._failed(sub, topic, _CancelledError("callback was cancelled"))
                    continue
                except Exception as exc:
                    self._failed(sub, topic, exc)
                    continue
                finally:
                    result = None
                    data = None
                self.dispatched += 1
    finally:
        self.task = None


cdef class Outgoing:
    """A QoS 1/2 message from publish() to its last acknowledgement."""

    def __cinit__(self, str topic, bytes payload, int qos, bint retain):
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.state = OUT_QUEUED
        self.counted = True


cdef class Session:
    """Client session state (MQTT 3.1.1 §4.1) and the publish path.

    QoS 1/2 is at least once across reconnects, as in paho. Outbound QoS
    1/2 messages get a packet id and enter an in-flight window of
    `max_inflight`; more wait in a backlog (their publish() call waits for
    a slot while connected). A message leaves the session only when the
    broker acknowledged it (PUBACK, or PUBCOMP for QoS 2). When the
    connection is lost the messages in flight stay, and after the next
    CONNACK they are sent again in their original order, DUP=1 (PUBREL for
    a QoS 2 message already PUBREC'd) — with a persistent session that is
    MQTT 3.1.1 §4.4; with a clean session the broker forgot them, so it is
    what keeps them from being lost. While the connector runs but is
    disconnected (`accepting` and no connection), QoS 1/2 publishes are
    queued and sent after the reconnect.

    The bound: at most `max_queued` unacknowledged messages (in flight plus
    backlog). A QoS 1/2 publish while disconnected with the queue full is
    dropped and counted in ``dropped``; while connected publish() waits
    for the window instead. QoS 0 while disconnected is dropped and counted
    (it has no delivery promise to keep). `abandon()` (disconnect()) counts
    whatever is left unacknowledged in ``dropped``.
    """

    def __init__(self, *, int max_inflight, bint clean_session, encode_payload, errlog, logger,
                 Py_ssize_t max_queued=10000):
        if not 1 <= max_inflight <= 65000:
            raise ValueError(f"max_inflight must be in 1..65000, got {max_inflight}")
        if max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, got {max_queued}")
        # The window is part of the queue: it is never larger than the bound.
        max_inflight = min(max_inflight, max_queued)
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.clean_session = clean_session
        self.encode_payload = encode_payload
        self.errlog = errlog
        self.logger = logger
        self.inflight = {}
        self.backlog = _deque()
        self.inbound_qos2 = set()
        self.topics_ok = {}
        self.idle_waiters = []
        self.next_packet_id = 1

    def set_loop(self, loop):
        self.loop = loop

    @property
    def protocol(self):
        """The connection publishes go to (CONNACK received), or None."""
        return self.proto

    @property
    def inflight_count(self):
        return len(self.inflight)

    @property
    def backlog_count(self):
        return len(self.backlog)

    @property
    def queued_count(self):
        """QoS 1/2 messages not yet acknowledged by the broker (in flight plus backlog)."""
        return len(self.inflight) + len(self.backlog)

    cpdef object publish(self, object topic, object payload, object qos=0, bint retain=False, bint counted=True):
        """Publish; returns None when done, else an awaitable to wait on.

        The awaitable is a future resolved when the message entered the
        in-flight window (window full) or when the transport's write buffer
        drained below its low-water mark (`pause_writing` was called).
        Raises ValueError/TypeError for a bad topic, QoS, payload type or
        size; never for the connection's state. `counted` False keeps the
        connector's own presence messages out of ``published``.
        """
        cdef bytes data
        cdef MqttProtocol proto
        cdef Outgoing msg
        cdef object ptype
        cdef int q
        if topic not in self.topics_ok:
            self._check_topic(topic)
        if type(qos) is not int:
            qos = _validate_qos(qos)  # TypeError for 1.0, Fraction(1), True
        if qos == 0:
            q = 0
        elif qos == 1:
            q = 1
        elif qos == 2:
            q = 2
        else:
            raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
        ptype = type(payload)
        if ptype is bytes:
            data = <bytes>payload
        elif ptype is dict:
            data = _json_dumps(payload)
        else:
            data = self.encode_payload(payload)
        if len(data) >= _PAYLOAD_CHECK_FROM:
            _validate_payload_size(topic, len(data), q)
        proto = self.proto
        if proto is None or proto.state != ST_CONNECTED:
            if q and self.accepting:
                # Running but reconnecting: kept for the next connection.
                self._queue(Outgoing(topic, data, q, retain))
            else:
                self.dropped += 1
                self.errlog.log("publish_dropped", _WARNING, "not connected: publish to %r dropped", topic)
            return None
        if q == 0:
            try:
                proto._write(_encode_publish(topic, data, 0, retain, False, 0))
            except Exception as exc:
                self.publish_errors += 1
                self.errlog.log("publish_error", _WARNING, "publish to %r failed: %r", topic, exc)
                return None
            if counted:
                self.published += 1
            if proto.writing_paused:
                return proto.drain_waiter_future()
            return None
        msg = Outgoing(topic, data, q, retain)
        msg.counted = counted
        if len(self.inflight) < self.max_inflight and not self.backlog:
            try:
                self._send(msg)
            except Exception as exc:
                self.publish_errors += 1
                self.errlog.log("publish_error", _WARNING, "publish to %r failed: %r", topic, exc)
                return None
            if counted:
                self.published += 1
            if proto.writing_paused:
                return proto.drain_waiter_future()
            return None
        # In-flight window full: wait for an acknowledgement to free a slot.
        msg.waiter = self.loop.create_future()
        self.backlog.append(msg)
        return msg.waiter

    cdef int _queue(self, Outgoing msg) except -1:
        """Keep a QoS 1/2 message made while disconnected, within `max_queued`."""
        if len(self.inflight) + len(self.backlog) >= self.max_queued:
            self.dropped += 1
            self.errlog.log(
                "publish_dropped", _WARNING,
                "not connected and %d QoS 1/2 publishes already queued (max_queued): publish to %r dropped",
                self.max_queued, msg.topic,
            )
            return 0
        self.backlog.append(msg)
        return 0

    def publish_batch(self, list items, bint retain=False):
        """QoS 0 publish of many (topic, payload) pairs, encoded in one call.

        Returns like `publish`. Every topic is validated before anything is
        written, so a bad item raises without sending any of the batch.
        """
        cdef list encoded = []
        cdef MqttProtocol proto
        cdef object topic, payload, ptype, data
        for topic, payload in items:
            if topic not in self.topics_ok:
                self._check_topic(topic)
            ptype = type(payload)
            if ptype is bytes:
                data = payload
            elif ptype is dict:
                data = _json_dumps(payload)
            else:
                data = self.encode_payload(payload)
            if len(data) >= _PAYLOAD_CHECK_FROM:
                _validate_payload_size(topic, len(data), 0)
            encoded.append((topic, data, 0, retain, None))
        proto = self.proto
        if proto is None or proto.state != ST_CONNECTED:
            self.dropped += len(encoded)
            if encoded:
                self.errlog.log("publish_dropped", _WARNING, "not connected: %d publishes dropped", len(encoded))
            return None
        if not encoded:
            return None
        try:
            proto._write(_codec.encode_publish_batch(encoded))
        except Exception as exc:
            self.publish_errors += len(encoded)
            self.errlog.log("publish_error", _WARNING, "publish batch failed: %r", exc)
            return None
        self.published += len(encoded)
        if proto.writing_paused:
            return proto.drain_waiter_future()
        return None

    cdef int _check_topic(self, object topic) except -1:
        _validate_topic(topic)  # ValueError naming the topic; TypeError for a non-str
        if len(self.topics_ok) >= _TOPIC_CACHE_SIZE:
            self.topics_ok.clear()
        self.topics_ok[topic] = True
        return 0

    cdef int _alloc_packet_id(self) except -1:
        # MQTT 3.1.1 §2.3.1: non-zero and unused by any packet still awaiting
        # its acknowledgement (QoS 1/2 PUBLISH, SUBSCRIBE, UNSUBSCRIBE).
        cdef int pid
        cdef int tries
        cdef dict acks = self.proto.acks if self.proto is not None else None
        for tries in range(_MAX_PACKET_ID):
            pid = self.next_packet_id
            self.next_packet_id = pid % _MAX_PACKET_ID + 1
            if pid in self.inflight:
                continue
            if acks is not None and pid in acks:
                continue
            return pid
        raise RuntimeError("no free MQTT packet id")

    def new_packet_id(self):
        """A packet id for SUBSCRIBE/UNSUBSCRIBE."""
        return self._alloc_packet_id()

    cdef int _send(self, Outgoing msg) except -1:
        cdef int pid = self._alloc_packet_id()
        cdef bytes packet
        if CASCADE_FAST_DEBUG:
            if len(self.inflight) >= self.max_inflight:
                raise AssertionError("in-flight window overrun")
        # Encode before registering: a packet that cannot be encoded (over
        # the §2.2.3 size limit) must not keep a window slot and a packet id
        # forever, nor be re-sent (and fail again) at every reconnect.
        packet = _encode_publish(msg.topic, msg.payload, msg.qos, msg.retain, False, pid)
        msg.packet_id = pid
        msg.state = OUT_SENT
        self.inflight[pid] = msg
        self.proto._write(packet)
        return 0

    cdef int _acked(self, int packet_id, int kind) except -1:
        cdef Outgoing msg = self.inflight.get(packet_id)
        if msg is None:
            if kind == ACK_PUBREC:
                # Unknown PUBREC (a session we have forgotten): release it anyway so
                # the broker can drop its state (§4.3.3).
                self.proto._write(_encode_pubrel(packet_id))
            else:
                self.logger.debug("acknowledgement for unknown packet id %d ignored", packet_id)
            return 0
        if kind == ACK_PUBACK:
            if msg.qos != 1:
                self.logger.debug("PUBACK for QoS %d packet id %d ignored", msg.qos, packet_id)
                return 0
            del self.inflight[packet_id]
        elif kind == ACK_PUBREC:
            if msg.qos != 2:
                self.logger.debug("PUBREC for QoS %d packet id %d ignored", msg.qos, packet_id)
                return 0
            # §4.3.3: the sender MUST send PUBREL after PUBREC; the PUBLISH is
            # no longer re-sent, the PUBREL is.
            msg.state = OUT_RELEASED
            msg.payload = None
            self.proto._write(_encode_pubrel(packet_id))
            return 0
        else:
            if msg.state != OUT_RELEASED:
                self.logger.debug("PUBCOMP before PUBREC for packet id %d ignored", packet_id)
                return 0
            del self.inflight[packet_id]
        if self.backlog:
            self._fill_window()
        if not self.inflight:
            self._check_idle()
        return 0

    cdef int _fill_window(self) except -1:
        cdef Outgoing msg
        while self.backlog and len(self.inflight) < self.max_inflight and self.proto is not None:
            msg = self.backlog.popleft()
            try:
                self._send(msg)
            except Exception as exc:
                # Runs from data_received (an acknowledgement freed the slot):
                # one bad message must not be taken for a broker error.
                self.publish_errors += 1
                self.errlog.log("publish_error", _WARNING, "publish to %r failed: %r", msg.topic, exc)
            else:
                if msg.counted:
                    self.published += 1
            if msg.waiter is not None and not msg.waiter.done():
                msg.waiter.set_result(None)
            msg.waiter = None
        if not self.inflight:
            self._check_idle()
        return 0

    cdef int _check_idle(self) except -1:
        cdef list waiters
        if self.inflight or self.backlog or not self.idle_waiters:
            return 0
        waiters = self.idle_waiters
        self.idle_waiters = []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        return 0

    def acknowledged(self):
        """None when nothing awaits an acknowledgement, else a future for that moment."""
        if not self.inflight and not self.backlog:
            return None
        if len(self.idle_waiters) >= 16:
            # Drop futures nobody waits on any more (flush() timed out and
            # cancelled its own): a flush loop during a long outage with a
            # persistent session must not grow this list without bound.
            self.idle_waiters = [f for f in self.idle_waiters if not f.done()]
        fut = self.loop.create_future()
        self.idle_waiters.append(fut)
        return fut

    cdef int attach(self, MqttProtocol proto, bint session_present) except -1:
        """The connection got CONNACK 0: publishes go to it from now on."""
        cdef Outgoing msg
        self.proto = proto
        if self.clean_session or not session_present:
            # QoS 2 ids received but not yet released belong to the broker's
            # session. Without one (Session Present 0, §3.2.2.2: a broker
            # restarted without persistence) the broker reuses them for new
            # messages, which a kept id would swallow as duplicates (§4.3.3).
            self.inbound_qos2.clear()
        # Unacknowledged messages, in their original order: PUBLISH again
        # (DUP=1) or, past PUBREC, PUBREL again (§4.4). With a clean session
        # the broker has no state for them; sending them is what makes QoS
        # 1/2 at least once across the reconnect (paho does the same). An
        # unknown PUBREL is answered with PUBCOMP by the broker (§4.3.3).
        for msg in list(self.inflight.values()):
            if msg.state == OUT_SENT:
                proto._write(_encode_publish(msg.topic, msg.payload, msg.qos, msg.retain, True, msg.packet_id))
            else:
                proto._write(_encode_pubrel(msg.packet_id))
            self.resent += 1
        if self.backlog:
            self._fill_window()
        return 0

    cdef int detach(self, MqttProtocol proto) except -1:
        """The connection is gone; unacknowledged messages stay for the next one.

        Their publish() calls return now: a caller must not hang through an
        outage. Publishes made meanwhile are queued up to `max_queued`.
        """
        cdef Outgoing msg
        if self.proto is not proto:
            return 0
        self.proto = None
        for msg in self.backlog:
            if msg.waiter is not None and not msg.waiter.done():
                msg.waiter.set_result(None)
            msg.waiter = None
        return 0

    def abandon(self):
        """disconnect(): forget every unacknowledged message; returns how many (counted in ``dropped``)."""
        cdef Py_ssize_t n = len(self.inflight) + len(self.backlog)
        self.accepting = False
        self.release_waiters()
        self.inflight.clear()
        self.backlog.clear()
        self.dropped += n
        return n

    def release_waiters(self):
        """disconnect(): nobody waits on a window slot or acknowledgements any more."""
        cdef Outgoing msg
        for msg in self.backlog:
            if msg.waiter is not None and not msg.waiter.done():
                msg.waiter.set_result(None)
        for fut in self.idle_waiters:
            if not fut.done():
                fut.set_result(None)
        self.idle_waiters = []


cdef class MqttProtocol(PacketSink):
    """One connection to the broker: the MQTT 3.1.1 client state machine."""

    def __init__(self, loop, Session session, Dispatcher dispatcher, TopicTrie trie, bytes connect_packet, *,
                 double keepalive, Py_ssize_t write_batch=65536, max_packet_size=None,
                 double read_coalesce=0.0, Py_ssize_t coalesce_below=16384, double packet_timeout=30.0,
                 double read_budget=0.004,
                 errlog, logger):
        self.loop = loop
        self.session = session
        self.dispatcher = dispatcher
        self.trie = trie
        self.connect_packet = connect_packet
        self.keepalive = keepalive
        self.packet_timeout = packet_timeout
        self.write_batch = write_batch
        self.read_coalesce = read_coalesce
        self.coalesce_below = coalesce_below
        self.read_budget = read_budget
        self.errlog = errlog
        self.logger = logger
        self.decoder = _codec.Decoder() if max_packet_size is None else _codec.Decoder(max_packet_size=max_packet_size)
        self.connack = loop.create_future()
        self.closed = loop.create_future()
        self.acks = {}
        self.wbuf = bytearray()
        self.rview = memoryview(bytearray(SMALL_READ_SIZE))
        self.nested_reads = []
        self.drain_waiters = []
        self.state = ST_CONNECTING

    @property
    def connected(self):
        """CONNACK 0 received and the connection not closing."""
        return self.state == ST_CONNECTED

    @property
    def write_pending(self):
        """Bytes not yet handed to the OS: ours plus the transport's buffer."""
        cdef Py_ssize_t n = len(self.wbuf)
        if self.transport is not None:
            try:
                n += self.transport.get_write_buffer_size()
            except Exception:
                pass
        return n

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        self.last_in = self.last_out = self.loop.time()
        self._write(self.connect_packet)
        self._flush()
        self._schedule_keepalive()

    def get_buffer(self, sizehint):
        # asyncio.BufferedProtocol: the transport reads straight into a
        # buffer kept across reads, instead of handing over a new bytes object
        # per read (a malloc, a copy and, at ~256 KiB, page faults). Safe to
        # reuse: the decoder copies out everything it keeps (payloads, an
        # incomplete packet's bytes) before data_received returns. The buffer
        # is small while little arrives and large while data flows (_read_done).
        if self.in_read:
            # A read nested in a read: asyncio's SSL transport reads again from
            # inside close() when a callback closes the connection. It must not
            # land in the buffer still being decoded, so it gets its own.
            self.nested_view = memoryview(bytearray(NESTED_READ_SIZE))
            return self.nested_view
        return self.rview

    def buffer_updated(self, Py_ssize_t nbytes):
        cdef double started
        if self.in_read:
            # Those bytes arrived after the ones being decoded: they wait.
            self.nested_reads.append(bytes(self.nested_view[:nbytes]))
            self.nested_view = None
            return
        started = _monotonic()
        self.in_read = True
        try:
            self.data_received(self.rview[:nbytes])
            while self.nested_reads:
                self.data_received(self.nested_reads.pop(0))
        finally:
            self.in_read = False
        self._read_done(nbytes, started)

    cdef int _read_done(self, Py_ssize_t nbytes, double started) except -1:
        # After a read, outside it (the buffer may be swapped now): size the
        # next read for the flow and keep the loop iteration short.
        cdef double elapsed = _monotonic() - started
        cdef Py_ssize_t size
        if nbytes >= SMALL_READ_SIZE:
            self.big_reads += 1
        if self.transport is None:
            return 0
        if nbytes == len(self.rview) or (self.read_budget > 0 and elapsed > self.read_budget):
            # The read filled its buffer (data flows) or took too long.
            size = self._read_size(nbytes, elapsed)
            if size > SMALL_READ_SIZE and not self.big_buffer:
                self.big_view = memoryview(bytearray(READ_BUFFER_SIZE))
                self.big_buffer = True
                self.big_reads = 0
                self.shrink_handle = self.loop.call_later(SHRINK_CHECK, self._shrink_check)
            if self.big_buffer and size != len(self.rview):
                self.rview = self.big_view[:size]
        if self.read_budget <= 0 or self.read_pauses & PAUSE_BUDGET:
            return 0
        # Read budget: uvloop reads up to 32 times in one loop iteration, and
        # each read is decoded and dispatched inline, so a flood would hold
        # every timer and task back for as long as all of them take. Every
        # `read_budget` seconds of reads, stop reading until the next
        # iteration, so no iteration reads for longer than that plus one
        # read. Counted across iterations (neither loop's time() tells them
        # apart, and a marker per iteration would cost a call_soon per small
        # read): a pause that was not needed only costs one iteration.
        self.budget_spent += elapsed
        if self.budget_spent >= self.read_budget:
            self.budget_spent = 0.0
            self._pause_reading(PAUSE_BUDGET)
            self.loop.call_soon(self._budget_resume)
        return 0

    cdef Py_ssize_t _read_size(self, Py_ssize_t nbytes, double elapsed):
        # Bytes the next read may take: what half the budget decodes at this
        # read's pace (telemetry: the whole large buffer; a flood of tiny
        # packets such as PUBREL, ~1.7 us per 4 bytes: the small size), so
        # one read never holds the loop much past the budget.
        cdef double fit
        if self.read_budget <= 0 or elapsed <= 0:
            return READ_BUFFER_SIZE
        fit = nbytes * (self.read_budget * 0.5) / elapsed
        if fit >= READ_BUFFER_SIZE:
            return READ_BUFFER_SIZE
        if fit <= SMALL_READ_SIZE:
            return SMALL_READ_SIZE
        return <Py_ssize_t>fit

    def _budget_resume(self):
        # The loop ran its timers and other callbacks since the pause.
        self._resume_reading(PAUSE_BUDGET)

    def _shrink_check(self):
        # No read since the last check would have filled the small buffer:
        # the flow has stopped, so free the large one.
        self.shrink_handle = None
        if self.transport is None:
            return
        if self.big_reads:
            self.big_reads = 0
            self.shrink_handle = self.loop.call_later(SHRINK_CHECK, self._shrink_check)
            return
        self.rview = memoryview(bytearray(SMALL_READ_SIZE))
        self.big_view = None
        self.big_buffer = False

    cdef int _pause_reading(self, int reason) except -1:
        """Stop reading for `reason` (a PAUSE_* bit) until it is cleared."""
        cdef int before = self.read_pauses
        self.read_pauses = before | reason
        if before == 0 and self.transport is not None:
            try:
                self.transport.pause_reading()
            except Exception as exc:  # closing transport: connection_lost follows
                self.logger.debug("pause_reading failed: %r", exc)
        return 0

    cdef int _resume_reading(self, int reason) except -1:
        """Clear `reason`; read again only if no other reason holds reading."""
        cdef int before = self.read_pauses
        self.read_pauses = before & ~reason
        if before and not self.read_pauses and self.transport is not None:
            try:
                self.transport.resume_reading()
            except Exception as exc:  # closing under us
                self.logger.debug("resume_reading failed: %r", exc)
        return 0

    def data_received(self, data):
        # Nothing may escape from here: uvloop would treat it as a fatal
        # transport error. A malformed packet closes the connection and the
        # connector's supervisor reconnects.
        cdef double now = self.loop.time()
        cdef double previous = self.last_in
        cdef long long packets_before = self.packets_in
        self.last_in = now
        self.session.reads += 1
        try:
            self.decoder.feed_to(data, self)
        except (SystemExit, KeyboardInterrupt) as exc:
            # Raised by a callback: it is meant for whoever runs the loop, as
            # asyncio lets it out of a task. uvloop would take it for a
            # transport error (close the connection, log, go on), so it is
            # raised again from a callback of the loop's own, which both loops
            # let propagate out of run_forever().
            self.loop.call_soon(_reraise, exc)
            return
        except ProtocolError as exc:
            self.session.protocol_errors += 1
            self.errlog.log("protocol_error", _ERROR, "MQTT protocol error from the broker, reconnecting: %s", exc)
            self._abort(exc)
        except Exception as exc:
            self.session.protocol_errors += 1
            self.errlog.log("protocol_error", _ERROR, "unexpected error while reading from the broker, reconnecting: %r", exc, exc_info=exc)
            self._abort(exc)
            return
        if self.decoder.partial:
            # An incomplete packet has `packet_timeout` from its first byte (or
            # from the last completed packet) to arrive: a peer that trickles
            # one byte at a time cannot keep a half-read packet open for ever.
            if self.partial_since == 0 or self.packets_in != packets_before:
                self.partial_since = now
        else:
            self.partial_since = 0
        if (self.read_coalesce > 0 and now - previous < self.read_coalesce
                and len(data) < self.coalesce_below and self.coalesce_handle is None
                and not self.session.inflight and not self.acks):
            # Read coalescing: a broker that writes every PUBLISH on its own
            # makes a reader that keeps up pay a wakeup and a read per one or
            # two messages. Small reads coming faster than `read_coalesce`
            # apart mean a flood: wait that long so the kernel gathers the
            # next messages into one read. An isolated message (previous read
            # longer ago) is never delayed. Never while acknowledgements are
            # awaited: the in-flight window and subscribe() wait on them.
            if self.transport is not None and self.state == ST_CONNECTED:
                self._pause_reading(PAUSE_COALESCE)
                self.coalesce_handle = self.loop.call_later(self.read_coalesce, self._coalesce_resume)

    def _coalesce_resume(self):
        self.coalesce_handle = None
        self._resume_reading(PAUSE_COALESCE)

    def eof_received(self):
        # The broker closed its side; MQTT has no half-close, so close ours.
        return False

    def connection_lost(self, exc):
        cdef object reason = self.close_reason if self.close_reason is not None else exc
        self.state = ST_CLOSED
        self.transport = None
        if self.ka_handle is not None:
            self.ka_handle.cancel()
            self.ka_handle = None
        if self.coalesce_handle is not None:
            self.coalesce_handle.cancel()
            self.coalesce_handle = None
        if self.shrink_handle is not None:
            self.shrink_handle.cancel()
            self.shrink_handle = None
        self.wbuf = bytearray()
        self.session.detach(self)
        self.dispatcher.detach_reader(self)
        if not self.connack.done():
            err = ConnectionError("the broker closed the connection before CONNACK")
            if reason is not None:
                err.__cause__ = reason
            _fail(self.connack, err)
        acks = self.acks
        self.acks = {}
        for fut, _ in acks.values():
            _fail(fut, ConnectionError("connection lost before the acknowledgement"))
        self._wake_drain()
        if not self.closed.done():
            self.closed.set_result(reason)

    def pause_writing(self):
        # Stop reading too: every PUBLISH (QoS 1/2) or PUBREL read is answered
        # with a write, so a peer that floods without reading our answers would
        # otherwise grow the transport's write buffer without bound.
        self.writing_paused = True
        self._pause_reading(PAUSE_WRITING)

    def resume_writing(self):
        self.writing_paused = False
        self._resume_reading(PAUSE_WRITING)
        self._wake_drain()

    # -- PacketSink (called by the decoder) ---------------------------------

    cdef int on_publish(self, str topic, bytes payload, int qos, bint retain, bint dup, int packet_id) except -1:
        cdef list subs
        self.packets_in += 1
        if self.state != ST_CONNECTED:
            if self.state == ST_CONNECTING:
                raise ProtocolError("PUBLISH received before CONNACK (MQTT 3.1.1 §3.2)")
            return 0  # closing: deliver nothing more
        if qos == 1:
            # §4.3.2: acknowledge; the dispatcher owns the message from here.
            self._write(_encode_puback(packet_id))
        elif qos == 2:
            # §4.3.3 method B: keep the packet id until PUBREL, deliver once;
            # a re-sent PUBLISH with a kept id is only acknowledged again.
            self._write(_encode_pubrec(packet_id))
            if packet_id in self.session.inbound_qos2:
                return 0
            self.session.inbound_qos2.add(packet_id)
        self.dispatcher.received += 1
        subs = self.trie.match_shared(topic)
        if PyList_GET_SIZE(subs):
            self.dispatcher.deliver(topic, payload, subs)
        return 0

    cdef int on_oversized(self, str topic, int qos, bint retain, bint dup, int packet_id, Py_ssize_t size) except -1:
        # A PUBLISH larger than max_packet_size: the decoder discards its
        # payload as it arrives. Acknowledged like any other (§4.3), so the
        # broker does not send it again at every reconnect, and counted; the
        # connection and everything after it are unharmed. A retained one
        # would otherwise kill every connection right after its SUBACK.
        self.packets_in += 1
        if self.state != ST_CONNECTED:
            if self.state == ST_CONNECTING:
                raise ProtocolError("PUBLISH received before CONNACK (MQTT 3.1.1 §3.2)")
            return 0
        if qos == 1:
            self._write(_encode_puback(packet_id))
        elif qos == 2:
            self._write(_encode_pubrec(packet_id))
        self.dispatcher.oversized += 1
        self.errlog.log(
            "oversized", _WARNING,
            "PUBLISH on %r of %d bytes is larger than max_packet_size (%d): acknowledged and skipped, not delivered",
            topic, size, self.decoder.max_packet_size,
        )
        return 0

    cdef int on_packet(self, object packet) except -1:
        cdef str kind = packet.type
        self.packets_in += 1
        if kind == "PUBACK":
            self.session._acked(packet.packet_id, ACK_PUBACK)
        elif kind == "PUBREC":
            self.session._acked(packet.packet_id, ACK_PUBREC)
        elif kind == "PUBCOMP":
            self.session._acked(packet.packet_id, ACK_PUBCOMP)
        elif kind == "PUBREL":
            # §4.3.3: forget the id, answer PUBCOMP (even for an unknown id).
            self.session.inbound_qos2.discard(packet.packet_id)
            self._write(_encode_pubcomp(packet.packet_id))
        elif kind == "SUBACK" or kind == "UNSUBACK":
            entry = self.acks.get(packet.packet_id)
            if entry is None:
                self.logger.debug("%s for unknown packet id %d ignored", kind, packet.packet_id)
                return 0
            fut, filters = entry
            # filters: how many the SUBSCRIBE carried, 0 for an UNSUBSCRIBE.
            if (kind == "SUBACK") != (filters > 0):
                raise ProtocolError(
                    f"{kind} for packet id {packet.packet_id}, which is an "
                    f"{'UNSUBSCRIBE' if kind == 'SUBACK' else 'SUBSCRIBE'} (MQTT 3.1.1 §3.9, §3.11)"
                )
            if kind == "SUBACK" and len(packet.return_codes) != filters:
                raise ProtocolError(
                    f"SUBACK with {len(packet.return_codes)} return codes for {filters} topic filters (MQTT 3.1.1 §3.9.3)"
                )
            del self.acks[packet.packet_id]
            if not fut.done():
                fut.set_result(list(packet.return_codes) if kind == "SUBACK" else None)
        elif kind == "PINGRESP":
            self.ping_sent = 0
        elif kind == "CONNACK":
            self._on_connack(packet)
        else:
            raise ProtocolError(f"unexpected {kind} packet from the broker")
        return 0

    cdef int _on_connack(self, object packet) except -1:
        # §3.2: the first packet from the server is CONNACK, and only one.
        if self.state != ST_CONNECTING:
            raise ProtocolError("unexpected second CONNACK")
        rc = packet.return_code
        if rc != 0:
            # §3.2.2.3: the server closes the connection after a refusal.
            self.state = ST_CLOSING
            if not self.connack.done():
                self.connack.set_result((bool(packet.session_present), rc))
            if self.transport is not None:
                self.transport.close()
            return 0
        self.state = ST_CONNECTED
        self.session.attach(self, bool(packet.session_present))
        self.dispatcher.attach_reader(self)
        if not self.connack.done():
            self.connack.set_result((bool(packet.session_present), 0))
        return 0

    # -- writes ---------------------------------------------------------------

    cdef int _write(self, bytes data) except -1:
        if self.transport is None:
            raise ConnectionError("not connected")
        self.wbuf += data
        if len(self.wbuf) >= self.write_batch:
            self._flush()
        elif not self.flush_scheduled:
            # One transport.write per loop iteration for everything written in it.
            self.flush_scheduled = True
            self.loop.call_soon(self._flush_soon)
        return 0

    cdef int _flush(self) except -1:
        cdef bytearray buf
        if not self.wbuf or self.transport is None:
            return 0
        # Hand the buffer over (the transport may keep a reference) and start a new one.
        buf = self.wbuf
        self.wbuf = bytearray()
        self.last_out = self.loop.time()
        self.transport.write(buf)
        return 0

    def _flush_soon(self):
        self.flush_scheduled = False
        try:
            self._flush()
        except Exception as exc:  # transport closing under us
            self.logger.debug("write failed: %r", exc)

    def drain_waiter_future(self):
        """A future resolved when the transport resumes writing (or is lost).

        One per waiting publish() call, so cancelling one caller does not
        cancel the others.
        """
        fut = self.loop.create_future()
        self.drain_waiters.append(fut)
        return fut

    cdef int _wake_drain(self) except -1:
        cdef list waiters = self.drain_waiters
        if not waiters:
            return 0
        self.drain_waiters = []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        return 0

    cpdef object subscribe(self, list filters):
        """Send SUBSCRIBE for [(filter, qos), ...]; future of the SUBACK return codes."""
        cdef int pid = self.session._alloc_packet_id()
        fut = self.loop.create_future()
        self._write(_encode_subscribe(pid, filters))
        self.acks[pid] = (fut, len(filters))  # the SUBACK must have one code per filter
        return fut

    cpdef object unsubscribe(self, list filters):
        """Send UNSUBSCRIBE for [filter, ...]; future resolved by UNSUBACK."""
        cdef int pid = self.session._alloc_packet_id()
        fut = self.loop.create_future()
        self._write(_encode_unsubscribe(pid, filters))
        self.acks[pid] = (fut, 0)
        return fut

    def send_disconnect(self):
        """Graceful close: DISCONNECT (so no Last Will, §3.14.4), then close."""
        if self.transport is None:
            return
        self.state = ST_CLOSING
        try:
            self._write(_DISCONNECT)
            self._flush()
        finally:
            if self.transport is not None:
                self.transport.close()

    def abort(self, reason=None):
        """Drop the connection now (no DISCONNECT: the broker sends the Last Will)."""
        self._abort(reason)

    cdef int _abort(self, object reason) except -1:
        if self.state != ST_CLOSED:
            self.state = ST_CLOSING
        if reason is not None and self.close_reason is None:
            self.close_reason = reason
        if self.transport is not None:
            self.transport.abort()
        return 0

    # -- keepalive (MQTT 3.1.1 §3.1.2.10, §3.12) --------------------------------

    cdef int _schedule_keepalive(self) except -1:
        # The tick also enforces `packet_timeout`, so it runs without keepalive too.
        cdef double period = self.keepalive if self.keepalive > 0 else self.packet_timeout
        if self.packet_timeout > 0 and self.packet_timeout < period:
            period = self.packet_timeout
        if period > 0 and self.transport is not None:
            self.ka_handle = self.loop.call_later(max(period / 4.0, 0.05), self._keepalive_tick)
        return 0

    def _keepalive_tick(self):
        cdef double now
        self.ka_handle = None
        if self.transport is None or self.state >= ST_CLOSING:
            return
        now = self.loop.time()
        if self.partial_since:
            if self.read_pauses:
                self.partial_since = now  # we are not reading: the peer is not the slow one
            elif self.packet_timeout > 0 and now - self.partial_since >= self.packet_timeout:
                self.session.protocol_errors += 1
                self.errlog.log(
                    "packet_timeout", _WARNING,
                    "an incomplete packet from the broker (%d bytes so far) did not arrive within %.1f s: reconnecting",
                    self.decoder.partial, self.packet_timeout,
                )
                self._abort(TimeoutError(f"incomplete packet not received within {self.packet_timeout} s"))
                return
        if self.keepalive <= 0:
            self._schedule_keepalive()
            return
        if self.read_pauses:
            # Reading is paused (a slow consumer's backpressure, a write side
            # the broker does not drain): the PINGRESP cannot arrive, so a
            # missing one says nothing about the peer. The broker must still
            # hear from us every keepalive (§3.1.2.10), or it declares us dead,
            # publishes our Will and drops our queued messages: keep pinging.
            if self.ping_sent:
                self.ping_sent = now
            if now - self.last_out >= self.keepalive * 0.5:
                if not self._ping(now):
                    return
        elif self.ping_sent:
            if now - max(self.ping_sent, self.last_in) >= self.keepalive:
                # Nothing at all from the broker for a keepalive period after PINGREQ.
                self.errlog.log("keepalive", _WARNING, "no PINGRESP from the broker within %.1f s: connection is dead, reconnecting", self.keepalive)
                self._abort(TimeoutError(f"no PINGRESP within {self.keepalive} s"))
                return
            if now - self.last_out >= self.keepalive * 0.75 and not self._ping(now):
                return
        elif now - self.last_out >= self.keepalive * 0.75 or now - self.last_in >= self.keepalive:
            # §3.1.2.10: a packet at least every keepalive seconds; PINGREQ when idle.
            if not self._ping(now):
                return
        self._schedule_keepalive()

    cdef bint _ping(self, double now) except -1:
        """Send PINGREQ; False when the transport is closing under us."""
        try:
            self._write(_PINGREQ)
            self._flush()
        except Exception as exc:
            self.logger.debug("PINGREQ failed: %r", exc)
            return False
        if not self.ping_sent:
            self.ping_sent = now
        return True


class AsyncioMqttProtocol(MqttProtocol, asyncio.BufferedProtocol):
    """`MqttProtocol` as an `asyncio.BufferedProtocol` (what create_connection gets).

    Buffered, so the transport reads into `MqttProtocol`'s own buffer (see
    get_buffer); `data_received` stays for callers that hand bytes in.
    """

    __slots__ = ()
