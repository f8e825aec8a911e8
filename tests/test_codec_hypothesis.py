"""Property tests of the codec: both twins agree, round trips hold, paho agrees.

* decode(encode(p)) == p for every packet type, in both twins, and both twins
  write identical bytes;
* any chunking of a stream decodes to the same packets (`feed` and `feed_to`);
* with a small ``max_packet_size``, each PUBLISH over it is reported as
  `Oversized` and skipped, any other packet over it is a ProtocolError, in
  any chunking and identically in both twins (``partial`` included);
* on arbitrary and on mutated bytes the twins give the same outcome: equal
  packets, equal kept tail, or a ProtocolError with the same message;
* the encoders agree on arbitrary (often invalid) arguments;
* paho-mqtt's packet builders are an independent oracle for the bytes.

Regressions found are pinned with @example.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from cascade_fast import _codec_py
from cascade_fast._errors import ProtocolError
from cascade_fast._extensions import load_compiled
from cascade_fast.packets import (
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    Connack,
    Connect,
    Oversized,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
)

_compiled = load_compiled("_codec")
TWINS = [_codec_py] if _compiled is None else [_compiled, _codec_py]

needs_compiled = pytest.mark.skipif(_compiled is None, reason="compiled codec not loaded: nothing to compare with")

settings.register_profile("codec", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("codec")


# -- strategies ---------------------------------------------------------------

# §1.5.3: no U+0000, no surrogates (not encodable); '/' and '$' on purpose.
_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
_name_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#")
strings = st.text(_chars, max_size=20)
levels = st.text(_name_chars, max_size=6)
topic_names = st.lists(levels, min_size=1, max_size=5).map("/".join).filter(bool)
topic_filters = st.builds(
    lambda parts, tail: "/".join(parts + tail),
    st.lists(st.one_of(levels, st.just("+")), min_size=1, max_size=5),
    st.one_of(st.just([]), st.just(["#"])),
).filter(bool)
packet_ids = st.integers(1, 65535)
qos_values = st.integers(0, 2)
payloads = st.binary(max_size=300)


@st.composite
def publishes(draw: Any) -> Publish:
    """A valid PUBLISH (DUP only at QoS > 0, §3.3.1.1)."""
    qos = draw(qos_values)
    return Publish(
        "PUBLISH",
        draw(topic_names),
        draw(payloads),
        qos,
        draw(st.booleans()),
        draw(st.booleans()) if qos else False,
        draw(packet_ids) if qos else None,
    )


@st.composite
def connects(draw: Any) -> Connect:
    """A valid MQTT 3.1.1 CONNECT, with or without Will, user name, password."""
    will = draw(st.none() | st.tuples(topic_names, st.binary(max_size=40), qos_values, st.booleans()))
    username = draw(st.none() | strings)
    password = draw(st.none() | st.binary(max_size=20)) if username is not None else None
    will_topic, will_payload, will_qos, will_retain = will if will else (None, None, 0, False)
    return Connect(
        "CONNECT",
        draw(strings),
        draw(st.booleans()),
        draw(st.integers(0, 65535)),
        will_topic,
        will_payload,
        will_qos,
        will_retain,
        username,
        password,
    )


connacks = st.one_of(
    st.builds(Connack, st.just("CONNACK"), st.booleans(), st.just(0)),
    st.builds(Connack, st.just("CONNACK"), st.just(False), st.integers(0, 255)),
)
packets = st.one_of(
    publishes(),
    connects(),
    connacks,
    st.builds(Puback, st.just("PUBACK"), packet_ids),
    st.builds(Pubrec, st.just("PUBREC"), packet_ids),
    st.builds(Pubrel, st.just("PUBREL"), packet_ids),
    st.builds(Pubcomp, st.just("PUBCOMP"), packet_ids),
    st.builds(
        Subscribe,
        st.just("SUBSCRIBE"),
        packet_ids,
        st.lists(st.tuples(topic_filters, qos_values), min_size=1, max_size=4).map(tuple),
    ),
    st.builds(Suback, st.just("SUBACK"), packet_ids, st.lists(st.sampled_from([0, 1, 2, 0x80]), min_size=1, max_size=6).map(tuple)),
    st.builds(Unsubscribe, st.just("UNSUBSCRIBE"), packet_ids, st.lists(topic_filters, min_size=1, max_size=4).map(tuple)),
    st.builds(Unsuback, st.just("UNSUBACK"), packet_ids),
    st.just(PINGREQ),
    st.just(PINGRESP),
    st.just(DISCONNECT),
)


def encode_packet(impl: Any, p: Any) -> bytes:
    """Bytes for packet `p` from the twin's public encoders."""
    return _codec_py.encode_packet(p, impl)


def outcome(impl: Any, chunks: list[bytes], max_packet_size: int = _codec_py.DEFAULT_MAX_PACKET_SIZE) -> tuple:
    """What a twin makes of a chunked stream: (packets, partial) per feed, then the tail or the error."""
    decoder = impl.Decoder(max_packet_size)
    got = []
    try:
        for chunk in chunks:
            got.append((decoder.feed(chunk), decoder.partial))
    except ProtocolError as exc:
        return ("error", got, str(exc))
    return ("ok", got, decoder.pending)


def sink_outcome(impl: Any, chunks: list[bytes], max_packet_size: int) -> tuple[list[Any], str | None]:
    """What a twin's feed_to hands a sink, as packets, until the end or the ProtocolError (its message)."""
    events: list[Any] = []

    def on_publish(topic: str, payload: bytes, qos: int, retain: bool, dup: bool, pid: int) -> None:
        events.append(Publish("PUBLISH", topic, payload, qos, retain, dup, pid or None))

    def on_oversized(topic: str, qos: int, retain: bool, dup: bool, pid: int, size: int) -> None:
        events.append(Oversized("OVERSIZED", topic, qos, retain, dup, pid or None, size))

    sink = impl.CallbackSink(on_publish, events.append, on_oversized)
    decoder = impl.Decoder(max_packet_size)
    try:
        for chunk in chunks:
            decoder.feed_to(chunk, sink)
    except ProtocolError as exc:
        return events, str(exc)
    return events, None


def with_limit(stream_packets: list[Any], limit: int) -> tuple[list[Any], bool]:
    """What a decoder with max_packet_size `limit` must make of these packets.

    Each PUBLISH over the limit becomes an Oversized report; the first other
    packet over it stops the stream (True: a ProtocolError).
    """
    out: list[Any] = []
    for p in stream_packets:
        wire = encode_packet(_codec_py, p)
        header = 2
        while wire[header - 1] & 0x80:
            header += 1
        rem = len(wire) - header
        if rem <= limit:
            out.append(p)
        elif p.type == "PUBLISH":
            out.append(Oversized("OVERSIZED", p.topic, p.qos, p.retain, p.dup, p.packet_id, rem))
        else:
            return out, True
    return out, False


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given offsets (sorted, deduplicated, clamped)."""
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


# -- round trips --------------------------------------------------------------


@given(packets)
@example(Publish("PUBLISH", "/", b"", 0, False, False, None))
@example(Publish("PUBLISH", "$SYS/x", b"\x00" * 128, 2, True, True, 65535))
@example(Connect("CONNECT", "", True, 0, "w", b"", 0, False, "", b""))
@example(Subscribe("SUBSCRIBE", 1, (("$share/g/a/+", 0), ("#", 2))))
def test_decode_encode_roundtrip(packet: Any) -> None:
    """decode(encode(p)) == [p] for every packet type, and the twins write identical bytes."""
    wires = [encode_packet(impl, packet) for impl in TWINS]
    assert all(w == wires[0] for w in wires)
    for impl in TWINS:
        decoder = impl.Decoder()
        assert decoder.feed(wires[0]) == [packet]
        assert decoder.pending == 0


@settings(max_examples=300)
@given(st.lists(packets, max_size=8), st.lists(st.integers(0, 4000), max_size=12))
def test_any_chunking_same_packets(stream_packets: list[Any], cuts: list[int]) -> None:
    """Any split of a stream decodes to its packets, in both twins, via feed and feed_to."""
    wire = b"".join(encode_packet(_codec_py, p) for p in stream_packets)
    chunks = split(wire, cuts)
    for impl in TWINS:
        decoder = impl.Decoder()
        got = [p for chunk in chunks for p in decoder.feed(chunk)]
        assert got == stream_packets
        events: list[Any] = []
        sink = impl.CallbackSink(lambda *fields: events.append(fields), events.append)
        decoder = impl.Decoder()
        for chunk in chunks:
            decoder.feed_to(chunk, sink)
        assert len(events) == len(stream_packets)
        for event, p in zip(events, stream_packets):
            if p.type == "PUBLISH":
                assert event == (p.topic, p.payload, p.qos, p.retain, p.dup, p.packet_id or 0)
            else:
                assert event == p


@given(st.lists(packets, min_size=1, max_size=6), st.integers(1, 8), st.integers(1, 64), st.sampled_from([_codec_py.DEFAULT_MAX_PACKET_SIZE, 24]))
@example([PINGREQ, PINGREQ, PINGREQ], 1, 64, _codec_py.DEFAULT_MAX_PACKET_SIZE)  # kept rest held whole packets: crashed the compiled twin
def test_sink_exception_loses_and_repeats_nothing(stream_packets: list[Any], raise_at: int, chunk: int, limit: int) -> None:
    """A sink raising at any delivery (an oversized report too): feeding on delivers every packet exactly once."""
    assume(not with_limit(stream_packets, limit)[1])
    wire = b"".join(encode_packet(_codec_py, p) for p in stream_packets)
    for impl in TWINS:
        seen: list[Any] = []

        def record(item: Any) -> None:
            seen.append(item)
            if len(seen) == raise_at:
                raise LookupError("sink failed")

        sink = impl.CallbackSink(lambda *fields: record(fields), record, lambda *fields: record(fields))
        decoder = impl.Decoder(limit)
        for i in range(0, len(wire), chunk):
            try:
                decoder.feed_to(wire[i : i + chunk], sink)
            except LookupError:
                decoder.feed_to(b"", sink)
        assert len(seen) == len(stream_packets)
        assert decoder.pending == decoder.partial == 0


@settings(max_examples=300)
@given(st.lists(packets, max_size=8), st.lists(st.integers(0, 4000), max_size=12), st.sampled_from([0, 2, 16, 64, 200]))
@example([Publish("PUBLISH", "t", b"x" * 200, 1, False, False, 9), PINGREQ], [1, 3, 5], 2)
@example([Subscribe("SUBSCRIBE", 1, (("a", 0),))], [], 2)
def test_oversized_publish_skipped_in_any_split(stream_packets: list[Any], cuts: list[int], limit: int) -> None:
    """A small max_packet_size: each PUBLISH over it is reported and skipped, any other packet over it
    is a ProtocolError; feed and feed_to of both twins give exactly that, whatever the split."""
    chunks = split(b"".join(encode_packet(_codec_py, p) for p in stream_packets), cuts)
    expected, fails = with_limit(stream_packets, limit)
    results = [outcome(impl, chunks, limit) for impl in TWINS]
    assert all(r == results[0] for r in results)
    kind, got, _ = results[0]
    fed = [p for packets_, _ in got for p in packets_]
    if fails:
        assert kind == "error"
        assert fed == expected[: len(fed)]
    else:
        assert results[0] == ("ok", got, 0)
        assert fed == expected
        assert not got or got[-1][1] == 0
    for impl in TWINS:
        events, error = sink_outcome(impl, chunks, limit)
        assert events == expected
        assert (error is not None) == fails


# -- the twins agree on hostile bytes ----------------------------------------


@needs_compiled
@settings(max_examples=1000)
@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=6), st.sampled_from([256 * 1024 * 1024, 1024 * 1024, 64, 2, 0]))
@example(b"\x30\xff\xff\xff\x7f", [], 256 * 1024 * 1024)
@example(b"\x20\x02\x01\x03", [1], 64)
@example(b"\x30\x04\x00\x02\xc3\x28", [3], 64)
def test_twins_agree_on_random_bytes(data: bytes, cuts: list[int], max_size: int) -> None:
    """Random bytes: same packets, same kept tail, or the same ProtocolError."""
    chunks = split(data, cuts)
    assert outcome(_compiled, chunks, max_size) == outcome(_codec_py, chunks, max_size)


@st.composite
def mutated_streams(draw: Any) -> bytes:
    """Valid packets with a few bytes flipped, dropped or inserted."""
    wire = bytearray(b"".join(encode_packet(_codec_py, p) for p in draw(st.lists(packets, min_size=1, max_size=4))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 2))
        at = draw(st.integers(0, len(wire)))
        if op == 0 and at < len(wire):
            wire[at] = draw(st.integers(0, 255))
        elif op == 1 and at < len(wire):
            del wire[at]
        else:
            wire.insert(at, draw(st.integers(0, 255)))
    return bytes(wire)


@needs_compiled
@settings(max_examples=1000)
@given(mutated_streams(), st.lists(st.integers(0, 600), max_size=6), st.sampled_from([_codec_py.DEFAULT_MAX_PACKET_SIZE, 40, 8]))
def test_twins_agree_on_mutated_streams(data: bytes, cuts: list[int], limit: int) -> None:
    """Mutated valid streams: the twins give the same outcome, whatever the chunking and limit."""
    chunks = split(data, cuts)
    assert outcome(_compiled, chunks, limit) == outcome(_codec_py, chunks, limit)
    assert sink_outcome(_compiled, chunks, limit) == sink_outcome(_codec_py, chunks, limit)


def _call(fn: Any, *args: Any, **kwargs: Any) -> tuple:
    try:
        return ("ok", fn(*args, **kwargs))
    except (ValueError, TypeError) as exc:
        return (type(exc), str(exc))


_any_text = st.text(st.characters(), max_size=8) | st.sampled_from(["", "a/+", "a/#", "#", "+/x", "a\x00", "\ud800", "x" * 65536])
_any_int = st.integers(-2, 70000) | st.none() | st.sampled_from([1.0, "1", True])
_any_payload = st.binary(max_size=8) | st.builds(bytearray, st.binary(max_size=8)) | st.sampled_from(["s", 3, None])


@needs_compiled
@given(_any_text, _any_payload, _any_int, st.booleans(), st.booleans(), _any_int)
def test_twins_agree_on_encode_publish_arguments(topic: Any, payload: Any, qos: Any, retain: bool, dup: bool, pid: Any) -> None:
    """encode_publish: identical bytes, or the same exception type and message."""
    compiled = _call(_compiled.encode_publish, topic, payload, qos, retain, dup, pid)
    pure = _call(_codec_py.encode_publish, topic, payload, qos, retain, dup, pid)
    assert compiled == pure
    batch = [(topic, payload, qos, retain, pid)]
    assert _call(_compiled.encode_publish_batch, batch) == _call(_codec_py.encode_publish_batch, batch)


@needs_compiled
@given(
    _any_text,
    st.booleans(),
    _any_int,
    st.none() | _any_text,
    _any_payload,
    _any_int,
    st.booleans(),
    st.none() | _any_text,
    st.none() | _any_payload,
)
def test_twins_agree_on_encode_connect_arguments(
    client_id: Any, clean: bool, keepalive: Any, will_topic: Any, will_payload: Any, will_qos: Any, will_retain: bool, username: Any, password: Any
) -> None:
    """encode_connect: identical bytes, or the same exception type and message."""
    kwargs = {
        "clean_session": clean,
        "keepalive": keepalive,
        "will_topic": will_topic,
        "will_payload": will_payload,
        "will_qos": will_qos,
        "will_retain": will_retain,
        "username": username,
        "password": password,
    }
    assert _call(_compiled.encode_connect, client_id, **kwargs) == _call(_codec_py.encode_connect, client_id, **kwargs)


@needs_compiled
@given(_any_int, st.lists(st.tuples(_any_text, _any_int), max_size=3), st.lists(_any_int, max_size=3))
def test_twins_agree_on_other_encoders(pid: Any, topics: list, codes: list) -> None:
    """SUBSCRIBE, UNSUBSCRIBE, SUBACK, the acks and CONNACK: the twins agree."""
    for name, args in [
        ("encode_subscribe", (pid, topics)),
        ("encode_unsubscribe", (pid, [t for t, _ in topics])),
        ("encode_suback", (pid, codes)),
        ("encode_puback", (pid,)),
        ("encode_pubrel", (pid,)),
        ("encode_unsuback", (pid,)),
        ("encode_connack", (bool(codes), pid)),
    ]:
        assert _call(getattr(_compiled, name), *args) == _call(getattr(_codec_py, name), *args), name


# -- paho-mqtt as an independent oracle ---------------------------------------

paho_client = pytest.importorskip("paho.mqtt.client")


class PahoBuilder:
    """paho-mqtt's own packet builders, with the socket write replaced by a capture."""

    def __init__(self, client_id: str = "oracle", clean_session: bool = True) -> None:
        self.client = paho_client.Client(
            paho_client.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=paho_client.MQTTv311,
        )
        self.packets: list[bytes] = []
        self.client._sock = object()  # paho builds only for a "connected" client
        self.client._packet_queue = self._capture

    def _capture(self, command: int, packet: Any, mid: int, qos: int, info: Any = None) -> int:
        self.packets.append(bytes(packet))
        return 0

    def close(self) -> None:
        """Detach the fake socket so paho's finaliser does not touch it."""
        self.client._sock = None


@given(publishes())
@example(Publish("PUBLISH", "a" * 200, b"x" * 20000, 1, False, True, 1))
def test_publish_bytes_match_paho(packet: Publish) -> None:
    """encode_publish writes what paho's _send_publish writes; we decode paho's bytes."""
    paho = PahoBuilder()
    paho.client._send_publish(packet.packet_id or 0, packet.topic.encode(), packet.payload, packet.qos, packet.retain, packet.dup)
    paho.close()
    for impl in TWINS:
        assert encode_packet(impl, packet) == paho.packets[0]
        assert impl.Decoder().feed(paho.packets[0]) == [packet]


@given(st.lists(st.tuples(topic_filters, qos_values), min_size=1, max_size=4), st.lists(topic_filters, min_size=1, max_size=4))
def test_subscribe_unsubscribe_bytes_match_paho(topics: list, filters: list) -> None:
    """SUBSCRIBE and UNSUBSCRIBE bytes equal paho's for the same filters and packet ids."""
    paho = PahoBuilder()
    _, sub_mid = paho.client._send_subscribe(0, [(t.encode(), q) for t, q in topics])
    _, unsub_mid = paho.client._send_unsubscribe(0, [f.encode() for f in filters])
    paho.close()
    for impl in TWINS:
        assert impl.encode_subscribe(sub_mid, topics) == paho.packets[0]
        assert impl.encode_unsubscribe(unsub_mid, filters) == paho.packets[1]
        assert impl.Decoder().feed(paho.packets[0] + paho.packets[1]) == [
            Subscribe("SUBSCRIBE", sub_mid, tuple(topics)),
            Unsubscribe("UNSUBSCRIBE", unsub_mid, tuple(filters)),
        ]


@given(connects().filter(lambda c: c.client_id != "" and (c.password is None or c.username is not None)))
def test_connect_bytes_match_paho(packet: Connect) -> None:
    """CONNECT bytes (Will, user name, password included) equal paho's."""
    paho = PahoBuilder(packet.client_id, packet.clean_session)
    if packet.will_topic is not None:
        paho.client.will_set(packet.will_topic, packet.will_payload, packet.will_qos, packet.will_retain)
    if packet.username is not None:
        paho.client.username_pw_set(packet.username, packet.password)
    paho.client._send_connect(packet.keepalive)
    paho.close()
    for impl in TWINS:
        assert encode_packet(impl, packet) == paho.packets[0]
        assert impl.Decoder().feed(paho.packets[0]) == [packet]


@given(packet_ids)
def test_ack_bytes_match_paho(pid: int) -> None:
    """PUBACK/PUBREC/PUBREL/PUBCOMP and PINGREQ/DISCONNECT bytes equal paho's."""
    paho = PahoBuilder()
    for command in (paho_client.PUBACK, paho_client.PUBREC, paho_client.PUBREL | 2, paho_client.PUBCOMP):
        paho.client._send_command_with_mid(command, pid, False)
    paho.client._send_simple_command(paho_client.PINGREQ)
    paho.client._send_simple_command(paho_client.DISCONNECT)
    paho.close()
    for impl in TWINS:
        ours = [
            impl.encode_puback(pid),
            impl.encode_pubrec(pid),
            impl.encode_pubrel(pid),
            impl.encode_pubcomp(pid),
            impl.encode_pingreq(),
            impl.encode_disconnect(),
        ]
        assert ours == paho.packets
