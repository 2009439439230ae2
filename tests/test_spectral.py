"""Tests of bistochastic.spectral against closed forms, brute force and second methods."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import bistochastic as bs
from bistochastic import spectral as sp


def _dsm(n, tau, seed, batch=(), sym=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(*batch, n, n, generator=g, dtype=torch.float64)
    if sym:
        S = (S + S.transpose(-1, -2)) / 2
    res = bs.project_dsm(S.to(dtype), tau=tau, tol=1e-13 if dtype == torch.float64 else 1e-6, max_iter=20000)
    assert res.all_converged
    return res.plan


# ---------------------------------------------------------------- sigma2


@pytest.mark.parametrize("p", [0.0, 0.1, 0.27, 0.5, 0.73, 1.0])
@pytest.mark.parametrize("method", ["exact", "lanczos", "power"])
def test_sigma2_two_by_two_closed_form(p, method):
    M = torch.tensor([[p, 1 - p], [1 - p, p]], dtype=torch.float64)
    assert float(sp.sigma2(M, method)) == pytest.approx(abs(2 * p - 1), abs=1e-12)


@pytest.mark.parametrize("n", [3, 8, 33])
def test_sigma2_methods_agree_with_numpy_svd(n):
    M = _dsm(n, 0.8, seed=n, batch=(3,))
    J = np.full((n, n), 1.0 / n)
    ref = np.array([np.linalg.svd(m - J, compute_uv=False)[0] for m in M.numpy()])
    # for a DSM sigma2 is also the second singular value of M itself
    sv2 = np.array([np.linalg.svd(m, compute_uv=False)[1] for m in M.numpy()])
    np.testing.assert_allclose(ref, sv2, rtol=1e-10)
    for method in ("auto", "exact", "lanczos", "power"):
        got = sp.sigma2(M, method, tol=1e-13).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-7 if method == "power" else 1e-10, err_msg=method)


def test_sigma2_auto_switches_to_lanczos_for_large_n():
    n = sp.AUTO_EXACT_MAX_N + 8
    M = _dsm(n, 1.0, seed=3)
    a = sp.sigma2(M)  # lanczos
    e = sp.sigma2(M, "exact")
    assert float(a) == pytest.approx(float(e), rel=1e-9)


def test_sigma2_general_matrix_is_norm_of_PMP():
    g = torch.Generator().manual_seed(0)
    A = torch.softmax(torch.randn(4, 7, 7, generator=g, dtype=torch.float64) / 0.3, dim=-1)  # row-stochastic
    P = torch.eye(7, dtype=torch.float64) - 1 / 7
    ref = torch.linalg.matrix_norm(P @ A @ P, ord=2)
    for method in ("exact", "lanczos", "power"):
        torch.testing.assert_close(sp.sigma2(A, method, tol=1e-13), ref, rtol=1e-7, atol=1e-12)


def test_sigma2_operator_matches_product():
    Ms = _dsm(12, 0.5, seed=4, batch=(5,))
    prod = Ms[4] @ Ms[3] @ Ms[2] @ Ms[1] @ Ms[0]

    def mv(x):
        for l in range(5):
            x = Ms[l] @ x
        return x

    def rmv(x):
        for l in reversed(range(5)):
            x = Ms[l].T @ x
        return x

    got = sp.sigma2_operator(mv, rmv, 12, tol=1e-13)
    assert float(got) == pytest.approx(float(sp.sigma2(prod, "exact")), rel=1e-9)


def test_sigma2_circulant_via_dft():
    n, eps = 16, 0.02
    C = sp.circle_cost(n)
    M = bs.sinkhorn(C, eps, torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64), tol=1e-13).plan
    # a circulant's eigenvalues are the DFT of its first row; symmetric -> real; sigma2 = max |λ_k|, k != 0
    lam = torch.fft.fft(M[0]).real
    torch.testing.assert_close(torch.fft.fft(M[0]).imag, torch.zeros(n, dtype=torch.float64), atol=1e-12, rtol=0)
    assert float(lam[0]) == pytest.approx(1.0, abs=1e-10)
    assert float(sp.sigma2(M)) == pytest.approx(float(lam[1:].abs().max()), abs=1e-12)
    fe = sp.eig_by_frequency(M)
    # eigenvalue of each frequency k matches the DFT coefficient, and decays with |k|
    for k in range(n // 2 + 1):
        sel = fe.frequencies == k
        torch.testing.assert_close(fe.eigenvalues[sel], lam[k].expand(int(sel.sum())), atol=1e-10, rtol=0)
    per_k = torch.stack([lam[k] for k in range(n // 2 + 1)])
    assert bool((per_k[1:] < per_k[:-1]).all())


def test_sigma2_batched_shapes_and_dtype():
    M = _dsm(6, 1.0, seed=5, batch=(2, 3), dtype=torch.float32)
    for method in ("exact", "lanczos", "power"):
        s = sp.sigma2(M, method, tol=1e-6)
        assert s.shape == (2, 3) and s.dtype == torch.float32


@pytest.mark.parametrize("bad", [torch.zeros(3, 4), torch.zeros(3), torch.zeros(0, 0),
                                 torch.ones(3, 3, dtype=torch.long), torch.full((3, 3), float("nan"))])
def test_sigma2_bad_inputs(bad):
    with pytest.raises(ValueError, match="M"):
        sp.sigma2(bad)


def test_sigma2_bad_method():
    with pytest.raises(ValueError, match="method"):
        sp.sigma2(torch.eye(3, dtype=torch.float64), "svd")
    with pytest.raises(ValueError, match="n"):
        sp.sigma2_operator(lambda x: x, lambda x: x, 0)


# ---------------------------------------------------------------- products, depth


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 9), L=st.integers(1, 6), logtau=st.floats(-0.7, 1.0), seed=st.integers(0, 10_000))
def test_product_bound_and_positivity_bounds_hold(n, L, logtau, seed):
    tau = 10.0 ** logtau
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(L, n, n, generator=g, dtype=torch.float64)
    res = bs.project_dsm(S, tau=tau, tol=1e-12, max_iter=5000, warn=False)
    if not res.all_converged:
        return
    Ms = res.plan
    prof = sp.depth_profile(Ms)
    floor = sp.matmul_floor(n, L, torch.float64) + 1e-10
    assert bool((prof.product <= prof.bound + floor).all())
    assert bool((prof.sigma2 <= 1 + 1e-10).all())
    # L3(a) and L3(b)
    assert bool((prof.sigma2 <= sp.positivity_bound(Ms) + 1e-10).all())
    assert bool((prof.sigma2 <= sp.entropic_positivity_bound(-S, tau) + 1e-10).all())
    # L3(b) passes through min M >= (Kmin/Kmax)^2 / n
    assert bool((n * Ms.amin((-2, -1)) >= torch.exp(-2 * sp.oscillation(S) / tau) * (1 - 1e-9)).all())


def test_product_equality_for_repeated_symmetric_dsm():
    M = _dsm(10, 0.6, seed=7, sym=True)
    Ms = M.expand(6, 10, 10)
    prof = sp.depth_profile(Ms)
    torch.testing.assert_close(prof.product, prof.bound, rtol=1e-9, atol=1e-14)


def test_cumulative_products_and_propagate():
    Ms = _dsm(5, 1.0, seed=8, batch=(4,))
    P = sp.cumulative_products(Ms)
    torch.testing.assert_close(P[3], Ms[3] @ Ms[2] @ Ms[1] @ Ms[0])
    X0 = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    Xs = sp.propagate(Ms, X0)
    assert Xs.shape == (5, 5, 3)
    torch.testing.assert_close(Xs[4], P[3] @ X0)
    r = sp.detail_ratio(Xs[1:], X0)
    prof = sp.depth_profile(Ms)
    assert bool((r <= prof.product + 1e-12).all())


def test_detail_ratio_and_detail():
    X = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(sp.detail(X), torch.tensor([[-1.0, -1.0], [1.0, 1.0]], dtype=torch.float64))
    assert float(sp.detail_ratio(X * 0.5 + 7, X)) == pytest.approx(0.5)
    v = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    assert float(sp.detail_ratio(3 * v, v, token_dim=-1)) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="X_0"):
        sp.detail_ratio(X, torch.ones(2, 2, dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(vals=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12), delta=st.floats(1e-4, 0.99))
def test_effective_depth_brute_force(vals, delta):
    s = torch.tensor(vals, dtype=torch.float64)
    got = float(sp.effective_depth(s, delta))
    prod, want = 1.0, math.inf
    for L, v in enumerate(vals, start=1):
        prod *= v
        if prod <= delta:
            want = L
            break
    if want != math.inf and abs(math.prod(vals[:want]) - delta) < 1e-12:
        return  # ties at the threshold are round-off sensitive
    assert got == want


@pytest.mark.parametrize("s", [0.0, 0.13, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("delta", [1e-1, 1e-2, 1e-3])
def test_effective_depth_constant_matches_sequence(s, delta):
    closed = float(sp.effective_depth_constant(s, delta))
    seq = float(sp.effective_depth(torch.full((5000,), s, dtype=torch.float64), delta))
    assert closed == seq


def test_effective_depth_edge_cases_and_law():
    assert math.isinf(float(sp.effective_depth_constant(1.0, 0.1)))
    assert math.isinf(float(sp.effective_depth(torch.ones(4, dtype=torch.float64), 0.1)))
    law = sp.effective_depth_law(torch.tensor([1.0, 4.0]), 64, 1e-2)
    assert float(law[0]) == pytest.approx(math.log(100) / math.log(4.0))
    assert math.isinf(float(sp.effective_depth_law(0.1, 16, 0.5)))
    for bad in (0.0, 1.0, -1, "x"):
        with pytest.raises(ValueError, match="delta"):
            sp.effective_depth(torch.ones(3), bad)


def test_matmul_floor_covers_float32_products():
    Ms = _dsm(32, 2.0, seed=9, batch=(40,), sym=True).float()
    prof = sp.depth_profile(Ms)
    exact = sp.depth_profile(Ms.double())
    floor = sp.matmul_floor(32, 40, torch.float32)
    assert bool(((prof.product.double() - exact.product).abs() <= floor).all())
    with pytest.raises(ValueError, match="L"):
        sp.matmul_floor(4, 0, torch.float64)


# ---------------------------------------------------------------- entropy, first-order law


def test_entropy_of_J_and_permutations():
    for n in (2, 4, 7):
        J = torch.full((n, n), 1.0 / n, dtype=torch.float64)
        assert float(sp.dsm_entropy(J)) == pytest.approx(n * math.log(n))
        assert float(sp.dsm_entropy(J, normalized=True)) == pytest.approx(1.0)
    perms = torch.stack([torch.eye(4, dtype=torch.float64)[list(p)] for p in itertools.permutations(range(4))])
    assert bool((sp.dsm_entropy(perms) == 0).all())
    torch.testing.assert_close(perms.mean(0), torch.full((4, 4), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError, match="M"):
        sp.dsm_entropy(-torch.eye(3))
    with pytest.raises(ValueError, match="normalized"):
        sp.dsm_entropy(torch.ones(1, 1), normalized=True)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 8), seed=st.integers(0, 1000))
def test_entropy_below_uniform(n, seed):
    M = _dsm(n, 0.5, seed)
    H = float(sp.dsm_entropy(M, normalized=True))
    assert 0.0 <= H <= 1.0 + 1e-12


def test_first_order_law_error_is_second_order():
    n = 24
    g = torch.Generator().manual_seed(11)
    S = torch.randn(n, n, generator=g, dtype=torch.float64)
    errs = []
    for tau in (20.0, 40.0, 80.0):
        M = bs.project_dsm(S, tau=tau, tol=1e-14).plan
        errs.append(float((M - sp.first_order_dsm(S, tau)).abs().max()))
        rel = abs(float(sp.sigma2(M)) - float(sp.first_order_sigma2(S, tau))) / float(sp.sigma2(M))
        assert rel < 5.0 / tau
    # doubling tau divides the matrix error by about 4 (O(tau^-2))
    assert 3.0 < errs[0] / errs[1] < 5.0 and 3.0 < errs[1] / errs[2] < 5.0


def test_gaussian_law_value():
    assert float(sp.gaussian_sigma2_law(16, 2.0)) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="n"):
        sp.gaussian_sigma2_law(1, 1.0)
    with pytest.raises(ValueError, match="tau"):
        sp.first_order_sigma2(torch.eye(3, dtype=torch.float64), -1.0)


def test_birkhoff_contraction_brute_force():
    g = torch.Generator().manual_seed(2)
    C = torch.rand(5, 4, generator=g, dtype=torch.float64)
    eps = 0.3
    K = torch.exp(-C / eps)
    best = 0.0
    for i, k in itertools.product(range(5), repeat=2):
        for j, l in itertools.product(range(4), repeat=2):
            best = max(best, math.log(float(K[i, j] * K[k, l] / (K[i, l] * K[k, j]))))
    assert float(sp.birkhoff_contraction(C, eps)) == pytest.approx(math.tanh(best / 4), rel=1e-12)
    assert float(sp.birkhoff_contraction(C, eps)) <= math.tanh(float(sp.oscillation(C)) / (2 * eps)) + 1e-15


# ---------------------------------------------------------------- frequency helpers


def test_dominant_frequency_and_energy():
    n = 32
    x = torch.arange(n, dtype=torch.float64)
    v = torch.cos(2 * math.pi * 5 * x / n) + 0.3 * torch.sin(2 * math.pi * 11 * x / n)
    assert int(sp.dominant_frequency(v)) == 5
    e = sp.frequency_energy(v)
    assert float(e.sum()) == pytest.approx(1.0)
    assert float(e[5]) == pytest.approx(1 / 1.09, rel=1e-9) and float(e[11]) == pytest.approx(0.09 / 1.09, rel=1e-9)
    assert int(sp.dominant_frequency(torch.ones(n, dtype=torch.float64))) == 0


def test_circle_cost_is_symmetric_circulant():
    C = sp.circle_cost(9)
    torch.testing.assert_close(C, C.T)
    torch.testing.assert_close(C, torch.roll(torch.roll(C, 1, 0), 1, 1))
    assert float(C[0, 4]) == pytest.approx((4 / 9) ** 2) and float(C[0, 5]) == pytest.approx((4 / 9) ** 2)


def test_eig_by_frequency_rejects_nonsymmetric_and_rank_correlation():
    with pytest.raises(ValueError, match="symmetric"):
        sp.eig_by_frequency(torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64))
    x = torch.arange(10, dtype=torch.float64)
    assert sp.rank_correlation(x, -x ** 3) == pytest.approx(-1.0)


# ---------------------------------------------------------------- Sinkhorn Jacobian


def test_dsm_jacobian_matches_autograd():
    n, tau = 5, 0.7
    S = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    M = bs.project_dsm(S, tau=tau, tol=1e-14, max_iter=10000).plan
    Jd = sp.dsm_jacobian(M, tau)

    def f(s):
        return bs.project_dsm(s, tau=tau, tol=1e-14, max_iter=10000, grad="implicit").plan

    Ja = torch.autograd.functional.jacobian(f, S).reshape(n * n, n * n)
    torch.testing.assert_close(Jd, Ja, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(Jd, Jd.T, atol=1e-14, rtol=0)
    ev = torch.linalg.eigvalsh(Jd)
    assert bool((ev > -1e-13).all())
    assert int((ev.abs() < 1e-12).sum()) == 2 * n - 1
    assert float(ev[-1]) <= float(M.max()) / tau + 1e-12


def test_dsm_jacobian_norm_methods_agree_and_high_tau_limit():
    M = _dsm(8, 0.9, seed=12, batch=(2,))
    a = sp.dsm_jacobian_norm(M, 0.9, "exact")
    b = sp.dsm_jacobian_norm(M, 0.9, "lanczos")
    torch.testing.assert_close(a, b, rtol=1e-8, atol=0)
    # tau -> infinity: M -> J, and the Jacobian -> (1/(n tau)) x (projection), norm 1/(n tau)
    n, tau = 8, 1e4
    J = torch.full((n, n), 1.0 / n, dtype=torch.float64)
    assert float(sp.dsm_jacobian_norm(J, tau)) == pytest.approx(1 / (n * tau), rel=1e-10)
    with pytest.raises(ValueError, match="tau"):
        sp.dsm_jacobian_matvec(J, 0.0)
