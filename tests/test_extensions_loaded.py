"""The compiled core really loaded in the normal build, in process and in a clean interpreter.

A build that silently fell back to the pure-Python twins would pass every
behaviour test and lose all the speed; these tests make that loud (pattern:
aiohttp's ``test_c_parser_loaded``, multidict's ``test_circular_imports``).
They are skipped only on the pure leg (CASCADE_FAST_NO_EXTENSIONS set), where
tests/test_fallback.py covers the other side.
"""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys

import pytest

import cascade_fast
from cascade_fast import _extensions, codec, topics

pytestmark = pytest.mark.skipif(
    _extensions.NO_EXTENSIONS, reason="CASCADE_FAST_NO_EXTENSIONS is set (pure leg); see test_fallback.py"
)

COMPILED_MODULES = ("cascade_fast._topics", "cascade_fast._codec", "cascade_fast._protocol")


def _child_env() -> dict[str, str]:
    """This test run's environment for a child interpreter, minus anything that would change what loads."""
    env = dict(os.environ, PYTHONSAFEPATH="1")
    env.pop("CASCADE_FAST_NO_EXTENSIONS", None)
    env.pop("CASCADE_CONNECTOR", None)
    # The children run in a temporary cwd: a relative PYTHONPATH (`src:.`) must still name the tree under test.
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    return env


def test_extensions_loaded_in_process():
    """EXTENSIONS_LOADED is True and each selector reports its compiled build."""
    assert cascade_fast.EXTENSIONS_LOADED is True
    assert topics.COMPILED is True
    assert codec.COMPILED is True
    cascade_fast.require_extensions()  # does not raise


def test_selectors_export_the_compiled_classes():
    """topics.TopicTrie and codec.Decoder are the Cython classes, not the twins."""
    assert topics.TopicTrie is sys.modules["cascade_fast._topics"].TopicTrie
    assert codec.Decoder is sys.modules["cascade_fast._codec"].Decoder
    assert topics.TopicTrie is not cascade_fast._topics_py.TopicTrie
    assert codec.Decoder is not cascade_fast._codec_py.Decoder


@pytest.mark.parametrize("name", COMPILED_MODULES)
def test_compiled_modules_are_extension_modules(name):
    """Each compiled module was loaded from a shared library by the extension loader."""
    module = sys.modules[name]
    assert isinstance(module.__loader__, importlib.machinery.ExtensionFileLoader), module.__loader__
    assert module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), module.__file__


@pytest.mark.parametrize("first", ["cascade_fast", *COMPILED_MODULES, "cascade.connectors.mqtt"])
def test_clean_interpreter_loads_extensions(first, tmp_path):
    """A fresh interpreter importing `first` before anything else gets the same compiled build."""
    code = (
        f"import {first}\n"
        "import cascade_fast, sys\n"
        "print(cascade_fast.EXTENSIONS_LOADED)\n"
        "print(cascade_fast.__file__)\n"
        f"print(sorted(m for m in sys.modules if m in {COMPILED_MODULES!r}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=_child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    loaded, location, modules = result.stdout.splitlines()
    assert loaded == "True"
    assert location == cascade_fast.__file__
    assert modules == repr(sorted(COMPILED_MODULES))
