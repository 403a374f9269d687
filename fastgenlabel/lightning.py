"""``GenLabelDataModule``: a LightningDataModule over :class:`~fastgenlabel.GenLabelLoader`.

Needs ``lightning`` (the ``lightning`` extra: ``pip install "fastgenlabel[lightning]"``; it leaves
your torch as it is; only this module imports it). At ``setup`` the loader takes its shard and device from the trainer:
shard ``trainer.global_rank`` of ``trainer.world_size``, on ``trainer.strategy.root_device``, so
``len(train_dataloader())`` is the batches of this rank's shard. The loader is a stateful iterable
(``state_dict`` / ``load_state_dict``): Lightning's fit loop writes its state into every checkpoint
and restores it with ``fit(ckpt_path=...)``, so a run resumed mid-epoch trains on exactly the
batches the uninterrupted run would have; Lightning's per-epoch ``sampler.set_epoch`` keeps the
loader's epochs the trainer's.
"""
from __future__ import annotations

import dataclasses

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('fastgenlabel.lightning needs lightning: pip install "fastgenlabel[lightning]" '
                      "(it keeps the torch you have)") from e

from .loader import GenLabelLoader, LoaderConfig


class GenLabelDataModule(pl.LightningDataModule):
    """Training batches from a :class:`GenLabelLoader`, placed by the trainer.

    Args:
        config: the loader's :class:`LoaderConfig` (``**overrides`` replace its fields); its
            ``shard_id``, ``num_shards``, ``device`` and ``device_id`` are set from the trainer.
        dataset: for ``backend="torch"``: a Dataset (not a DataLoader: it could not resume).
    """

    def __init__(self, config: LoaderConfig | None = None, dataset=None, **overrides):
        super().__init__()
        config = config if config is not None else LoaderConfig()
        self.config = dataclasses.replace(config, **overrides) if overrides else config
        self.dataset = dataset
        self.loader: GenLabelLoader | None = None

    def placed_config(self) -> LoaderConfig:
        """The config with this process's shard and device: the trainer's, or as given without one."""
        trainer = self.trainer
        if trainer is None:
            return self.config
        device = trainer.strategy.root_device
        return dataclasses.replace(self.config, shard_id=trainer.global_rank, num_shards=trainer.world_size,
                                   device="cuda" if device.type == "cuda" else "cpu", device_id=device.index or 0)

    def setup(self, stage: str | None = None) -> None:
        if self.loader is None and stage in (None, "fit"):
            self.loader = GenLabelLoader(self.placed_config(), dataset=self.dataset)

    def train_dataloader(self) -> GenLabelLoader:
        if self.loader is None:
            self.setup("fit")
        return self.loader
