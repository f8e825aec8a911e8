"""Smoke check of an installed cascade-fast: a publish/subscribe round trip.

    CASCADE_CONNECTOR=fast python tools/roundtrip_check.py --require-extensions --installed

Run by tools/install_test.sh in the fresh venvs the wheel and the sdist were
installed into, and by cibuildwheel on every built wheel. It starts its own
Mosquitto on a free loopback port (never the system broker on 1883), then,
with `cascade.connectors.mqtt.MqttConnector` (the class CASCADE_CONNECTOR
selects, exactly as Cascade gets it):

- an observer subscribes to the telemetry wildcard and to the presence topics;
- a worker connects (its birth message must reach the observer), publishes
  QoS 0 and QoS 1 telemetry events, and disconnects cleanly (its graceful
  offline message must reach the observer);
- every event must arrive once, decoded, in publish order (MQTT 3.1.1 §4.6:
  a client delivers messages of one topic at one QoS in order).

Exit status 0 when all of that held, 1 with the reason otherwise.
Needs the ``mosquitto`` binary: $MOSQUITTO, else PATH, /usr/sbin, Homebrew's sbin
(`cascade_fast.apps.mosquitto.find_mosquitto`).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.machinery
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

TELEMETRY = "cascade/telemetry/acme/roundtrip/run-{run}/events"
TELEMETRY_FILTER = "cascade/telemetry/+/roundtrip/+/events"
STATUS_FILTER = "cascade/status/+"
TIMEOUT = 20.0


class CheckFailed(Exception):
    """The round trip did not behave as documented."""


@contextmanager
def mosquitto() -> Iterator[int]:
    """Run a private Mosquitto (the package's own launcher) on a free 127.0.0.1 port; yields the port."""
    from cascade_fast.apps.mosquitto import BrokerError, Mosquitto

    try:
        broker = Mosquitto().start()
    except BrokerError as exc:
        raise CheckFailed(str(exc)[-2000:]) from None
    try:
        yield broker.port
    finally:
        broker.close()


def check_import(require_extensions: bool, installed: bool) -> Any:
    """Import cascade_fast and the switch; check where they came from and what loaded."""
    import cascade_fast
    from cascade.connectors import mqtt

    location = Path(cascade_fast.__file__).resolve().parent
    print(f"cascade_fast {cascade_fast.__version__} from {location}")
    print(f"EXTENSIONS_LOADED={cascade_fast.EXTENSIONS_LOADED}; MqttConnector={mqtt.MqttConnector.__module__}.{mqtt.MqttConnector.__qualname__}")
    if installed:
        prefix = Path(sys.prefix).resolve()
        for name, path in (("cascade_fast", location), ("cascade.connectors.mqtt", Path(mqtt.__file__).resolve())):
            if prefix not in path.parents:
                raise CheckFailed(f"{name} was imported from {path}, not from this environment ({prefix}): a source tree shadows it")
    if require_extensions:
        if cascade_fast.EXTENSIONS_LOADED is not True:
            raise CheckFailed("cascade_fast.EXTENSIONS_LOADED is not True: the compiled core did not load")
        suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
        for mod in ("_topics", "_codec", "_protocol"):
            module = sys.modules.get(f"cascade_fast.{mod}")
            if module is None or not str(module.__file__).endswith(suffixes):
                raise CheckFailed(f"cascade_fast.{mod} is not a loaded extension module ({module!r})")
    wanted = os.environ.get("CASCADE_CONNECTOR", "").strip().lower() or "python"
    expected = {"python": "PyMqttConnector", "fast": "FastMqttConnector"}[wanted]
    if mqtt.MqttConnector.__name__ != expected:
        raise CheckFailed(f"CASCADE_CONNECTOR={wanted} selected {mqtt.MqttConnector.__name__}, expected {expected}")
    return mqtt.MqttConnector


async def round_trip(connector_cls: Any, port: int, count: int) -> dict[str, int]:
    """Observer + worker through the broker on `port`; returns the observer's stats."""
    events: list[tuple[str, Any]] = []
    statuses: list[tuple[str, Any]] = []
    all_events = asyncio.Event()
    worker_online = asyncio.Event()
    worker_offline = asyncio.Event()
    worker_id = f"roundtrip-worker-{os.getpid()}"
    total = 2 * count

    def on_event(topic: str, data: Any) -> None:
        events.append((topic, data))
        if len(events) >= total:
            all_events.set()

    def on_status(topic: str, data: Any) -> None:
        statuses.append((topic, data))
        if topic == f"cascade/status/{worker_id}":
            if data == {"status": "online"}:
                worker_online.set()
            elif data == {"status": "offline"} and worker_online.is_set():
                worker_offline.set()

    async def wait(event: asyncio.Event, what: str) -> None:
        try:
            await asyncio.wait_for(event.wait(), TIMEOUT)
        except asyncio.TimeoutError:
            raise CheckFailed(f"timed out after {TIMEOUT:.0f} s waiting for {what}") from None

    observer = connector_cls(hostname="127.0.0.1", port=port, source_id=f"roundtrip-observer-{os.getpid()}")
    await observer.connect()
    try:
        await observer.subscribe(TELEMETRY_FILTER, on_event)
        await observer.subscribe(STATUS_FILTER, on_status)
        worker = connector_cls(hostname="127.0.0.1", port=port, source_id=worker_id)
        await worker.connect()
        try:
            await wait(worker_online, f"the worker's birth message on cascade/status/{worker_id}")
            for qos in (0, 1):
                for i in range(count):
                    event = {"v": "1.0", "source": worker_id, "body": {"type": "TaskStateEvent", "qos": qos, "seq": i}}
                    await worker.publish(TELEMETRY.format(run=qos), event, qos=qos)
            await worker.flush()
        finally:
            await worker.disconnect()
        await wait(all_events, f"{total} telemetry events (got {len(events)})")
        await wait(worker_offline, f"the worker's offline message on cascade/status/{worker_id}")
        await asyncio.sleep(0.2)  # a duplicate would arrive now
        for qos in (0, 1):
            got = [data["body"]["seq"] for topic, data in events if topic == TELEMETRY.format(run=qos)]
            if got != list(range(count)):
                raise CheckFailed(f"QoS {qos} events arrived as {got[:10]}... ({len(got)}), expected 0..{count - 1} in order")
        if len(events) != total:
            raise CheckFailed(f"{len(events)} events delivered, expected exactly {total}")
        stats = observer.stats()
    finally:
        await observer.disconnect()
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--count", type=int, default=200, help="events per QoS level (default 200)")
    parser.add_argument("--require-extensions", action="store_true", help="fail unless the compiled core loaded")
    parser.add_argument("--installed", action="store_true", help="fail unless imported from this environment (sys.prefix)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        connector_cls = check_import(args.require_extensions, args.installed)
        import cascade_fast

        with mosquitto() as port:
            stats = cascade_fast.run(round_trip(connector_cls, port, args.count))
    except CheckFailed as exc:
        print(f"roundtrip_check: FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"roundtrip_check: OK: {connector_cls.__name__} delivered {2 * args.count} events in order "
          f"(QoS 0 and 1), birth and offline seen, in {time.monotonic() - started:.2f} s; observer stats {stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
