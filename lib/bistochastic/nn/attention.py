"""Multi-head attention with a doubly-stochastic (Sinkhorn) or Softmax score normalisation.

:class:`SinkhornAttention` is a drop-in self-attention layer, batch-first ``(B, T, d)``. The scores
of head ``h`` are ``S = q kᵀ / √d_h`` (``"free"`` logit scale: learned through ``W_q, W_k``) or a
score whose scale is frozen (``"qk_norm"``: LayerNorm without gain on ``q`` and ``k``, so that
``|S| <= √d_h``; ``"cosine"``: ``S = cos(q, k) ∈ [-1, 1]``). The mixing matrix is

* ``"sinkhorn"``: ``M = Sinkhorn(exp(S/τ))`` (``bs.project_dsm``), a doubly-stochastic matrix,
  computed so that the *last* half-step normalises the rows: every query's weights sum to one
  exactly, and the column sums carry the (reported) marginal error;
* ``"softmax"``: ``A = rowsoftmax(S/τ)``, the usual attention, for like-for-like comparisons
  (it equals :func:`torch.nn.functional.scaled_dot_product_attention` with the same weights).

After each forward the layer exposes, detached, what :class:`bistochastic.nn.Diagnostics` reads:
``last_mixing (B, H, T, T)``, ``last_logits (B, H, T, T)`` (the scores ``S`` before the division by
``τ``), ``tau``, ``last_key_padding_mask (B, T)`` or ``None``, ``last_marginal_error (B, H)``
(Sinkhorn only) and ``mixing_kind``.

A causal mask is refused: a lower-triangular doubly-stochastic matrix is the identity (the last
column has a single entry, which must be one, so the last row is ``e_Tᵀ``; remove it and repeat),
so causal Sinkhorn attention cannot mix tokens at all.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import positive_finite
from ..sinkhorn import project_dsm

__all__ = ["SinkhornAttention", "dsm_attention_weights", "CAUSAL_REFUSAL"]

Normalization = Literal["sinkhorn", "softmax", "identity", "uniform"]
LogitScale = Literal["free", "qk_norm", "cosine"]

CAUSAL_REFUSAL = (
    "a causal mask is not supported by Sinkhorn attention: a lower-triangular doubly-stochastic "
    "matrix is the identity (its last column has one entry, which must equal 1, which empties the "
    "last row; repeat), so causal DSM attention would not mix tokens at all. Use "
    "normalization='softmax' for causal attention."
)


def _check_mask(mask: Optional[Tensor], B: int, T: int, device: torch.device) -> Optional[Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError("`key_padding_mask` must be a bool torch.Tensor of shape (B, T) or None")
    if mask.dtype != torch.bool:
        raise TypeError(f"`key_padding_mask` must have dtype torch.bool (True = padded); got {mask.dtype}")
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"`key_padding_mask` must have shape (B, T) = {(B, T)}; got {tuple(mask.shape)}")
    mask = mask.to(device)
    if bool(mask.all(-1).any()):
        raise ValueError("`key_padding_mask` pads every token of some sample; each needs one key")
    return mask


def _sinkhorn_rows_last(logits: Tensor, tau: float, n_iter: Optional[int], tol: float,
                        max_iter: int, grad: str) -> Tuple[Tensor, Tensor]:
    """``Sinkhorn(exp(logits/τ))`` ending on a row normalisation. ``(..., n, n)`` -> plan, error."""
    kw = dict(tol=tol, grad=grad, check_inputs=False)
    if n_iter is not None:
        kw["n_iter"] = n_iter
    else:
        kw["max_iter"] = max_iter
    # project_dsm ends on a column update: solve the transpose so that the rows come out exact
    res = project_dsm(logits.transpose(-1, -2), tau, **kw)
    return res.plan.transpose(-1, -2), res.marginal_error


def dsm_attention_weights(
    logits: Tensor,
    tau: float = 1.0,
    key_padding_mask: Optional[Tensor] = None,
    *,
    n_iter: Optional[int] = 20,
    tol: float = 1e-6,
    max_iter: int = 2000,
    grad: str = "unroll",
) -> Tuple[Tensor, Tensor]:
    """Doubly-stochastic attention weights ``Sinkhorn(exp(S/τ))`` with an optional padding mask.

    Parameters
    ----------
    logits : Tensor ``(B, H, T, T)``
        Scores ``S`` (query rows, key columns).
    tau : float
        Temperature ``> 0``.
    key_padding_mask : Tensor ``(B, T)`` of bool, optional
        ``True`` marks a padded token. Padding is handled by restricting the projection to the
        unpadded block of each sample (samples are grouped by their number of valid tokens): the
        valid ``k x k`` block is doubly stochastic on its own, and a padded token attends only to
        itself (identity rows and columns), so the full ``T x T`` matrix is still doubly stochastic
        and no mass reaches or leaves a padded key. Giving padded keys ``-inf`` logits instead
        cannot work for a DSM: a column of zeros cannot sum to one.
    n_iter, tol, max_iter, grad
        As in :func:`bistochastic.sinkhorn`: ``n_iter`` fixed iterations (``None``: iterate to
        ``tol``, at most ``max_iter``), ``grad`` in ``{"unroll", "implicit", "none"}``.

    Returns
    -------
    (weights, marginal_error) : Tensor ``(B, H, T, T)``, Tensor ``(B, H)``
        Row sums are one exactly (the last half-step normalises rows); ``marginal_error`` is the
        relative L1 violation of the column sums, over the valid block.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 4 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError("`logits` must be a tensor of shape (B, H, T, T)")
    B, H, T, _ = logits.shape
    mask = _check_mask(key_padding_mask, B, T, logits.device)
    if mask is None or not bool(mask.any()):
        return _sinkhorn_rows_last(logits, tau, n_iter, tol, max_iter, grad)
    valid = ~mask
    counts = valid.sum(-1)
    pieces, errs, order = [], [], []
    for k in torch.unique(counts).tolist():
        idx = torch.nonzero(counts == k).flatten()
        Lb = logits.index_select(0, idx)
        nb = idx.numel()
        if k == T:
            P, e = _sinkhorn_rows_last(Lb, tau, n_iter, tol, max_iter, grad)
        else:
            vb = valid.index_select(0, idx)
            pos = torch.nonzero(vb)[:, 1].view(nb, k)  # valid positions, ascending
            pad = torch.nonzero(~vb)[:, 1].view(nb, T - k)
            bi = torch.arange(nb, device=logits.device)
            Lp = Lb.permute(0, 2, 3, 1)  # (nb, T, T, H)
            sub = Lp[bi[:, None, None], pos[:, :, None], pos[:, None, :]].permute(0, 3, 1, 2)
            Psub, e = _sinkhorn_rows_last(sub, tau, n_iter, tol, max_iter, grad)
            Pp = torch.zeros_like(Lp)
            Pp = Pp.index_put((bi[:, None, None], pos[:, :, None], pos[:, None, :]),
                              Psub.permute(0, 2, 3, 1))
            one = torch.ones((), dtype=Lp.dtype, device=Lp.device).expand(nb, T - k, H)
            Pp = Pp.index_put((bi[:, None], pad, pad), one)
            P = Pp.permute(0, 3, 1, 2)
        pieces.append(P)
        errs.append(e)
        order.append(idx)
    inv = torch.argsort(torch.cat(order))
    return torch.cat(pieces).index_select(0, inv), torch.cat(errs).index_select(0, inv)


class SinkhornAttention(nn.Module):
    """Multi-head self-attention with Sinkhorn (doubly-stochastic) or Softmax weights.

    Parameters
    ----------
    d_model : int
        Feature size ``d`` of the input ``(B, T, d)``.
    n_heads : int
        Number of heads ``H``; must divide ``d_model`` (head size ``d_h = d / H``).
    normalization : {"sinkhorn", "softmax", "identity", "uniform"}
        Doubly-stochastic weights ``Sinkhorn(exp(S/τ))`` or ``rowsoftmax(S/τ)``; two controls
        without scores: ``"identity"`` (every token attends only to itself: no token
        interaction) and ``"uniform"`` (every weight ``1/T``, over the unpadded keys: the limit
        ``J`` of the Homogeneity Trap, ``σ₂ = 0``).
    tau : float
        Temperature ``τ > 0``. With ``logit_scale="free"`` the model can undo any ``τ`` by growing
        ``W_q, W_k``; with a frozen scale it fixes how sharp the weights can ever be.
    logit_scale : {"free", "qk_norm", "cosine"}
        ``"free"``: ``S = q kᵀ/√d_h``. ``"qk_norm"``: ``q, k`` LayerNorm-ed per head without gain
        (``|S| <= √d_h``). ``"cosine"``: ``S = cos(q, k)`` (``|S| <= 1``).
    n_iter : int or None
        Fixed Sinkhorn iterations (the usual choice inside networks); ``None`` iterates to ``tol``.
    tol, max_iter : float, int
        Tolerance on the marginal error (reported; the stopping rule when ``n_iter`` is None) and
        the iteration cap.
    grad : {"unroll", "implicit", "none"}
        How gradients pass the Sinkhorn projection (see :func:`bistochastic.sinkhorn`).
    bias : bool
        Biases in the four projections.
    record : bool
        Keep detached copies of the last mixing matrices and scores for diagnostics.

    Notes
    -----
    Shapes: ``forward(x (B, T, d), key_padding_mask (B, T) bool or None) -> (B, T, d)``.
    Device and dtype follow the module's parameters (move the module with the input).
    """

    mixing_kind: str

    def __init__(
        self,
        d_model: int,
        n_heads: int = 1,
        *,
        normalization: Normalization = "sinkhorn",
        tau: float = 1.0,
        logit_scale: LogitScale = "free",
        n_iter: Optional[int] = 20,
        tol: float = 1e-6,
        max_iter: int = 2000,
        grad: str = "unroll",
        bias: bool = True,
        record: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, v in (("d_model", d_model), ("n_heads", n_heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {v!r}")
        if d_model % n_heads:
            raise ValueError(f"`n_heads` ({n_heads}) must divide `d_model` ({d_model})")
        if normalization not in ("sinkhorn", "softmax", "identity", "uniform"):
            raise ValueError("`normalization` must be 'sinkhorn', 'softmax', 'identity' or "
                             f"'uniform'; got {normalization!r}")
        if logit_scale not in ("free", "qk_norm", "cosine"):
            raise ValueError(f"`logit_scale` must be 'free', 'qk_norm' or 'cosine'; got {logit_scale!r}")
        if grad not in ("unroll", "implicit", "none"):
            raise ValueError(f"`grad` must be 'unroll', 'implicit' or 'none'; got {grad!r}")
        if n_iter is not None and (isinstance(n_iter, bool) or int(n_iter) != n_iter or n_iter < 1):
            raise ValueError(f"`n_iter` must be a positive integer or None; got {n_iter!r}")
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
            raise ValueError(f"`tol` must be a nonnegative finite number; got {tol!r}")
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        self.normalization = normalization
        self.mixing_kind = normalization
        # a buffer, so that an Ensemble can give each member its own temperature
        self.register_buffer("tau_", torch.tensor(positive_finite("tau", tau),
                                                  dtype=dtype or torch.get_default_dtype(),
                                                  device=device))
        self.logit_scale = logit_scale
        self.n_iter = None if n_iter is None else int(n_iter)
        self.tol, self.max_iter, self.grad = float(tol), int(max_iter), grad
        self.record = bool(record)
        fk = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(d_model, d_model, bias=bias, **fk)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias, **fk)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias, **fk)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, **fk)
        self.last_mixing: Optional[Tensor] = None
        self.last_logits: Optional[Tensor] = None
        self.last_key_padding_mask: Optional[Tensor] = None
        self.last_marginal_error: Optional[Tensor] = None

    @property
    def tau(self) -> float:
        """The temperature ``τ`` (stored as the buffer ``tau_``, in the module's dtype)."""
        return float(self.tau_)

    def extra_repr(self) -> str:
        it = f"n_iter={self.n_iter}" if self.n_iter is not None else f"tol={self.tol:g}"
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, normalization={self.normalization!r}, "
                f"tau={self.tau:g}, logit_scale={self.logit_scale!r}, {it}, grad={self.grad!r}")

    # ------------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError("`x` must be a torch.Tensor of shape (B, T, d_model)")
        if not x.dtype.is_floating_point:
            raise TypeError(f"`x` must have a floating dtype; got {x.dtype}")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"`x` must have shape (B, T, d_model={self.d_model}); got {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError("`x` must have at least one token (T >= 1)")

    def _heads(self, y: Tensor) -> Tensor:
        B, T, _ = y.shape
        return y.view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, T, d_h)

    def scores(self, x: Tensor) -> Tensor:
        """The scores ``S (B, H, T, T)`` before the division by ``τ`` (no normalisation)."""
        self._check_input(x)
        q, k = self._heads(self.q_proj(x)), self._heads(self.k_proj(x))
        if self.logit_scale == "qk_norm":
            q = F.layer_norm(q, (self.d_head,))
            k = F.layer_norm(k, (self.d_head,))
        elif self.logit_scale == "cosine":
            q = F.normalize(q, dim=-1) * math.sqrt(self.d_head)
            k = F.normalize(k, dim=-1)
        return q @ k.transpose(-1, -2) / math.sqrt(self.d_head)

    def mixing(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """The attention weights ``(B, H, T, T)`` (differentiable), rows = queries."""
        return self._mixing(self.scores(x), key_padding_mask)[0]

    def _mixing(self, S: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        B, H, T, _ = S.shape
        if self.normalization == "identity":
            _check_mask(mask, B, T, S.device)
            eye = torch.eye(T, dtype=S.dtype, device=S.device)
            return eye.expand(B, H, T, T), None
        if self.normalization == "uniform":
            m = _check_mask(mask, B, T, S.device)
            if m is None:
                return torch.full_like(S, 1.0 / T), None
            w = (~m).to(S.dtype)[:, None, None, :]  # (B, 1, 1, T)
            return (w / w.sum(-1, keepdim=True)).expand(B, H, T, T), None
        Z = S / self.tau_.to(S.dtype)
        if self.normalization == "softmax":
            m = _check_mask(mask, B, T, S.device)
            if m is not None:
                Z = Z.masked_fill(m[:, None, None, :], float("-inf"))
            return torch.softmax(Z, dim=-1), None
        return dsm_attention_weights(Z, 1.0, mask, n_iter=self.n_iter, tol=self.tol,
                                     max_iter=self.max_iter, grad=self.grad)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, *,
                attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        """Self-attention of ``x (B, T, d)``; ``key_padding_mask (B, T)`` bool, True = padded.

        ``is_causal=True`` with Sinkhorn weights raises (see :data:`CAUSAL_REFUSAL`); a general
        ``attn_mask`` is refused too (only key padding is defined for a DSM).
        """
        if is_causal or attn_mask is not None:
            if self.normalization == "sinkhorn" and is_causal:
                raise ValueError("`is_causal`: " + CAUSAL_REFUSAL)
            raise ValueError("`attn_mask`/`is_causal` are not supported; use `key_padding_mask`")
        S = self.scores(x)
        M, err = self._mixing(S, key_padding_mask)
        B, T, _ = x.shape
        v = self._heads(self.v_proj(x))
        y = (M.to(v.dtype) @ v).transpose(1, 2).reshape(B, T, self.d_model)
        if self.record:
            self.last_mixing = M.detach()
            self.last_logits = S.detach()
            self.last_key_padding_mask = None if key_padding_mask is None else key_padding_mask.detach()
            self.last_marginal_error = None if err is None else err.detach()
        return self.out_proj(y)
