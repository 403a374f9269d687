"""fastgenlabel: GenLabel mixup relabeling (Sohn et al., ICML 2022), fast.

The reference lives in :mod:`fastgenlabel.functional`, the class models in
:mod:`fastgenlabel.models`. Importing the package compiles nothing and touches no GPU.
"""
from .functional import (
    MixPairs,
    genlabel_posterior,
    genlabel_target,
    mix,
    mixup_target,
    one_hot,
    sample_pairs,
    smooth_labels,
    soft_target_cross_entropy,
)
from .kernels.pixel import mix_images
from .kernels.relabel import relabel
from .loader import GenLabelLoader, LoaderConfig
from .models import GaussianClassModel, KDEClassModel, ModelFileError, load_model

__version__ = "0.1.0"

__all__ = [
    "GaussianClassModel", "GenLabelLoader", "KDEClassModel", "LoaderConfig", "MixPairs", "ModelFileError",
    "genlabel_posterior", "genlabel_target",
    "load_model", "mix", "mix_images", "mixup_target", "one_hot", "relabel", "sample_pairs", "smooth_labels",
    "soft_target_cross_entropy",
]
