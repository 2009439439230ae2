"""Anderson acceleration against adaptive over-relaxation in `bs.sinkhorn` (time to tolerance,
minimum of 5 after a warm-up): the crossover behind `momentum="auto"`'s threshold (float64, one
thread, tol 1e-6) and the float32 rows (one and two threads, tol 1e-5) quoted in
benchmarks/README.md. Not a test; run on a quiet machine:

    PYTHONPATH=lib .venv/bin/python benchmarks/probe_anderson.py

Outputs: `benchmarks/results/probe_anderson.txt` (torch bookkeeping, threshold 512 x 512) and
`benchmarks/results/probe_anderson_numpy.txt` (NumPy bookkeeping on the CPU, threshold 128 x 128).
"""
import time

import torch

import bistochastic as bs
from bistochastic.bench import make_problem


def row(n, eps, dtype, tol, threads):
    torch.set_num_threads(threads)
    C, a, b = make_problem(n, dtype, "cpu")
    out = []
    for mom in ("adaptive", "anderson"):
        def solve():
            return bs.sinkhorn(C, eps, a, b, tol=tol, max_iter=100000, grad="none",
                               momentum=mom, warn=False)
        r = solve()
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            r = solve()
            ts.append(time.perf_counter() - t)
        assert bool(r.converged)
        out.append((r.iterations, min(ts) * 1e3))
    (ia, ta), (iz, tz) = out
    print(f"{str(dtype).split('.')[-1]:>8} {threads:>3} {n:>5} {eps:>6g} | adaptive {ia:>4} its "
          f"{ta:8.1f} ms | anderson {iz:>4} its {tz:8.1f} ms | anderson faster x{ta / tz:.2f}",
          flush=True)


print("   dtype thr     n    eps")
for n in (64, 96, 128, 181, 256, 362, 512, 724):
    for eps in (0.05, 0.01, 0.002):
        row(n, eps, torch.float64, 1e-6, 1)
for threads in (1, 2):
    for n in (512, 1024, 2048):
        for eps in (0.01, 0.002):
            row(n, eps, torch.float32, 1e-5, threads)
