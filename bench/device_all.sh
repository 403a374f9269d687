#!/usr/bin/env bash
# Name the commit measured: FASTGENLABEL_COMMIT=<git rev-parse --short HEAD, run here> in the device command
# (the tree that travels may carry an older .git).
# The whole GPU half of the project in one call on the lent GPU machine (device tool), from the
# repo root, after DALI was carried in with ../shared/device/prepare-dali.sh (.devdeps/c carried):
#     bash bench/device_all.sh
# Correctness first (kernel tests on the GPU, DALI GPU tests, examples/train.py over NCCL), then
# timings one at a time on a quiet GPU: kernel benchmarks -> bench.md with goal verdicts, CUDA
# start-up, the loader benchmark on 1,024 JPEGs of 500 x 375, the scaling table. Every step has
# its own time limit and the script goes on after a failure; logs land in $OUT (at most 8 files).
set -uo pipefail
OUT=${OUT:-out/device}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
S="$OUT/summary.log"
step() { echo "== $(date +%T) $*" | tee -a "$S"; }
t0=$(date +%s)

step "machine"; { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, numba, numpy; print('torch', torch.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__)"; } 2>&1 | tee -a "$S"
if [ -f .devdeps/c/install.sh ]; then
  (bash .devdeps/c/install.sh > "$OUT/dali.log" 2>&1; echo "dali install rc=$?" >> "$OUT/dali.log") &
  dali_pid=$!
fi
python3 bench/make_jpegs.py /tmp/fgl-jpegs --count 1024 --size 500x375 --workers 6 >> "$S" 2>&1 &
jpeg_pid=$!

step "kernel tests on the GPU (tests/cudasim, test_pixel, test_relabel, test_relabel_gemm)"
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 6")
FASTGENLABEL_GPU_TESTS=1 timeout 200 python3 -m pytest -q -p no:cacheprovider $xdist tests/cudasim tests/test_pixel.py \
  tests/test_relabel.py tests/test_relabel_gemm.py tests/test_kde.py > "$OUT/gpu-tests.log" 2>&1
echo "kernel tests rc=$?" | tee -a "$S"; tail -4 "$OUT/gpu-tests.log" | tee -a "$S"

if [ -n "${dali_pid:-}" ]; then wait "$dali_pid"; tail -2 "$OUT/dali.log" | tee -a "$S"; . /tmp/fgl-env.sh; fi
wait "$jpeg_pid"
step "DALI GPU tests + examples/train.py over NCCL (world size 1)"
{ timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_dali_gpu.py 2>&1 | tail -25
  echo "dali tests rc=${PIPESTATUS[0]}"
  for variant in "--epochs 1" "--epochs 2 --deep --warmup 1"; do
    timeout 90 torchrun --standalone --nproc_per_node 1 examples/train.py --device cuda --data /tmp/fgl-jpegs \
      --batch-size 64 --image-size 64 --threads 4 $variant 2>&1 | tail -6
    echo "train.py $variant rc=${PIPESTATUS[0]}"
  done; } > "$OUT/dali-train.log" 2>&1
grep "rc=\|passed\|failed\|checksum" "$OUT/dali-train.log" | tee -a "$S"

step "kernel benchmarks (GPU cases)"
timeout 220 python3 -m pytest -q -p no:cacheprovider bench/test_bench_pixel.py bench/test_bench_relabel.py -k cuda \
  --benchmark-json "$OUT/bench.json" --benchmark-max-time 0.5 > "$OUT/bench.log" 2>&1
echo "bench rc=$?" | tee -a "$S"; tail -3 "$OUT/bench.log" | tee -a "$S"
python3 bench/render.py "$OUT/bench.json" --out "$OUT/bench.md" > /dev/null 2>> "$S"
grep -A40 "^| goal" "$OUT/bench.md" | tee -a "$S"

step "CUDA start-up"; (cd bench && timeout 90 python3 cuda_startup.py) 2>&1 | tail -3 | tee -a "$S"

step "loader benchmark (GPU, 1,024 JPEGs 500x375, batch 256, crop 224)"
timeout 150 python3 -m fastgenlabel bench loader --data /tmp/fgl-jpegs --device cuda --batch-size 256 \
  --image-size 224 --threads 12 --batches 8 --warmup 3 --repeats 3 2>&1 | tail -12 | tee -a "$S"

step "scaling (GPU)"; elapsed=$(( $(date +%s) - t0 )); budget=$(( 540 - elapsed ))
if [ "$budget" -gt 40 ]; then
  timeout "$budget" python3 bench/scaling.py --device cuda --threads 8 --out "$OUT/scaling.md" > "$OUT/scaling.log" 2>&1
  echo "scaling rc=$? (limit ${budget}s)" | tee -a "$S"
else echo "scaling skipped: ${elapsed}s used" | tee -a "$S"; fi
step "done in $(( $(date +%s) - t0 )) s"
