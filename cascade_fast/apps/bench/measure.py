"""What the bench measures, and how: sequence tracking, latency, CPU and memory.

Everything here runs either inside the client processes (cheap, per message:
`SequenceTracker.seen`, `Timeline.add`) or in the parent afterwards (the
aggregation into `ConnectorResult`). Figures are computed from raw samples,
never estimated: latency percentiles come from every message's latency.

Clocks: a publisher puts ``time.monotonic_ns()`` in each event body and the
observer subtracts it from its own ``time.monotonic_ns()`` on receipt. On
Linux, macOS and Windows the monotonic clock is system-wide, so the two
processes read the same clock.
"""

from __future__ import annotations

import math
import sys
import time
from array import array
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

#: Width of a throughput-timeline bucket.
TIMELINE_BUCKET_S = 0.25


class SequenceTracker:
    """Which sequence numbers of each source arrived (a bitmap per source).

    One byte per expected message keeps the bookkeeping O(1) per message and
    small next to the connector (300k messages: 300 kB), so it does not skew
    the peak RSS figure.
    """

    __slots__ = ("_seen", "_capacity", "duplicates", "out_of_range")

    def __init__(self, capacity_per_source: int) -> None:
        self._capacity = capacity_per_source
        self._seen: dict[str, bytearray] = {}
        self.duplicates = 0
        self.out_of_range = 0

    def seen(self, source: str, seq: int) -> None:
        bitmap = self._seen.get(source)
        if bitmap is None:
            bitmap = self._seen[source] = bytearray(self._capacity)
        if not 0 <= seq < self._capacity:
            self.out_of_range += 1
        elif bitmap[seq]:
            self.duplicates += 1
        else:
            bitmap[seq] = 1

    def unique_counts(self) -> dict[str, int]:
        """Distinct sequence numbers received, per source."""
        return {source: bitmap.count(1) for source, bitmap in self._seen.items()}


class Timeline:
    """Messages received per `TIMELINE_BUCKET_S` bucket since a common start."""

    __slots__ = ("start_ns", "counts")

    def __init__(self, start_ns: int) -> None:
        self.start_ns = start_ns
        self.counts = array("q")

    def add(self, now_ns: int) -> None:
        index = int((now_ns - self.start_ns) / (TIMELINE_BUCKET_S * 1e9))
        if index < 0:
            index = 0
        counts = self.counts
        if index >= len(counts):
            counts.extend([0] * (index + 1 - len(counts)))
        counts[index] += 1


def cpu_seconds() -> float:
    """User + system CPU time of this process so far, every thread (CLOCK_PROCESS_CPUTIME_ID: ns resolution,
    where `os.times` counts 10 ms clock ticks)."""
    return time.process_time()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux: ``VmHWM`` from /proc/self/status, not ``ru_maxrss``: the latter
    survives execve, so a spawned child would report its parent's peak (the
    bench process, with rich and matplotlib loaded) when that is larger.
    """
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        import psutil

        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    return int(peak if sys.platform == "darwin" else peak * 1024)


def percentile(sorted_values: "array | list", q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of already sorted values; NaN when empty."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * n))
    return float(sorted_values[min(rank, n) - 1])


@dataclass
class ProcessReport:
    """What one client process reports back to the bench at its end."""

    role: str  # "publisher" | "observer"
    index: int
    cpu_s: float  # CPU seconds from the start signal to the end of its work
    peak_rss: int  # bytes
    messages: int  # sent (publisher) or telemetry received (observer)
    elapsed_s: float = 0.0  # publishing time (publisher)
    sent_per_source: dict[str, int] = field(default_factory=dict)
    unique_per_source: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    out_of_range: int = 0
    status_messages: int = 0
    first_recv_ns: int = 0
    last_recv_ns: int = 0
    latencies_ns: bytes = b""  # array("q").tobytes()
    timeline: list[int] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    error: str | None = None


@dataclass
class ConnectorResult:
    """The figures of one connector's run, as reported, plotted and written to JSON."""

    connector: str
    instances: int
    publisher_processes: int
    observers: int
    sent: int
    delivered: int  # telemetry messages received by the observers (every observer counts)
    expected: int  # sent x observers
    lost: int  # sent but not received, by sequence number per source, summed over observers
    duplicates: int
    elapsed_s: float  # first to last delivery
    throughput: float  # delivered / elapsed_s, messages/s
    publish_rate: float  # sent / publishing time, messages/s
    latency_ms: dict[str, float]  # p50, p90, p99, max, mean
    observer_cpu_s: float
    publisher_cpu_s: float
    observer_cpu_per_100k: float  # CPU seconds per 100k messages received
    publisher_cpu_per_100k: float  # CPU seconds per 100k messages sent
    client_cpu_per_100k: float  # both sides, per 100k messages delivered
    observer_msgs_per_cpu_s: float  # messages received per observer CPU-second: its capacity on one free core
    observer_peak_rss_mb: float
    publisher_peak_rss_mb: float
    broker_cpu_s: float | None
    timeline: list[float]  # messages/s per TIMELINE_BUCKET_S bucket (all observers)
    latency_cdf_ms: list[float]  # latency at percentiles 0, 1, ..., 100
    stats: dict[str, dict[str, int]]
    errors: list[str]
    rate: float = 0.0  # the target total rate of this run (0: flat out)
    #: The same connector's second run, paced below saturation, for latency and CPU at a steady rate.
    paced: "ConnectorResult | None" = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def aggregate(
    connector: str,
    reports: Iterable[ProcessReport],
    *,
    instances: int,
    publish_elapsed_s: float,
    broker_cpu_s: float | None,
    rate: float = 0.0,
) -> ConnectorResult:
    """Combine every process report of one connector's run into its figures."""
    reports = list(reports)
    pubs = [r for r in reports if r.role == "publisher"]
    obs = [r for r in reports if r.role == "observer"]
    sent_per_source: dict[str, int] = {}
    for r in pubs:
        sent_per_source.update(r.sent_per_source)
    sent = sum(sent_per_source.values())
    delivered = sum(r.messages for r in obs)
    lost = 0
    for r in obs:
        for source, count in sent_per_source.items():
            lost += max(0, count - r.unique_per_source.get(source, 0))
    latencies = array("q")
    for r in obs:
        chunk = array("q")
        chunk.frombytes(r.latencies_ns)
        latencies.extend(chunk)
    lat_ms = sorted(v / 1e6 for v in latencies)
    firsts = [r.first_recv_ns for r in obs if r.messages]
    lasts = [r.last_recv_ns for r in obs if r.messages]
    elapsed = (max(lasts) - min(firsts)) / 1e9 if firsts else 0.0
    width = max((len(r.timeline) for r in obs), default=0)
    timeline = [sum(r.timeline[i] for r in obs if i < len(r.timeline)) / TIMELINE_BUCKET_S for i in range(width)]
    obs_cpu = sum(r.cpu_s for r in obs)
    pub_cpu = sum(r.cpu_s for r in pubs)

    def per_100k(cpu: float, count: int) -> float:
        return cpu / count * 1e5 if count else math.nan

    return ConnectorResult(
        connector=connector,
        instances=instances,
        publisher_processes=len(pubs),
        observers=len(obs),
        sent=sent,
        delivered=delivered,
        expected=sent * len(obs),
        lost=lost,
        duplicates=sum(r.duplicates for r in obs),
        elapsed_s=elapsed,
        throughput=delivered / elapsed if elapsed > 0 else math.nan,
        publish_rate=sent / publish_elapsed_s if publish_elapsed_s > 0 else math.nan,
        latency_ms={
            "p50": percentile(lat_ms, 50),
            "p90": percentile(lat_ms, 90),
            "p99": percentile(lat_ms, 99),
            "max": lat_ms[-1] if lat_ms else math.nan,
            "mean": sum(lat_ms) / len(lat_ms) if lat_ms else math.nan,
        },
        observer_cpu_s=obs_cpu,
        publisher_cpu_s=pub_cpu,
        observer_cpu_per_100k=per_100k(obs_cpu, delivered),
        publisher_cpu_per_100k=per_100k(pub_cpu, sent),
        client_cpu_per_100k=per_100k(obs_cpu + pub_cpu, delivered),
        observer_msgs_per_cpu_s=delivered / obs_cpu if obs_cpu > 0 else math.nan,
        observer_peak_rss_mb=max((r.peak_rss for r in obs), default=0) / 2**20,
        publisher_peak_rss_mb=max((r.peak_rss for r in pubs), default=0) / 2**20,
        broker_cpu_s=broker_cpu_s,
        timeline=timeline,
        latency_cdf_ms=[percentile(lat_ms, q) for q in range(0, 101)] if lat_ms else [],
        stats={f"{r.role}-{r.index}": r.stats for r in reports},
        errors=[f"{r.role}-{r.index}: {r.error}" for r in reports if r.error],
        rate=rate,
    )


#: Figures compared between connectors, and which direction is better.
RATIO_KEYS = {
    "throughput": "higher",
    "observer_msgs_per_cpu_s": "higher",
    "latency_p50_ms": "lower",
    "latency_p99_ms": "lower",
    "observer_cpu_per_100k": "lower",
    "publisher_cpu_per_100k": "lower",
    "client_cpu_per_100k": "lower",
    "observer_peak_rss_mb": "lower",
}


def flat_figures(result: ConnectorResult) -> dict[str, float]:
    """The scalar figures `RATIO_KEYS` names, from one result."""
    return {
        "throughput": result.throughput,
        "observer_msgs_per_cpu_s": result.observer_msgs_per_cpu_s,
        "latency_p50_ms": result.latency_ms["p50"],
        "latency_p99_ms": result.latency_ms["p99"],
        "observer_cpu_per_100k": result.observer_cpu_per_100k,
        "publisher_cpu_per_100k": result.publisher_cpu_per_100k,
        "client_cpu_per_100k": result.client_cpu_per_100k,
        "observer_peak_rss_mb": result.observer_peak_rss_mb,
    }


def ratios(fast: ConnectorResult, python: ConnectorResult) -> dict[str, float]:
    """fast / python for every figure of `RATIO_KEYS` (NaN where python's is 0 or missing)."""
    f, p = flat_figures(fast), flat_figures(python)
    if fast.paced is not None and python.paced is not None:
        for key, value in flat_figures(fast.paced).items():
            f[f"paced_{key}"] = value
        for key, value in flat_figures(python.paced).items():
            p[f"paced_{key}"] = value
    return {key: _div(f[key], p[key]) for key in f if key in p}


def _div(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) and not math.isnan(a) else math.nan


def now_ns() -> int:
    return time.monotonic_ns()
