"""Per-sample features ``z`` for relabeling (docs/MATH.md section 4): where the loader gets them.

Three sources, each a small object with ``kind``, ``dim`` and ``exact_under_mixing``:

- :class:`ThumbnailPCA` (``kind="linear"``): a linear map of the image, fitted by the library:
  the (t, t, C) adaptive-average thumbnail of the uint8 crop, centred and projected on its first
  d principal components. Thumbnail and projection are affine in the pixels, so the features of
  a mixed image are exactly the mixed features, ``z(x_mix) = lam z(x_i) + (1 - lam) z(x_p)``: the
  GenLabel label is exact. The thumbnail is computed in the DALI graph (the mix stage writes it);
  the projection, a (B, t*t*C) x (t*t*C, d) product, runs after it, so refitting never recompiles.
- :class:`StoredEmbeddings` (``kind="stored"``): precomputed per-sample embeddings (N, d) in a
  ``.npy`` file, memory-mapped and looked up by sample index. The mixed feature is *interpolated*,
  ``lam e_i + (1 - lam) e_p``, which approximates the embedding of the mixed image only as far as
  the embedding network is linear: an approximation, not GenLabel's exact label.
- :class:`NoFeatures` (``kind="none"``): no relabeling; targets are plain mixup targets.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

FEATURE_KINDS = ("linear", "stored", "none")


def thumbnails(images, size: int) -> np.ndarray:
    """(N, t * t * C) float32 thumbnails of (N, H, W, C) images, as the DALI mix stage writes them.

    Adaptive average pooling with ``torch.nn.functional.adaptive_avg_pool2d``'s bins, flattened
    in (t, t, C) order. A reference in torch (the graph runs the same map in Numba).

    Args:
        images: (N, H, W, C) uint8 or float array/tensor.
        size: t, the thumbnail side.
    """
    x = torch.as_tensor(np.ascontiguousarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.ndim != 4:
        raise ValueError(f"images: expected (N, H, W, C), got shape {tuple(x.shape)}")
    pooled = torch.nn.functional.adaptive_avg_pool2d(x.permute(0, 3, 1, 2).to(torch.float32), size)
    return pooled.permute(0, 2, 3, 1).reshape(x.shape[0], -1).contiguous().numpy()


def thumbnails_torch(images_hwc: torch.Tensor, size: int) -> torch.Tensor:
    """The same map on a torch batch (any device): (B, H, W, C) -> (B, t * t * C) float32."""
    pooled = torch.nn.functional.adaptive_avg_pool2d(images_hwc.permute(0, 3, 1, 2).to(torch.float32), size)
    return pooled.permute(0, 2, 3, 1).reshape(images_hwc.shape[0], -1)


class ThumbnailPCA:
    """PCA of small thumbnails: a fixed linear feature map, exact under mixing.

    Args:
        thumbnail: t, the thumbnail side (features come from t * t * C pooled pixels).
        dim: d, the number of principal components kept.

    Attributes (after :meth:`fit`): ``mean`` (F,) and ``components`` (d, F) float32, F = t*t*C.
    """

    kind = "linear"
    exact_under_mixing = True

    def __init__(self, thumbnail: int = 8, dim: int = 32):
        if isinstance(thumbnail, bool) or not isinstance(thumbnail, int) or thumbnail < 1:
            raise ValueError(f"thumbnail: expected a side length >= 1, got {thumbnail!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive integer, got {dim!r}")
        self.thumbnail, self.dim = thumbnail, dim
        self.mean: np.ndarray | None = None
        self.components: np.ndarray | None = None
        self._torch: dict = {}

    @property
    def fitted(self) -> bool:
        return self.components is not None

    @property
    def in_features(self) -> int:
        self._require_fitted()
        return int(self.components.shape[1])

    def fit(self, thumbs) -> ThumbnailPCA:
        """Fit the map on (N, F) thumbnails (from :func:`thumbnails` or a pass of the loader).

        Raises:
            ValueError: fewer samples than 2, non-finite values, or d > min(N, F).
        """
        x = np.asarray(thumbs, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"thumbs: expected (N, F) with N >= 2, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("thumbs: contain NaN or infinity")
        t2 = self.thumbnail * self.thumbnail
        if x.shape[1] % t2:
            raise ValueError(f"thumbs: {x.shape[1]} values per sample is not {self.thumbnail}x{self.thumbnail}xC "
                             f"(thumbnail={self.thumbnail}); fit on thumbnails of that side")
        if self.dim > min(x.shape):
            raise ValueError(f"dim: {self.dim} components, but the thumbnails allow at most {min(x.shape)} "
                             f"({x.shape[0]} samples of {x.shape[1]} values)")
        mean = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        comps = vt[: self.dim]
        comps *= np.where(comps[np.arange(self.dim), np.abs(comps).argmax(axis=1)] < 0, -1.0, 1.0)[:, None]
        self.mean, self.components = mean.astype(np.float32), np.ascontiguousarray(comps, dtype=np.float32)
        self._torch = {}
        return self

    def transform(self, thumbs):
        """(B, F) thumbnails -> (B, d) float32 features (NumPy in, NumPy out; torch in, torch out)."""
        self._require_fitted()
        if isinstance(thumbs, torch.Tensor):
            mean, comps = self._params_on(thumbs.device)
            if thumbs.shape[-1] != comps.shape[1]:
                raise ValueError(f"thumbs: expected {comps.shape[1]} values per sample "
                                 f"(thumbnail {self.thumbnail}), got {thumbs.shape[-1]}")
            return (thumbs.to(torch.float32) - mean) @ comps.T
        x = np.asarray(thumbs, np.float32)
        if x.shape[-1] != self.components.shape[1]:
            raise ValueError(f"thumbs: expected {self.components.shape[1]} values per sample, got {x.shape[-1]}")
        return (x - self.mean) @ self.components.T

    def _params_on(self, device):
        key = str(device)
        if key not in self._torch:
            self._torch[key] = (torch.from_numpy(self.mean).to(device), torch.from_numpy(self.components).to(device))
        return self._torch[key]

    def _require_fitted(self):
        if not self.fitted:
            raise RuntimeError("ThumbnailPCA: not fitted; call fit(thumbs) or load(path)")

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"kind": np.array("thumbnail-pca"), "thumbnail": np.array(self.thumbnail, dtype=np.int64),
                "mean": self.mean, "components": self.components}

    @property
    def digest(self) -> str:
        """SHA-256 of the map's content, the checksum its file stores: a class model fitted on this
        map's features records it (``ClassModel.feature_map_digest``) and the loader checks the pair."""
        from .models import io

        self._require_fitted()
        return io.header_of({}, self._arrays(), io.FEATURE_MAP_FORMAT)["digest"]

    def save(self, path) -> None:
        """Write the map to an .npz file (plain arrays, no pickle, with a checksum) at exactly ``path``,
        atomically."""
        from .models import io

        self._require_fitted()
        io.save_state(path, {}, self._arrays(), format=io.FEATURE_MAP_FORMAT)

    @classmethod
    def load(cls, path) -> ThumbnailPCA:
        """Read a map written by :meth:`save`.

        Raises:
            fastgenlabel.ModelFileError: (a ValueError) the file is missing, truncated, fails its
                checksum, or does not hold a well-formed map; the message names the file.

        A map written before maps carried a checksum is read after the same checks of its arrays,
        with a warning: its bytes cannot be verified (save it again to add the checksum).
        """
        import warnings

        from .models import io

        path = os.fspath(path)
        header, arrays, _ = io.read_verified(path, io.FEATURE_MAP_FORMAT, "feature map")
        if header is None:
            if "kind" not in arrays or str(arrays["kind"]) != "thumbnail-pca":
                raise io.ModelFileError(f"feature map {path!r}: not a fastgenlabel ThumbnailPCA file")
            warnings.warn(f"feature map {path!r} has no checksum (written by an older fastgenlabel), so damage to "
                          "it cannot be detected; save it again (ThumbnailPCA.load(path).save(path)) to add one",
                          UserWarning, stacklevel=2)
        return cls._from_arrays(arrays, path)

    @classmethod
    def _from_arrays(cls, arrays: dict, path: str) -> ThumbnailPCA:
        from .models.io import ModelFileError

        def bad(what):
            return ModelFileError(f"feature map {path!r} is malformed: {what}")

        missing = [k for k in ("kind", "thumbnail", "mean", "components") if k not in arrays]
        if missing:
            raise bad(f"it lacks {missing}")
        if str(arrays["kind"]) != "thumbnail-pca":
            raise bad(f"kind {str(arrays['kind'])!r}, expected 'thumbnail-pca'")
        t, mean, comps = arrays["thumbnail"], arrays["mean"], arrays["components"]
        if t.shape != () or t.dtype.kind not in "iu" or int(t) < 1:
            raise bad(f"thumbnail {t!r}, expected one integer >= 1")
        t = int(t)
        if comps.ndim != 2 or comps.dtype.kind != "f" or min(comps.shape) < 1:
            raise bad(f"components of shape {comps.shape} and dtype {comps.dtype}, expected a (d, F) float array")
        if mean.shape != (comps.shape[1],) or mean.dtype.kind != "f":
            raise bad(f"mean of shape {mean.shape} and dtype {mean.dtype}, expected ({comps.shape[1]},) floats "
                      "(one per thumbnail value)")
        if comps.shape[1] % (t * t):
            raise bad(f"{comps.shape[1]} values per thumbnail is not {t}x{t}xC")
        if not (np.isfinite(mean).all() and np.isfinite(comps).all()):
            raise bad("mean or components contain NaN or infinity")
        obj = cls(t, int(comps.shape[0]))
        obj.mean = np.ascontiguousarray(mean, dtype=np.float32)
        obj.components = np.ascontiguousarray(comps, dtype=np.float32)
        return obj

    def __repr__(self) -> str:
        return f"ThumbnailPCA(thumbnail={self.thumbnail}, dim={self.dim}, fitted={self.fitted})"


def check_model_matches(model, feature_map, model_name: str = "model", map_name: str = "feature_map") -> None:
    """Raise ValueError naming both unless ``model`` was fitted on ``feature_map``'s features.

    A model records the checksum of the map it was fitted with (``model.feature_map_digest``, set
    by ``fastgenlabel fit``); a model without one, or features that are not a ThumbnailPCA, pass.
    ``model_name`` / ``map_name`` say where each came from (e.g. their files).
    """
    want = getattr(model, "feature_map_digest", None)
    if want is None or not isinstance(feature_map, ThumbnailPCA):
        return
    have = feature_map.digest
    if have != want:
        raise ValueError(f"{model_name} was fitted on the features of another feature map than {map_name} "
                         f"(checksum {want[:16]}..., the map's {have[:16]}...): they do not belong together, and "
                         "its targets would be wrong. Pass the map written with the model (fastgenlabel fit "
                         "writes MODEL.features.npz; an interrupted fit can leave a new map beside an old model), "
                         "or fit again")


class StoredEmbeddings:
    """Precomputed per-sample embeddings, memory-mapped, looked up by sample index.

    Under mixing the loader interpolates them (``lam e_i + (1 - lam) e_p``): an approximation of
    the mixed image's embedding, exact only for linear embeddings.

    Args:
        path: an (N, d) float ``.npy`` file; row i belongs to sample i of the dataset (in the
            loader's sample order: sorted class folders, sorted files, or the file list's order).
        num_samples: N expected (the dataset's size); a mismatch is an error.

    Raises:
        FileNotFoundError, ValueError: missing file, wrong shape or dtype, wrong N.
    """

    kind = "stored"
    exact_under_mixing = False

    def __init__(self, path, num_samples: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"embeddings file {str(self.path)!r} does not exist")
        try:
            self.array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"embeddings file {str(self.path)!r} is not a plain .npy array: {e}") from None
        if not isinstance(self.array, np.ndarray):  # an .npz archive: several arrays, not one
            self.array.close()
            raise ValueError(f"embeddings file {str(self.path)!r} is an .npz archive; save the (N, d) array "
                             "alone with np.save (.npy)")
        if self.array.ndim != 2 or self.array.dtype.kind != "f":
            raise ValueError(f"embeddings file {str(self.path)!r}: expected an (N, d) float array, got shape "
                             f"{self.array.shape} and dtype {self.array.dtype}")
        if num_samples is not None:
            self.check_matches(num_samples)

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def check_matches(self, num_samples: int) -> None:
        """Raise ValueError unless there is one row per sample of the dataset."""
        if len(self) != num_samples:
            raise ValueError(f"embeddings file {str(self.path)!r} has {len(self)} rows, but the dataset has "
                             f"{num_samples} samples; it must hold one row per sample, in the dataset's order")

    def lookup(self, indices) -> torch.Tensor:
        """(B,) sample indices -> (B, d) float32 CPU tensor (rows read from the memory map)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample index out of range [0, {len(self)}): {idx.min()}..{idx.max()}")
        raw = self.array[idx]
        with np.errstate(over="ignore"):
            rows = np.ascontiguousarray(raw, dtype=np.float32)
        bad = ~np.isfinite(rows).all(axis=1)
        if bad.any():  # checked here, on the host, so the GPU relabel needs no check (and no sync)
            what = ("contain NaN or infinity" if not np.isfinite(raw[bad]).all()
                    else "hold values beyond float32's range (the kernels' precision)")
            raise ValueError(f"embeddings file {str(self.path)!r}: the rows of sample(s) {idx[bad][:5].tolist()} "
                             f"{what}; features must be finite")
        return torch.from_numpy(rows)

    def __repr__(self) -> str:
        return f"StoredEmbeddings({os.fspath(self.path)!r}, N={len(self)}, d={self.dim})"


class NoFeatures:
    """No features: the loader emits plain mixup targets."""

    kind = "none"
    exact_under_mixing = True
    dim = 0

    def __repr__(self) -> str:
        return "NoFeatures()"
