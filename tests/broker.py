"""A real Mosquitto for the tests: the project's one launcher, `cascade_fast.apps.mosquitto`.

Re-exported here so the tests write ``from broker import Mosquitto``; the
configuration (loopback only, no duplicate deliveries, no persistence unless
asked) and the binary search are documented there. `needs_mosquitto` skips
a test that starts a broker of its own where there is no binary.
"""

import pytest

from cascade_fast.apps.mosquitto import BrokerError, Mosquitto, MosquittoNotFound, find_mosquitto, free_port

__all__ = ["BrokerError", "Mosquitto", "MosquittoNotFound", "find_mosquitto", "free_port", "needs_mosquitto"]

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto binary not installed")
