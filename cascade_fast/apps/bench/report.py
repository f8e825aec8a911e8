"""The bench's results: the rich table, the JSON document, and what was measured.

The table puts the connectors side by side with a fast/python column; the
JSON document has every raw figure (and the same notes), for scripts and for
comparing machines. Neither hides a figure that went the wrong way.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .measure import ConnectorResult, ratios
from .runner import BenchSettings


def what_is_measured(settings: BenchSettings, broker_desc: str) -> list[str]:
    """Plain sentences on what the figures are, printed under the table and stored in the JSON."""
    cores = os.cpu_count() or 1
    rate = "as fast as the publishers go" if not settings.rate else f"at {settings.rate:g} messages/s in total"
    return [
        f"Workload: {settings.instances} fleet instances (each a connector with its own source id and Last Will) "
        f"in {settings.publisher_processes} publisher process(es) publish {settings.messages:,} Cascade "
        f"TaskStateEvents, QoS {settings.qos}, {rate}; {settings.observers} observer process(es) subscribed to "
        f"cascade/telemetry/+/{settings.project}/+/events and cascade/status/+ receive them. "
        "Each connector runs the same workload in fresh processes, one after the other, as publisher and as observer.",
        f"Broker: {broker_desc}"
        + (
            " (set_tcp_nodelay true: no Nagle delay on its writes; allow_duplicate_messages false; persistence off)"
            if broker_desc.startswith("mosquitto") and "started by the bench" in broker_desc
            else ""
        )
        + f". The broker, the publishers and the observer share this machine's {cores} cores: "
        "the figures are for the whole pipeline on one host, not the connector alone.",
        "Delivered msgs/s: telemetry messages the observers received, over the time from first to last receipt. "
        "Flat out, the publishers outrun the observer and messages queue (in the broker, the sockets and the "
        "client), so that run's latency is mostly queueing: how far behind the observer falls.",
        *(
            [
                f"Paced run: each connector again at {settings.paced_rate:,.0f} msgs/s in total for "
                f"{settings.paced_seconds:g} s: latency and CPU at a steady load. A connector that cannot "
                "sustain that rate delivers fewer msgs/s than asked and its latency grows: it is saturated."
            ]
            if settings.runs_paced
            else []
        ),
        "Lost: sent but never received, counted by sequence number per source.",
        "Latency: publisher's send time (in the event body) to the observer's callback, same monotonic clock.",
        "CPU s/100k: user+system CPU of the client processes from the start signal to the end of their work, "
        "per 100,000 messages (observer: received; publishers: sent). It includes the bench's own per-message "
        "work, the same for both connectors (building each event dict; the observer's sequence and latency "
        "bookkeeping), so it understates the connectors' difference. Observer msgs per CPU-second: messages "
        "received per second of observer CPU, what one observer would do with a core to itself. Peak RSS: the largest process of each side "
        "(VmHWM).",
    ]


def document(
    settings: BenchSettings,
    broker_desc: str,
    results: dict[str, ConnectorResult],
    *,
    skipped: dict[str, str] | None = None,
    command: str | None = None,
    failed: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The JSON document `--json` writes (NaN figures become null)."""
    ratio = ratios(results["fast"], results["python"]) if {"fast", "python"} <= results.keys() else None
    doc = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command or " ".join(["cascade-fast", *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "broker": broker_desc,
        "settings": {
            "connectors": list(settings.connectors),
            "instances": settings.instances,
            "publisher_processes": settings.publisher_processes,
            "observers": settings.observers,
            "messages": settings.messages,
            "rate": settings.rate,
            "duration": settings.duration,
            "qos": settings.qos,
            "project": settings.project,
            "paced_rate": settings.paced_rate if settings.runs_paced else 0,
            "paced_seconds": settings.paced_seconds,
        },
        "results": {name: r.to_dict() for name, r in results.items()},
        "ratio_fast_over_python": ratio,
        "skipped": skipped or {},
        "failed": failed or {},
        "notes": what_is_measured(settings, broker_desc),
    }
    return _clean(doc)


def write_json(path: str | os.PathLike, doc: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _paced(get: Any) -> Any:
    return lambda r: get(r.paced) if r.paced is not None else None


_L = lambda key: (lambda r: r.latency_ms[key])  # noqa: E731

# (label, getter, format, better) per row; a None row starts a section.
_MAIN_ROWS = [
    ("delivered msgs/s", lambda r: r.throughput, "{:,.0f}", "higher"),
    ("observer msgs per CPU-second", lambda r: r.observer_msgs_per_cpu_s, "{:,.0f}", "higher"),
    ("messages sent", lambda r: r.sent, "{:,}", None),
    ("messages delivered", lambda r: r.delivered, "{:,}", None),
    ("messages lost", lambda r: r.lost, "{:,}", "lower"),
    ("latency p50 (ms)", _L("p50"), "{:,.2f}", "lower"),
    ("latency p99 (ms)", _L("p99"), "{:,.2f}", "lower"),
    ("latency max (ms)", _L("max"), "{:,.2f}", "lower"),
    ("observer CPU s / 100k msgs", lambda r: r.observer_cpu_per_100k, "{:,.2f}", "lower"),
    ("publisher CPU s / 100k msgs", lambda r: r.publisher_cpu_per_100k, "{:,.2f}", "lower"),
    ("observer peak RSS (MB)", lambda r: r.observer_peak_rss_mb, "{:,.1f}", "lower"),
    ("publisher peak RSS (MB)", lambda r: r.publisher_peak_rss_mb, "{:,.1f}", "lower"),
    ("broker CPU s", lambda r: r.broker_cpu_s, "{:,.2f}", None),
]
_PACED_ROWS = [
    ("delivered msgs/s", _paced(lambda r: r.throughput), "{:,.0f}", None),
    ("messages lost", _paced(lambda r: r.lost), "{:,}", "lower"),
    ("latency p50 (ms)", _paced(_L("p50")), "{:,.2f}", "lower"),
    ("latency p99 (ms)", _paced(_L("p99")), "{:,.2f}", "lower"),
    ("latency max (ms)", _paced(_L("max")), "{:,.2f}", "lower"),
    ("observer CPU s / 100k msgs", _paced(lambda r: r.observer_cpu_per_100k), "{:,.2f}", "lower"),
    ("publisher CPU s / 100k msgs", _paced(lambda r: r.publisher_cpu_per_100k), "{:,.2f}", "lower"),
]


def _sections(results: dict[str, ConnectorResult]) -> list[tuple[str, list]]:
    first = next(iter(results.values()))
    main = "flat out" if not first.rate else f"at {first.rate:,.0f} msgs/s"
    sections = [(main, _MAIN_ROWS)]
    if first.paced is not None:
        sections.append((f"paced at {first.paced.rate:,.0f} msgs/s", _PACED_ROWS))
    return sections


def _fmt(fmt: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return fmt.format(value)


def table(results: dict[str, ConnectorResult], title: str) -> Any:
    """A rich Table: one row per figure, one column per connector, and fast/python; one section per run."""
    from .deps import require

    rich_table = require("rich.table", purpose="for the results table")
    names = [n for n in ("python", "fast") if n in results]
    both = len(names) == 2
    t = rich_table.Table(title=title, title_justify="left")
    t.add_column("figure")
    for name in names:
        t.add_column(name, justify="right")
    if both:
        t.add_column("fast/python", justify="right")
    for section, rows in _sections(results):
        t.add_row(f"[bold]{section}[/bold]", *([""] * (len(names) + both)))
        for i, (label, get, fmt, better) in enumerate(rows):
            values = [get(results[n]) for n in names]
            row = [f"  {label}", *(_fmt(fmt, v) for v in values)]
            if both:
                row.append(_ratio_cell(values[1], values[0], better))
            t.add_row(*row, end_section=i == len(rows) - 1)
    return t


def _ratio_cell(fast: Any, python: Any, better: str | None) -> str:
    if better is None or fast is None or python is None:
        return ""
    if any(isinstance(v, float) and math.isnan(v) for v in (fast, python)):
        return "n/a"
    if python == 0:
        return "" if fast == 0 else "n/a"
    ratio = fast / python
    good = ratio > 1 if better == "higher" else ratio < 1
    color = "green" if good else ("red" if ratio != 1 else "")
    text = f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"
    return f"[{color}]{text}[/{color}]" if color else text


def markdown_table(results: dict[str, ConnectorResult]) -> str:
    """The same rows as `table`, as a Markdown table (for a README or an issue)."""
    names = [n for n in ("python", "fast") if n in results]
    both = len(names) == 2
    header = ["figure", *names] + (["fast/python"] if both else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for section, rows in _sections(results):
        lines.append("| **" + section + "** |" + " |" * (len(header) - 1))
        for label, get, fmt, better in rows:
            values = [get(results[n]) for n in names]
            row = [label, *(_fmt(fmt, v) for v in values)]
            if both:
                cell = _ratio_cell(values[1], values[0], better)
                for color in ("green", "red"):
                    cell = cell.replace(f"[{color}]", "").replace(f"[/{color}]", "")
                row.append(cell)
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
