"""Reference connector only: the paho internals its workarounds stand on, and the limits it documents.

The packet validation of `PyMqttConnector` (``_paho_guard``) wraps paho
internals per instance; these tests fail loudly, naming what changed, when
a paho upgrade moves them, instead of letting validation silently stop.
"""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import aiomqtt
import paho.mqtt.client as paho
import pytest

from cascade.connectors.mqtt import _paho_guard, reference
from cascade.connectors.mqtt.reference import PyMqttConnector
from test_connector_failfast import HandshakePeer

pytestmark = [pytest.mark.fault]


def _paho_client() -> paho.Client:
    """A paho client as aiomqtt makes it (never connected; needs a running loop)."""
    return aiomqtt.Client("127.0.0.1", 1)._client


async def test_paho_has_the_internals_the_packet_guard_wraps():
    """Every paho internal the guard relies on exists, with the shape it reads (paho-mqtt 2.2)."""
    client = _paho_client()
    _paho_guard.require_paho_internals(client)
    assert set(_paho_guard.IN_PACKET_KEYS) <= set(client._in_packet)
    assert isinstance(client._in_packet["remaining_count"], list)
    assert isinstance(client._in_packet["packet"], (bytes, bytearray))
    # paho closes the connection on any error code its read step returns.
    assert paho.MQTT_ERR_PROTOCOL > 0 and paho.MQTT_ERR_CONN_REFUSED > 0


async def test_the_guard_is_what_paho_calls():
    """Installed, the guard's hooks shadow paho's methods on that instance only."""
    client = _paho_client()
    guard = _paho_guard.PacketGuard(client, 1 << 20, lambda error: None)
    assert client._packet_handle == guard._packet_handle
    assert client._packet_read == guard._packet_read
    assert client.subscribe == guard._track_subscribe
    assert _paho_client()._packet_handle.__func__ is paho.Client._packet_handle


def test_missing_paho_internals_fail_loudly():
    """A paho without the wrapped internals is refused at connection time, naming what is missing."""
    stripped = SimpleNamespace(_packet_read=None, _in_packet={"command": 0})
    with pytest.raises(RuntimeError) as excinfo:
        _paho_guard.require_paho_internals(stripped)
    message = str(excinfo.value)
    assert "_packet_handle" in message and "_sock_close" in message and "'remaining_count'" in message


async def test_keepalive_bounds_the_connack_wait(loop_guard):
    """Documented limit: paho applies keepalive to the CONNACK wait, so a silent broker fails connect() after about keepalive (TimeoutError saying so), not connect_timeout."""
    async with HandshakePeer() as peer:
        peer.first_answer = "silent"
        connector = PyMqttConnector(peer.host, peer.port, keepalive=1, connect_timeout=20.0)
        with pytest.raises(TimeoutError) as excinfo:
            await asyncio.wait_for(connector.connect(), 15)
        assert "keepalive" in str(excinfo.value) and f"{peer.host}:{peer.port}" in str(excinfo.value)
        await connector.disconnect()


async def test_protocol_option_is_managed(loop_guard, caplog):
    """``protocol=`` is ignored with a warning: the connector speaks MQTT 3.1.1 only (its packet validation is 3.1.1's)."""
    async with HandshakePeer() as peer:
        peer.first_answer = "close"
        reference._warned_options.discard("protocol")  # warned once per process
        with caplog.at_level(logging.WARNING):
            connector = PyMqttConnector(peer.host, peer.port, protocol=aiomqtt.ProtocolVersion.V5)
        assert any("'protocol'" in r.getMessage() for r in caplog.records)
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(connector.connect(), 10)
        await asyncio.wait_for(connector.connect(), 10)
        assert [p.protocol_level for p in peer.of_type("CONNECT")] == [4, 4]
        await connector.disconnect()


def test_max_packet_size_is_checked_at_construction():
    """A max_packet_size the decoder refuses is a ValueError at construction, not at the first connection."""
    with pytest.raises(ValueError):
        PyMqttConnector(max_packet_size=-1)
