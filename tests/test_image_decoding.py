"""The torch backend decodes as DALI does: 16-bit PNGs scaled (not clipped white), EXIF-rotated
JPEGs upright, centre crops at DALI's offsets."""
import numpy as np
import pytest
from PIL import Image

from fastgenlabel.loader.files import scan
from fastgenlabel.loader.images import ImageFileDataset

pytest.importorskip("nvidia.dali")


def dali_decode(path):
    from nvidia.dali import fn, pipeline_def, types

    data = np.fromfile(path, np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        return fn.decoders.image(fn.external_source(source=lambda: [data], batch=True), output_type=types.RGB)

    p = pipe()
    p.build()
    return np.array(p.run()[0].as_tensor())[0]


def test_sixteen_bit_png_and_exif_jpeg_decode_like_dali(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    wide = (rng.integers(0, 65536, (24, 40))).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "a" / "0.png")
    rgb = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(tmp_path / "a" / "1.jpg", quality=95, exif=exif)
    files = scan(tmp_path)
    for i, name in enumerate(("0.png", "1.jpg")):
        want = dali_decode(tmp_path / "a" / name)
        ds = ImageFileDataset(files, 8, train=False)
        from PIL import ImageOps

        with Image.open(tmp_path / "a" / name) as im:
            upright = ImageOps.exif_transpose(im)
            assert upright.size == (want.shape[1], want.shape[0])
        got = ds[i][0].numpy()
        assert got.shape == (8, 8, 3) and 20 < got.mean() < 235, got.mean()  # not clipped to white
    png = dali_decode(tmp_path / "a" / "0.png").astype(np.float64)
    from fastgenlabel.loader.images import _to_rgb

    with Image.open(tmp_path / "a" / "0.png") as im:
        mine = np.asarray(_to_rgb(im)).astype(np.float64)
    assert np.abs(mine - png).max() <= 1.0


def test_centre_crop_offsets_match_dalis_rounding(tmp_path):
    """An odd margin: DALI's crop rounds the offset half up; the torch backend does too."""
    from nvidia.dali import fn, pipeline_def, types

    rng = np.random.default_rng(1)
    (tmp_path / "a").mkdir()
    img = rng.integers(0, 256, (40, 47, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a" / "0.png")
    files = scan(tmp_path)
    s = 35  # resize_shorter = round(35 / 0.875) = 40: the size is kept; margins 12 and 5 (odd: 2.5 rounds up)
    got = ImageFileDataset(files, s, train=False)[0][0].numpy()
    data = np.fromfile(tmp_path / "a" / "0.png", np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        x = fn.decoders.image(fn.external_source(source=lambda: [data], batch=True), output_type=types.RGB)
        x = fn.resize(x, resize_shorter=round(s / 0.875))
        return fn.crop(x, crop=(s, s))

    p = pipe()
    p.build()
    want = np.array(p.run()[0].as_tensor())[0]
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 1.0
