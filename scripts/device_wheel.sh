#!/usr/bin/env bash
# Builds the extension here, off the device (nvcc and a CPython 3.12 are enough: the build needs
# no torch and no GPU), as a cp312 sm_90a wheel for the device machine (Python 3.12), so that a
# device call installs it in seconds instead of spending 4-6 minutes of device time building.
#
#   bash scripts/device_wheel.sh              # the working tree       -> _wheels/work/*.whl
#   bash scripts/device_wheel.sh REV NAME     # a revision (worktree)  -> _wheels/NAME/*.whl
#
# Then, on the device, with run(..., carry=["_wheels"]) (_wheels/ is ignored by git; the carried
# paths and the tree travel up to 64 MiB together, and a wheel is ~29 MB, so two fit):
#   WHEEL=_wheels/work bash scripts/gpu_check.sh    # installs the wheel instead of building
#   python3 -m pip install --no-deps --force-reinstall _wheels/NAME/*.whl   # A/B by hand
# Environment: PY312 (a Python 3.12; default: python3.12 on PATH or pyenv's), ARCHS (default
# 90a-real). Measured here (2 cores, 2026-11-26): ~300 s per wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ -z "${PY312:-}" ]; then  # the first candidate that runs (a pyenv shim may not)
  for c in $(command -v python3.12) /root/.pyenv/versions/3.12*/bin/python3.12; do
    if "$c" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null; then
      PY312=$c; break
    fi
  done
fi
[ -x "${PY312:-}" ] || { echo "device_wheel.sh: no Python 3.12 (set PY312)"; exit 2; }
"$PY312" -c "import scikit_build_core, pybind11" 2>/dev/null \
  || "$PY312" -m pip install -q scikit-build-core pybind11 ninja cmake
src=$ROOT name=work
if [ $# -ge 1 ]; then
  name=${2:-$(echo "$1" | tr '/:~^' '____')}
  src=$(mktemp -d)/tree
  git worktree add -q --detach "$src" "$1"
  trap 'git -C "$ROOT" worktree remove --force "$src"' EXIT
fi
rm -rf "_wheels/$name" && mkdir -p "_wheels/$name"
t0=$SECONDS
(cd "$src" && PATH="$(dirname "$PY312"):$PATH" TITANS_REQUIRE_CUDA=1 \
   TITANS_CUDA_ARCHS=${ARCHS:-90a-real} "$PY312" -m pip wheel --no-build-isolation --no-deps \
   -w "$ROOT/_wheels/$name" . >"$ROOT/_wheels/$name/build.log" 2>&1) \
  || { echo "build FAILED (_wheels/$name/build.log)"; tail -20 "_wheels/$name/build.log"; exit 1; }
echo "_wheels/$name: $(ls "_wheels/$name"/*.whl) ($((SECONDS - t0)) s, $(git -C "$src" rev-parse --short HEAD))"
