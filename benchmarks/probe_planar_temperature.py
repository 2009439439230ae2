"""The planar loop for tiny batches (the mHC shape, fixed sweeps) at low temperature. Behind the
planar note in benchmarks/README.md. Not a test; run on a quiet machine:

    PYTHONPATH=lib .venv/bin/python benchmarks/probe_planar_temperature.py

`bs.project_dsm(logits, tau, n_iter=20)` without autograd on 65 536 matrices of 4 x 4 (float32,
N(0, 1) logits, one thread) at temperatures from 1 to 0.05: the planar loop as the engine runs it
(it absorbs the scalings when they leave [e^-τ, e^τ]), and the general engine
(`_PLANAR_MAX = 0`), interleaved, minimum of 5. Also whether the planar loop kept the batch, how
many kernels it built, and the largest marginal error after the 20 sweeps (the same both ways).
"""
import importlib
import math
import time

import torch

import bistochastic as bs

sk = importlib.import_module("bistochastic.sinkhorn")
torch.set_num_threads(1)
g = torch.Generator().manual_seed(1)
logits = torch.randn(65536, 4, 4, generator=g)
planar_max, real_planar, real_exp = sk._PLANAR_MAX, sk._planar_solve, sk._exp_kernel_
record = {}


def planar_spy(*args, **kw):
    record["builds"] = 0
    out = real_planar(*args, **kw)
    record["kept"] = out is not None
    return out


def exp_spy(Z):
    record["builds"] = record.get("builds", 0) + 1
    return real_exp(Z)


print("65536 x 4 x 4, float32, 20 sweeps, one thread (ms, minimum of 5, interleaved)")
for tau in (1.0, 0.3, 0.1, 0.05):
    best, errs = {}, {}
    for _ in range(5):
        for name, pmax in (("planar", planar_max), ("general engine", 0)):
            sk._PLANAR_MAX = pmax
            t0 = time.perf_counter()
            res = bs.project_dsm(logits, tau, n_iter=20, grad="none", warn=False)
            best[name] = min(best.get(name, math.inf), time.perf_counter() - t0)
            errs[name] = float(res.marginal_error.max())
    sk._PLANAR_MAX = planar_max
    sk._planar_solve, sk._exp_kernel_ = planar_spy, exp_spy
    bs.project_dsm(logits, tau, n_iter=20, grad="none", warn=False)
    sk._planar_solve, sk._exp_kernel_ = real_planar, real_exp
    print(f"tau {tau:4}: planar {best['planar'] * 1e3:6.1f} (kept the batch: {record['kept']}, "
          f"{record['builds']} kernels built), general engine {best['general engine'] * 1e3:6.1f};"
          f" largest error {errs['planar']:.2e} / {errs['general engine']:.2e}")
