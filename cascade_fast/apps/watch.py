"""`cascade-fast watch`: a live view of a Cascade fleet, from the broker.

Every Cascade instance announces itself on ``cascade/status/{source_id}``
(birth ``{"status":"online"}`` at connect; the broker publishes its Last Will
``{"status":"offline"}`` when the connection dies, and the instance publishes
the same on a clean shutdown) and sends telemetry on
``cascade/telemetry/{org}/{project}/{run_id}/events``. The watcher subscribes
to both, as Cascade's observer does, and keeps one row per source id:
presence and since when, messages/s, the last event, failed tasks.

`FleetView` is the state (pure logic, no I/O); `run` connects with
`cascade.connectors.mqtt.MqttConnector` (so ``CASCADE_CONNECTOR`` picks the
implementation) and renders the view with rich's Live display, refreshing in
place, or as plain text blocks (``--plain``, ``--once``) for logs and tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

STATUS_FILTER = "cascade/status/+"
TELEMETRY_FILTER = "cascade/telemetry/+/{project}/+/events"
#: Messages/s is measured over this trailing window.
RATE_WINDOW_S = 5.0


@dataclass
class InstanceRow:
    """What the watcher knows of one instance (one source id)."""

    source: str
    status: str = "unknown"  # online | offline | unknown (telemetry seen, no status yet)
    since: float | None = None  # wall time the status was seen to change
    events: int = 0
    failed: int = 0
    project: str = ""
    last_event: str = ""
    last_event_at: float | None = None
    # (monotonic time, events) samples for the trailing-window rate
    samples: deque = field(default_factory=lambda: deque(maxlen=64))

    def rate(self, now: float, window: float = RATE_WINDOW_S) -> float:
        """Events/s between the rate samples `FleetView.tick` took in the trailing `window` (0 before two)."""
        samples = self.samples
        if len(samples) < 2:
            return 0.0
        new_t, new_n = samples[-1]
        old_t, old_n = samples[0]
        for t, n in samples:
            if new_t - t <= window:
                old_t, old_n = t, n
                break
        if new_t - old_t <= 0:
            old_t, old_n = samples[-2]
        dt = new_t - old_t
        return (new_n - old_n) / dt if dt > 0 else 0.0


class FleetView:
    """The fleet as seen on the broker. Feed it messages; read `rows()` and `summary()`."""

    def __init__(self, *, ignore: set[str] | None = None, clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._rows: dict[str, InstanceRow] = {}
        self._ignore = ignore or set()
        self._clock = clock
        self._monotonic = monotonic
        self.total_events = 0
        self.bad_messages = 0

    def _row(self, source: str) -> InstanceRow:
        row = self._rows.get(source)
        if row is None:
            row = self._rows[source] = InstanceRow(source)
            row.samples.append((self._monotonic(), 0))
        return row

    def on_status(self, topic: str, data: Any) -> None:
        """``cascade/status/{source}``: ``{"status": "online"|"offline"}``; an empty (cleared) payload forgets the instance."""
        source = topic.rsplit("/", 1)[-1]
        if source in self._ignore:
            return
        if data == {}:
            self._rows.pop(source, None)
            return
        status = data.get("status") if isinstance(data, dict) else None
        if status not in ("online", "offline"):
            self.bad_messages += 1
            return
        row = self._row(source)
        if row.status != status:
            row.status = status
            row.since = self._clock()

    def on_event(self, topic: str, data: Any) -> None:
        """A telemetry event: counts it for its source (the envelope's ``source``)."""
        if not isinstance(data, dict):
            self.bad_messages += 1
            return
        source = data.get("source") or topic.split("/")[4]
        if source in self._ignore:
            return
        row = self._row(source)
        row.events += 1
        self.total_events += 1
        row.project = str(data.get("project_id") or (topic.split("/")[3] if topic.count("/") >= 5 else ""))
        body = data.get("body") if isinstance(data.get("body"), dict) else {}
        state = str(body.get("state", body.get("type", "event")))
        if state.upper() == "FAILED":
            row.failed += 1
        name = body.get("task_name") or body.get("task_id") or ""
        row.last_event = f"{state} {name}".strip()
        row.last_event_at = self._clock()

    def tick(self) -> None:
        """Take a rate sample of every row (call once per refresh)."""
        now = self._monotonic()
        for row in self._rows.values():
            row.samples.append((now, row.events))
            while len(row.samples) > 2 and now - row.samples[1][0] > RATE_WINDOW_S:
                row.samples.popleft()

    def rows(self) -> list[InstanceRow]:
        """Online first, then the others; by source id within each."""
        order = {"online": 0, "unknown": 1, "offline": 2}
        return sorted(self._rows.values(), key=lambda r: (order[r.status], r.source))

    def summary(self) -> dict[str, Any]:
        now = self._monotonic()
        rows = list(self._rows.values())
        return {
            "instances": len(rows),
            "online": sum(r.status == "online" for r in rows),
            "offline": sum(r.status == "offline" for r in rows),
            "unknown": sum(r.status == "unknown" for r in rows),
            "rate": sum(r.rate(now) for r in rows),
            "events": self.total_events,
            "failed": sum(r.failed for r in rows),
        }


def _hms(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "-"


def _ago(t: float | None, now: float) -> str:
    return f"{max(0.0, now - t):.0f}s ago" if t else ""


def summary_line(view: FleetView) -> str:
    s = view.summary()
    line = f"{s['instances']} instances: {s['online']} online, {s['offline']} offline"
    if s["unknown"]:
        line += f", {s['unknown']} without status"
    return line + f" | {s['rate']:,.1f} msgs/s | {s['events']:,} events | {s['failed']:,} failed tasks"


def render_plain(view: FleetView, header: str) -> str:
    """One text block: header, a row per instance, the summary line."""
    now_wall, now = time.time(), time.monotonic()
    rows = [("instance", "status", "since", "msgs/s", "events", "failed", "last event")]
    for r in view.rows():
        last = f"{r.last_event} ({_ago(r.last_event_at, now_wall)})" if r.last_event else "-"
        rows.append((r.source, r.status, _hms(r.since), f"{r.rate(now):.1f}", str(r.events), str(r.failed), last))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [f"{header}  {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    lines.append(summary_line(view))
    return "\n".join(lines)


def render_rich(view: FleetView, header: str) -> Any:
    """The same as `render_plain`, as a rich renderable for Live."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    now_wall, now = time.time(), time.monotonic()
    table = Table(title=header, title_justify="left", expand=False)
    for name, justify in (("instance", "left"), ("status", "left"), ("since", "left"), ("msgs/s", "right"), ("events", "right"), ("failed", "right"), ("last event", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    colors = {"online": "green", "offline": "red", "unknown": "yellow"}
    for r in view.rows():
        last = f"{r.last_event} ({_ago(r.last_event_at, now_wall)})" if r.last_event else "-"
        table.add_row(
            r.source,
            Text(r.status, style=colors[r.status]),
            _hms(r.since),
            f"{r.rate(now):,.1f}",
            f"{r.events:,}",
            Text(f"{r.failed:,}", style="red" if r.failed else ""),
            last,
        )
    return Group(table, Text(summary_line(view), style="bold"))


async def watch(args: argparse.Namespace, emit: Callable[[FleetView, str], None] | None = None) -> int:
    """Connect, subscribe, refresh until --duration ends or SIGINT/SIGTERM; returns the exit code."""
    from cascade.connectors.mqtt import MqttConnector

    from .bench.command import parse_host_port

    host, port = parse_host_port(args.broker)
    source_id = f"cascade-fast-watch-{platform.node()}-{os.getpid()}"
    view = FleetView(ignore={source_id})
    project = args.project or "+"
    header = (
        f"cascade-fast watch  broker {host}:{port}  project {args.project or '*'}  "
        f"connector {MqttConnector.__name__}"
    )
    kwargs: dict[str, Any] = {"username": args.username, "password": args.password}
    if args.tls:
        import ssl

        kwargs["tls_context"] = ssl.create_default_context(cafile=args.cafile)
    conn = MqttConnector(host, port, source_id=source_id, **kwargs)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    try:
        await conn.connect()
    except (OSError, TimeoutError) as exc:
        print(f"cascade-fast watch: cannot connect to {host}:{port}: {exc}", file=sys.stderr)
        return 1
    try:
        await conn.subscribe(STATUS_FILTER, view.on_status)
        await conn.subscribe(TELEMETRY_FILTER.format(project=project), view.on_event)
        deadline = loop.time() + args.duration if args.duration else None
        live = None
        if emit is None and not (args.plain or args.once):
            from rich.live import Live

            live = Live(render_rich(view, header), refresh_per_second=4, transient=False)
            live.start()
        try:
            while not stop.is_set():
                timeout = args.interval
                if deadline is not None:
                    timeout = min(timeout, max(0.0, deadline - loop.time()))
                with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout)
                view.tick()
                done = stop.is_set() or (deadline is not None and loop.time() >= deadline)
                if emit is not None:
                    emit(view, header)
                elif live is not None:
                    live.update(render_rich(view, header))
                elif args.plain or done:
                    print(render_plain(view, header) + "\n", flush=True)
                if done:
                    break
        finally:
            if live is not None:
                live.stop()
    finally:
        await conn.disconnect()
    return 0


def run(args: argparse.Namespace) -> int:
    """`cascade-fast watch` entry point: checks the extra, runs `watch` on uvloop."""
    if not (args.plain or args.once):
        from .bench.deps import require

        require("rich.live", purpose="for the live view (or use --plain)")
    if args.once and not args.duration:
        args.duration = 3.0
    from .. import run as run_loop

    return run_loop(watch(args))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The watch command's options."""
    parser.add_argument("--broker", metavar="HOST:PORT", default="localhost:1883", help="broker to watch (default %(default)s)")
    parser.add_argument("--username")
    parser.add_argument("--password")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system CAs, or --cafile)")
    parser.add_argument("--cafile", help="CA bundle for --tls")
    parser.add_argument("--project", help="only telemetry of this Cascade project (cascade/telemetry/+/PROJECT/+/events)")
    parser.add_argument("--interval", type=float, default=1.0, help="refresh every N seconds (default %(default)s)")
    parser.add_argument("--duration", type=float, default=None, help="stop after N seconds (default: until Ctrl-C)")
    parser.add_argument("--plain", action="store_true", help="print a plain-text block per refresh instead of the live view")
    parser.add_argument("--once", action="store_true", help="watch for --duration (default 3 s), print one plain-text block, exit")
