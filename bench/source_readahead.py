"""Time the DALI backend's external source as DALI calls it: per-batch ``next`` on the pipeline's thread.

    python bench/make_jpegs.py /tmp/fgl-jpegs      # 1,024 JPEGs of 500 x 375
    python bench/source_readahead.py /tmp/fgl-jpegs [--batch-size 256] [--epochs 6] [--consumer-ms 10]

For ``read_ahead`` 0 (read when asked) and 2 (the default), prints the median and mean time of
``next`` while a consumer sleeps ``--consumer-ms`` per batch (as the loader waits for DALI's
outputs, releasing the GIL), and the images per second of the whole loop.
"""
from __future__ import annotations

import argparse
import statistics
import time

from fastgenlabel.functional.pairs import PairFeed
from fastgenlabel.loader.files import scan
from fastgenlabel.loader.source import EpochSource


def run(files, *, batch_size: int, epochs: int, consumer_s: float, read_ahead: int) -> tuple[float, float, float]:
    src = EpochSource(files, PairFeed(1.0, seed=0, batch_size=batch_size), batch_size=batch_size, last_batch="drop",
                      shuffle=True, seed=0, shard_id=0, num_shards=1, read_ahead=read_ahead)
    it = iter(src)
    per, images = [], 0
    start = time.perf_counter()
    for epoch in range(epochs):
        src.epoch = epoch
        while True:
            t = time.perf_counter()
            try:
                encoded = next(it)[0]
            except StopIteration:
                break
            per.append(time.perf_counter() - t)
            images += len(encoded)
            time.sleep(consumer_s)
    total = time.perf_counter() - start
    src.close()
    return statistics.median(per), statistics.mean(per), images / total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--consumer-ms", type=float, default=10.0)
    args = p.parse_args(argv)
    files = scan(args.data)
    for read_ahead in (0, 2):
        med, mean, rate = run(files, batch_size=args.batch_size, epochs=args.epochs, consumer_s=args.consumer_ms / 1e3,
                              read_ahead=read_ahead)
        print(f"read_ahead={read_ahead}: next() median {med * 1e3:.2f} ms, mean {mean * 1e3:.2f} ms; "
              f"{rate:,.0f} images/s through the loop")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
