"""MQTT 3.1.1 codec, pure-Python twin of ``cascade_fast/_codec.pyx``.

This module is the reference: the compiled build must accept and reject
exactly the same inputs, return equal packets, produce identical bytes and
raise the same exception classes with the same messages (the property tests
in ``tests/test_codec_hypothesis.py`` and the fuzzer in
``tools/fuzz_decoder.py`` hold both to it). It is also the fallback where the
extension is missing (``CASCADE_FAST_NO_EXTENSIONS=1``).

Decoding
    `Decoder` is incremental: ``feed(data)`` takes any chunk of the byte
    stream (bytes, bytearray or memoryview; one byte at a time works) and
    returns the packets it completed, as the named tuples of
    `cascade_fast.packets`. Complete packets are parsed straight from the
    incoming chunk; only an incomplete tail is kept between calls (asyncpg's
    model). ``feed_to(data, sink)`` is the same decoder calling
    ``sink.on_publish(topic, payload, qos, retain, dup, packet_id)`` for each
    PUBLISH (``packet_id`` 0 at QoS 0, no tuple built),
    ``sink.on_oversized(topic, qos, retain, dup, packet_id, size)`` for each
    oversized PUBLISH (below) and ``sink.on_packet(packet)`` for every other
    packet.

    The bytes are untrusted: every length is checked against the packet
    before it is used, and each violation raises `ProtocolError` naming the
    rule and its section. The fixed header's first byte is checked as soon
    as it arrives, the remaining length as soon as it is complete.

Oversized packets
    A remaining length above ``max_packet_size`` is judged from the fixed
    header alone, before anything is buffered. A PUBLISH is skipped, not
    refused: one message too large for this receiver (a retained one, say)
    must not kill a connection that would only get it again after the
    reconnect. The decoder buffers its variable header only (topic name, and
    the packet identifier at QoS > 0: at most 65,539 bytes, validated as for
    any PUBLISH), reports it (`feed` returns an `Oversized` packet, `feed_to`
    calls ``on_oversized``; ``size`` is the remaining length announced), then
    discards the rest of the packet's bytes as they arrive, never keeping
    them, and decodes on from the next packet. Any other packet type over
    the limit is a `ProtocolError`: a peer never legitimately sends one.
    ``Decoder.partial`` counts the bytes of the packet in progress, buffered
    or skipped, so a receiver can give a packet that never completes a
    deadline.

Errors and state (the exact rule, identical in both twins)
    * `ProtocolError` from the decoder poisons it: the stream is unusable
      (an MQTT receiver closes the connection, §4.8), the kept tail is
      dropped and every later ``feed``/``feed_to`` raises a `ProtocolError`
      with the same message. Packets completed earlier in the same call were
      already handed to the sink by ``feed_to``; ``feed`` drops them with the
      list it was building.
    * An exception raised by a sink method propagates unchanged. The packet
      being delivered counts as consumed (the rest of an oversized one is
      still skipped as it arrives); the bytes after it are kept, so
      the next call (``feed_to(b"", sink)`` will do) continues with the next
      packet: no packet is lost and none is delivered twice.
    * A sink must not feed the decoder that is calling it (RuntimeError).

Encoding
    The ``encode_*`` functions validate their arguments (``ValueError`` for a
    value the spec forbids, ``TypeError`` for a wrong type) and return
    `bytes`. Payloads may be bytes, bytearray or memoryview.
"""

from __future__ import annotations

import sys

from collections.abc import Iterable
from operator import index as _index
from typing import Any

from ._errors import ProtocolError
from .packets import (
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

__all__ = [
    "DEFAULT_MAX_PACKET_SIZE",
    "encode_packet",
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

#: Default `Decoder` limit on a packet's remaining length: 1 MiB, sized for
#: telemetry. The spec allows 256 MiB, but a peer only has to announce such a
#: length to make a receiver buffer it: with the limit a larger PUBLISH costs
#: its variable header (at most 65,539 bytes) and is skipped, not hundreds of
#: MiB. Pass ``max_packet_size`` for larger messages (268435455 or more: only
#: the spec's limit).
DEFAULT_MAX_PACKET_SIZE = 1024 * 1024
#: MQTT 3.1.1 §2.2.3: four bytes of 7 bits.
MAX_REMAINING_LENGTH = 268_435_455
# Decoder accepts max_packet_size up to this (anything >= 268435455 is "no limit").
_MAX_PACKET_SIZE_LIMIT = 4_294_967_296
#: MQTT 3.1.1 §1.5.3: a string is prefixed with a two-byte length.
MAX_STRING_BYTES = 65_535

# MQTT 3.1.1 §2.2.1, Table 2.1.
_NAMES = (
    "RESERVED",
    "CONNECT",
    "CONNACK",
    "PUBLISH",
    "PUBACK",
    "PUBREC",
    "PUBREL",
    "PUBCOMP",
    "SUBSCRIBE",
    "SUBACK",
    "UNSUBSCRIBE",
    "UNSUBACK",
    "PINGREQ",
    "PINGRESP",
    "DISCONNECT",
    "RESERVED",
)
# §2.2.2, Table 2.2: the fixed-header flags every type but PUBLISH must carry.
_FLAGS = (-1, 0, 0, -1, 0, 0, 2, 0, 2, 0, 2, 0, 0, 0, 0, -1)
# The remaining length of the fixed-size packets (§3.2.1, §3.4.1 ... §3.14.1);
# -1 for the variable-size ones.
_FIXED_LENGTH = (-1, -1, 2, -1, 2, 2, 2, 2, -1, -1, -1, 2, 0, 0, 0, -1)
# §3.9.3: SUBACK return codes.
_SUBACK_CODES = frozenset((0, 1, 2, 0x80))


# --------------------------------------------------------------------------
# Decoding helpers. Every function takes the packet's buffer and the bounds
# [pos, end) of its unread part, and checks a length before using it.


def _check_first_byte(b0: int) -> None:
    """Validate the type and flags of a fixed header's first byte (§2.2)."""
    ptype = b0 >> 4
    flags = b0 & 0x0F
    if ptype == 0 or ptype == 15:
        raise ProtocolError(f"reserved packet type {ptype} (MQTT 3.1.1 §2.2.1)")
    if ptype == 3:
        qos = (flags >> 1) & 3
        if qos == 3:
            raise ProtocolError("PUBLISH with QoS 3 (MQTT 3.1.1 §3.3.1.2)")
        if qos == 0 and flags & 8:
            raise ProtocolError("PUBLISH with DUP set at QoS 0 (MQTT 3.1.1 §3.3.1.1)")
    elif flags != _FLAGS[ptype]:
        raise ProtocolError(
            f"invalid fixed-header flags 0x{flags:X} for {_NAMES[ptype]}, expected 0x{_FLAGS[ptype]:X} (MQTT 3.1.1 §2.2.2)"
        )


def _parse_header(buf: bytes, pos: int, n: int, max_size: int) -> tuple[int, int, int] | None:
    """Parse the fixed header at ``buf[pos:n]``: (first byte, remaining length, body start).

    None when the header is not complete yet. Everything checkable from the
    header alone is checked here, before the body is waited for.
    """
    if pos >= n:
        return None
    b0 = buf[pos]
    _check_first_byte(b0)
    rem = 0
    i = pos + 1
    shift = 0
    while True:
        if i >= n:
            return None
        byte = buf[i]
        i += 1
        rem |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift == 28:
            raise ProtocolError("remaining length longer than 4 bytes (MQTT 3.1.1 §2.2.3)")
    _check_length(b0, rem, max_size)
    return b0, rem, i


def _check_length(b0: int, rem: int, max_size: int) -> None:
    """Refuse a remaining length over the limit or wrong for a fixed-size packet.

    A PUBLISH over the limit passes: the decoder skips it (module docstring).
    """
    ptype = b0 >> 4
    if rem > max_size and ptype != 3:
        raise ProtocolError(f"remaining length {rem} exceeds max_packet_size {max_size}")
    fixed = _FIXED_LENGTH[ptype]
    if fixed >= 0 and rem != fixed:
        raise ProtocolError(f"{_NAMES[ptype]} remaining length {rem}, expected {fixed} (MQTT 3.1.1 §3.{ptype}.1)")


def _head_size(b0: int, buf: bytes, start: int, n: int, rem: int) -> int:
    """Bytes of a PUBLISH's variable header, whose body starts at ``buf[start]``.

    While the topic length is not there yet, its two bytes. Never more than
    the remaining length ``rem``: a shorter packet is complete at ``rem``
    bytes and `_decode_publish` then raises for it, as for any PUBLISH.
    """
    if n - start < 2 or rem < 2:
        return min(rem, 2)
    return min(rem, 2 + ((buf[start] << 8) | buf[start + 1]) + (2 if b0 & 6 else 0))


def _read_u16(buf: bytes, pos: int, end: int, what: str) -> int:
    if end - pos < 2:
        raise ProtocolError(f"{what} runs past the end of the packet")
    return (buf[pos] << 8) | buf[pos + 1]


def _read_pid(buf: bytes, pos: int, end: int, what: str) -> int:
    pid = _read_u16(buf, pos, end, what + " packet identifier")
    if pid == 0:
        raise ProtocolError(f"{what} packet identifier 0 (MQTT 3.1.1 §2.3.1)")
    return pid


def _read_bin(buf: bytes, pos: int, end: int, what: str) -> tuple[bytes, int]:
    """A two-byte length then that many bytes (§1.5.3 layout); (value, new pos)."""
    length = _read_u16(buf, pos, end, what + " length")
    pos += 2
    if length > end - pos:
        raise ProtocolError(f"{what} length {length} runs past the end of the packet")
    return buf[pos : pos + length], pos + length


def _read_str(buf: bytes, pos: int, end: int, what: str) -> tuple[str, int]:
    """A UTF-8 encoded string (§1.5.3): valid UTF-8, no U+0000; (value, new pos)."""
    raw, pos = _read_bin(buf, pos, end, what)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not valid UTF-8 (MQTT 3.1.1 §1.5.3)") from None
    if "\x00" in text:
        raise ProtocolError(f"{what} contains U+0000 (MQTT 3.1.1 §1.5.3)")
    return text, pos


def _topic_problem(topic: str) -> str | None:
    """Why ``topic`` is not a valid topic name (§4.7.3, §3.3.2.1), or None."""
    if not topic:
        return "is empty (MQTT 3.1.1 §4.7.3)"
    if "+" in topic or "#" in topic:
        return "contains a wildcard (MQTT 3.1.1 §3.3.2.1)"
    return None


def _filter_problem(topic_filter: str) -> str | None:
    """Why ``topic_filter`` is not a valid topic filter (§4.7.1, §4.7.3), or None."""
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


def _read_topic(buf: bytes, pos: int, end: int, what: str) -> tuple[str, int]:
    topic, pos = _read_str(buf, pos, end, what)
    problem = _topic_problem(topic)
    if problem is not None:
        raise ProtocolError(f"{what} {problem}")
    return topic, pos


def _read_filter(buf: bytes, pos: int, end: int, what: str) -> tuple[str, int]:
    topic_filter, pos = _read_str(buf, pos, end, what)
    problem = _filter_problem(topic_filter)
    if problem is not None:
        raise ProtocolError(f"{what} {problem}")
    return topic_filter, pos


def _decode_connect(buf: bytes, pos: int, end: int) -> Connect:
    """CONNECT (§3.1)."""
    protocol_name, pos = _read_str(buf, pos, end, "CONNECT protocol name")
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
    will_retain = bool(flags & 0x20)
    if has_will:
        if will_qos == 3:
            raise ProtocolError("CONNECT Will QoS 3 (MQTT 3.1.1 §3.1.2.6)")
    elif will_qos or will_retain:
        raise ProtocolError("CONNECT Will QoS or Will Retain set without the Will flag (MQTT 3.1.1 §3.1.2.6)")
    if flags & 0x40 and not flags & 0x80:
        raise ProtocolError("CONNECT password flag set without the user name flag (MQTT 3.1.1 §3.1.2.9)")
    client_id, pos = _read_str(buf, pos, end, "CONNECT client identifier")
    will_topic = will_payload = username = password = None
    if has_will:
        will_topic, pos = _read_topic(buf, pos, end, "CONNECT Will Topic")
        will_payload, pos = _read_bin(buf, pos, end, "CONNECT Will Message")
    if flags & 0x80:
        username, pos = _read_str(buf, pos, end, "CONNECT user name")
    if flags & 0x40:
        password, pos = _read_bin(buf, pos, end, "CONNECT password")
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


def _decode_connack(buf: bytes, pos: int) -> Connack:
    """CONNACK (§3.2); the length (2) was checked with the header."""
    flags = buf[pos]
    return_code = buf[pos + 1]
    if flags & 0xFE:
        raise ProtocolError(f"CONNACK reserved flags 0x{flags:02X} set (MQTT 3.1.1 §3.2.2.1)")
    if flags and return_code:
        raise ProtocolError("CONNACK with Session Present and a non-zero return code (MQTT 3.1.1 §3.2.2.2)")
    return Connack("CONNACK", bool(flags), return_code)


def _decode_subscribe(buf: bytes, pos: int, end: int) -> Subscribe:
    """SUBSCRIBE (§3.8): at least one (filter, requested QoS) pair."""
    pid = _read_pid(buf, pos, end, "SUBSCRIBE")
    pos += 2
    if pos == end:
        raise ProtocolError("SUBSCRIBE has no topic filters (MQTT 3.1.1 §3.8.3)")
    topics = []
    while pos < end:
        topic_filter, pos = _read_filter(buf, pos, end, "SUBSCRIBE topic filter")
        if pos >= end:
            raise ProtocolError("SUBSCRIBE requested QoS runs past the end of the packet")
        qos = buf[pos]
        pos += 1
        if qos > 2:
            raise ProtocolError(f"SUBSCRIBE requested QoS byte 0x{qos:02X} is invalid (MQTT 3.1.1 §3.8.3.1)")
        topics.append((topic_filter, qos))
    return Subscribe("SUBSCRIBE", pid, tuple(topics))


def _decode_suback(buf: bytes, pos: int, end: int) -> Suback:
    """SUBACK (§3.9): one return code per filter, each 0, 1, 2 or 0x80."""
    pid = _read_pid(buf, pos, end, "SUBACK")
    pos += 2
    if pos == end:
        raise ProtocolError("SUBACK has no return codes (MQTT 3.1.1 §3.9.3)")
    codes = tuple(buf[pos:end])
    for code in codes:
        if code not in _SUBACK_CODES:
            raise ProtocolError(f"SUBACK return code 0x{code:02X} is reserved (MQTT 3.1.1 §3.9.3)")
    return Suback("SUBACK", pid, codes)


def _decode_unsubscribe(buf: bytes, pos: int, end: int) -> Unsubscribe:
    """UNSUBSCRIBE (§3.10): at least one filter."""
    pid = _read_pid(buf, pos, end, "UNSUBSCRIBE")
    pos += 2
    if pos == end:
        raise ProtocolError("UNSUBSCRIBE has no topic filters (MQTT 3.1.1 §3.10.3)")
    filters = []
    while pos < end:
        topic_filter, pos = _read_filter(buf, pos, end, "UNSUBSCRIBE topic filter")
        filters.append(topic_filter)
    return Unsubscribe("UNSUBSCRIBE", pid, tuple(filters))


def _decode_other(b0: int, buf: bytes, pos: int, end: int) -> Any:
    """Every packet but PUBLISH, from its complete body ``buf[pos:end]``."""
    ptype = b0 >> 4
    if ptype == 4:
        return Puback("PUBACK", _read_pid(buf, pos, end, "PUBACK"))
    if ptype == 5:
        return Pubrec("PUBREC", _read_pid(buf, pos, end, "PUBREC"))
    if ptype == 6:
        return Pubrel("PUBREL", _read_pid(buf, pos, end, "PUBREL"))
    if ptype == 7:
        return Pubcomp("PUBCOMP", _read_pid(buf, pos, end, "PUBCOMP"))
    if ptype == 2:
        return _decode_connack(buf, pos)
    if ptype == 9:
        return _decode_suback(buf, pos, end)
    if ptype == 11:
        return Unsuback("UNSUBACK", _read_pid(buf, pos, end, "UNSUBACK"))
    if ptype == 13:
        return PINGRESP
    if ptype == 12:
        return PINGREQ
    if ptype == 14:
        return DISCONNECT
    if ptype == 1:
        return _decode_connect(buf, pos, end)
    if ptype == 8:
        return _decode_subscribe(buf, pos, end)
    # ptype == 10: the first byte was validated, so nothing else is left.
    return _decode_unsubscribe(buf, pos, end)


def _decode_publish(b0: int, buf: bytes, pos: int, end: int) -> tuple[str, bytes, int, bool, bool, int]:
    """PUBLISH (§3.3): (topic, payload, qos, retain, dup, packet_id or 0)."""
    topic, pos = _read_topic(buf, pos, end, "PUBLISH topic")
    qos = (b0 >> 1) & 3
    pid = 0
    if qos:
        pid = _read_pid(buf, pos, end, "PUBLISH")
        pos += 2
    return topic, buf[pos:end], qos, bool(b0 & 1), bool(b0 & 8), pid


# --------------------------------------------------------------------------
# Sinks


class PacketSink:
    """Receives decoded packets from `Decoder.feed_to`, in stream order.

    The base class ignores everything; subclasses override the methods. The
    compiled twin's `PacketSink` is a cdef class whose methods are C-level
    (``cascade_fast/_codec.pxd``); Python code wanting callbacks from either
    twin uses `CallbackSink`.
    """

    __slots__ = ()

    def on_publish(self, topic: str, payload: bytes, qos: int, retain: bool, dup: bool, packet_id: int) -> None:
        """One PUBLISH; ``packet_id`` is 0 at QoS 0."""

    def on_packet(self, packet: Any) -> None:
        """Any other packet, as the named tuple `Decoder.feed` would return."""

    def on_oversized(self, topic: str, qos: int, retain: bool, dup: bool, packet_id: int, size: int) -> None:
        """A PUBLISH over ``max_packet_size`` being skipped; ``size`` is its remaining length."""


class CallbackSink(PacketSink):
    """A sink forwarding to Python callables (same class in both twins).

    ``on_oversized`` is optional: without it oversized PUBLISH packets are
    skipped silently.
    """

    __slots__ = ("_on_publish", "_on_packet", "_on_oversized")

    def __init__(self, on_publish: Any, on_packet: Any, on_oversized: Any = None) -> None:
        self._on_publish = on_publish
        self._on_packet = on_packet
        self._on_oversized = on_oversized

    def on_publish(self, topic: str, payload: bytes, qos: int, retain: bool, dup: bool, packet_id: int) -> None:
        """Forward to the ``on_publish`` callable."""
        self._on_publish(topic, payload, qos, retain, dup, packet_id)

    def on_packet(self, packet: Any) -> None:
        """Forward to the ``on_packet`` callable."""
        self._on_packet(packet)

    def on_oversized(self, topic: str, qos: int, retain: bool, dup: bool, packet_id: int, size: int) -> None:
        """Forward to the ``on_oversized`` callable, if one was given."""
        if self._on_oversized is not None:
            self._on_oversized(topic, qos, retain, dup, packet_id, size)


class CountingSink(PacketSink):
    """Counts what it receives; the trivial sink of the benchmarks and tests."""

    __slots__ = ("publishes", "payload_bytes", "packets", "oversized")

    def __init__(self) -> None:
        self.publishes = 0
        self.payload_bytes = 0
        self.packets = 0
        self.oversized = 0

    def on_publish(self, topic: str, payload: bytes, qos: int, retain: bool, dup: bool, packet_id: int) -> None:
        """Count one PUBLISH and its payload size."""
        self.publishes += 1
        self.payload_bytes += len(payload)

    def on_packet(self, packet: Any) -> None:
        """Count one other packet."""
        self.packets += 1

    def on_oversized(self, topic: str, qos: int, retain: bool, dup: bool, packet_id: int, size: int) -> None:
        """Count one skipped PUBLISH."""
        self.oversized += 1


# --------------------------------------------------------------------------
# Decoder


class Decoder:
    """Incremental MQTT 3.1.1 decoder for one byte stream (either direction).

    See the module docstring for the error and state rules.
    """

    __slots__ = ("_tail", "_max", "_error", "_busy", "_rest", "_skip", "_skip_size")

    def __init__(self, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE) -> None:
        max_packet_size = _index(max_packet_size)
        if not 0 <= max_packet_size <= _MAX_PACKET_SIZE_LIMIT:
            raise ValueError(f"max_packet_size must be in 0..{_MAX_PACKET_SIZE_LIMIT}, got {max_packet_size}")
        self._tail = b""  # the incomplete packet kept between feeds
        self._max = max_packet_size  # largest remaining length accepted
        self._error: str | None = None  # the ProtocolError that poisoned the stream
        self._busy = False  # inside feed/feed_to (re-entrancy guard)
        # _tail is what followed a packet whose sink raised: it may hold
        # complete packets, not just a partial one.
        self._rest = False
        self._skip = 0  # bytes of an oversized PUBLISH still to discard
        self._skip_size = 0  # that packet's whole size, fixed header included

    @property
    def max_packet_size(self) -> int:
        """The largest remaining length accepted (§2.2.3)."""
        return self._max

    @property
    def pending(self) -> int:
        """Bytes kept from previous feeds (an incomplete packet, or after a sink raised)."""
        return len(self._tail)

    @property
    def partial(self) -> int:
        """Bytes of the incomplete packet in progress received so far, buffered or skipped.

        0 at a packet boundary (also after a sink raised: the bytes kept then
        are not decoded yet). A receiver gives a packet that stays partial a
        deadline: a peer trickling one byte at a time must not hold the
        connection for ever.
        """
        if self._skip:
            return self._skip_size - self._skip
        return 0 if self._rest else len(self._tail)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Any]:
        """Decode ``data`` after what was kept; return the completed packets."""
        out: list[Any] = []
        self._run(data, None, out)
        return out

    def feed_to(self, data: bytes | bytearray | memoryview, sink: Any) -> None:
        """Decode ``data`` after what was kept, calling ``sink`` once per packet."""
        if sink is None:
            raise TypeError("feed_to() needs a PacketSink, not None")
        self._run(data, sink, None)

    def _run(self, data: Any, sink: Any, out: list[Any] | None) -> None:
        if self._error is not None:
            raise ProtocolError(self._error)
        if self._busy:
            raise RuntimeError("Decoder fed again from inside one of its own sink callbacks")
        buf = data if type(data) is bytes else bytes(memoryview(data))
        if self._rest:
            # After a sink raised, the kept bytes may hold whole packets:
            # parse them and `data` as one buffer (rare, so a copy is fine).
            buf = self._tail + buf
            self._tail = b""
            self._rest = False
        n = len(buf)
        max_size = self._max
        pos = 0
        resume = -1  # while a sink runs: where the next packet starts
        self._busy = True
        try:
            if self._skip:
                pos = self._discard(0, n)
            if self._tail:
                # Complete the kept packet with as few bytes of `buf` as it
                # needs, then parse the rest of `buf` in place.
                tail = self._tail
                header = _parse_header(tail, 0, len(tail), max_size)
                while header is None and pos < n:
                    # The header is at most 5 bytes: add them one by one.
                    tail += buf[pos : pos + 1]
                    pos += 1
                    header = _parse_header(tail, 0, len(tail), max_size)
                if header is None:
                    self._tail = tail
                    return
                b0, rem, start = header
                if rem > max_size:
                    # An oversized PUBLISH: parse the kept bytes (its header,
                    # part of its variable header) and `buf` as one buffer.
                    buf = tail + buf[pos:]
                    n = len(buf)
                    pos = 0
                    self._tail = b""
                else:
                    need = start + rem - len(tail)
                    if need > n - pos:
                        self._tail = tail + buf[pos:]
                        return
                    packet = tail + buf[pos : pos + need]
                    pos += need
                    self._tail = b""
                    end = start + rem
                    if b0 >> 4 == 3:
                        topic, payload, qos, retain, dup, pid = _decode_publish(b0, packet, start, end)
                        if sink is None:
                            out.append(Publish("PUBLISH", topic, payload, qos, retain, dup, pid if qos else None))  # type: ignore[union-attr]
                        else:
                            resume = pos
                            sink.on_publish(topic, payload, qos, retain, dup, pid)
                    else:
                        packet_obj = _decode_other(b0, packet, start, end)
                        if sink is None:
                            out.append(packet_obj)  # type: ignore[union-attr]
                        else:
                            resume = pos
                            sink.on_packet(packet_obj)
                    resume = -1
            while pos < n:
                # Fast path for the common one-byte-length header, else the
                # general parser (which also validates the first byte).
                b0 = buf[pos]
                if pos + 1 < n and buf[pos + 1] < 0x80 and b0 >> 4 == 3 and (b0 & 6) != 6 and (b0 & 14) != 8:
                    rem = buf[pos + 1]
                    start = pos + 2
                else:
                    header = _parse_header(buf, pos, n, max_size)
                    if header is None:
                        break
                    b0, rem, start = header
                if rem > max_size:
                    # An oversized PUBLISH (_check_length refused any other
                    # type): report it once its variable header is here.
                    head = start + _head_size(b0, buf, start, n, rem)
                    if head > n:
                        break
                    topic, _, qos, retain, dup, pid = _decode_publish(b0, buf, start, head)
                    self._skip = start + rem - head
                    self._skip_size = start + rem - pos
                    if sink is None:
                        out.append(Oversized("OVERSIZED", topic, qos, retain, dup, pid if qos else None, rem))  # type: ignore[union-attr]
                    else:
                        resume = head
                        sink.on_oversized(topic, qos, retain, dup, pid, rem)
                    resume = -1
                    pos = self._discard(head, n)
                    continue
                end = start + rem
                if end > n:
                    break
                if b0 >> 4 == 3:
                    topic, payload, qos, retain, dup, pid = _decode_publish(b0, buf, start, end)
                    if sink is None:
                        out.append(Publish("PUBLISH", topic, payload, qos, retain, dup, pid if qos else None))  # type: ignore[union-attr]
                    else:
                        resume = end
                        sink.on_publish(topic, payload, qos, retain, dup, pid)
                else:
                    packet_obj = _decode_other(b0, buf, start, end)
                    if sink is None:
                        out.append(packet_obj)  # type: ignore[union-attr]
                    else:
                        resume = end
                        sink.on_packet(packet_obj)
                resume = -1
                pos = end
            if pos < n:
                self._tail = buf[pos:]
        except BaseException as exc:
            if resume >= 0:
                # A sink raised: that packet is consumed, keep what follows.
                self._tail = buf[resume:]
                self._rest = resume < n
            elif isinstance(exc, ProtocolError):
                self._error = str(exc)
                self._tail = b""
                self._skip = 0
            raise
        finally:
            self._busy = False

    def _discard(self, pos: int, n: int) -> int:
        """Drop what ``buf[pos:n]`` holds of the packet being skipped; the position after it."""
        step = min(self._skip, n - pos)
        self._skip -= step
        return pos + step


# --------------------------------------------------------------------------
# Encoding helpers


def _encode_str(value: Any, what: str) -> bytes:
    """A UTF-8 encoded string for the wire (§1.5.3), with its checks."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, not {type(value).__name__}")
    if "\x00" in value:
        raise ValueError(f"{what} contains U+0000 (MQTT 3.1.1 §1.5.3)")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not encodable as UTF-8 (MQTT 3.1.1 §1.5.3)") from None
    if len(raw) > MAX_STRING_BYTES:
        raise ValueError(f"{what} is {len(raw)} bytes of UTF-8, more than 65535 (MQTT 3.1.1 §1.5.3)")
    return raw


def _encode_topic(value: Any, what: str) -> bytes:
    raw = _encode_str(value, what)
    problem = _topic_problem(value)
    if problem is not None:
        raise ValueError(f"{what} {problem}")
    return raw


def _encode_filter(value: Any, what: str) -> bytes:
    raw = _encode_str(value, what)
    problem = _filter_problem(value)
    if problem is not None:
        raise ValueError(f"{what} {problem}")
    return raw


def _as_bytes(value: Any, what: str) -> bytes:
    """bytes from bytes, bytearray or memoryview (never from an int or a str)."""
    if type(value) is bytes:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be bytes, bytearray or memoryview, not {type(value).__name__}")


def _check_pid(packet_id: Any) -> int:
    if packet_id is None:
        raise ValueError("packet_id is required (1..65535)")
    pid = _index(packet_id)
    if not 1 <= pid <= 65535:
        raise ValueError(f"packet_id must be in 1..65535, got {pid} (MQTT 3.1.1 §2.3.1)")
    return pid


def _check_qos(qos: Any, what: str = "qos") -> int:
    value = _index(qos)
    if not 0 <= value <= 2:
        raise ValueError(f"{what} must be 0, 1 or 2, got {value}")
    return value


def _fixed_header(b0: int, rem: int) -> bytes:
    """The fixed header: first byte and the remaining length (§2.2.3)."""
    if rem > MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length {rem} exceeds 268435455 (MQTT 3.1.1 §2.2.3)")
    out = bytearray((b0,))
    while True:
        digit = rem & 0x7F
        rem >>= 7
        if rem:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def _publish_parts(topic: Any, payload: Any, qos: Any, retain: Any, dup: Any, packet_id: Any) -> bytes:
    qos = _check_qos(qos)
    raw_topic = _encode_topic(topic, "topic")
    body = _as_bytes(payload, "payload")
    if qos == 0:
        if dup:
            raise ValueError("dup must be False at QoS 0 (MQTT 3.1.1 §3.3.1.1)")
        if packet_id is not None and _index(packet_id) != 0:
            raise ValueError(f"packet_id must be None at QoS 0, got {_index(packet_id)}")
        pid = b""
    else:
        pid = _u16(_check_pid(packet_id))
    b0 = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    rem = 2 + len(raw_topic) + len(pid) + len(body)
    return b"".join((_fixed_header(b0, rem), _u16(len(raw_topic)), raw_topic, pid, body))


# --------------------------------------------------------------------------
# Encoders


def encode_connect(
    client_id: str,
    *,
    clean_session: bool = True,
    keepalive: int = 60,
    will_topic: str | None = None,
    will_payload: bytes | bytearray | memoryview | None = b"",
    will_qos: int = 0,
    will_retain: bool = False,
    username: str | None = None,
    password: bytes | bytearray | memoryview | str | None = None,
) -> bytes:
    """CONNECT (§3.1) for MQTT 3.1.1 (protocol name "MQTT", level 4).

    ``will_payload`` None is the same as b"". A ``password`` str is sent as
    UTF-8; MQTT 3.1.1 needs a ``username`` with a password (§3.1.2.9).
    """
    raw_client_id = _encode_str(client_id, "client_id")
    keepalive = _index(keepalive)
    if not 0 <= keepalive <= 65535:
        raise ValueError(f"keepalive must be in 0..65535 seconds, got {keepalive}")
    will_qos = _check_qos(will_qos, "will_qos")
    flags = 0x02 if clean_session else 0
    parts = [b"\x00\x04MQTT\x04", b"", _u16(keepalive), _u16(len(raw_client_id)), raw_client_id]
    if will_topic is None:
        if will_qos or will_retain:
            raise ValueError("will_qos and will_retain need a will_topic (MQTT 3.1.1 §3.1.2.6)")
        if will_payload is not None and len(_as_bytes(will_payload, "will_payload")):
            raise ValueError("will_payload needs a will_topic (MQTT 3.1.1 §3.1.2.5)")
    else:
        raw_will_topic = _encode_topic(will_topic, "will_topic")
        raw_will = b"" if will_payload is None else _as_bytes(will_payload, "will_payload")
        if len(raw_will) > MAX_STRING_BYTES:
            raise ValueError(f"will_payload is {len(raw_will)} bytes, more than 65535 (MQTT 3.1.1 §3.1.3.3)")
        flags |= 0x04 | (will_qos << 3) | (0x20 if will_retain else 0)
        parts += (_u16(len(raw_will_topic)), raw_will_topic, _u16(len(raw_will)), raw_will)
    if username is not None:
        raw_username = _encode_str(username, "username")
        flags |= 0x80
        parts += (_u16(len(raw_username)), raw_username)
    if password is not None:
        if username is None:
            raise ValueError("a password needs a username in MQTT 3.1.1 (§3.1.2.9)")
        raw_password = password.encode("utf-8") if isinstance(password, str) else _as_bytes(password, "password")
        if len(raw_password) > MAX_STRING_BYTES:
            raise ValueError(f"password is {len(raw_password)} bytes, more than 65535 (MQTT 3.1.1 §3.1.3.5)")
        flags |= 0x40
        parts += (_u16(len(raw_password)), raw_password)
    parts[1] = bytes((flags,))
    body = b"".join(parts)
    return _fixed_header(0x10, len(body)) + body


def encode_connack(session_present: bool, return_code: int) -> bytes:
    """CONNACK (§3.2); Session Present must be 0 with a non-zero return code."""
    code = _index(return_code)
    if not 0 <= code <= 255:
        raise ValueError(f"return_code must be in 0..255, got {code}")
    if session_present and code:
        raise ValueError("session_present must be False with a non-zero return code (MQTT 3.1.1 §3.2.2.2)")
    return bytes((0x20, 2, 1 if session_present else 0, code))


def encode_publish(
    topic: str,
    payload: bytes | bytearray | memoryview,
    qos: int = 0,
    retain: bool = False,
    dup: bool = False,
    packet_id: int | None = None,
) -> bytes:
    """PUBLISH (§3.3). ``packet_id`` (1..65535) is required at QoS 1 and 2, None (or 0) at QoS 0."""
    return _publish_parts(topic, payload, qos, retain, dup, packet_id)


def encode_publish_batch(items: Iterable[tuple[str, Any, int, bool, int | None]]) -> bytes:
    """Many PUBLISH packets, back to back in one buffer (one transport write).

    ``items`` yields ``(topic, payload, qos, retain, packet_id)``; each is
    validated as by `encode_publish` (with ``dup`` False).
    """
    return b"".join([_publish_parts(topic, payload, qos, retain, False, pid) for topic, payload, qos, retain, pid in items])


def _encode_ack(b0: int, packet_id: Any) -> bytes:
    return bytes((b0, 2)) + _u16(_check_pid(packet_id))


def encode_puback(packet_id: int) -> bytes:
    """PUBACK (§3.4)."""
    return _encode_ack(0x40, packet_id)


def encode_pubrec(packet_id: int) -> bytes:
    """PUBREC (§3.5)."""
    return _encode_ack(0x50, packet_id)


def encode_pubrel(packet_id: int) -> bytes:
    """PUBREL (§3.6); its fixed-header flags are 0b0010 (§2.2.2)."""
    return _encode_ack(0x62, packet_id)


def encode_pubcomp(packet_id: int) -> bytes:
    """PUBCOMP (§3.7)."""
    return _encode_ack(0x70, packet_id)


def encode_unsuback(packet_id: int) -> bytes:
    """UNSUBACK (§3.11)."""
    return _encode_ack(0xB0, packet_id)


def _no_str(value: Any, what: str) -> None:
    # A str is iterable too; iterating it would send one filter per character.
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{what} must be an iterable of items, not {type(value).__name__}")


def encode_subscribe(packet_id: int, topics: Iterable[tuple[str, int]]) -> bytes:
    """SUBSCRIBE (§3.8): ``topics`` yields ``(topic_filter, qos)``, at least one."""
    pid = _check_pid(packet_id)
    _no_str(topics, "topics")
    parts = [_u16(pid)]
    for topic_filter, qos in topics:
        raw = _encode_filter(topic_filter, "topic filter")
        parts += (_u16(len(raw)), raw, bytes((_check_qos(qos),)))
    if len(parts) == 1:
        raise ValueError("SUBSCRIBE needs at least one topic filter (MQTT 3.1.1 §3.8.3)")
    body = b"".join(parts)
    return _fixed_header(0x82, len(body)) + body


def encode_suback(packet_id: int, return_codes: Iterable[int]) -> bytes:
    """SUBACK (§3.9): one code per filter, each 0, 1, 2 or 0x80 (failure)."""
    pid = _check_pid(packet_id)
    _no_str(return_codes, "return_codes")
    codes = bytearray()
    for code in return_codes:
        code = _index(code)
        if code not in _SUBACK_CODES:
            raise ValueError(f"SUBACK return code must be 0, 1, 2 or 0x80, got {code} (MQTT 3.1.1 §3.9.3)")
        codes.append(code)
    if not codes:
        raise ValueError("SUBACK needs at least one return code (MQTT 3.1.1 §3.9.3)")
    return _fixed_header(0x90, 2 + len(codes)) + _u16(pid) + bytes(codes)


def encode_unsubscribe(packet_id: int, filters: Iterable[str]) -> bytes:
    """UNSUBSCRIBE (§3.10): at least one topic filter."""
    pid = _check_pid(packet_id)
    _no_str(filters, "filters")
    parts = [_u16(pid)]
    for topic_filter in filters:
        raw = _encode_filter(topic_filter, "topic filter")
        parts += (_u16(len(raw)), raw)
    if len(parts) == 1:
        raise ValueError("UNSUBSCRIBE needs at least one topic filter (MQTT 3.1.1 §3.10.3)")
    body = b"".join(parts)
    return _fixed_header(0xA2, len(body)) + body


def encode_pingreq() -> bytes:
    """PINGREQ (§3.12)."""
    return b"\xc0\x00"


def encode_pingresp() -> bytes:
    """PINGRESP (§3.13)."""
    return b"\xd0\x00"


def encode_disconnect() -> bytes:
    """DISCONNECT (§3.14)."""
    return b"\xe0\x00"


def encode_packet(packet: Any, codec: Any = None) -> bytes:
    """Bytes for any packet named tuple, through `codec`'s public encoders.

    `codec` is a codec module (this pure twin by default, or the compiled
    `cascade_fast._codec`), so tests, the fuzzer and test peers can turn a
    decoded packet back into bytes without a dispatch table of their own.
    """
    impl = codec if codec is not None else sys.modules[__name__]
    kind = packet.type
    if kind == "PUBLISH":
        return impl.encode_publish(packet.topic, packet.payload, packet.qos, packet.retain, packet.dup, packet.packet_id)
    if kind == "CONNECT":
        return impl.encode_connect(
            packet.client_id,
            clean_session=packet.clean_session,
            keepalive=packet.keepalive,
            will_topic=packet.will_topic,
            will_payload=packet.will_payload,
            will_qos=packet.will_qos,
            will_retain=packet.will_retain,
            username=packet.username,
            password=packet.password,
        )
    if kind == "CONNACK":
        return impl.encode_connack(packet.session_present, packet.return_code)
    if kind == "SUBSCRIBE":
        return impl.encode_subscribe(packet.packet_id, packet.topics)
    if kind == "SUBACK":
        return impl.encode_suback(packet.packet_id, packet.return_codes)
    if kind == "UNSUBSCRIBE":
        return impl.encode_unsubscribe(packet.packet_id, packet.topics)
    if kind in ("PINGREQ", "PINGRESP", "DISCONNECT"):
        return getattr(impl, "encode_" + kind.lower())()
    return getattr(impl, "encode_" + kind.lower())(packet.packet_id)
