"""Loopback MQTT peers for the connector benchmarks, each run in a process of its own.

``replay``: a minimal MQTT 3.1.1 "broker" that answers CONNECT with CONNACK,
and every SUBSCRIBE with SUBACK followed by N pre-encoded telemetry PUBLISH
packets (QoS 0, ~200-byte JSON, topics
``cascade/telemetry/org/proj{i%10}/run{i%1000}/events``), written as fast as
the client reads them. Measuring ingest against it measures the client only:
no broker logic, no fan-out, nothing the client does not pay for too.

``sink``: answers CONNECT, acknowledges QoS 1/2 PUBLISH and PINGREQ, and
discards everything else, for the publish benchmark.

``flood``: a raw publisher for the through-Mosquitto benchmark: connects to
a broker, sends N pre-encoded QoS 0 PUBLISH packets as fast as the broker
reads, disconnects.

Usage (the bench starts these itself)::

    python benches/replay_server.py replay --count 500000
    python benches/replay_server.py sink
    python benches/replay_server.py flood --port 1883 --count 500000

``replay`` and ``sink`` print ``PORT <n>`` on stdout once listening and run
until killed (or stdin closes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import threading
import time

# Run from a source tree or an installed package alike.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cascade_fast.codec import (  # noqa: E402
    Decoder,
    encode_connack,
    encode_connect,
    encode_disconnect,
    encode_puback,
    encode_pubcomp,
    encode_pubrec,
    encode_publish,
    encode_suback,
    encode_unsuback,
)

TELEMETRY_FILTER = "cascade/telemetry/+/+/+/events"


def telemetry_topic(i: int) -> str:
    """The topic of the i-th replayed message (10 projects x 1000 runs)."""
    return f"cascade/telemetry/org/proj{i % 10}/run{i % 1000}/events"


def telemetry_payload(i: int) -> bytes:
    """A Cascade TaskStateEvent, about 200 bytes of JSON."""
    return (
        '{"v":"1.0","ts":%d.%06d,"run_id":"run%d","org_id":"org","project_id":"proj%d",'
        '"source":"bench-host-4242","body":{"type":"TaskStateEvent","task_id":"t%07d",'
        '"task_name":"extract","state":"COMPLETED","duration_ms":12.5,"error":""}}'
        % (1700000000 + i // 1000, i % 1000000, i % 1000, i % 10, i)
    ).encode()


def telemetry_stream(count: int) -> bytes:
    """`count` pre-encoded QoS 0 PUBLISH packets, back to back."""
    return b"".join(encode_publish(telemetry_topic(i), telemetry_payload(i)) for i in range(count))


class _Peer(asyncio.Protocol):
    """Server side of one client connection: answers the handshake and acks."""

    def __init__(self, stream: bytes | None) -> None:
        self.stream = stream
        self.decoder = Decoder()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        out = []
        for packet in self.decoder.feed(data):
            kind = packet[0]
            if kind == "PUBLISH":
                if packet.qos == 1:
                    out.append(encode_puback(packet.packet_id))
                elif packet.qos == 2:
                    out.append(encode_pubrec(packet.packet_id))
            elif kind == "CONNECT":
                out.append(encode_connack(False, 0))
            elif kind == "PUBREL":
                out.append(encode_pubcomp(packet.packet_id))
            elif kind == "SUBSCRIBE":
                out.append(encode_suback(packet.packet_id, [0] * len(packet.topics)))
                if self.stream is not None:
                    # The stream goes out as is, never joined with the rest:
                    # copying its ~150 MB first would hold back the client's
                    # first byte by tens of milliseconds, charged to the client.
                    self.transport.write(b"".join(out))
                    self.transport.write(self.stream)
                    out = []
            elif kind == "UNSUBSCRIBE":
                out.append(encode_unsuback(packet.packet_id))
            elif kind == "PINGREQ":
                out.append(b"\xd0\x00")
            elif kind == "DISCONNECT":
                self.transport.close()
                return
        if out:
            self.transport.write(b"".join(out))


class _Sink(_Peer):
    """`_Peer` that skips QoS 0 PUBLISH packets by their fixed header alone.

    A publish benchmark pushes a million packets a second through here;
    decoding each into a tuple would make the sink, not the client, the
    bottleneck. Only other packets (handshake, QoS 1/2, PINGREQ,
    DISCONNECT: a few per run) go through the decoder to be answered.
    """

    def __init__(self) -> None:
        super().__init__(None)
        self.tail = b""

    def data_received(self, data: bytes) -> None:
        buf = self.tail + data if self.tail else data
        n = len(buf)
        i = 0
        other = []
        while i + 2 <= n:
            # MQTT 3.1.1 §2.2.3: remaining length, 1 to 4 bytes of 7 bits.
            j = i + 1
            rem = 0
            shift = 0
            while j < n:
                byte = buf[j]
                j += 1
                rem |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
            else:
                break  # length incomplete
            end = j + rem
            if end > n:
                break
            if buf[i] != 0x30:  # anything but a plain QoS 0 PUBLISH
                other.append(buf[i:end])
            i = end
        self.tail = buf[i:]
        if other:
            super().data_received(b"".join(other))


async def _serve(stream: bytes | None, sink: bool = False) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Sink if sink else (lambda: _Peer(stream)), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)
    # Exit when the parent goes away (it holds our stdin).
    done = loop.create_future()
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(done.set_result, None)), daemon=True).start()
    await done
    server.close()


def flood(host: str, port: int, count: int, wait_go: bool = False) -> float:
    """Publish `count` telemetry messages at QoS 0 through a broker; returns seconds spent writing.

    With `wait_go`, prints ``READY`` once connected (the stream is encoded
    by then) and starts on a line from stdin, so the caller times only the flood.
    """
    blob = telemetry_stream(count)
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(encode_connect(f"flood-{os.getpid()}", keepalive=0))
    connack = sock.recv(4)
    if connack[:1] != b"\x20":
        raise SystemExit(f"flood: no CONNACK ({connack!r})")
    if wait_go:
        print("READY", flush=True)
        sys.stdin.readline()
    start = time.perf_counter()
    view = memoryview(blob)
    for i in range(0, len(blob), 1 << 20):
        sock.sendall(view[i : i + (1 << 20)])
    sock.sendall(encode_disconnect())
    elapsed = time.perf_counter() - start
    sock.close()
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("replay", "sink", "flood"))
    parser.add_argument("--count", type=int, default=100_000, help="messages per SUBSCRIBE (replay) or in total (flood)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883, help="broker port (flood)")
    parser.add_argument("--wait-go", action="store_true", help="flood: print READY, start on a line from stdin")
    args = parser.parse_args(argv)
    if args.mode == "flood":
        elapsed = flood(args.host, args.port, args.count, args.wait_go)
        print(f"FLOOD {args.count} {elapsed:.6f}", flush=True)
        return
    stream = telemetry_stream(args.count) if args.mode == "replay" else None
    main_coro = _serve(stream, sink=args.mode == "sink")
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main_coro)
    else:
        uvloop.run(main_coro)


if __name__ == "__main__":
    main()
