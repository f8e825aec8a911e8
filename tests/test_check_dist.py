"""tools/check_dist.py catches a wheel that ships sources or lacks compiled modules, and an incomplete sdist.

The install test trusts this checker to stop a bad artifact before pip ever
sees it, so it is checked on small synthetic wheels and sdists: one good
pair, then one defect at a time.
"""

from __future__ import annotations

import importlib.util
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

CHECKER = Path(__file__).resolve().parent.parent / "tools" / "check_dist.py"
if not CHECKER.is_file():  # pragma: no cover - tests shipped without tools/
    pytest.skip("tools/check_dist.py is not beside the tests", allow_module_level=True)

MODULES = ("_codec", "_protocol", "_topics")
SO = ".cpython-311-x86_64-linux-gnu.so"
GOOD_TAG = "cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64"

SDIST_FILES = [
    "PKG-INFO",
    "pyproject.toml",
    "CMakeLists.txt",
    "README.md",
    "cascade_fast/__init__.py",
    "cascade_fast/topics.py",
    "src/cascade/__init__.py",
    "src/cascade/connectors/__init__.py",
    "src/cascade/connectors/mqtt/__init__.py",
    *[f"cascade_fast/{m}.pyx" for m in MODULES],
    *[f"cascade_fast/{m}.pxd" for m in MODULES],
]
WHEEL_FILES = [
    "cascade/__init__.py",
    "cascade/connectors/__init__.py",
    "cascade/connectors/mqtt/__init__.py",
    "cascade_fast/__init__.py",
    "cascade_fast/topics.py",
    *[f"cascade_fast/{m}{SO}" for m in MODULES],
]


@pytest.fixture(scope="module")
def check_dist():
    """tools/check_dist.py imported as a module, with the git comparison switched off."""
    spec = importlib.util.spec_from_file_location("check_dist_under_test", CHECKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # The synthetic sdists are not this checkout: do not expect its tracked files.
    module._git_tracked = lambda git_ref: []
    return module


def make_sdist(directory: Path, files: list[str]) -> Path:
    """A .tar.gz with `files` under cascade_fast-0.1.0/."""
    path = directory / "cascade_fast-0.1.0.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name in files:
            info = tarfile.TarInfo(f"cascade_fast-0.1.0/{name}")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"#"))
    return path


def make_wheel(directory: Path, files: list[str], tag: str = GOOD_TAG, purelib: bool = False) -> Path:
    """A .whl named with `tag` holding `files` and a WHEEL metadata file."""
    path = directory / f"cascade_fast-0.1.0-{tag}.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name in files:
            zf.writestr(name, b"#")
        zf.writestr("cascade_fast-0.1.0.dist-info/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: {str(purelib).lower()}\n")
    return path


def run(check_dist, sdist: Path, wheel: Path, *flags: str) -> list[str]:
    """Problems reported for the pair (empty when it passes)."""
    problems, pyx = check_dist.check_sdist(sdist)
    problems += check_dist.check_wheel(wheel, pyx, sdist)
    problems += check_dist.check_tags(wheel, "--require-manylinux" in flags, "--installable" in flags)
    return problems


def test_a_good_pair_passes(check_dist, tmp_path):
    """A complete sdist and a wheel with all compiled modules and no sources pass."""
    assert run(check_dist, make_sdist(tmp_path, SDIST_FILES), make_wheel(tmp_path, WHEEL_FILES), "--require-manylinux") == []


@pytest.mark.parametrize("source", ["cascade_fast/_topics.pyx", "cascade_fast/_codec.pxd", "cascade_fast/_codec.c"])
def test_wheel_with_sources_fails(check_dist, tmp_path, source):
    """A .pyx, .pxd or generated .c in the wheel is reported."""
    problems = run(check_dist, make_sdist(tmp_path, SDIST_FILES), make_wheel(tmp_path, [*WHEEL_FILES, source]))
    assert problems == [f"wheel: carries source {source} (the wheel ships compiled modules only)"]


def test_wheel_missing_a_compiled_module_fails(check_dist, tmp_path):
    """A .pyx of the sdist without its .so in the wheel is reported."""
    files = [f for f in WHEEL_FILES if not f.startswith("cascade_fast/_protocol.")]
    problems = run(check_dist, make_sdist(tmp_path, SDIST_FILES), make_wheel(tmp_path, files))
    assert problems == ["wheel: compiled module cascade_fast/_protocol (.so/.pyd) is missing"]


def test_wheel_missing_a_python_module_fails(check_dist, tmp_path):
    """A .py of either package in the sdist but not in the wheel is reported."""
    files = [f for f in WHEEL_FILES if f != "cascade_fast/topics.py"]
    problems = run(check_dist, make_sdist(tmp_path, SDIST_FILES), make_wheel(tmp_path, files))
    assert problems == ["wheel: missing Python module cascade_fast/topics.py (from cascade_fast/topics.py)"]


def test_pure_wheel_fails(check_dist, tmp_path):
    """A wheel marked Root-Is-Purelib: true is reported."""
    problems = run(check_dist, make_sdist(tmp_path, SDIST_FILES), make_wheel(tmp_path, WHEEL_FILES, purelib=True))
    assert len(problems) == 1 and "Root-Is-Purelib" in problems[0]


def test_unrepaired_wheel_fails_the_manylinux_check(check_dist, tmp_path):
    """A linux_x86_64 wheel (auditwheel not run) fails --require-manylinux."""
    wheel = make_wheel(tmp_path, WHEEL_FILES, tag="cp311-cp311-linux_x86_64")
    problems = run(check_dist, make_sdist(tmp_path, SDIST_FILES), wheel, "--require-manylinux")
    assert problems == ["wheel: platform tags ['linux_x86_64'] are not manylinux/musllinux (was auditwheel repair run?)"]


def test_macos_wheel_passes_the_manylinux_check(check_dist, tmp_path):
    """--require-manylinux only concerns Linux wheels: a macOS wheel from the release matrix passes."""
    wheel = make_wheel(tmp_path, WHEEL_FILES, tag="cp312-cp312-macosx_11_0_arm64")
    assert run(check_dist, make_sdist(tmp_path, SDIST_FILES), wheel, "--require-manylinux") == []


def test_wheel_for_another_platform_fails_the_installable_check(check_dist, tmp_path):
    """A wheel whose tags this interpreter does not accept fails --installable."""
    wheel = make_wheel(tmp_path, WHEEL_FILES, tag="cp27-cp27mu-manylinux1_i686")
    problems = run(check_dist, make_sdist(tmp_path, SDIST_FILES), wheel, "--installable")
    assert len(problems) == 1 and "is accepted by pip on this interpreter" in problems[0]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda f: [*f, f"cascade_fast/_topics{SO}"], f"sdist: carries a compiled module cascade_fast/_topics{SO}"),
        (lambda f: [*f, "cascade_fast/_topics.c"], "sdist: carries Cython output cascade_fast/_topics.c (it is regenerated at build time)"),
        (lambda f: [n for n in f if n != "CMakeLists.txt"], "sdist: missing CMakeLists.txt"),
    ],
    ids=["compiled-module", "cython-output", "no-cmakelists"],
)
def test_bad_sdist_fails(check_dist, tmp_path, change, expected):
    """An sdist with binaries or generated C, or without its build files, is reported."""
    problems, _ = check_dist.check_sdist(make_sdist(tmp_path, change(list(SDIST_FILES))))
    assert problems == [expected]


def test_cli_exit_status(check_dist, tmp_path, capsys):
    """main() returns 0 for a good pair and 1, with one line per problem, for a bad one."""
    sdist = make_sdist(tmp_path, SDIST_FILES)
    good = make_wheel(tmp_path, WHEEL_FILES)
    assert check_dist.main(["--sdist", str(sdist), "--wheel", str(good), "--require-manylinux"]) == 0
    bad = make_wheel(tmp_path, [*WHEEL_FILES, "cascade_fast/_topics.pyx"], tag="cp311-cp311-linux_x86_64")
    assert check_dist.main(["--sdist", str(sdist), "--wheel", str(bad), "--require-manylinux"]) == 1
    err = capsys.readouterr().err
    assert "carries source cascade_fast/_topics.pyx" in err and "FAILED (2 problems)" in err
