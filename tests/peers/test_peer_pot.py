"""Sinkhorn tests of POT (``test/test_bregman.py``, PythonOT/POT) ported to ``bs.sinkhorn``.

Inputs, tolerances and properties are POT's; where POT compares two of its own solvers, we compare
our engines with each other and with POT (installed, used as the reference solver). README.md in
this folder lists what each test ports and what our API cannot express.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import bistochastic as bs

ot = pytest.importorskip("ot")

F64 = torch.float64


def _t(x):
    return torch.as_tensor(np.asarray(x), dtype=F64)


def _cloud(n, seed=0, dim=2):
    rng = np.random.RandomState(seed)
    return rng.randn(n, dim)


@pytest.mark.parametrize("engine", ["log", "absorb"])
def test_sinkhorn(engine):
    """POT ``test_sinkhorn``: marginals within 1e-5 at reg 1, stopThr 1e-10; and a warning when
    one iteration cannot reach stopThr = 0."""
    n = 100
    x = _cloud(n)
    u = ot.utils.unif(n)
    M = ot.dist(x, x)
    res = bs.sinkhorn(_t(M), 1.0, _t(u), _t(u), tol=1e-10, engine=engine)
    np.testing.assert_allclose(u, res.plan.sum(1).numpy(), atol=1e-05)
    np.testing.assert_allclose(u, res.plan.sum(0).numpy(), atol=1e-05)
    with pytest.warns(bs.SinkhornWarning):
        bs.sinkhorn(_t(M), 1.0, _t(u), _t(u), tol=0, max_iter=1, engine=engine)


@pytest.mark.parametrize("engine", ["log", "absorb"])
def test_convergence_warning(engine):
    """POT ``test_convergence_warning``: stopThr 0 and one iteration warns; ``warn=False`` does not."""
    n = 100
    a1 = ot.datasets.make_1D_gauss(n, m=30, s=10)
    a2 = ot.datasets.make_1D_gauss(n, m=40, s=10)
    M = ot.utils.dist0(n)
    with pytest.warns(bs.SinkhornWarning):
        bs.sinkhorn(_t(M), 1.0, _t(a1), _t(a2), tol=0, max_iter=1, engine=engine)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = bs.sinkhorn(_t(M), 1.0, _t(a1), _t(a2), tol=0, max_iter=1, engine=engine,
                          warn=False)
    assert not bool(res.converged)


def test_not_implemented_method():
    """POT ``test_not_implemented_method``: an unknown method is a ValueError."""
    M = _t(ot.utils.dist0(4))
    with pytest.raises(ValueError, match="`engine`"):
        bs.sinkhorn(M, 0.01, engine="new_method")


def test_nan_warning_becomes_a_clear_error():
    """POT ``test_nan_warning`` (reg = 0 gives NaN and a warning in POT): we refuse eps = 0."""
    M = _t(ot.utils.dist0(100))
    with pytest.raises(ValueError, match="`eps` must be a positive finite number"):
        bs.sinkhorn(M, 0.0)


def test_sinkhorn_stabilization():
    """POT ``test_sinkhorn_stabilization``: reg = 1e-5 on ``dist0(100)`` (costs up to 9801): the
    stabilised and log solvers give the same loss within 1e-6, POT's iteration cap (1000)."""
    n = 100
    a1 = ot.datasets.make_1D_gauss(n, m=30, s=10)
    a2 = ot.datasets.make_1D_gauss(n, m=40, s=10)
    M = ot.utils.dist0(n)
    reg = 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss_pot = ot.sinkhorn2(a1, a2, M, reg, method="sinkhorn_log")
        res = {e: bs.sinkhorn(_t(M), reg, _t(a1), _t(a2), max_iter=1000, engine=e, warn=False)
               for e in ("log", "absorb")}
    losses = {e: float((r.plan * _t(M)).sum()) for e, r in res.items()}
    for r in res.values():
        assert torch.isfinite(r.plan).all()
        # honest report whatever happened
        err = bs.marginal_error(r.plan, _t(a1), _t(a2))
        assert abs(float(err) - float(r.marginal_error)) <= 1e-12
    np.testing.assert_allclose(losses["log"], losses["absorb"], atol=1e-06)
    np.testing.assert_allclose(losses["log"], float(loss_pot), atol=1e-06)


@pytest.mark.parametrize("engine", ["log", "absorb"])
def test_sinkhorn_multi_b(engine):
    """POT ``test_sinkhorn_multi_b``: three target marginals at once (our batch) give the losses of
    three separate solves within 1e-4."""
    n = 10
    rng = np.random.RandomState(0)
    x = rng.randn(n, 2)
    u = ot.utils.unif(n)
    b = rng.rand(n, 3)
    b = b / np.sum(b, 0, keepdims=True)
    M = _t(ot.dist(x, x))
    batched = bs.sinkhorn(M, 0.1, _t(u), _t(b.T), tol=1e-10, engine=engine)
    loss0 = (batched.plan * M).sum((-2, -1))
    loss = [float((bs.sinkhorn(M, 0.1, _t(u), _t(b[:, k]), tol=1e-10, engine=engine).plan * M)
                  .sum()) for k in range(3)]
    np.testing.assert_allclose(loss0.numpy(), loss, atol=1e-4)
    pot = [ot.sinkhorn2(u, b[:, k], M.numpy(), 0.1, method="sinkhorn_log", stopThr=1e-10)
           for k in range(3)]
    np.testing.assert_allclose(loss0.numpy(), pot, atol=1e-4)


@pytest.mark.parametrize("grad", ["unroll", "implicit"])
def test_sinkhorn2_gradients(grad):
    """POT ``test_sinkhorn2_gradients``: the loss back-propagates to a, b and M (same shapes)."""
    n = 100
    rng = np.random.RandomState(0)
    x = rng.randn(n, 2)
    y = rng.randn(n, 2)
    a = ot.utils.unif(n)
    M = ot.dist(x, y)
    a1 = torch.tensor(a, requires_grad=True)
    b1 = torch.tensor(a, requires_grad=True)
    M1 = torch.tensor(M, requires_grad=True)
    res = bs.sinkhorn(M1, 1.0, a1, b1, tol=1e-9, grad=grad)
    (res.plan * M1).sum().backward()
    for t in (a1, b1, M1):
        assert t.grad is not None and t.grad.shape == t.shape and torch.isfinite(t.grad).all()


def test_sinkhorn_empty():
    """POT ``test_sinkhorn_empty``: empty weights mean uniform (ours: ``a=None``, ``b=None``)."""
    n = 100
    x = _cloud(n)
    u = ot.utils.unif(n)
    M = _t(ot.dist(x, x))
    for engine in ("log", "absorb"):
        res = bs.sinkhorn(M, 1.0, tol=1e-10, engine=engine)
        np.testing.assert_allclose(u, res.plan.sum(1).numpy(), atol=1e-05)
        np.testing.assert_allclose(u, res.plan.sum(0).numpy(), atol=1e-05)


def test_sinkhorn_variants():
    """POT ``test_sinkhorn_variants`` and ``test_sinkhorn_variants_log``: every POT method and both
    our engines give the same plan within 1e-5 (n = 100 and 50, reg 1, stopThr 1e-10)."""
    for n in (100, 50):
        x = _cloud(n)
        u = ot.utils.unif(n)
        M = ot.dist(x, x)
        ref = ot.sinkhorn(u, u, M, 1, method="sinkhorn", stopThr=1e-10)
        with warnings.catch_warnings():  # POT's greenkhorn warns about its own iteration cap
            warnings.simplefilter("ignore", UserWarning)
            others = [ot.sinkhorn(u, u, M, 1, method=m, stopThr=1e-10)
                      for m in ("sinkhorn_log", "sinkhorn_stabilized", "greenkhorn")]
        ours = [bs.sinkhorn(_t(M), 1.0, _t(u), _t(u), tol=1e-10, engine=e).plan.numpy()
                for e in ("log", "absorb")]
        for G in others + ours:
            np.testing.assert_allclose(ref, G, atol=1e-05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinkhorn_variants_dtype_device(dtype):
    """POT ``test_sinkhorn_variants_dtype_device``: the plan has the input's dtype and device."""
    n = 100
    x = _cloud(n)
    M = torch.as_tensor(ot.dist(x, x), dtype=dtype)
    for engine in ("log", "absorb"):
        res = bs.sinkhorn(M, 1.0, tol=1e-5, engine=engine)
        assert res.plan.dtype == dtype and res.plan.device == M.device
        assert res.f.dtype == dtype and res.marginal_error.dtype == dtype


def test_stabilized_vs_sinkhorn_multidim():
    """POT ``test_stabilized_vs_sinkhorn_multidim``: two target Gaussians at once match POT's
    scaling Sinkhorn (POT compares at its default rtol 1e-7; both solves run to 1e-13 here)."""
    n = 100
    a = ot.datasets.make_1D_gauss(n, m=20, s=5)
    b1 = ot.datasets.make_1D_gauss(n, m=60, s=8)
    b2 = ot.datasets.make_1D_gauss(n, m=30, s=4)
    b = np.vstack((b1, b2)).T
    M = ot.utils.dist0(n)
    M /= np.median(M)
    epsilon = 0.1
    # POT given a matrix b returns the losses of the two problems
    G_np = ot.bregman.sinkhorn(a, b, M, reg=epsilon, method="sinkhorn", stopThr=1e-14,
                               numItermax=100000)
    ours = bs.sinkhorn(_t(M), epsilon, _t(a), _t(b.T), tol=1e-13, max_iter=100000)
    losses = (ours.plan * _t(M)).sum((-2, -1)).numpy()
    np.testing.assert_allclose(G_np, losses, rtol=1e-7)
    for k in range(2):
        single = ot.sinkhorn(a, b[:, k], M, epsilon, method="sinkhorn_log", stopThr=1e-15,
                             numItermax=100000)
        np.testing.assert_allclose(ours.plan[k].numpy(), single, rtol=1e-7, atol=1e-15)


@pytest.mark.parametrize("engine", ["log", "absorb"])
def test_sinkhorn_warmstart(engine):
    """POT ``test_sinkhorn_warmstart``: a warm start from the unregularised duals (``ot.emd``)
    gives the plan of the uniform start within 1e-5 (reg 1, so POT's log-scalings are our
    potentials in cost units)."""
    m, n = 10, 20
    a = ot.unif(m)
    b = ot.unif(n)
    Xs = np.arange(m) * 1.0
    Xt = np.arange(n) * 1.0
    M = ot.dist(Xs.reshape(-1, 1), Xt.reshape(-1, 1))
    _, log = ot.lp.emd(a, b, M, log=True)
    warmstart = (_t(log["u"]), _t(log["v"]))
    reg = 1.0
    pi_unif = bs.sinkhorn(_t(M), reg, _t(a), _t(b), engine=engine).plan
    pi_sh = bs.sinkhorn(_t(M), reg, _t(a), _t(b), engine=engine, init=warmstart).plan
    np.testing.assert_allclose(pi_unif.numpy(), pi_sh.numpy(), atol=1e-05)
    pot = ot.bregman.sinkhorn(a, b, M, reg, method="sinkhorn_log", warmstart=(log["u"], log["v"]))
    np.testing.assert_allclose(pot, pi_sh.numpy(), atol=1e-05)
