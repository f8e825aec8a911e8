# Compiled MQTT 3.1.1 codec. Contract used by cascade_fast/_protocol.pyx.

cdef class PacketSink:
    # The protocol subclasses this; the decoder calls it once per packet,
    # in stream order, without building a named tuple for PUBLISH.
    # packet_id is 0 for QoS 0.
    cdef int on_publish(self, str topic, bytes payload, int qos, bint retain, bint dup, int packet_id) except -1
    # Every other packet, as the named tuple `feed` would return.
    cdef int on_packet(self, object packet) except -1


cdef class Decoder:
    cdef:
        bytearray _tail          # incomplete packet kept between feeds

    # Decode every complete packet in `data` (after the kept tail) into `sink`.
    # Raises ProtocolError on malformed input (the stream is then unusable).
    cdef int feed_to(self, object data, PacketSink sink) except -1
