"""`cascade-fast watch`: the fleet view's logic, and the command against a real fleet.

The end-to-end test starts a private mosquitto on a free port, a small fleet
of simulated Cascade instances in subprocesses (`cascade_fast.apps.bench.simulate`),
and ``cascade-fast watch --plain``; it SIGKILLs one instance and reads the
watcher's output until the broker's Last Will has marked it offline.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from cascade_fast.apps.bench.broker import start_mosquitto
from cascade_fast.apps.watch import FleetView, render_plain, summary_line

from broker import needs_mosquitto


def _fast_usable() -> bool:
    """True when FastMqttConnector imports (compiled core loaded)."""
    try:
        import cascade_fast

        cascade_fast.FastMqttConnector
    except ImportError:
        return False
    return True


CONNECTORS = [
    pytest.param("python", "PyMqttConnector", id="python"),
    pytest.param("fast", "FastMqttConnector", id="fast", marks=pytest.mark.skipif(not _fast_usable(), reason="compiled core not loaded")),
]


class FakeClock:
    """A settable clock for FleetView's wall and monotonic time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def event(source: str, state: str = "COMPLETED", project: str = "demo") -> dict:
    """A Cascade telemetry envelope from `source`."""
    return {"v": "1.0", "source": source, "project_id": project, "body": {"type": "TaskStateEvent", "task_name": "load", "state": state}}


# --- FleetView (pure logic) ---------------------------------------------------------


def test_status_birth_and_last_will_set_presence_and_since():
    """online then offline on cascade/status/{source}; `since` is when the change was seen."""
    clock = FakeClock()
    view = FleetView(clock=clock, monotonic=clock)
    view.on_status("cascade/status/host-1", {"status": "online"})
    clock.now += 5
    view.on_status("cascade/status/host-1", {"status": "online"})  # repeated birth: no change
    (row,) = view.rows()
    assert (row.source, row.status, row.since) == ("host-1", "online", 1000.0)
    clock.now += 5
    view.on_status("cascade/status/host-1", {"status": "offline"})
    assert (row.status, row.since) == ("offline", 1010.0)
    assert view.summary()["offline"] == 1 and view.summary()["online"] == 0


def test_cleared_status_forgets_the_instance_and_junk_is_counted():
    """An empty retained payload (decoded as {}) removes the row; an unknown status is counted, not shown."""
    view = FleetView()
    view.on_status("cascade/status/a", {"status": "online"})
    view.on_status("cascade/status/a", {})
    view.on_status("cascade/status/b", {"status": "sleeping"})
    assert view.rows() == [] and view.bad_messages == 1


def test_events_count_per_source_with_failures_and_last_event():
    """Telemetry counts per envelope source; FAILED tasks are counted; the last event is kept."""
    view = FleetView()
    view.on_event("cascade/telemetry/acme/demo/run-1/events", event("a"))
    view.on_event("cascade/telemetry/acme/demo/run-1/events", event("a", "FAILED"))
    view.on_event("cascade/telemetry/acme/demo/run-2/events", event("b"))
    view.on_event("cascade/telemetry/acme/demo/run-2/events", "not a dict")
    rows = {r.source: r for r in view.rows()}
    assert (rows["a"].events, rows["a"].failed, rows["a"].last_event) == (2, 1, "FAILED load")
    assert rows["a"].status == "unknown"  # telemetry seen, no presence yet
    assert rows["b"].events == 1 and view.bad_messages == 1
    assert view.summary() == {"instances": 2, "online": 0, "offline": 0, "unknown": 2, "rate": 0.0, "events": 3, "failed": 1}


def test_rate_is_events_over_the_trailing_window():
    """msgs/s = events since the oldest sample within the window / elapsed."""
    clock = FakeClock()
    view = FleetView(clock=clock, monotonic=clock)
    view.on_status("cascade/status/a", {"status": "online"})
    for _ in range(10):
        clock.now += 1
        for _ in range(20):
            view.on_event("t/x/demo/r/events", event("a"))
        view.tick()
    (row,) = view.rows()
    assert row.rate(clock.now) == pytest.approx(20.0)
    assert "20.0 msgs/s" in summary_line(view)


def test_own_source_is_ignored_and_rows_sort_online_first():
    """The watcher's own presence is not a fleet row; online rows come before offline ones."""
    view = FleetView(ignore={"me"})
    view.on_status("cascade/status/me", {"status": "online"})
    view.on_status("cascade/status/z", {"status": "online"})
    view.on_status("cascade/status/a", {"status": "offline"})
    assert [r.source for r in view.rows()] == ["z", "a"]
    text = render_plain(view, "hdr")
    assert text.splitlines()[0].startswith("hdr")
    assert text.splitlines()[-1] == summary_line(view)


# --- end to end ---------------------------------------------------------------------


class LineReader:
    """Reads a process's stdout on a thread; `wait_for` blocks (bounded) until a predicate holds on all text so far."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.text = ""
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            self._lines.put(line)

    def wait_for(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.last_block()):
                return True
            try:
                self.text += self._lines.get(timeout=0.1)
            except queue.Empty:
                pass
        return predicate(self.last_block())

    def last_block(self) -> str:
        """The last complete refresh block (blocks end with a blank line)."""
        blocks = [b for b in self.text.split("\n\n") if b.strip()]
        complete = blocks if self.text.endswith("\n\n") else blocks[:-1]
        return complete[-1] if complete else ""


def row_status(block: str, source: str) -> str | None:
    """The status column of `source`'s row in a plain block."""
    match = re.search(rf"^{re.escape(source)}\s+(online|offline|unknown)\b", block, re.M)
    return match.group(1) if match else None


@needs_mosquitto
@pytest.mark.parametrize("connector, class_name", CONNECTORS)
def test_watch_shows_a_killed_instance_go_offline_by_its_last_will(connector, class_name):
    """3 instances online with telemetry; SIGKILL one: the watcher shows it offline, the others online.

    CASCADE_CONNECTOR picks the implementation for the fleet and the watcher alike.
    """
    env = dict(os.environ, CASCADE_CONNECTOR=connector)
    procs: list[subprocess.Popen] = []
    with start_mosquitto() as broker:
        target = f"127.0.0.1:{broker.address.port}"
        try:
            for name in ("wt-a", "wt-b", "wt-c"):
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "cascade_fast.apps.bench.simulate", "--broker", target, "--instances", "1",
                         "--source-prefix", name, "--rate", "20", "--duration", "40", "--project", "demo"],
                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                    )  # fmt: skip
                )
            watch = subprocess.Popen(
                [sys.executable, "-m", "cascade_fast.apps.cli", "watch", "--broker", target, "--plain", "--interval", "0.5",
                 "--duration", "40", "--project", "demo"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            procs.append(watch)
            reader = LineReader(watch)

            def all_online_with_telemetry(block: str) -> bool:
                return all(row_status(block, n) == "online" for n in ("wt-a", "wt-b", "wt-c")) and bool(
                    re.search(r"^wt-a\s+online\s+\S+\s+[\d.]+\s+[1-9]\d*", block, re.M)
                )

            assert reader.wait_for(all_online_with_telemetry, 30), reader.text[-2000:]
            assert f"connector {class_name}" in reader.last_block()

            procs[0].send_signal(signal.SIGKILL)  # no clean shutdown: only the Last Will can tell
            procs[0].wait(10)
            assert reader.wait_for(lambda b: row_status(b, "wt-a") == "offline", 15), reader.text[-2000:]
            block = reader.last_block()
            assert row_status(block, "wt-b") == row_status(block, "wt-c") == "online"
            assert "3 instances: 2 online, 1 offline" in block

            watch.send_signal(signal.SIGINT)  # stops cleanly, exit 0
            assert watch.wait(15) == 0, watch.stderr.read()
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(10)


@needs_mosquitto
def test_watch_once_prints_one_block_and_exits():
    """--once --duration: one plain block after the duration, exit 0; retained presence is seen."""
    with start_mosquitto() as broker:
        target = f"127.0.0.1:{broker.address.port}"
        env = dict(os.environ, CASCADE_CONNECTOR="python")
        sim = subprocess.run(
            [sys.executable, "-m", "cascade_fast.apps.bench.simulate", "--broker", target, "--instances", "2",
             "--source-prefix", "gone", "--rate", "0", "--duration", "0.2"],
            env=env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert sim.returncode == 0, sim.stderr
        result = subprocess.run(
            [sys.executable, "-m", "cascade_fast.apps.cli", "watch", "--broker", target, "--once", "--duration", "1"],
            env=env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("cascade-fast watch") == 1
    # Clean shutdown published a retained offline status for both instances.
    assert row_status(result.stdout, "gone-0") == row_status(result.stdout, "gone-1") == "offline"
    assert "2 instances: 0 online, 2 offline" in result.stdout


@needs_mosquitto
def test_watch_project_filter_counts_only_that_projects_telemetry():
    """--project demo: an instance of another project shows (presence) but none of its events count."""
    with start_mosquitto() as broker:
        target = f"127.0.0.1:{broker.address.port}"
        env = dict(os.environ, CASCADE_CONNECTOR="python")
        sims = [
            subprocess.Popen(
                [sys.executable, "-m", "cascade_fast.apps.bench.simulate", "--broker", target, "--instances", "1",
                 "--source-prefix", f"in-{project}", "--project", project, "--rate", "50", "--duration", "8"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            for project in ("demo", "other")
        ]
        try:
            for sim in sims:  # both connected and publishing before the watcher starts
                assert sim.stdout.readline().startswith("online:"), sim.stderr.read()
            result = subprocess.run(
                [sys.executable, "-m", "cascade_fast.apps.cli", "watch", "--broker", target, "--project", "demo",
                 "--once", "--duration", "1.5"],
                env=env, capture_output=True, text=True, timeout=30,
            )  # fmt: skip
        finally:
            for sim in sims:
                sim.kill()
                sim.wait(10)
    assert result.returncode == 0, result.stderr
    assert "project demo" in result.stdout
    rows = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(in-\w+)\s+online\s+\S+\s+[\d.]+\s+(\d+)", result.stdout, re.M)}
    assert rows["in-demo"] > 0 and rows["in-other"] == 0, result.stdout


def test_watch_unreachable_broker_fails_with_a_message():
    """No broker at the address: exit 1 and a message naming it, no traceback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        result = subprocess.run(
            [sys.executable, "-m", "cascade_fast.apps.cli", "watch", "--broker", f"127.0.0.1:{port}", "--once", "--duration", "1"],
            capture_output=True, text=True, timeout=60, env=dict(os.environ, CASCADE_CONNECTOR="python"),
        )  # fmt: skip
    assert result.returncode == 1
    assert f"cannot connect to 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
