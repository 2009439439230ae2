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
* ``"auto"`` picks ``"absorb"`` unless ``grad="unroll"``.

Both accept over-relaxation (``momentum``), fixed or adaptive (Lehmann et al. 2021, as in OTT-JAX).

Gradients: ``grad="unroll"`` back-propagates through the iterations (memory grows with them);
``grad="implicit"`` differentiates the optimality conditions at the returned point (memory independent
of the iteration count); ``grad="none"`` detaches.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional, Tuple, Union

import torch
from torch import Tensor

from ._checks import positive_finite

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


class SinkhornWarning(UserWarning):
    """Emitted when a Sinkhorn solve does not reach its tolerance."""


@dataclass
class SinkhornResult:
    """Output of :func:`sinkhorn` and :func:`project_dsm`.

    Shapes: the cost is ``(..., n, m)``; ``...`` is the batch shape ``B``.

    Attributes
    ----------
    plan : Tensor ``(..., n, m)``
        The transport plan (for :func:`project_dsm`, the doubly-stochastic matrix).
    f, g : Tensor ``(..., n)``, ``(..., m)``
        Dual potentials in cost units: ``plan = exp((f[..., :, None] + g[..., None, :] - cost) / eps)``.
    n_iter : Tensor ``(...)`` of int64
        Per batch element, the first checked iteration at which the marginal error was ``<= tol``;
        the total number of iterations run if it never was.
    marginal_error : Tensor ``(...)``
        Relative L1 marginal violation of the returned plan,
        ``max(|P1 - a|_1, |Pᵀ1 - b|_1) / sum(a)``.
    converged : Tensor ``(...)`` of bool
        ``marginal_error <= tol``.
    eps : float
        The regularisation used.
    tol : float
        The tolerance the error was compared with.
    iterations : int
        Iterations actually run (the same for the whole batch).
    errors : Tensor ``(n_checks, ...)``
        The maximum-over-marginals error at each convergence check (history).
    """

    plan: Tensor
    f: Tensor
    g: Tensor
    n_iter: Tensor
    marginal_error: Tensor
    converged: Tensor
    eps: float
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
        return (
            f"SinkhornResult(shape={shape}, eps={self.eps:.3g}, iterations={self.iterations}, "
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


def _check_finite(name: str, x: Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"`{name}` contains NaN or inf; Sinkhorn needs finite inputs")


def _as_tensor(x, like: Tensor, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    try:
        return torch.as_tensor(x, dtype=like.dtype, device=like.device)
    except Exception as exc:  # pragma: no cover - message only
        raise ValueError(f"`{name}` could not be converted to a tensor: {exc}") from exc


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if dtype in (torch.float32, torch.float64):
        return dtype
    if not dtype.is_floating_point:
        return torch.get_default_dtype()
    raise ValueError(f"`cost` has unsupported dtype {dtype}")


def _validate(
    cost: Tensor,
    eps: float,
    a: Optional[Tensor],
    b: Optional[Tensor],
    check_inputs: bool,
) -> Tuple[Tensor, Tensor, Tensor, float]:
    if not isinstance(cost, Tensor):
        raise ValueError("`cost` must be a torch.Tensor of shape (..., n, m)")
    if cost.dim() < 2:
        raise ValueError(f"`cost` must have shape (..., n, m); got shape {tuple(cost.shape)}")
    n, m = cost.shape[-2], cost.shape[-1]
    if n == 0 or m == 0:
        raise ValueError(f"`cost` must be non-empty; got shape {tuple(cost.shape)}")
    if isinstance(eps, Tensor):
        if eps.numel() != 1:
            raise ValueError("`eps` must be a scalar")
        eps = float(eps)
    eps = positive_finite("eps", eps)
    cdtype = _compute_dtype(cost.dtype)
    C = cost.to(cdtype)
    if check_inputs:
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
    return C, a_, b_, eps


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


def _omega_from_rate(rate: float) -> float:
    """Optimal over-relaxation for a linear rate ``rate`` (Lehmann et al. 2021), clipped to [1, 1.9]."""
    if not math.isfinite(rate) or rate <= 0:
        return 1.0
    rate = min(rate, 0.9999)
    om = 2.0 / (1.0 + math.sqrt(1.0 - rate))
    return float(min(max(om, 1.0), 1.9))


class _Loop:
    """Shared state of one solve: scaled cost, log-marginals, potentials in units of eps."""

    def __init__(self, C: Tensor, a: Tensor, b: Tensor, eps: float, F: Tensor, G: Tensor):
        self.Kc = C / (-eps)  # -C/eps, (..., n, m)
        self.loga = torch.log(a)
        self.logb = torch.log(b)
        self.a, self.b = a, b
        self.F, self.G = F, G  # f/eps, g/eps

    # log-domain half steps (differentiable, out-of-place)
    def f_step(self, F: Tensor, G: Tensor) -> Tensor:
        return self.loga - _lse_rows(self.Kc + G[..., None, :])

    def g_step(self, F: Tensor, G: Tensor) -> Tensor:
        return self.logb - _lse_cols(self.Kc + F[..., :, None])

    def plan(self, F: Tensor, G: Tensor) -> Tensor:
        return torch.exp(self.Kc + F[..., :, None] + G[..., None, :])


def _log_block(L: _Loop, F: Tensor, G: Tensor, k: int, omega: float) -> Tuple[Tensor, Tensor]:
    """``k`` log-domain iterations (row, then column update); the last column update is never
    over-relaxed, so a block always ends with exact columns."""
    for i in range(k):
        Fn = L.f_step(F, G)
        F = Fn if omega == 1.0 else F + omega * (Fn - F)
        Gn = L.g_step(F, G)
        G = Gn if (omega == 1.0 or i == k - 1) else G + omega * (Gn - G)
    return F, G


def _absorb_block(
    L: _Loop, F: Tensor, G: Tensor, k: int, omega: float
) -> Tuple[Tensor, Tensor, bool, Optional[Tensor]]:
    """``k`` Sinkhorn iterations in the scaling domain on a kernel rebuilt from the potentials.

    The kernel is ``E = exp(Z - max_j Z)`` with ``Z = (g - C)/ε``: its rows have maximum one, so it
    never underflows to an all-zero row (as ``exp(-C/ε)`` does for small ε). The exact row update
    of iteration 1 comes from the same exponentials (``f = ε log a - ε LSE_j Z``), then ``k`` column
    and ``k - 1`` row updates run as matrix-vector products, and the scalings are absorbed back into
    the potentials (Schmitzer 2019). One ``exp`` per entry per block instead of two per iteration.

    Returns the new potentials, whether the scalings stayed finite and positive (else the caller
    redoes the block in the log domain), and the plan ``diag(u) E diag(v)`` for the error check.
    """
    Z = L.Kc + G[..., None, :]
    zmax = Z.amax(-1, keepdim=True)
    E = torch.exp(Z - zmax)
    a, b = L.a.expand_as(F), L.b.expand_as(G)
    u = a / E.sum(-1)  # exact row update of iteration 1
    v = torch.ones_like(G)
    small = E.shape[-1] * E.shape[-2] <= 256  # elementwise beats batched GEMV on tiny matrices

    def col(u_):
        return (E * u_[..., :, None]).sum(-2) if small else torch.matmul(u_.unsqueeze(-2), E).squeeze(-2)

    def row(v_):
        return (E * v_[..., None, :]).sum(-1) if small else torch.matmul(E, v_.unsqueeze(-1)).squeeze(-1)

    for i in range(k):
        vn = b / col(u)
        # the first and the last column updates are plain: the block ends with exact columns
        v = vn if (omega == 1.0 or i == 0 or i == k - 1) else v.pow(1.0 - omega) * vn.pow(omega)
        if i == k - 1:
            break
        un = a / row(v)
        u = un if omega == 1.0 else u.pow(1.0 - omega) * un.pow(omega)
    logu, logv = torch.log(u), torch.log(v)
    if not bool(torch.isfinite(logu).all() & torch.isfinite(logv).all()):
        return F, G, False, None
    plan = u[..., :, None] * E * v[..., None, :]
    return logu - zmax.squeeze(-1), G + logv, True, plan


def _solve_detached(
    C: Tensor,
    a: Tensor,
    b: Tensor,
    eps: float,
    F0: Tensor,
    G0: Tensor,
    *,
    tol: float,
    max_iter: int,
    check_every: int,
    fixed: bool,
    engine: str,
    momentum: Union[None, float, str],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, int, Tensor]:
    """Run the solver without autograd. Returns F, G, n_iter, err, iterations, err history."""
    L = _Loop(C, a, b, eps, F0, G0)
    F, G = F0, G0
    batch = C.shape[:-2]
    n_iter = torch.full(batch, -1, dtype=torch.long, device=C.device)
    history = []
    it = 0
    omega = float(momentum) if isinstance(momentum, (int, float)) else 1.0
    adaptive = momentum == "adaptive"
    err_prev = None
    block = check_every
    while it < max_iter:
        k = min(block, max_iter - it)
        F_last, G_last = F, G
        P = None
        if engine == "absorb":
            Fn, Gn, ok, P = _absorb_block(L, F, G, k, omega)
            if not ok:  # roll back, redo this block in the log domain
                Fn, Gn = _log_block(L, F, G, k, omega)
        else:
            Fn, Gn = _log_block(L, F, G, k, omega)
        F, G = Fn, Gn
        it += k
        if fixed and it < max_iter:
            continue
        if P is None:
            P = L.plan(F, G)
        err = marginal_error(P, a.expand(P.shape[:-1]), b.expand(P.shape[:-2] + P.shape[-1:]))
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
            history[-1] = torch.nan_to_num(err, nan=float("inf"))
            omega, adaptive = 1.0, False
            continue
        if adaptive:
            emax = float(err.max())
            if err_prev is not None and err_prev > 0 and emax > 0:
                rate = (emax / err_prev) ** (1.0 / k)
                if rate < 1.0:
                    omega = _omega_from_rate(rate * rate)  # rate per half-step pair
                else:
                    omega = 1.0
            err_prev = emax
    n_iter = torch.where(n_iter < 0, torch.full_like(n_iter, it), n_iter)
    if not bool(torch.isfinite(history[-1]).all()):  # ended on a rolled-back block: report honestly
        P = L.plan(F, G)
        history.append(marginal_error(P, a.expand(P.shape[:-1]), b.expand(P.shape[:-2] + P.shape[-1:])))
    errs = torch.stack(history)
    return F, G, n_iter, history[-1], it, errs


# ----------------------------------------------------------------------------------------------
# implicit differentiation


def _schur_solve(P: Tensor, a: Tensor, b: Tensor, wr: Tensor, wc: Tensor, cg_tol: float, cg_max: int):
    """Solve [[D_a, P], [Pᵀ, D_b]] [α; β] = [wr; wc] (pseudo-inverse, kernel (1, -1)).

    Eliminates α and solves the Schur complement S β = wc - Pᵀ D_a⁻¹ wr with
    S = D_b - Pᵀ D_a⁻¹ P (PSD, kernel 1). Dense for small m, batched CG otherwise.
    """
    n, m = P.shape[-2], P.shape[-1]
    # remove the component of w along the kernel direction (1_n, -1_m)
    c = (wr.sum(-1) - wc.sum(-1)) / (n + m)
    wr = wr - c[..., None]
    wc = wc + c[..., None]
    a = a.expand(wr.shape)
    b = b.expand(wc.shape)
    Pa = P / a[..., :, None]  # D_a^{-1} P
    rhs = wc - torch.einsum("...ij,...i->...j", Pa, wr)
    rhs = rhs - rhs.mean(-1, keepdim=True)
    if m <= DENSE_SCHUR_MAX:
        S = torch.diag_embed(b) - P.transpose(-1, -2) @ Pa
        ones = torch.ones(m, dtype=P.dtype, device=P.device) / math.sqrt(m)
        S = S + (b.mean(-1)[..., None, None]) * ones[:, None] * ones[None, :]
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
            Sp = S_mv(p)
            Sp = Sp - Sp.mean(-1, keepdim=True)
            denom = (p * Sp).sum(-1)
            alpha = torch.where(denom > 0, rs / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(rs))
            beta = beta + alpha[..., None] * p
            r = r - alpha[..., None] * Sp
            rs_new = (r * r).sum(-1)
            if bool((rs_new <= (cg_tol**2) * rs0.clamp_min(1e-300)).all()):
                break
            p = r + (rs_new / rs.clamp_min(1e-300))[..., None] * p
            rs = rs_new
    alpha_ = (wr - torch.einsum("...ij,...j->...i", P, beta)) / a
    return alpha_, beta


class _ImplicitSinkhorn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, C, F, G, a, b, eps, cg_tol, cg_max):  # type: ignore[override]
        P = torch.exp(C / (-eps) + F[..., :, None] + G[..., None, :])
        ctx.save_for_backward(P, a, b)
        ctx.eps = eps
        ctx.cg = (cg_tol, cg_max)
        return P, F * eps, G * eps

    @staticmethod
    def backward(ctx, gP, gf, gg):  # type: ignore[override]
        P, a, b = ctx.saved_tensors
        eps = ctx.eps
        if gP is None:
            gP = torch.zeros_like(P)
        PG = P * gP
        wr = PG.sum(-1) / eps
        wc = PG.sum(-2) / eps
        if gf is not None:
            wr = wr + gf
        if gg is not None:
            wc = wc + gg
        al, be = _schur_solve(P, a, b, wr, wc, *ctx.cg)
        gC = P * (al[..., :, None] + be[..., None, :]) - PG / eps
        return gC, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# public API


def sinkhorn(
    cost: Tensor,
    eps: float,
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
    momentum: Union[None, float, str] = "adaptive",
    warn: bool = True,
    check_inputs: bool = True,
    cg_tol: float = 1e-10,
    cg_max_iter: int = 500,
) -> SinkhornResult:
    """Entropic optimal transport between ``a`` and ``b`` for ``cost``, in the log domain.

    Parameters
    ----------
    cost : Tensor ``(..., n, m)``
        Cost matrix, batched over leading dimensions. fp64 and fp32 are computed in their own
        precision; fp16/bf16 are computed in fp32 and the plan is cast back.
    eps : float
        Entropic regularisation, ``> 0`` and finite.
    a, b : Tensor ``(..., n)`` and ``(..., m)``, optional
        Nonnegative marginals with equal totals (batch dims broadcast with the cost's).
        Default: uniform probability vectors.
    tol : float
        Tolerance on the relative L1 marginal error (see :func:`marginal_error`).
    max_iter : int
        Iteration cap (one iteration = a row and a column update).
    n_iter : int, optional
        Fixed-iteration mode, as used inside networks: run exactly ``n_iter`` iterations with no
        convergence test and plain (un-accelerated) updates. The marginal error of the returned plan
        is still computed and reported, and ``converged`` compares it with ``tol``; no warning is
        emitted in this mode.
    check_every : int
        Iterations between convergence checks (each check is one host sync on a GPU).
    grad : {"unroll", "implicit", "none"}
        How gradients reach ``cost``: back-propagate through the iterations, differentiate the
        optimality conditions (memory independent of the iteration count), or detach.
    init : (f, g), optional
        Warm-start potentials in cost units, shapes ``(..., n)`` and ``(..., m)``.
    engine : {"auto", "log", "absorb"}
        Iteration engine (see the module docstring). ``"auto"`` uses ``"absorb"`` unless
        gradients are unrolled (``grad="unroll"`` with a cost that requires grad). Both engines run
        the same sweeps; in fixed-iteration mode they return the same matrix up to round-off.
    momentum : None, float or "adaptive"
        Over-relaxation factor ω ∈ [1, 2) for the converging solve; ``"adaptive"`` estimates the
        linear rate from the error history and sets ω = 2/(1+√(1-rate)). Ignored in fixed mode and
        when gradients are unrolled.
    warn : bool
        Emit a :class:`SinkhornWarning` when some batch element misses ``tol``.
    check_inputs : bool
        Validate finiteness, signs and totals (host syncs). Shapes and ``eps`` are always checked.

    Returns
    -------
    SinkhornResult
        ``plan (..., n, m)``, ``f (..., n)``, ``g (..., m)``, ``n_iter (...)``,
        ``marginal_error (...)``, ``converged (...)``.

    Raises
    ------
    ValueError
        For non-finite inputs, ``eps <= 0``, negative marginals, unequal totals or shape mismatch.
    """
    if grad not in ("unroll", "implicit", "none"):
        raise ValueError(f"`grad` must be 'unroll', 'implicit' or 'none'; got {grad!r}")
    if engine not in ("auto", "log", "absorb"):
        raise ValueError(f"`engine` must be 'auto', 'log' or 'absorb'; got {engine!r}")
    if n_iter is not None and (int(n_iter) != n_iter or n_iter < 1):
        raise ValueError(f"`n_iter` must be a positive integer; got {n_iter!r}")
    if int(max_iter) != max_iter or max_iter < 1:
        raise ValueError(f"`max_iter` must be a positive integer; got {max_iter!r}")
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"`tol` must be a nonnegative finite number; got {tol!r}")
    if int(check_every) != check_every or check_every < 1:
        raise ValueError(f"`check_every` must be a positive integer; got {check_every!r}")
    if not (momentum is None or momentum == "adaptive" or (isinstance(momentum, (int, float)) and 1.0 <= momentum < 2.0)):
        raise ValueError(f"`momentum` must be None, 'adaptive' or a float in [1, 2); got {momentum!r}")

    out_dtype = cost.dtype if isinstance(cost, Tensor) else None
    C, a_, b_, eps = _validate(cost, eps, a, b, check_inputs)
    batch = C.shape[:-2]
    n, m = C.shape[-2], C.shape[-1]
    bshape_a = _broadcast_shapes(batch, a_.shape[:-1]) + (n,)
    bshape_b = _broadcast_shapes(batch, b_.shape[:-1]) + (m,)
    full_batch = _broadcast_shapes(bshape_a[:-1], bshape_b[:-1], batch)
    if full_batch != batch:
        C = C.expand(full_batch + (n, m))
        batch = full_batch

    if init is not None:
        if not (isinstance(init, (tuple, list)) and len(init) == 2):
            raise ValueError("`init` must be a pair (f, g) of potentials")
        f0 = _as_tensor(init[0], C, "init[0]").to(C.dtype).detach()
        g0 = _as_tensor(init[1], C, "init[1]").to(C.dtype).detach()
        if f0.shape[-1:] != (n,) or g0.shape[-1:] != (m,):
            raise ValueError(
                f"`init` potentials must have shapes (..., {n}) and (..., {m}); got "
                f"{tuple(f0.shape)} and {tuple(g0.shape)}"
            )
        if check_inputs:
            _check_finite("init[0]", f0)
            _check_finite("init[1]", g0)
        F0 = (f0 / eps).expand(batch + (n,))
        G0 = (g0 / eps).expand(batch + (m,))
    else:
        F0 = torch.zeros(batch + (n,), dtype=C.dtype, device=C.device)
        G0 = torch.zeros(batch + (m,), dtype=C.dtype, device=C.device)

    fixed = n_iter is not None
    iters = int(n_iter) if fixed else int(max_iter)
    unrolling = grad == "unroll" and torch.is_grad_enabled() and C.requires_grad
    if engine == "auto":
        engine = "log" if unrolling else "absorb"
    mom = None if (fixed or unrolling) else momentum

    if unrolling:
        L = _Loop(C, a_, b_, eps, F0, G0)
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
            with torch.no_grad():
                P = L.plan(F, G)
                err = marginal_error(P, a_.expand(batch + (n,)), b_.expand(batch + (m,)))
            history.append(err)
            nit = torch.where((err <= tol) & (nit < 0), torch.full_like(nit, it), nit)
            if fixed or bool((nit >= 0).all()):
                break
        nit = torch.where(nit < 0, torch.full_like(nit, it), nit)
        plan = L.plan(F, G)
        f, g = F * eps, G * eps
        err = history[-1]
        errs = torch.stack(history)
    else:
        with torch.no_grad():
            F, G, nit, err, it, errs = _solve_detached(
                C.detach(), a_, b_, eps, F0, G0,
                tol=tol, max_iter=iters, check_every=check_every, fixed=fixed,
                engine=engine, momentum=mom,
            )
        if grad == "implicit" and torch.is_grad_enabled() and C.requires_grad:
            plan, f, g = _ImplicitSinkhorn.apply(C, F, G, a_.detach(), b_.detach(), eps, cg_tol, cg_max_iter)
        else:
            with torch.no_grad():
                plan = torch.exp(C.detach() / (-eps) + F[..., :, None] + G[..., None, :])
                f, g = F * eps, G * eps

    converged = err <= tol
    if warn and not fixed and not bool(converged.all()):
        bad = int((~converged).sum())
        warnings.warn(
            f"Sinkhorn did not converge for {bad} of {converged.numel()} problem(s) in {it} "
            f"iterations (max marginal error {float(err.max()):.3e} > tol={tol:g}, eps={eps:g}). "
            "Increase max_iter or eps, or warm-start from a larger eps.",
            SinkhornWarning,
            stacklevel=2,
        )
    if out_dtype in (torch.float16, torch.bfloat16):
        plan = plan.to(out_dtype)
    return SinkhornResult(
        plan=plan, f=f, g=g, n_iter=nit, marginal_error=err, converged=converged,
        eps=eps, tol=tol, iterations=it, errors=errs,
    )


def project_dsm(logits: Tensor, tau: float = 1.0, **kw) -> SinkhornResult:
    """Doubly-stochastic projection ``Sinkhorn(exp(logits / tau))`` with unit row and column sums.

    This is the convention of Sinkhorn layers (mHC, Sinkformers, Gumbel-Sinkhorn): starting from
    ``logits / tau`` the iteration alternately normalises rows and columns. It equals entropic OT
    with cost ``-logits``, ``eps = tau`` and marginals ``a = b = 1``.

    Parameters
    ----------
    logits : Tensor ``(..., n, n)``
        Square logits, batched over leading dimensions.
    tau : float
        Temperature ``> 0``.
    **kw
        Passed to :func:`sinkhorn` (``tol``, ``n_iter`` for fixed-iteration mode, ``grad``, ...).

    Returns
    -------
    SinkhornResult
        ``plan`` is the doubly-stochastic matrix ``(..., n, n)``.
    """
    if not isinstance(logits, Tensor):
        raise ValueError("`logits` must be a torch.Tensor of shape (..., n, n)")
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"`logits` must be square, shape (..., n, n); got {tuple(logits.shape)}")
    if "a" in kw or "b" in kw:
        raise ValueError("project_dsm fixes the marginals to ones; use sinkhorn() for other marginals")
    positive_finite("tau", tau)
    n = logits.shape[-1]
    cdtype = _compute_dtype(logits.dtype)
    ones = torch.ones(n, dtype=cdtype, device=logits.device)
    return sinkhorn(-logits, tau, ones, ones, **kw)
