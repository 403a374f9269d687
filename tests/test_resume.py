"""Exact resume: a loader restored from ``state_dict()`` hands out exactly the batches the uninterrupted
run would have (images, crops, flips, pairs, targets), on both backends and every data kind, mid-epoch,
at an epoch's end, twice in one epoch and on two ranks; states from other runs are refused."""
import io
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
