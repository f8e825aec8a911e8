"""Optional dependencies: imported when a command needs them, with the fix when missing.

rich, matplotlib and psutil are the ``[bench]`` extra and amqtt the
``[embedded]`` one; `import cascade_fast` needs none of them.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require(module: str, extra: str = "bench", *, purpose: str = "") -> ModuleType:
    """Import `module`, or raise `MissingExtraError` naming ``pip install 'cascade-fast[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        if getattr(exc, "name", None) not in (None, module, top):
            raise  # the package is there but broken: show the real error
        what = f" {purpose}" if purpose else ""
        raise MissingExtraError(
            f"{top} is needed{what} but is not installed: pip install 'cascade-fast[{extra}]'"
        ) from exc
