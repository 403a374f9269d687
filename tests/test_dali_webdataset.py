"""The WebDataset pipeline on the CPU: tar shards written here, labels parsed in the graph, images mixed
with the pairs the feed drew (compared with fastgenlabel.mix on an unmixed run of the same pipeline)."""
import io
import tarfile

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

import fastgenlabel as fgl  # noqa: E402
from fastgenlabel.dali import webdataset_pipeline  # noqa: E402
from fastgenlabel.functional import PairFeed  # noqa: E402


def write_shard(path, start, n, rng):
    from PIL import Image

    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, format="JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("cls", f"{i % 3}\n".encode())):
                info = tarfile.TarInfo(f"sample{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    rng = np.random.default_rng(0)
    write_shard(root / "a.tar", 0, 6, rng)
    write_shard(root / "b.tar", 6, 6, rng)
    return [root / "a.tar", root / "b.tar"]


def run(shards, alpha):
    feed = PairFeed(alpha, lam_mode="sample", seed=1, batch_size=4)
    pipe = webdataset_pipeline(shards, feed, batch_size=4, image_size=16, train=False, shuffle=False, num_threads=1,
                               mean=(100.0,) * 3, std=(50.0,) * 3)
    pipe.build()
    out = []
    for _ in range(3):
        images, labels, perm, lam = (np.array(o.as_tensor()) for o in pipe.run())
        out.append((torch.from_numpy(images), labels[:, 0], fgl.MixPairs(torch.from_numpy(perm[:, 0]),
                                                                         torch.from_numpy(lam[:, 0]))))
    return out


def test_webdataset_labels_and_in_graph_mix(shards):
    plain, mixed = run(shards, 0.0), run(shards, 1.0)
    labels = np.concatenate([b[1] for b in plain])
    np.testing.assert_array_equal(labels, np.arange(12) % 3)  # parsed from the .cls members, in order
    for (x, _, _), (m, _, pairs) in zip(plain, mixed, strict=True):
        assert not torch.equal(pairs.perm, torch.arange(4)) or float(pairs.lam.min()) < 1
        torch.testing.assert_close(m, fgl.mix(x, pairs), rtol=1e-5, atol=1e-4)


def test_feed_batch_size_must_match(shards):
    with pytest.raises(ValueError, match="drawn for batches of 8"):
        webdataset_pipeline(shards, PairFeed(1.0, batch_size=8), batch_size=4, image_size=16)


def test_ascii_label_rule_matches_the_tar_index():
    """Digits with surrounding whitespace parse; whitespace between digits, other bytes and more
    than 18 digits (past int64) give -1 (the plain function DALI's numba operator compiles)."""
    from fastgenlabel.dali._kernels import ascii_label_run_fn

    texts = [b"3\n", b" 42 ", b"3 4\n", b"7a", b"", b"9" * 18, b"9" * 20, b"\t0\r\n"]
    out = [np.zeros(1, np.int64) for _ in texts]
    ascii_label_run_fn(out, [np.frombuffer(t, np.uint8) for t in texts])
    assert [int(o[0]) for o in out] == [3, 42, -1, -1, -1, int("9" * 18), -1, 0]
