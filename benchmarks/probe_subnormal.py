"""Subnormal kernel entries in float32 on the CPU: what they cost and what setting them to zero
(the scaling engine's `_exp_kernel_`) saves. Behind the float32 note in benchmarks/README.md.
Not a test; run on a quiet machine:

    PYTHONPATH=lib .venv/bin/python benchmarks/probe_subnormal.py

First one matrix-vector product with the kernel exp(-(C - r)/eps) (n = 1024, float32, one thread,
minimum of 5 x 20), as built and with its subnormal entries set to zero; then `bs.sinkhorn`
(default momentum, tol 1e-5) with the engine's kernel and with a plain `exp`, interleaved,
minimum of 5.
"""
import importlib
import time

import torch

import bistochastic as bs
from bistochastic.bench import make_problem

sk = importlib.import_module("bistochastic.sinkhorn")
torch.set_num_threads(1)
tiny = torch.finfo(torch.float32).tiny


def product_ms(M, v):
    best = 1e9
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(20):
            torch.mv(M, v)
        best = min(best, (time.perf_counter() - t0) / 20)
    return best * 1e3


C, a, b = make_problem(1024, torch.float32, "cpu")
v = torch.rand(1024) + 0.5
for eps in (0.01, 0.002):
    E = torch.exp(-(C - C.amin(-1, keepdim=True)) / eps)
    share = float(((E > 0) & (E < tiny)).float().mean())
    F = torch.where(E < tiny, torch.zeros_like(E), E)
    print(f"n = 1024, eps = {eps}: {share:.1%} of the kernel's entries subnormal; one product "
          f"{product_ms(E, v):.3f} ms as built, {product_ms(F, v):.3f} ms with them set to zero")

engine = sk._exp_kernel_
for n, eps in ((512, 0.01), (1024, 0.01), (1024, 0.002)):
    C, a, b = make_problem(n, torch.float32, "cpu")
    best = {}
    for _ in range(5):
        for name, fn in (("engine's kernel", engine), ("plain exp", lambda Z: Z.exp_())):
            sk._exp_kernel_ = fn
            t0 = time.perf_counter()
            r = bs.sinkhorn(C, eps, a, b, tol=1e-5, max_iter=100000, grad="none", warn=False)
            best[name] = min(best.get(name, 1e9), time.perf_counter() - t0)
    sk._exp_kernel_ = engine
    print(f"bs.sinkhorn n = {n}, eps = {eps}, {r.iterations} iterations: "
          + ", ".join(f"{k} {t * 1e3:.1f} ms" for k, t in best.items()))
