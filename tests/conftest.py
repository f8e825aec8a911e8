"""Fixtures shared by the test suite: real Mosquitto brokers, connectors per implementation, loops.

The behaviour suite (``tests/test_connector_*.py``) runs unchanged against
every connector implementation named in `CONNECTOR_IMPLEMENTATIONS`, on the
default asyncio loop and on uvloop. Adding an implementation is one line:
append its name to `CONNECTOR_IMPLEMENTATIONS` (its class is looked up in
`CONNECTOR_CLASSES`, imported lazily).
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import itertools
import os
import secrets
from typing import Any, Callable

import pytest

from broker import Mosquitto

# Subprocesses started by tests (the Last Will child) must import the code
# under test, never a copy that happens to sit in their working directory.
os.environ.setdefault("PYTHONSAFEPATH", "1")

#: Implementations the behaviour suite runs against.
CONNECTOR_IMPLEMENTATIONS = ["python", "fast"]

#: Implementation name -> "module:Class" (imported only when a test needs it,
#: so a missing compiled core fails only the tests of that implementation).
CONNECTOR_CLASSES = {
    "python": "cascade.connectors.mqtt.reference:PyMqttConnector",
    "fast": "cascade_fast:FastMqttConnector",
}

#: Test modules whose async tests run on both event loops.
_BOTH_LOOPS_PREFIX = "test_connector_"


def load_connector_class(name: str) -> type:
    """The connector class implementation `name` stands for."""
    module_name, _, attr = CONNECTOR_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return None
    return uvloop.new_event_loop


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Behaviour tests run on asyncio and on uvloop; every other async test on asyncio only."""
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
    if item.path.name.startswith(_BOTH_LOOPS_PREFIX):
        uvloop_factory = _uvloop_factory()
        if uvloop_factory is not None:
            factories["uvloop"] = uvloop_factory
    return factories


@pytest.fixture(scope="session")
def broker():
    """A Mosquitto shared by the whole session, for tests that do not kill or restart it."""
    with Mosquitto() as mosquitto:
        yield mosquitto


@pytest.fixture
def private_broker():
    """A Mosquitto of this test's own, which the test may stop, kill, pause or restart."""
    with Mosquitto() as mosquitto:
        yield mosquitto


@pytest.fixture(params=CONNECTOR_IMPLEMENTATIONS)
def connector_impl(request: pytest.FixtureRequest) -> str:
    """The name of the connector implementation under test (one test run per name)."""
    return request.param


class ConnectorFactory:
    """Builds connectors of one implementation; disconnects every one of them at teardown.

    ``factory()`` gives an unconnected connector for the session broker;
    ``factory(private_broker)`` for another one; keyword arguments override
    the defaults (short reconnect delays, a unique ``source_id`` per call).
    """

    def __init__(self, name: str, broker: Mosquitto) -> None:
        self.name = name
        self.import_path = CONNECTOR_CLASSES[name]
        self.cls = load_connector_class(name)
        self.broker = broker
        self._made: list[Any] = []
        self._ids = itertools.count(1)
        self._run_id = secrets.token_hex(3)

    def source_id(self) -> str:
        """A source id no other connector of the session uses."""
        return f"test-{self.name}-{self._run_id}-{next(self._ids)}"

    def __call__(self, broker: Mosquitto | None = None, **kwargs: Any) -> Any:
        target = broker or self.broker
        options: dict[str, Any] = {
            "hostname": target.host,
            "port": target.port,
            "source_id": self.source_id(),
            "reconnect_delay": 0.05,
            "max_reconnect_delay": 0.5,
            "connect_timeout": 5.0,
        }
        options.update(kwargs)
        connector = self.cls(**options)
        self._made.append(connector)
        return connector

    async def aclose(self) -> None:
        for connector in reversed(self._made):
            await asyncio.wait_for(connector.disconnect(), timeout=15)
        self._made.clear()


@pytest.fixture
async def connector_factory(connector_impl: str, broker: Mosquitto):
    """Makes connectors of the implementation under test (unique source_id each); all disconnected at teardown."""
    factory = ConnectorFactory(connector_impl, broker)
    try:
        yield factory
    finally:
        await factory.aclose()


@pytest.fixture
async def loop_guard():
    """Fails the test if the loop's exception handler was called or a task was left running (uvloop _testbase idea)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        errors.append(context)
        loop.default_exception_handler(context)

    previous = loop.get_exception_handler()
    loop.set_exception_handler(handler)
    try:
        yield errors
        # "Task exception was never retrieved" and "Future exception was never
        # retrieved" are reported when the object is collected: collect now,
        # while this test is still the one to blame.
        for _ in range(3):
            await asyncio.sleep(0)
        gc.collect()
        current = asyncio.current_task()
        leftover = [task for task in asyncio.all_tasks() if task is not current and not task.done()]
        assert not leftover, f"tasks still running after the connectors were disconnected: {leftover}"
        assert not errors, "the event loop's exception handler was called:\n" + "\n".join(
            f"- {context.get('message')}: {context.get('exception')!r}" for context in errors
        )
    finally:
        loop.set_exception_handler(previous)
