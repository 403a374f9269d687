"""GPU paths of the DALI building blocks and the loader. They skip without CUDA; run them on a GPU
machine with ``pytest tests/test_dali_gpu.py`` (notes: docs of fastgenlabel/dali/_compat.py).

Checked here: the CUDA 13 table patch lets DALI's GPU Numba operator build; the in-graph GPU mix
(permute_batch + per-sample kernel) equals fastgenlabel.mix_images; the GPU loader (mixed decode,
mix after the pipeline) gives targets equal to the reference, on the GPU.
"""
import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from nvidia.dali import fn, pipeline_def, types  # noqa: E402

import fastgenlabel as fgl  # noqa: E402
from fastgenlabel.dali import _compat, mix_stage_gpu, split_pairs  # noqa: E402

MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_in_graph_gpu_mix_matches_mix_images(dtype):
    _compat.patch_numba_cuda13()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 11, 13, 3), dtype=np.uint8)
    pairs = fgl.sample_pairs(6, 1.0, lam_mode="sample", generator=1)
    perm, lam = split_pairs(pairs)

    @pipeline_def(batch_size=6, num_threads=1, device_id=0)
    def pipe():
        x = fn.external_source(source=lambda: list(images), batch=True, dtype=types.UINT8, layout="HWC")
        p = fn.external_source(source=lambda: perm, batch=True, dtype=types.INT64)
        lm = fn.external_source(source=lambda: lam, batch=True, dtype=types.FLOAT)
        return mix_stage_gpu(x.gpu(), p, lm, mean=MEAN, std=STD, dtype=dtype)

    p = pipe()
    p.build()
    (out,) = p.run()
    got = np.array(out.as_cpu().as_tensor()).astype(np.float32)
    want = fgl.mix_images(images, pairs, MEAN, STD, dtype=dtype, backend="reference").astype(np.float32)
    tol = 1e-5 if dtype == "float32" else 1e-3
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_gpu_loader_targets_equal_reference(tmp_path):
    from PIL import Image

    from fastgenlabel.features import ThumbnailPCA
    from fastgenlabel.loader import GenLabelLoader, LoaderConfig

    rng = np.random.default_rng(0)
    for k in range(3):
        (tmp_path / f"c{k}").mkdir()
        for i in range(8):
            img = (rng.integers(0, 80, (40, 36, 3)) + 60 * k).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / f"c{k}/{i}.jpg")
    base = dict(data=str(tmp_path), batch_size=8, image_size=32, device="cuda")
    plain = GenLabelLoader(LoaderConfig(**base, alpha=0.0, train=False, return_thumbnails=True, thumbnail=4))
    batches = list(plain)
    thumbs = torch.cat([b.thumbnails for b in batches]).cpu().numpy()
    labels = torch.cat([b.labels for b in batches]).cpu()
    fmap = ThumbnailPCA(4, 5).fit(thumbs)
    model = fgl.GaussianClassModel("full").fit(torch.from_numpy(fmap.transform(thumbs)), labels, 3)
    loader = GenLabelLoader(LoaderConfig(**base, feature_map=fmap, model=model))
    for batch in loader:
        assert batch.images.is_cuda and batch.targets.is_cuda
        ref = fgl.genlabel_target(model, fgl.mix(batch.features.cpu(), batch.pairs), batch.labels.cpu(),
                                  batch.labels.cpu()[batch.pairs.perm], batch.pairs.lam, 1.0, num_classes=3)
        torch.testing.assert_close(batch.targets.cpu(), ref, rtol=1e-3, atol=1e-4)
