"""Decoder benchmark: compiled vs pure twin, same stream, same run.

The workload of DESIGN.md's observer: a pre-encoded stream of 100,000
telemetry PUBLISH packets (topics ``cascade/telemetry/org/proj{i%10}/run{i%1000}/events``,
JSON payloads of about 200 bytes), fed to one `Decoder` in 64 KiB chunks.

    PYTHONPATH=src:. pytest benches/bench_codec.py --benchmark-group-by=group -p no:cacheprovider

Groups, each printed side by side:

* ``decode feed()``: packets as named tuples (the public API);
* ``decode feed_to()``: a trivial sink counting packets, the protocol's path
  (no tuple per PUBLISH; the compiled sink is C-level as in _protocol.pyx);
* ``encode_publish_batch``: the same 100k messages encoded into one buffer.

A summary with packets/s and the compiled/pure ratios is printed at the end
(targets on the 2-core reference machine: compiled feed() >= 3M packets/s
and >= 10x the pure twin). Takes about a minute.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from cascade_fast import _codec_py
from cascade_fast._extensions import load_compiled

_compiled = load_compiled("_codec")

N_PACKETS = 100_000
CHUNK = 64 * 1024
TWINS = [pytest.param(_compiled, id="compiled"), pytest.param(_codec_py, id="pure")]

# Best seconds per (group, twin), for the summary.
_results: dict[tuple[str, str], float] = {}


def _telemetry_items() -> list[tuple[str, bytes, int, bool, None]]:
    """100k telemetry messages shaped like Cascade's TaskStateEvent (about 200-byte payloads)."""
    items = []
    for i in range(N_PACKETS):
        run = f"run{i % 1000}"
        project = f"proj{i % 10}"
        body = {
            "v": "1.0",
            "ts": 1764000000.0 + i / 1000,
            "run_id": run,
            "org_id": "org",
            "project_id": project,
            "source": "host-4242",
            "body": {"type": "TaskStateEvent", "task_id": f"t{i}", "state": "COMPLETED", "duration_ms": 12.5},
        }
        payload = json.dumps(body, separators=(",", ":")).encode()
        items.append((f"cascade/telemetry/org/{project}/{run}/events", payload, 0, False, None))
    return items


@pytest.fixture(scope="module")
def items() -> list[tuple[str, bytes, int, bool, None]]:
    """The 100k messages to encode and decode."""
    return _telemetry_items()


@pytest.fixture(scope="module")
def stream(items: list[Any]) -> bytes:
    """The pre-encoded stream (the pure twin's bytes)."""
    return _codec_py.encode_publish_batch(items)


@pytest.fixture(scope="module")
def chunks(stream: bytes) -> list[bytes]:
    """The stream cut into 64 KiB chunks (packets straddle the cuts)."""
    return [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)]


@pytest.fixture(scope="module", autouse=True)
def summary(request: pytest.FixtureRequest) -> Any:
    """Print packets/s and compiled/pure ratios once the module's benchmarks ran."""
    yield
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is None or capture is None or not _results:
        return
    lines = ["", f"codec summary ({N_PACKETS:,} PUBLISH packets, best round):"]
    for group in ("decode feed()", "decode feed_to()", "encode_publish_batch"):
        rates = {twin: N_PACKETS / secs for (g, twin), secs in _results.items() if g == group}
        if not rates:
            continue
        line = "  " + group.ljust(22) + "  ".join(f"{twin} {rate / 1e6:6.2f} M packets/s" for twin, rate in rates.items())
        if "compiled" in rates and "pure" in rates:
            line += f"  ratio {rates['compiled'] / rates['pure']:.1f}x"
        lines.append(line)
    with capture.global_and_fixture_disabled():
        for line in lines:
            reporter.write_line(line)


def _need(impl: Any) -> None:
    if impl is None:
        pytest.skip("compiled codec not loaded")


def _record(benchmark: Any, group: str, impl: Any) -> None:
    twin = "compiled" if impl is _compiled else "pure"
    best = benchmark.stats.stats.min
    _results[(group, twin)] = best
    benchmark.extra_info["packets_per_s"] = round(N_PACKETS / best)


@pytest.mark.benchmark(group="decode feed()")
@pytest.mark.parametrize("impl", TWINS)
def test_decode_feed(benchmark: Any, impl: Any, chunks: list[bytes]) -> None:
    """feed() over the 64 KiB chunks: every packet returned as a Publish tuple."""
    _need(impl)

    def run() -> int:
        decoder = impl.Decoder()
        count = 0
        for chunk in chunks:
            count += len(decoder.feed(chunk))
        return count

    rounds = 30 if impl is _compiled else 5
    assert benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1) == N_PACKETS
    _record(benchmark, "decode feed()", impl)


@pytest.mark.benchmark(group="decode feed_to()")
@pytest.mark.parametrize("impl", TWINS)
def test_decode_feed_to(benchmark: Any, impl: Any, chunks: list[bytes]) -> None:
    """feed_to() into a counting sink: the protocol's path, no tuple per PUBLISH."""
    _need(impl)

    def run() -> int:
        decoder = impl.Decoder()
        sink = impl.CountingSink()
        for chunk in chunks:
            decoder.feed_to(chunk, sink)
        return sink.publishes

    rounds = 30 if impl is _compiled else 5
    assert benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1) == N_PACKETS
    _record(benchmark, "decode feed_to()", impl)


@pytest.mark.benchmark(group="encode_publish_batch")
@pytest.mark.parametrize("impl", TWINS)
def test_encode_publish_batch(benchmark: Any, impl: Any, items: list[Any], stream: bytes) -> None:
    """The 100k messages encoded into one buffer (publish_many's path)."""
    _need(impl)
    rounds = 30 if impl is _compiled else 5
    out = benchmark.pedantic(impl.encode_publish_batch, args=(items,), rounds=rounds, iterations=1, warmup_rounds=1)
    assert out == stream
    _record(benchmark, "encode_publish_batch", impl)
