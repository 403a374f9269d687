"""fastgenlabel: GenLabel mixup relabeling (Sohn et al., ICML 2022), fast.

The reference lives in :mod:`fastgenlabel.functional`, the class models in
:mod:`fastgenlabel.models`. Importing the package compiles nothing and touches no GPU; its names
(and subpackages) are imported on first use, so that the command line's ``--help`` and argument
errors need no torch import.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the subpackage that defines it
_EXPORTS = {
    **dict.fromkeys(["CutBoxes", "MixPairs", "genlabel_posterior", "genlabel_target", "mix", "mixup_target", "one_hot",
                     "sample_boxes", "sample_mix", "sample_pairs", "smooth_labels", "soft_target_cross_entropy"],
                  "functional"),
    "Mixup": "mixer",
    "mix_images": "kernels.pixel",
    "relabel": "kernels.relabel",
    "GenLabelLoader": "loader",
    "LoaderConfig": "loader",
    **dict.fromkeys(["GaussianClassModel", "KDEClassModel", "ModelFileError", "load_model"], "models"),
}
_SUBPACKAGES = ("dali", "demo", "distributed", "experiments", "features", "fit", "functional", "kernels", "loader",
                "mixer", "models")

__all__ = [
    "CutBoxes", "GaussianClassModel", "GenLabelLoader", "KDEClassModel", "LoaderConfig", "MixPairs", "Mixup",
    "ModelFileError",
    "genlabel_posterior", "genlabel_target",
    "load_model", "mix", "mix_images", "mixup_target", "one_hot", "relabel", "sample_boxes", "sample_mix", "sample_pairs",
    "smooth_labels", "soft_target_cross_entropy",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBPACKAGES))


if TYPE_CHECKING:  # what the names are, for type checkers and IDEs
    from .functional import (
        CutBoxes,
        MixPairs,
        genlabel_posterior,
        genlabel_target,
        mix,
        mixup_target,
        one_hot,
        sample_boxes,
        sample_mix,
        sample_pairs,
        smooth_labels,
        soft_target_cross_entropy,
    )
    from .kernels.pixel import mix_images
    from .kernels.relabel import relabel
    from .loader import GenLabelLoader, LoaderConfig
    from .mixer import Mixup
    from .models import GaussianClassModel, KDEClassModel, ModelFileError, load_model
