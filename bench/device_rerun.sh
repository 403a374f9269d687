#!/usr/bin/env bash
# Name the commit measured: FASTGENLABEL_COMMIT=<git rev-parse --short HEAD, run here> in the device command
# (the tree that travels may carry an older .git).
# Second GPU call of a session (after bench/device_all.sh found something to fix): host overhead
# per call, the kernel tests, the kernel benchmarks and, with DALI carried (.devdeps/c), the
# loader benchmark and the DALI GPU tests. Logs in $OUT (5 files; device_all.sh adds 2: at most 8 come back).
set -uo pipefail
OUT=${OUT:-out/device}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
S="$OUT/summary.log"
step() { echo "== $(date +%T) $*" | tee -a "$S"; }
if [ -f .devdeps/c/install.sh ]; then
  (bash .devdeps/c/install.sh > /tmp/fgl-dali.log 2>&1; echo "dali install rc=$?" >> /tmp/fgl-dali.log) &
  dali_pid=$!
fi
python3 bench/make_jpegs.py /tmp/fgl-jpegs --count 1024 --size 500x375 --workers 4 >> "$S" 2>&1 &
jpeg_pid=$!

step "host overhead per call"
(cd bench && timeout 90 python3 gpu_overhead.py) > "$OUT/overhead.log" 2>&1
grep "us/call\| us$" "$OUT/overhead.log" | tee -a "$S"

step "kernel tests on the GPU"
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
FASTGENLABEL_GPU_TESTS=1 timeout 200 python3 -m pytest -q -p no:cacheprovider $xdist -p no:randomly tests/cudasim \
  tests/test_pixel.py tests/test_relabel.py tests/test_relabel_gemm.py tests/test_kde.py tests/test_pairs.py > "$OUT/gpu-tests.log" 2>&1
echo "kernel tests rc=$?" | tee -a "$S"; grep -v "^\.\.*\s*\[" "$OUT/gpu-tests.log" | grep -i "passed\|failed\|error" | tail -8 | tee -a "$S"

step "kernel benchmarks (GPU cases)"
timeout 120 python3 -m pytest -q -p no:cacheprovider bench/test_bench_pixel.py bench/test_bench_relabel.py -k cuda \
  --benchmark-json "$OUT/bench.json" --benchmark-max-time 0.5 > /tmp/fgl-bench.log 2>&1
echo "bench rc=$?" | tee -a "$S"; grep -E "FAILED|Error" /tmp/fgl-bench.log | head -5 | tee -a "$S"
python3 bench/render.py "$OUT/bench.json" --out "$OUT/bench.md" > /dev/null 2>> "$S"
grep -A40 "^| goal" "$OUT/bench.md" | tee -a "$S"

if [ -n "${dali_pid:-}" ]; then
  wait "$dali_pid"; tail -1 /tmp/fgl-dali.log | tee -a "$S"; . /tmp/fgl-env.sh; wait "$jpeg_pid"
  step "loader benchmark (GPU, 1,024 JPEGs 500x375, batch 256, crop 224)"
  timeout 110 python3 -m fastgenlabel bench loader --data /tmp/fgl-jpegs --device cuda --batch-size 256 \
    --image-size 224 --threads 12 --batches 8 --warmup 3 --repeats 5 2>&1 | grep -v "nvtiff\|nvjpeg2k\|nvTIFF" \
    | tail -8 | tee -a "$S"
  step "DALI GPU tests"
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_dali_gpu.py 2>&1 | tail -2 | tee -a "$S"
fi
wait "$jpeg_pid"
step "done"
