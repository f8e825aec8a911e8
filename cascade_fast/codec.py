"""MQTT 3.1.1 codec: the compiled build when it loaded, else the pure twin.

Both builds export the same names: `Decoder`, the `encode_*` functions and
`encode_publish_batch`, and the sinks of `Decoder.feed_to` (`PacketSink`,
`CallbackSink`, `CountingSink`); packets are the named tuples of
`cascade_fast.packets`. `cascade_fast._codec_py` documents the behaviour,
which both builds share exactly (tests/test_codec_hypothesis.py).
"""

from __future__ import annotations

from . import _codec_py
from ._extensions import load_compiled

_compiled = load_compiled("_codec")

COMPILED: bool = _compiled is not None
_impl = _compiled if _compiled is not None else _codec_py

Decoder = _impl.Decoder
PacketSink = _impl.PacketSink
CallbackSink = _impl.CallbackSink
CountingSink = _impl.CountingSink
DEFAULT_MAX_PACKET_SIZE = _codec_py.DEFAULT_MAX_PACKET_SIZE
MAX_REMAINING_LENGTH = _codec_py.MAX_REMAINING_LENGTH
encode_connect = _impl.encode_connect
encode_connack = _impl.encode_connack
encode_publish = _impl.encode_publish
encode_publish_batch = _impl.encode_publish_batch
encode_puback = _impl.encode_puback
encode_pubrec = _impl.encode_pubrec
encode_pubrel = _impl.encode_pubrel
encode_pubcomp = _impl.encode_pubcomp
encode_subscribe = _impl.encode_subscribe
encode_suback = _impl.encode_suback
encode_unsubscribe = _impl.encode_unsubscribe
encode_unsuback = _impl.encode_unsuback
encode_pingreq = _impl.encode_pingreq
encode_pingresp = _impl.encode_pingresp
encode_disconnect = _impl.encode_disconnect


def encode_packet(packet: object) -> bytes:
    """Bytes for any packet named tuple, through the selected build's encoders."""
    return _codec_py.encode_packet(packet, _impl)


__all__ = [name for name in dir() if name.startswith("encode_")] + [
    "COMPILED",
    "DEFAULT_MAX_PACKET_SIZE",
    "MAX_REMAINING_LENGTH",
    "CallbackSink",
    "CountingSink",
    "Decoder",
    "PacketSink",
]
