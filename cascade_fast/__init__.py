"""cascade-fast: a compiled MQTT 3.1.1 connector for Cascade.

The hot path (bytes in -> callbacks called) is Cython: an incremental codec
(`cascade_fast.codec`), a cached topic trie (`cascade_fast.topics`) and an
asyncio protocol (`cascade_fast._protocol`) under `FastMqttConnector`.
Each compiled module has a pure-Python twin; `EXTENSIONS_LOADED` says
whether the compiled ones were imported. Without them `import cascade_fast`
still works (trie and codec run on the twins) but `FastMqttConnector` cannot
be used: it raises an `ImportError` that says how to get a wheel.
"""

from __future__ import annotations

from typing import Any

from . import codec, topics
from ._errors import ConnectRefusedError, ProtocolError, SubscribeRefusedError
from ._extensions import NO_EXTENSIONS, load_compiled

__version__ = "0.1.0"

_protocol = load_compiled("_protocol")

#: True when every compiled module imported (trie, codec, protocol).
EXTENSIONS_LOADED: bool = topics.COMPILED and codec.COMPILED and _protocol is not None

INSTALL_HINT = (
    "cascade-fast's compiled extension is not available"
    + (" (CASCADE_FAST_NO_EXTENSIONS is set)" if NO_EXTENSIONS else "")
    + ". Install a prebuilt wheel with `pip install --only-binary=:all: cascade-fast`, "
    "or build from source with a C compiler and Python headers: `pip install --no-binary=cascade-fast cascade-fast`. "
    "Or use the pure-Python connector: unset CASCADE_CONNECTOR or set CASCADE_CONNECTOR=python."
)


def require_extensions() -> None:
    """Raise the install-hint `ImportError` unless the compiled core loaded."""
    if not EXTENSIONS_LOADED:
        missing = [
            name
            for name, ok in (("_topics", topics.COMPILED), ("_codec", codec.COMPILED), ("_protocol", _protocol is not None))
            if not ok
        ]
        raise ImportError(f"{INSTALL_HINT} Missing compiled modules: {', '.join('cascade_fast.' + m for m in missing)}.")


def __getattr__(name: str) -> Any:
    # FastMqttConnector is imported lazily so `import cascade_fast` works on
    # the pure twins where the extension is missing.
    if name == "FastMqttConnector":
        require_extensions()
        from .connector import FastMqttConnector

        return FastMqttConnector
    raise AttributeError(f"module 'cascade_fast' has no attribute {name!r}")


def create_connector(**kwargs: Any) -> Any:
    """Build the connector `CASCADE_CONNECTOR` names, at call time.

    Same rule as `cascade.connectors.mqtt.MqttConnector`: unset or
    ``python`` -> `PyMqttConnector`; ``fast`` -> `FastMqttConnector`.
    """
    from cascade.connectors.mqtt import connector_class_from_env

    return connector_class_from_env()(**kwargs)


def run(coro: Any) -> Any:
    """Run `coro` to completion on a uvloop event loop (asyncio's where uvloop is absent).

    Uses a loop of its own rather than installing uvloop's policy, so
    importing or calling this changes no global state.
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        import asyncio

        return asyncio.run(coro)
    return uvloop.run(coro)


__all__ = [
    "EXTENSIONS_LOADED",
    "ConnectRefusedError",
    "FastMqttConnector",
    "ProtocolError",
    "SubscribeRefusedError",
    "__version__",
    "codec",
    "create_connector",
    "require_extensions",
    "run",
    "topics",
]
