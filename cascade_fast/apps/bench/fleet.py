"""The simulated Cascade fleet: publisher and observer processes.

A publisher process runs several fleet instances as tasks on one event loop
(2 cores do not fit dozens of processes); each instance is a connector of its
own, with its own source id, hence its own Last Will and birth message on
``cascade/status/{source_id}``, subscribed to ``cascade/constraints/#`` as a
Cascade engine is, and publishing ``TaskStateEvent`` telemetry on
``cascade/telemetry/{org}/{project}/{run_id}/events`` in Cascade's envelope
(DESIGN.md), with a sequence number and a send time added to the body.

An observer process is one connector subscribed as Cascade's observer is
(``cascade/telemetry/+/{project}/+/events`` and ``cascade/status/+``); its
callback decodes nothing itself (the connector hands it the decoded dict) and
records, per message, the sequence number and the end-to-end latency.

Processes talk to the bench through `Control`: a results queue ("ready",
then one `ProcessReport`), a start and a stop event, and shared counters for
the progress bar. Every loop here ends on its own: by message quota, by the
duration cap, or by the stop event.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import traceback
from array import array
from dataclasses import dataclass
from typing import Any

from .broker import BrokerAddress
from .measure import ProcessReport, SequenceTracker, Timeline, cpu_seconds, peak_rss_bytes

#: Messages an instance publishes between two yields to the loop (flat out).
BATCH = 64
#: Messages an instance publishes between two `flush()` calls (bounds buffering when flat out).
FLUSH_EVERY = 1024
#: How often (s) waiting processes look at the start/stop events.
POLL_S = 0.01
#: Every n-th event of an instance is a failed task (so watchers see failures).
FAILURE_EVERY = 50

TELEMETRY_TOPIC = "cascade/telemetry/{org}/{project}/{run_id}/events"
OBSERVER_FILTERS = ("cascade/telemetry/+/{project}/+/events", "cascade/status/+")
CONSTRAINTS_FILTER = "cascade/constraints/#"


@dataclass(frozen=True)
class FleetSpec:
    """One connector's workload; picklable, so it goes to spawned processes as it is."""

    connector: str  # "python" | "fast"
    address: BrokerAddress
    instances: int = 20
    publisher_processes: int = 1
    observers: int = 1
    messages: int = 200_000  # in total, over every instance
    rate: float = 0.0  # total target messages/s; 0 = as fast as the connectors go
    duration: float = 20.0  # cap on the publishing time, seconds
    qos: int = 0
    org: str = "bench-org"
    project: str = "bench"
    tag: str = "run"  # makes source ids unique per bench run
    phase: str = "flat out"  # label of this run: "flat out" or "paced"

    def quota(self, instance: int) -> int:
        """Messages `instance` publishes (the total spread evenly)."""
        base, extra = divmod(self.messages, self.instances)
        return base + (1 if instance < extra else 0)

    def instances_of(self, process_index: int) -> range:
        """The instances publisher process `process_index` runs."""
        return range(process_index, self.instances, self.publisher_processes)

    @property
    def label(self) -> str:
        """``python, flat out`` / ``fast, paced at 5,000 msgs/s``: names the run in progress and errors."""
        return f"{self.connector}, {self.phase}"

    def source_id(self, instance: int) -> str:
        return f"bench-{self.tag}-{self.connector}-{instance}"

    def run_id(self, instance: int) -> str:
        return f"run-{self.tag}-{self.connector}-{instance}"

    def topic(self, instance: int) -> str:
        return TELEMETRY_TOPIC.format(org=self.org, project=self.project, run_id=self.run_id(instance))


class Control:
    """The shared objects between the bench and its client processes."""

    def __init__(self, ctx: Any, slots: int) -> None:
        self.results = ctx.Queue()
        self.go = ctx.Event()
        self.stop = ctx.Event()
        self.go_ns = ctx.Value("q", 0, lock=False)
        # progress[i]: messages sent (publisher) or received (observer) by process i.
        self.progress = ctx.Array("q", slots, lock=False)


def connector_class(name: str) -> type:
    """The class `name` ("python" or "fast") stands for; ImportError (with the fix) if unavailable."""
    if name == "python":
        from cascade.connectors.mqtt import PyMqttConnector

        return PyMqttConnector
    if name == "fast":
        import cascade_fast

        return cascade_fast.FastMqttConnector
    raise ValueError(f"connector must be 'python' or 'fast', not {name!r}")


def make_event(spec: FleetSpec, instance: int, source: str, run_id: str, seq: int) -> dict:
    """One Cascade telemetry event (DESIGN.md envelope), with ``seq`` and ``sent_ns`` in the body."""
    failed = seq % FAILURE_EVERY == FAILURE_EVERY - 1
    return {
        "v": "1.0",
        "ts": time.time(),
        "run_id": run_id,
        "org_id": spec.org,
        "project_id": spec.project,
        "source": source,
        "body": {
            "type": "TaskStateEvent",
            "task_id": f"task-{seq}",
            "task_name": f"step-{seq % 7}",
            "state": "FAILED" if failed else "COMPLETED",
            "duration_ms": 12.5,
            "error": "simulated failure" if failed else "",
            "seq": seq,
            "sent_ns": time.monotonic_ns(),
        },
    }


def _run(coro: Any) -> Any:
    """Both connectors run on the same loop: uvloop where installed (`cascade_fast.run`)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _wait_for_go(ctl: Control) -> bool:
    """Wait for the start signal; False if told to stop first."""
    while not ctl.go.is_set():
        if ctl.stop.is_set():
            return False
        await asyncio.sleep(POLL_S)
    return True


def _child_setup() -> None:
    # The terminal's Ctrl-C reaches the whole process group; the bench (the
    # parent) handles it and tells its children to stop through `Control`.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def publisher_main(spec: FleetSpec, index: int, slot: int, ctl: Control) -> None:
    """Process entry point: run this process's share of the fleet, then report."""
    _child_setup()
    try:
        report = _run(_publisher(spec, index, slot, ctl))
    except BaseException as exc:  # report every failure to the bench rather than dying silently
        report = ProcessReport("publisher", index, 0.0, peak_rss_bytes(), 0, error=_describe(exc))
    ctl.results.put(report)


def observer_main(spec: FleetSpec, index: int, slot: int, ctl: Control) -> None:
    """Process entry point: observe the fleet until told to stop, then report."""
    _child_setup()
    try:
        report = _run(_observer(spec, index, slot, ctl))
    except BaseException as exc:
        report = ProcessReport("observer", index, 0.0, peak_rss_bytes(), 0, error=_describe(exc))
    ctl.results.put(report)


def _describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip() + (
        "\n" + traceback.format_exc() if os.environ.get("CASCADE_FAST_BENCH_DEBUG") else ""
    )


def _ignore(topic: str, data: Any) -> None:
    """Constraint commands: the bench's instances receive none, but subscribe as Cascade does."""


async def _publisher(spec: FleetSpec, index: int, slot: int, ctl: Control) -> ProcessReport:
    cls = connector_class(spec.connector)
    instances = list(spec.instances_of(index))
    conns = [cls(**spec.address.connector_kwargs(), source_id=spec.source_id(i)) for i in instances]
    try:
        await asyncio.gather(*(c.connect() for c in conns))
        await asyncio.gather(*(c.subscribe(CONSTRAINTS_FILTER, _ignore) for c in conns))
        ctl.results.put(("ready", "publisher", index))
        if not await _wait_for_go(ctl):
            return ProcessReport("publisher", index, 0.0, peak_rss_bytes(), 0, error="stopped before start")
        cpu0 = cpu_seconds()
        t0 = time.monotonic()
        deadline = t0 + spec.duration
        counts = await asyncio.gather(
            *(_instance(c, spec, i, t0, deadline, slot, ctl) for c, i in zip(conns, instances))
        )
        for c in conns:
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await c.flush(10.0)
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds() - cpu0
        stats = _sum_stats(c.stats() for c in conns)
    finally:
        await asyncio.gather(*(c.disconnect() for c in conns), return_exceptions=True)
    return ProcessReport(
        "publisher",
        index,
        cpu,
        peak_rss_bytes(),
        sum(counts),
        sent_per_source={spec.source_id(i): n for i, n in zip(instances, counts)},
        elapsed_s=elapsed,
        stats=stats,
    )


async def _instance(conn: Any, spec: FleetSpec, instance: int, t0: float, deadline: float, slot: int, ctl: Control) -> int:
    """Publish `instance`'s quota (paced to its share of `spec.rate`, or flat out); returns the count sent."""
    quota = spec.quota(instance)
    rate = spec.rate / spec.instances if spec.rate > 0 else 0.0
    topic, source, run_id = spec.topic(instance), spec.source_id(instance), spec.run_id(instance)
    publish, qos, progress, stop = conn.publish, spec.qos, ctl.progress, ctl.stop
    seq = 0
    next_flush = FLUSH_EVERY
    while seq < quota:
        now = time.monotonic()
        if now >= deadline or stop.is_set():
            break
        if rate:
            due = min(quota, int((now - t0) * rate) + 1)
            if due <= seq:
                await asyncio.sleep(max(0.001, (seq + 1) / rate - (now - t0)))
                continue
            n = min(due - seq, BATCH)
        else:
            n = min(quota - seq, BATCH)
        for _ in range(n):
            await publish(topic, make_event(spec, instance, source, run_id, seq), qos)
            seq += 1
        progress[slot] += n
        if seq >= next_flush:
            # Flat out, a buffering connector would otherwise queue the whole
            # quota in memory; a Cascade engine that flushes behaves the same.
            next_flush = seq + FLUSH_EVERY
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await conn.flush(10.0)
        await asyncio.sleep(0)
    return seq


async def _observer(spec: FleetSpec, index: int, slot: int, ctl: Control) -> ProcessReport:
    cls = connector_class(spec.connector)
    conn = cls(**spec.address.connector_kwargs(), source_id=f"bench-{spec.tag}-{spec.connector}-observer-{index}")
    tracker = SequenceTracker(max(spec.quota(0), 1))
    latencies = array("q")
    timeline = Timeline(0)
    progress = ctl.progress
    state = [0, 0, 0, 0]  # telemetry received, first ns, last ns, status messages
    monotonic_ns = time.monotonic_ns

    go_ns = ctl.go_ns

    def on_event(topic: str, data: dict) -> None:
        now = monotonic_ns()
        if not timeline.start_ns:
            # The first message can beat this process's own look at the start event.
            timeline.start_ns = go_ns.value
        body = data["body"]
        tracker.seen(data["source"], body["seq"])
        latencies.append(now - body["sent_ns"])
        timeline.add(now)
        n = state[0] = state[0] + 1
        if n == 1:
            state[1] = now
        state[2] = now
        if not n & 255:
            progress[slot] = n

    def on_status(topic: str, data: dict) -> None:
        state[3] += 1

    try:
        await conn.connect()
        await conn.subscribe(OBSERVER_FILTERS[0].format(project=spec.project), on_event)
        await conn.subscribe(OBSERVER_FILTERS[1], on_status)
        ctl.results.put(("ready", "observer", index))
        if not await _wait_for_go(ctl):
            return ProcessReport("observer", index, 0.0, peak_rss_bytes(), 0, error="stopped before start")
        cpu0 = cpu_seconds()
        while not ctl.stop.is_set():
            progress[slot] = state[0]
            await asyncio.sleep(POLL_S)
        cpu = cpu_seconds() - cpu0
        stats = conn.stats()
    finally:
        with contextlib.suppress(Exception):
            await conn.disconnect()
    return ProcessReport(
        "observer",
        index,
        cpu,
        peak_rss_bytes(),
        state[0],
        unique_per_source=tracker.unique_counts(),
        duplicates=tracker.duplicates,
        out_of_range=tracker.out_of_range,
        status_messages=state[3],
        first_recv_ns=state[1],
        last_recv_ns=state[2],
        latencies_ns=latencies.tobytes(),
        timeline=list(timeline.counts),
        stats=stats,
    )


def _sum_stats(all_stats: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for stats in all_stats:
        for key, value in stats.items():
            total[key] = total.get(key, 0) + int(value)
    return total
