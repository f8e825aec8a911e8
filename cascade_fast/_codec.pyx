# cython: language_level=3
# INTERIM (issue 3): the encoders are the pure twin's until the compiled codec lands.
from cascade_fast._codec_py import (
    DEFAULT_MAX_PACKET_SIZE, encode_connect, encode_connack, encode_publish, encode_publish_batch,
    encode_puback, encode_pubrec, encode_pubrel, encode_pubcomp, encode_subscribe, encode_suback,
    encode_unsubscribe, encode_unsuback, encode_pingreq, encode_pingresp, encode_disconnect,
)

cdef class PacketSink:
    cdef int on_publish(self, str topic, bytes payload, int qos, bint retain, bint dup, int packet_id) except -1:
        return 0
    cdef int on_packet(self, object packet) except -1:
        return 0

cdef class Decoder:
    def __init__(self, max_packet_size=DEFAULT_MAX_PACKET_SIZE):
        self._tail = bytearray()
    cdef int feed_to(self, object data, PacketSink sink) except -1:
        return 0
