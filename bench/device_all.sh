#!/usr/bin/env bash
# Name the commit measured: FASTGENLABEL_COMMIT=<git rev-parse --short HEAD, run here> in the device command
# (the tree that travels may carry an older .git).
# The whole GPU half of the project in one call on a GPU machine, from the repo root (DALI
# installed, or carried as wheels in .devdeps/c: docs/BENCHMARKS.md "Running the benchmarks"):
#     OUT=$OUT bash bench/device_all.sh        (~8 minutes; device_rerun.sh alone ~6)
# bench/device_rerun.sh (host overhead, kernel tests on the GPU, kernel benchmarks with the goal
# verdicts, loader benchmark, DALI GPU tests), then examples/train.py over NCCL, the CUDA
# start-up times and the scaling table. Each step has its own time limit; logs land in $OUT.
set -uo pipefail
OUT=${OUT:-out/device}
export OUT
t0=$(date +%s)
bash bench/device_rerun.sh
S="$OUT/summary.log"
step() { echo "== $(date +%T) $*" | tee -a "$S"; }
[ -f /tmp/fgl-env.sh ] && . /tmp/fgl-env.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

step "examples/train.py over NCCL (world size 1), default and --deep"
for variant in "--epochs 1" "--epochs 2 --deep --warmup 1"; do
  timeout 90 torchrun --standalone --nproc_per_node 1 examples/train.py --device cuda --data /tmp/fgl-jpegs \
    --batch-size 64 --image-size 64 --threads 4 $variant > /tmp/fgl-train.log 2>&1
  echo "train.py $variant rc=$?" | tee -a "$S"; grep "checksum\|images/s\|Error" /tmp/fgl-train.log | tail -4 | tee -a "$S"
done

step "CUDA start-up"; (cd bench && timeout 90 python3 cuda_startup.py) 2>&1 | tail -2 | tee -a "$S"

step "scaling (GPU)"; elapsed=$(( $(date +%s) - t0 )); budget=$(( 580 - elapsed ))
if [ "$budget" -gt 40 ]; then
  timeout "$budget" python3 bench/scaling.py --device cuda --threads 8 --out "$OUT/scaling.md" > /dev/null 2>&1
  echo "scaling rc=$? (limit ${budget}s)" | tee -a "$S"
else echo "scaling skipped: ${elapsed}s used" | tee -a "$S"; fi
step "done in $(( $(date +%s) - t0 )) s"
