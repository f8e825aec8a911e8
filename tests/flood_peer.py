"""A scripted MQTT peer that floods packets the client must answer (its own process).

    python tests/flood_peer.py KIND [--cycles N] [--reads]

KIND is ``qos1-publish``, ``qos2-publish`` or ``pubrel``: after the
client's SUBSCRIBE it sends N x 65535 such packets (packet ids 1..65535,
repeated). Without ``--reads`` it reads nothing more until a line arrives
on stdin, so the client's answers (PUBACK, PUBREC, PUBCOMP) back up. Once
reading, it counts the answers and prints ``ANSWERED <n>`` when every
flood packet has had one; it acknowledges the client's own QoS 1 publishes
(presence) once the flood is sent. Prints ``PORT <n>`` when listening;
exits when stdin closes.

A process of its own, not a thread: a thread decoding answers would hold
the GIL the client's event loop needs, and its memory would count as ours.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading

# Imported by the tests too: never put the source tree on sys.path here, or
# every later subprocess would import the sources instead of the build.
from cascade_fast import codec as wire

#: The answer each flood packet gets (MQTT 3.1.1 §4.3).
ANSWER = {"qos1-publish": "PUBACK", "qos2-publish": "PUBREC", "pubrel": "PUBCOMP"}
IDS = range(1, 65536)


def flood(kind: str, cycles: int) -> bytes:
    """`cycles` x 65535 packets of `kind`."""
    if kind == "pubrel":
        one = b"".join(wire.encode_pubrel(i) for i in IDS)
    else:
        qos = 1 if kind == "qos1-publish" else 2
        one = b"".join(wire.encode_publish("f/x", b"1", qos, False, False, i) for i in IDS)
    return one * cycles


def handshake(conn: socket.socket, decoder, granted_qos: int = 1) -> bool:
    """Answer CONNECT and the client's QoS 1 publishes until its SUBSCRIBE; False if it left first."""
    while True:
        data = conn.recv(65536)
        if not data:
            return False
        for packet in decoder.feed(data):
            if packet.type == "CONNECT":
                conn.sendall(wire.encode_connack(False, 0))
            elif packet.type == "PUBLISH" and packet.qos == 1:
                conn.sendall(wire.encode_puback(packet.packet_id))
            elif packet.type == "SUBSCRIBE":
                conn.sendall(wire.encode_suback(packet.packet_id, [granted_qos]))
                return True


def count_answers(conn: socket.socket, decoder, answer: str, total: int, reading: threading.Event, sent: threading.Event) -> None:
    reading.wait()
    answers = 0
    try:
        while data := conn.recv(1 << 20):
            for packet in decoder.feed(data):
                if packet.type == answer:
                    answers += 1
                    if answers == total:
                        print(f"ANSWERED {answers}", flush=True)
                elif packet.type == "PUBLISH" and packet.qos == 1 and sent.is_set():
                    conn.sendall(wire.encode_puback(packet.packet_id))
    except OSError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=sorted(ANSWER))
    parser.add_argument("--cycles", type=int, default=31)
    parser.add_argument("--reads", action="store_true", help="read (and count answers) from the start")
    args = parser.parse_args()
    blob = flood(args.kind, args.cycles)
    listener = socket.create_server(("127.0.0.1", 0))
    # Inherited by the accepted socket: the client's answers back up after a few KiB.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    print(f"PORT {listener.getsockname()[1]}", flush=True)
    reading = threading.Event()
    sent = threading.Event()
    if args.reads:
        reading.set()

    def on_stdin() -> None:
        if sys.stdin.readline():
            reading.set()
            sys.stdin.read()
        os._exit(0)

    threading.Thread(target=on_stdin, daemon=True).start()
    conn, _ = listener.accept()
    decoder = wire.Decoder()
    if not handshake(conn, decoder):
        raise SystemExit("client left during the handshake")
    total = len(IDS) * args.cycles
    threading.Thread(target=count_answers, args=(conn, decoder, ANSWER[args.kind], total, reading, sent), daemon=True).start()
    try:
        conn.sendall(blob)
    except OSError:
        return
    sent.set()
    threading.Event().wait()  # until stdin closes


if __name__ == "__main__":
    main()
