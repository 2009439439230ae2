"""A small, configurable doubly-stochastic mixing stack, and the diagnostics Part II applies to it.

:class:`MixingStack` is one ``nn.Module`` used by several chapters. It holds ``L`` layers acting on
``X ∈ ℝ^{n×d}`` (``n`` tokens or streams, ``d`` features; batched over leading dims). Layer ``l``:

1. **mixing**: ``M_l = Sinkhorn(exp(S_l/τ))`` (``bs.project_dsm``) or, for the comparison with Softmax,
   ``M_l = rowsoftmax(S_l/τ)``, from random (seeded) or identity-like (mHC) logits ``S_l``, fixed
   buffers or learned ``nn.Parameter`` s;
2. **residual**: ``"convex"``: ``X ← H_l X`` with ``H_l = (1-α) I + α M_l`` (still a DSM; ``α = 1`` is
   plain mixing, ``α = 0`` the identity), or ``"branch"``: ``X ← X + α M_l X W_l``;
3. **noise**: ``X ← X + η Ξ`` with ``Ξ`` standard Gaussian (injected noise of std ``η``);
4. **LayerNorm** (optional, ``γ = 1, β = 0``): ``"tokens"`` over the mixed axis (the first reading of the LayerNorm claim) or
   ``"features"`` per token over features (reading 2, the Transformer's).

The forward pass returns every intermediate state, so detail ratios, cosines and token spreads can
be tracked layer by layer. Diagnostics: :func:`operator_products` (``H_l⋯H_1``),
:func:`scalar_identity_distance` (distance from ``c·I`` on ``1^⊥``), :func:`mixing_jacobian` (``∂M/∂S`` by autograd).

Dtype and device follow the input: the mixing matrices are computed from the logits cast to the
input's dtype and device, so the same model runs in float32 and float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Literal, Optional

import torch
from torch import Tensor, nn

from .sinkhorn import SinkhornResult, project_dsm

__all__ = [
    "MixingStackConfig",
    "StackOutput",
    "MixingStack",
    "operator_products",
    "scalar_identity_distance",
    "mixing_jacobian",
    "detail_basis",
]


@dataclass(frozen=True)
class MixingStackConfig:
    """Configuration of :class:`MixingStack`.

    Attributes
    ----------
    n, d, layers : int
        Tokens/streams (the mixed axis), features, and depth ``L``.
    tau : float
        Temperature of the projection, ``M = Sinkhorn(exp(S/τ))`` or ``rowsoftmax(S/τ)``.
    mixing : {"sinkhorn", "softmax"}
        Doubly-stochastic (Sinkhorn) or row-stochastic (Softmax) mixing of the same logits.
    logits : {"random", "identity"}
        ``"random"``: iid ``N(0, logit_scale²)``; ``"identity"``: the mHC initialisation, 0 on the
        diagonal and ``identity_offdiag`` elsewhere.
    logit_scale, identity_offdiag : float
        See ``logits``.
    shared_logits : bool
        One logit matrix for every layer (``M_l = M``) instead of independent ones.
    learn_logits : bool
        Logits are ``nn.Parameter`` s (else buffers).
    residual : {"convex", "branch"}
        ``X ← ((1-α)I + αM) X`` or ``X ← X + α M X W``.
    alpha : float
        Residual weight, in ``[0, 1]`` for ``"convex"``, ``>= 0`` for ``"branch"``.
    branch_gain : float
        ``W_l`` has iid ``N(0, branch_gain²/d)`` entries (``"branch"`` only).
    learn_branch : bool
        ``W_l`` are ``nn.Parameter`` s.
    layernorm : {"none", "tokens", "features"}
        LayerNorm at the end of each layer, over the mixed axis (reading 1) or over features.
    ln_eps : float
        The LayerNorm ``eps`` (population variance).
    noise_std : float
        ``η``, std of the Gaussian noise added after the residual update of each layer.
    n_iter : int, optional
        Fixed number of Sinkhorn iterations (mHC uses 20); ``None``: iterate to ``tol``.
    tol : float, optional
        Sinkhorn tolerance; ``None`` means ``1e-10`` in float64 and ``1e-5`` in float32.
    grad : {"implicit", "unroll", "none"}
        How gradients reach learned logits through Sinkhorn.
    seed : int
        Seed of the CPU generator that draws logits and branch weights when none is passed.
    """

    n: int
    d: int
    layers: int
    tau: float = 1.0
    mixing: Literal["sinkhorn", "softmax"] = "sinkhorn"
    logits: Literal["random", "identity"] = "random"
    logit_scale: float = 1.0
    identity_offdiag: float = -8.0
    shared_logits: bool = False
    learn_logits: bool = False
    residual: Literal["convex", "branch"] = "convex"
    alpha: float = 1.0
    branch_gain: float = 1.0
    learn_branch: bool = False
    layernorm: Literal["none", "tokens", "features"] = "none"
    ln_eps: float = 0.0
    noise_std: float = 0.0
    n_iter: Optional[int] = None
    tol: Optional[float] = None
    grad: Literal["implicit", "unroll", "none"] = "implicit"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n", "d", "layers"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {v!r}")
        if self.n < 2:
            raise ValueError(f"`n` must be >= 2; got {self.n}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"`tau` must be a positive finite number; got {self.tau!r}")
        if self.mixing not in ("sinkhorn", "softmax"):
            raise ValueError(f"`mixing` must be 'sinkhorn' or 'softmax'; got {self.mixing!r}")
        if self.logits not in ("random", "identity"):
            raise ValueError(f"`logits` must be 'random' or 'identity'; got {self.logits!r}")
        if self.residual not in ("convex", "branch"):
            raise ValueError(f"`residual` must be 'convex' or 'branch'; got {self.residual!r}")
        if self.residual == "convex" and not (0.0 <= self.alpha <= 1.0):
            raise ValueError(f"`alpha` must be in [0, 1] for residual='convex'; got {self.alpha!r}")
        if self.residual == "branch" and not (self.alpha >= 0 and math.isfinite(self.alpha)):
            raise ValueError(f"`alpha` must be a nonnegative number; got {self.alpha!r}")
        if self.layernorm not in ("none", "tokens", "features"):
            raise ValueError(f"`layernorm` must be 'none', 'tokens' or 'features'; got {self.layernorm!r}")
        if not (self.ln_eps >= 0):
            raise ValueError(f"`ln_eps` must be nonnegative; got {self.ln_eps!r}")
        if not (self.noise_std >= 0 and math.isfinite(self.noise_std)):
            raise ValueError(f"`noise_std` must be a nonnegative number; got {self.noise_std!r}")
        if self.n_iter is not None and (int(self.n_iter) != self.n_iter or self.n_iter < 1):
            raise ValueError(f"`n_iter` must be a positive integer or None; got {self.n_iter!r}")
        if self.grad not in ("implicit", "unroll", "none"):
            raise ValueError(f"`grad` must be 'implicit', 'unroll' or 'none'; got {self.grad!r}")


@dataclass
class StackOutput:
    """What :meth:`MixingStack.forward` returns.

    Attributes
    ----------
    states : Tensor ``(L+1, ..., n, d)``
        ``states[0]`` is the input, ``states[l]`` the output of layer ``l``.
    mixing : Tensor ``(L, n, n)``
        The mixing matrices ``M_l`` used (Sinkhorn or Softmax, before the residual).
    sinkhorn : SinkhornResult or None
        The batched Sinkhorn solve (marginal errors, convergence), ``None`` for Softmax.
    """

    states: Tensor
    mixing: Tensor
    sinkhorn: Optional[SinkhornResult]

    @property
    def output(self) -> Tensor:
        """``states[-1]``, shape ``(..., n, d)``."""
        return self.states[-1]


def _default_tol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


class MixingStack(nn.Module):
    """``L`` layers of doubly-stochastic (or Softmax) token mixing; see the module docstring.

    Parameters
    ----------
    config : MixingStackConfig
    generator : torch.Generator, optional
        CPU generator for the logits and branch weights (default: seeded with ``config.seed``).
    dtype : torch.dtype
        Dtype of the stored logits and weights (float64 by default).
    device : torch.device or str, optional
    """

    def __init__(self, config: MixingStackConfig, generator: Optional[torch.Generator] = None,
                 dtype: torch.dtype = torch.float64, device=None):
        super().__init__()
        if not isinstance(config, MixingStackConfig):
            raise ValueError("`config` must be a MixingStackConfig")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"`dtype` must be torch.float32 or torch.float64; got {dtype}")
        self.config = config
        g = generator if generator is not None else torch.Generator().manual_seed(int(config.seed))
        c = config
        nl = 1 if c.shared_logits else c.layers
        if c.logits == "random":
            S = c.logit_scale * torch.randn(nl, c.n, c.n, generator=g, dtype=torch.float64)
        else:
            S = torch.full((nl, c.n, c.n), float(c.identity_offdiag), dtype=torch.float64)
            S.diagonal(dim1=-2, dim2=-1).zero_()
        S = S.to(device=device, dtype=dtype)
        if c.learn_logits:
            self.logits = nn.Parameter(S)
        else:
            self.register_buffer("logits", S)
        if c.residual == "branch":
            W = c.branch_gain / math.sqrt(c.d) * torch.randn(c.layers, c.d, c.d, generator=g, dtype=torch.float64)
            W = W.to(device=device, dtype=dtype)
            if c.learn_branch:
                self.weight = nn.Parameter(W)
            else:
                self.register_buffer("weight", W)
        else:
            self.weight = None

    # ------------------------------------------------------------------------------------------
    def mixing_matrices(self, dtype: Optional[torch.dtype] = None, device=None):
        """The ``L`` mixing matrices ``M_l``, shape ``(L, n, n)``, and the Sinkhorn result (or None).

        Computed from the logits cast to ``dtype``/``device`` (default: the logits' own).
        """
        c = self.config
        S = self.logits.to(dtype=dtype or self.logits.dtype, device=device or self.logits.device)
        if c.mixing == "softmax":
            M = torch.softmax(S / c.tau, dim=-1)
            res = None
        else:
            tol = c.tol if c.tol is not None else _default_tol(S.dtype)
            kw = dict(tol=tol, grad=c.grad)
            if c.n_iter is not None:
                kw["n_iter"] = int(c.n_iter)
            else:
                kw["max_iter"] = 20000
            res = project_dsm(S, tau=c.tau, **kw)
            M = res.plan
        if c.shared_logits:
            M = M.expand(c.layers, c.n, c.n)
        return M, res

    def layer_operators(self, dtype: Optional[torch.dtype] = None, device=None) -> Tensor:
        """``H_l = (1-α) I + α M_l``, shape ``(L, n, n)`` (``residual="convex"`` only)."""
        if self.config.residual != "convex":
            raise ValueError("layer_operators needs residual='convex' (the branch layer is not an n×n operator)")
        M, _ = self.mixing_matrices(dtype, device)
        a = self.config.alpha
        eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
        return (1 - a) * eye + a * M

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> StackOutput:
        """Run the stack on ``x (..., n, d)``; returns a :class:`StackOutput` with every state.

        ``generator`` (CPU) draws the injected noise; required when ``noise_std > 0`` for
        reproducible draws (default: a generator seeded with ``config.seed + 1``).
        """
        c = self.config
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[-2:] != (c.n, c.d):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"`x` must have shape (..., {c.n}, {c.d}); got {shape}")
        if x.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"`x` must be float32 or float64; got {x.dtype}")
        M, res = self.mixing_matrices(x.dtype, x.device)
        W = None if self.weight is None else self.weight.to(dtype=x.dtype, device=x.device)
        if c.noise_std > 0 and generator is None:
            generator = torch.Generator().manual_seed(int(c.seed) + 1)
        eye = torch.eye(c.n, dtype=x.dtype, device=x.device)
        states: List[Tensor] = [x]
        h = x
        for l in range(c.layers):
            if c.residual == "convex":
                H = (1 - c.alpha) * eye + c.alpha * M[l]
                h = H @ h
            else:
                h = h + c.alpha * (M[l] @ h) @ W[l]
            if c.noise_std > 0:
                xi = torch.randn(h.shape, generator=generator, dtype=x.dtype).to(x.device)
                h = h + c.noise_std * xi
            if c.layernorm == "tokens":
                h = _ln(h, -2, c.ln_eps)
            elif c.layernorm == "features":
                h = _ln(h, -1, c.ln_eps)
            states.append(h)
        return StackOutput(states=torch.stack(states), mixing=M, sinkhorn=res)

    @torch.no_grad()
    def invert(self, y: Tensor, mixing: Optional[Tensor] = None, upto: Optional[int] = None) -> Tensor:
        """Undo the linear mixing: ``H_1⁻¹ ⋯ H_l⁻¹ y`` by ``l`` linear solves, in ``y``'s dtype.

        ``upto = l`` (default ``L``): ``y`` is the state after layer ``l`` (``states[l]``).

        Without noise and LayerNorm this recovers the input exactly (up to round-off amplified by the
        condition numbers of the ``H_l``). With ``layernorm="tokens"`` it recovers the detail part of
        every feature column up to a positive factor (``P`` commutes with a DSM, and LN over tokens
        only rescales columns). Needs ``residual="convex"`` and ``layernorm`` in {"none", "tokens"}.

        Shapes: ``y (..., n, d)`` -> same. ``mixing (L, n, n)``: the matrices of the forward pass
        (default: recomputed).
        """
        c = self.config
        if c.residual != "convex":
            raise ValueError("invert needs residual='convex'")
        if c.layernorm == "features":
            raise ValueError("invert cannot undo LayerNorm over features (it discards per-token statistics)")
        M = mixing if mixing is not None else self.mixing_matrices(y.dtype, y.device)[0]
        M = M.to(dtype=y.dtype, device=y.device)
        eye = torch.eye(c.n, dtype=y.dtype, device=y.device)
        nl = c.layers if upto is None else int(upto)
        if not (0 <= nl <= c.layers):
            raise ValueError(f"`upto` must be in [0, {c.layers}]; got {upto!r}")
        h = y
        for l in reversed(range(nl)):
            H = (1 - c.alpha) * eye + c.alpha * M[l]
            h = torch.linalg.solve(H, h)
        return h


def _ln(h: Tensor, dim: int, eps: float) -> Tensor:
    cen = h - h.mean(dim=dim, keepdim=True)
    return cen / torch.sqrt((cen * cen).mean(dim=dim, keepdim=True) + eps)


# ----------------------------------------------------------------------------------------------
# diagnostics


def operator_products(H: Tensor) -> Tensor:
    """Partial products ``Π_l = H_l ⋯ H_1`` for ``l = 1..L``.

    Shapes: ``H (..., L, n, n)`` -> ``(..., L, n, n)``.
    """
    if not isinstance(H, Tensor) or H.dim() < 3 or H.shape[-1] != H.shape[-2]:
        raise ValueError("`H` must be a tensor of shape (..., L, n, n)")
    out = []
    acc = H[..., 0, :, :]
    out.append(acc)
    for l in range(1, H.shape[-3]):
        acc = H[..., l, :, :] @ acc
        out.append(acc)
    return torch.stack(out, dim=-3)


def detail_basis(n: int, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """An orthonormal basis ``Q (n, n-1)`` of ``1^⊥`` (so ``P = Q Qᵀ``)."""
    if int(n) != n or n < 2:
        raise ValueError(f"`n` must be an integer >= 2; got {n!r}")
    P = torch.eye(n, dtype=dtype, device=device) - 1.0 / n
    Q, _ = torch.linalg.qr(P[:, : n - 1])
    return Q


def scalar_identity_distance(A: Tensor, iters: int = 100):
    """Distance of ``A`` from a scalar times the identity on ``1^⊥``.

    Returns ``(dist, c, norm)`` with ``dist = min_c ‖P A P - c P‖₂``, the minimiser ``c`` and
    ``norm = ‖P A P‖₂``; the relative distance is ``dist / norm``. The objective is convex in ``c``,
    minimised by golden-section search over ``[-‖PAP‖₂, ‖PAP‖₂]`` to ``iters`` steps.

    Shapes: ``A (..., n, n)`` -> three tensors ``(...)``.
    """
    if not isinstance(A, Tensor) or A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError("`A` must be a square matrix (..., n, n)")
    n = A.shape[-1]
    Q = detail_basis(n, A.dtype, A.device)
    B = Q.transpose(0, 1) @ A @ Q  # (..., n-1, n-1): P A P in the basis
    eye = torch.eye(n - 1, dtype=A.dtype, device=A.device)

    def f(c: Tensor) -> Tensor:
        return torch.linalg.matrix_norm(B - c[..., None, None] * eye, ord=2)

    norm = torch.linalg.matrix_norm(B, ord=2)
    lo, hi = -norm, norm.clone()
    gr = (math.sqrt(5) - 1) / 2
    c1, c2 = hi - gr * (hi - lo), lo + gr * (hi - lo)
    f1, f2 = f(c1), f(c2)
    for _ in range(int(iters)):
        left = f1 <= f2
        hi = torch.where(left, c2, hi)
        lo = torch.where(left, lo, c1)
        c2n = torch.where(left, c1, lo + gr * (hi - lo))
        c1n = torch.where(left, hi - gr * (hi - lo), c2)
        f2n = torch.where(left, f1, f(c2n))
        f1n = torch.where(left, f(c1n), f2)
        c1, c2, f1, f2 = c1n, c2n, f1n, f2n
    c = (lo + hi) / 2
    return f(c), c, norm


def mixing_jacobian(logits: Tensor, tau: float, mixing: str = "sinkhorn", **kw) -> Tensor:
    """Jacobian ``∂ vec(M) / ∂ vec(S)`` of the mixing map at ``logits`` ``S``, by reverse-mode autograd.

    ``mixing="sinkhorn"``: ``M = project_dsm(S, tau, **kw).plan`` (pass ``grad="implicit"`` or
    ``"unroll"``, ``n_iter`` ...); ``"softmax"``: ``M = rowsoftmax(S/τ)``. All ``n²`` rows are obtained
    in one batched backward pass over ``n²`` copies.

    Shapes: ``logits (n, n)`` -> ``(n², n²)``, rows indexed by entries of ``M``, columns by entries of
    ``S`` (row-major).
    """
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError("`logits` must be a square matrix (n, n)")
    if mixing not in ("sinkhorn", "softmax"):
        raise ValueError(f"`mixing` must be 'sinkhorn' or 'softmax'; got {mixing!r}")
    n = logits.shape[0]
    S = logits.detach().expand(n * n, n, n).clone().requires_grad_(True)
    with torch.enable_grad():
        if mixing == "sinkhorn":
            kw.setdefault("grad", "implicit")
            if kw["grad"] == "implicit" and kw.get("n_iter") is None and "init" not in kw:
                # solve once, then warm-start the n² copies at the solution (implicit gradients
                # depend only on the returned point, so this changes nothing but the cost)
                with torch.no_grad():
                    r0 = project_dsm(logits.detach(), tau=tau, **{**kw, "grad": "none"})
                kw["init"] = (r0.f.expand(n * n, n), r0.g.expand(n * n, n))
            M = project_dsm(S, tau=tau, **kw).plan
        else:
            M = torch.softmax(S / tau, dim=-1)
        sel = M.reshape(n * n, n * n).diagonal().sum()
        (gS,) = torch.autograd.grad(sel, S)
    return gS.reshape(n * n, n * n)
