"""Spectral diagnostics of doubly-stochastic mixing: σ₂, detail contraction, effective depth.

For a doubly-stochastic matrix (DSM) ``M`` the constant vector is a left and right singular vector
with singular value 1, and ``M = J + PMP`` with ``J = 11ᵀ/n`` and ``P = I - J``. Hence

.. math::  \\sigma_2(M) = \\|M - J\\|_2 = \\|PMP\\|_2,

the gain of ``M`` on the *detail subspace* ``1^⊥`` (token-to-token differences). Everything in this
module is batched over leading dimensions and follows the input's device and dtype.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._checks import positive_finite

__all__ = [
    "AUTO_EXACT_MAX_N",
    "double_center",
    "sigma2",
    "sigma2_operator",
    "detail",
    "detail_ratio",
    "DepthProfile",
    "cumulative_products",
    "depth_profile",
    "propagate",
    "matmul_floor",
    "first_below",
    "effective_depth",
    "effective_depth_constant",
    "effective_depth_law",
    "dsm_entropy",
    "first_order_dsm",
    "first_order_sigma2",
    "gaussian_sigma2_law",
    "positivity_bound",
    "oscillation",
    "entropic_positivity_bound",
    "birkhoff_contraction",
    "circle_cost",
    "dominant_frequency",
    "frequency_energy",
    "FrequencyEig",
    "eig_by_frequency",
    "rank_correlation",
    "dsm_jacobian_matvec",
    "dsm_jacobian",
    "dsm_jacobian_norm",
]

Method = Literal["auto", "exact", "lanczos", "power"]

#: ``method="auto"`` uses the exact SVD up to this size and Lanczos above it.
AUTO_EXACT_MAX_N = 512


# ----------------------------------------------------------------------------------------------
# validation helpers


def _check_square(name: str, M: Tensor) -> None:
    if not isinstance(M, Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor of shape (..., n, n)")
    if M.dim() < 2 or M.shape[-1] != M.shape[-2]:
        raise ValueError(f"`{name}` must be square, shape (..., n, n); got {tuple(M.shape)}")
    if M.shape[-1] == 0:
        raise ValueError(f"`{name}` must be non-empty; got shape {tuple(M.shape)}")
    if not M.dtype.is_floating_point:
        raise ValueError(f"`{name}` must have a floating dtype; got {M.dtype}")
    if not bool(torch.isfinite(M).all()):
        raise ValueError(f"`{name}` contains NaN or inf")


def _center(x: Tensor, dim: int = -1) -> Tensor:
    """``P x`` along ``dim``: subtract the mean."""
    return x - x.mean(dim=dim, keepdim=True)


def double_center(M: Tensor) -> Tensor:
    """``P M P`` with ``P = I - 11ᵀ/n``: subtract row and column means, add back the grand mean.

    Shapes: ``M (..., n, n)`` -> ``(..., n, n)``. For a DSM this equals ``M - J``.
    """
    _check_square("M", M)
    return M - M.mean(-1, keepdim=True) - M.mean(-2, keepdim=True) + M.mean((-2, -1), keepdim=True)


# ----------------------------------------------------------------------------------------------
# matrix-free iterations on A = P M P (A and Aᵀ given as batched matvecs)


def _start_vector(batch: Tuple[int, ...], n: int, dtype: torch.dtype, device: torch.device,
                  seed: int) -> Tensor:
    g = torch.Generator().manual_seed(int(seed))
    v = torch.randn(batch + (n,), generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    v = _center(v)
    return v / v.norm(dim=-1, keepdim=True)


def _power(mv: Callable[[Tensor], Tensor], rmv: Callable[[Tensor], Tensor], batch, n, dtype, device,
           *, tol: float, max_iter: int, seed: int) -> Tuple[Tensor, Tensor]:
    """Power iteration on AᵀA. Returns (σ estimate, iterations used per batch element)."""
    v = _start_vector(batch, n, dtype, device, seed)
    sig = torch.zeros(batch, dtype=dtype, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    iters = torch.zeros(batch, dtype=torch.long, device=device)
    tiny = torch.finfo(dtype).tiny
    for it in range(1, max_iter + 1):
        Av = mv(v)
        s_new = Av.norm(dim=-1)
        w = _center(rmv(Av))
        wn = w.norm(dim=-1, keepdim=True)
        v_new = torch.where(wn > tiny, w / wn.clamp_min(tiny), v)
        # ‖Av‖ for unit v is the square root of the Rayleigh quotient of AᵀA; it increases monotonically.
        prev_done = done
        rel = (s_new - sig).abs() <= tol * s_new.clamp_min(tiny)
        sig = torch.where(prev_done, sig, s_new)
        newly = (rel | (s_new <= tiny)) & ~prev_done
        iters = torch.where(newly, torch.full_like(iters, it), iters)
        done = prev_done | newly
        v = torch.where(done[..., None], v, v_new)
        if bool(done.all()):
            break
    iters = torch.where(iters == 0, torch.full_like(iters, it), iters)
    return sig, iters


def _lanczos(mv: Callable[[Tensor], Tensor], rmv: Callable[[Tensor], Tensor], batch, n, dtype, device,
             *, tol: float, max_iter: int, seed: int) -> Tuple[Tensor, Tensor]:
    """Lanczos on AᵀA restricted to 1^⊥, full re-orthogonalisation.

    Returns (σ estimate = √ of the top Ritz value, Krylov dimension used). The Krylov dimension is
    capped at ``min(max_iter, n - 1)`` (the dimension of 1^⊥), where the Ritz value is exact.
    """
    kmax = max(1, min(int(max_iter), n - 1))
    q = _start_vector(batch, n, dtype, device, seed)
    Q = [q]
    alphas, betas = [], []
    prev = None
    used = kmax
    theta = torch.zeros(batch, dtype=dtype, device=device)
    eps = torch.finfo(dtype).eps
    for k in range(kmax):
        w = _center(rmv(mv(Q[-1])))
        a = (w * Q[-1]).sum(-1)
        alphas.append(a)
        # full re-orthogonalisation (twice is enough) against all previous vectors
        Qm = torch.stack(Q, dim=-1)  # (..., n, k+1)
        for _ in range(2):
            w = w - torch.einsum("...nk,...k->...n", Qm, torch.einsum("...nk,...n->...k", Qm, w))
        b = w.norm(dim=-1)
        T = torch.diag_embed(torch.stack(alphas, -1))
        if betas:
            off = torch.stack(betas, -1)
            T = T + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
        theta = torch.linalg.eigvalsh(T)[..., -1]
        if prev is not None:
            conv = (theta - prev).abs() <= tol * theta.abs().clamp_min(torch.finfo(dtype).tiny)
            if bool(conv.all()):
                used = k + 1
                break
        prev = theta
        # invariant subspace found (breakdown): Ritz values are exact
        scale = alphas[0].abs().clamp_min(torch.finfo(dtype).tiny)
        if bool((b <= 10 * eps * scale).all()) or k == kmax - 1:
            used = k + 1
            break
        betas.append(b)
        Q.append(w / b.clamp_min(torch.finfo(dtype).tiny)[..., None])
    sig = theta.clamp_min(0).sqrt()
    return sig, torch.full(batch, used, dtype=torch.long, device=device)


def sigma2_operator(
    matvec: Callable[[Tensor], Tensor],
    rmatvec: Callable[[Tensor], Tensor],
    n: int,
    *,
    batch_shape: Sequence[int] = (),
    dtype: torch.dtype = torch.float64,
    device: Union[str, torch.device] = "cpu",
    method: Literal["lanczos", "power"] = "lanczos",
    tol: float = 1e-10,
    max_iter: Optional[int] = None,
    seed: int = 0,
    return_iters: bool = False,
):
    """``‖P A P‖₂`` of an operator given only by batched matvecs (no matrix is formed).

    Use it for products of many layers, ``A = M_L ⋯ M_1``, without forming the product.

    Parameters
    ----------
    matvec, rmatvec : callables ``(..., n) -> (..., n)``
        ``x ↦ A x`` and ``x ↦ Aᵀ x``, batched over ``batch_shape``.
    n : int
        Dimension.
    method : {"lanczos", "power"}
        Lanczos on ``(PAP)ᵀ(PAP)`` with full re-orthogonalisation, or plain power iteration.
    tol : float
        Relative change of the estimate between steps at which to stop.
    max_iter : int, optional
        Cap on steps (Lanczos: Krylov dimension, at most ``n - 1``). Default: ``n`` for Lanczos,
        ``100 n`` (at least 10 000) for power.
    seed : int
        Seed of the (CPU) start vector; results are deterministic.
    return_iters : bool
        Also return the number of steps used per batch element.

    Returns
    -------
    Tensor ``batch_shape`` (and the step counts if ``return_iters``).
    """
    if int(n) != n or n < 1:
        raise ValueError(f"`n` must be a positive integer; got {n!r}")
    if method not in ("lanczos", "power"):
        raise ValueError(f"`method` must be 'lanczos' or 'power'; got {method!r}")
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"`tol` must be a positive finite number; got {tol!r}")
    n = int(n)
    batch = tuple(int(b) for b in batch_shape)
    device = torch.device(device)
    mv = lambda x: _center(matvec(_center(x)))  # noqa: E731  (P A P x)
    rmv = lambda x: _center(rmatvec(_center(x)))  # noqa: E731  (P Aᵀ P x)
    if n == 1:
        out = torch.zeros(batch, dtype=dtype, device=device)
        its = torch.zeros(batch, dtype=torch.long, device=device)
    elif method == "power":
        mi = max(10_000, 100 * n) if max_iter is None else int(max_iter)
        if mi < 1:
            raise ValueError(f"`max_iter` must be a positive integer; got {max_iter!r}")
        out, its = _power(mv, rmv, batch, n, dtype, device, tol=tol, max_iter=mi, seed=seed)
    else:
        mi = n if max_iter is None else int(max_iter)
        if mi < 1:
            raise ValueError(f"`max_iter` must be a positive integer; got {max_iter!r}")
        out, its = _lanczos(mv, rmv, batch, n, dtype, device, tol=tol, max_iter=mi, seed=seed)
    return (out, its) if return_iters else out


def sigma2(
    M: Tensor,
    method: Method = "auto",
    *,
    tol: float = 1e-10,
    max_iter: Optional[int] = None,
    seed: int = 0,
) -> Tensor:
    """Second singular value of a DSM, ``σ₂(M) = ‖M - J‖₂ = ‖P M P‖₂``, batched.

    What is computed, for any square ``M``, is ``‖P M P‖₂``: the largest gain of ``M`` on the
    detail subspace ``1^⊥`` measured on ``1^⊥`` (the part of ``Mx`` along ``1`` is discarded).
    For a DSM this is exactly ``σ₂(M) = ‖M - J‖₂``. For a row-stochastic (Softmax) matrix it is the
    gain of the detail-to-detail block, which may exceed 1; for a general matrix it is *not* the
    second singular value.

    Parameters
    ----------
    M : Tensor ``(..., n, n)``
        Square matrices, batched over leading dimensions (float32 or float64).
    method : {"auto", "exact", "lanczos", "power"}
        ``"exact"``: SVD of ``P M P`` (``O(n³)``). ``"lanczos"``: Lanczos on ``(PMP)ᵀ(PMP)`` with
        matvecs only (``O(n²)`` per step). ``"power"``: power iteration on the same operator (slow when
        σ₂ and σ₃ are close). ``"auto"``: exact for ``n <=`` :data:`AUTO_EXACT_MAX_N`, else Lanczos.
    tol, max_iter, seed
        Stopping rule, step cap and start-vector seed of the iterative methods (see
        :func:`sigma2_operator`).

    Returns
    -------
    Tensor ``(...)``
        ``‖P M P‖₂`` per matrix, same dtype and device as ``M``.

    Raises
    ------
    ValueError
        If ``M`` is not a non-empty square floating tensor with finite entries, or ``method`` is unknown.
    """
    _check_square("M", M)
    if method not in ("auto", "exact", "lanczos", "power"):
        raise ValueError(f"`method` must be 'auto', 'exact', 'lanczos' or 'power'; got {method!r}")
    n = M.shape[-1]
    if method == "auto":
        method = "exact" if n <= AUTO_EXACT_MAX_N else "lanczos"
    if method == "exact":
        A = M - M.mean(-1, keepdim=True) - M.mean(-2, keepdim=True) + M.mean((-2, -1), keepdim=True)
        return torch.linalg.matrix_norm(A, ord=2)
    Mt = M.transpose(-1, -2)
    return sigma2_operator(
        lambda x: (M @ x[..., None])[..., 0],
        lambda x: (Mt @ x[..., None])[..., 0],
        n, batch_shape=M.shape[:-2], dtype=M.dtype, device=M.device, method=method,
        tol=tol, max_iter=max_iter, seed=seed,
    )


# ----------------------------------------------------------------------------------------------
# detail signal and its contraction over depth


def detail(X: Tensor, token_dim: int = -2) -> Tensor:
    """``P X``: remove the mean over the token axis (the "DC" part), keep the token differences.

    Shapes: ``X (..., n, d)`` with the tokens on ``token_dim`` (default ``-2``); same shape out.
    """
    if not isinstance(X, Tensor) or X.dim() < 1:
        raise ValueError("`X` must be a torch.Tensor with at least one dimension")
    return _center(X, dim=token_dim)


def detail_ratio(X_L: Tensor, X_0: Tensor, token_dim: int = -2) -> Tensor:
    """``‖P X_L‖_F / ‖P X_0‖_F``, with ``P`` acting on the token axis, batched.

    Shapes: ``X_L`` and ``X_0`` ``(..., n, d)`` (tokens on ``token_dim``; use ``token_dim=-1`` for
    vectors ``(..., n)``). The Frobenius norm is over the last two dimensions for matrices and the last
    one for vectors (``token_dim=-1``). Returns ``(...)``.

    Raises
    ------
    ValueError
        For mismatched shapes or an ``X_0`` with zero detail.
    """
    if not isinstance(X_L, Tensor) or not isinstance(X_0, Tensor):
        raise ValueError("`X_L` and `X_0` must be torch.Tensors")
    if X_L.shape[-2 if X_L.dim() >= 2 else -1:] != X_0.shape[-2 if X_0.dim() >= 2 else -1:]:
        raise ValueError(f"`X_L` {tuple(X_L.shape)} and `X_0` {tuple(X_0.shape)} must have matching trailing shapes")
    dims = (-1,) if token_dim == -1 or X_L.dim() == 1 else (-2, -1)
    num = detail(X_L, token_dim).norm(dim=dims)
    den = detail(X_0, token_dim).norm(dim=dims)
    if bool((den == 0).any()):
        raise ValueError("`X_0` has no detail (P X_0 = 0); the ratio is undefined")
    return num / den


class DepthProfile:
    """σ₂ along a stack of layers ``M_1, …, M_L`` (see :func:`depth_profile`).

    Attributes (shapes ``(..., L)``; entry ``l-1`` refers to the first ``l`` layers):

    * ``sigma2``: ``σ₂(M_l)`` of each layer;
    * ``bound``: ``∏_{k≤l} σ₂(M_k)``, the upper bound given by submultiplicativity of σ₂ on ``1^⊥``;
    * ``product``: ``σ₂(M_l ⋯ M_1)``, measured on the product formed in the input's dtype.
    """

    def __init__(self, sigma2: Tensor, bound: Tensor, product: Tensor):
        self.sigma2, self.bound, self.product = sigma2, bound, product

    def __repr__(self) -> str:
        return f"DepthProfile(L={self.sigma2.shape[-1]}, batch={tuple(self.sigma2.shape[:-1])})"


def cumulative_products(Ms: Tensor) -> Tensor:
    """``M_l ⋯ M_1`` for ``l = 1..L``. Shapes: ``Ms (..., L, n, n)`` -> ``(..., L, n, n)``."""
    _check_square("Ms", Ms)
    if Ms.dim() < 3:
        raise ValueError(f"`Ms` must have shape (..., L, n, n); got {tuple(Ms.shape)}")
    out = [Ms[..., 0, :, :]]
    for l in range(1, Ms.shape[-3]):
        out.append(Ms[..., l, :, :] @ out[-1])
    return torch.stack(out, dim=-3)


def depth_profile(Ms: Tensor, method: Method = "auto") -> DepthProfile:
    """Per-layer σ₂, the product bound ``∏σ₂`` and the measured ``σ₂(M_l⋯M_1)``.

    Shapes: ``Ms (..., L, n, n)``; every attribute of the result is ``(..., L)``.
    For DSMs ``product <= bound`` up to round-off (σ₂ of a product is at most the product of
    the σ₂, see :func:`matmul_floor`).
    """
    prods = cumulative_products(Ms)
    s = sigma2(Ms, method)
    return DepthProfile(sigma2=s, bound=torch.cumprod(s, dim=-1), product=sigma2(prods, method))


def propagate(Ms: Tensor, X0: Tensor) -> Tensor:
    """``X_l = M_l X_{l-1}`` for ``l = 0..L``. Shapes: ``Ms (..., L, n, n)``, ``X0 (..., n, d)`` ->
    ``(..., L+1, n, d)`` (entry 0 is ``X0``)."""
    _check_square("Ms", Ms)
    if not isinstance(X0, Tensor) or X0.dim() < 2 or X0.shape[-2] != Ms.shape[-1]:
        raise ValueError(f"`X0` must have shape (..., n, d) with n = {Ms.shape[-1]}; got "
                         f"{tuple(X0.shape) if isinstance(X0, Tensor) else type(X0)}")
    xs = [X0]
    for l in range(Ms.shape[-3]):
        xs.append(Ms[..., l, :, :] @ xs[-1])
    return torch.stack(xs, dim=-3)


def matmul_floor(n: int, L: int, dtype: torch.dtype) -> float:
    """Round-off allowance for ``σ₂`` of a computed product of ``L`` DSMs of size ``n``.

    For nonnegative matrices the computed product obeys ``|fl(AB) - AB| <= γ_n A B`` entrywise
    (Higham, Thm 3.5), hence ``‖fl(AB) - AB‖₂ <= γ_n ‖AB‖₂ <= γ_n`` for DSMs, with
    ``γ_n = n u / (1 - n u)`` and ``u`` the unit round-off. Over ``L - 1`` products, plus the
    ``O(n u)`` error of forming ``P M P``, the computed ``σ₂`` can exceed the exact one by at most about
    ``(L + 1) γ_n``; that is the value returned. Below it, a measured σ₂ is round-off, not signal.
    """
    if int(n) != n or n < 1:
        raise ValueError(f"`n` must be a positive integer; got {n!r}")
    if int(L) != L or L < 1:
        raise ValueError(f"`L` must be a positive integer; got {L!r}")
    if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise ValueError(f"`dtype` must be a floating dtype; got {dtype}")
    u = torch.finfo(dtype).eps / 2
    nu = n * u
    if nu >= 1:
        return math.inf
    return (L + 1) * nu / (1 - nu)


# ----------------------------------------------------------------------------------------------
# effective depth


def _check_delta(delta: float) -> float:
    try:
        d = float(delta)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"`delta` must be a number in (0, 1); got {delta!r}") from exc
    if not (0 < d < 1):
        raise ValueError(f"`delta` must be in (0, 1); got {delta!r}")
    return d


def first_below(values: Tensor, delta: float) -> Tensor:
    """``min{L : values[..., L-1] <= δ}`` (1-based), ``inf`` where never reached. ``(..., L) -> (...)``.

    Use it on a measured, already cumulative sequence (e.g. detail ratios over depth).
    """
    d = _check_delta(delta)
    if not isinstance(values, Tensor) or values.dim() < 1 or values.shape[-1] == 0:
        raise ValueError("`values` must be a non-empty tensor of shape (..., L)")
    v = values if values.dtype.is_floating_point else values.double()
    hit = v <= d
    Ls = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    big = torch.full_like(v, math.inf)
    return torch.where(hit, Ls.expand_as(v), big).amin(dim=-1)


def effective_depth(sigma2s: Tensor, delta: float) -> Tensor:
    """``L_eff(δ) = min{L : ∏_{l≤L} σ₂(M_l) <= δ}``, ``inf`` if the given layers never reach δ.

    Shapes: ``sigma2s (..., L)`` per-layer σ₂ values -> ``(...)`` (float, integral or ``inf``).

    Raises
    ------
    ValueError
        For ``δ`` outside ``(0, 1)`` or negative σ₂ values.
    """
    if not isinstance(sigma2s, Tensor):
        sigma2s = torch.as_tensor(sigma2s, dtype=torch.float64)
    if sigma2s.dim() < 1 or sigma2s.shape[-1] == 0:
        raise ValueError("`sigma2s` must have shape (..., L) with L >= 1")
    if bool((sigma2s < 0).any()) or not bool(torch.isfinite(sigma2s).all()):
        raise ValueError("`sigma2s` must be finite and nonnegative")
    return first_below(torch.cumprod(sigma2s.double() if not sigma2s.dtype.is_floating_point else sigma2s, -1), delta)


def effective_depth_constant(sigma2_value: Union[float, Tensor], delta: float) -> Tensor:
    """Closed form for a constant per-layer σ̄₂: ``⌈log(1/δ) / log(1/σ̄₂)⌉`` (``inf`` if σ̄₂ >= 1,
    ``1`` if σ̄₂ = 0). Elementwise over a tensor of σ̄₂ values."""
    d = _check_delta(delta)
    s = torch.as_tensor(sigma2_value, dtype=torch.float64) if not isinstance(sigma2_value, Tensor) else sigma2_value
    if bool((s < 0).any()):
        raise ValueError("`sigma2_value` must be nonnegative")
    s = s.double() if not s.dtype.is_floating_point else s
    with torch.no_grad():
        raw = math.log(1 / d) / torch.log(1 / s.clamp_min(torch.finfo(s.dtype).tiny))
        # guard exact powers against round-off in the ratio of logarithms
        out = torch.ceil(raw - 1e-9 * raw.abs())
    out = torch.where(s >= 1, torch.full_like(s, math.inf), out)
    return torch.where(s == 0, torch.ones_like(s), out.clamp_min(1))


def effective_depth_law(tau: Union[float, Tensor], n: int, delta: float) -> Tensor:
    """The high-temperature prediction ``L_eff(δ) ≈ log(1/δ) / log(τ√n/2)`` (product bound with the
    Gaussian first-order law), for iid
    N(0, 1) logits; ``inf`` where ``τ√n/2 <= 1`` (outside the first-order regime). Not rounded."""
    d = _check_delta(delta)
    if int(n) != n or n < 2:
        raise ValueError(f"`n` must be an integer >= 2; got {n!r}")
    t = torch.as_tensor(tau, dtype=torch.float64)
    if bool((t <= 0).any()):
        raise ValueError("`tau` must be positive")
    x = t * math.sqrt(n) / 2
    return torch.where(x > 1, math.log(1 / d) / torch.log(x.clamp_min(1 + 1e-300)), torch.full_like(x, math.inf))


# ----------------------------------------------------------------------------------------------
# entropy and the first-order (high-temperature) law


def dsm_entropy(M: Tensor, normalized: bool = False) -> Tensor:
    """``H(M) = -Σ_ij M_ij log M_ij`` (with ``0 log 0 = 0``), optionally divided by ``n log n``.

    For a DSM ``0 <= H(M) <= n log n``: 0 exactly at permutations, ``n log n`` exactly at ``J``.
    Shapes: ``(..., n, n)`` -> ``(...)``.

    Raises
    ------
    ValueError
        For negative entries, a non-square input, or ``normalized=True`` with ``n = 1``.
    """
    _check_square("M", M)
    if bool((M < 0).any()):
        raise ValueError("`M` has negative entries; the entropy needs a nonnegative matrix")
    from .birkhoff import entropy

    n = M.shape[-1]
    H = entropy(M)
    if normalized:
        if n == 1:
            raise ValueError("`normalized=True` needs n >= 2 (n log n = 0 for n = 1)")
        H = H / (n * math.log(n))
    return H


def first_order_dsm(logits: Tensor, tau: float) -> Tensor:
    """The first-order expansion ``J + P S P / (n τ)`` of ``Sinkhorn(exp(S/τ))`` as ``τ → ∞``.

    Shapes: ``logits (..., n, n)`` -> ``(..., n, n)``. The error is ``O(τ⁻²)``.
    """
    _check_square("logits", logits)
    t = _check_tau(tau)
    n = logits.shape[-1]
    return torch.full_like(logits, 1.0 / n) + double_center(logits) / (n * t)


def _check_tau(tau) -> float:
    return positive_finite("tau", tau)


def first_order_sigma2(logits: Tensor, tau: Union[float, Tensor]) -> Tensor:
    """``‖P S P‖₂ / (n τ)``: the leading term of ``σ₂(Sinkhorn(exp(S/τ)))`` as ``τ → ∞``.

    Shapes: ``logits (..., n, n)``; ``tau`` a float or a tensor broadcasting with ``(...)``.
    """
    _check_square("logits", logits)
    t = torch.as_tensor(tau, dtype=logits.dtype, device=logits.device)
    if bool((t <= 0).any()):
        raise ValueError("`tau` must be positive")
    n = logits.shape[-1]
    return torch.linalg.matrix_norm(double_center(logits), ord=2) / (n * t)


def gaussian_sigma2_law(n: int, tau: Union[float, Tensor]) -> Tensor:
    """``2 / (τ √n)``: the first-order σ₂ for iid N(0, 1) logits, from ``‖PSP‖₂ ≈ 2√n``.

    ``‖PSP‖₂ ≈ 2√n`` is the edge of the semicircle/quarter-circle law for an ``n × n`` Gaussian matrix
    (largest singular value ``≈ 2√n``), so it holds for large ``n`` only.
    """
    if int(n) != n or n < 2:
        raise ValueError(f"`n` must be an integer >= 2; got {n!r}")
    t = torch.as_tensor(tau, dtype=torch.float64)
    if bool((t <= 0).any()):
        raise ValueError("`tau` must be positive")
    return 2.0 / (t * math.sqrt(n))


# ----------------------------------------------------------------------------------------------
# positivity bounds


def positivity_bound(M: Tensor) -> Tensor:
    """``1 - n · min_ij M_ij``, an upper bound on σ₂ of a DSM. ``(..., n, n)`` -> ``(...)``."""
    _check_square("M", M)
    n = M.shape[-1]
    return 1 - n * M.amin((-2, -1))


def oscillation(C: Tensor) -> Tensor:
    """``osc(C) = max C - min C`` over the last two dimensions. ``(..., n, m)`` -> ``(...)``."""
    if not isinstance(C, Tensor) or C.dim() < 2:
        raise ValueError("`C` must be a tensor of shape (..., n, m)")
    return C.amax((-2, -1)) - C.amin((-2, -1))


def entropic_positivity_bound(C: Tensor, eps: Union[float, Tensor]) -> Tensor:
    """``1 - exp(-2 osc(C)/ε)``, an upper bound on ``σ₂(M_ε)`` of the entropic plan with cost ``C``
    and unit marginals. For logits use ``C = -S`` (same oscillation). ``(..., n, n)`` -> ``(...)``."""
    _check_square("C", C)
    e = torch.as_tensor(eps, dtype=C.dtype, device=C.device)
    if bool((e <= 0).any()):
        raise ValueError("`eps` must be positive")
    return -torch.expm1(-2 * oscillation(C) / e)


def birkhoff_contraction(C: Tensor, eps: Union[float, Tensor]) -> Tensor:
    """Birkhoff's contraction coefficient ``κ = tanh(Δ/4)`` of ``K = exp(-C/ε)`` in Hilbert's metric,

    with ``Δ = max_{i,k,j,l} (C_il + C_kj - C_ij - C_kl) / ε`` (the projective diameter of ``K``).
    One full Sinkhorn iteration contracts Hilbert's metric by at least ``κ²`` (Franklin & Lorenz 1989).
    ``κ <= tanh(osc(C)/(2ε))``. Cost ``O(n³)`` time and memory ``O(n²)`` per batch element.
    Shapes: ``C (..., n, m)`` -> ``(...)``.
    """
    if not isinstance(C, Tensor) or C.dim() < 2:
        raise ValueError("`C` must be a tensor of shape (..., n, m)")
    e = torch.as_tensor(eps, dtype=C.dtype, device=C.device)
    if bool((e <= 0).any()):
        raise ValueError("`eps` must be positive")
    n = C.shape[-2]
    delta = torch.zeros(C.shape[:-2], dtype=C.dtype, device=C.device)
    for k in range(n):  # D_i(j) = C_ij - C_kj ; Δ = max_i [max_j(-D) ... ] loop keeps memory O(n m)
        D = C - C[..., k : k + 1, :]  # (..., n, m)
        delta = torch.maximum(delta, (D.amax(-1) - D.amin(-1)).amax(-1))
    return torch.tanh(delta / (4 * e))


# ----------------------------------------------------------------------------------------------
# frequency content


def circle_cost(n: int, *, dtype: torch.dtype = torch.float64, device: Union[str, torch.device] = "cpu") -> Tensor:
    """Translation-invariant grid cost on a circle: ``C_ij = (d(i, j)/n)²`` with the circular distance
    ``d(i, j) = min(|i - j|, n - |i - j|)``. Circulant and symmetric, shape ``(n, n)``."""
    if int(n) != n or n < 1:
        raise ValueError(f"`n` must be a positive integer; got {n!r}")
    i = torch.arange(int(n), device=device)
    d = (i[:, None] - i[None, :]).abs()
    d = torch.minimum(d, int(n) - d)
    return (d.to(dtype) / n) ** 2


def dominant_frequency(v: Tensor) -> Tensor:
    """Dominant DFT frequency ``|k| ∈ {0, …, ⌊n/2⌋}`` of real vectors: the ``k`` maximising the energy
    ``|v̂_k|² + |v̂_{n-k}|²`` (frequencies ``±k`` folded). Shapes: ``v (..., n)`` -> ``(...)`` int64."""
    if not isinstance(v, Tensor) or v.dim() < 1 or v.shape[-1] == 0:
        raise ValueError("`v` must be a non-empty tensor of shape (..., n)")
    if v.is_complex():
        raise ValueError("`v` must be real")
    return torch.fft.rfft(v.to(torch.float64) if not v.dtype.is_floating_point else v, dim=-1).abs().argmax(-1)


def frequency_energy(v: Tensor) -> Tensor:
    """Share of the energy of ``v`` at each folded frequency ``0..⌊n/2⌋`` (sums to 1). ``(..., n) -> (..., ⌊n/2⌋+1)``."""
    if not isinstance(v, Tensor) or v.dim() < 1 or v.shape[-1] == 0:
        raise ValueError("`v` must be a non-empty tensor of shape (..., n)")
    n = v.shape[-1]
    p = torch.fft.rfft(v, dim=-1).abs() ** 2
    # rfft holds k = 0..n//2 once; the mirrored bins k and n-k (0 < k < n/2) carry the same energy
    w = torch.full((p.shape[-1],), 2.0, dtype=p.dtype, device=p.device)
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    e = p * w
    return e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)


class FrequencyEig:
    """Eigen-decomposition of a symmetric matrix ordered by frequency (see :func:`eig_by_frequency`).

    ``eigenvalues (..., n)``, ``eigenvectors (..., n, n)`` (columns), ``frequencies (..., n)`` int64;
    sorted by frequency, ties by decreasing eigenvalue.
    """

    def __init__(self, eigenvalues: Tensor, eigenvectors: Tensor, frequencies: Tensor):
        self.eigenvalues, self.eigenvectors, self.frequencies = eigenvalues, eigenvectors, frequencies

    def __repr__(self) -> str:
        return f"FrequencyEig(n={self.eigenvalues.shape[-1]}, batch={tuple(self.eigenvalues.shape[:-1])})"


def eig_by_frequency(M: Tensor, sym_tol: Optional[float] = None) -> FrequencyEig:
    """Eigenpairs of a symmetric ``M (..., n, n)`` sorted by the dominant frequency of each eigenvector.

    For a symmetric circulant (e.g. the entropic plan of :func:`circle_cost`) every eigenspace is
    spanned by ``cos`` and ``sin`` of one frequency, so the frequencies are exact.

    Raises
    ------
    ValueError
        If ``M`` is not symmetric to ``sym_tol`` relative to ``max|M|`` (default ``√eps`` of the dtype,
        loose enough for a Sinkhorn solve of symmetric logits to a tight tolerance). ``M`` is
        symmetrised before the decomposition.
    """
    _check_square("M", M)
    tol = math.sqrt(torch.finfo(M.dtype).eps) if sym_tol is None else float(sym_tol)
    scale = M.abs().amax((-2, -1), keepdim=True).clamp_min(torch.finfo(M.dtype).tiny)
    if bool(((M - M.transpose(-1, -2)).abs() > tol * scale).any()):
        raise ValueError("`M` must be symmetric; use the SVD for non-symmetric matrices")
    w, V = torch.linalg.eigh((M + M.transpose(-1, -2)) / 2)
    w, V = w.flip(-1), V.flip(-1)  # decreasing eigenvalues
    f = dominant_frequency(V.transpose(-1, -2))  # (..., n)
    order = torch.argsort(f, dim=-1, stable=True)
    w = torch.gather(w, -1, order)
    f = torch.gather(f, -1, order)
    V = torch.gather(V, -1, order[..., None, :].expand_as(V))
    return FrequencyEig(w, V, f)


def rank_correlation(x: Tensor, y: Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (average ranks for ties), via SciPy."""
    from scipy.stats import spearmanr

    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.dim() != 1 or x.shape != y.shape:
        raise ValueError("`x` and `y` must be 1-D tensors of equal length")
    if x.shape[0] < 3:
        raise ValueError("need at least 3 points for a rank correlation")
    return float(spearmanr(x.detach().cpu().numpy(), y.detach().cpu().numpy()).statistic)


# ----------------------------------------------------------------------------------------------
# the Jacobian of the Sinkhorn projection with respect to the logits


def _jac_factor(M: Tensor):
    n = M.shape[-1]
    r, c = M.sum(-1), M.sum(-2)
    G = torch.cat([torch.cat([torch.diag_embed(r), M], -1),
                   torch.cat([M.transpose(-1, -2), torch.diag_embed(c)], -1)], -2)
    z = torch.cat([torch.ones(n, dtype=M.dtype, device=M.device), -torch.ones(n, dtype=M.dtype, device=M.device)])
    G = G + z[:, None] * z[None, :] / (2 * n)  # kernel (1, -1) lifted; rhs is ⊥ z
    return torch.linalg.cholesky(G)


def dsm_jacobian_matvec(M: Tensor, tau: float) -> Callable[[Tensor], Tensor]:
    """``dS ↦ dM``, the derivative of ``M = Sinkhorn(exp(S/τ))`` at the DSM ``M`` (batched).

    ``dM = (1/τ) M ⊙ (dS - a1ᵀ - 1bᵀ)`` with ``(a, b)`` chosen so that ``dM`` has zero row and column
    sums. As a map on ``ℝ^{n×n}`` it is symmetric positive semi-definite:
    ``(1/τ) D^{1/2} Π D^{1/2}`` with ``D = diag(vec M)`` and ``Π`` an orthogonal projection, so its norm
    is at most ``max_ij M_ij / τ``. Input and output ``(..., n, n)`` with the batch shape of ``M``.
    """
    _check_square("M", M)
    t = _check_tau(tau)
    L = _jac_factor(M)
    n = M.shape[-1]

    def mv(X: Tensor) -> Tensor:
        if X.shape[-2:] != M.shape[-2:]:
            raise ValueError(f"`X` must have trailing shape {tuple(M.shape[-2:])}; got {tuple(X.shape)}")
        Y = M * X
        rhs = torch.cat([Y.sum(-1), Y.sum(-2)], -1)[..., None]
        ab = torch.cholesky_solve(rhs, L)[..., 0]
        a, b = ab[..., :n], ab[..., n:]
        return M * (X - a[..., :, None] - b[..., None, :]) / t

    return mv


def dsm_jacobian(M: Tensor, tau: float) -> Tensor:
    """Dense Jacobian ``∂ vec(M) / ∂ vec(S)`` of the Sinkhorn projection, ``(..., n², n²)`` (row-major vec).

    Symmetric PSD, null space of dimension ``2n - 1`` (row- and column-constant logits). Memory
    ``O(n⁴)``: use :func:`dsm_jacobian_norm` for large ``n``.
    """
    _check_square("M", M)
    n = M.shape[-1]
    if n > 64:
        raise ValueError(f"`M` is too large for a dense Jacobian (n = {n} > 64); use dsm_jacobian_norm")
    mv = dsm_jacobian_matvec(M, tau)
    batch = tuple(M.shape[:-2])
    E = torch.eye(n * n, dtype=M.dtype, device=M.device).reshape((n * n,) + (1,) * len(batch) + (n, n))
    cols = mv(E.expand((n * n,) + batch + (n, n)))  # (n², ..., n, n): column k is J e_k
    Jm = cols.reshape((n * n,) + batch + (n * n,))
    return Jm.movedim(0, -1)  # (..., n², n²); column k = J e_k


def dsm_jacobian_norm(M: Tensor, tau: float, method: Literal["auto", "exact", "lanczos"] = "auto",
                      tol: float = 1e-10) -> Tensor:
    """Spectral norm of the Sinkhorn Jacobian ``∂M/∂S`` (operator ``ℝ^{n×n} → ℝ^{n×n}``, Frobenius).

    ``"exact"``: eigenvalues of the dense Jacobian (``n <= 32``); ``"lanczos"``: matrix-free Lanczos with
    :func:`dsm_jacobian_matvec`; ``"auto"``: exact for ``n <= 16``. Shapes ``(..., n, n)`` -> ``(...)``.
    """
    _check_square("M", M)
    n = M.shape[-1]
    if method not in ("auto", "exact", "lanczos"):
        raise ValueError(f"`method` must be 'auto', 'exact' or 'lanczos'; got {method!r}")
    if method == "auto":
        method = "exact" if n <= 16 else "lanczos"
    if method == "exact":
        if n > 32:
            raise ValueError(f"method='exact' needs n <= 32; got n = {n}")
        return torch.linalg.eigvalsh(dsm_jacobian(M, tau))[..., -1].clamp_min(0)
    mv = dsm_jacobian_matvec(M, tau)
    batch = M.shape[:-2]

    def flat(x: Tensor) -> Tensor:
        return mv(x.reshape(x.shape[:-1] + (n, n))).reshape(x.shape)

    # The all-ones logit matrix lies in the null space, so the centring done by sigma2_operator
    # (projection onto 1^⊥ in ℝ^{n²}) does not change the norm.
    return sigma2_operator(flat, flat, n * n, batch_shape=batch, dtype=M.dtype, device=M.device,
                           method="lanczos", tol=tol, max_iter=min(n * n, 300))
