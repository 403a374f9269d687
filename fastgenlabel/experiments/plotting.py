"""Decision-boundary figure for the 2-D sets: a grid of subplots, dataset x method, one seed."""
from __future__ import annotations

import numpy as np
import torch

from .datasets import Dataset

RESOLUTION = 160  # grid points per axis
MAX_POINTS = 400  # training points drawn per panel


def _extent(data: Dataset, pad: float = 0.25):
    x = data.train.x
    lo, hi = x.min(0), x.max(0)
    span = np.maximum(hi - lo, 1e-6)
    return lo - pad * span, hi + pad * span


@torch.no_grad()
def _predict_grid(net, lo, hi, resolution: int):
    xs = np.linspace(lo[0], hi[0], resolution, dtype=np.float32)
    ys = np.linspace(lo[1], hi[1], resolution, dtype=np.float32)
    gx, gy = np.meshgrid(xs, ys)
    pts = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], 1))
    net.eval()
    return net(pts).argmax(1).numpy().reshape(resolution, resolution)


def decision_boundaries(path, panels: dict[str, tuple[Dataset, dict[str, object]]], method_labels: dict[str, str],
                        accuracies: dict[str, dict[str, float]] | None = None, seed: int = 0) -> None:
    """Write a PNG of the predicted class over the plane, one row per dataset, one column per method.

    Args:
        path: the PNG file.
        panels: dataset name -> (its draw, method -> trained network).
        method_labels: column titles.
        accuracies: dataset -> method -> test accuracy (fraction) shown in each title.
        seed: the seed the networks were trained with (for the figure title).
    """
    # The Agg canvas directly, not pyplot: no global backend switch, no GUI, no open figures.
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    rows = list(panels)
    cols = list(dict.fromkeys(m for _, nets in panels.values() for m in nets))
    if not rows or not cols:
        raise ValueError("panels: nothing to plot")
    fig = Figure(figsize=(2.3 * len(cols), 2.1 * len(rows)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    palette = matplotlib.colormaps["tab10"].colors
    rng = np.random.default_rng(0)
    for r, name in enumerate(rows):
        data, nets = panels[name]
        k = data.num_classes
        light = ListedColormap([tuple(0.55 + 0.45 * c for c in palette[i % 10]) for i in range(k)])
        dark = ListedColormap([palette[i % 10] for i in range(k)])
        lo, hi = _extent(data)
        show = data.train
        if len(show) > MAX_POINTS:
            keep = rng.choice(len(show), MAX_POINTS, replace=False)
            show_x, show_y = show.x[keep], show.y[keep]
        else:
            show_x, show_y = show.x, show.y
        for c, method in enumerate(cols):
            ax = axes[r, c]
            net = nets.get(method)
            if net is not None:
                pred = _predict_grid(net, lo, hi, RESOLUTION)
                ax.imshow(pred, origin="lower", extent=(lo[0], hi[0], lo[1], hi[1]), cmap=light,
                          vmin=-0.5, vmax=k - 0.5, interpolation="nearest", aspect="auto")
            ax.scatter(show_x[:, 0], show_x[:, 1], c=show_y, cmap=dark, vmin=-0.5, vmax=k - 0.5, s=3,
                       linewidths=0)
            ax.set_xlim(lo[0], hi[0])
            ax.set_ylim(lo[1], hi[1])
            ax.set_xticks([])
            ax.set_yticks([])
            title = method_labels.get(method, method)
            acc = (accuracies or {}).get(name, {}).get(method)
            if acc is not None:
                title += f"\n{100 * acc:.1f} %"
            ax.set_title(title, fontsize=7)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(f"Decision boundaries (seed {seed}; dots: training points; title: last-epoch test accuracy)",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
