"""ε-annealing schedules for Sinkhorn layers: open-loop schedules, EPH-ASC and a law-enforcing rule.

A Sinkhorn layer computes a plan ``P_t = Sinkhorn(C_t, ε_t)`` at every training step ``t``. A
*scheduler* owns ``ε`` and is used like a ``torch.optim.lr_scheduler``: read :attr:`Scheduler.eps`
(or :meth:`Scheduler.get_last_eps`) for the current step, call :meth:`Scheduler.step` once per
step, save and restore it with :meth:`Scheduler.state_dict` / :meth:`Scheduler.load_state_dict`.

**The probe batch.** The closed-loop rules (:class:`EPHASC`, :class:`SpeedLimit`) decide from the
*drift* of the plan between two steps. In a minibatch loop, the plans of two training batches
describe different samples, so their difference is sample noise, not drift: fed training-batch
plans, EPH-ASC brakes on almost every step and never anneals. The drift must be measured on a
**fixed probe batch** that the user declares once: either pass ``probe_fn`` (a callable
``eps -> plan`` that computes the plan of the fixed probe batch with the *current* model at
temperature ``eps``; :func:`make_probe` builds one from a cost function), and call ``step()``
without arguments; or compute that plan yourself and call ``step(plan)``. Either way the plan
handed over must always be the plan of the same samples. Example (runnable; a test executes it)::

    import torch
    import bistochastic as bs

    g = torch.Generator().manual_seed(0)
    N, d, B = 8, 8, 16
    W = torch.nn.Parameter(torch.eye(d) + 0.3 * torch.randn(d, d, generator=g))
    opt = torch.optim.SGD([W], lr=0.05)

    def draw(n):  # features X, targets Y = a noisy permutation of X, and that permutation
        X = torch.randn(n, N, d, generator=g)
        perm = torch.argsort(torch.rand(n, N, generator=g), dim=-1)
        Y = X.gather(1, perm[..., None].expand(n, N, d))
        return X, Y + 0.5 * torch.randn(n, N, d, generator=g), perm

    def cost(X, Y):  # C[b, j, i] = -<W x_i, y_j>/sqrt(d): row j of the plan picks x_perm[j]
        return -(Y @ (X @ W).transpose(1, 2)) / d ** 0.5

    Xp, Yp, _ = draw(32)  # the fixed probe batch, declared once
    sched = bs.anneal.EPHASC(eps0=1.0, alpha=0.95, eps_min=0.05, k_safe=0.5,
                             probe_fn=bs.anneal.make_probe(lambda: cost(Xp, Yp)))
    for step in range(200):  # an ordinary minibatch loop: fresh samples every step
        X, Y, perm = draw(B)
        P = bs.project_dsm(-cost(X, Y), tau=sched.eps, n_iter=20).plan
        loss = -P.gather(-1, perm[..., None]).clamp_min(1e-9).log().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()  # measures the drift on the probe batch, returns the next eps
    print(f"eps = {sched.get_last_eps():.3f}, braked {sum(sched.history.brake)} times")

Every decision is logged in :attr:`Scheduler.history` (ε, drift, the bound the drift was tested
against, brake/cool, the step; ``history.records()`` gives one dict per step), and ``logger=`` (a
callable taking that dict) forwards each record, e.g. to TensorBoard. Open-loop schedules need no
plan: ``step()`` just advances them (a plan, if given or probed, only has its drift logged).

Conventions
-----------
* ``ε_t`` is the value *used* at step ``t``; ``δ_t = ε_t − ε_{t+1}`` is the step taken after it.
* The *drift* observed at step ``t`` is ``‖Δ_t‖ = ‖P_t − P_{t−1}‖`` (``nan`` at the first step). The
  *linear stability law* of Liu (2026) reads ``‖Δ_t‖ ≤ k·ε_t``, with ``ε_t`` the temperature of the
  newer plan (the released EPH-ASC compares with the current ε, which is what we do).
* Drift norms (:func:`plan_drift`), for plans of shape ``(B, N, M)`` or ``(N, M)``:

  - ``"batch"``: the Frobenius norm of the whole tensor ``P_t − P_{t−1}`` (the released rule). It
    grows like ``√B`` when the ``B`` samples drift alike, and like ``√N`` with ``N``.
  - ``"per_sample"``: the RMS over the batch of the per-sample Frobenius norms,
    ``(mean_b ‖P_t^b − P_{t−1}^b‖_F²)^{1/2}``; duplicating the batch leaves it unchanged.
  - ``"per_row"``: ``"per_sample"`` divided by ``√N`` and rescaled to unit row mass (times
    ``N / Σ_ij P``), i.e. the RMS over all rows of the ℓ2 drift of a row, as if every row summed to
    one. It lies in ``[0, √2]`` and does not grow with ``B`` or ``N``; the moving of a uniform row to
    a one-hot row costs ``(1 − 1/N)^{1/2} ≈ 1``. This is the norm in which one ``k`` can transfer
    between batch sizes and problem sizes.

Schedulers
----------
Open loop (the plan is only used to log the drift): :class:`Constant`, :class:`Exponential`,
:class:`Linear`, :class:`Hyperbolic` (``ε_t = ε₀/(1 + kε₀t)``, the solution of ``dε/dt = −kε²``),
:class:`POTScaling` (POT's ε-scaling ``ε_t = (ε₀ − ε_∞)e^{−rt} + ε_∞``) and :class:`OTTScaling`
(OTT-JAX's ``ε_t = max(init·decay^t, 1)·target``).

Closed loop: :class:`EPHASC`, the rule of the released EPH-ASC code as we describe it (cool
exponentially, hold ε whenever the drift exceeds ``k_safe·ε``), and :class:`SpeedLimit`, which
shrinks the step instead of pausing so that the law holds on every step.

Also here: :func:`make_probe` (the probe-batch callable), :func:`run_schedule` (drive a scheduler on a fixed cost or a stream of costs, with an
optional converged reference for the tracking error), :func:`calibrate_k_safe` (our reconstruction
of the offline "QSA" oracle, with a worst-case-bound method and a method that simulates the
tracking error directly), :func:`sinkhorn_gap` (the spectral gap of the Sinkhorn map by a dense
eigen-solve) and :func:`time_overhead` / :func:`overhead_flops` (the cost of the online test).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Literal, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ._checks import positive_finite
from .sinkhorn import SinkhornWarning, sinkhorn

__all__ = [
    "DriftNorm",
    "plan_drift",
    "make_probe",
    "SchedulerHistory",
    "Scheduler",
    "Constant",
    "Exponential",
    "Linear",
    "Hyperbolic",
    "POTScaling",
    "OTTScaling",
    "EPHASC",
    "SpeedLimit",
    "ScheduleRun",
    "run_schedule",
    "solve_plan",
    "row_entropy",
    "sinkhorn_gap",
    "CalibrationResult",
    "calibrate_k_safe",
    "overhead_flops",
    "time_overhead",
]

DriftNorm = Literal["batch", "per_sample", "per_row"]
_NORMS = ("batch", "per_sample", "per_row")


# ----------------------------------------------------------------------------------------------
# validation helpers


_pos = positive_finite


def _unit(name: str, x) -> float:
    v = _pos(name, x)
    if not v < 1:
        raise ValueError(f"`{name}` must lie in (0, 1); got {x!r}")
    return v


def _norm_name(drift_norm: str) -> str:
    if drift_norm not in _NORMS:
        raise ValueError(f"`drift_norm` must be one of {_NORMS}; got {drift_norm!r}")
    return drift_norm


def _check_plan(name: str, P) -> Tensor:
    if not isinstance(P, Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor of shape (B, N, M) or (N, M)")
    if P.dim() < 2 or P.shape[-1] == 0 or P.shape[-2] == 0:
        raise ValueError(f"`{name}` must have shape (..., N, M) with N, M > 0; got {tuple(P.shape)}")
    if not P.dtype.is_floating_point:
        raise ValueError(f"`{name}` must have a floating dtype; got {P.dtype}")
    return P


# ----------------------------------------------------------------------------------------------
# drift


def plan_drift(plan: Tensor, prev: Tensor, norm: DriftNorm = "per_row") -> float:
    """The drift ``‖plan − prev‖`` in one of the norms of the module docstring.

    Parameters
    ----------
    plan, prev : Tensor ``(..., N, M)``
        Two plans of the same shape (leading dims are the batch).
    norm : {"batch", "per_sample", "per_row"}

    Returns
    -------
    float
        One scalar (one host sync). Cost: one pass over ``B·N·M`` entries.
    """
    _norm_name(norm)
    _check_plan("plan", plan)
    _check_plan("prev", prev)
    if plan.shape != prev.shape:
        raise ValueError(
            f"`plan` has shape {tuple(plan.shape)} but the previous plan had {tuple(prev.shape)}; "
            "the drift compares plans of the same batch layout (drop the last incomplete batch)"
        )
    D = (plan.detach() - prev.detach().to(plan.dtype)).reshape(-1, plan.shape[-2], plan.shape[-1])
    sq = (D * D).sum(dim=(-1, -2))  # (B,)
    if norm == "batch":
        return float(sq.sum().sqrt())
    ps = float(sq.mean().sqrt())
    if norm == "per_sample":
        return ps
    n = plan.shape[-2]
    mass = float(prev.detach().reshape(-1, n, plan.shape[-1]).sum(dim=(-1, -2)).mean())
    if not mass > 0:
        raise ValueError("`prev` must have positive total mass for the 'per_row' drift norm")
    return ps / math.sqrt(n) * (n / mass)


# ----------------------------------------------------------------------------------------------
# scheduler interface


@dataclass
class SchedulerHistory:
    """What a scheduler did, one entry per :meth:`Scheduler.step` call.

    Attributes
    ----------
    eps : list of float
        ``ε_t``, the temperature at which the observed plan was computed.
    drift : list of float
        ``‖P_t − P_{t−1}‖`` in the scheduler's drift norm (``nan`` when there is no previous plan
        or no plan was given).
    brake : list of bool
        True when the rule held ε (EPH-ASC) or throttled the step below ``(1−α)ε`` (SpeedLimit).
    step : list of float
        ``δ_t = ε_t − ε_{t+1}``, the decrease applied after this step.
    sensitivity : list of float
        For :class:`SpeedLimit`: the estimate ``ŝ_t`` of ``ε‖∂P*/∂ε‖`` used to size the next step
        (``nan`` elsewhere).
    bound : list of float
        The drift bound the rule tested at this step: ``k_safe·ε_t`` for :class:`EPHASC` (a drift
        above it brakes), the law ``k·ε_t`` for :class:`SpeedLimit`; ``nan`` for open-loop
        schedules.
    """

    eps: List[float] = field(default_factory=list)
    drift: List[float] = field(default_factory=list)
    brake: List[bool] = field(default_factory=list)
    step: List[float] = field(default_factory=list)
    sensitivity: List[float] = field(default_factory=list)
    bound: List[float] = field(default_factory=list)

    def as_arrays(self) -> Dict[str, np.ndarray]:
        """The lists as numpy arrays (``brake`` as bool)."""
        return {
            "eps": np.asarray(self.eps, dtype=float),
            "drift": np.asarray(self.drift, dtype=float),
            "brake": np.asarray(self.brake, dtype=bool),
            "step": np.asarray(self.step, dtype=float),
            "sensitivity": np.asarray(self.sensitivity, dtype=float),
            "bound": np.asarray(self.bound, dtype=float),
        }

    def records(self) -> List[Dict[str, object]]:
        """One dict per step: ``t``, ``eps``, ``next_eps``, ``drift``, ``bound``, ``brake``,
        ``step``, ``sensitivity`` and ``decision`` (``"cool"``, ``"brake"`` or ``"hold"``)."""
        return [_record(self, i) for i in range(len(self.eps))]

    def pattern(self) -> str:
        """The decisions as a string: ``c`` for a cooling step, ``B`` for a brake, ``-`` for a step
        that neither cooled nor braked (the first EPH-ASC call, or ε already at its floor)."""
        out = []
        for b, d in zip(self.brake, self.step):
            out.append("B" if b else ("c" if d > 0 else "-"))
        return "".join(out)

    def __len__(self) -> int:
        return len(self.eps)


_HIST_FIELDS = ("eps", "drift", "brake", "step", "sensitivity", "bound")


def _record(h: SchedulerHistory, i: int) -> Dict[str, object]:
    brake, d = h.brake[i], h.step[i]
    return {"t": i, "eps": h.eps[i], "next_eps": h.eps[i] - d, "drift": h.drift[i],
            "bound": h.bound[i], "brake": brake, "step": d, "sensitivity": h.sensitivity[i],
            "decision": "brake" if brake else ("cool" if d > 0 else "hold")}


def make_probe(cost_fn: Callable[[], Tensor], *, n_iter: int = 20,
               with_cost: bool = False) -> Callable[[float], Union[Tensor, tuple]]:
    """A probe for the closed-loop schedulers: ``eps -> plan`` of a fixed probe batch.

    Parameters
    ----------
    cost_fn : callable ``() -> Tensor (B, N, N)``
        Returns the cost of the *fixed* probe batch under the current model (it is called once per
        step, under ``torch.no_grad()``). The probe batch must not change between calls.
    n_iter : int
        Cold-start Sinkhorn sweeps (unit marginals, log domain), as in the layer.
    with_cost : bool
        Return ``(plan, cost)`` instead of the plan, for ``SpeedLimit(separate_cost_drift=True)``.

    Returns
    -------
    callable ``eps -> Tensor (B, N, N)`` (or ``(plan, cost)``), to pass as ``probe_fn=``.
    """
    if not callable(cost_fn):
        raise TypeError("`cost_fn` must be a callable returning the probe batch's cost")
    if int(n_iter) != n_iter or n_iter < 1:
        raise ValueError(f"`n_iter` must be a positive integer; got {n_iter!r}")

    def probe(eps: float):
        with torch.no_grad():
            C = cost_fn()
            if not isinstance(C, Tensor):
                raise ValueError("`cost_fn` must return a torch.Tensor of shape (B, N, N)")
            C = C.detach()
            P = solve_plan(C, float(eps), n_iter=int(n_iter)).plan
        return (P, C) if with_cost else P

    return probe


class Scheduler:
    """Base class: owns ``eps`` and a :class:`SchedulerHistory`.

    Subclasses implement :meth:`_next` (and, for closed-form schedules, :meth:`eps_at`).

    Parameters
    ----------
    eps0 : float
        Initial temperature ``ε_0 > 0``.
    drift_norm : {"batch", "per_sample", "per_row"}
        The norm in which the drift is logged (and, for closed-loop rules, tested).
    probe_fn : callable ``eps -> Tensor (B, N, N)`` (or ``-> (plan, cost)``), optional
        The plan of a *fixed* probe batch at temperature ``eps`` under the current model (see the
        module docstring and :func:`make_probe`). When given, :meth:`step` is called without a
        plan and evaluates ``probe_fn(self.eps)`` itself (under ``torch.no_grad()``).
    logger : callable ``dict -> None``, optional
        Called after every step with the step's record (see :meth:`SchedulerHistory.records`).

    Notes
    -----
    Usage follows ``torch.optim.lr_scheduler``: ``eps`` / :meth:`get_last_eps` is the value to
    use now, :meth:`step` advances once per training step, :meth:`state_dict` /
    :meth:`load_state_dict` save and resume (the probe and the logger are not saved: pass them
    to the constructor again).
    """

    _TRANSIENT = ("probe_fn", "logger")

    name = "scheduler"

    def __init__(self, eps0: float, *, drift_norm: DriftNorm = "per_row",
                 probe_fn: Optional[Callable[[float], Union[Tensor, tuple]]] = None,
                 logger: Optional[Callable[[Dict[str, object]], None]] = None):
        self.eps0 = _pos("eps0", eps0)
        self.drift_norm = _norm_name(drift_norm)
        if probe_fn is not None and not callable(probe_fn):
            raise TypeError("`probe_fn` must be a callable eps -> plan of the fixed probe batch")
        if logger is not None and not callable(logger):
            raise TypeError("`logger` must be a callable taking one record (a dict)")
        self.probe_fn = probe_fn
        self.logger = logger
        self.reset()

    # -- public interface ----------------------------------------------------------------------
    def reset(self) -> None:
        """Back to ``ε_0``, empty history, no stored plan."""
        self.eps: float = self.eps0
        self.t: int = 0
        self.history = SchedulerHistory()
        self._prev: Optional[Tensor] = None
        self._prev_cost: Optional[Tensor] = None
        self._reset_state()

    def step(self, plan: Optional[Tensor] = None, *, cost: Optional[Tensor] = None) -> float:
        """Observe the (detached) plan computed at :attr:`eps` for this step and return the next ε.

        Parameters
        ----------
        plan : Tensor ``(B, N, N)`` or ``(N, N)``, optional
            The plan of this training step, computed at the current :attr:`eps`. Required by the
            closed-loop rules; open-loop schedules only log its drift.
        cost : Tensor, same shape as ``plan``, optional
            The cost of this step; used by :class:`SpeedLimit` with ``separate_cost_drift=True``.

        Returns
        -------
        float
            ``ε_{t+1}``, also stored in :attr:`eps`.

        With ``probe_fn`` set, call ``step()`` without a plan: the scheduler evaluates the probe
        batch at the current ``eps`` itself. Without it, ``plan`` must be the plan of the same
        fixed probe batch at every call (a training batch's plan compares different samples).
        """
        if self.probe_fn is not None:
            if plan is not None:
                raise ValueError("`plan` was given but the scheduler has a `probe_fn`; call step() "
                                 "without a plan (the probe batch's plan is computed internally)")
            with torch.no_grad():
                out = self.probe_fn(self.eps)
            if isinstance(out, tuple):
                if len(out) != 2:
                    raise ValueError("`probe_fn` must return a plan or a (plan, cost) pair")
                plan, pcost = out
                cost = pcost if cost is None else cost
            else:
                plan = out
            if not isinstance(plan, Tensor):
                raise ValueError("`probe_fn` must return a torch.Tensor plan of shape (B, N, N)")
        if plan is not None:
            plan = _check_plan("plan", plan).detach()
        if cost is not None:
            cost = _check_plan("cost", cost).detach()
            if plan is not None and cost.shape != plan.shape:
                raise ValueError(f"`cost` shape {tuple(cost.shape)} must match `plan` shape {tuple(plan.shape)}")
        drift = float("nan")
        if plan is not None and self._prev is not None:
            drift = plan_drift(plan, self._prev, self.drift_norm)
        eps_t = self.eps
        new_eps, brake, sens = self._next(plan, cost, drift)
        if not (math.isfinite(new_eps) and new_eps > 0):  # pragma: no cover - internal guard
            raise RuntimeError(f"scheduler produced an invalid eps {new_eps!r}")
        self.history.eps.append(eps_t)
        self.history.drift.append(drift)
        self.history.brake.append(bool(brake))
        self.history.step.append(eps_t - new_eps)
        self.history.sensitivity.append(float(sens))
        self.history.bound.append(float(self._bound(eps_t)))
        if plan is not None:
            self._prev = plan.clone()
        if cost is not None:
            self._prev_cost = cost.clone()
        self.eps = float(new_eps)
        self.t += 1
        if self.logger is not None:
            self.logger(_record(self.history, len(self.history) - 1))
        return self.eps

    def get_last_eps(self) -> float:
        """The temperature computed by the last :meth:`step` (``ε_0`` before the first): the ε to
        use at the current step (as ``get_last_lr`` of a learning-rate scheduler)."""
        return self.eps

    def state_dict(self) -> Dict[str, object]:
        """Everything needed to resume: ε, the step count, the stored previous plan (and cost),
        the rule's internal estimates, the hyper-parameters and the history.

        Plain Python numbers, lists, strings and tensors only, so ``torch.save`` /
        ``torch.load(..., weights_only=True)`` round-trip it. ``probe_fn`` and ``logger`` are not
        included (like the lambdas of ``LambdaLR``).
        """
        out: Dict[str, object] = {"__class__": type(self).__name__}
        for key, v in self.__dict__.items():
            if key in self._TRANSIENT:
                continue
            if key == "history":
                v = {f: list(getattr(v, f)) for f in _HIST_FIELDS}
            elif isinstance(v, Tensor):
                v = v.detach().clone()
            elif isinstance(v, list):
                v = list(v)
            out[key] = v
        return out

    def load_state_dict(self, state_dict: Dict[str, object]) -> None:
        """Restore a :meth:`state_dict` of the same scheduler class (in place)."""
        if not isinstance(state_dict, dict):
            raise TypeError("`state_dict` must be a dict returned by Scheduler.state_dict()")
        cls = state_dict.get("__class__")
        if cls != type(self).__name__:
            raise ValueError(f"`state_dict` was saved from {cls!r}, not {type(self).__name__!r}")
        for key, v in state_dict.items():
            if key == "__class__" or key in self._TRANSIENT:
                continue
            if key == "history":
                if not isinstance(v, dict) or set(v) != set(_HIST_FIELDS):
                    raise ValueError(f"`state_dict['history']` must have the fields {_HIST_FIELDS}")
                v = SchedulerHistory(**{f: list(v[f]) for f in _HIST_FIELDS})
            elif isinstance(v, Tensor):
                v = v.detach().clone()
            elif isinstance(v, list):
                v = list(v)
            setattr(self, key, v)

    def eps_at(self, t: Union[int, Sequence[int], np.ndarray]) -> np.ndarray:
        """The closed-form ``ε_t`` (open-loop schedules only)."""
        raise NotImplementedError(f"{type(self).__name__} has no closed form; it depends on the plans")

    # -- subclass hooks ------------------------------------------------------------------------
    def _reset_state(self) -> None:
        pass

    def _bound(self, eps: float) -> float:
        """The drift bound tested at temperature ``eps`` (nan for open-loop schedules)."""
        return float("nan")

    def _next(self, plan: Optional[Tensor], cost: Optional[Tensor], drift: float):
        """Return ``(eps_next, brake, sensitivity)``."""
        e = float(self.eps_at(self.t + 1))
        return e, False, float("nan")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps:.4g}, t={self.t})"


def _ts(t) -> np.ndarray:
    arr = np.asarray(t, dtype=float)
    if np.any(arr < 0) or not np.all(np.isfinite(arr)):
        raise ValueError(f"`t` must be nonnegative step indices; got {t!r}")
    return arr


class Constant(Scheduler):
    """``ε_t = ε_0``."""

    name = "constant"

    def eps_at(self, t):
        return np.full_like(_ts(t), self.eps0, dtype=float)


class Exponential(Scheduler):
    """``ε_t = max(ε_min, ε_0 α^t)``: the standard exponential cooling."""

    name = "exponential"

    def __init__(self, eps0: float = 1.0, alpha: float = 0.95, eps_min: float = 0.01, **kw):
        self.alpha = _unit("alpha", alpha)
        self.eps_min = _pos("eps_min", eps_min)
        if self.eps_min > _pos("eps0", eps0):
            raise ValueError(f"`eps_min` ({eps_min}) must not exceed `eps0` ({eps0})")
        super().__init__(eps0, **kw)

    def eps_at(self, t):
        return np.maximum(self.eps_min, self.eps0 * self.alpha ** _ts(t))


class Linear(Scheduler):
    """``ε_t = ε_0 + (ε_min − ε_0)·min(t/n_steps, 1)``."""

    name = "linear"

    def __init__(self, eps0: float = 1.0, eps_min: float = 0.01, n_steps: int = 100, **kw):
        self.eps_min = _pos("eps_min", eps_min)
        if self.eps_min > _pos("eps0", eps0):
            raise ValueError(f"`eps_min` ({eps_min}) must not exceed `eps0` ({eps0})")
        if int(n_steps) != n_steps or n_steps < 1:
            raise ValueError(f"`n_steps` must be a positive integer; got {n_steps!r}")
        self.n_steps = int(n_steps)
        super().__init__(eps0, **kw)

    def eps_at(self, t):
        s = np.minimum(_ts(t) / self.n_steps, 1.0)
        return self.eps0 + (self.eps_min - self.eps0) * s


class Hyperbolic(Scheduler):
    """``ε_t = max(ε_min, ε_0/(1 + kε_0 t))``, the solution of ``dε/dt = −kε²``.

    Its step is ``δ_t = kε_tε_{t+1} ≈ kε_t²``: the O(ε²) law with slope ``k``.
    """

    name = "hyperbolic"

    def __init__(self, eps0: float = 1.0, k: float = 1.0, eps_min: float = 0.01, **kw):
        self.k = _pos("k", k)
        self.eps_min = _pos("eps_min", eps_min)
        if self.eps_min > _pos("eps0", eps0):
            raise ValueError(f"`eps_min` ({eps_min}) must not exceed `eps0` ({eps0})")
        super().__init__(eps0, **kw)

    def eps_at(self, t):
        return np.maximum(self.eps_min, self.eps0 / (1.0 + self.k * self.eps0 * _ts(t)))


class POTScaling(Scheduler):
    """POT's ε-scaling (``ot.bregman.sinkhorn_epsilon_scaling``): ``ε_t = (ε_0 − ε_∞)e^{−rt} + ε_∞``.

    POT uses ``r = 1``; ``eps_target`` is its ``reg``.
    """

    name = "pot"

    def __init__(self, eps0: float = 1.0, eps_target: float = 0.01, rate: float = 1.0, **kw):
        self.eps_target = _pos("eps_target", eps_target)
        self.rate = _pos("rate", rate)
        if self.eps_target > _pos("eps0", eps0):
            raise ValueError(f"`eps_target` ({eps_target}) must not exceed `eps0` ({eps0})")
        super().__init__(eps0, **kw)

    def eps_at(self, t):
        return (self.eps0 - self.eps_target) * np.exp(-self.rate * _ts(t)) + self.eps_target


class OTTScaling(Scheduler):
    """OTT-JAX's ``Epsilon`` schedule: ``ε_t = max(init·decay^t, 1)·target``; ``ε_0 = init·target``."""

    name = "ott"

    def __init__(self, target: float = 0.01, init: float = 100.0, decay: float = 0.95, **kw):
        self.target = _pos("target", target)
        self.init = _pos("init", init)
        self.decay = _pos("decay", decay)
        if self.decay > 1:
            raise ValueError(f"`decay` must lie in (0, 1]; got {decay!r}")
        super().__init__(max(self.init, 1.0) * self.target, **kw)

    def eps_at(self, t):
        return np.maximum(self.init * self.decay ** _ts(t), 1.0) * self.target


# ----------------------------------------------------------------------------------------------
# closed-loop rules


class EPHASC(Scheduler):
    """The EPH-ASC rule as released (Liu 2026), re-implemented from its description.

    At every call after the first: ``drift = ‖P_t − P_{t−1}‖``; if ``drift > k_safe·ε_t`` the rule
    *brakes* (ε unchanged), else it *cools*, ``ε ← max(ε_min, αε)``. The first call only stores the
    plan (no cooling). There is no back-off, no smaller step and no minimum hold.

    Parameters
    ----------
    eps0, alpha, eps_min, k_safe : float
        Defaults of the released code: 1.0, 0.95, 0.01, 0.5.
    drift_norm : {"batch", "per_sample", "per_row"}
        ``"batch"`` (default) is the released test: the Frobenius norm of the whole batch tensor.
        ``"per_sample"`` / ``"per_row"`` make ``k_safe`` independent of the batch size (and of N).
    probe_fn, logger
        See :class:`Scheduler`. In a minibatch loop the drift must come from a fixed probe batch.
    """

    name = "eph-asc"

    def __init__(self, eps0: float = 1.0, alpha: float = 0.95, eps_min: float = 0.01,
                 k_safe: float = 0.5, *, drift_norm: DriftNorm = "batch", **kw):
        self.alpha = _unit("alpha", alpha)
        self.eps_min = _pos("eps_min", eps_min)
        self.k_safe = _pos("k_safe", k_safe)
        if self.eps_min > _pos("eps0", eps0):
            raise ValueError(f"`eps_min` ({eps_min}) must not exceed `eps0` ({eps0})")
        super().__init__(eps0, drift_norm=drift_norm, **kw)

    def _bound(self, eps: float) -> float:
        return self.k_safe * eps

    def _next(self, plan, cost, drift):
        if plan is None:
            raise ValueError("`plan` is required: EPH-ASC decides from the drift of the plan")
        if self._prev is None:  # first call: store, do not cool
            return self.eps, False, float("nan")
        if drift > self.k_safe * self.eps:
            return self.eps, True, float("nan")
        return max(self.eps_min, self.alpha * self.eps), False, float("nan")


class SpeedLimit(Scheduler):
    """A rule that enforces the linear law ``‖Δ_t‖ ≤ k·ε_t`` by shrinking the step (Chapter 13).

    The next step is ``δ_t = min((1−α)ε_t, δ_law)``, where ``δ_law`` solves
    ``ŝ_pred·δ/ε_t = m·k·(ε_t − δ)``, i.e. ``δ_law = m·k·ε_t² / (ŝ_pred + m·k·ε_t)``. Here
    ``ŝ_t ≈ ε_t‖∂P*/∂ε‖`` is the dimensionless ε-sensitivity, estimated online as
    ``ε_t · (ε-induced drift of the last step) / (last step)``; ``ŝ_pred = ŝ_t·max(1, ŝ_t/ŝ_{t−1})``
    extrapolates its growth over one step, and the margin ``m ∈ (0, 1]`` aims below the limit.
    Whenever the law binds the step is ``≈ m·k·ε²/ŝ``: an O(ε²) step. The very first step is a probe
    of ``probe·(1−α)ε_0``.

    With ``separate_cost_drift=True`` and the ``cost`` passed to :meth:`step`, the rule runs one extra
    ``n_iter``-sweep Sinkhorn pass at the previous ε on the new cost, splits the drift into a cost
    part ``‖P(C_t, ε_{t−1}) − P_{t−1}‖`` and an ε part ``‖P_t − P(C_t, ε_{t−1})‖``, and sizes the step
    from the ε part only (the part the schedule controls). Plans are assumed to come from cold-start
    ``n_iter``-sweep Sinkhorn with uniform marginals of the plan's row mass.

    Parameters
    ----------
    eps0, alpha, eps_min : float
        As :class:`Exponential`; ``(1−α)ε`` is the largest step ever taken.
    k : float
        The slope of the law, in the chosen drift norm.
    drift_norm : {"batch", "per_sample", "per_row"}
        Default ``"per_row"`` (see the module docstring): ``k`` does not scale with B or N.
    margin : float in (0, 1]
        Target drift ``margin·k·ε`` (default 0.5).
    probe : float in (0, 1]
        The first step is ``probe·(1−α)ε_0`` (default 0.1).
    smoothing : float in [0, 1)
        Exponential smoothing of ``ŝ`` when it *decreases* (increases are taken at once, so the
        estimate stays conservative). Default 0.
    separate_cost_drift : bool
        See above (default False).
    n_iter : int
        Sweeps of the extra pass (default 20).
    probe_fn, logger
        See :class:`Scheduler` (``probe`` above is the size of the first step, not the probe
        batch). In a minibatch loop the drift must come from a fixed probe batch; for
        ``separate_cost_drift`` let ``probe_fn`` return ``(plan, cost)``
        (``make_probe(..., with_cost=True)``).
    """

    name = "speed-limit"

    def __init__(self, eps0: float = 1.0, alpha: float = 0.95, eps_min: float = 0.01, k: float = 0.5, *,
                 drift_norm: DriftNorm = "per_row", margin: float = 0.5, probe: float = 0.1,
                 smoothing: float = 0.0, separate_cost_drift: bool = False, n_iter: int = 20, **kw):
        self.alpha = _unit("alpha", alpha)
        self.eps_min = _pos("eps_min", eps_min)
        self.k = _pos("k", k)
        self.margin = _pos("margin", margin)
        if self.margin > 1:
            raise ValueError(f"`margin` must lie in (0, 1]; got {margin!r}")
        self.probe = _pos("probe", probe)
        if self.probe > 1:
            raise ValueError(f"`probe` must lie in (0, 1]; got {probe!r}")
        if not (0 <= float(smoothing) < 1):
            raise ValueError(f"`smoothing` must lie in [0, 1); got {smoothing!r}")
        self.smoothing = float(smoothing)
        if int(n_iter) != n_iter or n_iter < 1:
            raise ValueError(f"`n_iter` must be a positive integer; got {n_iter!r}")
        self.n_iter = int(n_iter)
        self.separate_cost_drift = bool(separate_cost_drift)
        if self.eps_min > _pos("eps0", eps0):
            raise ValueError(f"`eps_min` ({eps_min}) must not exceed `eps0` ({eps0})")
        super().__init__(eps0, drift_norm=drift_norm, **kw)

    def _bound(self, eps: float) -> float:
        return self.k * eps

    def _reset_state(self) -> None:
        self._s: Optional[float] = None  # dimensionless sensitivity estimate
        self._s_prev: Optional[float] = None
        self._last_delta = 0.0
        self._prev_eps = self.eps0
        self.cost_drift: List[float] = []  # per step, nan unless separate_cost_drift

    def _eps_drift(self, plan: Tensor, cost: Optional[Tensor], drift: float) -> float:
        if not (self.separate_cost_drift and cost is not None and self._prev_cost is not None):
            self.cost_drift.append(float("nan"))
            return drift
        n, m = plan.shape[-2], plan.shape[-1]
        mass = plan.reshape(-1, n, m).sum(dim=(-1, -2)).mean()
        dt = torch.float64 if plan.dtype == torch.float64 else torch.float32
        a = torch.full((n,), float(mass) / n, dtype=dt, device=plan.device)
        b = torch.full((m,), float(mass) / m, dtype=dt, device=plan.device)
        Pp = sinkhorn(cost.to(dt), self._prev_eps, a, b, n_iter=self.n_iter, grad="none").plan
        self.cost_drift.append(plan_drift(Pp, self._prev, self.drift_norm))
        return plan_drift(plan, Pp, self.drift_norm)

    def _next(self, plan, cost, drift):
        if plan is None:
            raise ValueError("`plan` is required: SpeedLimit sizes its step from the drift of the plan")
        eps = self.eps
        full = (1.0 - self.alpha) * eps
        if self._prev is not None:
            d_eps = self._eps_drift(plan, cost, drift)
            if self._last_delta > 0 and math.isfinite(d_eps):
                s_new = eps * d_eps / self._last_delta
                if self._s is None:
                    s = s_new
                elif s_new >= self._s or self.smoothing == 0.0:
                    s = s_new
                else:
                    s = self.smoothing * self._s + (1 - self.smoothing) * s_new
                self._s_prev, self._s = self._s, s
        else:
            self.cost_drift.append(float("nan"))
        if self._s is None:
            delta = self.probe * full
        else:
            growth = 1.0
            if self._s_prev is not None and self._s_prev > 0:
                growth = max(1.0, self._s / self._s_prev)
            s_pred = self._s * growth
            mk = self.margin * self.k
            d_law = mk * eps * eps / (s_pred + mk * eps) if s_pred > 0 else full
            delta = min(full, d_law)
        new = max(self.eps_min, eps - delta)
        throttled = delta < full * (1 - 1e-12) and new > self.eps_min
        self._last_delta = eps - new
        self._prev_eps = eps
        return new, throttled, (self._s if self._s is not None else float("nan"))


# ----------------------------------------------------------------------------------------------
# driving a scheduler


def solve_plan(cost: Tensor, eps: float, *, n_iter: Optional[int] = 20, init=None, tol: float = 1e-9,
               max_iter: int = 100000):
    """The unit-marginal plan (rows and columns sum to 1, as in Sinkhorn layers) of ``cost`` at ``eps``.

    ``n_iter=K`` runs exactly K log-domain sweeps (rows, then columns) from ``init`` (cold start when
    None); ``n_iter=None`` solves to ``tol``. Returns the :class:`~bistochastic.SinkhornResult`.
    """
    n, m = cost.shape[-2], cost.shape[-1]
    if n != m:
        raise ValueError(f"`cost` must be square for unit marginals; got {tuple(cost.shape)}")
    ones = torch.ones(n, dtype=cost.dtype, device=cost.device)
    if n_iter is not None:
        return sinkhorn(cost, eps, ones, ones, n_iter=n_iter, grad="none", init=init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SinkhornWarning)
        return sinkhorn(cost, eps, ones, ones, tol=tol, max_iter=max_iter, grad="none", init=init)


def row_entropy(plan: Tensor) -> float:
    """Mean row entropy ``−Σ_j P_ij log P_ij`` (nats) of a plan, over rows and batch (a float).

    The per-problem version is :func:`bistochastic.tasks.row_entropy`.
    """
    from .tasks import row_entropy as _row_entropy

    return float(_row_entropy(_check_plan("plan", plan)).mean())


@dataclass
class ScheduleRun:
    """The trace of :func:`run_schedule` (arrays of length ``n_steps``).

    ``eps``: ε_t used at step t; ``drift``: the scheduler's observed drift (its norm);
    ``brake``, ``step``: its decisions; ``entropy``: mean row entropy (nats) of P_t;
    ``error``: tracking error ``‖P_t − P*_t‖`` (``norm``) against the converged plan at ε_t (nan
    without reference); ``ref_drift``: ``‖P*_t − P*_{t−1}‖`` (``norm``), the true drift Δ_t;
    ``obs_drift``: ``‖P_t − P_{t−1}‖`` in ``norm``; ``norm``: the norm of the last three;
    ``pattern``: the c/B string of the decisions; ``plan``: the last plan.
    """

    eps: np.ndarray
    drift: np.ndarray
    brake: np.ndarray
    step: np.ndarray
    entropy: np.ndarray
    error: np.ndarray
    ref_drift: np.ndarray
    obs_drift: np.ndarray
    norm: str
    pattern: str
    plan: Tensor = field(repr=False)

    def value_at(self, eps: float, what: str = "error") -> float:
        """``what`` (a field name) at the first step whose ``ε_t ≤ eps``."""
        if what not in ("eps", "drift", "step", "entropy", "error", "ref_drift", "obs_drift"):
            raise ValueError(f"`what` must name an array field of ScheduleRun; got {what!r}")
        hit = np.flatnonzero(self.eps <= float(eps) * (1 + 1e-12))
        if hit.size == 0:
            raise ValueError(f"`eps` {eps!r} is below every temperature of the run")
        return float(getattr(self, what)[hit[0]])


def run_schedule(
    scheduler: Scheduler,
    cost: Union[Tensor, Sequence[Tensor], Callable[[int], Tensor]],
    n_steps: int,
    *,
    n_iter: int = 20,
    warm_start: bool = False,
    reference: bool = False,
    ref_tol: float = 1e-9,
    ref_max_iter: int = 200000,
    norm: DriftNorm = "per_row",
    pass_cost: bool = False,
) -> ScheduleRun:
    """Drive ``scheduler`` for ``n_steps`` steps: compute the plan at its ε, hand it over, repeat.

    Parameters
    ----------
    scheduler : Scheduler
        Reset first.
    cost : Tensor ``(N, N)`` / ``(B, N, N)``, a sequence of such tensors, or ``t -> Tensor``
        A fixed cost, or the cost of each step (e.g. a fresh draw per epoch).
    n_iter : int
        Sinkhorn sweeps per step (unit marginals, log domain).
    warm_start : bool
        Start each step's sweeps from the previous step's potentials (False: cold start from zero,
        as in the released code).
    reference : bool
        Also solve each step to ``ref_tol`` (warm-started from the previous reference) and record the
        tracking error and the true drift.
    norm : {"batch", "per_sample", "per_row"}
        Norm of ``error``, ``ref_drift`` and ``obs_drift``.
    pass_cost : bool
        Pass ``cost=`` to :meth:`Scheduler.step` (for ``SpeedLimit(separate_cost_drift=True)``).
    """
    if not isinstance(scheduler, Scheduler):
        raise ValueError("`scheduler` must be a bistochastic.anneal.Scheduler")
    if int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"`n_steps` must be a positive integer; got {n_steps!r}")
    _norm_name(norm)
    if isinstance(cost, Tensor):
        _check_plan("cost", cost)
        get = lambda t: cost  # noqa: E731
    elif callable(cost):
        get = cost
    else:
        seq = list(cost)
        if len(seq) < n_steps:
            raise ValueError(f"`cost` has {len(seq)} entries but `n_steps` is {n_steps}")
        get = lambda t: seq[t]  # noqa: E731
    scheduler.reset()
    T = int(n_steps)
    ent, err, rdr, odr = (np.full(T, np.nan) for _ in range(4))
    init = None
    ref_init = None
    P_prev = R_prev = None
    P = None
    for t in range(T):
        C = get(t)
        eps = scheduler.eps
        res = solve_plan(C, eps, n_iter=n_iter, init=init if warm_start else None)
        P = res.plan
        if warm_start:
            init = (res.f, res.g)
        ent[t] = row_entropy(P)
        if P_prev is not None:
            odr[t] = plan_drift(P, P_prev, norm)
        if reference:
            ref = solve_plan(C, eps, n_iter=None, init=ref_init, tol=ref_tol, max_iter=ref_max_iter)
            ref_init = (ref.f, ref.g)
            err[t] = plan_drift(P, ref.plan, norm)
            if R_prev is not None:
                rdr[t] = plan_drift(ref.plan, R_prev, norm)
            R_prev = ref.plan
        P_prev = P
        scheduler.step(P, cost=C if pass_cost else None)
    h = scheduler.history.as_arrays()
    return ScheduleRun(eps=h["eps"], drift=h["drift"], brake=h["brake"], step=h["step"], entropy=ent,
                       error=err, ref_drift=rdr, obs_drift=odr, norm=norm,
                       pattern=scheduler.history.pattern(), plan=P)


# ----------------------------------------------------------------------------------------------
# spectral gap and the calibration oracle


def sinkhorn_gap(plan: Tensor) -> Tensor:
    """Spectral gap ``γ = 1 − λ₂(J)`` of the Sinkhorn map at a (converged) plan, dense, O(N³) per plan.

    ``J = D_b⁻¹ Pᵀ D_a⁻¹ P`` with ``a = P1``, ``b = Pᵀ1`` (for uniform probability marginals
    ``J = N²PᵀP``); computed by :func:`bistochastic.fixed_point.spectral_gap` (``method="dense"``).

    Shapes: ``plan (..., N, M)`` → ``(...)``.
    """
    from .fixed_point import spectral_gap

    P = _check_plan("plan", plan)
    if bool((P.sum(-1) <= 0).any()) or bool((P.sum(-2) <= 0).any()):
        raise ValueError("`plan` must have positive row and column sums")
    return spectral_gap(P, method="dense")


@dataclass
class CalibrationResult:
    """Output of :func:`calibrate_k_safe` (arrays over the reference grid, ε decreasing).

    Attributes
    ----------
    eps : (T,) reference temperatures ``ε_i = ε_0 α^{i/m}``.
    gamma : (T,) the spectral gap ``1 − λ₂(J_ε)`` (smallest over the batch).
    rho_K : (T,) ``(1 − γ)^K``, the contraction of K sweeps.
    sensitivity : (T,) ``ε‖∂P*/∂ε‖`` by finite differences along the grid (drift norm).
    alpha_drift : (T,) ``‖P*(αε) − P*(ε)‖``, the drift of one exponential step (nan at the tail).
    k_bound : (T,) ``e_tol (1 − ρ^K)/(ρ^K ε)``: the largest slope ``k`` for which the tracking-error
        bound ``ρ^K/(1−ρ^K)·‖Δ‖ ≤ e_tol`` holds at ε when ``‖Δ‖ = kε``.
    active : (T,) bool, points of the window where an unthrottled α-step would break that bound
        (``ρ^K/(1−ρ^K)·alpha_drift > e_tol``).
    window : (T,) bool, the calibration window: from ``ε_0`` down to the first point where
        ``γ/ε`` falls below ``window_frac`` (default 1/2) times its maximum. Below it the gap decays exponentially and no linear law
        bounds the error (Chapter 12), so the oracle does not calibrate there.
    eps_window : the smallest ε of the window; anneal with the calibrated slope down to it.
    k_safe : the oracle's answer, ``min k_bound`` over ``active`` (``k_exp`` when nothing is active).
    k_exp : ``max alpha_drift/(αε)`` over the window, the slope plain exponential cooling needs.
    c : least-squares slope of ``γ ≈ cε`` over the window where ``γ/ε`` lies within a factor 2 of its
        maximum (nan if the window is empty).
    k_linear : ``K·c·e_tol``, the linear-regime prediction (valid only where ``Kγ ≪ 1``).
    converged : (T,) bool, whether each reference solve met its tolerance.
    K, alpha, tolerated_error, drift_norm : the settings.
    method : ``"bound"`` (``k_safe`` from the worst-case bound) or ``"simulate"`` (``k_safe`` from
        the simulated tracking error, see :func:`calibrate_k_safe`).
    k_bound_oracle : the bound method's answer (computed by both methods, for comparison).
    sim_error : the simulated maximal tracking error over the window at ``k_safe`` (method
        ``"simulate"``; nan for ``"bound"``).
    k_resolution : the smallest slope the reference grid resolves: below it even one grid step
        breaks the law somewhere (``max ‖P*_{i+1} − P*_i‖/ε_{i+1}`` over the window).
    feasible : False when even ``k_resolution`` misses the tolerance (then ``k_safe`` is that
        resolution and a warning says to refine ``substeps``).
    n_sims : number of simulated anneals the search ran.

    Notes
    -----
    :meth:`simulate` replays the K-sweep layer along the law-saturating schedule of any slope.
    """

    eps: np.ndarray
    gamma: np.ndarray
    rho_K: np.ndarray
    sensitivity: np.ndarray
    alpha_drift: np.ndarray
    k_bound: np.ndarray
    active: np.ndarray
    window: np.ndarray
    eps_window: float
    k_safe: float
    k_exp: float
    c: float
    k_linear: float
    converged: np.ndarray
    K: int
    alpha: float
    tolerated_error: float
    drift_norm: str
    method: str = "bound"
    k_bound_oracle: float = float("nan")
    sim_error: float = float("nan")
    k_resolution: float = float("nan")
    feasible: bool = True
    n_sims: int = 0
    _ref: Optional[dict] = field(default=None, repr=False, compare=False)

    def simulate(self, k: float) -> Dict[str, np.ndarray]:
        """Replay a warm-started ``K``-sweep layer along the law-saturating schedule of slope ``k``.

        The schedule walks the reference grid: from ``ε_i`` it jumps to the furthest grid point
        ``j ≤ i + substeps`` (at most one α-step) with ``‖P*_j − P*_i‖ ≤ k·ε_j`` (one grid point
        when none qualifies), down to the end of the window. At each visited ε it runs ``K``
        sweeps from the previous step's potentials (the first from the converged potentials at
        ``ε_0``) and measures ``‖P_t − P*_{ε_t}‖`` in the drift norm.

        Returns a dict of arrays over the visited steps: ``eps``, ``error``, ``drift`` (the
        reference drift of each step, nan at the first) and ``index`` (grid indices).
        """
        if self._ref is None:
            raise ValueError("this CalibrationResult carries no reference path to simulate on")
        return _simulate_law_path(self._ref, _pos("k", k))

    def simulated_k(self, tolerated_error: float, search_iters: int = 24) -> Dict[str, object]:
        """The ``"simulate"`` oracle's answer for another tolerance, on the same reference path.

        Returns ``{"k": ..., "error": max simulated error at k, "feasible": ..., "n_sims": ...}``
        (see :func:`calibrate_k_safe`); no new reference solves.
        """
        if self._ref is None or len(self._ref["eps"]) < 2:
            raise ValueError("this CalibrationResult carries no reference path to simulate on")
        e_tol = _pos("tolerated_error", tolerated_error)
        if int(search_iters) != search_iters or search_iters < 1:
            raise ValueError(f"`search_iters` must be a positive integer; got {search_iters!r}")
        k, err, ok, n = _search_k(self._ref, self.k_resolution, self.k_exp, e_tol, int(search_iters))
        amp = self.rho_K / (1.0 - self.rho_K)
        with np.errstate(divide="ignore", invalid="ignore"):
            act = np.isfinite(self.alpha_drift) & (amp * self.alpha_drift > e_tol) & self.window
            kb = float(np.min((e_tol / (amp * self.eps))[act])) if act.any() else self.k_exp
        return {"k": k, "error": err, "feasible": ok, "n_sims": n, "k_bound": kb}

    def steps_needed(self, k: float) -> float:
        """Steps a schedule that moves the reference plan by exactly ``k·ε`` per step (at most one
        α-step) needs to cross the window: ``Σ_i max(‖P*_{i+1} − P*_i‖/(k ε_{i+1}), 1/substeps)``
        over the reference grid (a continuous count, for comparing slopes)."""
        if self._ref is None:
            raise ValueError("this CalibrationResult carries no reference path")
        k = _pos("k", k)
        eps, plans, m, norm = self._ref["eps"], self._ref["plans"], self._ref["m"], self._ref["norm"]
        return float(sum(max(plan_drift(plans[i + 1], plans[i], norm) / (k * eps[i + 1]), 1.0 / m)
                         for i in range(len(eps) - 1)))

    def __repr__(self) -> str:
        return (f"CalibrationResult(k_safe={self.k_safe:.4g}, k_exp={self.k_exp:.4g}, c={self.c:.3g}, "
                f"eps_window={self.eps_window:.3g}, "
                f"k_linear={self.k_linear:.4g}, points={len(self.eps)}, active={int(self.active.sum())})")


def calibrate_k_safe(
    cost: Tensor,
    *,
    eps0: float = 1.0,
    eps_min: float = 0.01,
    alpha: float = 0.95,
    substeps: int = 4,
    K: int = 20,
    tolerated_error: float = 0.05,
    drift_norm: DriftNorm = "per_row",
    tol: float = 1e-10,
    max_iter: int = 200000,
    window_frac: float = 0.5,
    method: Literal["bound", "simulate"] = "bound",
    search_iters: int = 24,
) -> CalibrationResult:
    """Offline calibration of ``k_safe`` on a representative cost (our reconstruction of "QSA").

    Runs a slow quasi-static reference anneal (``ε_i = ε_0 α^{i/substeps}`` down to ``eps_min``, each
    solve warm-started from the previous one and converged to ``tol``), measures the spectral gap
    ``γ(ε)`` (dense eigen-solve, :func:`sinkhorn_gap`) and the drift, and returns the largest slope
    ``k`` such that, wherever in the window ``γ(ε) ≳ cε`` an exponential α-step would be unsafe, a
    step obeying
    ``‖Δ‖ ≤ kε`` keeps the tracking-error bound ``ρ^K/(1 − ρ^K)·‖Δ‖`` (steady state of
    ``e_{t+1} = J^K(e_t − Δ_t)``, ``ρ = 1 − γ``, normal ``J``) below ``tolerated_error``. Where ``γ ≈ cε`` and
    ``Kγ ≪ 1`` this is ``k ≈ K·c·tolerated_error``, also reported (at ``K = 20`` the two conditions
    do not hold together, Chapter 12, so the formula can be far off). The bound is an upper bound
    that can be far above the error; ``method="simulate"`` measures the error instead.

    Parameters
    ----------
    cost : Tensor ``(N, N)`` or ``(B, N, N)``
        Representative cost(s); the gap is the smallest over the batch, the drift is in ``drift_norm``.
    eps0, eps_min, alpha : float
        The range to calibrate and the cooling factor the scheduler will use.
    substeps : int
        Reference points per α-step (the reference is ``substeps`` times slower than exponential).
    K : int
        Sinkhorn sweeps per training step.
    tolerated_error : float
        The tracking error (in ``drift_norm``) one is willing to carry.
    window_frac : float in (0, 1)
        The window ends where ``γ/ε`` first falls below ``window_frac`` times its maximum.
    method : {"bound", "simulate"}
        ``"bound"``: the largest ``k`` whose worst-case steady-state bound stays below
        ``tolerated_error`` (above). ``"simulate"``: the largest ``k`` for which a *simulated*
        warm-started ``K``-sweep layer, annealed along the law-saturating schedule of slope ``k``
        on the reference grid (:meth:`CalibrationResult.simulate`), keeps its measured tracking
        error ``‖P_t − P*_t‖`` below ``tolerated_error`` at every step of the window. Found by
        bisection in ``log k`` between the grid's resolution and the slope of plain exponential
        cooling (``k_exp``, returned when exponential cooling already meets the tolerance). The
        bound is an upper bound that can be far from the error (Chapter 13), so this answer is
        larger; its resolution is set by ``substeps`` (a grid step must be a fraction of a step).
    search_iters : int
        Bisection steps of the ``"simulate"`` search.

    Cost: ``T = substeps·log(eps_min/eps0)/log α`` converged solves and ``T`` batched ``O(N³)``
    eigen-solves, run once, offline; ``"simulate"`` adds about ``search_iters + 2`` simulated
    anneals of at most ``T`` steps of ``K`` sweeps each.
    """
    C = _check_plan("cost", cost)
    eps0 = _pos("eps0", eps0)
    eps_min = _pos("eps_min", eps_min)
    if eps_min >= eps0:
        raise ValueError(f"`eps_min` ({eps_min}) must be below `eps0` ({eps0})")
    alpha = _unit("alpha", alpha)
    if int(substeps) != substeps or substeps < 1:
        raise ValueError(f"`substeps` must be a positive integer; got {substeps!r}")
    if int(K) != K or K < 1:
        raise ValueError(f"`K` must be a positive integer; got {K!r}")
    e_tol = _pos("tolerated_error", tolerated_error)
    wf = _unit("window_frac", window_frac)
    _norm_name(drift_norm)
    if method not in ("bound", "simulate"):
        raise ValueError(f"`method` must be 'bound' or 'simulate'; got {method!r}")
    if int(search_iters) != search_iters or search_iters < 1:
        raise ValueError(f"`search_iters` must be a positive integer; got {search_iters!r}")
    m = int(substeps)
    T = int(math.floor(m * math.log(eps_min / eps0) / math.log(alpha) + 1e-9)) + 1
    eps = eps0 * alpha ** (np.arange(T) / m)
    plans = []
    gam = np.empty(T)
    conv = np.empty(T, dtype=bool)
    init = init0 = None
    for i, e in enumerate(eps):
        r = solve_plan(C, float(e), n_iter=None, init=init, tol=tol, max_iter=max_iter)
        init = (r.f, r.g)
        if i == 0:
            init0 = init
        plans.append(r.plan)
        conv[i] = bool(r.converged.all())
        gam[i] = float(sinkhorn_gap(r.plan).min())
    sens = np.full(T, np.nan)
    for i in range(T - 1):
        sens[i] = eps[i] * plan_drift(plans[i + 1], plans[i], drift_norm) / (eps[i] - eps[i + 1])
    sens[-1] = sens[-2] if T > 1 else np.nan
    adr = np.full(T, np.nan)
    for i in range(T - m):
        adr[i] = plan_drift(plans[i + m], plans[i], drift_norm)
    rho_K = np.clip(1.0 - gam, 0.0, 1.0) ** K
    with np.errstate(divide="ignore", invalid="ignore"):
        amp = rho_K / (1.0 - rho_K)  # steady-state amplification of a constant drift
        k_bound = e_tol / (amp * eps)
    ratio = gam / eps
    win = ratio >= wf * np.max(ratio)
    win[: int(np.argmax(win))] = True  # the window and everything above it
    win &= np.cumprod(win).astype(bool)  # down to its first exit
    active = np.isfinite(adr) & (amp * adr > e_tol) & win
    with np.errstate(invalid="ignore"):
        k_exp = float(np.nanmax(adr[win] / (alpha * eps[win]))) if np.isfinite(adr[win]).any() else float("nan")
    k_bnd = float(np.min(k_bound[active])) if active.any() else k_exp
    cw = ratio >= 0.5 * np.max(ratio)
    c = float(np.sum(gam[cw] * eps[cw]) / np.sum(eps[cw] ** 2)) if cw.any() else float("nan")
    n_win = int(win.sum())
    ref = {"C": C, "eps": eps[:n_win], "plans": plans[:n_win], "init": init0, "m": m, "K": int(K),
           "norm": drift_norm}
    step1 = [plan_drift(plans[i + 1], plans[i], drift_norm) / eps[i + 1] for i in range(n_win - 1)]
    k_res = float(max(step1)) if step1 else float("nan")
    k_safe, sim_err, feasible, n_sims = k_bnd, float("nan"), True, 0
    if method == "simulate" and n_win > 1:
        k_safe, sim_err, feasible, n_sims = _search_k(ref, k_res, k_exp, e_tol, int(search_iters))
        if not feasible:
            warnings.warn(f"calibrate_k_safe: even the grid's resolution k = {k_res:.3g} misses "
                          f"tolerated_error = {e_tol:g} (simulated error {sim_err:.3g}); refine "
                          "`substeps` or raise the tolerance", RuntimeWarning, stacklevel=2)
    return CalibrationResult(eps=eps, gamma=gam, rho_K=rho_K, sensitivity=sens, alpha_drift=adr,
                             k_bound=k_bound, active=active, window=win, eps_window=float(eps[win].min()),
                             k_safe=k_safe, k_exp=k_exp, c=c,
                             k_linear=K * c * e_tol, converged=conv, K=int(K), alpha=alpha,
                             tolerated_error=e_tol, drift_norm=drift_norm, method=method,
                             k_bound_oracle=k_bnd, sim_error=sim_err, k_resolution=k_res,
                             feasible=feasible, n_sims=n_sims, _ref=ref)


def _simulate_law_path(ref: dict, k: float) -> Dict[str, np.ndarray]:
    """See :meth:`CalibrationResult.simulate`."""
    C, eps, plans, m, K, norm = ref["C"], ref["eps"], ref["plans"], ref["m"], ref["K"], ref["norm"]
    T = len(eps)
    i = 0
    init = ref["init"]
    idx, err, dr = [0], [0.0], [float("nan")]
    while i < T - 1:
        j = i + 1
        for jj in range(min(i + m, T - 1), i, -1):
            if plan_drift(plans[jj], plans[i], norm) <= k * eps[jj]:
                j = jj
                break
        r = solve_plan(C, float(eps[j]), n_iter=K, init=init)
        init = (r.f, r.g)
        idx.append(j)
        err.append(plan_drift(r.plan, plans[j], norm))
        dr.append(plan_drift(plans[j], plans[i], norm))
        i = j
    ix = np.asarray(idx)
    return {"eps": eps[ix], "error": np.asarray(err), "drift": np.asarray(dr), "index": ix}


def _search_k(ref: dict, k_lo: float, k_hi: float, e_tol: float, iters: int):
    """Largest k in [k_lo, k_hi] whose simulated max error is <= e_tol (bisection in log k)."""
    n = 0

    def f(k):
        nonlocal n
        n += 1
        return float(np.max(_simulate_law_path(ref, k)["error"]))

    k_hi = max(k_hi, k_lo) * (1 + 1e-9)
    e_hi = f(k_hi)
    if e_hi <= e_tol:
        return k_hi, e_hi, True, n
    e_lo = f(k_lo)
    if e_lo > e_tol:
        return k_lo, e_lo, False, n
    lo, hi = math.log(k_lo), math.log(k_hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        e_mid = f(math.exp(mid))
        if e_mid <= e_tol:
            lo, e_lo = mid, e_mid
        else:
            hi = mid
    return math.exp(lo), e_lo, True, n


# ----------------------------------------------------------------------------------------------
# overhead


def overhead_flops(N: int, B: int = 32, K: int = 20) -> Dict[str, float]:
    """Operation-count model of one training step's scheduling work (floating-point ops).

    * ``drift``: the online test, ``3BN²`` (subtract, square, accumulate): one pass over the plan.
    * ``sinkhorn``: ``K`` sweeps of two log-sum-exp passes, ``≈ 5BN²`` each (add, max, subtract,
      exp, sum): ``10KBN²``.
    * ``spectral``: per sample, forming ``J`` (``2N³``) and a symmetric eigenvalue solve (tridiagonal
      reduction ``≈ 4N³/3``): ``≈ (10/3)BN³``.

    Also returns ``passes_ratio = 1/(2K)`` (the test reads the plan once; Sinkhorn reads it 2K times)
    and the ratios ``drift/sinkhorn`` and ``spectral/sinkhorn`` of the flop counts.
    """
    for name, v in (("N", N), ("B", B), ("K", K)):
        if int(v) != v or v < 1:
            raise ValueError(f"`{name}` must be a positive integer; got {v!r}")
    d = 3.0 * B * N * N
    s = 10.0 * K * B * N * N
    e = (2.0 + 4.0 / 3.0) * B * N ** 3
    return {"drift": d, "sinkhorn": s, "spectral": e, "drift_over_sinkhorn": d / s,
            "spectral_over_sinkhorn": e / s, "passes_ratio": 1.0 / (2 * K)}


def time_overhead(N: int, B: int = 32, K: int = 20, *, reps: int = 5, dtype: torch.dtype = torch.float32,
                  device: Union[str, torch.device] = "cpu", seed: int = 0) -> Dict[str, float]:
    """Wall-clock seconds (median of ``reps``) of the three per-step costs at size ``(B, N, N)``.

    * ``drift``: :func:`plan_drift` with the batch norm (what EPH-ASC adds per step);
    * ``sinkhorn``: one ``K``-sweep cold-start Sinkhorn forward (the layer itself);
    * ``spectral``: the per-sample gap by dense eigen-solve (:func:`sinkhorn_gap`), the O(N³)
      diagnostic that the linear law takes out of the loop.

    Machine-dependent: never assert on these numbers.
    """
    for name, v in (("N", N), ("B", B), ("K", K), ("reps", reps)):
        if int(v) != v or v < 1:
            raise ValueError(f"`{name}` must be a positive integer; got {v!r}")
    dev = torch.device(device)
    g = torch.Generator().manual_seed(int(seed))
    C = torch.randn(B, N, N, generator=g, dtype=dtype).to(dev)
    P0 = solve_plan(C, 1.0, n_iter=K).plan
    P1 = solve_plan(C, 0.95, n_iter=K).plan

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def clock(fn) -> float:
        fn()
        sync()
        ts = []
        for _ in range(int(reps)):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts))

    return {
        "drift": clock(lambda: plan_drift(P1, P0, "batch")),
        "sinkhorn": clock(lambda: solve_plan(C, 0.95, n_iter=K)),
        "spectral": clock(lambda: sinkhorn_gap(P1)),
    }
