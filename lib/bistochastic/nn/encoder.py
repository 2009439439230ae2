"""A small pre-LayerNorm attention encoder, and an ensemble wrapper that trains many copies at once.

:class:`SinkhornEncoder` maps a set of ``T`` real feature vectors ``(B, T, d_in)`` to per-token
outputs ``(B, T, d_out)`` (or, with ``pool="mean"``, one output per set ``(B, d_out)``). It has no
positional encoding, so it is permutation-equivariant: any task it solves needs the tokens to
interact through attention. Block ``l``::

    x <- x + Attn_l(LN(x))        # SinkhornAttention (Sinkhorn or Softmax weights)
    x <- x + MLP_l(LN(x))         # optional

:class:`Ensemble` stacks the parameters of ``G`` independently initialised copies of one module and
runs them as one batched program with :func:`torch.func.vmap` (``G`` seeds or ``G`` temperatures in
one forward). Adam and SGD act elementwise, so one optimiser over the stacked parameters trains the
``G`` members exactly as ``G`` separate optimisers would. :meth:`Ensemble.member` returns an ordinary
module holding member ``g``'s weights (and gradients), for diagnostics with hooks.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .attention import SinkhornAttention

__all__ = ["SinkhornEncoder", "Ensemble"]


class _Block(nn.Module):
    def __init__(self, d_model: int, attn: SinkhornAttention, mlp: bool, residual: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = attn
        self.residual = residual
        self.mlp = None
        if mlp:
            self.ln2 = nn.LayerNorm(d_model)
            self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(),
                                     nn.Linear(2 * d_model, d_model))

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        a = self.attn(self.ln1(x), key_padding_mask)
        x = x + a if self.residual else a
        if self.mlp is not None:
            x = x + self.mlp(self.ln2(x))
        return x


class SinkhornEncoder(nn.Module):
    """A stack of ``layers`` attention blocks on sets of ``T`` tokens.

    Parameters
    ----------
    d_in, d_model, d_out : int
        Input features per token, model width, outputs per token (or per set with ``pool``).
    layers, n_heads : int
        Depth ``L`` and heads per attention layer.
    mlp : bool
        Add the MLP sub-block after each attention.
    residual : bool
        Skip connections around the attention (``False``: pure attention path, for rank studies).
    pool : {"none", "mean"}
        Per-token outputs, or the mean over (unpadded) tokens.
    **attn_kw
        Passed to every :class:`SinkhornAttention` (``normalization``, ``tau``, ``logit_scale``,
        ``n_iter``, ``grad``...).

    Notes
    -----
    Shapes: ``forward(x (B, T, d_in), key_padding_mask (B, T) or None) -> (B, T, d_out)`` or
    ``(B, d_out)``. Submodules: ``embed``, ``blocks`` (the residual stream after each block),
    ``blocks[l].attn``, ``norm``, ``head``.
    """

    def __init__(self, d_in: int, d_model: int, d_out: int, layers: int, n_heads: int = 1, *,
                 mlp: bool = True, residual: bool = True, pool: str = "none", **attn_kw) -> None:
        super().__init__()
        for name, v in (("d_in", d_in), ("d_model", d_model), ("d_out", d_out), ("layers", layers)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {v!r}")
        if pool not in ("none", "mean"):
            raise ValueError(f"`pool` must be 'none' or 'mean'; got {pool!r}")
        self.pool = pool
        self.d_in = d_in
        self.embed = nn.Linear(d_in, d_model)
        self.blocks = nn.ModuleList(
            _Block(d_model, SinkhornAttention(d_model, n_heads, **attn_kw), mlp, residual)
            for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, d_out)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.d_in:
            raise ValueError(f"`x` must have shape (B, T, d_in={self.d_in}); got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x)}")
        h = self.embed(x)
        for blk in self.blocks:
            h = blk(h, key_padding_mask)
        h = self.norm(h)
        if self.pool == "mean":
            if key_padding_mask is None:
                h = h.mean(1)
            else:
                w = (~key_padding_mask).to(h.dtype)[..., None]
                h = (h * w).sum(1) / w.sum(1)
        return self.head(h)

    def attention_layers(self) -> List[SinkhornAttention]:
        """The attention modules, input to output."""
        return [b.attn for b in self.blocks]


def _retied(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Give ``dst`` (a converted copy of ``src``) the weight ties of ``src``.

    ``Module.to("meta")`` and ``to_empty`` replace every parameter by a new object, so a weight
    that ``src`` shares between two modules (a language model's output head tied to its
    embedding) becomes two; ``functional_call`` would then fill only one of them, and the
    other would silently hold uninitialised memory. Returns ``dst``, re-tied in place."""
    first: Dict[int, str] = {}
    for name, p in src.named_parameters(remove_duplicate=False):
        if id(p) not in first:
            first[id(p)] = name
            continue
        owner, _, attr = name.rpartition(".")
        setattr(dst.get_submodule(owner) if owner else dst, attr,
                dst.get_parameter(first[id(p)]))
    return dst


class Ensemble(nn.Module):
    """``G`` independently initialised copies of a module, run as one batched program.

    Parameters
    ----------
    make : callable ``(g) -> nn.Module``
        Builds member ``g`` (seed your generator inside it for reproducible initialisations).
    size : int
        Number of members ``G``.

    Notes
    -----
    Training: :meth:`loss_and_grad` runs every member's forward and backward as one batched
    program (``vmap`` of ``torch.func.grad``) and fills the ``.grad`` of the stacked parameters
    (``self.params``: ordinary parameters of shape ``(G, *p.shape)``); any optimiser over
    ``ensemble.parameters()`` then steps. Inside ``vmap`` no data-dependent Python control flow
    is allowed: Sinkhorn layers must use a fixed ``n_iter`` with ``grad="unroll"``.
    ``forward(x (G, ...))`` evaluates member by member.
    """

    def __init__(self, make: Callable[[int], nn.Module], size: int) -> None:
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"`size` must be a positive integer; got {size!r}")
        members = [make(g) for g in range(size)]
        self.size = size
        params, buffers = torch.func.stack_module_state(members)
        self.names = list(params)
        self.params = nn.ParameterList(nn.Parameter(params[k]) for k in self.names)
        self._buffers_stacked: Dict[str, Tensor] = buffers
        # the template holds no state of its own: it is the code that functional_call runs
        self._template = [_retied(members[0], copy.deepcopy(members[0]).to("meta"))]

    @property
    def template(self) -> nn.Module:
        return self._template[0]

    def _state(self):
        return {k: p for k, p in zip(self.names, self.params)}, self._buffers_stacked

    def loss_and_grad(self, loss_fn: Callable[..., Tensor], x: Tensor, *targets: Tensor,
                      shared_input: bool = False):
        """One batched forward and backward of every member; sets ``.grad`` of :attr:`params`.

        ``loss_fn(output, *targets) -> scalar`` is applied per member to its output and its slice
        of each target (targets have a leading member axis ``G``). ``x`` is ``(G, ...)``, or
        ``(...)`` shared by all members with ``shared_input=True``. Returns ``(loss (G,),
        output (G, ...))``, detached. Gradients come from ``torch.func.grad`` inside ``vmap``
        (Sinkhorn layers must use a fixed ``n_iter`` with ``grad="unroll"``).
        """
        params, buffers = self._state()
        model = self.template
        detached = {k: p.detach() for k, p in params.items()}
        recorders = [m for m in model.modules() if hasattr(m, "record")]
        saved = [m.record for m in recorders]
        for m in recorders:  # batched tensors must not escape vmap through last_* attributes
            m.record = False

        def one(p, b, xx, *tt):
            def f(p_):
                out = torch.func.functional_call(model, (p_, b), (xx,))
                return loss_fn(out, *tt), out

            g, (loss, out) = torch.func.grad_and_value(f, has_aux=True)(p)
            return g, loss, out

        in_dims = (0, 0, None if shared_input else 0) + (0,) * len(targets)
        try:
            grads, loss, out = torch.func.vmap(one, in_dims=in_dims, randomness="different")(
                detached, buffers, x, *targets)
        finally:
            for m, r in zip(recorders, saved):
                m.record = r
        for k, prm in params.items():
            prm.grad = grads[k] if prm.grad is None else prm.grad + grads[k]
        return loss.detach(), out.detach()

    @torch.no_grad()
    def batched_forward(self, x: Tensor, shared_input: bool = False) -> Tensor:
        """Outputs of every member ``(G, ...)`` as one batched program (``vmap``, no gradients).

        ``x`` is ``(G, ...)``, or shared by all members with ``shared_input=True``. The modules'
        ``record`` flags are off inside (no diagnostics); use :meth:`member` for those.
        """
        params, buffers = self._state()
        model = self.template
        recorders = [m for m in model.modules() if hasattr(m, "record")]
        saved = [m.record for m in recorders]
        for m in recorders:
            m.record = False

        def one(p, b, xx):
            return torch.func.functional_call(model, (p, b), (xx,))

        try:
            return torch.func.vmap(one, in_dims=(0, 0, None if shared_input else 0))(
                {k: p.detach() for k, p in params.items()}, buffers, x)
        finally:
            for m, r in zip(recorders, saved):
                m.record = r

    def forward(self, x: Tensor, *args, shared_input: bool = False) -> Tensor:
        """Outputs of every member, ``(G, ...)``, computed member by member (ordinary modules,
        so any forward works, with or without gradients; use it for evaluation)."""
        outs = []
        for g in range(self.size):
            m = self.member(g, with_grads=False)
            outs.append(m(x if shared_input else x[g], *args))
        return torch.stack(outs)

    def member(self, g: int, with_grads: bool = True) -> nn.Module:
        """An ordinary module with member ``g``'s current weights (and gradients), on their device."""
        if not 0 <= g < self.size:
            raise ValueError(f"`g` must be in [0, {self.size}); got {g!r}")
        m = _retied(self.template,
                    copy.deepcopy(self.template).to_empty(device=self.params[0].device))
        own_params, own_buffers = dict(m.named_parameters()), dict(m.named_buffers())
        # named_parameters lists a tied weight once (load_state_dict would ask for both names)
        with torch.no_grad():
            for k, p in zip(self.names, self.params):
                own_params[k].copy_(p[g])
            for k, b in self._buffers_stacked.items():
                own_buffers[k].copy_(b[g])
        if with_grads:
            own = dict(m.named_parameters())
            for k, p in zip(self.names, self.params):
                if p.grad is not None:
                    own[k].grad = p.grad[g].detach().clone()
        return m
