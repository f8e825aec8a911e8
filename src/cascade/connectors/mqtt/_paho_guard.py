"""Checks every packet paho reads against MQTT 3.1.1 before paho acts on it.

paho parses leniently: it delivers a PUBLISH whose topic holds U+0000 or a
wildcard, ignores wrong fixed-header flags and packet id 0, accepts a
second CONNACK and a SUBACK without return codes, answers a refused CONNACK
(return code 1) by trying MQTT 3.1, and raises from deep inside its read
loop on an ill-formed UTF-8 topic. The reference connector must close the
connection on all of them, as the fast one does (MQTT 3.1.1 §4.8), so each
complete packet paho read is run through the project's own decoder
(`cascade_fast.codec.Decoder`: one set of rules for both connectors) and
the client-side session rules below before paho handles it; a violation
makes paho drop the connection and the connector's supervisor reconnects.

The hooks are instance attributes over paho internals (paho-mqtt 2.2, see
`PAHO_INTERNALS`); `require_paho_internals` fails loudly, naming what is
missing, when a paho upgrade removes one.

Session rules, client side (MQTT 3.1.1 §3.2, §3.9, §3.11):

- the first packet from the broker is CONNACK, and there is only one;
- a broker never sends CONNECT, SUBSCRIBE, UNSUBSCRIBE, PINGREQ or DISCONNECT;
- a SUBACK answers a SUBSCRIBE with one return code per filter, an UNSUBACK
  an UNSUBSCRIBE; an acknowledgement for an id nobody awaits is ignored (a
  re-sent or forgotten one), as paho and the fast connector do.
"""

from __future__ import annotations

from typing import Any, Callable

import paho.mqtt.client as paho

from cascade_fast import codec
from cascade_fast._errors import ProtocolError

__all__ = ["PAHO_INTERNALS", "PacketGuard", "require_paho_internals"]

#: What the guard uses of paho beyond its public API (paho-mqtt 2.2.0):
#: the methods it wraps per instance, and the keys of ``Client._in_packet``
#: it reads (the bytes of the packet being read: first byte, remaining
#: length bytes as received, body, and whether the body is still incomplete).
PAHO_INTERNALS = ("_packet_read", "_packet_handle", "_in_packet", "_sock_close")
IN_PACKET_KEYS = ("command", "remaining_count", "have_remaining", "to_process", "packet")

#: Packets only a client sends (MQTT 3.1.1 §2.2.1: DISCONNECT is
#: client-to-server in 3.1.1).
_CLIENT_ONLY = frozenset({"CONNECT", "SUBSCRIBE", "UNSUBSCRIBE", "PINGREQ", "DISCONNECT"})


def require_paho_internals(client: paho.Client) -> None:
    """Raise RuntimeError naming the paho internals this paho version lacks."""
    missing = [name for name in PAHO_INTERNALS if not hasattr(client, name)]
    in_packet = getattr(client, "_in_packet", None)
    if isinstance(in_packet, dict):
        missing += [f"_in_packet[{key!r}]" for key in IN_PACKET_KEYS if key not in in_packet]
    if missing:
        version = getattr(paho, "__version__", None) or _paho_version()
        raise RuntimeError(
            f"paho-mqtt {version} lacks {', '.join(missing)}, which the reference connector's "
            "packet validation hooks (cascade/connectors/mqtt/_paho_guard.py); pin paho-mqtt 2.2"
        )


def _paho_version() -> str:
    from importlib.metadata import version

    return version("paho-mqtt")


class PacketGuard:
    """Installed on one paho client (one connection): validates what it reads.

    `on_error` is called once, with the `ProtocolError`, for the first
    violation; paho then closes the socket and reports the disconnection.
    `return_code` is the CONNACK return code once one arrived (a refusal is
    not a protocol error: the connector raises `ConnectRefusedError`).
    """

    __slots__ = ("_client", "_max", "_decoder", "_handle", "_read", "_subscribe", "_unsubscribe",
                 "_on_error", "_acks", "return_code", "error")

    def __init__(self, client: paho.Client, max_packet_size: int, on_error: Callable[[ProtocolError], None]) -> None:
        require_paho_internals(client)
        self._client = client
        self._max = max_packet_size
        # One decoder per connection: it sees every packet once, whole.
        self._decoder = codec.Decoder(max_packet_size)
        self._on_error = on_error
        # SUBSCRIBE/UNSUBSCRIBE packet id -> number of filters (0: UNSUBSCRIBE).
        self._acks: dict[int, int] = {}
        self.return_code: int | None = None
        self.error: ProtocolError | None = None
        # Instance attributes shadow the methods paho calls on itself.
        self._read = client._packet_read
        self._handle = client._packet_handle
        self._subscribe = client.subscribe
        self._unsubscribe = client.unsubscribe
        client._packet_read = self._packet_read
        client._packet_handle = self._packet_handle
        client.subscribe = self._track_subscribe
        client.unsubscribe = self._track_unsubscribe

    # ------------------------------------------------------------ paho hooks

    def _packet_read(self) -> int:
        """paho's read step, plus the checks a fixed header allows before its body is buffered."""
        rc = self._read()
        if self.error is not None:
            return rc
        in_packet = self._client._in_packet
        if rc == paho.MQTT_ERR_PROTOCOL:
            # paho refused on its own (a remaining length of more than 4
            # bytes): count it like ours, with the decoder's reason.
            return self._fail(self._header_error(in_packet) or ProtocolError("malformed fixed header"))
        if in_packet["have_remaining"] and in_packet["to_process"]:
            # A body still on its way: refuse an oversized or ill-flagged
            # packet now, not after buffering up to 256 MiB of it.
            error = self._header_error(in_packet)
            if error is not None:
                return self._fail(error)
        return rc

    def _packet_handle(self) -> int:
        """Validate the complete packet paho read; hand it to paho only when it is valid."""
        in_packet = self._client._in_packet
        data = bytes((in_packet["command"], *in_packet["remaining_count"])) + in_packet["packet"]
        try:
            packets = self._decoder.feed(data)
            if len(packets) != 1:  # pragma: no cover - paho frames packets as the decoder does
                raise ProtocolError(f"paho framed {len(packets)} packets as one")
            self._check_session(packets[0])
        except ProtocolError as exc:
            return self._fail(exc)
        if self.return_code:
            # Refused: close at once (paho would retry with MQTT 3.1 on
            # return code 1; the connector speaks 3.1.1 only).
            return paho.MQTT_ERR_CONN_REFUSED
        rc = self._handle()
        if rc == paho.MQTT_ERR_PROTOCOL:
            # Valid to the decoder, refused by paho: still a protocol error.
            return self._fail(ProtocolError(f"paho refused a {packets[0].type} packet"))
        return rc

    def _track_subscribe(self, topic: Any, *args: Any, **kwargs: Any) -> tuple[int, int | None]:
        result, mid = self._subscribe(topic, *args, **kwargs)
        if result == paho.MQTT_ERR_SUCCESS and mid is not None:
            self._acks[mid] = len(topic) if isinstance(topic, list) else 1
        return result, mid

    def _track_unsubscribe(self, topic: Any, *args: Any, **kwargs: Any) -> tuple[int, int | None]:
        result, mid = self._unsubscribe(topic, *args, **kwargs)
        if result == paho.MQTT_ERR_SUCCESS and mid is not None:
            self._acks[mid] = 0
        return result, mid

    # ----------------------------------------------------------------- rules

    def _check_session(self, packet: Any) -> None:
        """The client-side session rules of the module docstring."""
        kind = packet.type
        if kind == "CONNACK":
            if self.return_code is not None:
                raise ProtocolError("unexpected second CONNACK (MQTT 3.1.1 §3.2)")
            self.return_code = packet.return_code
        elif self.return_code is None:
            raise ProtocolError(f"{kind} received before CONNACK (MQTT 3.1.1 §3.2)")
        elif kind in _CLIENT_ONLY:
            raise ProtocolError(f"unexpected {kind} packet from the broker")
        elif kind == "SUBACK" or kind == "UNSUBACK":
            filters = self._acks.pop(packet.packet_id, None)
            if filters is None:
                return
            if (kind == "SUBACK") != (filters > 0):
                other = "UNSUBSCRIBE" if kind == "SUBACK" else "SUBSCRIBE"
                raise ProtocolError(f"{kind} for packet id {packet.packet_id}, which is an {other} (MQTT 3.1.1 §3.9, §3.11)")
            if kind == "SUBACK" and len(packet.return_codes) != filters:
                raise ProtocolError(
                    f"SUBACK with {len(packet.return_codes)} return codes for {filters} topic filters (MQTT 3.1.1 §3.9.3)"
                )

    def _header_error(self, in_packet: dict[str, Any]) -> ProtocolError | None:
        """The decoder's verdict on the fixed header read so far, or None when it is fine."""
        header = bytes((in_packet["command"], *in_packet["remaining_count"]))
        try:
            codec.Decoder(self._max).feed(header)
        except ProtocolError as exc:
            return exc
        remaining = sum((byte & 0x7F) << (7 * i) for i, byte in enumerate(in_packet["remaining_count"]))
        if remaining > self._max:
            # The codec skips an oversized PUBLISH; paho cannot (it buffers
            # every packet whole), so here any packet over the limit is refused.
            return ProtocolError(f"remaining length {remaining} exceeds max_packet_size {self._max}")
        return None

    def _fail(self, error: ProtocolError) -> int:
        """Record the first violation and return the code that makes paho close the connection."""
        if self.error is None:
            self.error = error
            self._on_error(error)
        return paho.MQTT_ERR_PROTOCOL
