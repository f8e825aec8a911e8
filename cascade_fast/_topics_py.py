"""MQTT topic matching in pure Python: the reference twin of `cascade_fast._topics`.

Semantics (MQTT 3.1.1 §4.7, shared subscriptions from MQTT 5 §4.8.2):

* A topic is split into levels at ``/``; ``a//b`` has an empty middle level and
  ``""`` is one empty level. Levels compare exactly (case-sensitive, no
  normalisation).
* ``+`` matches exactly one level, an empty one included (§4.7.1.3).
* ``#`` is only valid as the whole last level and matches any number of
  levels, zero included, so ``sport/#`` matches ``sport`` (§4.7.1.2).
* A filter whose first level is a wildcard does not match a topic that starts
  with ``$`` (§4.7.2): ``#`` does not see ``$SYS/...``; ``$SYS/#`` does.
* ``$share/{group}/{filter}`` is stored and matched as ``{filter}``: the
  broker already picked this client for the message, so locally it is an
  ordinary subscription. A ``$share`` filter with an empty or missing group,
  a group containing ``+`` or ``#``, or no filter after the group is invalid.
  Only the outermost ``$share/{group}/`` is stripped.

`TopicTrie.match` returns the values of every matching filter in the order
the ``(filter, value)`` pairs were added; a value added under two matching
filters is returned twice. Results are cached per topic (bounded, cleared
when full and on every add/remove/clear), so a topic seen before costs one
dict lookup. `match` does not validate its argument (it is the hot path): a
topic containing ``+``/``#`` treats them as ordinary characters, which match
only wildcards, and a topic containing lone surrogates (not encodable as
UTF-8, so never received from a broker) matches only through wildcards
rather than raising. The compiled twin behaves identically.
"""

from __future__ import annotations

import operator

import functools
from typing import Any

__all__ = [
    "DEFAULT_CACHE_SIZE",
    "MAX_REMAINING_LENGTH",
    "TopicTrie",
    "filter_matches",
    "validate_filter",
    "validate_payload_size",
    "validate_qos",
    "validate_topic",
]

#: Topics whose results `TopicTrie` remembers before it starts over. Each
#: entry holds the topic string and its result list (roughly 200 bytes for a
#: Cascade telemetry topic), so the default caps the cache near 16 MiB.
DEFAULT_CACHE_SIZE = 65536

# The compiled twin numbers cache entries in 32 bits; both twins share the bound.
_MAX_CACHE_SIZE = 1 << 30

# MQTT 3.1.1 §1.5.3: a UTF-8 encoded string is prefixed by a 16-bit length.
_MAX_BYTES = 65535
_SHARE = "$share"


def _shown(value: str) -> str:
    """repr() of `value`, shortened so a 64 KiB filter does not fill a log line."""
    if len(value) > 80:
        return repr(value[:60]) + f"... ({len(value)} characters)"
    return repr(value)


def _check_string(value: object, what: str) -> str:
    """The checks common to topic names and filters (MQTT 3.1.1 §1.5.3, §4.7.3)."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} {value!r} is empty (MQTT 3.1.1 §4.7.3: at least one character)")
    if "\x00" in value:
        raise ValueError(f"{what} {_shown(value)} contains U+0000 (MQTT 3.1.1 §4.7.3)")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(
            f"{what} {_shown(value)} contains a lone surrogate, which is not encodable as UTF-8 (MQTT 3.1.1 §1.5.3)"
        ) from None
    if size > _MAX_BYTES:
        raise ValueError(
            f"{what} {_shown(value)} is longer than 65535 bytes of UTF-8 ({size} bytes; MQTT 3.1.1 §1.5.3)"
        )
    return value


def validate_topic(topic: str) -> None:
    """Raise `ValueError` unless `topic` is a valid MQTT topic name (one that can be published to).

    Checks: non-empty, no U+0000, encodable as UTF-8 in at most 65535 bytes,
    and no ``+`` or ``#`` (MQTT 3.1.1 §4.7.1.1, §3.3.2.1). The message names
    the value and the problem. A non-str is a `TypeError`.
    """
    _check_string(topic, "topic name")
    if "+" in topic or "#" in topic:
        raise ValueError(
            f"topic name {_shown(topic)} contains a wildcard ('+' or '#'); wildcards are only valid in topic filters "
            "(MQTT 3.1.1 §4.7.1)"
        )


def validate_qos(qos: object) -> int:
    """Return `qos` as an int, or raise at the call: only 0, 1 and 2 are QoS levels (MQTT 3.1.1 §4.3).

    An integer type (``int``, ``numpy.int64``: anything with ``__index__``)
    is accepted; ``bool``, ``float``, ``Fraction`` and ``Decimal`` are a
    `TypeError` even when they equal 1, so ``qos=1.0`` can never be sent as
    QoS 1 by one connector and refused by the other.
    """
    if isinstance(qos, bool):
        raise TypeError("qos must be an int (0, 1 or 2), not bool")
    try:
        level = operator.index(qos)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"qos must be an int (0, 1 or 2), not {type(qos).__name__} {qos!r}") from None
    if level not in (0, 1, 2):
        raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
    return level


#: The largest remaining length of an MQTT packet (MQTT 3.1.1 §2.2.3).
MAX_REMAINING_LENGTH = 268_435_455


def validate_payload_size(topic: str, size: int, qos: int) -> None:
    """Raise `ValueError` at the call when a PUBLISH of `size` payload bytes cannot be one MQTT packet.

    The remaining length (topic length prefix, topic, packet id at QoS > 0,
    payload) is at most 268,435,455 bytes (MQTT 3.1.1 §2.2.3); past it no
    broker can receive the message, so it is refused before anything is
    queued or written.
    """
    header = 2 + len(topic.encode("utf-8")) + (2 if qos else 0)
    if header + size > MAX_REMAINING_LENGTH:
        raise ValueError(
            f"payload of {size} bytes for topic {_shown(topic)} is too large for one MQTT packet "
            f"(at most {MAX_REMAINING_LENGTH - header} bytes with this topic and QoS; MQTT 3.1.1 §2.2.3)"
        )


def _check_levels(topic_filter: str, original: str) -> None:
    """Wildcards must be whole levels and ``#`` the last one (MQTT 3.1.1 §4.7.1.2, §4.7.1.3)."""
    if "+" not in topic_filter and "#" not in topic_filter:
        return
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if level == "+":
            continue
        if level == "#":
            if index != last:
                raise ValueError(
                    f"topic filter {_shown(original)}: '#' is not the last level (level {index} of {last + 1}; "
                    "MQTT 3.1.1 §4.7.1.2)"
                )
            continue
        for wildcard in "+#":
            if wildcard in level:
                raise ValueError(
                    f"topic filter {_shown(original)}: wildcard {wildcard!r} is not a whole level "
                    f"(level {index} is {_shown(level)}; MQTT 3.1.1 §4.7.1)"
                )


def _matching_filter(topic_filter: str) -> str:
    """Validate `topic_filter` and return the filter matching uses (``$share/{group}/`` stripped)."""
    if not isinstance(topic_filter, str):  # before the cache, which would need it hashable
        raise TypeError(f"topic filter must be str, not {type(topic_filter).__name__}")
    return _matching_filter_cached(topic_filter)


@functools.lru_cache(maxsize=4096)
def _matching_filter_cached(topic_filter: str) -> str:
    # Cached because `filter_matches` may be called per message with the same
    # few filters; exceptions are not cached, so an invalid filter raises each time.
    _check_string(topic_filter, "topic filter")
    matched = topic_filter
    if topic_filter == _SHARE or topic_filter.startswith(_SHARE + "/"):
        # MQTT 5 §4.8.2: "$share/" ShareName "/" TopicFilter, ShareName at
        # least one character and without "/", "+" or "#".
        parts = topic_filter.split("/", 2)
        if len(parts) < 2 or not parts[1]:
            raise ValueError(
                f"topic filter {_shown(topic_filter)}: shared subscription has no share name "
                "(expected '$share/{group}/{filter}'; MQTT 5 §4.8.2)"
            )
        group = parts[1]
        if "+" in group or "#" in group:
            raise ValueError(
                f"topic filter {_shown(topic_filter)}: share name {_shown(group)} contains a wildcard ('+' or '#'; "
                "MQTT 5 §4.8.2)"
            )
        if len(parts) < 3 or not parts[2]:
            raise ValueError(
                f"topic filter {_shown(topic_filter)}: shared subscription has no topic filter after the share name "
                "(expected '$share/{group}/{filter}'; MQTT 5 §4.8.2)"
            )
        matched = parts[2]
    _check_levels(matched, topic_filter)
    return matched


def validate_filter(topic_filter: str) -> None:
    """Raise `ValueError` unless `topic_filter` is a valid MQTT topic filter.

    Checks: non-empty, no U+0000, encodable as UTF-8 in at most 65535 bytes,
    ``+`` and ``#`` only as whole levels, ``#`` only last (MQTT 3.1.1 §4.7),
    and a well-formed ``$share/{group}/{filter}`` (MQTT 5 §4.8.2). The
    message names the value and the problem. A non-str is a `TypeError`.
    """
    _matching_filter(topic_filter)


def filter_matches(topic_filter: str, topic: str) -> bool:
    """Whether the one filter `topic_filter` matches `topic`, by the rules in this module's docstring.

    The filter is validated (`ValueError` if invalid); the topic is not, as
    in `TopicTrie.match`. This is the plain reading of the spec, for code
    that holds a single filter; many filters belong in a `TopicTrie`.
    """
    pattern = _matching_filter(topic_filter)
    if topic.startswith("$") and pattern[0] in "+#":
        # MQTT 3.1.1 §4.7.2: wildcards at the first level skip "$" topics.
        return False
    filter_levels = pattern.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True  # also the parent: "sport/#" matches "sport"
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)


class _Node:
    """One filter level. Wildcard children live apart from the literal ones,
    so a topic level spelled ``+`` or ``#`` can never reach a wildcard node by
    lookup (it only matches wildcards, like any other text)."""

    __slots__ = ("children", "hash", "parent", "plus", "key", "seqs", "values")

    def __init__(self, parent: _Node | None, key: str) -> None:
        self.parent = parent
        self.key = key  # the level under which `parent` holds this node
        self.children: dict[str, _Node] = {}
        self.plus: _Node | None = None
        self.hash: _Node | None = None
        # Values of the filters ending here, and the add() sequence number of
        # each, so results from several nodes merge back into add() order.
        # `values` is replaced, never changed in place, so a match hitting
        # only this node can cache the list itself (as the compiled twin does).
        self.values: list[Any] = []
        self.seqs: list[int] = []

    def is_empty(self) -> bool:
        return not self.values and not self.children and self.plus is None and self.hash is None


class TopicTrie:
    """Maps MQTT topic filters to values; `match(topic)` returns every value whose filter matches.

    Pure-Python twin of the compiled `cascade_fast._topics.TopicTrie`, with
    identical behaviour (see the module docstring for the semantics). Results
    are cached per topic, up to `cache_size` topics (0 disables the cache);
    when full the cache is cleared and refills, which keeps memory bounded at
    the price of one cold pass. Any add/remove/clear clears it too.
    """

    __slots__ = ("_cache", "_cache_size", "_count", "_empty", "_generation", "_root", "_seq")

    def __init__(self, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        if not isinstance(cache_size, int) or not 0 <= cache_size <= _MAX_CACHE_SIZE:
            raise ValueError(f"cache_size must be an int from 0 to 2**30, not {cache_size!r}")
        self._cache_size = cache_size
        self._cache: dict[str, list[Any]] = {}
        self._root = _Node(None, "")
        self._count = 0
        self._seq = 0
        # Bumped by every add/remove/clear: remove() notices a change made
        # by a value's __eq__ while it searched.
        self._generation = 0
        # One shared result for every topic that matches nothing; it is never
        # mutated, and `match` copies it like any other cached result.
        self._empty: list[Any] = []

    def __len__(self) -> int:
        """The number of ``(filter, value)`` pairs."""
        return self._count

    def __repr__(self) -> str:
        return f"<{type(self).__module__}.{type(self).__name__} pairs={self._count} cached={len(self._cache)}>"

    def add(self, topic_filter: str, value: Any) -> None:
        """Add the pair ``(topic_filter, value)``; adding the same pair twice stores it twice.

        Raises `ValueError` for an invalid filter (see `validate_filter`). A
        ``$share/{group}/{filter}`` pair is stored under ``{filter}``.
        """
        pattern = _matching_filter(topic_filter)
        node = self._root
        for level in pattern.split("/"):
            if level == "+":
                if node.plus is None:
                    node.plus = _Node(node, level)
                node = node.plus
            elif level == "#":
                if node.hash is None:
                    node.hash = _Node(node, level)
                node = node.hash
            else:
                child = node.children.get(level)
                if child is None:
                    child = node.children[level] = _Node(node, level)
                node = child
        self._seq += 1
        node.seqs.append(self._seq)
        node.values = [*node.values, value]
        self._count += 1
        self._generation += 1
        self._cache.clear()

    def _find(self, pattern: str) -> _Node | None:
        node: _Node | None = self._root
        for level in pattern.split("/"):
            assert node is not None
            if level == "+":
                node = node.plus
            elif level == "#":
                node = node.hash
            else:
                node = node.children.get(level)
            if node is None:
                return None
        return node

    def remove(self, topic_filter: str, value: Any) -> bool:
        """Remove one ``(topic_filter, value)`` pair, the earliest added; return whether one was there.

        Values compare with ``==`` (identity first). The filter is validated
        as in `add`, and ``$share/{group}/{filter}`` names the pairs stored
        under ``{filter}``.
        """
        pattern = _matching_filter(topic_filter)
        node = self._find(pattern)
        if node is None:
            return False
        values = node.values
        generation = self._generation
        for index, candidate in enumerate(values):
            if candidate is value or candidate == value:
                break
        else:
            return False
        # `==` ran user code; if it changed the trie, `index` may be stale.
        if self._generation != generation:
            raise RuntimeError("TopicTrie changed during remove() (by a value's __eq__)")
        del node.seqs[index]
        node.values = values[:index] + values[index + 1 :]
        self._count -= 1
        self._generation += 1
        while node.parent is not None and node.is_empty():
            parent = node.parent
            if node is parent.plus:
                parent.plus = None
            elif node is parent.hash:
                parent.hash = None
            else:
                del parent.children[node.key]
            node = parent
        self._cache.clear()
        return True

    def clear(self) -> None:
        """Remove every pair (and the cache)."""
        self._root = _Node(None, "")
        self._count = 0
        self._generation += 1
        self._cache.clear()

    @property
    def cache_size(self) -> int:
        """The most topics whose results are cached (0: no cache)."""
        return self._cache_size

    @property
    def cached_topics(self) -> int:
        """How many topics have a cached result right now (for tests and stats).

        The compiled twin does not cache topics with lone surrogates (never
        received from a broker), so only there may the twins' counts differ.
        """
        return len(self._cache)

    def __reduce__(self) -> Any:
        # The compiled twin cannot be pickled; neither can this one, so code
        # that works on one works on the other.
        raise TypeError(f"cannot pickle {type(self).__name__!r} object")

    def match(self, topic: str, /) -> list[Any]:
        """The values of every filter matching `topic`, in the order their pairs were added.

        A new list on each call: the caller may keep or change it. The topic
        is not validated (see the module docstring).
        """
        if type(topic) is not str:
            if not isinstance(topic, str):
                raise TypeError(f"topic must be str, not {type(topic).__name__}")
            # A str subclass may override __eq__/__hash__ or run code when
            # the cache drops it; match its exact-str copy (as the compiled twin).
            topic = str.__str__(topic)
        cached = self._cache.get(topic)
        if cached is None:
            cached = self._match_uncached(topic)
        return cached.copy()

    def _match_uncached(self, topic: str) -> list[Any]:
        while True:
            # Any allocation below may run the cyclic GC, whose finalizers may
            # change the trie: then the result may mix old and new values (or
            # name removed ones), and must not be returned or cached. Walk again.
            generation = self._generation
            found = self._walk(topic)
            if not found:
                result = self._empty
            elif len(found) == 1:
                result = found[0].values  # never changed in place: safe to share
            else:
                pairs = [pair for node in found for pair in zip(node.seqs, node.values)]
                pairs.sort(key=_first)
                result = [value for _, value in pairs]
            if self._generation == generation:
                break
        if self._cache_size:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[topic] = result
        return result

    def _walk(self, topic: str) -> list[_Node]:
        """The nodes holding values whose filters match `topic`, in no particular order.

        Iterative (an explicit stack), so a filter with thousands of levels
        cannot exhaust the interpreter's recursion limit.
        """
        root = self._root
        # MQTT 3.1.1 §4.7.2: root-level wildcards do not match "$" topics.
        dollar = topic.startswith("$")
        found: list[_Node] = []
        # (node, start of the next level in `topic`, or -1 when every level is consumed)
        stack: list[tuple[_Node, int]] = [(root, 0)]
        while stack:
            node, start = stack.pop()
            wild = not (dollar and node is root)
            if node.hash is not None and node.hash.values and wild:
                found.append(node.hash)  # "#" matches here: the rest, or nothing more
            if start < 0:
                if node.values:
                    found.append(node)
                continue
            end = topic.find("/", start)
            if end < 0:
                level = topic[start:]
                following = -1
            else:
                level = topic[start:end]
                following = end + 1
            if node.plus is not None and wild:
                stack.append((node.plus, following))
            child = node.children.get(level)
            if child is not None:
                stack.append((child, following))
        return found


def _first(pair: tuple[int, Any]) -> int:
    return pair[0]
