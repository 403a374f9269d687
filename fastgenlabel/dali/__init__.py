"""DALI building blocks: pairs fed into the graph, the in-graph pixel mix, ready pipelines.

:class:`PairFeed`, :func:`pair_generator` and :func:`split_pairs` live in
:mod:`fastgenlabel.functional.pairs` (both loader backends use them) and are re-exported here.
NVIDIA DALI is imported when a stage or pipeline is built, never at import; ``_compat.require_dali`` says how
to install it. The DALI 2.4 defects and their workarounds are listed in :mod:`fastgenlabel.dali._compat`.
"""
# re-exported: PairFeed and its helpers moved to functional/pairs.py (they need no DALI)
from ..functional.pairs import PairFeed, pair_generator, split_pairs
from ._compat import dali_version, require_dali
from .pipelines import image_pipeline, webdataset_pipeline
from .stages import ascii_labels, mix_stage, mix_stage_gpu, partner_labels

__all__ = ["PairFeed", "ascii_labels", "dali_version", "image_pipeline", "mix_stage", "mix_stage_gpu",
           "pair_generator", "partner_labels", "require_dali", "split_pairs", "webdataset_pipeline"]
