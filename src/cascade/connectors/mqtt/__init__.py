"""Cascade's MQTT connector, and the switch between its two implementations.

`MqttConnector` is chosen once, at import, by the ``CASCADE_CONNECTOR``
environment variable:

- unset, empty or ``python``: `PyMqttConnector`, the pure-Python reference
  connector on aiomqtt;
- ``fast``: `cascade_fast.FastMqttConnector`, the compiled one. If its
  extension cannot load, the import fails with an `ImportError` that says
  what is missing and how to install a wheel: asking for ``fast`` never
  silently gives you the slow one.

Any other value is a `ValueError` listing the valid values.
`cascade_fast.create_connector()` applies the same rule at call time.
"""

from __future__ import annotations

import os

from ._common import Connector, SubscriptionHandle, logger
from .reference import PyMqttConnector

CONNECTOR_ENV = "CASCADE_CONNECTOR"
VALID_CONNECTORS = ("python", "fast")


def connector_class_from_env(value: str | None = None) -> type:
    """The connector class `value` (default: ``$CASCADE_CONNECTOR``) names."""
    raw = os.environ.get(CONNECTOR_ENV, "") if value is None else value
    choice = raw.strip().lower() or "python"
    if choice == "python":
        return PyMqttConnector
    if choice == "fast":
        try:
            import cascade_fast
        except ImportError as exc:  # pragma: no cover - same distribution
            raise ImportError(
                f"{CONNECTOR_ENV}=fast needs the cascade_fast package, which failed to import ({exc}). "
                "Install it with `pip install cascade-fast`."
            ) from exc
        cascade_fast.require_extensions()
        from cascade_fast.connector import FastMqttConnector

        return FastMqttConnector
    raise ValueError(
        f"{CONNECTOR_ENV}={raw!r} is not a valid connector; valid values are "
        + ", ".join(repr(v) for v in VALID_CONNECTORS)
        + " (unset means 'python')"
    )


MqttConnector = connector_class_from_env()

__all__ = [
    "CONNECTOR_ENV",
    "Connector",
    "MqttConnector",
    "PyMqttConnector",
    "SubscriptionHandle",
    "VALID_CONNECTORS",
    "connector_class_from_env",
    "logger",
]
