"""Loader throughput: the DALI loader with and without mixup + GenLabel, against a torch DataLoader + mixup.

Run: ``python -m pytest bench/test_bench_loader.py --benchmark-columns=median,iqr,min,rounds``
(or the CLI, which prints images/s and the ratio: ``fastgenlabel bench loader --data DIR --batch-size N``).

Method: the JPEG folder is written once per pytest run (scikit-learn's digits, real images: 32 x 32,
and the same digits upscaled to 256 x 192 with a little noise, so decoding costs what a small
photo costs); every contestant reads the same folder at the same batch size and crop. One round
fetches one batch (the prefetch queue keeps the pipeline busy between rounds); warm-up rounds
compile the Numba stages and fill the queues. ``extra_info["images_per_s"]`` is B / median.
The baseline is torchvision + timm when importable, else the same steps in PIL + torch ops
(``fastgenlabel.loader.bench.baseline_loader``; its name says which).
"""
import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")
pytest.importorskip("sklearn")

from fastgenlabel.demo import digits_rgb, write_image_folder  # noqa: E402
from fastgenlabel.loader import bench  # noqa: E402

CASES = [("digits32", 32, 64), ("digits256x192", 128, 64)]
THREADS = 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from PIL import Image

    images, labels = digits_rgb(32)
    root = tmp_path_factory.mktemp("bench_loader")
    write_image_folder(images, labels, root / "digits32")
    rng = np.random.default_rng(0)
    big = []
    for img in images[:512]:
        up = np.asarray(Image.fromarray(img).resize((256, 192), Image.BICUBIC)).astype(np.int16)
        big.append(np.clip(up + rng.integers(-12, 13, up.shape), 0, 255).astype(np.uint8))
    write_image_folder(np.stack(big), labels[:512], root / "digits256x192", quality=90)
    return root


def _contestant(name, folder, size, batch):
    if name == "dali":
        return bench._cycle(bench.dali_loader(folder, genlabel=False, batch_size=batch, image_size=size,
                                              threads=THREADS, device="cpu"))
    if name == "dali+mixup+genlabel":
        parts = bench.genlabel_parts(folder, image_size=size, threads=THREADS, device="cpu", batch_size=batch)
        return bench._cycle(bench.dali_loader(folder, genlabel=True, batch_size=batch, image_size=size,
                                              threads=THREADS, device="cpu", parts=parts))
    label, make = bench.baseline_loader(folder, batch_size=batch, image_size=size, threads=THREADS, device="cpu")
    return make()


@pytest.mark.parametrize("case,size,batch", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("impl", ["dali", "dali+mixup+genlabel", "torch-baseline"])
def test_loader_throughput(benchmark, folders, case, size, batch, impl):
    it = _contestant(impl, str(folders / case), size, batch)
    benchmark.group = f"loader {case} crop {size} B={batch} cpu"
    benchmark.extra_info["impl"] = impl
    benchmark.pedantic(lambda: next(it), rounds=25, warmup_rounds=4, iterations=1)
    benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median
    benchmark.extra_info["torch_threads"] = torch.get_num_threads()
