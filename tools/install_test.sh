#!/usr/bin/env bash
# Install test: what a user gets from the wheel (no compiler) and from the sdist.
#
#   bash tools/install_test.sh
#
# 1. Builds the sdist and the manylinux wheel (tools/build_dist.sh) and checks
#    their contents (tools/check_dist.py: the wheel has every compiled module
#    and Python package and no .pyx/.pxd/.c; the sdist has every source).
# 2. Wheel leg: a fresh venv (NOT --system-site-packages: the global env has
#    Cython and CMake), PATH = that venv's bin/ only, CC=false CXX=false, so
#    no compiler, Cython, CMake or ninja is reachable. It first proves that,
#    then `pip install --only-binary=:all: <wheel>`, checks no build tool came
#    along, and runs tools/roundtrip_check.py: import cascade_fast from the
#    venv, EXTENSIONS_LOADED is True, a publish/subscribe round trip with
#    CASCADE_CONNECTOR=fast against a Mosquitto it starts on a free loopback
#    port. Then the import tests (tests/test_extensions_loaded.py,
#    tests/test_fallback.py) run against the installed wheel.
# 3. Sdist leg (compiles in the background while 2 and 4 run): another
#    fresh venv, the compiler available, `pip install
#    <sdist>` builds from source (isolated build: scikit-build-core, Cython,
#    cython-cmake from the pip cache or PyPI), then the same round trip.
# 4. No wheel, no compiler: a third venv, no compiler reachable again,
#    `CASCADE_FAST_NO_EXTENSIONS=1 pip install <sdist>` installs the pure
#    Python packages; import works with EXTENSIONS_LOADED False, and
#    CASCADE_CONNECTOR=fast fails with the switch's install-hint ImportError.
#
# Environment:
#   PYTHON                   interpreter (default: python3)
#   INSTALL_TEST_CONNECTOR   connector for the round trips (default: fast)
#   INSTALL_TEST_FROM_GIT    build from this commit (git archive) instead of the work tree
#   SKIP_BUILD=1             reuse dist/ and wheelhouse/ from a previous build_dist.sh
#   KEEP_WORK=1              keep the temporary venvs (path printed at the end)
#   MOSQUITTO                the broker binary (default: found on PATH or /usr/sbin)
# Dependencies (aiomqtt, orjson, uvloop, ...) come from the pip cache / PyPI as
# binary wheels. Takes 2-2.5 minutes on a 2-core machine with a warm pip cache
# (most of it compiling the Cython core twice: for the wheel and from the sdist;
# the second compile overlaps the wheel and no-compiler legs).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
CONNECTOR=${INSTALL_TEST_CONNECTOR:-fast}
START=$SECONDS
declare -a TIMINGS=()

step() { printf '\n=== install_test: %s (%ds)\n' "$*" "$((SECONDS - START))"; }
timed() {  # timed LABEL CMD...: run, record its wall time, return its status
  local label=$1 t0=$SECONDS rc=0
  shift
  "$@" || rc=$?
  TIMINGS+=("$(printf '%-34s %4ds%s' "$label" "$((SECONDS - t0))" "$([ $rc = 0 ] || echo " (exit $rc)")")")
  return $rc
}
fail() { echo "install_test: FAILED: $*" >&2; exit 1; }
# Drop the per-package warnings some machines' file:// extra indexes cause.
quiet_pip() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/cascade-fast-install-test.XXXXXX")
SDIST_PID=
cleanup() {
  # Never leave the background sdist build running (nor delete its venv under it).
  if [ -n "$SDIST_PID" ]; then wait "$SDIST_PID" 2>/dev/null || true; fi
  if [ "${KEEP_WORK:-0}" = 1 ]; then echo "install_test: kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

MOSQ=${MOSQUITTO:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}
[ -x "$MOSQ" ] || fail "mosquitto not found (apt-get install mosquitto, or set MOSQUITTO)"

# ---------------------------------------------------------------- artifacts
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  step "build the sdist and the manylinux wheel"
  if [ -n "${INSTALL_TEST_FROM_GIT:-}" ]; then
    timed "build_dist.sh (sdist + wheel)" bash tools/build_dist.sh --from-git "$INSTALL_TEST_FROM_GIT" || fail "build"
  else
    timed "build_dist.sh (sdist + wheel)" bash tools/build_dist.sh || fail "build"
  fi
fi
shopt -s nullglob
wheels=(wheelhouse/cascade_fast-*manylinux*.whl)
sdists=(dist/cascade_fast-*.tar.gz)
[ ${#wheels[@]} = 1 ] || fail "expected one manylinux wheel in wheelhouse/, found ${#wheels[@]}"
[ ${#sdists[@]} = 1 ] || fail "expected one sdist in dist/, found ${#sdists[@]}"
WHEEL=$ROOT/${wheels[0]}
SDIST=$ROOT/${sdists[0]}

step "artifact contents"
echo "wheel: $(basename "$WHEEL")"
"$PY" -m zipfile -l "$WHEEL" | awk 'NR > 1 {print "  " $1}'
"$PY" tools/check_dist.py --sdist "$SDIST" --wheel "$WHEEL" --require-manylinux --installable \
  || fail "artifact contents (see check_dist above)"

# ---------------------------------------------------------------- sdist leg
# Compiling the sdist is the slow part (about a minute): it runs in the
# background while the wheel and no-compiler legs run, and its round trip
# comes last.
step "sdist leg: start building from source (fresh venv, compiler available) in the background"
VS=$WORK/venv-sdist
SRCENV=(env -u PYTHONPATH -u CASCADE_FAST_NO_EXTENSIONS PATH="$VS/bin:$PATH" PYTHONSAFEPATH=1
        PYTHONNOUSERSITE=1 MOSQUITTO="$MOSQ" CASCADE_CONNECTOR="$CONNECTOR")
sdist_build() {
  local t0=$SECONDS rc=0
  "$PY" -m venv "$VS" \
    && quiet_pip "${SRCENV[@]}" "$VS/bin/python" -m pip install -q --prefer-binary "$SDIST" \
    && "${SRCENV[@]}" "$VS/bin/python" -m pip check || rc=$?
  echo "$((SECONDS - t0))" >"$WORK/sdist-build.seconds"
  return $rc
}
sdist_build >"$WORK/sdist-build.log" 2>&1 &
SDIST_PID=$!

# ---------------------------------------------------------------- wheel leg
step "wheel leg: fresh venv, no compiler reachable"
VW=$WORK/venv-wheel
timed "venv (wheel leg)" "$PY" -m venv "$VW"
# Nothing but the venv on PATH: no gcc/cc/c++/clang, no cython/cmake/ninja
# (the pyenv shims and /usr/bin are gone), and CC/CXX point at `false`.
NOCC=(env -u PYTHONPATH -u CASCADE_FAST_NO_EXTENSIONS PATH="$VW/bin" CC=false CXX=false
      PYTHONSAFEPATH=1 PYTHONNOUSERSITE=1 MOSQUITTO="$MOSQ" CASCADE_CONNECTOR="$CONNECTOR")
"${NOCC[@]}" /bin/sh -c '
  for tool in gcc cc c++ g++ clang x86_64-linux-gnu-gcc cython cythonize cmake ninja make; do
    if command -v "$tool" >/dev/null 2>&1; then echo "reachable: $tool -> $(command -v "$tool")"; exit 1; fi
  done' || fail "a build tool is reachable in the no-compiler environment"
echo "no compiler, Cython, CMake, ninja or make on PATH=$VW/bin; CC=false CXX=false"

timed "pip install --only-binary wheel" quiet_pip "${NOCC[@]}" "$VW/bin/python" -m pip install -q --only-binary=:all: "$WHEEL" \
  || fail "pip install --only-binary=:all: of the wheel"
"${NOCC[@]}" "$VW/bin/python" -m pip check
"${NOCC[@]}" "$VW/bin/python" - <<'EOF' || fail "the wheel leg's environment is not what a compiler-less server has"
"""The wheel brought no build tooling, and installed compiled modules, not sources."""
import importlib.util, pathlib, sys
tools = [m for m in ("Cython", "scikit_build_core", "cmake", "ninja") if importlib.util.find_spec(m)]
assert not tools, f"build tools importable in the wheel venv: {tools}"
pkg = pathlib.Path(importlib.util.find_spec("cascade_fast").origin).parent
assert pathlib.Path(sys.prefix).resolve() in pkg.resolve().parents, pkg
names = sorted(p.name for p in pkg.iterdir())
assert not [n for n in names if n.endswith((".pyx", ".pxd", ".c"))], names
compiled = [n for n in names if n.endswith(".so")]
assert len(compiled) >= 3, f"compiled modules missing from {pkg}: {names}"
print("installed compiled modules:", ", ".join(compiled))
EOF

step "wheel leg: round trip with CASCADE_CONNECTOR=$CONNECTOR"
cd "$WORK"  # nothing of the source tree next to the interpreter
timed "round trip (wheel)" "${NOCC[@]}" "$VW/bin/python" "$ROOT/tools/roundtrip_check.py" \
  --require-extensions --installed || fail "round trip on the installed wheel"
cd "$ROOT"

step "wheel leg: import tests against the installed wheel"
timed "pip install pytest (binary)" quiet_pip "${NOCC[@]}" "$VW/bin/python" -m pip install -q --only-binary=:all: \
  "pytest>=8" "pytest-timeout>=2.2" "pytest-asyncio>=0.23" || fail "pip install pytest"
timed "pytest import/fallback tests" "${NOCC[@]}" "$VW/bin/python" -m pytest -p no:cacheprovider -q \
  --rootdir "$ROOT" -c "$ROOT/pyproject.toml" --noconftest \
  "$ROOT/tests/test_extensions_loaded.py" "$ROOT/tests/test_fallback.py" \
  || fail "import tests against the installed wheel"

# ------------------------------------------------- no wheel, no compiler leg
step "no wheel, no compiler: CASCADE_FAST_NO_EXTENSIONS=1 pip install <sdist>"
VP=$WORK/venv-pure
timed "venv (no-compiler sdist leg)" "$PY" -m venv "$VP"
PURE=(env -u PYTHONPATH PATH="$VP/bin" CC=false CXX=false PYTHONSAFEPATH=1 PYTHONNOUSERSITE=1)
# The isolated build env brings CMake and ninja from PyPI (none on this PATH);
# with the option set, CMake enables no language, so no compiler is looked for.
timed "pip install sdist (no extensions)" quiet_pip "${PURE[@]}" CASCADE_FAST_NO_EXTENSIONS=1 \
  "$VP/bin/python" -m pip install -q --prefer-binary "$SDIST" || fail "the no-extension build of the sdist without a compiler"
cd "$WORK"
"${PURE[@]}" "$VP/bin/python" - <<'PURECHECK' || fail "the pure-Python install"
"""Without compiled modules: import works on the twins, `fast` is refused with the install hint."""
import os, pathlib, subprocess, sys
import cascade_fast
pkg = pathlib.Path(cascade_fast.__file__).parent
assert pathlib.Path(sys.prefix).resolve() in pkg.resolve().parents, pkg
assert not [p.name for p in pkg.iterdir() if p.suffix in (".so", ".pyd")], sorted(os.listdir(pkg))
assert cascade_fast.EXTENSIONS_LOADED is False
child = subprocess.run([sys.executable, "-c", "import cascade.connectors.mqtt"], capture_output=True, text=True,
                       env=dict(os.environ, CASCADE_CONNECTOR="fast"), timeout=60)
last = child.stderr.strip().splitlines()[-1] if child.stderr.strip() else ""
assert child.returncode != 0 and last.startswith("ImportError: "), child.stderr
assert "pip install --only-binary=:all: cascade-fast" in last, last
print("pure install: EXTENSIONS_LOADED=False; CASCADE_CONNECTOR=fast ->", last[:110] + "...")
PURECHECK
cd "$ROOT"

# ---------------------------------------------------------------- sdist leg, end
step "sdist leg: wait for the build from source"
sdist_rc=0
wait "$SDIST_PID" || sdist_rc=$?
SDIST_PID=
cat "$WORK/sdist-build.log"
TIMINGS+=("$(printf '%-34s %4ds' "venv + pip install sdist (compiles)" "$(cat "$WORK/sdist-build.seconds" 2>/dev/null || echo 0)")")
[ "$sdist_rc" = 0 ] || fail "building the sdist from source (exit $sdist_rc)"

step "sdist leg: round trip with CASCADE_CONNECTOR=$CONNECTOR"
cd "$WORK"
timed "round trip (sdist)" "${SRCENV[@]}" "$VS/bin/python" "$ROOT/tools/roundtrip_check.py" \
  --require-extensions --installed || fail "round trip on the package built from the sdist"
cd "$ROOT"

step "summary"
echo "wheel: $(basename "$WHEEL")"
echo "sdist: $(basename "$SDIST")"
printf '  %s\n' "${TIMINGS[@]}"
echo "install_test: OK in $((SECONDS - START)) s"
