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

In a notebook run locally, :func:`widget` gives the same explorer as ipywidgets, computing each
setting live (:func:`case`); ipywidgets is imported only there. :func:`homogeneity_phase`,
:func:`cooling_phase` and :func:`phase_figure` compute the conclusion's phase diagram of both traps.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .sinkhorn import project_dsm

__all__ = ["precompute", "to_javascript", "DEFAULT_NS", "DEFAULT_TAU_EXP", "DEFAULT_SCALE_EXP",
           "DEFAULT_ITERS", "TrapPhase", "CoolingPhase", "homogeneity_phase", "cooling_phase",
           "phase_figure", "crossing", "case", "widget", "PHASE_DELTA", "PHASE_E_TOL"]

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


def case(n: int, tau: float, scale: float = 1.0, n_iter: int = 20, seed: int = 0) -> dict[str, Any]:
    """One explorer setting, computed now: ``Sinkhorn(exp(scale · S / tau))`` of the seeded
    ``n × n`` Gaussian logits of :func:`precompute` (same seed rule, ``n_iter`` plain log-domain
    sweeps). Returns ``plan`` (Tensor ``(n, n)``), ``sv`` (all singular values, Tensor), ``sigma2``
    and ``err`` (relative L1 marginal error), as floats.

    Raises:
        ValueError: for ``n < 2``, a non-positive ``tau`` or ``scale``, or ``n_iter < 1``.
    """
    if int(n) != n or n < 2:
        raise ValueError(f"case: `n` must be an integer >= 2, got {n!r}")
    if not (tau > 0 and scale > 0):
        raise ValueError(f"case: `tau` and `scale` must be positive, got {tau!r}, {scale!r}")
    if int(n_iter) != n_iter or n_iter < 1:
        raise ValueError(f"case: `n_iter` must be an integer >= 1, got {n_iter!r}")
    g = torch.Generator().manual_seed(int(seed) + int(n))
    S = torch.randn(int(n), int(n), generator=g, dtype=torch.float64)
    res = project_dsm(S, tau=float(tau) / float(scale), n_iter=int(n_iter), engine="log",
                      momentum=None)
    sv = torch.linalg.svdvals(res.plan)
    return {"plan": res.plan, "sv": sv, "sigma2": float(sv[1]), "err": float(res.marginal_error)}


def widget(ns: Sequence[int] = DEFAULT_NS, tau_exp: Sequence[int] = DEFAULT_TAU_EXP,
           scale_exp: Sequence[int] = DEFAULT_SCALE_EXP, iters: Sequence[int] = DEFAULT_ITERS,
           seed: int = 0):
    """The explorer as ipywidgets, for a notebook run locally: sliders for τ, n, the number of
    sweeps and the logit scale; each move recomputes :func:`case` with the library and redraws
    the heat map and the singular values, with σ₂ and the marginal error below.

    Needs ``ipywidgets`` (the book's ``[book]`` extra pins it); the rest of the library does not.
    Returns an ``ipywidgets.VBox``; its ``controls`` (dict of sliders), ``readout`` (HTML),
    ``output`` (the figure) and ``state`` (the last :func:`case`) are attributes, for scripts.

    Raises:
        ImportError: without ipywidgets, with the command that installs it.
    """
    try:
        import ipywidgets as w
    except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
        raise ImportError(
            "bistochastic.explorer.widget needs ipywidgets: pip install 'ipywidgets==8.1.9' (or "
            "the book's extra: pip install -e '.[book]'); the rest of bistochastic works without "
            "it, and the book's explorer page needs none") from e
    import matplotlib.pyplot as plt

    from .plotting import heatmap, subplots

    def slider(name: str, options: list, value: Any) -> Any:
        return w.SelectionSlider(options=options, value=value, description=name,
                                 continuous_update=False, style={"description_width": "9em"},
                                 layout=w.Layout(width="28em"))

    controls = {
        "tau": slider("temperature τ", [(f"{2.0 ** k:g}", k) for k in tau_exp],
                      0 if 0 in tau_exp else tau_exp[0]),
        "n": slider("size n", [(str(n), int(n)) for n in ns], int(ns[len(ns) // 2])),
        "iters": slider("Sinkhorn sweeps", [(str(k), int(k)) for k in iters],
                        20 if 20 in iters else iters[-1]),
        "scale": slider("logit scale s", [(f"{2.0 ** j:g}", j) for j in scale_exp],
                        0 if 0 in scale_exp else scale_exp[0]),
    }
    readout = w.HTML()
    output = w.Output()
    box = w.VBox([*controls.values(), output, readout])

    def draw(*_: Any) -> None:
        t, s = 2.0 ** controls["tau"].value, 2.0 ** controls["scale"].value
        c = case(controls["n"].value, t, s, controls["iters"].value, seed)
        box.state = c
        readout.value = (f"<code>σ₂ = {c['sigma2']:.4g} &nbsp; marginal error = "
                         f"{c['err']:.3g} &nbsp; s/τ = {s / t:g}</code>")
        with output:
            output.clear_output(wait=True)
            fig, (a1, a2) = subplots(1, 2, width=6.8, height=3.0)
            heatmap(a1, c["plan"], title="the matrix M", cbar_label="entry")
            sv = c["sv"].numpy()
            a2.semilogy(range(1, sv.size + 1), np.maximum(sv, 1e-16), "o-")
            a2.set(xlabel="index k", ylabel="σ_k(M)", title="singular values")
            plt.show()
            plt.close(fig)

    for sl in controls.values():
        sl.observe(draw, names="value")
    box.controls, box.readout, box.output = controls, readout, output
    draw()
    return box


def to_javascript(data: dict[str, Any], name: str = "BS_EXPLORER") -> str:
    """``window.<name> = {...};`` -- the data as a script that works from ``file://`` too."""
    if not name.isidentifier():
        raise ValueError(f"to_javascript: name must be a JavaScript identifier, got {name!r}")
    return f"window.{name} = {json.dumps(data, separators=(',', ':'))};\n"


# ----------------------------------------------------------------------------------------------
# Phase diagrams of the two traps (the conclusion's figure, computed when the book is built)

#: Tolerance of the Homogeneity-Trap panel: a stack has lost its detail when the product of its
#: layers' σ₂ falls below it (the middle tolerance of Chapter 4).
PHASE_DELTA = 1e-2
#: Tolerated tracking error of the cooling panel (``per_row`` norm): the calibration tolerance of
#: Chapter 13.
PHASE_E_TOL = 1e-3


@dataclass
class TrapPhase:
    """σ₂ of Sinkhorn matrices of Gaussian logits over the ``(n, τ)`` plane.

    ``sigma2[i, j]``: mean σ₂ over ``batch`` draws at ``ns[i]``, ``taus[j]``; ``leff[i, j]``: the
    effective depth ``⌈log(1/δ)/log(1/σ₂)⌉`` of a stack of such layers (the product bound of
    Chapter 4), ``inf`` where σ₂ rounds to one; ``law_leff``: the closed-form high-temperature
    prediction ``log(1/δ)/log(τ√n/2)`` (``inf`` outside its regime)."""

    ns: np.ndarray
    taus: np.ndarray
    sigma2: np.ndarray
    leff: np.ndarray
    law_leff: np.ndarray
    delta: float
    batch: int


@dataclass
class CoolingPhase:
    """Tracking error of a warm-started Sinkhorn layer under exponential cooling, over the
    ``(ε, 1 − α)`` plane.

    ``error[i, j]``: ``‖P_t − P*_{ε_t}‖`` (``per_row`` norm) of the layer that runs ``K`` sweeps per
    step, warm-started from the previous step, when the schedule ``ε_{t+1} = α ε_t`` with
    ``1 − α = rates[i]`` first reaches ``ε_t ≤ eps[j]``; ``P*`` is the plan converged to 1e-9."""

    eps: np.ndarray
    rates: np.ndarray
    error: np.ndarray
    e_tol: float
    N: int
    K: int


def homogeneity_phase(ns: Sequence[int] = (4, 8, 16, 32, 64, 128),
                      taus: Optional[Sequence[float]] = None, *, batch: int = 8,
                      delta: float = PHASE_DELTA, tol: float = 1e-6, seed: int = 0) -> TrapPhase:
    """σ₂ and effective depth over the ``(n, τ)`` plane, for iid N(0, 1) logits.

    Each size gets ``batch`` float64 logit matrices from a CPU generator seeded with ``seed + n``;
    the temperatures are solved from the hottest down, each solve warm-started from the previous
    potentials, to relative marginal error ``tol`` (σ₂ is reported to 3 digits, far above it).
    Non-convergence raises (it would make σ₂ describe a matrix that is not doubly stochastic).

    Raises:
        ValueError: for an empty grid, ``n < 2``, a non-positive τ or ``δ`` outside (0, 1).
    """
    from .sinkhorn import sinkhorn
    from .spectral import effective_depth_constant, effective_depth_law, sigma2

    taus = np.logspace(-1.0, 1.5, 11) if taus is None else np.asarray(taus, dtype=float)
    if len(ns) == 0 or taus.size == 0:
        raise ValueError("homogeneity_phase: `ns` and `taus` must be non-empty")
    if min(ns) < 2:
        raise ValueError(f"homogeneity_phase: every n must be >= 2, got {list(ns)}")
    if not (taus > 0).all():
        raise ValueError("homogeneity_phase: every tau must be positive")
    if not 0 < delta < 1:
        raise ValueError(f"homogeneity_phase: `delta` must lie in (0, 1), got {delta!r}")
    order = np.argsort(-taus)  # hottest first: each solve warm-starts the next colder one
    s2 = np.zeros((len(ns), taus.size))
    for i, n in enumerate(ns):
        g = torch.Generator().manual_seed(int(seed) + int(n))
        S = torch.randn(batch, n, n, generator=g, dtype=torch.float64)
        ones = torch.ones(n, dtype=torch.float64)
        init = None
        for j in order:
            t = float(taus[j])
            res = sinkhorn(-S, t, ones, ones, tol=tol, max_iter=200000, grad="none", init=init,
                           warn=False)
            if not bool(torch.as_tensor(res.converged).all()):
                raise RuntimeError(f"homogeneity_phase: Sinkhorn did not reach tol={tol} at "
                                   f"n={n}, tau={t:.3g} (marginal error {res.marginal_error})")
            init = (res.f * 1.0, res.g * 1.0)
            s2[i, j] = float(sigma2(res.plan).mean())
    s2 = np.round(s2, 4)  # 4 digits: the table is a figure, not a measurement of round-off
    leff = effective_depth_constant(torch.as_tensor(s2), delta).numpy()
    law = np.stack([effective_depth_law(torch.as_tensor(taus), int(n), delta).numpy() for n in ns])
    return TrapPhase(ns=np.asarray(ns), taus=taus, sigma2=s2, leff=leff, law_leff=law,
                     delta=float(delta), batch=int(batch))


def cooling_phase(rates: Optional[Sequence[float]] = None, *, N: int = 30, K: int = 20,
                  eps_min: float = 0.05, n_eps: int = 13, e_tol: float = PHASE_E_TOL,
                  seed: int = 0) -> CoolingPhase:
    """Tracking error of exponential cooling over the ``(ε, 1 − α)`` plane (Chapter 12's setting:
    one N(0, 1) cost ``N × N``, ``K`` warm-started sweeps per step, from ``ε = 1``).

    Raises:
        ValueError: for rates outside (0, 1), ``eps_min`` outside (0, 1) or ``n_eps < 2``.
    """
    from . import anneal

    rates = np.logspace(-2.0, -0.5, 7) if rates is None else np.asarray(rates, dtype=float)
    if rates.size == 0 or not ((rates > 0) & (rates < 1)).all():
        raise ValueError("cooling_phase: every rate 1 - alpha must lie in (0, 1)")
    if not 0 < eps_min < 1 or n_eps < 2:
        raise ValueError("cooling_phase: need 0 < eps_min < 1 and n_eps >= 2")
    g = torch.Generator().manual_seed(int(seed))
    C = torch.randn(N, N, generator=g, dtype=torch.float64)
    # the grid stops where every schedule still takes full α-steps: its first step at or below
    # a grid point e has ε ≥ α e ≥ eps_min, so no point sees the floor's shorter last step
    floor = eps_min
    e_lo = eps_min / (1.0 - float(rates.max()))
    eps = np.logspace(0.0, np.log10(e_lo), n_eps)[1:]  # the first step is a cold solve
    err = np.zeros((rates.size, eps.size))
    for i, r in enumerate(rates):
        a = 1.0 - float(r)
        T = int(np.ceil(np.log(floor) / np.log(a) * (1 + 1e-12))) + 1
        run = anneal.run_schedule(anneal.Exponential(1.0, a, floor), C, T, n_iter=K,
                                  warm_start=True, reference=True, norm="per_row")
        err[i] = [run.value_at(float(e) * (1 + 1e-9), "error") for e in eps]
    return CoolingPhase(eps=eps, rates=rates, error=err, e_tol=float(e_tol), N=int(N), K=int(K))


def phase_figure(trap: TrapPhase, cool: CoolingPhase, depths: Sequence[int] = (4, 16),
                 floor: float = 1e-8):
    """The two panels: σ₂ over ``(τ, n)`` with effective-depth contours (from the measured σ₂:
    solid; closed-form law: dashed), and log₁₀ tracking error over ``(ε, 1 − α)`` with the
    contour ``error = e_tol``; errors below ``floor`` (round-off of a converged layer) are shown at
    the floor. Returns the matplotlib Figure (6.8 × 3.4 in)."""
    from .plotting import subplots

    fig, (a1, a2) = subplots(1, 2, width=6.8, height=3.4)
    X, Y = np.meshgrid(trap.taus, trap.ns)
    m1 = a1.pcolormesh(X, Y, trap.sigma2, shading="gouraud", cmap="viridis", vmin=0, vmax=1)
    fig.colorbar(m1, ax=a1, label="mean σ₂ of one layer")
    s2 = np.clip(trap.sigma2, 1e-12, 1 - 1e-12)
    leff = np.log(1 / trap.delta) / np.log(1 / s2)  # continuous: the contour is not a staircase
    law = np.where(np.isfinite(trap.law_leff), trap.law_leff, 1e9)
    cs = a1.contour(X, Y, leff, levels=list(depths), colors="white", linewidths=1.6)
    a1.clabel(cs, fmt=lambda v: f"{v:.0f} layers", fontsize=10)
    a1.contour(X, Y, law, levels=list(depths), colors="white", linewidths=1.0, linestyles="--")
    a1.set(xscale="log", yscale="log", xlabel="temperature τ", ylabel="size n",
           title="Homogeneity Trap")
    a1.minorticks_off()
    a1.set_yticks(trap.ns, [str(int(n)) for n in trap.ns])
    xt = [t for t in (0.1, 0.3, 1, 3, 10, 30) if trap.taus.min() <= t <= trap.taus.max()]
    a1.set_xticks(xt, [f"{t:g}" for t in xt])
    E, R = np.meshgrid(cool.eps, cool.rates)
    logerr = np.log10(np.maximum(cool.error, floor))
    m2 = a2.pcolormesh(E, R, logerr, shading="gouraud", cmap="magma", vmin=np.log10(floor))
    fig.colorbar(m2, ax=a2, label="log₁₀ tracking error")
    cs2 = a2.contour(E, R, cool.error, levels=[cool.e_tol], colors="white", linewidths=1.6)
    a2.clabel(cs2, fmt=lambda v: f"error {v:g}", fontsize=10)
    a2.set(xscale="log", yscale="log", xlabel="ε (cooling from ε = 1)",
           ylabel="cooling rate 1 − α per step", title="Premature collapse")
    a2.minorticks_off()
    et = [e for e in (0.5, 0.2, 0.1, 0.05) if cool.eps.min() <= e <= cool.eps.max()]
    a2.set_xticks(et, [f"{e:g}" for e in et])
    rt = [r for r in (0.01, 0.03, 0.1, 0.3) if cool.rates.min() <= r <= cool.rates.max()]
    a2.set_yticks(rt, [f"{r:g}" for r in rt])
    a2.set_xlim(cool.eps.max(), cool.eps.min())  # colder to the right
    box = dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.8)
    a1.text(0.04, 0.04, "detail\nsurvives", transform=a1.transAxes, fontsize=10, bbox=box)
    a1.text(0.96, 0.04, "trapped", transform=a1.transAxes, fontsize=10, ha="right", bbox=box)
    a2.text(0.04, 0.04, "tracks the\nfixed point", transform=a2.transAxes, fontsize=10, bbox=box)
    a2.text(0.96, 0.96, "outruns it", transform=a2.transAxes, fontsize=10, ha="right",
            va="top", bbox=box)
    return fig


def crossing(x: np.ndarray, y: np.ndarray, level: float) -> Optional[float]:
    """The first ``x`` where ``y`` reaches ``level`` (log-log interpolation between grid points),
    or None if it never does. ``x``, ``y`` positive, in the order of the run."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    hit = np.flatnonzero(y >= level)
    if hit.size == 0:
        return None
    k = int(hit[0])
    if k == 0:
        return float(x[0])
    ly0, ly1 = np.log(max(y[k - 1], 1e-300)), np.log(y[k])
    w = (np.log(level) - ly0) / (ly1 - ly0)
    return float(np.exp(np.log(x[k - 1]) + w * (np.log(x[k]) - np.log(x[k - 1]))))
