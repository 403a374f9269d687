"""The authors' tabular protocol (their OpenML code) on scikit-learn's bundled sets: ``reproduce --suite tabular``.

Per (dataset, architecture, method, seed): one training per learning rate in :data:`LRS`; the rate
with the best last-epoch accuracy on a seeded stratified validation split (:data:`VAL_FRACTION` of
the training split) is kept, and that model is tested, clean and under the attacks
(:mod:`.robustness`). Architectures: logistic regression (one linear layer) and 3FC (two hidden
layers of 128, ReLU). Adam, weight decay 1e-4, :data:`EPOCHS` epochs, batch 128, gamma 1.

GenLabel against mixup and against vanilla, per dataset, architecture and measure: a two-sided
paired t-test over the seeds at :data:`ALPHA`; a significant difference is a win or a loss, anything
else a tie. (With 5 pairs the sign and Wilcoxon tests cannot go below p = 1/16, so never reach 0.05.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .datasets import Dataset
from .protocol import Protocol
from .training import RunResult, train_run

ARCHS = {"log-reg": (), "3fc": (128, 128)}
ARCH_LABELS = {"log-reg": "logistic regression", "3fc": "3FC (128-128)"}
LRS = (1e-1, 1e-2, 1e-3, 1e-4)
EPOCHS = 100
BATCH_SIZE = 128
WEIGHT_DECAY = 1e-4
SEEDS = 5
VAL_FRACTION = 0.2
ALPHA = 0.05
MIN_PAIRS = 3  # fewer seeds give no test (every comparison a tie)
METHODS = ("vanilla", "mixup", "genlabel-gauss", "genlabel-kde")
COMPARISONS = tuple((g, b) for g in ("genlabel-gauss", "genlabel-kde") for b in ("mixup", "vanilla"))
OUTCOMES = ("win", "tie", "loss")


def protocol(arch: str, lr: float, *, epochs: int = EPOCHS, gamma: float = 1.0,
             bandwidth: str | float = "scott") -> Protocol:
    """The authors' setting for one architecture and learning rate (no lr schedule, no clipping)."""
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {tuple(ARCHS)}, got {arch!r}")
    return Protocol(hidden=ARCHS[arch], optimizer="adam", lr=lr, weight_decay=WEIGHT_DECAY, epochs=epochs,
                    batch_size=BATCH_SIZE, clip=None, gamma=gamma, bandwidth=bandwidth)


@dataclass
class CellResult:
    """One (dataset, arch, method, seed): the chosen learning rate and the run trained with it."""

    arch: str
    lr: float
    run: RunResult


def run_cell(data: Dataset, arch: str, method: str, seed: int, *, epochs: int = EPOCHS, gamma: float = 1.0,
             bandwidth: str | float = "scott", keep_net: bool = False, on_train=None) -> CellResult:
    """Train with every rate of :data:`LRS` on ``data`` (which needs a validation split); keep the best.

    Ties in validation accuracy keep the larger rate (the order of :data:`LRS`, as the authors'
    strict ``>``). ``on_train`` is called after each training (a progress bar's update). The
    rates share the batches, the pairs and so the GenLabel targets: those are computed once and
    replayed (``train_run``'s ``target_cache``), with the same result as relabelling per rate.
    """
    if data.val is None:
        raise ValueError(f"data: {data.name!r} has no validation split to choose the learning rate on")
    best: CellResult | None = None
    targets: dict = {}
    for lr in LRS:
        r = train_run(data, protocol(arch, lr, epochs=epochs, gamma=gamma, bandwidth=bandwidth), method, seed,
                      keep_net=keep_net, val_selected=False, target_cache=targets)
        if best is None or r.val_acc > best.run.val_acc:
            best = CellResult(arch, lr, r)
        if on_train is not None:
            on_train()
    return best


def paired_outcome(a, b, alpha: float = ALPHA) -> dict:
    """``a`` against ``b`` (paired runs): {"outcome": win | tie | loss, "p": two-sided p or None, "mean_diff"}.

    Paired t-test on the differences d: t = mean(d) / (sd(d) / sqrt(n)), n - 1 degrees of freedom.
    Fewer than :data:`MIN_PAIRS` pairs: no test (p None), a tie. All differences zero: p = 1;
    all equal and non-zero: p = 0.
    """
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a, b: expected paired 1-D runs, got shapes {a.shape} and {b.shape}")
    d = a - b
    n = d.size
    mean = float(d.mean()) if n else 0.0
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    if n < MIN_PAIRS:
        p = None
    elif sd <= 1e-9 * max(1.0, abs(mean)):  # the runs are rounded to 1e-4: equal differences, up to rounding
        p = 1.0 if abs(mean) <= 1e-9 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(mean) / (sd / np.sqrt(n)), n - 1))
    outcome = "tie" if p is None or p >= alpha else ("win" if mean > 0 else "loss")
    return {"outcome": outcome, "p": None if p is None else round(p, 4), "mean_diff": round(mean, 4)}


def tally(table: dict, measure: str) -> dict:
    """(arch, genlabel method, baseline) -> {"win": n, "tie": n, "loss": n} over the datasets of ``table``.

    ``table``: the summary, "dataset/arch" -> method -> cell, the GenLabel cells holding "vs".
    """
    counts: dict = {}
    for key, cells in table.items():
        arch = key.rsplit("/", 1)[1]
        for g, base in COMPARISONS:
            vs = cells.get(g, {}).get("vs", {}).get(base, {}).get(measure)
            if vs is not None:
                counts.setdefault((arch, g, base), dict.fromkeys(OUTCOMES, 0))[vs["outcome"]] += 1
    return counts
