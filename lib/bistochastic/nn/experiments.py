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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import spectral
from .diagnostics import Diagnostics
from .encoder import Ensemble, SinkhornEncoder

__all__ = ["ranking_batch", "RunResult", "train_run", "no_attention_floor"]


def ranking_batch(n: int, T: int, generator: torch.Generator,
                  dtype: torch.dtype = torch.float64) -> Tuple[Tensor, Tensor]:
    """``n`` sets of ``T`` iid U(0, 1) numbers and their normalised ranks, both ``(n, T, 1)``."""
    if n < 1 or T < 2:
        raise ValueError(f"`n` must be >= 1 and `T` >= 2; got n={n}, T={T}")
    x = torch.rand(n, T, 1, generator=generator, dtype=torch.float64)
    r = x.argsort(1).argsort(1).to(torch.float64) / (T - 1)
    return x.to(dtype), r.to(dtype)


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
def _checkpoint(ens: Ensemble, probe: Tensor, test_x: Tensor, test_y: Tensor, L: int):
    G = ens.size
    rec = {k: np.full((G, L), np.nan) for k in ("sigma2", "logit_spread", "token_spread",
                                                    "marginal_error", "grad_norm")}
    loss = np.zeros(G)
    gain = np.zeros(G)
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
        loss[g] = float((m(test_x) - test_y).pow(2).mean())
    return loss, rec, gain


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
) -> RunResult:
    """Train ``len(taus) * len(seeds)`` encoders on the ranking task as one batched program.

    Member ``(τ, s)`` is initialised from ``torch.manual_seed(10_000 + s)`` (the same weights for
    every τ and architecture of equal shape) and sees the training batches of the CPU generator
    seeded ``data_seed + 1 + s`` (the same data for every τ and architecture): comparisons between
    configurations are paired by seed. The test set (``test_size`` sets) and the probe batch
    (``probe_size`` sets, for the diagnostics) come from ``data_seed`` and are shared by all.
    Adam with learning rate ``lr``; Sinkhorn layers run ``n_iter`` unrolled iterations.
    """
    taus, seeds = tuple(float(t) for t in taus), tuple(int(s) for s in seeds)
    if not taus or not seeds:
        raise ValueError("`taus` and `seeds` must be non-empty")
    ck = sorted(set(int(c) for c in checkpoints))
    if ck[0] < 0 or ck[-1] > steps:
        raise ValueError(f"`checkpoints` must lie in [0, steps={steps}]")
    dev = torch.device("cpu") if device is None else torch.device(device)
    S = len(seeds)

    def make(g: int) -> SinkhornEncoder:
        torch.manual_seed(10_000 + seeds[g % S])
        return SinkhornEncoder(1, d_model, 1, layers, n_heads, normalization=normalization,
                               tau=taus[g // S], logit_scale=logit_scale,
                               n_iter=n_iter).to(device=dev, dtype=dtype)

    ens = Ensemble(make, len(taus) * S)
    opt = torch.optim.Adam(ens.parameters(), lr)
    g0 = torch.Generator().manual_seed(data_seed)
    test_x, test_y = (t.to(dev) for t in ranking_batch(test_size, T, g0, dtype))
    probe = ranking_batch(probe_size, T, g0, dtype)[0].to(dev)
    gens = [torch.Generator().manual_seed(data_seed + 1 + s) for s in seeds]

    def mse(o: Tensor, y: Tensor) -> Tensor:
        return (o - y).pow(2).mean()

    out: Dict[str, list] = {k: [] for k in ("loss", "sigma2", "logit_spread", "token_spread",
                                            "marginal_error", "grad_norm", "gain")}

    def record() -> None:
        loss, rec, gain = _checkpoint(ens, probe, test_x, test_y, layers)
        out["loss"].append(loss)
        out["gain"].append(gain)
        for k, v in rec.items():
            out[k].append(v)

    for step in range(steps + 1):
        if step in ck:
            record()
        if step == steps:
            break
        xs, ys = zip(*(ranking_batch(batch, T, gens[g % S], dtype) for g in range(S)))
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
    )
