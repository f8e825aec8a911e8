"""Presence on ``cascade/status/{source_id}``: birth, graceful offline, Last Will, as an outside watcher sees it."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import warnings
from pathlib import Path

import pytest

from cascade.connectors.mqtt import _common
from observer import Watcher

pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("loop_guard")]

LWT_CHILD = Path(__file__).with_name("lwt_child.py")


def is_payload(payload: bytes):
    """Predicate for `Watcher.wait_for`: a message carrying exactly `payload`."""
    return lambda message: message.payload == payload


async def test_birth_online_is_retained_for_a_late_watcher(connector_factory, broker):
    """After connect(), a watcher that subscribes later gets the retained {"status":"online"}."""
    connector = connector_factory()
    await connector.connect()
    await connector.flush(timeout=5)
    topic = _common.status_topic(connector.source_id)
    async with Watcher(broker, topic) as late:
        message = await late.wait_for(lambda m: True)
    assert message.topic == topic
    assert message.payload == _common.ONLINE_PAYLOAD
    assert message.retain


async def test_graceful_disconnect_publishes_retained_offline(connector_factory, broker):
    """disconnect() publishes {"status":"offline"} retained: live watchers and late ones both see it."""
    connector = connector_factory()
    topic = _common.status_topic(connector.source_id)
    async with Watcher(broker, topic) as watcher:
        await connector.connect()
        await watcher.wait_for(is_payload(_common.ONLINE_PAYLOAD))
        await connector.disconnect()
        await watcher.wait_for(is_payload(_common.OFFLINE_PAYLOAD))
    async with Watcher(broker, topic) as late:
        message = await late.wait_for(lambda m: True)
    assert message.payload == _common.OFFLINE_PAYLOAD and message.retain


async def test_last_will_reaches_a_watcher_when_the_process_is_killed(connector_factory, broker):
    """SIGKILL of a process holding a connector makes the broker publish the retained Last Will (offline)."""
    source_id = connector_factory.source_id()
    topic = _common.status_topic(source_id)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    async with Watcher(broker, topic) as watcher:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            str(LWT_CHILD),
            connector_factory.import_path,
            broker.host,
            str(broker.port),
            source_id,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        try:
            line = await asyncio.wait_for(child.stdout.readline(), 30)
            if line != b"ready\n":
                _, stderr = await asyncio.wait_for(child.communicate(), 10)
                pytest.fail(f"child did not connect: {line!r}\n{stderr.decode(errors='replace')}")
            await watcher.wait_for(is_payload(_common.ONLINE_PAYLOAD))
            child.send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(child.wait(), 10) == -signal.SIGKILL
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
        will = await watcher.wait_for(is_payload(_common.OFFLINE_PAYLOAD))
    assert will.topic == topic
    async with Watcher(broker, topic) as late:
        message = await late.wait_for(lambda m: True)
    assert message.payload == _common.OFFLINE_PAYLOAD and message.retain


async def test_garbage_collected_connector_warns_and_drops_its_connection(connector_factory, broker):
    """A connector collected while connected emits ResourceWarning and closes without DISCONNECT (Last Will)."""
    connector = connector_factory.cls(
        broker.host, broker.port, source_id=connector_factory.source_id(), reconnect_delay=0.05, max_reconnect_delay=0.5
    )
    topic = _common.status_topic(connector.source_id)
    async with Watcher(broker, topic) as watcher:
        await connector.connect()
        await watcher.wait_for(is_payload(_common.ONLINE_PAYLOAD))
        with pytest.warns(ResourceWarning):
            del connector
            gc.collect()
        # Like an asyncio transport collected open, the connection is closed,
        # abruptly: the broker sends the Last Will.
        await watcher.wait_for(is_payload(_common.OFFLINE_PAYLOAD))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
