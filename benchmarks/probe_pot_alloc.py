"""POT `sinkhorn_log` per-iteration time at n = 1024 (float64, one thread, 120 iterations, four
runs) next to a bare `logsumexp` pass. Run it plainly and with glibc forced to serve large
temporaries by mmap, to see the allocator effect described in benchmarks/README.md:

    PYTHONPATH=lib .venv/bin/python benchmarks/probe_pot_alloc.py
    MALLOC_MMAP_THRESHOLD_=131072 PYTHONPATH=lib .venv/bin/python benchmarks/probe_pot_alloc.py
"""
import time
import warnings

import ot
import torch

from bistochastic.bench import make_problem

torch.set_num_threads(1)
C, a, b = make_problem(1024, torch.float64, "cpu")
for _ in range(4):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        ot.sinkhorn(a, b, C, 0.01, method="sinkhorn_log", numItermax=120, stopThr=0.0)
        pot = (time.perf_counter() - t0) / 120
    t0 = time.perf_counter()
    for _ in range(120):
        torch.logsumexp(C, 1)
    lse = (time.perf_counter() - t0) / 120
    print(f"POT {pot * 1e3:.2f} ms/it   logsumexp {lse * 1e3:.2f} ms", flush=True)
