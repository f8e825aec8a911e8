"""`cascade-fast bench`: the command line end to end, and the pure pieces it is built from.

The end-to-end tests run ``python -m cascade_fast.apps.cli bench`` in a subprocess
with tiny settings against the broker it starts (a private mosquitto on a
free loopback port) and read its JSON; speed is never asserted, only that
the figures are there and consistent.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from array import array
from pathlib import Path

import pytest

import cascade_fast
from cascade_fast.apps.bench.broker import BENCH_CONFIG, start_mosquitto
from cascade_fast.apps.bench.command import parse_host_port
from cascade_fast.apps.bench.deps import MissingExtraError, require
from cascade_fast.apps.bench.measure import ProcessReport, SequenceTracker, aggregate, percentile, ratios
from cascade_fast.apps.mosquitto import mosquitto_config

from broker import needs_mosquitto

needs_bench_extra = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("rich", "matplotlib", "psutil")),
    reason="needs the [bench] extra (rich, matplotlib, psutil): pip install '.[bench]'",
)


def _fast_usable() -> bool:
    """True when FastMqttConnector imports (compiled core loaded)."""
    try:
        cascade_fast.FastMqttConnector
    except ImportError:
        return False
    return True


needs_fast = pytest.mark.skipif(not _fast_usable(), reason="compiled core not loaded: FastMqttConnector unavailable")


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``python -m cascade_fast.apps.cli ARGS`` and return the finished process (text output)."""
    return subprocess.run(
        [sys.executable, "-m", "cascade_fast.apps.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, COLUMNS="120"),
    )


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; AssertionError if the file is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR", "PNG without IHDR first"
    return struct.unpack(">II", data[16:24])


def port_is_closed(port: int) -> bool:
    """True when nothing accepts connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


# --- end to end -------------------------------------------------------------


@needs_mosquitto
@needs_bench_extra
def test_bench_python_writes_consistent_json_and_a_png(tmp_path):
    """A tiny python-only bench: every message delivered, figures present, chart is a PNG."""
    out_json, out_png, out_md = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "bench.md"
    result = run_cli(
        "bench", "--connector", "python", "--instances", "2", "--messages", "2000", "--paced-rate", "1000",
        "--paced-seconds", "1", "--json", str(out_json), "--plot", str(out_png), "--markdown", str(out_md),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.search(r"broker: mosquitto [\d.]+ on 127\.0\.0\.1:\d+ \(started by the bench\)", result.stderr)
    assert "delivered msgs/s" in result.stdout and "messages lost" in result.stdout

    doc = json.loads(out_json.read_text())
    assert doc["settings"]["instances"] == 2 and doc["settings"]["messages"] == 2000
    assert doc["broker"].startswith("mosquitto")
    assert list(doc["results"]) == ["python"]
    assert doc["ratio_fast_over_python"] is None
    r = doc["results"]["python"]
    assert r["sent"] == 2000
    assert r["delivered"] == r["expected"] == 2000
    assert r["lost"] == 0 and r["duplicates"] == 0  # loopback, QoS 0, nothing may go missing
    assert r["throughput"] > 0
    lat = r["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    assert r["observer_cpu_per_100k"] > 0 and r["publisher_cpu_per_100k"] > 0
    assert r["observer_msgs_per_cpu_s"] == pytest.approx(1e5 / r["observer_cpu_per_100k"])
    assert r["observer_peak_rss_mb"] > 5
    assert sum(r["timeline"]) * 0.25 == pytest.approx(2000)
    assert r["stats"]["observer-0"]["decode_errors"] == 0
    assert r["stats"]["publisher-0"]["published"] >= 2000  # (+ births, by implementation)
    assert any("share this machine" in note for note in doc["notes"])
    paced = r["paced"]  # the second, paced run: 1000 msgs/s for 1 s
    assert paced["rate"] == 1000 and paced["sent"] == paced["delivered"] == 1000 and paced["lost"] == 0
    assert 0 < paced["latency_ms"]["p50"] <= paced["latency_ms"]["max"]
    assert "paced at 1,000 msgs/s" in result.stdout

    md = out_md.read_text().splitlines()
    assert md[0] == "| figure | python |" and "| messages lost | 0 |" in md
    assert "| **paced at 1,000 msgs/s** | |" in md

    width, height = png_size(out_png)
    assert width > 600 and height > 300


@needs_mosquitto
@needs_fast
@needs_bench_extra
def test_bench_both_connectors_reports_the_ratio(tmp_path):
    """--connector both runs python then fast on the same workload and reports fast/python."""
    out_json = tmp_path / "bench.json"
    result = run_cli(
        "bench", "--connector", "both", "--instances", "2", "--messages", "2000",
        "--paced-rate", "1000", "--paced-seconds", "0.5", "--json", str(out_json),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    doc = json.loads(out_json.read_text())
    assert list(doc["results"]) == ["python", "fast"]
    for name in ("python", "fast"):
        r = doc["results"][name]
        assert r["sent"] == r["delivered"] == 2000, name
        assert r["lost"] == 0, name
    ratio = doc["ratio_fast_over_python"]
    fast, python = doc["results"]["fast"], doc["results"]["python"]
    assert ratio["throughput"] == pytest.approx(fast["throughput"] / python["throughput"])
    assert ratio["paced_latency_p50_ms"] == pytest.approx(fast["paced"]["latency_ms"]["p50"] / python["paced"]["latency_ms"]["p50"])
    assert "fast/python" in result.stdout


@needs_mosquitto
@needs_bench_extra
def test_bench_uses_a_given_broker_and_leaves_it_running(tmp_path):
    """--broker HOST:PORT: no broker is started, and the given one is not stopped."""
    with start_mosquitto() as broker:
        out_json = tmp_path / "bench.json"
        result = run_cli(
            "bench", "--connector", "python", "--instances", "3", "--messages", "600",
            "--broker", f"127.0.0.1:{broker.address.port}", "--paced-rate", "0", "--json", str(out_json),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "given with --broker" in result.stderr
        doc = json.loads(out_json.read_text())
        assert doc["broker"].startswith("external")
        assert doc["results"]["python"]["delivered"] == 600
        assert doc["results"]["python"]["broker_cpu_s"] is None  # not ours to measure
        assert broker.process is not None and broker.process.poll() is None
        assert not port_is_closed(broker.address.port)


@needs_bench_extra
def test_bench_unreachable_broker_fails_with_its_address():
    """--broker where nothing listens: exit 1 naming the address, no traceback, nothing run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = s.getsockname()[1]
        result = run_cli("bench", "--connector", "python", "--broker", f"127.0.0.1:{port}", timeout=30)
    assert result.returncode == 1
    assert f"cannot reach the broker at 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@needs_bench_extra
def test_bench_amqtt_fallback_broker(tmp_path):
    """--start-broker amqtt: the pure-Python broker from the [embedded] extra carries the bench."""
    pytest.importorskip("amqtt")
    out_json = tmp_path / "bench.json"
    result = run_cli(
        "bench", "--connector", "python", "--instances", "2", "--messages", "500",
        "--start-broker", "amqtt", "--paced-rate", "0", "--json", str(out_json),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.search(r"broker: amqtt [\d.]+ on 127\.0\.0\.1:\d+ \(started by the bench\)", result.stderr)
    doc = json.loads(out_json.read_text())
    assert doc["results"]["python"]["delivered"] == 500


@needs_mosquitto
@needs_bench_extra
def test_sigint_stops_the_bench_and_tears_down_its_broker():
    """Ctrl-C mid-run: exit 130, every child (clients, broker) gone, the broker's port closed."""
    psutil = pytest.importorskip("psutil")
    proc = subprocess.Popen(
        # Paced so the run is still going when SIGINT arrives.
        [sys.executable, "-m", "cascade_fast.apps.cli", "bench", "--connector", "python",
         "--instances", "4", "--messages", "100000", "--rate", "2000", "--duration", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        me = psutil.Process(proc.pid)
        deadline = time.monotonic() + 30
        children: list = []
        # Running = the broker plus an observer and a publisher process (and the resource tracker).
        while time.monotonic() < deadline:
            children = me.children(recursive=True)
            names = " ".join(" ".join(c.cmdline()) for c in children if c.is_running())
            if "mosquitto" in names and names.count("multiprocessing") >= 3:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"bench did not get going: {proc.stderr.read() if proc.poll() is not None else ''}")
        time.sleep(1.0)  # let the clients publish for a moment
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=45)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert "Traceback" not in err
    _gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"left behind: {[c.pid for c in alive]}"
    match = re.search(r"on 127\.0\.0\.1:(\d+)", err)
    assert match and port_is_closed(int(match.group(1)))


# --- command line, dependencies ------------------------------------------------


def test_import_stays_light_and_the_parser_needs_no_extra():
    """`import cascade_fast` and building the CLI parser import neither rich nor matplotlib."""
    code = (
        "import sys, cascade_fast, cascade_fast.apps.cli, cascade_fast.apps.watch, cascade_fast.apps.bench.command;"
        "cascade_fast.apps.cli.build_parser();"
        "print(sorted(m for m in ('rich', 'matplotlib', 'psutil') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_missing_extra_names_the_pip_command():
    """Without rich, `bench` exits 2 with the extra to install, not a traceback."""
    code = "import sys; sys.modules['rich'] = None; from cascade_fast.apps.cli import main; sys.exit(main(['bench']))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "pip install 'cascade-fast[bench]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_require_raises_missing_extra_error(monkeypatch):
    """require() turns a missing module into MissingExtraError naming the extra."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'cascade-fast\[bench\]'"):
        require("matplotlib", purpose="for --plot")
    assert require("json").dumps([]) == "[]"


@pytest.mark.parametrize("bad", [["--instances", "0"], ["--rate", "-1"], ["--connector", "turbo"], ["--qos", "3"]])
def test_bad_options_are_usage_errors(bad):
    """Invalid option values exit 2 with argparse's usage message."""
    result = run_cli("bench", *bad, timeout=30)
    assert result.returncode == 2
    assert "usage: cascade-fast bench" in result.stderr


@pytest.mark.parametrize(
    "text, expected",
    [("localhost:1883", ("localhost", 1883)), ("10.0.0.1:8883", ("10.0.0.1", 8883)), ("[::1]:1884", ("::1", 1884)), ("broker", ("broker", 1883))],
)
def test_parse_host_port(text, expected):
    """HOST:PORT, [IPv6]:PORT and a bare host (port 1883)."""
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text", ["host:0", "host:99999", ":1883", "host:abc"])
def test_parse_host_port_rejects(text):
    """Bad ports and empty hosts are ValueErrors naming the value."""
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_host_port(text)


def test_auto_broker_falls_back_to_amqtt_without_mosquitto(monkeypatch):
    """No mosquitto binary: start_broker('auto') starts amqtt, which accepts connections until stopped."""
    pytest.importorskip("amqtt")
    from cascade_fast.apps.bench import broker as broker_mod

    monkeypatch.setattr(broker_mod, "find_mosquitto", lambda: None)
    with broker_mod.start_broker("auto") as broker:
        assert broker.kind.startswith("amqtt") and broker.started_here
        assert not port_is_closed(broker.address.port)
    assert broker.process is None and port_is_closed(broker.address.port)
    with pytest.raises(broker_mod.BrokerError, match="mosquitto is not installed"):
        broker_mod.start_broker("mosquitto")


def test_mosquitto_config_has_what_the_measurement_relies_on():
    """The started broker: loopback listener, no duplicate deliveries, no persistence."""
    conf = mosquitto_config(12345, extra_config=BENCH_CONFIG)
    assert "listener 12345 127.0.0.1" in conf
    assert "max_queued_messages 0" in conf
    assert "allow_duplicate_messages false" in conf
    assert "persistence false" in conf
    assert "set_tcp_nodelay true" in conf


# --- measurement (pure logic) ----------------------------------------------------


def test_sequence_tracker_counts_unique_duplicates_and_out_of_range():
    """Each (source, seq) counts once; repeats are duplicates; unknown seqs are out of range."""
    t = SequenceTracker(4)
    for source, seq in [("a", 0), ("a", 1), ("a", 1), ("b", 3), ("b", 4), ("b", -1)]:
        t.seen(source, seq)
    assert t.unique_counts() == {"a": 2, "b": 1}
    assert t.duplicates == 1 and t.out_of_range == 2


def test_percentile_nearest_rank():
    """Nearest-rank percentiles; NaN for no samples."""
    values = list(range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    assert percentile(values, 0) == 1
    assert math.isnan(percentile([], 50))


def _observer_report(unique: dict[str, int], latencies_ms: list[float], first: int, last: int) -> ProcessReport:
    """An observer's report with the given per-source counts and latencies."""
    lat = array("q", [int(v * 1e6) for v in latencies_ms])
    return ProcessReport(
        "observer", 0, cpu_s=0.5, peak_rss=50 * 2**20, messages=sum(unique.values()),
        unique_per_source=unique, first_recv_ns=first, last_recv_ns=last, latencies_ns=lat.tobytes(), timeline=[4, 4],
    )  # fmt: skip


def test_aggregate_counts_losses_per_source_and_figures():
    """Lost = sent - received per source (a source never heard from counts whole); rates and CPU per 100k."""
    pub = ProcessReport("publisher", 0, cpu_s=1.0, peak_rss=40 * 2**20, messages=300, elapsed_s=2.0,
                        sent_per_source={"a": 100, "b": 100, "c": 100})  # fmt: skip
    obs = _observer_report({"a": 100, "b": 90}, [1.0, 2.0, 3.0, 4.0], first=0, last=int(2e9))
    r = aggregate("python", [pub, obs], instances=3, publish_elapsed_s=2.0, broker_cpu_s=0.25)
    assert (r.sent, r.delivered, r.expected, r.lost) == (300, 190, 300, 110)
    assert r.throughput == pytest.approx(95.0)
    assert r.publish_rate == pytest.approx(150.0)
    assert r.latency_ms["p50"] == pytest.approx(2.0) and r.latency_ms["max"] == pytest.approx(4.0)
    assert r.observer_cpu_per_100k == pytest.approx(0.5 / 190 * 1e5)
    assert r.publisher_cpu_per_100k == pytest.approx(1.0 / 300 * 1e5)
    assert r.observer_peak_rss_mb == pytest.approx(50.0)
    assert r.observer_msgs_per_cpu_s == pytest.approx(190 / 0.5)
    assert r.timeline == [16.0, 16.0]


def test_ratios_are_fast_over_python():
    """Every ratio is fast's figure divided by python's."""
    pub = ProcessReport("publisher", 0, 1.0, 0, 100, sent_per_source={"a": 100})
    slow = aggregate("python", [pub, _observer_report({"a": 100}, [4.0] * 100, 0, int(1e9))], instances=1, publish_elapsed_s=1, broker_cpu_s=None)
    fast = aggregate("fast", [pub, _observer_report({"a": 100}, [1.0] * 100, 0, int(0.25e9))], instances=1, publish_elapsed_s=1, broker_cpu_s=None)
    r = ratios(fast, slow)
    assert r["throughput"] == pytest.approx(4.0)
    assert r["latency_p50_ms"] == pytest.approx(0.25)
