"""A loader's resume state: where the next batch sits, and what it was saved with, checked on load.

The batches are pure functions of (seed, epoch, batch index, sample index), so the position
(epoch, batch) is all a loader needs to hand out what the uninterrupted run would have. The rest
names what decides that sequence (the config fields of :data:`RESUME_FIELDS`, the data's size and
a digest of its samples, the world size), so that a state from another run is refused, naming
what differs, rather than silently resuming elsewhere. Plain Python values: it pickles into a few
hundred bytes and goes into ``torch.save`` checkpoints (Lightning's included) as it is.
"""
from __future__ import annotations

import hashlib

import numpy as np

FORMAT = "fastgenlabel.GenLabelLoader"
VERSION = 1
# the config fields that decide which samples, crops, flips and pairs every batch has
RESUME_FIELDS = ("seed", "shuffle", "batch_size", "last_batch", "num_shards", "train", "flip", "crop_scale",
                 "crop_ratio", "alpha", "pairing", "lam_mode", "mixup_alpha", "cutmix_alpha", "cutmix_minmax", "prob",
                 "switch_prob", "mode", "correct_lam", "image_size")


def _plain(v):
    return [float(x) for x in v] if isinstance(v, (tuple, list)) else v


def data_digest(files) -> str:
    """16 hex digits of SHA-256 over the samples' labels and names (file or member names, not the
    folders above them: a dataset copied elsewhere still matches)."""
    h = hashlib.sha256(np.ascontiguousarray(files.labels, np.int64).tobytes())
    tails = ["/".join(str(p).replace("\\", "/").split("/")[-2:]) for p in files.paths]
    if files.members is not None:
        tails = [f"{t}:{m}" for t, m in zip(tails, files.members)]
    h.update("\n".join(tails).encode("utf-8", "replace"))
    return h.hexdigest()[:16]


def make_state(config, *, epoch: int, batch: int, next_epoch, samples: int, digest) -> dict:
    return {"format": FORMAT, "version": VERSION, "epoch": int(epoch), "batch": int(batch),
            "next_epoch": None if next_epoch is None else int(next_epoch), "samples": samples, "data": digest,
            "config": {f: _plain(getattr(config, f)) for f in RESUME_FIELDS}}


def check_state(state, config, *, samples: int, digest, batches: int) -> tuple[int, int, int | None]:
    """(epoch, batch, next_epoch) of a state saved by a loader like this one; else ValueError naming
    what differs."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"state: expected a GenLabelLoader.state_dict() (format {FORMAT!r}), got "
                         f"{type(state).__name__}")
    if state.get("version") != VERSION:
        raise ValueError(f"state: format version {state.get('version')!r}, but this fastgenlabel reads version "
                         f"{VERSION}")
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise ValueError("state: no 'config' entry (a damaged state)")
    diffs = [f"{f}: saved {saved.get(f)!r}, this loader {_plain(getattr(config, f))!r}" for f in RESUME_FIELDS
             if saved.get(f) != _plain(getattr(config, f))]
    if state.get("samples") != samples:
        diffs.append(f"data: saved over {state.get('samples')} samples, this loader has {samples}")
    elif state.get("data") != digest:
        diffs.append(f"data: other samples (names or labels; digest {state.get('data')} saved, {digest} here)")
    if diffs:
        what = "world size (num_shards) and " if any(d.startswith("num_shards") for d in diffs) else ""
        raise ValueError(f"state: saved by a loader with another {what}configuration or data, so its batches "
                         "would differ; " + "; ".join(diffs))
    epoch, batch, after = state.get("epoch"), state.get("batch"), state.get("next_epoch")
    for name, v, lo in (("epoch", epoch, 0), ("batch", batch, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"state: {name} must be an integer >= {lo}, got {v!r}")
    if batches is not None and batch >= max(batches, 1):
        raise ValueError(f"state: batch {batch}, but an epoch of this loader has {batches} batches")
    if after is not None and (isinstance(after, bool) or not isinstance(after, int) or after < 0):
        raise ValueError(f"state: next_epoch must be None or an integer >= 0, got {after!r}")
    return epoch, batch, after
