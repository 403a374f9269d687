#!/usr/bin/env bash
# On the lent GPU machine (device tool), from the repo root, carrying .whl (bench/prepare_gpu.sh):
#     bash bench/gpu.sh
# 1. runs the CUDA kernel tests on the real GPU (the suite the simulator runs in CI),
# 2. runs every benchmark (GPU and CPU halves) in one process, so ratios come from one run,
# 3. renders the markdown table with the goals. Everything lands in $OUT. Budget: ~5 minutes.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
if ! python3 -c "import pytest, pytest_benchmark" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fgl-bench .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/fgl-bench${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
FASTGENLABEL_GPU_TESTS=1 timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/cudasim tests/test_pixel.py tests/test_relabel.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -15
timeout 300 python3 -m pytest -q -p no:cacheprovider bench --benchmark-json "$OUT/bench.json" \
  --benchmark-min-rounds 20 --benchmark-warmup on 2>&1 | tee "$OUT/bench.log" | tail -5
python3 bench/render.py "$OUT/bench.json" --out "$OUT/bench.md"
