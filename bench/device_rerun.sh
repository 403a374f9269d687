#!/usr/bin/env bash
# Name the commit measured: FASTGENLABEL_COMMIT=<git rev-parse --short HEAD, run here> in the device command
# (the tree that travels may carry an older .git).
# The GPU measurements (docs/BENCHMARKS.md "Running the benchmarks"): host overhead per call (on a
# quiet machine), the kernel tests (while DALI unpacks and the JPEGs are written in the
# background), the kernel benchmarks (quiet again), and, with DALI carried (.devdeps/c), the
# loader benchmark and the DALI GPU tests.
# Worst case ~9.9 minutes (the timeouts below: 60 + 150 + 40 + 180 + 120 + 45 s); typically ~6. Logs in $OUT (7 files; at most 8 come back).
set -uo pipefail
OUT=${OUT:-out/device}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
S="$OUT/summary.log"
step() { echo "== $(date +%T) $*" | tee -a "$S"; }

step "host overhead per call"
(cd bench && timeout 60 python3 gpu_overhead.py) > "$OUT/overhead.log" 2>&1
grep "us/call\| us$" "$OUT/overhead.log" | tee -a "$S"

if [ -f .devdeps/c/install.sh ]; then
  (bash .devdeps/c/install.sh > "$OUT/setup.log" 2>&1; echo "dali install rc=$?" >> "$OUT/setup.log") &
  dali_pid=$!
fi
python3 bench/make_jpegs.py /tmp/fgl-jpegs --count 1024 --size 500x375 --workers 4 >> "$S" 2>&1 &
jpeg_pid=$!

step "kernel tests on the GPU"
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
FASTGENLABEL_GPU_TESTS=1 timeout 150 python3 -m pytest -q -p no:cacheprovider $xdist -p no:randomly tests/cudasim \
  tests/test_pixel.py tests/test_relabel.py tests/test_relabel_gemm.py tests/test_kde.py tests/test_pairs.py > "$OUT/gpu-tests.log" 2>&1
echo "kernel tests rc=$?" | tee -a "$S"; grep -v "^\.\.*\s*\[" "$OUT/gpu-tests.log" | grep -i "passed\|failed\|error" | tail -8 | tee -a "$S"
# the products' error on this GPU against math.PRODUCT_GAMMA (full) and math.split_linear_error (diag,
# tied; docs/MATH.md section 5)
timeout 40 python3 -m pytest -q -s -p no:cacheprovider tests/test_relabel_gemm.py tests/test_relabel_linear.py \
  -k "bound_holds_on_the_gpu or bound_on_the_gpu" 2>&1 | grep -E "GPU product error|GPU linear|passed|failed" | tee -a "$S"
wait "$jpeg_pid"
[ -n "${dali_pid:-}" ] && wait "$dali_pid"

step "kernel benchmarks (GPU cases)"
# SIGINT, not SIGTERM: pytest-benchmark then still writes the JSON of the cases that finished
timeout -s INT -k 20 160 python3 -m pytest -q -p no:cacheprovider bench/test_bench_pixel.py bench/test_bench_relabel.py \
  -k cuda --benchmark-json "$OUT/bench.json" --benchmark-max-time 0.5 > "$OUT/bench.log" 2>&1
echo "bench rc=$?" | tee -a "$S"; grep -E "FAILED|Error" "$OUT/bench.log" | head -5 | tee -a "$S"
python3 bench/render.py "$OUT/bench.json" --out "$OUT/bench.md" > /dev/null 2>> "$S"
grep -A40 "^| goal" "$OUT/bench.md" | tee -a "$S"

if [ -n "${dali_pid:-}" ]; then
  tail -1 "$OUT/setup.log" | tee -a "$S"; . /tmp/fgl-env.sh
  step "loader benchmark (GPU, 1,024 JPEGs 500x375, batch 256, crop 224)"
  timeout 120 python3 -m fastgenlabel bench loader --data /tmp/fgl-jpegs --device cuda --batch-size 256 \
    --image-size 224 --threads 12 --batches 8 --warmup 3 --repeats 3 2>&1 | grep -v "nvtiff\|nvjpeg2k\|nvTIFF" \
    | tail -25 | tee -a "$S"
  step "DALI GPU tests"
  timeout 45 python3 -m pytest -q -p no:cacheprovider tests/test_dali_gpu.py 2>&1 | tail -2 | tee -a "$S"
fi
step "done"
