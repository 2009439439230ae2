"""The fused (torch.compile) Sinkhorn path against the eager solver, on the CPU.

Correctness never needs a GPU: the graphs that TorchInductor turns into Triton kernels on CUDA are
captured here on the CPU. Most tests compile with the ``aot_eager`` backend (Dynamo capture,
functionalisation and AOTAutograd: the exact graph and backward that Inductor receives, without
code generation, so they are fast); one test compiles every graph with Inductor's C++ code
generator on a small problem. No timing is asserted anywhere.
"""

import math
import os
import warnings

import pytest
import torch

import bistochastic as bs
from bistochastic import _fused
from bistochastic.bench import make_problem


@pytest.fixture(autouse=True)
def _aot_eager(monkeypatch):
    monkeypatch.setenv("BISTOCHASTIC_FUSED_BACKEND", "aot_eager")
    monkeypatch.setattr(_fused, "_FAILED", False)


def _scaled(C, eps, a, b):
    return -C / eps, a.log(), b.log()


def _solve(C, eps, a, b, **kw):
    Kc, la, lb = _scaled(C, eps, a, b)
    F0 = torch.zeros(C.shape[:-1], dtype=C.dtype)
    G0 = torch.zeros(C.shape[:-2] + C.shape[-1:], dtype=C.dtype)
    kw.setdefault("check_every", 3)
    kw.setdefault("fixed", False)
    return _fused.solve_detached(Kc, la, lb, a, b, F0, G0, **kw)


def _gauge_free(x):
    """Potentials are defined up to f + c, g - c: compare them after removing the mean."""
    return x - x.mean(-1, keepdim=True)


def test_block_matches_eager_reference():
    # the compiled block computes the same iterates as the uncompiled one (round-off: float64)
    g = torch.Generator().manual_seed(0)
    Kc = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    la = torch.log_softmax(torch.randn(3, 7, generator=g, dtype=torch.float64), -1)
    lb = torch.log_softmax(torch.randn(3, 5, generator=g, dtype=torch.float64), -1)
    F = torch.zeros(3, 7, dtype=torch.float64)
    G = torch.zeros(3, 5, dtype=torch.float64)
    for omega in (1.0, 1.5):
        Fc, Gc = _fused.log_block(Kc, la, lb, F, G, 4, omega)
        om = torch.tensor(omega, dtype=torch.float64)
        Fe, Ge = _fused._block_impl(Kc, la, lb, F, G, om, 4)
        torch.testing.assert_close(Fc, Fe, rtol=0, atol=1e-12)
        torch.testing.assert_close(Gc, Ge, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-9), (torch.float32, 2e-5)])
@pytest.mark.parametrize("momentum", [None, 1.5, "adaptive"])
def test_dense_solve_matches_public_solver(dtype, atol, momentum):
    # plan, potentials and reported error against bs.sinkhorn (log engine) at convergence: both
    # solve the same strictly convex problem, so at tol the plans differ by O(tol) entrywise at most
    n, eps = 48, 0.05
    C, a, b = make_problem(n, dtype, "cpu")
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    ref = bs.sinkhorn(C, eps, a, b, tol=tol, grad="none", engine="log", warn=False)
    F, G, P, err, nit, it, hist = _solve(C, eps, a, b, tol=tol, max_iter=5000, momentum=momentum)
    assert bool(ref.converged) and float(err) <= tol
    # honest report: the error describes the returned plan exactly (same formula, same tensor)
    assert float(err) == float(bs.marginal_error(P, a, b))
    assert hist[-1] is err and int(nit) == it
    # plan: entries are O(1/n^2); an O(tol) marginal error bounds their difference
    torch.testing.assert_close(P, ref.plan.to(dtype), rtol=0, atol=atol / n)
    # potentials, in cost units, up to the gauge constant
    torch.testing.assert_close(_gauge_free(F * eps), _gauge_free(ref.f.to(dtype)), rtol=0,
                               atol=50 * eps * atol)
    torch.testing.assert_close(_gauge_free(G * eps), _gauge_free(ref.g.to(dtype)), rtol=0,
                               atol=50 * eps * atol)


def test_plain_updates_match_log_engine_iterate_for_iterate():
    # with no relaxation and a fixed iteration count, the fused loop and the eager log engine run
    # the very same updates: their plans agree to round-off (float64), not just at convergence
    n, eps = 40, 0.02
    C, a, b = make_problem(n, torch.float64, "cpu")
    ref = bs.sinkhorn(C, eps, a, b, n_iter=30, grad="none", engine="log", momentum=None,
                      warn=False)
    # the eager solver centres the cost (C - r ⊕ s); the plan is invariant, so use plain C
    F, G, P, err, nit, it, hist = _solve(C, eps, a, b, tol=0.0, max_iter=30, fixed=True)
    assert it == 30
    torch.testing.assert_close(P, ref.plan, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(err, ref.marginal_error, rtol=1e-6, atol=1e-15)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_tiny_batch_matches_project_dsm(dtype, atol):
    # the mHC shape (a batch of 4x4 projections, 20 sweeps, no convergence test)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 4, 4, generator=g, dtype=torch.float64).to(dtype)
    tau = 0.5
    ref = bs.project_dsm(logits, tau=tau, n_iter=20, engine="log", momentum=None, warn=False)
    one = torch.ones(64, 4, dtype=dtype)
    Kc = logits / tau
    F, G, P, err, nit, it, hist = _fused.solve_detached(
        Kc, one.log(), one.log(), one, one, torch.zeros_like(one), torch.zeros_like(one),
        tol=1e-6, max_iter=20, check_every=5, fixed=True)
    assert it == 20 and err.shape == (64,) and nit.shape == (64,)
    torch.testing.assert_close(P, ref.plan, rtol=0, atol=atol)
    torch.testing.assert_close(err, bs.marginal_error(P, one, one), rtol=0, atol=0)
    assert bool((nit == 20).all())  # fixed mode: every element ran all 20 sweeps


def test_zero_weights_support_restriction():
    # zero weights: -inf log-marginals; plain updates keep the plan exactly zero off the support
    n, eps = 30, 0.05
    C, a, b = make_problem(n, torch.float64, "cpu")
    a = a.clone()
    b = b.clone()
    a[:5] = 0
    b[-3:] = 0
    a, b = a / a.sum(), b / b.sum()
    ref = bs.sinkhorn(C, eps, a, b, tol=1e-10, grad="none", engine="log", warn=False)
    F, G, P, err, nit, it, hist = _solve(C, eps, a, b, tol=1e-10, max_iter=5000,
                                         momentum="adaptive", masked=True)
    assert float(err) <= 1e-10
    assert bool((P[:5] == 0).all()) and bool((P[:, -3:] == 0).all())
    assert bool(torch.isinf(F[:5]).all()) and not bool(torch.isnan(P).any())
    torch.testing.assert_close(P, ref.plan, rtol=0, atol=1e-10 / n)


def test_non_convergence_is_reported():
    # too few iterations at a small eps: the error (of the returned plan) exceeds tol, n_iter = all
    C, a, b = make_problem(32, torch.float64, "cpu")
    F, G, P, err, nit, it, hist = _solve(C, 0.002, a, b, tol=1e-9, max_iter=20)
    assert it == 20 and float(err) > 1e-9 and int(nit) == 20
    assert float(err) == float(bs.marginal_error(P, a, b)) and len(hist) == 7  # ceil(20 / 3) checks


def test_block_gradient_matches_eager_backward():
    # the unrolled (training) path: gradients through the compiled block equal eager autograd
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 4, 4, generator=g, dtype=torch.float64)
    W = torch.randn(8, 4, 4, generator=g, dtype=torch.float64)
    z = torch.zeros(8, 4, dtype=torch.float64)

    def loss(block, X):
        F, G = block(X, z, z, z, z, 5)
        return (torch.exp(X + F[..., :, None] + G[..., None, :]) * W).sum()

    X1 = logits.clone().requires_grad_()
    X2 = logits.clone().requires_grad_()
    (g1,) = torch.autograd.grad(loss(_fused.log_block, X1), X1)
    (g2,) = torch.autograd.grad(loss(_fused._block_plain_impl, X2), X2)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    assert float(g1.abs().max()) > 1e-3  # a real, non-vanishing gradient was compared


def test_dispatch_rules(monkeypatch):
    x = torch.zeros(3, 3)
    monkeypatch.setenv("BISTOCHASTIC_FUSED", "auto")
    assert not _fused.use_fused(x)  # CPU tensors stay eager by default
    monkeypatch.setenv("BISTOCHASTIC_FUSED", "cpu")
    assert _fused.use_fused(x) and _fused.use_fused(x.double())
    assert not _fused.use_fused(x.half())  # half precision: eager path
    monkeypatch.setenv("BISTOCHASTIC_FUSED", "0")
    assert not _fused.use_fused(x)
    monkeypatch.setenv("BISTOCHASTIC_FUSED", "cpu")
    with pytest.warns(RuntimeWarning, match="disabled"):
        _fused.disable("test")
    assert not _fused.use_fused(x)  # after a failure, the eager path takes over


@pytest.mark.skipif(
    bool(os.environ.get("ATEN_CPU_CAPABILITY")),
    reason="ATEN_CPU_CAPABILITY forces ATen's vector kernels below what Inductor detects on the "
    "CPU, and Inductor's generated C++ then does not compile; the codegen is tested natively")
def test_inductor_codegen_cpu(monkeypatch):
    # every compiled graph through Inductor's real code generator (C++ on the CPU; Triton on
    # CUDA is generated from the same graph), one small problem, blocks of 2 (fast to compile)
    monkeypatch.setenv("BISTOCHASTIC_FUSED_BACKEND", "inductor")
    C, a, b = make_problem(24, torch.float64, "cpu")
    eps = 0.05
    ref = bs.sinkhorn(C, eps, a, b, tol=1e-9, grad="none", engine="log", warn=False)
    for mom in (None, "adaptive"):
        F, G, P, err, nit, it, hist = _solve(C, eps, a, b, tol=1e-9, max_iter=5000,
                                             check_every=2, momentum=mom)
        assert float(err) <= 1e-9 and float(err) == float(bs.marginal_error(P, a, b))
        torch.testing.assert_close(P, ref.plan, rtol=0, atol=1e-9 / 24)
    X = (-C / eps).requires_grad_()
    z = torch.zeros(24, dtype=torch.float64)
    Fc, Gc = _fused.log_block(X, a.log(), b.log(), z, z, 2)
    (gc,) = torch.autograd.grad((Fc.sin().sum() + Gc.cos().sum()), X)
    X2 = X.detach().clone().requires_grad_()
    Fe, Ge = _fused._block_plain_impl(X2, a.log(), b.log(), z, z, 2)
    (ge,) = torch.autograd.grad((Fe.sin().sum() + Ge.cos().sum()), X2)
    torch.testing.assert_close(gc, ge, rtol=1e-9, atol=1e-12)


def test_solver_hook_if_merged(monkeypatch):
    # once bs.sinkhorn dispatches to the fused path (the hook in sinkhorn.py), forcing it on the
    # CPU must not change what the public API returns
    import sys

    sk = sys.modules["bistochastic.sinkhorn"]
    if "_fused" not in open(sk.__file__).read():
        pytest.skip("the hook calling bistochastic._fused is not in sinkhorn.py on this branch")
    C, a, b = make_problem(40, torch.float64, "cpu")
    logits = C[:32, :4].reshape(8, 4, 4) / C.max()
    ones = torch.ones(8, 4, dtype=torch.float64)
    out = {}
    for mode in ("0", "cpu"):
        monkeypatch.setenv("BISTOCHASTIC_FUSED", mode)
        out[mode] = (bs.sinkhorn(C, 0.05, a, b, tol=1e-9, grad="none", warn=False),
                     bs.project_dsm(logits, tau=0.3, n_iter=20, warn=False))
    d0, t0 = out["0"]
    d1, t1 = out["cpu"]
    assert bool(d0.converged) and bool(d1.converged)
    torch.testing.assert_close(d1.plan, d0.plan, rtol=0, atol=1e-9 / 40)
    torch.testing.assert_close(t1.plan, t0.plan, rtol=0, atol=1e-12)
    # every reported number describes the returned plan, on the fused path too
    assert torch.equal(d1.marginal_error, bs.marginal_error(d1.plan, a, b))
    assert torch.equal(t1.marginal_error, bs.marginal_error(t1.plan, ones, ones))


# -------------------------------------------------------------------------------------- GPU
# The same checks on CUDA, where bs.sinkhorn dispatches to the fused path by itself and Inductor
# generates Triton kernels. They run only where a GPU is present (`pytest -m gpu`); the CPU tests
# above already cover the graphs. Each asserts that the fused path really ran (no silent fallback).

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


@pytest.fixture
def _inductor(monkeypatch):
    monkeypatch.setenv("BISTOCHASTIC_FUSED_BACKEND", "inductor")
    monkeypatch.setenv("BISTOCHASTIC_FUSED", "auto")


def _no_fallback(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # `disable` warns when it falls back
        out = fn()
    assert not _fused._FAILED
    return out


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("momentum", [None, "adaptive"])
def test_gpu_public_solver_takes_the_fused_path(_inductor, dtype, tol, momentum):
    n, eps = 512, 0.02
    C, a, b = make_problem(n, dtype, "cpu")
    assert _fused.use_fused(C.cuda())
    ref = bs.sinkhorn(C.double(), eps, a.double(), b.double(), tol=1e-12, grad="none",
                      engine="log", warn=False)
    out = _no_fallback(lambda: bs.sinkhorn(C.cuda(), eps, a.cuda(), b.cuda(), tol=tol,
                                           grad="none", momentum=momentum))
    assert out.plan.device.type == "cuda" and out.plan.dtype == dtype
    assert bool(out.converged) and float(out.marginal_error) <= tol
    # the reported error describes the returned plan (recomputed on the device, same formula)
    assert float(out.marginal_error) == float(bs.marginal_error(out.plan, a.cuda(), b.cuda()))
    # a relative L1 marginal error tol bounds the entrywise distance to the exact plan by O(tol/n)
    torch.testing.assert_close(out.plan.cpu().double(), ref.plan, rtol=0, atol=10 * tol / n)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_gpu_tiny_batch_matches_cpu(_inductor, monkeypatch, n):
    # fixed sweeps on tiny matrices: the one-kernel Triton path (bistochastic._triton), compiled
    from bistochastic import _triton

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4096, n, n, generator=g, dtype=torch.float64)
    ref = bs.project_dsm(logits, tau=0.5, n_iter=20, engine="log", momentum=None, warn=False)
    calls = []
    real = _triton.tiny_solve
    monkeypatch.setattr(_triton, "tiny_solve", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = _no_fallback(lambda: bs.project_dsm(logits.float().cuda(), tau=0.5, n_iter=20,
                                              warn=False))
    assert calls == [1]
    assert out.plan.device.type == "cuda" and out.plan.dtype == torch.float32
    torch.testing.assert_close(out.plan.cpu().double(), ref.plan, rtol=0, atol=2e-6)
    ones = torch.ones(4096, n, device="cuda")
    assert torch.equal(out.marginal_error, bs.marginal_error(out.plan, ones, ones))


@pytest.mark.gpu
@cuda
def test_gpu_implicit_gradient_matches_cpu(_inductor):
    # fused forward, implicit backward on the device; the CPU eager solver is the reference
    g = torch.Generator().manual_seed(4)
    C = torch.rand(4, 48, 48, generator=g, dtype=torch.float64)
    W = torch.randn(4, 48, 48, generator=g, dtype=torch.float64)
    grads = []
    for dev in ("cpu", "cuda"):
        X = C.to(dev).requires_grad_()
        res = _no_fallback(lambda: bs.sinkhorn(X, 0.05, tol=1e-12, grad="implicit",
                                               max_iter=20000))
        (gr,) = torch.autograd.grad((res.plan * W.to(dev)).sum(), X)
        grads.append(gr.cpu())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-9)
    assert float(grads[0].abs().max()) > 1e-3
