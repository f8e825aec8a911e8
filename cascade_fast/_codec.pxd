# Compiled MQTT 3.1.1 codec (pure twin: cascade_fast/_codec_py.py).
# Contract used by cascade_fast/_protocol.pyx: subclass PacketSink, call
# Decoder.feed_to from data_received.

cdef class PacketSink:
    # The protocol subclasses this; the decoder calls it once per packet,
    # in stream order, without building a named tuple for PUBLISH.
    # packet_id is 0 for QoS 0. The base class ignores everything.
    # Error contract: an exception raised here propagates out of feed_to;
    # the packet counts as consumed and the bytes after it stay buffered
    # (see Decoder.feed_to).
    cdef int on_publish(self, str topic, bytes payload, int qos, bint retain, bint dup, int packet_id) except -1
    # Every other packet, as the named tuple `feed` would return.
    cdef int on_packet(self, object packet) except -1
    # A PUBLISH over max_packet_size, being skipped: its variable header (the
    # payload is discarded as it arrives); size is the remaining length
    # announced. Same error contract as on_publish.
    cdef int on_oversized(self, str topic, int qos, bint retain, bint dup, int packet_id, Py_ssize_t size) except -1


cdef class CallbackSink(PacketSink):
    # Forwards to Python callables (tests, and Python code using feed_to).
    cdef:
        object _on_publish   # callable(topic, payload, qos, retain, dup, packet_id)
        object _on_packet    # callable(packet)
        object _on_oversized # callable(topic, qos, retain, dup, packet_id, size), or None


cdef class CountingSink(PacketSink):
    # The trivial sink of the feed_to benchmark: counts, keeps nothing.
    cdef:
        public Py_ssize_t publishes      # PUBLISH packets received
        public Py_ssize_t payload_bytes  # their payload bytes
        public Py_ssize_t packets        # other packets received
        public Py_ssize_t oversized      # oversized PUBLISH packets skipped


cdef class Decoder:
    cdef:
        bytearray _tail          # incomplete packet kept between feeds (or what
                                 # followed a packet whose sink call raised)
        Py_ssize_t _max          # largest remaining length accepted (max_packet_size)
        object _error            # str: the ProtocolError that poisoned the stream, or None
        bint _busy               # inside feed/feed_to: re-entrancy guard
        bint _in_sink            # a sink method is running (tells its exceptions from ours)
        bint _rest               # _tail is what followed a packet whose sink raised:
                                 # it may hold complete packets, not just a partial one
        Py_ssize_t _skip         # bytes of an oversized PUBLISH still to discard
        Py_ssize_t _skip_size    # that packet's whole size, fixed header included

    # Decode every complete packet in `data` (after the kept tail) into `sink`.
    # Error contract (except -1): a ProtocolError poisons the decoder (every
    # later call raises it again); an exception from the sink propagates with
    # that packet consumed and the rest of `data` kept for the next call.
    cpdef int feed_to(self, object data, PacketSink sink) except -1
    # Shared body of feed/feed_to: exactly one of `sink`/`out` is not None.
    cdef int _run(self, object data, PacketSink sink, list out) except -1
    cdef int _parse(self, const unsigned char* buf, Py_ssize_t n, PacketSink sink, list out) except -1
