"""Soft-target cross-entropy: the loss a GenLabel training step uses."""
from __future__ import annotations

import torch


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``-sum_c target_c * log_softmax(logits)_c`` per sample.

    Cross-entropy is linear in its target, so with ``t = gamma * y_gen + (1 - gamma) * y_mix``
    this equals ``gamma * CE(f, y_gen) + (1 - gamma) * CE(f, y_mix)``: a loader can emit ``t``.

    Args:
        logits: (N, K) unnormalised scores.
        target: (N, K) non-negative rows summing to 1.
        reduction: "mean", "sum" or "none".
    """
    if logits.shape != target.shape or logits.ndim != 2:
        raise ValueError(f"target: expected the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    t = target.to(logits.dtype)
    logp = torch.log_softmax(logits, dim=-1)
    # a class with no target mass contributes nothing, even where its logit is -inf (0 * -inf is NaN)
    per_sample = -torch.where(t > 0, t * logp, torch.zeros_like(logp)).sum(dim=-1)
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()
