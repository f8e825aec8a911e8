"""MQTT 3.1.1 control packets as named tuples, shared by both codec twins.

`Decoder.feed` returns these; the first field of each is ``type``, the packet
type's name as the spec spells it (``"PUBLISH"``, ``"CONNACK"``, ...), so a
packet can be dispatched on ``packet.type`` without `isinstance` and two
packets of different types never compare equal. The other fields use the
spec's names (MQTT 3.1.1 §3.x).

They are plain tuple subclasses (no ``__dict__``): the compiled decoder
allocates them with the type's ``tp_alloc`` and fills the slots directly,
which is why the field order here is part of the compiled build's contract.
Change a field and rebuild ``cascade_fast/_codec.pyx``.
"""

from __future__ import annotations

from typing import NamedTuple


class Connect(NamedTuple):
    """CONNECT (MQTT 3.1.1 §3.1). Will fields are None/0/False without a Will."""

    type: str
    client_id: str
    clean_session: bool
    keepalive: int
    will_topic: str | None
    will_payload: bytes | None
    will_qos: int
    will_retain: bool
    username: str | None
    password: bytes | None
    protocol_name: str = "MQTT"
    protocol_level: int = 4


class Connack(NamedTuple):
    """CONNACK (§3.2): ``return_code`` 0 accepts, 1-5 refuse (Table 3.1)."""

    type: str
    session_present: bool
    return_code: int


class Publish(NamedTuple):
    """PUBLISH (§3.3). ``packet_id`` is None at QoS 0; ``payload`` is bytes."""

    type: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None


class Puback(NamedTuple):
    """PUBACK (§3.4): QoS 1 acknowledgement."""

    type: str
    packet_id: int


class Pubrec(NamedTuple):
    """PUBREC (§3.5): QoS 2, part 1."""

    type: str
    packet_id: int


class Pubrel(NamedTuple):
    """PUBREL (§3.6): QoS 2, part 2."""

    type: str
    packet_id: int


class Pubcomp(NamedTuple):
    """PUBCOMP (§3.7): QoS 2, part 3."""

    type: str
    packet_id: int


class Subscribe(NamedTuple):
    """SUBSCRIBE (§3.8): ``topics`` is a tuple of ``(topic_filter, qos)``."""

    type: str
    packet_id: int
    topics: tuple[tuple[str, int], ...]


class Suback(NamedTuple):
    """SUBACK (§3.9): one return code per filter, 0x80 for a failure."""

    type: str
    packet_id: int
    return_codes: tuple[int, ...]


class Unsubscribe(NamedTuple):
    """UNSUBSCRIBE (§3.10): ``topics`` is a tuple of topic filters."""

    type: str
    packet_id: int
    topics: tuple[str, ...]


class Unsuback(NamedTuple):
    """UNSUBACK (§3.11)."""

    type: str
    packet_id: int


class Pingreq(NamedTuple):
    """PINGREQ (§3.12)."""

    type: str


class Pingresp(NamedTuple):
    """PINGRESP (§3.13)."""

    type: str


class Disconnect(NamedTuple):
    """DISCONNECT (§3.14)."""

    type: str


class Oversized(NamedTuple):
    """A PUBLISH whose remaining length exceeded the decoder's ``max_packet_size``.

    Not an MQTT packet type: the decoder's report that it skipped one. It
    read the variable header (topic, and ``packet_id`` at QoS > 0, None at
    QoS 0, as in `Publish`) and discarded the payload as it arrived, so the
    receiver can still acknowledge and count the message without the
    connection paying for it. ``size`` is the remaining length announced.
    """

    type: str
    topic: str
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None
    size: int


#: MQTT 3.1.1 §2.2.1, Table 2.1: control packet type value -> name.
PACKET_TYPES: dict[int, str] = {
    1: "CONNECT",
    2: "CONNACK",
    3: "PUBLISH",
    4: "PUBACK",
    5: "PUBREC",
    6: "PUBREL",
    7: "PUBCOMP",
    8: "SUBSCRIBE",
    9: "SUBACK",
    10: "UNSUBSCRIBE",
    11: "UNSUBACK",
    12: "PINGREQ",
    13: "PINGRESP",
    14: "DISCONNECT",
}

Packet = (
    Connect
    | Connack
    | Publish
    | Puback
    | Pubrec
    | Pubrel
    | Pubcomp
    | Subscribe
    | Suback
    | Unsubscribe
    | Unsuback
    | Pingreq
    | Pingresp
    | Disconnect
    | Oversized
)

# The packets without a variable part are immutable and equal to any other
# instance, so the decoders hand out these singletons.
PINGREQ = Pingreq("PINGREQ")
PINGRESP = Pingresp("PINGRESP")
DISCONNECT = Disconnect("DISCONNECT")

__all__ = [
    "DISCONNECT",
    "PACKET_TYPES",
    "PINGREQ",
    "PINGRESP",
    "Connack",
    "Connect",
    "Disconnect",
    "Oversized",
    "Packet",
    "Pingreq",
    "Pingresp",
    "Puback",
    "Pubcomp",
    "Publish",
    "Pubrec",
    "Pubrel",
    "Suback",
    "Subscribe",
    "Unsuback",
    "Unsubscribe",
]
