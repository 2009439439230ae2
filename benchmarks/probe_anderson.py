"""Anderson acceleration against adaptive over-relaxation in `bs.sinkhorn` (time to tolerance,
minimum of 5 after a warm-up): the crossover behind `momentum="auto"`'s threshold (float64, one
thread, tol 1e-6) and the float32 rows (one and two threads, tol 1e-5) quoted in
benchmarks/README.md. Not a test; run on a quiet machine:

    PYTHONPATH=lib .venv/bin/python benchmarks/probe_anderson.py
    PYTHONPATH=lib .venv/bin/python benchmarks/probe_anderson.py batched
    PYTHONPATH=lib .venv/bin/python benchmarks/probe_anderson.py float32

The second runs batches of matrices (float64, one thread, tol 1e-6, minimum of 3): the rule of
`"auto"` for batches (total entries, matrices wider than the memory of 12 iterates). The third
runs the float32 rows only (output `benchmarks/results/probe_anderson_float32.txt`, after the
scaling engine began to set subnormal kernel entries to zero).

Outputs: `benchmarks/results/probe_anderson.txt` (torch bookkeeping, threshold 512 x 512) and
`benchmarks/results/probe_anderson_numpy.txt` (NumPy bookkeeping on the CPU, threshold 128 x 128).
"""
import sys
import time

import torch

import bistochastic as bs
from bistochastic.bench import make_problem


def compare(C, a, b, eps, tol, reps):
    """Adaptive relaxation, then Anderson, on one problem: ``[(iterations, min ms), ...]``
    (minimum of ``reps`` runs after a warm-up)."""
    out = []
    for mom in ("adaptive", "anderson"):
        def solve():
            return bs.sinkhorn(C, eps, a, b, tol=tol, max_iter=100000, grad="none",
                               momentum=mom, warn=False)
        r = solve()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            r = solve()
            ts.append(time.perf_counter() - t)
        assert r.all_converged
        out.append((r.iterations, min(ts) * 1e3))
    return out


def row(n, eps, dtype, tol, threads):
    torch.set_num_threads(threads)
    C, a, b = make_problem(n, dtype, "cpu")
    (ia, ta), (iz, tz) = compare(C, a, b, eps, tol, reps=5)
    print(f"{str(dtype).split('.')[-1]:>8} {threads:>3} {n:>5} {eps:>6g} | adaptive {ia:>4} its "
          f"{ta:8.1f} ms | anderson {iz:>4} its {tz:8.1f} ms | anderson faster x{ta / tz:.2f}",
          flush=True)


def batched_row(B, n, eps):
    torch.set_num_threads(1)
    C, a, b = make_problem(n, torch.float64, "cpu")
    g = torch.Generator().manual_seed(0)
    Cb = C + 0.1 * torch.rand(B, n, n, generator=g, dtype=torch.float64)
    Cb = Cb / Cb.amax((-1, -2), keepdim=True)
    (ia, ta), (iz, tz) = compare(Cb, a, b, eps, 1e-6, reps=3)
    print(f"batch {B:>6} x {n:>3} x {n:<3} eps {eps:>5g} | adaptive {ia:>4} its {ta:8.1f} ms | "
          f"anderson {iz:>4} its {tz:8.1f} ms | anderson faster x{ta / tz:.2f}", flush=True)


if sys.argv[1:] == ["batched"]:
    # (at eps = 0.01 the 4x4 and 8x8 batches need tens of thousands of iterations with either
    # method: left out)
    for B, n in ((4096, 4), (16384, 8), (1024, 16), (256, 32), (16, 64), (64, 64), (8, 128),
                 (32, 128), (8, 256)):
        for eps in ((0.05,) if n <= 8 else (0.05, 0.01)):
            batched_row(B, n, eps)
    sys.exit()

print("   dtype thr     n    eps")
if sys.argv[1:] != ["float32"]:
    for n in (64, 96, 128, 181, 256, 362, 512, 724):
        for eps in (0.05, 0.01, 0.002):
            row(n, eps, torch.float64, 1e-6, 1)
for threads in (1, 2):
    for n in (512, 1024, 2048):
        for eps in (0.01, 0.002):
            row(n, eps, torch.float32, 1e-5, threads)
