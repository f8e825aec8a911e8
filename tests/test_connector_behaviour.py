"""The connector behaviour contract, against a real Mosquitto: payloads, routing, errors, API.

Every test runs per implementation (the ``connector_factory`` fixture) and
per event loop (asyncio, uvloop), and fails if the loop's exception handler
was called or a task outlived the connectors (``loop_guard``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets

import orjson
import pytest

from cascade.connectors.mqtt import _common
from observer import Recorder, Watcher, eventually

pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("loop_guard")]


def unique(prefix: str) -> str:
    """A topic prefix no other test uses (the session broker is shared)."""
    return f"{prefix}/{secrets.token_hex(4)}"


def delta(before: dict[str, int], after: dict[str, int], key: str) -> int:
    return after[key] - before[key]


# ---------------------------------------------------------------- payloads


@pytest.mark.parametrize(
    ("payload", "decoded", "wire"),
    [
        pytest.param({"a": 1, "b": [1, 2], "c": {"d": None}}, {"a": 1, "b": [1, 2], "c": {"d": None}}, None, id="dict"),
        pytest.param([1, "two", 3.5, None], [1, "two", 3.5, None], None, id="list"),
        pytest.param(b'{"k": "v"}', {"k": "v"}, b'{"k": "v"}', id="json-bytes"),
        pytest.param(bytearray(b"[1, 2]"), [1, 2], b"[1, 2]", id="json-bytearray"),
        pytest.param('{"s": "\u00e9t\u00e9"}', {"s": "\u00e9t\u00e9"}, '{"s": "\u00e9t\u00e9"}'.encode(), id="json-str"),
        pytest.param('"plain"', "plain", b'"plain"', id="json-string-scalar"),
        pytest.param(b"", {}, b"", id="empty-bytes"),
        pytest.param("", {}, b"", id="empty-str"),
        pytest.param(None, {}, b"", id="none"),
    ],
)
async def test_round_trip(connector_factory, payload, decoded, wire):
    """A publish reaches a JSON subscriber decoded (empty -> {}) and a raw one as the exact bytes."""
    topic = unique("rt")
    subscriber, publisher = connector_factory(), connector_factory()
    await subscriber.connect()
    await publisher.connect()
    as_json, as_raw = Recorder("json"), Recorder("raw")
    await subscriber.subscribe(topic, as_json)
    await subscriber.subscribe(topic, as_raw, raw=True)

    await publisher.publish(topic, payload, qos=1)

    await as_json.wait(1)
    await as_raw.wait(1)
    expected_wire = orjson.dumps(payload) if wire is None else wire
    assert as_json.calls == [(topic, decoded)]
    assert as_raw.calls == [(topic, expected_wire)]
    assert isinstance(as_raw.calls[0][1], bytes)


async def test_binary_payload_reaches_raw_subscribers_without_a_decode_error(connector_factory):
    """Non-JSON bytes go to a raw-only subscription untouched, and nothing is counted as an error."""
    topic = unique("raw")
    connector = connector_factory()
    await connector.connect()
    raw = Recorder("raw")
    await connector.subscribe(topic, raw, raw=True)
    before = connector.stats()
    blob = bytes(range(256)) + b"\x00not json"

    await connector.publish(topic, blob, qos=1)

    await raw.wait(1)
    assert raw.data == [blob]
    after = connector.stats()
    assert delta(before, after, "decode_errors") == 0
    assert delta(before, after, "received") == 1
    assert delta(before, after, "dispatched") == 1


async def test_subscriptions_made_before_connect_are_subscribed_on_connect(connector_factory, broker):
    """subscribe() while not connected registers the filter; connect() subscribes it at the broker."""
    topic = unique("early")
    connector = connector_factory()
    recorder = Recorder()
    handle = await connector.subscribe(topic + "/#", recorder)
    assert handle.active
    await connector.connect()
    async with Watcher(broker) as outsider:
        await outsider.publish(topic + "/x", b'{"early": true}')
    await recorder.wait(1)
    assert recorder.calls == [(topic + "/x", {"early": True})]


# ---------------------------------------------------------------- routing


async def test_overlapping_filters_each_callback_once_per_message_in_subscription_order(connector_factory):
    """Every matching callback is called exactly once per message, in subscription order, across filters."""
    prefix = unique("route")
    subscriber, publisher = connector_factory(), connector_factory()
    await subscriber.connect()
    await publisher.connect()
    log: list[tuple[str, str, object]] = []
    filters = {
        "hash": f"{prefix}/#",
        "plus": f"{prefix}/+/c",
        "exact": f"{prefix}/b/c",
        "hash-again": f"{prefix}/#",  # a second handle on the same filter
        "miss": f"{prefix}/x/#",
        "two-plus": f"{prefix}/+/+",
        "parent": f"{prefix}/b/c/#",  # '#' also matches the parent level (MQTT 3.1.1 §4.7.1.2)
        "root-plus": "+/" + prefix.split("/", 1)[1] + "/b/c",
        "too-deep": f"{prefix}/b/c/+",
    }
    recorders = {name: Recorder(name, log) for name in filters}
    for name, topic_filter in filters.items():
        await subscriber.subscribe(topic_filter, recorders[name])
    matching = [name for name in filters if name not in ("miss", "too-deep")]
    topic = f"{prefix}/b/c"

    for n in (1, 2, 3):
        await publisher.publish(topic, {"n": n}, qos=1)
    for name in matching:
        await recorders[name].wait_for({"n": 3})

    # Messages 1 and 2 were followed by 3: a duplicate of either would show here.
    expected = [(name, topic, {"n": n}) for n in (1, 2, 3) for name in matching]
    assert log == expected
    assert recorders["miss"].calls == recorders["too-deep"].calls == []


async def test_wildcard_levels(connector_factory):
    """'+' matches one level, also an empty one; '#' matches the parent and any depth."""
    prefix = unique("levels")
    connector = connector_factory()
    await connector.connect()
    plus, hash_ = Recorder("plus"), Recorder("hash")
    await connector.subscribe(f"{prefix}/+/end", plus)
    await connector.subscribe(f"{prefix}/sport/#", hash_)
    for topic in (f"{prefix}//end", f"{prefix}/a/end", f"{prefix}/a/b/end", f"{prefix}/sport", f"{prefix}/sport/x/y", f"{prefix}/sportx"):
        await connector.publish(topic, {"t": topic}, qos=1)
    await connector.publish(f"{prefix}/sport/last", {}, qos=1)
    await hash_.wait_for({})

    assert [t for t, _ in plus.calls] == [f"{prefix}//end", f"{prefix}/a/end"]
    assert [t for t, _ in hash_.calls] == [f"{prefix}/sport", f"{prefix}/sport/x/y", f"{prefix}/sport/last"]


async def test_dollar_topics_are_not_matched_by_leading_wildcards(connector_factory):
    """'#' and '+/...' never deliver '$SYS/...' or '$foo/bar'; an explicit '$foo/#' does (MQTT 3.1.1 §4.7.2)."""
    suffix = secrets.token_hex(4)
    connector = connector_factory()
    await connector.connect()
    everything, plus_bar, dollar_foo, sys_version = Recorder("#"), Recorder("+/bar"), Recorder("$foo"), Recorder("$SYS")
    await connector.subscribe("#", everything)
    await connector.subscribe(f"+/{suffix}", plus_bar)
    await connector.subscribe(f"$foo{suffix}/#", dollar_foo)
    # Mosquitto keeps $SYS/broker/version retained: it arrives on subscribe,
    # on the same connection as the '#' subscription.
    await connector.subscribe("$SYS/broker/version", sys_version, raw=True)

    await connector.publish(f"$foo{suffix}/{suffix}", {"dollar": True}, qos=1)
    await connector.publish(f"plain{suffix}/{suffix}", {"plain": True}, qos=1)

    await dollar_foo.wait(1)
    await sys_version.wait(1)
    await plus_bar.wait_for({"plain": True})
    await everything.wait_for({"plain": True})
    assert dollar_foo.calls == [(f"$foo{suffix}/{suffix}", {"dollar": True})]
    assert sys_version.calls[0][0] == "$SYS/broker/version"
    assert not [t for t, _ in everything.calls if t.startswith("$")]
    assert plus_bar.calls == [(f"plain{suffix}/{suffix}", {"plain": True})]


async def test_shared_subscription_is_matched_as_its_filter(connector_factory):
    """'$share/{group}/{filter}' is subscribed at the broker and matched locally as '{filter}'."""
    prefix = unique("shared")
    connector = connector_factory()
    await connector.connect()
    recorder = Recorder()
    await connector.subscribe(f"$share/group{secrets.token_hex(2)}/{prefix}/+", recorder)
    await connector.publish(f"{prefix}/x", {"shared": 1}, qos=1)
    await recorder.wait(1)
    assert recorder.calls == [(f"{prefix}/x", {"shared": 1})]


# ---------------------------------------------------------------- validation

INVALID_FILTERS = ["a/#/b", "a#", "a/b+", "+a/b", "#/a", "", "a/\x00/b", "$share/g", "$share//f"]
INVALID_TOPICS = ["a/+", "a/#", "+", "#", "a/b#", "", "a\x00b", "x" * 65536]


def _names(message: str, value: str) -> bool:
    """Whether an error message names `value` (as it is, or as its repr)."""
    return value in message or repr(value) in message or repr(value)[1:-1] in message


@pytest.mark.parametrize("bad", INVALID_FILTERS, ids=repr)
async def test_invalid_filter_raises_value_error_naming_it(connector_factory, bad):
    """subscribe() with an invalid filter raises ValueError at the call, naming the filter; nothing is registered."""
    connector = connector_factory()
    recorder = Recorder()
    with pytest.raises(ValueError) as excinfo:
        await connector.subscribe(bad, recorder)
    if bad:
        assert _names(str(excinfo.value), bad), str(excinfo.value)


@pytest.mark.parametrize("bad", INVALID_TOPICS, ids=lambda t: repr(t[:12]))
async def test_invalid_topic_raises_value_error_naming_it(connector_factory, bad):
    """publish() to an invalid topic raises ValueError at the call (wildcards, empty, U+0000, over 65535 bytes)."""
    connector = connector_factory()
    before = connector.stats()
    with pytest.raises(ValueError) as excinfo:
        await connector.publish(bad, {"x": 1})
    if bad and len(bad) < 100:
        assert _names(str(excinfo.value), bad), str(excinfo.value)
    after = connector.stats()
    assert delta(before, after, "dropped") == delta(before, after, "published") == 0


async def test_invalid_arguments_on_a_connected_connector(connector_factory):
    """Bad filter, topic, QoS or payload type raise at the call and leave the connection working."""
    topic = unique("valid")
    connector = connector_factory()
    await connector.connect()
    recorder = Recorder()
    with pytest.raises(ValueError, match="a/#/b"):
        await connector.subscribe("a/#/b", recorder)
    with pytest.raises(ValueError):
        await connector.subscribe(topic, recorder, qos=3)
    with pytest.raises(ValueError, match=r"a/\+"):
        await connector.publish("a/+", {})
    with pytest.raises(ValueError):
        await connector.publish(topic, {}, qos=3)
    with pytest.raises(TypeError):
        await connector.publish(topic, 12345)
    with pytest.raises(TypeError):
        await connector.publish(topic, {1, 2})

    await connector.subscribe(topic, recorder)
    await connector.publish(topic, {"still": "working"}, qos=1)
    await recorder.wait(1)
    assert recorder.data == [{"still": "working"}]
    assert connector.stats()["connected"] == 1


# ---------------------------------------------------------------- isolation


async def test_non_json_payload_is_counted_and_not_delivered_while_later_messages_flow(connector_factory, caplog):
    """A payload that is not JSON is counted in decode_errors, reaches no JSON callback, and the next message flows."""
    topic = unique("badjson")
    connector = connector_factory()
    await connector.connect()
    as_json, as_raw = Recorder("json"), Recorder("raw")
    await connector.subscribe(topic, as_json)
    await connector.subscribe(topic, as_raw, raw=True)
    before = connector.stats()

    with caplog.at_level(logging.WARNING, logger="cascade.connectors.mqtt"):
        await connector.publish(topic, b"{not json", qos=1)
        await connector.publish(topic, {"ok": True}, qos=1)
        await as_json.wait(1)
        await as_raw.wait(2)

    assert as_json.calls == [(topic, {"ok": True})]
    assert as_raw.data == [b"{not json", b'{"ok":true}']
    after = connector.stats()
    assert delta(before, after, "decode_errors") == 1
    assert delta(before, after, "received") == 2
    assert delta(before, after, "dispatched") == 3
    assert any(r.name == "cascade.connectors.mqtt" and r.levelno >= logging.WARNING for r in caplog.records)


async def test_raising_callback_is_counted_and_the_others_still_run(connector_factory, caplog):
    """A callback that raises is counted in callback_errors and logged with its traceback; the others still run."""
    topic = unique("raises")
    connector = connector_factory()
    await connector.connect()
    first, last = Recorder("first"), Recorder("last")

    def broken(topic: str, data: object) -> None:
        raise RuntimeError("callback failure for the test")

    await connector.subscribe(topic, first)
    await connector.subscribe(topic, broken)
    await connector.subscribe(topic, last)
    before = connector.stats()

    with caplog.at_level(logging.WARNING, logger="cascade.connectors.mqtt"):
        await connector.publish(topic, {"n": 1}, qos=1)
        await connector.publish(topic, {"n": 2}, qos=1)
        await last.wait(2)

    assert first.data == last.data == [{"n": 1}, {"n": 2}]
    after = connector.stats()
    assert delta(before, after, "callback_errors") == 2
    assert delta(before, after, "dispatched") == 4
    logged = [r for r in caplog.records if r.name == "cascade.connectors.mqtt" and r.exc_info]
    assert logged and "callback failure for the test" in str(logged[0].exc_info[1])


async def test_coroutine_callbacks_run_in_strict_order(connector_factory):
    """A coroutine callback finishes before the next callback, and the next message, start."""
    topic = unique("async")
    connector = connector_factory()
    await connector.connect()
    log: list[tuple[str, object]] = []
    depths: list[int] = []

    async def slow(topic: str, data: object) -> None:
        log.append(("slow-start", data["n"]))
        depths.append(connector.stats()["queue_depth"])
        await asyncio.sleep(0.002)
        log.append(("slow-end", data["n"]))

    fast = Recorder("fast")
    await connector.subscribe(topic, slow)
    await connector.subscribe(topic, lambda t, d: log.append(("sync", d["n"])))
    await connector.subscribe(topic, fast)
    before = connector.stats()

    for n in range(5):
        await connector.publish(topic, {"n": n}, qos=1)
    await fast.wait(5)

    assert log == [entry for n in range(5) for entry in (("slow-start", n), ("slow-end", n), ("sync", n))]
    assert all(isinstance(depth, int) and depth >= 0 for depth in depths)
    assert delta(before, connector.stats(), "dispatched") == 15


async def test_disconnect_does_not_wait_for_a_stuck_coroutine_callback(connector_factory):
    """Deliveries behind a suspended coroutine callback show in queue_depth; disconnect() still ends promptly."""
    topic = unique("stuck")
    connector = connector_factory()
    await connector.connect()
    started, never = asyncio.Event(), asyncio.Event()

    async def stuck(topic: str, data: object) -> None:
        started.set()
        await never.wait()

    await connector.subscribe(topic, stuck)
    for n in range(4):
        await connector.publish(topic, {"n": n}, qos=1)
    await asyncio.wait_for(started.wait(), 10)
    await eventually(lambda: connector.stats()["queue_depth"] >= 1, what="queue_depth >= 1 behind the stuck callback")
    await asyncio.wait_for(connector.disconnect(), 10)
    assert connector.stats()["connected"] == 0


# ---------------------------------------------------------------- unsubscribe


async def test_unsubscribe_stops_delivery_and_the_last_handle_unsubscribes_at_the_broker(connector_factory):
    """After unsubscribe a callback gets nothing more; when a filter's last handle goes, the broker stops sending."""
    prefix = unique("unsub")
    topic, sentinel_topic = f"{prefix}/t", f"{prefix}/sentinel"
    subscriber, publisher = connector_factory(), connector_factory()
    await subscriber.connect()
    await publisher.connect()
    one, two, sentinel = Recorder("one"), Recorder("two"), Recorder("sentinel")
    handle_one = await subscriber.subscribe(topic, one)
    handle_two = await subscriber.subscribe(topic, two)
    await subscriber.subscribe(sentinel_topic, sentinel)
    assert handle_one is not handle_two

    await publisher.publish(topic, {"m": 1}, qos=1)
    await two.wait(1)
    await handle_one.unsubscribe()
    assert not handle_one.active
    await publisher.publish(topic, {"m": 2}, qos=1)
    await two.wait(2)
    assert one.data == [{"m": 1}]

    await handle_two.unsubscribe()
    await handle_two.unsubscribe()  # a second unsubscribe is a no-op
    before = subscriber.stats()
    await publisher.publish(topic, {"m": 3}, qos=1)
    await publisher.publish(sentinel_topic, {"sentinel": True}, qos=1)
    await sentinel.wait(1)
    # The broker no longer sends `topic`: only the sentinel was received.
    assert delta(before, subscriber.stats(), "received") == 1
    assert one.data == [{"m": 1}]
    assert two.data == [{"m": 1}, {"m": 2}]


async def test_unsubscribe_from_a_callback_stops_delivery_at_once(connector_factory):
    """A callback that unsubscribes a later callback prevents its call for the very same message."""
    topic = unique("unsub-now")
    connector = connector_factory()
    await connector.connect()
    later = Recorder("later")
    handles = {}

    async def first(topic: str, data: object) -> None:
        await handles["later"].unsubscribe()

    closer = Recorder("closer")
    await connector.subscribe(topic, first)
    handles["later"] = await connector.subscribe(topic, later)
    await connector.subscribe(topic, closer)

    await connector.publish(topic, {"n": 1}, qos=1)
    await closer.wait(1)
    assert later.calls == []


async def test_same_filter_twice_gives_two_handles_and_one_broker_subscription(connector_factory, broker):
    """A second subscribe() to a filter adds a callback without a second SUBSCRIBE (which would resend retained messages)."""
    topic = unique("twice")
    connector = connector_factory()
    await connector.connect()
    async with Watcher(broker) as outsider:
        await outsider.publish(topic, b'{"retained": 1}', retain=True)
        try:
            one, two = Recorder("one"), Recorder("two")
            handle_one = await connector.subscribe(topic, one)
            await one.wait(1)
            handle_two = await connector.subscribe(topic, two)
            assert handle_one is not handle_two
            await outsider.publish(topic, b'{"live": 2}')
            await two.wait_for({"live": 2})
            await one.wait_for({"live": 2})
            # MQTT 3.1.1 §3.8.4: a repeated SUBSCRIBE would have made the
            # broker send the retained message again, before the live one.
            assert one.data == [{"retained": 1}, {"live": 2}]
            assert two.data == [{"live": 2}]
        finally:
            await outsider.publish(topic, b"", retain=True)  # clear the retained message


# ---------------------------------------------------------------- flush and stats


async def test_flush_waits_for_every_publish(connector_factory, broker):
    """flush() returns once every publish so far is written (QoS 0) or acknowledged (QoS 1/2); all arrive."""
    prefix = unique("flush")
    connector = connector_factory()
    await connector.connect()
    await asyncio.wait_for(connector.flush(), 5)  # nothing pending: returns at once
    count = 300
    async with Watcher(broker, f"{prefix}/#", qos=2) as watcher:
        before = connector.stats()
        for n in range(count):
            await connector.publish(f"{prefix}/{n % 3}", {"n": n}, qos=n % 3)
        await connector.flush(timeout=10)
        assert delta(before, connector.stats(), "published") == count
        await watcher.wait_for(lambda m: orjson.loads(m.payload) == {"n": count - 1} if m.payload else False)
        await eventually(lambda: len(watcher.messages) >= count, what=f"{count} messages at the watcher")
        assert sorted(orjson.loads(m.payload)["n"] for m in watcher.messages) == list(range(count))


async def test_stats_keys_and_connected_flag(connector_factory):
    """stats() has every contract key as an int, before, during and after a connection."""
    connector = connector_factory()
    keys = set(_common.STAT_KEYS) | {"queue_depth", "connected"}

    def check(connected: int) -> None:
        stats = connector.stats()
        assert keys <= set(stats), keys - set(stats)
        assert all(type(stats[key]) is int for key in keys), stats
        assert stats["connected"] == connected

    check(0)
    await connector.connect()
    check(1)
    assert connector.stats()["reconnects"] == 0
    await connector.disconnect()
    check(0)


async def test_publish_while_not_connected_is_counted_as_dropped(connector_factory, caplog):
    """publish() before connect() or after disconnect() does not raise; it counts 'dropped' and warns."""
    connector = connector_factory()
    topic = unique("dropped")
    with caplog.at_level(logging.WARNING, logger="cascade.connectors.mqtt"):
        await connector.publish(topic, {"n": 1})
        await connector.publish(topic, b"raw", qos=1)
    assert connector.stats()["dropped"] == 2
    assert connector.stats()["published"] == 0
    assert any(r.levelno == logging.WARNING for r in caplog.records if r.name == "cascade.connectors.mqtt")

    await connector.connect()
    await connector.disconnect()
    before = connector.stats()
    await connector.publish(topic, {"n": 2})
    assert delta(before, connector.stats(), "dropped") == 1


# ---------------------------------------------------------------- lifecycle


async def test_connect_is_idempotent_also_concurrently(connector_factory):
    """Concurrent and repeated connect() calls make one connection."""
    topic = unique("idem")
    connector = connector_factory()
    await asyncio.gather(connector.connect(), connector.connect())
    await connector.connect()
    recorder = Recorder()
    await connector.subscribe(topic, recorder)
    await connector.publish(topic, {"once": True}, qos=1)
    await recorder.wait(1)
    stats = connector.stats()
    assert stats["connected"] == 1 and stats["reconnects"] == 0
    assert stats["received"] == 1


async def test_disconnect_is_idempotent_and_connect_works_again(connector_factory):
    """disconnect() never raises (not connected, twice); connect() afterwards works, subscriptions kept."""
    topic = unique("again")
    connector = connector_factory()
    await connector.disconnect()  # never connected
    recorder = Recorder()
    await connector.subscribe(topic, recorder)
    await connector.connect()
    await connector.disconnect()
    await connector.disconnect()
    assert connector.stats()["connected"] == 0

    await connector.connect()
    await connector.publish(topic, {"back": True}, qos=1)
    await recorder.wait(1)
    assert recorder.data == [{"back": True}]


async def test_async_with_connects_and_disconnects(connector_factory):
    """`async with connector:` is connect() ... disconnect()."""
    connector = connector_factory()
    async with connector as entered:
        assert entered is connector
        assert connector.stats()["connected"] == 1
    assert connector.stats()["connected"] == 0


async def test_connectors_sharing_a_source_id_do_not_kick_each_other_off(connector_factory):
    """Default client ids are unique per connector, so two with one source_id stay connected side by side."""
    topic = unique("twins")
    source_id = connector_factory.source_id()
    first, second = connector_factory(source_id=source_id), connector_factory(source_id=source_id)
    await first.connect()
    await second.connect()
    recorder = Recorder()
    await first.subscribe(topic, recorder)
    await second.publish(topic, {"hello": "twin"}, qos=1)
    await recorder.wait(1)
    await second.flush(timeout=5)
    for connector in (first, second):
        stats = connector.stats()
        assert stats["connected"] == 1 and stats["reconnects"] == 0


async def test_unknown_option_is_logged_once_and_ignored(connector_factory, caplog):
    """An option the implementation does not know is a WARNING naming it (never its value), not an error."""
    option = f"no_such_option_{secrets.token_hex(3)}"
    secret = "s3cr3t-value"
    with caplog.at_level(logging.WARNING, logger="cascade.connectors.mqtt"):
        connector = connector_factory(**{option: secret})
    warnings_ = [r for r in caplog.records if r.name.startswith("cascade") and r.levelno == logging.WARNING]
    assert any(option in r.getMessage() for r in warnings_)
    assert not any(secret in r.getMessage() for r in caplog.records)
    await connector.connect()
    assert connector.stats()["connected"] == 1
