"""Timing helpers shared by the benchmark script and the book: the peers run side by side.

Used by ``benchmarks/bench_sinkhorn.py`` (the full benchmark, recorded in ``benchmarks/README.md``)
and by chapter 2 (a small ci-profile run). Timings are medians of repeated runs after a warm-up;
"equal tolerance" means the same stopping criterion (:func:`bistochastic.marginal_error` <= tol,
checked every 10 iterations) for every method. POT's own criterion differs, so POT runs exactly the
number of iterations that its algorithm (identical to :func:`plain_log_sinkhorn`) needs to meet ours,
and its plan is re-checked.
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any, Callable, Dict, Tuple

import torch

from . import _triton
from .sinkhorn import marginal_error, project_dsm, sinkhorn

__all__ = ["autograd_saved_bytes", "textbook_sinkhorn_knopp", "pot_version", "sync", "timeit", "copy_bandwidth", "make_problem", "plain_log_sinkhorn", "bench_dense", "bench_tiny"]

def _pot():
    """POT, imported on first use (a test/benchmark dependency, and slow to import); None if absent."""
    try:
        import ot
        import ot.batch  # noqa: F401
    except ImportError:  # pragma: no cover
        return None
    return ot


def autograd_saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes that autograd saves for the backward pass while ``fn()`` runs (the memory a backward
    pass will need), counted with ``torch.autograd.graph.saved_tensors_hooks``."""
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return int(sum(total))


def textbook_sinkhorn_knopp(C: torch.Tensor, eps: float, a: torch.Tensor, b: torch.Tensor,
                            n_iter: int) -> torch.Tensor:
    """The scaling-domain iteration as textbooks write it, ``u = a/(Kv)``, ``v = b/(Kᵀu)`` on
    ``K = exp(-C/ε)``, with no stabilisation: the reference that shows why the log domain is needed
    (it underflows and returns NaN at small ε). Shapes: ``C (n, m)``, ``a (n,)``, ``b (m,)``."""
    K = torch.exp(-C / eps)
    u, v = torch.ones_like(a), torch.ones_like(b)
    for _ in range(n_iter):
        u = a / (K @ v)
        v = b / (K.T @ u)
    return u[:, None] * K * v[None, :]


def pot_version() -> str:
    """POT's version string, or "absent"."""
    ot = _pot()
    return getattr(ot, "__version__", "absent")


def sync(dev: torch.device) -> None:
    """Wait for the device (no-op on the CPU)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timeit(fn: Callable[[], Any], dev: torch.device, reps: int,
           stat: str = "median") -> Tuple[float, Any]:
    """Median (or ``stat="min"``: minimum) wall time of ``reps`` calls after one warm-up call;
    returns (seconds, last output)."""
    out = fn()  # warm-up (and the result we check)
    sync(dev)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        sync(dev)
        ts.append(time.perf_counter() - t0)
    return (min(ts) if stat == "min" else statistics.median(ts)), out


def copy_bandwidth(dev: torch.device, dtype: torch.dtype, mbytes: int = 256, reps: int = 5) -> float:
    """Measured device copy bandwidth in bytes/s (read + write counted; the fastest of ``reps``
    copies, so that the floor derived from it is a floor)."""
    n = mbytes * 2**20 // torch.finfo(dtype).bits * 8
    x = torch.ones(n, dtype=dtype, device=dev)
    y = torch.empty_like(x)
    t, _ = timeit(lambda: y.copy_(x), dev, reps, stat="min")
    return 2 * x.numel() * x.element_size() / t


def make_problem(n: int, dtype, dev, seed: int = 0):
    """n points uniform in the unit square, squared-Euclidean cost scaled to max 1, uniform marginals.

    Returns ``C (n, n)``, ``a (n,)``, ``b (n,)`` on ``dev`` in ``dtype`` (drawn on the CPU in fp64).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g, dtype=torch.float64)
    y = torch.rand(n, 2, generator=g, dtype=torch.float64)
    C = torch.cdist(x, y) ** 2
    C = (C / C.max()).to(dtype=dtype, device=dev)
    a = torch.full((n,), 1.0 / n, dtype=dtype, device=dev)
    return C, a, a.clone()


def plain_log_sinkhorn(C, a, b, eps, tol, max_iter, check_every=10):
    """Plain eager log-domain Sinkhorn (POT's `sinkhorn_log` order: columns, then rows)."""
    Kc = -C / eps
    loga, logb = a.log(), b.log()
    F = torch.zeros_like(a)
    G = torch.zeros_like(b)
    it = 0
    while it < max_iter:
        G = logb - torch.logsumexp(Kc + F[:, None], dim=0)
        F = loga - torch.logsumexp(Kc + G[None, :], dim=1)
        it += 1
        if it % check_every == 0:
            P = torch.exp(Kc + F[:, None] + G[None, :])
            if float(marginal_error(P, a, b)) <= tol:
                break
    return torch.exp(Kc + F[:, None] + G[None, :]), it


def bench_dense(n, eps, tol, dtype, dev, reps, bw, max_iter=100000) -> Dict[str, Any]:
    """Time to tolerance of bistochastic, the plain eager loop and POT on one dense problem.

    ``bw`` is the copy bandwidth (bytes/s) for the floor ``2 n^2 s / bw`` per iteration.
    """
    C, a, b = make_problem(n, dtype, dev)
    s = C.element_size()
    floor = 2 * n * n * s / bw  # seconds per iteration: stream the matrix twice
    row = {"n": n, "eps": eps, "tol": tol, "dtype": str(dtype).split(".")[-1], "floor_ms_per_it": floor * 1e3}

    # ours
    def ours():
        return sinkhorn(C, eps, a, b, tol=tol, max_iter=max_iter, grad="none", warn=False)

    t, res = timeit(ours, dev, reps)
    assert bool(res.converged), "bistochastic did not reach the tolerance"
    row.update(ours_s=t, ours_its=res.iterations, ours_ms_per_it=t / res.iterations * 1e3,
               ours_err=float(res.marginal_error))

    # plain eager loop
    t, (P, its) = timeit(lambda: plain_log_sinkhorn(C, a, b, eps, tol, max_iter), dev, reps)
    err = float(marginal_error(P, a, b))
    assert err <= tol
    row.update(plain_s=t, plain_its=its, plain_ms_per_it=t / its * 1e3, plain_err=err)

    # POT sinkhorn_log, torch backend, exactly the iterations its algorithm needs
    ot = _pot()
    if ot is not None:
        def pot():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return ot.sinkhorn(a, b, C, eps, method="sinkhorn_log", numItermax=its, stopThr=0.0)

        t, P = timeit(pot, dev, reps)
        err = float(marginal_error(P, a, b))
        row.update(pot_s=t, pot_its=its, pot_ms_per_it=t / its * 1e3, pot_err=err)
        row["pot_over_ours"] = row["pot_s"] / row["ours_s"]
    row["plain_over_ours"] = row["plain_s"] / row["ours_s"]
    row["ours_over_floor_per_it"] = row["ours_ms_per_it"] / row["floor_ms_per_it"]
    row["plain_over_floor_per_it"] = row["plain_ms_per_it"] / row["floor_ms_per_it"]
    return row


def bench_tiny(B, n, iters, dtype, dev, reps, bw, tau=1.0, compiled=False) -> Dict[str, Any]:
    """B batched n x n projections with a fixed iteration count (the mHC shape), all methods;
    minimum of ``reps`` runs after a warm-up each.

    Two floors: ``floor_ms`` streams the batch in and out once per half-iteration (what any
    kernel-per-pass loop must move, ``4 * iters`` passes), ``single_pass_floor_ms`` reads the
    logits once and writes the plan once (a kernel that keeps each matrix in registers for all
    ``iters`` sweeps). ``compiled=True`` adds ``torch.compile`` of the plain loop."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(B, n, n, generator=g, dtype=torch.float64).to(dtype=dtype, device=dev)
    s = logits.element_size()
    floor = iters * 2 * 2 * B * n * n * s / bw  # per iteration two passes, each reading and writing
    row = {"B": B, "n": n, "iters": iters, "dtype": str(dtype).split(".")[-1], "floor_ms": floor * 1e3,
           "single_pass_floor_ms": 2 * B * n * n * s / bw * 1e3}

    t, r_log = timeit(lambda: project_dsm(logits, tau=tau, n_iter=iters, engine="log"), dev,
                      reps, stat="min")
    row["ours_log_ms"] = t * 1e3
    t, r_abs = timeit(lambda: project_dsm(logits, tau=tau, n_iter=iters, engine="absorb"),
                      dev, reps, stat="min")
    row["ours_absorb_ms"] = t * 1e3
    row["max_row_err_ours"] = float(r_log.marginal_error.max())

    def plain():
        L = logits / tau
        for _ in range(iters):
            L = L - torch.logsumexp(L, dim=-1, keepdim=True)
            L = L - torch.logsumexp(L, dim=-2, keepdim=True)
        return L.exp()

    t, P = timeit(plain, dev, reps, stat="min")
    row["plain_ms"] = t * 1e3
    assert torch.allclose(P, r_log.plan, atol=1e-5), "plain loop and bistochastic disagree"
    if _triton.available(logits) and dev.type == "cuda":
        # the one-kernel path alone (what project_dsm adds on top: validation, centring, the
        # potentials in cost units and the error of the returned plan, a few small kernels each)
        zn = torch.zeros(B, n, dtype=dtype, device=dev)
        Kc = logits / tau
        t, (_, _, Pk) = timeit(lambda: _triton.tiny_solve(Kc, zn, zn, zn, zn, iters),
                               dev, reps, stat="min")
        row["kernel_ms"] = t * 1e3
        row["kernel_over_single_pass"] = row["kernel_ms"] / row["single_pass_floor_ms"]
        assert torch.allclose(Pk, r_log.plan, atol=1e-5), "Triton kernel and bistochastic disagree"
    if compiled:
        plain_c = torch.compile(plain)
        t, Pc = timeit(plain_c, dev, reps, stat="min")
        row["compile_ms"] = t * 1e3
        assert torch.allclose(Pc, r_log.plan, atol=1e-5), "compiled loop and bistochastic disagree"
    assert torch.allclose(r_abs.plan, r_log.plan, atol=1e-4), "engines disagree"
    ot = _pot()
    if ot is not None:
        ones = torch.ones(B, n, dtype=dtype, device=dev)

        def pot():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return ot.batch.solve_batch(-logits, tau, ones, ones, max_iter=iters, tol=0.0,
                                            method="log_sinkhorn", grad="detach").plan

        t, Pp = timeit(pot, dev, reps, stat="min")
        row["pot_batch_ms"] = t * 1e3
    best = min(row["ours_log_ms"], row["ours_absorb_ms"])
    row["plain_over_ours"] = row["plain_ms"] / best
    if "pot_batch_ms" in row:
        row["pot_over_ours"] = row["pot_batch_ms"] / best
    row["ours_over_floor"] = best / row["floor_ms"]
    row["ours_over_single_pass"] = best / row["single_pass_floor_ms"]
    if "compile_ms" in row:
        row["compile_over_single_pass"] = row["compile_ms"] / row["single_pass_floor_ms"]
    return row
