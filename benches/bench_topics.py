"""Topic-trie benchmark: compiled vs pure twin vs paho's MQTTMatcher, same inputs, same run.

The observer's workload from DESIGN.md: 10, 1,000 and 10,000 subscriptions
shaped like Cascade's (``cascade/telemetry/{org}/{project}/+/events``,
``cascade/status/+``, ``cascade/constraints/#`` and exact telemetry topics),
matching 100,000 distinct topics (80% telemetry, 10% status, 10%
constraints; some match nothing).

    PYTHONPATH=src:. pytest benches/bench_topics.py --benchmark-group-by=group -p no:cacheprovider

Groups ``trie-{size}-{cold|warm}``, each printing the three side by side:

* cold: the result cache is invalidated before each round and every topic is
  a str object never seen before (its hash not computed yet), as a topic
  decoded from the network is; setup is not timed;
* warm: the same str objects again, every result already cached.

paho has no cache, so its cold and warm runs differ only in the str hash.
The tries use ``cache_size=131072`` so all 100k topics fit (the default,
65536, would reset halfway through a warm round). A summary with topics/s by
wall clock and by process CPU time (steadier on the shared 2-core machine),
and the compiled/paho and compiled/pure ratios, is printed at the end.
Targets: compiled >= 5M distinct topics/s at 10k filters cold, and >= 20x
paho in the same run. Takes about a minute.
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable

import pytest
from paho.mqtt.matcher import MQTTMatcher

from cascade_fast import _topics_py
from cascade_fast._extensions import load_compiled

_compiled = load_compiled("_topics")

N_TOPICS = 100_000
SIZES = (10, 1_000, 10_000)
CACHE_SIZE = 131_072
IMPLS = ("compiled", "pure", "paho")
# Rounds per implementation: the compiled rounds take ~20 ms, the others ~0.3 s.
ROUNDS = {"compiled": 25, "pure": 5, "paho": 5}

# (group, impl) -> (best wall seconds, best CPU seconds) per round, for the summary.
_results: dict[tuple[str, str], tuple[float, float]] = {}


def cascade_filters(count: int, rng: random.Random) -> list[str]:
    """`count` subscriptions as an observer fleet would hold them: mostly per-project telemetry wildcards."""
    filters = ["cascade/status/+", "cascade/constraints/#"]
    seen = set(filters)
    while len(filters) < count:
        org, project = rng.randrange(100), rng.randrange(200)
        if rng.random() < 0.9:
            candidate = f"cascade/telemetry/org-{org}/project-{project}/+/events"
        else:
            candidate = f"cascade/telemetry/org-{org}/project-{project}/run-{rng.randrange(1000)}/events"
        if candidate not in seen:
            seen.add(candidate)
            filters.append(candidate)
    return filters


def cascade_topics(count: int, rng: random.Random) -> list[str]:
    """`count` distinct topic names: telemetry per run, instance status, constraint scopes."""
    topics = []
    for i in range(count):
        kind = rng.random()
        if kind < 0.8:
            org, project, run = rng.randrange(110), rng.randrange(200), f"run-{i:06d}-{rng.getrandbits(32):08x}"
            topics.append(f"cascade/telemetry/org-{org}/project-{project}/{run}/events")
        elif kind < 0.9:
            topics.append(f"cascade/status/host-{i:06d}-{rng.randrange(1 << 16)}")
        else:
            topics.append(f"cascade/constraints/org-{rng.randrange(100)}/project-{rng.randrange(200)}/c{i}")
    assert len(set(topics)) == count
    return topics


def fresh_copies(topics: list[str]) -> list[str]:
    """Equal str objects that were never hashed (a decoder makes a new str per message)."""
    return [topic.encode().decode() for topic in topics]


@pytest.fixture(scope="module")
def topics() -> list[str]:
    """The 100k distinct topics every implementation matches."""
    return cascade_topics(N_TOPICS, random.Random(3))


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"{n}f")
def filters(request: pytest.FixtureRequest) -> list[str]:
    """The subscriptions, one set per size."""
    return cascade_filters(request.param, random.Random(request.param))


def make_matcher(impl: str, filters: list[str]) -> tuple[Callable[[str], list[Any]], Callable[[], None]]:
    """(match function, invalidate-the-cache function) for `impl` loaded with `filters`."""
    if impl == "paho":
        matcher = MQTTMatcher()
        for topic_filter in filters:
            matcher[topic_filter] = topic_filter
        iter_match = matcher.iter_match

        def paho_match(topic: str) -> list[Any]:
            return list(iter_match(topic))

        return paho_match, lambda: None
    if impl == "compiled":
        if _compiled is None:
            pytest.skip("compiled trie not loaded")
        trie = _compiled.TopicTrie(cache_size=CACHE_SIZE)
    else:
        trie = _topics_py.TopicTrie(cache_size=CACHE_SIZE)
    for topic_filter in filters:
        trie.add(topic_filter, topic_filter)

    def invalidate() -> None:
        trie.add("bench/invalidate", None)  # any change drops the cache
        trie.remove("bench/invalidate", None)

    return trie.match, invalidate


def _loop(match: Callable[[str], Any], topics: list[str]) -> int:
    matched = 0
    for topic in topics:
        if match(topic):
            matched += 1
    return matched


@pytest.fixture(scope="module", autouse=True)
def summary(request: pytest.FixtureRequest) -> Any:
    """Print topics/s (wall and CPU) and the ratios once the module's benchmarks ran."""
    yield
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is None or capture is None or not _results:
        return
    lines = [
        "",
        f"topic trie summary ({N_TOPICS:,} distinct topics per round, best round; M topics/s and ratios as wall | CPU):",
    ]
    for size in SIZES:
        for temperature in ("cold", "warm"):
            group = f"trie-{size // 1000}k-{temperature}" if size >= 1000 else f"trie-{size}-{temperature}"
            row = {impl: _results[(group, impl)] for impl in IMPLS if (group, impl) in _results}
            if not row:
                continue
            cells = [f"{impl} {N_TOPICS / w / 1e6:6.2f} | {N_TOPICS / c / 1e6:6.2f}" for impl, (w, c) in row.items()]
            line = f"  {group:15s}" + "   ".join(cells)
            if "compiled" in row:
                for other in ("paho", "pure"):
                    if other in row:
                        wall_ratio = row[other][0] / row["compiled"][0]
                        cpu_ratio = row[other][1] / row["compiled"][1]
                        line += f"   compiled/{other} {wall_ratio:5.1f}x | {cpu_ratio:5.1f}x"
            lines.append(line)
    with capture.global_and_fixture_disabled():
        for line in lines:
            reporter.write_line(line)


def _run(benchmark: Any, impl: str, filters: list[str], topics: list[str], temperature: str) -> None:
    size = len(filters)
    group = f"trie-{size // 1000}k-{temperature}" if size >= 1000 else f"trie-{size}-{temperature}"
    benchmark.group = group
    match, invalidate = make_matcher(impl, filters)
    cpu = {"best": float("inf")}
    if temperature == "warm":
        warm = topics
        expected = _loop(match, warm)  # fills the cache; also the expected count

        def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (match, warm), {}

    else:
        expected = _loop(match, topics)

        def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
            invalidate()
            return (match, fresh_copies(topics)), {}

    def timed(match_: Callable[[str], Any], topics_: list[str]) -> int:
        start = time.process_time()
        matched = _loop(match_, topics_)
        cpu["best"] = min(cpu["best"], time.process_time() - start)
        return matched

    result = benchmark.pedantic(timed, setup=setup, rounds=ROUNDS[impl], iterations=1, warmup_rounds=0)
    assert result == expected
    wall = benchmark.stats.stats.min
    _results[(group, impl)] = (wall, cpu["best"])
    benchmark.extra_info["topics_per_s"] = round(N_TOPICS / wall)
    benchmark.extra_info["topics_per_cpu_s"] = round(N_TOPICS / cpu["best"])
    benchmark.extra_info["matched"] = expected


@pytest.mark.parametrize("impl", IMPLS)
def test_match_cold(benchmark: Any, impl: str, filters: list[str], topics: list[str]) -> None:
    """Every topic new to the trie's cache (and never hashed): a full walk plus the cache insert."""
    _run(benchmark, impl, filters, topics, "cold")


@pytest.mark.parametrize("impl", IMPLS)
def test_match_warm(benchmark: Any, impl: str, filters: list[str], topics: list[str]) -> None:
    """Every topic seen before: one cache lookup and a copy of the cached list."""
    _run(benchmark, impl, filters, topics, "warm")
