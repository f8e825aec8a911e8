"""Coverage-guided fuzzing of the MQTT 3.1.1 decoder, differential over both twins.

atheris only instruments Python code for coverage, so the pure twin
(`cascade_fast._codec_py`) is the one the fuzzer is guided by; every input
is also run through the compiled twin (`cascade_fast._codec`), and the two
must agree exactly: the same packets per feed and the same kept tail, or a
`ProtocolError` with the same message from both. Anything else is a crash:
another exception (from either twin), a disagreement, or a decoded packet
that does not survive re-encoding with the encoders and decoding again.
Each input also picks a `max_packet_size` and a chunking, and `feed_to` is
checked against `feed`.

Run it from the repository root (the compiled module in place or installed):

    PYTHONPATH=src:. python tools/fuzz_decoder.py -max_total_time=600        # a long run
    PYTHONPATH=src:. python tools/fuzz_decoder.py -max_total_time=600 corpus/ # keep the corpus
    PYTHONPATH=src:. python tools/fuzz_decoder.py crash-<sha1>                # replay a crash

Any libFuzzer flag works (-jobs, -runs, -seed, -dict...). Without a corpus
directory the run starts from a temporary one seeded with valid packets of
every type. tests/test_fuzz.py runs it for a bounded time (marker `fuzz`).

Without atheris (not installed, or Python too new for it) the same
differential check runs on hypothesis-generated raw bytes and mutated
streams for -max_total_time seconds instead, without coverage guidance.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from typing import Any

import cascade_fast.codec  # noqa: F401  (the package and its selectors, uninstrumented)
from cascade_fast._errors import ProtocolError
from cascade_fast._extensions import load_compiled

try:
    import atheris
except ImportError:  # pragma: no cover - depends on the platform
    atheris = None

if atheris is not None:
    # Re-import the pure twin under instrumentation: its branches are the
    # coverage the fuzzer steers by.
    sys.modules.pop("cascade_fast._codec_py", None)
    with atheris.instrument_imports(include=["cascade_fast._codec_py"]):
        import cascade_fast._codec_py as pure
else:
    import cascade_fast._codec_py as pure

compiled = load_compiled("_codec")

# Limits an input chooses from with its first byte.
MAX_SIZES = (pure.DEFAULT_MAX_PACKET_SIZE, 1000, 64, 2, 0)


def _encode(packet: Any) -> bytes | None:
    """Re-encode a decoded packet with the pure encoders (None: not ours to encode)."""
    if packet.type == "OVERSIZED":
        return None  # a report of a skipped PUBLISH, not a packet
    if packet.type == "CONNECT" and (packet.protocol_name != "MQTT" or packet.protocol_level != 4):
        return None  # the encoder speaks MQTT 3.1.1 only
    return pure.encode_packet(packet)


def _outcome(impl: Any, chunks: list[bytes], max_size: int) -> tuple:
    decoder = impl.Decoder(max_size)
    got = []
    try:
        for chunk in chunks:
            got.append(decoder.feed(chunk))
    except ProtocolError as exc:
        return ("error", got, str(exc))
    return ("ok", got, decoder.pending)


def _events(impl: Any, chunks: list[bytes], max_size: int) -> list[Any]:
    """What feed_to hands a sink, until the end or the first ProtocolError."""
    events: list[Any] = []
    sink = impl.CallbackSink(
        lambda *fields: events.append(("PUBLISH", *fields)), events.append, lambda *fields: events.append(("OVERSIZED", *fields))
    )
    decoder = impl.Decoder(max_size)
    try:
        for chunk in chunks:
            decoder.feed_to(chunk, sink)
    except ProtocolError:
        pass
    return events


def _as_event(packet: Any) -> Any:
    if packet.type == "PUBLISH":
        return ("PUBLISH", packet.topic, packet.payload, packet.qos, packet.retain, packet.dup, packet.packet_id or 0)
    if packet.type == "OVERSIZED":
        return ("OVERSIZED", packet.topic, packet.qos, packet.retain, packet.dup, packet.packet_id or 0, packet.size)
    return packet


def check(data: bytes) -> None:
    """The differential property for one input; raises AssertionError on a violation.

    Byte 0 picks max_packet_size, byte 1 the chunking (whole, 1 byte at a
    time, or cuts every k bytes); the rest is the stream.
    """
    if len(data) < 2:
        return
    max_size = MAX_SIZES[data[0] % len(MAX_SIZES)]
    mode = data[1]
    stream = data[2:]
    if mode < 64:
        chunks = [stream]
    elif mode < 96:
        chunks = [stream[i : i + 1] for i in range(len(stream))]
    else:
        step = mode % 29 + 1
        chunks = [stream[i : i + step] for i in range(0, len(stream), step)]
    expected = _outcome(pure, chunks, max_size)
    if compiled is not None:
        got = _outcome(compiled, chunks, max_size)
        if got != expected:
            raise AssertionError(f"twins disagree on {data!r}:\n compiled {got!r}\n pure     {expected!r}")
    # feed_to delivers what feed returns, up to the first error.
    delivered = [_as_event(p) for batch in expected[1] for p in batch]
    for impl in (pure, compiled) if compiled is not None else (pure,):
        events = _events(impl, chunks, max_size)
        if expected[0] == "ok" and events != delivered or events[: len(delivered)] != delivered:
            raise AssertionError(f"{impl.__name__} feed_to differs from feed on {data!r}")
    # Every decoded packet re-encodes to bytes that decode to it again.
    for packet in (p for batch in expected[1] for p in batch):
        wire = _encode(packet)
        if wire is not None and pure.Decoder().feed(wire) != [packet]:
            raise AssertionError(f"re-encoding {packet!r} does not round-trip")


def _seed_corpus(directory: str) -> None:
    """Valid packets of every type, alone and as one stream (chunking byte varied)."""
    samples = [
        pure.encode_connect("c", will_topic="s/c", will_payload=b"x", will_qos=1, will_retain=True, username="u", password=b"p"),
        pure.encode_connack(True, 0),
        pure.encode_publish("cascade/telemetry/o/p/r/events", b'{"v":"1.0"}'),
        pure.encode_publish("a/\u00e9", b"", 2, True, True, 7),
        pure.encode_publish("big", b"B" * 300, 1, packet_id=1),
        pure.encode_puback(1) + pure.encode_pubrec(2) + pure.encode_pubrel(3) + pure.encode_pubcomp(4),
        pure.encode_subscribe(5, [("a/+/b", 1), ("#", 2), ("$share/g/x", 0)]),
        pure.encode_suback(5, [0, 1, 2, 0x80]),
        pure.encode_unsubscribe(6, ["a/+", "b/#"]) + pure.encode_unsuback(6),
        pure.encode_pingreq() + pure.encode_pingresp() + pure.encode_disconnect(),
    ]
    for i, sample in enumerate(samples + [b"".join(samples)]):
        for mode in (0, 70, 100):
            with open(os.path.join(directory, f"seed-{i}-{mode}"), "wb") as f:
                f.write(bytes((0, mode)) + sample)


def _max_total_time(argv: list[str], default: float) -> float:
    for arg in argv:
        match = re.fullmatch(r"-max_total_time=(\d+)", arg)
        if match:
            return float(match.group(1))
    return default


def _run_hypothesis(seconds: float) -> None:
    """The fallback: the same check on generated inputs for about `seconds`."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=2000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=400))
    def raw(data: bytes) -> None:
        check(data)

    deadline = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < deadline:
        raw()
        rounds += 1
    print(f"hypothesis fallback: {rounds} rounds of 2000 inputs, no failure", file=sys.stderr)


def main() -> None:
    """Run the fuzzer (or its hypothesis fallback) with libFuzzer-style arguments."""
    print(f"fuzzing cascade_fast._codec_py; compiled twin {'checked' if compiled is not None else 'NOT loaded'}", file=sys.stderr)
    argv = list(sys.argv)
    if atheris is None:
        _run_hypothesis(_max_total_time(argv, 60.0))
        return
    if not any(os.path.exists(a) for a in argv[1:] if not a.startswith("-")):
        corpus = tempfile.mkdtemp(prefix="cascade-fuzz-")
        _seed_corpus(corpus)
        argv.append(corpus)
    atheris.Setup(argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
