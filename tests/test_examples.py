"""examples/train.py under torchrun: two CPU ranks (gloo) on a tiny JPEG folder; ranks agree on the class model."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PIL = pytest.importorskip("PIL.Image")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_jpegs")
    rng = np.random.default_rng(0)
    for c in range(3):
        d = root / f"class{c}"
        d.mkdir()
        for i in range(16 if c else 15):  # 47 images: the two shards are padded
            img = np.zeros((32, 32, 3))
            img[..., c] = 180
            img = (img + rng.normal(0, 40, img.shape)).clip(0, 255).astype(np.uint8)
            PIL.fromarray(img).save(d / f"{i:03d}.jpg", quality=90)
    return root


def _torchrun(folder, *extra, timeout=180):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "examples" / "train.py"), "--device", "cpu", "--data", str(folder), "--epochs", "1",
           "--batch-size", "8", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _checksums(out: str) -> dict:
    return dict(re.findall(r"\[rank (\d)\] class-model checksum ([0-9a-f]{16})", out))


@pytest.mark.slow
@pytest.mark.parametrize("variant", [[], ["--deep", "--covariance", "diag", "--backend", "torch"],
                                     ["--deep", "--covariance", "diag", "--backend", "torch", "--cutmix-alpha", "1",
                                      "--mix-mode", "elem", "--mix-prob", "0.8"]],
                         ids=["thumbnail-pca-default-backend", "deep-torch-backend", "deep-cutmix-switched"])
def test_train_example_two_cpu_ranks(folder, variant):
    out = _torchrun(folder, *variant)
    sums = _checksums(out)
    assert set(sums) == {"0", "1"}, out
    assert sums["0"] == sums["1"], out
    assert out.count("parameters equal to rank 0's: True") == 2, out
    assert len(re.findall(r"\[rank \d\] epoch \d+: loss [0-9.]+", out)) == 2, out


@pytest.mark.slow
def test_timeout_bounds_the_wait_for_a_rank_that_never_joins(folder):
    """Rank 0 of 2 with rank 1 never started: --timeout 3 reaches init_process_group, and rank 0
    fails within seconds instead of torch's 30 minutes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "examples" / "train.py"), "--device", "cpu", "--data", str(folder),
           "--timeout", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "1/2 clients joined" in proc.stderr or "timed out" in proc.stderr.lower(), proc.stderr[-2000:]
    helptext = subprocess.run([sys.executable, str(ROOT / "examples" / "train.py"), "--help"], capture_output=True,
                              text=True, cwd=ROOT).stdout
    assert "--timeout SECONDS" in helptext
