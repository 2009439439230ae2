"""The book's figure style and small plotting helpers shared by chapters.

Figures are rendered as PNG at ``DPI`` dots per inch and shown at their natural size when they are
at most ``MAX_WIDTH_IN`` inches wide (the book's text column is about 730 px wide at a 1400-px
window): a 10-pt font then measures about 14 px on screen. Wider figures are shrunk by the browser
and their text becomes unreadable, so :func:`subplots` refuses them.

Helpers:

* :func:`use_style` -- the book style (called by :func:`bistochastic.book.setup`).
* :func:`subplots` -- ``plt.subplots`` with the width capped at ``MAX_WIDTH_IN``.
* :func:`palette` -- ``n`` distinct colours for categorical series (colour-blind safe up to 8).
* :func:`sequential` -- ``n`` ordered colours for series indexed by a parameter (τ, n, depth).
* :func:`legend_outside` -- a legend to the right of the axes or below the figure, off the data.
* :func:`heatmap` -- a matrix as an image with a colour bar and no grid lines through the cells.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import matplotlib

__all__ = [
    "use_style",
    "subplots",
    "palette",
    "sequential",
    "legend_outside",
    "heatmap",
    "PALETTE",
    "MAX_WIDTH_IN",
    "DPI",
]

#: The widest figure (inches) that the book shows at its natural size.
MAX_WIDTH_IN = 7.0
#: Rendering resolution: 7 in x 100 dpi = 700 px, within the text column.
DPI = 100
#: Name of the seaborn palette used for the default colour cycle.
PALETTE = "colorblind"

# Okabe & Ito (2008) colour-blind-safe qualitative palette (black first moved last: it reads as
# "reference" in line plots), then the distinct extra hues of matplotlib's tab20 for n > 8.
_OKABE_ITO = [
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
]
_EXTRA = [
    "#7f7f7f", "#8c564b", "#bcbd22", "#17becf", "#9467bd", "#aec7e8", "#ff9896", "#98df8a",
    "#6b3d9a", "#b15928", "#f7b6d2", "#dbdb8d",
]


def use_style() -> None:
    """Apply the book style: seaborn ``whitegrid``, readable fonts, width-capped figures.

    Fonts: 11 pt labels and titles, 10 pt ticks and legends (about 14 px on screen at ``DPI``);
    default size 6.4 x 3.6 in; constrained layout (no overlapping labels); the colour cycle is
    :func:`palette`; images are drawn without grid lines and with nearest-neighbour pixels.
    """
    import seaborn as sns
    from cycler import cycler

    sns.set_theme(style="whitegrid", palette=PALETTE, context="notebook")
    matplotlib.rcParams.update({
        "figure.figsize": (6.4, 3.6),
        "figure.dpi": DPI,
        "savefig.dpi": DPI,
        "font.size": 11,
        "axes.titlesize": 11,
        "axes.labelsize": 11,
        "xtick.labelsize": 10,
        "ytick.labelsize": 10,
        "legend.fontsize": 10,
        "legend.title_fontsize": 10,
        "legend.framealpha": 0.9,
        "axes.prop_cycle": cycler(color=palette(8)),
        "image.interpolation": "nearest",
        "figure.autolayout": False,
        "figure.constrained_layout.use": True,
    })


def subplots(nrows: int = 1, ncols: int = 1, *, width: Optional[float] = None,
             height: Optional[float] = None, **kwargs: Any):
    """``plt.subplots`` with a readable size: ``width`` ≤ ``MAX_WIDTH_IN`` inches.

    Args:
        nrows, ncols: the grid of axes.
        width: figure width in inches; default ``min(MAX_WIDTH_IN, 3.4 * ncols)``.
        height: figure height in inches; default ``3.4 * nrows`` (3.6 for one row).
        **kwargs: passed to ``matplotlib.pyplot.subplots`` (``sharey``, ``gridspec_kw``, ...).

    Returns:
        ``(fig, axes)`` as ``plt.subplots`` returns them.

    Raises:
        ValueError: when ``width`` exceeds ``MAX_WIDTH_IN`` or a size is not positive.
    """
    import matplotlib.pyplot as plt

    if "figsize" in kwargs:
        raise TypeError("subplots: pass width= and height=, not figsize")
    if nrows < 1 or ncols < 1:
        raise ValueError(f"subplots: nrows and ncols must be >= 1, got {nrows}, {ncols}")
    w = min(MAX_WIDTH_IN, 3.4 * ncols) if width is None else float(width)
    h = (3.6 if nrows == 1 else 3.4 * nrows) if height is None else float(height)
    if not 0 < w <= MAX_WIDTH_IN:
        raise ValueError(f"subplots: width must be in (0, {MAX_WIDTH_IN}] inches, got {w}")
    if h <= 0:
        raise ValueError(f"subplots: height must be positive, got {h}")
    return plt.subplots(nrows, ncols, figsize=(w, h), **kwargs)


def palette(n: int) -> list[str]:
    """``n`` distinct colours (hex strings) for categorical series.

    The first 8 are the Okabe-Ito colour-blind-safe palette; up to 20 series get further distinct
    hues. For series ordered by a parameter use :func:`sequential` instead.

    Raises:
        ValueError: when ``n`` is not in ``1..20``.
    """
    colours = _OKABE_ITO + _EXTRA
    if not 1 <= int(n) <= len(colours):
        raise ValueError(f"palette: n must be in 1..{len(colours)}, got {n}")
    return colours[: int(n)]


def sequential(n: int, cmap: str = "viridis", *, lo: float = 0.0, hi: float = 0.85) -> list:
    """``n`` ordered colours from a perceptually uniform colour map (for τ, n, depth sweeps).

    ``hi`` < 1 avoids viridis' pale yellow end, which is hard to see on white.

    Raises:
        ValueError: when ``n`` < 1 or ``lo``/``hi`` are not ``0 <= lo < hi <= 1``.
    """
    import numpy as np

    if int(n) < 1:
        raise ValueError(f"sequential: n must be >= 1, got {n}")
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"sequential: need 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
    cm = matplotlib.colormaps[cmap]
    return [cm(float(t)) for t in np.linspace(lo, hi, int(n))]


def legend_outside(target: Any, where: str = "right", *, ncol: Optional[int] = None,
                   title: Optional[str] = None, **kwargs: Any):
    """Put the legend outside the data.

    Args:
        target: an ``Axes`` (its handles) or a ``Figure`` (the handles of all its axes, deduplicated
            by label: one legend for a row of panels).
        where: ``"right"`` (beside the axes/figure) or ``"below"`` (under the figure, in columns).
        ncol: columns; default 1 on the right, ``min(#labels, 4)`` below.
        title: legend title.
        **kwargs: passed to ``legend``.

    Returns:
        The ``Legend``, or ``None`` when there is nothing labelled.

    Raises:
        ValueError: for an unknown ``where``.
    """
    from matplotlib.figure import Figure

    if where not in ("right", "below"):
        raise ValueError(f"legend_outside: where must be 'right' or 'below', got {where!r}")
    is_fig = isinstance(target, Figure)
    axes = target.axes if is_fig else [target]
    handles, labels, seen = [], [], set()
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in seen and not lab.startswith("_"):
                seen.add(lab)
                handles.append(h)
                labels.append(lab)
    if not labels:
        return None
    if where == "right":
        kw: dict = {"ncol": ncol or 1}
        if is_fig:
            kw["loc"] = "outside right center"
        else:
            kw.update(loc="center left", bbox_to_anchor=(1.02, 0.5), borderaxespad=0.0)
    else:
        kw = {"ncol": ncol or min(len(labels), 4)}
        if is_fig:
            kw["loc"] = "outside lower center"
        else:
            # below the tick labels and the x label: measure how far they reach under the axes
            fig = target.figure
            fig.canvas.draw()
            r = fig.canvas.get_renderer()
            box, tight = target.get_window_extent(r), target.get_tightbbox(r)
            drop = (box.y0 - tight.y0) / max(box.height, 1.0) + 0.02
            kw.update(loc="upper center", bbox_to_anchor=(0.5, -drop), borderaxespad=0.0)
    kw.update(kwargs)
    return target.legend(handles, labels, title=title, **kw)


def heatmap(ax, M, *, title: str = "", vmin: Optional[float] = 0.0, vmax: Optional[float] = None,
            labels: Sequence[str] = ("column j", "row i"), cbar_label: str = "entry value",
            cmap: str = "viridis", colorbar: bool = True):
    """Draw a matrix as a heat map with labelled axes and a colour bar; returns the image.

    Grid lines are turned off for the axes (the book style's grid would otherwise cross every
    cell), and small matrices (n ≤ 12) get integer ticks at every cell.

    Args:
        ax: the ``Axes``.
        M: an ``(n, m)`` array or tensor (any device).
        vmin, vmax: colour limits (``vmax=None``: the data's maximum).
        labels: (x label, y label).
        cbar_label: colour-bar label; ``colorbar=False`` draws none (share one across panels).

    Raises:
        ValueError: when ``M`` is not two-dimensional.
    """
    import numpy as np

    A = np.asarray(M.detach().cpu() if hasattr(M, "detach") else M)
    if A.ndim != 2:
        raise ValueError(f"heatmap: M must be 2-D, got shape {A.shape}")
    im = ax.imshow(A, vmin=vmin, vmax=vmax, cmap=cmap, interpolation="nearest")
    ax.grid(False)
    for side in ax.spines.values():
        side.set_visible(False)
    n, m = A.shape
    if max(n, m) <= 12:
        ax.set_xticks(range(m))
        ax.set_yticks(range(n))
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    if title:
        ax.set_title(title)
    if colorbar:
        cb = ax.figure.colorbar(im, ax=ax, shrink=0.85)
        cb.set_label(cbar_label)
        cb.ax.grid(False)
    return im
