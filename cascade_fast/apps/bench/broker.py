"""Brokers for the bench and the tests: start one on a free loopback port, or name one.

`start_broker()` prefers the ``mosquitto`` binary (what Cascade fleets run
against) and falls back to the pure-Python ``amqtt`` broker from PyPI (the
``[embedded]`` extra) so the bench works on a machine where nothing but pip
is available. Either way the broker runs in a child process of its own, in
its own session (a Ctrl-C in the terminal reaches the bench, which then
stops the broker itself, in order), and on Linux it is told to die with its
parent, so a killed bench leaves no broker behind.

``python -m cascade_fast.apps.bench.broker amqtt PORT`` is the amqtt child's
entry point.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

#: Where Debian and Homebrew put the binary when it is not on PATH.
_MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


class BrokerError(RuntimeError):
    """No broker could be started, or the one started did not come up."""


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
    _tmpdir: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

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
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout)
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> "Broker":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it; a small race remains, retried by the starters)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in _MOSQUITTO_CANDIDATES if os.access(p, os.X_OK)), None)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: deliver SIGTERM to the broker when the process that started it dies (prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 == PR_SET_PDEATHSIG
    except Exception:
        pass


def _popen(argv: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Own session: the terminal's Ctrl-C goes to the bench, which
            # stops its clients first and the broker last.
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )


def _wait_listening(proc: subprocess.Popen, host: str, port: int, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerError(f"broker exited with code {proc.returncode}: {_tail(log_path)}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise BrokerError(f"broker did not listen on {host}:{port} within {timeout:.0f} s: {_tail(log_path)}")


def _tail(path: Path, limit: int = 600) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-limit:].strip() or "(no output)"
    return "(no output)"


def mosquitto_config(port: int, host: str = "127.0.0.1") -> str:
    """The mosquitto.conf the bench and the tests use.

    - ``allow_duplicate_messages false``: MQTT 3.1.1 §3.3.5 says a client whose
      subscriptions overlap gets a message once; mosquitto 2.0 only does so
      with this set.
    - persistence off: every run starts with no retained state.
    - ``max_queued_messages 0``: QoS 1 messages for a slow subscriber are
      queued, not dropped, so "lost" in the report means lost by a client.
    - ``set_tcp_nodelay true``: without it the broker's small writes to a
      subscriber wait on Nagle's algorithm and the subscriber's delayed ACK
      (up to 40 ms on Linux), which would bury the clients' own latency.
    """
    return (
        f"listener {port} {host}\n"
        "allow_anonymous true\n"
        "allow_duplicate_messages false\n"
        "persistence false\n"
        "max_queued_messages 0\n"
        "set_tcp_nodelay true\n"
        "log_dest stderr\n"
        "log_type error\n"
        "log_type warning\n"
    )


def mosquitto_version(binary: str) -> str:
    """``mosquitto 2.0.11`` from ``mosquitto -h`` (which exits 3 after printing it)."""
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return "mosquitto"
    first = out.splitlines()[0] if out else ""
    return first.replace(" version ", " ") if first.startswith("mosquitto") else "mosquitto"


def start_mosquitto(binary: str | None = None, *, host: str = "127.0.0.1", timeout: float = 10.0) -> Broker:
    """Start mosquitto on a free loopback port (retrying if the port was taken meanwhile)."""
    binary = binary or find_mosquitto()
    if binary is None:
        raise BrokerError("mosquitto is not installed")
    tmp = tempfile.TemporaryDirectory(prefix="cascade-fast-broker-")
    last_error: BrokerError | None = None
    for _attempt in range(3):
        port = free_port(host)
        conf = Path(tmp.name) / "mosquitto.conf"
        conf.write_text(mosquitto_config(port, host))
        log_path = Path(tmp.name) / "mosquitto.log"
        proc = _popen([binary, "-c", str(conf)], log_path)
        try:
            _wait_listening(proc, host, port, timeout, log_path)
        except BrokerError as exc:
            last_error = exc
            _kill(proc)
            continue
        return Broker(BrokerAddress(host, port), mosquitto_version(binary), proc, tmp)
    tmp.cleanup()
    raise last_error or BrokerError("mosquitto did not start")


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
    last_error: BrokerError | None = None
    for _attempt in range(3):
        port = free_port(host)
        log_path = Path(tmp.name) / "amqtt.log"
        proc = _popen([sys.executable, "-m", "cascade_fast.apps.bench.broker", "amqtt", host, str(port)], log_path)
        try:
            _wait_listening(proc, host, port, timeout, log_path)
        except BrokerError as exc:
            last_error = exc
            _kill(proc)
            continue
        return Broker(BrokerAddress(host, port), kind, proc, tmp)
    tmp.cleanup()
    raise last_error or BrokerError("amqtt did not start")


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


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


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
