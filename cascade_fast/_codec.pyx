# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""MQTT 3.1.1 codec, compiled twin of `cascade_fast._codec_py`.

The pure module is the reference and documents the behaviour (the error and
state rules of `Decoder`, the validation of the encoders); this one must
accept and reject the same inputs, with the same messages, and produce equal
packets and identical bytes (tests/test_codec_hypothesis.py, the fuzzer in
tools/fuzz_decoder.py).

What is different is how: complete packets are parsed with C pointer reads
straight from the buffer `feed` was given (every length compared with the
packet's end before the read, as asyncpg's ReadBuffer does), strings are
scanned once through a character-class table, PUBLISH tuples are allocated
with the named tuple type's `tp_alloc` and filled in place, and `feed_to`
calls a C-level `PacketSink` without building any tuple per PUBLISH.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport PyLong_CheckExact, PyLong_FromLong
from cpython.object cimport Py_TPFLAGS_HEAPTYPE, Py_TYPE
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_SET_ITEM
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy

from cascade_fast._debug cimport CASCADE_FAST_DEBUG

from operator import index as _index

from cascade_fast._errors import ProtocolError
from cascade_fast.packets import (
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    Connack,
    Connect,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Oversized,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
)

cdef extern from "Python.h":
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    void* PyUnicode_DATA(object o)
    const char* PyUnicode_AsUTF8AndSize(object o, Py_ssize_t* size) except NULL
    object PyUnicode_DecodeUTF8(const char* s, Py_ssize_t size, const char* errors)
    Py_ssize_t PyByteArray_GET_SIZE(object o)

cdef extern from *:
    """
    /* A fresh, zero-filled instance of a tuple subclass (a named tuple):
       the caller fills every slot with PyTuple_SET_ITEM. */
    static PyObject* cf_tuple_alloc(PyObject* tp, Py_ssize_t n) {
        return ((PyTypeObject*)tp)->tp_alloc((PyTypeObject*)tp, n);
    }
    """
    object cf_tuple_alloc(object tp, Py_ssize_t n)

__all__ = [
    "DEFAULT_MAX_PACKET_SIZE",
    "MAX_REMAINING_LENGTH",
    "CallbackSink",
    "CountingSink",
    "Decoder",
    "PacketSink",
    "encode_connack",
    "encode_connect",
    "encode_disconnect",
    "encode_pingreq",
    "encode_pingresp",
    "encode_puback",
    "encode_pubcomp",
    "encode_publish",
    "encode_publish_batch",
    "encode_pubrec",
    "encode_pubrel",
    "encode_suback",
    "encode_subscribe",
    "encode_unsuback",
    "encode_unsubscribe",
]

# 1 MiB: why, in the pure twin.
DEFAULT_MAX_PACKET_SIZE = 1024 * 1024
MAX_REMAINING_LENGTH = 268_435_455
# Decoder accepts max_packet_size up to this (anything >= 268435455 is "no limit").
cdef object _MAX_PACKET_SIZE_LIMIT = 4_294_967_296

cdef enum:
    # MQTT 3.1.1 §2.2.3: the largest remaining length, 4 bytes of 7 bits.
    REMAINING_MAX = 268435455
    # §1.5.3: strings carry a two-byte length.
    STRING_MAX = 65535
    # Kinds of string for _read_str (what is checked after §1.5.3).
    STR_PLAIN = 0                # a UTF-8 string: client id, user name, protocol name
    STR_TOPIC = 1                # a topic name (§4.7.3, §3.3.2.1)
    STR_FILTER = 2               # a topic filter (§4.7.1, §4.7.3)
    # Bits of _CHAR_CLASS: one pass over a string's bytes finds all of them.
    CH_NUL = 1                   # U+0000 (§1.5.3)
    CH_WILD = 2                  # '+' or '#' (§4.7.1)
    CH_HIGH = 4                  # a byte >= 0x80: not ASCII, needs the UTF-8 decoder
    # Packet types (§2.2.1, Table 2.1).
    T_CONNECT = 1
    T_CONNACK = 2
    T_PUBLISH = 3
    T_PUBACK = 4
    T_PUBREC = 5
    T_PUBREL = 6
    T_PUBCOMP = 7
    T_SUBSCRIBE = 8
    T_SUBACK = 9
    T_UNSUBSCRIBE = 10
    T_UNSUBACK = 11
    T_PINGREQ = 12
    T_PINGRESP = 13
    T_DISCONNECT = 14

# §2.2.1, Table 2.1.
cdef tuple _NAMES = (
    "RESERVED", "CONNECT", "CONNACK", "PUBLISH", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP",
    "SUBSCRIBE", "SUBACK", "UNSUBSCRIBE", "UNSUBACK", "PINGREQ", "PINGRESP", "DISCONNECT", "RESERVED",
)
# §2.2.2, Table 2.2: the flags of every type but PUBLISH.
cdef int _FLAGS[16]
# Remaining length of the fixed-size packets, -1 for variable size.
cdef int _FIXED_LENGTH[16]
# 1 when a fixed header's first byte is valid (§2.2.1, §2.2.2, §3.3.1).
cdef unsigned char _FIRST_OK[256]
cdef unsigned char _CHAR_CLASS[256]


cdef void _init_tables() noexcept:
    cdef int i, ptype, flags, qos
    cdef int fl[16]
    cdef int fx[16]
    fl[:] = [-1, 0, 0, -1, 0, 0, 2, 0, 2, 0, 2, 0, 0, 0, 0, -1]
    fx[:] = [-1, -1, 2, -1, 2, 2, 2, 2, -1, -1, -1, 2, 0, 0, 0, -1]
    for i in range(16):
        _FLAGS[i] = fl[i]
        _FIXED_LENGTH[i] = fx[i]
    for i in range(256):
        ptype = i >> 4
        flags = i & 0x0F
        if ptype == 0 or ptype == 15:
            _FIRST_OK[i] = 0
        elif ptype == T_PUBLISH:
            qos = (flags >> 1) & 3
            _FIRST_OK[i] = not (qos == 3 or (qos == 0 and flags & 8))
        else:
            _FIRST_OK[i] = flags == _FLAGS[ptype]
        _CHAR_CLASS[i] = (CH_NUL if i == 0 else 0) | (CH_WILD if i == 43 or i == 35 else 0) | (CH_HIGH if i >= 0x80 else 0)


_init_tables()

cdef object _Publish = Publish
cdef str _S_PUBLISH = "PUBLISH"
cdef tuple _QOS_OBJ = (0, 1, 2)
# The named tuples are plain tuple subclasses (no __dict__): allocating one
# with tp_alloc and filling its slots is then safe, and much faster than
# calling the class. Checked here rather than assumed.
cdef bint _FAST_TUPLES = (
    Publish.__basicsize__ == tuple.__basicsize__
    and Publish.__itemsize__ == tuple.__itemsize__
    and Publish.__dictoffset__ == 0
    and len(Publish._fields) == 7
)
cdef frozenset _SUBACK_CODES = frozenset((0, 1, 2, 0x80))


# --------------------------------------------------------------------------
# Decoding helpers. Every length is compared with the packet's end before the
# bytes it covers are read.


cdef int _bad_first_byte(unsigned char b0) except -1:
    """Raise the ProtocolError for an invalid first byte (_FIRST_OK[b0] == 0)."""
    cdef int ptype = b0 >> 4
    cdef int flags = b0 & 0x0F
    cdef int qos
    if ptype == 0 or ptype == 15:
        raise ProtocolError(f"reserved packet type {ptype} (MQTT 3.1.1 §2.2.1)")
    if ptype == T_PUBLISH:
        qos = (flags >> 1) & 3
        if qos == 3:
            raise ProtocolError("PUBLISH with QoS 3 (MQTT 3.1.1 §3.3.1.2)")
        raise ProtocolError("PUBLISH with DUP set at QoS 0 (MQTT 3.1.1 §3.3.1.1)")
    raise ProtocolError(
        f"invalid fixed-header flags 0x{flags:X} for {_NAMES[ptype]}, expected 0x{_FLAGS[ptype]:X} (MQTT 3.1.1 §2.2.2)"
    )


cdef inline int _check_length(unsigned char b0, Py_ssize_t rem, Py_ssize_t max_size) except -1:
    """Refuse a remaining length over the limit or wrong for a fixed-size packet.

    1 for a PUBLISH over the limit, which the decoder skips; else 0.
    """
    cdef int ptype = b0 >> 4
    cdef int fixed = _FIXED_LENGTH[ptype]
    if rem > max_size:
        if ptype == T_PUBLISH:
            return 1
        raise ProtocolError(f"remaining length {rem} exceeds max_packet_size {max_size}")
    if fixed >= 0 and rem != fixed:
        raise ProtocolError(f"{_NAMES[ptype]} remaining length {rem}, expected {fixed} (MQTT 3.1.1 §3.{ptype}.1)")
    return 0


cdef inline int _parse_header(
    const unsigned char* buf, Py_ssize_t pos, Py_ssize_t n, Py_ssize_t max_size,
    unsigned char* b0_out, Py_ssize_t* rem_out, Py_ssize_t* start_out,
) except -1:
    """Parse the fixed header at buf[pos:n]: 1 when complete, 0 when more bytes are needed.

    2 when complete and the packet is a PUBLISH over max_size (to skip). The
    first byte is validated as soon as it is there, the remaining length
    (§2.2.3) as soon as it is complete: before the body is waited for.
    """
    cdef unsigned char b0, byte
    cdef Py_ssize_t rem = 0, i = pos + 1
    cdef int shift = 0, complete = 1
    if pos >= n:
        return 0
    b0 = buf[pos]
    if not _FIRST_OK[b0]:
        _bad_first_byte(b0)
    while True:
        if i >= n:
            return 0
        byte = buf[i]
        i += 1
        rem |= (<Py_ssize_t>(byte & 0x7F)) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift == 28:
            raise ProtocolError("remaining length longer than 4 bytes (MQTT 3.1.1 §2.2.3)")
    if rem > max_size or _FIXED_LENGTH[b0 >> 4] >= 0:
        complete += _check_length(b0, rem, max_size)
    b0_out[0] = b0
    rem_out[0] = rem
    start_out[0] = i
    return complete


cdef inline Py_ssize_t _head_size(
    const unsigned char* buf, Py_ssize_t start, Py_ssize_t n, unsigned char b0, Py_ssize_t rem,
) noexcept:
    """Bytes of a PUBLISH's variable header, whose body starts at buf[start] (pure twin's _head_size)."""
    if n - start < 2 or rem < 2:
        return min(rem, 2)
    return min(rem, 2 + ((buf[start] << 8) | buf[start + 1]) + (2 if b0 & 6 else 0))


cdef inline int _read_u16(const unsigned char* buf, Py_ssize_t pos, Py_ssize_t end, str what) except -1:
    if end - pos < 2:
        raise ProtocolError(f"{what} runs past the end of the packet")
    return (buf[pos] << 8) | buf[pos + 1]


cdef inline int _read_pid(const unsigned char* buf, Py_ssize_t pos, Py_ssize_t end, str what) except -1:
    cdef int pid
    if end - pos < 2:
        raise ProtocolError(f"{what} packet identifier runs past the end of the packet")
    pid = (buf[pos] << 8) | buf[pos + 1]
    if pid == 0:
        raise ProtocolError(f"{what} packet identifier 0 (MQTT 3.1.1 §2.3.1)")
    return pid


cdef inline Py_ssize_t _read_len(const unsigned char* buf, Py_ssize_t pos, Py_ssize_t end, str what) except -1:
    """The two-byte length of a string or binary field at pos, checked against end."""
    cdef Py_ssize_t length
    if end - pos < 2:
        raise ProtocolError(f"{what} length runs past the end of the packet")
    length = (buf[pos] << 8) | buf[pos + 1]
    if length > end - pos - 2:
        raise ProtocolError(f"{what} length {length} runs past the end of the packet")
    return length


def _filter_problem(str topic_filter):
    """Why `topic_filter` is not a valid topic filter (§4.7.1, §4.7.3), or None."""
    cdef Py_ssize_t i, last
    if not topic_filter:
        return "is empty (MQTT 3.1.1 §4.7.3)"
    if "+" not in topic_filter and "#" not in topic_filter:
        return None
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != last):
            return "has '#' that is not the whole last level (MQTT 3.1.1 §4.7.1.2)"
        if "+" in level and level != "+":
            return "has '+' that is not a whole level (MQTT 3.1.1 §4.7.1.3)"
    return None


cdef str _make_str(const unsigned char* s, Py_ssize_t length, str what, int kind):
    """A §1.5.3 string from `length` bytes at `s`, checked for its `kind`.

    One pass through _CHAR_CLASS finds U+0000, wildcards and non-ASCII bytes
    (UTF-8 multi-byte sequences never contain bytes below 0x80, so the bytes
    answer for the characters). ASCII is copied into a new str; anything else
    goes through the strict UTF-8 decoder, which refuses overlong forms,
    surrogates and code points above U+10FFFF as Python's `bytes.decode` does.
    Checks in the pure twin's order: UTF-8, U+0000, empty, wildcards.
    """
    cdef unsigned char cls = 0
    cdef Py_ssize_t i
    cdef object text
    for i in range(length):
        cls |= _CHAR_CLASS[s[i]]
    if cls & CH_HIGH:
        try:
            text = PyUnicode_DecodeUTF8(<const char*>s, length, NULL)
        except UnicodeDecodeError:
            raise ProtocolError(f"{what} is not valid UTF-8 (MQTT 3.1.1 §1.5.3)") from None
    else:
        text = PyUnicode_New(length, 127)
        memcpy(PyUnicode_DATA(text), s, length)
    if cls & CH_NUL:
        raise ProtocolError(f"{what} contains U+0000 (MQTT 3.1.1 §1.5.3)")
    if kind == STR_TOPIC:
        if length == 0:
            raise ProtocolError(f"{what} is empty (MQTT 3.1.1 §4.7.3)")
        if cls & CH_WILD:
            raise ProtocolError(f"{what} contains a wildcard (MQTT 3.1.1 §3.3.2.1)")
    elif kind == STR_FILTER:
        if length == 0 or cls & CH_WILD:
            problem = _filter_problem(text)
            if problem is not None:
                raise ProtocolError(f"{what} {problem}")
    return <str>text


cdef str _read_str(const unsigned char* buf, Py_ssize_t* pos, Py_ssize_t end, str what, int kind):
    """A length-prefixed string at pos[0]; advances pos[0] past it."""
    cdef Py_ssize_t length = _read_len(buf, pos[0], end, what)
    cdef str text = _make_str(buf + pos[0] + 2, length, what, kind)
    pos[0] += 2 + length
    return text


cdef bytes _read_bin(const unsigned char* buf, Py_ssize_t* pos, Py_ssize_t end, str what):
    """Length-prefixed binary data at pos[0]; advances pos[0] past it."""
    cdef Py_ssize_t length = _read_len(buf, pos[0], end, what)
    cdef bytes value = PyBytes_FromStringAndSize(<const char*>buf + pos[0] + 2, length)
    pos[0] += 2 + length
    return value


cdef object _new_publish(str topic, bytes payload, int qos, bint retain, bint dup, int pid):
    """Publish("PUBLISH", topic, payload, qos, retain, dup, pid or None), built in place."""
    cdef object qos_obj = _QOS_OBJ[qos]
    cdef object retain_obj = True if retain else False
    cdef object dup_obj = True if dup else False
    cdef object pid_obj = PyLong_FromLong(pid) if qos else None
    if not _FAST_TUPLES:
        return _Publish(_S_PUBLISH, topic, payload, qos_obj, retain_obj, dup_obj, pid_obj)
    cdef object t = cf_tuple_alloc(_Publish, 7)
    Py_INCREF(_S_PUBLISH)
    PyTuple_SET_ITEM(t, 0, _S_PUBLISH)
    Py_INCREF(topic)
    PyTuple_SET_ITEM(t, 1, topic)
    Py_INCREF(payload)
    PyTuple_SET_ITEM(t, 2, payload)
    Py_INCREF(qos_obj)
    PyTuple_SET_ITEM(t, 3, qos_obj)
    Py_INCREF(retain_obj)
    PyTuple_SET_ITEM(t, 4, retain_obj)
    Py_INCREF(dup_obj)
    PyTuple_SET_ITEM(t, 5, dup_obj)
    Py_INCREF(pid_obj)
    PyTuple_SET_ITEM(t, 6, pid_obj)
    return t


cdef object _decode_connect(const unsigned char* buf, Py_ssize_t pos, Py_ssize_t end):
    """CONNECT (§3.1)."""
    cdef str protocol_name = _read_str(buf, &pos, end, "CONNECT protocol name", STR_PLAIN)
    cdef int level, flags, keepalive, will_qos
    cdef bint has_will, will_retain
    cdef object will_topic = None, will_payload = None, username = None, password = None
    if end - pos < 4:
        raise ProtocolError("CONNECT variable header runs past the end of the packet")
    level = buf[pos]
    flags = buf[pos + 1]
    keepalive = (buf[pos + 2] << 8) | buf[pos + 3]
    pos += 4
    if flags & 0x01:
        raise ProtocolError("CONNECT reserved flag set (MQTT 3.1.1 §3.1.2.3)")
    has_will = flags & 0x04
    will_qos = (flags >> 3) & 3
    will_retain = flags & 0x20
    if has_will:
        if will_qos == 3:
            raise ProtocolError("CONNECT Will QoS 3 (MQTT 3.1.1 §3.1.2.6)")
    elif will_qos or will_retain:
        raise ProtocolError("CONNECT Will QoS or Will Retain set without the Will flag (MQTT 3.1.1 §3.1.2.6)")
    if flags & 0x40 and not flags & 0x80:
        raise ProtocolError("CONNECT password flag set without the user name flag (MQTT 3.1.1 §3.1.2.9)")
    client_id = _read_str(buf, &pos, end, "CONNECT client identifier", STR_PLAIN)
    if has_will:
        will_topic = _read_str(buf, &pos, end, "CONNECT Will Topic", STR_TOPIC)
        will_payload = _read_bin(buf, &pos, end, "CONNECT Will Message")
    if flags & 0x80:
        username = _read_str(buf, &pos, end, "CONNECT user name", STR_PLAIN)
    if flags & 0x40:
        password = _read_bin(buf, &pos, end, "CONNECT password")
    if pos != end:
        raise ProtocolError(f"CONNECT has {end - pos} unexpected trailing bytes")
    return Connect(
        "CONNECT",
        client_id,
        bool(flags & 0x02),
        keepalive,
        will_topic,
        will_payload,
        will_qos,
        will_retain,
        username,
        password,
        protocol_name,
        level,
    )


cdef object _decode_subscribe(const unsigned char* buf, Py_ssize_t pos, Py_ssize_t end):
    """SUBSCRIBE (§3.8): at least one (filter, requested QoS) pair."""
    cdef int pid = _read_pid(buf, pos, end, "SUBSCRIBE")
    cdef int qos
    cdef list topics = []
    pos += 2
    if pos == end:
        raise ProtocolError("SUBSCRIBE has no topic filters (MQTT 3.1.1 §3.8.3)")
    while pos < end:
        topic_filter = _read_str(buf, &pos, end, "SUBSCRIBE topic filter", STR_FILTER)
        if pos >= end:
            raise ProtocolError("SUBSCRIBE requested QoS runs past the end of the packet")
        qos = buf[pos]
        pos += 1
        if qos > 2:
            raise ProtocolError(f"SUBSCRIBE requested QoS byte 0x{qos:02X} is invalid (MQTT 3.1.1 §3.8.3.1)")
        topics.append((topic_filter, qos))
    return Subscribe("SUBSCRIBE", pid, tuple(topics))


cdef object _decode_suback(const unsigned char* buf, Py_ssize_t pos, Py_ssize_t end):
    """SUBACK (§3.9): one return code per filter, each 0, 1, 2 or 0x80."""
    cdef int pid = _read_pid(buf, pos, end, "SUBACK")
    cdef int code
    cdef Py_ssize_t i
    pos += 2
    if pos == end:
        raise ProtocolError("SUBACK has no return codes (MQTT 3.1.1 §3.9.3)")
    for i in range(pos, end):
        code = buf[i]
        if code > 2 and code != 0x80:
            raise ProtocolError(f"SUBACK return code 0x{code:02X} is reserved (MQTT 3.1.1 §3.9.3)")
    return Suback("SUBACK", pid, tuple(PyBytes_FromStringAndSize(<const char*>buf + pos, end - pos)))


cdef object _decode_unsubscribe(const unsigned char* buf, Py_ssize_t pos, Py_ssize_t end):
    """UNSUBSCRIBE (§3.10): at least one filter."""
    cdef int pid = _read_pid(buf, pos, end, "UNSUBSCRIBE")
    cdef list filters = []
    pos += 2
    if pos == end:
        raise ProtocolError("UNSUBSCRIBE has no topic filters (MQTT 3.1.1 §3.10.3)")
    while pos < end:
        filters.append(_read_str(buf, &pos, end, "UNSUBSCRIBE topic filter", STR_FILTER))
    return Unsubscribe("UNSUBSCRIBE", pid, tuple(filters))


cdef object _decode_other(unsigned char b0, const unsigned char* buf, Py_ssize_t pos, Py_ssize_t end):
    """Every packet but PUBLISH, from its complete body buf[pos:end].

    The fixed-size ones had their remaining length checked with the header.
    """
    cdef int ptype = b0 >> 4
    cdef int flags, code
    if ptype == T_PUBACK:
        return Puback("PUBACK", _read_pid(buf, pos, end, "PUBACK"))
    if ptype == T_PUBREC:
        return Pubrec("PUBREC", _read_pid(buf, pos, end, "PUBREC"))
    if ptype == T_PUBREL:
        return Pubrel("PUBREL", _read_pid(buf, pos, end, "PUBREL"))
    if ptype == T_PUBCOMP:
        return Pubcomp("PUBCOMP", _read_pid(buf, pos, end, "PUBCOMP"))
    if ptype == T_CONNACK:
        if CASCADE_FAST_DEBUG:
            assert end - pos == 2
        flags = buf[pos]
        code = buf[pos + 1]
        if flags & 0xFE:
            raise ProtocolError(f"CONNACK reserved flags 0x{flags:02X} set (MQTT 3.1.1 §3.2.2.1)")
        if flags and code:
            raise ProtocolError("CONNACK with Session Present and a non-zero return code (MQTT 3.1.1 §3.2.2.2)")
        return Connack("CONNACK", flags != 0, code)
    if ptype == T_SUBACK:
        return _decode_suback(buf, pos, end)
    if ptype == T_UNSUBACK:
        return Unsuback("UNSUBACK", _read_pid(buf, pos, end, "UNSUBACK"))
    if ptype == T_PINGRESP:
        return PINGRESP
    if ptype == T_PINGREQ:
        return PINGREQ
    if ptype == T_DISCONNECT:
        return DISCONNECT
    if ptype == T_CONNECT:
        return _decode_connect(buf, pos, end)
    if ptype == T_SUBSCRIBE:
        return _decode_subscribe(buf, pos, end)
    if CASCADE_FAST_DEBUG:
        assert ptype == T_UNSUBSCRIBE
    return _decode_unsubscribe(buf, pos, end)


cdef int _deliver(
    Decoder self, const unsigned char* buf, Py_ssize_t start, Py_ssize_t end, unsigned char b0,
    PacketSink sink, list out,
) except -1:
    """Decode the complete packet whose body is buf[start:end], hand it over.

    Sets `self._in_sink` around the sink call so `_parse` can tell the sink's
    exceptions (the packet is consumed) from the decoder's (poison).
    """
    cdef Py_ssize_t tlen, p
    cdef int qos, pid = 0
    cdef str topic
    cdef bytes payload
    if b0 >> 4 == T_PUBLISH:
        # §3.3.2: topic name, packet identifier (QoS 1, 2), payload to the end.
        if end - start < 2:
            raise ProtocolError("PUBLISH topic length runs past the end of the packet")
        tlen = (buf[start] << 8) | buf[start + 1]
        p = start + 2
        if tlen > end - p:
            raise ProtocolError(f"PUBLISH topic length {tlen} runs past the end of the packet")
        topic = _make_str(buf + p, tlen, "PUBLISH topic", STR_TOPIC)
        p += tlen
        qos = (b0 >> 1) & 3
        if qos:
            pid = _read_pid(buf, p, end, "PUBLISH")
            p += 2
        payload = PyBytes_FromStringAndSize(<const char*>buf + p, end - p)
        if sink is not None:
            self._in_sink = True
            sink.on_publish(topic, payload, qos, b0 & 1, (b0 >> 3) & 1, pid)
            self._in_sink = False
        else:
            out.append(_new_publish(topic, payload, qos, b0 & 1, (b0 >> 3) & 1, pid))
    else:
        packet = _decode_other(b0, buf, start, end)
        if sink is not None:
            self._in_sink = True
            sink.on_packet(packet)
            self._in_sink = False
        else:
            out.append(packet)
    return 0


cdef Py_ssize_t _skip_publish(
    Decoder self, const unsigned char* buf, Py_ssize_t pos, Py_ssize_t start, Py_ssize_t n,
    unsigned char b0, Py_ssize_t rem, PacketSink sink, list out, Py_ssize_t* resume,
) except -1:
    """Report the oversized PUBLISH at buf[pos:] (body at start), then skip it.

    `pos` unchanged while its variable header is not all in buf[:n] (kept
    for the next feed, at most 65,539 bytes); else discard what buf[:n]
    holds of the rest of it and return the position after that. The skip
    is set up before the sink runs (`resume` is where the bytes after its
    variable header start), so a sink that raises leaves the packet
    consumed, its rest still skipped.
    """
    cdef Py_ssize_t head = start + _head_size(buf, start, n, b0, rem)
    if head > n:
        return pos
    cdef _OversizedReport report = _OversizedReport.__new__(_OversizedReport)
    report.sink = sink
    report.out = out
    report.size = rem
    self._skip = start + rem - head
    self._skip_size = start + rem - pos
    resume[0] = head
    _deliver(self, buf, start, head, b0, report, None)
    return _discard(self, head, n)


cdef inline Py_ssize_t _discard(Decoder self, Py_ssize_t pos, Py_ssize_t n) noexcept:
    """Drop what buf[pos:n] holds of the packet being skipped; the position after it."""
    cdef Py_ssize_t step = min(self._skip, n - pos)
    self._skip -= step
    return pos + step


# --------------------------------------------------------------------------
# Sinks


cdef class PacketSink:
    """Receives decoded packets from `Decoder.feed_to`, in stream order.

    Subclass it in Cython and override the cdef methods (see _codec.pxd);
    the base class ignores everything. Python code uses `CallbackSink`.
    """

    cdef int on_publish(self, str topic, bytes payload, int qos, bint retain, bint dup, int packet_id) except -1:
        return 0

    cdef int on_packet(self, object packet) except -1:
        return 0

    cdef int on_oversized(self, str topic, int qos, bint retain, bint dup, int packet_id, Py_ssize_t size) except -1:
        return 0


cdef class CallbackSink(PacketSink):
    """A sink forwarding to Python callables (same class in both twins).

    `on_oversized` is optional: without it oversized PUBLISH packets are
    skipped silently.
    """

    def __init__(self, on_publish, on_packet, on_oversized=None):
        self._on_publish = on_publish
        self._on_packet = on_packet
        self._on_oversized = on_oversized

    cdef int on_publish(self, str topic, bytes payload, int qos, bint retain, bint dup, int packet_id) except -1:
        self._on_publish(topic, payload, qos, retain, dup, packet_id)
        return 0

    cdef int on_packet(self, object packet) except -1:
        self._on_packet(packet)
        return 0

    cdef int on_oversized(self, str topic, int qos, bint retain, bint dup, int packet_id, Py_ssize_t size) except -1:
        if self._on_oversized is not None:
            self._on_oversized(topic, qos, retain, dup, packet_id, size)
        return 0


cdef class CountingSink(PacketSink):
    """Counts what it receives; the trivial sink of the benchmarks and tests."""

    def __init__(self):
        self.publishes = 0
        self.payload_bytes = 0
        self.packets = 0
        self.oversized = 0

    cdef int on_publish(self, str topic, bytes payload, int qos, bint retain, bint dup, int packet_id) except -1:
        self.publishes += 1
        self.payload_bytes += len(payload)
        return 0

    cdef int on_packet(self, object packet) except -1:
        self.packets += 1
        return 0

    cdef int on_oversized(self, str topic, int qos, bint retain, bint dup, int packet_id, Py_ssize_t size) except -1:
        self.oversized += 1
        return 0


cdef class _OversizedReport(PacketSink):
    """Turns an oversized PUBLISH's variable header, which `_deliver` decodes
    (as a PUBLISH with no payload), into its report to the real sink or list.

    So the skip reuses the PUBLISH decoding without adding a test to it.
    """

    cdef PacketSink sink   # the sink of feed_to, or None for feed
    cdef list out          # feed's list
    cdef Py_ssize_t size   # the remaining length announced

    cdef int on_publish(self, str topic, bytes payload, int qos, bint retain, bint dup, int packet_id) except -1:
        if self.sink is not None:
            return self.sink.on_oversized(topic, qos, retain, dup, packet_id, self.size)
        self.out.append(Oversized("OVERSIZED", topic, qos, retain, dup, packet_id if qos else None, self.size))
        return 0


# --------------------------------------------------------------------------
# Decoder


cdef class Decoder:
    """Incremental MQTT 3.1.1 decoder for one byte stream (either direction).

    Same API and the same error and state rules as `cascade_fast._codec_py.Decoder`.
    """

    def __init__(self, max_packet_size=DEFAULT_MAX_PACKET_SIZE):
        max_packet_size = _index(max_packet_size)
        if not 0 <= max_packet_size <= _MAX_PACKET_SIZE_LIMIT:
            raise ValueError(f"max_packet_size must be in 0..{_MAX_PACKET_SIZE_LIMIT}, got {max_packet_size}")
        self._tail = bytearray()
        self._max = max_packet_size
        self._error = None
        self._busy = False
        self._in_sink = False
        self._rest = False
        self._skip = 0
        self._skip_size = 0

    @property
    def max_packet_size(self):
        """The largest remaining length accepted (§2.2.3)."""
        return self._max

    @property
    def pending(self):
        """Bytes kept from previous feeds (an incomplete packet, or after a sink raised)."""
        return PyByteArray_GET_SIZE(self._tail)

    @property
    def partial(self):
        """Bytes of the incomplete packet in progress received so far, buffered or skipped (pure twin)."""
        if self._skip:
            return self._skip_size - self._skip
        return 0 if self._rest else PyByteArray_GET_SIZE(self._tail)

    def feed(self, data):
        """Decode `data` after what was kept; return the completed packets."""
        cdef list out = []
        self._run(data, None, out)
        return out

    cpdef int feed_to(self, object data, PacketSink sink) except -1:
        """Decode `data` after what was kept, calling `sink` once per packet."""
        if sink is None:
            raise TypeError("feed_to() needs a PacketSink, not None")
        if Py_TYPE(sink).tp_flags & Py_TPFLAGS_HEAPTYPE:
            # A Python subclass: methods it defines in Python would be
            # silently ignored (the decoder calls the C-level ones).
            cls = type(sink)
            if (getattr(cls, "on_publish", None) is not None or getattr(cls, "on_packet", None) is not None
                    or getattr(cls, "on_oversized", None) is not None):
                raise TypeError(
                    f"{cls.__name__} defines on_publish/on_packet/on_oversized in Python, which the compiled decoder "
                    "never calls: override them in a Cython subclass, or use CallbackSink"
                )
        return self._run(data, sink, None)

    cdef int _run(self, object data, PacketSink sink, list out) except -1:
        cdef Py_buffer view
        cdef bint have_view = False
        cdef const unsigned char* buf
        cdef Py_ssize_t n
        if self._error is not None:
            raise ProtocolError(self._error)
        if self._busy:
            raise RuntimeError("Decoder fed again from inside one of its own sink callbacks")
        if not PyBytes_CheckExact(data):
            try:
                PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
                have_view = True
            except BufferError:
                # Not C-contiguous (a strided memoryview): take its bytes.
                data = bytes(memoryview(data))
        if self._rest:
            # After a sink raised, the kept bytes may hold whole packets:
            # parse them and `data` as one buffer (rare, so a copy is fine).
            if have_view:
                data = PyBytes_FromStringAndSize(<const char*>view.buf, view.len)
                PyBuffer_Release(&view)
                have_view = False
            data = bytes(self._tail) + <bytes>data
            PyByteArray_Resize(self._tail, 0)
            self._rest = False
        if have_view:
            buf = <const unsigned char*>view.buf
            n = view.len
        else:
            buf = <const unsigned char*>PyBytes_AS_STRING(data)
            n = PyBytes_GET_SIZE(data)
        self._busy = True
        try:
            self._parse(buf, n, sink, out)
        finally:
            self._busy = False
            if have_view:
                PyBuffer_Release(&view)
        return 0

    cdef int _parse(self, const unsigned char* buf, Py_ssize_t n, PacketSink sink, list out) except -1:
        cdef Py_ssize_t pos = 0, rem = 0, start = 0, end, resume = 0, need, tlen
        cdef unsigned char b0 = 0
        cdef int complete
        cdef bytes packet
        cdef bytearray tail = self._tail
        try:
            if self._skip:
                pos = _discard(self, 0, n)
            tlen = PyByteArray_GET_SIZE(tail)
            if tlen:
                # Complete the kept packet with as few bytes of `buf` as it
                # needs, then parse the rest of `buf` in place.
                complete = _parse_header(<const unsigned char*>PyByteArray_AS_STRING(tail), 0, tlen, self._max, &b0, &rem, &start)
                while not complete and pos < n:
                    # The header is at most 5 bytes: add them one by one.
                    PyByteArray_Resize(tail, tlen + 1)
                    PyByteArray_AS_STRING(tail)[tlen] = <char>buf[pos]
                    tlen += 1
                    pos += 1
                    complete = _parse_header(<const unsigned char*>PyByteArray_AS_STRING(tail), 0, tlen, self._max, &b0, &rem, &start)
                if not complete:
                    return 0
                if complete == 2:
                    # An oversized PUBLISH: parse the kept bytes (its header,
                    # part of its variable header) and `buf` as one buffer.
                    packet = PyBytes_FromStringAndSize(NULL, tlen + n - pos)
                    memcpy(PyBytes_AS_STRING(packet), PyByteArray_AS_STRING(tail), tlen)
                    memcpy(PyBytes_AS_STRING(packet) + tlen, buf + pos, n - pos)
                    PyByteArray_Resize(tail, 0)
                    buf = <const unsigned char*>PyBytes_AS_STRING(packet)
                    n = tlen + n - pos
                    pos = 0
                else:
                    need = start + rem - tlen
                    if need > n - pos:
                        PyByteArray_Resize(tail, tlen + n - pos)
                        memcpy(PyByteArray_AS_STRING(tail) + tlen, buf + pos, n - pos)
                        return 0
                    packet = PyBytes_FromStringAndSize(NULL, start + rem)
                    memcpy(PyBytes_AS_STRING(packet), PyByteArray_AS_STRING(tail), tlen)
                    memcpy(PyBytes_AS_STRING(packet) + tlen, buf + pos, need)
                    PyByteArray_Resize(tail, 0)
                    pos += need
                    resume = pos
                    _deliver(self, <const unsigned char*>PyBytes_AS_STRING(packet), start, start + rem, b0, sink, out)
            while pos < n:
                # The common case inline: a valid first byte and a one-byte
                # remaining length (packets under 128 bytes).
                b0 = buf[pos]
                if pos + 1 < n and buf[pos + 1] < 0x80 and _FIRST_OK[b0] and _FIXED_LENGTH[b0 >> 4] < 0 and buf[pos + 1] <= self._max:
                    rem = buf[pos + 1]
                    start = pos + 2
                else:
                    complete = _parse_header(buf, pos, n, self._max, &b0, &rem, &start)
                    if complete != 1:
                        if not complete:
                            break
                        # An oversized PUBLISH (_check_length refused any
                        # other type): reported once its variable header is here.
                        end = _skip_publish(self, buf, pos, start, n, b0, rem, sink, out, &resume)
                        if end == pos:
                            break
                        pos = end
                        continue
                end = start + rem
                if end > n:
                    break
                resume = end
                _deliver(self, buf, start, end, b0, sink, out)
                pos = end
            if pos < n:
                PyByteArray_Resize(tail, n - pos)
                memcpy(PyByteArray_AS_STRING(tail), buf + pos, n - pos)
        except BaseException as exc:
            if self._in_sink:
                # A sink raised: that packet is consumed, keep what follows.
                self._in_sink = False
                PyByteArray_Resize(tail, n - resume)
                memcpy(PyByteArray_AS_STRING(tail), buf + resume, n - resume)
                self._rest = n > resume
            elif isinstance(exc, ProtocolError):
                self._error = str(exc)
                PyByteArray_Resize(tail, 0)
                self._skip = 0
            raise
        return 0


# --------------------------------------------------------------------------
# Encoding helpers


cdef bytes _encode_str(object value, str what):
    """A UTF-8 encoded string for the wire (§1.5.3), with its checks."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, not {type(value).__name__}")
    if "\x00" in value:
        raise ValueError(f"{what} contains U+0000 (MQTT 3.1.1 §1.5.3)")
    try:
        raw = (<str>value).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not encodable as UTF-8 (MQTT 3.1.1 §1.5.3)") from None
    if len(raw) > STRING_MAX:
        raise ValueError(f"{what} is {len(raw)} bytes of UTF-8, more than 65535 (MQTT 3.1.1 §1.5.3)")
    return raw


cdef bytes _encode_filter(object value, str what):
    cdef bytes raw = _encode_str(value, what)
    problem = _filter_problem(value)
    if problem is not None:
        raise ValueError(f"{what} {problem}")
    return raw


cdef bytes _as_bytes(object value, str what):
    """bytes from bytes, bytearray or memoryview (never from an int or a str)."""
    if PyBytes_CheckExact(value):
        return <bytes>value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be bytes, bytearray or memoryview, not {type(value).__name__}")


cdef int _check_pid(object packet_id) except -1:
    if PyLong_CheckExact(packet_id) and 1 <= packet_id <= 65535:
        return packet_id  # the common case, without operator.index
    if packet_id is None:
        raise ValueError("packet_id is required (1..65535)")
    pid = _index(packet_id)
    if not 1 <= pid <= 65535:
        raise ValueError(f"packet_id must be in 1..65535, got {pid} (MQTT 3.1.1 §2.3.1)")
    return pid


cdef int _check_qos(object qos, str what) except -1:
    if PyLong_CheckExact(qos) and 0 <= qos <= 2:
        return qos  # the common case, without operator.index
    value = _index(qos)
    if not 0 <= value <= 2:
        raise ValueError(f"{what} must be 0, 1 or 2, got {value}")
    return value


cdef inline int _check_rem(Py_ssize_t rem) except -1:
    if rem > REMAINING_MAX:
        raise ValueError(f"remaining length {rem} exceeds 268435455 (MQTT 3.1.1 §2.2.3)")
    return 0


cdef inline Py_ssize_t _header_size(Py_ssize_t rem) noexcept:
    """Bytes of the fixed header for a remaining length <= REMAINING_MAX."""
    if rem < 128:
        return 2
    if rem < 16384:
        return 3
    if rem < 2097152:
        return 4
    return 5


cdef inline char* _put_header(char* out, unsigned char b0, Py_ssize_t rem) noexcept:
    """Write the fixed header (§2.2.3 variable-length encoding); return the end."""
    cdef unsigned char digit
    out[0] = <char>b0
    out += 1
    while True:
        digit = rem & 0x7F
        rem >>= 7
        if rem:
            out[0] = <char>(digit | 0x80)
            out += 1
        else:
            out[0] = <char>digit
            return out + 1


cdef inline char* _put_u16(char* out, Py_ssize_t value) noexcept:
    out[0] = <char>((value >> 8) & 0xFF)
    out[1] = <char>(value & 0xFF)
    return out + 2


cdef bytes _u16b(Py_ssize_t value):
    """Two bytes, big-endian (§1.5.2); value is 0..65535."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 2)
    _put_u16(PyBytes_AS_STRING(out), value)
    return out


cdef bytes _fixed_header(unsigned char b0, Py_ssize_t rem):
    _check_rem(rem)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _header_size(rem))
    _put_header(PyBytes_AS_STRING(out), b0, rem)
    return out


cdef struct Publication:
    # One validated PUBLISH, ready to be written (borrowed pointers: the
    # objects owning them are kept alive by the caller).
    const char* topic       # UTF-8 topic name
    Py_ssize_t topic_len
    const char* payload
    Py_ssize_t payload_len
    unsigned char b0        # first byte of the fixed header
    int pid                 # packet identifier, 0 at QoS 0
    Py_ssize_t rem          # remaining length
    Py_ssize_t size         # whole packet size


cdef bytes _prepare_publish(
    Publication* pub, object topic, object payload, object qos_obj, object retain, object dup, object packet_id,
):
    """Validate one PUBLISH in the pure twin's order and fill `pub`.

    Returns the payload as bytes (a copy for a bytearray or memoryview): the
    caller keeps it alive while `pub.payload` points into it.
    """
    cdef int qos = _check_qos(qos_obj, "qos")
    cdef Py_ssize_t tlen, i
    cdef const char* t
    cdef unsigned char cls = 0
    if not isinstance(topic, str):
        raise TypeError(f"topic must be str, not {type(topic).__name__}")
    try:
        t = PyUnicode_AsUTF8AndSize(topic, &tlen)
    except UnicodeEncodeError:
        if "\x00" in topic:
            raise ValueError("topic contains U+0000 (MQTT 3.1.1 §1.5.3)") from None
        raise ValueError("topic is not encodable as UTF-8 (MQTT 3.1.1 §1.5.3)") from None
    for i in range(tlen):
        cls |= _CHAR_CLASS[<unsigned char>t[i]]
    if cls & CH_NUL:
        raise ValueError("topic contains U+0000 (MQTT 3.1.1 §1.5.3)")
    if tlen > STRING_MAX:
        raise ValueError(f"topic is {tlen} bytes of UTF-8, more than 65535 (MQTT 3.1.1 §1.5.3)")
    if tlen == 0:
        raise ValueError("topic is empty (MQTT 3.1.1 §4.7.3)")
    if cls & CH_WILD:
        raise ValueError("topic contains a wildcard (MQTT 3.1.1 §3.3.2.1)")
    payload = _as_bytes(payload, "payload")
    pub.b0 = 0x30 | (qos << 1) | (0x01 if retain else 0)
    if qos == 0:
        if dup:
            raise ValueError("dup must be False at QoS 0 (MQTT 3.1.1 §3.3.1.1)")
        if packet_id is not None and _index(packet_id) != 0:
            raise ValueError(f"packet_id must be None at QoS 0, got {_index(packet_id)}")
        pub.pid = 0
    else:
        pub.pid = _check_pid(packet_id)
        if dup:
            pub.b0 |= 0x08
    pub.topic = t
    pub.topic_len = tlen
    pub.payload = PyBytes_AS_STRING(payload)
    pub.payload_len = PyBytes_GET_SIZE(payload)
    pub.rem = 2 + tlen + (2 if qos else 0) + pub.payload_len
    _check_rem(pub.rem)
    pub.size = _header_size(pub.rem) + pub.rem
    return <bytes>payload


cdef inline char* _put_publish(char* out, const Publication* pub) noexcept:
    out = _put_header(out, pub.b0, pub.rem)
    out = _put_u16(out, pub.topic_len)
    memcpy(out, pub.topic, pub.topic_len)
    out += pub.topic_len
    if pub.pid:
        out = _put_u16(out, pub.pid)
    memcpy(out, pub.payload, pub.payload_len)
    return out + pub.payload_len


# --------------------------------------------------------------------------
# Encoders (documented in the pure twin)


def encode_connect(
    client_id,
    *,
    clean_session=True,
    keepalive=60,
    will_topic=None,
    will_payload=b"",
    will_qos=0,
    will_retain=False,
    username=None,
    password=None,
):
    """CONNECT (§3.1) for MQTT 3.1.1 (protocol name "MQTT", level 4)."""
    cdef bytes raw_client_id = _encode_str(client_id, "client_id")
    cdef int flags
    keepalive = _index(keepalive)
    if not 0 <= keepalive <= 65535:
        raise ValueError(f"keepalive must be in 0..65535 seconds, got {keepalive}")
    will_qos = _check_qos(will_qos, "will_qos")
    flags = 0x02 if clean_session else 0
    parts = [b"\x00\x04MQTT\x04", b"", _u16b(keepalive), _u16b(len(raw_client_id)), raw_client_id]
    if will_topic is None:
        if will_qos or will_retain:
            raise ValueError("will_qos and will_retain need a will_topic (MQTT 3.1.1 §3.1.2.6)")
        if will_payload is not None and len(_as_bytes(will_payload, "will_payload")):
            raise ValueError("will_payload needs a will_topic (MQTT 3.1.1 §3.1.2.5)")
    else:
        raw_will_topic = _encode_str(will_topic, "will_topic")
        if not will_topic:
            raise ValueError("will_topic is empty (MQTT 3.1.1 §4.7.3)")
        if "+" in will_topic or "#" in will_topic:
            raise ValueError("will_topic contains a wildcard (MQTT 3.1.1 §3.3.2.1)")
        raw_will = b"" if will_payload is None else _as_bytes(will_payload, "will_payload")
        if len(raw_will) > STRING_MAX:
            raise ValueError(f"will_payload is {len(raw_will)} bytes, more than 65535 (MQTT 3.1.1 §3.1.3.3)")
        flags |= 0x04 | (will_qos << 3) | (0x20 if will_retain else 0)
        parts += (_u16b(len(raw_will_topic)), raw_will_topic, _u16b(len(raw_will)), raw_will)
    if username is not None:
        raw_username = _encode_str(username, "username")
        flags |= 0x80
        parts += (_u16b(len(raw_username)), raw_username)
    if password is not None:
        if username is None:
            raise ValueError("a password needs a username in MQTT 3.1.1 (§3.1.2.9)")
        raw_password = password.encode("utf-8") if isinstance(password, str) else _as_bytes(password, "password")
        if len(raw_password) > STRING_MAX:
            raise ValueError(f"password is {len(raw_password)} bytes, more than 65535 (MQTT 3.1.1 §3.1.3.5)")
        flags |= 0x40
        parts += (_u16b(len(raw_password)), raw_password)
    parts[1] = bytes((flags,))
    body = b"".join(parts)
    return _fixed_header(0x10, len(body)) + body


def encode_connack(session_present, return_code):
    """CONNACK (§3.2); Session Present must be 0 with a non-zero return code."""
    code = _index(return_code)
    if not 0 <= code <= 255:
        raise ValueError(f"return_code must be in 0..255, got {code}")
    if session_present and code:
        raise ValueError("session_present must be False with a non-zero return code (MQTT 3.1.1 §3.2.2.2)")
    return bytes((0x20, 2, 1 if session_present else 0, code))


def encode_publish(topic, payload, qos=0, retain=False, dup=False, packet_id=None):
    """PUBLISH (§3.3). `packet_id` (1..65535) is required at QoS 1 and 2, None (or 0) at QoS 0."""
    cdef Publication pub
    cdef bytes keep = _prepare_publish(&pub, topic, payload, qos, retain, dup, packet_id)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, pub.size)
    _put_publish(PyBytes_AS_STRING(out), &pub)
    return out


def encode_publish_batch(items):
    """Many PUBLISH packets, back to back in one buffer (one transport write).

    `items` yields `(topic, payload, qos, retain, packet_id)`; each is
    validated as by `encode_publish` (with `dup` False). Two passes: validate
    and size every packet, then write them all into one bytes object of the
    exact size (no growing buffer, no final copy).
    """
    cdef Publication* pubs = NULL
    cdef Publication* grown
    cdef Py_ssize_t count = 0, capacity = 0, total = 0, i
    cdef list keep = []  # every topic and payload whose memory `pubs` points into
    cdef bytes out
    cdef char* p
    try:
        for topic, payload, qos, retain, packet_id in items:
            if count == capacity:
                capacity = max(64, 2 * capacity)
                grown = <Publication*>realloc(pubs, capacity * sizeof(Publication))
                if grown == NULL:
                    raise MemoryError()
                pubs = grown
            keep.append(topic)
            keep.append(_prepare_publish(&pubs[count], topic, payload, qos, retain, False, packet_id))
            total += pubs[count].size
            count += 1
        out = PyBytes_FromStringAndSize(NULL, total)
        p = PyBytes_AS_STRING(out)
        for i in range(count):
            p = _put_publish(p, &pubs[i])
        if CASCADE_FAST_DEBUG:
            assert p == PyBytes_AS_STRING(out) + total
        return out
    finally:
        free(pubs)


cdef bytes _encode_ack(unsigned char b0, object packet_id):
    cdef int pid = _check_pid(packet_id)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 4)
    cdef char* p = PyBytes_AS_STRING(out)
    p[0] = <char>b0
    p[1] = 2
    _put_u16(p + 2, pid)
    return out


def encode_puback(packet_id):
    """PUBACK (§3.4)."""
    return _encode_ack(0x40, packet_id)


def encode_pubrec(packet_id):
    """PUBREC (§3.5)."""
    return _encode_ack(0x50, packet_id)


def encode_pubrel(packet_id):
    """PUBREL (§3.6); its fixed-header flags are 0b0010 (§2.2.2)."""
    return _encode_ack(0x62, packet_id)


def encode_pubcomp(packet_id):
    """PUBCOMP (§3.7)."""
    return _encode_ack(0x70, packet_id)


def encode_unsuback(packet_id):
    """UNSUBACK (§3.11)."""
    return _encode_ack(0xB0, packet_id)


cdef int _no_str(object value, str what) except -1:
    # A str is iterable too; iterating it would send one filter per character.
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{what} must be an iterable of items, not {type(value).__name__}")
    return 0


def encode_subscribe(packet_id, topics):
    """SUBSCRIBE (§3.8): `topics` yields `(topic_filter, qos)`, at least one."""
    cdef int pid = _check_pid(packet_id)
    _no_str(topics, "topics")
    cdef list parts = [_u16b(pid)]
    for topic_filter, qos in topics:
        raw = _encode_filter(topic_filter, "topic filter")
        parts += (_u16b(len(raw)), raw, bytes((_check_qos(qos, "qos"),)))
    if len(parts) == 1:
        raise ValueError("SUBSCRIBE needs at least one topic filter (MQTT 3.1.1 §3.8.3)")
    body = b"".join(parts)
    return _fixed_header(0x82, len(body)) + body


def encode_suback(packet_id, return_codes):
    """SUBACK (§3.9): one code per filter, each 0, 1, 2 or 0x80 (failure)."""
    cdef int pid = _check_pid(packet_id)
    _no_str(return_codes, "return_codes")
    codes = bytearray()
    for code in return_codes:
        code = _index(code)
        if code not in _SUBACK_CODES:
            raise ValueError(f"SUBACK return code must be 0, 1, 2 or 0x80, got {code} (MQTT 3.1.1 §3.9.3)")
        codes.append(code)
    if not codes:
        raise ValueError("SUBACK needs at least one return code (MQTT 3.1.1 §3.9.3)")
    return _fixed_header(0x90, 2 + len(codes)) + _u16b(pid) + bytes(codes)


def encode_unsubscribe(packet_id, filters):
    """UNSUBSCRIBE (§3.10): at least one topic filter."""
    cdef int pid = _check_pid(packet_id)
    _no_str(filters, "filters")
    cdef list parts = [_u16b(pid)]
    for topic_filter in filters:
        raw = _encode_filter(topic_filter, "topic filter")
        parts += (_u16b(len(raw)), raw)
    if len(parts) == 1:
        raise ValueError("UNSUBSCRIBE needs at least one topic filter (MQTT 3.1.1 §3.10.3)")
    body = b"".join(parts)
    return _fixed_header(0xA2, len(body)) + body


def encode_pingreq():
    """PINGREQ (§3.12)."""
    return b"\xc0\x00"


def encode_pingresp():
    """PINGRESP (§3.13)."""
    return b"\xd0\x00"


def encode_disconnect():
    """DISCONNECT (§3.14)."""
    return b"\xe0\x00"
