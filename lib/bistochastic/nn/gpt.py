"""A small character-level GPT (nanoGPT kind) whose residual is plain or mHC hyper-connections.

``GPT(GPTConfig(...))``: token and position embeddings, ``n_layer`` pre-norm blocks (causal
Softmax self-attention, then a 4x GELU MLP), a final LayerNorm and a tied output head. With
``residual="hyper"`` every attention and MLP sub-block is wrapped in a
:class:`~bistochastic.nn.hyper.HyperConnections` over ``n_streams`` streams: the embedding is
expanded to copies ``(B, T, n, d)`` (:func:`~bistochastic.nn.hyper.expand_streams`, plus an
optional learned per-stream offset, ``stream_init="embed"``) and averaged back before the final
norm. :func:`train` runs AdamW on a packaged corpus and records the diagnostics of the mixing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
import copy
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .corpus import Corpus, load_corpus
from .hyper import (HyperConnections, collapse_streams, depth_product_sigma2, expand_streams,
                    identity_distance)

__all__ = ["GPTConfig", "GPT", "CausalSelfAttention", "MLP", "TrainLog", "train",
           "train_ensemble", "evaluate", "load_corpus", "Corpus"]


@dataclass
class GPTConfig:
    """Sizes and residual of :class:`GPT`.

    ``residual``: ``"plain"`` or ``"hyper"``; the ``hc_*`` fields are passed to every
    :class:`HyperConnections` (``hc_mode``, ``hc_init``, ``hc_tau``, ``hc_offdiag``,
    ``hc_n_iter``, ``hc_pre_init``). ``stream_init``: ``"copy"`` (streams start as copies of the
    embedding) or ``"embed"`` (plus a learned per-stream offset, which breaks their symmetry).
    """

    vocab_size: int
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 32
    residual: str = "plain"
    n_streams: int = 4
    hc_mode: str = "static"
    hc_init: str = "identity"
    hc_tau: Optional[float] = None
    hc_offdiag: Optional[float] = None
    hc_n_iter: int = 20
    hc_pre_init: str = "uniform"
    stream_init: str = "copy"


class CausalSelfAttention(nn.Module):
    """Multi-head causal Softmax attention, ``(B, T, d) -> (B, T, d)``."""

    def __init__(self, d: int, n_head: int):
        super().__init__()
        if d % n_head:
            raise ValueError(f"n_head: must divide n_embd={d}, got {n_head}")
        self.n_head = n_head
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        # explicit masked Softmax (equals F.scaled_dot_product_attention(..., is_causal=True);
        # written out so that torch.func.vmap batches it over an ensemble of models)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.n_head)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        y = s.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class MLP(nn.Module):
    """``d -> 4d -> d`` with GELU, ``(..., d) -> (..., d)``."""

    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class GPT(nn.Module):
    """Character-level GPT. ``forward(idx (B, T)) -> logits (B, T, vocab)``.

    ``forward(idx, targets)`` returns ``(logits, loss)`` with the mean cross-entropy. Weights
    are drawn from ``generator`` (a CPU ``torch.Generator``) when given: first the embeddings and
    blocks (the same draws whatever the residual, so a plain and a hyper model built from equal
    generators share their block weights), then the per-stream offsets and mixing parameters.
    """

    def __init__(self, config: GPTConfig, generator: Optional[torch.Generator] = None):
        super().__init__()
        c = config
        if c.residual not in ("plain", "hyper"):
            raise ValueError(f"residual: expected 'plain' or 'hyper', got {c.residual!r}")
        if c.stream_init not in ("copy", "embed"):
            raise ValueError(f"stream_init: expected 'copy' or 'embed', got {c.stream_init!r}")
        self.config = c
        d = c.n_embd
        self.tok = nn.Embedding(c.vocab_size, d)
        self.pos = nn.Embedding(c.block_size, d)
        self.blocks = nn.ModuleList()
        for l in range(c.n_layer):
            for j, f in enumerate((nn.Sequential(nn.LayerNorm(d), CausalSelfAttention(d, c.n_head)),
                                   nn.Sequential(nn.LayerNorm(d), MLP(d)))):
                if c.residual == "hyper":
                    f = HyperConnections(f, d, c.n_streams, mode=c.hc_mode, init=c.hc_init,
                                         tau=c.hc_tau, offdiag=c.hc_offdiag, n_iter=c.hc_n_iter,
                                         pre_init=c.hc_pre_init, layer_index=2 * l + j)
                self.blocks.append(f)
        self.stream_embed = (nn.Parameter(torch.zeros(c.n_streams, d))
                             if c.residual == "hyper" and c.stream_init == "embed" else None)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, c.vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied
        self._init_weights(generator)
        for h in self.hyper_layers():  # drawn after the blocks: same block weights as "plain"
            h.reset_parameters(generator)

    def _init_weights(self, g: Optional[torch.Generator]) -> None:
        std_proj = 0.02 / math.sqrt(2 * self.config.n_layer)
        named = sorted(self.named_parameters(), key=lambda kv: kv[0] == "stream_embed")
        for name, p in named:  # the per-stream offsets last: the same block draws as "plain"
            if isinstance(self.config, GPTConfig) and ("res_logits" in name or "pre_logits" in name
                                                       or "post_logits" in name or "alpha" in name
                                                       or "phi" in name or "norm_weight" in name):
                continue  # HyperConnections initialise their own parameters
            if p.dim() >= 2 or name.endswith("stream_embed"):
                std = std_proj if name.endswith("proj.weight") else 0.02
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def hyper_layers(self) -> List[HyperConnections]:
        """The :class:`HyperConnections` modules in depth order (empty for a plain residual)."""
        return [b for b in self.blocks if isinstance(b, HyperConnections)]

    def mixing_matrices(self) -> List[Tensor]:
        """``last_mixing`` of every hyper-connection, depth order (after a forward)."""
        return [h.last_mixing for h in self.hyper_layers()]

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"idx: sequence length {T} exceeds block_size "
                             f"{self.config.block_size}")
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        if self.config.residual == "hyper":
            x = expand_streams(x, self.config.n_streams)
            if self.stream_embed is not None:
                x = x + self.stream_embed
            for b in self.blocks:
                x = b(x)
            x = collapse_streams(x)
        else:
            for b in self.blocks:
                x = x + b(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


@dataclass
class TrainLog:
    """What :func:`train` recorded, one entry per evaluation step.

    ``step``, ``val_loss``, ``train_loss`` (mean of the steps since the last evaluation),
    ``grad_norm`` (global, before clipping), ``res_grad_norm`` (of all ``H_res`` logits and
    dynamic weights), ``id_dist`` (per hyper-connection, the token-mean ``||H_res - I||_F`` on
    the validation probe batch, list of lists), ``sigma2_prod`` (token-mean ``sigma_2`` of the
    depth product of ``H_res``), ``sigma2_layers`` (per layer, token-mean ``sigma_2(H_res)``),
    ``stream_spread`` (relative spread of the streams before the collapse), ``mixing`` (the
    token-mean ``H_res`` of every hyper-connection, a ``(L, n, n)`` float64 tensor).
    """

    step: List[int] = field(default_factory=list)
    val_loss: List[float] = field(default_factory=list)
    train_loss: List[float] = field(default_factory=list)
    grad_norm: List[float] = field(default_factory=list)
    res_grad_norm: List[float] = field(default_factory=list)
    id_dist: List[List[float]] = field(default_factory=list)
    sigma2_prod: List[float] = field(default_factory=list)
    sigma2_layers: List[List[float]] = field(default_factory=list)
    stream_spread: List[float] = field(default_factory=list)
    mixing: List[Tensor] = field(default_factory=list)

    def add(self, step: int, ev: Dict[str, object], running: Sequence[float], grad_norm: float,
            res_grad_norm: float) -> None:
        """Append one evaluation: ``ev`` from :func:`evaluate`, ``running`` the training losses
        since the last evaluation (their mean is logged; ``nan`` if none)."""
        self.step.append(step)
        self.val_loss.append(ev["val_loss"])
        self.train_loss.append(sum(running) / len(running) if running else float("nan"))
        self.grad_norm.append(grad_norm)
        self.res_grad_norm.append(res_grad_norm)
        if "id_dist" in ev:
            self.id_dist.append(ev["id_dist"])
            self.sigma2_prod.append(ev["sigma2_prod"])
            self.sigma2_layers.append(ev["sigma2_layers"])
            self.stream_spread.append(ev["stream_spread"])
            self.mixing.append(ev["mixing"])


@torch.no_grad()
def evaluate(model: GPT, x: Tensor, y: Tensor) -> Dict[str, object]:
    """Validation loss and mixing diagnostics on one probe batch ``x, y (B, T)``."""
    from .. import spectral

    spread = []
    handle = None
    if model.config.residual == "hyper":
        last = model.hyper_layers()[-1]

        def hook(mod, inp, out):  # streams after the last block, before the collapse
            dev = out - out.mean(-2, keepdim=True)
            spread.append(float(dev.norm() / out.norm().clamp_min(1e-30)))

        handle = last.register_forward_hook(hook)
    _, loss = model(x, y)
    if handle is not None:
        handle.remove()
    out: Dict[str, object] = {"val_loss": float(loss)}
    Hs = model.mixing_matrices()
    if Hs:
        Hs64 = [H.double() for H in Hs]
        out["id_dist"] = [float(identity_distance(H).mean()) for H in Hs64]
        out["sigma2_layers"] = [float(spectral.sigma2(H).mean()) for H in Hs64]
        out["sigma2_prod"] = float(depth_product_sigma2(Hs64).mean())
        out["stream_spread"] = spread[0]
        out["mixing"] = torch.stack([H.reshape(-1, *H.shape[-2:]).mean(0).cpu() for H in Hs64])
    return out


def train(model: GPT, corpus: Corpus, *, steps: int, batch_size: int = 16, lr: float = 3e-3,
          weight_decay: float = 0.0, eval_every: int = 50, eval_batch: int = 32,
          generator: Optional[torch.Generator] = None, clip: float = 1.0) -> TrainLog:
    """AdamW on random windows of ``corpus.train``; evaluates on a fixed validation probe batch.

    Batches are drawn from ``generator`` on the CPU and moved to the model's device. Gradients
    are clipped to global norm ``clip`` (recorded before clipping). Evaluations at step 0, every
    ``eval_every`` steps and at the end.
    """
    if steps < 1 or eval_every < 1:
        raise ValueError("steps and eval_every must be positive")
    dev = next(model.parameters()).device
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    bs = model.config.block_size
    xv, yv = corpus.batch("val", eval_batch, bs, torch.Generator().manual_seed(12345))
    xv, yv = xv.to(dev), yv.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    res_params = [p for n_, p in model.named_parameters()
                  if "res_logits" in n_ or n_.endswith(".phi") or n_.endswith(".alpha")]
    log = TrainLog()
    running: List[float] = []
    gn = rgn = float("nan")

    def record(step: int) -> None:
        model.eval()
        ev = evaluate(model, xv, yv)
        model.train()
        log.add(step, ev, running, gn, rgn)
        running.clear()

    record(0)
    model.train()
    for step in range(1, steps + 1):
        x, y = corpus.batch("train", batch_size, bs, g)
        _, loss = model(x.to(dev), y.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if res_params:
            rgn = float(torch.linalg.vector_norm(torch.stack(
                [p.grad.norm() if p.grad is not None else p.new_zeros(()) for p in res_params])))
        gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        opt.step()
        running.append(float(loss.detach()))
        if step % eval_every == 0 or step == steps:
            record(step)
    return log


def train_ensemble(models: Sequence[GPT], corpus: Corpus, *, steps: int, generators:
                   Sequence[torch.Generator], batch_size: int = 16, lr: float = 3e-3,
                   weight_decay: float = 0.0, eval_every: int = 50, eval_batch: int = 32,
                   clip: float = 1.0) -> List[TrainLog]:
    """:func:`train` for ``G`` models at once, as one batched program; one log per model.

    The models must share their architecture (same :class:`GPTConfig` up to the values held in
    parameters and buffers, e.g. ``hc_tau``, ``hc_init``, seeds). Member ``g`` draws its batches
    from ``generators[g]`` exactly as :func:`train` would, its gradient is clipped to global norm
    ``clip`` on its own, and AdamW (elementwise) acts on the stacked parameters: each member
    follows the trajectory :func:`train` gives it, up to round-off. Forward and backward of all
    members run under ``torch.func.vmap`` of ``torch.func.grad`` over the stacked parameters
    (an ordinary template model runs them, so the tied output head stays tied; a template moved
    to the ``meta`` device would lose the tie); evaluations run member by member. The models
    passed in are not modified.
    """
    models = list(models)
    G = len(models)
    if G < 1:
        raise ValueError("models: need at least one model")
    if len(generators) != G:
        raise ValueError(f"generators: expected {G} (one per model), got {len(generators)}")
    if steps < 1 or eval_every < 1:
        raise ValueError("steps and eval_every must be positive")
    names0 = [n_ for n_, _ in models[0].named_parameters()]
    for k, m in enumerate(models):
        if not isinstance(m, GPT):
            raise TypeError(f"models[{k}]: expected a GPT, got {type(m).__name__}")
        if [n_ for n_, _ in m.named_parameters()] != names0 or any(
                a.shape != b.shape for a, b in zip(m.parameters(), models[0].parameters())):
            raise ValueError(f"models[{k}]: architecture differs from models[0]")
    dev = next(models[0].parameters()).device
    stacked, buffers = torch.func.stack_module_state(models)
    names = list(stacked)
    params = [nn.Parameter(stacked[k]) for k in names]
    scratch = copy.deepcopy(models[0])  # evaluation: member g's weights copied in
    template = copy.deepcopy(models[0])  # the code vmap runs (never holds batched tensors)
    for h in template.hyper_layers():
        h.record = False
    own = dict(scratch.named_parameters())
    own_buf = dict(scratch.named_buffers())
    bsz = models[0].config.block_size
    xv, yv = corpus.batch("val", eval_batch, bsz, torch.Generator().manual_seed(12345))
    xv, yv = xv.to(dev), yv.to(dev)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    res_idx = [i for i, n_ in enumerate(names)
               if "res_logits" in n_ or n_.endswith(".phi") or n_.endswith(".alpha")]
    logs = [TrainLog() for _ in range(G)]
    running: List[List[float]] = [[] for _ in range(G)]
    gn = rgn = [float("nan")] * G

    def record(step: int) -> None:
        for g in range(G):
            with torch.no_grad():
                for k, p in zip(names, params):
                    own[k].copy_(p[g])
                for k, b in buffers.items():
                    own_buf[k].copy_(b[g])
            scratch.eval()
            ev = evaluate(scratch, xv, yv)
            logs[g].add(step, ev, running[g], gn[g], rgn[g])
            running[g].clear()

    def one(p, b, x, y):
        def f(p_):
            _, loss = torch.func.functional_call(template, (p_, b), (x, y))
            return loss
        return torch.func.grad_and_value(f)(p)

    grad_all = torch.func.vmap(one)

    record(0)
    for step in range(1, steps + 1):
        xs, ys = zip(*(corpus.batch("train", batch_size, bsz, gen) for gen in generators))
        x, y = torch.stack(xs).to(dev), torch.stack(ys).to(dev)
        grads_d, loss = grad_all({k: p.detach() for k, p in zip(names, params)}, buffers, x, y)
        grads = [grads_d[k] for k in names]
        for p, gr in zip(params, grads):
            p.grad = gr
        sq = torch.stack([gr.flatten(1).pow(2).sum(1) for gr in grads])  # (P, G)
        total = sq.sum(0).sqrt()
        if res_idx:
            rgn = sq[res_idx].sum(0).sqrt().tolist()
        gn = total.tolist()
        coef = (clip / (total + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
        for gr in grads:
            gr.mul_(coef.view(-1, *([1] * (gr.dim() - 1))).to(gr.dtype))
        opt.step()
        for g, v in enumerate(loss.tolist()):
            running[g].append(v)
        if step % eval_every == 0 or step == steps:
            record(step)
    return logs
