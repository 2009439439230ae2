"""Diagnostics of mixing layers recorded during training with forward hooks (no model changes).

The protocol: a *mixing module* (:class:`~bistochastic.nn.SinkhornAttention`, the hyper-connection
modules, or any user module) sets, after each forward,

* ``last_mixing``: the detached matrices that multiply the tokens or streams, ``(..., n, n)``
  (attention: ``(B, H, T, T)``, rows = outputs);
* ``last_logits`` (same shape, the scores before the division by ``tau``) and ``tau`` (float), or
  ``last_logit_spread`` ``(...)`` directly;
* optionally ``last_key_padding_mask`` ``(B, T)`` bool (True = padded) and ``last_marginal_error``.

:class:`Diagnostics` finds every such module in a model, registers a forward hook on each (and on
the residual blocks you name, for the token spread) and records, per forward call:

* ``sigma2``: mean over the batch and heads of ``‖P M P‖₂`` (:func:`bistochastic.spectral.sigma2`),
  which is σ₂ for a doubly-stochastic ``M`` and the detail gain for a Softmax matrix;
  ``sigma2_max`` the largest;
* ``logit_spread``: the standard deviation of the double-centred scores ``P S P`` divided by
  ``tau``, i.e. the spread of the logits in units of the temperature. Sinkhorn ignores row and
  column constants of ``S``, so only ``P S P`` matters; to first order at high temperature
  ``σ₂ ≈ ‖P S P‖₂ / (n τ)`` (Chapter 3). ``eff_temperature`` is its inverse: ``τ / sd(P S P)``;
* ``marginal_error`` (max over the batch), when the module reports one;
* for residual blocks: ``token_spread`` ``‖P X‖_F / ‖X‖_F`` of the block output, ``P`` centring
  over the token axis (mean over the batch); 0 when all tokens are equal;
* on :meth:`Diagnostics.record_grads` (call it after ``backward()``): ``grad_norm``, the L2 norm of
  the gradients of each hooked module's parameters.

Everything is computed under ``torch.no_grad()`` in float64 from the detached tensors; padded tokens
are excluded (each sample's valid block). ``history`` returns ``{name: {metric: np.ndarray}}``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from .. import spectral

__all__ = ["Diagnostics", "is_mixing_module", "mixing_metrics", "token_spread", "valid_blocks"]


def is_mixing_module(m: nn.Module) -> bool:
    """True for modules that follow the diagnostics protocol (have ``last_mixing``)."""
    return hasattr(m, "last_mixing")


def valid_blocks(X: Tensor, mask: Optional[Tensor]) -> List[Tensor]:
    """Split ``X (B, ..., T, T)`` into per-length groups of the unpadded blocks.

    ``mask (B, T)`` bool, True = padded. Returns a list of tensors ``(b_k, ..., k, k)`` (one per
    distinct count ``k`` of valid tokens); ``[X]`` when there is no mask.
    """
    if mask is None or not bool(mask.any()):
        return [X]
    valid = ~mask.to(X.device)
    counts = valid.sum(-1)
    out = []
    for k in torch.unique(counts).tolist():
        idx = torch.nonzero(counts == k).flatten()
        Xb = X.index_select(0, idx)
        pos = torch.nonzero(valid.index_select(0, idx))[:, 1].view(idx.numel(), k)
        shape = (idx.numel(),) + (1,) * (X.dim() - 3)
        r = pos.view(shape + (k, 1)).expand(Xb.shape[:-2] + (k, X.shape[-1]))
        Xb = torch.gather(Xb, -2, r)
        c = pos.view(shape + (1, k)).expand(Xb.shape[:-1] + (k,))
        out.append(torch.gather(Xb, -1, c))
    return out


def _double_center(S: Tensor) -> Tensor:
    return S - S.mean(-1, keepdim=True) - S.mean(-2, keepdim=True) + S.mean((-2, -1), keepdim=True)


@torch.no_grad()
def mixing_metrics(module: nn.Module) -> Dict[str, float]:
    """The metrics of one mixing module from its ``last_*`` attributes (see the module doc)."""
    M = module.last_mixing
    if M is None:
        return {}
    mask = getattr(module, "last_key_padding_mask", None)
    if mask is not None and M.dim() < 3:
        mask = None
    out: Dict[str, float] = {}
    s2 = torch.cat([spectral.sigma2(b.double()).flatten() for b in valid_blocks(M, mask)])
    out["sigma2"] = float(s2.mean())
    out["sigma2_max"] = float(s2.max())
    spread = getattr(module, "last_logit_spread", None)
    S = getattr(module, "last_logits", None)
    tau = getattr(module, "tau", None)
    if spread is None and S is not None and tau is not None:
        sds = []
        for b in valid_blocks(S, mask):
            k = b.shape[-1]
            c = _double_center(b.double())
            # population std over the k x k entries (zero for k = 1)
            sds.append((c.pow(2).sum((-2, -1)) / (k * k)).sqrt().flatten() / float(tau))
        spread = torch.cat(sds)
    if spread is not None:
        sp = torch.as_tensor(spread, dtype=torch.float64).flatten()
        out["logit_spread"] = float(sp.mean())
        out["eff_temperature"] = float((1.0 / sp.clamp_min(1e-300)).mean()) if bool((sp > 0).all()) \
            else float("inf")
    err = getattr(module, "last_marginal_error", None)
    if err is not None:
        out["marginal_error"] = float(torch.as_tensor(err).max())
    return out


@torch.no_grad()
def token_spread(X: Tensor, token_dim: int = -2) -> Tensor:
    """``‖P X‖_F / ‖X‖_F`` per sample, ``P`` centring the token axis. ``(B, T, d) -> (B,)``."""
    if not isinstance(X, Tensor) or X.dim() < 2:
        raise ValueError("`X` must be a tensor of shape (..., T, d)")
    X = X.double()
    num = spectral.detail(X, token_dim).flatten(-2).norm(dim=-1)
    den = X.flatten(-2).norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(den))


class Diagnostics:
    """Record per-layer diagnostics of a model during training, through forward hooks.

    Parameters
    ----------
    model : nn.Module
        Any model; every submodule with a ``last_mixing`` attribute is hooked.
    residual_blocks : sequence of modules or names, optional
        Blocks whose *output* ``(B, T, d)`` (or the first element of a tuple output) is the residual
        stream; their token spread is recorded.
    every : int
        Record one forward call in ``every`` (counted per hooked module).

    Notes
    -----
    Use ``with diag.paused(): ...`` around evaluation forwards you do not want recorded, call
    :meth:`record_grads` after ``loss.backward()``, and :meth:`remove` to detach every hook.
    """

    def __init__(self, model: nn.Module, residual_blocks: Optional[Sequence[Union[str, nn.Module]]] = None,
                 every: int = 1) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError("`model` must be a torch.nn.Module")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"`every` must be a positive integer; got {every!r}")
        self.every = every
        self.enabled = True
        self._handles: list = []
        self._records: Dict[str, Dict[str, List[float]]] = {}
        self._calls: Dict[str, int] = {}
        names = {m: n for n, m in model.named_modules()}
        self.mixing_modules: Dict[str, nn.Module] = {
            (n or "model"): m for n, m in model.named_modules() if is_mixing_module(m)}
        self.residual_modules: Dict[str, nn.Module] = {}
        for b in residual_blocks or ():
            if isinstance(b, str):
                mods = dict(model.named_modules())
                if b not in mods:
                    raise ValueError(f"`residual_blocks`: no submodule named {b!r}")
                self.residual_modules[b] = mods[b]
            elif isinstance(b, nn.Module):
                if b not in names:
                    raise ValueError("`residual_blocks`: a module that is not part of `model`")
                self.residual_modules[names[b] or "model"] = b
            else:
                raise TypeError("`residual_blocks` must hold modules or their names")
        if not self.mixing_modules and not self.residual_modules:
            raise ValueError("`model` has no mixing module (no `last_mixing`) and no residual block was given")
        for n, m in self.mixing_modules.items():
            self._handles.append(m.register_forward_hook(self._mixing_hook(n)))
        for n, m in self.residual_modules.items():
            self._handles.append(m.register_forward_hook(self._residual_hook(n)))

    # ------------------------------------------------------------------------------------------
    def _due(self, name: str) -> bool:
        if not self.enabled:
            return False
        c = self._calls.get(name, 0)
        self._calls[name] = c + 1
        return c % self.every == 0

    def _put(self, name: str, metrics: Dict[str, float]) -> None:
        rec = self._records.setdefault(name, {})
        for k, v in metrics.items():
            rec.setdefault(k, []).append(v)

    def _mixing_hook(self, name: str):
        def hook(module, inputs, output):
            if self._due(name):
                self._put(name, mixing_metrics(module))
        return hook

    def _residual_hook(self, name: str):
        def hook(module, inputs, output):
            if self._due("residual:" + name):
                X = output[0] if isinstance(output, (tuple, list)) else output
                self._put(name, {"token_spread": float(token_spread(X.detach()).mean())})
        return hook

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def record_grads(self) -> None:
        """Append the gradient norm of every hooked module's parameters (call after backward)."""
        for name, m in list(self.mixing_modules.items()) + list(self.residual_modules.items()):
            sq = [p.grad.double().pow(2).sum() for p in m.parameters() if p.grad is not None]
            if sq:
                self._put(name, {"grad_norm": float(torch.stack(sq).sum().sqrt())})

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Context manager: forwards inside it are not recorded."""
        old, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = old

    def remove(self) -> None:
        """Remove every hook (the recorded history is kept)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def history(self) -> Dict[str, Dict[str, np.ndarray]]:
        """``{module name: {metric: array (n_records,)}}``."""
        return {n: {k: np.asarray(v, dtype=np.float64) for k, v in r.items()}
                for n, r in self._records.items()}

    def clear(self) -> None:
        """Forget the recorded history (hooks stay)."""
        self._records, self._calls = {}, {}

    def __enter__(self) -> "Diagnostics":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"Diagnostics(mixing={list(self.mixing_modules)}, residual={list(self.residual_modules)}, "
                f"hooks={len(self._handles)})")
