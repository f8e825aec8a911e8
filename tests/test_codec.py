"""Unit tests of the MQTT 3.1.1 codec, run over both twins (compiled and pure).

The property tests (tests/test_codec_hypothesis.py) prove the twins agree on
generated input; these pin the behaviour itself: exact bytes, the packets,
each malformed-input rule with its message, and the decoder's state rules.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tracemalloc
from typing import Any

import pytest

from cascade_fast import _codec_py, codec
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


@pytest.fixture(scope="session", params=["compiled", "pure"])
def impl(request: pytest.FixtureRequest) -> Any:
    """The codec module under test: the compiled build, then the pure twin."""
    if request.param == "pure":
        return _codec_py
    if _compiled is None:
        pytest.skip("compiled codec not loaded (CASCADE_FAST_NO_EXTENSIONS or no build)")
    return _compiled


def decode_all(impl: Any, data: bytes, **kwargs: Any) -> list[Any]:
    """Every packet in `data`, which must end on a packet boundary."""
    decoder = impl.Decoder(**kwargs)
    packets = decoder.feed(data)
    assert decoder.pending == 0
    return packets


# -- the build ---------------------------------------------------------------


def test_compiled_codec_loaded() -> None:
    """The selector exports the compiled build unless CASCADE_FAST_NO_EXTENSIONS is set."""
    if os.environ.get("CASCADE_FAST_NO_EXTENSIONS", "").lower() not in ("", "0", "false", "no", "off"):
        assert codec.COMPILED is False
        assert codec.Decoder is _codec_py.Decoder
    else:
        assert codec.COMPILED is True
        assert codec.Decoder.__module__ == "cascade_fast._codec"
        assert codec.encode_publish is _compiled.encode_publish


def test_compiled_codec_loaded_in_clean_interpreter() -> None:
    """A fresh interpreter picks the same build as this one (no import-order luck)."""
    code = "import cascade_fast.codec as c; print(c.COMPILED)"
    env = dict(os.environ, PYTHONSAFEPATH="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(codec.COMPILED)


def test_selector_exports() -> None:
    """cascade_fast.codec exports the Decoder, the constants and every encoder."""
    for name in codec.__all__:
        assert getattr(codec, name) is not None
    assert codec.DEFAULT_MAX_PACKET_SIZE == 1024 * 1024
    assert {n for n in dir(_codec_py) if n.startswith("encode_")} <= set(codec.__all__)


# -- exact bytes ------------------------------------------------------------


ENCODED = [
    # (encoder name, args, kwargs, exact bytes, decoded packet)
    (
        "encode_connect",
        ("cid",),
        {"keepalive": 30},
        b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x1e\x00\x03cid",
        Connect("CONNECT", "cid", True, 30, None, None, 0, False, None, None),
    ),
    (
        "encode_connect",
        ("",),
        {
            "clean_session": False,
            "keepalive": 0,
            "will_topic": "s/1",
            "will_payload": b"off",
            "will_qos": 1,
            "will_retain": True,
            "username": "u",
            "password": "p",
        },
        b"\x10\x1c\x00\x04MQTT\x04\xec\x00\x00\x00\x00\x00\x03s/1\x00\x03off\x00\x01u\x00\x01p",
        Connect("CONNECT", "", False, 0, "s/1", b"off", 1, True, "u", b"p"),
    ),
    ("encode_connack", (True, 0), {}, b"\x20\x02\x01\x00", Connack("CONNACK", True, 0)),
    ("encode_connack", (False, 5), {}, b"\x20\x02\x00\x05", Connack("CONNACK", False, 5)),
    (
        "encode_publish",
        ("a/b", b"hi"),
        {},
        b"\x30\x07\x00\x03a/bhi",
        Publish("PUBLISH", "a/b", b"hi", 0, False, False, None),
    ),
    (
        "encode_publish",
        ("a/b", b"hi", 1, True, True, 10),
        {},
        b"\x3b\x09\x00\x03a/b\x00\x0ahi",
        Publish("PUBLISH", "a/b", b"hi", 1, True, True, 10),
    ),
    (
        "encode_publish",
        ("é", b"", 2),
        {"packet_id": 65535},
        b"\x34\x06\x00\x02\xc3\xa9\xff\xff",
        Publish("PUBLISH", "é", b"", 2, False, False, 65535),
    ),
    ("encode_puback", (1,), {}, b"\x40\x02\x00\x01", Puback("PUBACK", 1)),
    ("encode_pubrec", (0x1234,), {}, b"\x50\x02\x12\x34", Pubrec("PUBREC", 0x1234)),
    ("encode_pubrel", (2,), {}, b"\x62\x02\x00\x02", Pubrel("PUBREL", 2)),
    ("encode_pubcomp", (3,), {}, b"\x70\x02\x00\x03", Pubcomp("PUBCOMP", 3)),
    (
        "encode_subscribe",
        (7, [("a/+", 1), ("#", 2)]),
        {},
        b"\x82\x0c\x00\x07\x00\x03a/+\x01\x00\x01#\x02",
        Subscribe("SUBSCRIBE", 7, (("a/+", 1), ("#", 2))),
    ),
    ("encode_suback", (7, [0, 1, 2, 0x80]), {}, b"\x90\x06\x00\x07\x00\x01\x02\x80", Suback("SUBACK", 7, (0, 1, 2, 128))),
    (
        "encode_unsubscribe",
        (8, ["a/+", "b"]),
        {},
        b"\xa2\x0a\x00\x08\x00\x03a/+\x00\x01b",
        Unsubscribe("UNSUBSCRIBE", 8, ("a/+", "b")),
    ),
    ("encode_unsuback", (8,), {}, b"\xb0\x02\x00\x08", Unsuback("UNSUBACK", 8)),
    ("encode_pingreq", (), {}, b"\xc0\x00", PINGREQ),
    ("encode_pingresp", (), {}, b"\xd0\x00", PINGRESP),
    ("encode_disconnect", (), {}, b"\xe0\x00", DISCONNECT),
]


@pytest.mark.parametrize(("name", "args", "kwargs", "wire", "packet"), ENCODED, ids=[e[0] for e in ENCODED])
def test_encode_exact_bytes_and_decode(impl: Any, name: str, args: tuple, kwargs: dict, wire: bytes, packet: Any) -> None:
    """Each encoder writes the spec's bytes, and the decoder reads them back as the packet."""
    assert getattr(impl, name)(*args, **kwargs) == wire
    assert decode_all(impl, wire) == [packet]


def test_packets_are_named_tuples_with_type_first(impl: Any) -> None:
    """Decoded packets are the named tuples of cascade_fast.packets, `type` first."""
    stream = b"".join(e[3] for e in ENCODED)
    for packet, entry in zip(decode_all(impl, stream), ENCODED):
        assert type(packet) is type(entry[4])
        assert packet._fields[0] == "type"
        assert packet.type == packet[0]
    publish = decode_all(impl, impl.encode_publish("t", bytearray(b"x"), 1, packet_id=3))[0]
    assert type(publish.payload) is bytes
    assert publish._asdict() == {
        "type": "PUBLISH",
        "topic": "t",
        "payload": b"x",
        "qos": 1,
        "retain": False,
        "dup": False,
        "packet_id": 3,
    }


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (127, b"\x30\x7f"),
        (128, b"\x30\x80\x01"),
        (16_383, b"\x30\xff\x7f"),
        (16_384, b"\x30\x80\x80\x01"),
        (2_097_151, b"\x30\xff\xff\x7f"),
        (2_097_152, b"\x30\x80\x80\x80\x01"),
    ],
)
def test_remaining_length_boundaries(impl: Any, size: int, header: bytes) -> None:
    """The remaining length uses 1 to 4 bytes at the §2.2.3 boundaries, both ways."""
    payload = b"p" * (size - 3)
    wire = impl.encode_publish("t", payload)
    assert wire[: len(header)] == header
    assert len(wire) == len(header) + size
    decoded = decode_all(impl, wire, max_packet_size=codec.MAX_REMAINING_LENGTH)
    assert decoded == [Publish("PUBLISH", "t", payload, 0, False, False, None)]


def test_publish_batch_is_concatenation(impl: Any) -> None:
    """encode_publish_batch is the concatenation of encode_publish for each item."""
    items = [("a", b"1", 0, False, None), ("b/c", bytearray(b"22"), 1, True, 5), ("d", memoryview(b"333"), 2, False, 65535)]
    expected = b"".join(impl.encode_publish(t, p, q, r, False, i) for t, p, q, r, i in items)
    assert impl.encode_publish_batch(items) == expected
    assert impl.encode_publish_batch(iter(items)) == expected
    assert impl.encode_publish_batch([]) == b""


def test_payload_types(impl: Any) -> None:
    """Payloads may be bytes, bytearray or memoryview (even strided); never str or int."""
    expected = impl.encode_publish("t", b"abc")
    assert impl.encode_publish("t", bytearray(b"abc")) == expected
    assert impl.encode_publish("t", memoryview(b"abc")) == expected
    assert impl.encode_publish("t", memoryview(b"aXbXc")[::2]) == expected
    for bad in ("abc", 3, None):
        with pytest.raises(TypeError, match="payload must be bytes"):
            impl.encode_publish("t", bad)


# -- encoder validation ----------------------------------------------------


BAD_ENCODES = [
    ("encode_publish", ("a/+", b""), {}, ValueError, "topic contains a wildcard"),
    ("encode_publish", ("a/#", b""), {}, ValueError, "topic contains a wildcard"),
    ("encode_publish", ("", b""), {}, ValueError, "topic is empty"),
    ("encode_publish", ("a\x00b", b""), {}, ValueError, "U\\+0000"),
    ("encode_publish", ("\ud800", b""), {}, ValueError, "not encodable as UTF-8"),
    ("encode_publish", ("x" * 65536, b""), {}, ValueError, "more than 65535"),
    ("encode_publish", (b"t", b""), {}, TypeError, "topic must be str"),
    ("encode_publish", ("t", b"", 3), {}, ValueError, "qos must be 0, 1 or 2"),
    ("encode_publish", ("t", b"", -1), {}, ValueError, "qos must be 0, 1 or 2"),
    ("encode_publish", ("t", b"", 1), {}, ValueError, "packet_id is required"),
    ("encode_publish", ("t", b"", 1), {"packet_id": 0}, ValueError, "packet_id must be in 1..65535"),
    ("encode_publish", ("t", b"", 2), {"packet_id": 65536}, ValueError, "packet_id must be in 1..65535"),
    ("encode_publish", ("t", b"", 0), {"packet_id": 4}, ValueError, "packet_id must be None at QoS 0"),
    ("encode_publish", ("t", b"", 0), {"dup": True}, ValueError, "dup must be False at QoS 0"),
    ("encode_publish", ("t", b"", 1.0), {"packet_id": 1}, TypeError, "integer"),
    ("encode_puback", (0,), {}, ValueError, "packet_id must be in 1..65535"),
    ("encode_pubrel", (None,), {}, ValueError, "packet_id is required"),
    ("encode_pubcomp", (70000,), {}, ValueError, "packet_id must be in 1..65535"),
    ("encode_subscribe", (1, []), {}, ValueError, "at least one topic filter"),
    ("encode_subscribe", (1, "a/b"), {}, TypeError, "iterable of items"),
    ("encode_subscribe", (1, [("a/#/b", 0)]), {}, ValueError, "'#' that is not the whole last level"),
    ("encode_subscribe", (1, [("a+", 0)]), {}, ValueError, "'\\+' that is not a whole level"),
    ("encode_subscribe", (1, [("", 0)]), {}, ValueError, "is empty"),
    ("encode_subscribe", (1, [("a", 3)]), {}, ValueError, "qos must be 0, 1 or 2"),
    ("encode_unsubscribe", (1, []), {}, ValueError, "at least one topic filter"),
    ("encode_unsubscribe", (1, ["a/b#"]), {}, ValueError, "'#'"),
    ("encode_suback", (1, [3]), {}, ValueError, "0, 1, 2 or 0x80"),
    ("encode_suback", (1, []), {}, ValueError, "at least one return code"),
    ("encode_connack", (True, 1), {}, ValueError, "session_present must be False"),
    ("encode_connack", (False, 256), {}, ValueError, "return_code must be in 0..255"),
    ("encode_connect", ("c",), {"keepalive": 65536}, ValueError, "keepalive"),
    ("encode_connect", ("c",), {"password": b"p"}, ValueError, "password needs a username"),
    ("encode_connect", ("c",), {"will_qos": 1}, ValueError, "need a will_topic"),
    ("encode_connect", ("c",), {"will_payload": b"x"}, ValueError, "will_payload needs a will_topic"),
    ("encode_connect", ("c",), {"will_topic": "a/+"}, ValueError, "will_topic contains a wildcard"),
    ("encode_connect", ("c",), {"will_topic": "w", "will_qos": 3}, ValueError, "will_qos must be 0, 1 or 2"),
    ("encode_connect", ("c",), {"will_topic": "w", "will_payload": bytes(65536)}, ValueError, "more than 65535"),
    ("encode_connect", ("c\x00",), {}, ValueError, "client_id contains U\\+0000"),
    ("encode_connect", (None,), {}, TypeError, "client_id must be str"),
]


@pytest.mark.parametrize(("name", "args", "kwargs", "exc", "match"), BAD_ENCODES, ids=[e[0] + "-" + e[4][:24] for e in BAD_ENCODES])
def test_encoders_validate(impl: Any, name: str, args: tuple, kwargs: dict, exc: type, match: str) -> None:
    """Encoders refuse what the spec forbids (ValueError) and wrong types (TypeError)."""
    with pytest.raises(exc, match=match):
        getattr(impl, name)(*args, **kwargs)


def test_encoder_refuses_remaining_length_over_limit(impl: Any) -> None:
    """A PUBLISH whose remaining length would exceed 268,435,455 is refused (§2.2.3)."""
    payload = bytes(268_435_455 - 2 - 1 + 1)  # calloc'ed: no pages touched
    with pytest.raises(ValueError, match="remaining length 268435456 exceeds 268435455"):
        impl.encode_publish("t", payload)
    with pytest.raises(ValueError, match="exceeds 268435455"):
        impl.encode_publish_batch([("t", payload, 0, False, None)])


def test_batch_validates_each_item(impl: Any) -> None:
    """One bad item fails the whole batch with the item's error."""
    with pytest.raises(ValueError, match="packet_id is required"):
        impl.encode_publish_batch([("a", b"", 0, False, None), ("b", b"", 1, False, None)])


# -- decoding: malformed input -----------------------------------------------


MALFORMED = [
    (b"\x00\x00", "reserved packet type 0"),
    (b"\xf0\x00", "reserved packet type 15"),
    (b"\x36", "PUBLISH with QoS 3"),
    (b"\x38", "DUP set at QoS 0"),
    (b"\x60\x02\x00\x01", "invalid fixed-header flags 0x0 for PUBREL, expected 0x2"),
    (b"\x80\x05", "invalid fixed-header flags 0x0 for SUBSCRIBE"),
    (b"\xa0\x05", "invalid fixed-header flags 0x0 for UNSUBSCRIBE"),
    (b"\x41\x02\x00\x01", "invalid fixed-header flags 0x1 for PUBACK"),
    (b"\xc2\x00", "invalid fixed-header flags 0x2 for PINGREQ"),
    (b"\x30\xff\xff\xff\xff", "remaining length longer than 4 bytes"),
    (b"\x30\x80\x80\x80\x80", "remaining length longer than 4 bytes"),
    (b"\xd0\x01\x00", "PINGRESP remaining length 1, expected 0"),
    (b"\x40\x03\x00\x01\x00", "PUBACK remaining length 3, expected 2"),
    (b"\x20\x01\x00", "CONNACK remaining length 1, expected 2"),
    (b"\xe0\x01\x00", "DISCONNECT remaining length 1, expected 0"),
    (b"\x40\x02\x00\x00", "PUBACK packet identifier 0"),
    (b"\xb0\x02\x00\x00", "UNSUBACK packet identifier 0"),
    (b"\x30\x00", "PUBLISH topic length runs past the end of the packet"),
    (b"\x30\x01\x00", "PUBLISH topic length runs past the end of the packet"),
    (b"\x30\x04\x00\x05abc", "PUBLISH topic length 5 runs past the end of the packet"),
    (b"\x30\x02\x00\x00", "PUBLISH topic is empty"),
    (b"\x30\x03\x00\x01+", "PUBLISH topic contains a wildcard"),
    (b"\x30\x05\x00\x03a/#", "PUBLISH topic contains a wildcard"),
    (b"\x30\x03\x00\x01\x00", "PUBLISH topic contains U\\+0000"),
    (b"\x30\x04\x00\x02\xc3\x28", "PUBLISH topic is not valid UTF-8"),
    (b"\x30\x05\x00\x03\xed\xa0\x80", "PUBLISH topic is not valid UTF-8"),  # a surrogate
    (b"\x30\x04\x00\x02\xc0\xaf", "PUBLISH topic is not valid UTF-8"),  # overlong '/'
    (b"\x32\x03\x00\x01t", "PUBLISH packet identifier runs past the end"),
    (b"\x32\x05\x00\x01t\x00\x00", "PUBLISH packet identifier 0"),
    (b"\x20\x02\x02\x00", "CONNACK reserved flags 0x02"),
    (b"\x20\x02\x01\x03", "Session Present and a non-zero return code"),
    (b"\x90\x02\x00\x01", "SUBACK has no return codes"),
    (b"\x90\x03\x00\x01\x03", "SUBACK return code 0x03 is reserved"),
    (b"\x82\x02\x00\x01", "SUBSCRIBE has no topic filters"),
    (b"\x82\x05\x00\x01\x00\x01a", "SUBSCRIBE requested QoS runs past the end"),
    (b"\x82\x06\x00\x01\x00\x01a\x03", "SUBSCRIBE requested QoS byte 0x03 is invalid"),
    (b"\x82\x06\x00\x01\x00\x01a\x81", "SUBSCRIBE requested QoS byte 0x81"),
    (b"\x82\x07\x00\x01\x00\x02a+\x00", "SUBSCRIBE topic filter has '\\+'"),
    (b"\x82\x06\x00\x00\x00\x01a\x00", "SUBSCRIBE packet identifier 0"),
    (b"\xa2\x02\x00\x01", "UNSUBSCRIBE has no topic filters"),
    (b"\xa2\x06\x00\x01\x00\x02#a", "UNSUBSCRIBE topic filter has '#'"),
    (b"\xa2\x04\x00\x01\x00\x01", "UNSUBSCRIBE topic filter length 1 runs past the end"),
    (b"\x10\x02\x00\x04", "CONNECT protocol name length 4 runs past the end"),
    (b"\x10\x08\x00\x04MQTT\x04\x02", "CONNECT variable header runs past the end"),
    (b"\x10\x0c\x00\x04MQTT\x04\x03\x00\x00\x00\x00", "CONNECT reserved flag set"),
    (b"\x10\x0c\x00\x04MQTT\x04\x1c\x00\x00\x00\x00", "CONNECT Will QoS 3"),
    (b"\x10\x0c\x00\x04MQTT\x04\x20\x00\x00\x00\x00", "Will Retain set without the Will flag"),
    (b"\x10\x0c\x00\x04MQTT\x04\x42\x00\x00\x00\x00", "password flag set without the user name flag"),
    (b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x00\x00\x00\x00", "CONNECT has 1 unexpected trailing bytes"),
    (b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x00\x00\x02\x00\x00", "CONNECT client identifier contains U\\+0000"),
    (b"\x10\x0e\x00\x04MQTT\x04\x06\x00\x00\x00\x00\x00\x00", "CONNECT Will Topic is empty"),
    (b"\x10\x0f\x00\x04MQTT\x04\x06\x00\x00\x00\x00\x00\x01#", "CONNECT Will Topic contains a wildcard"),
    (b"\x10\x10\x00\x04MQTT\x04\x06\x00\x00\x00\x00\x00\x01w\x00", "CONNECT Will Message length runs past"),
    (b"\x10\x0e\x00\x04MQTT\x04\x82\x00\x00\x00\x00\x00\x01", "CONNECT user name length 1 runs past"),
]


@pytest.mark.parametrize(("data", "match"), MALFORMED, ids=[m[1][:40] for m in MALFORMED])
def test_malformed_input_raises_protocol_error(impl: Any, data: bytes, match: str) -> None:
    """Each rule broken raises ProtocolError (a ValueError) naming it, whole or byte by byte."""
    with pytest.raises(ProtocolError, match=match) as whole:
        impl.Decoder().feed(data)
    assert isinstance(whole.value, ValueError)
    decoder = impl.Decoder()
    with pytest.raises(ProtocolError, match=match):
        for i in range(len(data)):
            decoder.feed(data[i : i + 1])


def test_header_errors_raised_before_the_body_arrives(impl: Any) -> None:
    """A bad first byte or length is refused at once, without waiting for the body."""
    for data in (b"\x00", b"\x36", b"\x30\x80\x80\x80\x80", b"\xd0\x05", b"\x82\x8a\x01"):
        decoder = impl.Decoder(max_packet_size=100)
        with pytest.raises(ProtocolError):
            decoder.feed(data)


def test_max_packet_size_checked_before_buffering(impl: Any) -> None:
    """A remaining length over max_packet_size is refused from the header alone (but a PUBLISH's)."""
    decoder = impl.Decoder(max_packet_size=1000)
    assert decoder.max_packet_size == 1000
    with pytest.raises(ProtocolError, match="remaining length 1001 exceeds max_packet_size 1000"):
        decoder.feed(b"\x82\xe9\x07")
    exact = impl.encode_publish("t", b"x" * (1000 - 3))
    assert impl.Decoder(max_packet_size=1000).feed(exact)[0].payload == b"x" * 997
    with pytest.raises(ProtocolError, match="exceeds max_packet_size 0"):
        impl.Decoder(max_packet_size=0).feed(b"\x82\x01")
    assert impl.Decoder(max_packet_size=0).feed(b"\xc0\x00") == [PINGREQ]
    # The default is sized for telemetry; 268435455 admits the largest length the spec can encode.
    assert impl.Decoder().max_packet_size == 1024 * 1024
    decoder = impl.Decoder(max_packet_size=codec.MAX_REMAINING_LENGTH)
    assert decoder.feed(b"\x30\xff\xff\xff\x7f\x00\x01t") == []
    assert decoder.pending == decoder.partial == 8


@pytest.mark.parametrize("value", [-1, 2**32 + 1])
def test_max_packet_size_range(impl: Any, value: int) -> None:
    """max_packet_size must be in 0..2**32."""
    with pytest.raises(ValueError, match="max_packet_size must be in"):
        impl.Decoder(max_packet_size=value)


def test_protocol_error_poisons_the_decoder(impl: Any) -> None:
    """After a ProtocolError every later feed raises it again and decodes nothing."""
    decoder = impl.Decoder()
    with pytest.raises(ProtocolError, match="reserved packet type 0") as first:
        decoder.feed(b"\xc0\x00\x00\x00")
    assert decoder.pending == 0
    with pytest.raises(ProtocolError) as again:
        decoder.feed(b"\xc0\x00")
    assert str(again.value) == str(first.value)


# -- decoding: chunking and input types --------------------------------------


def _mixed_stream(impl: Any) -> tuple[bytes, list[Any]]:
    """A stream of every packet type, with the packets it decodes to."""
    big = b"B" * 20_000
    wire = b"".join(e[3] for e in ENCODED) + impl.encode_publish("big/one", big, 1, packet_id=9)
    packets = [e[4] for e in ENCODED] + [Publish("PUBLISH", "big/one", big, 1, False, False, 9)]
    return wire, packets


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64, 4096, 1 << 20])
def test_any_chunking_gives_the_same_packets(impl: Any, size: int) -> None:
    """Feeding the stream in chunks of any size (1 byte included) yields the same packets."""
    wire, expected = _mixed_stream(impl)
    decoder = impl.Decoder()
    got: list[Any] = []
    for i in range(0, len(wire), size):
        got += decoder.feed(wire[i : i + size])
    assert got == expected
    assert decoder.pending == 0


def test_only_the_incomplete_tail_is_kept(impl: Any) -> None:
    """Between feeds the decoder keeps exactly the bytes of the incomplete packet."""
    one = impl.encode_publish("t", b"x" * 300)
    decoder = impl.Decoder()
    assert decoder.feed(one * 3 + one[:10]) == [decode_all(impl, one)[0]] * 3
    assert decoder.pending == 10
    assert decoder.feed(one[10:20]) == []
    assert decoder.pending == 20
    assert len(decoder.feed(one[20:] + one[:1])) == 1
    assert decoder.pending == 1
    assert decoder.feed(b"") == []
    assert decoder.pending == 1


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview, "strided"])
def test_feed_accepts_bytes_like(impl: Any, kind: Any) -> None:
    """feed takes bytes, bytearray and memoryview (contiguous or not) alike."""
    wire, expected = _mixed_stream(impl)
    data: Any = memoryview(bytes(b for c in wire for b in (c, 0)))[::2] if kind == "strided" else kind(wire)
    assert impl.Decoder().feed(data) == expected


def test_feed_refuses_non_bytes(impl: Any) -> None:
    """feed raises TypeError for a str or an int (never bytes(5) of zeros)."""
    for bad in ("\xc0\x00", 5):
        with pytest.raises(TypeError):
            impl.Decoder().feed(bad)


def test_received_bytearray_may_be_reused(impl: Any) -> None:
    """Packets own their bytes: mutating the fed bytearray afterwards changes nothing."""
    buffer = bytearray(impl.encode_publish("t/x", b"payload"))
    packet = impl.Decoder().feed(buffer)[0]
    buffer[:] = b"\xff" * len(buffer)
    assert packet == Publish("PUBLISH", "t/x", b"payload", 0, False, False, None)


# -- feed_to ---------------------------------------------------------------


class Recorder:
    """Collects feed_to deliveries; can raise on the n-th one."""

    def __init__(self, raise_at: int = -1) -> None:
        self.events: list[Any] = []
        self.raise_at = raise_at

    def _record(self, event: Any) -> None:
        self.events.append(event)
        if len(self.events) == self.raise_at:
            raise KeyError("sink failed")

    def on_publish(self, topic: str, payload: bytes, qos: int, retain: bool, dup: bool, packet_id: int) -> None:
        self._record(("PUBLISH", topic, payload, qos, retain, dup, packet_id))

    def on_packet(self, packet: Any) -> None:
        self._record(packet)

    def on_oversized(self, topic: str, qos: int, retain: bool, dup: bool, packet_id: int, size: int) -> None:
        self._record(Oversized("OVERSIZED", topic, qos, retain, dup, packet_id or None, size))

    def sink(self, impl: Any) -> Any:
        """A CallbackSink of `impl` recording into this Recorder."""
        return impl.CallbackSink(self.on_publish, self.on_packet, self.on_oversized)


def _as_event(packet: Any) -> Any:
    """What a Recorder gets for a packet `feed` returned."""
    if packet.type == "PUBLISH":
        return ("PUBLISH", packet.topic, packet.payload, packet.qos, packet.retain, packet.dup, packet.packet_id or 0)
    return packet


def test_feed_to_delivers_like_feed(impl: Any) -> None:
    """feed_to calls on_publish (packet_id 0 at QoS 0) and on_packet, in stream order."""
    wire, expected = _mixed_stream(impl)
    recorder = Recorder()
    sink = impl.CallbackSink(recorder.on_publish, recorder.on_packet)
    decoder = impl.Decoder()
    for i in range(0, len(wire), 7):
        decoder.feed_to(wire[i : i + 7], sink)
    assert recorder.events == [_as_event(p) for p in expected]
    assert recorder.events[4][6] == 0


def test_counting_sink(impl: Any) -> None:
    """CountingSink counts publishes, their payload bytes and the other packets."""
    wire, expected = _mixed_stream(impl)
    sink = impl.CountingSink()
    impl.Decoder().feed_to(wire, sink)
    publishes = [p for p in expected if p.type == "PUBLISH"]
    assert sink.publishes == len(publishes)
    assert sink.payload_bytes == sum(len(p.payload) for p in publishes)
    assert sink.packets == len(expected) - len(publishes)


@pytest.mark.parametrize("raise_at", [1, 2, 5, 19])
@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
def test_sink_exception_consumes_only_its_packet(impl: Any, raise_at: int, chunk: int) -> None:
    """A sink that raises: the error propagates, that packet is consumed, the rest is kept.

    Feeding again (even b"") continues with the next packet; nothing is lost
    or delivered twice, whatever the chunking.
    """
    wire, expected = _mixed_stream(impl)
    recorder = Recorder(raise_at=raise_at)
    sink = impl.CallbackSink(recorder.on_publish, recorder.on_packet)
    decoder = impl.Decoder()
    raised = 0
    for i in range(0, len(wire), chunk):
        try:
            decoder.feed_to(wire[i : i + chunk], sink)
        except KeyError:
            raised += 1
            decoder.feed_to(b"", sink)
    assert raised == 1
    assert recorder.events == [_as_event(p) for p in expected]
    assert decoder.pending == 0


def test_sink_protocol_error_does_not_poison(impl: Any) -> None:
    """A ProtocolError raised by the sink is the sink's: the decoder stays usable."""

    def on_packet(packet: Any) -> None:
        raise ProtocolError("sink says no")

    sink = impl.CallbackSink(lambda *a: None, on_packet)
    decoder = impl.Decoder()
    with pytest.raises(ProtocolError, match="sink says no"):
        decoder.feed_to(b"\xc0\x00\xd0\x00", sink)
    assert decoder.pending == 2
    assert decoder.feed(b"") == [PINGRESP]


def test_decoder_errors_after_delivered_packets(impl: Any) -> None:
    """feed_to hands over the packets before a malformed one, then raises."""
    recorder = Recorder()
    sink = impl.CallbackSink(recorder.on_publish, recorder.on_packet)
    with pytest.raises(ProtocolError, match="reserved packet type 15"):
        impl.Decoder().feed_to(b"\xc0\x00\xd0\x00\xf0\x00", sink)
    assert recorder.events == [PINGREQ, PINGRESP]


def test_reentrant_feed_is_refused(impl: Any) -> None:
    """A sink feeding the decoder that is calling it gets RuntimeError."""
    decoder = impl.Decoder()

    def on_packet(packet: Any) -> None:
        decoder.feed(b"\xc0\x00")

    with pytest.raises(RuntimeError, match="inside one of its own sink callbacks"):
        decoder.feed_to(b"\xd0\x00\xd0\x00", impl.CallbackSink(lambda *a: None, on_packet))
    assert decoder.feed(b"") == [PINGRESP]


def test_feed_to_refuses_none(impl: Any) -> None:
    """feed_to(data, None) is a TypeError up front, not a failure at the first packet."""
    decoder = impl.Decoder()
    with pytest.raises(TypeError, match="needs a PacketSink"):
        decoder.feed_to(b"\xc0\x00", None)
    assert decoder.feed(b"\xc0\x00") == [PINGREQ]


def test_base_sink_ignores_everything(impl: Any) -> None:
    """The PacketSink base class accepts every packet and does nothing."""
    wire, _ = _mixed_stream(impl)
    decoder = impl.Decoder()
    decoder.feed_to(wire, impl.PacketSink())
    assert decoder.pending == 0


def test_feed_to_refuses_a_python_object_in_the_compiled_build() -> None:
    """The compiled feed_to takes a PacketSink (C-level calls), not any object."""
    if _compiled is None:
        pytest.skip("compiled codec not loaded")
    with pytest.raises(TypeError):
        _compiled.Decoder().feed_to(b"\xc0\x00", Recorder())


def test_python_overrides_of_the_compiled_sink_are_refused() -> None:
    """A Python subclass of the compiled PacketSink overriding its methods is refused.

    The compiled decoder calls the C-level methods only: the Python ones
    would be silently ignored, so feed_to says so instead.
    """
    if _compiled is None:
        pytest.skip("compiled codec not loaded")

    class PythonSink(_compiled.PacketSink):
        def on_packet(self, packet: Any) -> None:
            raise AssertionError("never called")

    class PlainSubclass(_compiled.CountingSink):
        pass

    class OversizedInPython(_compiled.PacketSink):
        def on_oversized(self, *fields: Any) -> None:
            raise AssertionError("never called")

    with pytest.raises(TypeError, match="PythonSink defines on_publish/on_packet/on_oversized in Python"):
        _compiled.Decoder().feed_to(b"\xc0\x00", PythonSink())
    with pytest.raises(TypeError, match="OversizedInPython defines"):
        _compiled.Decoder().feed_to(b"\xc0\x00", OversizedInPython())
    sink = PlainSubclass()
    _compiled.Decoder().feed_to(b"\xc0\x00", sink)
    assert sink.packets == 1


def test_twins_give_identical_error_messages() -> None:
    """Both builds raise the very same message for every malformed input above."""
    if _compiled is None:
        pytest.skip("compiled codec not loaded")
    cases = [(data, {}) for data, _ in MALFORMED] + [(data, {"max_packet_size": limit}) for data, limit, _ in OVERSIZED_MALFORMED]
    for data, kwargs in cases:
        messages = []
        for twin in (_compiled, _codec_py):
            with pytest.raises(ProtocolError) as info:
                twin.Decoder(**kwargs).feed(data)
            messages.append(str(info.value))
        assert messages[0] == messages[1], data


# -- oversized PUBLISH: skipped, not fatal -------------------------------------

LIMIT = 100  # max_packet_size of these tests


def _oversized_stream(impl: Any, qos: int) -> tuple[bytes, list[Any]]:
    """Normal packets around two PUBLISH over LIMIT (one with a 300-byte topic), and what they decode to."""
    small = Publish("PUBLISH", "s", b"ok", 0, False, False, None)
    long_topic = "t/" + "x" * 298
    pid = 513 if qos else None
    big = impl.encode_publish("big/one", b"B" * 5000, qos, True, qos > 0, pid)
    bigger = impl.encode_publish(long_topic, b"C" * 200, qos, False, False, pid)
    wire = impl.encode_publish("s", b"ok") + big + encode(impl, PINGRESP) + bigger + impl.encode_publish("s", b"ok")
    expected = [
        small,
        Oversized("OVERSIZED", "big/one", qos, True, qos > 0, pid, 5000 + 9 + (2 if qos else 0)),
        PINGRESP,
        Oversized("OVERSIZED", long_topic, qos, False, False, pid, 200 + 302 + (2 if qos else 0)),
        small,
    ]
    return wire, expected


def encode(impl: Any, packet: Any) -> bytes:
    """Bytes for any packet through `impl`'s encoders."""
    return _codec_py.encode_packet(packet, impl)


def _splits(data: bytes, how: str) -> list[bytes]:
    """`data` "whole", byte by "bytes", or cut at 12 random places ("random<seed>")."""
    if how == "whole":
        return [data]
    if how == "bytes":
        return [data[i : i + 1] for i in range(len(data))]
    rng = random.Random(how)
    cuts = sorted(rng.sample(range(1, len(data)), 12))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


SPLITS = ["whole", "bytes"] + [f"random{seed}" for seed in range(6)]


@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("how", SPLITS)
def test_oversized_publish_is_skipped(impl: Any, qos: int, how: str) -> None:
    """A PUBLISH over max_packet_size becomes an Oversized report; decoding goes on after it."""
    wire, expected = _oversized_stream(impl, qos)
    chunks = _splits(wire, how)
    decoder = impl.Decoder(max_packet_size=LIMIT)
    got = [p for chunk in chunks for p in decoder.feed(chunk)]
    assert got == expected
    assert (decoder.pending, decoder.partial) == (0, 0)
    recorder = Recorder()
    decoder = impl.Decoder(max_packet_size=LIMIT)
    for chunk in chunks:
        decoder.feed_to(chunk, recorder.sink(impl))
    assert recorder.events == [_as_event(p) if p.type != "OVERSIZED" else p for p in expected]
    counting = impl.CountingSink()
    impl.Decoder(max_packet_size=LIMIT).feed_to(wire, counting)
    assert (counting.publishes, counting.oversized, counting.packets) == (2, 2, 1)


def test_oversized_without_a_callback_is_skipped_silently(impl: Any) -> None:
    """CallbackSink's on_oversized is optional; the base sink ignores oversized packets too."""
    wire, expected = _oversized_stream(impl, 1)
    recorder = Recorder()
    decoder = impl.Decoder(max_packet_size=LIMIT)
    decoder.feed_to(wire, impl.CallbackSink(recorder.on_publish, recorder.on_packet))
    assert recorder.events == [_as_event(p) for p in expected if p.type != "OVERSIZED"]
    decoder = impl.Decoder(max_packet_size=LIMIT)
    decoder.feed_to(wire, impl.PacketSink())
    assert decoder.partial == 0


def test_oversized_skip_keeps_memory_bounded(impl: Any) -> None:
    """A 50 MB PUBLISH over the limit, fed in 64 KiB chunks, is discarded as it arrives.

    `partial` counts every byte of it while the decoder keeps none (a
    tracemalloc peak far below one chunk), and the packet after it decodes.
    """
    size = 50_000_000
    fixed_header = b"\x32" + _varint(size)
    head = fixed_header + b"\x00\x03a/b\x00\x07"
    chunk = bytes(64 * 1024)
    total = len(fixed_header) + size
    decoder = impl.Decoder()  # the 1 MiB default
    tracemalloc.start()
    try:
        assert decoder.feed(head) == [Oversized("OVERSIZED", "a/b", 1, False, False, 7, size)]
        received = len(head)
        while total - received > len(chunk):
            assert decoder.feed(chunk) == []
            received += len(chunk)
            assert decoder.partial == received
            assert decoder.pending == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200_000
    assert decoder.feed(bytes(total - received) + b"\xd0\x00") == [PINGRESP]
    assert decoder.partial == 0


def _varint(value: int) -> bytes:
    """A remaining length in the §2.2.3 encoding."""
    return _codec_py._fixed_header(0, value)[1:]


def test_oversized_variable_header_up_to_65539_bytes(impl: Any) -> None:
    """The longest variable header (65535-byte topic, packet id) is buffered across feeds, nothing more."""
    topic = "t" * 65535
    wire = impl.encode_publish(topic, b"p" * 100_000, 2, packet_id=9) + b"\xc0\x00"
    decoder = impl.Decoder(max_packet_size=LIMIT)
    got: list[Any] = []
    for i in range(0, len(wire), 1000):
        got += decoder.feed(wire[i : i + 1000])
        assert decoder.pending <= 4 + 65539
    assert got == [Oversized("OVERSIZED", topic, 2, False, False, 9, 165_539), PINGREQ]


OVERSIZED_MALFORMED = [
    # (bytes, max_packet_size, message): what makes a normal PUBLISH a ProtocolError does for a skipped one
    (b"\x30\x80\x01\x00\x00", LIMIT, "PUBLISH topic is empty"),
    (b"\x30\x80\x01\x00\x03a/+", LIMIT, "PUBLISH topic contains a wildcard"),
    (b"\x30\x80\x01\x00\x02\xc3\x28", LIMIT, "PUBLISH topic is not valid UTF-8"),
    (b"\x30\x80\x01\x00\x02a\x00", LIMIT, "PUBLISH topic contains U\\+0000"),
    (b"\x32\x80\x01\x00\x01t\x00\x00", LIMIT, "PUBLISH packet identifier 0"),
    (b"\x30\x01\x00", 0, "PUBLISH topic length runs past the end of the packet"),
    (b"\x30\x05\x00\x09abc", 4, "PUBLISH topic length 9 runs past the end of the packet"),
    (b"\x32\x04\x00\x01t\x00", 2, "PUBLISH packet identifier runs past the end"),
    (b"\x36\x80\x01", LIMIT, "PUBLISH with QoS 3"),
    (b"\x30\x80\x80\x80\x80", LIMIT, "remaining length longer than 4 bytes"),
    # Only a PUBLISH is skipped: any other packet over the limit is refused.
    (b"\x82\x80\x01", LIMIT, "remaining length 128 exceeds max_packet_size 100"),
    (b"\x10\xe5\x00", LIMIT, "remaining length 101 exceeds max_packet_size 100"),
    (b"\x90\xff\xff\x7f", LIMIT, "remaining length 2097151 exceeds max_packet_size 100"),
    (b"\xa2\x80\x01", LIMIT, "exceeds max_packet_size"),
    (b"\x40\x02", 1, "remaining length 2 exceeds max_packet_size 1"),
]


@pytest.mark.parametrize(("data", "limit", "match"), OVERSIZED_MALFORMED, ids=[m[2][:40] for m in OVERSIZED_MALFORMED])
def test_oversized_malformed_is_protocol_error(impl: Any, data: bytes, limit: int, match: str) -> None:
    """A bad variable header in a skipped PUBLISH, or a non-PUBLISH over the limit, poisons the decoder."""
    for how in ("whole", "bytes"):
        decoder = impl.Decoder(max_packet_size=limit)
        with pytest.raises(ProtocolError, match=match):
            for chunk in _splits(data + b"x" * 200, how):
                decoder.feed(chunk)
        assert (decoder.pending, decoder.partial) == (0, 0)
        with pytest.raises(ProtocolError, match=match):
            decoder.feed(b"\xc0\x00")


def test_partial_counts_the_packet_in_progress(impl: Any) -> None:
    """`partial`: 0 at a boundary, else the bytes of the current packet, buffered or skipped."""
    normal = impl.encode_publish("n", b"x" * 50)  # 55 bytes
    big = impl.encode_publish("b/c", b"y" * 500, 1, packet_id=3)  # 3 + 507 bytes
    decoder = impl.Decoder(max_packet_size=LIMIT)
    assert decoder.partial == 0
    decoder.feed(normal[:1])
    assert decoder.partial == 1  # a header byte
    decoder.feed(normal[1:30])
    assert decoder.partial == decoder.pending == 30
    assert len(decoder.feed(normal[30:] + big[:6])) == 1
    assert decoder.partial == decoder.pending == 6  # header and part of the variable header, kept
    assert len(decoder.feed(big[6:20])) == 1
    assert (decoder.partial, decoder.pending) == (20, 0)  # being skipped: counted, not kept
    decoder.feed(big[20:509])
    assert decoder.partial == 509
    assert decoder.feed(big[509:] + b"\xd0") == []
    assert decoder.partial == decoder.pending == 1
    assert decoder.feed(b"\x00") == [PINGRESP]
    assert decoder.partial == 0


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
@pytest.mark.parametrize("raise_at", [2, 4])
def test_on_oversized_exception_consumes_only_its_packet(impl: Any, chunk: int, raise_at: int) -> None:
    """on_oversized raising: the error propagates, the packet counts as consumed (its rest still
    skipped), the bytes after it are kept, and feeding on delivers each packet once."""
    wire, expected = _oversized_stream(impl, 2)
    recorder = Recorder(raise_at=raise_at)
    sink = recorder.sink(impl)
    decoder = impl.Decoder(max_packet_size=LIMIT)
    raised = 0
    for i in range(0, len(wire), chunk):
        try:
            decoder.feed_to(wire[i : i + chunk], sink)
        except KeyError:
            raised += 1
            assert recorder.events[-1].type == "OVERSIZED"
            decoder.feed_to(b"", sink)
    assert raised == 1
    assert recorder.events == [_as_event(p) if p.type != "OVERSIZED" else p for p in expected]
    assert (decoder.pending, decoder.partial) == (0, 0)
