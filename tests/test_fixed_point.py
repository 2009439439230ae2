"""Tests of bistochastic.fixed_point: Jacobian, gap, resolvent, non-normality, sensitivity, Birkhoff-Hopf."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import bistochastic as bs
from bistochastic import fixed_point as fp

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _solve(C, eps, a=None, b=None, tol=1e-14):
    res = bs.sinkhorn(C, eps, a, b, tol=tol, max_iter=200000, grad="none")
    assert res.all_converged
    return res


def _marginals(n, seed):
    g = _gen(seed)
    a = torch.rand(n, generator=g, dtype=DT) + 0.2
    b = torch.rand(n, generator=g, dtype=DT) + 0.2
    return a / a.sum(), b / b.sum()


def _sinkhorn_map(C, eps, a, b):
    """T_eps: g -> g'(f(g)) in cost units, independent of the library."""

    def T(g):
        f = eps * torch.log(a) - eps * torch.logsumexp((g[None, :] - C) / eps, dim=1)
        return eps * torch.log(b) - eps * torch.logsumexp((f[:, None] - C) / eps, dim=0)

    return T


# ------------------------------------------------------------------------------------- Jacobian


@pytest.mark.parametrize("uniform", [True, False])
def test_jacobian_is_derivative_of_sinkhorn_map(uniform):
    n, eps = 7, 0.3
    C = torch.rand(n, n, generator=_gen(1), dtype=DT)
    a, b = (torch.full((n,), 1 / n, dtype=DT),) * 2 if uniform else _marginals(n, 2)
    res = _solve(C, eps, a, b)
    Jad = torch.autograd.functional.jacobian(_sinkhorn_map(C, eps, a, b), res.g)
    J = fp.jacobian(res.plan)
    assert torch.allclose(J, Jad, atol=1e-11)
    assert torch.allclose(J @ torch.ones(n, dtype=DT), torch.ones(n, dtype=DT), atol=1e-13)
    bb = res.plan.sum(0)
    assert torch.allclose(bb @ J, bb, atol=1e-13)
    if uniform:  # symmetric (normal) in log-potentials with uniform marginals
        assert float((J - J.T).abs().max()) < 1e-13
    # scaling coordinates: the derivative of v' = exp(g'/eps) w.r.t. v = exp(g/eps)
    T = _sinkhorn_map(C, eps, a, b)
    Jv_ad = torch.autograd.functional.jacobian(lambda v: torch.exp(T(eps * torch.log(v)) / eps), torch.exp(res.g / eps))
    Jv = fp.jacobian(res.plan, coords="scaling", g=res.g, eps=eps)
    assert torch.allclose(Jv, Jv_ad, rtol=1e-9, atol=1e-9 * float(Jv_ad.abs().max()))


def test_jacobian_matvec_matches_dense_and_convention_free():
    n, m, eps = 6, 9, 0.2
    C = torch.randn(3, n, m, generator=_gen(3), dtype=DT)
    res = _solve(C, eps)
    P = res.plan
    x = torch.randn(3, m, generator=_gen(4), dtype=DT)
    for coords in ("potential", "scaling"):
        kw = dict(coords=coords, g=res.g, eps=eps)
        J = fp.jacobian(P, **kw)
        assert torch.allclose(fp.jacobian_matvec(P, **kw)(x), (J @ x[..., None])[..., 0], atol=1e-12)
        assert torch.allclose(fp.jacobian_matvec(P, transpose=True, **kw)(x),
                              (J.transpose(-1, -2) @ x[..., None])[..., 0], atol=1e-12)
    # J is invariant under P -> cP (probability vs unit-sum convention)
    assert torch.allclose(fp.jacobian(P), fp.jacobian(n * P), atol=1e-13)
    S = fp.symmetrized_matvec(P)(x)
    sb = P.sum(-2).sqrt()
    assert torch.allclose(S, sb * fp.jacobian_matvec(P)(x / sb), atol=1e-13)


# ------------------------------------------------------------------------------------- gap


@pytest.mark.parametrize("uniform", [True, False])
def test_spectral_gap_dense_lanczos_eig_agree(uniform):
    n, eps = 12, 0.15
    C = torch.randn(n, n, generator=_gen(5), dtype=DT)
    a, b = (None, None) if uniform else _marginals(n, 6)
    P = _solve(C, eps, a, b).plan
    lam = torch.linalg.eigvals(fp.jacobian(P)).real.sort(descending=True).values
    spec = fp.jacobian_spectrum(P)
    assert torch.allclose(spec, lam, atol=1e-12)
    g_dense = fp.spectral_gap(P, method="dense")
    g_lanc = fp.spectral_gap(P, method="lanczos")
    assert abs(float(g_dense) - float(1 - lam[1])) < 1e-12
    assert abs(float(g_lanc) - float(g_dense)) < 1e-10
    assert 0 < float(g_dense) <= 1


def test_spectral_gap_batched_and_bounded_by_birkhoff_hopf():
    C = torch.randn(20, 8, 8, generator=_gen(7), dtype=DT) * torch.linspace(0.3, 2, 20, dtype=DT)[:, None, None]
    for eps in (1.0, 0.4):
        P = _solve(C, eps).plan
        gam = fp.spectral_gap(P)
        lam2_ub, gam_lb = fp.birkhoff_hopf_bound(C, eps)
        assert gam.shape == (20,)
        assert bool((1 - gam <= lam2_ub + 1e-12).all())
        assert bool((gam >= gam_lb - 1e-12).all())


def test_birkhoff_hopf_theta_matches_naive():
    for seed, (n, m) in enumerate([(4, 5), (5, 3), (6, 6)]):
        C = torch.randn(n, m, generator=_gen(10 + seed), dtype=DT)
        naive = max(float(C[i, l] + C[k, j] - C[i, j] - C[k, l])
                    for i, k in itertools.product(range(n), repeat=2)
                    for j, l in itertools.product(range(m), repeat=2))
        assert abs(float(fp.birkhoff_hopf_theta(C)) - naive) < 1e-12
        assert abs(float(fp.birkhoff_hopf_theta(C, chunk=2)) - naive) < 1e-12
    # separable costs have theta = 0 (plan is the product, J = 1 bᵀ-like, gap 1)
    x, y = torch.randn(5, 1, dtype=DT), torch.randn(1, 4, dtype=DT)
    assert float(fp.birkhoff_hopf_theta(x + y)) < 1e-12


# ------------------------------------------------------------------------------------- resolvent


def _group_inverse_by_eig(J):
    lam, V = torch.linalg.eig(J)
    i0 = int((lam.real - 1).abs().argmin())
    d = torch.where(torch.arange(J.shape[-1]) == i0, torch.zeros_like(lam), 1 / (1 - lam))
    return (V @ torch.diag(d) @ torch.linalg.inv(V)).real


@pytest.mark.parametrize("uniform", [True, False])
def test_resolvent_norm(uniform):
    n, eps = 9, 0.25
    C = torch.randn(n, n, generator=_gen(8), dtype=DT)
    a, b = (None, None) if uniform else _marginals(n, 9)
    res = _solve(C, eps, a, b)
    P = res.plan
    for coords in ("potential", "scaling"):
        kw = dict(coords=coords, g=res.g, eps=eps)
        R_eig = _group_inverse_by_eig(fp.jacobian(P, **kw))
        ref = float(torch.linalg.matrix_norm(R_eig, ord=2))
        dense = float(fp.resolvent_norm(P, **kw, method="dense"))
        lanc = float(fp.resolvent_norm(P, **kw, method="lanczos"))
        assert abs(dense - ref) < 1e-9 * ref
        assert abs(lanc - ref) < 1e-6 * ref
        assert dense >= 1 / float(fp.spectral_gap(P)) * (1 - 1e-12) or coords == "scaling" or not uniform
    if uniform:
        assert abs(float(fp.resolvent_norm(P)) * float(fp.spectral_gap(P)) - 1) < 1e-10


# ------------------------------------------------------------------------------------- non-normality


def test_nonnormality_measures():
    n, eps = 8, 0.2
    C = torch.randn(n, n, generator=_gen(11), dtype=DT)
    res = _solve(C, eps)
    P = res.plan
    nn = fp.nonnormality(fp.jacobian(P), fp.jacobian_spectrum(P))
    assert float(nn.asymmetry) < 1e-13 and float(nn.henrici) < 1e-6 and abs(float(nn.kappa_V) - 1) < 1e-8
    assert abs(float(fp.eigenvector_condition(P)) - 1) < 1e-12
    # scaling coordinates: non-normal; unit-column kappa within sqrt(m) of the structural value
    Js = fp.jacobian(P, coords="scaling", g=res.g, eps=eps)
    nns = fp.nonnormality(Js, fp.jacobian_spectrum(P))
    ks = float(fp.eigenvector_condition(P, coords="scaling", g=res.g, eps=eps))
    assert float(nns.asymmetry) > 1e-3 and float(nns.henrici) > 1e-3
    assert 1 <= float(nns.kappa_V) <= math.sqrt(n) * ks * (1 + 1e-8)
    lk = float(fp.eigenvector_condition(P, coords="scaling", g=res.g, eps=eps, log=True))
    assert abs(lk - math.log(ks)) < 1e-10
    # non-uniform marginals in potentials: kappa = sqrt(max b / min b), eps-independent
    a, b = _marginals(n, 12)
    for e in (1.0, 0.2):
        Pn = _solve(C, e, a, b).plan
        assert abs(float(fp.eigenvector_condition(Pn)) - math.sqrt(float(b.max() / b.min()))) < 1e-9
    # normal matrix sanity: a symmetric matrix
    A = torch.randn(5, 5, generator=_gen(13), dtype=DT)
    assert float(fp.nonnormality(A + A.T).henrici) < 1e-6


# ------------------------------------------------------------------------------------- sensitivity


@pytest.mark.parametrize("uniform", [True, False])
def test_sensitivity_closed_form_vs_finite_differences(uniform):
    n, eps, h = 5, 0.3, 1e-6
    C = torch.rand(n, n, generator=_gen(14), dtype=DT)
    a, b = (None, None) if uniform else _marginals(n, 15)
    P = _solve(C, eps, a, b).plan
    M = fp.sensitivity_matrix(P, eps)
    FD = torch.empty(n * n, n * n, dtype=DT)
    for k in range(n * n):
        E = torch.zeros(n * n, dtype=DT)
        E[k] = h
        E = E.reshape(n, n)
        Pp = _solve(C + E, eps, a, b).plan
        Pm = _solve(C - E, eps, a, b).plan
        FD[:, k] = ((Pp - Pm) / (2 * h)).reshape(-1)
    assert float((M - FD).abs().max()) < 1e-7 * float(M.abs().max())
    # symmetric, negative semidefinite, annihilates separable directions
    assert float((M - M.T).abs().max()) < 1e-13
    ev = torch.linalg.eigvalsh(M)
    assert float(ev.max()) < 1e-12 * float(ev.abs().max())
    sep = (torch.randn(n, 1, dtype=DT) + torch.randn(1, n, dtype=DT)).reshape(-1)
    assert float((M @ sep).abs().max()) < 1e-12


def test_sensitivity_matvec_dense_autograd_and_norm():
    n, m, eps = 6, 5, 0.2
    C = torch.randn(n, m, generator=_gen(16), dtype=DT)
    P = _solve(C, eps).plan
    mv = fp.sensitivity_matvec(P, eps)
    M = fp.sensitivity_matrix(P, eps)
    dC = torch.randn(4, n, m, generator=_gen(17), dtype=DT)
    out = mv(dC)
    assert out.shape == (4, n, m)
    ref = (M @ dC.reshape(4, -1, 1))[..., 0].reshape(4, n, m)
    assert torch.allclose(out, ref, atol=1e-12 * float(M.abs().max()))
    # marginals are preserved to first order
    assert float(out.sum(-1).abs().max()) < 1e-13 and float(out.sum(-2).abs().max()) < 1e-13
    # autograd with grad="implicit": grad_C <W, P> = (dP/dC)ᵀ W = (dP/dC) W (symmetry)
    W = torch.randn(n, m, generator=_gen(18), dtype=DT)
    Cg = C.clone().requires_grad_(True)
    Pi = bs.sinkhorn(Cg, eps, tol=1e-14, max_iter=200000, grad="implicit").plan
    (gC,) = torch.autograd.grad((Pi * W).sum(), Cg)
    assert torch.allclose(gC, mv(W), atol=1e-9 * float(gC.abs().max()))
    # norm: dense = Lanczos = top eigenvalue, below the lemma's bound max P / eps
    nd = float(fp.sensitivity_norm(P, eps, method="dense"))
    nl = float(fp.sensitivity_norm(P, eps, method="lanczos"))
    assert abs(nd - float(torch.linalg.eigvalsh(-M)[-1])) < 1e-12 * nd
    assert abs(nl - nd) < 1e-8 * nd
    assert nd <= float(fp.sensitivity_bound(P, eps)) * (1 + 1e-12)


def test_sensitivity_unit_sum_convention_scales_by_n():
    n, tau = 6, 0.4
    L = torch.randn(n, n, generator=_gen(19), dtype=DT)
    Pu = bs.project_dsm(L, tau=tau, tol=1e-14, max_iter=100000).plan  # unit row/col sums
    Pp = _solve(-L, tau).plan  # probability marginals
    assert torch.allclose(Pu, n * Pp, atol=1e-12)
    assert abs(float(fp.sensitivity_norm(Pu, tau)) - n * float(fp.sensitivity_norm(Pp, tau))) < 1e-9
    # near-uniform plan: eps * ||dP/dC|| -> max P (tight) in either convention
    Ct = 1e-6 * torch.randn(n, n, generator=_gen(20), dtype=DT)
    Pt = _solve(Ct, 1.0).plan
    assert abs(float(fp.sensitivity_norm(Pt, 1.0)) - 1 / n**2) < 1e-5 / n**2


def test_eps_derivative_vs_finite_differences():
    n, eps, h = 5, 0.25, 1e-6
    C = torch.rand(n, n, generator=_gen(21), dtype=DT)
    P = _solve(C, eps).plan
    dPde = fp.plan_eps_derivative(P, C, eps)
    FD = (_solve(C, eps + h).plan - _solve(C, eps - h).plan) / (2 * h)
    assert float((dPde - FD).abs().max()) < 1e-7 * float(FD.abs().max())
    # adding a separable part to C changes neither P nor dP/deps
    C2 = C + torch.randn(n, 1, dtype=DT) + torch.randn(1, n, dtype=DT)
    assert torch.allclose(fp.plan_eps_derivative(P, C2, eps), dPde, atol=1e-11)


# ------------------------------------------------------------------------------------- reference solves


def test_newton_polish_and_solve_path():
    n = 10
    C = torch.randn(n, n, generator=_gen(22), dtype=DT)
    eps = 0.07
    rough = bs.sinkhorn(C, eps, tol=1e-3, max_iter=100000, grad="none")
    pol = fp.newton_polish(C, eps, init=(rough.f, rough.g), tol=1e-13)
    assert bool(pol.converged)
    ref = _solve(C, eps, tol=1e-13)
    assert torch.allclose(pol.plan, ref.plan, atol=1e-10)
    path = fp.solve_path(C, [1.0, 0.5, 0.2, 0.1, 0.07])
    assert path.all_converged and path.plan.shape == (5, n, n)
    assert torch.allclose(path.plan[-1], ref.plan, atol=1e-10)
    gam = fp.spectral_gap(path.plan)
    assert bool((gam[1:] < gam[:-1]).all())  # for this cost the gap shrinks as eps falls


def test_bad_inputs_raise():
    P = torch.full((3, 3), 1 / 9, dtype=DT)
    with pytest.raises(ValueError, match="plan"):
        fp.jacobian(-P)
    with pytest.raises(ValueError, match="coords"):
        fp.jacobian(P, coords="bad")
    with pytest.raises(ValueError, match="g"):
        fp.jacobian(P, coords="scaling")
    with pytest.raises(ValueError, match="eps"):
        fp.sensitivity_matvec(P, 0.0)
    with pytest.raises(ValueError, match="method"):
        fp.spectral_gap(P, method="qr")
    with pytest.raises(ValueError, match="dC"):
        fp.sensitivity_matvec(P, 1.0)(torch.zeros(2, 2, dtype=DT))
    with pytest.raises(ValueError, match="eps_grid"):
        fp.solve_path(torch.zeros(3, 3, dtype=DT), [0.1, 0.2])
    with pytest.raises(ValueError, match="cost"):
        fp.birkhoff_hopf_theta(torch.zeros(3))


def test_assignment_gap_brute_force():
    for seed in range(3):
        n = 5
        C = torch.rand(n, n, generator=_gen(30 + seed), dtype=DT)
        costs = sorted(float(C[torch.arange(n), torch.tensor(p)].sum()) for p in itertools.permutations(range(n)))
        gap, perm = fp.assignment_gap(C)
        assert abs(gap - (costs[1] - costs[0])) < 1e-12
        assert abs(float(C[torch.arange(n), perm].sum()) - costs[0]) < 1e-12


def test_deep_gap_rate_predicts_exponential_decay():
    n = 6
    C = torch.randn(n, n, generator=_gen(40), dtype=DT)
    path = fp.solve_path(C, torch.logspace(0, -1.6, 17, dtype=DT).tolist(), max_iter=50)
    assert path.all_converged
    r = fp.deep_gap_rate(path.plan[-1], float(path.eps[-1]))
    gam = fp.spectral_gap(path.plan)
    deep = path.eps <= r / 8
    assert int(deep.sum()) >= 3
    slope = torch.linalg.lstsq(torch.stack([1 / path.eps[deep], torch.ones_like(path.eps[deep])], 1),
                               torch.log(gam[deep])[:, None]).solution[0, 0]
    assert abs(float(-slope) - r) < 0.15 * r
    _, perm = fp.assignment_gap(C)
    assert fp.deep_gap_rate(path.plan[-1], float(path.eps[-1]), perm=perm) == r
    with pytest.raises(ValueError, match="perm"):
        fp.deep_gap_rate(path.plan[-1], 1.0, perm=torch.zeros(n, dtype=torch.long))


def test_transient_growth_normal_vs_scaling():
    n, eps = 8, 0.15
    C = torch.randn(n, n, generator=_gen(50), dtype=DT)
    res = _solve(C, eps)
    P = res.plan
    norms, lam2 = fp.transient_growth(P, 30)
    k = torch.arange(31, dtype=DT)
    assert torch.allclose(norms[1:], lam2 ** k[1:], rtol=1e-9)  # symmetric: exactly lambda_2^k
    ns, lam2s = fp.transient_growth(P, 30, coords="scaling", g=res.g, eps=eps)
    kap = float(fp.eigenvector_condition(P, coords="scaling", g=res.g, eps=eps))
    assert float(lam2s) == float(lam2)
    ratio = ns[1:] / lam2 ** k[1:]
    assert bool((ratio >= 1 - 1e-9).all()) and bool((ratio <= kap * (1 + 1e-9)).all())
    assert float(ratio.max()) > 1.5  # genuine transient amplification in scaling coordinates
    # brute force: J^k - E from matrix powers of the dense Jacobian
    J = fp.jacobian(P, coords="scaling", g=res.g, eps=eps)
    v = torch.exp(res.g / eps)
    b = P.sum(0)
    E = v[:, None] * (b / v)[None, :] / float((b / v) @ v)
    assert abs(float(torch.linalg.matrix_norm(torch.linalg.matrix_power(J, 5) - E, ord=2)) - float(ns[5])) < 1e-9 * float(ns[5])


def test_resolvent_norm_disconnected_is_inf():
    # a permutation-like plan whose off-support entries underflow: gamma = 0, resolvent = inf
    P = torch.eye(4, dtype=DT) / 4
    assert float(fp.spectral_gap(P)) == 0.0
    assert math.isinf(float(fp.resolvent_norm(P)))
