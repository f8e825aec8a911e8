"""MQTT topic matching: the compiled trie when it loaded, else the pure twin.

See `cascade_fast._topics_py` for the semantics (MQTT 3.1.1 §4.7, shared
subscriptions per MQTT 5 §4.8.2).
"""

from __future__ import annotations

from . import _topics_py
from ._extensions import load_compiled

_compiled = load_compiled("_topics")

COMPILED: bool = _compiled is not None

if _compiled is not None:
    TopicTrie = _compiled.TopicTrie
else:
    TopicTrie = _topics_py.TopicTrie  # type: ignore[misc]

validate_topic = _topics_py.validate_topic
validate_filter = _topics_py.validate_filter
filter_matches = _topics_py.filter_matches

__all__ = ["COMPILED", "TopicTrie", "validate_topic", "validate_filter", "filter_matches"]
