"""Check cascade-fast's sdist and wheel contents before anyone installs them.

    python tools/check_dist.py --sdist dist/cascade_fast-0.1.0.tar.gz \
        --wheel wheelhouse/cascade_fast-0.1.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl \
        [--require-manylinux] [--installable]

What a user's server gets from the wheel must be complete and must not carry
build inputs; what a platform without a wheel gets from the sdist must be
enough to build. So, failing with one line per problem:

wheel
  - every ``cascade_fast/<mod>.pyx`` of the sdist has a compiled module
    ``cascade_fast/<mod>.<abi>.so`` (``.pyd`` on Windows) in the wheel;
  - every ``.py`` of the two packages (``cascade_fast/``, ``src/cascade/``)
    is in the wheel at its import path;
  - no Cython or C sources (``.pyx``, ``.pxd``, ``.pxi``, ``.c``, ``.cpp``,
    ``.h``), no annotation ``.html``, no tests/tools/benches;
  - ``Root-Is-Purelib: false`` (it is a platform wheel);
  - with --require-manylinux, a Linux wheel has a manylinux (or musllinux)
    platform tag, not a bare ``linux_<arch>`` one (other platforms pass);
  - with --installable, a tag this interpreter's pip accepts.

sdist
  - pyproject.toml, CMakeLists.txt, README.md, PKG-INFO, the .pyx/.pxd;
  - inside a git checkout: every tracked file under cascade_fast/, src/,
    tests/ plus the top-level build files;
  - no compiled modules, no Cython-generated ``cascade_fast/*.c``, no build/.

Only the standard library is needed (``packaging`` is used when present,
else pip's vendored copy, for the tag check).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent

SOURCE_SUFFIXES = (".pyx", ".pxd", ".pxi", ".c", ".cpp", ".h", ".html")
COMPILED_SUFFIXES = (".so", ".pyd")
# Paths a sdist must carry for `pip install <sdist>` to build (scikit-build-core + CMake).
SDIST_REQUIRED = ("pyproject.toml", "CMakeLists.txt", "README.md", "PKG-INFO")
# Tracked paths that must all be in the sdist (tests are part of it, as a plus for packagers).
SDIST_TRACKED = ("cascade_fast", "src", "tests", "pyproject.toml", "CMakeLists.txt", "README.md")


def _sdist_names(path: Path) -> list[str]:
    """Member paths of the sdist, relative to its top directory (`name-version/`)."""
    with tarfile.open(path) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) != 1:
        raise SystemExit(f"{path}: expected one top-level directory, found {sorted(tops)}")
    return [n.split("/", 1)[1] for n in names if "/" in n]


def check_sdist(path: Path, git_ref: str | None = None) -> tuple[list[str], list[str]]:
    """Problems found in the sdist, and its cascade_fast/*.pyx module names."""
    problems: list[str] = []
    names = _sdist_names(path)
    present = set(names)
    for required in SDIST_REQUIRED:
        if required not in present:
            problems.append(f"sdist: missing {required}")
    pyx = sorted(PurePosixPath(n).stem for n in names if re.fullmatch(r"cascade_fast/[^/]+\.pyx", n))
    if not pyx:
        problems.append("sdist: no cascade_fast/*.pyx (the compiled core cannot be built from it)")
    for name in names:
        if name.endswith(COMPILED_SUFFIXES):
            problems.append(f"sdist: carries a compiled module {name}")
        elif re.fullmatch(r"cascade_fast/[^/]+\.c", name):
            problems.append(f"sdist: carries Cython output {name} (it is regenerated at build time)")
        elif name.startswith(("build/", "dist/", "wheelhouse/")) or "/__pycache__/" in f"/{name}":
            problems.append(f"sdist: carries build output {name}")
    tracked = _git_tracked(git_ref)
    for name in tracked:
        if name not in present:
            problems.append(f"sdist: missing tracked file {name}")
    return problems, pyx


def _git_tracked(git_ref: str | None) -> list[str]:
    """Tracked files the sdist must hold (in `git_ref`, else the work tree), or [] outside git."""
    if not (ROOT / ".git").exists():
        return []
    if git_ref is None:
        command = ["ls-files", "-z", "--", *SDIST_TRACKED]
    else:
        command = ["ls-tree", "-r", "-z", "--name-only", git_ref, "--", *SDIST_TRACKED]
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), *command],
            check=True,
            capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    names = [n for n in out.decode().split("\0") if n]
    if git_ref is None:
        # A tracked file deleted in the work tree (not yet committed) is not expected.
        names = [n for n in names if (ROOT / n).is_file()]
    return names


def check_wheel(path: Path, pyx: list[str], sdist: Path | None) -> list[str]:
    """Problems found in the wheel, given the compiled modules the sdist defines."""
    problems: list[str] = []
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        wheel_meta = next((n for n in names if n.endswith(".dist-info/WHEEL")), None)
        meta_text = zf.read(wheel_meta).decode() if wheel_meta else ""
    present = set(names)
    for name in names:
        if name.endswith(SOURCE_SUFFIXES):
            problems.append(f"wheel: carries source {name} (the wheel ships compiled modules only)")
        top = name.split("/", 1)[0]
        if top in ("tests", "tools", "benches", "src", "build"):
            problems.append(f"wheel: carries {name} (not part of the installed packages)")
    for mod in pyx:
        pattern = re.compile(rf"cascade_fast/{re.escape(mod)}(\.[^/]+)?\.(so|pyd)")
        if not any(pattern.fullmatch(n) for n in names):
            problems.append(f"wheel: compiled module cascade_fast/{mod} (.so/.pyd) is missing")
    if sdist is not None:
        for name in _sdist_names(sdist):
            if not name.endswith(".py"):
                continue
            if name.startswith("cascade_fast/"):
                expected = name
            elif name.startswith("src/cascade/"):
                expected = name[len("src/") :]
            else:
                continue
            if expected not in present:
                problems.append(f"wheel: missing Python module {expected} (from {name})")
    for required in ("cascade/__init__.py", "cascade/connectors/__init__.py", "cascade/connectors/mqtt/__init__.py", "cascade_fast/__init__.py"):
        if required not in present:
            problems.append(f"wheel: missing {required}")
    if not wheel_meta:
        problems.append("wheel: no .dist-info/WHEEL")
    elif "Root-Is-Purelib: false" not in meta_text:
        problems.append("wheel: WHEEL says Root-Is-Purelib is not false (a pure wheel would install without the core)")
    return problems


def _tags_module():
    try:
        from packaging import tags, utils
    except ImportError:  # a bare venv: pip's vendored copy is the same library
        from pip._vendor.packaging import tags, utils  # type: ignore[no-redef]
    return tags, utils


def check_tags(path: Path, require_manylinux: bool, installable: bool) -> list[str]:
    """Problems with the wheel's platform tags."""
    tags, utils = _tags_module()
    problems: list[str] = []
    _, _, _, wheel_tags = utils.parse_wheel_filename(path.name)
    platforms = sorted({t.platform for t in wheel_tags})
    # A Linux wheel must carry a portable tag (a bare linux_<arch> one is refused
    # by PyPI and means auditwheel did not run); macOS/Windows tags are left alone.
    linux = [p for p in platforms if "linux" in p]
    if require_manylinux and linux and not any(p.startswith(("manylinux", "musllinux")) for p in linux):
        problems.append(f"wheel: platform tags {platforms} are not manylinux/musllinux (was auditwheel repair run?)")
    if installable:
        supported = set(tags.sys_tags())
        if not supported & set(wheel_tags):
            problems.append(
                f"wheel: none of its tags {sorted(map(str, wheel_tags))} is accepted by pip on this interpreter "
                f"({sys.version.split()[0]}); see `pip debug --verbose`"
            )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sdist", type=Path, help="the .tar.gz to check")
    parser.add_argument("--wheel", type=Path, help="the .whl to check")
    parser.add_argument("--require-manylinux", action="store_true", help="fail if a Linux wheel has no manylinux/musllinux tag")
    parser.add_argument("--git-ref", help="the sdist was built from this commit: expect its tracked files")
    parser.add_argument("--installable", action="store_true", help="fail unless pip on this interpreter accepts the wheel")
    args = parser.parse_args(argv)
    if args.sdist is None and args.wheel is None:
        parser.error("give --sdist, --wheel or both")

    problems: list[str] = []
    pyx: list[str] = []
    if args.sdist is not None:
        sdist_problems, pyx = check_sdist(args.sdist, args.git_ref)
        problems += sdist_problems
    else:
        pyx = sorted(p.stem for p in (ROOT / "cascade_fast").glob("*.pyx"))
    if args.wheel is not None:
        problems += check_wheel(args.wheel, pyx, args.sdist)
        problems += check_tags(args.wheel, args.require_manylinux, args.installable)

    for problem in problems:
        print(f"check_dist: {problem}", file=sys.stderr)
    if problems:
        print(f"check_dist: FAILED ({len(problems)} problems)", file=sys.stderr)
        return 1
    checked = " and ".join(p.name for p in (args.sdist, args.wheel) if p is not None)
    print(f"check_dist: OK: {checked} (compiled modules: {', '.join(pyx)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
