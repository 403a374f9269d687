"""What every class-conditional model offers: fit, log-likelihoods, priors, safe files."""
from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import numpy as np
import torch

from ..functional._arrays import Array, as_tensor, check_float_features, check_labels, check_num_classes, like
from . import io

PRIORS = ("uniform", "empirical")
LOG_2PI = math.log(2 * math.pi)

# Work in chunks of at most this many float64 elements when a (N, K, ...) product is formed.
CHUNK_ELEMENTS = 1 << 22


class FitWarning(RuntimeWarning):
    """A concern about the data a model is fitted on (empty classes, too few samples for the
    covariance), warned when it is fitted and when it is loaded; ``warnings.simplefilter("ignore",
    FitWarning)`` silences them."""


class NotFittedError(RuntimeError):
    """A model was used before ``fit``."""


class ClassModel:
    """Base of the per-class generative models.

    Subclasses keep *sufficient statistics* (``self.stats``) that merge across batches and
    processes, and derive their parameters from them in ``_finalize``. Everything is computed
    in float64 on the statistics' device.

    A fitted model may carry the names of its K classes (:attr:`classes`: ``fastgenlabel fit``
    stores a folder's class sub-folder names); they are saved with it, and the loader refuses a
    model whose names differ from its data's.

    ``feature_map_digest``: the checksum (:attr:`fastgenlabel.features.ThumbnailPCA.digest`) of the
    feature map whose features the model was fitted on, or None when not known. ``fastgenlabel
    fit`` sets it, :meth:`save` stores it, and the loader refuses a model beside another map.
    A new fit clears it (the model may describe other features from then on).
    """

    kind: ClassVar[str]

    def __init__(self, prior: str = "uniform"):
        if prior not in PRIORS:
            raise ValueError(f"prior: expected one of {PRIORS}, got {prior!r}")
        self.prior = prior
        self.stats = None
        self._classes = None
        self.feature_map_digest: str | None = None

    # ---- configuration -------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-serialisable."""
        return {"prior": self.prior}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        fitted = f", num_classes={self.num_classes}, dim={self.dim}" if self.stats is not None else ""
        return f"{type(self).__name__}({args}{fitted})"

    # ---- fitting -------------------------------------------------------------------------
    def fit(self, z: Array, y: Array, num_classes: int) -> ClassModel:
        """Fit one density per class.

        Args:
            z: (N, d) finite float features.
            y: (N,) integer labels in [0, num_classes).
            num_classes: K.

        Returns:
            self, fitted.
        """
        return self.fit_stats(self.compute_stats(z, y, num_classes))

    def check_memory(self, num_classes: int, dim: int, device=None) -> None:
        """Raise ValueError when a fit for ``num_classes`` classes of ``dim`` features cannot fit in
        ``device``'s memory (checked before a pass over the data; a no-op where nothing is known)."""

    def compute_stats(self, z: Array, y: Array, num_classes: int):
        """Sufficient statistics of one batch; merge them with ``stats.merge(other)``."""
        k = check_num_classes(num_classes)
        zt = as_tensor(z, "z")
        check_float_features(zt, "z")
        yt = check_labels(as_tensor(y, "y", device=zt.device), "y", k, n=zt.shape[0])
        if zt.shape[1] < 1:
            raise ValueError("z: expected at least one feature per row, got shape (N, 0)")
        return self._stats_type().from_batch(zt.to(torch.float64), yt, k, **self._stats_options())

    def fit_stats(self, stats) -> ClassModel:
        """Fit from (merged) sufficient statistics."""
        if not isinstance(stats, self._stats_type()):
            raise TypeError(f"stats: expected {self._stats_type().__name__}, got {type(stats).__name__}")
        counts = stats.count
        if float(counts.sum()) <= 0:
            raise ValueError("z, y: no training samples; every class is empty")
        empty = torch.nonzero(counts <= 0).flatten().tolist()
        if empty:
            warnings.warn(
                f"{type(self).__name__}: class(es) {empty[:10]}{'...' if len(empty) > 10 else ''} have no "
                "training samples; they get log-likelihood -inf and never receive GenLabel mass",
                FitWarning,
                stacklevel=3,
            )
        params = self._finalize(stats)  # may raise: the model keeps its previous state
        names = self.classes
        self.stats = stats
        self.__dict__.update(params)
        if names is not None and len(names) != self.num_classes:  # the names belonged to another K
            self._classes = None
        self.feature_map_digest = None
        return self

    def _stats_type(self):
        raise NotImplementedError

    def _stats_options(self) -> dict[str, Any]:
        return {}

    def _finalize(self, stats) -> dict[str, Any]:
        """The parameters derived from ``stats``, as attributes to set; raises on bad statistics."""
        raise NotImplementedError

    # ---- evaluation ----------------------------------------------------------------------
    def _require_fitted(self) -> None:
        if self.stats is None:
            raise NotFittedError(f"{type(self).__name__} is not fitted; call fit(z, y, num_classes) first")

    @property
    def num_classes(self) -> int:
        self._require_fitted()
        return int(self.stats.count.shape[0])

    @property
    def dim(self) -> int:
        self._require_fitted()
        return int(self.stats.dim)

    @property
    def device(self) -> torch.device:
        self._require_fitted()
        return self.stats.count.device

    @property
    def classes(self) -> tuple[str, ...] | None:
        """The K class names, in label order, or None (a model fitted on arrays without names).

        Set it after fitting (``model.classes = names``); a refit with another K drops it.
        """
        return getattr(self, "_classes", None)

    @classes.setter
    def classes(self, names) -> None:
        if names is None:
            self._classes = None
            return
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"classes: expected a sequence of class-name strings, got {names!r}")
        names = tuple(names)
        if len(names) != self.num_classes:
            raise ValueError(f"classes: {len(names)} names for a model of {self.num_classes} classes")
        self._classes = names

    @property
    def class_counts(self) -> torch.Tensor:
        """(K,) number of training samples seen per class."""
        self._require_fitted()
        return self.stats.count

    @property
    def log_prior(self) -> torch.Tensor:
        """(K,) float64 log class priors (uniform or empirical); -inf for empty classes."""
        self._require_fitted()
        n = self.stats.count
        if self.prior == "uniform":
            lp = torch.full_like(n, -math.log(n.shape[0]))
        else:
            lp = torch.log(n / n.sum())
        return torch.where(n > 0, lp, torch.full_like(lp, -math.inf))

    def log_likelihood(self, z: Array) -> Array:
        """Per-class log-densities, normalising constants included.

        Args:
            z: (N, d) finite float features.

        Returns:
            (N, K) log p_c(z) in float64 (same array type as ``z``); -inf for empty classes.
        """
        self._require_fitted()
        zt = as_tensor(z, "z")
        check_float_features(zt, "z", dim=self.dim)
        zt = zt.to(device=self.device, dtype=torch.float64)
        ll = self._log_likelihood(zt)
        ll = torch.where(self.stats.count > 0, ll, torch.full_like(ll, -math.inf))
        return like(ll, z)

    def log_joint(self, z: Array) -> Array:
        """(N, K) log p_c(z) + log pi_c; its softmax over classes is the GenLabel label."""
        zt = as_tensor(z, "z")
        out = as_tensor(self.log_likelihood(zt), "ll") + self.log_prior
        return like(out, z)

    def _log_likelihood(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---- state and files -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Kind, options, class names (when known) and sufficient statistics (NumPy arrays); enough
        to rebuild the model."""
        self._require_fitted()
        state = {"kind": self.kind, **self.config()}
        if self.classes is not None:
            state["classes"] = list(self.classes)
        state.update({f"stats.{k}": v for k, v in self.stats.to_numpy().items()})
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device=None) -> ClassModel:
        state = dict(state)
        kind = state.pop("kind", None)
        if kind != cls.kind:
            raise ValueError(f"state: holds a {kind!r} model, not a {cls.kind!r} model")
        arrays = {k[len("stats."):]: state.pop(k) for k in list(state) if k.startswith("stats.")}
        names = state.pop("classes", None)  # absent from files written before models carried names
        try:
            model = cls(**state)
        except TypeError as e:
            raise ValueError(f"state: unexpected options for {cls.__name__}: {e}") from e
        stats = model._stats_type().from_numpy(arrays, device=device, **model._stats_options())
        model.fit_stats(stats)  # a loaded model repeats its FitWarnings: whoever loads it holds them too
        model.classes = names
        return model

    def save(self, path) -> None:
        """Write the model to ``path`` (a ``.npz`` file that loads without pickle), with its
        ``feature_map_digest`` when set."""
        state = self.state_dict()
        arrays = {k: np.asarray(v) for k, v in state.items() if k.startswith("stats.")}
        meta = {k: v for k, v in state.items() if not k.startswith("stats.")}
        if self.feature_map_digest is not None:
            meta[FEATURE_MAP_DIGEST] = self.feature_map_digest
        io.save_state(path, meta, arrays)

    @classmethod
    def load(cls, path, device=None) -> ClassModel:
        """Read a model written by :meth:`save`; raises ``ModelFileError`` on a bad file."""
        model = load_model(path, device=device)
        if not isinstance(model, cls):
            raise io.ModelFileError(f"model file {path!r} holds a {type(model).__name__}, not a {cls.__name__}")
        return model


_REGISTRY: dict[str, type[ClassModel]] = {}
FEATURE_MAP_DIGEST = "feature_map_digest"  # the header field; absent in files of models without one


def register(cls: type[ClassModel]) -> type[ClassModel]:
    _REGISTRY[cls.kind] = cls
    return cls


def load_model(path, device=None) -> ClassModel:
    """Load any fastgenlabel class model file."""
    meta, arrays = io.load_state(path)
    kind = meta.get("kind")
    if not isinstance(kind, str) or kind not in _REGISTRY:
        raise io.ModelFileError(f"model file {path!r}: unknown model kind {kind!r}")
    state = dict(meta)
    fmap_digest = state.pop(FEATURE_MAP_DIGEST, None)
    if fmap_digest is not None and not isinstance(fmap_digest, str):
        raise io.ModelFileError(f"model file {path!r}: its feature_map_digest is not a string")
    state.update({k: v for k, v in arrays.items()})
    try:
        model = _REGISTRY[kind].from_state_dict(state, device=device)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise io.ModelFileError(f"model file {path!r} holds an inconsistent model: {e}") from e
    model.feature_map_digest = fmap_digest
    return model
