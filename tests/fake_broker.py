"""A scripted MQTT 3.1.1 server for answers Mosquitto 2.0 will not give.

Mosquitto 2.0.11 grants (rather than refuses with 0x80) a subscription its
ACL denies to a 3.1.1 client, so a SUBACK failure (MQTT 3.1.1 §3.9.3) can
only be tested against a server that sends one. This one accepts CONNECT,
answers SUBSCRIBE per filter (0x80 where `refuse(filter)` holds), and
acknowledges UNSUBSCRIBE, PUBLISH (QoS 1 and 2) and PINGREQ. It routes no
messages: use the real broker for everything else.
"""

from __future__ import annotations

import asyncio
from typing import Callable

__all__ = ["FakeBroker"]


class FakeBroker:
    """``async with FakeBroker(refuse=...) as fake:`` listens on 127.0.0.1:`fake.port`."""

    host = "127.0.0.1"

    def __init__(self, *, refuse: Callable[[str], bool] = lambda topic_filter: False, connack_code: int = 0) -> None:
        self._refuse = refuse
        self._connack_code = connack_code
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        #: Every SUBSCRIBE received: a list of (filter, requested QoS).
        self.subscribes: list[list[tuple[str, int]]] = []
        #: Every UNSUBSCRIBE received: a list of filters.
        self.unsubscribes: list[list[str]] = []

    async def __aenter__(self) -> FakeBroker:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                first = (await reader.readexactly(1))[0]
                length, multiplier = 0, 1
                for _ in range(4):  # MQTT 3.1.1 §2.2.3: at most 4 length bytes
                    byte = (await reader.readexactly(1))[0]
                    length += (byte & 0x7F) * multiplier
                    multiplier *= 128
                    if not byte & 0x80:
                        break
                body = await reader.readexactly(length)
                reply = self._answer(first, body)
                if reply is None:
                    break
                if reply:
                    writer.write(reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def _answer(self, first: int, body: bytes) -> bytes | None:
        """The bytes to send back for one packet; None closes the connection."""
        kind = first >> 4
        if kind == 1:  # CONNECT -> CONNACK
            return bytes([0x20, 2, 0, self._connack_code])
        if kind == 8:  # SUBSCRIBE -> SUBACK, one code per filter
            packet_id, pos, requested = body[:2], 2, []
            while pos < len(body):
                size = int.from_bytes(body[pos : pos + 2], "big")
                requested.append((body[pos + 2 : pos + 2 + size].decode(), body[pos + 2 + size]))
                pos += 3 + size
            self.subscribes.append(requested)
            codes = bytes(0x80 if self._refuse(f) else qos for f, qos in requested)
            return bytes([0x90, 2 + len(codes)]) + packet_id + codes
        if kind == 10:  # UNSUBSCRIBE -> UNSUBACK
            pos, filters = 2, []
            while pos < len(body):
                size = int.from_bytes(body[pos : pos + 2], "big")
                filters.append(body[pos + 2 : pos + 2 + size].decode())
                pos += 2 + size
            self.unsubscribes.append(filters)
            return b"\xb0\x02" + body[:2]
        if kind == 3:  # PUBLISH -> PUBACK / PUBREC by QoS
            qos = (first >> 1) & 3
            if not qos:
                return b""
            size = int.from_bytes(body[:2], "big")
            packet_id = body[2 + size : 4 + size]
            return (b"\x40\x02" if qos == 1 else b"\x50\x02") + packet_id
        if kind == 6:  # PUBREL -> PUBCOMP
            return b"\x70\x02" + body[:2]
        if kind == 12:  # PINGREQ -> PINGRESP
            return b"\xd0\x00"
        if kind == 14:  # DISCONNECT
            return None
        return b""
