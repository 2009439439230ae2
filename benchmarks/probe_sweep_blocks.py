"""Time `bs.sinkhorn` (scaling engine) with several block sizes of the one-pass sweep, at one and
two threads, interleaved in one process (minimum of 3). Block 0 = two full matrix-vector
products. This measurement made the blocked sweep one-thread only (benchmarks/README.md,
"the quiet re-run"); since then the engine ignores the block size on more than one thread, so the
two-thread rows of a re-run all show the unblocked path.

    PYTHONPATH=lib .venv/bin/python benchmarks/probe_sweep_blocks.py
"""
import importlib
import time

import torch

import bistochastic as bs

sk = importlib.import_module("bistochastic.sinkhorn")
torch.manual_seed(0)
for n in (1024, 4096):
    x = torch.rand(n, 2, dtype=torch.float64)
    y = torch.rand(n, 2, dtype=torch.float64)
    C = torch.cdist(x, y) ** 2
    C = C / C.max()
    a = torch.full((n,), 1.0 / n, dtype=torch.float64)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        best = {}
        for _ in range(3):
            for block in (0, 256 * 1024, 512 * 1024, 1024 * 1024, 2048 * 1024):
                sk._SWEEP_BLOCK_BYTES = block
                t0 = time.perf_counter()
                r = bs.sinkhorn(C, 0.01, a, a, tol=1e-6)
                best[block] = min(best.get(block, 1e9), time.perf_counter() - t0)
        ms = {f"{k // 1024} KiB": round(v * 1e3, 1) for k, v in best.items()}
        print(f"n={n} threads={threads} iterations={int(r.n_iter)} ms: {ms}", flush=True)
