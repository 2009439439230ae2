"""Entropic optimal transport and doubly-stochastic projection by Sinkhorn's algorithm.

The solver works with dual potentials ``f`` (rows) and ``g`` (columns) in cost units, so that the
plan is

.. math::  P_{ij} = \\exp\\big((f_i + g_j - C_{ij})/\\varepsilon\\big),

the convention of OTT-JAX. It solves

.. math::  \\min_{P \\ge 0,\\ P\\mathbf 1 = a,\\ P^\\top \\mathbf 1 = b}\\ \\langle C, P\\rangle - \\varepsilon H(P),
           \\qquad H(P) = -\\sum_{ij} P_{ij}(\\log P_{ij} - 1).

Three engines share one interface:

* ``"log"``: alternating log-sum-exp updates (POT's ``sinkhorn_log``); always stable, one
  ``exp`` per matrix entry and half-iteration.
* ``"absorb"`` (default when no gradient is unrolled): the stabilised scaling algorithm of Schmitzer
  (2019). Between absorptions it runs cheap matrix-vector Sinkhorn-Knopp updates on the kernel
  ``K = exp((f ⊕ g - C)/ε)`` rebuilt from the current potentials, then absorbs the scalings back into
  the potentials. A block whose scalings over- or under-flow is rolled back and redone in the log
  domain, so the result is never less stable than ``"log"``.
* ``"auto"`` picks ``"absorb"`` unless gradients are unrolled.

On the CPU the scaling engine reads a single large kernel once per iteration (row update and
column product block by block, each block re-read from cache), solves a single matrix of at
most 2 MiB on one intra-op thread (its passes are too short for a parallel region to pay), and
runs fixed-iteration batches of tiny matrices (``n, m <= 16``, the mHC shape) in a planar
``(n, m, batch)`` layout, absorbing the scalings there too at low temperature; none of this
changes the iterations or what the result reports. It also keeps subnormal numbers, on which x86
cores slow down several-fold, out of its products and its ``exp``: its kernels hold no
subnormal entries (they would weigh less than ``e^-42`` of their row's largest in the plan), and
in float32 the column product lifts ``u`` by a power of two (exact).

Both accept over-relaxation (``momentum``), fixed or adaptive (Lehmann et al. 2021, as in OTT-JAX).
The scaling engine also offers Anderson acceleration (``momentum="anderson"``, Walker & Ni 2011):
it extrapolates the column potential from its last ``_ANDERSON_MEMORY`` (12) iterates and needs
3.5-5x fewer iterations than adaptive over-relaxation (n = 1024: 16 against 70 at eps = 0.01, 47
against 210 at 0.002), for some 25 vector operations of bookkeeping per iteration (NumPy for CPU
tensors: 0.04-0.2 ms at m = 1024 on this project's CPU). The default ``"auto"`` takes it for
problems of at least ``_ANDERSON_MIN_ENTRIES`` (128 x 128) entries in all (a batch counts all its
matrices) whose matrices are wider than its memory (both sides above 12), where that bookkeeping
costs less than the iterations it saves, and adaptive over-relaxation otherwise, on the fused GPU
path and with zero weights.

Three mechanisms make every solve honest and accurate:

* **Centring.** The solver iterates on the reduced cost ``C̃ = C - r ⊕ s`` (``r`` the row minima,
  ``s`` the column minima of ``C - r``), which has the same plan, and starts from the potentials
  that reproduce the uncentred iterates (``g̃₀ = g₀ - s``). The plan is computed where it is
  accurate, whatever shift or scale the cost has (``C + 1e16``, ``C + 1000`` in float32); the
  returned potentials are shifted back to cost units.
* **One plan.** The reported ``marginal_error``, ``converged``, ``errors[-1]`` and ``n_iter`` are
  computed from the returned ``plan`` tensor itself, never from another matrix.
* **Support restriction.** Zero weights in ``a`` or ``b`` are rows/columns that carry no mass:
  potentials there are ``-inf``, the plan is exactly zero there, and every update (over-relaxation,
  absorption, implicit backward) acts on the support only, so acceleration and gradients are
  unaffected by them.

Gradients: ``grad="unroll"`` back-propagates through the iterations (memory grows with them);
``grad="implicit"`` differentiates the optimality conditions at the returned point (memory independent
of the iteration count); ``grad="none"`` detaches. Both differentiable modes give gradients with
respect to the cost, the marginals ``a``, ``b`` and ``eps`` (a tensor ``eps`` with
``requires_grad``), from the iterations or from the same linear system.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from . import _fused, _overrelax
from ._checks import integer_arg, nonneg_finite, positive_finite

__all__ = [
    "SinkhornResult",
    "SinkhornWarning",
    "sinkhorn",
    "project_dsm",
    "marginal_error",
]

GradMode = Literal["unroll", "implicit", "none"]
#: Above this many columns the implicit backward solves its Schur system by CG instead of densely.
DENSE_SCHUR_MAX = 512
Engine = Literal["auto", "log", "absorb"]
#: Bytes of kernel per block in the scaling engine's one-pass sweep (a block is read from memory
#: once and re-read from cache); 0 turns the blocked sweep off (two full matrix-vector products).
_SWEEP_BLOCK_BYTES = 512 * 1024
EpsLike = Union[float, Tensor]


class SinkhornWarning(UserWarning):
    """Emitted when a Sinkhorn solve does not reach its tolerance (or, in fixed-iteration mode,
    when the returned plan is not finite)."""


@dataclass
class SinkhornResult:
    """Output of :func:`sinkhorn` and :func:`project_dsm`.

    Shapes: the cost is ``(..., n, m)``; ``...`` is the batch shape ``B``.

    Every number describes the returned ``plan``: ``marginal_error`` and ``errors[-1]`` are computed
    from that tensor (in the compute precision, see :func:`sinkhorn` for half precision), and
    ``converged`` compares that error with ``tol``.

    Attributes
    ----------
    plan : Tensor ``(..., n, m)``
        The transport plan (for :func:`project_dsm`, the doubly-stochastic matrix).
    f, g : Tensor ``(..., n)``, ``(..., m)``
        Dual potentials in cost units: ``plan = exp((f[..., :, None] + g[..., None, :] - cost) / eps)``
        (up to the round-off of the cost's own representation). ``-inf`` where the marginal weight
        is zero. Accepted back by ``init=`` as a warm start.
    n_iter : Tensor ``(...)`` of int64
        Per batch element, the first checked iteration at which the marginal error was ``<= tol``;
        the total number of iterations run if it never was.
    marginal_error : Tensor ``(...)``
        Relative L1 marginal violation of the returned plan,
        ``max(|P1 - a|_1, |Pᵀ1 - b|_1) / sum(a)``.
    converged : Tensor ``(...)`` of bool
        ``marginal_error <= tol``.
    eps : float or Tensor
        The regularisation used, as given (a tensor stays a tensor).
    tol : float
        The tolerance the error was compared with.
    iterations : int
        Iterations actually run (the same for the whole batch).
    errors : Tensor ``(n_checks, ...)``
        The maximum-over-marginals error at each convergence check (history); the last entry is
        ``marginal_error``.
    """

    plan: Tensor
    f: Tensor
    g: Tensor
    n_iter: Tensor
    marginal_error: Tensor
    converged: Tensor
    eps: EpsLike
    tol: float
    iterations: int
    errors: Tensor = field(repr=False)

    @property
    def all_converged(self) -> bool:
        """True when every batch element converged (one host sync)."""
        return bool(self.converged.all())

    def __repr__(self) -> str:  # compact, no tensor dumps
        shape = tuple(self.plan.shape)
        conv = int(self.converged.sum())
        tot = self.converged.numel()
        err = float(self.marginal_error.max())
        eps = self.eps
        eps_s = f"{eps:.3g}" if not isinstance(eps, Tensor) or eps.numel() == 1 else "tensor"
        if isinstance(eps, Tensor) and eps.numel() == 1:
            eps_s = f"{float(eps):.3g}"
        return (
            f"SinkhornResult(shape={shape}, eps={eps_s}, iterations={self.iterations}, "
            f"converged={conv}/{tot}, max_marginal_error={err:.2e})"
        )


# ----------------------------------------------------------------------------------------------
# validation


def _broadcast_shapes(*shapes) -> torch.Size:
    """NumPy broadcasting of shapes (``torch.broadcast_shapes`` imports sympy: seconds on first use)."""
    nd = max((len(s) for s in shapes), default=0)
    out = [1] * nd
    for s in shapes:
        for i, d in enumerate(tuple(s)[::-1]):
            j = nd - 1 - i
            if d != 1:
                if out[j] not in (1, d):
                    raise RuntimeError(f"shapes {shapes} are not broadcastable")
                out[j] = d
    return torch.Size(out)


def _under_functorch(*xs) -> bool:
    """True when any tensor is wrapped by a torch.func transform (vmap, grad, jacrev, ...)."""
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return wrapped is not None and any(isinstance(x, Tensor) and wrapped(x) for x in xs)


def _all_finite(x: Tensor) -> bool:
    """``isfinite(x).all()`` in one reduction pass: a finite sum proves every entry finite (NaN
    and inf propagate); only when the sum is not finite (or overflowed) is the full test run."""
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def _check_finite(name: str, x: Tensor) -> None:
    if not _all_finite(x):
        raise ValueError(f"`{name}` contains NaN or inf; Sinkhorn needs finite inputs")


def _check_tensor_kind(name: str, x: Tensor) -> None:
    """Complex, boolean and meta tensors are refused clearly (never cast silently)."""
    if x.is_complex():
        raise TypeError(f"`{name}` is complex ({x.dtype}); Sinkhorn needs a real tensor")
    if x.dtype == torch.bool:
        raise TypeError(f"`{name}` is boolean; Sinkhorn needs a real floating-point tensor")
    if x.device.type == "meta":
        raise ValueError(
            f"`{name}` is on the meta device (shape only, no data); Sinkhorn needs a tensor with "
            "values on the CPU or an accelerator"
        )


def _as_tensor(x, like: Tensor, name: str) -> Tensor:
    if isinstance(x, Tensor):
        _check_tensor_kind(name, x)
        return x
    try:
        t = torch.as_tensor(x)
    except Exception as exc:  # pragma: no cover - message only
        raise ValueError(f"`{name}` could not be converted to a tensor: {exc}") from exc
    _check_tensor_kind(name, t)
    return t.to(dtype=like.dtype, device=like.device)


def _compute_dtype(dtype: torch.dtype, name: str = "cost") -> torch.dtype:
    if dtype.is_complex:
        raise TypeError(f"`{name}` is complex ({dtype}); Sinkhorn needs a real tensor")
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if dtype in (torch.float32, torch.float64):
        return dtype
    if dtype == torch.bool:
        raise TypeError(f"`{name}` is boolean; Sinkhorn needs a real floating-point tensor")
    if not dtype.is_floating_point:
        return torch.get_default_dtype()
    raise TypeError(f"`{name}` has unsupported dtype {dtype}")


def _validate_eps(eps, C: Tensor, name: str):
    """Returns ``(eps_internal, eps_tensor_or_None)``: a float when ``eps`` is a number, else a tensor
    of the compute dtype (kept in the autograd graph)."""
    if isinstance(eps, Tensor):
        _check_tensor_kind(name, eps)
        if not eps.dtype.is_floating_point:
            eps = eps.to(C.dtype)
        e = eps.to(device=C.device, dtype=C.dtype)
        batch = C.shape[:-2]
        if e.dim() > len(batch):
            raise ValueError(
                f"`{name}` must be a scalar or broadcast with the batch shape {tuple(batch)} of the "
                f"cost (one value per problem); got shape {tuple(eps.shape)}"
            )
        try:
            _broadcast_shapes(e.shape, batch)
        except RuntimeError as exc:
            raise ValueError(
                f"`{name}` of shape {tuple(eps.shape)} does not broadcast with the batch shape "
                f"{tuple(batch)} of the cost"
            ) from exc
        with torch.no_grad():
            ok = bool((torch.isfinite(e) & (e > 0)).all())
        if not ok:
            raise ValueError(f"`{name}` must be a positive finite number; got {eps!r}")
        return e
    if isinstance(eps, bool) or eps is None or isinstance(eps, str):
        raise TypeError(f"`{name}` must be a positive finite number; got {eps!r}")
    return positive_finite(name, eps)


def _validate(
    cost: Tensor,
    a: Optional[Tensor],
    b: Optional[Tensor],
    check_inputs: bool,
    allow_inf_cost: bool,
    trusted: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Shapes, dtypes and values of the inputs. ``trusted``: the caller already checked the
    cost's values and built the marginals itself (positive, equal mass), so their value checks,
    one host synchronisation each on a GPU, are skipped."""
    if not isinstance(cost, Tensor):
        raise ValueError("`cost` must be a torch.Tensor of shape (..., n, m)")
    _check_tensor_kind("cost", cost)
    if cost.dim() < 2:
        raise ValueError(f"`cost` must have shape (..., n, m); got shape {tuple(cost.shape)}")
    n, m = cost.shape[-2], cost.shape[-1]
    if n == 0 or m == 0:
        raise ValueError(f"`cost` must be non-empty; got shape {tuple(cost.shape)}")
    cdtype = _compute_dtype(cost.dtype)
    C = cost.to(cdtype)
    # value checks are data-dependent control flow, which torch.func transforms cannot run
    check_inputs = check_inputs and not _under_functorch(cost, a, b) and not trusted
    if check_inputs:
        if allow_inf_cost:
            if not _all_finite(C) and bool((torch.isnan(C) | (C == -math.inf)).any()):
                raise ValueError("`cost` contains NaN or -inf")
        else:
            _check_finite("cost", C)
    batch = C.shape[:-2]

    def marg(x, size: int, name: str) -> Tensor:
        if x is None:
            return torch.full((size,), 1.0 / size, dtype=cdtype, device=C.device)
        x = _as_tensor(x, C, name).to(device=C.device, dtype=cdtype)
        if x.dim() == 0 or x.shape[-1] != size:
            raise ValueError(
                f"`{name}` must have last dimension {size} to match `cost` of shape "
                f"{tuple(cost.shape)}; got shape {tuple(x.shape)}"
            )
        try:
            _broadcast_shapes(x.shape[:-1], batch)
        except RuntimeError as exc:
            raise ValueError(
                f"`{name}` batch shape {tuple(x.shape[:-1])} does not broadcast with the cost's "
                f"batch shape {tuple(batch)}"
            ) from exc
        if check_inputs:
            _check_finite(name, x)
            if bool((x < 0).any()):
                raise ValueError(f"`{name}` has negative entries; marginals must be nonnegative")
            if bool((x.sum(-1) <= 0).any()):
                raise ValueError(f"`{name}` must have positive total mass")
        return x

    a_ = marg(a, n, "a")
    b_ = marg(b, m, "b")
    if check_inputs:
        sa, sb = a_.sum(-1), b_.sum(-1)
        tol = 1e-5 if cdtype == torch.float32 else 1e-10
        if bool(((sa - sb).abs() > tol * torch.maximum(sa.abs(), sb.abs())).any()):
            raise ValueError(
                "marginals `a` and `b` must have the same total mass "
                f"(got sum(a)={sa.flatten()[0].item():.10g}, sum(b)={sb.flatten()[0].item():.10g}); "
                "this is balanced optimal transport"
            )
    return C, a_, b_


# ----------------------------------------------------------------------------------------------
# core iterations (all tensors have batch dims in front)


def _lse_rows(Z: Tensor) -> Tensor:
    return torch.logsumexp(Z, dim=-1)


def _lse_cols(Z: Tensor) -> Tensor:
    return torch.logsumexp(Z, dim=-2)


def marginal_error(plan: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Relative L1 marginal violation ``max(|P1 - a|_1, |Pᵀ1 - b|_1) / sum(a)``.

    Shapes: ``plan (..., n, m)``, ``a (..., n)``, ``b (..., m)``; returns ``(...)``.
    """
    row = (plan.sum(-1) - a).abs().sum(-1)
    col = (plan.sum(-2) - b).abs().sum(-1)
    return torch.maximum(row, col) / a.sum(-1)


def _safe_log(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``log x`` with ``-inf`` off the support and no NaN/inf in its gradient there."""
    if mask is None:
        return torch.log(x)
    return torch.where(mask, torch.log(torch.where(mask, x, torch.ones_like(x))),
                       torch.full_like(x, -math.inf))


class _Loop:
    """Shared state of one solve: scaled centred cost, log-marginals, support masks.

    ``sa``/``sb`` are the support masks of ``a``/``b`` (``None`` when every weight is positive: the
    fast path with no masking at all).
    """

    def __init__(self, Kc, a: Tensor, b: Tensor, sa: Optional[Tensor], sb: Optional[Tensor],
                 shape=None):
        # Kc = -(C - r - s)/eps, (..., n, m); or a function that builds it on first use (the
        # scaling engine needs it only when it absorbs or falls back to the log domain)
        self._Kc = Kc if isinstance(Kc, Tensor) else None
        self._Kc_fn = None if isinstance(Kc, Tensor) else Kc
        self.shape = Kc.shape if isinstance(Kc, Tensor) else shape
        self.E0: Optional[Tensor] = None
        self.a, self.b = a, b
        self.sa, self.sb = sa, sb
        self.loga = _safe_log(a, sa)
        self.logb = _safe_log(b, sb)

    @property
    def Kc(self) -> Tensor:
        if self._Kc is None:
            self._Kc = self._Kc_fn()
            self._Kc_fn = None
        return self._Kc

    # log-domain half steps (differentiable, out-of-place)
    def f_step(self, G: Tensor) -> Tensor:
        return self.loga - _lse_rows(self.Kc + G[..., None, :])

    def g_step(self, F: Tensor) -> Tensor:
        return self.logb - _lse_cols(self.Kc + F[..., :, None])

    def plan(self, F: Tensor, G: Tensor) -> Tensor:
        return torch.exp(self.Kc + F[..., :, None] + G[..., None, :])

    def error(self, P: Tensor) -> Tensor:
        return marginal_error(P, self.a.expand(P.shape[:-1]),
                              self.b.expand(P.shape[:-2] + P.shape[-1:]))


#: A single CPU matrix of at most this many bytes is solved on one thread: its passes are too
#: short for a parallel region to pay (measured: the two-GEMV loop at n = 256 is slower with two
#: threads than with one, and on a loaded machine each parallel region can wait a whole
#: scheduler time slice for a descheduled thread).
_ONE_THREAD_BYTES = 2 * 1024 * 1024


class _threads_for:
    """Context: one intra-op thread for the solve of a small single CPU matrix (the caller's
    setting is restored on exit, also on an exception); otherwise torch's setting is left
    alone. (``torch.set_num_threads`` is process-wide: a concurrent solve in another Python
    thread sees the same setting while it is held.)"""

    def __init__(self, shape, C):
        self.one = (isinstance(C, Tensor) and C.device.type == "cpu" and len(shape) == 2
                    and shape[0] * shape[1] * 8 <= _ONE_THREAD_BYTES)
        self.old = 0

    def __enter__(self):
        if self.one:
            self.old = torch.get_num_threads()
            if self.old > 1:
                torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.one and self.old > 1:
            torch.set_num_threads(self.old)
        return False


def _scaling_bound(dtype: torch.dtype) -> float:
    """``τ``, a quarter of the dtype's exponent range (``ln(max) / 4``: 22.2 in float32, 177.4 in
    float64): the scaling engine keeps its scalings ``u``, ``v`` within ``[e^-τ, e^τ]``,
    absorbing them into the potentials when one leaves."""
    return 0.25 * math.log(torch.finfo(dtype).max)


#: Natural logarithms just above the smallest normal numbers (float32: e^-87.34, float64:
#: e^-708.4): the kernel entries whose exponent is below become zero on the CPU.
_EXP_FLOOR = {torch.float32: -87.0, torch.float64: -708.0}


def _exp_kernel_(Z: Tensor) -> Tensor:
    """``exp`` in place, for a kernel of the scaling engine (``Z <= 0``, rows with maximum 0).

    On the CPU the entries below the dtype's smallest normal number become zero: those at
    ``1.5 e^floor`` or below, the floor :data:`_EXP_FLOOR` (-87 in float32, -708 in float64).
    x86 cores take a slow path for every subnormal operand: each matrix-vector product with a
    kernel holding them runs several times slower (n = 1024, float32, eps = 0.002, 6.9 % of the
    entries subnormal: 2.08 ms against 0.21 ms per product on this project's CPU; float64,
    eps = 0.0005, 1.7 % subnormal: 0.85 ms against 0.36 ms). In float32 the exponents are
    clamped at the floor first: torch's ``exp`` is 7-65x slower per element for inputs whose
    result is subnormal or zero (n = 1024, eps = 0.002: 19.2 ms against 1.1 ms for the kernel;
    benchmarks/probe_subnormal.py, outputs in benchmarks/results/probe_subnormal_exp.txt and
    probe_subnormal_exp_inputs.txt). In
    float64 such inputs need a cost range over eps above 708; there the clamp would save 7 ms of
    a 150 ms solve (n = 1024, eps = 0.0005) and its extra pass cost 2-9 % at eps = 0.01, so
    float64 goes without it. A zeroed entry weighs less than ``e^-42`` (float32) or ``e^-352``
    (float64) of its row's largest entry in the plan while the scalings lie in
    ``[e^-τ, e^τ]``, ``τ`` :func:`_scaling_bound`. (The products of the kept entries with small
    scalings can still be subnormal: the column product lifts its vector, see
    :func:`_lift_pow2`. On an accelerator subnormals cost nothing extra: left alone.)"""
    if Z.device.type == "cpu" and Z.dtype in (torch.float32, torch.float64):
        lo = _EXP_FLOOR[Z.dtype]
        if Z.dtype == torch.float32:
            # torch's exp takes a slow path for every input whose result is subnormal or zero
            # (inputs below -87): those entries are clamped just above, then zeroed
            Z.clamp_(min=lo)
        E = Z.exp_()
        torch.nn.functional.threshold_(E, 1.5 * math.exp(lo), 0.0)
        return E
    return Z.exp_()


#: The column product's lift (float32, CPU) is found again at every ``_LIFT_EVERY``-th product
#: and when the kernel changes, and lifts the smallest ``u`` to ``2^_LIFT_MARGIN`` or more.
_LIFT_EVERY = 8
_LIFT_MARGIN = 24


def _lift_pow2(x: Tensor, margin: int = 0) -> float:
    """A power of two ``2^k >= 1`` that lifts the smallest positive entry of the non-negative
    vector ``x (m,)`` to at least ``2^margin``, with ``2^k max(x) <= 2^100`` (1.0 when ``x`` has
    no positive entry or its smallest is already that large).

    The column product ``Eᵀu`` of the scaling engine in float32 on the CPU is computed as
    ``Eᵀ(2^k u) / 2^k``. Its terms ``E_ij u_i`` multiply kernel entries down to float32's smallest
    normal number by scalings ``u`` of order ``a / (E v)``, 1e-6 to 1e-8 for a thousand points,
    and at small eps several per cent of them are subnormal, each a slow path on x86: one product
    took 1.11 ms against 0.20 ms with them lifted (n = 1024, eps = 0.002, converged scalings;
    benchmarks/probe_subnormal.py; whole solves 1.6-2.5x faster). Scaling by a power of two is
    exact in the normal range, so the result is the same bits whenever no term was subnormal
    (and closer to exact otherwise)."""
    lo, hi = (float(t) for t in torch.aminmax(x))
    if lo <= 0.0:  # zero weights: their rows have u = 0
        pos = x[x > 0]
        if pos.numel() == 0:
            return 1.0
        lo = float(pos.amin())
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= 2.0 ** margin:
        return 1.0
    k = min(margin - math.floor(math.log2(lo)), 100 - math.ceil(math.log2(hi)))
    return math.ldexp(1.0, k) if k > 0 else 1.0


def _lift_pow2_batched(x: Tensor, margin: int = 0) -> Tensor:
    """:func:`_lift_pow2` for each vector of a batch ``x (..., m)``: a tensor ``(..., 1)`` of
    powers of two (1 where a vector has no positive entry or is already that large), found
    without a host synchronisation."""
    lo = torch.where(x > 0, x, torch.full_like(x, math.inf)).amin(-1, keepdim=True)
    hi = x.amax(-1, keepdim=True)
    e = torch.minimum(margin - torch.floor(torch.log2(lo)), 100 - torch.ceil(torch.log2(hi)))
    return torch.exp2(e.clamp_(min=0.0))


def _relax(x: Tensor, xn: Tensor, omega: float, mask: Optional[Tensor]) -> Tensor:
    """Over-relaxed log-domain step ``x + ω (xn - x)``, on the support only."""
    if omega == 1.0:
        return xn
    out = x + omega * (xn - x)
    return out if mask is None else torch.where(mask, out, xn)


def _log_block(L: _Loop, F: Tensor, G: Tensor, k: int, omega: float) -> Tuple[Tensor, Tensor]:
    """``k`` log-domain iterations (row, then column update); the last column update is never
    over-relaxed, so a block always ends with exact columns."""
    for i in range(k):
        F = _relax(F, L.f_step(G), omega, L.sa)
        Gn = L.g_step(F)
        G = Gn if i == k - 1 else _relax(G, Gn, omega, L.sb)
    return F, G


def _absorb_solve(
    L: _Loop,
    F0: Tensor,
    G0: Tensor,
    *,
    tol: float,
    max_iter: int,
    check_every: int,
    fixed: bool,
    momentum: Union[None, float, str],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int, list]:
    """Sinkhorn in the scaling domain with lazy absorption (Schmitzer 2019).

    State: a kernel ``E = exp(Z - max_j Z)`` with ``Z = (g_ref - C)/ε`` (rows with maximum one, so
    no row underflows to zero) and scalings ``u``, ``v`` with ``plan = diag(u) E diag(v)``. Each
    iteration is two matrix-vector products (the raw Sinkhorn-Knopp cost). The scalings are
    absorbed into the potentials (``f = ε(log u - max Z)``, ``g = g_ref + ε log v``) and the kernel
    is rebuilt (one ``exp`` pass) only when some scaling leaves ``[e^-τ, e^τ]``, ``τ`` a quarter of
    the dtype's exponent range, so that no entry that matters can underflow. Convergence checks
    reuse the products of the updates (no extra pass); when they report convergence, the plan is
    materialised once and its own error decides. A block whose scalings over- or under-flow is
    rolled back to the last absorption and redone in the log domain.

    Returns ``F, G, P, err, n_iter, iterations, history`` as :func:`_solve_detached`.
    """
    sa, sb = L.sa, L.sb
    shape = L.shape
    batch = shape[:-2]
    n, m = shape[-2], shape[-1]
    dtype, device = F0.dtype, F0.device
    a = L.a.expand(batch + (n,))
    b = L.b.expand(batch + (m,))
    asum = a.sum(-1)
    tau = _scaling_bound(dtype)
    n_iter = torch.full(batch, -1, dtype=torch.long, device=device)
    history: list = []
    omega = float(momentum) if isinstance(momentum, (int, float)) else 1.0
    # "anderson" runs its own loop below; with zero weights, or if it fails, adaptive relaxation
    adaptive = momentum in ("adaptive", "anderson")
    err_prev = None

    # float32 on the CPU: the column product lifts u by a power of two, so that no term E_ij u_i
    # is subnormal (exact; see _lift_pow2). The power is found from u when the kernel changes and
    # at every _LIFT_EVERY-th product, with a margin of 2^_LIFT_MARGIN for the drift of u in
    # between (an Anderson step can move u by more than 2^8)
    lift = dtype == torch.float32 and device.type == "cpu"
    lift_state: list = [None, 1.0, 0]  # kernel, power, products left before the next refresh

    def lift_k(E, u_src):
        if lift_state[0] is not E or lift_state[2] <= 0:
            find = _lift_pow2 if E.dim() == 2 else _lift_pow2_batched
            lift_state[:] = [E, find(u_src(), _LIFT_MARGIN), _LIFT_EVERY]
        lift_state[2] -= 1
        return lift_state[1]

    # batched matmul beats the elementwise product-and-sum for every size measured (n = 2..16,
    # torch 2.13 CPU); GEMV for a single matrix
    def col(E, u_):
        if E.dim() == 2:
            k = lift_k(E, lambda: u_) if lift else 1.0
            if k != 1.0:
                return torch.mv(E.t(), u_ * k).mul_(1.0 / k)
            return torch.mv(E.t(), u_)  # GEMV: faster than a 1-row GEMM
        if lift:  # one power of two per matrix, (..., 1)
            k = lift_k(E, lambda: u_)
            return torch.matmul((u_ * k).unsqueeze(-2), E).squeeze(-2).div_(k)
        return torch.matmul(u_.unsqueeze(-2), E).squeeze(-2)

    def row(E, v_):
        if E.dim() == 2:
            return torch.mv(E, v_)
        return torch.matmul(E, v_.unsqueeze(-1)).squeeze(-1)

    def div(w, s_, mask):
        q = w / s_
        return q if mask is None else torch.where(mask, q, torch.zeros_like(q))

    def relax(x, xn, mask):
        if omega == 1.0:
            return xn
        out = x * (xn / x).pow(omega)  # x^(1-ω) xn^ω with one pow
        return out if mask is None else torch.where(mask, out, xn)

    # One pass over the kernel per iteration (a single matrix larger than a cache): the row
    # update and the column product run block by block, each block of rows read from memory once
    # and re-read from cache, instead of two full matrix-vector products. Same updates, same
    # order (Gauss-Seidel), only the summation order of the column product differs. On one
    # thread only: with several, the four small operations per block each open a parallel
    # region, and two full multi-threaded products are faster (measured at n = 1024 and 4096,
    # two threads: 1.1-1.3x faster without blocks; benchmarks/README.md).
    blocks = None
    itemsize = torch.finfo(dtype).bits // 8
    if (len(shape) == 2 and sa is None and device.type == "cpu"
            and torch.get_num_threads() == 1
            and _SWEEP_BLOCK_BYTES > 0 and n * m * itemsize > 4 * _SWEEP_BLOCK_BYTES):
        rows_per = max(8, _SWEEP_BLOCK_BYTES // (m * itemsize)) // 8 * 8
        blocks = [(i0, min(i0 + rows_per, n)) for i0 in range(0, n, rows_per)]
        s_buf = torch.empty(n, dtype=dtype, device=device)  # E v, block by block
        c_buf = torch.empty(n, dtype=dtype, device=device)  # a^ω u_old^(1-ω)
        u_bufs = [torch.empty(n, dtype=dtype, device=device) for _ in range(2)]
        views = [(s_buf[i0:i1], c_buf[i0:i1], [ub[i0:i1] for ub in u_bufs]) for i0, i1 in blocks]
        ones_n = torch.ones(n, dtype=dtype, device=device)
        ones_m = torch.ones(m, dtype=dtype, device=device)
        sweep_views: list = []  # (E block, its transpose) per block, for the current kernel
        sweep_E: list = [None]
        flip = [0]

    def block_views(E):
        if sweep_E[0] is not E:
            sweep_E[0] = E
            sweep_views[:] = [(E[i0:i1], E[i0:i1].t()) for i0, i1 in blocks]
        return sweep_views

    def sweep(E, u_old, v_):
        """Relaxed row update ``u = u_old^(1-ω) (a / E v)^ω`` and ``Eᵀ u``, in one pass over E
        (four small operations per block of rows). ``s_buf`` holds ``E v`` afterwards."""
        block_views(E)
        flip[0] ^= 1
        un = u_bufs[flip[0]]  # never the buffer that holds u_old
        w = torch.zeros_like(v_)
        # float32: the row update writes k u, lifted by a power of two as in col, and both are
        # scaled back. The blocks' u are not known before their column products: k comes from
        # u_old, or the last sweep's u on this kernel, or, in the first sweep on a kernel in the
        # Anderson loop, from a / E v (one extra product per kernel built)
        def u_src():
            if u_old is not None:
                return u_old
            if lift_state[0] is E:
                return u_bufs[flip[0] ^ 1]
            return a / torch.mv(E, v_)

        k = lift_k(E, u_src) if lift else 1.0
        if omega != 1.0:
            torch.mul(torch.pow(a, omega), torch.pow(u_old, 1.0 - omega), out=c_buf)
            if k != 1.0:
                c_buf.mul_(k)
        elif k != 1.0:
            torch.mul(a, k, out=c_buf)
        else:
            c_buf.copy_(a)
        for (Eb, Ebt), (sv, cv, uvs) in zip(sweep_views, views):
            ub = uvs[flip[0]]
            torch.mv(Eb, v_, out=sv)
            if omega != 1.0:
                torch.pow(sv, -omega, out=ub)
                ub.mul_(cv)
            else:
                torch.div(cv, sv, out=ub)
            w.addmv_(Ebt, ub)
        if k != 1.0:
            un.mul_(1.0 / k)
            w.mul_(1.0 / k)
        return un, w

    def rowsum(E):
        # a matrix-vector product with ones reads a large matrix faster than sum(-1)
        return torch.mv(E, ones_m) if blocks is not None else E.sum(-1)

    def materialise(E, u_, v_):
        """The returned plan ``u E v`` and its own error (row and column sums of that tensor),
        written over the kernel (for one large matrix block by block, with its sums taken while
        each block is in cache: one pass); returns ``(P, err, kernel_consumed)``."""
        if blocks is None:
            # in place: the kernel is the solver's own buffer, and a fresh plan-sized tensor
            # costs page faults on every solve (glibc serves it by mmap)
            P_ = E.mul_(u_[..., :, None]).mul_(v_[..., None, :])
            return P_, L.error(P_), True
        rows_ = torch.empty(n, dtype=dtype, device=device)
        cols_ = torch.zeros(m, dtype=dtype, device=device)
        for (Eb, Ebt), (i0, i1) in zip(block_views(E), blocks):
            Eb.mul_(u_[i0:i1, None]).mul_(v_)
            torch.mv(Eb, ones_m, out=rows_[i0:i1])
            cols_.addmv_(Ebt, ones_n[i0:i1])
        sweep_E[0] = None
        err_ = torch.maximum((rows_ - a).abs().sum(-1), (cols_ - b).abs().sum(-1)) / asum
        return E, err_, True

    def build(G):
        Z = L.Kc + G[..., None, :]
        zmax = Z.amax(-1, keepdim=True)
        E = _exp_kernel_(Z.sub_(zmax))
        u = div(a, rowsum(E), sa)  # exact row update
        return E, zmax.squeeze(-1), u

    def scalings_ok(u, v):
        lu, lv = torch.log(u), torch.log(v)
        if sa is not None:
            lu = torch.where(sa, lu, torch.zeros_like(lu))
            lv = torch.where(sb, lv, torch.zeros_like(lv))
        return torch.isfinite(lu).all() & torch.isfinite(lv).all(), lu, lv

    def absorb(u, v, zmax, G_ref):
        F = torch.log(u) - zmax
        G = G_ref + torch.log(v)
        return F, G

    F_abs, G_abs = F0, G0  # potentials at the last absorption (rollback point)
    if getattr(L, "E0", None) is not None:  # the first kernel, computed with the centring
        E = L.E0
        L.E0 = None
        zmax = torch.zeros_like(F0)
        u = div(a, rowsum(E), sa)
    else:
        E, zmax, u = build(G0)
    G_ref = G0
    if momentum == "anderson" and sa is None:
        def step(E_, v_):
            if blocks is not None:
                return sweep(E_, None, v_)  # omega is 1 here: u_old is not read
            u_ = a / row(E_, v_)
            return u_, col(E_, u_)

        out = _anderson_loop(E, zmax, G0, a, b, asum, tol, max_iter, step, absorb, build,
                             materialise, tau)
        if out is not None:
            return out
        # the accelerated iterates left the safe range: start again with adaptive relaxation
        # (omega is 1 and adaptive is on: set above for "anderson")
        E, zmax, u = build(G0)
    v = torch.ones_like(G0)
    Ev = None  # E v for the current v (reused by the next row update)
    fresh = True  # the row update of the next iteration was done by build()
    pre = None  # (u, Eᵀu) of the next iteration, swept during a check (one-pass sweep only)
    it = 0
    P = None
    while it < max_iter:
        k = min(check_every, max_iter - it)
        check = not fixed or it + k >= max_iter
        for i in range(k):
            if pre is not None:  # computed by the last check
                (u, Ktu), pre = pre, None
            elif blocks is not None and not fresh and Ev is None:
                u, Ktu = sweep(E, u, v)
            else:
                if not fresh:
                    if Ev is None:
                        Ev = row(E, v)
                    u = relax(u, div(a, Ev, sa), sa)
                Ktu = col(E, u)
            vn = div(b, Ktu, sb)
            # plain column update after a rebuild and at the end of a checked block
            v = vn if (fresh or (check and i == k - 1)) else relax(v, vn, sb)
            fresh = False
            Ev = None
        it += k
        ok, lu, lv = scalings_ok(u, v)
        if not bool(ok):
            # roll back to the last absorption and redo this block in the log domain
            it -= k
            F_abs, G_abs = _log_block(L, F_abs, G_abs, k, 1.0)
            it += k
            omega, adaptive = 1.0, False
            E, zmax, u = build(G_abs)
            G_ref, v, Ev, fresh = G_abs, torch.ones_like(G_abs), None, True
            if check:
                P = L.plan(F_abs, G_abs)
                err = L.error(P)
                history.append(err)
                n_iter = torch.where((err <= tol) & (n_iter < 0), torch.full_like(n_iter, it), n_iter)
                if fixed or bool((n_iter >= 0).all()):
                    F, G = F_abs, G_abs
                    return F, G, P, err, torch.where(n_iter < 0, torch.full_like(n_iter, it),
                                                     n_iter), it, history
            continue
        if check:
            if blocks is not None and not (fixed or it >= max_iter):
                # the next iteration's sweep computes E v for the current v on its way: the
                # check costs no extra pass over the kernel
                pre = sweep(E, u, v)
                rows = u * s_buf
            else:
                Ev = row(E, v)
                rows = u * Ev
            cols = v * Ktu
            err = torch.maximum((rows - a).abs().sum(-1), (cols - b).abs().sum(-1)) / asum
            history.append(err)
            newly = (err <= tol) & (n_iter < 0)
            n_iter = torch.where(newly, torch.full_like(n_iter, it), n_iter)
            if fixed or it >= max_iter or bool((n_iter >= 0).all()):
                # the returned plan is materialised once and its own error decides
                P, errP, consumed = materialise(E, u, v)
                history[-1] = errP
                bad = errP > tol
                if fixed or not bool(bad.any()) or it >= max_iter:
                    F, G = absorb(u, v, zmax, G_ref)
                    n_iter = torch.where(n_iter < 0, torch.full_like(n_iter, it), n_iter)
                    return F, G, P, errP, n_iter, it, history
                n_iter = torch.where(bad, torch.full_like(n_iter, -1), n_iter)
                P = None
                if consumed:  # the kernel became the plan: absorb and rebuild it
                    F_abs, G_abs = absorb(u, v, zmax, G_ref)
                    E, zmax, u = build(G_abs)
                    G_ref, v, Ev, fresh, pre = G_abs, torch.ones_like(G_abs), None, True, None
                    continue
            if adaptive:
                omega, err_prev = _overrelax.adapt(err, err_prev, k, omega)
        if bool((lu.abs().amax() > tau) | (lv.abs().amax() > tau)):
            F_abs, G_abs = absorb(u, v, zmax, G_ref)
            E, zmax, u = build(G_abs)
            G_ref, v, Ev, fresh, pre = G_abs, torch.ones_like(G_abs), None, True, None
    # not reached: the last block always checks and returns; kept for safety
    F, G = absorb(u, v, zmax, G_ref)
    P, err, _ = materialise(E, u, v)
    history.append(err)
    n_iter = torch.where(n_iter < 0, torch.full_like(n_iter, it), n_iter)
    return F, G, P, err, n_iter, it, history


#: float64's smallest normal number (the Tikhonov floor of the host least-squares solve).
_TINY64 = float(np.finfo(np.float64).tiny)
#: Iterates remembered by Anderson acceleration (``momentum="anderson"``).
_ANDERSON_MEMORY = 12
#: ``momentum="auto"`` takes Anderson acceleration from this many matrix entries on (n = m = 128).
#: Measured on this project's CPU, one thread, time to 1e-6 against adaptive relaxation
#: (benchmarks/probe_anderson.py, output in benchmarks/results/probe_anderson_numpy.txt): from
#: n = 128 on, 1.12-2.43x faster at eps = 0.01 and 1.47-3.61x at 0.002; at 0.05, where both need
#: 1-2.5 ms up to n = 362, 0.86-0.99x there and 1.56-2.16x above; at n = 64 0.81x, 1.07x and
#: 1.23x (the bookkeeping of each iteration weighs as much as the iterations it saves). A batch
#: counts all its entries (the bookkeeping is some 25 operations whatever the batch): batches of
#: 16x16 to 256x256 matrices with 128 x 128 entries or more in all, 1.08-5.28x faster at eps 0.05
#: and 0.01; batches of 4x4 and 8x8 matrices, 0.56-0.71x (a memory of 12 iterates is wider than
#: the matrix), hence matrices wider than the memory only (benchmarks/probe_anderson.py batched,
#: output in benchmarks/results/probe_anderson_batched.txt).
_ANDERSON_MIN_ENTRIES = 128 * 128


def _small_lstsq(A: Tensor, rhs: Tensor) -> Tensor:
    """``(A + δI)⁻¹ rhs`` for the ``k x k`` normal equations of Anderson acceleration on a device
    (``A (..., k, k)``, fresh, overwritten; ``rhs (..., k, 1)``; ``k <= _ANDERSON_MEMORY``), ``δ``
    a relative Tikhonov term that keeps nearly collinear differences from blowing up the
    extrapolation. A singular system gives ``γ = 0`` (no extrapolation). (On the CPU the
    Anderson loop keeps its bookkeeping in NumPy and solves with :func:`_small_lstsq_np`.)"""
    diag = A.diagonal(dim1=-2, dim2=-1)
    dmax = diag.amax(-1, keepdim=True)
    diag.add_(1e-12 * dmax + torch.finfo(A.dtype).tiny)
    gamma = torch.linalg.solve(A, rhs)
    return torch.where(dmax[..., None] > 0, gamma, torch.zeros_like(gamma))


def _small_lstsq_np(A, rhs, posv=None):
    """:func:`_small_lstsq` for NumPy arrays (float64), through LAPACK: at this size a NumPy call
    costs microseconds, a torch operator several times more. A single system (``A (k, k)``)
    goes to ``posv`` (Cholesky; ``A`` is a Gram matrix plus the Tikhonov term, positive definite
    unless the differences are degenerate) when given, SciPy's ``dposv``, whose call costs a
    third of ``numpy.linalg.solve``'s; a batch, or a system ``posv`` finds not positive definite,
    to ``numpy.linalg.solve`` (``gesv``)."""
    if A.ndim == 2:
        diag = A.ravel()[:: A.shape[0] + 1]  # a writable view (A is a fresh contiguous array)
        dmax = float(diag.max())
        if not dmax > 0.0:  # no differences (or not finite): no extrapolation
            return np.zeros_like(rhs)
        diag += 1e-12 * dmax + _TINY64
        if posv is not None:
            _, gamma, info = posv(A, rhs)
            if info == 0:
                return gamma
        try:
            return np.linalg.solve(A, rhs)
        except np.linalg.LinAlgError:
            return np.zeros_like(rhs)
    diag = np.einsum("...ii->...i", A)  # a writable view of the diagonal
    dmax = diag.max(-1, keepdims=True)
    diag += 1e-12 * dmax + _TINY64
    try:
        gamma = np.linalg.solve(A, rhs)
    except np.linalg.LinAlgError:
        return np.zeros_like(rhs)
    return np.where(dmax[..., None] > 0, gamma, 0.0)


class _HostOps:
    """The vector bookkeeping of the Anderson loop in NumPy, for CPU tensors: each operation on a
    vector of length m costs about a microsecond there against several in torch's dispatcher,
    and a solve at n = 1024 runs some 25 of them per iteration against two matrix-vector
    products (views, no copies, when the dtype is already float64). Right after the products,
    which stream the kernel through the core's caches, each operation costs several times more
    (benchmarks/probe_two_thread_sweep.py): the loop keeps their number low. ``scaling`` writes
    ``v = e^x`` into a buffer reused at every iteration (the loop holds no ``v`` across
    iterations), and the errors stay NumPy scalars until the loop returns."""

    def __init__(self, dtype: torch.dtype):
        from scipy.linalg import lapack  # a dependency; imported on the first Anderson solve

        self.dtype = dtype
        self.v = self.v_arr = None
        self.posv = lapack.dposv

    def arr(self, t: Tensor):
        return t.numpy().astype(np.float64, copy=False)

    def tensor(self, x) -> Tensor:
        return torch.as_tensor(np.asarray(x)).to(self.dtype)

    def empty(self, shape):
        return np.empty(shape)

    def scaling(self, x):
        """``v = e^x`` as a tensor of the solver's dtype, and the same values as an array."""
        if self.v is None or self.v.shape != x.shape:
            self.v = torch.empty(x.shape, dtype=self.dtype)
            self.v_arr = self.v.numpy()
        np.exp(x, out=self.v_arr)
        return self.v, self.v_arr

    def log(self, x):
        return np.log(x)

    def maxes(self, err, Tx, u) -> list:
        """``max err``, ``max |Tx|`` and ``max |log u|`` as floats (``inf`` for a zero or NaN
        ``u``)."""
        lo, hi = float(u.min()), float(u.max())
        ul = max(math.log(hi), -math.log(lo)) if lo > 0.0 else math.inf
        return [float(err.max()), max(float(Tx.max()), -float(Tx.min())), ul]

    def record(self, err):
        return err

    def history(self, hist: list) -> list:
        return [h if isinstance(h, Tensor) else self.tensor(h) for h in hist]

    def solve(self, A, rhs):
        return _small_lstsq_np(A, rhs, self.posv)

    def quiet(self):
        # an extrapolation that overshoots gives inf and NaN, which the loop detects (it then
        # restarts with adaptive relaxation): no RuntimeWarning for the user, as in torch
        return np.errstate(all="ignore")


class _DeviceOps:
    """The same bookkeeping in torch on an accelerator (one host synchronisation per iteration,
    to read the maxima)."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device

    def arr(self, t: Tensor) -> Tensor:
        return t.to(torch.float64)

    def tensor(self, x: Tensor) -> Tensor:
        return x.to(self.dtype)

    def empty(self, shape) -> Tensor:
        return torch.empty(shape, dtype=torch.float64, device=self.device)

    def scaling(self, x: Tensor):
        v = torch.exp(x).to(self.dtype)
        return v, v.to(torch.float64)

    def log(self, x: Tensor) -> Tensor:
        return torch.log(x)

    def maxes(self, err: Tensor, Tx: Tensor, u: Tensor) -> list:
        return torch.stack([err.max(), Tx.abs().max(), torch.log(u).abs().max()]).tolist()

    def record(self, err: Tensor) -> Tensor:
        return err.to(self.dtype)

    def history(self, hist: list) -> list:
        return hist

    def solve(self, A: Tensor, rhs: Tensor) -> Tensor:
        return _small_lstsq(A, rhs)

    def quiet(self):
        return contextlib.nullcontext()


def _anderson_ops(dtype: torch.dtype, device: torch.device):
    """The array namespace of the Anderson loop's bookkeeping: NumPy for CPU tensors, torch on a
    device."""
    return _HostOps(dtype) if device.type == "cpu" else _DeviceOps(dtype, device)


def _anderson_loop(E, zmax, G_ref, a, b, asum, tol, max_iter, step, absorb, build, materialise,
                   tau):
    """Sinkhorn-Knopp with Anderson acceleration (type II, memory ``_ANDERSON_MEMORY``) of the
    column potential, in the absorbed scaling domain of :func:`_absorb_solve` (all weights
    positive, convergence tested at every iteration).

    The iteration is the fixed-point map ``x -> T(x) = log b - log Eᵀ(a / E e^x)`` on
    ``x = log v``; each step extrapolates from the last iterates, ``x <- T(x) - ΔT γ`` with ``γ``
    the least-squares fit of the residual ``R = T(x) - x`` by its recent differences ``ΔR``
    (Walker & Ni 2011). Residuals and differences are invariant under the potentials' gauge
    ``x + c``, and the fit under the order of the remembered differences, which therefore live in
    a ring buffer. ``step(E, v)`` returns ``(u, Eᵀu)`` with ``u = a / E v`` (two matrix-vector
    products, or the one-pass sweep). The plan ``diag(u) E diag(v)`` has exact rows; its column
    error ``|v ⊙ Eᵀu - b|₁`` comes free with the step, and the returned plan is materialised once
    and its own error decides. When ``|log u|`` or ``|log v|`` passes ``τ`` the scalings are
    absorbed into the potentials and the kernel rebuilt; the memory survives (a change of frame
    shifts ``T`` and leaves residuals and differences unchanged). Safeguard: when the error grows
    past ten times the best seen, the memory is dropped (a plain step follows). The extrapolation
    and the vector bookkeeping run in float64 (in float32 the normal equations, condition number
    squared, lose the small differences near convergence and the iterates stall), in NumPy for
    CPU tensors (:class:`_HostOps`) and in torch on a device, with one host synchronisation per
    iteration (:class:`_DeviceOps`). Returns ``None`` (the caller restarts with adaptive
    over-relaxation) if an iterate is not finite.
    """
    xp = _anderson_ops(b.dtype, b.device)
    with xp.quiet():
        return _anderson_iterate(xp, E, zmax, G_ref, a, b, asum, tol, max_iter, step, absorb,
                                 build, materialise, tau)


def _anderson_iterate(xp, E, zmax, G_ref, a, b, asum, tol, max_iter, step, absorb, build,
                      materialise, tau):
    """The loop of :func:`_anderson_loop`, its bookkeeping in the namespace ``xp``."""
    batch, m = b.shape[:-1], b.shape[-1]
    device = b.device
    mem = _ANDERSON_MEMORY
    DT = xp.empty(batch + (m, mem))  # ΔT, ring buffer
    DR = xp.empty(batch + (m, mem))  # ΔR
    k = slot = 0  # differences held, next slot
    logb = xp.log(xp.arr(b))
    bw = xp.arr(b)
    asw = xp.arr(asum)
    x = logb * 0.0  # log v relative to the kernel's reference potential G_ref
    T_prev = R_prev = None
    best = math.inf
    history: list = []
    n_iter = torch.full(batch, -1, dtype=torch.long, device=device)
    it = 0
    while it < max_iter:
        v, vw = xp.scaling(x)  # vw: the values of v as an array (a buffer on the host)
        u, Ktu = step(E, v)
        it += 1
        Kw = xp.arr(Ktu)
        err = abs(vw * Kw - bw).sum(-1) / asw  # rows are exact: u = a / E v
        Tx = logb - xp.log(Kw)
        emax, xmax, umax = xp.maxes(err, Tx, xp.arr(u))
        history.append(xp.record(err))
        if not math.isfinite(emax):  # a non-finite u or v makes the error non-finite
            return None
        if emax <= tol or it >= max_iter or (batch and bool((err <= tol).any())):
            newly = (xp.tensor(err) <= tol) & (n_iter < 0)
            n_iter = torch.where(newly, torch.full_like(n_iter, it), n_iter)
            if emax <= tol or it >= max_iter:
                P, errP, _ = materialise(E, u, v)
                history[-1] = errP
                bad = errP > tol
                if not bool(bad.any()) or it >= max_iter:
                    F, G = absorb(u, v, zmax, G_ref)
                    n_iter = torch.where(n_iter < 0, torch.full_like(n_iter, it), n_iter)
                    return F, G, P, errP, n_iter, it, xp.history(history)
                # round-off of the materialised plan: rebuild the kernel (it may have become
                # the plan) at the current potentials and go on
                n_iter = torch.where(bad, torch.full_like(n_iter, -1), n_iter)
                G_ref = G_ref + xp.tensor(x)
                E, zmax, _ = build(G_ref)
                x = x * 0.0
                k = slot = 0
                T_prev = R_prev = None
                continue
        R = Tx - x
        if emax > 10.0 * best:
            k = slot = 0  # safeguard: forget the history, take a plain step
            T_prev = R_prev = None
        best = min(best, emax)
        if T_prev is not None:
            DT[..., slot] = Tx - T_prev
            DR[..., slot] = R - R_prev
            slot = (slot + 1) % mem
            k = min(k + 1, mem)
        T_prev, R_prev = Tx, R
        if k:
            dR, dT = DR[..., :k], DT[..., :k]
            dRt = dR.swapaxes(-1, -2)
            gamma = xp.solve(dRt @ dR, dRt @ R[..., None])
            x = Tx - (dT @ gamma)[..., 0]
        else:
            x = Tx
        if max(xmax, umax) > tau:
            # absorb the scalings into the reference potential and rebuild the kernel, as the
            # adaptive engine does (an extrapolation that overshoots into overflow makes the
            # next error non-finite, and the solve restarts with adaptive relaxation).
            # In the new frame T'(x') = T(x' + s) - s for the absorbed shift s (the rows'
            # rescaling cancels), so residuals and differences are unchanged and the memory is
            # kept: only the last T moves by -s.
            shift = xp.tensor(x)
            G_ref = G_ref + shift
            E, zmax, _ = build(G_ref)
            sw = xp.arr(shift)
            x = x - sw
            T_prev = T_prev - sw
    return None


#: Batched matrices up to this size take the planar fixed-iteration loop on the CPU.
_PLANAR_MAX = 16
#: Bytes of kernel per chunk of the batch in the planar loop (0: the whole batch at once).
_PLANAR_CHUNK_BYTES = 512 * 1024


def _planar_solve(C: Tensor, a: Tensor, b: Tensor, eps: float, iters: int):
    """Fixed-iteration scaling loop for a batch of tiny matrices ``C (..., n, m)`` (the mHC
    shape) in a planar layout ``(n, m, batch)``: every step is a fused multiply-add over
    contiguous batch-long rows (``n`` or ``m`` of them per matrix-vector product) instead of a
    batched GEMV per tiny matrix, and the centring, kernel and plan are built in place in that
    layout. Same sweeps as the scaling engine in fixed mode (exact row update from the kernel
    ``exp(-(C - r)/ε)``, ``r`` the row minima, then column, row, ... updates); the plan
    ``u K v`` is materialised once and its error computed from it.

    The batch runs in chunks small enough for all sweeps to run from cache. A chunk checks its
    scalings after its first sweep, where a low temperature makes them jump (the first kernel's
    columns are not centred), and after its last: when one has left ``[e^-τ, e^τ]`` it absorbs
    ``v`` into the column potential and rebuilds its kernel from the cost (Schmitzer's lazy
    absorption, as the general engine does; the iterates are the same in exact arithmetic).

    Returns ``(f, g, plan, err, n_iter, iterations, history)`` in cost units, or ``None`` when a
    scaling is not finite or still outside ``[e^-τ, e^τ]`` after an absorption (the caller then
    runs the general engine, which absorbs at every check and falls back to the log domain).
    """
    shape = C.shape
    batch, n, m = shape[:-2], shape[-2], shape[-1]
    Bt = C.numel() // (n * m)
    tau = _scaling_bound(C.dtype)
    lo_ok, hi_ok = math.exp(-tau), math.exp(tau)
    C3 = C.reshape(Bt, n, m)
    Ep = torch.empty((n, m, Bt), dtype=C.dtype, device=C.device)  # our own copy, (n, m, Bt)
    Ep.copy_(C3.permute(1, 2, 0))
    r = Ep.amin(1)  # (n, Bt)
    _exp_kernel_(Ep.sub_(r[:, None]).mul_(-1.0 / eps))  # rows with maximum one
    ap = a.expand(batch + (n,)).reshape(Bt, n).t()
    bp = b.expand(batch + (m,)).reshape(Bt, m).t()
    u = torch.div(ap, Ep.sum(1))  # (n, Bt): exact row update
    v = torch.empty(m, Bt, dtype=C.dtype, device=C.device)
    s_ = torch.empty(n, Bt, dtype=C.dtype, device=C.device)
    t_ = torch.empty(m, Bt, dtype=C.dtype, device=C.device)
    # absorbed potentials (ε units), made at the first absorption: the kernel of a chunk is then
    # exp(-(C - r)/ε + G - zmax), zmax its row maxima
    G = zmax = None

    def in_range(u_, v_) -> Optional[bool]:
        """True: every scaling in [e^-τ, e^τ]; False: finite but outside; None: not finite."""
        lo_u, hi_u, lo_v, hi_v = torch.stack([u_.amin(), u_.amax(), v_.amin(), v_.amax()]).tolist()
        if not all(math.isfinite(x) for x in (lo_u, hi_u, lo_v, hi_v)) or min(lo_u, lo_v) <= 0.0:
            return None
        return lo_ok <= min(lo_u, lo_v) and max(hi_u, hi_v) <= hi_ok

    def absorb(c0, c1, E_, u_, v_):
        """v into G, the chunk's kernel rebuilt in place, u moved to the new frame (v = 1)."""
        nonlocal G, zmax
        if G is None:
            G = torch.zeros(m, Bt, dtype=C.dtype, device=C.device)
            zmax = torch.zeros(n, Bt, dtype=C.dtype, device=C.device)
        G_, z_ = G[:, c0:c1], zmax[:, c0:c1]
        G_.add_(torch.log(v_))
        E_.copy_(C3[c0:c1].permute(1, 2, 0))
        E_.sub_(r[:, None, c0:c1]).mul_(-1.0 / eps).add_(G_[None])
        z_new = E_.amax(1)
        _exp_kernel_(E_.sub_(z_new[:, None]))
        u_.mul_(torch.exp(z_new - z_))  # plan = u E v, unchanged
        z_.copy_(z_new)
        v_.fill_(1.0)

    step = max(1024, _PLANAR_CHUNK_BYTES // (n * m * C.element_size())) if _PLANAR_CHUNK_BYTES else Bt
    for c0 in range(0, Bt, step):
        c1 = min(c0 + step, Bt)
        E_, u_, v_, s__, t__ = Ep[..., c0:c1], u[:, c0:c1], v[:, c0:c1], s_[:, c0:c1], t_[:, c0:c1]
        a_, b_ = ap[:, c0:c1], bp[:, c0:c1]
        cols = [(E_[:, j], v_[j]) for j in range(m)]  # views, made once
        rows = [(E_[i], u_[i]) for i in range(n)]
        for it in range(iters):
            if it > 0:
                torch.mul(cols[0][0], cols[0][1], out=s__)
                for Ej, vj in cols[1:]:
                    s__.addcmul_(Ej, vj)
                torch.div(a_, s__, out=u_)
            torch.mul(rows[0][0], rows[0][1], out=t__)
            for Ei, ui in rows[1:]:
                t__.addcmul_(Ei, ui)
            torch.div(b_, t__, out=v_)
            if it == 0 or it == iters - 1:
                ok = in_range(u_, v_)
                if ok is None:
                    return None
                if not ok:
                    absorb(c0, c1, E_, u_, v_)
                    if it == iters - 1 and not in_range(u_, v_):
                        return None
    lu, lv = torch.log(u), torch.log(v)
    P = Ep.mul_(u[:, None]).mul_(v[None])  # the kernel becomes the plan
    err = torch.maximum((P.sum(1) - ap).abs().sum(0), (P.sum(0) - bp).abs().sum(0))
    err = (err / ap.sum(0)).reshape(batch)
    plan = P.permute(2, 0, 1).reshape(shape).contiguous()
    if G is not None:  # potentials in ε units: f = log u - zmax, g = G + log v
        lu.sub_(zmax)
        lv.add_(G)
    f = lu.mul_(eps).add_(r).t().reshape(batch + (n,))
    g = lv.mul_(eps).t().reshape(batch + (m,))
    n_iter = torch.full(batch, iters, dtype=torch.long, device=C.device)
    return f, g, plan, err, n_iter, iters, [err]


def _solve_detached(
    L: _Loop,
    F0: Tensor,
    G0: Tensor,
    *,
    tol: float,
    max_iter: int,
    check_every: int,
    fixed: bool,
    engine: str,
    momentum: Union[None, float, str],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int, list]:
    """Run the solver without autograd.

    Returns ``F, G, P, err, n_iter, iterations, history``, where ``P`` is the plan of the final
    potentials (the matrix that is returned) and ``err == history[-1]`` is computed from ``P``.
    """
    if engine == "absorb":
        return _absorb_solve(L, F0, G0, tol=tol, max_iter=max_iter, check_every=check_every,
                             fixed=fixed, momentum=momentum)
    F, G = F0, G0
    batch = L.Kc.shape[:-2]
    n_iter = torch.full(batch, -1, dtype=torch.long, device=L.Kc.device)
    history = []
    it = 0
    omega = float(momentum) if isinstance(momentum, (int, float)) else 1.0
    adaptive = momentum == "adaptive"
    err_prev = None
    P = None
    while it < max_iter:
        k = min(check_every, max_iter - it)
        F_last, G_last = F, G
        check = not fixed or it + k >= max_iter
        P = None
        Fn, Gn = _log_block(L, F, G, k, omega)
        F, G = Fn, Gn
        it += k
        if not check:
            continue
        if P is None:
            P = L.plan(F, G)
        err = L.error(P)
        history.append(err)
        newly = (err <= tol) & (n_iter < 0)
        n_iter = torch.where(newly, torch.full_like(n_iter, it), n_iter)
        if fixed:
            break
        # one host sync per check, never per iteration
        if bool((n_iter >= 0).all()):
            break
        if not bool(torch.isfinite(err).all()):
            # A non-finite error can only come from over-relaxation overshoot: roll back to the
            # last finite potentials and continue with plain updates.
            F, G = F_last, G_last
            P = None
            history[-1] = torch.nan_to_num(err, nan=float("inf"))
            omega, adaptive = 1.0, False
            continue
        if adaptive:
            omega, err_prev = _overrelax.adapt(err, err_prev, k, omega)
    n_iter = torch.where(n_iter < 0, torch.full_like(n_iter, it), n_iter)
    if P is None:  # ended on a rolled-back block: the returned plan is rebuilt, and re-checked
        P = L.plan(F, G)
        history.append(L.error(P))
    return F, G, P, history[-1], n_iter, it, history


# ----------------------------------------------------------------------------------------------
# implicit differentiation


def _schur_solve(P: Tensor, a: Tensor, b: Tensor, wr: Tensor, wc: Tensor, cg_tol: float, cg_max: int,
                 sa: Optional[Tensor] = None, sb: Optional[Tensor] = None):
    """Solve [[D_a, P], [Pᵀ, D_b]] [α; β] = [wr; wc] on the support (pseudo-inverse, kernel
    (1, -1) on the support); α = 0 and β = 0 off the support.

    Eliminates α and solves the Schur complement S β = wc - Pᵀ D_a⁻¹ wr with
    S = D_b - Pᵀ D_a⁻¹ P (PSD, kernel 1 on the support of b). Dense for small m, batched CG
    otherwise. Rows and columns with zero weight have zero plan entries and are decoupled: their
    diagonal is set to one and their right-hand side to zero.
    """
    n, m = P.shape[-2], P.shape[-1]
    a = a.expand(wr.shape)
    b = b.expand(wc.shape)
    if sa is not None:
        sa = sa.expand(wr.shape)
        sb = sb.expand(wc.shape)
        wr = torch.where(sa, wr, torch.zeros_like(wr))
        wc = torch.where(sb, wc, torch.zeros_like(wc))
        a = torch.where(sa, a, torch.ones_like(a))
        b = torch.where(sb, b, torch.ones_like(b))
        qb = sb.to(P.dtype)
        na, nb = sa.to(P.dtype).sum(-1), qb.sum(-1)
    else:
        qb = None
        na = torch.full(wr.shape[:-1], float(n), dtype=P.dtype, device=P.device)
        nb = torch.full(wc.shape[:-1], float(m), dtype=P.dtype, device=P.device)

    def on_b(x):  # zero off the support of b
        return x if qb is None else x * qb

    def centre_b(x):  # remove the mean over the support of b (the kernel direction of S)
        return on_b(x - (on_b(x).sum(-1) / nb)[..., None])

    # remove the component of w along the kernel direction (1_supp(a), -1_supp(b))
    c = (wr.sum(-1) - wc.sum(-1)) / (na + nb)
    wr = wr - c[..., None] if sa is None else torch.where(sa, wr - c[..., None], wr)
    wc = on_b(wc + c[..., None])
    Pa = P / a[..., :, None]  # D_a^{-1} P
    rhs = centre_b(wc - torch.einsum("...ij,...i->...j", Pa, wr))
    if m <= DENSE_SCHUR_MAX:
        S = torch.diag_embed(b) - P.transpose(-1, -2) @ Pa
        if qb is None:
            q = torch.ones(m, dtype=P.dtype, device=P.device).expand(wc.shape) / math.sqrt(m)
        else:
            q = qb / nb.sqrt()[..., None]
        bbar = on_b(b).sum(-1) / nb
        S = S + bbar[..., None, None] * q[..., :, None] * q[..., None, :]
        beta = torch.linalg.solve(S, rhs[..., None])[..., 0]
    else:

        def S_mv(x):
            return b * x - torch.einsum("...ij,...i->...j", P, torch.einsum("...ij,...j->...i", Pa, x))

        beta = torch.zeros_like(rhs)
        r = rhs.clone()
        p = r.clone()
        rs = (r * r).sum(-1)
        rs0 = rs.clone()
        for _ in range(cg_max):
            Sp = centre_b(S_mv(p))
            denom = (p * Sp).sum(-1)
            alpha = torch.where(denom > 0, rs / torch.where(denom > 0, denom, torch.ones_like(denom)),
                                torch.zeros_like(rs))
            beta = beta + alpha[..., None] * p
            r = r - alpha[..., None] * Sp
            rs_new = (r * r).sum(-1)
            if bool((rs_new <= (cg_tol**2) * rs0.clamp_min(1e-300)).all()):
                break
            p = r + (rs_new / rs.clamp_min(1e-300))[..., None] * p
            rs = rs_new
    alpha_ = (wr - torch.einsum("...ij,...j->...i", P, beta)) / a
    if sa is not None:
        alpha_ = torch.where(sa, alpha_, torch.zeros_like(alpha_))
    return alpha_, beta


class _ImplicitSinkhorn(torch.autograd.Function):
    """Outputs ``(plan, f, g)`` computed by the detached solver; the backward differentiates the
    optimality conditions ``P1 = a``, ``Pᵀ1 = b`` with ``P = exp((f ⊕ g - C)/ε)`` with respect to
    ``C``, ``a``, ``b`` and ``ε`` (one linear system for all of them)."""

    @staticmethod
    def forward(ctx, C, a, b, eps, P, f, g, sa, sb, cg_tol, cg_max):  # type: ignore[override]
        ctx.save_for_backward(P, a, b, eps)
        ctx.masks = (sa, sb)
        ctx.cg = (cg_tol, cg_max)
        return P.clone(), f.clone(), g.clone()

    @staticmethod
    def backward(ctx, gP, gf, gg):  # type: ignore[override]
        P, a, b, eps = ctx.saved_tensors
        sa, sb = ctx.masks
        e2 = eps[..., None, None] if eps.dim() else eps
        e1 = eps[..., None] if eps.dim() else eps
        if gP is None:
            gP = torch.zeros_like(P)
        PG = P * gP
        wr = PG.sum(-1) / e1
        wc = PG.sum(-2) / e1
        if gf is not None:
            wr = wr + (gf if sa is None else torch.where(sa, gf, torch.zeros_like(gf)))
        if gg is not None:
            wc = wc + (gg if sb is None else torch.where(sb, gg, torch.zeros_like(gg)))
        al, be = _schur_solve(P, a, b, wr, wc, *ctx.cg, sa=sa, sb=sb)
        gC = P * (al[..., :, None] + be[..., None, :]) - PG / e2
        need = ctx.needs_input_grad
        ga = e1 * al if need[1] else None
        gb = e1 * be if need[2] else None
        geps = None
        if need[3]:
            pos = P > 0
            logP = torch.log(torch.where(pos, P, torch.ones_like(P)))
            geps = torch.where(pos, gC * logP, torch.zeros_like(P)).sum((-2, -1))
            geps = geps.reshape(geps.shape)  # (batch)
        return gC if need[0] else None, ga, gb, geps, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# public API


def sinkhorn(
    cost: Tensor,
    eps: EpsLike,
    a: Optional[Tensor] = None,
    b: Optional[Tensor] = None,
    *,
    tol: float = 1e-6,
    max_iter: int = 2000,
    n_iter: Optional[int] = None,
    check_every: int = 10,
    grad: GradMode = "unroll",
    init: Optional[Tuple[Tensor, Tensor]] = None,
    engine: Engine = "auto",
    momentum: Union[None, float, str] = "auto",
    warn: bool = True,
    check_inputs: bool = True,
    cg_tol: float = 1e-10,
    cg_max_iter: int = 500,
) -> SinkhornResult:
    """Entropic optimal transport between ``a`` and ``b`` for ``cost``, in the log domain.

    Parameters
    ----------
    cost : Tensor ``(..., n, m)``
        Real cost matrix, batched over leading dimensions (complex, boolean and meta-device tensors
        are refused). fp64 and fp32 are computed in their own precision. **Half precision rule:**
        fp16/bf16 inputs are computed in fp32; ``plan`` is returned in the input dtype (it is what
        flows on through a half-precision network), while ``f``, ``g``, ``marginal_error`` and
        ``errors`` stay fp32 and describe the fp32 plan before the cast. The cast rounds each entry
        by at most the unit round-off ``u`` (2⁻⁹ for bf16, 2⁻¹² for fp16) relative, so the returned
        half plan's own error is at most ``marginal_error + u``.
    eps : float or Tensor
        Entropic regularisation, ``> 0`` and finite. A tensor may be a scalar or one value per
        problem (shape broadcastable with the batch shape ``...``); it stays in the autograd graph
        (learnable temperature), in both ``grad="unroll"`` and ``grad="implicit"``.
    a, b : Tensor ``(..., n)`` and ``(..., m)``, optional
        Nonnegative marginals with equal totals (batch dims broadcast with the cost's). Zero weights
        are allowed: those rows/columns carry no mass, their potentials are ``-inf`` and the
        solver (acceleration, gradients) works on the support. Default: uniform probability vectors.
        Gradients reach ``a`` and ``b`` when they require grad (zero weights get a zero gradient:
        the support is held fixed).
    tol : float
        Tolerance on the relative L1 marginal error (see :func:`marginal_error`).
    max_iter : int
        Iteration cap (one iteration = a row and a column update).
    n_iter : int, optional
        Fixed-iteration mode, as used inside networks: run exactly ``n_iter`` iterations with no
        convergence test and plain (un-accelerated) updates. The marginal error of the returned plan
        is still computed and reported, and ``converged`` compares it with ``tol``; missing ``tol``
        emits no warning in this mode, but a plan that is not finite does.
    check_every : int
        Iterations between convergence checks (each check is one host sync on a GPU).
    grad : {"unroll", "implicit", "none"}
        How gradients reach ``cost``, ``a``, ``b`` and ``eps``: back-propagate through the
        iterations (whenever any of them requires grad), differentiate the optimality conditions
        (memory independent of the iteration count), or detach.
    init : (f, g), optional
        Warm-start potentials in cost units, shapes ``(..., n)`` and ``(..., m)`` broadcastable with
        the batch; what the solver returns (``(res.f, res.g)``, ``-inf`` at zero weights included)
        is accepted. NaN and ``+inf`` are refused.
    engine : {"auto", "log", "absorb"}
        Iteration engine (see the module docstring). ``"auto"`` uses ``"absorb"`` unless
        gradients are unrolled. Both engines run the same sweeps; in fixed-iteration mode they
        return the same matrix up to round-off.
    momentum : None, float, "adaptive", "anderson" or "auto"
        Acceleration of the converging solve. A float is an over-relaxation factor ω ∈ [1, 2);
        ``"adaptive"`` estimates the linear rate from the error history and sets
        ω = 2/(1+√(1-rate)); ``"anderson"`` extrapolates the column potential from its last 12
        iterates (scaling engine; all weights positive, else adaptive; convergence tested every
        iteration); ``"auto"`` (the default) is ``"anderson"`` on the eager scaling engine for
        at least 128 x 128 entries in all (over the batch) and matrices with both sides above 12,
        else ``"adaptive"``.
        Ignored in fixed mode and when gradients are unrolled.
    warn : bool
        Emit a :class:`SinkhornWarning` when some batch element misses ``tol``.
    check_inputs : bool
        Validate finiteness, signs and totals (host syncs). Shapes, types and ``eps`` are always
        checked.

    Returns
    -------
    SinkhornResult
        ``plan (..., n, m)``, ``f (..., n)``, ``g (..., m)``, ``n_iter (...)``,
        ``marginal_error (...)``, ``converged (...)``; every number describes ``plan``.

    Raises
    ------
    ValueError
        For non-finite inputs, ``eps <= 0``, negative marginals, unequal totals, shape mismatch
        (``init`` included), meta-device tensors, or out-of-range integer/float arguments.
    TypeError
        For complex or boolean tensors, and for arguments of the wrong type (``tol=None``,
        ``tol="1e-3"``, ``max_iter=None``), naming the argument.
    """
    return _sinkhorn(cost, eps, a, b, tol=tol, max_iter=max_iter, n_iter=n_iter,
                     check_every=check_every, grad=grad, init=init, engine=engine,
                     momentum=momentum, warn=warn, check_inputs=check_inputs, cg_tol=cg_tol,
                     cg_max_iter=cg_max_iter)


def _sinkhorn(cost, eps, a, b, **kw) -> SinkhornResult:
    # a small single CPU matrix is solved on one intra-op thread from validation to the plan
    with _threads_for(cost.shape if isinstance(cost, Tensor) else (), cost):
        return _sinkhorn_impl(cost, eps, a, b, **kw)


def _sinkhorn_impl(
    cost, eps, a, b, *, tol, max_iter, n_iter, check_every, grad, init, engine, momentum, warn,
    check_inputs, cg_tol, cg_max_iter, allow_inf_cost: bool = False, eps_name: str = "eps",
    trusted: bool = False,
) -> SinkhornResult:
    if grad not in ("unroll", "implicit", "none"):
        raise ValueError(f"`grad` must be 'unroll', 'implicit' or 'none'; got {grad!r}")
    if engine not in ("auto", "log", "absorb"):
        raise ValueError(f"`engine` must be 'auto', 'log' or 'absorb'; got {engine!r}")
    if n_iter is not None:
        n_iter = integer_arg("n_iter", n_iter)
    max_iter = integer_arg("max_iter", max_iter)
    tol = nonneg_finite("tol", tol)
    check_every = integer_arg("check_every", check_every)
    cg_tol = nonneg_finite("cg_tol", cg_tol)
    cg_max_iter = integer_arg("cg_max_iter", cg_max_iter)
    if not (momentum is None or momentum in ("adaptive", "anderson", "auto")
            or (isinstance(momentum, (int, float)) and not isinstance(momentum, bool)
                and 1.0 <= momentum < 2.0)):
        raise ValueError("`momentum` must be None, 'auto', 'adaptive', 'anderson' or a float in "
                         f"[1, 2); got {momentum!r}")
    if momentum == "anderson" and engine == "log":
        raise ValueError("`momentum`: 'anderson' runs in the 'absorb' engine; engine='log' takes "
                         "None, 'adaptive' or a float")

    out_dtype = cost.dtype if isinstance(cost, Tensor) else None
    C, a_, b_ = _validate(cost, a, b, check_inputs, allow_inf_cost, trusted)
    ep = _validate_eps(eps, C, eps_name)  # float, or a tensor (graph kept)
    batch = C.shape[:-2]
    n, m = C.shape[-2], C.shape[-1]
    eshape = ep.shape if isinstance(ep, Tensor) else ()
    full_batch = _broadcast_shapes(batch, a_.shape[:-1], b_.shape[:-1], eshape)
    if full_batch != batch:
        C = C.expand(full_batch + (n, m))
        batch = full_batch
    if isinstance(ep, Tensor):
        ep = ep.expand(batch) if ep.shape != batch else ep
        e2, e1 = ep[..., None, None], ep[..., None]
    else:
        e2 = e1 = ep

    # Inside torch.func transforms (vmap, grad) no data-dependent Python control flow can run:
    # the solver then takes the plain functional path (the log-domain loop, a fixed number of
    # iterations, no zero-weight masks, no warnings) and reports its error as tensors.
    transformed = _under_functorch(C, a_, b_, ep)
    if transformed and n_iter is None:
        raise ValueError("`n_iter`: inside torch.func transforms (vmap, grad) the solver cannot "
                         "test convergence; pass a fixed n_iter (its error is still reported)")

    # support masks (None on the fast path where every weight is positive)
    with torch.no_grad():
        has_zero = False if (transformed or trusted) else bool((a_ == 0).any() | (b_ == 0).any())
    sa = (a_ > 0).expand(batch + (n,)) if has_zero else None
    sb = (b_ > 0).expand(batch + (m,)) if has_zero else None

    fixed = n_iter is not None
    iters = int(n_iter) if fixed else int(max_iter)
    tensors = (C, a_, b_) + ((ep,) if isinstance(ep, Tensor) else ())
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    unrolling = (grad == "unroll" and needs_grad) or transformed
    implicit = grad == "implicit" and needs_grad
    # CUDA (float32/64, Triton present): the loop without autograd runs as fused compiled kernels
    # (not the unrolled loop: compiled backwards support no double backward, e.g. Hessians)
    fused = (engine in ("auto", "log") and not unrolling and momentum != "anderson"
             and _fused.use_fused(C))
    if momentum == "auto":
        # the bookkeeping of an iteration is some 25 operations whatever the batch: it pays from
        # _ANDERSON_MIN_ENTRIES entries in all, for matrices wider than the memory
        momentum = ("anderson" if (not fused and engine in ("auto", "absorb")
                                   and min(n, m) > _ANDERSON_MEMORY
                                   and math.prod(batch) * n * m >= _ANDERSON_MIN_ENTRIES)
                    else "adaptive")
    if engine == "auto":
        engine = "log" if (unrolling or fused) else "absorb"
    mom = None if (fixed or unrolling) else momentum

    with torch.set_grad_enabled(unrolling):
        Cg = C if unrolling else C.detach()
        a_g = a_ if unrolling else a_.detach()
        b_g = b_ if unrolling else b_.detach()
        eg = ep if (unrolling or not isinstance(ep, Tensor)) else ep.detach()
        eg2 = eg[..., None, None] if isinstance(eg, Tensor) else eg
        eg1 = eg[..., None] if isinstance(eg, Tensor) else eg
        # centring: the plan is invariant under C -> C - r ⊕ s
        inf_mask = None
        if allow_inf_cost and unrolling and not transformed and not _all_finite(Cg):
            inf_mask = torch.isfinite(Cg)  # masked entries: NaN-free gradients through where
        tiny = None
        if (engine == "absorb" and fixed and not unrolling and init is None and sa is None
                and not isinstance(eg, Tensor) and C.dim() >= 3 and max(n, m) <= _PLANAR_MAX
                and C.device.type == "cpu"):
            with torch.no_grad():
                tiny = _planar_solve(Cg, a_g, b_g, eg, iters)
        if tiny is not None:
            f, g, plan, err, nit, it, history = tiny
        else:
            r = Cg.amin(-1)  # finite: every row keeps a finite entry
            Ct = Cg - r[..., :, None]
            E0 = None
            L = None
            if (engine == "absorb" and init is None and inf_mask is None and not unrolling
                    and not isinstance(eg2, Tensor)):
                # Scaling engine: its first kernel exp(-(C - r)/eps) is built in
                # place (rows with maximum one exactly: the row minimum of C - r is 0), no column
                # centring (s = 0: the columns are centred by the first column update, which
                # starts from g = 0), and no allocation beyond this kernel; the centred cost
                # -(C - r)/eps is rebuilt from C only if the solve needs it (absorption, fallback).
                s = torch.zeros(batch + (m,), dtype=Ct.dtype, device=Ct.device)
                E0 = _exp_kernel_(Ct.mul_(-1.0 / eg2))

                def Kc(Cg=Cg, r=r, eg2=eg2):
                    return torch.sub(Cg, r[..., :, None]).mul_(-1.0 / eg2)

                L = _Loop(Kc, a_g, b_g, sa, sb, shape=E0.shape)
            else:
                s = Ct.amin(-2)
            if L is not None:
                pass
            elif inf_mask is not None:
                Ct = Ct - s[..., None, :]
                Ct0 = torch.where(inf_mask, Ct, torch.zeros_like(Ct))
                Kc = torch.where(inf_mask, Ct0 / (-eg2), torch.full_like(Ct, -math.inf))
            elif unrolling or isinstance(eg2, Tensor):
                Kc = (Ct - s[..., None, :]) / (-eg2)
            else:
                if engine == "absorb" and init is None:
                    # the first kernel of the scaling engine, exp(-(C - r)/eps): its rows have
                    # maximum one exactly (the row minimum of C - r is 0), no max pass needed
                    E0 = _exp_kernel_(torch.mul(Ct, -1.0 / eg2))

                # Kc = -(Ct - s)/eps in place, one pass
                Kc = torch.add(s[..., None, :] / eg2, Ct, alpha=-1.0 / eg2, out=Ct)
            if L is None:
                L = _Loop(Kc, a_g, b_g, sa, sb)
            L.E0 = E0

            # starting potentials (units of eps, centred coordinates): the uncentred iterates
            if init is not None:
                F0, G0 = _init_potentials(init, C, batch, n, m, check_inputs)
                # (r, s, eps are detached unless unrolling: then these are exactly the iterates of
                # the uncentred problem, and so are their derivatives)
                F0 = (F0 - r) / eg1
                G0 = (G0 - s) / eg1
                F0 = torch.where(torch.isfinite(F0), F0, torch.zeros_like(F0))
                G0 = torch.where(torch.isfinite(G0), G0, torch.zeros_like(G0))
            else:
                F0 = torch.zeros(batch + (n,), dtype=C.dtype, device=C.device)
                G0 = (s / (-eg1)).expand(batch + (m,))
            if sb is not None:  # columns with zero weight carry no mass from the first row update on
                G0 = torch.where(sb, G0, torch.full_like(G0, -math.inf))

            if unrolling:
                F, G = F0, G0
                history = []
                nit = torch.full(batch, -1, dtype=torch.long, device=C.device)
                it = 0
                while it < iters:
                    k = min(check_every, iters - it)
                    F, G = _log_block(L, F, G, k, 1.0)
                    it += k
                    if fixed and it < iters:
                        continue
                    if fixed or it >= iters:
                        break  # the final plan is checked below
                    with torch.no_grad():
                        err = L.error(L.plan(F, G))
                    history.append(err)
                    nit = torch.where((err <= tol) & (nit < 0), torch.full_like(nit, it), nit)
                    if bool((nit >= 0).all()):
                        history.pop()  # re-checked below on the returned plan
                        break
                plan = L.plan(F, G)
                with torch.no_grad():
                    err = L.error(plan.detach())
                history.append(err)
                nit = torch.where((err <= tol) & (nit < 0), torch.full_like(nit, it), nit)
                nit = torch.where(nit < 0, torch.full_like(nit, it), nit)
            else:
                with torch.no_grad():
                    out = None
                    if fused:
                        out = _fused.try_solve_detached(
                            L.Kc, L.loga, L.logb, L.a, L.b, F0, G0, tol=tol, max_iter=iters,
                            check_every=check_every, fixed=fixed, momentum=mom, masked=sa is not None)
                    if out is None:
                        out = _solve_detached(
                            L, F0, G0, tol=tol, max_iter=iters, check_every=check_every,
                            fixed=fixed, engine=engine, momentum=mom,
                        )
                    F, G, plan, err, nit, it, history = out
            # potentials back in cost units (-inf off the support, with a NaN-free gradient there)
            if sa is not None:
                Fs = torch.where(sa, F, torch.zeros_like(F))
                Gs = torch.where(sb, G, torch.zeros_like(G))
                f = torch.where(sa, Fs * eg1 + r, torch.full_like(Fs, -math.inf))
                g = torch.where(sb, Gs * eg1 + s, torch.full_like(Gs, -math.inf))
            else:
                f = F * eg1 + r
                g = G * eg1 + s

    if implicit:
        eps_t = ep if isinstance(ep, Tensor) else torch.tensor(ep, dtype=C.dtype, device=C.device)
        plan, f, g = _ImplicitSinkhorn.apply(
            C, a_.expand(batch + (n,)), b_.expand(batch + (m,)), eps_t, plan, f, g, sa, sb,
            cg_tol, cg_max_iter)

    converged = err <= tol
    errs = torch.stack(history)
    if warn and not transformed:
        eps_s = f"{ep:g}" if not isinstance(ep, Tensor) else (
            f"{float(ep.detach().flatten()[0]):g}" if ep.numel() == 1 else "per problem")
        if not fixed and not bool(converged.all()):
            bad = int((~converged).sum())
            warnings.warn(
                f"Sinkhorn did not converge for {bad} of {converged.numel()} problem(s) in {it} "
                f"iterations (max marginal error {float(err.max()):.3e} > tol={tol:g}, "
                f"eps={eps_s}). Increase max_iter or eps, or warm-start from a larger eps.",
                SinkhornWarning,
                stacklevel=3,
            )
        elif fixed and not bool(torch.isfinite(err).all()):
            warnings.warn(
                f"Sinkhorn ({it} fixed iterations, eps={eps_s}) returned a plan with non-finite "
                "entries; its marginal error is reported as non-finite.",
                SinkhornWarning,
                stacklevel=3,
            )
    if out_dtype in (torch.float16, torch.bfloat16):
        plan = plan.to(out_dtype)
    return SinkhornResult(
        plan=plan, f=f, g=g, n_iter=nit, marginal_error=err, converged=converged,
        eps=eps, tol=tol, iterations=it, errors=errs,
    )


def _init_potentials(init, C: Tensor, batch, n: int, m: int, check_inputs: bool):
    """Validated warm-start potentials ``(f0, g0)`` (detached, broadcast to the batch)."""
    if not (isinstance(init, (tuple, list)) and len(init) == 2):
        raise ValueError("`init` must be a pair (f, g) of potentials")
    f0 = _as_tensor(init[0], C, "init[0]").to(device=C.device, dtype=C.dtype).detach()
    g0 = _as_tensor(init[1], C, "init[1]").to(device=C.device, dtype=C.dtype).detach()
    if f0.dim() == 0 or g0.dim() == 0 or f0.shape[-1:] != (n,) or g0.shape[-1:] != (m,):
        raise ValueError(
            f"`init` potentials must have shapes (..., {n}) and (..., {m}); got "
            f"{tuple(f0.shape)} and {tuple(g0.shape)}"
        )
    for name, x in (("init[0]", f0), ("init[1]", g0)):
        try:
            if _broadcast_shapes(x.shape[:-1], batch) != batch:
                raise RuntimeError
        except RuntimeError as exc:
            raise ValueError(
                f"`init` potential {name} has batch shape {tuple(x.shape[:-1])}, which does not "
                f"broadcast to the batch shape {tuple(batch)} of the problem"
            ) from exc
        if check_inputs and bool((torch.isnan(x) | (x == math.inf)).any()):
            raise ValueError(f"`{name}` contains NaN or +inf (only -inf, at zero weights, is allowed)")
    return f0.expand(batch + (n,)), g0.expand(batch + (m,))


def project_dsm(logits: Tensor, tau: EpsLike = 1.0, **kw) -> SinkhornResult:
    """Doubly-stochastic projection ``Sinkhorn(exp(logits / tau))`` with unit row and column sums.

    This is the convention of Sinkhorn layers (mHC, Sinkformers, Gumbel-Sinkhorn): starting from
    ``logits / tau`` the iteration alternately normalises rows and columns. It equals entropic OT
    with cost ``-logits``, ``eps = tau`` and marginals ``a = b = 1``.

    Parameters
    ----------
    logits : Tensor ``(..., n, n)``
        Square real logits, batched over leading dimensions. ``-inf`` entries are a support mask
        (those entries of the result are exactly zero) provided every row and every column keeps a
        finite entry; NaN and ``+inf`` are refused.
    tau : float or Tensor
        Temperature ``> 0``; a tensor (scalar or one per problem) gets gradients.
    **kw
        Passed to :func:`sinkhorn` (``tol``, ``n_iter`` for fixed-iteration mode, ``grad``, ...).

    Returns
    -------
    SinkhornResult
        ``plan`` is the doubly-stochastic matrix ``(..., n, n)``.
    """
    if not isinstance(logits, Tensor):
        raise ValueError("`logits` must be a torch.Tensor of shape (..., n, n)")
    _check_tensor_kind("logits", logits)
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"`logits` must be square, shape (..., n, n); got {tuple(logits.shape)}")
    if "a" in kw or "b" in kw:
        raise ValueError("project_dsm fixes the marginals to ones; use sinkhorn() for other marginals")
    cdtype = _compute_dtype(logits.dtype, "logits")
    if (kw.get("check_inputs", True) and not _under_functorch(logits)
            and not _all_finite(logits.detach())):
        with torch.no_grad():
            bad = torch.isnan(logits) | (logits == math.inf)
            if bool(bad.any()):
                raise ValueError("`logits` contains NaN or +inf (-inf is allowed as a mask)")
            fin = torch.isfinite(logits)
            for dim, what in ((-1, "row"), (-2, "column")):
                ok = fin.any(dim)
                if not bool(ok.all()):
                    idx = tuple(int(i) for i in (~ok).nonzero()[0].tolist())
                    raise ValueError(
                        f"`logits` {what} {idx[-1]} (batch index {idx[:-1]}) is entirely -inf: a "
                        f"-inf mask must leave every row and column a finite entry"
                    )
    n = logits.shape[-1]
    ones = torch.ones(n, dtype=cdtype, device=logits.device)
    opts = dict(tol=1e-6, max_iter=2000, n_iter=None, check_every=10, grad="unroll", init=None,
                engine="auto", momentum="auto", warn=True, check_inputs=True, cg_tol=1e-10,
                cg_max_iter=500)
    unknown = set(kw) - set(opts)
    if unknown:
        raise TypeError(f"project_dsm() got unexpected keyword argument(s) {sorted(unknown)}")
    opts.update(kw)
    # the logits were checked above and the marginals are our own ones: no second value check
    return _sinkhorn(-logits, tau, ones, ones, allow_inf_cost=True, eps_name="tau", trusted=True,
                     **opts)
