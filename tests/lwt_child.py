"""Child process for the Last Will test: connect a connector, say "ready", wait to be killed.

Usage: ``python lwt_child.py MODULE:CLASS HOST PORT SOURCE_ID``. The parent
kills it with SIGKILL, so the connector gets no chance to say goodbye and
the broker must publish its Last Will.
"""

from __future__ import annotations

import asyncio
import importlib
import sys


async def main(import_path: str, host: str, port: int, source_id: str) -> None:
    module_name, _, attr = import_path.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    connector = cls(host, port, source_id=source_id, reconnect_delay=0.05, max_reconnect_delay=0.5, connect_timeout=5.0)
    await connector.connect()
    await connector.flush(timeout=5.0)  # the birth message is at the broker
    print("ready", flush=True)
    # Bounded: if the parent dies without killing us, we do not linger.
    await asyncio.sleep(60)
    await connector.disconnect()


if __name__ == "__main__":
    path, host, port, source_id = sys.argv[1:5]
    asyncio.run(main(path, host, int(port), source_id))
