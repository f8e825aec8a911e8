"""Unit tests of MQTT topic matching, run over both twins of `TopicTrie` (compiled and pure).

The property tests (tests/test_topics_hypothesis.py) prove the twins agree
with each other, with a brute-force reading of the spec and with paho on
generated input; these pin the behaviour itself: the spec's own examples
(MQTT 3.1.1 §4.7, MQTT 5 §4.8.2 for ``$share``), each validation rule with
its message, ordering and removal, the cache, and hostile inputs.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from typing import Any

import pytest

from cascade_fast import _topics_py, topics
from cascade_fast._extensions import NO_EXTENSIONS, load_compiled
from cascade_fast.topics import filter_matches, validate_filter, validate_topic

_compiled = load_compiled("_topics")


@pytest.fixture(scope="session", params=["compiled", "pure"])
def Trie(request: pytest.FixtureRequest) -> Any:
    """The TopicTrie class under test: the compiled build, then the pure twin."""
    if request.param == "pure":
        return _topics_py.TopicTrie
    if _compiled is None:
        pytest.skip("compiled trie not loaded (CASCADE_FAST_NO_EXTENSIONS or no build)")
    return _compiled.TopicTrie


def matching(Trie: Any, topic_filter: str, topic: str) -> bool:
    """Whether a trie holding only `topic_filter` matches `topic`."""
    trie = Trie()
    trie.add(topic_filter, "v")
    return trie.match(topic) == ["v"]


# -- the build ---------------------------------------------------------------


@pytest.mark.skipif(NO_EXTENSIONS, reason="CASCADE_FAST_NO_EXTENSIONS is set: the pure twin is expected")
def test_compiled_trie_is_selected():
    """`cascade_fast.topics` exports the compiled class in a normal build."""
    assert topics.COMPILED is True
    assert topics.TopicTrie is _compiled.TopicTrie
    assert topics.TopicTrie.__module__ == "cascade_fast._topics"


def test_no_extensions_selects_the_pure_twin_in_a_fresh_interpreter():
    """CASCADE_FAST_NO_EXTENSIONS=1 makes `topics.TopicTrie` the pure class, and says so in COMPILED."""
    env = dict(os.environ, CASCADE_FAST_NO_EXTENSIONS="1", PYTHONSAFEPATH="1")
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    code = "from cascade_fast import topics; print(topics.COMPILED, topics.TopicTrie.__module__)"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "cascade_fast._topics_py"]


def test_public_functions_are_the_shared_ones():
    """validate_* and filter_matches are one implementation shared by both twins."""
    assert validate_topic is _topics_py.validate_topic
    assert validate_filter is _topics_py.validate_filter
    assert filter_matches is _topics_py.filter_matches


# -- MQTT 3.1.1 §4.7 semantics -----------------------------------------------

# (filter, topic, matches): the examples of §4.7.1.2, §4.7.1.3 and §4.7.2,
# then the edges around them.
SPEC_CASES = [
    # §4.7.1.2 multi-level wildcard
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("sport/#", "sport/", True),
    ("sport/#", "sports", False),
    ("sport/tennis/#", "sport/tennis", True),
    ("#", "sport/tennis/player1", True),
    ("#", "/", True),
    ("#", "", True),
    # §4.7.1.3 single-level wildcard
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),  # + matches the empty level
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+", "", True),
    ("+/tennis/#", "sport/tennis/player1/ranking", True),
    ("+/tennis/#", "sport/tennis", True),
    ("sport/+/player1", "sport/tennis/player1", True),
    ("sport/+/player1", "sport//player1", True),
    # §4.7.2 topics beginning with $
    ("#", "$SYS/monitor/Clients", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("$SYS/#", "$SYS", True),
    ("+", "$", False),
    ("a/+", "a/$b", True),  # only the first level is special
    ("a/#", "a/$b/c", True),
    # literal levels: exact, case-sensitive, no normalisation
    ("sport/tennis", "sport/tennis", True),
    ("sport/tennis", "Sport/tennis", False),
    ("sport/tennis", "sport/tennis/", False),
    ("sport/tennis", "sport/tennis ", False),
    ("/", "/", True),
    ("/", "//", False),
    ("a//b", "a//b", True),
    ("a//b", "a/b", False),
    # non-ASCII levels compare by code point
    ("capteurs/température/+", "capteurs/température/salon", True),
    ("capteurs/température/+", "capteurs/temperature/salon", False),
    ("日本/+/東京", "日本/関東/東京", True),
    ("🙂/#", "🙂/x", True),
    # MQTT 5 §4.8.2: shared subscriptions match as their inner filter
    ("$share/g/sport/+", "sport/tennis", True),
    ("$share/g/sport/+", "$share/g/sport/tennis", False),
    ("$share/group-1/#", "a/b", True),
    ("$share/g/#", "$SYS/x", False),
    ("$share/g/$SYS/#", "$SYS/x", True),
    ("$share/g/$share/h/x", "$share/h/x", True),  # only the outer prefix is stripped
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), SPEC_CASES)
def test_spec_examples_in_the_trie(Trie: Any, topic_filter: str, topic: str, expected: bool):
    """Each spec example matches (or not) in the trie."""
    assert matching(Trie, topic_filter, topic) is expected


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), SPEC_CASES)
def test_spec_examples_in_filter_matches(topic_filter: str, topic: str, expected: bool):
    """filter_matches, the single-filter reading, agrees on every spec example."""
    assert filter_matches(topic_filter, topic) is expected


def test_wildcard_characters_in_a_topic_are_plain_text(Trie: Any):
    """match() does not validate: '+' and '#' in a topic match only wildcards, never a literal filter."""
    trie = Trie()
    trie.add("a/+", "plus")
    trie.add("a/#", "hash")
    trie.add("b", "literal")
    assert trie.match("a/+") == ["plus", "hash"]
    assert trie.match("a/#") == ["plus", "hash"]
    assert trie.match("+") == []
    assert trie.match("#") == []


def test_nul_and_control_characters_in_a_topic_do_not_break_matching(Trie: Any):
    """A topic is not validated in match(): U+0000 and newlines are ordinary characters."""
    trie = Trie()
    trie.add("a/+", 1)
    trie.add("#", 2)
    assert trie.match("a/\x00") == [1, 2]
    assert trie.match("a/b\nc") == [1, 2]
    assert trie.match("a\x00/b") == [2]


def test_lone_surrogates_in_a_topic_match_only_wildcards(Trie: Any):
    """A str with lone surrogates (no UTF-8 exists) never raises and matches only through wildcards."""
    trie = Trie()
    trie.add("a/+", "plus")
    trie.add("a/#", "hash")
    trie.add("a/b", "literal")
    trie.add("\ud7ff/x", "below-the-surrogates")
    assert trie.match("a/\ud800") == ["plus", "hash"]
    assert trie.match("a/\udfff/c") == ["hash"]
    assert trie.match("\ud800\udc00/x") == []  # a surrogate pair is not U+10000
    assert trie.match("\ud800") == []


def test_a_surrogate_pair_in_str_is_not_the_astral_character(Trie: Any):
    """'\\ud83d\\ude42' (two code points) does not match a filter spelled with U+1F642."""
    trie = Trie()
    trie.add("🙂", 1)
    assert trie.match("🙂") == [1]
    assert trie.match("\ud83d\ude42") == []


# -- results: order, duplicates, removal --------------------------------------


def test_results_come_in_the_order_the_pairs_were_added(Trie: Any):
    """Values of several matching filters come back in add() order, not trie order."""
    trie = Trie()
    trie.add("a/b", 1)
    trie.add("#", 2)
    trie.add("a/+", 3)
    trie.add("+/b", 4)
    trie.add("a/b", 5)
    trie.add("a/#", 6)
    trie.add("x", 7)
    assert trie.match("a/b") == [1, 2, 3, 4, 5, 6]


def test_a_value_under_two_matching_filters_appears_twice(Trie: Any):
    """The result lists pairs, not distinct values."""
    trie = Trie()
    handler = object()
    trie.add("a/+", handler)
    trie.add("a/b", handler)
    assert trie.match("a/b") == [handler, handler]


def test_adding_the_same_pair_twice_stores_it_twice(Trie: Any):
    """add() does not deduplicate; len() counts pairs and each remove() takes one."""
    trie = Trie()
    trie.add("a", "v")
    trie.add("a", "v")
    assert len(trie) == 2
    assert trie.match("a") == ["v", "v"]
    assert trie.remove("a", "v") is True
    assert trie.match("a") == ["v"]
    assert len(trie) == 1


def test_remove_takes_the_earliest_equal_pair(Trie: Any):
    """remove() compares with ==, takes the earliest added pair, and keeps the order of the rest."""
    trie = Trie()
    trie.add("a", 1)
    trie.add("#", "x")
    trie.add("a", 1.0)  # == 1
    trie.add("a", 2)
    assert trie.remove("a", 1.0) is True
    assert trie.match("a") == ["x", 1.0, 2]
    assert [type(v) for v in trie.match("a")] == [str, float, int]


def test_remove_reports_what_was_not_there(Trie: Any):
    """remove() returns False for an unknown filter, an unknown value, or a prefix of a stored filter."""
    trie = Trie()
    trie.add("a/b/c", 1)
    assert trie.remove("a/b/c", 2) is False
    assert trie.remove("a/b", 1) is False
    assert trie.remove("a/b/c/d", 1) is False
    assert trie.remove("a/+/c", 1) is False
    assert trie.remove("a/b/#", 1) is False
    assert len(trie) == 1
    assert trie.match("a/b/c") == [1]


def test_remove_then_add_back_after_pruning(Trie: Any):
    """Removing the last pair of a branch prunes it; the filter can be added again and matches."""
    trie = Trie()
    for topic_filter in ("a/b/c", "a/+/c", "a/#", "+", "#", "a/b/c/d/e/f"):
        trie.add(topic_filter, topic_filter)
    for topic_filter in ("a/b/c", "a/+/c", "a/#", "+", "#", "a/b/c/d/e/f"):
        assert trie.remove(topic_filter, topic_filter) is True
    assert len(trie) == 0
    assert trie.match("a/b/c") == []
    trie.add("a/b/c", 9)
    assert trie.match("a/b/c") == [9]


def test_remove_keeps_siblings_and_descendants(Trie: Any):
    """Removing a filter keeps the filters below and beside it."""
    trie = Trie()
    trie.add("a", "a")
    trie.add("a/b", "ab")
    trie.add("a/c", "ac")
    trie.add("a/+", "a+")
    assert trie.remove("a", "a") is True
    assert trie.match("a/b") == ["ab", "a+"]
    assert trie.remove("a/+", "a+") is True
    assert trie.match("a/c") == ["ac"]
    assert trie.match("a") == []


def test_share_prefix_is_stored_as_the_inner_filter(Trie: Any):
    """$share/{group}/{filter} and {filter} are one filter to the trie: add under one, remove under the other."""
    trie = Trie()
    trie.add("$share/g/a/+", "shared")
    trie.add("a/+", "plain")
    assert trie.match("a/b") == ["shared", "plain"]
    assert trie.remove("a/+", "shared") is True
    assert trie.remove("$share/other/a/+", "plain") is True
    assert len(trie) == 0


def test_clear_removes_everything(Trie: Any):
    """clear() empties the trie and its cache; it is usable afterwards."""
    trie = Trie()
    for i in range(100):
        trie.add(f"a/{i}/#", i)
    assert len(trie.match("a/7/x")) == 1
    trie.clear()
    assert len(trie) == 0
    assert trie.match("a/7/x") == []
    assert trie.cached_topics <= 1
    trie.add("a/7/x", "again")
    assert trie.match("a/7/x") == ["again"]


def test_many_siblings_grow_and_shrink_the_child_table(Trie: Any):
    """Thousands of children under one level (the compiled twin's hash table) add, match and remove correctly."""
    trie = Trie()
    names = [f"org-{i}" for i in range(3000)] + ["", "é", "x" * 40, "日本語のレベル名はとても長いです"]
    for name in names:
        trie.add(f"t/{name}/+", name)
    for name in names[::97]:
        assert trie.match(f"t/{name}/x") == [name]
    assert trie.match("t/org-3000/x") == []
    for name in names[::2]:
        assert trie.remove(f"t/{name}/+", name) is True
    for index, name in enumerate(names):
        assert trie.match(f"t/{name}/x") == ([] if index % 2 == 0 else [name])
    assert len(trie) == len(names) // 2


def test_long_levels_and_levels_sharing_a_prefix(Trie: Any):
    """Levels longer than a machine word, and ones that differ only at the end, stay distinct."""
    trie = Trie()
    base = "abcdefghijklmnopqrstuvwxyz0123456789"
    for cut in range(1, len(base) + 1):
        trie.add(f"{base[:cut]}/x", cut)
    for cut in range(1, len(base) + 1):
        assert trie.match(f"{base[:cut]}/x") == [cut]
    assert trie.match(f"{base}!/x") == []


def test_a_lone_literal_child_is_matched_and_near_misses_are_not(Trie: Any):
    """A node's only literal child (inline in the compiled twin, found by hash tag) matches exactly its level.

    Covers every level length across the 8-byte words and the 16-byte
    inline key, levels differing in one byte or one length, and children
    moved back inline from a table after removals.
    """
    trie = Trie()
    base = "abcdefghijklmnopqrstuvwxyz0123456789"
    for cut in range(0, len(base) + 1):
        level = base[:cut]
        trie.add(f"p{cut}/{level}/end", cut)
        trie.add(f"p{cut}/+/end", "plus")
        assert trie.match(f"p{cut}/{level}/end") == [cut, "plus"]
        assert trie.match(f"p{cut}/{level}!/end") == ["plus"]
        if cut:
            assert trie.match(f"p{cut}/{level[:-1]}/end") == ["plus"]
            assert trie.match(f"p{cut}/{level[:-1]}?/end") == ["plus"]
            assert trie.match(f"p{cut}/?{level[1:]}/end") == ["plus"]
    siblings = [f"s{i}" for i in range(20)]
    for name in siblings:
        trie.add(f"q/{name}", name)
    for name in siblings[1:]:
        assert trie.remove(f"q/{name}", name) is True
    assert trie.match("q/s0") == ["s0"]
    assert trie.match("q/s1") == []
    assert trie.match("q/s00") == []


def test_deep_filters_and_topics_do_not_recurse(Trie: Any):
    """A filter of 30,000 levels (near the 65535-byte limit) adds, matches and removes without recursion."""
    trie = Trie()
    deep = "/".join(["a"] * 30000)
    trie.add(deep, "deep")
    trie.add(deep + "/#", "deep-hash")
    trie.add("/".join(["+"] * 30000), "pluses")
    assert trie.match(deep) == ["deep", "deep-hash", "pluses"]
    assert trie.match(deep + "/a") == ["deep-hash"]
    assert trie.match("/".join(["a"] * 29999)) == []
    assert trie.remove(deep, "deep") is True
    assert trie.match(deep) == ["deep-hash", "pluses"]


def test_many_overlapping_wildcards_merge_in_add_order(Trie: Any):
    """A topic matched by hundreds of filters through many paths gets each value once per pair, in add order."""
    trie = Trie()
    filters = []
    for mask in range(64):
        levels = ["+" if mask >> bit & 1 else "l" for bit in range(6)]
        filters.append("/".join(levels))
        filters.append("/".join(levels[:3]) + "/#")
    for index, topic_filter in enumerate(filters):
        trie.add(topic_filter, index)
    expected = [i for i, f in enumerate(filters) if filter_matches(f, "l/l/l/l/l/l")]
    assert trie.match("l/l/l/l/l/l") == expected
    assert len(expected) == 128


# -- the cache ----------------------------------------------------------------


def test_match_returns_a_fresh_list(Trie: Any):
    """Changing a returned list changes neither the trie nor later results (the cache is not exposed)."""
    trie = Trie()
    trie.add("a", 1)
    first = trie.match("a")
    first.append("junk")
    second = trie.match("a")
    assert second == [1]
    assert second is not first
    nothing = trie.match("b")
    nothing.append("junk")
    assert trie.match("b") == []
    assert trie.match("c") == []


def test_cache_remembers_topics_and_add_remove_clear_invalidate_it(Trie: Any):
    """A matched topic is cached; add, remove and clear drop the cache so results stay correct."""
    trie = Trie()
    trie.add("a/+", 1)
    assert trie.match("a/b") == [1]
    assert trie.cached_topics == 1
    assert trie.match("a/b") == [1]
    assert trie.cached_topics == 1
    trie.add("a/b", 2)
    assert trie.cached_topics == 0
    assert trie.match("a/b") == [1, 2]
    assert trie.remove("a/+", 1) is True
    assert trie.cached_topics == 0
    assert trie.match("a/b") == [2]
    trie.clear()
    assert trie.match("a/b") == []


def test_failed_remove_and_invalid_add_leave_the_cache(Trie: Any):
    """Only a change drops the cache: a remove that finds nothing and a rejected add do not."""
    trie = Trie()
    trie.add("a", 1)
    trie.match("a")
    assert trie.remove("a", 2) is False
    with pytest.raises(ValueError):
        trie.add("a/#/b", 3)
    assert trie.cached_topics == 1


def test_cache_is_bounded(Trie: Any):
    """The cache never holds more than cache_size topics; results stay correct across the resets."""
    trie = Trie(cache_size=8)
    assert trie.cache_size == 8
    trie.add("t/+", "v")
    for i in range(100):
        assert trie.match(f"t/{i}") == ["v"]
        assert trie.cached_topics <= 8
    assert trie.match("t/99") == ["v"]


def test_cache_size_zero_disables_the_cache(Trie: Any):
    """cache_size=0: nothing is cached, matching still works."""
    trie = Trie(cache_size=0)
    trie.add("#", 1)
    assert trie.match("a") == [1]
    assert trie.match("a") == [1]
    assert trie.cached_topics == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "8", None, 2**30 + 1])
def test_cache_size_must_be_a_non_negative_int(Trie: Any, bad: Any):
    """A cache_size that is not an int from 0 to 2**30 is a ValueError naming it."""
    with pytest.raises(ValueError, match="cache_size"):
        Trie(cache_size=bad)


def test_default_cache_size_is_shared(Trie: Any):
    """Both twins default to the same bound."""
    assert Trie().cache_size == _topics_py.DEFAULT_CACHE_SIZE


def test_calling_init_again_starts_an_empty_trie(Trie: Any):
    """__init__ on a used trie empties it, in both twins (as a fresh object would be)."""
    trie = Trie(cache_size=8)
    trie.add("a/+", 1)
    assert trie.match("a/b") == [1]
    trie.__init__(cache_size=2)
    assert len(trie) == 0
    assert trie.cache_size == 2
    assert trie.match("a/b") == []
    trie.add("a/b", 2)
    assert trie.match("a/b") == [2]


def test_calling_init_again_forgets_cached_topics_of_a_trie_without_pairs(Trie: Any):
    """__init__ on a trie that never held a pair but has cached lookups forgets them too, as the pure twin does.

    The compiled twin only checked for pairs and nodes, so the cached topics
    outlived __init__: `cached_topics` (and repr) differed between the twins,
    and exceeded the new cache_size (here 0, where nothing may be cached).
    """
    trie = Trie(cache_size=8)
    assert trie.match("a/b") == []
    assert trie.match("a/c") == []
    assert trie.cached_topics == 2
    trie.__init__(cache_size=0)
    assert trie.cached_topics == 0
    assert "cached=0" in repr(trie)
    assert trie.match("a/b") == []
    assert trie.cached_topics == 0
    trie.__init__(cache_size=1)
    trie.add("a/+", 1)
    assert trie.match("a/b") == [1]
    assert trie.cached_topics == 1


# -- validation ---------------------------------------------------------------

BAD_FILTERS = [
    ("", "is empty"),
    ("a/\x00/b", "contains U+0000"),
    ("a\ud800", "lone surrogate"),
    ("x" * 65536, "longer than 65535 bytes of UTF-8"),
    ("é" * 32768, "longer than 65535 bytes of UTF-8 (65536 bytes"),
    ("sport+", "wildcard '+' is not a whole level"),
    ("sport/+tennis", "wildcard '+' is not a whole level"),
    ("sport/ten+nis/x", "wildcard '+' is not a whole level (level 1 is 'ten+nis'"),
    ("sport#", "wildcard '#' is not a whole level"),
    ("sport/tennis#", "wildcard '#' is not a whole level"),
    ("sport/#/ranking", "'#' is not the last level"),
    ("#/", "'#' is not the last level"),
    ("#/#", "'#' is not the last level"),
    ("++", "wildcard '+' is not a whole level"),
    ("$share", "has no share name"),
    ("$share/", "has no share name"),
    ("$share//a", "has no share name"),
    ("$share/g", "has no topic filter after the share name"),
    ("$share/g/", "has no topic filter after the share name"),
    ("$share/g+/a", "share name 'g+' contains a wildcard"),
    ("$share/#/a", "share name '#' contains a wildcard"),
    ("$share/+/a", "share name '+' contains a wildcard"),
    ("$share/g/a/#/b", "'#' is not the last level"),
    ("$share/g/a+", "wildcard '+' is not a whole level"),
]


@pytest.mark.parametrize(("topic_filter", "problem"), BAD_FILTERS)
def test_validate_filter_names_the_value_and_the_problem(topic_filter: str, problem: str):
    """Each invalid filter is a ValueError whose message has the filter's repr and the rule broken."""
    with pytest.raises(ValueError) as info:
        validate_filter(topic_filter)
    message = str(info.value)
    assert problem in message
    assert repr(topic_filter[:60]) in message


@pytest.mark.parametrize(("topic_filter", "problem"), BAD_FILTERS)
def test_add_and_remove_reject_invalid_filters_alike(Trie: Any, topic_filter: str, problem: str):
    """Both twins raise validate_filter's exact message from add() and remove(), and store nothing."""
    with pytest.raises(ValueError) as expected:
        validate_filter(topic_filter)
    trie = Trie()
    with pytest.raises(ValueError) as info:
        trie.add(topic_filter, 1)
    assert str(info.value) == str(expected.value)
    with pytest.raises(ValueError) as info:
        trie.remove(topic_filter, 1)
    assert str(info.value) == str(expected.value)
    assert len(trie) == 0


@pytest.mark.parametrize(
    "topic_filter",
    ["a", "/", "//", "+", "#", "+/+", "/#", "a/+/b/#", "$SYS/#", "$share/g/#", "$share/g/+/x", "$shared/x",
     "$sharex", "a/$share", "é/日本", "x" * 65535, "é" * 32767, "a b/c\td", "$share/g/$share"],
)
def test_valid_filters_pass(Trie: Any, topic_filter: str):
    """Valid filters, including edge lengths and $share look-alikes, validate and can be added."""
    validate_filter(topic_filter)
    trie = Trie()
    trie.add(topic_filter, 1)
    assert len(trie) == 1


BAD_TOPICS = [
    ("", "is empty"),
    ("a/\x00", "contains U+0000"),
    ("a/\udc80", "lone surrogate"),
    ("x" * 65536, "longer than 65535 bytes of UTF-8"),
    ("sport/+", "contains a wildcard"),
    ("sport/#", "contains a wildcard"),
    ("a+b", "contains a wildcard"),
    ("#", "contains a wildcard"),
]


@pytest.mark.parametrize(("topic", "problem"), BAD_TOPICS)
def test_validate_topic_names_the_value_and_the_problem(topic: str, problem: str):
    """Each invalid topic name is a ValueError whose message has the topic's repr and the rule broken."""
    with pytest.raises(ValueError) as info:
        validate_topic(topic)
    assert problem in str(info.value)
    assert repr(topic[:60]) in str(info.value)


@pytest.mark.parametrize("topic", ["a", "/", "a//b", "$SYS/x", "$share/g/x", "é", "x" * 65535, "a b"])
def test_valid_topics_pass(topic: str):
    """Valid topic names validate silently."""
    assert validate_topic(topic) is None


@pytest.mark.parametrize("bad", [b"a/b", None, 1, ["a"]])
def test_non_str_is_a_type_error(Trie: Any, bad: Any):
    """A non-str filter or topic is a TypeError, from validation, add, remove and match alike."""
    trie = Trie()
    name = type(bad).__name__
    with pytest.raises(TypeError, match=f"topic filter must be str, not {name}"):
        validate_filter(bad)
    with pytest.raises(TypeError, match=f"topic name must be str, not {name}"):
        validate_topic(bad)
    with pytest.raises(TypeError, match=f"topic filter must be str, not {name}"):
        trie.add(bad, 1)
    with pytest.raises(TypeError, match=f"topic filter must be str, not {name}"):
        trie.remove(bad, 1)
    with pytest.raises(TypeError, match=f"topic must be str, not {name}"):
        trie.match(bad)


def test_long_values_are_shortened_in_messages():
    """A 64 KiB filter is named by a shortened repr, not pasted whole into the message."""
    with pytest.raises(ValueError) as info:
        validate_filter("+" + "x" * 70000)
    assert len(str(info.value)) < 400
    assert "70001 characters" in str(info.value)


def test_filter_matches_validates_the_filter_only():
    """filter_matches raises for a bad filter but treats any topic as text, like match()."""
    with pytest.raises(ValueError, match="not the last level"):
        filter_matches("a/#/b", "a/x/b")
    assert filter_matches("a/+", "a/#") is True
    assert filter_matches("a/+", "a/\ud800") is True


# -- hostile values -------------------------------------------------------------


class _EqualsEverything:
    """A value equal to anything, to check that remove() uses ==."""

    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = object.__hash__


def test_remove_uses_equality_not_identity(Trie: Any):
    """An equal value removes a stored one."""
    trie = Trie()
    trie.add("a", "stored")
    assert trie.remove("a", _EqualsEverything()) is True
    assert len(trie) == 0


def test_eq_that_raises_propagates_and_changes_nothing(Trie: Any):
    """An exception from a value's __eq__ leaves the trie as it was."""

    class Angry:
        def __eq__(self, other: object) -> bool:
            raise RuntimeError("no comparing me")

        __hash__ = object.__hash__

    trie = Trie()
    stored = Angry()
    trie.add("a", stored)
    with pytest.raises(RuntimeError, match="no comparing me"):
        trie.remove("a", "x")
    assert trie.match("a") == [stored]
    assert len(trie) == 1


def test_eq_that_changes_the_trie_is_detected(Trie: Any):
    """A value whose __eq__ adds to the trie makes remove() raise RuntimeError, not corrupt memory."""
    trie = Trie()

    class Meddler:
        def __eq__(self, other: object) -> bool:
            for i in range(50):
                trie.add(f"x/{i}", i)  # forces node storage to grow
            return True

        __hash__ = object.__hash__

    trie.add("a", "first")
    trie.add("a", "second")
    with pytest.raises(RuntimeError, match="changed during remove"):
        trie.remove("a", Meddler())
    assert trie.match("a") == ["first", "second"]
    assert trie.match("x/3") == [3]


def test_finalizer_that_uses_the_trie_during_remove_and_clear(Trie: Any):
    """A removed value whose __del__ adds to the same trie runs after remove()/clear() finished."""
    trie = Trie()
    seen = []

    class Reentrant:
        def __init__(self, name: str) -> None:
            self.name = name

        def __del__(self) -> None:
            trie.add(f"dead/{self.name}", self.name)
            seen.append(trie.match(f"dead/{self.name}"))

    trie.add("a", Reentrant("one"))
    trie.match("a")  # cache a result that references the value
    assert trie.remove("a", trie.match("a")[0]) is True
    gc.collect()
    assert seen == [["one"]]
    trie.add("b", Reentrant("two"))
    trie.match("b")
    trie.clear()
    gc.collect()
    assert seen == [["one"], ["two"]]
    assert trie.match("dead/two") == ["two"]


def test_a_cycle_through_the_trie_is_collected(Trie: Any):
    """trie -> value -> trie is garbage once unreachable: values are visible to the cycle collector."""

    class Handler:
        pass

    handler = Handler()
    trie = Trie()
    handler.trie = trie
    trie.add("a/+", handler)
    trie.match("a/b")  # and through the cache
    probe = weakref.ref(handler)
    del handler, trie
    gc.collect()
    assert probe() is None


def test_str_subclass_topics_match_as_plain_str(Trie: Any):
    """A str subclass with odd __eq__/__hash__/__del__ matches as its text and cannot poison the cache."""
    trie = Trie()
    trie.add("a/+", 1)

    class Odd(str):
        def __eq__(self, other: object) -> bool:
            return True

        def __hash__(self) -> int:
            return 0

        def __del__(self) -> None:
            trie.add("late/#", 2)

    assert trie.match(Odd("a/b")) == [1]
    gc.collect()
    assert trie.match(Odd("x/y")) == []
    gc.collect()
    assert trie.match("late/z") == [2, 2]
    assert trie.match("a/b") == [1]


def test_pickling_is_refused_by_both(Trie: Any):
    """Neither twin pickles (the compiled one cannot), so the twins behave alike."""
    import pickle

    with pytest.raises(TypeError, match="cannot pickle"):
        pickle.dumps(Trie())


def test_repr_counts_pairs_and_cached_topics(Trie: Any):
    """repr() says how many pairs and cached topics the trie holds."""
    trie = Trie()
    trie.add("a", 1)
    trie.match("a")
    assert repr(trie).endswith("TopicTrie pairs=1 cached=1>")


_GC_FINALIZER_SCRIPT = r"""
import gc, random, sys
from {module} import TopicTrie

trie = TopicTrie(cache_size={cache})
rnd = random.Random({seed})

class V:
    def __init__(self, n):
        self.n = n

def fill():
    for i in range(8):
        trie.add("a/+", V(i))
        trie.add("a/#", V(100 + i))

class Bomb:
    # Cyclic garbage whose finalizer changes the trie, run by the cyclic GC
    # at whatever allocation the trie makes next.
    def __init__(self, action):
        self.me = self
        self.action = action
    def __del__(self):
        if self.action == "clear":
            trie.clear()
        elif self.action == "match":
            for i in range(100):  # fills (and resets) a small cache from inside the trie's own calls
                trie.match("a/%d" % i)
        elif self.action == "grow":
            for i in range(40):
                trie.add("z/%d/%d" % (rnd.randrange(1000), i), V(-1))
        else:
            for v in trie.match("a/b")[:4]:
                trie.remove("a/+", v) or trie.remove("a/#", v)

gc.collect()
for k in range(400):
    if len(trie.match("a/b")) < 4:
        fill()
    action = rnd.choice(["clear", "grow", "remove", "match"])
    op = rnd.choice(["match", "add", "remove", "clear"])
    value = V(7)
    victims = trie.match("a/b")
    gc.disable()
    Bomb(action)
    gc.set_threshold(1)
    gc.enable()  # the next allocation of a GC object (inside the trie operation) collects the Bomb
    try:
        if op == "match":
            result = trie.match("a/b")
        elif op == "add":
            trie.add("a/x", value)  # (a finalizer's clear() may legitimately come after it)
        elif op == "remove":
            if victims:
                trie.remove("a/+", victims[0]) or trie.remove("a/#", victims[0])
        else:
            trie.clear()
    except RuntimeError as exc:  # remove() may refuse when the trie changed under it
        assert "changed during remove" in str(exc), exc
    finally:
        gc.disable()
    del victims
    for topic in ("a/b", "a/x", "z/1/2"):
        assert all(type(v) is V for v in trie.match(topic)), "a matched value is not a V"
gc.enable()
print("ok")
"""


@pytest.mark.parametrize(("cache", "seed"), [(0, 2), (64, 3), (3, 4)])  # seeds that crashed the old build
def test_finalizers_run_by_the_gc_inside_trie_operations(Trie: Any, cache: int, seed: int):
    """The cyclic GC may run inside match/add/remove/clear (any allocation); finalizers changing the trie then must not corrupt it.

    In a subprocess: a failure here used to be a segfault (use after free of
    values and node storage in the compiled twin).
    """
    _run_trie_script(_GC_FINALIZER_SCRIPT.format(module=Trie.__module__, cache=cache, seed=seed))


def _run_trie_script(script: str) -> None:
    """Run `script` in a subprocess (a use after free there is a segfault, not a dead test run); it must print ok."""
    env = dict(os.environ, PYTHONSAFEPATH="1")
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    proc = subprocess.run(
        [sys.executable, "-X", "dev", "-c", script], capture_output=True, text=True, timeout=60, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stdout, proc.stderr[-3000:])


# Fires a finalizer at the k-th allocation of a GC object inside `op`, for
# every k: so at every point where the trie may run the cyclic GC.
_GC_SWEEP = r"""
import gc
from {module} import TopicTrie

class V:
    def __init__(self, n):
        self.n = n
    def __repr__(self):
        return "V(%d)" % self.n

class Bomb:
    def __init__(self, action):
        self.me = self  # cyclic garbage: only the cyclic GC frees it
        self.action = action
    def __del__(self):
        self.action()

def sweep(setup, op):
    fired = 0
    for k in range(1, 40):
        state = setup()
        gc.collect()
        gc.disable()
        ran = []
        Bomb(lambda: (ran.append(1), state["finalizer"]()))
        gc.set_threshold(k)
        gc.enable()
        try:
            op(state)
        finally:
            gc.disable()
            gc.set_threshold(700)
            gc.enable()
        gc.collect()
        fired += bool(ran)
    assert fired, "no finalizer ran"
"""


_STALE_CACHE_SCRIPT = _GC_SWEEP + r"""
seen = []

def state_expected(trie, table):
    return table[len(trie)]  # what "a" matches with this many pairs in the trie

def setup_remove():
    trie = TopicTrie()
    v = V(1)
    trie.add("a", v)
    trie.match("a")  # cached
    return dict(trie=trie, v=v, finalizer=lambda: seen.append((len(trie), trie.match("a"), state_expected(trie, {{1: [v], 0: []}}))))

def setup_clear():
    trie = TopicTrie()
    v = V(2)
    trie.add("x/y/z", V(1))
    trie.add("a", v)
    trie.match("a")
    return dict(trie=trie, finalizer=lambda: seen.append((len(trie), trie.match("a"), state_expected(trie, {{2: [v], 0: []}}))))

def setup_add():
    trie = TopicTrie()
    v1, v2 = V(1), V(2)
    trie.add("a", v1)
    trie.match("a")
    return dict(trie=trie, v2=v2, finalizer=lambda: seen.append((len(trie), trie.match("a"), state_expected(trie, {{1: [v1], 2: [v1, v2]}}))))

sweep(setup_remove, lambda s: s["trie"].remove("a", s["v"]))
sweep(setup_clear, lambda s: s["trie"].clear())
sweep(setup_add, lambda s: s["trie"].add("+", s["v2"]))
for size, got, expected in seen:
    assert got == expected, (size, got, expected)
print("ok")
"""


def test_a_finalizer_run_by_the_cache_reset_sees_the_changed_trie(Trie: Any):
    """add/remove/clear reset the cache after changing the trie, and the reset allocates (may run the GC).

    A finalizer that matches a cached topic there must get the trie's
    current result, not the stale cached one: the compiled twin caches a
    node index, so after remove()/clear() released that node a stale hit
    read a freed node (a crash), and after add() it missed the new value.
    """
    _run_trie_script(_STALE_CACHE_SCRIPT.format(module=Trie.__module__))


_FULL_CACHE_SCRIPT = _GC_SWEEP + r"""
results = []

def setup(merged):
    trie = TopicTrie(cache_size=1)
    values = [V(1), V(2)] if merged else [V(1)]
    trie.add("a", values[0])
    if merged:
        trie.add("+", values[1])
    trie.match("other")  # the cache is full: caching "a" resets it first
    state = dict(trie=trie, values=values, ran=False)

    def finalizer():
        for v in values:
            trie.remove("a", v) or trie.remove("+", v)
        trie.add("z/{{}}".format(len(values)), V(99))  # may reuse the released nodes
        state["ran"] = True

    state["finalizer"] = finalizer
    return state

def op(state):
    got = state["trie"].match("a")
    ran = state["ran"]
    results.append((got, state["values"], ran, state["trie"].match("a")))

for merged in (False, True):
    sweep(lambda: setup(merged), op)
for got, values, ran, again in results:
    assert got in (values, []), (got, values)  # before or after the finalizer's removals
    if ran:
        assert again == [], again  # nothing stale was cached
print("ok")
"""


def test_a_finalizer_run_by_a_full_cache_reset_may_change_the_trie(Trie: Any):
    """match() caching a topic into a full cache resets it first, and that allocates (may run the GC).

    A finalizer run there may remove what the walk just found: the compiled
    twin then returned the walk's node index anyway and read the released
    node (a crash), or handed back a merged result of values already gone.
    The pure twin, whose merge allocates, returned (and cached) a result
    torn between before and after the finalizer.
    """
    _run_trie_script(_FULL_CACHE_SCRIPT.format(module=Trie.__module__))


_LOOKUP_AGAIN_SCRIPT = _GC_SWEEP + r"""
seen = []

class Loud(V):
    # Freed (by refcount) when the last list holding it goes: matches the trie then.
    def __del__(self):
        seen.append(("del", trie_of[0].match("a")))

trie_of = [None]

def setup():
    trie = trie_of[0] = TopicTrie(cache_size=1)
    trie.add("a", Loud(1))
    trie.add("+", Loud(2))
    trie.add("a", V(3))
    trie.add("+", V(4))
    trie.match("other")  # the cache is full: caching "a" resets it first

    def finalizer():
        for v in trie.match("a"):
            if v.n in (1, 2):
                trie.remove("a", v) or trie.remove("+", v)

    return dict(trie=trie, finalizer=finalizer)

def op(state):
    seen.append(("op", state["trie"].match("a")))

sweep(setup, op)
for where, got in seen:
    assert [v.n for v in got] in ([1, 2, 3, 4], [3, 4]), (where, got)
print("ok")
"""


def test_a_merged_result_outlives_a_finalizer_that_drops_the_previous_one(Trie: Any):
    """A lookup that runs again (a finalizer changed the trie) must keep its new merged result.

    The first result may hold the last references to values the finalizer
    removed; dropping it runs their __del__, which may match on the trie
    while the new merged list waits to be handed over, and must not take it.
    """
    _run_trie_script(_LOOKUP_AGAIN_SCRIPT.format(module=Trie.__module__))
