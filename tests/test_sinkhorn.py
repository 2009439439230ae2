"""Tests of the Sinkhorn core: agreement with POT, DSM properties, gradients, bad input, GPU."""

from __future__ import annotations

import inspect
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import bistochastic as bs
import importlib

sk = importlib.import_module("bistochastic.sinkhorn")  # the module (bs.sinkhorn is the function)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _problem(n, m, *, seed=0, uniform=True, dtype=F64):
    g = _gen(seed)
    x = torch.rand(n, 2, generator=g, dtype=dtype)
    y = torch.rand(m, 2, generator=g, dtype=dtype)
    C = torch.cdist(x, y) ** 2
    if uniform:
        a = torch.full((n,), 1.0 / n, dtype=dtype)
        b = torch.full((m,), 1.0 / m, dtype=dtype)
    else:
        a = torch.rand(n, generator=g, dtype=dtype) + 0.1
        b = torch.rand(m, generator=g, dtype=dtype) + 0.1
        a, b = a / a.sum(), b / b.sum()
    return C, a, b


# --------------------------------------------------------------------------------- POT agreement


@pytest.mark.parametrize("n,m", [(30, 30), (25, 40), (50, 20)])
@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("eps", [1.0, 0.1, 0.03])
@pytest.mark.parametrize("engine", ["log", "absorb"])
def test_agrees_with_pot_sinkhorn_log(n, m, uniform, eps, engine):
    # POT is a test tool of the book's environment, not a dependency of the package: the other
    # tests of this module run in the package-only venv too (make test-core-install)
    ot = pytest.importorskip("ot")
    C, a, b = _problem(n, m, seed=n + m, uniform=uniform)
    P_pot = ot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), eps, method="sinkhorn_log",
                        stopThr=1e-15, numItermax=200000)
    res = bs.sinkhorn(C, eps, a, b, tol=1e-14, max_iter=200000, engine=engine, grad="none")
    assert res.all_converged
    np.testing.assert_allclose(res.plan.numpy(), P_pot, atol=1e-8, rtol=0)
    # the potentials reproduce the plan
    P_from_pot = torch.exp((res.f[:, None] + res.g[None, :] - C) / eps)
    torch.testing.assert_close(P_from_pot, res.plan, atol=1e-14, rtol=1e-12)


def test_batched_matches_loop_and_tracks_convergence_per_element():
    g = _gen(1)
    C = torch.rand(5, 20, 20, generator=g, dtype=F64)
    eps = torch.tensor([1.0, 0.5, 0.1, 0.05, 0.02], dtype=F64)
    # different scales converge at different speeds: scale the cost per element
    Cs = C / eps[:, None, None]
    res = bs.sinkhorn(Cs, 1.0, tol=1e-12, max_iter=10000)
    assert res.plan.shape == (5, 20, 20) and res.n_iter.shape == (5,)
    assert res.all_converged
    for k in range(5):
        single = bs.sinkhorn(Cs[k], 1.0, tol=1e-12, max_iter=10000)
        torch.testing.assert_close(res.plan[k], single.plan, atol=1e-11, rtol=0)
    # the sharper problems need at least as many iterations (per-element tracking)
    assert res.n_iter[0] <= res.n_iter[-1]
    assert len(set(res.n_iter.tolist())) > 1


# --------------------------------------------------------------------------- DSM properties


@settings(max_examples=40, deadline=None, derandomize=True)
@given(n=st.integers(2, 24), tau=st.floats(0.05, 20.0), seed=st.integers(0, 10_000),
       scale=st.floats(0.1, 5.0))
def test_project_dsm_properties(n, tau, seed, scale):
    """What the solver guarantees for any input, converged or not (some low-temperature problems
    contract at a rate 1 - O(e^{-range/tau}) and legitimately miss the tolerance)."""
    logits = scale * torch.randn(n, n, generator=_gen(seed), dtype=F64)
    res = bs.project_dsm(logits, tau=tau, tol=1e-10, max_iter=20_000, warn=False)
    M = res.plan
    err = float(res.marginal_error)
    assert torch.isfinite(M).all() and (M >= 0).all()
    row = float((M.sum(-1) - 1).abs().sum()) / n
    col = float((M.sum(-2) - 1).abs().sum()) / n
    assert abs(max(row, col) - err) <= 1e-12, "the reported error is the returned matrix's error"
    assert col <= 1e-12, "the last update is a column update: columns are exact"
    assert bool(res.converged) == (err <= 1e-10)
    # Schur: ||M||_2 <= sqrt(||M||_1 ||M||_inf), and the row sums are 1 up to n * err
    sv = torch.linalg.svdvals(M)
    slack = 1e-9 + n * err
    assert abs(float(sv[0]) - 1.0) <= slack
    assert float(sv[1]) <= 1.0 + slack


def test_project_dsm_converges_to_tolerance_at_moderate_temperature():
    logits = torch.randn(20, 16, 16, generator=_gen(2), dtype=F64)
    res = bs.project_dsm(logits, tau=0.5, tol=1e-12, max_iter=50_000)
    assert res.all_converged
    ones = torch.ones(20, 16, dtype=F64)
    torch.testing.assert_close(res.plan.sum(-1), ones, atol=1e-11, rtol=0)
    torch.testing.assert_close(res.plan.sum(-2), ones, atol=1e-11, rtol=0)


def test_project_dsm_matches_alternating_normalisation():
    """Log-domain alternating row/column normalisation of logits/tau, the Sinkhorn-layer convention."""
    logits = torch.randn(7, 7, generator=_gen(3), dtype=F64)
    tau = 0.7
    L = logits / tau
    for _ in range(2000):
        L = L - torch.logsumexp(L, dim=-1, keepdim=True)
        L = L - torch.logsumexp(L, dim=-2, keepdim=True)
    res = bs.project_dsm(logits, tau=tau, tol=1e-14, max_iter=10000)
    torch.testing.assert_close(res.plan, L.exp(), atol=1e-12, rtol=0)


def test_fixed_iteration_mode_reports_error_honestly():
    logits = torch.randn(4096, 4, 4, generator=_gen(4), dtype=torch.float32)
    res = bs.project_dsm(logits, tau=0.05, n_iter=20)
    assert res.iterations == 20 and (res.n_iter == 20).all()
    # reported error equals the error of the returned plan
    M = res.plan
    ones = torch.ones(4)
    err = torch.maximum((M.sum(-1) - ones).abs().sum(-1), (M.sum(-2) - ones).abs().sum(-1)) / 4
    torch.testing.assert_close(res.marginal_error, err)
    # at low temperature 20 sweeps leave some matrices far from doubly stochastic, and say so
    assert (~res.converged).any()
    assert torch.equal(res.converged, res.marginal_error <= res.tol)
    # the same 20 plain sweeps by hand give the same matrices
    L = logits / 0.05
    for _ in range(20):
        L = L - torch.logsumexp(L, dim=-1, keepdim=True)
        L = L - torch.logsumexp(L, dim=-2, keepdim=True)
    torch.testing.assert_close(M, L.exp(), atol=1e-5, rtol=1e-4)


def test_warm_start_from_solution_converges_at_first_check():
    C, a, b = _problem(40, 40, seed=5)
    res = bs.sinkhorn(C, 0.02, a, b, tol=1e-10, max_iter=20000)
    again = bs.sinkhorn(C, 0.02, a, b, tol=1e-10, init=(res.f, res.g), check_every=1)
    assert int(again.n_iter) == 1
    # and warm-starting an annealing step is faster than a cold start
    cold = bs.sinkhorn(C, 0.015, a, b, tol=1e-10, max_iter=20000)
    warm = bs.sinkhorn(C, 0.015, a, b, tol=1e-10, max_iter=20000, init=(res.f, res.g))
    assert warm.iterations < cold.iterations
    torch.testing.assert_close(warm.plan, cold.plan, atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("engine", ["log", "absorb"])
def test_small_eps_stays_finite(dtype, engine):
    """No NaN/inf down to eps = 1e-4 x (cost range), even when it does not converge."""
    g = _gen(6)
    C = 5.0 * torch.rand(2, 30, 25, generator=g, dtype=dtype)
    rng = float(C.max() - C.min())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bs.SinkhornWarning)
        res = bs.sinkhorn(C, 1e-4 * rng, max_iter=300, engine=engine)
    for t in (res.plan, res.f, res.g, res.marginal_error):
        assert torch.isfinite(t).all()
    assert res.plan.dtype == dtype


def test_non_convergence_is_reported_and_warned():
    C, a, b = _problem(30, 30, seed=7)
    with pytest.warns(bs.SinkhornWarning, match="did not converge"):
        res = bs.sinkhorn(C, 1e-3, a, b, max_iter=20, tol=1e-9)
    assert not bool(res.converged)
    assert float(res.marginal_error) > 1e-9
    assert int(res.n_iter) == 20


def test_half_precision_inputs_are_computed_in_fp32():
    logits = torch.randn(8, 8, generator=_gen(8)).to(torch.bfloat16)
    res = bs.project_dsm(logits, tau=1.0)
    assert res.plan.dtype == torch.bfloat16
    assert res.f.dtype == torch.float32
    assert bool(res.converged)


def test_momentum_and_engines_reach_the_same_fixed_point_faster():
    C, a, b = _problem(200, 200, seed=9)
    base = bs.sinkhorn(C, 0.005, a, b, tol=1e-9, engine="log", momentum=None, max_iter=50000)
    fast = bs.sinkhorn(C, 0.005, a, b, tol=1e-9, engine="absorb", momentum="adaptive", max_iter=50000)
    assert base.all_converged and fast.all_converged
    torch.testing.assert_close(fast.plan, base.plan, atol=1e-8, rtol=0)
    assert fast.iterations < base.iterations


def test_inputs_are_not_modified():
    C, a, b = _problem(10, 12, seed=10, uniform=False)
    C0, a0, b0 = C.clone(), a.clone(), b.clone()
    f0, g0 = torch.zeros(10, dtype=F64), torch.zeros(12, dtype=F64)
    bs.sinkhorn(C, 0.1, a, b, init=(f0, g0))
    assert torch.equal(C, C0) and torch.equal(a, a0) and torch.equal(b, b0)
    assert not f0.any() and not g0.any()


# -------------------------------------------------------------------------------- gradients


def _grad_losses(res, W, a, b):
    return {
        "plan": (res.plan * W).sum(),
        "dual": (res.f * a).sum() + (res.g * b).sum(),
        "mixed": (res.plan * W).sum() + (res.f * a).sum() + (res.g * b).sum(),
    }


@pytest.mark.parametrize("which", ["plan", "dual", "mixed"])
@pytest.mark.parametrize("shape", [(6, 5), (3, 6, 6)])
def test_implicit_and_unrolled_gradients_agree(which, shape):
    g = _gen(11)
    C0 = torch.rand(*shape, generator=g, dtype=F64)
    n, m = shape[-2], shape[-1]
    a = torch.rand(n, generator=g, dtype=F64) + 0.2
    b = torch.rand(m, generator=g, dtype=F64) + 0.2
    a, b = a / a.sum(), b / b.sum()
    W = torch.randn(*shape, generator=g, dtype=F64)
    grads = {}
    for mode in ("unroll", "implicit"):
        C = C0.clone().requires_grad_()
        res = bs.sinkhorn(C, 0.3, a, b, tol=1e-14, grad=mode, max_iter=10000)
        (grads[mode],) = torch.autograd.grad(_grad_losses(res, W, a, b)[which], C)
    torch.testing.assert_close(grads["implicit"], grads["unroll"], atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("mode", ["unroll", "implicit"])
def test_gradcheck_float64(mode):
    g = _gen(12)
    C0 = torch.rand(5, 4, generator=g, dtype=F64)
    W = torch.randn(5, 4, generator=g, dtype=F64)

    def fn(C):
        res = bs.sinkhorn(C, 0.5, tol=1e-15, grad=mode, max_iter=20000)
        return (res.plan * W).sum() + res.f.sum() / 5 + res.g.sum() / 4

    assert torch.autograd.gradcheck(fn, (C0.clone().requires_grad_(),), eps=1e-6, atol=1e-7)


def test_implicit_cg_path_agrees_with_dense(monkeypatch):
    g = _gen(13)
    C0 = torch.rand(2, 30, 40, generator=g, dtype=F64)
    W = torch.randn(2, 30, 40, generator=g, dtype=F64)
    out = {}
    for dense_max in (10_000, 0):
        monkeypatch.setattr(sk, "DENSE_SCHUR_MAX", dense_max)
        C = C0.clone().requires_grad_()
        res = bs.sinkhorn(C, 0.1, tol=1e-13, grad="implicit", max_iter=10000)
        (out[dense_max],) = torch.autograd.grad((res.plan * W).sum(), C)
    torch.testing.assert_close(out[0], out[10_000], atol=1e-9, rtol=1e-7)


def test_implicit_gradient_memory_does_not_grow_with_iterations():
    """Implicit mode saves only the plan: the autograd graph is the same whatever the iteration count."""
    g = _gen(14)
    C = torch.rand(64, 64, generator=g, dtype=F64, requires_grad=True)
    sizes = {}
    for tol in (1e-3, 1e-12):
        out = {}
        nbytes = bs.bench.autograd_saved_bytes(
            lambda: out.setdefault("r", bs.sinkhorn(C, 0.02, tol=tol, grad="implicit", max_iter=10000)))
        sizes[tol] = (out["r"].iterations, nbytes)
    assert sizes[1e-12][0] >= 3 * sizes[1e-3][0]
    assert sizes[1e-12][1] == sizes[1e-3][1] > 0
    # unrolled mode saves more with more iterations
    unrolled = {k: bs.bench.autograd_saved_bytes(lambda: bs.sinkhorn(C, 0.02, n_iter=k, grad="unroll"))
                for k in (10, 100)}
    assert unrolled[100] > 5 * unrolled[10]


def test_textbook_scaling_iteration_fails_where_the_log_domain_does_not():
    C, a, b = _problem(20, 20, seed=17)
    with np.errstate(all="ignore"):
        naive = bs.bench.textbook_sinkhorn_knopp(C + 1.0, 1e-3, a, b, n_iter=5)
    assert not torch.isfinite(naive).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bs.SinkhornWarning)
        ours = bs.sinkhorn(C + 1.0, 1e-3, a, b, max_iter=50)
    assert torch.isfinite(ours.plan).all()


def test_grad_none_detaches():
    C = torch.rand(5, 5, dtype=F64, requires_grad=True)
    res = bs.sinkhorn(C, 0.5, grad="none")
    assert not res.plan.requires_grad


# -------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(cost=torch.tensor([[0.0, float("nan")], [1.0, 0.0]])), "`cost` contains NaN or inf"),
        (dict(cost=torch.tensor([[0.0, float("inf")], [1.0, 0.0]])), "`cost` contains NaN or inf"),
        (dict(eps=0.0), "`eps` must be a positive finite number"),
        (dict(eps=-1.0), "`eps` must be a positive finite number"),
        (dict(eps=float("nan")), "`eps` must be a positive finite number"),
        (dict(eps=float("inf")), "`eps` must be a positive finite number"),
        (dict(a=torch.tensor([1.5, -0.5])), "`a` has negative entries"),
        (dict(b=torch.tensor([0.5, float("nan")])), "`b` contains NaN or inf"),
        (dict(a=torch.tensor([0.7, 0.7])), "same total mass"),
        (dict(a=torch.tensor([0.2, 0.3, 0.5])), "`a` must have last dimension 2"),
        (dict(b=torch.tensor([1.0])), "`b` must have last dimension 2"),
        (dict(cost=torch.zeros(3)), r"`cost` must have shape \(\.\.\., n, m\)"),
        (dict(cost=[[0.0, 1.0], [1.0, 0.0]]), "`cost` must be a torch.Tensor"),
        (dict(init=(torch.zeros(3), torch.zeros(2))), "`init` potentials must have shapes"),
        (dict(init=(torch.tensor([0.0, float("nan")]), torch.zeros(2))), r"`init\[0\]` contains NaN"),
        (dict(n_iter=0), "`n_iter` must be a positive integer"),
        (dict(grad="bogus"), "`grad` must be"),
        (dict(momentum=2.5), "`momentum` must be"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(kwargs, match):
    args = dict(cost=torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64), eps=0.5, a=None, b=None)
    args.update(kwargs)
    cost, eps = args.pop("cost"), args.pop("eps")
    with pytest.raises(ValueError, match=match):
        bs.sinkhorn(cost, eps, **args)


def test_batch_shape_mismatch_raises():
    with pytest.raises(ValueError, match="`a` batch shape"):
        bs.sinkhorn(torch.rand(3, 4, 4), 0.5, a=torch.full((2, 4), 0.25))


@pytest.mark.parametrize("logits,tau,match", [
    (torch.zeros(3, 4), 1.0, "`logits` must be square"),
    (torch.zeros(3, 3), 0.0, "`tau` must be a positive finite number"),
    (torch.zeros(3, 3), float("nan"), "`tau` must be a positive finite number"),
])
def test_project_dsm_bad_input(logits, tau, match):
    with pytest.raises(ValueError, match=match):
        bs.project_dsm(logits, tau=tau)


# -------------------------------------------------------------------------------------- GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_matches_cpu(dtype):
    C, a, b = _problem(256, 200, seed=15, uniform=False, dtype=dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    cpu = bs.sinkhorn(C, 0.05, a, b, tol=tol, max_iter=20000)
    gpu = bs.sinkhorn(C.cuda(), 0.05, a.cuda(), b.cuda(), tol=tol, max_iter=20000)
    assert gpu.plan.device.type == "cuda" and gpu.plan.dtype == dtype
    assert gpu.all_converged
    atol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(gpu.plan.cpu(), cpu.plan, atol=atol, rtol=0)


@pytest.mark.gpu
@cuda
def test_gpu_implicit_gradient_and_batched_tiny():
    g = _gen(16)
    C = torch.rand(8, 32, 32, generator=g, dtype=F64).cuda().requires_grad_()
    res = bs.sinkhorn(C, 0.1, tol=1e-12, grad="implicit", max_iter=10000)
    (gr,) = torch.autograd.grad(res.plan.square().sum(), C)
    assert gr.device.type == "cuda" and torch.isfinite(gr).all()
    logits = torch.randn(65536, 4, 4, generator=g).cuda()
    M = bs.project_dsm(logits, tau=1.0, n_iter=20)
    assert M.plan.device.type == "cuda" and torch.isfinite(M.plan).all()


# ===================================================================== issue: honest reports
# Every reported number describes the returned plan; centring keeps plans of shifted or huge
# costs accurate; zero weights are handled on the support; bad input is refused clearly.


def _recomputed_error(res, a, b):
    """The marginal error of the returned plan, recomputed in float64."""
    P = res.plan.to(F64)
    n, m = P.shape[-2:]
    a = torch.full((n,), 1.0 / n, dtype=F64) if a is None else a.to(F64)
    b = torch.full((m,), 1.0 / m, dtype=F64) if b is None else b.to(F64)
    return bs.marginal_error(P, a.expand(P.shape[:-1]), b.expand(P.shape[:-2] + (m,)))


def _roundoff(res):
    n, m = res.plan.shape[-2:]
    return 4 * (n + m) * torch.finfo(res.plan.dtype).eps


def _assert_honest(res, a=None, b=None):
    """Reported error = the returned plan's error (to round-off); converged only if it is <= tol."""
    rec = _recomputed_error(res, a, b)
    slack = _roundoff(res)
    assert torch.isfinite(res.plan).all()
    assert torch.allclose(res.marginal_error.to(F64), rec, atol=slack, rtol=0), (
        res.marginal_error, rec)
    assert torch.equal(res.errors[-1], res.marginal_error)
    assert bool((~res.converged | (rec <= res.tol + slack)).all())
    assert torch.equal(res.converged, res.marginal_error <= res.tol)


@pytest.mark.parametrize("case", ["1e16", "dsm+1000 f32 n_iter", "f32+1000", "1e30 f32",
                                  "1e30 f64", "tiny eps f32", "tiny eps f64"])
def test_reports_describe_the_returned_plan_on_the_issue_reproducers(case):
    g = _gen(30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bs.SinkhornWarning)
        if case == "1e16":
            res, a = bs.sinkhorn(torch.full((5, 4), 1e16, dtype=F64), 0.1), None
            torch.testing.assert_close(res.plan, torch.full((5, 4), 0.05, dtype=F64))
        elif case == "dsm+1000 f32 n_iter":
            logits = (torch.randn(4, 4, generator=g) + 1000).float()
            res, a = bs.project_dsm(logits, 1.0, n_iter=20), torch.ones(4)
            assert float(_recomputed_error(res, a, a)) < 1e-6
        elif case == "f32+1000":
            res, a = bs.sinkhorn(torch.rand(30, 30, generator=g) + 1000, 0.1), None
            assert bool(res.converged)
        elif case.startswith("1e30"):
            dt = torch.float32 if "f32" in case else F64
            res, a = bs.sinkhorn(torch.rand(20, 20, generator=g, dtype=dt) * 1e30, 1.0), None
        else:
            dt = torch.float32 if "f32" in case else F64
            res, a = bs.sinkhorn(torch.rand(20, 20, generator=g, dtype=dt), 1e-6,
                                 max_iter=100), None
    _assert_honest(res, a, a)
    assert float(res.plan.to(F64).sum()) == pytest.approx(float(4 if a is not None else 1),
                                                          rel=1e-3)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(n=st.integers(2, 12), m=st.integers(2, 12), seed=st.integers(0, 10_000),
       shift=st.floats(-1e6, 1e6), scale=st.floats(1e-2, 1e3), rel_eps=st.floats(1e-3, 1.0),
       zeros=st.booleans(), f32=st.booleans(), engine=st.sampled_from(["log", "absorb"]),
       fixed=st.booleans())
def test_reported_error_is_the_returned_plans_error(n, m, seed, shift, scale, rel_eps, zeros,
                                                    f32, engine, fixed):
    """Property: for any cost (shifted by up to 1e6), zero weights, eps down to 1e-3 x range,
    float32 or float64, any engine and mode: the reported error equals the error recomputed from
    the returned plan (to round-off), and ``converged`` implies that error is <= tol."""
    g = _gen(seed)
    dt = torch.float32 if f32 else F64
    C = (scale * torch.rand(n, m, generator=g, dtype=F64) + shift).to(dt)
    a = torch.rand(n, generator=g, dtype=F64) + 0.1
    b = torch.rand(m, generator=g, dtype=F64) + 0.1
    if zeros:
        a[0] = 0.0
        b[-1] = 0.0
    a, b = (a / a.sum()).to(dt), (b / b.sum()).to(dt)
    rng = float(C.max() - C.min()) or 1.0
    kw = dict(n_iter=50) if fixed else dict(max_iter=500)
    res = bs.sinkhorn(C, rel_eps * rng, a, b, tol=1e-5 if f32 else 1e-9, engine=engine,
                      warn=False, **kw)
    _assert_honest(res, a, b)
    if zeros:
        assert (res.plan[0] == 0).all() and (res.plan[:, -1] == 0).all()


def test_fixed_iteration_mode_warns_when_the_plan_is_not_finite():
    C = torch.tensor([[0.0, float("nan")], [1.0, 0.0]], dtype=F64)
    with pytest.warns(bs.SinkhornWarning, match="non-finite"):
        res = bs.sinkhorn(C, 0.5, n_iter=3, check_inputs=False)
    assert not bool(res.converged)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rule(dtype):
    """The rule: computed in fp32, plan in the input dtype, everything else fp32 describing the
    fp32 plan; the returned half plan's own error is at most marginal_error + its unit round-off."""
    logits = torch.randn(3, 8, 8, generator=_gen(31)).to(dtype)
    res = bs.project_dsm(logits, tau=1.0)
    assert res.plan.dtype == dtype
    for t in (res.f, res.g, res.marginal_error, res.errors):
        assert t.dtype == torch.float32
    ones = torch.ones(8)
    rec = _recomputed_error(res, ones, ones)
    u = torch.finfo(dtype).eps / 2
    assert bool((rec <= res.marginal_error.double() + 2 * u).all())


# ----------------------------------------------------------------------------- zero weights


@pytest.mark.parametrize("engine", ["log", "absorb"])
def test_warm_start_accepts_minus_inf_potentials(engine):
    C, a, b = _problem(12, 15, seed=32, uniform=False)
    a[2] = 0.0
    b[5] = 0.0
    a, b = a / a.sum(), b / b.sum()
    res = bs.sinkhorn(C, 0.05, a, b, tol=1e-10, engine=engine)
    assert torch.isinf(res.f[2]) and torch.isinf(res.g[5])
    again = bs.sinkhorn(C, 0.05, a, b, tol=1e-10, init=(res.f, res.g), check_every=1,
                        engine=engine)
    assert int(again.n_iter) == 1
    torch.testing.assert_close(again.plan, res.plan, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dense_max", [10_000, 0])
def test_implicit_gradient_with_zero_weights_is_finite(monkeypatch, dense_max):
    """The implicit backward restricts its linear system to the support (dense and CG paths)."""
    monkeypatch.setattr(sk, "DENSE_SCHUR_MAX", dense_max)
    C0, a, b = _problem(10, 12, seed=33, uniform=False)
    a[0] = 0.0
    b[3] = 0.0
    a, b = a / a.sum(), b / b.sum()
    W = torch.randn(10, 12, generator=_gen(33), dtype=F64)
    out = {}
    for mode in ("implicit", "unroll"):
        C = C0.clone().requires_grad_()
        res = bs.sinkhorn(C, 0.1, a, b, tol=1e-13, grad=mode, max_iter=20000)
        (out[mode],) = torch.autograd.grad((res.plan * W).sum(), C)
        assert torch.isfinite(out[mode]).all()
    torch.testing.assert_close(out["implicit"], out["unroll"], atol=1e-9, rtol=1e-7)


# ------------------------------------------------------------------- gradients for every input


def _grad_problem(zero: bool):
    g = _gen(34)
    C = torch.rand(5, 4, generator=g, dtype=F64)
    ar = torch.rand(5, generator=g, dtype=F64) + 0.3
    br = torch.rand(4, generator=g, dtype=F64) + 0.3
    W = torch.randn(5, 4, generator=g, dtype=F64)
    mask_a = torch.tensor([0.0, 1, 1, 1, 1], dtype=F64) if zero else torch.ones(5, dtype=F64)
    mask_b = torch.tensor([1.0, 1, 0, 1], dtype=F64) if zero else torch.ones(4, dtype=F64)
    return C, ar, br, W, mask_a, mask_b


def _loss_all_inputs(mode, W, mask_a, mask_b, n_iter=None):
    def fn(C, ar, br, eps):
        a = ar * mask_a
        b = br * mask_b
        a, b = a / a.sum(), b / b.sum()
        kw = dict(n_iter=n_iter) if n_iter else dict(tol=1e-15, max_iter=20000)
        res = bs.sinkhorn(C, eps, a, b, grad=mode, **kw)
        f = torch.where(a > 0, res.f, torch.zeros_like(res.f))
        g = torch.where(b > 0, res.g, torch.zeros_like(res.g))
        return (res.plan * W).sum() + (f * a).sum() + (g * b).sum()
    return fn


@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("mode", ["unroll", "implicit"])
def test_gradcheck_cost_marginals_and_eps(mode, zero):
    C, ar, br, W, ma, mb = _grad_problem(zero)
    eps = torch.tensor(0.5, dtype=F64)
    inputs = tuple(t.clone().requires_grad_() for t in (C, ar, br, eps))
    assert torch.autograd.gradcheck(_loss_all_inputs(mode, W, ma, mb), inputs, eps=1e-6,
                                    atol=1e-7)


def test_gradcheck_fixed_iterations_unrolled():
    C, ar, br, W, ma, mb = _grad_problem(True)
    eps = torch.tensor(0.3, dtype=F64)
    inputs = tuple(t.clone().requires_grad_() for t in (C, ar, br, eps))
    assert torch.autograd.gradcheck(_loss_all_inputs("unroll", W, ma, mb, n_iter=7), inputs,
                                    eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("zero", [False, True])
def test_implicit_and_unrolled_agree_for_every_input(zero):
    C, ar, br, W, ma, mb = _grad_problem(zero)
    eps = torch.tensor(0.2, dtype=F64)
    grads = {}
    for mode in ("unroll", "implicit"):
        inputs = tuple(t.clone().requires_grad_() for t in (C, ar, br, eps))
        grads[mode] = torch.autograd.grad(_loss_all_inputs(mode, W, ma, mb)(*inputs), inputs)
    for gi, gu in zip(grads["implicit"], grads["unroll"]):
        torch.testing.assert_close(gi, gu, atol=1e-9, rtol=1e-7)


def test_raw_marginal_gradients_agree_up_to_the_balanced_gauge():
    """d/da and d/db are defined on balanced perturbations only: implicit and unrolled agree up to
    adding (c on supp a, -c on supp b)."""
    C, a, b = _problem(6, 7, seed=35, uniform=False)
    a[1] = 0.0
    a = a / a.sum()
    out = {}
    for mode in ("unroll", "implicit"):
        a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
        res = bs.sinkhorn(C, 0.3, a_, b_, tol=1e-14, grad=mode, max_iter=10000)
        out[mode] = torch.autograd.grad((res.plan * C).sum(), (a_, b_))
    ga = out["implicit"][0] - out["unroll"][0]
    gb = out["implicit"][1] - out["unroll"][1]
    c = ga[a > 0].mean()
    torch.testing.assert_close(ga[a > 0], c.expand(5), atol=1e-9, rtol=0)
    torch.testing.assert_close(gb, -c.expand(7), atol=1e-9, rtol=0)
    assert ga[1] == 0


@pytest.mark.parametrize("mode", ["unroll", "implicit"])
def test_per_problem_eps_tensor_gets_gradients_and_matches_separate_solves(mode):
    g = _gen(36)
    C = torch.rand(3, 6, 6, generator=g, dtype=F64)
    eps = torch.tensor([0.2, 0.5, 1.0], dtype=F64, requires_grad=True)
    res = bs.sinkhorn(C, eps, tol=1e-13, grad=mode, max_iter=10000)
    assert isinstance(res.eps, torch.Tensor) and res.eps is eps
    (res.plan * C).sum().backward()
    assert eps.grad is not None and eps.grad.shape == (3,)
    for k in range(3):
        single = bs.sinkhorn(C[k], float(eps[k].detach()), tol=1e-13, max_iter=10000)
        torch.testing.assert_close(res.plan[k].detach(), single.plan, atol=1e-11, rtol=0)
        e = torch.tensor(float(eps[k].detach()), dtype=F64, requires_grad=True)
        (bs.sinkhorn(C[k], e, tol=1e-13, grad=mode, max_iter=10000).plan * C[k]).sum().backward()
        torch.testing.assert_close(eps.grad[k], e.grad, atol=1e-9, rtol=1e-7)


def test_unroll_runs_when_only_a_or_eps_requires_grad():
    C, a, b = _problem(5, 5, seed=37)
    a_ = a.clone().requires_grad_()
    res = bs.sinkhorn(C, 0.5, a_, b)
    res.plan.sum().backward()
    assert a_.grad is not None
    tau = torch.tensor(0.7, requires_grad=True)
    M = bs.project_dsm(torch.randn(4, 4, generator=_gen(37)), tau, n_iter=5).plan
    (M * torch.arange(16.0).reshape(4, 4)).sum().backward()
    assert tau.grad is not None and torch.isfinite(tau.grad)


# --------------------------------------------------------------------------- fault section


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(cost=torch.zeros(2, 2, dtype=torch.complex128)), TypeError, "`cost` is complex"),
    (dict(a=torch.tensor([0.5, 0.5], dtype=torch.complex64)), TypeError, "`a` is complex"),
    (dict(cost=torch.zeros(2, 2, dtype=torch.bool)), TypeError, "`cost` is boolean"),
    (dict(max_iter=None), TypeError, "`max_iter`"),
    (dict(max_iter=float("inf")), ValueError, "`max_iter`"),
    (dict(max_iter=2.5), ValueError, "`max_iter`"),
    (dict(max_iter=True), TypeError, "`max_iter`"),
    (dict(tol=None), TypeError, "`tol`"),
    (dict(tol="1e-3"), TypeError, "`tol`"),
    (dict(tol=float("nan")), ValueError, "`tol`"),
    (dict(tol=-1.0), ValueError, "`tol`"),
    (dict(check_every=None), TypeError, "`check_every`"),
    (dict(n_iter="3"), TypeError, "`n_iter`"),
    (dict(eps=None), TypeError, "`eps`"),
    (dict(eps=torch.tensor([0.5, -1.0])), ValueError, "`eps`"),
    (dict(eps=torch.tensor([0.5, 0.5, 0.5])), ValueError, "`eps`"),
    (dict(eps=torch.tensor(0.5j)), TypeError, "`eps` is complex"),
    (dict(cost=torch.zeros(3, 2, 2, dtype=F64), init=(torch.zeros(2, 2), torch.zeros(2, 2))),
     ValueError, "`init`"),
    (dict(init=(torch.tensor([0.0, float("inf")]), torch.zeros(2))), ValueError, r"`init\[0\]`"),
    (dict(cost=torch.zeros(2, 2, device="meta")), ValueError, "meta device"),
    (dict(a=torch.zeros(2, device="meta")), ValueError, "meta device"),
])
def test_fault_bad_input_is_refused_naming_the_argument(kwargs, exc, match):
    args = dict(cost=torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64), eps=0.5)
    args.update(kwargs)
    cost, eps = args.pop("cost"), args.pop("eps")
    with pytest.raises(exc, match=match):
        bs.sinkhorn(cost, eps, **args)


@pytest.mark.parametrize("logits,match", [
    (torch.tensor([[0.0, float("nan")], [1.0, 0.0]]), "`logits` contains NaN"),
    (torch.tensor([[0.0, float("inf")], [1.0, 0.0]]), r"`logits` contains NaN or \+inf"),
    (torch.tensor([[0.0, 1.0], [-math.inf, -math.inf]]), "`logits` row 1"),
    (torch.tensor([[0.0, -math.inf], [1.0, -math.inf]]), "`logits` column 1"),
    (torch.zeros(2, 2, dtype=torch.complex64), "`logits` is complex"),
])
def test_fault_project_dsm_logits(logits, match):
    exc = TypeError if logits.is_complex() else ValueError
    with pytest.raises(exc, match=match):
        bs.project_dsm(logits)


@pytest.mark.parametrize("grad", ["none", "unroll", "implicit"])
def test_minus_inf_logits_are_a_support_mask(grad):
    g = _gen(38)
    logits = torch.randn(2, 5, 5, generator=g, dtype=F64)
    mask = torch.rand(2, 5, 5, generator=g, dtype=F64) < 0.3
    mask &= ~torch.eye(5, dtype=torch.bool)  # the diagonal keeps every row and column feasible
    logits = logits.masked_fill(mask, -math.inf).requires_grad_(grad != "none")
    res = bs.project_dsm(logits, 0.5, tol=1e-10, max_iter=20000, grad=grad)
    assert res.all_converged
    assert (res.plan[mask] == 0).all()
    _assert_honest(res, torch.ones(5, dtype=F64), torch.ones(5, dtype=F64))
    if grad != "none":
        W = torch.randn(2, 5, 5, generator=g, dtype=F64)
        (gl,) = torch.autograd.grad((res.plan * W).sum(), logits)
        assert torch.isfinite(gl).all() and (gl[mask] == 0).all()


def test_fault_book_setup_refuses_cuda_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="`device`"):
        bs.book.resolve_device("cuda")
    with pytest.raises(ValueError, match="`device`"):
        bs.book.setup("00_preface", profile="ci", seed=0, device="cuda")


def test_torch_func_transforms_take_the_functional_path():
    """vmap / grad of a fixed-iteration solve equal the loop over the batch and autograd; a
    converging solve (data-dependent stopping) is refused inside a transform, naming n_iter."""
    from torch.func import grad, vmap

    g = torch.Generator().manual_seed(3)
    S = torch.randn(4, 5, 5, generator=g, dtype=torch.float64)

    def plan(s):
        return bs.project_dsm(s, 0.7, n_iter=30, grad="unroll").plan

    P = vmap(plan)(S)
    Q = torch.stack([plan(s) for s in S])
    assert torch.allclose(P, Q, atol=1e-14, rtol=0)
    G = vmap(grad(lambda s: plan(s)[1, 2]))(S)
    for k in range(4):
        s = S[k].clone().requires_grad_(True)
        plan(s)[1, 2].backward()
        assert torch.allclose(G[k], s.grad, atol=1e-14, rtol=0)
    with pytest.raises(ValueError, match="n_iter"):
        vmap(lambda s: bs.project_dsm(s, 1.0).plan)(S)


# ------------------------------------------------------------------ one-pass sweep, thread policy


@pytest.mark.parametrize("dtype,eps,tol", [(F64, 0.05, 1e-9), (F64, 0.002, 1e-7),
                                           (torch.float32, 0.01, 1e-5)])
@pytest.mark.parametrize("momentum", ["adaptive", None, 1.5])
@pytest.mark.parametrize("fixed", [False, True])
def test_blocked_sweep_matches_two_full_products(monkeypatch, dtype, eps, tol, momentum, fixed):
    """The scaling engine's one-pass sweep (row update and column product block by block, forced
    here on a small matrix with 8-row blocks) runs the same iterations as two full matrix-vector
    products: same iteration count, same plan to round-off, an honest report; eps = 0.002 makes
    the kernel's range (500 in units of eps) exceed the absorption threshold, float32 too."""
    C, a, b = _problem(50, 37, seed=4, uniform=False, dtype=dtype)
    C = C / C.max()
    kw = dict(n_iter=60) if fixed else dict(tol=tol, max_iter=3000)
    out = {}
    for block in (0, 8 * 37 * C.element_size()):
        monkeypatch.setattr(sk, "_SWEEP_BLOCK_BYTES", block)
        with warnings.catch_warnings():
            warnings.simplefilter("error", bs.SinkhornWarning)
            out[block] = bs.sinkhorn(C, eps, a, b, engine="absorb", momentum=momentum, **kw)
        _assert_honest(out[block], a, b)
    r0, r1 = out.values()
    assert r0.iterations == r1.iterations
    assert torch.equal(r0.n_iter, r1.n_iter)
    atol = 1e-12 if dtype == F64 else 1e-6
    torch.testing.assert_close(r1.plan, r0.plan, atol=atol, rtol=1e-6 if dtype == F64 else 1e-3)
    if not fixed:
        assert bool(r1.converged)
    # the potentials reproduce the plan (the solver's convention)
    P = torch.exp((r1.f[:, None] + r1.g[None, :] - C) / eps)
    torch.testing.assert_close(P, r1.plan, atol=atol, rtol=1e-6 if dtype == F64 else 1e-3)


def test_blocked_sweep_is_used_and_agrees_with_pot_on_a_large_matrix(monkeypatch):
    """Default block size, a matrix above the blocking threshold (n = 600, float64): the blocked
    sweep runs on one thread (not on two) and its plan matches POT's sinkhorn_log run to
    convergence."""
    ot = pytest.importorskip("ot")
    calls = []
    real_mv = torch.mv

    def spy(*args, **kw):
        calls.append(args[0].shape)
        return real_mv(*args, **kw)

    C, a, b = _problem(600, 600, seed=5)
    old = torch.get_num_threads()
    monkeypatch.setattr(torch, "mv", spy)
    try:
        torch.set_num_threads(2)  # several threads: two full products, no blocks
        bs.sinkhorn(C, 0.01, a, b, tol=1e-9, max_iter=5000)
        assert calls and all(s[0] == 600 for s in calls), "blocks used with two threads"
        calls.clear()
        torch.set_num_threads(1)  # one thread: the blocked sweep
        res = bs.sinkhorn(C, 0.01, a, b, tol=1e-9, max_iter=5000)
    finally:
        torch.set_num_threads(old)
        monkeypatch.setattr(torch, "mv", real_mv)
    assert any(s[0] < 600 for s in calls), "the blocked sweep was not used"
    _assert_honest(res, a, b)
    P = ot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), 0.01, method="sinkhorn_log",
                    numItermax=100000, stopThr=1e-12)
    assert np.abs(res.plan.numpy() - P).sum() < 1e-6


def test_small_matrix_runs_on_one_thread_and_restores_the_setting():
    """A small single matrix is iterated on one intra-op thread; the caller's setting is restored
    (also when the solve raises inside the loop)."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        real = sk._solve_detached

        def spy(*args, **kw):
            seen.append(torch.get_num_threads())
            return real(*args, **kw)

        sk._solve_detached = spy
        try:
            C, a, b = _problem(64, 64)
            bs.sinkhorn(C, 0.05, a, b)
            assert seen == [1] and torch.get_num_threads() == 2
            big = torch.rand(2, 600, 600, dtype=F64)  # a batch: not restricted
            bs.project_dsm(big, 1.0, n_iter=3)
            assert seen[-1] == 2

            def boom(*args, **kw):
                raise RuntimeError("boom")

            sk._solve_detached = boom
            with pytest.raises(RuntimeError, match="boom"):
                bs.sinkhorn(C, 0.05, a, b)
            assert torch.get_num_threads() == 2
        finally:
            sk._solve_detached = real
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("shape", [(300, 4, 4), (1, 2, 2), (3, 50, 3, 5), (70, 16, 16),
                                   (2, 129, 8, 8), (2, 700, 3, 3)])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_planar_tiny_batch_matches_the_general_engine(monkeypatch, shape, dtype):
    """The planar fixed-iteration loop for batches of tiny matrices (chunked: 1 KiB chunks force
    several chunks and a remainder) returns the general engine's plan and potentials to
    round-off, reports its own plan's error, and leaves the input untouched (2 x 700 = 1400
    matrices: a chunk of 1024 and a remainder)."""
    g = _gen(11)
    logits = torch.randn(shape, generator=g, dtype=F64).to(dtype) * 2
    n, m = shape[-2], shape[-1]
    a = torch.rand(shape[:-1], generator=g, dtype=F64).to(dtype) + 0.5
    b = torch.rand(shape[:-2] + (m,), generator=g, dtype=F64).to(dtype) + 0.5
    b = b / b.sum(-1, keepdim=True) * a.sum(-1, keepdim=True)
    keep = logits.clone()
    calls = []
    real = sk._planar_solve

    def spy(*args, **kw):
        out = real(*args, **kw)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(sk, "_planar_solve", spy)
    monkeypatch.setattr(sk, "_PLANAR_CHUNK_BYTES", 1024)
    new = bs.sinkhorn(-logits, 0.7, a, b, n_iter=20)
    assert calls == [True]
    monkeypatch.setattr(sk, "_PLANAR_MAX", 0)
    ref = bs.sinkhorn(-logits, 0.7, a, b, n_iter=20)
    assert torch.equal(logits, keep)
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == F64 else dict(atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(new.plan, ref.plan, **tol)
    torch.testing.assert_close(new.f, ref.f, **tol)
    torch.testing.assert_close(new.g - new.g.mean(-1, keepdim=True),
                               ref.g - ref.g.mean(-1, keepdim=True), **tol)
    assert new.plan.is_contiguous() and new.plan.shape == shape
    assert new.iterations == 20 and bool((new.n_iter == 20).all())
    _assert_honest(new, a, b)


@pytest.mark.parametrize("tau", [0.1, 0.05])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_planar_tiny_batch_absorbs_at_low_temperature(monkeypatch, tau, dtype):
    """At a temperature where the first kernel's scalings leave [e^-τ, e^τ] in float32 (they
    reach e^40 and more at tau 0.1 on N(0, 1) logits), the planar loop absorbs them and rebuilds
    its kernels instead of handing the batch to the general engine (4x slower there): the same
    plan and potentials as the general engine to round-off, and as 20 plain log-domain sweeps.
    In float64 the scalings stay in range (τ = 177): no absorption, the same results."""
    g = _gen(14)
    logits = torch.randn(3000, 4, 4, generator=g, dtype=F64).to(dtype)
    calls, builds = [], []
    real, real_exp = sk._planar_solve, sk._exp_kernel_

    def spy(*args, **kw):
        builds.clear()
        out = real(*args, **kw)
        calls.append((out is not None, len(builds)))
        return out

    def exp_spy(Z):
        builds.append(Z.shape)
        return real_exp(Z)

    monkeypatch.setattr(sk, "_planar_solve", spy)
    monkeypatch.setattr(sk, "_exp_kernel_", exp_spy)
    monkeypatch.setattr(sk, "_PLANAR_CHUNK_BYTES", 16 * 1024)  # several chunks and a remainder
    new = bs.project_dsm(logits, tau, n_iter=20, warn=False)
    (planar_ok, n_builds), = calls
    assert planar_ok
    # float32: the first kernel and at least one rebuild; float64: the first kernel only
    assert (n_builds > 1) == (dtype == torch.float32)
    monkeypatch.setattr(sk, "_PLANAR_MAX", 0)
    ref = bs.project_dsm(logits, tau, n_iter=20, warn=False)
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == F64 else dict(atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(new.plan, ref.plan, **tol)
    torch.testing.assert_close(new.f - new.f.mean(-1, keepdim=True),
                               ref.f - ref.f.mean(-1, keepdim=True), atol=2e-5 * tau, rtol=0)
    torch.testing.assert_close(new.g + new.f.mean(-1, keepdim=True),
                               ref.g + ref.f.mean(-1, keepdim=True), atol=2e-5 * tau, rtol=0)
    _assert_honest(new, torch.ones(4, dtype=dtype), torch.ones(4, dtype=dtype))
    L = logits.to(F64) / tau
    for _ in range(20):
        L = L - torch.logsumexp(L, dim=-1, keepdim=True)
        L = L - torch.logsumexp(L, dim=-2, keepdim=True)
    torch.testing.assert_close(new.plan.to(F64), L.exp(), **tol)


def test_planar_tiny_batch_falls_back_when_a_scaling_leaves_the_safe_range(monkeypatch):
    """A temperature so low that whole columns of the first kernel underflow in float32 (every
    entry below e^-87 of its row's largest: 71 of the 256 columns here), so that a scaling is
    not finite after the first sweep: the planar loop declines (it absorbs only finite
    scalings) and the general engine (absorption, log-domain fallback) returns a finite plan
    whose report is honest."""
    g = _gen(12)
    logits = torch.randn(64, 4, 4, generator=g) * 50
    calls = []
    real = sk._planar_solve
    monkeypatch.setattr(sk, "_planar_solve",
                        lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    res = bs.project_dsm(logits, 0.05, n_iter=20, warn=False)
    assert calls == [None]
    _assert_honest(res, torch.ones(4), torch.ones(4))


def test_planar_tiny_batch_implicit_gradient_matches_the_general_engine(monkeypatch):
    """grad="implicit" on the planar path: the same gradient as through the general engine."""
    g = _gen(13)
    logits = torch.randn(50, 4, 4, generator=g, dtype=F64)
    W = torch.randn(50, 4, 4, generator=g, dtype=F64)
    grads = []
    for pm in (16, 0):
        monkeypatch.setattr(sk, "_PLANAR_MAX", pm)
        x = logits.clone().requires_grad_()
        (bs.project_dsm(x, 1.0, n_iter=30, grad="implicit").plan * W).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-10, rtol=1e-8)


# ---------------------------------------------------------------- Anderson acceleration


@pytest.mark.parametrize("n,m,eps,uniform", [(60, 60, 0.01, True), (50, 37, 0.002, False),
                                             (80, 30, 0.05, False)])
def test_anderson_reaches_the_fixed_point_of_plain_sinkhorn(n, m, eps, uniform):
    # same strictly convex problem, so at tol the plans differ by O(tol) per unit mass; an honest
    # report; the potentials reproduce the plan
    C, a, b = _problem(n, m, seed=21, uniform=uniform)
    C = C / C.max()
    ref = bs.sinkhorn(C, eps, a, b, tol=1e-12, engine="log", momentum=None, max_iter=200000)
    res = bs.sinkhorn(C, eps, a, b, tol=1e-9, momentum="anderson", max_iter=20000)
    assert ref.all_converged and res.all_converged
    _assert_honest(res, a, b)
    torch.testing.assert_close(res.plan, ref.plan, atol=1e-9, rtol=0)
    P = torch.exp((res.f[:, None] + res.g[None, :] - C) / eps)
    torch.testing.assert_close(P, res.plan, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("eps", [0.01, 0.002])
def test_anderson_needs_fewer_iterations_than_adaptive_relaxation(eps):
    # the point of the option: on a problem where plain Sinkhorn needs hundreds of iterations,
    # the extrapolation must cut the count (measured 4.4x at eps 0.01, 4.5x at 0.002 for n = 1024;
    # required here: at least 1.5x fewer, a wide margin for the smaller n = 300)
    C, a, b = _problem(300, 300, seed=22)
    C = C / C.max()
    kw = dict(tol=1e-6, max_iter=20000, grad="none")
    ada = bs.sinkhorn(C, eps, a, b, momentum="adaptive", **kw)
    aa = bs.sinkhorn(C, eps, a, b, momentum="anderson", **kw)
    assert ada.all_converged and aa.all_converged
    assert aa.iterations * 1.5 <= ada.iterations, (aa.iterations, ada.iterations)


def test_anderson_batched_with_per_problem_eps_and_warm_start():
    g = _gen(23)
    C = torch.rand(4, 20, 25, generator=g, dtype=F64)
    a = torch.rand(4, 20, generator=g, dtype=F64) + 0.1
    b = torch.rand(4, 25, generator=g, dtype=F64) + 0.1
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    eps = torch.tensor([0.5, 0.1, 0.02, 0.005], dtype=F64)
    res = bs.sinkhorn(C, eps, a, b, tol=1e-10, momentum="anderson", max_iter=50000)
    ref = bs.sinkhorn(C, eps, a, b, tol=1e-10, momentum="adaptive", max_iter=50000)
    assert res.all_converged and res.n_iter.shape == (4,)
    _assert_honest(res, a, b)
    torch.testing.assert_close(res.plan, ref.plan, atol=1e-9, rtol=0)
    warm = bs.sinkhorn(C, eps, a, b, tol=1e-10, momentum="anderson", init=(res.f, res.g))
    assert warm.iterations <= 2 and warm.all_converged


def test_anderson_with_zero_weights_falls_back_to_adaptive_relaxation():
    C, a, b = _problem(30, 30, seed=24, uniform=False)
    a[3] = 0.0
    b[[5, 7]] = 0.0
    a, b = a / a.sum(), b / b.sum()
    res = bs.sinkhorn(C, 0.02, a, b, tol=1e-9, momentum="anderson", max_iter=20000)
    ref = bs.sinkhorn(C, 0.02, a, b, tol=1e-9, momentum="adaptive", max_iter=20000)
    assert res.all_converged and res.iterations == ref.iterations
    torch.testing.assert_close(res.plan, ref.plan, atol=0, rtol=0)


def test_anderson_failure_restarts_with_adaptive_relaxation(monkeypatch):
    # a non-finite accelerated iterate makes the loop give up; the solve restarts, same answer
    monkeypatch.setattr(sk, "_anderson_loop", lambda *args, **kw: None)
    C, a, b = _problem(40, 40, seed=25)
    res = bs.sinkhorn(C, 0.01, a, b, tol=1e-9, momentum="anderson", max_iter=20000)
    monkeypatch.undo()
    ref = bs.sinkhorn(C, 0.01, a, b, tol=1e-9, momentum="adaptive", max_iter=20000)
    assert res.all_converged and res.iterations == ref.iterations
    torch.testing.assert_close(res.plan, ref.plan, atol=0, rtol=0)


def test_anderson_non_convergence_is_reported():
    C, a, b = _problem(60, 60, seed=26)
    with pytest.warns(bs.SinkhornWarning, match="did not converge"):
        res = bs.sinkhorn(C, 0.001, a, b, tol=1e-12, momentum="anderson", max_iter=7)
    assert res.iterations == 7 and not res.all_converged
    _assert_honest(res, a, b)


def test_anderson_refuses_the_log_engine():
    C, a, b = _problem(5, 5)
    with pytest.raises(ValueError, match="`momentum`"):
        bs.sinkhorn(C, 0.1, a, b, engine="log", momentum="anderson")


def test_auto_momentum_takes_anderson_for_large_matrices_only(monkeypatch):
    calls = []
    real = sk._anderson_loop
    monkeypatch.setattr(sk, "_anderson_loop", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(sk, "_ANDERSON_MIN_ENTRIES", 40 * 40)
    C, a, b = _problem(40, 40, seed=27)
    big = bs.sinkhorn(C, 0.02, a, b, tol=1e-9)  # default momentum: "auto"
    assert calls == [1] and big.all_converged
    _assert_honest(big, a, b)
    small = bs.sinkhorn(C[:39, :40], 0.02, a[:39] / a[:39].sum(), b, tol=1e-9)
    assert calls == [1] and small.all_converged  # 39 x 40 < 40 x 40: adaptive relaxation
    assert inspect.signature(bs.sinkhorn).parameters["momentum"].default == "auto"
    # a batch counts all its entries: two 30 x 30 matrices (1800 >= 1600) take Anderson ...
    Cb = torch.stack([C[:30, :30], C[10:, 10:]])
    ab = torch.full((30,), 1 / 30, dtype=F64)
    batched = bs.sinkhorn(Cb, 0.02, ab, ab, tol=1e-9)
    assert calls == [1, 1] and batched.all_converged
    # ... but not a batch of matrices no wider than the memory of 12 iterates
    Ct = torch.rand(16, 12, 12, generator=_gen(33), dtype=F64)
    at = torch.full((12,), 1 / 12, dtype=F64)
    tiny = bs.sinkhorn(Ct, 0.1, at, at, tol=1e-9)
    assert calls == [1, 1] and tiny.all_converged


def test_auto_momentum_keeps_adaptive_relaxation_on_the_fused_path(monkeypatch):
    from bistochastic import _fused

    monkeypatch.setenv("BISTOCHASTIC_FUSED", "cpu")
    monkeypatch.setenv("BISTOCHASTIC_FUSED_BACKEND", "aot_eager")
    monkeypatch.setattr(_fused, "_FAILED", False)
    monkeypatch.setattr(sk, "_ANDERSON_MIN_ENTRIES", 1)
    monkeypatch.setattr(sk, "_anderson_loop", lambda *a, **k: pytest.fail("anderson on fused"))
    C, a, b = _problem(30, 30, seed=28)
    res = bs.sinkhorn(C, 0.05, a, b, tol=1e-9, grad="none")
    assert res.all_converged


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_anderson_device_bookkeeping_matches_the_host_one(monkeypatch, dtype):
    # the loop keeps its vector bookkeeping in NumPy for CPU tensors and in torch on a device;
    # the torch one is run here on the CPU (no GPU needed): same iterates up to round-off, so
    # the same iteration counts and plans equal far below the tolerance (float32: absorptions
    # every few iterations, batched problems with per-problem eps)
    g = _gen(30)
    C = torch.rand(3, 200, 180, generator=g, dtype=F64)
    a = torch.rand(3, 200, generator=g, dtype=F64) + 0.1
    b = torch.rand(3, 180, generator=g, dtype=F64) + 0.1
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    C, a, b = C.to(dtype), a.to(dtype), b.to(dtype)
    eps = torch.tensor([0.05, 0.01, 0.005], dtype=dtype)
    tol = 1e-9 if dtype == F64 else 1e-5
    kw = dict(tol=tol, max_iter=20000, grad="none", momentum="anderson")
    seen = []
    real = sk._anderson_ops
    monkeypatch.setattr(sk, "_anderson_ops", lambda *args: seen.append(1) or real(*args))
    host = bs.sinkhorn(C, eps, a, b, **kw)
    monkeypatch.setattr(sk, "_anderson_ops", lambda dt, dev: seen.append(2) or sk._DeviceOps(dt, dev))
    dev = bs.sinkhorn(C, eps, a, b, **kw)
    assert seen == [1, 2]
    assert host.all_converged and dev.all_converged
    _assert_honest(dev, a, b)
    assert torch.equal(host.n_iter, dev.n_iter), (host.n_iter, dev.n_iter)
    torch.testing.assert_close(dev.plan, host.plan, atol=tol / 1000, rtol=0)


def test_anderson_overshoot_on_the_cpu_restarts_without_numpy_warnings(monkeypatch):
    # an extrapolation that overflows makes exp(x) infinite in the NumPy bookkeeping: the loop
    # must detect it and hand over to adaptive relaxation silently (no RuntimeWarning reaches
    # the user, as none does from torch), and the answer is adaptive relaxation's
    monkeypatch.setattr(sk, "_small_lstsq_np", lambda A, rhs, posv=None: np.full_like(rhs, 1e300))
    C, a, b = _problem(50, 40, seed=32)
    kw = dict(tol=1e-9, max_iter=20000, grad="none")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = bs.sinkhorn(C, 0.02, a, b, momentum="anderson", **kw)
    ref = bs.sinkhorn(C, 0.02, a, b, momentum="adaptive", **kw)
    assert res.all_converged and res.iterations == ref.iterations
    torch.testing.assert_close(res.plan, ref.plan, atol=0, rtol=0)


def test_small_lstsq_host_and_device_agree_and_a_singular_system_gives_zero():
    g = _gen(31)
    X = torch.randn(2, 50, 6, generator=g, dtype=F64)
    r = torch.randn(2, 50, 1, generator=g, dtype=F64)
    A, rhs = X.transpose(-1, -2) @ X, X.transpose(-1, -2) @ r
    want = torch.linalg.lstsq(X, r).solution
    torch.testing.assert_close(sk._small_lstsq(A.clone(), rhs), want, atol=1e-9, rtol=1e-9)
    got = sk._small_lstsq_np(A.clone().numpy(), rhs.numpy())
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-9, rtol=1e-9)
    Z = torch.zeros(6, 6, dtype=F64)
    assert not sk._small_lstsq(Z.clone(), torch.ones(6, 1, dtype=F64)).any()
    assert not sk._small_lstsq_np(Z.clone().numpy(), np.ones((6, 1))).any()
    # a single system: through SciPy's dposv (Cholesky), as the host loop runs it, or without
    from scipy.linalg import lapack

    for posv in (lapack.dposv, None):
        for i in range(2):
            got = sk._small_lstsq_np(A[i].clone().numpy(), rhs[i].numpy(), posv)
            torch.testing.assert_close(torch.from_numpy(got), want[i], atol=1e-9, rtol=1e-9)
        assert not sk._small_lstsq_np(Z.clone().numpy(), np.ones((6, 1)), posv).any()
    # not positive definite (a negative eigenvalue): dposv refuses, gesv solves
    M = np.diag([4.0, -1.0, 2.0])
    got = sk._small_lstsq_np(M.copy(), np.ones((3, 1)), lapack.dposv)
    np.testing.assert_allclose(got[:, 0], np.linalg.solve(M + 4e-12 * np.eye(3), np.ones(3)))


@pytest.mark.parametrize("dtype,eps", [(torch.float32, 0.002), (torch.float64, 0.0005)])
def test_cpu_kernels_have_no_subnormal_entries(monkeypatch, dtype, eps):
    # subnormal kernel entries make every matrix-vector product several times slower on x86; the
    # scaling engine sets them to zero. Control: the same solve with the plain exp takes the same
    # iterations to the same reported error, and the plans differ by less than the documented
    # weight of a zeroed entry, e^-42 (float32) or e^-352 (float64) of the row's largest
    C, a, b = _problem(300, 300, seed=34, uniform=False, dtype=dtype)
    C = C / C.max()
    tiny = torch.finfo(dtype).tiny
    raw = torch.exp(-(C - C.amin(-1, keepdim=True)) / eps)
    assert bool(((raw > 0) & (raw < tiny)).any())  # the problem does produce subnormals
    subnormal = []  # per kernel built, at the time it is built (it becomes the plan later)
    lowest = []  # the smallest exponent exp_ sees (its slow path: results below tiny)
    real, real_exp_ = sk._exp_kernel_, torch.Tensor.exp_

    def exp_spy(self):
        lowest.append(float(self.min()))
        return real_exp_(self)

    def spy(Z):
        monkeypatch.setattr(torch.Tensor, "exp_", exp_spy)
        E = real(Z)
        monkeypatch.setattr(torch.Tensor, "exp_", real_exp_)
        subnormal.append(bool(((E > 0) & (E < tiny)).any()))
        return E

    kw = dict(tol=1e-5, max_iter=20000, grad="none")
    bound = 1.5 * math.exp(sk._EXP_FLOOR[dtype] + 2 * sk._scaling_bound(dtype))
    assert bound < math.exp(-42 if dtype == torch.float32 else -352)
    for momentum in ("anderson", "adaptive"):
        monkeypatch.setattr(sk, "_exp_kernel_", spy)
        res = bs.sinkhorn(C, eps, a, b, momentum=momentum, **kw)
        monkeypatch.setattr(sk, "_exp_kernel_", lambda Z: Z.exp_())
        plain = bs.sinkhorn(C, eps, a, b, momentum=momentum, **kw)
        assert res.all_converged and res.iterations == plain.iterations
        _assert_honest(res, a, b)
        assert float(res.marginal_error) == float(plain.marginal_error)
        gap = (res.plan - plain.plan).abs() / plain.plan.amax(-1, keepdim=True)
        assert float(gap.max()) <= bound
    assert subnormal and not any(subnormal)
    if dtype == torch.float32:  # the clamp (float64 goes without: see _exp_kernel_)
        assert lowest and min(lowest) >= math.log(tiny)


def test_lift_pow2_lifts_the_smallest_positive_entry_by_a_power_of_two():
    F32 = torch.float32
    for x in ([1e-8, 0.5, 3.0], [0.0, 1e-3, 0.2], [1e-30, 1e20], [0.3, 0.25]):
        t = torch.tensor(x, dtype=F32)
        k = sk._lift_pow2(t)
        e = math.frexp(k)
        assert e[0] == 0.5 and k >= 1.0  # a power of two
        lo, hi = float(t[t > 0].min()), float(t.max())
        assert k * hi <= 2.0 ** 100
        assert k * lo >= 1.0 or k * hi * 2 > 2.0 ** 100  # lifted, unless the cap binds
        assert k * lo < 2.0 or k == 1.0  # the smallest such power
    assert sk._lift_pow2(torch.tensor([1e-30, 1e20], dtype=F32)) == 2.0 ** 33  # capped by max
    assert sk._lift_pow2(torch.tensor([1.5, 4.0], dtype=F32)) == 1.0
    assert sk._lift_pow2(torch.zeros(3, dtype=F32)) == 1.0
    # exact: with no subnormal term, the lifted product is the same bits
    g = _gen(5)
    E = torch.rand(200, 300, generator=g, dtype=F32)
    u = torch.rand(200, generator=g, dtype=F32) * 1e-6 + 1e-7
    k = sk._lift_pow2(u)
    assert k > 1.0
    assert torch.equal(torch.mv(E.t(), u * k).mul_(1.0 / k), torch.mv(E.t(), u))


@pytest.mark.parametrize("n,threads", [(300, 1), (1024, 2), (1024, 1)],
                         ids=["two products", "two products, two threads", "one-pass sweep"])
def test_float32_column_products_have_no_subnormal_terms(monkeypatch, n, threads):
    # the column product E^T u lifts u by a power of two (float32, CPU): no term E_ij u_i is
    # subnormal (several per cent of them were, at eps 0.002). A spy on torch.mv and addmv_
    # checks every column product of a solve, in the two-product loop (one and two threads) and
    # in the one-pass sweep (n = 1024 on one thread). Control: the solve without the lift takes
    # the same iterations to the same reported error and the same plan to float32 round-off
    C, a, b = _problem(n, n, seed=35, uniform=False, dtype=torch.float32)
    C = C / C.max()
    tiny = torch.finfo(torch.float32).tiny
    seen = []
    real_mv, real_addmv_ = torch.mv, torch.Tensor.addmv_

    def check(M, x):
        # a column product Eᵀx of the iteration (not the sums of the materialised plan, x = 1,
        # whose own tiny entries may be subnormal)
        if M.dim() == 2 and M.stride(0) == 1 and M.shape[0] > 1 and not bool((x == 1).all()):
            t = M * x[None, :]
            seen.append(bool(((t > 0) & (t < tiny)).any()))

    def mv_spy(M, x, **kw):
        check(M, x)
        return real_mv(M, x, **kw)

    def addmv_spy(self, M, x, **kw):
        check(M, x)
        return real_addmv_(self, M, x, **kw)

    kw = dict(tol=1e-5, max_iter=20000, grad="none")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for momentum in ("anderson", "adaptive"):
            monkeypatch.setattr(torch, "mv", mv_spy)
            monkeypatch.setattr(torch.Tensor, "addmv_", addmv_spy)
            res = bs.sinkhorn(C, 0.002, a, b, momentum=momentum, **kw)
            monkeypatch.setattr(torch, "mv", real_mv)
            monkeypatch.setattr(torch.Tensor, "addmv_", real_addmv_)
            monkeypatch.setattr(sk, "_lift_pow2", lambda x, margin=0: 1.0)
            plain = bs.sinkhorn(C, 0.002, a, b, momentum=momentum, **kw)
            monkeypatch.undo()
            assert res.all_converged and res.iterations == plain.iterations
            _assert_honest(res, a, b)
            assert float(res.marginal_error) == pytest.approx(float(plain.marginal_error), rel=1e-3)
            torch.testing.assert_close(res.plan, plain.plan, atol=1e-9, rtol=1e-5)
    finally:
        torch.set_num_threads(old)
    assert seen and not any(seen)


def test_float32_batched_column_products_have_no_subnormal_terms(monkeypatch):
    # the batched column product lifts each matrix's u by its own power of two (float32, CPU,
    # no host synchronisation): a spy on torch.matmul finds no subnormal term u_i E_ij in any
    # column product of the solve. Control: without the lift the spy finds them, and the solve
    # takes the same iterations to the same reported error and plan to float32 round-off
    g = _gen(36)
    x = torch.rand(4, 200, 2, generator=g, dtype=F64)
    y = torch.rand(4, 200, 2, generator=g, dtype=F64)
    C = torch.cdist(x, y) ** 2
    C = (C / C.amax((-1, -2), keepdim=True)).float()
    tiny = torch.finfo(torch.float32).tiny
    real_matmul = torch.matmul
    kw = dict(tol=1e-5, max_iter=20000, grad="none")

    def solve(lifted):
        seen = []

        def spy(A, B, **k):
            if A.dim() == 3 and A.shape[-2] == 1:  # u (b, 1, n) @ E (b, n, m): a column product
                t = B * A.transpose(-1, -2)
                seen.append(bool(((t > 0) & (t < tiny)).any()))
            return real_matmul(A, B, **k)

        if not lifted:
            monkeypatch.setattr(sk, "_lift_pow2_batched", lambda x, margin=0: 1.0)
        monkeypatch.setattr(torch, "matmul", spy)
        try:
            res = bs.sinkhorn(C, 0.002, momentum="anderson", **kw)
        finally:
            monkeypatch.undo()
        return res, seen

    res, seen = solve(True)
    plain, seen_plain = solve(False)
    assert seen and not any(seen)
    assert any(seen_plain)  # the control: the problem does produce subnormal terms
    assert res.all_converged and res.iterations == plain.iterations
    _assert_honest(res)
    torch.testing.assert_close(res.marginal_error, plain.marginal_error, rtol=1e-3, atol=0)
    torch.testing.assert_close(res.plan, plain.plan, atol=1e-9, rtol=1e-5)
    k = sk._lift_pow2_batched(torch.tensor([[1e-8, 0.5], [0.0, 0.0], [3.0, 4.0], [1e-30, 1e20]]))
    assert k.squeeze(-1).tolist() == [2.0 ** 27, 1.0, 1.0, 2.0 ** 33]


def test_anderson_keeps_its_memory_across_absorptions_in_float32():
    # float32 absorbs the scalings into the potentials whenever they pass e^±22, at eps = 0.01
    # almost every iteration; the shifted frame leaves residual differences unchanged, so the
    # extrapolation must keep working (it had fallen back to plain Sinkhorn rates: 94 iterations
    # against 60 for adaptive relaxation on this problem; now 16)
    C, a, b = _problem(600, 600, seed=29, uniform=False, dtype=torch.float32)
    C = C / C.max()
    kw = dict(tol=1e-5, max_iter=20000, grad="none")
    ada = bs.sinkhorn(C, 0.01, a, b, momentum="adaptive", **kw)
    aa = bs.sinkhorn(C, 0.01, a, b, momentum="anderson", **kw)
    assert ada.all_converged and aa.all_converged
    _assert_honest(aa, a, b)
    assert aa.iterations * 2 <= ada.iterations, (aa.iterations, ada.iterations)
    torch.testing.assert_close(aa.plan, ada.plan, atol=1e-5 / 600, rtol=0)
