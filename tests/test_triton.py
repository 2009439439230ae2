"""The one-kernel tiny-batch Sinkhorn (`bistochastic._triton`) against the eager reference.

On the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py on
machines without CUDA before anything imports Triton): correctness never needs a GPU.
The same kernel compiled for CUDA is checked by the ``gpu`` tests in test_fused.py. No timing is
asserted.
"""

import pytest
import torch

import bistochastic as bs
from bistochastic import _fused, _triton

pytest.importorskip("triton")


pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(),
                       reason="the interpreter runs on CPU-only machines (GPU: test_fused)"),
    # the interpreter evaluates log(0) = -inf in the padding lanes with NumPy, which warns
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning"),
]


def _reference(Kc, la, lb, F0, G0, k):
    F, G = _fused._block_plain_impl(Kc, la, lb, F0, G0, k)
    return F, G, torch.exp(Kc + F[..., :, None] + G[..., None, :])


@pytest.mark.parametrize("shape", [(37, 4, 4), (5, 3, 7), (2, 3, 9, 2), (3, 32, 20), (1, 1, 1)])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-13), (torch.float32, 4e-6)])
def test_kernel_matches_plain_updates(shape, dtype, atol):
    # padding (sizes that are not powers of two, blocks that overhang the batch) must not leak
    # into the real entries; unequal marginals and warm-started potentials exercise every input
    g = torch.Generator().manual_seed(0)
    n, m = shape[-2], shape[-1]
    Kc = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    a = torch.rand(shape[:-1], generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(shape[:-2] + (m,), generator=g, dtype=torch.float64) + 0.1
    b = b * a.sum(-1, keepdim=True) / b.sum(-1, keepdim=True)
    la, lb = a.log().to(dtype), b.log().to(dtype)
    F0 = torch.randn(shape[:-1], generator=g, dtype=torch.float64).to(dtype)
    G0 = torch.randn(shape[:-2] + (m,), generator=g, dtype=torch.float64).to(dtype)
    F, G, P = _triton.tiny_solve(Kc, la, lb, F0, G0, 20)
    Fr, Gr, Pr = _reference(Kc, la, lb, F0, G0, 20)
    assert F.shape == Fr.shape and G.shape == Gr.shape and P.shape == Pr.shape
    assert F.dtype == dtype and P.dtype == dtype
    torch.testing.assert_close(F, Fr, rtol=0, atol=atol * 10)
    torch.testing.assert_close(G, Gr, rtol=0, atol=atol * 10)
    torch.testing.assert_close(P, Pr, rtol=0, atol=atol)
    assert torch.equal(F0, F0)  # inputs untouched (the kernel writes into copies)


def test_zero_sweeps_returns_the_start():
    Kc = torch.randn(6, 4, 4, dtype=torch.float64)
    z = torch.zeros(6, 4, dtype=torch.float64)
    F, G, P = _triton.tiny_solve(Kc, z, z, z, z, 0)
    assert torch.equal(F, z) and torch.equal(G, z)
    torch.testing.assert_close(P, Kc.exp(), rtol=1e-15, atol=0)


def test_project_dsm_dispatches_to_the_kernel(monkeypatch):
    # forced onto the fused path on the CPU, a fixed-sweep tiny batch runs the Triton kernel
    # (interpreted here) and the public result is unchanged: plan, error of that plan, n_iter
    monkeypatch.setenv("BISTOCHASTIC_FUSED", "cpu")
    monkeypatch.setattr(_fused, "_FAILED", False)
    calls = []
    real = _triton.tiny_solve
    monkeypatch.setattr(_triton, "tiny_solve", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 4, 4, generator=g, dtype=torch.float64)
    out = bs.project_dsm(logits, tau=0.5, n_iter=20, warn=False)
    monkeypatch.setenv("BISTOCHASTIC_FUSED", "0")
    ref = bs.project_dsm(logits, tau=0.5, n_iter=20, warn=False)
    assert calls == [1]
    torch.testing.assert_close(out.plan, ref.plan, rtol=0, atol=1e-12)
    ones = torch.ones(64, 4, dtype=torch.float64)
    assert torch.equal(out.marginal_error, bs.marginal_error(out.plan, ones, ones))
    assert bool((out.n_iter == 20).all()) and out.iterations == 20


@pytest.mark.parametrize("bad", [torch.zeros(4, 40, 4), torch.zeros(4, 4, 4, dtype=torch.int64),
                                 torch.zeros(4, 4, 4, dtype=torch.float16)])
def test_refuses_what_it_cannot_run(bad):
    assert not _triton.available(bad)
    z = torch.zeros(bad.shape[:-1])
    with pytest.raises(ValueError, match="`Kc`"):
        _triton.tiny_solve(bad, z, z, z, torch.zeros(bad.shape[:-2] + bad.shape[-1:]), 5)


def test_not_used_on_the_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _triton.available(torch.zeros(8, 4, 4))
