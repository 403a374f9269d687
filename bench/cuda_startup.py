"""First-call time of the CUDA kernels in a fresh process, with an empty and a warm Numba cache.

    python bench/cuda_startup.py        # prints one JSON line per cache state

The cold number is what a user's first batch pays (compilation to PTX and loading); the warm
one what every later process pays (the ``cache=True`` on-disk cache).
"""
import json
import sys
import tempfile

from startup import fresh_process_json

SCRIPT = """
import json, time
import numpy as np, torch
import fastgenlabel as fg
dev = torch.device("cuda")
torch.zeros(1, device=dev); torch.cuda.synchronize()
times = {}
x = torch.zeros((4, 8, 8, 3), dtype=torch.uint8, device=dev)
pairs = fg.sample_pairs(4, generator=0).to(dev)
for name in ("first", "second"):
    t = time.perf_counter(); fg.mix_images(x, pairs, 127.0, 64.0, dtype=torch.float16, backend="numba-cuda")
    torch.cuda.synchronize(); times["pixel_" + name + "_call_s"] = time.perf_counter() - t
rng = np.random.default_rng(0)
z = rng.standard_normal((60, 4)).astype(np.float32); y = np.arange(60) % 3
for kind in ("diag", "tied", "full", "kde"):
    m = fg.KDEClassModel() if kind == "kde" else fg.GaussianClassModel(kind)
    m.fit(z, y, 3)
    zt, yt = torch.from_numpy(z[:8]).to(dev), torch.from_numpy(y[:8]).to(dev)
    p = fg.sample_pairs(8, generator=0).to(dev)
    for name in ("first", "second"):
        t = time.perf_counter(); fg.relabel(m, zt, p, yt, 0.5, num_classes=3, backend="numba-cuda")
        torch.cuda.synchronize(); times[kind + "_" + name + "_call_s"] = time.perf_counter() - t
print(json.dumps(times))
"""


def main() -> int:
    with tempfile.TemporaryDirectory() as cache:
        for state in ("cold", "warm"):
            print(json.dumps({"cache": state, **fresh_process_json(SCRIPT, cache)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
