"""A small simulated Cascade fleet to watch: ``python -m cascade_fast.apps.bench.simulate``.

    python -m cascade_fast.apps.bench.simulate --broker localhost:1883 --instances 3 --rate 5 --duration 60

Each instance is a connector of its own (birth and Last Will on
``cascade/status/{source_id}``) publishing `fleet.make_event` telemetry at
``--rate`` events/s, until ``--duration`` ends or SIGINT/SIGTERM (a clean
shutdown publishes the offline status; SIGKILL leaves it to the broker's
Last Will). The connector is `MqttConnector` unless ``--connector`` names
one. `cascade-fast watch` and its tests use this; the bench has its own
measured fleet (`fleet`).
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

from .broker import BrokerAddress
from .command import parse_host_port
from .fleet import CONSTRAINTS_FILTER, FleetSpec, _ignore, make_event


async def simulate(args: argparse.Namespace) -> int:
    """Run the instances until --duration ends or a signal arrives."""
    if args.connector:
        from .fleet import connector_class

        cls = connector_class(args.connector)
    else:
        from cascade.connectors.mqtt import MqttConnector as cls
    host, port = parse_host_port(args.broker)
    address = BrokerAddress(host, port, args.username, args.password)
    spec = FleetSpec(connector=args.connector or "env", address=address, project=args.project, org=args.org)
    prefix = args.source_prefix or f"{platform.node()}-{os.getpid()}"
    ids = [prefix if args.instances == 1 else f"{prefix}-{i}" for i in range(args.instances)]
    conns = [cls(host, port, source_id=sid, username=args.username, password=args.password) for sid in ids]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    deadline = loop.time() + args.duration

    async def instance(conn: object, i: int, sid: str) -> None:
        run_id = f"run-{sid}"
        topic = f"cascade/telemetry/{args.org}/{args.project}/{run_id}/events"
        period = 1.0 / args.rate if args.rate > 0 else None
        seq = 0
        next_at = loop.time()
        while not stop.is_set() and loop.time() < deadline:
            if period is not None:
                await conn.publish(topic, make_event(spec, i, sid, run_id, seq))  # type: ignore[attr-defined]
                seq += 1
                next_at += period
            else:
                next_at = deadline
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, min(next_at, deadline) - loop.time()))

    try:
        await asyncio.gather(*(c.connect() for c in conns))  # type: ignore[attr-defined]
        await asyncio.gather(*(c.subscribe(CONSTRAINTS_FILTER, _ignore) for c in conns))  # type: ignore[attr-defined]
        print("online: " + " ".join(ids), flush=True)
        await asyncio.gather(*(instance(c, i, sid) for i, (c, sid) in enumerate(zip(conns, ids))))
    finally:
        await asyncio.gather(*(c.disconnect() for c in conns), return_exceptions=True)  # type: ignore[attr-defined]
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cascade_fast.apps.bench.simulate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", metavar="HOST:PORT", default="localhost:1883")
    parser.add_argument("--username")
    parser.add_argument("--password")
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--rate", type=float, default=5.0, help="events/s per instance (0: none, presence only)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds before a clean shutdown")
    parser.add_argument("--org", default="acme")
    parser.add_argument("--project", default="demo")
    parser.add_argument("--source-prefix", help="source ids are PREFIX-0, PREFIX-1, ... (PREFIX alone for one instance)")
    parser.add_argument("--connector", choices=("python", "fast"), help="default: MqttConnector (CASCADE_CONNECTOR)")
    args = parser.parse_args(argv)
    from cascade_fast import run

    started = time.monotonic()
    code = run(simulate(args))
    print(f"stopped after {time.monotonic() - started:.1f} s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
