"""Brokers for the bench: start one on a free loopback port, or name one.

`start_broker()` prefers the ``mosquitto`` binary (what Cascade fleets run
against), started by the project's one launcher (`cascade_fast.apps.mosquitto`,
with `BENCH_CONFIG` added), and falls back to the pure-Python ``amqtt`` broker
from PyPI (the ``[embedded]`` extra) so the bench works on a machine where
nothing but pip is available. Either way the broker runs detached (see
`cascade_fast.apps.mosquitto.spawn`): in its own session (a Ctrl-C in the
terminal reaches the bench, which then stops the broker itself, in order),
and on Linux told to die with its parent, so a killed bench leaves no broker
behind.

``python -m cascade_fast.apps.bench.broker amqtt HOST PORT`` is the amqtt child's
entry point.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..mosquitto import BrokerError, Mosquitto, find_mosquitto, free_port, spawn, stop_process, wait_accepting

__all__ = ["BENCH_CONFIG", "Broker", "BrokerAddress", "BrokerError", "start_amqtt", "start_broker", "start_mosquitto"]

#: What the bench adds to the launcher's configuration (`cascade_fast.apps.mosquitto.mosquitto_config`):
#: QoS 1 messages for a slow subscriber are queued, not dropped, so "lost" in
#: the report means lost by a client.
BENCH_CONFIG = "max_queued_messages 0"


@dataclass
class BrokerAddress:
    """Where the clients connect, and how (credentials, TLS)."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False
    cafile: str | None = None

    def __str__(self) -> str:
        return f"{self.host}:{self.port}" + (" (TLS)" if self.tls else "")

    def connector_kwargs(self) -> dict:
        """Keyword arguments for a connector constructor (contract: hostname, port, username, password, tls_context)."""
        kwargs: dict = {"hostname": self.host, "port": self.port}
        if self.username is not None:
            kwargs["username"] = self.username
        if self.password is not None:
            kwargs["password"] = self.password
        if self.tls:
            import ssl

            kwargs["tls_context"] = ssl.create_default_context(cafile=self.cafile)
        return kwargs


@dataclass
class Broker:
    """A broker the bench talks to; `stop()` ends it if the bench started it."""

    address: BrokerAddress
    kind: str  # "mosquitto 2.0.11", "amqtt 0.12.1" or "external"
    process: subprocess.Popen | None = None
    _cleanup: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def started_here(self) -> bool:
        return self.process is not None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def describe(self) -> str:
        where = "started by the bench" if self.started_here else "given with --broker"
        return f"{self.kind} on {self.address} ({where})"

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the broker this object started (idempotent); SIGKILL after `timeout`."""
        proc, self.process = self.process, None
        if proc is not None:
            stop_process(proc, timeout)
        cleanup, self._cleanup = self._cleanup, None
        if cleanup is not None:
            cleanup()

    def __enter__(self) -> "Broker":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_mosquitto(binary: str | None = None, *, host: str = "127.0.0.1") -> Broker:
    """Start mosquitto (the launcher's configuration plus `BENCH_CONFIG`) on a free port of `host`."""
    mosquitto = Mosquitto(host=host, binary=binary, extra_config=BENCH_CONFIG, detached=True)
    try:
        mosquitto.start()
    except BrokerError:
        mosquitto.close()
        raise
    return Broker(BrokerAddress(mosquitto.host, mosquitto.port), mosquitto.version, mosquitto.process, mosquitto.close)


def start_amqtt(*, host: str = "127.0.0.1", timeout: float = 20.0) -> Broker:
    """Start the amqtt broker (pure Python, ``[embedded]`` extra) in a child process on a free port."""
    try:
        from importlib.metadata import version

        kind = f"amqtt {version('amqtt')}"
    except Exception:
        raise BrokerError(
            "mosquitto is not installed and the amqtt broker is missing: "
            "install one (`apt-get install mosquitto`, or `pip install 'cascade-fast[embedded]'`) "
            "or pass --broker HOST:PORT"
        ) from None
    tmp = tempfile.TemporaryDirectory(prefix="cascade-fast-broker-")
    log_path = Path(tmp.name) / "amqtt.log"
    last_error: BrokerError | None = None
    for _attempt in range(3):  # another process may take the free port first
        port = free_port(host)
        proc = spawn([sys.executable, "-m", "cascade_fast.apps.bench.broker", "amqtt", host, str(port)], log_path, detached=True)
        try:
            wait_accepting(proc, host, port, timeout, lambda: _tail(log_path))
        except BrokerError as exc:
            last_error = exc
            stop_process(proc, kill=True)
            continue
        return Broker(BrokerAddress(host, port), kind, proc, tmp.cleanup)
    tmp.cleanup()
    raise last_error or BrokerError("amqtt did not start")


def _tail(path: Path, limit: int = 600) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-limit:].strip() or "(no output)"
    return "(no output)"


def start_broker(prefer: str = "auto", *, host: str = "127.0.0.1") -> Broker:
    """mosquitto when installed (``prefer="auto"``), else amqtt; ``prefer`` may force either."""
    if prefer not in ("auto", "mosquitto", "amqtt"):
        raise ValueError(f"prefer must be 'auto', 'mosquitto' or 'amqtt', not {prefer!r}")
    if prefer in ("auto", "mosquitto"):
        binary = find_mosquitto()
        if binary is not None:
            return start_mosquitto(binary, host=host)
        if prefer == "mosquitto":
            raise BrokerError("mosquitto is not installed (apt-get install mosquitto, brew install mosquitto)")
    return start_amqtt(host=host)


def _run_amqtt(host: str, port: int) -> None:  # pragma: no cover - child process
    """Serve amqtt on host:port until SIGTERM/SIGINT."""
    import asyncio
    import logging

    from amqtt.broker import Broker as AmqttBroker

    logging.basicConfig(level=logging.WARNING)
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }

    async def serve() -> None:
        broker = AmqttBroker(config)
        await broker.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await broker.shutdown()

    asyncio.run(serve())


if __name__ == "__main__":  # pragma: no cover - child process
    if len(sys.argv) != 4 or sys.argv[1] != "amqtt":
        sys.exit("usage: python -m cascade_fast.apps.bench.broker amqtt HOST PORT")
    _run_amqtt(sys.argv[2], int(sys.argv[3]))
