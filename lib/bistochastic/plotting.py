"""The book's figure style and small plotting helpers shared by chapters."""

from __future__ import annotations

from typing import Optional, Sequence

import matplotlib

__all__ = ["use_style", "heatmap", "PALETTE"]

PALETTE = "colorblind"


def use_style() -> None:
    """Seaborn ``whitegrid`` with the colour-blind palette and a fixed figure size and DPI."""
    import seaborn as sns

    sns.set_theme(style="whitegrid", palette=PALETTE, context="notebook")
    matplotlib.rcParams.update({
        "figure.figsize": (6.4, 4.0),
        "figure.dpi": 100,
        "savefig.dpi": 100,
        "axes.titlesize": "medium",
        "figure.autolayout": False,
        "figure.constrained_layout.use": True,
    })


def heatmap(ax, M, *, title: str = "", vmin: Optional[float] = 0.0, vmax: Optional[float] = None,
            labels: Sequence[str] = ("column j", "row i"), cbar_label: str = "entry value", cmap: str = "viridis"):
    """Draw a matrix as a heat map with labelled axes and colour bar; returns the image."""
    import numpy as np

    A = np.asarray(M.detach().cpu() if hasattr(M, "detach") else M)
    im = ax.imshow(A, vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    if title:
        ax.set_title(title)
    cb = ax.figure.colorbar(im, ax=ax, shrink=0.85)
    cb.set_label(cbar_label)
    return im
