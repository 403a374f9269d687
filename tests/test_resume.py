"""Exact resume: a loader restored from ``state_dict()`` hands out exactly the batches the uninterrupted
run would have (images, crops, flips, pairs, targets), on both backends and every data kind, mid-epoch,
at an epoch's end, twice in one epoch and on two ranks; states from other runs are refused."""
import io
import itertools
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from fastgenlabel.loader import GenLabelLoader, LoaderConfig
from fastgenlabel.loader.state import RESUME_FIELDS

pytest.importorskip("nvidia.dali")

N, K = 22, 3


def _image(rng, k, i):
    h, w = 30 + 5 * (i % 4), 28 + 3 * (i % 5)
    return (rng.integers(0, 80, (h, w, 3)) + 60 * k).astype(np.uint8)


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """The same 22 JPEGs as a class folder, a file list and two tar shards."""
    root = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(0)
    lines, samples = [], []
    for n in range(N):
        k = n % K
        path = root / "folder" / f"c{k}" / f"{n:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(rng, k, n)).save(path, quality=90)
        lines.append(f"{path} {k}")
        samples.append((path.read_bytes(), k))
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    shards = []
    for s, part in enumerate((samples[:12], samples[12:])):
        shards.append(root / f"train-{s}.tar")
        with tarfile.open(shards[-1], "w") as tar:
            for j, (data, k) in enumerate(part):
                for ext, blob in (("jpg", data), ("cls", str(k).encode())):
                    info = tarfile.TarInfo(f"s{s}-{j:03d}.{ext}")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    return {"folder": str(root / "folder"), "list": str(root / "list.txt"), "tar": [str(p) for p in shards]}


class Memory(torch.utils.data.Dataset):
    """An in-memory dataset of (image, label, index) items, one size."""

    def __init__(self, n=N):
        rng = np.random.default_rng(1)
        self.images = torch.from_numpy(rng.integers(0, 256, (n, 12, 12, 3), dtype=np.uint8))
        self.num_classes = K

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i % K, i


def make(kinds, kind, backend, **kw):
    base = dict(batch_size=4, image_size=12, device="cpu", num_threads=1, seed=7, alpha=1.0, lam_mode="sample",
                backend=backend, last_batch="partial", mean=(120.0, 110.0, 100.0), std=(60.0, 50.0, 40.0))
    base.update(kw)
    if kind == "memory":
        return GenLabelLoader(LoaderConfig(**base), dataset=Memory())
    return GenLabelLoader(LoaderConfig(data=kinds[kind], **base))


def same(a, b):
    assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.pairs.perm, b.pairs.perm) and torch.equal(a.pairs.lam, b.pairs.lam)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)


def run(loader, epochs):
    return [b for _ in range(epochs) for b in loader]


CASES = [("dali", "folder"), ("dali", "list"), ("dali", "tar"), ("torch", "folder"), ("torch", "list"),
         ("torch", "tar"), ("torch", "memory")]


@pytest.mark.slow
@pytest.mark.parametrize("backend,kind", CASES)
def test_resume_mid_epoch_at_epoch_end_and_twice_in_one_epoch(kinds, backend, kind):
    whole = run(make(kinds, kind, backend), 2)  # 6 batches per epoch (22 samples, partial last batch)
    per_epoch = len(whole) // 2
    assert per_epoch == 6

    def resumed_after(state):
        loader = make(kinds, kind, backend)
        loader.load_state_dict(state)
        return loader

    # mid-epoch: save after 2 batches; the new loader gives batch 2 of epoch 0 on, then epoch 1
    loader = make(kinds, kind, backend)
    it = iter(loader)
    for want in whole[:2]:
        same(next(it), want)
    state = loader.state_dict()
    assert (state["epoch"], state["batch"]) == (0, 2)
    restored = resumed_after(state)
    got = list(restored)
    assert len(got) == per_epoch - 2 and restored.epoch == 1
    for g, w in zip(got, whole[2:per_epoch], strict=True):
        same(g, w)
    same(next(iter(restored)), whole[per_epoch])  # the epoch after goes on from its start

    # twice in one epoch: resume at 2, save again after 2 more, resume at 4 (absolute, not relative)
    second = resumed_after(state)
    it = iter(second)
    next(it), next(it)
    state2 = second.state_dict()
    assert (state2["epoch"], state2["batch"]) == (0, 4)
    for g, w in zip(resumed_after(state2), whole[4:per_epoch], strict=True):
        same(g, w)

    # at the epoch's end: the state taken once the last batch is out points at the next epoch's start
    loader = make(kinds, kind, backend)
    for _ in loader:
        pass
    state = loader.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 0)
    for g, w in zip(resumed_after(state), whole[per_epoch:], strict=True):
        same(g, w)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_resume_mid_epoch_with_cutmix_switched_per_sample(kinds, backend):
    """timm's switched draws (CutMix or mixup per sample, some unmixed) are a pure function of (seed,
    epoch, batch) too: a resumed loader cuts the same boxes; a state from another mixing setup is
    refused."""
    mixing = dict(cutmix_alpha=1.0, mode="elem", prob=0.8, switch_prob=0.5)
    whole = run(make(kinds, "folder", backend, **mixing), 1)
    assert any(b.draw is not None and b.draw.boxes.cut.any() for b in whole)  # some samples are cut
    loader = make(kinds, "folder", backend, **mixing)
    it = iter(loader)
    next(it), next(it), next(it)
    state = loader.state_dict()
    restored = make(kinds, "folder", backend, **mixing)
    restored.load_state_dict(state)
    for g, w in zip(restored, whole[3:], strict=True):
        same(g, w)
    with pytest.raises(ValueError, match=r"state: .*cutmix_alpha: saved "):
        make(kinds, "folder", backend, **dict(mixing, cutmix_alpha=0.5)).load_state_dict(state)


def test_state_is_small_versioned_and_refuses_other_runs(kinds, tmp_path):
    loader = make(kinds, "folder", "torch")
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    assert state["version"] == 1 and len(pickle.dumps(state)) < 512
    buf = io.BytesIO()
    torch.save(state, buf)
    assert torch.load(io.BytesIO(buf.getvalue()), weights_only=True) == state  # checkpoint-safe plain values
    for field, value in (("seed", 8), ("batch_size", 5), ("alpha", 0.5), ("crop_scale", (0.5, 1.0))):
        other = make(kinds, "folder", "torch", **{field: value})
        with pytest.raises(ValueError, match=rf"state: .*{field}: saved "):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"world size \(num_shards\).*num_shards: saved 1, this loader 2"):
        make(kinds, "folder", "torch", num_shards=2).load_state_dict(state)
    with pytest.raises(ValueError, match="data: saved over 22 samples, this loader has 20"):
        GenLabelLoader(loader.config, data=None, dataset=Memory(20)).load_state_dict(state)
    with pytest.raises(ValueError, match="data: other samples"):
        make(kinds, "memory", "torch").load_state_dict(state)
    relabelled = tmp_path / "list.txt"
    lines = open(kinds["list"]).read().splitlines()
    lines[0] = lines[0].rsplit(" ", 1)[0] + " 2"
    relabelled.write_text("\n".join(lines) + "\n")
    listed = make(kinds, "list", "torch")
    with pytest.raises(ValueError, match="data: other samples"):
        listed.load_state_dict(dict(state, data="0" * 16))
    make(kinds, "list", "torch").load_state_dict(make(kinds, "list", "torch").state_dict())  # same data: fine
    with pytest.raises(ValueError, match="data: other samples"):
        GenLabelLoader(loader.config, data=str(relabelled)).load_state_dict(listed.state_dict())
    with pytest.raises(ValueError, match="version 2"):
        loader.load_state_dict(dict(state, version=2))
    with pytest.raises(ValueError, match="batch 6, but an epoch of this loader has 6 batches"):
        loader.load_state_dict(dict(state, batch=6))
    with pytest.raises(ValueError, match="expected a GenLabelLoader.state_dict"):
        loader.load_state_dict({"epoch": 0})
    assert set(state["config"]) == set(RESUME_FIELDS)


def test_a_dataloader_as_dataset_cannot_resume_and_says_why():
    dl = torch.utils.data.DataLoader(Memory(), batch_size=4)
    loader = GenLabelLoader(LoaderConfig(backend="torch", device="cpu", batch_size=4, num_classes=K), dataset=dl)
    with pytest.raises(ValueError, match="dataset: a DataLoader given as the dataset .* pass its Dataset"):
        loader.state_dict()


def test_set_epoch_keeps_the_restored_position_of_its_epoch_only(kinds):
    whole = run(make(kinds, "memory", "torch"), 3)
    loader = make(kinds, "memory", "torch")
    loader.set_epoch(1)
    it = iter(loader)
    next(it), next(it), next(it)
    state = loader.state_dict()
    restored = make(kinds, "memory", "torch")
    restored.load_state_dict(state)
    restored.set_epoch(1)  # the usual `for epoch ...: loader.set_epoch(epoch)` loop keeps the position
    for g, w in zip(restored, whole[9:12], strict=True):
        same(g, w)
    restored.load_state_dict(state)
    restored.set_epoch(2)  # another epoch: from its start
    same(next(iter(restored)), whole[12])


def test_set_epoch_during_the_saved_pass_is_kept(kinds):
    loader = make(kinds, "memory", "torch")
    it = iter(loader)
    next(it)
    loader.set_epoch(5)  # chosen during the pass: the pass after it is epoch 5
    state = loader.state_dict()
    rest = list(it) + [next(iter(loader))]
    restored = make(kinds, "memory", "torch")
    restored.load_state_dict(state)
    got = list(restored) + [next(iter(restored))]
    for g, w in zip(got, rest, strict=True):
        same(g, w)


def _two_ranks(rank, world, kinds, backend, out):
    import torch.distributed as dist

    whole = run(make(kinds, "folder", backend, num_shards=world, shard_id=rank, batch_size=3), 2)
    loader = make(kinds, "folder", backend, num_shards=world, shard_id=rank, batch_size=3)
    it = iter(loader)
    next(it), next(it)
    states = [None] * world
    dist.all_gather_object(states, loader.state_dict())
    assert states[0] == states[1]  # the ranks move in step: one rank's state serves both
    restored = make(kinds, "folder", backend, num_shards=world, shard_id=rank, batch_size=3)
    restored.load_state_dict(states[0])
    got = run(restored, 2)[:len(whole) - 2]
    for g, w in zip(got, whole[2:], strict=True):
        same(g, w)
    (out / f"rank{rank}").write_text(",".join(str(i) for b in got for i in b.indices.tolist()))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_resume_on_two_ranks(kinds, backend, tmp_path):
    from gloo import run_ranks

    run_ranks(_two_ranks, kinds, backend, tmp_path, timeout=240.0)
    a, b = ((tmp_path / f"rank{r}").read_text().split(",") for r in range(2))
    assert len(a) == len(b) > 0 and a != b  # each rank resumed its own shard


# ---- the host-drawn crops: the generator, the windows, DALI applying them ----------------------------

def test_philox_is_numpys_and_draws_are_uniform_and_independent():
    from scipy import stats

    from fastgenlabel.loader.crops import philox4x64, uniforms

    rng = np.random.default_rng(2)
    for _ in range(20):
        c = rng.integers(0, 2 ** 64 - 2, 4, dtype=np.uint64)
        k = rng.integers(0, 2 ** 64 - 1, 2, dtype=np.uint64)
        want = np.random.Philox(counter=c, key=k).random_raw(4)  # numpy increments the counter first
        c[0] += np.uint64(1)
        assert (philox4x64(c[None], k)[0] == want).all()
    n = 4000
    u = uniforms(3, 1, np.arange(n), 23)
    assert np.array_equal(u[7:9], uniforms(3, 1, [7, 8], 23))  # a row depends on its index only
    alpha = 1e-3 / 25  # every check below at a family-wise level of 1e-3
    for col in (0, 9, 10, 22):
        assert stats.kstest(u[:, col], "uniform").pvalue > alpha
    pairs = [(u[:, 0], uniforms(3, 2, np.arange(n), 1)[:, 0]),  # the next epoch
             (u[:, 0], uniforms(4, 1, np.arange(n), 1)[:, 0]),  # another seed
             (u[1:, 0], u[:-1, 0]),  # neighbouring samples
             (u[:, 0], u[:, 1]), (u[:, 3], u[:, 4])]  # neighbouring draws, across a counter block
    for a, b in pairs:
        assert abs(np.corrcoef(a, b)[0, 1]) < stats.norm.ppf(1 - alpha / 2) / np.sqrt(len(a))


def test_crop_windows_are_torchvisions_random_resized_crop():
    """The vectorised windows equal a written-out torchvision RandomResizedCrop fed the same uniforms."""
    import math

    from fastgenlabel.loader.crops import ATTEMPTS, crop_windows, uniforms

    rng = np.random.default_rng(3)
    n = 600
    widths, heights = rng.integers(1, 400, n), rng.integers(1, 400, n)
    widths[:50] = 600  # very wide and very tall images: the fallback
    heights[50:100] = 700
    heights[:50], widths[50:100] = 10, 12
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    start, shape, flip = crop_windows(widths, heights, seed=5, epoch=2, indices=np.arange(n), scale=scale,
                                      ratio=ratio)
    u = uniforms(5, 2, np.arange(n), 2 * ATTEMPTS + 3)
    fallbacks = 0
    for i in range(n):
        W, H = int(widths[i]), int(heights[i])
        for t in range(ATTEMPTS):
            target = W * H * (scale[0] + (scale[1] - scale[0]) * u[i, t])
            aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[i, ATTEMPTS + t])
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= W and 0 < h <= H:
                want = (int(u[i, -3] * (W - w + 1)), int(u[i, -2] * (H - h + 1)), w, h)
                break
        else:
            fallbacks += 1
            r = W / H
            w, h = (W, int(round(W / min(ratio)))) if r < min(ratio) else \
                (int(round(H * max(ratio))), H) if r > max(ratio) else (W, H)
            want = ((W - w) // 2, (H - h) // 2, w, h)
        assert (*start[i].tolist(), *shape[i].tolist()) == want, i
        assert flip[i] == (u[i, -1] < 0.5)
    assert fallbacks >= 100  # the wide and tall images took the fallback
    assert not crop_windows(widths, heights, seed=5, epoch=2, indices=np.arange(n), flip=False)[2].any()


def test_upright_size_is_dalis_for_every_exif_orientation():
    from nvidia.dali import fn, pipeline_def

    from fastgenlabel.loader.encoded import upright_size

    rgb = np.random.default_rng(4).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    datas = []
    for fmt in ("JPEG", "PNG"):
        for o in range(9):
            buf = io.BytesIO()
            exif = Image.Exif()
            exif[0x010F] = "maker"
            if o:
                exif[0x0112] = o
            Image.fromarray(rgb).save(buf, fmt, exif=exif)
            datas.append(np.frombuffer(buf.getvalue(), np.uint8))

    @pipeline_def(batch_size=len(datas), num_threads=1, device_id=None)
    def pipe():
        return fn.peek_image_shape(fn.external_source(source=lambda: datas, batch=True))

    p = pipe()
    p.build()
    shapes = np.array(p.run()[0].as_tensor())
    got = [upright_size(d) for d in datas]
    assert got == [(int(s[1]), int(s[0])) for s in shapes]
    assert got.count((24, 40)) == 8  # orientations 5-8 of both formats turn the image


def _gradient_pngs(root, sizes):
    """PNGs whose red channel is x and green is y (lossless): a crop's window can be read off its pixels."""
    for n, (w, h) in enumerate(sizes):
        x, y = np.meshgrid(np.arange(w), np.arange(h))
        img = np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)
        (root / "c0").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "c0" / f"{n:04d}.png")
    return root


def _read_windows(images):
    """(left, top, w, h, flipped) of (B, S, S, 3) crops of gradient images, from a straight-line fit of the
    middle half of the red and green ramps (resizing is linear there: exact up to the uint8 rounding)."""
    s = images.shape[1]
    j = np.arange(s // 4, s - s // 4) + 0.5
    out = []
    for im in images.astype(np.float64):
        sx, cx = np.polyfit(j, im[s // 2, s // 4:s - s // 4, 0], 1)
        sy, cy = np.polyfit(j, im[s // 4:s - s // 4, s // 2, 1], 1)
        # output pixel j samples x = left + (j + 0.5) w / S - 0.5 (mirrored: left + w - (j + 0.5) w / S - 0.5)
        left = cx - sx / 2 + 0.5 + (sx * s if sx < 0 else 0.0)
        out.append((left, cy - sy / 2 + 0.5, abs(sx) * s, sy * s, sx < 0))
    return np.array(out)


@pytest.mark.slow
def test_dali_crops_the_host_windows_and_keeps_the_distribution_of_its_own_random_crop(tmp_path):
    """The loader's DALI crops are the host-drawn windows and flips; and those windows have the same
    distribution as DALI's ``image_random_crop`` (the loader's crops before): two-sample KS tests
    of area fraction, aspect ratio and centre, on windows read off the pixels of gradient images."""
    from nvidia.dali import fn, pipeline_def, types
    from scipy import stats

    from fastgenlabel.loader.crops import crop_windows

    W, H, S, n = 240, 180, 64, 4096  # n: enough that crop_scale (0.12, 1) instead of (0.08, 1) fails
    sizes = [(W, H)] + [(200, 250), (130, 90)] * 3
    root = _gradient_pngs(tmp_path / "g", sizes)
    loader = GenLabelLoader(LoaderConfig(data=str(root), batch_size=7, image_size=S, device="cpu", num_threads=1,
                                         alpha=0.0, seed=11, mean=(0, 0, 0), std=(1, 1, 1), layout="HWC"))
    files = sorted((root / "c0").iterdir())
    batches, feed = [], []
    for epoch in range(3):
        batch = next(iter(loader))
        loader.reset()
        loader.set_epoch(epoch + 1)
        idx = batch.indices.numpy()
        wh = np.array(sizes)[idx]
        start, shape, flip = crop_windows(wh[:, 0], wh[:, 1], seed=11, epoch=epoch, indices=idx)
        batches.append(batch.images.numpy())
        feed.append(([np.fromfile(files[i], np.uint8) for i in idx], start, shape, flip))
    assert any(f[3].any() for f in feed) and not all(f[3].all() for f in feed)
    calls = iter(range(100))

    @pipeline_def(batch_size=7, num_threads=1, device_id=None)
    def reference():  # decode whole, slice the host window, resize, flip: what the loader's graph must give
        data, start, shape, flips = fn.external_source(source=lambda: feed[next(calls) % 3], num_outputs=4,
                                                       batch=True)
        images = fn.slice(fn.decoders.image(data, output_type=types.RGB), start=start, shape=shape,
                          axis_names="WH")
        return fn.flip(fn.resize(images, resize_x=S, resize_y=S), horizontal=flips)

    ref = reference()
    ref.build()
    for images in batches:
        assert np.array_equal(images, np.array(ref.run()[0].as_tensor()).astype(np.float32))

    data = np.fromfile(root / "c0" / "0000.png", np.uint8)

    @pipeline_def(batch_size=256, num_threads=1, device_id=None, seed=11)
    def dalis_own():
        jpegs = fn.external_source(source=lambda: [data] * 256, batch=True)
        images = fn.decoders.image_random_crop(jpegs, output_type=types.RGB, random_area=[0.08, 1.0],
                                               random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
        return fn.resize(images, resize_x=S, resize_y=S)

    start, shape, _ = crop_windows(np.full(n, W), np.full(n, H), seed=3, epoch=0, indices=np.arange(n))
    chunks = itertools.cycle([(start[i:i + 256], shape[i:i + 256]) for i in range(0, n, 256)])  # DALI reads ahead

    @pipeline_def(batch_size=256, num_threads=1, device_id=None)
    def host_windows():  # the loader's way: the host's windows, read back through the same pixels
        jpegs, st, sh = fn.external_source(source=lambda: ([data] * 256, *next(chunks)), num_outputs=3, batch=True)
        images = fn.decoders.image_slice(jpegs, start=st, shape=sh, output_type=types.RGB)
        return fn.resize(images, resize_x=S, resize_y=S)

    read = []
    for make in (dalis_own, host_windows):  # windows read off the pixels on both sides: the same reading errors
        p = make()
        p.build()
        read.append(np.concatenate([_read_windows(np.array(p.run()[0].as_tensor())) for _ in range(n // 256)]))
    theirs, ours = read

    def features(win):
        left, top, w, h = win[:, 0], win[:, 1], win[:, 2], win[:, 3]
        return w * h / (W * H), np.log(w / h), (left + w / 2) / W, (top + h / 2) / H

    for name, a, b in zip(("area", "log aspect", "centre x", "centre y"), features(ours), features(theirs)):
        assert stats.ks_2samp(a, b).pvalue > 1e-3 / 4, name
