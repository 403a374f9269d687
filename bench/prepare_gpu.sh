#!/usr/bin/env bash
# Here (with network): packs the wheels the GPU machine lacks for the benchmark run into .whl/.
# The GPU machine has torch, numba, numba-cuda, numpy, timm and torchvision; pytest and pytest-benchmark
# travel as pure-Python wheels. (DALI, for the loader benchmark, travels separately: ../shared/device/prepare-dali.sh.)
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
for pkg in pytest pluggy iniconfig pygments packaging pytest-benchmark py-cpuinfo; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform any -d .whl "$pkg"
done
ls -la .whl
