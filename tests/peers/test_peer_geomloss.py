"""Matrix-solver tests of GeomLoss (``tests/test_ot_solve_matrix.py`` and its generators,
jeanfeydy/geomloss) ported to ``bs.sinkhorn``. The hypothesis strategies keep GeomLoss's ranges
(N, M in 1..10, batch 0..2, costs in [-10, 10], weights in [0.1, 10], probability or equal total
mass, reg in [0.01, 10]); runs are derandomised. Unbalanced OT is not expressible (balanced only).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays as st_arrays

import bistochastic as bs

ot = pytest.importorskip("ot")

F64 = torch.float64
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
FEW = settings(max_examples=10, deadline=None, derandomize=True)


@st.composite
def st_simple_matrix(draw):
    """GeomLoss ``st_simple_matrix`` (balanced cases only)."""
    N = draw(st.integers(1, 10))
    M = draw(st.integers(1, 10))
    batchsize = draw(st.integers(0, 2))
    B = max(1, batchsize)
    C = draw(st_arrays(np.float64, (B, N, M), elements=st.floats(-10, 10)))
    a = draw(st_arrays(np.float64, (B, N), elements=st.floats(0.1, 10)))
    b = draw(st_arrays(np.float64, (B, M), elements=st.floats(0.1, 10)))
    if draw(st.booleans()):
        mass = np.ones((B, 1))
    else:
        mass = draw(st_arrays(np.float64, (B, 1), elements=st.floats(0.1, 10)))
    a = mass * a / a.sum(1, keepdims=True)
    b = mass * b / b.sum(1, keepdims=True)
    reg = draw(st.floats(1e-2, 10.0))
    if batchsize == 0:
        C, a, b = C[0], a[0], b[0]
    return torch.tensor(C), torch.tensor(a), torch.tensor(b), reg


def _solve(C, a, b, reg, **kw):
    opts = dict(tol=1e-10, max_iter=100_000)
    opts.update(kw)
    return bs.sinkhorn(C, reg, a, b, **opts)


@FEW  # each example runs two solves to tolerance: fewer examples keep the suite fast
@given(ex=st_simple_matrix())
def test_symmetry(ex):
    """GeomLoss ``test_symmetry``: OT(a, b) = OT(b, a): transposed plans, swapped potentials,
    equal values (atol 1e-3, rtol 1e-3). GeomLoss's symmetric updates make this hold after any
    number of iterations; our alternating updates make it hold at convergence, so both solves run
    to tolerance."""
    C, a, b, reg = ex
    ab = _solve(C, a, b, reg, tol=1e-8)
    ba = _solve(C.transpose(-1, -2), b, a, reg, tol=1e-8)
    torch.testing.assert_close(ab.plan, ba.plan.transpose(-1, -2), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close((ab.plan * C).sum((-2, -1)),
                               (ba.plan * C.transpose(-1, -2)).sum((-2, -1)), atol=1e-3, rtol=1e-3)
    # potentials up to the constant of the balanced problem
    shift = (ab.f - ba.g).mean(-1, keepdim=True)
    torch.testing.assert_close(ab.f - shift, ba.g, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(ab.g + shift, ba.f, atol=1e-3, rtol=1e-3)


@SETTINGS
@given(ex=st_simple_matrix(), scaling=st.floats(0.01, 100.0), offset=st.floats(-100.0, 100.0))
def test_cost_linearity(ex, scaling, offset):
    """GeomLoss ``test_cost_linearity``: OT for ``scaling * C + offset`` at ``scaling * reg`` has
    the same plan and ``scaling *`` the value plus ``offset *`` the mass. GeomLoss disables the
    offset (its initialisation is not translation invariant); ours is (centred costs), so the
    offset is tested. Both solves run 100 fixed iterations, as upstream (atol 1e-2, rtol 5e-2)."""
    C, a, b, reg = ex
    normal = _solve(C, a, b, reg, n_iter=100)
    scaled = _solve(scaling * C + offset, a, b, scaling * reg, n_iter=100)
    torch.testing.assert_close(scaled.plan, normal.plan, atol=1e-2, rtol=5e-2)
    v0 = (normal.plan * C).sum((-2, -1))
    v1 = (scaled.plan * (scaling * C + offset)).sum((-2, -1))
    torch.testing.assert_close(v1, scaling * v0 + offset * a.sum(-1), atol=1e-2, rtol=5e-2)
    # both report the error of their own plan
    for r in (normal, scaled):
        err = bs.marginal_error(r.plan, a, b)
        torch.testing.assert_close(r.marginal_error, err, atol=1e-12, rtol=1e-9)


@SETTINGS
@given(batch=st.integers(0, 2), c=st.floats(-20, 20), mass=st.floats(0.1, 10),
       reg=st.floats(1e-3, 10))
def test_correct_values_diracs(batch, c, mass, reg):
    """GeomLoss ``st_diracs_matrix``: 1-by-1 problems: the plan is the mass, the value is C*mass."""
    shape = (batch,) if batch else ()
    C = torch.full(shape + (1, 1), c, dtype=F64)
    a = torch.full(shape + (1,), mass, dtype=F64)
    res = bs.sinkhorn(C, reg, a, a.clone())
    torch.testing.assert_close(res.plan, a[..., None], atol=1e-3, rtol=0)
    torch.testing.assert_close((res.plan * C).sum((-2, -1)), c * a[..., 0], atol=1e-3, rtol=1e-6)
    torch.testing.assert_close(res.f + res.g - C[..., 0, 0, None] if batch else
                               res.f + res.g - c, reg * torch.log(a), atol=1e-9, rtol=0)


@st.composite
def st_permutations(draw):
    """GeomLoss ``st_permutations_matrix``: costs in [threshold, 20] except a permutation with
    costs below ``threshold - gap`` (gap in [5, 10]); the plan is that permutation."""
    N = draw(st.integers(1, 10))
    batchsize = draw(st.integers(0, 2))
    B = max(1, batchsize)
    threshold = draw(st.floats(0.0, 10.0))
    gap = draw(st.floats(5, 10.0))
    C = draw(st_arrays(np.float64, (B, N, N), elements=st.floats(threshold, 20)))
    small = draw(st_arrays(np.float64, (B, N), elements=st.floats(-20, threshold - gap)))
    plan = np.zeros((B, N, N))
    for k in range(B):
        perm = np.array(draw(st.permutations(list(range(N)))))
        C[k, np.arange(N), perm] = small[k]
        plan[k, np.arange(N), perm] = 1
    if batchsize == 0:
        C, plan = C[0], plan[0]
    return torch.tensor(C), torch.tensor(plan)


@SETTINGS
@given(ex=st_permutations())
def test_correct_values_permutations(ex):
    """GeomLoss ``test_correct_values_permutations``: a = b = 1, reg 0.1, 100 iterations: the plan
    is the permutation within atol 5e-2, rtol 5e-2."""
    C, plan = ex
    ones = torch.ones(C.shape[:-1], dtype=F64)
    res = bs.sinkhorn(C, 0.1, ones, ones, max_iter=100, tol=1e-6)
    torch.testing.assert_close(res.plan, plan, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close((res.plan * C).sum((-2, -1)), (plan * C).sum((-2, -1)),
                               atol=5e-2, rtol=5e-2)


@SETTINGS
@given(N=st.integers(1, 10), seed=st.integers(0, 10_000), reg=st.floats(1e-3, 1.0))
def test_correct_values_random(N, seed, reg):
    """GeomLoss ``test_correct_values_random`` (ground truth: the unregularised LP, here POT's
    ``emd``): for probability weights the entropic plan's cost exceeds the LP optimum by at most
    ``reg * log(N * N)`` (since ``<C,P_ε> - ε H(P_ε) <= <C,P*> - ε H(P*)``)."""
    g = torch.Generator().manual_seed(seed)
    C = torch.rand(N, N, generator=g, dtype=F64)
    a = torch.rand(N, generator=g, dtype=F64) + 0.1
    b = torch.rand(N, generator=g, dtype=F64) + 0.1
    a, b = a / a.sum(), b / b.sum()
    res = bs.sinkhorn(C, reg, a, b, tol=1e-12, max_iter=200_000)
    lp = float(ot.emd2(a.numpy(), b.numpy(), C.numpy()))
    val = float((res.plan * C).sum())
    assert lp - 1e-9 <= val <= lp + reg * 2 * np.log(N) + 1e-9
