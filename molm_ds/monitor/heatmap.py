"""Layer x expert heatmaps as RGB arrays (matplotlib, Agg backend; no display needed)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["share_matrix", "render_heatmap"]


def share_matrix(shares_by_layer: Sequence[Sequence[float]]) -> np.ndarray:
    """[layers, E_max] relative load (share x E, 1 = uniform); NaN pads layers with fewer experts
    (e.g. after pruning)."""
    if not shares_by_layer:
        return np.zeros((0, 0))
    e_max = max(len(s) for s in shares_by_layer)
    out = np.full((len(shares_by_layer), e_max), np.nan)
    for i, s in enumerate(shares_by_layer):
        s = np.asarray(s, dtype=np.float64)
        out[i, : len(s)] = s * len(s)
    return out


def render_heatmap(matrix: np.ndarray, *, title: str, xlabel: str = "expert", ylabel: str = "layer",
                   vmax: float | None = None, dpi: int = 80) -> np.ndarray:
    """Render `matrix` [rows, cols] (relative load) to an RGB uint8 array [H, W, 3]."""
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rows, cols = matrix.shape
    fig = Figure(figsize=(min(12, 2.5 + 0.25 * cols), min(10, 1.8 + 0.25 * rows)), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    finite = matrix[np.isfinite(matrix)]
    top = vmax if vmax is not None else max(2.0, float(finite.max()) if finite.size else 2.0)
    im = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=top)
    fig.colorbar(im, ax=ax, label="load / uniform")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
