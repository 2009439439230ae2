"""Tests of bistochastic.anneal: schedules vs closed forms, EPH-ASC behaviour, the law-enforcing rule,
drift normalisation, the calibration oracle on the 2x2 closed form, and input validation."""

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bistochastic as bs
from bistochastic import anneal as A


def _cost(n, seed, b=None):
    g = torch.Generator().manual_seed(seed)
    shape = (n, n) if b is None else (b, n, n)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _drive(s, T):
    """Call step() T times without a plan (open-loop)."""
    for _ in range(T):
        s.step()
    return np.asarray(s.history.eps + [s.eps])


# ---------------------------------------------------------------------------------------------
# open-loop schedules


@settings(max_examples=25, deadline=None)
@given(eps0=st.floats(0.1, 5.0), alpha=st.floats(0.5, 0.999), T=st.integers(1, 200))
def test_exponential_closed_form(eps0, alpha, T):
    eps_min = eps0 * 0.01
    e = _drive(A.Exponential(eps0, alpha, eps_min), T)
    t = np.arange(T + 1)
    np.testing.assert_allclose(e, np.maximum(eps_min, eps0 * alpha ** t), rtol=1e-12)


def test_linear_hyperbolic_pot_ott_closed_forms():
    T = 150
    t = np.arange(T + 1)
    np.testing.assert_allclose(_drive(A.Linear(2.0, 0.1, 100), T),
                               np.where(t < 100, 2.0 - 1.9 * t / 100, 0.1), rtol=1e-12)
    h = _drive(A.Hyperbolic(1.0, 0.5, 1e-4), T)
    np.testing.assert_allclose(h, 1.0 / (1.0 + 0.5 * t), rtol=1e-12)
    # hyperbolic: delta_t = k eps_t eps_{t+1} (the O(eps^2) law, exactly)
    np.testing.assert_allclose(h[:-1] - h[1:], 0.5 * h[:-1] * h[1:], rtol=1e-10)
    np.testing.assert_allclose(_drive(A.POTScaling(1.0, 0.01), T), 0.99 * np.exp(-t) + 0.01, rtol=1e-12)
    o = _drive(A.OTTScaling(target=0.02, init=50.0, decay=0.9), T)
    np.testing.assert_allclose(o, np.maximum(50.0 * 0.9 ** t, 1.0) * 0.02, rtol=1e-12)
    c = _drive(A.Constant(0.3), 5)
    assert np.all(c == 0.3)


def test_open_loop_logs_drift_and_reset():
    C = _cost(6, 0)
    s = A.Exponential(1.0, 0.9, 0.01)
    r = A.run_schedule(s, C, 5)
    assert math.isnan(r.drift[0]) and np.all(np.isfinite(r.drift[1:]))
    np.testing.assert_allclose(r.eps, s.eps_at(np.arange(5)))
    s.reset()
    assert s.eps == 1.0 and len(s.history) == 0 and s.t == 0


# ---------------------------------------------------------------------------------------------
# drift norms


def test_plan_drift_norms_closed_form():
    n, B = 7, 3
    U = torch.full((B, n, n), 1.0 / n, dtype=torch.float64)
    I = torch.eye(n, dtype=torch.float64).expand(B, n, n)
    # uniform row -> one-hot row: per-row drift sqrt(1 - 1/n)
    assert A.plan_drift(I, U, "per_row") == pytest.approx(math.sqrt(1 - 1 / n), rel=1e-12)
    assert A.plan_drift(I, U, "per_sample") == pytest.approx(math.sqrt(n - 1), rel=1e-12)
    assert A.plan_drift(I, U, "batch") == pytest.approx(math.sqrt(B * (n - 1)), rel=1e-12)
    # per_row is invariant to the mass convention (probability vs unit sums)
    assert A.plan_drift(I / n, U / n, "per_row") == pytest.approx(math.sqrt(1 - 1 / n), rel=1e-12)


def test_duplicating_batch_scales_batch_norm_only():
    C = _cost(8, 1, b=3)
    P0 = A.solve_plan(C, 1.0).plan
    P1 = A.solve_plan(C, 0.9).plan
    D0, D1 = torch.cat([P0, P0]), torch.cat([P1, P1])
    assert A.plan_drift(D1, D0, "batch") == pytest.approx(math.sqrt(2) * A.plan_drift(P1, P0, "batch"), rel=1e-12)
    for norm in ("per_sample", "per_row"):
        assert A.plan_drift(D1, D0, norm) == pytest.approx(A.plan_drift(P1, P0, norm), rel=1e-12)


@pytest.mark.parametrize("make", [
    lambda: A.EPHASC(k_safe=0.3, drift_norm="per_sample"),
    lambda: A.EPHASC(k_safe=0.1, drift_norm="per_row"),
    lambda: A.SpeedLimit(k=0.3),
])
def test_per_sample_decisions_do_not_depend_on_batch_size(make):
    C = _cost(8, 2, b=2)
    r1 = A.run_schedule(make(), C, 100)
    r2 = A.run_schedule(make(), torch.cat([C, C, C]), 100)
    assert r1.pattern == r2.pattern
    np.testing.assert_allclose(r1.eps, r2.eps, rtol=1e-9)


def test_batch_norm_decisions_do_depend_on_batch_size():
    C = _cost(8, 2, b=2)
    r1 = A.run_schedule(A.EPHASC(k_safe=0.5), C, 120)
    r2 = A.run_schedule(A.EPHASC(k_safe=0.5), torch.cat([C] * 8), 120)
    # the same plans drift sqrt(8) times more in the batch norm: more braking, slower cooling
    assert r2.brake.sum() > r1.brake.sum()
    assert r2.eps[-1] >= r1.eps[-1]


# ---------------------------------------------------------------------------------------------
# EPH-ASC


@pytest.mark.parametrize("seed", [0, 2])
def test_ephasc_fixed_cost_alternation(seed):
    C = _cost(10, seed)
    k = 0.5
    r = A.run_schedule(A.EPHASC(1.0, 0.95, 0.01, k), C, 300)
    # first call stores, then c...c (Bc)^m c...c then '-' at eps_min: c...c(cB)^m c...c
    assert re.fullmatch(r"-c+(Bc)*B?c*-*", r.pattern) and "BcB" in r.pattern, r.pattern
    idx = np.flatnonzero(r.brake)
    # every brake is a violation of the law caused by the cooling step before it
    assert np.all(r.drift[idx] > k * r.eps[idx])
    assert np.all(r.step[idx - 1] > 0)
    # a held step has zero drift (same cost, same eps, deterministic cold start), so the next cools
    assert np.all(r.drift[idx + 1] == 0) and not np.any(r.brake[idx + 1])
    # closed form of a cooling step
    cool = r.step > 0
    np.testing.assert_allclose(r.eps[1:][cool[:-1]], np.maximum(0.01, 0.95 * r.eps[:-1][cool[:-1]]))
    assert r.eps[-1] == pytest.approx(0.01)


def test_ephasc_first_call_and_plan_required():
    s = A.EPHASC()
    with pytest.raises(ValueError, match="plan"):
        s.step()
    P = A.solve_plan(_cost(4, 0), 1.0).plan
    assert s.step(P) == 1.0  # first call never cools
    assert s.step(P) == pytest.approx(0.95)  # zero drift: cool


def test_ephasc_fresh_costs_brakes_always():
    # independent costs: O(1) drift at every step, far above k_safe * eps
    g = torch.Generator().manual_seed(0)
    costs = [torch.randn(1, 10, 10, generator=g, dtype=torch.float64) for _ in range(60)]
    r = A.run_schedule(A.EPHASC(k_safe=0.5), costs, 60)
    assert r.brake[1:].all() and np.all(r.eps == 1.0)


# ---------------------------------------------------------------------------------------------
# the law-enforcing rule


@pytest.mark.parametrize("n,seed,k,alpha,n_iter,eps_min", [(6, 0, 0.5, 0.95, 20, 0.01), (10, 1, 0.2, 0.9, 20, 0.02),
                                                            (12, 3, 1.0, 0.8, 20, 0.01), (8, 2, 0.3, 0.95, 100, 0.05)])
def test_speed_limit_enforces_law_every_step(n, seed, k, alpha, n_iter, eps_min):
    C = _cost(n, seed)
    r = A.run_schedule(A.SpeedLimit(1.0, alpha, eps_min, k), C, 800, n_iter=n_iter)
    d = r.obs_drift[1:]
    assert np.all(d <= k * r.eps[1:]), np.max(d / r.eps[1:])
    assert r.eps[-1] == pytest.approx(eps_min)  # and it does not stall on a fixed cost


def test_speed_limit_steps_are_order_eps_squared_when_binding():
    C = _cost(10, 4)
    s = A.SpeedLimit(1.0, 0.95, 0.01, 0.2)
    r = A.run_schedule(s, C, 300)
    h = s.history.as_arrays()
    bind = r.brake & np.isfinite(h["sensitivity"]) & (r.step > 0)
    bind[0] = False
    # delta = m k eps^2 / (s_pred + m k eps) <= m k eps^2 / s_hat
    assert bind.sum() > 10
    lhs = r.step[bind]
    rhs = s.margin * s.k * r.eps[bind] ** 2 / h["sensitivity"][bind]
    assert np.all(lhs <= rhs * (1 + 1e-9))
    assert np.all(r.step <= (1 - 0.95) * r.eps + 1e-15)


def test_speed_limit_separate_cost_drift_matches_on_fixed_cost():
    C = _cost(8, 5, b=2)
    r1 = A.run_schedule(A.SpeedLimit(k=0.3), C, 100)
    s2 = A.SpeedLimit(k=0.3, separate_cost_drift=True)
    r2 = A.run_schedule(s2, C, 100, pass_cost=True)
    np.testing.assert_allclose(r1.eps, r2.eps, rtol=1e-9)
    cd = np.asarray(s2.cost_drift)
    assert np.nanmax(cd) < 1e-12  # a fixed cost has no cost drift


def test_speed_limit_separates_cost_drift():
    # each step adds the same independent cost perturbation; with separation the rule keeps cooling
    g = torch.Generator().manual_seed(6)
    base = torch.randn(2, 8, 8, generator=g, dtype=torch.float64)
    costs = [base + 0.3 * torch.randn(2, 8, 8, generator=g, dtype=torch.float64) for _ in range(150)]
    r1 = A.run_schedule(A.SpeedLimit(k=0.3), costs, 150)
    r2 = A.run_schedule(A.SpeedLimit(k=0.3, separate_cost_drift=True), costs, 150, pass_cost=True)
    assert r2.eps[-1] < r1.eps[-1]


# ---------------------------------------------------------------------------------------------
# spectral gap and the oracle: the 2x2 closed form


def _two_by_two(theta):
    return torch.tensor([[0.0, theta / 2], [theta / 2, 0.0]], dtype=torch.float64)


def test_sinkhorn_gap_two_by_two_and_dense():
    theta = 1.3
    C = _two_by_two(theta)
    for eps in (2.0, 0.5, 0.2):
        P = A.solve_plan(C, eps, n_iter=None, tol=1e-13).plan
        assert float(A.sinkhorn_gap(P)) == pytest.approx(1 / math.cosh(theta / (4 * eps)) ** 2, rel=1e-9)
    # general N, uniform marginals: J = N^2 P^T P for probability-normalised P
    C = _cost(7, 7)
    P = A.solve_plan(C, 0.4, n_iter=None, tol=1e-13).plan / 7
    lam = np.sort(np.linalg.eigvals((49 * P.T @ P).numpy()).real)
    assert float(A.sinkhorn_gap(P)) == pytest.approx(1 - lam[-2], rel=1e-9)


def test_calibration_oracle_two_by_two_closed_form():
    theta, K, e_tol, alpha, m = 1.0, 20, 1e-4, 0.9, 2
    res = A.calibrate_k_safe(_two_by_two(theta), eps0=1.0, eps_min=0.02, alpha=alpha, substeps=m, K=K,
                             tolerated_error=e_tol, tol=1e-13)
    eps = res.eps
    np.testing.assert_allclose(eps, alpha ** (np.arange(len(eps)) / m), rtol=1e-12)
    p = 1 / (1 + np.exp(-theta / (2 * eps)))
    gamma = 1 / np.cosh(theta / (4 * eps)) ** 2
    np.testing.assert_allclose(res.gamma, gamma, rtol=1e-8, atol=1e-13)
    # per-row drift of the 2x2 plan: sqrt(2)|dp|
    adr = np.full_like(eps, np.nan)
    adr[:-m] = math.sqrt(2) * np.abs(p[m:] - p[:-m])
    np.testing.assert_allclose(res.alpha_drift, adr, rtol=1e-7, atol=1e-12)
    rhoK = (1 - gamma) ** K
    amp = rhoK / (1 - rhoK)
    kb = e_tol / (amp * eps)
    r = gamma / eps
    win = np.ones_like(eps, dtype=bool)
    below = np.flatnonzero((r < 0.5 * r.max()) & (np.arange(len(eps)) > np.argmax(r)))
    if below.size:
        win[below[0]:] = False
    assert np.array_equal(res.window, win) and res.eps_window == eps[win].min()
    active = np.isfinite(adr) & (amp * adr > e_tol) & win
    assert np.array_equal(res.active, active) and active.any()
    assert res.k_safe == pytest.approx(np.min(kb[active]), rel=1e-6)
    np.testing.assert_allclose(res.rho_K, rhoK, rtol=1e-6)
    assert res.converged.all()


def test_calibration_linear_regime_prediction():
    # c fitted in the window: k_linear = K c e_tol, with gamma ~ c eps there
    res = A.calibrate_k_safe(_cost(10, 8), eps0=1.0, eps_min=0.1, alpha=0.9, substeps=2, K=20,
                             tolerated_error=0.05)
    assert res.k_linear == pytest.approx(20 * res.c * 0.05)
    win = res.gamma / res.eps >= 0.5 * np.max(res.gamma / res.eps)
    assert np.all(np.abs(res.gamma[win] / (res.c * res.eps[win]) - 1) < 1.0)


# ---------------------------------------------------------------------------------------------
# overhead


def test_overhead_flops_model():
    f = A.overhead_flops(64, 32, 20)
    assert f["drift"] == 3 * 32 * 64 ** 2
    assert f["passes_ratio"] == pytest.approx(1 / 40)
    # the spectral diagnostic overtakes the layer at N of order 10 K * 3/10 * ... : ratio grows like N
    r = [A.overhead_flops(n, 32, 20)["spectral_over_sinkhorn"] for n in (10, 100, 1000)]
    assert r[1] / r[0] == pytest.approx(10) and r[2] / r[1] == pytest.approx(10)


def test_time_overhead_runs():
    t = A.time_overhead(8, B=2, K=5, reps=1)
    assert set(t) == {"drift", "sinkhorn", "spectral"} and all(v > 0 for v in t.values())


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("ctor,match", [
    (lambda: A.Exponential(1.0, 1.5), "alpha"),
    (lambda: A.Exponential(-1.0), "eps0"),
    (lambda: A.Exponential(1.0, 0.9, 2.0), "eps_min"),
    (lambda: A.Linear(1.0, 0.1, 0), "n_steps"),
    (lambda: A.Hyperbolic(1.0, -1.0), "k"),
    (lambda: A.POTScaling(1.0, 2.0), "eps_target"),
    (lambda: A.OTTScaling(decay=1.5), "decay"),
    (lambda: A.EPHASC(k_safe=0.0), "k_safe"),
    (lambda: A.EPHASC(drift_norm="max"), "drift_norm"),
    (lambda: A.SpeedLimit(margin=2.0), "margin"),
    (lambda: A.SpeedLimit(smoothing=1.0), "smoothing"),
])
def test_bad_constructor_args(ctor, match):
    with pytest.raises(ValueError, match=match):
        ctor()


def test_bad_step_and_function_inputs():
    s = A.EPHASC()
    P = A.solve_plan(_cost(4, 0), 1.0).plan
    s.step(P)
    with pytest.raises(ValueError, match="plan"):
        s.step(P[:3, :3])
    with pytest.raises(ValueError, match="plan"):
        s.step("not a tensor")
    with pytest.raises(ValueError, match="cost"):
        s.step(P, cost=torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="norm"):
        A.plan_drift(P, P, "max")
    with pytest.raises(ValueError, match="eps_min"):
        A.calibrate_k_safe(_cost(4, 0), eps0=0.1, eps_min=0.2)
    with pytest.raises(ValueError, match="n_steps"):
        A.run_schedule(A.Constant(1.0), _cost(4, 0), 0)
    with pytest.raises(ValueError, match="scheduler"):
        A.run_schedule("exp", _cost(4, 0), 3)
    with pytest.raises(ValueError, match="N"):
        A.overhead_flops(0)
    with pytest.raises(ValueError, match="t"):
        A.Exponential().eps_at(-1)


# ---------------------------------------------------------------------------------------------
# the training API: probe batch, state_dict, get_last_eps, logging


def _minibatch_loop(make, use_probe, steps=120, seed=0):
    """A small permutation-learning loop with fresh samples every step (as in the module example).

    ``use_probe=True``: the scheduler measures its drift on a fixed probe batch (``probe_fn``);
    False: it is fed the training batch's plan, the mistake the probe mechanism fixes."""
    g = torch.Generator().manual_seed(seed)
    N, d, B = 8, 8, 16
    W = torch.nn.Parameter(torch.eye(d) + 0.3 * torch.randn(d, d, generator=g))
    opt = torch.optim.SGD([W], lr=0.05)

    def draw(n):
        X = torch.randn(n, N, d, generator=g)
        perm = torch.argsort(torch.rand(n, N, generator=g), dim=-1)
        Y = X.gather(1, perm[..., None].expand(n, N, d))
        return X, Y + 0.5 * torch.randn(n, N, d, generator=g), perm

    def cost(X, Y):
        return -(Y @ (X @ W).transpose(1, 2)) / d ** 0.5

    Xp, Yp, _ = draw(B)
    sched = make(A.make_probe(lambda: cost(Xp, Yp)) if use_probe else None)
    for _ in range(steps):
        X, Y, perm = draw(B)
        P = bs.project_dsm(-cost(X, Y), tau=sched.eps, n_iter=20).plan
        loss = -P.gather(-1, perm[..., None]).clamp_min(1e-9).log().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if use_probe:
            sched.step()
        else:
            sched.step(P.detach())
    return sched


@pytest.mark.parametrize("make", [
    lambda p: A.EPHASC(1.0, 0.95, 0.01, 0.5, probe_fn=p),                    # released defaults
    lambda p: A.SpeedLimit(1.0, 0.95, 0.01, 0.5, probe_fn=p),                # library defaults
], ids=["EPHASC", "SpeedLimit"])
def test_closed_loop_rules_cool_in_a_minibatch_loop_only_with_a_probe(make):
    # failure mode: training-batch plans compare different samples; the drift is sample noise
    # of order one per step, so the rule (almost) never cools
    bad = _minibatch_loop(make, use_probe=False)
    assert bad.eps > 0.9, bad.eps
    # fix: the drift of a fixed probe batch; the rule anneals (exponential alone would reach
    # 0.95^120 = 0.002, so a quarter of eps0 leaves the rule room to brake about half the time)
    good = _minibatch_loop(make, use_probe=True)
    assert good.eps < 0.25, good.eps
    assert good.get_last_eps() == good.eps


def test_module_docstring_example_runs_and_anneals():
    doc = A.__doc__
    block = doc.split("Example (runnable; a test executes it)::\n\n", 1)[1].split("\n\nEvery decision", 1)[0]
    code = "\n".join(line[4:] for line in block.splitlines())
    ns = {}
    exec(compile(code, "anneal-docstring-example", "exec"), ns)
    sched = ns["sched"]
    assert sched.get_last_eps() < 0.2 and len(sched.history) == 200
    assert sched.history.brake.count(True) > 0  # closed loop: it did brake sometimes


def _driven(sched, t0, t1, seed=9):
    """Step ``sched`` from step t0 to t1 on a slowly drifting cost (deterministic in t)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(2, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(t1, 2, 8, 8, generator=g, dtype=torch.float64)
    for t in range(t0, t1):
        C = base + 0.02 * noise[: t + 1].sum(0) / math.sqrt(t + 1)
        sched.step(A.solve_plan(C, sched.eps).plan, cost=C)
    return sched


@pytest.mark.parametrize("make", [
    lambda: A.EPHASC(k_safe=0.3, drift_norm="per_sample"),
    lambda: A.SpeedLimit(k=0.3, separate_cost_drift=True, smoothing=0.5),
    lambda: A.Hyperbolic(1.0, 0.5),
])
def test_state_dict_round_trip_resumes_identically(make):
    import io

    full = _driven(make(), 0, 80)
    half = _driven(make(), 0, 40)
    buf = io.BytesIO()
    torch.save(half.state_dict(), buf)
    buf.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.eps == half.eps and resumed.t == 40
    _driven(resumed, 40, 80)
    assert resumed.history.eps == full.history.eps
    assert resumed.history.pattern() == full.history.pattern()
    np.testing.assert_array_equal(np.asarray(resumed.history.drift), np.asarray(full.history.drift))
    assert resumed.eps == full.eps
    # the state dict is a snapshot: stepping the original afterwards does not change it
    sd = half.state_dict()
    _driven(half, 40, 45)
    assert sd["t"] == 40 and len(sd["history"]["eps"]) == 40


def test_history_records_bound_and_logger():
    log = []
    C = _cost(10, 0)
    s = A.EPHASC(1.0, 0.95, 0.01, 0.5, logger=log.append)
    r = A.run_schedule(s, C, 120)
    rec = s.history.records()
    assert log == rec and len(rec) == 120
    for row in rec:
        assert row["bound"] == pytest.approx(0.5 * row["eps"])
        assert row["decision"] == ("brake" if row["brake"] else ("cool" if row["step"] > 0 else "hold"))
        # a brake is exactly a drift above the logged bound
        assert row["brake"] == (row["drift"] > row["bound"])
    assert any(row["decision"] == "brake" for row in rec)
    assert np.all(np.isnan(A.Exponential().history.as_arrays()["bound"]))
    sl = A.SpeedLimit(k=0.4)
    A.run_schedule(sl, C, 20)
    np.testing.assert_allclose(sl.history.as_arrays()["bound"], 0.4 * np.asarray(sl.history.eps))


def test_get_last_eps_follows_step():
    s = A.Exponential(1.0, 0.5, 0.01)
    assert s.get_last_eps() == 1.0
    s.step()
    assert s.get_last_eps() == 0.5 == s.eps


def test_probe_fn_equals_passing_the_probe_plan():
    C = _cost(8, 3, b=2)
    a = A.SpeedLimit(k=0.3, probe_fn=lambda eps: A.solve_plan(C, eps).plan)
    b = A.SpeedLimit(k=0.3)
    for _ in range(60):
        a.step()
        b.step(A.solve_plan(C, b.eps).plan)
    assert a.history.eps == b.history.eps


def test_training_api_bad_input_names_the_argument():
    with pytest.raises(TypeError, match="probe_fn"):
        A.EPHASC(probe_fn=3)
    with pytest.raises(TypeError, match="logger"):
        A.SpeedLimit(logger="print")
    P = A.solve_plan(_cost(4, 0), 1.0).plan
    s = A.EPHASC(probe_fn=lambda eps: P)
    with pytest.raises(ValueError, match="plan"):
        s.step(P)
    with pytest.raises(ValueError, match="probe_fn"):
        A.EPHASC(probe_fn=lambda eps: "plan").step()
    with pytest.raises(TypeError, match="state_dict"):
        A.EPHASC().load_state_dict([1, 2])
    with pytest.raises(ValueError, match="state_dict"):
        A.EPHASC().load_state_dict(A.SpeedLimit().state_dict())
    with pytest.raises(TypeError, match="cost_fn"):
        A.make_probe(None)
    with pytest.raises(ValueError, match="n_iter"):
        A.make_probe(lambda: P, n_iter=0)


# ---------------------------------------------------------------------------------------------
# the simulated oracle


def _sim_calib(e_tol, seed=5, **kw):
    return A.calibrate_k_safe(_cost(8, seed, b=2), eps0=1.0, eps_min=0.2, alpha=0.9, substeps=4, K=20,
                              tolerated_error=e_tol, window_frac=0.1, method="simulate", **kw)


def test_simulated_path_at_exponential_slope_matches_run_schedule():
    # two implementations of the same warm-started K-sweep anneal: the oracle's replay along the
    # reference grid and run_schedule with its own converged reference
    res = _sim_calib(1e-3)
    sim = res.simulate(10.0)  # any slope above k_exp: every step is a full alpha-step
    n = len(sim["eps"]) - 1  # the last step may be a partial one, down to the window's end
    np.testing.assert_allclose(sim["eps"][:n], 0.9 ** np.arange(n), rtol=1e-12)
    run = A.run_schedule(A.Exponential(1.0, 0.9, 1e-6), res._ref["C"], n, n_iter=20, warm_start=True,
                         reference=True, ref_tol=1e-12, norm="per_row")
    # run_schedule starts cold at eps0; the oracle starts converged (error 0): compare after the
    # start has been forgotten (the cold start's error decays like rho^K per step)
    np.testing.assert_allclose(sim["error"][5:n], run.error[5:], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("seed", [5, 6])
def test_simulated_oracle_meets_its_tolerance_and_is_not_below_the_bound_oracle(seed):
    e_tol = 1e-4
    res = _sim_calib(e_tol, seed)
    assert res.method == "simulate" and res.feasible and res.n_sims > 2
    sim = res.simulate(res.k_safe)
    assert np.max(sim["error"]) <= e_tol and res.sim_error == pytest.approx(np.max(sim["error"]))
    # the schedule it simulates obeys the law it calibrates
    assert np.all(sim["drift"][1:] <= res.k_safe * sim["eps"][1:] * (1 + 1e-12))
    # the bound is an upper bound on the error, so its answer cannot be larger
    assert res.k_bound_oracle <= res.k_safe
    # and the search found the edge: a 5 % larger slope misses the tolerance (when it binds)
    if res.k_safe < res.k_exp:
        assert np.max(res.simulate(1.05 * res.k_safe)["error"]) > e_tol


def test_simulated_oracle_returns_k_exp_when_exponential_is_safe_and_warns_when_infeasible():
    res = _sim_calib(0.5)
    assert res.k_safe == pytest.approx(res.k_exp, rel=1e-6) and res.n_sims == 1
    with pytest.warns(RuntimeWarning, match="substeps"):
        bad = _sim_calib(1e-12)
    assert not bad.feasible and bad.k_safe == bad.k_resolution
    # the bound method reports the bound oracle as k_safe
    b = A.calibrate_k_safe(_cost(8, 5, b=2), eps0=1.0, eps_min=0.2, alpha=0.9, substeps=4,
                           tolerated_error=1e-4, window_frac=0.1)
    assert b.method == "bound" and b.k_safe == b.k_bound_oracle and math.isnan(b.sim_error)
    with pytest.raises(ValueError, match="method"):
        A.calibrate_k_safe(_cost(4, 0), method="exact")
    with pytest.raises(ValueError, match="k"):
        b.simulate(-1.0)
    with pytest.raises(ValueError, match="tolerated_error"):
        b.simulated_k(0.0)


def test_simulated_k_for_another_tolerance_matches_a_fresh_calibration():
    a = _sim_calib(1e-4)
    b = _sim_calib(3e-4)
    again = a.simulated_k(3e-4)
    assert again["k"] == pytest.approx(b.k_safe, rel=1e-12) and again["feasible"]
    assert a.simulated_k(3e-4)["k"] >= a.k_safe  # a looser tolerance allows a larger slope
    # the bound oracle recomputed for another tolerance matches the bound method's answer
    assert a.simulated_k(1e-4)["k_bound"] == pytest.approx(a.k_bound_oracle, rel=1e-12)
    # steps: the exponential slope needs one step per alpha-step; smaller slopes need more
    n_alpha = (len(a._ref["eps"]) - 1) / 4
    assert a.steps_needed(10 * a.k_exp) == pytest.approx(n_alpha)
    assert a.steps_needed(a.k_bound_oracle) > a.steps_needed(a.k_safe) >= n_alpha


def test_make_probe_with_cost_feeds_separate_cost_drift():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(2, 8, 8, generator=g, dtype=torch.float64)
    state = {"t": 0}

    def cost_fn():  # the probe batch's cost under a slowly changing "model"
        return base * (1 + 0.01 * state["t"])

    probe = A.make_probe(cost_fn, with_cost=True)
    P, Cp = probe(0.5)
    assert torch.equal(Cp, cost_fn()) and torch.allclose(P, A.solve_plan(Cp, 0.5).plan)
    a = A.SpeedLimit(k=0.3, separate_cost_drift=True, probe_fn=probe)
    b = A.SpeedLimit(k=0.3, separate_cost_drift=True)
    for t in range(40):
        state["t"] = t
        a.step()
        C = cost_fn()
        b.step(A.solve_plan(C, b.eps).plan, cost=C)
    assert a.history.eps == b.history.eps
    assert np.nanmax(a.cost_drift) > 0  # the cost did drift, and it was separated
