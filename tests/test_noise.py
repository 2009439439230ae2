"""Tests of bistochastic.noise against closed forms, exact identities and Monte Carlo."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bistochastic import noise as nz


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def signal_in_detail(n, snr_value, eta, g):
    """A random s in 1^⊥ scaled to a prescribed SNR."""
    s = torch.randn(n, generator=g, dtype=torch.float64)
    s = s - s.mean()
    return s / s.norm() * math.sqrt(snr_value * eta**2 * (n - 1))


# ---------------------------------------------------------------------------------------------
# detail, cosine, spread, snr


def test_detail_is_projection():
    x = torch.randn(3, 5, 7, generator=gen(), dtype=torch.float64)
    for dim in (-1, -2, 0):
        p = nz.detail(x, dim)
        assert float(p.mean(dim).abs().max()) < 1e-14
        assert torch.allclose(nz.detail(p, dim), p, atol=1e-14)
    n = 7
    P = torch.eye(n, dtype=torch.float64) - 1.0 / n
    assert torch.allclose(nz.detail(x, -1), x @ P, atol=1e-14)


def test_detail_cosine_matches_numpy_and_invariances():
    g = gen(1)
    x = torch.randn(4, 6, 9, generator=g, dtype=torch.float64)
    y = torch.randn(4, 6, 9, generator=g, dtype=torch.float64)
    c = nz.detail_cosine(x, y)
    assert c.shape == (4, 6)
    xn, yn = x.numpy(), y.numpy()
    px = xn - xn.mean(-1, keepdims=True)
    py = yn - yn.mean(-1, keepdims=True)
    ref = (px * py).sum(-1) / np.linalg.norm(px, axis=-1) / np.linalg.norm(py, axis=-1)
    np.testing.assert_allclose(c.numpy(), ref, rtol=1e-12, atol=1e-14)
    # adding a constant (a DC component) and positive rescaling change nothing
    c2 = nz.detail_cosine(3.0 * x + 5.0, 0.1 * y - 2.0)
    assert torch.allclose(c, c2, atol=1e-12)
    # other axis
    cd = nz.detail_cosine(x, y, dim=-2)
    assert cd.shape == (4, 9)
    assert torch.isnan(nz.detail_cosine(torch.ones(5, dtype=torch.float64), x[0, 0, :5])).item()


def test_token_spread():
    g = gen(2)
    row = torch.randn(1, 8, generator=g, dtype=torch.float64)
    X = row.expand(5, 8).clone()
    assert float(nz.token_spread(X)) < 1e-15
    Y = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    Y = Y - Y.mean(-2, keepdim=True)
    assert torch.allclose(nz.token_spread(Y), torch.ones(3, dtype=torch.float64), atol=1e-14)
    Z = torch.randn(5, 8, generator=g, dtype=torch.float64)
    P = torch.eye(5, dtype=torch.float64) - 0.2
    assert abs(float(nz.token_spread(Z)) - float((P @ Z).norm() / Z.norm())) < 1e-14


def test_snr_closed_form():
    g = gen(3)
    for n, eta, target in [(8, 0.5, 1.0), (64, 0.01, 0.3), (5, 2.0, 0.0)]:
        s = signal_in_detail(n, target, eta, g) + 7.0  # a DC offset must not count
        assert abs(float(nz.snr(s, eta)) - target) < 1e-12
    S = torch.randn(4, 10, generator=g, dtype=torch.float64)
    assert nz.snr(S, 1.0).shape == (4,)
    with pytest.raises(ValueError, match="eta"):
        nz.snr(S, 0.0)
    with pytest.raises(ValueError, match="s"):
        nz.snr(torch.ones(1, dtype=torch.float64), 1.0)


# ---------------------------------------------------------------------------------------------
# noise floor and asymptotics


def test_noise_floor_closed_forms():
    # k = 1: |u1| = 1; k = 2: E|cos θ| = 2/π; k = 3: E|u1| = 1/2 (Archimedes: u1 uniform on [-1, 1])
    f = nz.noise_floor(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    np.testing.assert_allclose(f.numpy(), [1.0, 2 / math.pi, 0.5], rtol=1e-12)
    # the asymptote: ratio -> 1 with relative error O(1/k)
    for k in (10, 100, 1000, 10000):
        ex, asy = float(nz.noise_floor(k)), float(nz.noise_floor(k, exact=False))
        assert abs(ex / asy - 1) < 1.0 / k


@pytest.mark.parametrize("k", [3, 15, 255])
def test_noise_floor_monte_carlo(k):
    g = gen(k)
    u = torch.randn(60_000, k, generator=g, dtype=torch.float64)
    a = (u[:, 0] / u.norm(dim=1)).abs()
    se = float(a.std()) / math.sqrt(a.numel())
    assert abs(float(a.mean()) - float(nz.noise_floor(k))) < 5 * se


def test_cosine_asymptotic_and_critical_snr():
    s = torch.tensor([0.0, 0.5, 1.0, 10.0], dtype=torch.float64)
    np.testing.assert_allclose(nz.cosine_asymptotic(s).numpy(), np.sqrt(s.numpy() / (1 + s.numpy())))
    for k in (3, 15, 63, 1023):
        sc = nz.critical_snr(k)
        assert abs(float(nz.cosine_asymptotic(sc)) - float(nz.noise_floor(k))) < 1e-12
        # ~ 2/(π k), within the O(1/k) corrections
        assert abs(float(sc) * math.pi * k / 2 - 1) < 3.0 / k + 2 / (math.pi * k)
    assert torch.isnan(nz.critical_snr(1, factor=2.0))


def test_sample_cosine_matches_vector_monte_carlo():
    """The two-variable representation has the law of cos∠(Py, s) built from n-dim Gaussians."""
    n, trials, eta = 24, 40_000, 0.3
    g = gen(5)
    for target in (0.0, 0.05, 0.5):
        s = signal_in_detail(n, target, eta, g) if target > 0 else None
        xi = eta * torch.randn(trials, n, generator=g, dtype=torch.float64)
        if s is None:
            s = signal_in_detail(n, 1.0, eta, g)  # direction only; SNR 0 means y = ξ
            y = xi
        else:
            y = s + xi
        c_vec = nz.detail_cosine(y, s.expand(trials, n))
        c_rep = nz.sample_cosine(target, n - 1, trials, generator=g)
        for stat in (lambda c: c.mean(), lambda c: c.abs().mean(), lambda c: (c * c).mean()):
            a, b = float(stat(c_vec)), float(stat(c_rep))
            se = math.sqrt(2.0) * float(c_vec.std()) / math.sqrt(trials)
            assert abs(a - b) < 5 * se + 1e-12


def test_concentration_at_large_k():
    k = 4095
    for target in (0.1, 1.0, 4.0):
        c = nz.sample_cosine(target, k, 2000, generator=gen(7))
        # the mean approaches √(SNR/(1+SNR)) with an O(1/k) bias; spread O(1/√k)
        assert abs(float(c.mean()) - float(nz.cosine_asymptotic(target))) < 5 / math.sqrt(k)


# ---------------------------------------------------------------------------------------------
# the finite-n bound (T3)


def test_bound_is_implied_by_the_two_tail_events():
    """Deterministic core of T3: on {|⟨g,ŝ⟩| <= η√(2x)} ∩ {‖g‖² >= η²(k - 2√(kx))} the bound holds."""
    g = gen(11)
    n, eta, trials = 40, 0.7, 8_000
    k = n - 1
    for target in (0.0, 0.02, 0.2, 1.0, 3.0):
        for x in (0.5, 1.0, 3.0):
            s = signal_in_detail(n, max(target, 1e-300), eta, g) if target > 0 else None
            xi = eta * torch.randn(trials, n, generator=g, dtype=torch.float64)
            gvec = xi - xi.mean(-1, keepdim=True)
            if s is None:
                shat = signal_in_detail(n, 1.0, eta, g)
                shat = shat / shat.norm()
                y = xi
                cos = nz.detail_cosine(y, shat.expand(trials, n)).abs()
            else:
                shat = s / s.norm()
                cos = nz.detail_cosine(s + xi, s.expand(trials, n)).abs()
            ev1 = (gvec @ shat).abs() <= eta * math.sqrt(2 * x)
            ev2 = (gvec * gvec).sum(-1) >= eta**2 * (k - 2 * math.sqrt(k * x))
            b = nz.cosine_bound(target, k, x)
            both = ev1 & ev2
            assert bool((cos[both] <= b.bound + 1e-12).all())


@pytest.mark.parametrize("n", [16, 64, 256])
@pytest.mark.parametrize("x", [1.0, 3.0])
def test_bound_violation_rate(n, x):
    trials = 10_000
    k = n - 1
    snrs = torch.tensor([0.0, 0.01, 0.1, 0.5, 1.0], dtype=torch.float64)
    c = nz.sample_cosine(snrs, k, trials, generator=gen(n + int(10 * x))).abs()
    b = nz.cosine_bound(snrs, k, x).bound
    rate = (c > b[:, None]).double().mean(-1)
    p = 3 * math.exp(-x)
    se = math.sqrt(min(p, 1.0) * (1 - min(p, 1.0)) / trials) if p < 1 else 0.0
    assert bool((rate <= p + 4 * se + 1e-12).all())


def test_bound_vacuous_and_informative_regions():
    # n = 4 (k = 3): for every x with positive confidence and every SNR, the bound says nothing
    xs = torch.linspace(math.log(3) + 1e-6, 20, 200, dtype=torch.float64)
    snrs = torch.logspace(-4, 3, 100, dtype=torch.float64)
    b = nz.cosine_bound(snrs[:, None], 3, xs[None, :])
    assert not bool(b.informative.any())
    assert bool((b.confidence > 0).all())
    # radicand <= 0 gives +inf
    assert math.isinf(float(nz.cosine_bound(0.0, 3, 1.0).bound))
    # confidence <= 0 for x <= ln 3
    assert float(nz.cosine_bound(0.0, 100, 1.0).confidence) < 0


@settings(max_examples=60, deadline=None)
@given(k=st.integers(2, 5000), x=st.floats(0.05, 20))
def test_informative_snr_max_is_the_crossing(k, x):
    smax = float(nz.bound_informative_snr_max(k, x))
    if smax < 0:
        # never below 1, whatever the SNR
        grid = torch.logspace(-6, 4, 50, dtype=torch.float64)
        assert bool((nz.cosine_bound(grid, k, x).bound >= 1 - 1e-12).all())
    else:
        lo = nz.cosine_bound(smax * (1 - 1e-6), k, x).bound
        hi = nz.cosine_bound(smax * (1 + 1e-6) + 1e-12, k, x).bound
        assert float(lo) < 1 + 1e-9 and float(hi) >= 1 - 1e-9


@pytest.mark.parametrize("x", [0.5, 1.0986, 2.0, 3.0, 5.0])
def test_min_informative_n(x):
    n = int(nz.min_informative_n(x))
    assert float(nz.cosine_bound(0.0, n - 1, x).bound) < 1
    assert float(nz.cosine_bound(0.0, n - 2, x).bound) >= 1


def test_bound_input_validation():
    with pytest.raises(ValueError, match="snr"):
        nz.cosine_bound(-1.0, 10, 1.0)
    with pytest.raises(ValueError, match="k"):
        nz.cosine_bound(0.1, 0, 1.0)
    with pytest.raises(ValueError, match="x"):
        nz.cosine_bound(0.1, 10, 0.0)
    with pytest.raises(ValueError, match="k"):
        nz.sample_cosine(0.1, 0, 10)


# ---------------------------------------------------------------------------------------------
# LayerNorm


def test_layernorm_reading1_is_scaled_projection():
    g = gen(13)
    y = torch.randn(6, 32, generator=g, dtype=torch.float64)
    ln = nz.layernorm(y)
    py = y - y.mean(-1, keepdim=True)
    ref = math.sqrt(32) * py / py.norm(dim=-1, keepdim=True)
    assert torch.allclose(ln, ref, atol=1e-12)
    s = torch.randn(32, generator=g, dtype=torch.float64)
    s = s - s.mean()
    assert torch.allclose(nz.detail_cosine(ln, s.expand(6, 32)), nz.detail_cosine(y, s.expand(6, 32)), atol=1e-14)


def test_layernorm_matches_torch():
    g = gen(14)
    X = torch.randn(3, 10, 16, generator=g, dtype=torch.float64)
    ref = torch.nn.functional.layer_norm(X, (16,), eps=1e-5)
    assert torch.allclose(nz.layernorm_features(X, eps=1e-5), ref, atol=1e-12)
    reft = torch.nn.functional.layer_norm(X.transpose(-1, -2), (10,), eps=1e-5).transpose(-1, -2)
    assert torch.allclose(nz.layernorm_tokens(X, eps=1e-5), reft, atol=1e-12)
    X32 = X.float()
    assert nz.layernorm_features(X32).dtype == torch.float32
    with pytest.raises(ValueError, match="eps"):
        nz.layernorm(X, eps=-1.0)
    with pytest.raises(ValueError, match="X"):
        nz.layernorm_tokens(torch.ones(3, dtype=torch.float64))


def test_cosine_mean_approx_limits_and_monte_carlo():
    # limits
    for k in (10, 1000):
        assert abs(float(nz.cosine_mean_approx(0.0, k)) - float(nz.noise_floor(k, exact=False))) < 1e-14
    big = float(nz.cosine_mean_approx(0.5, 10**8))
    assert abs(big - float(nz.cosine_asymptotic(0.5))) < 1e-3
    # Monte Carlo at moderate k: error O(1/k) relative
    k = 255
    snrs = torch.tensor([0.0, 1e-3, 1e-2, 0.1, 1.0], dtype=torch.float64)
    c = nz.sample_cosine(snrs, k, 20_000, generator=gen(21)).abs()
    se = c.std(-1) / math.sqrt(20_000)
    err = (c.mean(-1) - nz.cosine_mean_approx(snrs, k)).abs()
    assert bool((err < 5 * se + 2.0 / k).all())


def test_detail_direction_error():
    g = gen(31)
    x = torch.randn(5, 12, generator=g, dtype=torch.float64)
    y = torch.randn(5, 12, generator=g, dtype=torch.float64)
    e = nz.detail_direction_error(x, y)
    c = nz.detail_cosine(x, y)
    assert torch.allclose(e, torch.sqrt(2 - 2 * c), atol=1e-12)
    # resolves tiny angles where sqrt(1 - cos^2) cannot
    d = torch.randn(5, 12, generator=g, dtype=torch.float64)
    z = x + 1e-12 * d
    e2 = nz.detail_direction_error(x, z)
    assert bool((e2 > 0).all()) and bool((e2 < 1e-10).all())
    assert float(nz.detail_direction_error(x, 3.0 * x + 1.0).max()) < 1e-14
