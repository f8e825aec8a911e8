"""Without the compiled core: cascade_fast still imports, on the pure twins, and `fast` fails clearly.

A platform with no wheel and no compiler ends up with cascade-fast's Python
files and no extension modules. There `import cascade_fast` must work with
`EXTENSIONS_LOADED` False (the trie and the codec run on their pure-Python
twins), and `CASCADE_CONNECTOR=fast` must fail at import with the switch's
`ImportError` saying how to install a wheel, never hand out the slow
connector in silence.

The compiled modules are hidden three ways, each in a clean interpreter:

- ``env``: CASCADE_FAST_NO_EXTENSIONS=1 over the build under test;
- ``copy``: the build under test copied to a temporary directory without its
  shared libraries (what a wheel-less, compiler-less install looks like);
- ``cmake``: a real build with ``-Ccmake.define.CASCADE_FAST_NO_EXTENSIONS=ON``
  installed into a temporary target (skipped where scikit-build-core, CMake or
  the source tree are not at hand, e.g. against an installed wheel).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cascade_fast
from cascade.connectors import mqtt

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = Path(cascade_fast.__file__).resolve().parent
# The `cascade` directory (namespace package) that holds this build's connectors.
CASCADE_DIR = Path(mqtt.__file__).resolve().parent.parent.parent
COMPILED_MODULES = ("cascade_fast._topics", "cascade_fast._codec", "cascade_fast._protocol")
# What a wheel-less install lacks; sources and caches are left out of the copy too.
HIDDEN = ("*.so", "*.pyd", "*.c", "*.pyx", "*.pxd", "*.html", "__pycache__")

INSPECT = r"""
import json, sys
import cascade_fast
from cascade_fast import _codec_py, _topics_py, codec, topics
report = {
    "file": cascade_fast.__file__,
    "extensions_loaded": cascade_fast.EXTENSIONS_LOADED,
    "topics_compiled": topics.COMPILED,
    "codec_compiled": codec.COMPILED,
    "trie_is_twin": topics.TopicTrie is _topics_py.TopicTrie,
    "decoder_is_twin": codec.Decoder is _codec_py.Decoder,
    "compiled_imported": sorted(m for m in sys.modules if m in %(compiled)r),
    # MQTT 3.1.1 §3.12: PINGREQ is 0xC0 0x00, whichever build encodes it.
    "pingreq": codec.encode_pingreq().hex(),
}
for name, probe in (("require_error", lambda: cascade_fast.require_extensions()),
                    ("attribute_error", lambda: cascade_fast.FastMqttConnector)):
    try:
        probe()
    except ImportError as exc:
        report[name] = str(exc)
from cascade.connectors import mqtt  # CASCADE_CONNECTOR unset: the reference connector
report["mqtt_file"] = mqtt.__file__
report["default_connector"] = mqtt.MqttConnector.__name__
print(json.dumps(report))
""" % {"compiled": COMPILED_MODULES}


def _base_env() -> dict[str, str]:
    """The test run's environment without the variables these tests set themselves."""
    env = dict(os.environ, PYTHONSAFEPATH="1")
    for name in ("CASCADE_FAST_NO_EXTENSIONS", "CASCADE_CONNECTOR"):
        env.pop(name, None)
    # The children run in a temporary cwd: a relative PYTHONPATH (`src:.`) must still name the tree under test.
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    return env


def _copy_without_binaries(target: Path) -> Path:
    """Copy this build's two packages into `target` minus compiled modules; returns `target`."""
    ignore = shutil.ignore_patterns(*HIDDEN)
    shutil.copytree(PACKAGE_DIR, target / "cascade_fast", ignore=ignore)
    shutil.copytree(CASCADE_DIR, target / "cascade", ignore=ignore)
    return target


def _cmake_build_without_extensions(target: Path, **extra_env: str) -> Path:
    """Install the source tree with the CMake option that skips the extensions into `target`."""
    if not (ROOT / "CMakeLists.txt").is_file() or not (ROOT / "pyproject.toml").is_file():
        pytest.skip("no source tree beside the tests")
    if importlib.util.find_spec("scikit_build_core") is None:
        pytest.skip("scikit-build-core is not installed (needed for the --no-build-isolation build)")
    if shutil.which("cmake") is None and importlib.util.find_spec("cmake") is None:
        pytest.skip("CMake is not available")
    command = [
        sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
        "--target", str(target / "site"),
        "-Ccmake.define.CASCADE_FAST_NO_EXTENSIONS=ON",
        f"-Cbuild-dir={target / 'build'}",  # keep the source tree's build/ untouched
        str(ROOT),
    ]  # fmt: skip
    env = dict(_base_env(), PIP_DISABLE_PIP_VERSION_CHECK="1", **extra_env)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return target / "site"


@pytest.fixture(scope="module", params=["env", "copy", "cmake"])
def without_extensions(request, tmp_path_factory) -> tuple[dict[str, str], Path, Path]:
    """(environment, cascade_fast dir, cascade dir) of a build whose compiled modules are hidden."""
    env = _base_env()
    if request.param == "env":
        env["CASCADE_FAST_NO_EXTENSIONS"] = "1"
        return env, PACKAGE_DIR, CASCADE_DIR
    if request.param == "copy":
        site = _copy_without_binaries(tmp_path_factory.mktemp("no-binaries"))
    else:
        site = _cmake_build_without_extensions(tmp_path_factory.mktemp("cmake-no-extensions"))
    assert not [p for p in (site / "cascade_fast").iterdir() if p.suffix in (".so", ".pyd")]
    env["PYTHONPATH"] = str(site)
    return env, site / "cascade_fast", site / "cascade"


def _run(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` in a clean interpreter."""
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_import_works_on_the_pure_twins(without_extensions, tmp_path):
    """import cascade_fast works, EXTENSIONS_LOADED is False and the selectors give the twins."""
    env, package_dir, cascade_dir = without_extensions
    result = _run(INSPECT, env, tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert Path(report["file"]).resolve().parent == package_dir.resolve()
    assert report["extensions_loaded"] is False
    assert report["topics_compiled"] is False and report["codec_compiled"] is False
    assert report["trie_is_twin"] is True and report["decoder_is_twin"] is True
    assert report["compiled_imported"] == []
    assert report["pingreq"] == "c000"
    # The reference connector still works there; it is the default.
    assert report["default_connector"] == "PyMqttConnector"
    # cascade.connectors.mqtt comes from the same build as cascade_fast.
    assert Path(report["mqtt_file"]).resolve() == cascade_dir.resolve() / "connectors" / "mqtt" / "__init__.py"


def test_fast_is_refused_with_the_install_hint(without_extensions, tmp_path):
    """CASCADE_CONNECTOR=fast fails at import with the switch's ImportError, which says how to get a wheel."""
    env, _, _ = without_extensions
    result = _run("import cascade.connectors.mqtt", dict(env, CASCADE_CONNECTOR="fast"), tmp_path)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ImportError: "), result.stderr
    assert "pip install --only-binary=:all: cascade-fast" in last_line
    assert "CASCADE_CONNECTOR=python" in last_line
    for module in COMPILED_MODULES:
        assert module in last_line


def test_require_extensions_and_attribute_raise_the_same_hint(without_extensions, tmp_path):
    """require_extensions() and cascade_fast.FastMqttConnector raise the install-hint ImportError."""
    env, _, _ = without_extensions
    report = json.loads(_run(INSPECT, env, tmp_path).stdout)
    for key in ("require_error", "attribute_error"):
        assert "pip install --only-binary=:all: cascade-fast" in report[key]
        assert "Missing compiled modules: cascade_fast._topics" in report[key]


def test_create_connector_fast_is_refused(without_extensions, tmp_path):
    """create_connector() with CASCADE_CONNECTOR=fast raises the ImportError at call time."""
    env, _, _ = without_extensions
    code = (
        "import cascade_fast\n"
        "try:\n"
        "    cascade_fast.create_connector(hostname='127.0.0.1', port=1)\n"
        "except ImportError as exc:\n"
        "    print('refused:', exc)\n"
    )
    result = _run(code, dict(env, CASCADE_CONNECTOR="fast"), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("refused: ") and "--only-binary=:all:" in result.stdout


def test_no_extensions_build_needs_no_compiler(tmp_path):
    """CASCADE_FAST_NO_EXTENSIONS=ON builds and installs with no C compiler (CC=false), giving the twins."""
    site = _cmake_build_without_extensions(tmp_path, CC="false", CXX="false")
    result = _run(INSPECT, dict(_base_env(), PYTHONPATH=str(site)), tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["extensions_loaded"] is False and report["trie_is_twin"] is True


def test_a_broken_compiled_module_is_loud_not_a_fallback(tmp_path):
    """A compiled module that exists but cannot load raises at import instead of falling back."""
    site = _copy_without_binaries(tmp_path / "site")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (site / "cascade_fast" / f"_topics{suffix}").write_bytes(b"not a shared library")
    result = _run("import cascade_fast", dict(_base_env(), PYTHONPATH=str(site)), tmp_path)
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "ModuleNotFoundError" not in result.stderr
