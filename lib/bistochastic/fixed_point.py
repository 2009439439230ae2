"""The Sinkhorn fixed point: its Jacobian, spectral gap, resolvent, non-normality and sensitivity.

Conventions
-----------
A plan ``P`` has shape ``(..., n, m)`` and positive entries. Unless the caller passes them, the
marginals are **the plan's own**, ``a = P 1`` and ``b = Pᵀ 1``; so every function below works in
either marginal convention of the book, probability marginals (``ΣP = 1``, the default of
:func:`bistochastic.sinkhorn`) or unit row and column sums (``ΣP = N``, :func:`bistochastic.project_dsm`).

* The **Jacobian of the Sinkhorn map** in log-potentials, ``J = D_b⁻¹ Pᵀ D_a⁻¹ P`` (``(m, m)``), is
  invariant under ``P → cP``: the gap, the resolvent and the non-normality measures are the same in
  both conventions.
* The **sensitivity** ``∂vec P*/∂vec C = -(1/ε) D^{1/2}(I - Π̃)D^{1/2}`` scales with ``P``: in the
  unit-sum convention it is ``N`` times the probability-convention value (for square problems). Say
  which one you use.

The fixed-point map is ``T_ε: g ↦ g'(f(g))`` with ``f_i = ε log a_i - ε LSE_j((g_j - C_ij)/ε)`` and
``g'_j = ε log b_j - ε LSE_i((f_i - C_ij)/ε)``; one application is one Sinkhorn iteration. At the
fixed point its Jacobian is ``J``. In scaling coordinates ``v = exp(g/ε)`` (kernel
``K = exp(-C/ε)``, ``P = diag(u) K diag(v)``) the Jacobian is ``D_v J D_v⁻¹``.

``J`` is the transition matrix of a reversible Markov chain on the columns with stationary law
``b``: ``J 1 = 1``, ``bᵀ J = bᵀ``, and ``J = D_b^{-1/2} S D_b^{1/2}`` with ``S`` symmetric PSD. Its
gap ``γ = 1 - λ₂(J)`` is the smallest nonzero eigenvalue of the normalised Laplacian
``D_b^{-1/2} L D_b^{-1/2}``, ``L = D_b - Pᵀ D_a⁻¹ P``; dense routines build ``L`` from its
off-diagonal weights (no cancellation), so tiny gaps keep their relative accuracy.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._checks import positive_finite
from .sinkhorn import SinkhornResult, SinkhornWarning, marginal_error, sinkhorn

__all__ = [
    "plan_marginals",
    "jacobian",
    "jacobian_matvec",
    "symmetrized_matvec",
    "laplacian",
    "jacobian_spectrum",
    "spectral_gap",
    "resolvent_norm",
    "NonNormality",
    "nonnormality",
    "eigenvector_condition",
    "transient_growth",
    "sensitivity_matvec",
    "sensitivity_matrix",
    "sensitivity_norm",
    "sensitivity_bound",
    "plan_eps_derivative",
    "birkhoff_hopf_theta",
    "birkhoff_hopf_bound",
    "assignment_gap",
    "deep_gap_rate",
    "newton_polish",
    "PathResult",
    "solve_path",
]

Coords = Literal["potential", "scaling"]
Method = Literal["auto", "dense", "lanczos"]

_DENSE_MAX = 512  # above this many columns "auto" uses matrix-free methods


# ----------------------------------------------------------------------------------------------
# validation helpers


def _check_plan(plan: Tensor, name: str = "plan") -> Tensor:
    if not isinstance(plan, Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor of shape (..., n, m)")
    if plan.dim() < 2 or plan.shape[-1] == 0 or plan.shape[-2] == 0:
        raise ValueError(f"`{name}` must have shape (..., n, m) with n, m >= 1; got {tuple(plan.shape)}")
    if not plan.dtype.is_floating_point:
        raise ValueError(f"`{name}` must be a floating-point tensor; got {plan.dtype}")
    if not bool(torch.isfinite(plan).all()):
        raise ValueError(f"`{name}` contains NaN or inf")
    if bool((plan < 0).any()):
        raise ValueError(f"`{name}` has negative entries; a transport plan is nonnegative")
    return plan


def _check_eps(eps: float) -> float:
    return positive_finite("eps", eps)


def _check_coords(coords: str) -> None:
    if coords not in ("potential", "scaling"):
        raise ValueError(f"`coords` must be 'potential' or 'scaling'; got {coords!r}")


def _check_method(method: str) -> None:
    if method not in ("auto", "dense", "lanczos"):
        raise ValueError(f"`method` must be 'auto', 'dense' or 'lanczos'; got {method!r}")


def plan_marginals(
    plan: Tensor, a: Optional[Tensor] = None, b: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Row and column marginals ``a (..., n)``, ``b (..., m)``: the given ones, else ``P1``, ``Pᵀ1``.

    Raises ``ValueError`` when a marginal has the wrong length or a non-positive entry (``J`` needs
    ``D_a⁻¹`` and ``D_b⁻¹``).
    """
    _check_plan(plan)
    n, m = plan.shape[-2], plan.shape[-1]
    a_ = plan.sum(-1) if a is None else torch.as_tensor(a, dtype=plan.dtype, device=plan.device)
    b_ = plan.sum(-2) if b is None else torch.as_tensor(b, dtype=plan.dtype, device=plan.device)
    if a_.shape[-1:] != (n,):
        raise ValueError(f"`a` must have last dimension {n}; got shape {tuple(a_.shape)}")
    if b_.shape[-1:] != (m,):
        raise ValueError(f"`b` must have last dimension {m}; got shape {tuple(b_.shape)}")
    if bool((a_ <= 0).any()):
        raise ValueError("`a` (row marginal) must be positive")
    if bool((b_ <= 0).any()):
        raise ValueError("`b` (column marginal) must be positive")
    return a_.expand(plan.shape[:-1]), b_.expand(plan.shape[:-2] + (m,))


def _scaling_logv(g: Optional[Tensor], eps: Optional[float], m: int) -> Tensor:
    if g is None or eps is None:
        raise ValueError("`g` and `eps` are required for coords='scaling' (v = exp(g/eps))")
    eps = _check_eps(eps)
    if not isinstance(g, Tensor) or g.shape[-1] != m:
        raise ValueError(f"`g` must be a tensor with last dimension {m}")
    return g / eps


# ----------------------------------------------------------------------------------------------
# the Jacobian


def jacobian(
    plan: Tensor,
    a: Optional[Tensor] = None,
    b: Optional[Tensor] = None,
    *,
    coords: Coords = "potential",
    g: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> Tensor:
    """Dense Jacobian of the Sinkhorn map at ``plan``, shape ``(..., m, m)``.

    ``coords="potential"``: ``J = D_b⁻¹ Pᵀ D_a⁻¹ P`` (derivative of ``g'`` w.r.t. ``g``).
    ``coords="scaling"``: ``D_v J D_v⁻¹`` with ``v = exp(g/eps)``; entries are formed as
    ``J_jk exp((g_j - g_k)/eps)`` (may overflow to ``inf`` when ``osc(g)/eps`` exceeds ~700).

    ``a``, ``b`` default to the plan's own marginals (convention-free: ``J`` is invariant under
    ``P → cP``).
    """
    _check_coords(coords)
    a_, b_ = plan_marginals(plan, a, b)
    W = plan.transpose(-1, -2) @ (plan / a_[..., :, None])  # Pᵀ D_a⁻¹ P
    J = W / b_[..., :, None]
    if coords == "scaling":
        lv = _scaling_logv(g, eps, plan.shape[-1]).to(plan.dtype)
        J = J * torch.exp(lv[..., :, None] - lv[..., None, :])
    return J


def jacobian_matvec(
    plan: Tensor,
    a: Optional[Tensor] = None,
    b: Optional[Tensor] = None,
    *,
    coords: Coords = "potential",
    g: Optional[Tensor] = None,
    eps: Optional[float] = None,
    transpose: bool = False,
) -> Callable[[Tensor], Tensor]:
    """Matrix-free ``x ↦ J x`` (or ``Jᵀ x``), ``x (..., m) → (..., m)``, at ``O(nm)`` per product.

    Same conventions as :func:`jacobian`; never forms an ``m × m`` matrix.
    """
    _check_coords(coords)
    a_, b_ = plan_marginals(plan, a, b)
    P = plan
    lv = _scaling_logv(g, eps, P.shape[-1]).to(P.dtype) if coords == "scaling" else None

    def pot(x: Tensor) -> Tensor:
        y = torch.einsum("...ij,...j->...i", P, x) / a_
        return torch.einsum("...ij,...i->...j", P, y) / b_

    def pot_t(x: Tensor) -> Tensor:
        y = torch.einsum("...ij,...j->...i", P, x / b_) / a_
        return torch.einsum("...ij,...i->...j", P, y)

    base = pot_t if transpose else pot
    if lv is None:
        return base
    # (D_v J D_v⁻¹)x and its transpose D_v⁻¹ Jᵀ D_v x
    if not transpose:
        return lambda x: torch.exp(lv) * base(x * torch.exp(-lv))
    return lambda x: torch.exp(-lv) * base(x * torch.exp(lv))


def symmetrized_matvec(
    plan: Tensor, a: Optional[Tensor] = None, b: Optional[Tensor] = None
) -> Callable[[Tensor], Tensor]:
    """``x ↦ S x`` with ``S = D_b^{-1/2} Pᵀ D_a⁻¹ P D_b^{-1/2}`` (symmetric PSD, similar to ``J``).

    ``S`` has the top eigenvector ``D_b^{1/2} 1`` (eigenvalue 1). Shapes ``(..., m) → (..., m)``.
    """
    a_, b_ = plan_marginals(plan, a, b)
    sb = b_.sqrt()
    P = plan

    def mv(x: Tensor) -> Tensor:
        y = torch.einsum("...ij,...j->...i", P, x / sb) / a_
        return torch.einsum("...ij,...i->...j", P, y) / sb

    return mv


def laplacian(plan: Tensor, a: Optional[Tensor] = None) -> Tensor:
    """The weighted graph Laplacian ``L = D_b - Pᵀ D_a⁻¹ P`` on the columns, ``(..., m, m)``.

    Built from the off-diagonal weights ``W_jk = Σ_i P_ij P_ik / a_i`` (``j ≠ k``) with diagonal
    ``Σ_{k≠j} W_jk``: exact when ``a = P1`` and free of cancellation, so ``I - J = D_b⁻¹ L`` keeps
    full relative accuracy even when ``J`` is within round-off of the identity.
    """
    a_, _ = plan_marginals(plan, a, None)
    W = plan.transpose(-1, -2) @ (plan / a_[..., :, None])
    m = plan.shape[-1]
    eye = torch.eye(m, dtype=plan.dtype, device=plan.device)
    Woff = W * (1 - eye)
    return torch.diag_embed(Woff.sum(-1)) - Woff


def jacobian_spectrum(plan: Tensor, a: Optional[Tensor] = None) -> Tensor:
    """All eigenvalues of ``J`` (real, in ``[0, 1]``), descending, ``(..., m)``; dense, ``O(m³)``.

    Computed as ``1 - eig(D_b^{-1/2} L D_b^{-1/2})`` with the cancellation-free Laplacian, where
    ``b = Pᵀ1``. ``a`` defaults to ``P1`` (pass it only if the plan's rows are exactly ``a``).
    """
    mu = _normalized_laplacian_eigs(plan, a)
    return 1.0 - mu


def _normalized_laplacian_eigs(plan: Tensor, a: Optional[Tensor] = None) -> Tensor:
    L = laplacian(plan, a)
    sb = plan.sum(-2).sqrt()
    N = L / (sb[..., :, None] * sb[..., None, :])
    N = 0.5 * (N + N.transpose(-1, -2))
    return torch.linalg.eigvalsh(N)  # ascending; mu_0 = 0 (gauge), mu_1 = gap


# ----------------------------------------------------------------------------------------------
# Lanczos (symmetric operators, matvecs only)


def _lanczos_top(
    matvec: Callable[[Tensor], Tensor],
    v0: Tensor,
    *,
    deflate: Optional[Tensor] = None,
    max_iter: int = 300,
    tol: float = 1e-12,
) -> Tuple[float, Tensor, int]:
    """Largest eigenvalue of a symmetric operator on 1-D vectors, by Lanczos with full
    re-orthogonalisation. ``deflate`` (unit vector) is projected out of every Krylov vector.
    Returns ``(theta, ritz_vector, steps)``.
    """
    dtype, dev = v0.dtype, v0.device

    def proj(x: Tensor) -> Tensor:
        if deflate is not None:
            x = x - deflate * torch.dot(deflate, x)
        return x

    q = proj(v0)
    nq = torch.linalg.norm(q)
    if float(nq) == 0.0:
        raise ValueError("Lanczos start vector vanishes after deflation")
    q = q / nq
    Q = [q]
    alphas: list = []
    betas: list = []
    theta, s = 0.0, None
    k = 0
    for k in range(1, max_iter + 1):
        w = proj(matvec(Q[-1]))
        alpha = torch.dot(Q[-1], w)
        alphas.append(alpha)
        Qm = torch.stack(Q)
        for _ in range(2):  # full re-orthogonalisation, twice
            w = w - Qm.T @ (Qm @ w)
        w = proj(w)
        beta = torch.linalg.norm(w)
        T = torch.diag(torch.stack(alphas))
        if len(betas):
            bt = torch.stack(betas)
            T = T + torch.diag(bt, 1) + torch.diag(bt, -1)
        ev, U = torch.linalg.eigh(T)
        theta, s = float(ev[-1]), U[:, -1]
        resid = float(beta * s[-1].abs())
        scale = max(abs(theta), float(ev.abs().max()), 1e-300)
        if resid <= tol * scale or float(beta) <= 1e-14 * scale or k >= v0.numel() - (deflate is not None):
            break
        betas.append(beta)
        Q.append(w / beta)
    Qm = torch.stack(Q[: len(alphas)])
    x = Qm.T @ s.to(dtype=dtype, device=dev)
    return theta, x, k


def _start_vector(m: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, generator=gen, dtype=dtype).to(device)


# ----------------------------------------------------------------------------------------------
# gap and resolvent


def spectral_gap(
    plan: Tensor,
    a: Optional[Tensor] = None,
    *,
    method: Method = "auto",
    max_iter: int = 300,
    tol: float = 1e-12,
) -> Tensor:
    """Spectral gap ``γ = 1 - λ₂(J)`` of the Sinkhorn map at ``plan``, shape ``(...)``.

    ``method="dense"`` (default for ``m ≤ 512``): second-smallest eigenvalue of the normalised
    cancellation-free Laplacian (relative accuracy kept for tiny gaps), ``O(m³)``.
    ``method="lanczos"``: Lanczos on ``S = D_b^{-1/2} Pᵀ D_a⁻¹ P D_b^{-1/2}`` with the top eigenvector
    ``D_b^{1/2} 1`` deflated, ``O(nm)`` per step; returns ``1 - λ₂``, whose *absolute* accuracy is
    ~``tol`` (gaps below ~1e-12 lose their relative accuracy).

    Convention-free (``J`` is invariant under ``P → cP``). ``a`` defaults to ``P1``.
    """
    _check_method(method)
    _check_plan(plan)
    m = plan.shape[-1]
    if m < 2:
        raise ValueError("`plan` needs at least two columns for a spectral gap")
    if method == "auto":
        method = "dense" if m <= _DENSE_MAX else "lanczos"
    if method == "dense":
        return _normalized_laplacian_eigs(plan, a)[..., 1]
    batch = plan.shape[:-2]
    flat = plan.reshape((-1,) + plan.shape[-2:])
    a_full = None if a is None else plan_marginals(plan, a, None)[0].reshape(-1, plan.shape[-2])
    out = torch.empty(flat.shape[0], dtype=plan.dtype, device=plan.device)
    for t in range(flat.shape[0]):
        P = flat[t]
        at = None if a_full is None else a_full[t]
        mv = symmetrized_matvec(P, at)
        top = P.sum(0).sqrt()
        top = top / torch.linalg.norm(top)
        lam2, _, _ = _lanczos_top(mv, _start_vector(m, P.dtype, P.device), deflate=top,
                                  max_iter=max_iter, tol=tol)
        out[t] = 1.0 - lam2
    return out.reshape(batch)


def _group_inverse_dense(IJ: Tensor, r: Tensor, l: Tensor) -> Tensor:
    """Group inverse of ``A = I - J`` with kernel ``r`` and left kernel ``l``: ``(A + E)⁻¹ - E``.

    Batch elements where ``A + E`` is singular (a second unit eigenvalue, e.g. Laplacian weights that
    underflow to 0 and disconnect the columns: ``γ = 0``) come back as ``inf``.
    """
    E = r[..., :, None] * l[..., None, :] / (l * r).sum(-1)[..., None, None]
    Rinv, info = torch.linalg.inv_ex(IJ + E)
    R = Rinv - E
    bad = (info != 0) | ~torch.isfinite(R).all(dim=-1).all(dim=-1)
    return torch.where(bad[..., None, None], torch.full_like(R, math.inf), R)


def _cg_psd(mv: Callable[[Tensor], Tensor], rhs: Tensor, tol: float, max_iter: int) -> Tensor:
    """CG on a PSD operator with kernel 1 (1-D vectors); iterates kept mean-free."""
    x = torch.zeros_like(rhs)
    r = rhs - rhs.mean()
    p = r.clone()
    rs = torch.dot(r, r)
    rs0 = float(rs)
    if rs0 == 0.0:
        return x
    for _ in range(max_iter):
        Ap = mv(p)
        Ap = Ap - Ap.mean()
        den = torch.dot(p, Ap)
        if float(den) <= 0:
            break
        al = rs / den
        x = x + al * p
        r = r - al * Ap
        rs_new = torch.dot(r, r)
        if float(rs_new) <= tol * tol * rs0:
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def resolvent_norm(
    plan: Tensor,
    a: Optional[Tensor] = None,
    *,
    coords: Coords = "potential",
    g: Optional[Tensor] = None,
    eps: Optional[float] = None,
    method: Method = "auto",
    max_iter: int = 200,
    tol: float = 1e-10,
) -> Tensor:
    """Euclidean norm of the resolvent at 1 on the complement of the gauge, ``(...)``.

    Defined as ``‖(I - J)^#‖₂``, the group inverse of ``I - J``: the inverse of ``I - J`` on its
    invariant complement ``{x : lᵀx = 0}`` of the gauge direction ``r`` (``l = b``, ``r = 1`` in
    potentials; ``l = b/v``, ``r = v`` in scaling coordinates), composed with the spectral
    projector. With uniform ``b`` in potentials this is ``‖(I - J)⁻¹|_{1⊥}‖ = 1/γ`` exactly;
    in general ``1/γ ≤ ‖(I - J)^#‖₂ ≤ κ(V)/γ`` (``(I - J)^# = V diag(0, 1/(1-λ_k)) V⁻¹``).

    ``method="dense"``: ``(I - J + r lᵀ/lᵀr)⁻¹ - r lᵀ/lᵀr`` from the cancellation-free ``I - J =
    D_b⁻¹ L`` and an SVD, ``O(m³)``. ``method="lanczos"`` (potential or scaling coordinates): Lanczos
    on ``RᵀR`` with inner CG solves of ``L y = D_b x`` (``O(nm)`` per CG step; slow when ``γ`` is
    tiny, since CG needs ~``1/√γ`` steps).
    """
    _check_coords(coords)
    _check_method(method)
    _check_plan(plan)
    m = plan.shape[-1]
    if method == "auto":
        method = "dense" if m <= _DENSE_MAX else "lanczos"
    b_ = plan.sum(-2)
    lv = _scaling_logv(g, eps, m).to(plan.dtype) if coords == "scaling" else None
    if method == "dense":
        L = laplacian(plan, a)
        IJ = L / b_[..., :, None]  # I - J
        ones = torch.ones_like(b_)
        if lv is None:
            R = _group_inverse_dense(IJ, ones, b_)
        else:
            # similarity D_v (.) D_v⁻¹ preserves the group inverse; normalise v to max 1
            lvn = lv - lv.amax(-1, keepdim=True)
            R = _group_inverse_dense(IJ, ones, b_)
            R = R * torch.exp(lvn[..., :, None] - lvn[..., None, :])
        bad = ~torch.isfinite(R).all(dim=-1).all(dim=-1)
        norms = torch.linalg.matrix_norm(torch.where(bad[..., None, None], torch.zeros_like(R), R), ord=2)
        return torch.where(bad, torch.full_like(norms, math.inf), norms)
    # matrix-free
    batch = plan.shape[:-2]
    flat = plan.reshape((-1,) + plan.shape[-2:])
    lvf = None if lv is None else lv.expand(batch + (m,)).reshape(-1, m)
    out = torch.empty(flat.shape[0], dtype=plan.dtype, device=plan.device)
    for t in range(flat.shape[0]):
        P = flat[t]
        a_t = P.sum(-1)
        b_t = P.sum(0)
        sb = b_t.sum()

        def Lmv(y: Tensor, P=P, a_t=a_t, b_t=b_t) -> Tensor:
            return b_t * y - P.T @ ((P @ y) / a_t)

        def R(x: Tensor, b_t=b_t, sb=sb, Lmv=Lmv) -> Tensor:  # group inverse of I - J
            qx = x - b_t.dot(x) / sb  # Q x = x - 1 bᵀx/Σb
            y = _cg_psd(Lmv, b_t * qx, tol * 1e-2, 20 * m)
            return y - b_t.dot(y) / sb

        def Rt(z: Tensor, b_t=b_t, sb=sb, Lmv=Lmv) -> Tensor:  # its transpose
            qz = z - b_t * z.sum() / sb  # Qᵀ z
            w = b_t * _cg_psd(Lmv, qz, tol * 1e-2, 20 * m)
            return w - b_t * w.sum() / sb

        if lvf is not None:
            ev = torch.exp(lvf[t] - lvf[t].max())

            def RR(x: Tensor, ev=ev, R=R, Rt=Rt) -> Tensor:
                y = ev * R(x / ev)
                return (1 / ev) * Rt(ev * y)
        else:

            def RR(x: Tensor, R=R, Rt=Rt) -> Tensor:
                return Rt(R(x))

        lam, _, _ = _lanczos_top(RR, _start_vector(m, P.dtype, P.device), max_iter=max_iter, tol=tol)
        out[t] = math.sqrt(max(lam, 0.0))
    return out.reshape(batch)


# ----------------------------------------------------------------------------------------------
# non-normality


@dataclass
class NonNormality:
    """Non-normality measures of a square matrix ``J`` (all dimensionless, batched ``(...)``).

    Attributes
    ----------
    kappa_V : Tensor
        ``‖V‖₂‖V⁻¹‖₂`` for the eigenvector matrix ``V`` with unit-norm columns (1 for normal ``J``).
    henrici : Tensor
        Henrici's relative departure from normality ``(‖J‖_F² - Σ|λ_i|²)^{1/2} / ‖J‖_F`` (0 for normal).
    asymmetry : Tensor
        ``‖J - Jᵀ‖_F / ‖J‖_F`` (0 for symmetric ``J``).
    """

    kappa_V: Tensor
    henrici: Tensor
    asymmetry: Tensor


def nonnormality(J: Tensor, eigenvalues: Optional[Tensor] = None) -> NonNormality:
    """Non-normality measures of a dense square matrix ``J (..., m, m)`` (see :class:`NonNormality`).

    ``eigenvalues (..., m)``: pass accurately known eigenvalues (e.g. :func:`jacobian_spectrum`) to
    use them in Henrici's measure instead of ``torch.linalg.eigvals``. ``κ(V)`` always uses
    ``torch.linalg.eig``; it is meaningful only for well-separated eigenvalues.
    """
    if not isinstance(J, Tensor) or J.dim() < 2 or J.shape[-1] != J.shape[-2]:
        raise ValueError("`J` must be a square matrix tensor (..., m, m)")
    if not bool(torch.isfinite(J).all()):
        raise ValueError("`J` contains NaN or inf (in scaling coordinates, reduce osc(g)/eps)")
    fro = torch.linalg.matrix_norm(J)
    lam, V = torch.linalg.eig(J)
    if eigenvalues is not None:
        lam_abs2 = (eigenvalues.to(J.dtype) ** 2).sum(-1)
    else:
        lam_abs2 = (lam.abs() ** 2).sum(-1)
    dep = (fro**2 - lam_abs2).clamp_min(0).sqrt() / fro
    V = V / torch.linalg.vector_norm(V, dim=-2, keepdim=True)
    sv = torch.linalg.svdvals(V)
    kappa = sv[..., 0] / sv[..., -1]
    asym = torch.linalg.matrix_norm(J - J.transpose(-1, -2)) / fro
    return NonNormality(kappa_V=kappa.real if kappa.is_complex() else kappa, henrici=dep, asymmetry=asym)


def eigenvector_condition(
    plan: Tensor,
    *,
    coords: Coords = "potential",
    g: Optional[Tensor] = None,
    eps: Optional[float] = None,
    log: bool = False,
) -> Tensor:
    """Structural eigenvector condition number of the Sinkhorn Jacobian, ``(...)``.

    ``J = D_b^{-1/2} U Λ Uᵀ D_b^{1/2}`` with ``U`` orthogonal, so ``V = D_w U`` diagonalises it with
    ``D_w = D_b^{-1/2}`` (potentials) or ``D_v D_b^{-1/2}`` (scaling), and
    ``κ(V) = cond(D_w) = max w / min w``: ``√(max b / min b)`` in potentials (1 for uniform
    marginals, independent of ``ε``) and up to ``e^{osc(g)/ε}·√(max b/min b)`` in scaling
    coordinates. Computed in logs; ``log=True`` returns ``log κ`` (no overflow).
    """
    _check_coords(coords)
    _check_plan(plan)
    lw = -0.5 * torch.log(plan.sum(-2))
    if coords == "scaling":
        lw = lw + _scaling_logv(g, eps, plan.shape[-1]).to(plan.dtype)
    lk = lw.amax(-1) - lw.amin(-1)
    return lk if log else torch.exp(lk)


def transient_growth(
    plan: Tensor,
    k_max: int,
    *,
    coords: Coords = "potential",
    g: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    """Norms of the error propagator ``‖J^k - E‖₂``, ``k = 0..k_max``, and ``λ₂(J)``.

    ``E = r lᵀ / lᵀr`` is the spectral projector on the gauge (``r = 1, l = b`` in potentials;
    ``r = v, l = b/v`` in scaling coordinates), so ``J^k - E = (J - E)^k`` propagates the error of
    ``k`` Sinkhorn iterations on the complement of the gauge. For a normal ``J`` it equals
    ``λ₂^k`` exactly; in general ``λ₂^k ≤ ‖J^k - E‖₂ ≤ κ(V) λ₂^k``. The ratio
    ``‖J^k - E‖₂ / λ₂^k`` measures transient (non-normal) amplification. Dense, unbatched ``(m, m)``.

    Returns ``(norms (k_max + 1,), lambda2 ())``.
    """
    _check_coords(coords)
    _check_plan(plan)
    if plan.dim() != 2:
        raise ValueError("`plan` must be an unbatched (n, m) matrix")
    if int(k_max) != k_max or k_max < 0:
        raise ValueError(f"`k_max` must be a nonnegative integer; got {k_max!r}")
    J = jacobian(plan, coords=coords, g=g, eps=eps)
    b_ = plan.sum(0)
    r = torch.ones_like(b_)
    l = b_
    if coords == "scaling":
        lv = _scaling_logv(g, eps, plan.shape[-1]).to(plan.dtype)
        lv = lv - lv.max()
        r, l = torch.exp(lv), b_ * torch.exp(-lv)
    E = r[:, None] * l[None, :] / (l @ r)
    M = J - E
    Mk = torch.eye(J.shape[0], dtype=J.dtype, device=J.device) - E
    norms = [torch.linalg.matrix_norm(Mk, ord=2)]
    for _ in range(int(k_max)):
        Mk = M @ Mk
        norms.append(torch.linalg.matrix_norm(Mk, ord=2))
    lam2 = 1.0 - _normalized_laplacian_eigs(plan)[1]
    return torch.stack(norms), lam2


# ----------------------------------------------------------------------------------------------
# sensitivity of the plan to the cost


def _laplacian_solve(plan: Tensor, a_: Tensor, b_: Tensor, rhs: Tensor, cg_tol: float, cg_max: int) -> Tensor:
    """Solve ``L β = rhs`` (``L = D_b - Pᵀ D_a⁻¹ P``, kernel 1, ``Σ rhs = 0``), mean-free solution."""
    m = plan.shape[-1]
    rhs = rhs - rhs.mean(-1, keepdim=True)
    if m <= _DENSE_MAX:
        L = laplacian(plan, a_)
        L = L + (b_.mean(-1) / m)[..., None, None]  # + c·11ᵀ lifts the gauge; solution stays mean-free
        beta, info = torch.linalg.solve_ex(L, rhs[..., None])
        if bool((info != 0).any()) or not bool(torch.isfinite(beta).all()):
            # weights that underflow to 0 disconnect the column graph (tiny eps): least squares
            beta = torch.linalg.pinv(L, hermitian=True) @ rhs[..., None]
        beta = beta[..., 0]
        return beta - beta.mean(-1, keepdim=True)
    flat_P = plan.reshape((-1,) + plan.shape[-2:])
    fa, fb, fr = a_.reshape(-1, a_.shape[-1]), b_.reshape(-1, m), rhs.reshape(-1, m)
    out = torch.empty_like(fr)
    for t in range(flat_P.shape[0]):
        P, at, bt = flat_P[t], fa[t], fb[t]
        out[t] = _cg_psd(lambda y: bt * y - P.T @ ((P @ y) / at), fr[t], cg_tol, cg_max)
    return out.reshape(rhs.shape)


def sensitivity_matvec(
    plan: Tensor, eps: float, *, cg_tol: float = 1e-13, cg_max_iter: int = 2000
) -> Callable[[Tensor], Tensor]:
    """Matrix-free sensitivity ``dC ↦ dP = (∂P*/∂C)[dC]``, shapes ``(..., n, m) → (..., n, m)``.

    ``dP = -(1/ε) P ⊙ (dC - α ⊕ β)``, where ``α ⊕ β`` is the ``P``-weighted least-squares projection
    of ``dC`` onto separable matrices: ``[[D_a, P], [Pᵀ, D_b]] [α; β] = [(P⊙dC)1; (P⊙dC)ᵀ1]``, solved
    through its Schur complement ``L β = ...`` (dense for ``m ≤ 512``, CG otherwise). Equals
    ``-(1/ε) D^{1/2}(I - Π̃)D^{1/2} vec dC``. Marginals are the plan's own; the result scales with
    the plan's total mass (probability vs unit-sum convention).
    """
    _check_plan(plan)
    eps = _check_eps(eps)
    a_, b_ = plan_marginals(plan)
    P = plan

    def mv(dC: Tensor) -> Tensor:
        if not isinstance(dC, Tensor) or dC.shape[-2:] != P.shape[-2:]:
            raise ValueError(f"`dC` must have shape (..., {P.shape[-2]}, {P.shape[-1]})")
        PG = P * dC.to(P.dtype)
        Pe = P.expand(PG.shape)
        ae = a_.expand(PG.shape[:-1])
        be = b_.expand(PG.shape[:-2] + (P.shape[-1],))
        wr, wc = PG.sum(-1), PG.sum(-2)
        rhs = wc - torch.einsum("...ij,...i->...j", Pe, wr / ae)
        beta = _laplacian_solve(Pe, ae, be, rhs, cg_tol, cg_max_iter)
        alpha = (wr - torch.einsum("...ij,...j->...i", Pe, beta)) / ae
        return -(PG - Pe * (alpha[..., :, None] + beta[..., None, :])) / eps

    return mv


def sensitivity_matrix(plan: Tensor, eps: float) -> Tensor:
    """Dense ``∂vec P*/∂vec C = -(1/ε) D^{1/2}(I - Π̃)D^{1/2}``, shape ``(..., nm, nm)`` (row-major vec).

    Built independently of :func:`sensitivity_matvec`: ``Π̃`` is the orthogonal projector onto the
    span of ``D^{1/2}vec(e_i 1ᵀ)`` and ``D^{1/2}vec(1 e_jᵀ)`` (rank ``n + m - 1``), from an SVD.
    For small problems only (``O((nm)²)`` memory, ``O(nm(n+m)²)`` time).
    """
    _check_plan(plan)
    eps = _check_eps(eps)
    n, m = plan.shape[-2], plan.shape[-1]
    d = plan.reshape(plan.shape[:-2] + (n * m,)).sqrt()
    rows = torch.kron(torch.eye(n, dtype=plan.dtype, device=plan.device), torch.ones(m, 1, dtype=plan.dtype, device=plan.device))
    cols = torch.kron(torch.ones(n, 1, dtype=plan.dtype, device=plan.device), torch.eye(m, dtype=plan.dtype, device=plan.device))
    B = d[..., :, None] * torch.cat([rows, cols], dim=-1)  # (..., nm, n+m)
    U = torch.linalg.svd(B, full_matrices=False)[0][..., : n + m - 1]
    Pi = U @ U.transpose(-1, -2)
    I = torch.eye(n * m, dtype=plan.dtype, device=plan.device)
    return -(d[..., :, None] * (I - Pi) * d[..., None, :]) / eps


def sensitivity_norm(
    plan: Tensor, eps: float, *, method: Method = "auto", max_iter: int = 300, tol: float = 1e-10
) -> Tensor:
    """Operator 2-norm ``‖∂P*/∂C‖₂`` (Euclidean on ``vec``), shape ``(...)``.

    The Jacobian is symmetric negative semidefinite, so the norm is ``λ_max`` of
    ``(1/ε) D^{1/2}(I - Π̃)D^{1/2}``. ``"dense"``: ``eigvalsh`` of :func:`sensitivity_matrix` (``nm ≤
    ~1500``); ``"lanczos"``: Lanczos on :func:`sensitivity_matvec`. ``"auto"``: dense when
    ``nm ≤ 400``. Scales with the plan's mass (state the convention).
    """
    _check_method(method)
    _check_plan(plan)
    eps = _check_eps(eps)
    n, m = plan.shape[-2], plan.shape[-1]
    if method == "auto":
        method = "dense" if n * m <= 400 else "lanczos"
    if method == "dense":
        M = -sensitivity_matrix(plan, eps)
        return torch.linalg.eigvalsh(0.5 * (M + M.transpose(-1, -2)))[..., -1]
    batch = plan.shape[:-2]
    flat = plan.reshape((-1, n, m))
    out = torch.empty(flat.shape[0], dtype=plan.dtype, device=plan.device)
    for t in range(flat.shape[0]):
        mv = sensitivity_matvec(flat[t], eps)
        op = lambda x, mv=mv: -mv(x.reshape(n, m)).reshape(-1)  # noqa: E731
        lam, _, _ = _lanczos_top(op, _start_vector(n * m, plan.dtype, plan.device), max_iter=max_iter, tol=tol)
        out[t] = lam
    return out.reshape(batch)


def sensitivity_bound(plan: Tensor, eps: float) -> Tensor:
    """The lemma's bound ``‖∂P*/∂C‖₂ ≤ max_ij P*_ij / ε``, shape ``(...)`` (same convention as ``plan``)."""
    _check_plan(plan)
    return plan.amax(dim=(-2, -1)) / _check_eps(eps)


def plan_eps_derivative(plan: Tensor, cost: Tensor, eps: float) -> Tensor:
    """``∂P*/∂ε = -(1/ε)(∂P*/∂C)[C] = (1/ε²) D^{1/2}(I - Π̃)D^{1/2} vec C``, shape ``(..., n, m)``.

    From ``P*_ε(C) = P*_1(C/ε)``. Only the ``P``-weighted non-separable part of ``C`` contributes.
    """
    eps = _check_eps(eps)
    if not isinstance(cost, Tensor) or cost.shape[-2:] != plan.shape[-2:]:
        raise ValueError("`cost` must be a tensor with the plan's shape (..., n, m)")
    return -sensitivity_matvec(plan, eps)(cost) / eps


# ----------------------------------------------------------------------------------------------
# Birkhoff-Hopf


def birkhoff_hopf_theta(cost: Tensor, chunk: int = 64) -> Tensor:
    """``θ_C = max_{i,j,k,l} (C_il + C_kj - C_ij - C_kl)``, shape ``(...)``, in ``O(n²m)``.

    ``θ_C = max_{i,k} [D_ik + D_ki]`` with ``D_ik = max_l (C_il - C_kl)``. ``θ_C/ε`` is the projective
    (Hilbert-metric) diameter of the kernel ``exp(-C/ε)``. Rows are processed ``chunk`` at a time.
    """
    if not isinstance(cost, Tensor) or cost.dim() < 2:
        raise ValueError("`cost` must be a tensor of shape (..., n, m)")
    if not bool(torch.isfinite(cost).all()):
        raise ValueError("`cost` contains NaN or inf")
    n = cost.shape[-2]
    parts = []
    for s in range(0, n, chunk):
        blk = cost[..., s : s + chunk, None, :] - cost[..., None, :, :]  # (..., c, n, m)
        parts.append(blk.amax(-1))
    D = torch.cat(parts, dim=-2)  # (..., n, n)
    return (D + D.transpose(-1, -2)).amax(dim=(-2, -1))


def birkhoff_hopf_bound(cost: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """Birkhoff-Hopf bounds ``(λ₂ ≤ tanh²(θ_C/4ε), γ ≥ sech²(θ_C/4ε))``, each ``(...)``.

    Franklin & Lorenz (1989): one Sinkhorn iteration contracts Hilbert's projective metric by at
    least ``tanh²(θ_C/(4ε))``, which bounds the linear rate ``λ₂(J)``. ``sech²`` is evaluated as
    ``4e^{-2x}/(1+e^{-2x})²`` (no overflow; ≈ ``4 e^{-θ_C/(2ε)}`` for small ε).
    """
    eps = _check_eps(eps)
    x = birkhoff_hopf_theta(cost) / (4 * eps)
    return torch.tanh(x) ** 2, 4 * torch.exp(-2 * x) / (1 + torch.exp(-2 * x)) ** 2


def assignment_gap(cost: Tensor) -> Tuple[float, Tensor]:
    """Gap between the best and second-best assignment costs of a square ``cost (n, n)``.

    Returns ``(Δ, perm)``: ``Δ = min_{σ ≠ σ*} ⟨C, σ⟩ - ⟨C, σ*⟩ ≥ 0`` and the optimal permutation
    ``perm (n,)`` (``σ*(i) = perm[i]``). The second-best assignment differs from the best in at least
    one edge, so it is the best over ``n`` problems that each forbid one optimal edge
    (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``; ``O(n⁴)`` in all). ``Δ = 0`` means
    the OT solution is not unique; below ``ε ≈ Δ`` the entropic plan is close to the permutation.
    """
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    if not isinstance(cost, Tensor) or cost.dim() != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError("`cost` must be a square (n, n) tensor")
    if cost.shape[0] < 2:
        raise ValueError("`cost` must be at least 2 x 2 for a second-best assignment")
    Cn = cost.detach().cpu().to(torch.float64).numpy()
    r, c = linear_sum_assignment(Cn)
    best = float(Cn[r, c].sum())
    big = float(np.abs(Cn).max()) * (Cn.shape[0] + 1) * 4 + 1.0
    second = math.inf
    for i, j in zip(r, c):
        C2 = Cn.copy()
        C2[i, j] = big
        r2, c2 = linear_sum_assignment(C2)
        second = min(second, float(C2[r2, c2].sum()))
    return second - best, torch.as_tensor(c, dtype=torch.long)


def deep_gap_rate(
    plan: Tensor,
    eps: float,
    a: Optional[Tensor] = None,
    b: Optional[Tensor] = None,
    perm: Optional[Tensor] = None,
) -> float:
    """Predicted rate ``r`` of the deep-regime gap ``γ(ε) = e^{-r/ε + O(log N)}`` from a sharp plan.

    ``plan (n, n)`` should be close to a (scaled) permutation ``π``: ``perm`` (``π(i) = perm[i]``),
    by default the permutation of largest ``Σ_i log P_iπ(i)`` (for a sharp plan, the row-wise
    argmax; pass the optimal assignment when the plan has not yet resolved near-ties). Reduced costs are read off the plan, ``c̄_ij = -ε log(P_ij / √(a_i b_j))``. In the column graph
    of the Laplacian ``L``, columns ``j`` and ``π(i)`` are joined through row ``i`` with weight
    ``≈ e^{-c̄_ij/ε}``; ``r`` is the **bottleneck** (minimax) edge cost: the smallest ``t`` such that the
    edges with ``c̄ ≤ t`` connect all columns (the largest edge of a minimum spanning tree).
    Kruskal's algorithm, ``O(n² log n)``.
    """
    _check_plan(plan)
    eps = _check_eps(eps)
    if plan.dim() != 2 or plan.shape[0] != plan.shape[1]:
        raise ValueError("`plan` must be a square (n, n) matrix")
    n = plan.shape[0]
    a_, b_ = plan_marginals(plan, a, b)
    if perm is None:
        from scipy.optimize import linear_sum_assignment

        # the permutation carrying the plan (its maximum-likelihood assignment)
        logP = torch.log(plan.detach().cpu().to(torch.float64).clamp_min(1e-300)).numpy()
        perm = torch.as_tensor(linear_sum_assignment(-logP)[1], dtype=torch.long)
    else:
        perm = torch.as_tensor(perm, dtype=torch.long)
        if perm.shape != (n,) or sorted(perm.tolist()) != list(range(n)):
            raise ValueError(f"`perm` must be a permutation of range({n})")
    with torch.no_grad():
        cb = -eps * (torch.log(plan) - 0.5 * (torch.log(a_)[:, None] + torch.log(b_)[None, :]))
    cbl = cb.detach().cpu().tolist()
    pl = perm.tolist()
    edges = {}
    for i in range(n):
        k = pl[i]
        for j in range(n):
            if j != k:
                key = (min(j, k), max(j, k))
                edges[key] = min(edges.get(key, math.inf), cbl[i][j])
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    comps, r = n, 0.0
    for (j, k), c in sorted(edges.items(), key=lambda kv: kv[1]):
        rj, rk = find(j), find(k)
        if rj != rk:
            parent[rj] = rk
            comps -= 1
            r = c
            if comps == 1:
                break
    return float(r)


# ----------------------------------------------------------------------------------------------
# accurate reference solves


def newton_polish(
    cost: Tensor,
    eps: float,
    a: Optional[Tensor] = None,
    b: Optional[Tensor] = None,
    *,
    init: Tuple[Tensor, Tensor],
    tol: float = 1e-13,
    max_iter: int = 50,
) -> SinkhornResult:
    """Newton's method on the column potentials, for reference plans at small ``ε``, ``(n, m)`` costs.

    With ``f(g)`` eliminated exactly (a row log-sum-exp), the column marginal ``c(g)`` has Jacobian
    ``L/ε`` (the Laplacian of :func:`laplacian`); each step solves ``L δ = -(c - b)`` densely and
    backtracks on the marginal error. Quadratic convergence from a warm start, independent of the
    gap (which makes plain Sinkhorn need ~``1/γ`` iterations). Unbatched; ``O(m³)`` per step.
    Returns a :class:`~bistochastic.SinkhornResult` (``iterations`` counts Newton steps).
    """
    eps = _check_eps(eps)
    if not isinstance(cost, Tensor) or cost.dim() != 2:
        raise ValueError("`cost` must be an (n, m) tensor (newton_polish is unbatched)")
    n, m = cost.shape
    a_ = torch.full((n,), 1.0 / n, dtype=cost.dtype) if a is None else torch.as_tensor(a, dtype=cost.dtype)
    b_ = torch.full((m,), 1.0 / m, dtype=cost.dtype) if b is None else torch.as_tensor(b, dtype=cost.dtype)
    a_, b_ = a_.to(cost.device), b_.to(cost.device)
    Kc = -cost / eps
    loga = torch.log(a_)
    G = init[1].to(cost.dtype) / eps

    def state(G: Tensor):
        F = loga - torch.logsumexp(Kc + G[None, :], dim=1)
        P = torch.exp(Kc + F[:, None] + G[None, :])
        return F, P, float(marginal_error(P, a_, b_))

    F, P, err = state(G)
    hist = [err]
    it = 0
    for it in range(1, max_iter + 1):
        if err <= tol:
            it -= 1
            break
        r = P.sum(0) - b_
        dG = -_laplacian_solve(P, a_, P.sum(0), r, 1e-14, 10 * m)
        t = 1.0
        for _ in range(40):
            F2, P2, e2 = state(G + t * dG)
            if math.isfinite(e2) and e2 < err:
                break
            t *= 0.5
        else:
            break
        G, F, P, err = G + t * dG, F2, P2, e2
        hist.append(err)
    conv = torch.tensor(err <= tol)
    return SinkhornResult(
        plan=P, f=F * eps, g=G * eps, n_iter=torch.tensor(it), marginal_error=torch.tensor(err, dtype=cost.dtype),
        converged=conv, eps=eps, tol=tol, iterations=it, errors=torch.tensor(hist, dtype=cost.dtype),
    )


@dataclass
class PathResult:
    """Reference plans along a descending ``ε`` grid (see :func:`solve_path`).

    ``eps (E,)``, ``plan (E, n, m)``, ``f (E, n)``, ``g (E, m)``, ``marginal_error (E,)``,
    ``converged (E,)`` bool, ``sinkhorn_iters (E,)`` and ``newton_steps (E,)`` int64.
    """

    eps: Tensor
    plan: Tensor
    f: Tensor
    g: Tensor
    marginal_error: Tensor
    converged: Tensor
    sinkhorn_iters: Tensor
    newton_steps: Tensor

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


def solve_path(
    cost: Tensor,
    eps_grid: Sequence[float],
    a: Optional[Tensor] = None,
    b: Optional[Tensor] = None,
    *,
    tol: float = 1e-13,
    max_iter: int = 300,
    newton: bool = True,
) -> PathResult:
    """Accurate plans ``P*_ε(C)`` on a strictly descending grid, warm-started from the previous ``ε``.

    Each ``ε``: :func:`bistochastic.sinkhorn` (log engine family, adaptive momentum) from the previous
    potentials with at most ``max_iter`` iterations; if it misses ``tol`` and ``newton``, then
    :func:`newton_polish`. Non-convergence is *recorded* (``converged``), never hidden or warned.
    ``cost (n, m)`` (unbatched), marginals as in :func:`bistochastic.sinkhorn`.
    """
    if not isinstance(cost, Tensor) or cost.dim() != 2:
        raise ValueError("`cost` must be an (n, m) tensor")
    eps_list = [_check_eps(e) for e in eps_grid]
    if len(eps_list) == 0:
        raise ValueError("`eps_grid` must be non-empty")
    if any(e2 >= e1 for e1, e2 in zip(eps_list, eps_list[1:])):
        raise ValueError("`eps_grid` must be strictly descending (warm starts go from large to small eps)")
    plans, fs, gs, errs, conv, sits, nsteps = [], [], [], [], [], [], []
    init = None
    for e in eps_list:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SinkhornWarning)
            res = sinkhorn(cost, e, a, b, tol=tol, max_iter=max_iter, grad="none", init=init, warn=False)
        ns = 0
        if not bool(res.converged) and newton:
            pol = newton_polish(cost, e, a, b, init=(res.f, res.g), tol=tol)
            ns = pol.iterations
            if float(pol.marginal_error) < float(res.marginal_error):
                res = SinkhornResult(plan=pol.plan, f=pol.f, g=pol.g, n_iter=res.n_iter,
                                     marginal_error=pol.marginal_error, converged=pol.converged,
                                     eps=e, tol=tol, iterations=res.iterations, errors=res.errors)
        plans.append(res.plan)
        fs.append(res.f)
        gs.append(res.g)
        errs.append(float(res.marginal_error))
        conv.append(bool(res.converged))
        sits.append(int(res.iterations))
        nsteps.append(ns)
        init = (res.f, res.g)
    dt = cost.dtype
    return PathResult(
        eps=torch.tensor(eps_list, dtype=dt), plan=torch.stack(plans), f=torch.stack(fs), g=torch.stack(gs),
        marginal_error=torch.tensor(errs, dtype=dt), converged=torch.tensor(conv),
        sinkhorn_iters=torch.tensor(sits), newton_steps=torch.tensor(nsteps),
    )
