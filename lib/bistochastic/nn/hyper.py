"""Manifold-constrained hyper-connections (mHC): residual mixing of ``n`` streams by a DSM.

A plain residual block computes ``x <- x + f(x)`` on one residual stream ``x`` of shape
``(B, T, d)``. Hyper-connections (HC, Zhu et al. 2024) widen the residual stream to ``n`` copies,
``X`` of shape ``(B, T, n, d)``, and replace the identity skip by three learned maps::

    X <- H_res X + H_post^T f(H_pre X)        (per token; H_res: (n, n), H_pre, H_post: (n,))

``H_pre`` reads the block's input as a weighted sum of the streams, ``H_post`` writes the block's
output back to every stream with its own weight, and ``H_res`` mixes the streams. mHC
(Xie et al., arXiv 2512.24880) constrains ``H_res`` to the Birkhoff polytope by a Sinkhorn
projection, ``H_res = Sinkhorn(exp(logits / tau))`` with a fixed number of iterations (20 in the
paper), ``H_pre = sigmoid(.)`` and ``H_post = 2 sigmoid(.)``. The logits are either learned
constants (``mode="static"``) or computed from the input as in the mHC paper
(``mode="dynamic"``): ``logits = b + alpha * (RMSNorm(vec X) @ phi)`` per token, with learned
``b``, ``phi`` and a scalar gate ``alpha`` (initialised small).

Stream layout
-------------
The streams sit on the second-to-last axis: ``X`` is ``(..., n, d)``, typically ``(B, T, n, d)``.
:func:`expand_streams` turns a ``(..., d)`` tensor into ``n`` copies ``(..., n, d)`` (the
community implementation's "repeat"), and :func:`collapse_streams` averages them back to
``(..., d)``. A model calls ``expand_streams`` once after the embedding, wraps each block in a
:class:`HyperConnections`, and calls ``collapse_streams`` before the final norm.

Initialisations of ``H_res`` (``init=``):

* ``"identity"``: logits 0 on the diagonal and ``offdiag`` (default -8) elsewhere at
  ``tau = 0.05`` (the community implementation): ``H_res`` is the identity to ``exp(-160)``.
* ``"mild"``: the same logit pattern with ``offdiag = -4`` at ``tau = 1``: identity-dominated but
  not saturated (diagonal about 0.95, ``sigma_2`` about 0.93).
* ``"uniform"``: zero logits, ``H_res = J = 11^T / n``.
* ``"random"``: standard normal logits at ``tau = 1`` (breaks the streams' symmetry).

``tau`` and ``offdiag`` override the defaults. ``pre_init="uniform"`` reads the mean of the
streams (``H_pre = 1/n``), ``pre_init="onehot"`` reads stream ``layer_index mod n`` (the HC and
community default). ``H_post`` starts at 1 for every stream.

After each forward the module keeps, detached, ``last_mixing`` (``H_res``, ``(n, n)`` for static
logits, ``(..., n, n)`` per token for dynamic ones), ``last_logits`` (the logits before division
by ``tau``, same shape), ``last_pre`` and ``last_post`` (``(..., n)`` or ``(n,)``), and the
temperature ``tau`` (a float property; the value lives in the 0-d buffer ``tau_``, so that
an ensemble stacked by ``torch.func.stack_module_state`` can give every member its own
temperature): diagnostics hooks read these names. Setting ``record = False`` skips the
storing (needed under ``torch.func.vmap``, where the tensors are batched wrappers).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..sinkhorn import project_dsm
from .. import spectral

__all__ = [
    "HyperConnections",
    "expand_streams",
    "collapse_streams",
    "identity_distance",
    "depth_product",
    "depth_product_sigma2",
    "INITS",
]

INITS = ("identity", "mild", "uniform", "random")
_DEFAULT_TAU = {"identity": 0.05, "mild": 1.0, "uniform": 1.0, "random": 1.0}
_DEFAULT_OFFDIAG = {"identity": -8.0, "mild": -4.0}


def expand_streams(x: Tensor, n: int) -> Tensor:
    """``n`` copies of the residual stream: ``(..., d)`` -> ``(..., n, d)`` (a new tensor)."""
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError("x: expected a tensor of shape (..., d)")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1]).clone()


def collapse_streams(X: Tensor) -> Tensor:
    """Mean over the streams: ``(..., n, d)`` -> ``(..., d)`` (copies collapse to the copy)."""
    if not isinstance(X, Tensor) or X.dim() < 2:
        raise TypeError("X: expected a tensor of shape (..., n, d)")
    return X.mean(dim=-2)


def identity_distance(H: Tensor) -> Tensor:
    """``||H - I||_F`` per matrix: ``(..., n, n)`` -> ``(...)``.

    Reference values for a DSM: 0 at the identity, ``sqrt(n - 1)`` at ``J = 11^T / n``
    (``sqrt(3)`` for ``n = 4``), at most ``sqrt(2n)`` (a permutation without fixed points).
    """
    if not isinstance(H, Tensor) or H.dim() < 2 or H.shape[-1] != H.shape[-2]:
        raise ValueError("H: expected square matrices of shape (..., n, n)")
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    return torch.linalg.matrix_norm(H - eye, ord="fro")


def depth_product(Hs: Union[Tensor, Sequence[Tensor]]) -> Tensor:
    """``H_L ... H_1`` for ``Hs`` ordered by depth (first layer first).

    ``Hs`` is a tensor ``(L, ..., n, n)`` or a sequence of ``L`` tensors ``(..., n, n)`` whose
    batch shapes broadcast (static layers ``(n, n)`` mix with per-token layers ``(B, T, n, n)``).
    Returns ``(..., n, n)``.
    """
    mats = list(Hs.unbind(0)) if isinstance(Hs, Tensor) else list(Hs)
    if not mats:
        raise ValueError("Hs: need at least one matrix")
    for k, M in enumerate(mats):
        if not isinstance(M, Tensor) or M.dim() < 2 or M.shape[-1] != M.shape[-2]:
            raise ValueError(f"Hs[{k}]: expected square matrices of shape (..., n, n)")
    out = mats[0]
    for M in mats[1:]:
        out = M @ out
    return out


def depth_product_sigma2(Hs: Union[Tensor, Sequence[Tensor]], cumulative: bool = False) -> Tensor:
    """``sigma_2`` of the depth product ``H_L ... H_1`` (:func:`bistochastic.spectral.sigma2`).

    With ``cumulative=True`` returns ``sigma_2(H_l ... H_1)`` for ``l = 1..L`` stacked on a new
    last axis, ``(..., L)``; else ``(...)``. For DSMs ``sigma_2`` of the product is at most the
    product of the layers' ``sigma_2`` and is the largest gain of the stack on the detail
    subspace (differences between streams).
    """
    mats = list(Hs.unbind(0)) if isinstance(Hs, Tensor) else list(Hs)
    if not mats:
        raise ValueError("Hs: need at least one matrix")
    if not cumulative:
        return spectral.sigma2(depth_product(mats))
    out, prods = [], None
    for M in mats:
        prods = M if prods is None else M @ prods
        out.append(spectral.sigma2(prods))
    shape = torch.broadcast_shapes(*(o.shape for o in out))
    return torch.stack([o.expand(shape) for o in out], dim=-1)


class HyperConnections(nn.Module):
    """Wrap a block ``f`` (attention, MLP, anything ``(..., d) -> (..., d)``) in mHC mixing.

    Parameters
    ----------
    block : nn.Module
        The residual branch ``f``; called as ``block(h, *args, **kwargs)`` with ``h`` of shape
        ``(..., d)`` (for a GPT: ``(B, T, d)``).
    dim : int
        Feature size ``d`` of one stream.
    n : int
        Number of residual streams (default 4, as in mHC).
    mode : {"static", "dynamic"}
        Learned constant logits, or logits computed per token from the streams (mHC paper).
    init : {"identity", "mild", "uniform", "random"}
        Initial ``H_res`` (see the module docstring).
    tau : float, optional
        Sinkhorn temperature; default depends on ``init`` (0.05 for ``"identity"``, else 1).
    offdiag : float, optional
        Off-diagonal logit of the identity-like inits (default -8 for ``"identity"``, -4 for
        ``"mild"``).
    n_iter : int
        Fixed number of Sinkhorn iterations (20 in the mHC paper; gradients unrolled through them).
    pre_init : {"uniform", "onehot"}
        ``H_pre`` at initialisation: ``1/n`` for every stream, or stream ``layer_index mod n``.
    layer_index : int
        Used by ``pre_init="onehot"``.
    alpha_init : float
        Initial gate of the dynamic part (``mode="dynamic"``).
    generator : torch.Generator, optional
        CPU generator for the random initialisations (``init="random"``, dynamic ``phi``).

    Shapes: ``forward(X)`` with ``X`` ``(..., n, d)`` returns ``(..., n, d)``.
    """

    def __init__(self, block: nn.Module, dim: int, n: int = 4, *, mode: str = "static",
                 init: str = "identity", tau: Optional[float] = None,
                 offdiag: Optional[float] = None, n_iter: int = 20, pre_init: str = "uniform",
                 layer_index: int = 0, alpha_init: float = 0.01,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if not callable(block):
            raise TypeError("block: expected a callable nn.Module")
        for name, v in (("dim", dim), ("n", n), ("n_iter", n_iter)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if mode not in ("static", "dynamic"):
            raise ValueError(f"mode: expected 'static' or 'dynamic', got {mode!r}")
        if init not in INITS:
            raise ValueError(f"init: expected one of {INITS}, got {init!r}")
        if pre_init not in ("uniform", "onehot"):
            raise ValueError(f"pre_init: expected 'uniform' or 'onehot', got {pre_init!r}")
        tau = _DEFAULT_TAU[init] if tau is None else tau
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (
                math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau: expected a positive finite float, got {tau!r}")
        if offdiag is not None and init not in _DEFAULT_OFFDIAG:
            raise ValueError(f"offdiag: only used by init='identity' or 'mild', not {init!r}")
        self.block = block
        self.dim, self.n, self.mode, self.init = dim, n, mode, init
        # a buffer, so that members of a vmapped ensemble can differ in temperature; float64
        # so that e.g. 0.05 stays 0.05 in a float64 model (a float32 buffer cast up would not)
        self.register_buffer("tau_", torch.tensor(float(tau), dtype=torch.float64))
        self.n_iter = n_iter

        self._offdiag = (_DEFAULT_OFFDIAG[init] if offdiag is None else float(offdiag)
                         ) if init in _DEFAULT_OFFDIAG else None
        self._pre_init, self._layer_index, self._alpha_init = pre_init, layer_index, alpha_init
        self.res_logits = nn.Parameter(torch.zeros(n, n))
        self.pre_logits = nn.Parameter(torch.zeros(n))
        self.post_logits = nn.Parameter(torch.zeros(n))
        if mode == "dynamic":
            self.phi = nn.Parameter(torch.zeros(n * dim, n * n + 2 * n))
            self.alpha = nn.Parameter(torch.zeros(3))  # gates of res, pre, post
            self.norm_weight = nn.Parameter(torch.ones(n * dim))
        self.reset_parameters(generator)
        self.record = True  # set False to skip storing last_* (e.g. under torch.func.vmap)
        self.last_mixing: Optional[Tensor] = None
        self.last_logits: Optional[Tensor] = None
        self.last_pre: Optional[Tensor] = None
        self.last_post: Optional[Tensor] = None

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """(Re)initialise the mixing parameters (not the block's); random draws from ``generator``."""
        n, dim = self.n, self.dim
        if self._offdiag is not None:
            self.res_logits.fill_(self._offdiag).fill_diagonal_(0.0)
        elif self.init == "random":
            self.res_logits.copy_(torch.randn(n, n, generator=generator))
        else:
            self.res_logits.zero_()
        if self._pre_init == "uniform":
            self.pre_logits.fill_(-math.log(n - 1) if n > 1 else 20.0)  # sigmoid = 1/n
        else:
            self.pre_logits.fill_(-8.0)
            self.pre_logits[self._layer_index % n] = 8.0
        self.post_logits.zero_()  # 2 sigmoid(0) = 1
        if self.mode == "dynamic":
            std = 1.0 / math.sqrt(n * dim)
            self.phi.copy_(torch.randn(self.phi.shape, generator=generator) * std)
            self.alpha.fill_(float(self._alpha_init))
            self.norm_weight.fill_(1.0)

    def coefficients(self, X: Tensor):
        """``(H_res, H_pre, H_post, res_logits)`` for streams ``X`` ``(..., n, d)``.

        Static: ``(n, n)``, ``(n,)``, ``(n,)``, ``(n, n)``. Dynamic: ``(..., n, n)``, ``(..., n)``,
        ``(..., n)``, ``(..., n, n)``.
        """
        n = self.n
        res, pre, post = self.res_logits, self.pre_logits, self.post_logits
        if self.mode == "dynamic":
            flat = X.flatten(-2)
            flat = flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_weight
            z = flat @ self.phi
            a = self.alpha
            res = res + a[0] * z[..., : n * n].unflatten(-1, (n, n))
            pre = pre + a[1] * z[..., n * n: n * n + n]
            post = post + a[2] * z[..., n * n + n:]
        # divide here and project at tau = 1: project_dsm validates a tensor tau on the host,
        # which torch.func.vmap (an ensemble with one temperature per member) cannot do
        Z = res / self.tau_.to(res.dtype)
        H = project_dsm(Z, tau=1.0, n_iter=self.n_iter, check_inputs=False).plan
        return H, torch.sigmoid(pre), 2.0 * torch.sigmoid(post), res

    def forward(self, X: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not isinstance(X, Tensor) or X.dim() < 2 or X.shape[-2:] != (self.n, self.dim):
            raise ValueError(f"X: expected shape (..., n={self.n}, d={self.dim}), got "
                             f"{tuple(X.shape) if isinstance(X, Tensor) else type(X)}")
        H, pre, post, logits = self.coefficients(X)
        H, pre, post = H.to(X.dtype), pre.to(X.dtype), post.to(X.dtype)
        h = (pre.unsqueeze(-2) @ X).squeeze(-2)                # H_pre X: block input (..., d)
        out = self.block(h, *args, **kwargs)                   # (..., d)
        mixed = H @ X                                          # H_res X (..., n, d)
        Y = mixed + post.unsqueeze(-1) * out.unsqueeze(-2)     # + H_post^T f(...)
        if self.record:
            self.last_mixing = H.detach()
            self.last_logits = logits.detach()
            self.last_pre = pre.detach()
            self.last_post = post.detach()
        return Y

    @property
    def tau(self) -> float:
        """The temperature (stored as the 0-d buffer ``tau_``; set it with :meth:`set_tau`)."""
        return float(self.tau_)

    def set_tau(self, tau: float) -> None:
        """Change the temperature in place (keeps the buffer's dtype and device)."""
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (
                math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau: expected a positive finite float, got {tau!r}")
        with torch.no_grad():
            self.tau_.fill_(float(tau))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, n={self.n}, mode={self.mode!r}, init={self.init!r}, "
                f"tau={self.tau:g}, n_iter={self.n_iter}")
