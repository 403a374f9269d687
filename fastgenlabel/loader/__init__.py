"""GenLabelLoader and its config: a DataLoader stand-in that yields mixed images and GenLabel targets.

Backends: "dali" (:mod:`.dali_backend`, decode/crop/flip/mix in a DALI graph) and "torch"
(:mod:`.torch_backend`, any Dataset or DataLoader, mix and relabel after collation). Importing
this package imports neither DALI nor compiles anything.
"""
from .batch import LoaderBatch
from .config import IMAGENET_MEAN, IMAGENET_STD, LoaderConfig
from .files import CorruptImageError, ImageFiles, scan
from .loader import GenLabelLoader
from .targets import deep_targets

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "CorruptImageError", "GenLabelLoader", "ImageFiles", "LoaderBatch",
           "LoaderConfig", "deep_targets", "scan"]
