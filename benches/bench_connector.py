"""Connector benchmarks: FastMqttConnector vs PyMqttConnector, same workload, same run.

Run::

    PYTHONPATH=src:. pytest -p no:cacheprovider benches/bench_connector.py --benchmark-columns=median,rounds

Each comparison is one pytest-benchmark group; a summary with messages/s
and the fast/python ratio is printed at the end of the run. Message counts
differ per connector (the reference is ~30x slower) so each leg runs about
a second; rates, not times, are what compare.

1. ingest: a replay server (benches/replay_server.py, its own process)
   answers SUBSCRIBE with N telemetry PUBLISH packets; the subscriber
   (``cascade/telemetry/+/+/+/events``) decodes every payload and calls a
   plain counting callback. The same again with a loop-lag probe beside it
   (a task sleeping 1 ms in a loop): the worst overshoot is how long the
   flood kept timers and other tasks waiting.
2. publish QoS 0 of a dict payload into a discarding sink (its own
   process); publish QoS 1 through a private Mosquitto, acknowledged
   (flush() waits for every PUBACK).
3. through Mosquitto: a raw publisher (its own process) floods a private
   Mosquitto; the connector subscribes (the fast one also with read
   coalescing off, ``read_coalesce=0``). `mosquitto_sub` does the same in the same
   run: the broker's own client is the ceiling.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")

import cascade_fast  # noqa: E402

HERE = Path(__file__).resolve().parent
REPLAY = str(HERE / "replay_server.py")
FILTER = "cascade/telemetry/+/+/+/events"
PUBLISH_TOPIC = "cascade/telemetry/org/proj1/run1/events"
PAYLOAD = {
    "v": "1.0",
    "ts": 1700000000.123456,
    "run_id": "run1",
    "org_id": "org",
    "project_id": "proj1",
    "source": "bench-host-4242",
    "body": {
        "type": "TaskStateEvent",
        "task_id": "t0000001",
        "task_name": "extract",
        "state": "COMPLETED",
        "duration_ms": 12.5,
        "error": "",
    },
}

IMPLS = ["python", "fast"]
#: Added to the launcher's configuration: no per-client queue or in-flight
#: limit (a flood must reach the subscriber, not be dropped), no logging.
MOSQUITTO_CONFIG = "max_queued_messages 0\nmax_inflight_messages 0\nlog_type none"
# Messages per round, and rounds, per connector: about a second per round.
INGEST_N = {"python": 30_000, "fast": 500_000}
PUB0_N = {"python": 30_000, "fast": 500_000}
PUB1_N = {"python": 5_000, "fast": 50_000}
FLOOD_N = {"mosquitto_sub": 100_000, "python": 20_000, "fast": 100_000, "fast-no-coalesce": 100_000}
#: The through-Mosquitto leg also runs the fast connector without read
#: coalescing (on by default; Mosquitto writes each PUBLISH on its own, see
#: FastMqttConnector's read_coalesce), to show what it buys.
NO_COALESCE = {"read_coalesce": 0.0}
ROUNDS = {"python": 2, "fast": 3}
MOSQUITTO_ROUNDS = 2


def _connector_class(impl: str) -> type:
    if impl.startswith("fast"):
        if not cascade_fast.EXTENSIONS_LOADED:
            pytest.skip("compiled core not loaded")
        from cascade_fast.connector import FastMqttConnector

        return FastMqttConnector
    from cascade.connectors.mqtt.reference import PyMqttConnector

    return PyMqttConnector


# -- result summary ------------------------------------------------------------------


class _Summary:
    """Collects messages/s per (workload, implementation); prints them with ratios."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}
        self.cpu: dict[str, dict[str, float]] = {}
        self.lag: dict[str, dict[str, float]] = {}

    def record(self, workload: str, impl: str, count: int, benchmark, cpu: "_CpuClock | None" = None) -> float:
        rate = count / benchmark.stats.stats.median
        benchmark.extra_info["messages"] = count
        benchmark.extra_info["msgs_per_s"] = round(rate)
        self.rows.setdefault(workload, {})[impl] = rate
        if cpu is not None and cpu.rounds:
            # This process's CPU time per message: what the rate would be with
            # a core to itself (the 2-core bench machine is often shared).
            per_msg = cpu.seconds / (cpu.rounds * count)
            benchmark.extra_info["cpu_ns_per_msg"] = round(per_msg * 1e9)
            self.cpu.setdefault(workload, {})[impl] = 1 / per_msg
        return rate

    def record_lag(self, workload: str, impl: str, seconds: float, benchmark) -> None:
        """The worst loop lag seen in any round, printed beside that workload's rate."""
        benchmark.extra_info["max_loop_lag_ms"] = round(seconds * 1e3, 2)
        self.lag.setdefault(workload, {})[impl] = seconds

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.rows:
            return
        tr = terminalreporter
        tr.section("cascade-fast connector benchmarks (messages/s, median round)")
        for workload, row in self.rows.items():
            cells = "  ".join(f"{impl} {rate:>12,.0f}" for impl, rate in row.items())
            ratios = []
            if "fast" in row and "python" in row:
                ratios.append(f"fast/python {row['fast'] / row['python']:.1f}x")
            for fast in ("fast", "fast-no-coalesce"):
                if fast in row and "mosquitto_sub" in row:
                    ratios.append(f"{fast}/mosquitto_sub {100 * row[fast] / row['mosquitto_sub']:.0f}%")
            tr.write_line(f"{workload:<34} {cells}  {'  '.join(ratios)}")
        if self.cpu:
            tr.write_line("per CPU-second of the benchmark process (client side only):")
            for workload, row in self.cpu.items():
                cells = "  ".join(f"{impl} {rate:>12,.0f}" for impl, rate in row.items())
                tr.write_line(f"  {workload:<32} {cells}")
        if self.lag:
            tr.write_line("max event-loop lag (worst overshoot of a 1 ms sleep, any round):")
            for workload, row in self.lag.items():
                cells = "  ".join(f"{impl} {1e3 * lag:>9.1f} ms" for impl, lag in row.items())
                tr.write_line(f"  {workload:<32} {cells}")


class _CpuClock:
    """Adds up this process's CPU time over the measured rounds."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.rounds = 0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.process_time() - start
                self.rounds += 1

        return timed


@pytest.fixture(scope="session")
def summary(request) -> _Summary:
    """The run's result table, printed in the terminal summary."""
    plugin = _Summary()
    request.config.pluginmanager.register(plugin, "cascade-fast-connector-summary")
    return plugin


# -- peers ---------------------------------------------------------------------------


def _start_peer(*args: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, REPLAY, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"replay_server {args} did not start: {line!r}")
    return proc, int(line.split()[1])


def _stop(proc: subprocess.Popen) -> None:
    try:
        proc.stdin.close()
        proc.wait(5)
    except Exception:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def replay_ports():
    """One replay server per connector (each replays that connector's N per SUBSCRIBE)."""
    procs = {impl: _start_peer("replay", "--count", str(INGEST_N[impl])) for impl in IMPLS}
    yield {impl: port for impl, (_, port) in procs.items()}
    for proc, _ in procs.values():
        _stop(proc)


@pytest.fixture(scope="module")
def sink_port():
    """A discarding MQTT peer (acks QoS 1/2, drops the rest)."""
    proc, port = _start_peer("sink")
    yield port
    _stop(proc)


@pytest.fixture(scope="module")
def mosquitto_port():
    """A private Mosquitto (the package's one launcher) on a free loopback port."""
    from cascade_fast.apps.mosquitto import Mosquitto, MosquittoNotFound

    try:
        broker = Mosquitto(extra_config=MOSQUITTO_CONFIG)
    except MosquittoNotFound:
        pytest.skip("mosquitto not installed")
    with broker:
        yield broker.port


@pytest.fixture
def loop():
    """A fresh uvloop event loop (both connectors run on the same kind of loop)."""
    try:
        import uvloop

        lp = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        lp = asyncio.new_event_loop()
    asyncio.set_event_loop(lp)
    yield lp
    asyncio.set_event_loop(None)
    lp.close()


def _counter(target: int, done: asyncio.Future):
    """A plain callback that counts and resolves `done` at `target`."""
    n = 0

    def on_message(topic, data):
        nonlocal n
        n += 1
        if n == target:
            done.set_result(n)

    return on_message


# -- 1. ingest -----------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_ingest_replay(benchmark, impl, replay_ports, loop, summary):
    """Replay server -> connector: decode each payload, call a counting callback."""
    benchmark.group = "ingest: replay -> orjson -> callback"
    _ingest(benchmark, impl, replay_ports, loop, summary, "ingest (replay server)", probe=False)


@pytest.mark.parametrize("impl", IMPLS)
def test_ingest_replay_loop_lag(benchmark, impl, replay_ports, loop, summary):
    """The ingest replay with a 1 ms lag probe running: rate and worst loop lag side by side."""
    benchmark.group = "ingest with a loop-lag probe"
    _ingest(benchmark, impl, replay_ports, loop, summary, "ingest (replay, lag probe)", probe=True)


class _LagProbe:
    """A task that sleeps 1 ms in a loop and keeps the worst overshoot.

    Under a flood that is decoded inline, the overshoot is how long one
    loop iteration's reads kept every timer and other task waiting.
    """

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def _run(self) -> None:
        clock = time.perf_counter
        while True:
            start = clock()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, clock() - start - 0.001)


def _ingest(benchmark, impl: str, replay_ports, loop, summary, workload: str, *, probe: bool) -> None:
    """Rounds of N replayed messages into a counting callback; with `probe`, the worst loop lag too."""
    cls = _connector_class(impl)
    n = INGEST_N[impl]
    conn = cls("127.0.0.1", replay_ports[impl], keepalive=60)
    loop.run_until_complete(conn.connect())
    probes: list[_LagProbe] = []

    async def one_round():
        done = loop.create_future()
        handle = await conn.subscribe(FILTER, _counter(n, done), qos=0)
        if probe:
            probes.append(_LagProbe())
            probes[-1].start()
        try:
            await asyncio.wait_for(done, 120)
        finally:
            if probe:
                await probes[-1].stop()
        await handle.unsubscribe()

    cpu = _CpuClock()
    benchmark.pedantic(cpu.wrap(lambda: loop.run_until_complete(one_round())), rounds=ROUNDS[impl], iterations=1)
    # The probe's own wakeups cost CPU: only the plain run reports CPU per message.
    summary.record(workload, impl, n, benchmark, None if probe else cpu)
    if probe:
        summary.record_lag(workload, impl, max(p.worst for p in probes), benchmark)
    assert conn.stats()["decode_errors"] == 0
    loop.run_until_complete(conn.disconnect())


# -- 2. publish ----------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_publish_qos0_sink(benchmark, impl, sink_port, loop, summary):
    """QoS 0 publishes of a dict payload (JSON-encoded by the connector) into a discarding sink."""
    cls = _connector_class(impl)
    n = PUB0_N[impl]
    conn = cls("127.0.0.1", sink_port, keepalive=60)
    loop.run_until_complete(conn.connect())

    async def one_round():
        publish = conn.publish
        for _ in range(n):
            await publish(PUBLISH_TOPIC, PAYLOAD)
        await conn.flush(60)

    benchmark.group = "publish QoS 0 -> sink"
    cpu = _CpuClock()
    benchmark.pedantic(cpu.wrap(lambda: loop.run_until_complete(one_round())), rounds=ROUNDS[impl], iterations=1)
    summary.record("publish QoS 0 (sink)", impl, n, benchmark, cpu)
    stats = conn.stats()
    assert stats["dropped"] == 0 and stats["publish_errors"] == 0
    loop.run_until_complete(conn.disconnect())


@pytest.mark.parametrize("impl", IMPLS)
def test_publish_qos1_mosquitto(benchmark, impl, mosquitto_port, loop, summary):
    """QoS 1 publishes through Mosquitto; each round ends when every PUBACK is in."""
    cls = _connector_class(impl)
    n = PUB1_N[impl]
    conn = cls("127.0.0.1", mosquitto_port, keepalive=60)
    loop.run_until_complete(conn.connect())

    async def one_round():
        publish = conn.publish
        for _ in range(n):
            await publish(PUBLISH_TOPIC, PAYLOAD, qos=1)
        await conn.flush(60)

    benchmark.group = "publish QoS 1 -> mosquitto (acked)"
    cpu = _CpuClock()
    benchmark.pedantic(cpu.wrap(lambda: loop.run_until_complete(one_round())), rounds=ROUNDS[impl], iterations=1)
    summary.record("publish QoS 1 (mosquitto, acked)", impl, n, benchmark, cpu)
    stats = conn.stats()
    assert stats["dropped"] == 0 and stats["publish_errors"] == 0
    loop.run_until_complete(conn.disconnect())


# -- 3. through Mosquitto --------------------------------------------------------------


def _start_flood(port: int, count: int) -> subprocess.Popen:
    """A raw publisher, connected and with its stream encoded, waiting for a line on stdin."""
    proc = subprocess.Popen(
        [sys.executable, REPLAY, "flood", "--port", str(port), "--count", str(count), "--wait-go"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        raise RuntimeError(f"flood publisher did not connect: {line!r}")
    return proc


def _go(proc: subprocess.Popen) -> None:
    proc.stdin.write("go\n")
    proc.stdin.flush()


@pytest.mark.parametrize("impl", ["mosquitto_sub", *IMPLS, "fast-no-coalesce"])
def test_ingest_through_mosquitto(benchmark, impl, mosquitto_port, loop, summary):
    """Raw publisher floods Mosquitto; time until the subscriber has every message."""
    n = FLOOD_N[impl]
    benchmark.group = "ingest through mosquitto (flood)"
    floods: list[subprocess.Popen] = []

    if impl == "mosquitto_sub":
        binary = shutil.which("mosquitto_sub")
        if binary is None:
            pytest.skip("mosquitto_sub not installed")

        def setup():
            flood = _start_flood(mosquitto_port, n)
            floods.append(flood)
            sub = subprocess.Popen(
                [binary, "-h", "127.0.0.1", "-p", str(mosquitto_port), "-t", FILTER, "-q", "0", "-C", str(n)],
                stdout=subprocess.DEVNULL,
            )
            time.sleep(0.5)  # mosquitto_sub says nothing when subscribed; loopback SUBACK takes << 0.5 s
            return (flood, sub), {}

        def target(flood, sub):
            _go(flood)
            sub.wait(120)

    else:
        cls = _connector_class(impl)
        conn = cls("127.0.0.1", mosquitto_port, keepalive=60, **(NO_COALESCE if impl == "fast-no-coalesce" else {}))
        loop.run_until_complete(conn.connect())
        state: dict = {}

        def setup():
            flood = _start_flood(mosquitto_port, n)
            floods.append(flood)
            done = loop.create_future()
            state["handle"] = loop.run_until_complete(conn.subscribe(FILTER, _counter(n, done), qos=0))
            return (flood, done), {}

        def target(flood, done):
            _go(flood)
            loop.run_until_complete(asyncio.wait_for(done, 120))
            loop.run_until_complete(state.pop("handle").unsubscribe())

    cpu = _CpuClock()
    try:
        benchmark.pedantic(cpu.wrap(target), setup=setup, rounds=MOSQUITTO_ROUNDS, iterations=1)
    finally:
        for flood in floods:
            flood.wait(30)
        if impl != "mosquitto_sub":
            loop.run_until_complete(conn.disconnect())
    if impl != "mosquitto_sub":
        benchmark.extra_info["reads"] = conn.stats().get("reads")
    summary.record("ingest through mosquitto", impl, n, benchmark, None if impl == "mosquitto_sub" else cpu)
