# The MQTT 3.1.1 client protocol: wire state machine, session state and the
# dispatcher (the asyncpg layering: a state machine, the state that outlives
# one connection, and a thin asyncio.Protocol mix-in on top, in _protocol.pyx).
from cascade_fast._codec cimport Decoder, PacketSink
from cascade_fast._topics cimport TopicTrie


cdef class Subscription:
    # One `subscribe()` call: the value stored in the topic trie.
    cdef:
        readonly object callback     # callback(topic, data)
        readonly object handle       # the user's SubscriptionHandle
        readonly bint raw            # deliver payload bytes, no JSON decode
        public bint active           # cleared at unsubscribe: delivery stops at once


cdef class Dispatcher:
    # Calls the callbacks of every received PUBLISH; outlives connections so
    # deliveries queued behind a suspended coroutine survive a reconnect.
    cdef:
        object loop                  # the running loop, set at first connect
        object queue                 # deque of (topic, payload, subs, start, decoded)
        readonly object task         # drains `queue` while a coroutine is suspended, else None
        MqttProtocol reader          # connection whose reading backpressure pauses
        Py_ssize_t high_water        # queued deliveries that pause reading
        Py_ssize_t low_water         # queued deliveries that resume it
        readonly bint reading_paused # pause_reading() is in effect
        bint closing                 # disconnect() is cancelling `task`
        object errlog                # _common.RateLimitedLog
        object logger                # "cascade.connectors.mqtt"
        public long long received        # PUBLISH packets received (QoS 2 duplicates excluded)
        public long long dispatched      # callback calls that returned normally
        public long long decode_errors   # payloads that were not JSON
        public long long callback_errors # callback calls that raised
        public long long undelivered     # deliveries discarded by disconnect()
        public long long oversized       # PUBLISH over max_packet_size: acknowledged, skipped, not delivered
        public long long pauses          # times reading was paused

    cdef int deliver(self, str topic, bytes payload, list subs) except -1
    cdef bint _run_inline(self, str topic, bytes payload, list subs, Py_ssize_t start, object decoded) except -1
    cdef object _decode(self, str topic, bytes payload)
    cdef int _failed(self, Subscription sub, str topic, object exc) except -1
    cdef int _enqueue(self, str topic, bytes payload, list subs, Py_ssize_t start, object decoded) except -1
    cdef tuple _pop(self)
    cdef int _set_reading(self, bint paused) except -1


cdef class Outgoing:
    # A QoS 1/2 PUBLISH between publish() and its last acknowledgement (MQTT 3.1.1 §4.3).
    cdef:
        str topic
        bytes payload
        int qos
        bint retain
        int packet_id                # 0 until it enters the in-flight window
        int state                    # OUT_* enum in _protocol.pyx
        bint counted                 # counts in Session.published (not presence)
        object waiter                # future of a publish() waiting for a window slot, or None


cdef class Session:
    # MQTT 3.1.1 §4.1 client session state plus the outbound write path;
    # outlives connections (re-sent after reconnect when clean_session=False).
    cdef:
        object loop                  # the running loop, set at first connect
        MqttProtocol proto           # the connection that has had its CONNACK, or None
        dict inflight                # packet id -> Outgoing, in send order
        object backlog               # deque of Outgoing waiting for a window slot
        set inbound_qos2             # QoS 2 packet ids between PUBLISH and PUBREL (§4.3.3)
        int next_packet_id           # next candidate packet id, 1..65535 (§2.3.1)
        readonly int max_inflight    # in-flight window size
        readonly Py_ssize_t max_queued   # unacknowledged QoS 1/2 messages kept (in flight + backlog)
        readonly bint clean_session  # CleanSession flag sent in CONNECT
        public bint accepting        # the connector is running: QoS 1/2 publishes are queued while disconnected
        dict topics_ok               # topic names already validated (bounded)
        object encode_payload        # _common.encode_payload
        object errlog                # _common.RateLimitedLog
        object logger
        list idle_waiters            # futures resolved when nothing is left to write or acknowledge
        public long long published       # publishes handed to the transport (first send)
        public long long publish_errors  # publishes whose send failed
        public long long dropped         # publishes not sent: QoS 0 while disconnected, queue full, left at disconnect()
        public long long protocol_errors # connections closed for a protocol violation
        public long long resent          # PUBLISH/PUBREL re-sent after a reconnect (§4.4)
        public long long reads           # data_received calls (reads vs received shows read batching)

    cpdef object publish(self, object topic, object payload, object qos=*, bint retain=*, bint counted=*)
    cdef int _check_topic(self, object topic) except -1
    cdef int _queue(self, Outgoing msg) except -1
    cdef int _send(self, Outgoing msg) except -1
    cdef int _alloc_packet_id(self) except -1
    cdef int _acked(self, int packet_id, int kind) except -1
    cdef int _fill_window(self) except -1
    cdef int _check_idle(self) except -1
    cdef int attach(self, MqttProtocol proto, bint session_present) except -1
    cdef int detach(self, MqttProtocol proto) except -1


cdef class MqttProtocol(PacketSink):
    # One TCP/TLS connection to the broker (asyncio protocol callbacks in _protocol.pyx).
    cdef:
        object loop
        object transport             # set in connection_made, None after connection_lost
        Decoder decoder              # incremental MQTT 3.1.1 decoder
        TopicTrie trie               # subscriptions (shared with the connector)
        Dispatcher dispatcher
        Session session
        bytes connect_packet         # CONNECT, written in connection_made
        readonly object connack      # future: (session_present, return_code)
        readonly object closed       # future: resolved (exception or None) in connection_lost
        dict acks                    # SUBSCRIBE/UNSUBSCRIBE packet id -> (future of SUBACK codes / None, filters in a SUBSCRIBE or 0)
        int state                    # ST_* enum in _protocol.pyx
        bytearray wbuf               # writes made in this loop iteration, flushed once
        object rview                 # memoryview of the read buffer the transport reads into (BufferedProtocol)
        bint big_buffer              # rview is (a slice of) the large buffer (data is flowing), not the small one
        object big_view              # memoryview of the whole large buffer while it is held, else None
        Py_ssize_t big_reads         # reads that filled the small buffer's size since the last shrink check
        object shrink_handle         # TimerHandle of that check while the large buffer is held, or None
        readonly int read_pauses     # PAUSE_* bits: the transport is not reading while any is set
        double read_budget           # seconds of reads per loop iteration before yielding to the loop (0 = off)
        double budget_spent          # seconds spent in reads since reading last paused for the budget (real clock)
        bint in_read                 # inside buffer_updated: a nested read gets a buffer of its own
        object nested_view           # that buffer, between get_buffer and buffer_updated
        list nested_reads            # bytes of nested reads, decoded after the read in progress
        bint flush_scheduled         # a call_soon(_flush) is pending
        Py_ssize_t write_batch       # flush at once when wbuf grows past this many bytes
        readonly bint writing_paused # the transport called pause_writing()
        list drain_waiters           # futures of publish() calls waiting for resume_writing
        double keepalive             # seconds, 0 = off (MQTT 3.1.1 §3.1.2.10)
        object ka_handle             # keepalive TimerHandle
        double last_in               # loop.time() of the last bytes received
        double last_out              # loop.time() of the last bytes written
        double ping_sent             # loop.time() of the unanswered PINGREQ, 0 if none
        double packet_timeout        # seconds an incomplete packet may take to arrive (0 = no limit)
        double partial_since         # loop.time() the incomplete packet began (or last progressed), 0 if none
        long long packets_in         # packets decoded on this connection
        double read_coalesce         # seconds to stop reading after a small read (0 = off)
        Py_ssize_t coalesce_below    # a read shorter than this many bytes is "small"
        object coalesce_handle       # TimerHandle that resumes reading, or None
        object errlog
        object logger
        readonly object close_reason # why we closed the connection (exception), or None

    cdef int _pause_reading(self, int reason) except -1
    cdef int _resume_reading(self, int reason) except -1
    cdef int _read_done(self, Py_ssize_t nbytes, double started) except -1
    cdef Py_ssize_t _read_size(self, Py_ssize_t nbytes, double elapsed)
    cdef int _write(self, bytes data) except -1
    cdef int _flush(self) except -1
    cdef int _abort(self, object reason) except -1
    cdef int _wake_drain(self) except -1
    cdef int _on_connack(self, object packet) except -1
    cdef int _schedule_keepalive(self) except -1
    cdef bint _ping(self, double now) except -1
    cpdef object subscribe(self, list filters)
    cpdef object unsubscribe(self, list filters)
