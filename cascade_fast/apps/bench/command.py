"""`cascade-fast bench`: runs the bench with a progress bar and prints what it found.

Progress and messages go to stderr, the results table to stdout, so
``cascade-fast bench > results.txt`` keeps the table only.
"""

from __future__ import annotations

import argparse
import os
import shlex
import time
from typing import Any

from .broker import Broker, BrokerAddress, BrokerError
from .deps import require
from .fleet import FleetSpec
from .runner import BenchError, BenchInterrupted, BenchSettings, available_connectors, run_bench


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """The `BenchSettings` the parsed command line stands for."""
    connectors = ("python", "fast") if args.connector == "both" else (args.connector,)
    address = None
    if args.broker:
        host, port = parse_host_port(args.broker)
        address = BrokerAddress(host, port, args.username, args.password, args.tls, args.cafile)
    return BenchSettings(
        connectors=connectors,
        instances=args.instances,
        publisher_processes=args.publisher_processes,
        observers=args.observers,
        messages=args.messages,
        rate=args.rate,
        duration=args.duration,
        qos=args.qos,
        project=args.project,
        paced_rate=args.paced_rate,
        paced_seconds=args.paced_seconds,
        broker=address,
        broker_kind=args.start_broker,
    )


def parse_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:1883`` for IPv6; PORT defaults to 1883)."""
    host, sep, port = value.rpartition(":")
    if not sep or "]" in port:
        host, port = value, "1883"
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--broker wants HOST:PORT, not {value!r}")
    return host, int(port)


def run(args: argparse.Namespace) -> int:
    """Run the bench the command line asks for; returns the exit code."""
    rich_console = require("rich.console", purpose="for the bench's output")
    rich_progress = require("rich.progress", purpose="for the bench's progress bar")
    require("psutil", purpose="to measure the broker's CPU")
    if args.plot:
        require("matplotlib", purpose="for --plot")
    err = rich_console.Console(stderr=True, highlight=False)
    out = rich_console.Console(highlight=False)
    settings = settings_from_args(args)

    connectors, skipped = available_connectors(settings.connectors)
    for name, why in skipped.items():
        err.print(f"[yellow]the {name} connector is not available, skipped:[/yellow] {why}")
    if not connectors:
        err.print("[red]no connector to run[/red]")
        return 2
    settings.connectors = connectors

    progress = rich_progress.Progress(
        rich_progress.TextColumn("{task.description}"),
        rich_progress.BarColumn(),
        rich_progress.MofNCompleteColumn(),
        rich_progress.TextColumn("{task.fields[rate]}"),
        rich_progress.TimeElapsedColumn(),
        console=err,
        transient=False,
    )
    tasks: dict[str, Any] = {}
    started: dict[str, float] = {}
    broker_desc = ["(none)"]
    broker_kind = ["(none)"]

    def on_broker(broker: Broker) -> None:
        broker_desc[0] = broker.describe()
        broker_kind[0] = broker.kind
        err.print(f"broker: {broker_desc[0]}")

    def on_connector_start(name: str, spec: FleetSpec) -> None:
        tasks[spec.label] = progress.add_task(spec.label, total=spec.messages * spec.observers, rate="")

    def on_progress(label: str, sent: int, received: int, expected: int) -> None:
        # The first report comes right after the start signal: the rate excludes connecting.
        elapsed = max(time.monotonic() - started.setdefault(label, time.monotonic()), 1e-3)
        progress.update(tasks[label], completed=received, total=expected, rate=f"{received / elapsed:>9,.0f} msgs/s")

    paced = f", then {settings.paced_rate:,.0f} msgs/s for {settings.paced_seconds:g} s" if settings.runs_paced else ""
    err.print(
        f"bench: {settings.instances} instances, {settings.messages:,} messages per connector "
        f"{'flat out' if not settings.rate else f'at {settings.rate:,.0f} msgs/s'}{paced}, QoS {settings.qos}; "
        f"connectors: {', '.join(connectors)} (Ctrl-C stops)"
    )
    interrupted = False
    failures: dict[str, str] = {}
    try:
        with progress:
            _broker, results = run_bench(
                settings,
                on_broker=on_broker,
                on_progress=on_progress,
                on_connector_start=on_connector_start,
                failures=failures,
            )
    except BenchInterrupted as exc:
        interrupted = True
        results = exc.results
        err.print("[yellow]interrupted: clients stopped, broker torn down[/yellow]")
    except (BenchError, BrokerError) as exc:  # the broker could not be started or reached
        err.print(f"[red]bench failed:[/red] {exc}")
        return 1
    for message in failures.values():
        err.print(f"[red]bench failed:[/red] {message}")
    if not results:
        return 130 if interrupted else 1

    from . import report

    command = "cascade-fast " + " ".join(shlex.quote(a) for a in (args.argv or []))
    out.print(report.table(results, title="cascade-fast bench"))
    for note in report.what_is_measured(settings, broker_desc[0]):
        out.print(f"[dim]- {note}[/dim]")
    if args.json:
        doc = report.document(settings, broker_desc[0], results, skipped=skipped, command=command, failed=failures)
        report.write_json(args.json, doc)
        err.print(f"raw figures: {args.json}")
    if args.markdown:
        from pathlib import Path

        Path(args.markdown).write_text(report.markdown_table(results))
        err.print(f"markdown table: {args.markdown}")
    if args.plot:
        from .plot import plot

        plot(
            results,
            args.plot,
            subtitle=f"{settings.instances} instances, {settings.messages:,} msgs per connector, QoS {settings.qos}, "
            f"{broker_kind[0]}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}",
        )
        err.print(f"chart: {args.plot}")
    return 130 if interrupted else (1 if failures else 0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's options (kept beside the code that reads them)."""
    d = BenchSettings()
    parser.add_argument("--connector", choices=("python", "fast", "both"), default="both", help="which connector(s) to run (default: both, one after the other)")
    parser.add_argument("--instances", type=_positive_int, default=d.instances, help=f"simulated Cascade instances, each with its own connection and Last Will (default {d.instances})")
    parser.add_argument("--messages", type=_positive_int, default=d.messages, help=f"telemetry events per connector, all instances together (default {d.messages:,})")
    parser.add_argument("--rate", type=_non_negative_float, default=d.rate, help="target total messages/s; 0 = as fast as possible (default)")
    parser.add_argument("--duration", type=_positive_float, default=d.duration, help=f"cap on each connector's publishing time, seconds (default {d.duration:g})")
    parser.add_argument("--qos", type=int, choices=(0, 1, 2), default=d.qos, help=f"QoS of the telemetry (default {d.qos})")
    parser.add_argument("--publisher-processes", type=_positive_int, default=d.publisher_processes, help="processes the instances are spread over (default 1: the instances are tasks in one process)")
    parser.add_argument("--observers", type=_positive_int, default=d.observers, help="observer processes, each receiving every event (default 1)")
    parser.add_argument("--paced-rate", type=_non_negative_float, default=d.paced_rate, help=f"after the flat-out run, run each connector again at this total msgs/s for latency and CPU below saturation (default {d.paced_rate:g}; 0: no paced run; skipped when --rate is given)")
    parser.add_argument("--paced-seconds", type=_positive_float, default=d.paced_seconds, help=f"length of the paced run, seconds (default {d.paced_seconds:g})")
    parser.add_argument("--project", default=d.project, help="Cascade project name in the topics (default %(default)s)")
    group = parser.add_argument_group("broker (default: start one on a free loopback port)")
    group.add_argument("--broker", metavar="HOST:PORT", help="use this broker instead of starting one")
    group.add_argument("--username")
    group.add_argument("--password")
    group.add_argument("--tls", action="store_true", help="connect with TLS (system CAs, or --cafile)")
    group.add_argument("--cafile", help="CA bundle for --tls")
    group.add_argument("--start-broker", choices=("auto", "mosquitto", "amqtt"), default="auto", help="which broker to start when --broker is not given (default: mosquitto if installed, else amqtt)")
    outg = parser.add_argument_group("output")
    outg.add_argument("--json", metavar="PATH", help="write every raw figure as JSON")
    outg.add_argument("--markdown", metavar="PATH.md", help="write the results table as Markdown")
    outg.add_argument("--plot", metavar="PATH.png", help="write a chart of throughput and latency (matplotlib)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


__all__ = ["add_arguments", "parse_host_port", "run", "settings_from_args"]
