"""Tests of bistochastic.models: the DSM mixing stack and its diagnostics."""

import math

import pytest
import torch

import bistochastic as bs
from bistochastic import models as md
from bistochastic import noise as nz


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def x_in(n=12, d=5, seed=0, dtype=torch.float64, batch=()):
    return torch.randn(*batch, n, d, generator=gen(seed), dtype=dtype)


def cfg(**kw):
    base = dict(n=12, d=5, layers=4, tau=1.0)
    base.update(kw)
    return md.MixingStackConfig(**base)


def test_alpha_zero_is_identity():
    x = x_in()
    for residual in ("convex", "branch"):
        m = md.MixingStack(cfg(alpha=0.0, residual=residual))
        out = m(x)
        assert out.states.shape == (5, 12, 5)
        assert torch.equal(out.output, x)


def test_mixing_is_doubly_stochastic_and_softmax_row_stochastic():
    m = md.MixingStack(cfg(tau=0.5, logit_scale=2.0))
    M, res = m.mixing_matrices()
    assert M.shape == (4, 12, 12) and bool(res.converged.all())
    ones = torch.ones(12, dtype=torch.float64)
    assert torch.allclose(M.sum(-1), ones.expand(4, 12), atol=1e-9)
    assert torch.allclose(M.sum(-2), ones.expand(4, 12), atol=1e-9)
    assert bool((M >= 0).all())
    ms = md.MixingStack(cfg(tau=0.5, logit_scale=2.0, mixing="softmax"))
    A, r2 = ms.mixing_matrices()
    assert r2 is None
    assert torch.allclose(A.sum(-1), ones.expand(4, 12), atol=1e-12)
    # the same logits feed both (same seed): Sinkhorn = diag(u) Softmax diag(v) up to scaling
    assert torch.equal(m.logits, ms.logits)
    ratio = M / A
    r = ratio / ratio[:, :, :1]  # depends on the column only
    assert torch.allclose(r, r[:, :1, :].expand_as(r), rtol=1e-7)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 1.0])
def test_residual_operator_is_dsm(alpha):
    m = md.MixingStack(cfg(alpha=alpha))
    H = m.layer_operators()
    ones = torch.ones(12, dtype=torch.float64)
    assert bool((H >= 0).all())
    assert torch.allclose(H.sum(-1), ones.expand(4, 12), atol=1e-9)
    assert torch.allclose(H.sum(-2), ones.expand(4, 12), atol=1e-9)
    # the forward pass applies exactly these operators
    x = x_in()
    Pi = md.operator_products(H)
    out = m(x)
    for l in range(4):
        assert torch.allclose(out.states[l + 1], Pi[l] @ x, atol=1e-12)


def test_determinism_and_seeds():
    x = x_in(batch=(3,))
    c = cfg(noise_std=0.1)
    a = md.MixingStack(c, generator=gen(5))(x, generator=gen(9)).states
    b = md.MixingStack(c, generator=gen(5))(x, generator=gen(9)).states
    assert torch.equal(a, b)
    c2 = md.MixingStack(c, generator=gen(6))(x, generator=gen(9)).states
    assert not torch.allclose(a, c2)
    d = md.MixingStack(c, generator=gen(5))(x, generator=gen(10)).states
    assert not torch.allclose(a, d)
    # default generators come from config.seed
    e = md.MixingStack(c)(x).states
    f = md.MixingStack(c)(x).states
    assert torch.equal(e, f)


def test_noise_has_the_requested_std():
    m = md.MixingStack(cfg(alpha=0.0, noise_std=0.25, layers=1, d=400))
    x = torch.zeros(12, 400, dtype=torch.float64)
    y = m(x, generator=gen(1)).output
    se = 0.25**2 * math.sqrt(2.0 / y.numel())
    assert abs(float(y.var(unbiased=False)) - 0.25**2) < 5 * se


def test_dtype_and_device_follow():
    m = md.MixingStack(cfg(layernorm="tokens"))
    x64 = x_in()
    out64 = m(x64)
    out32 = m(x64.float())
    assert out64.states.dtype == torch.float64 and out64.mixing.dtype == torch.float64
    assert out32.states.dtype == torch.float32 and out32.mixing.dtype == torch.float32
    assert torch.allclose(out32.output.double(), out64.output, atol=1e-4)
    m32 = md.MixingStack(cfg(), dtype=torch.float32)
    assert m32.logits.dtype == torch.float32
    assert m32.to(torch.float64).logits.dtype == torch.float64
    assert out64.states.device == x64.device
    if torch.cuda.is_available():  # pragma: no cover - GPU only
        mc = md.MixingStack(cfg()).to("cuda")
        assert mc(x64.cuda()).states.device.type == "cuda"


def test_layernorm_options_match_noise_module():
    x = x_in()
    for mode, fn in (("tokens", nz.layernorm_tokens), ("features", nz.layernorm_features)):
        m = md.MixingStack(cfg(layernorm=mode, layers=1, ln_eps=1e-6))
        M, _ = m.mixing_matrices()
        assert torch.allclose(m(x).output, fn(M[0] @ x, eps=1e-6), atol=1e-12)


def test_branch_layer():
    m = md.MixingStack(cfg(residual="branch", alpha=0.7, layers=2))
    x = x_in()
    M, _ = m.mixing_matrices()
    h = x
    for l in range(2):
        h = h + 0.7 * (M[l] @ h) @ m.weight[l]
    assert torch.allclose(m(x).output, h, atol=1e-12)
    with pytest.raises(ValueError, match="convex"):
        m.layer_operators()


def test_shared_logits_and_identity_init():
    m = md.MixingStack(cfg(shared_logits=True))
    M, _ = m.mixing_matrices()
    assert m.logits.shape == (1, 12, 12) and torch.equal(M[0], M[3])
    mi = md.MixingStack(cfg(n=4, logits="identity", tau=0.05, n_iter=20))
    Mi, res = mi.mixing_matrices()
    assert torch.allclose(Mi, torch.eye(4, dtype=torch.float64).expand(4, 4, 4), atol=1e-12)
    assert res.iterations == 20


def test_invert_recovers_input_and_token_ln_direction():
    x = x_in()
    m = md.MixingStack(cfg(tau=0.5, logit_scale=1.0, layers=3))
    assert torch.allclose(m.invert(m(x).output), x, atol=1e-8)
    # LN over tokens: the detail of every column is recovered up to a positive factor
    mt = md.MixingStack(cfg(tau=0.5, logit_scale=1.0, layers=3, layernorm="tokens"))
    r = mt.invert(mt(x).output)
    c = nz.detail_cosine(r, x, dim=-2)
    assert torch.allclose(c, torch.ones_like(c), atol=1e-8)
    with pytest.raises(ValueError, match="features"):
        md.MixingStack(cfg(layernorm="features")).invert(x)


def test_learned_logits_receive_gradients():
    for grad in ("implicit", "unroll"):
        m = md.MixingStack(cfg(learn_logits=True, grad=grad, layers=2))
        assert isinstance(m.logits, torch.nn.Parameter)
        x = x_in()
        loss = (m(x).output ** 2).sum()
        loss.backward()
        assert m.logits.grad is not None and float(m.logits.grad.abs().max()) > 0


def test_operator_products_order():
    g = gen(3)
    H = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    Pi = md.operator_products(H)
    assert torch.allclose(Pi[2], H[2] @ H[1] @ H[0])
    with pytest.raises(ValueError, match="H"):
        md.operator_products(H[0])


def test_detail_basis():
    Q = md.detail_basis(7)
    assert torch.allclose(Q.T @ Q, torch.eye(6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(Q @ Q.T, torch.eye(7, dtype=torch.float64) - 1 / 7, atol=1e-12)


def test_scalar_identity_distance_closed_form_and_brute_force():
    n = 9
    Q = md.detail_basis(n)
    g = gen(4)
    # scalar times identity on 1^⊥ (plus anything on the mean) -> 0
    A = 0.3 * torch.eye(n, dtype=torch.float64) + 0.7 / n
    dist, c, norm = md.scalar_identity_distance(A)
    assert float(dist) < 1e-9 and abs(float(c) - 0.3) < 1e-8 and abs(float(norm) - 0.3) < 1e-12
    # symmetric on 1^⊥: (λmax - λmin)/2 at c = (λmax + λmin)/2
    B = torch.randn(n - 1, n - 1, generator=g, dtype=torch.float64)
    B = B + B.T
    A = Q @ B @ Q.T
    lam = torch.linalg.eigvalsh(B)
    dist, c, _ = md.scalar_identity_distance(A)
    assert abs(float(dist) - float(lam[-1] - lam[0]) / 2) < 1e-8
    # non-symmetric: brute force over a fine grid of c
    A = torch.randn(2, n, n, generator=g, dtype=torch.float64)
    dist, c, norm = md.scalar_identity_distance(A)
    PAP = Q.T @ A @ Q
    cs = torch.linspace(-float(norm.max()), float(norm.max()), 4001, dtype=torch.float64)
    vals = torch.linalg.matrix_norm(PAP[:, None] - cs[None, :, None, None] * torch.eye(n - 1, dtype=torch.float64), ord=2)
    assert bool((dist <= vals.min(-1).values + 1e-9).all())
    assert bool((dist >= vals.min(-1).values - 2 * (cs[1] - cs[0])).all())


@pytest.mark.parametrize("alpha", [0.01, 0.1, 0.5])
def test_t5_bound_holds(alpha):
    """‖P H_L⋯H_1 P - (1-α)^L P‖₂ <= (1-α+αε̄)^L - (1-α)^L with ε̄ = max σ₂(M_l)."""
    L = 8
    m = md.MixingStack(cfg(n=16, layers=L, tau=3.0, alpha=alpha))
    M, _ = m.mixing_matrices()
    eps_bar = float(torch.linalg.svdvals(M)[:, 1].max())
    Pi = md.operator_products(m.layer_operators())
    Q = md.detail_basis(16)
    for l in range(L):
        dev = torch.linalg.matrix_norm(Q.T @ Pi[l] @ Q - (1 - alpha) ** (l + 1) * torch.eye(15, dtype=torch.float64), ord=2)
        bound = (1 - alpha + alpha * eps_bar) ** (l + 1) - (1 - alpha) ** (l + 1)
        assert float(dev) <= bound + 1e-12
        dist, _, _ = md.scalar_identity_distance(Pi[l])
        assert float(dist) <= float(dev) + 1e-9


def test_mixing_jacobian_against_finite_differences_and_closed_form():
    n, tau = 5, 0.7
    S = torch.randn(n, n, generator=gen(8), dtype=torch.float64)
    J = md.mixing_jacobian(S, tau, grad="implicit", tol=1e-13)
    Ju = md.mixing_jacobian(S, tau, grad="unroll", tol=1e-13)
    assert torch.allclose(J, Ju, atol=1e-9)
    h = 1e-6
    fd = torch.zeros(n * n, n * n, dtype=torch.float64)
    for j in range(n * n):
        E = torch.zeros(n * n, dtype=torch.float64)
        E[j] = h
        Mp = bs.project_dsm(S + E.reshape(n, n), tau=tau, tol=1e-14, max_iter=20000).plan
        Mm = bs.project_dsm(S - E.reshape(n, n), tau=tau, tol=1e-14, max_iter=20000).plan
        fd[:, j] = ((Mp - Mm) / (2 * h)).reshape(-1)
    assert torch.allclose(J, fd, atol=1e-7)
    # Softmax: block diagonal, each block (diag(p) - p pᵀ)/τ
    Js = md.mixing_jacobian(S, tau, mixing="softmax")
    p = torch.softmax(S / tau, -1)
    for i in range(n):
        blk = Js[i * n:(i + 1) * n, i * n:(i + 1) * n]
        assert torch.allclose(blk, (torch.diag(p[i]) - torch.outer(p[i], p[i])) / tau, atol=1e-12)
    # the 1/τ scaling at fixed S/τ
    J2 = md.mixing_jacobian(2 * S, 2 * tau, tol=1e-13)
    assert torch.allclose(J2, J / 2, atol=1e-9)


def test_config_validation():
    with pytest.raises(ValueError, match="n"):
        md.MixingStackConfig(n=1, d=2, layers=1)
    with pytest.raises(ValueError, match="tau"):
        md.MixingStackConfig(n=4, d=2, layers=1, tau=0.0)
    with pytest.raises(ValueError, match="alpha"):
        md.MixingStackConfig(n=4, d=2, layers=1, alpha=1.5)
    with pytest.raises(ValueError, match="layernorm"):
        md.MixingStackConfig(n=4, d=2, layers=1, layernorm="batch")
    with pytest.raises(ValueError, match="mixing"):
        md.MixingStackConfig(n=4, d=2, layers=1, mixing="sparsemax")
    m = md.MixingStack(md.MixingStackConfig(n=4, d=2, layers=1))
    with pytest.raises(ValueError, match="x"):
        m(torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="logits"):
        md.mixing_jacobian(torch.zeros(3, 4), 1.0)


def test_invert_upto_intermediate_states():
    x = x_in()
    m = md.MixingStack(cfg(tau=0.5, layers=4))
    out = m(x)
    for l in range(5):
        assert torch.allclose(m.invert(out.states[l], mixing=out.mixing, upto=l), x, atol=1e-8)
    with pytest.raises(ValueError, match="upto"):
        m.invert(x, upto=5)
