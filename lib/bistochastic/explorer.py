"""Precomputed data for the book's interactive explorer of the Sinkhorn projection.

The explorer page (``book/explorer.md``) lets a reader move sliders for the temperature ``tau``,
the size ``n``, the number of Sinkhorn sweeps and a logit scale ``s``, and shows the projected
matrix ``Sinkhorn(exp(s S / tau))`` as a heat map, its singular values, ``sigma_2`` and the marginal
error. The browser does no linear algebra: :func:`precompute` evaluates every slider position
with the library when the book is built, and :func:`to_javascript` embeds the result in the page
(a ``<script>`` assignment, so that the page also works when opened from ``file://``, where
``fetch()`` of a JSON file is refused).

Only the ratio ``s / tau`` enters the projection, so the data are stored once per ratio; the tau
and scale grids are powers of two, so every slider pair maps onto a stored ratio exactly.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Sequence

import numpy as np
import torch

from .sinkhorn import project_dsm

__all__ = ["precompute", "to_javascript", "DEFAULT_NS", "DEFAULT_TAU_EXP", "DEFAULT_SCALE_EXP",
           "DEFAULT_ITERS"]

#: Sizes offered by the ``n`` slider.
DEFAULT_NS = (4, 8, 16, 32)
#: The tau slider: ``tau = 2**k`` for these ``k``.
DEFAULT_TAU_EXP = tuple(range(-4, 5))
#: The logit-scale slider: ``s = 2**j`` for these ``j``.
DEFAULT_SCALE_EXP = (-1, 0, 1, 2)
#: Sweeps offered by the iterations slider (one sweep = a row and a column normalisation).
DEFAULT_ITERS = (1, 2, 5, 10, 20, 50, 200)


def _viridis_lut() -> list[str]:
    import matplotlib

    cm = matplotlib.colormaps["viridis"]
    return ["#%02x%02x%02x" % tuple(int(round(255 * c)) for c in cm(i / 255)[:3])
            for i in range(256)]


def precompute(ns: Sequence[int] = DEFAULT_NS, tau_exp: Sequence[int] = DEFAULT_TAU_EXP,
               scale_exp: Sequence[int] = DEFAULT_SCALE_EXP, iters: Sequence[int] = DEFAULT_ITERS,
               seed: int = 0) -> dict[str, Any]:
    """Evaluate the Sinkhorn projection at every slider position.

    For each size ``n`` one standard Gaussian logit matrix ``S`` (float64, CPU generator seeded
    with ``seed + n``) is projected with ``K`` plain log-domain sweeps for every ``K`` in
    ``iters`` and every ratio ``s / tau = 2**(j - k)``.

    Args:
        ns: matrix sizes (each ``>= 2``).
        tau_exp, scale_exp: integer exponents of the power-of-two grids of ``tau`` and ``s``.
        iters: numbers of sweeps (each ``>= 1``).
        seed: base seed of the logits.

    Returns:
        A JSON-serialisable dict with the grids (``ns``, ``tau_exp``, ``scale_exp``, ``iters``,
        ``ratio_exp``: the exponents of ``s / tau``), a 256-colour ``viridis`` table, and
        ``cases[str(n)][r][i]`` for ratio index ``r`` and sweep index ``i``: ``plan`` (the
        matrix as ``n*n`` bytes, base64, scaled by ``vmax``), ``vmax`` (its largest entry),
        ``sv`` (all singular values, 4 significant digits), ``sigma2`` and ``err`` (relative L1
        marginal error of the returned matrix).

    Raises:
        ValueError: for an empty grid, ``n < 2`` or a number of sweeps below one.
    """
    if not (ns and tau_exp and scale_exp and iters):
        raise ValueError("precompute: every grid (ns, tau_exp, scale_exp, iters) must be non-empty")
    if min(ns) < 2:
        raise ValueError(f"precompute: every n must be >= 2, got ns={list(ns)}")
    if min(iters) < 1:
        raise ValueError(f"precompute: every number of sweeps must be >= 1, got {list(iters)}")
    ratio_exp = sorted({j - k for j in scale_exp for k in tau_exp})
    sig = lambda x: float(f"{float(x):.4g}")  # noqa: E731 -- 4 significant digits
    cases: dict[str, list] = {}
    for n in ns:
        g = torch.Generator().manual_seed(int(seed) + int(n))
        S = torch.randn(n, n, generator=g, dtype=torch.float64)
        per_ratio = []
        for r in ratio_exp:
            per_iter = []
            for K in iters:
                res = project_dsm(S, tau=2.0 ** (-r), n_iter=int(K), engine="log", momentum=None)
                P = res.plan
                sv = torch.linalg.svdvals(P)
                vmax = float(P.max())
                q = np.clip(np.round(P.numpy() / vmax * 255), 0, 255).astype(np.uint8)
                per_iter.append({
                    "plan": base64.b64encode(q.tobytes()).decode("ascii"),
                    "vmax": sig(vmax),
                    "sv": [sig(v) for v in sv.tolist()],
                    "sigma2": sig(sv[1]),
                    "err": sig(res.marginal_error),
                })
            per_ratio.append(per_iter)
        cases[str(n)] = per_ratio
    return {"ns": [int(n) for n in ns], "tau_exp": [int(k) for k in tau_exp],
            "scale_exp": [int(j) for j in scale_exp], "iters": [int(k) for k in iters],
            "ratio_exp": ratio_exp, "viridis": _viridis_lut(), "seed": int(seed), "cases": cases}


def to_javascript(data: dict[str, Any], name: str = "BS_EXPLORER") -> str:
    """``window.<name> = {...};`` -- the data as a script that works from ``file://`` too."""
    if not name.isidentifier():
        raise ValueError(f"to_javascript: name must be a JavaScript identifier, got {name!r}")
    return f"window.{name} = {json.dumps(data, separators=(',', ':'))};\n"
