"""Runs the bench: broker, one fleet per connector, figures, teardown.

The connectors run one after the other on the same broker with the same
workload (`FleetSpec`), each in fresh processes, so the figures of one cannot
include the other's warm-up, memory or leftovers. The bench process itself
only starts, watches and reads: it does no MQTT.

Ctrl-C (SIGINT): the first one stops the run in order (clients told to stop
and joined, stragglers terminated, then the broker the bench started); the
bench exits with 130. A second Ctrl-C during teardown is not needed: every
wait here is bounded.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import queue
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from .broker import Broker, BrokerAddress, BrokerError, start_broker
from .fleet import Control, FleetSpec, connector_class, observer_main, publisher_main
from .measure import ConnectorResult, ProcessReport, aggregate

#: How long clients get to connect and subscribe before the run is abandoned.
READY_TIMEOUT_S = 30.0
#: After the publishers finished: how long the observers may go without a new message before the run ends.
DRAIN_IDLE_S = 3.0
#: How long processes get to hand in their reports once stopped.
REPORT_TIMEOUT_S = 20.0
#: How often the bench reads the progress counters.
TICK_S = 0.1

Progress = Callable[[str, int, int, int], None]  # (run label, sent, received, expected)


class BenchInterrupted(Exception):
    """Ctrl-C: the run was stopped; what finished before is in `.results`."""

    def __init__(self, results: dict[str, ConnectorResult]) -> None:
        super().__init__("interrupted")
        self.results = results


class BenchError(RuntimeError):
    """A connector's run could not be completed (a client failed to connect, say)."""


@dataclass
class BenchSettings:
    """Everything the command line sets."""

    connectors: tuple[str, ...] = ("python", "fast")
    instances: int = 20
    publisher_processes: int = 1
    observers: int = 1
    messages: int = 200_000
    rate: float = 0.0
    duration: float = 20.0
    qos: int = 0
    project: str = "bench"
    #: Second run per connector, paced at this total rate (0: none; also none when `rate` is set).
    paced_rate: float = 5_000.0
    paced_seconds: float = 4.0
    broker: BrokerAddress | None = None  # None: start one
    broker_kind: str = "auto"  # which to start: auto | mosquitto | amqtt
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def runs_paced(self) -> bool:
        return self.rate == 0 and self.paced_rate > 0

    def paced_spec(self, connector: str, address: BrokerAddress, tag: str) -> FleetSpec:
        """The paced run: `paced_rate` msgs/s for `paced_seconds`, otherwise the same workload."""
        spec = self.spec(connector, address, tag)
        messages = max(spec.instances, int(self.paced_rate * self.paced_seconds))
        return replace(
            spec,
            rate=self.paced_rate,
            messages=messages,
            duration=self.paced_seconds * 2 + 5,
            phase=f"paced at {self.paced_rate:,.0f} msgs/s",
        )

    def spec(self, connector: str, address: BrokerAddress, tag: str) -> FleetSpec:
        return FleetSpec(
            connector=connector,
            address=address,
            instances=self.instances,
            publisher_processes=max(1, min(self.publisher_processes, self.instances)),
            observers=self.observers,
            messages=self.messages,
            rate=self.rate,
            duration=self.duration,
            qos=self.qos,
            project=self.project,
            tag=tag,
            phase="flat out" if not self.rate else f"at {self.rate:,.0f} msgs/s",
        )


def available_connectors(requested: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, str]]:
    """The requested connectors that can be imported, and why the others cannot."""
    ok, skipped = [], {}
    for name in requested:
        try:
            connector_class(name)
        except ImportError as exc:
            skipped[name] = str(exc)
        else:
            ok.append(name)
    return tuple(ok), skipped


class _SigintFlag:
    """Turns SIGINT into a flag the bench's loops look at (restored on exit)."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def __enter__(self) -> "_SigintFlag":
        with contextlib.suppress(ValueError):  # not the main thread: leave SIGINT alone
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class _CpuProbe:
    """CPU seconds of the broker process the bench started (psutil), or None."""

    def __init__(self, broker: Broker) -> None:
        self._proc = None
        if broker.pid is not None:
            with contextlib.suppress(Exception):
                import psutil

                self._proc = psutil.Process(broker.pid)

    def read(self) -> float | None:
        if self._proc is None:
            return None
        try:
            t = self._proc.cpu_times()
        except Exception:
            return None
        return t.user + t.system


def run_bench(
    settings: BenchSettings,
    *,
    on_broker: Callable[[Broker], None] = lambda broker: None,
    on_progress: Progress = lambda *a: None,
    on_connector_start: Callable[[str, FleetSpec], None] = lambda name, spec: None,
    failures: dict[str, str] | None = None,
) -> tuple[Broker, dict[str, ConnectorResult]]:
    """Run every connector of `settings` in turn; returns the broker used and the results by connector.

    A connector whose run fails (`BenchError`) is left out of the results
    and its error put in `failures`; the others still run. Raises
    `BenchInterrupted` on Ctrl-C, after teardown. The broker the bench
    started is stopped before this returns or raises.
    """
    failures = {} if failures is None else failures
    tag = uuid.uuid4().hex[:6]
    ctx = multiprocessing.get_context("spawn")
    results: dict[str, ConnectorResult] = {}
    with _SigintFlag() as sigint:
        if settings.broker is not None:
            _check_reachable(settings.broker)
            broker = Broker(settings.broker, "external")
        else:
            broker = start_broker(settings.broker_kind)
        try:
            on_broker(broker)
            cpu = _CpuProbe(broker)
            for name in settings.connectors:
                if sigint.raised:
                    break
                try:
                    spec = settings.spec(name, broker.address, tag)
                    on_connector_start(name, spec)
                    result = _run_one(ctx, spec, cpu, sigint, on_progress)
                    if result is None:
                        break
                    if settings.runs_paced:
                        spec = settings.paced_spec(name, broker.address, tag)
                        on_connector_start(name, spec)
                        result.paced = _run_one(ctx, spec, cpu, sigint, on_progress)
                        if result.paced is None:
                            break
                except BenchError as exc:
                    failures[name] = str(exc)
                    continue
                results[name] = result
        finally:
            broker.stop()
        if sigint.raised:
            raise BenchInterrupted(results)
    return broker, results


def _check_reachable(address: BrokerAddress, timeout: float = 5.0) -> None:
    """Fail early, with the address, when nothing accepts connections there."""
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout):
            pass
    except OSError as exc:
        raise BrokerError(f"cannot reach the broker at {address}: {exc}") from None


def _run_one(ctx: Any, spec: FleetSpec, cpu: _CpuProbe, sigint: _SigintFlag, on_progress: Progress) -> ConnectorResult | None:
    """One connector's run in fresh processes; None if interrupted before figures exist."""
    slots = spec.observers + spec.publisher_processes
    ctl = Control(ctx, slots)
    procs = [
        ctx.Process(target=observer_main, args=(spec, i, i, ctl), name=f"bench-{spec.connector}-observer-{i}", daemon=True)
        for i in range(spec.observers)
    ] + [
        ctx.Process(
            target=publisher_main,
            args=(spec, i, spec.observers + i, ctl),
            name=f"bench-{spec.connector}-publisher-{i}",
            daemon=True,
        )
        for i in range(spec.publisher_processes)
    ]
    reports: list[ProcessReport] = []
    try:
        for proc in procs:
            proc.start()
        _wait_ready(ctl, procs, spec, sigint, reports)
        broker_cpu0 = cpu.read()
        ctl.go_ns.value = time.monotonic_ns()
        ctl.go.set()
        publish_elapsed = _watch_run(ctl, procs, spec, sigint, reports, on_progress)
        broker_cpu1 = cpu.read()
    finally:
        ctl.stop.set()
        _collect(ctl, procs, reports, len(procs))
        _reap(procs)
    if sigint.raised:
        return None
    errors = [r for r in reports if r.error]
    if len(reports) < len(procs) or errors:
        detail = "; ".join(f"{r.role}-{r.index}: {r.error}" for r in errors) or "a client process did not report"
        raise BenchError(f"the {spec.label} run failed: {detail}")
    broker_cpu = broker_cpu1 - broker_cpu0 if broker_cpu0 is not None and broker_cpu1 is not None else None
    return aggregate(
        spec.connector,
        reports,
        instances=spec.instances,
        publish_elapsed_s=publish_elapsed,
        broker_cpu_s=broker_cpu,
        rate=spec.rate,
    )


def _wait_ready(ctl: Control, procs: list, spec: FleetSpec, sigint: _SigintFlag, reports: list[ProcessReport]) -> None:
    ready = 0
    deadline = time.monotonic() + READY_TIMEOUT_S
    while ready < len(procs):
        if sigint.raised:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"the {spec.label} clients did not connect within {READY_TIMEOUT_S:.0f} s")
        try:
            item = ctl.results.get(timeout=TICK_S)
        except queue.Empty:
            dead = [p.name for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise BenchError(f"client process(es) died before the start: {', '.join(dead)}") from None
            continue
        if isinstance(item, ProcessReport):  # failed before it was ready
            reports.append(item)
            raise BenchError(f"the {spec.label} run failed: {item.role}-{item.index}: {item.error}")
        ready += 1


def _watch_run(
    ctl: Control, procs: list, spec: FleetSpec, sigint: _SigintFlag, reports: list[ProcessReport], on_progress: Progress
) -> float:
    """Follow the run until every delivery arrived or stalled; returns the publishing time."""
    if sigint.raised:
        return 0.0
    t_go = time.monotonic()
    # Hard cap: publishing time + drain + slack; nothing here can run away.
    hard_deadline = t_go + spec.duration + DRAIN_IDLE_S + 30.0
    obs_slots = range(spec.observers)
    pub_slots = range(spec.observers, spec.observers + spec.publisher_processes)
    publish_elapsed = 0.0
    sent_total: int | None = None
    last_received, last_change = -1, time.monotonic()
    while not sigint.raised and time.monotonic() < hard_deadline:
        with contextlib.suppress(queue.Empty):
            while True:
                item = ctl.results.get_nowait()
                if isinstance(item, ProcessReport):
                    reports.append(item)
        pub_reports = [r for r in reports if r.role == "publisher"]
        if any(r.error for r in reports):
            break
        sent = sum(ctl.progress[i] for i in pub_slots)
        received = sum(ctl.progress[i] for i in obs_slots)
        if sent_total is None and len(pub_reports) == spec.publisher_processes:
            sent_total = sum(r.messages for r in pub_reports)
            publish_elapsed = max(r.elapsed_s for r in pub_reports)
        expected = (sent_total if sent_total is not None else spec.messages) * spec.observers
        on_progress(spec.label, sent_total if sent_total is not None else sent, received, expected)
        now = time.monotonic()
        if received != last_received:
            last_received, last_change = received, now
        if sent_total is not None:
            if received >= expected or now - last_change > DRAIN_IDLE_S:
                break
        elif all(p.exitcode not in (None, 0) for p in procs[spec.observers :]):
            break  # every publisher died without a report
        time.sleep(TICK_S)
    return publish_elapsed


def _collect(ctl: Control, procs: list, reports: list[ProcessReport], expected: int) -> None:
    """Read the reports still to come (bounded) so no child blocks on a full pipe."""
    deadline = time.monotonic() + REPORT_TIMEOUT_S
    while len(reports) < expected and time.monotonic() < deadline:
        try:
            item = ctl.results.get(timeout=TICK_S)
        except queue.Empty:
            if all(not p.is_alive() for p in procs if p.pid is not None):
                # Everyone exited; a last report may still sit in the pipe.
                with contextlib.suppress(queue.Empty):
                    while True:
                        item = ctl.results.get(timeout=0.2)
                        if isinstance(item, ProcessReport):
                            reports.append(item)
                return
            continue
        if isinstance(item, ProcessReport):
            reports.append(item)


def _reap(procs: list) -> None:
    """Join every client process; terminate, then kill, the ones that do not exit."""
    for proc in procs:
        if proc.pid is None:
            continue
        proc.join(5.0)
        if proc.is_alive():
            proc.terminate()
            proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join(2.0)


def cpu_count() -> int:
    return os.cpu_count() or 1


def finite(value: float) -> float | None:
    """JSON has no NaN: missing figures become null."""
    return None if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))) else value


__all__ = [
    "BenchError",
    "BenchInterrupted",
    "BenchSettings",
    "available_connectors",
    "run_bench",
]
