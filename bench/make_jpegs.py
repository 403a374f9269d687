"""Write a folder of class sub-folders of real JPEG photos-sized files for loader benchmarks.

    python bench/make_jpegs.py OUT_DIR [--count 1024] [--size 500x375] [--classes 10] [--workers 8]

The images are scikit-learn's digits (real handwriting scans), upscaled with bicubic
interpolation to the requested size, coloured per class and given a little noise so that they
decode like photos of that size (the anchors' DALI figures use 1,024 JPEGs of 500 x 375).
"""
from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def _write(args) -> None:
    path, image, size, seed = args
    from PIL import Image

    rng = np.random.default_rng(seed)
    up = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC)).astype(np.int16)
    noisy = np.clip(up + rng.integers(-12, 13, up.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(path, quality=90)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--count", type=int, default=1024)
    p.add_argument("--size", default="500x375", help="WIDTHxHEIGHT")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    from fastgenlabel.demo import digits_rgb

    size = tuple(int(v) for v in args.size.lower().split("x"))
    images, labels = digits_rgb(32)
    jobs = []
    for i in range(args.count):
        j = i % len(images)
        folder = Path(args.out) / f"class{labels[j] % args.classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"{i:06d}.jpg", images[j], size, i))
    with ProcessPoolExecutor(max(1, args.workers)) as pool:
        list(pool.map(_write, jobs, chunksize=16))
    print(f"wrote {args.count} JPEGs of {size[0]}x{size[1]} in {args.classes} classes to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
