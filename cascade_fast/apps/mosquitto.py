"""The one Mosquitto launcher: a private broker on a free loopback port.

`cascade-fast bench`, the tests (tests/broker.py re-exports this module), the
benches and tools/roundtrip_check.py all start Mosquitto through `Mosquitto`,
so they all run the same broker configuration (`mosquitto_config`) and find
the binary the same way (`find_mosquitto`). The system broker on port 1883
is never used.

Each broker gets its own generated config and temporary directory, listens
on 127.0.0.1 only and keeps nothing on disk unless asked to (so a restart
forgets retained messages and sessions). Callers add what only they need
with ``extra_config`` lines (later lines win in mosquitto.conf).
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
from pathlib import Path
from typing import Callable

__all__ = [
    "BrokerError",
    "Mosquitto",
    "MosquittoNotFound",
    "find_mosquitto",
    "free_port",
    "mosquitto_config",
    "mosquitto_version",
    "spawn",
    "stop_process",
    "wait_accepting",
]

#: Seconds to wait for a started broker to accept connections.
START_TIMEOUT = 10.0
#: Seconds a terminated broker gets before it is killed.
STOP_TIMEOUT = 5.0
#: Where Debian, a source install and Homebrew put the binary when it is not on PATH.
_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")
_INSTALL_HINT = "apt-get install mosquitto, brew install mosquitto, or set $MOSQUITTO"


class BrokerError(RuntimeError):
    """No broker could be started, or the one started did not come up."""


class MosquittoNotFound(BrokerError):
    """No mosquitto binary in $MOSQUITTO, on PATH or in the usual sbin directories."""


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary (``$MOSQUITTO``, PATH, then the sbin directories), or None."""
    for candidate in (os.environ.get("MOSQUITTO"), shutil.which("mosquitto"), *_CANDIDATES):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listened on a moment ago (a race remains; `Mosquitto.start` retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def mosquitto_config(
    port: int,
    *,
    host: str = "127.0.0.1",
    persistence_dir: Path | None = None,
    acl_file: Path | None = None,
    extra_config: str = "",
) -> str:
    """The text of a mosquitto.conf; every broker this project starts runs one of these.

    - ``allow_duplicate_messages false``: MQTT 3.1.1 §3.3.5 says a client whose
      subscriptions overlap gets a message once; Mosquitto 2.0 only does so
      with this set.
    - ``set_tcp_nodelay true``: without it the broker's small writes to a
      subscriber wait on Nagle's algorithm and the subscriber's delayed ACK
      (up to 40 ms on Linux), which would bury the clients' own latency.
    - persistence only with `persistence_dir` (sessions, their queued and
      retained messages then survive a graceful restart).
    - the log goes to stderr (the launcher captures it into a file), with
      connection messages, so a failure can show what the broker saw.
    - `extra_config` lines come last: later lines win in mosquitto.conf.
    """
    lines = [
        f"listener {port} {host}",
        "allow_anonymous true",
        "allow_duplicate_messages false",
        "set_tcp_nodelay true",
        "persistence true" if persistence_dir is not None else "persistence false",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
    ]
    if acl_file is not None:
        lines.append(f"acl_file {acl_file}")
    if persistence_dir is not None:
        lines += [f"persistence_location {persistence_dir}/", "persistence_file mosquitto.db"]
    lines.extend(line.strip() for line in extra_config.splitlines() if line.strip())
    return "\n".join(lines) + "\n"


def mosquitto_version(binary: str) -> str:
    """``mosquitto 2.0.11`` from ``mosquitto -h`` (which exits 3 after printing it)."""
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return "mosquitto"
    first = out.splitlines()[0] if out else ""
    return first.replace(" version ", " ") if first.startswith("mosquitto") else "mosquitto"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: deliver SIGTERM to the broker when the thread that started it dies (prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        _LIBC.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 == PR_SET_PDEATHSIG


_LIBC = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(Exception):
        import ctypes

        # Loaded here, not in the forked child, where an import could deadlock.
        _LIBC = ctypes.CDLL(None, use_errno=True)


def spawn(argv: list[str], log_path: Path, *, detached: bool = False) -> subprocess.Popen[bytes]:
    """Start a broker process with its output appended to `log_path`.

    `detached` (for an interactive command such as ``cascade-fast bench``):
    the child gets its own session, so the terminal's Ctrl-C reaches the
    command, which stops its clients first and the broker last; and on Linux
    it is told to die with the thread that started it, so a killed command
    leaves no broker behind. Not for the tests: they stop and restart
    brokers from worker threads, whose end would kill the broker.
    """
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=detached,
            preexec_fn=_die_with_parent if detached and _LIBC is not None else None,
        )


def wait_accepting(proc: subprocess.Popen[bytes], host: str, port: int, timeout: float, log: Callable[[], str]) -> None:
    """Return once `host:port` accepts TCP connections; BrokerError (with the log) if `proc` exits or `timeout` passes.

    The process is left running on a timeout; the caller decides whether to kill it.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BrokerError(f"broker exited with code {proc.returncode} on port {port}:\n{log()}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BrokerError(f"broker did not accept connections on {host}:{port} within {timeout:.0f} s:\n{log()}") from None
            time.sleep(0.01)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT, *, kill: bool = False) -> None:
    """SIGTERM (or SIGKILL with `kill`) and wait; SIGKILL if it does not end within `timeout`."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        if kill:
            proc.send_signal(signal.SIGCONT)  # a paused process must be able to die
            proc.kill()
        else:
            proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout)


class Mosquitto:
    """One mosquitto process on `host`:`port` (a free port unless given), restartable on the same port.

    ``extra_config`` lines are appended to the generated config (for example
    ``allow_anonymous false`` for a broker that refuses everyone);
    ``acl`` is the text of an ACL file (``acl_file`` is then set).
    ``persistence=True`` keeps sessions, their queued messages and retained
    messages in a file in the broker's temporary directory, so they survive
    a graceful `restart` (SIGTERM: Mosquitto saves on exit; a kill loses
    what was not saved yet). ``detached``: see `spawn`.
    Raises `MosquittoNotFound` when there is no binary.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        extra_config: str = "",
        acl: str | None = None,
        persistence: bool = False,
        binary: str | None = None,
        detached: bool = False,
    ) -> None:
        found = binary or find_mosquitto()
        if found is None:
            raise MosquittoNotFound(f"mosquitto not found: {_INSTALL_HINT}")
        self.binary = found
        self.host = host
        self._fixed_port = port
        self.port = port or free_port(host)
        self._extra_config = extra_config
        self._acl = acl
        self._persistence = persistence
        self._detached = detached
        self._dir = Path(tempfile.mkdtemp(prefix="cascade-mosquitto-"))
        # Started as root, mosquitto drops to the `mosquitto` user before it
        # reads the ACL file: the directory and files must be readable to it.
        self._dir.chmod(0o755)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self._dir / "mosquitto.log"

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self._proc

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def version(self) -> str:
        """``mosquitto 2.0.11``: what this binary says it is."""
        return mosquitto_version(self.binary)

    def _write_config(self) -> Path:
        acl_file = None
        if self._acl is not None:
            acl_file = self._dir / "acl"
            acl_file.write_text(self._acl)
            acl_file.chmod(0o644)
        data = None
        if self._persistence:
            # A directory the `mosquitto` user can write to (see __init__:
            # started as root, it drops privileges before saving).
            data = self._dir / "data"
            data.mkdir(exist_ok=True)
            data.chmod(0o777)
        path = self._dir / "mosquitto.conf"
        path.write_text(
            mosquitto_config(self.port, host=self.host, persistence_dir=data, acl_file=acl_file, extra_config=self._extra_config)
        )
        return path

    def start(self) -> Mosquitto:
        """Start mosquitto and wait (bounded) until it accepts TCP connections; BrokerError if it does not.

        A port that turns out to be taken is replaced by another free one,
        unless the caller asked for a fixed port.
        """
        if self.running:
            return self
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            config = self._write_config()
            self._proc = spawn([self.binary, "-c", str(config)], self.log_path, detached=self._detached)
            try:
                wait_accepting(self._proc, self.host, self.port, START_TIMEOUT, self.log)
                return self
            except BrokerError:
                self.kill()
                if attempt + 1 == attempts:
                    raise
                self.port = free_port(self.host)  # lost the race for the port: try another
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """SIGTERM (mosquitto closes its client connections) and wait; SIGKILL if it hangs."""
        if self._proc is not None:
            stop_process(self._proc)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: the broker vanishes; the kernel resets its connections."""
        if self._proc is not None:
            stop_process(self._proc, kill=True)
        self._proc = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is read or answered (a stalled broker)."""
        if self._proc is not None and self.running:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        if self._proc is not None and self.running:
            self._proc.send_signal(signal.SIGCONT)

    def restart(self, *, kill: bool = False) -> None:
        """Stop (or kill) and start again on the same port; retained state is gone unless `persistence`."""
        self.kill() if kill else self.stop()
        self._fixed_port = self.port
        self.start()

    def log(self) -> str:
        """The broker's log so far (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        """Stop the broker and remove its directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Mosquitto {self.host}:{self.port} pid={self.pid} {'running' if self.running else 'stopped'}>"
