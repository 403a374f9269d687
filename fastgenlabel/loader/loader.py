"""GenLabelLoader: a stand-in for ``torch.utils.data.DataLoader`` that yields mixed images and GenLabel targets."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..features import NoFeatures, StoredEmbeddings, ThumbnailPCA, check_model_matches
from ..functional._arrays import to_device
from ..functional.switch import MixDraw
from ..models import load_model
from .batch import LoaderBatch
from .config import LoaderConfig
from .files import scan
from .sampling import num_batches
from .state import check_state, data_digest, make_state
from .targets import TargetMaker, cpu_threads


class GenLabelLoader:
    """Iterate mixed, normalised image batches with their GenLabel (or mixup) targets.

    ``for images, targets in loader`` gives (B, C, H, W) images and (B, K) float32 targets on the
    loader's device; each item is a :class:`LoaderBatch`, which also carries the labels, the pairs,
    the sample indices and the features the targets were computed from. The targets of every batch
    equal ``fastgenlabel.genlabel_target(model, mix(features, pairs), labels, labels[perm], lam,
    gamma, ...)`` (or ``mixup_target`` without a model), computed by ``fastgenlabel.relabel``.
    :attr:`num_classes` is K and :attr:`classes` the K class names in label order.

    Epochs: each complete pass is one epoch and advances :attr:`epoch` by one once its last batch
    is handed out (so ``zip(range(len(loader)), loader)`` moves on too); ``set_epoch(e)``, before
    or during a pass, chooses the next pass's epoch (as with ``DistributedSampler``). The order of
    samples and the pairs are pure functions of (seed, epoch, shard, batch). Leaving a pass early
    is fine: the next pass starts :attr:`epoch` again from its beginning (the DALI pipeline is
    rebuilt; its kernels are compiled once per process, so that takes well under a second).

    Resume: :meth:`state_dict` (a few hundred bytes) and :meth:`load_state_dict` make a new
    loader hand out exactly the batches the saved one would have handed out next, without
    reading the batches before them.

    Start-up: the DALI backend's first pipeline in a process compiles its Numba stage (the CPU mix,
    or the thumbnails that ``fit`` reads): 10-12 s on this project's two-core machine. DALI
    compiles the stage's wrapper itself, with no disk cache, so every new process pays it; rates
    measured from the first batch include it (``fastgenlabel demo`` leaves that batch out).

    Args:
        config: a :class:`LoaderConfig` (``**overrides`` replace its fields).
        dataset: for ``backend="torch"`` only: a ``torch.utils.data.Dataset`` whose items are
            ``(image, label)`` or ``(image, label, index)``, with (H, W, C) uint8 images of one
            size; or a ``DataLoader`` yielding such batches. None reads ``config.data``. Its
            ``num_classes`` and ``classes`` attributes, when present, give the data's K and class
            names, which a model must match.

    Raises:
        ValueError: a config that cannot work (the message names the field): a model fitted on
            other classes (another K than a class folder's or a Dataset's, fewer classes than a file
            list's or shards' labels need, or other class names), features of another d, a model
            fitted with another feature map (the map's checksum it records), embeddings that do not
            match the dataset, a batch larger than the shard, an empty dataset.
    """

    def __init__(self, config: LoaderConfig | None = None, dataset=None, **overrides):
        config = config if config is not None else LoaderConfig()
        if overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.device = _resolve_device(config)
        self.files = None
        if dataset is None:
            if config.data is None:
                raise ValueError("data: give a folder of class sub-folders, a file list or WebDataset .tar shards "
                                 "(or a dataset for backend='torch')")
            self.files = scan(config.data, image_ext=config.image_ext, label_ext=config.label_ext)
        elif config.backend == "dali":
            raise ValueError("dataset: the DALI backend reads config.data; pass a dataset with backend='torch'")
        self.model = _resolve_model(config.model)
        self.num_classes = self._resolve_num_classes(dataset)
        self.features = self._resolve_features(dataset)
        self.targets = TargetMaker(self.model, self.features, num_classes=self.num_classes, gamma=config.gamma,
                                   smoothing=config.smoothing, backend=config.relabel_backend, mixing=config.mixing)
        self.thumbnail = (self.features.thumbnail if isinstance(self.features, ThumbnailPCA)
                          else (config.thumbnail if config.return_thumbnails else 0))
        if config.return_thumbnails and not self.thumbnail:
            raise ValueError("return_thumbnails: set thumbnail (the side t) or give a ThumbnailPCA feature_map")
        self.epoch = 0
        self._epoch_chosen = False
        self._resume_batch, self._resume_next = 0, None  # where load_state_dict put the next pass
        self._pass = None  # [epoch, batches handed out, complete] of the last pass started
        self._digest = None
        self._backend = self._make_backend(dataset)

    # ---- resolution of the configuration -----------------------------------------------------------

    def _dataset_size(self, dataset) -> int | None:
        if self.files is not None:
            return len(self.files)
        try:
            return len(dataset.dataset if isinstance(dataset, torch.utils.data.DataLoader) else dataset)
        except TypeError:
            return None

    def _data_classes(self, dataset) -> tuple[int | None, tuple | None, bool]:
        """(K, class names or None, whether K is exact) of the data.

        A folder's K and names are its class sub-folders'; a file list's or WebDataset shards' K
        is their largest label + 1, a lower bound (a subset may lack the last classes); a
        Dataset's are its ``num_classes`` and ``classes`` attributes (torchvision's
        ``ImageFolder`` has ``classes``), when it has them.
        """
        if self.files is not None:
            names = class_names(self.config.data, self.files)
            return self.files.num_classes, names, names is not None
        inner = dataset.dataset if isinstance(dataset, torch.utils.data.DataLoader) else dataset
        names = getattr(inner, "classes", None)
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            names = None
        k = getattr(inner, "num_classes", None)
        if not isinstance(k, int) or isinstance(k, bool):
            k = len(names) if names is not None else None
        if names is not None and len(names) != k:
            names = None
        return k, (tuple(names) if names is not None else None), k is not None

    def _resolve_num_classes(self, dataset) -> int:
        c = self.config
        data_k, self._data_names, self._data_k_exact = self._data_classes(dataset)
        self._data_k = data_k
        k = c.num_classes or (self.model.num_classes if self.model is not None else None) or data_k
        if k is None:
            raise ValueError("num_classes: cannot tell K from the dataset; set config.num_classes")
        if self.model is not None and self.model.num_classes != k:
            raise ValueError(f"model: fitted for {self.model.num_classes} classes, but the loader has {k} "
                             f"(num_classes={c.num_classes}, dataset classes={data_k}); refit it on this dataset")
        if self.model is not None:
            self._check_model_matches_data(self.model, c.model)
        if data_k is not None and data_k > k:
            raise ValueError(f"num_classes: {k}, but the dataset has {data_k} classes")
        return int(k)

    def _check_model_matches_data(self, model, source) -> None:
        """Refuse a model fitted on other classes than the data's: another K (where the data's K
        is exact; else fewer classes than its labels need), or other class names where both the
        model and the data have names."""
        data_k, data_names, exact = self._data_k, self._data_names, self._data_k_exact
        mk, names = model.num_classes, model.classes
        count_bad = data_k is not None and (mk != data_k if exact else mk < data_k)
        names_bad = names is not None and data_names is not None and tuple(names) != data_names
        if not (count_bad or names_bad):
            return
        which = f"model {str(source)!r}" if isinstance(source, (str, Path)) else "model"
        has = f"{data_k}" if exact else f"labels up to {data_k - 1}, so at least {data_k}"
        msg = f"{which}: fitted on {mk} classes, but the data has {has}"
        if names_bad:
            i = next((i for i, (a, b) in enumerate(zip(names, data_names)) if a != b), min(len(names), len(data_names)))
            ours = repr(names[i]) if i < len(names) else "none"
            theirs = repr(data_names[i]) if i < len(data_names) else "none"
            msg += f"; class names first differ at label {i}: {ours} (model) vs {theirs} (data)"
        raise ValueError(msg + "; refit the model on this data (fastgenlabel fit)")

    def _resolve_features(self, dataset):
        c = self.config
        kind = c.features
        if kind == "auto":
            kind = "thumbnail" if c.feature_map is not None else ("stored" if c.embeddings is not None else "none")
        if kind == "thumbnail":
            fmap = c.feature_map
            if fmap is None:
                raise ValueError("feature_map: features='thumbnail' needs a fitted ThumbnailPCA (or its .npz path)")
            if isinstance(fmap, (str, Path)):
                fmap = ThumbnailPCA.load(fmap)
            if not isinstance(fmap, ThumbnailPCA) or not fmap.fitted:
                raise ValueError(f"feature_map: expected a fitted ThumbnailPCA, got {fmap!r}")
            if fmap.in_features != 3 * fmap.thumbnail ** 2:
                raise ValueError(f"feature_map: fitted on {fmap.in_features} values per thumbnail, but the loader's "
                                 f"RGB thumbnails of side {fmap.thumbnail} have {3 * fmap.thumbnail ** 2}")
            features = fmap
        elif kind == "stored":
            if c.embeddings is None:
                raise ValueError("embeddings: features='stored' needs the path of an (N, d) .npy file")
            features = c.embeddings if isinstance(c.embeddings, StoredEmbeddings) else StoredEmbeddings(c.embeddings)
            n = self._dataset_size(dataset)
            if n is not None:
                features.check_matches(n)
        else:
            features = NoFeatures()
        if self.model is not None:
            if isinstance(features, NoFeatures):
                raise ValueError("model: a class model needs features (feature_map or embeddings); without "
                                 "them the loader can only emit mixup targets (set model=None)")
            if features.dim != self.model.dim:
                raise ValueError(f"model: fitted on {self.model.dim}-dimensional features, but the "
                                 f"{features.kind} features have d = {features.dim}")
            check_model_matches(self.model, features, _named("model", c.model), _named("feature_map", c.feature_map))
        return features

    def _make_backend(self, dataset):
        c = self.config
        if c.backend == "dali":
            self._check_batch_fits(len(self.files))
            if c.extra.get("baseline") and (c.mixing or self.thumbnail):
                raise ValueError("extra: baseline (the benchmark's unmixed pipeline) needs alpha=0 and no thumbnails "
                                 "or feature_map")
            from .dali_backend import DaliBackend

            return DaliBackend(c, self.files, device=self.device, thumbnail=self.thumbnail)
        from .torch_backend import TorchBackend

        backend = TorchBackend(c, self.files, dataset, device=self.device, thumbnail=self.thumbnail)
        if backend.sampled_size is not None:
            self._check_batch_fits(backend.sampled_size)
        return backend

    def _check_batch_fits(self, n: int) -> None:
        c = self.config
        shard = -(-n // c.num_shards)
        if n == 0:
            raise ValueError("data: the dataset is empty")
        if c.batch_size > shard:
            where = f"shard {c.shard_id} of {c.num_shards} has" if c.num_shards > 1 else "the dataset has"
            raise ValueError(f"batch_size: {c.batch_size} is larger than the {shard} samples {where}; "
                             f"use batch_size <= {shard}")

    # ---- the DataLoader protocol ---------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches per pass on this shard."""
        n = self._backend.sampled_size
        if n is None:
            return len(self._backend.loader)
        return num_batches(-(-n // self.config.num_shards), self.config.batch_size, self.config.last_batch)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch`` (its order and pairs). After :meth:`load_state_dict`,
        the restored epoch keeps its restored position (a training loop that calls
        ``set_epoch(epoch)`` before every pass resumes as it should); another epoch starts at 0."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch: expected an integer >= 0, got {epoch!r}")
        if epoch != self.epoch:
            self._resume_batch, self._resume_next = 0, None
        self.epoch = epoch
        self._epoch_chosen = True

    @property
    def sampler(self) -> EpochSampler:
        """``loader.sampler.set_epoch(e)`` is :meth:`set_epoch`: the ``DistributedSampler`` idiom that
        training scripts (and Lightning, every epoch) call on a loader's sampler."""
        return EpochSampler(self)

    # ---- exact resume ----------------------------------------------------------------------------------

    def _resume_key(self) -> tuple[int, str | None]:
        """(N, data digest) that a state must match; a DataLoader given as the dataset cannot resume."""
        n = self._backend.sampled_size
        if n is None:
            raise ValueError("dataset: a DataLoader given as the dataset has no position to save or restore "
                             "without replaying it; pass its Dataset (the loader then samples it and resumes "
                             "exactly)")
        if self._digest is None and self.files is not None:
            self._digest = data_digest(self.files)
        return n, self._digest

    def state_dict(self) -> dict:
        """Where the next batch sits: epoch, batch, and what decides the batches (a few hundred bytes).

        Taken during a pass, it describes that pass's next batch; after a pass's last batch was
        handed out, the next epoch's first (so no epoch is lost). A pass left early still counts
        as in progress until :meth:`reset` (then the state is the next pass from its start).
        """
        n, digest = self._resume_key()
        rec = self._pass
        if rec is not None and not rec[2]:
            epoch, batch, after = rec[0], rec[1], (self.epoch if self._epoch_chosen else None)
        else:
            epoch, batch, after = self.epoch, self._resume_batch, self._resume_next
        return make_state(self.config, epoch=epoch, batch=batch, next_epoch=after, samples=n, digest=digest)

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (:meth:`state_dict` of a loader with the same configuration and
        data; another rank's state works too: the ranks move in step). The next pass starts at the
        saved batch without reading the ones before it; a pass in progress is dropped.

        Raises:
            ValueError: a state from another configuration, data or world size (naming what
                differs), of another format version, or not a state at all.
        """
        n, digest = self._resume_key()
        epoch, batch, after = check_state(state, self.config, samples=n, digest=digest, batches=len(self))
        self.reset()
        self.epoch, self._resume_batch, self._resume_next = epoch, batch, after
        self._epoch_chosen = False

    def set_model(self, model) -> None:
        """Relabel with ``model`` from the next yielded batch on (e.g. after a refit).

        Targets are computed when a batch is yielded, from that batch's features, so a batch that
        was decoded before the call (prefetched) still gets the new model's targets, and no batch
        mixes old and new parameters. Under ``torch.distributed``, broadcast the refit first
        (:func:`fastgenlabel.distributed.broadcast_model`) and call this on every rank at the same
        step.

        Args:
            model: a fitted class model (or its file path) with the loader's K and feature d (and
                the data's class names, where both have names), or None for plain mixup targets.
        """
        source = model
        model = _resolve_model(model)
        if model is not None:
            self._check_model_matches_data(model, source)
            if model.num_classes != self.num_classes:
                raise ValueError(f"model: fitted for {model.num_classes} classes, but the loader has "
                                 f"{self.num_classes}")
            if isinstance(self.features, NoFeatures):
                raise ValueError("model: this loader has no features (feature_map or embeddings) to relabel from")
            if model.dim != self.features.dim:
                raise ValueError(f"model: fitted on {model.dim}-dimensional features, but the "
                                 f"{self.features.kind} features have d = {self.features.dim}")
            check_model_matches(model, self.features, _named("model", source),
                                _named("feature_map", self.config.feature_map))
        self.model = self.targets.model = model

    @property
    def classes(self) -> tuple[str, ...]:
        """The K class names in label order: the data's (class folder names, a Dataset's
        ``classes``), else the model's, else the labels' decimal strings."""
        names = self._data_names or (self.model.classes if self.model is not None else None) or ()
        return tuple(names) + tuple(str(i) for i in range(len(names), self.num_classes))

    def reset(self) -> None:
        """Drop any half-finished pass; the next pass starts at the beginning of :attr:`epoch`."""
        self._backend.close()
        self._pass = None
        self._resume_batch, self._resume_next = 0, None

    def __iter__(self):
        backend = self._backend
        epoch, start = self.epoch, self._resume_batch
        self._epoch_chosen = False
        if self._resume_next is not None:  # set_epoch had chosen the next pass's epoch before the save
            self.epoch, self._epoch_chosen = self._resume_next, True
        self._resume_batch, self._resume_next = 0, None
        backend.start_epoch(epoch, start)
        try:
            expected = len(self)
        except TypeError:  # a user DataLoader without a length
            expected = None
        handed_out = start
        record = self._pass = [epoch, start, False]
        while True:
            try:
                images, thumbs, indices, labels, pairs = backend.next_raw()
            except StopIteration:
                break
            batch = self._finish(images, thumbs, indices, labels, pairs)
            handed_out += 1
            record[1] = handed_out
            if handed_out == expected:  # the pass is complete once its last batch is handed out
                record[2] = True
                self._end_pass(epoch)
            yield batch
        if handed_out != expected:
            record[2] = True
            self._end_pass(epoch)
        backend.finished_epoch(self.epoch)

    def _end_pass(self, epoch: int) -> None:
        if not self._epoch_chosen:  # set_epoch during the pass chose the next one
            self.epoch = epoch + 1

    def _finish(self, images, thumbs, indices, labels, pairs) -> LoaderBatch:
        labels = to_device(labels, self.device)
        if indices is None and self.targets.needs_indices:
            raise ValueError("dataset: stored embeddings are looked up by sample index; the dataset's items "
                             "must be (image, label, index)")
        draw = z_mixed = None
        if isinstance(pairs, MixDraw):  # timm's draws (CutMix / switched): boxes, cut mask and kinds
            draw, pairs = pairs, pairs.pairs
        thumbs_cut = None
        if isinstance(thumbs, tuple):  # (the samples' own thumbnails, the cut-and-pasted images')
            thumbs, thumbs_cut = thumbs
        with cpu_threads(self.config.target_threads if labels.device.type == "cpu" else None):
            z = self.targets.features_of(thumbs, indices)
            if draw is None:
                targets = self.targets(z, pairs, labels)
            else:
                z_cut = None if thumbs_cut is None else self.targets.features_of(thumbs_cut, indices)
                targets, z_mixed = self.targets.switched(z, z_cut, draw, labels)
        if self.config.channels_last:  # written as (B, H, W, C): the same memory as NCHW channels-last
            images = images.permute(0, 3, 1, 2)
        return LoaderBatch(images=images, targets=targets, labels=labels, pairs=pairs, indices=indices,
                           features=z, thumbnails=thumbs, draw=draw, mixed_features=z_mixed)

    def __repr__(self) -> str:
        c = self.config
        return (f"GenLabelLoader(backend={c.backend!r}, device={str(self.device)!r}, batch_size={c.batch_size}, "
                f"num_classes={self.num_classes}, features={self.features!r}, model={self.model!r})")


class EpochSampler:
    """The ``sampler`` of a :class:`GenLabelLoader`: only ``set_epoch``, forwarded to the loader."""

    def __init__(self, loader: GenLabelLoader):
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)


def _resolve_device(config) -> torch.device:
    if config.device == "cpu":
        return torch.device("cpu")
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device: 'cuda' asked for, but torch sees no GPU; use device='cpu' or 'auto'")
        return torch.device("cuda", config.device_id)
    return torch.device("cpu")


def class_names(data, files) -> tuple | None:
    """The class names of a folder of class sub-folders (their names), or None for a file list or
    WebDataset shards, whose classes are bare label indices."""
    if files.members is not None or not isinstance(data, (str, Path)) or not Path(data).is_dir():
        return None
    return files.classes


def _named(field: str, value) -> str:
    """How an error names a config field: its file when one was given."""
    return f"{field} {str(value)!r}" if isinstance(value, (str, Path)) else field


def _resolve_model(model):
    if model is None:
        return None
    if isinstance(model, (str, Path)):
        return load_model(model)
    if not hasattr(model, "log_joint") or not hasattr(model, "num_classes"):
        raise ValueError(f"model: expected a fitted class model or its file, got {type(model).__name__}")
    return model
