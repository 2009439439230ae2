"""Sinkhorn tests of OTT-JAX (``tests/solvers/linear/sinkhorn_test.py`` and
``sinkhorn_diff_test.py``, ott-jax/ott) ported by their mathematics to ``bs.sinkhorn`` (no JAX is
installed). OTT's random draws come from JAX keys; ours from seeded torch generators with the same
shapes and distributions. Sizes, eps, thresholds and tolerances are OTT's.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import bistochastic as bs

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _sqeucl(x, y):
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


COSTS = {
    "sqeuclidean": _sqeucl,
    "sqpnorm2.2": lambda x, y: ((x[:, None, :] - y[None, :, :]).abs() ** 2.2).sum(-1) ** (2 / 2.2),
    "euclidean": lambda x, y: _sqeucl(x, y).clamp_min(0).sqrt(),
    "sqpnorm1": lambda x, y: (x[:, None, :] - y[None, :, :]).abs().sum(-1) ** 2,
}


@pytest.fixture
def ott_problem():
    """OTT's fixture: 17 and 29 points in [0,1]^4, random weights with a[0] = 0 and b[3] = 0."""
    g = _gen(0)
    x = torch.rand(17, 4, generator=g, dtype=F64)
    y = torch.rand(29, 4, generator=g, dtype=F64)
    a = torch.rand(17, generator=g, dtype=F64)
    b = torch.rand(29, generator=g, dtype=F64)
    a[0] = 0  # adding zero weights to test proper handling
    b[3] = 0
    return x, y, a / a.sum(), b / b.sum()


def _reg_ot_cost(res, a, b):
    """OTT's balanced ``reg_ot_cost``: <f, a> + <g, b> with zero weights masked."""
    f = torch.where(a > 0, res.f, torch.zeros_like(res.f))
    g = torch.where(b > 0, res.g, torch.zeros_like(res.g))
    return (f * a).sum(-1) + (g * b).sum(-1)


@pytest.mark.parametrize("engine,check_every,cost", [
    ("log", 10, "sqeuclidean"), ("absorb", 10, "sqpnorm2.2"), ("log", 1, "euclidean"),
    ("absorb", 24, "sqpnorm1")])
def test_euclidean_point_cloud(ott_problem, engine, check_every, cost):
    """OTT ``test_euclidean_point_cloud``: eps 0.1, threshold 1e-3, transported mass 1 within 1e-4,
    and the plan's cost on another geometry is not NaN (OTT's variants: lse/kernel mode, inner
    iterations 10/1/24, four costs)."""
    x, y, a, b = ott_problem
    C = COSTS[cost](x, y)
    res = bs.sinkhorn(C, 0.1, a, b, tol=1e-3, engine=engine, check_every=check_every)
    assert float(res.errors[-1]) < 1e-3
    np.testing.assert_allclose(float(res.plan.sum()), 1.0, rtol=1e-4, atol=1e-4)
    other = (res.plan * _sqeucl(x, y + 0.3)).sum()
    assert not torch.isnan(other)
    assert torch.isfinite(res.errors).all()  # zero weights never put inf in the history


@pytest.mark.parametrize("eps", [0.1, 0.01, 0.003])
@pytest.mark.parametrize("engine", ["log", "absorb"])
def test_zero_weights_cost_nothing(ott_problem, eps, engine):
    """Zero weights are rows/columns without mass: the solve equals the solve of the problem
    without them (same plan on the support, zeros elsewhere) in the same number of iterations
    (the issue this guards: acceleration switched off, 10x the iterations)."""
    x, y, a, b = ott_problem
    C = _sqeucl(x, y)
    full = bs.sinkhorn(C, eps, a, b, tol=1e-9, max_iter=20000, engine=engine)
    keep_r, keep_c = a > 0, b > 0
    red = bs.sinkhorn(C[keep_r][:, keep_c], eps, a[keep_r], b[keep_c], tol=1e-9, max_iter=20000,
                      engine=engine)
    assert full.all_converged and red.all_converged
    torch.testing.assert_close(full.plan[keep_r][:, keep_c], red.plan, atol=1e-12, rtol=0)
    assert (full.plan[~keep_r] == 0).all() and (full.plan[:, ~keep_c] == 0).all()
    assert abs(full.iterations - red.iterations) <= 10  # one check apart at most
    assert torch.isinf(full.f[~keep_r]).all() and torch.isfinite(full.f[keep_r]).all()


def test_diag_sum(ott_problem):
    """OTT ``test_diag_sum``: a cloud against itself at eps 0.01 keeps > 99% of the mass on the
    diagonal (uniform weights, threshold 1e-3)."""
    x = ott_problem[0]
    res = bs.sinkhorn(_sqeucl(x, x), 0.01, tol=1e-3)
    d = float(torch.diagonal(res.plan).sum())
    assert 0.99 < d < 1.0


def test_sqeucl_matches_hungarian(ott_problem):
    """OTT ``test_SqEucl_matches_hungarian``: at eps 0.01 the plan is close (cosine distance < 0.2)
    to the optimal assignment, and squared-Euclidean and negative-dot-product costs give nearly the
    same plan (< 0.02)."""
    x = ott_problem[0]
    y = torch.rand(x.shape, generator=_gen(1), dtype=F64)
    n = x.shape[0]
    C = _sqeucl(x, y)
    rows, cols = linear_sum_assignment(C.numpy())
    P_h = torch.zeros(n, n, dtype=F64)
    P_h[rows, cols] = 1.0 / n
    p1 = bs.sinkhorn(C, 0.01, tol=1e-3).plan.flatten()
    p2 = bs.sinkhorn(-(x @ y.T), 0.01, tol=1e-3).plan.flatten()

    def cos_dist(u, v):
        return 1 - float(u @ v) / float(u.norm() * v.norm())

    assert cos_dist(p1, p2) < 0.02
    assert cos_dist(p1, P_h.flatten()) < 0.2


def test_lse_matches(ott_problem):
    """OTT ``test_lse_matches`` (balanced case): the log and scaling engines give the same
    regularised cost within 1e-6."""
    x, y, a, b = ott_problem
    C = _sqeucl(x, y)
    out = {e: bs.sinkhorn(C, 0.05, a, b, engine=e) for e in ("log", "absorb")}
    assert all(r.all_converged for r in out.values())
    np.testing.assert_allclose(float(_reg_ot_cost(out["log"], a, b)),
                               float(_reg_ot_cost(out["absorb"], a, b)), rtol=1e-6, atol=1e-6)


def test_autoepsilon(ott_problem):
    """OTT ``test_autoepsilon``: with eps relative to the mean cost, scaling the points by 2.77
    scales eps and the potentials by 2.77² (rtol 1e-3; balanced case)."""
    x, y, a, b = ott_problem
    scale = 2.77
    C1, C2 = _sqeucl(x, y), _sqeucl(scale * x, scale * y)
    e1, e2 = 0.05 * float(C1.mean()), 0.05 * float(C2.mean())
    np.testing.assert_allclose(e1 * scale**2, e2, rtol=1e-3, atol=1e-3)
    f1 = bs.sinkhorn(C1, e1, a, b).f
    f2 = bs.sinkhorn(C2, e2, a, b).f
    keep = a > 0
    np.testing.assert_allclose((f1 * scale**2)[keep].numpy(), f2[keep].numpy(), rtol=1e-3,
                               atol=1e-3)


@pytest.mark.parametrize("engine", ["log", "absorb"])
def test_restart(ott_problem, engine):
    """OTT ``test_restart``: restarting from the returned potentials (zero weights included, so
    -inf potentials) meets the threshold after one iteration, with a smaller error."""
    x, y, a, b = ott_problem
    C = _sqeucl(x, y)
    res = bs.sinkhorn(C, 0.05, a, b, tol=1e-2, engine=engine)
    assert float(res.marginal_error) < 1e-2
    again = bs.sinkhorn(C, 0.05, a, b, tol=1e-2, init=(res.f, res.g), check_every=1,
                        engine=engine)
    assert int(again.n_iter) == 1
    assert float(again.marginal_error) < float(res.marginal_error)


def test_primal_cost_pointcloud(ott_problem):
    """OTT ``test_primal_cost_pointcloud``: at eps 1e-3 the primal cost is positive, the dual is
    finite, and the relative duality gap is below 0.1."""
    x, y, a, b = ott_problem
    eps = 1e-3
    C = _sqeucl(x, y)
    res = bs.sinkhorn(C, eps, a, b, tol=1e-3, max_iter=5000)
    P = res.plan
    plogp = torch.where(P > 0, P * torch.log(torch.where(P > 0, P, torch.ones_like(P))),
                        torch.zeros_like(P))
    primal = float((P * C).sum() + eps * (plogp - P).sum())
    dual = float(_reg_ot_cost(res, a, b)) - eps * float(P.sum())
    assert primal > 0 and np.isfinite(dual)
    np.testing.assert_allclose((primal - dual) / primal, 0, atol=1e-1)


# ------------------------------------------------------------------ sinkhorn_diff_test.py


def _fd(fun, x, delta, h=1e-3):
    return (fun(x + h * delta) - fun(x - h * delta)) / (2 * h)


@pytest.mark.parametrize("tol", [1e-4, 1e-6])
def test_implicit_differentiation_versus_autodiff(tol):
    """OTT ``TestSinkhornImplicit``: 38 x 73 points in [0,1]^3, eps 0.05, gradients of the
    regularised cost w.r.t. the weights ``a`` and the points ``x`` by implicit differentiation
    match finite differences (rtol 1e-2) and back-propagation through the iterations (weights'
    gradients up to their mean, rtol 1e-2, atol 2e-2). OTT's unbalanced tau_a, tau_b are not
    expressible here (balanced only)."""
    g = _gen(2)
    x = torch.rand(38, 3, generator=g, dtype=F64)
    y = torch.rand(73, 3, generator=g, dtype=F64)
    a = torch.rand(38, generator=g, dtype=F64) + 0.1
    b = torch.rand(73, generator=g, dtype=F64) + 0.1
    a, b = a / a.sum(), b / b.sum()

    def loss(a_, x_, mode="implicit"):
        res = bs.sinkhorn(_sqeucl(x_, y), 5e-2, a_ / a_.sum(), b, tol=tol, grad=mode,
                          max_iter=10000)
        return _reg_ot_cost(res, a_ / a_.sum(), b)

    grads = {}
    for mode in ("implicit", "unroll"):
        a_ = a.clone().requires_grad_()
        x_ = x.clone().requires_grad_()
        grads[mode] = torch.autograd.grad(loss(a_, x_, mode), (a_, x_))
    with torch.no_grad():
        da = torch.rand(38, generator=_gen(3), dtype=F64) / 10
        da = da - da.mean()
        fd = _fd(lambda t: loss(t, x), a, da)
        np.testing.assert_allclose(float((da * grads["implicit"][0]).sum()), float(fd),
                                   rtol=1e-2, atol=1e-2)
        gi, gu = grads["implicit"][0], grads["unroll"][0]
        np.testing.assert_allclose((gi - gi.mean()).numpy(), (gu - gu.mean()).numpy(),
                                   rtol=1e-2, atol=2e-2)
        dx = torch.rand(38, 3, generator=_gen(4), dtype=F64)
        fd = _fd(lambda t: loss(a, t), x, dx)
        np.testing.assert_allclose(float((dx * grads["implicit"][1]).sum()), float(fd),
                                   rtol=1e-2, atol=1e-2)
        np.testing.assert_allclose(grads["implicit"][1].numpy(), grads["unroll"][1].numpy(),
                                   rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("shape", [(7, 9), (11, 5)])
@pytest.mark.parametrize("mode", ["implicit", "unroll"])
def test_autograd_sinkhorn(shape, mode):
    """OTT ``test_autograd_sinkhorn``: gradient w.r.t. the weights with a zero weight in each
    marginal, eps 0.1: no NaN, and its product with a perturbation of the nonzero weights matches
    finite differences (rtol 1e-3, atol 1e-2)."""
    n, m = shape
    h = 1e-3
    g = _gen(5)
    x = torch.rand(n, 3, generator=g, dtype=F64)
    y = torch.rand(m, 3, generator=g, dtype=F64)
    a = torch.rand(n, generator=g, dtype=F64) + h
    b = torch.rand(m, generator=g, dtype=F64) + h
    a[0] = 0
    b[3] = 0
    a, b = a / a.sum(), b / b.sum()
    C = _sqeucl(x, y)

    def reg_ot(a_, b_, grad="none"):
        return _reg_ot_cost(bs.sinkhorn(C, 0.1, a_, b_, grad=grad), a_, b_)

    a_ = a.clone().requires_grad_()
    (ga,) = torch.autograd.grad(reg_ot(a_, b, mode), a_)
    assert not torch.isnan(ga).any()
    delta = torch.rand(n, generator=_gen(6), dtype=F64) * (a > 0)
    delta = (delta - delta.sum() / (a > 0).sum()) * (a > 0)
    fd = _fd(lambda t: reg_ot(t, b), a, delta, h)
    np.testing.assert_allclose(float((delta * ga).sum()), float(fd), rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("shape", [(7, 9), (11, 5)])
@pytest.mark.parametrize("mode", ["implicit", "unroll"])
def test_gradient_sinkhorn_geometry(shape, mode):
    """OTT ``test_gradient_sinkhorn_geometry``: gradient of the regularised cost w.r.t. the cost
    matrix (eps 0.5) is the plan (envelope theorem) and matches finite differences (1e-2)."""
    n, m = shape
    g = _gen(7)
    C = torch.randn(n, m, generator=g, dtype=F64).abs()
    delta = torch.randn(n, m, generator=g, dtype=F64)
    delta = delta / delta.norm()

    def loss(c, grad="none"):
        res = bs.sinkhorn(c, 0.5, grad=grad)
        return _reg_ot_cost(res, torch.full((n,), 1 / n, dtype=F64),
                            torch.full((m,), 1 / m, dtype=F64)), res

    C_ = C.clone().requires_grad_()
    val, res = loss(C_, mode)
    (gC,) = torch.autograd.grad(val, C_)
    assert not torch.isnan(gC).any() and gC.shape == C.shape
    custom = float((delta * gC).sum())
    other = float((delta * res.plan.detach()).sum())
    fd = float(_fd(lambda c: loss(c)[0], C, delta))
    np.testing.assert_allclose(custom, other, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(custom, fd, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(other, fd, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("mode", ["implicit", "unroll"])
@pytest.mark.parametrize("eps", [0.1, 0.01])
def test_gradient_sinkhorn_euclidean(mode, eps):
    """OTT ``test_gradient_sinkhorn_euclidean``: zero weights, one target point almost on a source
    point; the gradient of the regularised cost w.r.t. the points matches the envelope formula and
    finite differences (rtol 1e-2, atol 1e-2)."""
    n, m, d = 11, 13, 2
    g = _gen(8)
    x = torch.rand(n, d, generator=g, dtype=F64)
    y = torch.rand(m, d, generator=g, dtype=F64)
    a = torch.rand(n, generator=g, dtype=F64)
    b = torch.rand(m, generator=g, dtype=F64)
    a[0] = 0
    b[3] = 0
    a, b = a / a.sum(), b / b.sum()
    y[0] = x[0] + 1e-3

    def loss(x_, grad="none"):
        res = bs.sinkhorn(_sqeucl(x_, y), eps, a, b, grad=grad, tol=1e-9, max_iter=10000)
        return _reg_ot_cost(res, a, b), res

    x_ = x.clone().requires_grad_()
    val, res = loss(x_, mode)
    (gx,) = torch.autograd.grad(val, x_)
    delta = torch.randn(n, d, generator=g, dtype=F64)
    delta = delta / delta.norm()
    custom = float((delta * gx).sum())
    # envelope: d/dx_i sum_j P_ij |x_i - y_j|^2 = 2 sum_j P_ij (x_i - y_j)
    P = res.plan.detach()
    other = float((delta * 2 * (P.sum(1)[:, None] * x - P @ y)).sum())
    fd = float(_fd(lambda t: loss(t)[0], x, delta))
    assert not np.isnan(custom)
    np.testing.assert_allclose(custom, other, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(custom, fd, rtol=1e-2, atol=1e-2)
