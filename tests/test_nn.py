"""Tests of bistochastic.nn: Sinkhorn attention, the diagnostics hooks and the ensemble wrapper."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bistochastic as bs
from bistochastic.nn import Diagnostics, Ensemble, SinkhornAttention, SinkhornEncoder


def _x(B=3, T=6, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, d, generator=g, dtype=torch.float64).to(dtype)


def _att(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("n_heads", 2)
    return SinkhornAttention(8, **kw).double()


# --------------------------------------------------------------------------------------------
# doubly-stochastic weights


@pytest.mark.parametrize("logit_scale", ["free", "qk_norm", "cosine"])
@pytest.mark.parametrize("tau", [0.3, 1.0, 10.0])
def test_weights_are_doubly_stochastic(logit_scale, tau):
    att = _att(logit_scale=logit_scale, tau=tau, n_iter=None, tol=1e-12, max_iter=5000)
    x = _x()
    att(x)
    M = att.last_mixing
    assert M.shape == (3, 2, 6, 6)
    assert bool((M >= 0).all())
    # rows are normalised last: exact up to round-off; columns to the solver's tolerance
    assert float((M.sum(-1) - 1).abs().max()) < 1e-12
    assert float((M.sum(-2) - 1).abs().max()) < 1e-10
    assert float(att.last_marginal_error.max()) <= 1e-12


def test_fixed_iterations_rows_exact_columns_reported():
    att = _att(tau=0.05, n_iter=3)
    att(_x())
    M = att.last_mixing
    assert float((M.sum(-1) - 1).abs().max()) < 1e-12
    col = (M.sum(-2) - 1).abs().sum(-1) / M.shape[-1]
    # the reported error is the relative L1 column violation of the returned matrix
    assert torch.allclose(att.last_marginal_error, col, atol=1e-12)


def test_frozen_scales_bound_the_scores():
    x = _x() * 100
    for scale, bound in (("cosine", 1.0), ("qk_norm", math.sqrt(4))):
        att = _att(logit_scale=scale)
        with torch.no_grad():
            att.q_proj.weight.mul_(50)
        S = att.scores(x).detach()
        assert float(S.abs().max()) <= bound * (1 + 1e-12)


def test_first_order_law_at_high_temperature():
    # sigma_2(M) -> ||P S P||_2 / (n tau) as tau grows (Chapter 3's law), checked on the layer
    att = _att(n_iter=None, tol=1e-13, max_iter=5000, tau=1e4)
    x = _x()
    att(x)
    S = att.last_logits
    law = bs.spectral.sigma2(S) / (6 * 1e4)
    got = bs.spectral.sigma2(att.last_mixing)
    assert torch.allclose(got, law, rtol=1e-3)


# --------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("grad", ["unroll", "implicit"])
def test_gradcheck(grad):
    kw = dict(n_iter=None, tol=1e-13, max_iter=5000) if grad == "implicit" else dict(n_iter=15)
    att = _att(tau=0.7, grad=grad, **kw)
    x = _x(B=2, T=4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: att(z), (x,), eps=1e-6, atol=1e-6)


def test_gradcheck_with_padding():
    att = _att(tau=0.7, n_iter=15)
    x = _x(B=2, T=4).requires_grad_(True)
    mask = torch.tensor([[False, False, True, False], [False, False, False, False]])
    assert torch.autograd.gradcheck(lambda z: att(z, mask), (x,), eps=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Softmax switch


def _sdpa_reference(att: SinkhornAttention, x, mask=None):
    B, T, d = x.shape
    H, dh = att.n_heads, att.d_head

    def heads(y):
        return y.view(B, T, H, dh).transpose(1, 2)

    q, k, v = heads(att.q_proj(x)), heads(att.k_proj(x)), heads(att.v_proj(x))
    am = None if mask is None else (~mask)[:, None, None, :]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=am, scale=1.0 / (math.sqrt(dh) * att.tau))
    return att.out_proj(y.transpose(1, 2).reshape(B, T, d))


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_softmax_switch_equals_sdpa(tau):
    att = _att(normalization="softmax", tau=tau)
    x = _x()
    assert torch.allclose(att(x), _sdpa_reference(att, x), atol=1e-12)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, 4:] = True
    mask[2, 1] = True
    assert torch.allclose(att(x, mask), _sdpa_reference(att, x, mask), atol=1e-12)


# --------------------------------------------------------------------------------------------
# padding


def _mask():
    m = torch.zeros(3, 6, dtype=torch.bool)
    m[0, 4:] = True  # suffix padding
    m[1, [0, 3]] = True  # padding anywhere
    return m


@pytest.mark.parametrize("normalization", ["sinkhorn", "softmax"])
def test_padded_tokens_do_not_reach_valid_outputs(normalization):
    att = _att(normalization=normalization, n_iter=30)
    x, mask = _x(), _mask()
    y = att(x, mask)
    x2 = x.clone()
    x2[mask] = 1e3 * torch.randn(int(mask.sum()), 8, dtype=torch.float64)
    y2 = att(x2, mask)
    assert torch.allclose(y[~mask], y2[~mask], atol=1e-10)


def test_padding_equals_the_unpadded_problem():
    att = _att(n_iter=30)
    x, mask = _x(), _mask()
    y = att(x, mask)
    M = att.last_mixing
    for b in range(3):
        keep = torch.nonzero(~mask[b]).flatten()
        yb = att(x[b:b + 1, keep])
        assert torch.allclose(y[b, keep], yb[0], atol=1e-12)
        # the valid block is the unpadded problem's DSM; padded tokens attend only to themselves
        assert torch.allclose(M[b][:, keep][:, :, keep], att.last_mixing[0], atol=1e-12)
        pad = torch.nonzero(mask[b]).flatten()
        for p in pad.tolist():
            assert torch.equal(M[b, :, p], F.one_hot(torch.tensor(p), 6).double().expand(2, 6))
            assert float(M[b, :, :, p].sum(-1).sub(1).abs().max()) < 1e-12


def test_masks_refused_when_malformed():
    att = _att()
    x = _x()
    with pytest.raises(TypeError, match="key_padding_mask"):
        att(x, torch.zeros(3, 6))
    with pytest.raises(ValueError, match="key_padding_mask"):
        att(x, torch.zeros(3, 5, dtype=torch.bool))
    full = torch.zeros(3, 6, dtype=torch.bool)
    full[1] = True
    with pytest.raises(ValueError, match="key_padding_mask"):
        att(x, full)


def test_causal_refused_with_reason():
    att = _att()
    with pytest.raises(ValueError, match="identity"):
        att(_x(), is_causal=True)
    with pytest.raises(ValueError, match="attn_mask"):
        att(_x(), attn_mask=torch.ones(6, 6, dtype=torch.bool))


def test_lower_triangular_dsm_is_identity():
    # the reason of the refusal: Sinkhorn on a lower-triangular support converges to I
    T = 5
    S = torch.randn(T, T, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    S = S.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), -60.0)
    P = bs.project_dsm(S, 1.0, n_iter=3000).plan
    assert float((P - torch.eye(T, dtype=torch.float64)).abs().max()) < 1e-3


# --------------------------------------------------------------------------------------------
# bad input


def test_bad_arguments_refused():
    with pytest.raises(ValueError, match="n_heads"):
        SinkhornAttention(10, 3)
    with pytest.raises(ValueError, match="tau"):
        SinkhornAttention(8, 2, tau=0.0)
    with pytest.raises(ValueError, match="normalization"):
        SinkhornAttention(8, 2, normalization="sparsemax")
    with pytest.raises(ValueError, match="logit_scale"):
        SinkhornAttention(8, 2, logit_scale="learned")
    with pytest.raises(ValueError, match="n_iter"):
        SinkhornAttention(8, 2, n_iter=0)
    with pytest.raises(ValueError, match="grad"):
        SinkhornAttention(8, 2, grad="adjoint")
    att = _att()
    with pytest.raises(ValueError, match="`x`"):
        att(torch.zeros(2, 5, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="`x`"):
        att(torch.zeros(5, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="`x`"):
        att(torch.zeros(2, 5, 8, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_follows(dtype):
    torch.manual_seed(0)
    att = SinkhornAttention(8, 2).to(dtype)
    y = att(_x(dtype=dtype))
    assert y.dtype == dtype and att.last_mixing.dtype == dtype


# --------------------------------------------------------------------------------------------
# diagnostics


def _encoder(**kw):
    torch.manual_seed(0)
    return SinkhornEncoder(1, 8, 1, layers=3, n_heads=2, n_iter=10, **kw).double()


def _double_centered_std(S):
    C = S - S.mean(-1, keepdim=True) - S.mean(-2, keepdim=True) + S.mean((-2, -1), keepdim=True)
    return C.pow(2).mean((-2, -1)).sqrt()


def test_hooks_record_what_they_claim():
    model = _encoder(tau=2.0)
    diag = Diagnostics(model, residual_blocks=list(model.blocks))
    x = _x(B=4, T=5, d=1)
    out = model(x)
    out.pow(2).mean().backward()
    diag.record_grads()
    h = diag.history
    for l, blk in enumerate(model.blocks):
        rec = h[f"blocks.{l}.attn"]
        M, S = blk.attn.last_mixing, blk.attn.last_logits
        assert rec["sigma2"].shape == (1,)
        assert rec["sigma2"][0] == pytest.approx(float(bs.spectral.sigma2(M).mean()), rel=1e-12)
        assert rec["sigma2_max"][0] == pytest.approx(float(bs.spectral.sigma2(M).max()), rel=1e-12)
        sp = _double_centered_std(S) / 2.0
        assert rec["logit_spread"][0] == pytest.approx(float(sp.mean()), rel=1e-12)
        assert rec["eff_temperature"][0] == pytest.approx(float((1 / sp).mean()), rel=1e-12)
        gn = torch.sqrt(sum(p.grad.pow(2).sum() for p in blk.attn.parameters()))
        assert h[f"blocks.{l}.attn"]["grad_norm"][0] == pytest.approx(float(gn), rel=1e-12)
    # token spread of the residual stream after block 1, recomputed from a direct forward
    h1 = model.embed(x)
    for blk in model.blocks[:2]:
        h1 = blk(h1)
    P = h1 - h1.mean(1, keepdim=True)
    direct = (P.flatten(1).norm(dim=1) / h1.flatten(1).norm(dim=1)).mean()
    assert h["blocks.1"]["token_spread"][0] == pytest.approx(float(direct.detach()), rel=1e-12)


def test_hooks_with_padding_use_valid_blocks():
    att = _att(n_iter=30)
    diag = Diagnostics(att)
    x, mask = _x(), _mask()
    att(x, mask)
    vals = []
    for b in range(3):
        keep = torch.nonzero(~mask[b]).flatten()
        att(x[b:b + 1, keep])
        vals.append(bs.spectral.sigma2(att.last_mixing[0]))
    assert diag.history["model"]["sigma2"][0] == pytest.approx(float(torch.cat(vals).mean()), rel=1e-10)


def test_hooks_every_paused_and_removable():
    model = _encoder()
    diag = Diagnostics(model, residual_blocks=["blocks.0"], every=2)
    x = _x(B=2, T=4, d=1)
    for _ in range(5):
        model(x)
    with diag.paused():
        model(x)
    assert len(diag.history["blocks.0.attn"]["sigma2"]) == 3
    assert len(diag.history["blocks.0"]["token_spread"]) == 3
    diag.remove()
    model(x)
    assert len(diag.history["blocks.0.attn"]["sigma2"]) == 3
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_diagnostics_bad_input():
    with pytest.raises(TypeError, match="model"):
        Diagnostics("not a model")
    with pytest.raises(ValueError, match="mixing module"):
        Diagnostics(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="residual_blocks"):
        Diagnostics(_encoder(), residual_blocks=["nope"])
    with pytest.raises(ValueError, match="every"):
        Diagnostics(_encoder(), every=0)


# --------------------------------------------------------------------------------------------
# ensemble


def test_ensemble_matches_separate_members():
    taus = [1.0, 10.0, 3.0]

    def make(g):
        torch.manual_seed(g)
        return SinkhornEncoder(1, 8, 1, layers=2, n_heads=2, n_iter=5, tau=taus[g]).double()

    ens = Ensemble(make, 3)
    x = _x(B=4, T=5, d=1).expand(3, 4, 5, 1).contiguous()
    y = torch.randn(3, 4, 5, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def mse(o, t):
        return (o - t).pow(2).mean()

    loss, out = ens.loss_and_grad(mse, x, y)
    for g in range(3):
        m = make(g)
        assert m.blocks[0].attn.tau == taus[g]
        lg = mse(m(x[g]), y[g])
        lg.backward()
        assert float(loss[g]) == pytest.approx(float(lg.detach()), rel=1e-12)
        for name, p in zip(ens.names, ens.params):
            assert torch.allclose(p.grad[g], dict(m.named_parameters())[name].grad, atol=1e-12)
        mm = ens.member(g)
        assert mm.blocks[1].attn.tau == taus[g]
        assert torch.allclose(mm(x[g]), out[g], atol=1e-12)


# --------------------------------------------------------------------------------------------
# the ranking experiment


def test_ranking_batch_and_floor():
    x, r = bs.nn.ranking_batch(4000, 5, torch.Generator().manual_seed(0))
    assert x.shape == r.shape == (4000, 5, 1)
    # ranks are a permutation of 0..T-1 (normalised) that sorts x
    assert torch.equal(r.squeeze(-1).sort(-1).values[0], torch.arange(5, dtype=torch.float64) / 4)
    assert bool((x.squeeze(-1).gather(1, r.squeeze(-1).mul(4).long().argsort(1)).diff(dim=1) > 0).all())
    # predicting the own value x attains the floor 1/(6(T-1)); Monte Carlo within 4 standard errors
    e = (x - r).pow(2).mean((1, 2))
    floor = bs.nn.no_attention_floor(5)
    assert abs(float(e.mean()) - floor) < 4 * float(e.std()) / math.sqrt(4000)


def test_train_run_shapes_and_pairing():
    kw = dict(taus=(1.0, 10.0), seeds=(0, 1), steps=4, checkpoints=(0, 2, 4), test_size=16,
              probe_size=8, d_model=8, batch=4, T=4, n_iter=3)
    r = bs.nn.train_run("sinkhorn", "free", 2, **kw)
    assert r.test_loss.shape == (3, 4) and r.sigma2.shape == (3, 4, 2)
    assert r.product_gain.shape == (3, 4)
    assert np.isnan(r.grad_norm[0]).all() and np.isfinite(r.grad_norm[1:]).all()
    assert r.member(10.0, 1) == 3 and r.by_tau(r.test_loss, 10.0).shape == (3, 2)
    # the same seed starts from the same weights whatever tau: equal first-layer scores at step
    # 0, so their spread in units of tau differs exactly by the ratio of the temperatures
    np.testing.assert_allclose(r.logit_spread[0, 0, 0], 10 * r.logit_spread[0, 2, 0], rtol=1e-10)
    s = bs.nn.train_run("softmax", "free", 2, **kw)
    assert np.isnan(s.marginal_error).all()
    np.testing.assert_allclose(s.test_loss[0], r.test_loss[0], rtol=0.5)


# --------------------------------------------------------------------------------------------
# the point-cloud task, the identity control, batched evaluation, first crossings


def test_pointcloud_batch_geometry():
    g = torch.Generator().manual_seed(0)
    x, y = bs.nn.pointcloud_batch(600, 10, g, noise=0.0, scale=(1.0, 1.0), shift=0.0)
    assert x.shape == (600, 10, 2) and y.shape == (600,) and y.dtype == torch.long
    assert set(y.tolist()) == set(range(len(bs.nn.POINTCLOUD_SHAPES)))
    r = x.norm(dim=-1)
    names = bs.nn.POINTCLOUD_SHAPES
    # without noise, scale and shift: circle points at radius 1; the cross on the two axes
    # of its (rotated) frame, radius <= 1; triangle points between the inradius 1/2 and 1
    circ = y == names.index("circle")
    assert torch.allclose(r[circ], torch.ones_like(r[circ]), atol=1e-12)
    tri = r[y == names.index("triangle")]
    assert float(tri.min()) >= 0.5 - 1e-12 and float(tri.max()) <= 1 + 1e-12
    cr = x[y == names.index("cross")]
    assert float(cr.norm(dim=-1).max()) <= 1 + 1e-12
    # cross points lie on two perpendicular lines through the origin: cos(angle between any
    # two points) is 0 or +-1
    u = cr / cr.norm(dim=-1, keepdim=True)
    c = (u @ u.transpose(-1, -2)).abs()
    assert bool(((c < 1e-9) | (c > 1 - 1e-9)).all())
    # same generator state, same clouds; shift moves the centroid by N(0, I)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(bs.nn.pointcloud_batch(8, 6, g1)[0], bs.nn.pointcloud_batch(8, 6, g2)[0])
    xs, _ = bs.nn.pointcloud_batch(4000, 6, torch.Generator().manual_seed(1), noise=0.0)
    cent = xs.mean(1)
    assert abs(float(cent.std()) - 1.0) < 0.1


def test_pointcloud_batch_bad_input():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="shapes"):
        bs.nn.pointcloud_batch(4, 6, g, shapes=("circle",))
    with pytest.raises(ValueError, match="shapes"):
        bs.nn.pointcloud_batch(4, 6, g, shapes=("circle", "hexagon"))
    with pytest.raises(ValueError, match="noise"):
        bs.nn.pointcloud_batch(4, 6, g, noise=-1.0)
    with pytest.raises(ValueError, match="T"):
        bs.nn.pointcloud_batch(4, 1, g)


def test_identity_normalization_mixes_nothing():
    att = _att(normalization="identity")
    x = _x()
    y = att(x)
    assert torch.equal(att.last_mixing, torch.eye(6, dtype=torch.float64).expand(3, 2, 6, 6))
    # each token's output depends on its own input only
    x2 = x.clone()
    x2[:, 0] += 1.0
    assert torch.allclose(att(x2)[:, 1:], y[:, 1:], atol=1e-14)


def test_train_run_pointcloud_and_identity_control():
    kw = dict(taus=(1.0, 10.0), seeds=(0, 1), steps=3, checkpoints=(0, 3), test_size=32,
              probe_size=8, d_model=8, batch=4, T=6, n_iter=3, task="pointcloud")
    r = bs.nn.train_run("sinkhorn", "free", 1, **kw)
    acc = r.extra["test_acc"]
    assert acc.shape == (2, 4) and ((acc >= 0) & (acc <= 1)).all()
    # cross-entropy at initialisation is near log(number of classes)
    assert np.all(np.abs(r.test_loss[0] - math.log(3)) < 0.5)
    i = bs.nn.train_run("identity", "free", 1, **kw)
    np.testing.assert_allclose(i.sigma2[:, :, 0], 1.0, atol=1e-12)  # the identity's sigma_2
    # diagnostics=False: batched evaluation gives the same test loss as member by member
    q = bs.nn.train_run("sinkhorn", "free", 1, diagnostics=False, **kw)
    np.testing.assert_allclose(q.test_loss, r.test_loss, rtol=1e-10)
    np.testing.assert_allclose(q.extra["test_acc"], acc)
    assert np.isnan(q.sigma2).all()
    with pytest.raises(ValueError, match="task"):
        bs.nn.train_run("sinkhorn", "free", 1, **{**kw, "task": "nope"})


def test_batched_forward_matches_members():
    def make(g):
        torch.manual_seed(g)
        return SinkhornEncoder(1, 8, 1, layers=1, n_heads=2, n_iter=4, tau=1.0 + g).double()

    ens = Ensemble(make, 3)
    x = _x(B=2, T=5, d=1)
    out = ens.batched_forward(x, shared_input=True)
    for g in range(3):
        assert torch.allclose(out[g], ens.member(g)(x), atol=1e-12)
    assert ens.template.blocks[0].attn.record  # restored after vmap


class _TiedLM(torch.nn.Module):
    """A toy language model whose output head is tied to its embedding."""

    def __init__(self, g):
        super().__init__()
        gen = torch.Generator().manual_seed(g)
        self.embed = torch.nn.Embedding(7, 4).double()
        self.head = torch.nn.Linear(4, 7, bias=False).double()
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(7, 4, generator=gen, dtype=torch.float64))
        self.head.weight = self.embed.weight  # tied

    def forward(self, idx):
        return self.head(torch.tanh(self.embed(idx)))


def test_ensemble_keeps_tied_weights():
    # moving the template to the meta device must not untie a head from its embedding:
    # an untied copy would compute with uninitialised memory, silently
    members = [_TiedLM(g) for g in range(2)]
    ens = Ensemble(lambda g: _TiedLM(g), 2)
    assert ens.template.head.weight is ens.template.embed.weight
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    tgt = torch.tensor([[2, 3, 4], [5, 6, 0]])

    def loss_fn(out, t):
        return torch.nn.functional.cross_entropy(out.reshape(-1, 7), t.reshape(-1))

    loss, out = ens.loss_and_grad(loss_fn, idx, torch.stack([tgt, tgt]), shared_input=True)
    for g, m in enumerate(members):
        ref = loss_fn(m(idx), tgt)
        ref.backward()
        assert torch.allclose(loss[g], ref.detach(), rtol=1e-12)
        assert torch.allclose(ens.params[0].grad[g], m.embed.weight.grad, rtol=1e-10)
        mg = ens.member(g)
        assert mg.head.weight is mg.embed.weight
        assert torch.allclose(mg(idx), m(idx), rtol=1e-12)
    assert len(ens.names) == 1  # one stacked tensor for the tied pair


def test_uniform_normalization_is_the_trap_limit():
    att = _att(normalization="uniform")
    x = _x()
    y = att(x)
    assert torch.allclose(att.last_mixing, torch.full((3, 2, 6, 6), 1 / 6, dtype=torch.float64))
    # every token gets the same output: out_proj(mean of values)
    assert torch.allclose(y, y[:, :1].expand_as(y), atol=1e-14)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[:, 4:] = True
    att(x, mask)
    M = att.last_mixing
    assert torch.allclose(M[..., :4], torch.full_like(M[..., :4], 0.25)) and bool((M[..., 4:] == 0).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("normalization", ["sinkhorn", "softmax"])
def test_gpu_attention_matches_cpu(normalization):
    # device follows the input: the same layer on CUDA gives the CPU's output and gradients
    att = _att(normalization=normalization)
    att_gpu = _att(normalization=normalization).cuda()
    att_gpu.load_state_dict(att.state_dict())
    x = _x()
    outs, grads = [], []
    for layer, dev in ((att, "cpu"), (att_gpu, "cuda")):
        xi = x.to(dev, copy=True).requires_grad_()  # a fresh leaf on each device
        y = layer(xi)
        (y.square().sum()).backward()
        outs.append(y.detach().cpu())
        grads.append(xi.grad.cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-8, atol=1e-10)
