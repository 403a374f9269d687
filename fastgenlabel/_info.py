"""What is installed and which backends can run here (``fastgenlabel info``)."""
from __future__ import annotations

import importlib
import importlib.metadata as metadata
import platform


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for dist in ("fastgenlabel", "numpy", "torch", "numba", "numba-cuda", "scipy", "scikit-learn",
                 "nvidia-dali-cuda120", "nvidia-dali-cuda130", "timm", "torchvision"):
        out[dist] = _dist_version(dist)
    return out


def backends() -> dict[str, tuple[bool, str]]:
    """Backend name -> (available, reason). Probing CUDA here is explicit, never at import."""
    from .kernels.compat import numba_cuda_status

    out = {"reference": (True, "plain torch, always available")}
    try:
        importlib.import_module("numba")
        out["numba-cpu"] = (True, "numba njit")
    except ImportError as e:
        out["numba-cpu"] = (False, f"numba cannot be imported: {e}")
    ok, why = numba_cuda_status()
    if ok:
        import torch

        if not torch.cuda.is_available():
            ok, why = False, "no CUDA device visible to torch"
        else:
            why = f"CUDA device: {torch.cuda.get_device_name(0)}"
    out["numba-cuda"] = (ok, why)
    try:
        dali = importlib.import_module("nvidia.dali")
        out["dali"] = (True, f"NVIDIA DALI {dali.__version__}")
    except ImportError:
        out["dali"] = (False, "NVIDIA DALI is not installed (pip install 'fastgenlabel[dali-cu12]' or '[dali-cu13]')")
    return out


def report() -> str:
    lines = ["fastgenlabel environment", ""]
    for name, version in versions().items():
        lines.append(f"  {name:<22} {version or '-'}")
    lines += ["", "backends"]
    for name, (ok, why) in backends().items():
        lines.append(f"  {name:<12} {'yes' if ok else 'no ':<4} {why}")
    return "\n".join(lines)


def describe_model(path) -> str:
    """A class model's or a feature map's description (the two files ``fastgenlabel fit`` writes)."""
    from .features import ThumbnailPCA
    from .models import load_model
    from .models.io import ModelFileError

    try:
        model = load_model(path)
    except ModelFileError as e:
        try:
            fmap = ThumbnailPCA.load(path)
        except Exception:  # noqa: BLE001 - not a feature map either: the model file's error says why
            raise e from None
        t = fmap.thumbnail
        c = fmap.components.shape[1] // (t * t)
        return f"{path}: {fmap!r}\n  feature map: {t}x{t}x{c} thumbnails -> {fmap.dim} features (feature_map=)"
    counts = model.class_counts
    names = model.classes
    shown = "none stored (fitted without class names)" if names is None else \
        ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    return "\n".join([
        f"{path}: {model!r}",
        f"  classes: {model.num_classes} ({int((counts > 0).sum())} with samples), features: {model.dim}",
        f"  class names: {shown}",
        f"  samples: {int(counts.sum())} (per class min {int(counts.min())}, max {int(counts.max())})",
    ])
