"""The demo end to end on a few hundred digits, one epoch: files, models, PNG grid, results."""
import json

import pytest

pytest.importorskip("nvidia.dali")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from fastgenlabel import cli  # noqa: E402
from fastgenlabel.models import load_model  # noqa: E402


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--out", str(out), "--epochs", "1", "--limit", "300", "--no-progress", "--batch-size", "32"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mixup+GenLabel" in printed and "img/s" in printed
    written = [len(list((out / "data" / split).glob("*/*.jpg"))) for split in ("train", "test")]
    assert sum(written) == 300
    results = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in results] == ["mixup", "mixup+GenLabel"]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["loader_images_per_s"] > 0 for r in results)
    assert (out / "mixed_samples.png").stat().st_size > 10_000
    assert load_model(out / "class_model.npz").num_classes == 10
    # the same folder with another --limit: the data are written again, not reused
    assert cli.main(["demo", "--out", str(out), "--epochs", "1", "--limit", "200", "--no-progress",
                     "--batch-size", "32"]) == 0
    assert sum(len(list((out / "data" / split).glob("*/*.jpg"))) for split in ("train", "test")) == 200


def test_digits_are_real_images_written_as_jpegs(tmp_path):
    from PIL import Image

    from fastgenlabel.demo import digits_rgb, write_image_folder

    images, labels = digits_rgb(32)
    assert images.shape == (1797, 32, 32, 3) and set(labels.tolist()) == set(range(10))
    paths = write_image_folder(images[:3], labels[:3], tmp_path)
    with Image.open(paths[0]) as im:
        assert im.format == "JPEG" and im.size == (32, 32)
