"""Time a resume: ``load_state_dict`` plus the first batch after it, against a fresh epoch's first batch.

    python bench/make_jpegs.py /tmp/fgl-jpegs --count 512 --size 256x192
    python bench/resume.py /tmp/fgl-jpegs [--backend dali] [--batch-size 64] [--image-size 128] [--repeats 5]

Three timings per repeat, each in a loader built just before it (building is not timed), after
one warm-up loader has compiled the DALI stage: ``fresh`` (``iter`` and the first batch of a
loader's first epoch), ``resume`` (``load_state_dict`` of a state saved half-way through the epoch
and the first batch after it), and ``next epoch`` (the first batch of the second epoch of a loader
that just finished its first: DALI may have started it early). Prints medians and resume / fresh.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from fastgenlabel.loader import GenLabelLoader, LoaderConfig


def _config(args) -> LoaderConfig:
    return LoaderConfig(data=args.data, backend=args.backend, batch_size=args.batch_size, image_size=args.image_size,
                        num_threads=args.threads, device=args.device, seed=1, alpha=1.0)


def _first(loader) -> float:
    t = time.perf_counter()
    next(iter(loader))
    return time.perf_counter() - t


def run(args) -> dict:
    cfg = _config(args)
    warm = GenLabelLoader(cfg)
    it = iter(warm)
    for _ in range(len(warm) // 2):
        next(it)
    state = warm.state_dict()
    for _ in it:
        pass
    fresh, resume, next_epoch = [], [], []
    for _ in range(args.repeats):
        fresh.append(_first(GenLabelLoader(cfg)))
        loader = GenLabelLoader(cfg)
        t = time.perf_counter()
        loader.load_state_dict(state)
        next(iter(loader))
        resume.append(time.perf_counter() - t)
        loader = GenLabelLoader(cfg)
        for _ in loader:
            pass
        next_epoch.append(_first(loader))
    med = {k: statistics.median(v) for k, v in (("fresh", fresh), ("resume", resume), ("next_epoch", next_epoch))}
    return {"backend": args.backend, "batch_size": args.batch_size, "image_size": args.image_size,
            "batches_per_epoch": len(warm), "resumed_at": state["batch"], "repeats": args.repeats,
            **{f"{k}_s": round(v, 4) for k, v in med.items()},
            "resume_over_fresh": round(med["resume"] / med["fresh"], 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("--backend", choices=("dali", "torch"), default="dali")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    r = run(p.parse_args(argv))
    print(f"{r['backend']}: B={r['batch_size']}, crop {r['image_size']}, resumed at batch {r['resumed_at']} of "
          f"{r['batches_per_epoch']}; medians of {r['repeats']}: fresh epoch's first batch {r['fresh_s'] * 1e3:.0f} ms, "
          f"load_state_dict + first batch {r['resume_s'] * 1e3:.0f} ms, next epoch's first batch "
          f"{r['next_epoch_s'] * 1e3:.0f} ms; resume / fresh = {r['resume_over_fresh']:.2f}")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
