"""The reference: plain NumPy/torch implementations every fast path is tested against."""
from .genlabel import genlabel_posterior, genlabel_target
from .loss import soft_target_cross_entropy
from .mixing import mix, mixup_target, one_hot, smooth_labels
from .pairs import BOX_MODES, LAM_MODES, PAIRINGS, CutBoxes, MixPairs, PairFeed, sample_boxes, sample_pairs
from .switch import MIX_MODES, MixDraw, sample_mix

__all__ = [
    "BOX_MODES", "LAM_MODES", "MIX_MODES", "PAIRINGS", "CutBoxes", "MixDraw", "MixPairs", "PairFeed",
    "genlabel_posterior", "genlabel_target", "mix", "mixup_target", "one_hot", "sample_boxes", "sample_mix",
    "sample_pairs", "smooth_labels", "soft_target_cross_entropy",
]
