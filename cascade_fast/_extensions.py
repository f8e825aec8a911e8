"""Picks the compiled build of a module when it loaded, else its pure twin.

`CASCADE_FAST_NO_EXTENSIONS=1` forces the pure-Python twins (as
MULTIDICT_NO_EXTENSIONS does), which is how the pure leg of the test suite
and the fallback tests run.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

NO_EXTENSIONS: bool = os.environ.get("CASCADE_FAST_NO_EXTENSIONS", "").lower() not in ("", "0", "false", "no", "off")


def load_compiled(name: str) -> ModuleType | None:
    """Import ``cascade_fast.<name>`` (a Cython module) or return None.

    Only a missing module falls back; any other import failure of a module
    that exists (a symbol error, say) is raised, so a broken build is loud.
    """
    if NO_EXTENSIONS:
        return None
    try:
        return importlib.import_module(f"cascade_fast.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"cascade_fast.{name}":
            raise
        return None
