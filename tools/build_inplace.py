"""Developer build: compile cascade_fast/*.pyx in place, next to the sources.

    python tools/build_inplace.py            # every module
    python tools/build_inplace.py _topics    # just one (others untouched)

Then run against the source tree with ``PYTHONPATH=src:.``. This is only a
fast edit-compile loop; the real build (wheels, `pip install .`, CI) is
CMake via scikit-build-core. Set CASCADE_FAST_DEBUG=1 for invariant checks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent.parent


def main(names: list[str]) -> None:
    os.chdir(ROOT)
    names = names or sorted(p.stem for p in (ROOT / "cascade_fast").glob("*.pyx"))
    macros = [("CASCADE_FAST_DEBUG", "1")] if os.environ.get("CASCADE_FAST_DEBUG") else []
    exts = [Extension(f"cascade_fast.{n}", [f"cascade_fast/{n}.pyx"], define_macros=macros) for n in names]
    modules = cythonize(exts, language_level=3, include_path=[str(ROOT)], annotate=bool(os.environ.get("ANNOTATE")))
    dist = Distribution({"ext_modules": modules})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_temp = str(ROOT / "build" / "inplace")
    cmd.build_lib = str(ROOT / "build" / "inplace-lib")
    cmd.ensure_finalized()
    cmd.run()
    # os.replace, never an overwrite in place: a process that has the old .so
    # mapped keeps its copy instead of crashing.
    for built in cmd.get_outputs():
        target = ROOT / Path(built).relative_to(cmd.build_lib)
        os.replace(built, target)
        print(f"installed {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:])
