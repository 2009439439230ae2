"""Signal, noise and orthogonal collapse in the detail subspace :math:`\\mathbf 1^\\perp`.

A doubly-stochastic mixing ``M`` fixes the mean ("DC") part ``Jx`` of a signal and contracts its
detail part ``Px`` (``P = I - 11ᵀ/n``) by at most ``σ₂(M)`` per layer. Once the detail is comparable
with injected or round-off noise, the direction of the noisy detail says almost nothing about the
signal. This module measures that:

* :func:`detail` -- ``P x`` along any axis; :func:`detail_cosine` -- the cosine between the detail
  parts of two signals (batched); :func:`detail_direction_error` -- the distance between their unit
  directions (cancellation-free); :func:`token_spread` -- ``‖P X‖_F / ‖X‖_F`` over the token axis.
* :func:`snr` -- ``SNR = ‖P s‖² / (η² (n-1))``, signal energy per noise dimension of ``1^⊥``.
* :func:`cosine_bound` -- the finite-n concentration bound on ``|cos∠(P y, s)|``, with its
  confidence ``1 - 3 e^{-x}`` and a flag telling where it is informative;
  :func:`bound_informative_snr_max` and :func:`min_informative_n` -- where that is.
* :func:`cosine_asymptotic` -- ``√(SNR/(1+SNR))``; :func:`noise_floor` -- ``E|cos|`` at ``SNR = 0``
  (exact sphere moment or its ``√(2/(πk))`` asymptote); :func:`critical_snr` -- the SNR at which the
  asymptotic cosine meets the floor (``≈ 2/(πk)``, i.e. ``~ 1/n``); :func:`cosine_mean_approx` -- a
  uniform approximation of ``E|cos|`` through the folded normal.
* :func:`sample_cosine` -- exact Monte-Carlo draws of ``cos∠(P y, s)`` from its two-variable
  representation (a Gaussian and a χ²), for large trial counts at any ``n``.
* :func:`layernorm` with :func:`layernorm_tokens` (reading 1: over the mixed axis) and
  :func:`layernorm_features` (reading 2: per token over features).

Conventions: ``k = n - 1`` is the dimension of ``1^⊥``. Functions taking ``snr``/``k``/``x`` accept
Python numbers or tensors and broadcast; they return tensors (float64 unless a tensor argument sets
the dtype).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CosineBound",
    "detail",
    "detail_cosine",
    "detail_direction_error",
    "token_spread",
    "snr",
    "cosine_bound",
    "bound_informative_snr_max",
    "min_informative_n",
    "cosine_asymptotic",
    "noise_floor",
    "critical_snr",
    "cosine_mean_approx",
    "sample_cosine",
    "layernorm",
    "layernorm_tokens",
    "layernorm_features",
]

Num = Union[float, int, Sequence[float], Tensor]


def _t(x: Num, name: str, like: Optional[Tensor] = None) -> Tensor:
    """A float tensor from a number or tensor (float64 unless ``x``/``like`` says otherwise)."""
    if isinstance(x, Tensor):
        if not x.dtype.is_floating_point:
            x = x.to(torch.float64)
        return x
    kw = dict(dtype=like.dtype, device=like.device) if like is not None else dict(dtype=torch.float64)
    try:
        return torch.as_tensor(x, **kw)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"`{name}` must be a number, a sequence of numbers or a tensor; got {x!r}") from exc


def _check_tensor(name: str, x: Tensor, min_dim: int = 1) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor")
    if x.dim() < min_dim:
        raise ValueError(f"`{name}` must have at least {min_dim} dimension(s); got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"`{name}` must be a floating-point tensor; got {x.dtype}")


# ----------------------------------------------------------------------------------------------
# detail subspace


def detail(x: Tensor, dim: int = -1) -> Tensor:
    """``P x`` along ``dim`` (subtract the mean over that axis). Shape preserved."""
    _check_tensor("x", x)
    return x - x.mean(dim=dim, keepdim=True)


def detail_cosine(x: Tensor, y: Tensor, dim: int = -1) -> Tensor:
    """Cosine between the detail parts ``P x`` and ``P y`` along ``dim``, batched over the rest.

    Shapes: ``x`` and ``y`` broadcast, e.g. ``(..., n)`` and ``(..., n)`` -> ``(...)``. Where either
    detail part is exactly zero the cosine is undefined and NaN is returned.
    """
    _check_tensor("x", x)
    _check_tensor("y", y)
    px, py = detail(x, dim), detail(y, dim)
    num = (px * py).sum(dim)
    den = torch.linalg.vector_norm(px, dim=dim) * torch.linalg.vector_norm(py, dim=dim)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)),
                       torch.full_like(num, float("nan")))


def detail_direction_error(x: Tensor, y: Tensor, dim: int = -1) -> Tensor:
    """``‖Px/‖Px‖ - Py/‖Py‖‖`` along ``dim`` (``= 2 sin(θ/2)`` for the angle ``θ`` between them).

    Unlike ``√(1 - cos²)`` it does not lose half the digits to cancellation when the directions
    agree, so it resolves errors down to the unit round-off. Shapes as :func:`detail_cosine`.
    """
    _check_tensor("x", x)
    _check_tensor("y", y)
    px, py = detail(x, dim), detail(y, dim)
    ux = px / torch.linalg.vector_norm(px, dim=dim, keepdim=True)
    uy = py / torch.linalg.vector_norm(py, dim=dim, keepdim=True)
    return torch.linalg.vector_norm(ux - uy, dim=dim)


def token_spread(X: Tensor, token_dim: int = -2) -> Tensor:
    """``‖P X‖_F / ‖X‖_F`` with ``P`` acting on the token axis: how distinguishable the tokens are.

    Shapes: ``X (..., n, d)`` with tokens on ``token_dim`` (default ``-2``) -> ``(...)``. It is 0 when
    every token carries the same feature vector and 1 when the token mean is zero.
    """
    _check_tensor("X", X, 2)
    td = token_dim % X.dim()
    feat = [i for i in range(X.dim()) if i >= X.dim() - 2 and i != td]
    dims = (td,) + tuple(feat)
    num = torch.linalg.vector_norm(detail(X, td), dim=dims)
    den = torch.linalg.vector_norm(X, dim=dims)
    return num / den


def snr(s: Tensor, eta: Num, dim: int = -1) -> Tensor:
    """Signal-to-noise ratio in the detail subspace: ``‖P s‖² / (η² (n - 1))``.

    ``n`` is the size of ``dim``; noise ``ξ ~ N(0, η² I_n)`` has energy ``η²(n-1)`` in ``1^⊥``, so
    ``SNR = 1`` means the detail signal carries as much energy as the noise there.

    Shapes: ``s (..., n)`` -> ``(...)``.
    """
    _check_tensor("s", s)
    n = s.shape[dim]
    if n < 2:
        raise ValueError(f"`s` needs at least 2 entries along dim {dim}; got {n}")
    eta_t = _t(eta, "eta", s)
    if bool((eta_t <= 0).any()):
        raise ValueError(f"`eta` must be positive; got {eta!r}")
    e = torch.linalg.vector_norm(detail(s, dim), dim=dim) ** 2
    return e / (eta_t**2 * (n - 1))


# ----------------------------------------------------------------------------------------------
# the finite-n bound on the cosine


@dataclass
class CosineBound:
    """The finite-n cosine bound evaluated on a grid (all tensors broadcast to one shape).

    Attributes
    ----------
    bound : Tensor
        Upper bound on ``|cos∠(P y, s)|``; ``+inf`` where the radicand is not positive (vacuous).
    radicand : Tensor
        ``SNR - 2√SNR √(2x/k) + 1 - 2√(x/k)``, the squared lower bound on ``‖P y‖/(η√k)``.
    confidence : Tensor
        ``1 - 3 e^{-x}``: the probability with which the bound holds (``<= 0`` means no guarantee).
    informative : Tensor of bool
        ``confidence > 0`` and ``bound < 1``: only then does the bound say anything about a cosine.
    """

    bound: Tensor
    radicand: Tensor
    confidence: Tensor
    informative: Tensor


def cosine_bound(snr: Num, k: Num, x: Num) -> CosineBound:
    """Finite-n bound on the cosine: with probability ``>= 1 - 3 e^{-x}``,

    ``|cos∠(P y, s)| <= (√SNR + √(2x/k)) / √(SNR - 2√SNR √(2x/k) + 1 - 2√(x/k))``

    for ``s ∈ 1^⊥``, ``y = s + ξ``, ``ξ ~ N(0, η² I_n)``, ``k = n - 1``, ``SNR = ‖s‖²/(η² k)``.
    Proof: a Gaussian tail for ``⟨Pξ, s/‖s‖⟩`` (probability ``2e^{-x}``) and the Laurent-Massart lower
    tail of ``‖Pξ‖²/η² ~ χ²_k`` (probability ``e^{-x}``), union bound.

    Parameters broadcast (numbers or tensors). ``snr >= 0``, ``k >= 1``, ``x > 0``.
    Returns a :class:`CosineBound`; ``bound`` is ``+inf`` where the radicand is ``<= 0``.
    """
    s, kk, xx = _t(snr, "snr"), _t(k, "k"), _t(x, "x")
    s, kk, xx = torch.broadcast_tensors(s, kk, xx)
    if bool((s < 0).any()):
        raise ValueError("`snr` must be nonnegative")
    if bool((kk < 1).any()):
        raise ValueError("`k` (= n - 1) must be >= 1")
    if bool((xx <= 0).any()):
        raise ValueError("`x` must be positive")
    b = torch.sqrt(2 * xx / kk)
    rs = torch.sqrt(s)
    rad = s - 2 * rs * b + 1 - 2 * torch.sqrt(xx / kk)
    pos = rad > 0
    bound = torch.where(pos, (rs + b) / torch.sqrt(torch.where(pos, rad, torch.ones_like(rad))),
                        torch.full_like(rad, math.inf))
    conf = 1 - 3 * torch.exp(-xx)
    return CosineBound(bound=bound, radicand=rad, confidence=conf, informative=(conf > 0) & (bound < 1))


def bound_informative_snr_max(k: Num, x: Num) -> Tensor:
    """Largest SNR at which the finite-n cosine bound is below 1 (informative), for given ``k`` and ``x``.

    ``bound < 1`` is equivalent to ``4√SNR·b + b² + c < 1`` with ``b = √(2x/k)``, ``c = 2√(x/k)``, so
    the bound is informative exactly for ``SNR < ((1 - b² - c)/(4b))²``; the result is ``-1`` (no SNR
    at all) when ``b² + c >= 1``. It does not take the confidence into account.
    """
    kk, xx = torch.broadcast_tensors(_t(k, "k"), _t(x, "x"))
    if bool((kk < 1).any()) or bool((xx <= 0).any()):
        raise ValueError("`k` must be >= 1 and `x` positive")
    b = torch.sqrt(2 * xx / kk)
    c = 2 * torch.sqrt(xx / kk)
    slack = 1 - b * b - c
    return torch.where(slack > 0, (slack / (4 * b)) ** 2, torch.full_like(slack, -1.0))


def min_informative_n(x: Num) -> Tensor:
    """Smallest ``n`` (integer) at which the finite-n cosine bound is informative at ``SNR = 0`` for this ``x``.

    From ``2x/k + 2√(x/k) < 1``: ``√(x/k) < (√3 - 1)/2``, i.e. ``k > x / ((√3-1)/2)² ≈ 7.46 x``.
    Combine with ``x > ln 3`` (positive confidence): no ``n <= 9`` is ever informative.
    """
    xx = _t(x, "x")
    if bool((xx <= 0).any()):
        raise ValueError("`x` must be positive")
    t = (math.sqrt(3.0) - 1.0) / 2.0
    kmin = torch.floor(xx / t**2) + 1  # smallest integer k with k > x / t²
    return kmin + 1


# ----------------------------------------------------------------------------------------------
# asymptotics, floor, threshold


def cosine_asymptotic(snr: Num) -> Tensor:
    """``√(SNR / (1 + SNR))``: the value ``cos∠(P y, s)`` concentrates at as ``k → ∞``."""
    s = _t(snr, "snr")
    if bool((s < 0).any()):
        raise ValueError("`snr` must be nonnegative")
    return torch.sqrt(s / (1 + s))


def noise_floor(k: Num, exact: bool = True) -> Tensor:
    """``E|cos|`` between a fixed direction and pure noise in ``1^⊥`` (``SNR = 0``), ``k = n - 1``.

    ``exact=True``: ``E|u₁|`` for ``u`` uniform on the sphere ``S^{k-1}``,
    ``Γ(k/2) / (√π Γ((k+1)/2))``. ``exact=False``: the asymptote ``√(2/(πk))``.
    """
    kk = _t(k, "k")
    if bool((kk < 1).any()):
        raise ValueError("`k` must be >= 1")
    if exact:
        return torch.exp(torch.lgamma(kk / 2) - torch.lgamma((kk + 1) / 2)) / math.sqrt(math.pi)
    return torch.sqrt(2 / (math.pi * kk))


def critical_snr(k: Num, factor: Num = 1.0, exact: bool = True) -> Tensor:
    """SNR at which the asymptotic cosine equals ``factor`` times the noise floor.

    Solves ``√(SNR/(1+SNR)) = f`` with ``f = factor · noise_floor(k)``: ``SNR* = f²/(1 - f²)``, which is
    ``≈ 2 factor² / (π k)`` for large ``k`` -- a threshold that scales like ``1/n``. NaN where ``f >= 1``.
    """
    fl = noise_floor(k, exact=exact) * _t(factor, "factor")
    return torch.where(fl < 1, fl**2 / (1 - fl**2), torch.full_like(fl, float("nan")))


def cosine_mean_approx(snr: Num, k: Num) -> Tensor:
    """Uniform approximation of ``E|cos∠(P y, s)|``: ``E|a + Z| / √(k (1 + SNR))``, ``a = √(k SNR)``.

    From ``cos = (a + Z)/√((a + Z)² + χ²_{k-1})`` with the denominator replaced by ``√(k(1+SNR))``.
    ``E|a + Z| = √(2/π) e^{-a²/2} + a (1 - 2Φ(-a))`` (folded normal). It tends to the noise-floor
    asymptote ``√(2/(πk))`` at ``SNR = 0`` and to ``√(SNR/(1+SNR))`` at fixed ``SNR`` as ``k → ∞``;
    for small SNR, ``√k · E|cos|`` depends on ``k·SNR`` alone (the crossover sits at ``k·SNR ~ 1``).
    """
    s, kk = torch.broadcast_tensors(_t(snr, "snr"), _t(k, "k"))
    if bool((s < 0).any()):
        raise ValueError("`snr` must be nonnegative")
    if bool((kk < 1).any()):
        raise ValueError("`k` must be >= 1")
    a = torch.sqrt(kk * s)
    folded = math.sqrt(2 / math.pi) * torch.exp(-a * a / 2) + a * torch.erf(a / math.sqrt(2))
    return folded / torch.sqrt(kk * (1 + s))


def sample_cosine(snr: Num, k: int, trials: int, generator: Optional[torch.Generator] = None,
                  dtype: torch.dtype = torch.float64) -> Tensor:
    """Exact draws of ``cos∠(P y, s)`` for ``y = s + ξ`` at a given ``SNR`` and ``k = n - 1``.

    In units of ``η`` and in a basis of ``1^⊥`` whose first vector is ``s/‖s‖``,
    ``P y = (a + Z, W)`` with ``a = √(k SNR)``, ``Z ~ N(0,1)`` and ``‖W‖² ~ χ²_{k-1}``, so
    ``cos = (a + Z)/√((a + Z)² + χ²_{k-1})``: two random numbers per trial whatever ``n``.

    ``Z`` comes from ``generator`` (CPU); the χ² draws from a NumPy generator seeded by one draw of
    ``generator``, so the result is a deterministic function of the generator's state.

    Shapes: ``snr`` a number or a tensor ``S`` -> ``(*S, trials)``.
    """
    if int(k) != k or k < 1:
        raise ValueError(f"`k` must be a positive integer; got {k!r}")
    if int(trials) != trials or trials < 1:
        raise ValueError(f"`trials` must be a positive integer; got {trials!r}")
    s = _t(snr, "snr").to(dtype)
    if bool((s < 0).any()):
        raise ValueError("`snr` must be nonnegative")
    shape = tuple(s.shape) + (int(trials),)
    z = torch.randn(shape, generator=generator, dtype=dtype)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    if k > 1:
        w = np.random.default_rng(seed).chisquare(int(k) - 1, size=shape)
        w = torch.as_tensor(w).to(dtype)
    else:
        w = torch.zeros(shape, dtype=dtype)
    a = torch.sqrt(s * k).to(dtype)[..., None]
    num = a + z
    return (num / torch.sqrt(num * num + w)).to(s.device)


# ----------------------------------------------------------------------------------------------
# LayerNorm


def layernorm(x: Tensor, dim: int = -1, eps: float = 0.0) -> Tensor:
    """LayerNorm with ``γ = 1``, ``β = 0`` and population variance along ``dim``:
    ``(x - mean x) / √(var x + eps)``. With ``eps = 0`` this is ``√n · P x / ‖P x‖``.

    Shape preserved; dtype and device follow ``x``. A constant slice with ``eps = 0`` gives NaN.
    """
    _check_tensor("x", x)
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"`eps` must be a nonnegative finite number; got {eps!r}")
    c = detail(x, dim)
    var = (c * c).mean(dim=dim, keepdim=True)
    return c / torch.sqrt(var + eps)


def layernorm_tokens(X: Tensor, eps: float = 0.0, token_dim: int = -2) -> Tensor:
    """Reading 1: LayerNorm over the *mixed* (token/stream) axis, per feature column.

    Shapes: ``X (..., n, d)`` -> same. For a vector ``y (n,)`` use :func:`layernorm` with ``dim=-1``.
    """
    _check_tensor("X", X, 2)
    return layernorm(X, dim=token_dim, eps=eps)


def layernorm_features(X: Tensor, eps: float = 0.0) -> Tensor:
    """Reading 2: the Transformer's LayerNorm, per token over the feature axis (last).

    Shapes: ``X (..., n, d)`` -> same.
    """
    _check_tensor("X", X, 2)
    return layernorm(X, dim=-1, eps=eps)
