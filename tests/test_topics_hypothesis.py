"""Property tests: both TopicTrie twins agree with each other, with a brute-force
reading of the spec written here independently, and with paho-mqtt's matcher.

The brute-force oracle translates a filter into a regular expression (MQTT
3.1.1 §4.7; ``$share`` per MQTT 5 §4.8.2), a different algorithm from both
tries and from `filter_matches`, so a shared misreading would have to be made
twice. paho's `topic_matches_sub` / `MQTTMatcher` is a third opinion where its
semantics coincide with ours (no ``$share``, no wildcard characters in the
topic). Any difference between the twins is a bug; regressions found are
pinned with @example.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub
from paho.mqtt.matcher import MQTTMatcher

from cascade_fast import _topics_py
from cascade_fast._extensions import load_compiled
from cascade_fast.topics import filter_matches, validate_filter

_compiled = load_compiled("_topics")

settings.register_profile("topics", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("topics")

TWINS = [_topics_py.TopicTrie] + ([_compiled.TopicTrie] if _compiled is not None else [])


def oracle(topic_filter: str, topic: str) -> bool:
    """Brute-force reading of the spec: the filter as an anchored regular expression."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False  # §4.7.2
    pattern = ""
    for index, level in enumerate(topic_filter.split("/")):
        separator = "/" if index else ""
        if level == "#":
            # §4.7.1.2: any number of levels, zero included (also the parent).
            pattern += f"(?:{separator}.*)?" if index else ".*"
        elif level == "+":
            pattern += separator + "[^/]*"  # §4.7.1.3: one level, possibly empty
        else:
            pattern += separator + re.escape(level)
    return re.fullmatch(pattern, topic, re.DOTALL) is not None


# Levels: a few short ones so filters and topics collide often, long ones
# (past the compiled twin's 16-byte inline keys), non-ASCII of every width,
# "$" ones for §4.7.2, and enough of them that a node outgrows its small
# child array into a hash table.
LITERALS = (
    ["a", "b", "c", "", "$SYS", "$", "sport", "é", "日本", "🙂", "a b"]
    + [f"n{i}" for i in range(10)]
    + ["a-level-longer-than-sixteen-bytes", "télémétrie-événements-longs", "x" * 40]
)
literal = st.sampled_from(LITERALS)


@st.composite
def filters(draw: Any) -> str:
    """A valid topic filter, sometimes shared ($share/{group}/...)."""
    levels = draw(st.lists(st.one_of(literal, st.just("+")), min_size=0, max_size=5))
    if not levels or draw(st.booleans()):
        levels.append("#")
    topic_filter = "/".join(levels) or "+"  # [""] would be the empty (invalid) filter
    if draw(st.integers(0, 9)) == 0:
        topic_filter = f"$share/{draw(st.sampled_from(['g', 'group-1', 'é']))}/{topic_filter}"
    return topic_filter


# Topics are not validated by match(): besides valid names they may hold
# wildcard characters, U+0000, newlines and lone surrogates.
topic_level = st.one_of(
    literal, literal, literal, st.sampled_from(["+", "#", "\x00", "\n", "\ud800", "a\udfff", "\ud83d\ude42", "$share"])
)
topics = st.lists(topic_level, min_size=1, max_size=6).map("/".join)
valid_topics = st.lists(literal, min_size=1, max_size=6).map("/".join).filter(lambda t: t != "")


def _stored(topic_filter: str) -> str:
    """The filter a pair is stored under ($share prefix stripped), per the oracle's reading."""
    return topic_filter.split("/", 2)[2] if topic_filter.startswith("$share/") else topic_filter


@given(topic_filter=filters(), topic=topics)
@example(topic_filter="sport/#", topic="sport")
@example(topic_filter="+", topic="")
@example(topic_filter="#", topic="$")
@example(topic_filter="$share/g/#", topic="$SYS/x")
@example(topic_filter="a/+", topic="a/\ud800")
def test_filter_matches_agrees_with_the_oracle(topic_filter: str, topic: str) -> None:
    """filter_matches (the single-filter reading) equals the regex reading."""
    validate_filter(topic_filter)
    assert filter_matches(topic_filter, topic) is oracle(topic_filter, topic)


@given(topic_filter=filters().filter(lambda f: not f.startswith("$share/")), topic=valid_topics)
@example(topic_filter="+/+", topic="/finance")
@example(topic_filter="#", topic="$SYS")
def test_oracle_agrees_with_paho(topic_filter: str, topic: str) -> None:
    """paho's topic_matches_sub gives the same answer where its semantics coincide with ours."""
    assert topic_matches_sub(topic_filter, topic) is oracle(topic_filter, topic)


@settings(max_examples=300)
@given(
    pairs=st.lists(st.tuples(filters(), st.integers(0, 5)), max_size=25),
    probes=st.lists(topics, min_size=1, max_size=8),
    cache_size=st.sampled_from([0, 1, 3, 64]),
)
@example(pairs=[("a/#", 0), ("a", 1)], probes=["a"], cache_size=0)
@example(pairs=[("+", 0), ("#", 1), ("$share/g/+", 2)], probes=["$x", "x", ""], cache_size=1)
@example(pairs=[(f"t/n{i}", i) for i in range(10)], probes=["t/n9", "t/n4", "t/x"], cache_size=0)
def test_twins_agree_with_the_oracle_on_matching(
    pairs: list[tuple[str, int]], probes: list[str], cache_size: int
) -> None:
    """Both twins return exactly the oracle's values, in add order, for every probe (twice: cold, then cached)."""
    tries = [Trie(cache_size=cache_size) for Trie in TWINS]
    for trie in tries:
        for topic_filter, value in pairs:
            trie.add(topic_filter, value)
    for _ in range(2):
        for topic in probes:
            expected = [value for topic_filter, value in pairs if oracle(topic_filter, topic)]
            for trie in tries:
                assert trie.match(topic) == expected, (type(trie).__module__, topic)


@given(
    pairs=st.lists(st.tuples(filters().filter(lambda f: not f.startswith("$share/")), st.integers()), max_size=25),
    probes=st.lists(valid_topics, min_size=1, max_size=8),
)
def test_twins_agree_with_paho_matcher(pairs: list[tuple[str, int]], probes: list[str]) -> None:
    """As multisets, both twins return what paho's MQTTMatcher returns (one value per distinct filter)."""
    last: dict[str, int] = {}
    for topic_filter, value in pairs:
        last[topic_filter] = value  # MQTTMatcher keeps one value per filter: the last set
    matcher = MQTTMatcher()
    for topic_filter, value in last.items():
        matcher[topic_filter] = value
    for Trie in TWINS:
        trie = Trie()
        for topic_filter, value in last.items():
            trie.add(topic_filter, value)
        for topic in probes:
            assert sorted(trie.match(topic)) == sorted(matcher.iter_match(topic))


# A random program of add/remove/clear/match, run on both twins and on a
# plain list of pairs (the model); compared after every step.
operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), filters(), st.integers(0, 3)),
        st.tuples(st.just("add"), filters(), st.integers(0, 3)),
        st.tuples(st.just("remove"), filters(), st.integers(0, 3)),
        st.tuples(st.just("match"), topics, st.just(0)),
        st.tuples(st.just("match"), topics, st.just(0)),
        st.tuples(st.just("clear"), st.just(""), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=300)
@given(program=operations, cache_size=st.sampled_from([0, 1, 2, 64]))
@example(
    program=[("add", "a", 1), ("add", "#", 2), ("add", "a", 1), ("remove", "a", 1), ("match", "a", 0)], cache_size=64
)
@example(program=[("add", "$share/g/a", 1), ("remove", "a", 1), ("match", "a", 0)], cache_size=2)
@example(
    program=[("add", f"n{i}", i) for i in range(6)] + [("remove", "n0", 0), ("remove", "n5", 5), ("match", "n3", 0)],
    cache_size=0,
)
def test_twins_follow_the_model_through_adds_and_removes(program: list[tuple[str, str, int]], cache_size: int) -> None:
    """Any add/remove/clear/match sequence leaves both twins equal to a list of pairs (earliest equal pair removed)."""
    tries = [Trie(cache_size=cache_size) for Trie in TWINS]
    model: list[tuple[str, int]] = []
    for operation, argument, value in program:
        if operation == "add":
            model.append((_stored(argument), value))
            for trie in tries:
                trie.add(argument, value)
        elif operation == "remove":
            key = (_stored(argument), value)
            present = key in model
            if present:
                model.remove(key)
            for trie in tries:
                assert trie.remove(argument, value) is present
        elif operation == "clear":
            model.clear()
            for trie in tries:
                trie.clear()
        else:
            expected = [v for f, v in model if oracle(f, argument)]
            for trie in tries:
                assert trie.match(argument) == expected
        for trie in tries:
            assert len(trie) == len(model)
            assert trie.cached_topics <= max(cache_size, 0)


def _outcome(function: Any, *args: Any) -> tuple[str, str]:
    """('ok', '') or the exception's type name and message."""
    try:
        function(*args)
    except Exception as exc:  # noqa: BLE001 - the comparison is the point
        return type(exc).__name__, str(exc)
    return "ok", ""


def _independent_filter_check(topic_filter: str) -> bool:
    """Whether `topic_filter` is valid, read straight from MQTT 3.1.1 §4.7 / §1.5.3 and MQTT 5 §4.8.2."""
    if not topic_filter or "\x00" in topic_filter:
        return False
    try:
        if len(topic_filter.encode("utf-8")) > 65535:
            return False
    except UnicodeEncodeError:
        return False
    levels = topic_filter.split("/")
    if levels[0] == "$share":
        if len(levels) < 3 or not levels[1] or "+" in levels[1] or "#" in levels[1] or levels[2:] == [""]:
            return False
        levels = levels[2:]
    for index, level in enumerate(levels):
        if ("+" in level and level != "+") or ("#" in level and level != "#"):
            return False
        if level == "#" and index != len(levels) - 1:
            return False
    return True


wild_text = st.text(alphabet=st.sampled_from("ab/+#$\x00é\ud800 "), max_size=12).map(
    lambda s: s.replace("$", "$share/", 1) if s.startswith("$") and len(s) % 2 else s
)


@settings(max_examples=500)
@given(text=st.one_of(wild_text, st.text(max_size=8)))
@example(text="$share//#")
@example(text="$share/g/")
@example(text="#/")
@example(text="$share/g/#/")
def test_twins_accept_and_reject_the_same_filters(text: str) -> None:
    """For any string, validate_filter and both twins' add() agree, with the same message, and match the spec."""
    expected = _outcome(validate_filter, text)
    assert (expected[0] == "ok") is _independent_filter_check(text)
    for Trie in TWINS:
        assert _outcome(Trie().add, text, 1) == expected


@pytest.mark.skipif(_compiled is None, reason="compiled trie not loaded")
@settings(max_examples=300)
@given(topic=st.text(max_size=30), pairs=st.lists(st.tuples(filters(), st.integers(0, 3)), max_size=10))
def test_twins_agree_on_arbitrary_unicode_topics(topic: str, pairs: list[tuple[str, int]]) -> None:
    """Any str at all (surrogates, astral, controls) matches the same in both twins and never raises."""
    pure, compiled = _topics_py.TopicTrie(), _compiled.TopicTrie()
    for topic_filter, value in pairs:
        pure.add(topic_filter, value)
        compiled.add(topic_filter, value)
    assert compiled.match(topic) == pure.match(topic) == [v for f, v in pairs if oracle(f, topic)]
