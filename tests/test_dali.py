"""DALI building blocks on the CPU: the in-graph mix against fastgenlabel.mix_images, thumbnails,
partner labels, and the DALI 2.4 workarounds (fastgenlabel/dali/_compat.py)."""
import numpy as np
import pytest

pytest.importorskip("nvidia.dali")

from nvidia.dali import fn, pipeline_def, types  # noqa: E402

from fastgenlabel import mix_images, sample_pairs  # noqa: E402
from fastgenlabel.dali import _compat, mix_stage, partner_labels  # noqa: E402
from fastgenlabel.features import thumbnails  # noqa: E402
from fastgenlabel.functional.pairs import split_pairs  # noqa: E402

MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
B, H, W = 5, 7, 9


def run_mix(images, pairs, flips=None, rows=None, **kw):
    """Feed a uint8 (B, H, W, C) batch and its pairs (and flip flags, and CutMix box rows) through
    mix_stage in a CPU pipeline."""
    perm, lam = split_pairs(pairs)
    labels = [np.array([10 * i], np.int32) for i in range(len(images))]
    flags = None if flips is None else [np.array(f, np.int32) for f in flips]

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: list(images), batch=True, dtype=types.UINT8, layout="HWC")
        p = fn.external_source(source=lambda: perm, batch=True, dtype=types.INT64)
        lm = fn.external_source(source=lambda: lam, batch=True, dtype=types.FLOAT)
        lab = fn.external_source(source=lambda: labels, batch=True, dtype=types.INT32)
        f = None if flags is None else fn.external_source(source=lambda: flags, batch=True, dtype=types.INT32)
        bx = None if rows is None else fn.external_source(source=lambda: rows, batch=True, dtype=types.INT64)
        out = mix_stage(x, p, lm, flip=f, boxes=bx, **kw)
        outs = out if isinstance(out, tuple) else (out,)
        return (*outs, partner_labels(lab, p))

    p = pipe()
    p.build()
    return [np.array(o.as_tensor()) for o in p.run()]


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (B, H, W, 3), dtype=np.uint8), sample_pairs(B, 1.0, lam_mode="sample", generator=1)


@pytest.mark.parametrize("layout,per_sample", [("CHW", False), ("HWC", False), ("CHW", True)])
def test_mix_stage_matches_mix_images_float32(batch, layout, per_sample):
    images, pairs = batch
    mixed, thumbs, partners = run_mix(images, pairs, mean=MEAN, std=STD, layout=layout, thumbnail=3,
                                      per_sample=per_sample)
    want = mix_images(images, pairs, MEAN, STD, layout=layout, backend="reference")
    assert mixed.dtype == np.float32 and mixed.shape == want.shape
    np.testing.assert_allclose(mixed, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(thumbs, thumbnails(images, 3), rtol=1e-5, atol=1e-4)  # unmixed thumbnails
    np.testing.assert_array_equal(partners[:, 0], 10 * pairs.perm.numpy())


@pytest.mark.parametrize("per_sample", [False, True])
def test_mix_stage_flips_each_sample_and_partner_by_its_own_flag(batch, per_sample):
    images, pairs = batch
    flips = [1, 0, 1, 1, 0]
    mixed, thumbs, _ = run_mix(images, pairs, flips, mean=MEAN, std=STD, thumbnail=3, per_sample=per_sample)
    flipped = np.stack([im[:, ::-1] if f else im for im, f in zip(images, flips)])
    np.testing.assert_allclose(mixed, mix_images(flipped, pairs, MEAN, STD, backend="reference"), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(thumbs, thumbnails(flipped, 3), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("layout,per_sample,dtype", [("CHW", False, "float32"), ("HWC", False, "float16"),
                                                    ("CHW", True, "bfloat16")])
def test_mix_stage_cuts_and_pastes_per_sample_with_the_pasted_thumbnails(batch, layout, per_sample, dtype):
    """Box rows: cut samples take the (flipped) partner inside their box (borders, empty and full
    boxes), the others are mixed by lambda, in one pass equal to mix_images; the thumbnails are each
    sample's own followed by its cut-and-pasted image's."""
    import torch

    from fastgenlabel.functional.pairs import CutBoxes
    from fastgenlabel.functional.switch import MixDraw, box_rows

    images, pairs = batch
    flips = [1, 0, 1, 1, 0]
    boxes = torch.tensor([[0, 7, 0, 9], [2, 5, 3, 9], [0, 0, 0, 0], [6, 7, 0, 4], [1, 4, 2, 6]])
    cut = torch.tensor([True, True, True, False, True])
    draw = MixDraw(pairs, CutBoxes(boxes, H, W, cut), torch.where(cut, 2, 1).to(torch.int8))
    rows = box_rows(draw)
    mixed, thumbs, _ = run_mix(images, pairs, flips, rows, mean=MEAN, std=STD, thumbnail=3, layout=layout,
                               dtype=dtype, per_sample=per_sample)
    flipped = np.stack([im[:, ::-1] if f else im for im, f in zip(images, flips)])
    want = mix_images(torch.from_numpy(flipped), pairs, MEAN, STD, layout=layout, dtype=dtype, boxes=draw.boxes,
                      backend="reference")
    got = torch.from_numpy(mixed)
    if dtype == "bfloat16":
        got = got.view(torch.bfloat16)
    assert torch.equal(got.float(), want.float()) if dtype != "float32" else torch.allclose(got, want, 1e-5, 1e-5)
    pasted = flipped.copy()
    for i, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
        if cut[i]:
            pasted[i, y0:y1, x0:x1] = flipped[pairs.perm[i], y0:y1, x0:x1]
    k = 3 * 3 * 3
    assert thumbs.shape == (B, 2 * k)
    np.testing.assert_allclose(thumbs[:, :k], thumbnails(flipped, 3), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(thumbs[:, k:], thumbnails(pasted, 3), rtol=1e-6, atol=1e-4)
    assert not np.array_equal(thumbs[:, k:], thumbs[:, :k])  # the boxes change some thumbnails


def test_mix_stage_float16_goes_through_uint16_bits(batch):
    images, pairs = batch
    mixed, _ = run_mix(images, pairs, mean=MEAN, std=STD, dtype="float16")
    want = mix_images(images, pairs, MEAN, STD, dtype="float16", backend="reference")
    assert mixed.dtype == np.float16
    np.testing.assert_allclose(mixed.astype(np.float32), want.astype(np.float32), rtol=1e-3, atol=1e-3)


def test_mix_stage_without_normalisation_and_identity_pairs(batch):
    images, _ = batch
    mixed, _ = run_mix(images, sample_pairs(B, 0.0), layout="HWC")
    np.testing.assert_array_equal(mixed, images.astype(np.float32))


def test_mix_stage_rejects_bad_arguments(batch):
    with pytest.raises(ValueError, match="dtype"):
        mix_stage(None, None, None, dtype="int8")
    with pytest.raises(ValueError, match="layout"):
        mix_stage(None, None, None, layout="NCWH")
    with pytest.raises(ValueError, match="give both or neither"):
        mix_stage(None, None, None, mean=MEAN)


def test_stage_compiles_once_per_process(batch):
    images, pairs = batch
    run_mix(images, pairs, mean=MEAN, std=STD, layout="CHW", thumbnail=3)
    n = len(_compat._compiled)
    run_mix(images, pairs, mean=MEAN, std=STD, layout="CHW", thumbnail=3)
    assert len(_compat._compiled) == n


def test_compat_cuda13_table_patch_is_narrow(monkeypatch):
    import nvidia.dali.plugin.numba as dali_numba

    table = dict(dali_numba.minimal_numba_version)
    table.pop(13, None)
    monkeypatch.setattr(dali_numba, "minimal_numba_version", table)
    monkeypatch.setattr(_compat, "dali_version", lambda: (2, 5, 0))
    assert _compat.patch_numba_cuda13() is False and 13 not in table  # newer DALI: untouched
    monkeypatch.setattr(_compat, "dali_version", lambda: (2, 4, 0))
    assert _compat.patch_numba_cuda13() is True and 13 in table
    assert _compat.patch_numba_cuda13() is False  # already there


def test_compat_float16_defect_is_still_there_or_gone_cleanly():
    """Defect 2 exists in DALI 2.4: FLOAT16 handed to the operator is refused; our stages never do that."""
    from nvidia.dali.plugin.numba import NumbaFunction

    if _compat.dali_version()[:2] > (2, 4):
        pytest.skip("the check may be fixed in newer DALI")
    with pytest.raises(RuntimeError, match="float16"):
        NumbaFunction(run_fn=lambda o, i: None, out_types=[types.FLOAT16], in_types=[types.FLOAT16],
                      outs_ndim=[1], ins_ndim=[1])


SIM_SCRIPT = r"""
import numpy as np
from numba import cuda
from fastgenlabel import mix_images, sample_pairs
from fastgenlabel.dali import _kernels_cuda

MEAN, STD = (120.0, 110.0, 100.0), (60.0, 50.0, 40.0)
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (3, 5, 4, 3), dtype=np.uint8)
pairs = sample_pairs(3, 1.0, lam_mode="sample", generator=1)
sc = (1 / np.array(STD)).astype(np.float32)
sh = (-np.array(MEAN) / np.array(STD)).astype(np.float32)
for dtype, chw in (("float32", True), ("float16", False)):
    kernel = cuda.jit(_kernels_cuda.make_mix_gpu(sc, sh, chw, dtype == "float16"))
    out = np.zeros((3, 3, 5, 4) if chw else (3, 5, 4, 3), np.uint16 if dtype == "float16" else np.float32)
    for s in range(3):  # what DALI does: one launch per sample
        kernel[2, 8](out[s], x[s], x[int(pairs.perm[s])], pairs.lam[s:s + 1].numpy())
    got = out.view(np.float16).astype(np.float32) if dtype == "float16" else out
    want = mix_images(x, pairs, MEAN, STD, dtype=dtype, layout="CHW" if chw else "HWC", backend="reference")
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-3, atol=1e-3)
print("ok")
"""


def test_gpu_mix_kernel_under_the_cuda_simulator():
    """The per-sample CUDA run function of mix_stage_gpu, launched per sample as DALI does (simulated)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    res = subprocess.run([sys.executable, "-c", SIM_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


CACHE_SCRIPT = r"""
import hashlib, json, sys
import numpy as np
from nvidia.dali import fn, pipeline_def, types
from fastgenlabel.dali import _compat, _kernels, mix_stage, partner_labels

if sys.argv[1] == "edited":  # what an edit of the pixel row code looks like to the cache: another digest
    _kernels.DEPENDS = _kernels.DEPENDS + (_kernels,)
if sys.argv[1] == "full-disk":  # every write into the cache fails as on a full disk
    import errno
    from numba.core import caching

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    caching.IndexDataCacheFile.save = full
rng = np.random.default_rng(0)
images = list(rng.integers(0, 256, (4, 5, 6, 3), dtype=np.uint8))
perm = [np.array([p], np.int64) for p in (1, 0, 3, 2)]
lam = [np.array([v], np.float32) for v in (0.3, 0.7, 0.5, 1.0)]
labels = [np.array([i], np.int32) for i in range(4)]

@pipeline_def(batch_size=4, num_threads=1, device_id=None)
def pipe():
    x = fn.external_source(source=lambda: images, batch=True, dtype=types.UINT8, layout="HWC")
    p = fn.external_source(source=lambda: perm, batch=True, dtype=types.INT64)
    lm = fn.external_source(source=lambda: lam, batch=True, dtype=types.FLOAT)
    lab = fn.external_source(source=lambda: labels, batch=True, dtype=types.INT32)
    return (*mix_stage(x, p, lm, mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0), thumbnail=2), partner_labels(lab, p))

p = pipe()
p.build()
digest = hashlib.sha256(b"".join(np.array(o.as_tensor()).tobytes() for o in p.run())).hexdigest()
funcs = [f for fs in _compat._compiled.values() for f in fs]
print(json.dumps({"funcs": len(funcs), "loaded": sum(f._cache_hits for f in funcs), "digest": digest}))
"""


def run_cache_script(cache_dir, variant="plain"):
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    res = subprocess.run([sys.executable, "-c", CACHE_SCRIPT, variant], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_stages_are_loaded_from_the_disk_cache_in_a_new_process(tmp_path):
    """Defect 5: a second process loads the stages' compiled C functions instead of compiling them;
    an edit of the pixel code they call (another digest) compiles them again; a cache that cannot
    be written (a full disk) costs the next process a compile, never the pipeline."""
    full_disk = run_cache_script(tmp_path, "full-disk")
    assert full_disk["funcs"] == 4 and full_disk["loaded"] == 0 and not any(tmp_path.rglob("*.nbi"))
    cold = run_cache_script(tmp_path)
    assert cold == full_disk  # mix and partner stages, run + setup each: compiled, the same outputs
    assert any(tmp_path.rglob("*mix_cfuncs*run*.nbi")) and any(tmp_path.rglob("*partner_cfuncs*run*.nbi"))
    warm = run_cache_script(tmp_path)
    assert warm == {**cold, "loaded": 4}  # all four loaded, the same outputs
    edited = run_cache_script(tmp_path, "edited")
    assert edited == {**cold, "loaded": 0}
