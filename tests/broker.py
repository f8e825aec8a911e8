"""A real Mosquitto for the tests: start on a free loopback port, stop, kill, restart.

Every broker gets its own generated config and temporary directory, listens
on 127.0.0.1 only, keeps nothing on disk unless asked to (so a restart
forgets retained messages and sessions), and sets ``allow_duplicate_messages false`` so a
client with overlapping subscriptions gets each message once (MQTT 3.1.1
§3.3.5; Mosquitto 2.0 defaults to sending duplicates). The system broker on
port 1883 is never used.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["Mosquitto", "MosquittoNotFound", "find_mosquitto", "free_port"]

#: Seconds to wait for a started broker to accept connections.
START_TIMEOUT = 10.0
#: Seconds a terminated broker gets before it is killed.
STOP_TIMEOUT = 5.0


class MosquittoNotFound(RuntimeError):
    """No mosquitto binary on PATH or in /usr/sbin (install the Debian package `mosquitto`)."""


def find_mosquitto() -> str:
    """Path of the mosquitto binary (``$MOSQUITTO``, PATH, then /usr/sbin)."""
    candidates = [os.environ.get("MOSQUITTO"), shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise MosquittoNotFound("mosquitto not found: apt-get install mosquitto (or set $MOSQUITTO)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Mosquitto:
    """One mosquitto process on 127.0.0.1:`port`, restartable on the same port.

    ``extra_config`` lines are appended to the generated config (for example
    ``allow_anonymous false`` for a broker that refuses everyone);
    ``acl`` is the text of an ACL file (``acl_file`` is then set).
    ``persistence=True`` keeps sessions, their queued messages and retained
    messages in a file in the broker's temporary directory, so they survive
    a graceful `restart` (SIGTERM: Mosquitto saves on exit; a kill loses
    what was not saved yet).
    """

    host = "127.0.0.1"

    def __init__(
        self, *, port: int | None = None, extra_config: str = "", acl: str | None = None, persistence: bool = False
    ) -> None:
        self._binary = find_mosquitto()
        self._fixed_port = port
        self.port = port or free_port()
        self._extra_config = extra_config
        self._acl = acl
        self._persistence = persistence
        self._dir = Path(tempfile.mkdtemp(prefix="cascade-mosquitto-"))
        # Started as root, mosquitto drops to the `mosquitto` user before it
        # reads the ACL file: the directory and files must be readable to it.
        self._dir.chmod(0o755)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file = None

    @property
    def log_path(self) -> Path:
        return self._dir / "mosquitto.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _write_config(self) -> Path:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true" if self._persistence else "persistence false",
            "allow_duplicate_messages false",
            # Log to stderr (captured into a file) so a failing test can show it.
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if self._acl is not None:
            acl_path = self._dir / "acl"
            acl_path.write_text(self._acl)
            acl_path.chmod(0o644)
            lines.append(f"acl_file {acl_path}")
        if self._persistence:
            # A directory the `mosquitto` user can write to (see __init__:
            # started as root, it drops privileges before saving).
            data = self._dir / "data"
            data.mkdir(exist_ok=True)
            data.chmod(0o777)
            lines += [f"persistence_location {data}/", "persistence_file mosquitto.db"]
        # Later lines win in mosquitto.conf, so extra_config can override.
        lines.extend(line.strip() for line in self._extra_config.splitlines() if line.strip())
        path = self._dir / "mosquitto.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self) -> Mosquitto:
        """Start mosquitto and wait (bounded) until it accepts TCP connections.

        A port that turns out to be taken is replaced by another free one,
        unless the caller asked for a fixed port.
        """
        if self.running:
            return self
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            config = self._write_config()
            self._log_file = open(self.log_path, "ab")
            self._proc = subprocess.Popen(
                [self._binary, "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
            )
            try:
                self._wait_accepting()
                return self
            except RuntimeError:
                if attempt + 1 == attempts or self.running:
                    raise
                self.port = free_port()  # lost the race for the port: try another
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait_accepting(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self._proc.returncode} on port {self.port}:\n{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"mosquitto did not accept connections on port {self.port}:\n{self.log()}")
                time.sleep(0.01)

    def stop(self) -> None:
        """SIGTERM (mosquitto closes its client connections) and wait; SIGKILL if it hangs."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        self._reap()

    def kill(self) -> None:
        """SIGKILL: the broker vanishes; the kernel resets its connections."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a paused broker must be able to die
            proc.kill()
            proc.wait(STOP_TIMEOUT)
        self._reap()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is read or answered (a stalled broker)."""
        if self.running:
            assert self._proc is not None
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        if self.running:
            assert self._proc is not None
            self._proc.send_signal(signal.SIGCONT)

    def restart(self, *, kill: bool = False) -> None:
        """Stop (or kill) and start again on the same port; retained state is gone unless `persistence`."""
        self.kill() if kill else self.stop()
        self._fixed_port = self.port
        self.start()

    def _reap(self) -> None:
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

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
