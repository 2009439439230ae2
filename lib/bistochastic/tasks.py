"""A synthetic permutation-learning task with a Sinkhorn matching head, for annealing experiments.

The task (a learnable version of the paper's matching setting)
--------------------------------------------------------------
One *replication* (one seed) draws a hidden linear distortion ``A ∈ R^{d×d}`` shared by all its
problems. A *problem* is a pair of point sets: ``X ∈ R^{N×d}`` with i.i.d. standard normal entries, a
uniformly random permutation ``π`` and

.. math::  Y_{\\pi(i)} = (X A)_i + \\sigma\\,\\xi_i ,\\qquad \\xi_i \\sim \\mathcal N(0, I_d),

so row ``i`` of ``X`` matches row ``π(i)`` of ``Y``. The model has one learned matrix ``W ∈ R^{d×d}``
and scores the pairs by the cost

.. math::  C_{ij}(W) = -\\langle (XW)_i, Y_j\\rangle / \\sqrt d .

Its matching head is the paper's layer: ``K = 20`` cold-started log-domain Sinkhorn sweeps on
``-C/ε`` (:func:`bistochastic.project_dsm` with ``n_iter=K``, unit row and column sums), at the
temperature ``ε`` that an annealing scheduler sets each epoch. The loss is either

* ``"nll"``: ``-mean_i log P_{i,π(i)}`` (read from the Sinkhorn potentials, so it stays finite when
  the plan saturates), or
* ``"mse"``: ``mean_b ||P_b - Π_b||_F^2 / N`` (``Π_b`` the true permutation matrix).

Training is full-batch: the same ``batch`` problems every epoch (as in the paper's Gradio demo, where
one cost is reused), so the plan drift that a scheduler measures comes only from the learned
features and from ``ε``, never from fresh data. Accuracy is measured on those problems and on
``test_batch`` held-out problems of the same replication.

With ``W = A`` the cost is the Bayes (MAP) score for Gaussian noise (the row and column norms are
separable and do not change the assignment), so the *oracle accuracy* ``acc(A)`` is the ceiling any
``W`` can reach on average; at ``W`` random the accuracy is near chance, ``1/N``.

Evaluation
----------
* :func:`hungarian`: the optimal assignment (``scipy.optimize.linear_sum_assignment``) of a batch of
  costs, with an exact fast path when the row-wise argmin is already a permutation.
* Three read-outs of the final model (:func:`plan_readouts`, :attr:`TrainResult.readout`):
  the Hungarian assignment of its cost (the ``ε → 0`` MAP read-out: it measures the learned
  features ``W`` alone and does not depend on ``ε``); the layer's own hard output, the row-argmax of
  the ``K``-sweep plan at the last training temperature; and the soft accuracy, the plan's mean mass
  at the true pairs. The plan's marginal errors are reported with them: ``K`` cold sweeps at small
  ``ε`` do not give a doubly-stochastic plan.
* :func:`row_entropy`, :func:`collapse_epoch`, :func:`premature_collapse` (definitions there).

Everything is deterministic for a seed: random numbers are drawn from seeded CPU generators and then
moved to the device. :func:`train_many` runs several schedulers × several seeds as one batched
tensor program (one Adam over a parameter of shape ``(runs, d, d)``; Adam is elementwise, so the runs
do not interact). :class:`Replay` replays a recorded temperature sequence (the open-loop control
of a closed-loop rule).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .sinkhorn import project_dsm

__all__ = [
    "TaskConfig",
    "PermutationData",
    "TrainResult",
    "SchedulerLike",
    "make_data",
    "matching_cost",
    "hungarian",
    "assignment_accuracy",
    "row_entropy",
    "collapse_epoch",
    "premature_collapse",
    "train",
    "train_many",
    "plan_readouts",
    "row_argmax",
    "Replay",
    "brake_after_brake",
]


# ----------------------------------------------------------------------------------------------
# configuration and data


@dataclass(frozen=True)
class TaskConfig:
    """Sizes and optimiser settings of the permutation-learning task.

    Attributes
    ----------
    n : int
        Points per problem ``N`` (the plan is ``N × N``).
    d : int
        Feature dimension.
    batch : int
        Training problems per replication (full batch, reused every epoch).
    test_batch : int
        Held-out problems per replication.
    sigma : float
        Noise level ``σ`` of ``Y``.
    epochs : int
        Training epochs (one Adam step each).
    lr : float
        Adam learning rate.
    n_iter : int
        Fixed Sinkhorn sweeps ``K`` of the matching head (cold start, as in the paper's code).
    loss : {"nll", "mse"}
        Training loss (module docstring).
    init_scale : float
        ``W₀ = init_scale · G / √d`` with ``G`` standard normal.
    dtype : torch.dtype
        Compute dtype (float64 by default: the book's checks are in double precision).
    eval_every : int
        Held-out accuracy is measured every ``eval_every`` epochs (and after the last); the
        training accuracy every epoch.
    device : str
        Device of the tensors (the random draws are always made on the CPU first).
    cpu_threads : int or None
        On the CPU, torch's intra-op thread count during training (restored afterwards). The
        task's tensors are tiny, and on a busy machine several threads per op are far slower than
        one; ``None`` leaves the setting alone.
    """

    n: int = 8
    d: int = 8
    batch: int = 8
    test_batch: int = 32
    sigma: float = 0.5
    epochs: int = 100
    lr: float = 0.05
    n_iter: int = 20
    loss: str = "nll"
    init_scale: float = 0.1
    eval_every: int = 1
    dtype: torch.dtype = torch.float64
    device: str = "cpu"
    cpu_threads: Optional[int] = 1

    def __post_init__(self) -> None:
        for name in ("n", "d", "batch", "test_batch", "epochs", "n_iter", "eval_every"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {v!r}")
        if self.n < 2:
            raise ValueError(f"`n` must be at least 2; got {self.n}")
        for name in ("sigma", "lr", "init_scale"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"`{name}` must be a nonnegative finite number; got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"`lr` must be positive; got {self.lr!r}")
        if self.loss not in ("nll", "mse"):
            raise ValueError(f"`loss` must be 'nll' or 'mse'; got {self.loss!r}")
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"`dtype` must be torch.float32 or torch.float64; got {self.dtype}")
        if self.cpu_threads is not None and (not isinstance(self.cpu_threads, int) or self.cpu_threads < 1):
            raise ValueError(f"`cpu_threads` must be None or a positive integer; got {self.cpu_threads!r}")


@dataclass
class PermutationData:
    """One or several replications of the task (leading dims ``S``, usually the seeds).

    Attributes
    ----------
    A : Tensor ``(S, d, d)``
        The hidden distortion of each replication.
    X, Y : Tensor ``(S, batch, N, d)``
        Training problems; ``Y[s, b, perm[s, b, i]] = (X A)[s, b, i] + σ ξ``.
    perm : LongTensor ``(S, batch, N)``
        The true assignment ``π`` of each training problem.
    X_test, Y_test, perm_test : as above with ``test_batch`` problems.
    W0 : Tensor ``(S, d, d)``
        The initial features of the model for each replication.
    """

    A: Tensor
    X: Tensor
    Y: Tensor
    perm: Tensor
    X_test: Tensor
    Y_test: Tensor
    perm_test: Tensor
    W0: Tensor


def _problems(A: Tensor, count: int, n: int, sigma: float, g: torch.Generator) -> tuple:
    d = A.shape[-1]
    X = torch.randn(count, n, d, generator=g, dtype=A.dtype)
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(count)])
    noise = torch.randn(count, n, d, generator=g, dtype=A.dtype)
    Z = X @ A + sigma * noise  # row i is the partner of X_i
    inv = torch.argsort(perm, dim=-1)  # Y_j = Z_{inv(j)}
    Y = torch.gather(Z, 1, inv[..., None].expand(count, n, d))
    return X, Y, perm


def make_data(config: TaskConfig, seeds: Union[int, Sequence[int]]) -> PermutationData:
    """Draw the replications of ``seeds`` (deterministic: a CPU generator per seed).

    Parameters
    ----------
    config : TaskConfig
    seeds : int or sequence of int
        One replication per seed; the leading dim ``S`` of every field follows this order.

    Returns
    -------
    PermutationData
        On ``config.device`` in ``config.dtype``.
    """
    if isinstance(seeds, (int, np.integer)):
        seeds = [int(seeds)]
    seeds = [int(s) for s in seeds]
    if len(seeds) == 0:
        raise ValueError("`seeds` must not be empty")
    cols: Dict[str, List[Tensor]] = {k: [] for k in ("A", "X", "Y", "perm", "Xt", "Yt", "pt", "W0")}
    d, n = config.d, config.n
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        A = torch.randn(d, d, generator=g, dtype=config.dtype) / math.sqrt(d)
        W0 = config.init_scale * torch.randn(d, d, generator=g, dtype=config.dtype) / math.sqrt(d)
        X, Y, perm = _problems(A, config.batch, n, config.sigma, g)
        Xt, Yt, pt = _problems(A, config.test_batch, n, config.sigma, g)
        for k, v in zip(cols, (A, X, Y, perm, Xt, Yt, pt, W0)):
            cols[k].append(v)
    dev = torch.device(config.device)
    st = {k: torch.stack(v).to(dev) for k, v in cols.items()}
    return PermutationData(A=st["A"], X=st["X"], Y=st["Y"], perm=st["perm"], X_test=st["Xt"],
                           Y_test=st["Yt"], perm_test=st["pt"], W0=st["W0"])


def matching_cost(X: Tensor, Y: Tensor, W: Tensor) -> Tensor:
    """The model's cost ``C = -(X W) Yᵀ / √d``.

    Parameters
    ----------
    X, Y : Tensor ``(..., B, N, d)``
    W : Tensor ``(..., d, d)``
        Broadcast over the problem dim ``B``.

    Returns
    -------
    Tensor ``(..., B, N, N)``
    """
    if X.shape[-1] != Y.shape[-1] or W.shape[-1] != W.shape[-2] or W.shape[-1] != X.shape[-1]:
        raise ValueError(f"shapes of `X` {tuple(X.shape)}, `Y` {tuple(Y.shape)} and `W` {tuple(W.shape)} do not fit")
    d = X.shape[-1]
    return -(X @ W.unsqueeze(-3)) @ Y.transpose(-1, -2) / math.sqrt(d)


# ----------------------------------------------------------------------------------------------
# evaluation


def hungarian(cost: Tensor) -> Tensor:
    """Minimum-cost assignment of every ``N × N`` matrix in a batch.

    Parameters
    ----------
    cost : Tensor ``(..., N, N)``

    Returns
    -------
    LongTensor ``(..., N)``
        ``σ[..., i]`` is the column assigned to row ``i``; ``Σ_i cost[i, σ(i)]`` is minimal.

    Notes
    -----
    Fast path (exact): if the row-wise argmin is a permutation, every row already takes its smallest
    entry, so no assignment can have a smaller total; only the other matrices go to
    ``scipy.optimize.linear_sum_assignment``.
    """
    from scipy.optimize import linear_sum_assignment

    if not isinstance(cost, Tensor) or cost.dim() < 2 or cost.shape[-1] != cost.shape[-2]:
        raise ValueError("`cost` must be a tensor of shape (..., N, N)")
    if not bool(torch.isfinite(cost).all()):
        raise ValueError("`cost` contains NaN or inf")
    n = cost.shape[-1]
    flat = cost.detach().reshape(-1, n, n)
    am = flat.argmin(-1)  # (M, N)
    counts = torch.zeros_like(am).scatter_add_(1, am, torch.ones_like(am))
    is_perm = (counts == 1).all(-1)
    out = am.clone()
    bad = torch.nonzero(~is_perm).flatten().tolist()
    if bad:
        arr = flat[bad].cpu().numpy()
        sol = np.empty((len(bad), n), dtype=np.int64)
        for k in range(len(bad)):
            r, c = linear_sum_assignment(arr[k])
            sol[k, r] = c
        out[bad] = torch.from_numpy(sol).to(out.device)
    return out.reshape(cost.shape[:-1])


def assignment_accuracy(pred: Tensor, true: Tensor) -> Tensor:
    """Fraction of rows whose assigned column is the true one, averaged over the problem dim.

    Parameters
    ----------
    pred, true : LongTensor ``(..., B, N)``

    Returns
    -------
    Tensor ``(...)`` (float64)
    """
    if pred.shape != true.shape or pred.dim() < 2:
        raise ValueError(f"`pred` {tuple(pred.shape)} and `true` {tuple(true.shape)} must have one shape (..., B, N)")
    return (pred == true).to(torch.float64).mean(dim=(-1, -2))


def row_entropy(plan: Tensor) -> Tensor:
    """Mean Shannon entropy (nats) of the rows of a plan, each row normalised to sum to one.

    Parameters
    ----------
    plan : Tensor ``(..., N, M)``, nonnegative

    Returns
    -------
    Tensor ``(...)`` in ``[0, log M]``; ``log M`` exactly for the uniform plan, ``0`` for a
    permutation.
    """
    if not isinstance(plan, Tensor) or plan.dim() < 2:
        raise ValueError("`plan` must be a tensor of shape (..., N, M)")
    if bool((plan < 0).any()):
        raise ValueError("`plan` must be nonnegative")
    p = plan / plan.sum(-1, keepdim=True).clamp_min(torch.finfo(plan.dtype).tiny)
    h = -torch.special.xlogy(p, p).sum(-1)
    return h.mean(-1)


def collapse_epoch(entropy: Tensor, n: int, frac: float = 0.1) -> Tensor:
    """First epoch at which the mean row entropy falls below ``frac · log n`` (the collapse threshold).

    Parameters
    ----------
    entropy : Tensor ``(..., T)``
        Mean row entropy per epoch.
    n : int
        Plan size (the threshold is ``frac · log n``).
    frac : float in (0, 1)

    Returns
    -------
    LongTensor ``(...)``
        The first index ``t`` with ``entropy[..., t] < frac·log n``; ``-1`` if the trace never gets
        there (no collapse).
    """
    if n < 2:
        raise ValueError(f"`n` must be at least 2; got {n}")
    if not (0 < frac < 1):
        raise ValueError(f"`frac` must lie in (0, 1); got {frac}")
    if entropy.dim() < 1 or entropy.shape[-1] == 0:
        raise ValueError("`entropy` must have shape (..., T) with T >= 1")
    below = entropy < frac * math.log(n)
    T = entropy.shape[-1]
    idx = torch.arange(T, device=entropy.device).expand_as(below)
    first = torch.where(below, idx, torch.full_like(idx, T)).min(-1).values
    return torch.where(first == T, torch.full_like(first, -1), first)


def premature_collapse(t_collapse: Tensor, acc: Tensor, reference: Tensor, margin: float = 0.1) -> Tensor:
    """Premature mode collapse, made operational: the plan collapsed while its assignment was still
    clearly wrong.

    A run *collapses* at epoch ``t_c`` = :func:`collapse_epoch` (mean row entropy below
    ``0.1·log N``). The collapse is **premature** when, at ``t_c``, the model's assignment (Hungarian
    on its cost, which for a collapsed plan is the plan's own near-permutation) is correct on a
    fraction of rows smaller than the *reference* accuracy minus ``margin``: the plan has become
    near-hard while it still disagrees with the true assignment on a non-trivial fraction of rows
    beyond what the noise alone forces. The reference is the oracle accuracy ``acc(W = A)`` on the
    same problems (the Bayes ceiling) or, for "disagrees with the *matured* assignment", the run's
    final accuracy.

    Parameters
    ----------
    t_collapse : LongTensor ``(...)``
        From :func:`collapse_epoch` (``-1``: no collapse).
    acc : Tensor ``(..., T)``
        Accuracy per epoch.
    reference : Tensor ``(...)``
        Reference accuracy.
    margin : float
        Non-trivial fraction of rows, ``> 0``.

    Returns
    -------
    BoolTensor ``(...)``
    """
    if margin <= 0:
        raise ValueError(f"`margin` must be positive; got {margin}")
    at = acc_at(t_collapse, acc)
    return (t_collapse >= 0) & (at < reference - margin)


def acc_at(t: Tensor, trace: Tensor) -> Tensor:
    """``trace[..., t]`` (NaN where ``t == -1``)."""
    safe = t.clamp_min(0)
    v = torch.gather(trace, -1, safe[..., None])[..., 0].to(torch.float64)
    return torch.where(t >= 0, v, torch.full_like(v, float("nan")))


__all__.append("acc_at")


def row_argmax(plan: Tensor, rtol: float = 1e-9) -> Tensor:
    """Row-wise argmax that does not depend on round-off: the first column whose entry is within
    a relative ``rtol`` of the row maximum.

    Parameters
    ----------
    plan : Tensor ``(..., N, M)``, nonnegative
    rtol : float in [0, 1)

    Returns
    -------
    LongTensor ``(..., N)``
    """
    if not (0.0 <= rtol < 1.0):
        raise ValueError(f"`rtol` must lie in [0, 1); got {rtol!r}")
    if not isinstance(plan, Tensor) or plan.dim() < 2:
        raise ValueError("`plan` must be a tensor of shape (..., N, M)")
    m = plan.amax(-1, keepdim=True)
    near = (plan >= m * (1.0 - rtol)).to(torch.int8)
    return near.argmax(-1)  # torch returns the first maximal index


def plan_readouts(plan: Tensor, perm: Tensor) -> Dict[str, Tensor]:
    """Three ways to score a plan against the true assignment, and how far it is from a plan.

    Parameters
    ----------
    plan : Tensor ``(..., B, N, N)``, nonnegative
        The layer's output (unit row and column sums if the solver converged).
    perm : LongTensor ``(..., B, N)``
        True assignment ``π``: row ``i`` matches column ``π(i)``.

    Returns
    -------
    dict of Tensor ``(...)`` (float64)
        ``"hard"``: fraction of rows whose largest entry is at the true column (row-argmax of the
        plan, the layer's own hard output; not forced to be a permutation). Entries within a
        relative ``1e-9`` of the row maximum count as tied and the first of them is taken: an
        unconverged plan at small ``ε`` can hold several entries equal to one up to round-off,
        and the read-out must not depend on the last bit (:func:`row_argmax`);
        ``"soft"``: mean mass ``P_{i,π(i)}`` at the true pairs (rows normalised to sum to one);
        ``"row_err"``: largest ``|Σ_j P_ij − 1|`` over rows, averaged over the problems ``B``;
        ``"col_err"``: the same for the column sums.
    """
    if not isinstance(plan, Tensor) or plan.dim() < 3 or plan.shape[-1] != plan.shape[-2]:
        raise ValueError("`plan` must be a tensor of shape (..., B, N, N)")
    if not isinstance(perm, Tensor) or perm.shape != plan.shape[:-1]:
        raise ValueError(f"`perm` must have shape {tuple(plan.shape[:-1])}; got "
                         f"{tuple(perm.shape) if isinstance(perm, Tensor) else type(perm)}")
    P = plan.detach().to(torch.float64)
    rows = P.sum(-1)
    cols = P.sum(-2)
    hard = assignment_accuracy(row_argmax(P), perm)
    Pn = P / rows[..., None].clamp_min(torch.finfo(P.dtype).tiny)
    soft = torch.gather(Pn, -1, perm[..., None])[..., 0].mean(dim=(-1, -2))
    row_err = (rows - 1.0).abs().amax(-1).mean(-1)
    col_err = (cols - 1.0).abs().amax(-1).mean(-1)
    return {"hard": hard, "soft": soft, "row_err": row_err, "col_err": col_err}


class Replay:
    """An open-loop schedule that replays a recorded temperature sequence.

    The control for a closed-loop rule: replaying EPH-ASC's own ``ε_t`` without looking at the plans
    separates *what* temperatures were used from *how* they were chosen.

    Parameters
    ----------
    eps : sequence of float, length ``T``
        ``ε_t`` to use at step ``t``; after the last entry the last value is held.

    Attributes
    ----------
    eps : float
        The temperature to use now (the :class:`SchedulerLike` interface).
    """

    name = "replay"

    def __init__(self, eps: Sequence[float]):
        seq = [float(e) for e in (eps.tolist() if isinstance(eps, (Tensor, np.ndarray)) else eps)]
        if len(seq) == 0:
            raise ValueError("`eps` must not be empty")
        if not all(math.isfinite(e) and e > 0 for e in seq):
            raise ValueError("`eps` must contain positive finite temperatures")
        self._seq = seq
        self.reset()

    def reset(self) -> None:
        """Back to the first recorded temperature."""
        self.t = 0
        self.eps = self._seq[0]

    def eps_at(self, t: int) -> float:
        """The recorded ``ε_t`` (the last one for ``t ≥ T``)."""
        if t < 0:
            raise ValueError(f"`t` must be nonnegative; got {t}")
        return self._seq[min(t, len(self._seq) - 1)]

    def step(self, plan: Optional[Tensor] = None, *, cost: Optional[Tensor] = None) -> float:
        """Ignore the plan; advance to the next recorded temperature and return it."""
        self.t += 1
        self.eps = self.eps_at(self.t)
        return self.eps

    def __repr__(self) -> str:
        return f"Replay(T={len(self._seq)}, eps={self.eps:.4g}, t={self.t})"


# ----------------------------------------------------------------------------------------------
# scheduler statistics


def brake_after_brake(brake: Tensor) -> Tensor:
    """Per run, the fraction of held steps that directly follow a held step.

    After a hold, ``ε`` is unchanged, so the next drift ``‖P_{t+1} − P_t‖`` comes from the cost alone.
    On a fixed cost that drift is exactly zero (cold start, same ``ε``, same cost), so EPH-ASC never
    holds twice in a row (strict alternation, Chapter 13) and this fraction is 0. In training it
    measures how often the *cost* drift by itself exceeds ``k_safe·ε``.

    Parameters
    ----------
    brake : BoolTensor ``(..., T)``

    Returns
    -------
    Tensor ``(...)`` float64; NaN for runs with no hold before the last step.
    """
    b = brake.to(torch.bool)
    prev = b[..., :-1]
    both = (prev & b[..., 1:]).sum(-1).to(torch.float64)
    cnt = prev.sum(-1).to(torch.float64)
    return torch.where(cnt > 0, both / cnt.clamp_min(1), torch.full_like(cnt, float("nan")))


# ----------------------------------------------------------------------------------------------
# training


class SchedulerLike(Protocol):
    """The interface of :mod:`bistochastic.anneal` schedulers that :func:`train` needs."""

    eps: float

    def step(self, plan: Optional[Tensor] = None, *, cost: Optional[Tensor] = None) -> float: ...

    def reset(self) -> None: ...


@dataclass
class TrainResult:
    """Per-epoch traces of one scheduler over ``S`` seeds (all tensors float64 on the CPU).

    Epoch ``t`` describes the model *used* at epoch ``t`` (before that epoch's Adam step).

    Attributes
    ----------
    seeds : list of int
    eps : ``(S, T)``          temperature used at each epoch
    entropy : ``(S, T)``      mean row entropy of the training plan (nats)
    loss : ``(S, T)``         training loss
    grad_norm : ``(S, T)``    ``‖∂loss/∂W‖_F``
    train_acc : ``(S, T)``    Hungarian accuracy on the training problems
    test_acc : ``(S, T)``     Hungarian accuracy on the held-out problems (NaN between evaluations)
    brake : ``(S, T)`` bool   the scheduler held ε after observing epoch ``t``'s plan
    drift : ``(S, T)``        ``‖P_t - P_{t-1}‖_F`` over the training batch (NaN at ``t = 0``)
    final_test_acc : ``(S,)`` held-out accuracy of the final features
    final_train_acc : ``(S,)``
    oracle_train_acc, oracle_test_acc : ``(S,)``  accuracy of ``W = A``
    n : int                   plan size
    readout : dict of ``(S,)`` :func:`plan_readouts` of the layer's own output on the held-out
        problems with the final features, at the last temperature used (``eps[:, -1]``) and the
        training ``n_iter``: ``"hard"`` (row-argmax accuracy), ``"soft"`` (mass at the true pairs),
        ``"row_err"``, ``"col_err"`` (marginal errors of the plan)
    """

    seeds: List[int]
    eps: Tensor
    entropy: Tensor
    loss: Tensor
    grad_norm: Tensor
    train_acc: Tensor
    test_acc: Tensor
    brake: Tensor
    drift: Tensor
    final_test_acc: Tensor
    final_train_acc: Tensor
    oracle_train_acc: Tensor
    oracle_test_acc: Tensor
    n: int
    readout: Dict[str, Tensor] = field(default_factory=dict, repr=False)
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def collapse_epoch(self) -> Tensor:
        """``(S,)`` first epoch with mean row entropy ``< 0.1·log N`` (``-1``: none)."""
        return collapse_epoch(self.entropy, self.n)

    def acc_at_collapse(self, on: str = "train") -> Tensor:
        """``(S,)`` accuracy on the training (``"train"``) or held-out (``"test"``) problems at the
        collapse epoch (NaN without collapse, or if the held-out accuracy was not evaluated then)."""
        if on not in ("train", "test"):
            raise ValueError(f"`on` must be 'train' or 'test'; got {on!r}")
        return acc_at(self.collapse_epoch, self.train_acc if on == "train" else self.test_acc)

    def premature(self, margin: float = 0.1, on: str = "test",
                  reference: Union[str, Tensor] = "oracle") -> Tensor:
        """``(S,)`` :func:`premature_collapse`.

        ``on="train"`` is the paper's description to the letter: the collapsed training plan disagrees with the true
        assignment of its own problems. ``on="test"`` asks whether the *features* had matured: the
        held-out accuracy at the collapse epoch. ``reference`` is the oracle accuracy ``acc(W = A)``
        on the same problems (``"oracle"``), the run's own final accuracy (``"final"``), or a tensor
        ``(S,)`` given per seed, e.g. the same seed's final accuracy without annealing (a
        *budget-aware* reference: what the budget allows without collapse).
        """
        if on not in ("train", "test"):
            raise ValueError(f"`on` must be 'train' or 'test'; got {on!r}")
        trace = self.train_acc if on == "train" else self.test_acc
        if isinstance(reference, Tensor):
            if reference.shape != self.final_test_acc.shape:
                raise ValueError(f"`reference` must have shape {tuple(self.final_test_acc.shape)}; "
                                 f"got {tuple(reference.shape)}")
            return premature_collapse(self.collapse_epoch, trace, reference.to(torch.float64), margin)
        if reference not in ("oracle", "final"):
            raise ValueError(f"`reference` must be 'oracle', 'final' or a tensor; got {reference!r}")
        if on == "train":
            ref = self.oracle_train_acc if reference == "oracle" else self.final_train_acc
            trace = self.train_acc
        else:
            ref = self.oracle_test_acc if reference == "oracle" else self.final_test_acc
            trace = self.test_acc
        return premature_collapse(self.collapse_epoch, trace, ref, margin)

    def __repr__(self) -> str:
        S, T = self.eps.shape
        return (f"TrainResult(seeds={S}, epochs={T}, final_test_acc={float(self.final_test_acc.mean()):.3f}, "
                f"final_eps={float(self.eps[:, -1].mean()):.3g})")


def _brake_flags(sched: Any, T: int) -> tuple:
    """Brake flags and drifts from a scheduler's ``history`` (one entry per ``step`` call, in order,
    with list attributes ``brake`` and ``drift`` as in :class:`bistochastic.anneal.SchedulerHistory`)."""
    brake = np.zeros(T, dtype=bool)
    drift = np.full(T, np.nan)
    hist = getattr(sched, "history", None)
    br = getattr(hist, "brake", None)
    dr = getattr(hist, "drift", None)
    if br is not None:
        k = min(T, len(br))
        brake[:k] = np.asarray(list(br)[:k], dtype=bool)
    if dr is not None:
        k = min(T, len(dr))
        drift[:k] = np.asarray(list(dr)[:k], dtype=float)
    return brake, drift


def _run_batched(config: TaskConfig, scheds: List[SchedulerLike], data: PermutationData,
                 seed_index: List[int]) -> Dict[str, Tensor]:
    """Train ``R = len(scheds)`` independent models at once; run ``r`` uses replication
    ``seed_index[r]`` of ``data`` and its own scheduler ``scheds[r]``."""
    R, T, n = len(scheds), config.epochs, config.n
    idx = torch.tensor(seed_index, device=data.X.device)
    X, Y, perm = data.X[idx], data.Y[idx], data.perm[idx]
    Xt, Yt, pt = data.X_test[idx], data.Y_test[idx], data.perm_test[idx]
    W = torch.nn.Parameter(data.W0[idx].clone())
    opt = torch.optim.Adam([W], lr=config.lr)
    target = torch.nn.functional.one_hot(perm, n).to(config.dtype)  # (R, B, N, N)

    tr = {k: np.zeros((R, T)) for k in ("eps", "entropy", "loss", "grad_norm", "train_acc", "test_acc")}
    for t in range(T):
        eps = torch.tensor([float(s.eps) for s in scheds], dtype=config.dtype, device=X.device)
        if not bool((eps > 0).all()) or not bool(torch.isfinite(eps).all()):
            raise ValueError("a scheduler returned a non-positive or non-finite eps")
        C = matching_cost(X, Y, W)  # (R, B, N, N)
        res = project_dsm(-C / eps[:, None, None, None], tau=1.0, n_iter=config.n_iter, grad="unroll",
                          check_inputs=False)
        P = res.plan
        if config.loss == "nll":
            # log P_ij = f_i + g_j - C_ij/eps (project_dsm's potentials are in units of C/eps)
            logp = res.f + torch.gather(res.g, -1, perm) - torch.gather(C, -1, perm[..., None])[..., 0] / eps[:, None, None]
            loss_r = -logp.mean(dim=(-1, -2))
        else:
            loss_r = ((P - target) ** 2).sum(dim=(-1, -2)).mean(-1) / n
        opt.zero_grad(set_to_none=True)
        loss_r.sum().backward()
        gn = W.grad.detach().flatten(1).norm(dim=-1)
        with torch.no_grad():
            Pd = P.detach()
            tr["eps"][:, t] = eps.cpu().numpy()
            tr["entropy"][:, t] = row_entropy(Pd).mean(-1).cpu().numpy()
            tr["loss"][:, t] = loss_r.detach().cpu().numpy()
            tr["grad_norm"][:, t] = gn.cpu().numpy()
            tr["train_acc"][:, t] = assignment_accuracy(hungarian(C.detach()), perm).cpu().numpy()
            if t % config.eval_every == 0:
                tr["test_acc"][:, t] = assignment_accuracy(hungarian(matching_cost(Xt, Yt, W.detach())), pt).cpu().numpy()
            else:
                tr["test_acc"][:, t] = np.nan
        opt.step()
        Cd = C.detach()
        for r, s in enumerate(scheds):
            s.step(Pd[r], cost=Cd[r])
    with torch.no_grad():
        out = {k: torch.from_numpy(v) for k, v in tr.items()}
        out["final_test_acc"] = assignment_accuracy(hungarian(matching_cost(Xt, Yt, W.detach())), pt).cpu()
        out["final_train_acc"] = assignment_accuracy(hungarian(matching_cost(X, Y, W.detach())), perm).cpu()
        A = data.A[idx]
        out["oracle_train_acc"] = assignment_accuracy(hungarian(matching_cost(X, Y, A)), perm).cpu()
        out["oracle_test_acc"] = assignment_accuracy(hungarian(matching_cost(Xt, Yt, A)), pt).cpu()
        out["W"] = W.detach().cpu()
        eps_last = torch.as_tensor(tr["eps"][:, -1], dtype=config.dtype, device=X.device)
        Ct = matching_cost(Xt, Yt, W.detach())
        Pt = project_dsm(-Ct / eps_last[:, None, None, None], tau=1.0, n_iter=config.n_iter, grad="none",
                         check_inputs=False).plan
        for k, v in plan_readouts(Pt, pt).items():
            out["readout_" + k] = v.cpu()
    br = np.zeros((R, T), dtype=bool)
    dr = np.full((R, T), np.nan)
    for r, s in enumerate(scheds):
        br[r], dr[r] = _brake_flags(s, T)
    out["brake"] = torch.from_numpy(br)
    out["drift"] = torch.from_numpy(dr)
    return out


def train_many(config: TaskConfig, schedulers: Mapping[str, SchedulerLike],
               seeds: Union[int, Sequence[int]]) -> Dict[str, TrainResult]:
    """Train one model per (scheduler, seed) pair, all batched together.

    Parameters
    ----------
    config : TaskConfig
    schedulers : mapping name -> scheduler, or name -> list of schedulers (one per seed)
        Prototypes: each run gets ``copy.deepcopy(prototype)`` followed by ``reset()``, so the
        prototypes are not modified. A list gives seed ``k`` its own prototype ``list[k]`` (e.g.
        :class:`Replay` of that seed's recorded temperatures). A scheduler exposes ``eps`` (the ε to use now) and
        ``step(plan, *, cost=None) -> next eps`` (:class:`SchedulerLike`); ``plan`` is the detached
        training plan ``(batch, N, N)`` with unit row and column sums and ``cost`` the matching cost
        ``C`` of the same shape (the plan is ``project_dsm(-C/ε)``, i.e. ``sinkhorn(C, ε)`` with
        unit marginals).
    seeds : int or sequence of int
        Replications; every scheduler sees the same replications (paired comparison).

    Returns
    -------
    dict name -> TrainResult
    """
    if not isinstance(schedulers, Mapping) or len(schedulers) == 0:
        raise ValueError("`schedulers` must be a non-empty mapping name -> scheduler")
    if isinstance(seeds, (int, np.integer)):
        seeds = [int(seeds)]
    seeds = [int(s) for s in seeds]
    data = make_data(config, seeds)
    names = list(schedulers)
    scheds: List[SchedulerLike] = []
    seed_index: List[int] = []
    for name in names:
        protos = schedulers[name]
        if isinstance(protos, (list, tuple)):
            if len(protos) != len(seeds):
                raise ValueError(f"scheduler list {name!r} has {len(protos)} entries for {len(seeds)} seeds")
        else:
            protos = [protos] * len(seeds)
        for proto in protos:
            if not (hasattr(proto, "eps") and callable(getattr(proto, "step", None))):
                raise ValueError(f"scheduler {name!r} must have an `eps` attribute and a `step` method")
        for k in range(len(seeds)):
            s = copy.deepcopy(protos[k])
            if callable(getattr(s, "reset", None)):
                s.reset()
            scheds.append(s)
            seed_index.append(k)
    threads = torch.get_num_threads()
    on_cpu = torch.device(config.device).type == "cpu"
    if on_cpu and config.cpu_threads is not None:
        torch.set_num_threads(config.cpu_threads)
    try:
        out = _run_batched(config, scheds, data, seed_index)
    finally:
        if on_cpu and config.cpu_threads is not None:
            torch.set_num_threads(threads)
    S = len(seeds)
    results: Dict[str, TrainResult] = {}
    for j, name in enumerate(names):
        sl = slice(j * S, (j + 1) * S)
        results[name] = TrainResult(
            seeds=list(seeds), eps=out["eps"][sl], entropy=out["entropy"][sl], loss=out["loss"][sl],
            grad_norm=out["grad_norm"][sl], train_acc=out["train_acc"][sl], test_acc=out["test_acc"][sl],
            brake=out["brake"][sl], drift=out["drift"][sl], final_test_acc=out["final_test_acc"][sl],
            final_train_acc=out["final_train_acc"][sl], oracle_train_acc=out["oracle_train_acc"][sl],
            oracle_test_acc=out["oracle_test_acc"][sl], n=config.n,
            readout={k[8:]: out[k][sl] for k in out if k.startswith("readout_")},
            extra={"W": out["W"][sl], "schedulers": scheds[sl]},
        )
    return results


def train(config: TaskConfig, scheduler: SchedulerLike, seed: Union[int, Sequence[int]] = 0) -> TrainResult:
    """Train the permutation model under one scheduler (one run per seed, batched).

    Parameters
    ----------
    config : TaskConfig
    scheduler : SchedulerLike
        Prototype (copied per seed, not modified).
    seed : int or sequence of int

    Returns
    -------
    TrainResult
        Traces of shape ``(S, epochs)``.
    """
    return train_many(config, {"run": scheduler}, seed)["run"]


# ----------------------------------------------------------------------------------------------
# a task that needs annealing: learning to sort noisy keys, minibatch training


@dataclass(frozen=True)
class SortingConfig:
    """Sizes and optimiser settings of the noisy-key sorting task (:func:`train_sorting_many`).

    A problem is ``N`` items with hidden keys ``v_i ~ N(0, 1)``. Each item is seen only through a
    feature vector ``x_i = v_i·u + σ·ξ_i + ν_i`` (``u`` a hidden unit direction of the
    replication, ``ξ_i`` isotropic noise, ``ν_i`` nuisance noise of scale ``nuisance`` in the
    directions orthogonal to ``u``). The model scores items by ``s_i = ⟨w, x_i⟩`` with a learned
    ``w ∈ R^d``, standardises the scores within the problem (zero mean, unit variance: the layer
    cannot sharpen its plan by growing ``w``, so the temperature alone sets the sharpness) and
    matches them to standardised ranks ``r_j`` by the cost ``C_ij = −s_i r_j``. The head is
    ``n_iter`` cold log-domain Sinkhorn sweeps at temperature ``ε``; the target is the rank
    permutation of the true keys, and the loss is ``"nll"``, ``−mean_i log P_{i,rank(i)}``, or
    ``"mse"``, ``‖P − Π‖_F² / N`` (a loss that saturates once the plan is hard).

    Attributes
    ----------
    n, d : int
        Items per problem and feature dimension.
    batch : int
        Fresh problems per training step (minibatch; a new batch every step).
    probe_batch : int
        Problems of the fixed probe batch on which closed-loop rules measure their drift.
    test_batch : int
        Held-out problems.
    sigma : float
        Key noise ``σ`` along every direction.
    nuisance : float
        Scale of the nuisance noise orthogonal to ``u``.
    steps : int
        Training steps.
    lr : float
        Adam learning rate.
    n_iter : int
        Sinkhorn sweeps of the head.
    loss : {"nll", "mse"}
    dtype, device, cpu_threads : as :class:`TaskConfig`.
    """

    n: int = 16
    d: int = 8
    batch: int = 32
    probe_batch: int = 16
    test_batch: int = 256
    sigma: float = 0.05
    nuisance: float = 1.0
    steps: int = 200
    lr: float = 0.05
    n_iter: int = 20
    loss: str = "nll"
    dtype: torch.dtype = torch.float64
    device: str = "cpu"
    cpu_threads: Optional[int] = 1

    def __post_init__(self) -> None:
        if self.loss not in ("nll", "mse"):
            raise ValueError(f"`loss` must be 'nll' or 'mse'; got {self.loss!r}")
        for name in ("n", "d", "batch", "probe_batch", "test_batch", "steps", "n_iter"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {v!r}")
        if self.n < 2 or self.d < 2:
            raise ValueError(f"`n` and `d` must be at least 2; got {self.n}, {self.d}")
        for name in ("sigma", "nuisance", "lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"`{name}` must be a nonnegative finite number; got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"`lr` must be positive; got {self.lr!r}")
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"`dtype` must be torch.float32 or torch.float64; got {self.dtype}")


def _sorting_problems(u: Tensor, count: int, cfg: SortingConfig, g: torch.Generator) -> tuple:
    n, d = cfg.n, u.shape[-1]
    v = torch.randn(count, n, generator=g, dtype=u.dtype)
    xi = torch.randn(count, n, d, generator=g, dtype=u.dtype)
    nu = torch.randn(count, n, d, generator=g, dtype=u.dtype)
    nu = nu - (nu @ u)[..., None] * u  # orthogonal to u
    X = v[..., None] * u + cfg.sigma * xi + cfg.nuisance * nu
    rank = torch.argsort(torch.argsort(v, dim=-1), dim=-1)  # rank[i]: position of item i
    return X, rank


def _std(x: Tensor) -> Tensor:
    x = x - x.mean(-1, keepdim=True)
    return x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(torch.finfo(x.dtype).tiny)


def sorting_cost(X: Tensor, w: Tensor) -> Tensor:
    """The sorting head's cost ``C_ij = −s_i r_j`` with standardised scores and ranks.

    Parameters
    ----------
    X : Tensor ``(..., B, N, d)``
    w : Tensor ``(..., d)``
        Broadcast over the problem dim ``B``.

    Returns
    -------
    Tensor ``(..., B, N, N)``
    """
    if X.shape[-1] != w.shape[-1]:
        raise ValueError(f"`X` {tuple(X.shape)} and `w` {tuple(w.shape)} disagree on d")
    s = _std((X @ w[..., None, :, None])[..., 0])
    n = X.shape[-2]
    r = _std(torch.arange(n, dtype=X.dtype, device=X.device))
    return -s[..., :, None] * r


@dataclass
class SortingResult:
    """Traces and final read-outs of one scheduler over ``S`` seeds (CPU float64).

    Attributes
    ----------
    seeds : list of int
    eps : ``(S, T)``           temperature used at each step
    loss : ``(S, T)``          training loss
    brake : ``(S, T)`` bool    the scheduler held ε (from its ``history``, else False)
    exact_argsort : ``(S,)``   fraction of held-out problems sorted exactly by the scores'
                               argsort (the ε-free read-out, the analogue of Hungarian)
    exact_hard : ``(S,)``      fraction sorted exactly by the row-argmax of the plan at the last
                               temperature (the layer's own hard output)
    readout : dict of ``(S,)`` :func:`plan_readouts` of the held-out plan (``hard``: fraction of
                               rows right; ``soft``; ``row_err``; ``col_err``)
    w : ``(S, d)``             final weights
    """

    seeds: List[int]
    eps: Tensor
    loss: Tensor
    brake: Tensor
    exact_argsort: Tensor
    exact_hard: Tensor
    readout: Dict[str, Tensor]
    w: Tensor


def train_sorting_many(config: SortingConfig, schedulers: Mapping[str, Any],
                       seeds: Union[int, Sequence[int]],
                       feed: Optional[Mapping[str, str]] = None) -> Dict[str, SortingResult]:
    """Train the sorting model under several schedulers × seeds, batched, with minibatches.

    Every step draws a fresh minibatch (the same one for every scheduler of a seed: paired). Each
    scheduler then gets ``sched.step(plan)`` with the plan computed at ``sched.eps`` on a
    **fixed probe batch** (no gradient; ``feed[name] = "probe"``, the default), so that
    closed-loop rules see the drift of the model, not the change of data; or, with
    ``feed[name] = "train"``, the detached plan of the training minibatch (the released usage,
    which compares plans of different samples).

    Parameters
    ----------
    config : SortingConfig
    schedulers : mapping name -> scheduler or list of per-seed schedulers (as :func:`train_many`)
    seeds : int or sequence of int
    feed : mapping name -> {"probe", "train"}, optional

    Returns
    -------
    dict name -> SortingResult
    """
    if not isinstance(schedulers, Mapping) or len(schedulers) == 0:
        raise ValueError("`schedulers` must be a non-empty mapping name -> scheduler")
    feed = dict(feed or {})
    for k, v in feed.items():
        if k not in schedulers or v not in ("probe", "train"):
            raise ValueError(f"`feed` entries must name a scheduler and be 'probe' or 'train'; "
                             f"got {k!r}: {v!r}")
    if isinstance(seeds, (int, np.integer)):
        seeds = [int(seeds)]
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("`seeds` must not be empty")
    cfg, S, n, d = config, len(seeds), config.n, config.d
    dev, dt = torch.device(cfg.device), cfg.dtype
    # per seed: direction u, initial w, probe and test problems (CPU generators)
    us, w0s, probe, test = [], [], [], []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        u = torch.randn(d, generator=g, dtype=dt)
        u = u / u.norm()
        us.append(u)
        w0s.append(torch.randn(d, generator=g, dtype=dt) / math.sqrt(d))
        probe.append(_sorting_problems(u, cfg.probe_batch, cfg, g))
        test.append(_sorting_problems(u, cfg.test_batch, cfg, g))
    names = list(schedulers)
    scheds, seed_idx, modes = [], [], []
    for name in names:
        protos = schedulers[name]
        if isinstance(protos, (list, tuple)):
            if len(protos) != S:
                raise ValueError(f"scheduler list {name!r} has {len(protos)} entries for {S} seeds")
        else:
            protos = [protos] * S
        for k in range(S):
            if not (hasattr(protos[k], "eps") and callable(getattr(protos[k], "step", None))):
                raise ValueError(f"scheduler {name!r} must have an `eps` attribute and a `step` method")
            sc = copy.deepcopy(protos[k])
            if callable(getattr(sc, "reset", None)):
                sc.reset()
            scheds.append(sc)
            seed_idx.append(k)
            modes.append(feed.get(name, "probe"))
    R, T = len(scheds), cfg.steps
    idx = torch.tensor(seed_idx)
    U = torch.stack(us).to(dev)
    Xp = torch.stack([p[0] for p in probe]).to(dev)[idx]
    Xt = torch.stack([t[0] for t in test]).to(dev)[idx]
    rank_t = torch.stack([t[1] for t in test]).to(dev)[idx]
    w = torch.nn.Parameter(torch.stack(w0s).to(dev)[idx].clone())
    opt = torch.optim.Adam([w], lr=cfg.lr)
    gens = [torch.Generator().manual_seed(10_000_019 * (s + 1)) for s in seeds]
    eps_tr = np.zeros((R, T))
    loss_tr = np.zeros((R, T))
    threads = torch.get_num_threads()
    if dev.type == "cpu" and cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        for t in range(T):
            batch = [_sorting_problems(U[k].cpu(), cfg.batch, cfg, gens[k]) for k in range(S)]
            X = torch.stack([b[0] for b in batch]).to(dev)[idx]
            rank = torch.stack([b[1] for b in batch]).to(dev)[idx]
            eps = torch.tensor([float(sc.eps) for sc in scheds], dtype=dt, device=dev)
            if not bool((eps > 0).all()) or not bool(torch.isfinite(eps).all()):
                raise ValueError("a scheduler returned a non-positive or non-finite eps")
            C = sorting_cost(X, w)
            res = project_dsm(-C / eps[:, None, None, None], tau=1.0, n_iter=cfg.n_iter,
                              grad="unroll", check_inputs=False)
            if cfg.loss == "nll":
                logp = (res.f + torch.gather(res.g, -1, rank)
                        - torch.gather(C, -1, rank[..., None])[..., 0] / eps[:, None, None])
                loss_r = -logp.mean(dim=(-1, -2))
            else:
                target = torch.nn.functional.one_hot(rank, n).to(dt)
                loss_r = ((res.plan - target) ** 2).sum(dim=(-1, -2)).mean(-1) / n
            opt.zero_grad(set_to_none=True)
            loss_r.sum().backward()
            opt.step()
            eps_tr[:, t] = eps.cpu().numpy()
            loss_tr[:, t] = loss_r.detach().cpu().numpy()
            with torch.no_grad():
                Cp = sorting_cost(Xp, w.detach())
                Pp = project_dsm(-Cp / eps[:, None, None, None], tau=1.0, n_iter=cfg.n_iter,
                                 grad="none", check_inputs=False).plan
                Ptr = res.plan.detach()
            for r, sc in enumerate(scheds):
                sc.step(Pp[r] if modes[r] == "probe" else Ptr[r])
    finally:
        if dev.type == "cpu" and cfg.cpu_threads is not None:
            torch.set_num_threads(threads)
    with torch.no_grad():
        wd = w.detach()
        Ct = sorting_cost(Xt, wd)
        eps_last = torch.as_tensor(eps_tr[:, -1], dtype=dt, device=dev)
        Pt = project_dsm(-Ct / eps_last[:, None, None, None], tau=1.0, n_iter=cfg.n_iter,
                         grad="none", check_inputs=False).plan
        ro = {k: v.cpu() for k, v in plan_readouts(Pt, rank_t).items()}
        s_score = (Xt @ wd[:, None, :, None])[..., 0]
        pos = torch.argsort(torch.argsort(s_score, dim=-1), dim=-1)
        exact_argsort = (pos == rank_t).all(-1).double().mean(-1).cpu()
        exact_hard = (row_argmax(Pt) == rank_t).all(-1).double().mean(-1).cpu()
    brake = np.zeros((R, T), dtype=bool)
    for r, sc in enumerate(scheds):
        brake[r] = _brake_flags(sc, T)[0]
    out: Dict[str, SortingResult] = {}
    for j, name in enumerate(names):
        sl = slice(j * S, (j + 1) * S)
        out[name] = SortingResult(
            seeds=list(seeds), eps=torch.from_numpy(eps_tr[sl]), loss=torch.from_numpy(loss_tr[sl]),
            brake=torch.from_numpy(brake[sl]), exact_argsort=exact_argsort[sl],
            exact_hard=exact_hard[sl], readout={k: v[sl] for k, v in ro.items()},
            w=wd[sl].cpu())
    return out


__all__ += ["SortingConfig", "SortingResult", "sorting_cost", "train_sorting_many"]
