"""A TCP proxy in the test's event loop that can cut every connection through it.

The idea of asyncpg's ``_testbase/fuzzer.py``: put the proxy between the
connector and the broker, and a network failure becomes one deterministic
call (`cut`) while the broker itself, and its retained state, stay up.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["TcpProxy"]


class TcpProxy:
    """``async with TcpProxy(broker) as proxy:``; connect to ``proxy.host:proxy.port``."""

    host = "127.0.0.1"

    def __init__(self, target) -> None:
        self._target = (target.host, target.port)
        self._server: asyncio.AbstractServer | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        #: Connections accepted so far.
        self.accepted = 0

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await self._server.wait_closed()
        if self._pipes:
            await asyncio.wait(self._pipes)

    def cut(self) -> None:
        """Abort every proxied connection, both sides at once (like a dead network path)."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            broker_reader, broker_writer = await asyncio.open_connection(*self._target)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers.update((client_writer, broker_writer))
        loop = asyncio.get_running_loop()
        for reader, writer in ((client_reader, broker_writer), (broker_reader, client_writer)):
            task = loop.create_task(self._pipe(reader, writer), name="test proxy pipe")
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        # One side ended: end the other, as a TCP relay does.
        self._writers.discard(writer)
        writer.transport.abort()
