"""Exceptions shared by the compiled core and its pure-Python twins.

Both twins import from here so they raise the very same classes (the aiohttp
pattern: one exceptions module, two implementations).
"""

from __future__ import annotations


class ProtocolError(ValueError):
    """Bytes from the network broke the MQTT 3.1.1 rules.

    Raised by the decoders; the connector answers it by closing the
    connection, counting it, and reconnecting.
    """


class ConnectRefusedError(ConnectionError):
    """The broker answered CONNECT with a non-zero CONNACK return code."""

    #: MQTT 3.1.1 §3.2.2.3, Table 3.1.
    REASONS = {
        1: "unacceptable protocol version",
        2: "identifier rejected",
        3: "server unavailable",
        4: "bad user name or password",
        5: "not authorized",
    }

    def __init__(self, return_code: int) -> None:
        self.return_code = return_code
        reason = self.REASONS.get(return_code, "unknown reason")
        super().__init__(f"broker refused the connection: {reason} (CONNACK return code {return_code})")


class SubscribeRefusedError(Exception):
    """The broker answered SUBSCRIBE with 0x80 (failure) for a filter (MQTT 3.1.1 §3.9.3)."""

    def __init__(self, topic_filter: str) -> None:
        self.topic_filter = topic_filter
        super().__init__(f"broker refused the subscription to {topic_filter!r} (SUBACK 0x80)")
