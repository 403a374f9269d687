"""DALI building blocks: pairs fed into the graph, the in-graph pixel mix, ready pipelines.

NVIDIA DALI is imported when a stage or pipeline is built, never at import (so the torch backend
can share :class:`PairFeed` on machines without DALI); ``_compat.require_dali`` says how to
install it. The DALI 2.4 defects and their workarounds are listed in :mod:`fastgenlabel.dali._compat`.
"""
from ._compat import dali_version, require_dali
from .pipelines import image_pipeline, webdataset_pipeline
from .stages import PairFeed, ascii_labels, mix_stage, mix_stage_gpu, pair_generator, partner_labels, split_pairs

__all__ = ["PairFeed", "ascii_labels", "dali_version", "image_pipeline", "mix_stage", "mix_stage_gpu",
           "pair_generator", "partner_labels", "require_dali", "split_pairs", "webdataset_pipeline"]
