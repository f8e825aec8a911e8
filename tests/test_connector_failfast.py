"""Fail fast, reject bad input, survive odd callbacks: both connectors, both loops (issue #11, points 7, 9, 10).

- connect() fails at once, with the reason, when the broker closes before
  CONNACK or refuses (every CONNACK return code, 1 included); a timeout says
  what timed out and where; after a half-open link the connector is back as
  soon as the broker is (keepalive + backoff, never connect_timeout).
- Every packet MQTT 3.1.1 says a client must reject closes the connection:
  counted in ``protocol_errors``, never delivered, and the connector
  reconnects; one during the handshake fails connect() at once with one
  log line, not thousands.
- A callback raising CancelledError is a callback error; disconnect()
  awaited inside a callback completes; SystemExit from a callback ends the
  process (a subprocess per connector and loop).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from cascade_fast import _codec_py as wire
from cascade_fast._errors import ConnectRefusedError
from observer import eventually
from test_fast_adversarial import _MisackingPeer as MisackingPeer
from test_fast_protocol import ScriptedPeer

pytestmark = [pytest.mark.broker, pytest.mark.fault]
#: For the async tests (the subprocess test has no event loop).
guarded = pytest.mark.usefixtures("loop_guard")

#: connect_timeout for the fail-fast tests: far longer than any prompt
#: failure may take, so waiting for it shows.
LONG_TIMEOUT = 20.0


class HandshakePeer(ScriptedPeer):
    """A scripted peer whose answer to the first CONNECT is `first_answer` (later ones get CONNACK 0).

    ``"close"`` closes the connection (FIN) without CONNACK, ``"silent"``
    sends nothing, bytes are sent as they are.
    """

    first_answer: bytes | str = "close"

    def _answer(self, packet: Any) -> bytes | None:
        if packet.type == "CONNECT" and self.connections == 1:
            if self.first_answer == "close":
                self._writer.close()
                return None
            if self.first_answer == "silent":
                return None
            return self.first_answer
        return super()._answer(packet)


async def _fails_fast(connector: Any, expected: type[BaseException]) -> BaseException:
    """connect() raises `expected` well before connect_timeout; returns the exception."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(expected) as excinfo:
        await asyncio.wait_for(connector.connect(), LONG_TIMEOUT + 10)
    assert loop.time() - started < LONG_TIMEOUT / 2, "connect() waited for connect_timeout"
    assert connector.stats()["connected"] == 0
    return excinfo.value


# -- point 7: connect() fails at once, with the reason ------------------------------------


@guarded
async def test_connect_fails_at_once_when_the_broker_closes_before_connack(connector_factory):
    """The broker closes after CONNECT without CONNACK: ConnectionError saying so, not a timeout; the next connect() works."""
    async with HandshakePeer() as peer:
        connector = connector_factory(peer, connect_timeout=LONG_TIMEOUT)
        error = await _fails_fast(connector, ConnectionError)
        assert "before CONNACK" in str(error)
        assert not isinstance(error, ConnectRefusedError)
        await asyncio.wait_for(connector.connect(), 10)
        assert connector.stats()["connected"] == 1


@guarded
@pytest.mark.parametrize("return_code", [1, 2, 3, 4, 5])
async def test_connack_refusal_raises_at_once_with_its_return_code(connector_factory, return_code):
    """Every non-zero CONNACK is ConnectRefusedError with the 3.1.1 code, at once (code 1 included: no MQTT 3.1 retry)."""
    async with ScriptedPeer(connack_code=return_code) as peer:
        connector = connector_factory(peer, connect_timeout=LONG_TIMEOUT)
        error = await _fails_fast(connector, ConnectRefusedError)
        assert error.return_code == return_code
        # One CONNECT, MQTT 3.1.1 (level 4): no silent retry with MQTT 3.1.
        assert [(p.protocol_name, p.protocol_level) for p in peer.of_type("CONNECT")] == [("MQTT", 4)]


@guarded
async def test_connect_timeout_says_what_timed_out_and_where(connector_factory):
    """A broker that accepts TCP and never answers: TimeoutError naming host:port and the seconds waited."""
    async with HandshakePeer() as peer:
        peer.first_answer = "silent"
        connector = connector_factory(peer, connect_timeout=0.5)
        with pytest.raises(TimeoutError) as excinfo:
            await asyncio.wait_for(connector.connect(), 10)
        message = str(excinfo.value)
        assert f"{peer.host}:{peer.port}" in message and "0.5" in message, message


@guarded
async def test_reconnects_as_soon_as_a_paused_broker_is_back(connector_factory, private_broker):
    """A half-open link (broker stopped with SIGSTOP): detected by keepalive, and the connector is back within keepalive + backoff of the broker's return, not after connect_timeout.

    The reference used to sit out connect_timeout on a reconnect attempt
    whose socket paho had already closed for keepalive before CONNACK.
    """
    keepalive = 2
    connector = connector_factory(private_broker, keepalive=keepalive, connect_timeout=LONG_TIMEOUT)
    await connector.connect()
    private_broker.pause()
    try:
        await eventually(lambda: connector.stats()["connected"] == 0, timeout=4 * keepalive + 5)
        # Long enough for a reconnect attempt to be under way and cut by keepalive.
        await asyncio.sleep(keepalive + 1.5)
    finally:
        private_broker.resume()
    loop = asyncio.get_running_loop()
    back = loop.time()
    await eventually(lambda: connector.stats()["connected"] == 1, timeout=LONG_TIMEOUT + 5)
    # keepalive (+1 s of paho's check period) + max_reconnect_delay, with room for a loaded machine.
    assert loop.time() - back < 2 * keepalive + 4, "reconnect waited for connect_timeout"
    assert connector.stats()["reconnects"] == 1


# -- point 9: packets MQTT 3.1.1 says must be rejected -------------------------------------

#: (id, bytes the broker sends after CONNACK). Each violates MQTT 3.1.1;
#: the connectors run with max_packet_size 1 MiB.
MALFORMED = [
    ("publish-topic-invalid-utf8", b"\x30\x05\x00\x02\xc3\x28x"),
    ("publish-topic-surrogate", b"\x30\x06\x00\x03\xed\xa0\x80x"),
    ("publish-topic-with-nul", b"\x30\x05\x00\x02a\x00x"),
    ("publish-topic-plus-wildcard", b"\x30\x06\x00\x03a/+x"),
    ("publish-topic-hash-wildcard", b"\x30\x06\x00\x03a/#x"),
    ("publish-empty-topic", b"\x30\x03\x00\x00x"),
    ("publish-topic-past-the-end", b"\x30\x03\x00\x09a"),
    ("publish-qos3", b"\x36\x05\x00\x01a\x00\x01"),
    ("publish-dup-at-qos0", b"\x38\x04\x00\x01ax"),
    ("publish-qos1-packet-id-0", b"\x32\x05\x00\x01a\x00\x00"),
    ("publish-qos2-packet-id-0", b"\x34\x05\x00\x01a\x00\x00"),
    ("publish-qos1-no-packet-id", b"\x32\x03\x00\x01a"),
    # An oversized PUBLISH is skipped by the fast connector (tests/test_connector_stress.py); any other type is malformed.
    ("suback-over-max-packet-size", b"\x90\xff\xff\xff\x7f"),
    ("remaining-length-5-bytes", b"\x30\xff\xff\xff\xff\x01"),
    ("reserved-type-0", b"\x00\x00"),
    ("reserved-type-15", b"\xf0\x00"),
    ("second-connack", wire.encode_connack(False, 0)),
    ("connack-reserved-flags", b"\x20\x02\x02\x00"),
    ("connack-bad-header-flags", b"\x21\x02\x00\x00"),
    ("connack-wrong-length", b"\x20\x03\x00\x00\x00"),
    ("puback-wrong-length", b"\x40\x03\x00\x01\x00"),
    ("puback-bad-flags", b"\x42\x02\x00\x01"),
    ("puback-packet-id-0", b"\x40\x02\x00\x00"),
    ("pubrec-bad-flags", b"\x51\x02\x00\x01"),
    ("pubrel-bad-flags", b"\x60\x02\x00\x01"),
    ("pubrel-packet-id-0", b"\x62\x02\x00\x00"),
    ("pubcomp-bad-flags", b"\x78\x02\x00\x01"),
    ("suback-no-return-codes", b"\x90\x02\x00\x01"),
    ("suback-reserved-code", b"\x90\x03\x00\x01\x03"),
    ("suback-bad-flags", b"\x92\x03\x00\x01\x00"),
    ("unsuback-wrong-length", b"\xb0\x03\x00\x01\x00"),
    ("pingresp-bad-flags", b"\xd1\x00"),
    ("pingresp-wrong-length", b"\xd0\x01\x00"),
    ("server-sends-connect", wire.encode_connect("intruder")),
    ("server-sends-subscribe", wire.encode_subscribe(7, [("a/#", 0)])),
    ("server-sends-unsubscribe", wire.encode_unsubscribe(7, ["a/#"])),
    ("server-sends-pingreq", wire.encode_pingreq()),
    ("server-sends-disconnect", wire.encode_disconnect()),
    ("random-garbage", b"\xde\xad\xbe\xef" * 64),
]


@guarded
@pytest.mark.parametrize("garbage", [pytest.param(data, id=name) for name, data in MALFORMED])
async def test_malformed_packet_after_connack_closes_counts_and_reconnects(connector_factory, garbage, caplog):
    """Each packet MQTT 3.1.1 says must be rejected: connection closed, protocol_errors counted and logged, reconnected; the callback never sees it."""
    async with ScriptedPeer() as peer:
        connector = connector_factory(peer, keepalive=30, max_packet_size=1 << 20)
        await connector.connect()
        seen: list[str] = []
        await connector.subscribe("#", lambda topic, data: seen.append(topic), raw=True)
        # A valid message first: the connection works until the bad packet.
        peer.send(wire.encode_publish("ok/before", b"{}", 0, False, False, None))
        await eventually(lambda: seen == ["ok/before"])
        peer.send(garbage)
        await peer.wait_connections(2, timeout=10)
        await eventually(lambda: connector.stats()["connected"] == 1 and connector.stats()["reconnects"] == 1)
        assert connector.stats()["protocol_errors"] == 1
        assert any("protocol error" in record.getMessage() for record in caplog.records)
        await peer.wait_for(lambda p: p.type == "SUBSCRIBE", count=2)
        peer.send(wire.encode_publish("ok/after", b"{}", 0, False, False, None))
        await eventually(lambda: seen == ["ok/before", "ok/after"])


@guarded
async def test_malformed_packet_during_the_handshake_fails_connect_with_one_log_line(connector_factory, caplog):
    """A PUBLISH with an ill-formed UTF-8 topic before CONNACK: connect() fails at once, one protocol error, one log line; the next connect() works."""
    async with HandshakePeer() as peer:
        peer.first_answer = b"\x30\x05\x00\x02\xc3\x28x" + wire.encode_connack(False, 0)
        connector = connector_factory(peer, connect_timeout=LONG_TIMEOUT)
        with caplog.at_level(logging.DEBUG):
            await _fails_fast(connector, ConnectionError)
        assert connector.stats()["protocol_errors"] == 1
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        assert "protocol error" in errors[0].getMessage()
        await asyncio.wait_for(connector.connect(), 10)
        assert connector.stats()["connected"] == 1


# -- point 10: callbacks that raise CancelledError or disconnect ---------------------------


@guarded
@pytest.mark.parametrize("kind", ["plain", "coroutine"])
async def test_callback_raising_cancelled_error_is_a_callback_error(connector_factory, broker, kind, caplog):
    """CancelledError from a callback is counted and logged like any callback error; delivery and the connection go on."""
    connector = connector_factory()
    await connector.connect()
    topic = f"cancel/{connector.source_id}"
    seen: list[int] = []

    def plain(topic: str, data: Any) -> None:
        raise asyncio.CancelledError()

    async def coroutine(topic: str, data: Any) -> None:
        raise asyncio.CancelledError()

    await connector.subscribe(topic, plain if kind == "plain" else coroutine)
    await connector.subscribe(topic, lambda t, d: seen.append(d["n"]))
    for n in range(5):
        await connector.publish(topic, {"n": n}, qos=1)
    await eventually(lambda: len(seen) == 5)
    stats = connector.stats()
    assert stats["callback_errors"] == 5 and stats["reconnects"] == 0 and stats["connected"] == 1
    assert any("raised" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    await connector.publish(topic, {"n": 5}, qos=1)
    await eventually(lambda: seen[-1:] == [5])


@guarded
async def test_disconnect_awaited_inside_a_callback_completes(connector_factory, broker):
    """A coroutine callback awaiting disconnect(): it returns with the connector closed, the callback may go on, nothing reconnects, a later disconnect() returns at once, and connect() works again."""
    connector = connector_factory()
    await connector.connect()
    topic = f"stop/{connector.source_id}"
    steps: list[str] = []
    done = asyncio.get_running_loop().create_future()

    async def stopper(topic: str, data: Any) -> None:
        if data["n"] != 0:
            return
        await connector.disconnect()
        steps.append(f"disconnected connected={connector.stats()['connected']}")
        await connector.disconnect()  # again, from the callback: at once
        await asyncio.sleep(0.01)  # still ours to finish
        steps.append("after")
        done.set_result(None)

    await connector.subscribe(topic, stopper)
    for n in range(5):
        await connector.publish(topic, {"n": n}, qos=1)
    await asyncio.wait_for(done, 10)
    assert steps == ["disconnected connected=0", "after"]
    await asyncio.wait_for(connector.disconnect(), 1)
    await asyncio.sleep(0.3)  # longer than the reconnect delay: nothing may reconnect
    stats = connector.stats()
    assert stats["connected"] == 0 and stats["reconnects"] == 0 and stats["callback_errors"] == 0
    current = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t is not current and not t.done()] == []
    seen: list[int] = []
    await connector.subscribe(topic, lambda t, d: seen.append(d["n"]))
    await asyncio.wait_for(connector.connect(), 10)
    await connector.publish(topic, {"n": 99}, qos=1)
    await eventually(lambda: 99 in seen)


# -- SystemExit from a callback ends the process --------------------------------------------

_EXIT_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from conftest import load_connector_class

    async def main():
        cls = load_connector_class(sys.argv[1])
        connector = cls(hostname=sys.argv[2], port=int(sys.argv[3]), reconnect_delay=0.05, max_reconnect_delay=0.5)
        await connector.connect()
        topic = f"exit/{connector.client_id}"
        await connector.subscribe(topic, lambda t, d: sys.exit(3))
        await connector.publish(topic, {"bye": True}, qos=1)
        await asyncio.sleep(30)  # the callback's SystemExit must end this
        sys.exit(0)

    if sys.argv[4] == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
    """
)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_sys_exit_in_a_callback_ends_the_process(connector_impl, broker, loop_name):
    """A callback calling sys.exit(3) ends the process with status 3 (it propagates out of the event loop)."""
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), *sys.path])}
    try:
        result = subprocess.run(
            [sys.executable, "-c", _EXIT_SCRIPT, connector_impl, broker.host, str(broker.port), loop_name],
            env=env,
            capture_output=True,
            text=True,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit: SystemExit was swallowed")
    assert result.returncode == 3, result.stderr[-2000:]


@guarded
@pytest.mark.parametrize("mode", ["unsuback", "extra-code"])
async def test_wrong_acknowledgement_of_subscribe_is_a_protocol_error(connector_factory, mode):
    """An UNSUBACK answering a SUBSCRIBE, or a SUBACK whose return codes do not match its filters (§3.9.3): protocol error, reconnect; once answered right, delivery works."""
    async with MisackingPeer() as peer:  # the fast connector's adversarial peer
        connector = connector_factory(peer, keepalive=30)
        await connector.connect()
        seen: list[Any] = []
        # Lost before a valid SUBACK: the filter stays registered either way.
        await asyncio.wait_for(connector.subscribe("ms/#", lambda t, d: seen.append(d)), 10)
        await eventually(lambda: connector.stats()["protocol_errors"] >= 1)
        peer.mode = "right"
        await eventually(
            lambda: connector.stats()["connected"] == 1 and connector.stats()["protocol_errors"] == peer.connections - 1
        )
        await peer.wait_for(lambda p: p.type == "SUBSCRIBE", count=peer.connections)
        await asyncio.sleep(0.1)  # the SUBACK of the clean connection
        peer.send(wire.encode_publish("ms/x", b'{"n":1}', 0, False, False, None))
        await eventually(lambda: seen == [{"n": 1}])
