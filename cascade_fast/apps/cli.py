"""The ``cascade-fast`` command: argument parsing and dispatch, nothing else.

    cascade-fast bench [options]   the fleet benchmark of both connectors
    cascade-fast watch [options]   a live view of a Cascade fleet on a broker

The subcommands live in `cascade_fast.apps.bench` and `cascade_fast.apps.watch`; their
optional dependencies (rich, matplotlib, psutil: ``pip install
'cascade-fast[bench]'``) are imported only when a subcommand runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand."""
    from .. import __version__
    from . import watch
    from .bench import command as bench

    parser = argparse.ArgumentParser(prog="cascade-fast", description="cascade-fast: fleet benchmark and fleet monitor for Cascade's MQTT connectors.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench.add_arguments(
        sub.add_parser(
            "bench",
            help="benchmark the python and fast connectors on a simulated Cascade fleet",
            description="Simulate a Cascade fleet against a broker (started on a free loopback port unless --broker "
            "is given) and report, per connector, delivered messages/s, losses, latency, CPU and memory.",
        )
    )
    watch.add_arguments(
        sub.add_parser(
            "watch",
            help="live view of a Cascade fleet: presence, telemetry rate, failures",
            description="Watch a Cascade fleet on a broker: one row per instance seen on cascade/status/+ and on "
            "telemetry. Uses MqttConnector, so CASCADE_CONNECTOR applies.",
        )
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cascade-fast`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    from .bench.deps import MissingExtraError

    try:
        if args.command == "bench":
            from .bench import command

            return command.run(args)
        from . import watch

        return watch.run(args)
    except MissingExtraError as exc:
        print(f"cascade-fast {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
