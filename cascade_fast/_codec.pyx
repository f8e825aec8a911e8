# cython: language_level=3
# STUB: replaced by the real codec (issue 3).
cdef class PacketSink:
    cdef int on_publish(self, str topic, bytes payload, int qos, bint retain, bint dup, int packet_id) except -1:
        return 0
    cdef int on_packet(self, object packet) except -1:
        return 0

cdef class Decoder:
    def __init__(self):
        self._tail = bytearray()
    cdef int feed_to(self, object data, PacketSink sink) except -1:
        return 0
