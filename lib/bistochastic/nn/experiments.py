"""Training experiments for attention encoders: the ranking task and a batched training run.

:func:`ranking_batch` draws sets of ``T`` iid uniform numbers; the target of each token is its rank
among the ``T`` (``0`` for the smallest, ``1`` for the largest, rank ``/ (T - 1)``). The encoder has
no positional encoding, so a token can only know its rank by comparing itself with the others:
the task needs token interaction, and a model without attention can do no better than predicting
from its own value (mean-squared error ``1/(6(T-1))``, :func:`no_attention_floor`).

:func:`train_run` trains ``len(taus) * len(seeds)`` members of one architecture (attention type,
logit scale, depth) as one :class:`~bistochastic.nn.Ensemble` and records, at checkpoints, the
per-layer diagnostics of :class:`~bistochastic.nn.Diagnostics` on a fixed probe batch, plus the
detail gain of the product of the layers' (head-averaged) attention matrices.

:func:`pointcloud_batch` is a second task (``train_run(..., task="pointcloud")``): classify 2-D
point clouds sampled on the outline of one of a few shapes (:data:`POINTCLOUD_SHAPES`), randomly rotated,
scaled and translated, with noise, the points in random order. The encoder mean-pools its tokens
and reads out class logits; without attention (``normalization="identity"``) the class must be
read from a linear function of the mean of per-point features, which cannot undo the random
translation, so the task needs the points to interact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import spectral
from .diagnostics import Diagnostics
from .encoder import Ensemble, SinkhornEncoder

__all__ = ["ranking_batch", "RunResult", "train_run", "no_attention_floor", "pointcloud_batch",
           "POINTCLOUD_SHAPES", "TASKS"]

TASKS = ("ranking", "pointcloud")

# outline vertices of each shape (closed polygons; the cross is two segments), unit size
_SHAPES: Dict[str, Tuple[Tuple[Tuple[float, float], ...], ...]] = {
    "triangle": (tuple((math.cos(a), math.sin(a))
                       for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3,
                                 math.pi / 2 + 4 * math.pi / 3, math.pi / 2)),),
    "square": (((-0.7, -0.7), (0.7, -0.7), (0.7, 0.7), (-0.7, 0.7), (-0.7, -0.7)),),
    "cross": (((-1.0, 0.0), (1.0, 0.0)), ((0.0, -1.0), (0.0, 1.0))),
    "circle": (),  # sampled by angle
}
#: the default classes (``"square"`` is also available: its outline is close to the circle's)
POINTCLOUD_SHAPES: Tuple[str, ...] = ("triangle", "circle", "cross")


def ranking_batch(n: int, T: int, generator: torch.Generator,
                  dtype: torch.dtype = torch.float64) -> Tuple[Tensor, Tensor]:
    """``n`` sets of ``T`` iid U(0, 1) numbers and their normalised ranks, both ``(n, T, 1)``."""
    if n < 1 or T < 2:
        raise ValueError(f"`n` must be >= 1 and `T` >= 2; got n={n}, T={T}")
    x = torch.rand(n, T, 1, generator=generator, dtype=torch.float64)
    r = x.argsort(1).argsort(1).to(torch.float64) / (T - 1)
    return x.to(dtype), r.to(dtype)


def _outline_points(shape: str, u: Tensor) -> Tensor:
    """Points at arc-length fractions ``u (m,)`` in [0, 1) of a unit shape's outline, ``(m, 2)``."""
    if shape == "circle":
        a = 2 * math.pi * u
        return torch.stack([a.cos(), a.sin()], -1)
    segs = []
    for poly in _SHAPES[shape]:
        for p, q in zip(poly[:-1], poly[1:]):
            segs.append((p, q))
    P = torch.tensor([p for p, _ in segs], dtype=u.dtype)
    Q = torch.tensor([q for _, q in segs], dtype=u.dtype)
    lengths = (Q - P).norm(dim=-1)
    cum = torch.cat([torch.zeros(1, dtype=u.dtype), lengths.cumsum(0)]) / lengths.sum()
    k = (torch.searchsorted(cum, u, right=True) - 1).clamp(0, len(segs) - 1)
    t = ((u - cum[k]) / (cum[k + 1] - cum[k]))[:, None]
    return P[k] + t * (Q[k] - P[k])


def pointcloud_batch(n: int, T: int, generator: torch.Generator,
                     dtype: torch.dtype = torch.float64, *, shapes: Sequence[str] = POINTCLOUD_SHAPES,
                     noise: float = 0.03, scale: Tuple[float, float] = (0.8, 1.2),
                     shift: float = 1.0) -> Tuple[Tensor, Tensor]:
    """``n`` labelled 2-D point clouds of ``T`` points: ``x (n, T, 2)``, class ``y (n,)`` (long).

    Class ``c`` is ``shapes[c]`` (classes drawn uniformly). Each cloud: ``T`` points uniform in
    arc length on the shape's unit outline, rotated by a uniform angle, scaled by a factor
    uniform in ``scale``, translated by ``N(0, shift² I)``, plus ``N(0, (noise·factor)² I)``
    noise. The points are iid given the cloud, so their order carries no information. Random
    numbers are drawn in float64 from the CPU ``generator`` (identical on every instruction set),
    then cast to ``dtype``.
    """
    if n < 1 or T < 2:
        raise ValueError(f"`n` must be >= 1 and `T` >= 2; got n={n}, T={T}")
    shapes = tuple(shapes)
    if len(shapes) < 2 or any(s not in _SHAPES for s in shapes):
        raise ValueError(f"`shapes` must name at least two of {tuple(_SHAPES)}; got {shapes!r}")
    if not (noise >= 0 and shift >= 0 and 0 < scale[0] <= scale[1]):
        raise ValueError("`noise` and `shift` must be >= 0 and `scale` an interval (lo, hi), "
                         f"0 < lo <= hi; got noise={noise}, shift={shift}, scale={scale}")
    f64 = torch.float64
    y = torch.randint(len(shapes), (n,), generator=generator)
    u = torch.rand(n, T, generator=generator, dtype=f64)
    x = torch.empty(n, T, 2, dtype=f64)
    for c, name in enumerate(shapes):
        idx = torch.nonzero(y == c).flatten()
        if idx.numel():
            x[idx] = _outline_points(name, u[idx].flatten()).view(-1, T, 2)
    ang = 2 * math.pi * torch.rand(n, generator=generator, dtype=f64)
    c_, s_ = ang.cos(), ang.sin()
    R = torch.stack([torch.stack([c_, -s_], -1), torch.stack([s_, c_], -1)], -2)  # (n, 2, 2)
    fac = scale[0] + (scale[1] - scale[0]) * torch.rand(n, 1, 1, generator=generator, dtype=f64)
    off = shift * torch.randn(n, 1, 2, generator=generator, dtype=f64)
    eps = noise * torch.randn(n, T, 2, generator=generator, dtype=f64)
    x = fac * (x @ R.transpose(-1, -2) + eps) + off
    return x.to(dtype), y


def no_attention_floor(T: int) -> float:
    """Test MSE of the best per-token predictor that sees only its own value ``x``.

    Given ``x``, the rank is ``Binomial(T-1, x)``, so the best prediction is ``x`` and the error is
    ``E[x(1-x)]/(T-1) = 1/(6(T-1))`` (in normalised rank units). A model that beats this floor
    uses the other tokens.
    """
    if T < 2:
        raise ValueError(f"`T` must be >= 2; got {T}")
    return 1.0 / (6.0 * (T - 1))


@dataclass
class RunResult:
    """One architecture trained for every (τ, seed) member.

    Shapes: ``G = len(taus) * len(seeds)`` members ordered τ-major (member ``g`` has
    ``taus[g // S]`` and ``seeds[g % S]``); ``K`` checkpoints; ``L`` layers.
    """

    normalization: str
    logit_scale: str
    layers: int
    taus: Tuple[float, ...]
    seeds: Tuple[int, ...]
    steps: np.ndarray  # (K,)
    test_loss: np.ndarray  # (K, G)
    sigma2: np.ndarray  # (K, G, L)
    logit_spread: np.ndarray  # (K, G, L)
    token_spread: np.ndarray  # (K, G, L)
    marginal_error: np.ndarray  # (K, G, L), nan for Softmax
    grad_norm: np.ndarray  # (K, G, L), nan at step 0
    product_gain: np.ndarray  # (K, G): ||P A_L ... A_1 P||_2 of the head-averaged attention
    extra: Dict[str, np.ndarray] = field(default_factory=dict)

    def member(self, tau: float, seed: int) -> int:
        """Index ``g`` of the member with temperature ``tau`` and ``seed``."""
        return self.taus.index(tau) * len(self.seeds) + self.seeds.index(seed)

    def by_tau(self, values: np.ndarray, tau: float) -> np.ndarray:
        """The slice of an array with a member axis (axis 1, or 0 if 1-D) for one τ, ``(..., S)``."""
        S = len(self.seeds)
        i = self.taus.index(tau)
        if values.ndim == 1:
            return values[i * S:(i + 1) * S]
        return values[:, i * S:(i + 1) * S]


@torch.no_grad()
def _checkpoint(ens: Ensemble, probe: Tensor, test_x: Tensor, test_y: Tensor, L: int,
                loss_fn, diagnostics: bool = True):
    G = ens.size
    rec = {k: np.full((G, L), np.nan) for k in ("sigma2", "logit_spread", "token_spread",
                                                    "marginal_error", "grad_norm")}
    loss = np.zeros(G)
    gain = np.full(G, np.nan)
    acc = np.full(G, np.nan)
    if not diagnostics:
        out = ens.batched_forward(test_x, shared_input=True)  # (G, n, ...)
        for g in range(G):
            loss[g] = float(loss_fn(out[g], test_y))
            if test_y.dtype == torch.long:
                acc[g] = float((out[g].argmax(-1) == test_y).double().mean())
        return loss, rec, gain, acc
    for g in range(G):
        m = ens.member(g, with_grads=True)
        diag = Diagnostics(m, residual_blocks=list(m.blocks))
        diag.record_grads()
        m(probe)
        h = diag.history
        diag.remove()
        for l in range(L):
            a, b = h[f"blocks.{l}.attn"], h[f"blocks.{l}"]
            rec["sigma2"][g, l] = a["sigma2"][-1]
            rec["logit_spread"][g, l] = a["logit_spread"][-1]
            rec["token_spread"][g, l] = b["token_spread"][-1]
            if "marginal_error" in a:
                rec["marginal_error"][g, l] = a["marginal_error"][-1]
            if "grad_norm" in a:
                rec["grad_norm"][g, l] = a["grad_norm"][-1]
        A = torch.stack([blk.attn.last_mixing.mean(1) for blk in m.blocks], dim=1)  # (B, L, T, T)
        prod = spectral.cumulative_products(A.double())[:, -1]
        gain[g] = float(spectral.sigma2(prod).mean())
        o = m(test_x)
        loss[g] = float(loss_fn(o, test_y))
        if test_y.dtype == torch.long:
            acc[g] = float((o.argmax(-1) == test_y).double().mean())
    return loss, rec, gain, acc


def train_run(
    normalization: str,
    logit_scale: str,
    layers: int,
    *,
    taus: Sequence[float],
    seeds: Sequence[int],
    T: int = 8,
    d_model: int = 32,
    n_heads: int = 2,
    batch: int = 32,
    steps: int = 150,
    lr: float = 3e-3,
    n_iter: int = 10,
    checkpoints: Sequence[int] = (0, 150),
    test_size: int = 256,
    probe_size: int = 64,
    dtype: torch.dtype = torch.float64,
    device: Optional[torch.device] = None,
    data_seed: int = 0,
    task: str = "ranking",
    task_kw: Optional[Dict] = None,
    diagnostics: bool = True,
) -> RunResult:
    """Train ``len(taus) * len(seeds)`` encoders on one task as one batched program.

    ``task="ranking"`` (:func:`ranking_batch`, mean-squared error, per-token outputs) or
    ``"pointcloud"`` (:func:`pointcloud_batch` with ``T`` points, cross-entropy on mean-pooled
    class logits; ``extra["test_acc"] (K, G)`` holds the test accuracy); ``task_kw`` is passed
    to the task's batch function (e.g. ``shapes``, ``noise``). ``normalization`` may
    be ``"identity"`` (no token interaction, the control). ``diagnostics=False`` skips the
    hooks at checkpoints (test loss only; the per-layer arrays are nan): for wide sweeps.

    Member ``(τ, s)`` is initialised from ``torch.manual_seed(10_000 + s)`` (the same weights for
    every τ and architecture of equal shape) and sees the training batches of the CPU generator
    seeded ``data_seed + 1 + s`` (the same data for every τ and architecture): comparisons between
    configurations are paired by seed. The test set (``test_size`` sets) and the probe batch
    (``probe_size`` sets, for the diagnostics) come from ``data_seed`` and are shared by all.
    Adam with learning rate ``lr``; Sinkhorn layers run ``n_iter`` unrolled iterations.
    """
    taus, seeds = tuple(float(t) for t in taus), tuple(int(s) for s in seeds)
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS}; got {task!r}")
    if not taus or not seeds:
        raise ValueError("`taus` and `seeds` must be non-empty")
    ck = sorted(set(int(c) for c in checkpoints))
    if ck[0] < 0 or ck[-1] > steps:
        raise ValueError(f"`checkpoints` must lie in [0, steps={steps}]")
    dev = torch.device("cpu") if device is None else torch.device(device)
    S = len(seeds)
    kw = dict(task_kw or {})
    n_classes = len(kw.get("shapes", POINTCLOUD_SHAPES))

    def make(g: int) -> SinkhornEncoder:
        torch.manual_seed(10_000 + seeds[g % S])
        io = (1, 1, "none") if task == "ranking" else (2, n_classes, "mean")
        return SinkhornEncoder(io[0], d_model, io[1], layers, n_heads, pool=io[2],
                               normalization=normalization, tau=taus[g // S],
                               logit_scale=logit_scale, n_iter=n_iter).to(device=dev, dtype=dtype)

    ens = Ensemble(make, len(taus) * S)
    opt = torch.optim.Adam(ens.parameters(), lr)
    g0 = torch.Generator().manual_seed(data_seed)

    def draw(n: int, T_: int, gen: torch.Generator, dt: torch.dtype) -> Tuple[Tensor, Tensor]:
        if task == "ranking":
            return ranking_batch(n, T_, gen, dt, **kw)
        return pointcloud_batch(n, T_, gen, dt, **kw)

    test_x, test_y = (t.to(dev) for t in draw(test_size, T, g0, dtype))
    probe = draw(probe_size, T, g0, dtype)[0].to(dev)
    gens = [torch.Generator().manual_seed(data_seed + 1 + s) for s in seeds]

    def mse(o: Tensor, y: Tensor) -> Tensor:
        if task == "pointcloud":
            return torch.nn.functional.cross_entropy(o, y)
        return (o - y).pow(2).mean()

    out: Dict[str, list] = {k: [] for k in ("loss", "sigma2", "logit_spread", "token_spread",
                                            "marginal_error", "grad_norm", "gain", "acc")}

    def record() -> None:
        loss, rec, gain, acc = _checkpoint(ens, probe, test_x, test_y, layers, mse, diagnostics)
        out["loss"].append(loss)
        out["gain"].append(gain)
        out["acc"].append(acc)
        for k, v in rec.items():
            out[k].append(v)

    for step in range(steps + 1):
        if step in ck:
            record()
        if step == steps:
            break
        xs, ys = zip(*(draw(batch, T, gens[s], dtype) for s in range(S)))
        x = torch.stack([xs[g % S] for g in range(ens.size)]).to(dev)
        y = torch.stack([ys[g % S] for g in range(ens.size)]).to(dev)
        opt.zero_grad(set_to_none=True)
        ens.loss_and_grad(mse, x, y)
        opt.step()
    return RunResult(
        normalization=normalization, logit_scale=logit_scale, layers=layers, taus=taus, seeds=seeds,
        steps=np.asarray(ck), test_loss=np.stack(out["loss"]), sigma2=np.stack(out["sigma2"]),
        logit_spread=np.stack(out["logit_spread"]), token_spread=np.stack(out["token_spread"]),
        marginal_error=np.stack(out["marginal_error"]), grad_norm=np.stack(out["grad_norm"]),
        product_gain=np.stack(out["gain"]),
        extra={"test_acc": np.stack(out["acc"])} if task == "pointcloud" else {},
    )
