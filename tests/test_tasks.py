"""Tests of the permutation-learning task: data, Hungarian read-out, entropy, collapse detector, training."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import bistochastic as bs
from bistochastic import anneal as an
from bistochastic import tasks as tk

F64 = torch.float64

SMALL = tk.TaskConfig(n=5, d=4, batch=3, test_batch=8, sigma=0.3, epochs=40, lr=0.05, init_scale=1.0,
                      eval_every=5)


def replace_cfg(**kw):
    from dataclasses import replace

    return replace(SMALL, **kw)


def _brute_force(cost: np.ndarray) -> float:
    n = cost.shape[0]
    return min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))


# ----------------------------------------------------------------------------------------------
# data


def test_data_deterministic_and_consistent():
    d1 = tk.make_data(SMALL, [3, 4])
    d2 = tk.make_data(SMALL, [3, 4])
    for f in ("A", "X", "Y", "perm", "X_test", "Y_test", "perm_test", "W0"):
        assert torch.equal(getattr(d1, f), getattr(d2, f)), f
    # a replication does not depend on the others drawn with it
    d3 = tk.make_data(SMALL, 4)
    assert torch.equal(d1.Y[1], d3.Y[0])
    # noiseless data: Y_{π(i)} = (XA)_i exactly
    cfg0 = tk.TaskConfig(n=6, d=3, batch=2, test_batch=2, sigma=0.0)
    d = tk.make_data(cfg0, 0)
    XA = d.X[0] @ d.A[0]
    for b in range(2):
        assert torch.allclose(d.Y[0, b][d.perm[0, b]], XA[b])
        assert sorted(d.perm[0, b].tolist()) == list(range(6))


def test_oracle_recovers_noiseless_permutation():
    cfg0 = tk.TaskConfig(n=7, d=16, batch=4, test_batch=4, sigma=0.0)
    d = tk.make_data(cfg0, 1)
    # with W = A, C = -(XA)(XA)^T/√d up to the permutation: for d >> log n the diagonal wins
    pred = tk.hungarian(tk.matching_cost(d.X, d.Y, d.A))
    assert float(tk.assignment_accuracy(pred, d.perm).min()) == 1.0


def test_config_validation():
    with pytest.raises(ValueError, match="n"):
        tk.TaskConfig(n=1)
    with pytest.raises(ValueError, match="loss"):
        tk.TaskConfig(loss="hinge")
    with pytest.raises(ValueError, match="lr"):
        tk.TaskConfig(lr=0.0)
    with pytest.raises(ValueError, match="seeds"):
        tk.make_data(SMALL, [])


# ----------------------------------------------------------------------------------------------
# Hungarian, accuracy, entropy


def test_hungarian_true_permutation_has_accuracy_one():
    g = torch.Generator().manual_seed(0)
    perm = torch.stack([torch.randperm(9, generator=g) for _ in range(5)])
    cost = 1.0 - torch.nn.functional.one_hot(perm, 9).to(F64)  # zero cost exactly on π
    cost = cost + 0.01 * torch.rand(5, 9, 9, generator=g, dtype=F64)
    pred = tk.hungarian(cost)
    assert torch.equal(pred, perm)
    assert float(tk.assignment_accuracy(pred[None], perm[None])) == 1.0


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 6), seed=st.integers(0, 10_000), tied=st.booleans())
def test_hungarian_matches_brute_force(n, seed, tied):
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(3, n, n, generator=g, dtype=F64)
    if tied:  # integer costs: many ties, exercises both the fast path and scipy
        C = torch.round(2 * C)
    pred = tk.hungarian(C)
    for b in range(3):
        p = pred[b].tolist()
        assert sorted(p) == list(range(n))  # a permutation
        total = float(sum(C[b, i, p[i]] for i in range(n)))
        assert total == pytest.approx(_brute_force(C[b].numpy()), abs=1e-12)


def test_hungarian_fast_path_is_row_argmin():
    # a cost whose row-wise argmin is a permutation takes the fast path; it must be optimal anyway
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(6, generator=g)
    C = torch.rand(6, 6, generator=g, dtype=F64) + 1.0
    C[torch.arange(6), perm] = torch.rand(6, generator=g, dtype=F64)  # row minima, a permutation
    pred = tk.hungarian(C)
    assert torch.equal(pred, perm)
    assert float(C[torch.arange(6), pred].sum()) == pytest.approx(_brute_force(C.numpy()), abs=1e-12)


def test_hungarian_bad_input():
    with pytest.raises(ValueError, match="cost"):
        tk.hungarian(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="cost"):
        tk.hungarian(torch.full((3, 3), float("nan")))


@pytest.mark.parametrize("n", [2, 5, 17])
def test_entropy_closed_forms(n):
    U = torch.full((4, n, n), 1.0 / n, dtype=F64)
    assert torch.allclose(tk.row_entropy(U), torch.full((4,), math.log(n), dtype=F64), atol=1e-14)
    assert torch.allclose(tk.row_entropy(n * U), torch.full((4,), math.log(n), dtype=F64), atol=1e-14)
    Pm = torch.eye(n, dtype=F64)[torch.randperm(n)]
    assert float(tk.row_entropy(Pm)) == 0.0
    # a two-point row (1-p, p): the binary entropy
    p = 0.3
    R = torch.zeros(n, n, dtype=F64)
    R[:, 0], R[:, 1] = 1 - p, p
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert float(tk.row_entropy(R)) == pytest.approx(h, rel=1e-12)
    with pytest.raises(ValueError, match="nonnegative"):
        tk.row_entropy(-U)


# ----------------------------------------------------------------------------------------------
# collapse detector


def test_collapse_epoch_on_synthetic_traces():
    n = 8
    thr = 0.1 * math.log(n)
    T = 50
    t = torch.arange(T, dtype=F64)
    # decays through the threshold at a known epoch; never; from the start; dips then recovers
    h1 = math.log(n) * torch.exp(-t / 10)  # below thr first at t > 10 ln 10 = 23.03 -> 24
    h2 = torch.full((T,), 0.5 * math.log(n), dtype=F64)
    h3 = torch.full((T,), 0.01, dtype=F64)
    h4 = h2.clone()
    h4[30] = 0.5 * thr
    H = torch.stack([h1, h2, h3, h4])
    tc = tk.collapse_epoch(H, n)
    expected = int(math.floor(10 * math.log(10))) + 1
    assert tc.tolist() == [expected, -1, 0, 30]
    acc = torch.stack([t / T, t / T, t / T, t / T])
    at = tk.acc_at(tc, acc)
    assert at[0] == pytest.approx(expected / T) and math.isnan(float(at[1]))
    ref = torch.full((4,), 0.9, dtype=F64)
    prem = tk.premature_collapse(tc, acc, ref, margin=0.1)
    # run 0 collapses at acc 0.48 < 0.8: premature; run 1 never; run 2 at acc 0; run 3 at 0.6
    assert prem.tolist() == [True, False, True, True]
    late = torch.stack([t * 0 + 0.95] * 4)
    assert not tk.premature_collapse(tc, late, ref).any()


def test_collapse_bad_input():
    with pytest.raises(ValueError, match="frac"):
        tk.collapse_epoch(torch.ones(3), 4, frac=1.5)
    with pytest.raises(ValueError, match="margin"):
        tk.premature_collapse(torch.zeros(1, dtype=torch.long), torch.ones(1, 3), torch.ones(1), margin=0)


def test_plan_readouts_closed_forms():
    perm = torch.tensor([[[1, 0, 2], [0, 1, 2]]])  # (1, B=2, N=3)
    plan = torch.nn.functional.one_hot(perm, 3).double()
    ro = tk.plan_readouts(plan, perm)
    assert float(ro["hard"]) == 1.0 and float(ro["soft"]) == 1.0
    assert float(ro["row_err"]) == 0.0 and float(ro["col_err"]) == 0.0
    # the uniform plan: soft accuracy 1/N; rows scaled by 2 -> row error 1, soft unchanged
    uni = torch.full((1, 2, 3, 3), 1.0 / 3, dtype=F64)
    assert float(tk.plan_readouts(uni, perm)["soft"]) == pytest.approx(1.0 / 3)
    ro2 = tk.plan_readouts(2 * uni, perm)
    assert float(ro2["row_err"]) == pytest.approx(1.0) and float(ro2["soft"]) == pytest.approx(1.0 / 3)
    # the hard read-out is the row argmax: a wrong permutation scores 0
    wrong = torch.nn.functional.one_hot(torch.roll(perm, 1, -1), 3).double()
    assert float(tk.plan_readouts(wrong, perm)["hard"]) == 0.0
    with pytest.raises(ValueError, match="perm"):
        tk.plan_readouts(plan, perm[..., :2])


def test_replay_of_own_trajectory_reproduces_the_run():
    """Training is a deterministic function of the temperatures: replaying a closed-loop rule's own
    eps trajectory per seed gives the same run (the replay control is exact when nothing else differs)."""
    c = replace_cfg(epochs=30)
    r = tk.train_many(c, {"e": an.EPHASC(1.0, 0.9, 0.01, 0.2)}, [0, 1])["e"]
    rp = tk.train_many(c, {"r": [tk.Replay(r.eps[i]) for i in range(2)]}, [0, 1])["r"]
    assert torch.equal(r.eps, rp.eps)
    assert torch.equal(r.final_test_acc, rp.final_test_acc)
    for k in r.readout:
        assert torch.equal(r.readout[k], rp.readout[k])
    with pytest.raises(ValueError, match="entries"):
        tk.train_many(c, {"r": [tk.Replay([1.0])]}, [0, 1])
    with pytest.raises(ValueError, match="positive"):
        tk.Replay([1.0, -0.1])


def test_premature_budget_reference():
    r = tk.train_many(replace_cfg(epochs=30, eval_every=1), {"e": an.Exponential(1.0, 0.8, 0.01)}, [0, 1])["e"]
    ref_hi = torch.full((2,), 2.0, dtype=F64)  # unreachable reference: every collapse is premature
    ref_lo = torch.full((2,), -1.0, dtype=F64)  # nothing is premature
    collapsed = r.collapse_epoch >= 0
    assert torch.equal(r.premature(reference=ref_hi), collapsed)
    assert not bool(r.premature(reference=ref_lo).any())
    with pytest.raises(ValueError, match="reference"):
        r.premature(reference=torch.ones(3, dtype=F64))


# ----------------------------------------------------------------------------------------------
# training


def test_nll_loss_gradient_matches_closed_form():
    """With converged Sinkhorn, d(-Σ log P_{iπ(i)})/dC = (Π - P*)/ε (the Fenchel-Young gradient)."""
    g = torch.Generator().manual_seed(2)
    n, eps = 5, 0.7
    C = torch.randn(n, n, generator=g, dtype=F64, requires_grad=True)
    perm = torch.randperm(n, generator=g)
    res = bs.project_dsm(-C / eps, tau=1.0, tol=1e-13, max_iter=20000, grad="implicit")
    logp = res.f + res.g[perm] - C[torch.arange(n), perm] / eps
    (-logp.sum()).backward()
    Pi = torch.nn.functional.one_hot(perm, n).to(F64)
    assert torch.allclose(C.grad, (Pi - res.plan.detach()) / eps, atol=1e-8)


def test_train_deterministic_and_batch_independent():
    sch = {"c": an.Constant(0.5), "e": an.Exponential(1.0, 0.9, 0.05)}
    r1 = tk.train_many(SMALL, sch, [0, 1])
    r2 = tk.train_many(SMALL, sch, [0, 1])
    for k in sch:
        for f in ("eps", "entropy", "loss", "grad_norm", "train_acc"):
            assert torch.equal(getattr(r1[k], f), getattr(r2[k], f)), (k, f)
    # the prototypes are untouched
    assert sch["e"].eps == 1.0 and len(sch["e"].history) == 0
    # one run alone equals the same run inside the batch (up to round-off)
    alone = tk.train(SMALL, an.Exponential(1.0, 0.9, 0.05), 1)
    assert torch.allclose(alone.loss[0], r1["e"].loss[1], rtol=1e-9, atol=1e-12)
    assert torch.equal(alone.train_acc[0], r1["e"].train_acc[1])
    # the schedule is followed
    assert np.allclose(r1["e"].eps[0].numpy(), an.Exponential(1.0, 0.9, 0.05).eps_at(np.arange(SMALL.epochs)))


@pytest.mark.parametrize("loss", ["nll", "mse"])
def test_constant_eps_learns(loss):
    """At a moderate constant ε the held-out accuracy rises far above chance (1/N)."""
    cfg = tk.TaskConfig(n=6, d=6, batch=6, test_batch=32, sigma=0.3, epochs=80, lr=0.03, init_scale=1.0,
                        loss=loss, eval_every=10)
    r = tk.train(cfg, an.Constant(0.5), [0, 1, 2])
    chance = 1.0 / cfg.n
    start = r.test_acc[:, 0]
    assert bool((start < 0.5).all())  # random features: near chance at the start
    assert bool((r.final_test_acc > 3 * chance).all())
    assert float((r.final_test_acc - start).min()) > 0.25
    assert bool((r.final_test_acc <= r.oracle_test_acc + 0.15).all())  # the oracle is a ceiling (noise)
    assert bool((r.loss[:, -1] < r.loss[:, 0]).all())


def test_eph_asc_brake_flags_are_recorded():
    r = tk.train(SMALL, an.EPHASC(1.0, 0.9, 0.05, k_safe=0.05), [0])
    h = r.extra["schedulers"][0].history
    assert r.brake[0].tolist() == list(h.brake)[: SMALL.epochs]
    # a held epoch keeps eps; a cooling one multiplies it by alpha (until the floor)
    e = r.eps[0].numpy()
    for t in range(SMALL.epochs - 1):
        if r.brake[0, t]:
            assert e[t + 1] == e[t]
    assert int(r.brake.sum()) > 0


def test_brake_after_brake():
    b = torch.tensor([[0, 1, 0, 1, 0, 1, 0], [0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    f = tk.brake_after_brake(b)
    assert f[0] == 0.0 and f[1] == pytest.approx(2 / 3) and math.isnan(float(f[2]))


def test_eph_asc_alternates_on_fixed_cost():
    """On a fixed cost a held step has zero drift, so EPH-ASC never holds twice in a row (§5.3)."""
    g = torch.Generator().manual_seed(5)
    C = torch.randn(4, 8, 8, generator=g, dtype=F64)
    run = an.run_schedule(an.EPHASC(1.0, 0.9, 0.01, k_safe=0.5), C, 80)
    br = torch.as_tensor(run.brake)
    assert int(br.sum()) > 0
    assert float(tk.brake_after_brake(br)) == 0.0


def test_row_argmax_ignores_round_off_ties():
    P = torch.tensor([[1.0, 1.0 - 1e-15, 0.0], [0.0, 1.0 - 1e-15, 1.0]], dtype=F64)
    assert tk.row_argmax(P).tolist() == [0, 1]  # the first of the tied entries
    Q = torch.tensor([[0.2, 0.7, 0.1]], dtype=F64)
    assert tk.row_argmax(Q).tolist() == [1]
    with pytest.raises(ValueError, match="rtol"):
        tk.row_argmax(Q, rtol=1.5)


# ----------------------------------------------------------------------------------------------
# sorting task

SORT = tk.SortingConfig(n=6, d=3, batch=4, probe_batch=4, test_batch=16, sigma=0.01, nuisance=1.0,
                        steps=30, lr=0.05, n_iter=20)


def test_sorting_oracle_sorts_noiseless_keys():
    cfg0 = tk.SortingConfig(n=8, d=3, sigma=0.0, nuisance=0.0)
    g = torch.Generator().manual_seed(0)
    u = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    X, rank = tk._sorting_problems(u, 5, cfg0, g)
    C = tk.sorting_cost(X, u)
    assert C.shape == (5, 8, 8)
    # the cost -s_i r_j is minimised by the sorted assignment (rearrangement inequality)
    assert torch.equal(tk.hungarian(C), rank)
    with pytest.raises(ValueError, match="d"):
        tk.sorting_cost(X, torch.ones(2, dtype=F64))


def test_sorting_probe_lets_eph_asc_cool_where_minibatch_drift_does_not():
    sch = {"probe": an.EPHASC(1.0, 0.9, 0.05, 0.1), "train": an.EPHASC(1.0, 0.9, 0.05, 0.1)}
    r = tk.train_sorting_many(SORT, sch, [0, 1], feed={"train": "train"})
    # fresh minibatches: the plan drift is the change of data, the rule brakes almost always
    assert float(r["train"].brake.double().mean()) > 0.5
    assert float(r["probe"].eps[:, -1].max()) < float(r["train"].eps[:, -1].min())
    with pytest.raises(ValueError, match="feed"):
        tk.train_sorting_many(SORT, sch, [0], feed={"other": "probe"})


def test_sorting_deterministic_and_paired():
    sch = {"a": an.Exponential(1.0, 0.9, 0.05)}
    r1 = tk.train_sorting_many(SORT, sch, [3])["a"]
    r2 = tk.train_sorting_many(SORT, {**sch, "b": an.Constant(0.3)}, [3])["a"]
    assert torch.equal(r1.w, r2.w) and torch.equal(r1.exact_hard, r2.exact_hard)
