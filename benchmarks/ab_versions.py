"""Two versions of the library side by side in one process: `bs.sinkhorn` to tol 1e-6 with the
default momentum, on single matrices and batches, timed interleaved (minimum of several runs).
For changes whose gain is smaller than the run-to-run noise of separate processes on a shared
machine. Not a test; run on a quiet machine, the older version checked out in a worktree:

    git worktree add /tmp/old <commit>
    PYTHONPATH=lib .venv/bin/python benchmarks/ab_versions.py /tmp/old/lib --threads 1

The older package is loaded under another name (`bistochastic_old`) from its own files. Prints,
per problem, both iteration counts and times and the ratio new / old; n = 64 runs adaptive
relaxation in both (below Anderson's threshold), so its ratio shows the noise of the run.
"""
import argparse
import importlib.util
import os
import sys
import time

import torch

import bistochastic as new
from bistochastic.bench import make_problem

parser = argparse.ArgumentParser()
parser.add_argument("old_lib", help="the lib/ folder of the older checkout")
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
parser.add_argument("--sizes", type=int, nargs="*", default=[64, 128, 256, 512, 1024])
parser.add_argument("--batches", default="1024x16,64x64,8x256",
                    help="batches as BxN, comma-separated ('' for none)")
parser.add_argument("--eps", type=float, nargs="*", default=[0.05, 0.01])
args = parser.parse_args()

root = os.path.join(os.path.abspath(args.old_lib), "bistochastic")
spec = importlib.util.spec_from_file_location("bistochastic_old", os.path.join(root, "__init__.py"),
                                              submodule_search_locations=[root])
old = importlib.util.module_from_spec(spec)
sys.modules["bistochastic_old"] = old
spec.loader.exec_module(old)
torch.set_num_threads(args.threads)
dtype = getattr(torch, args.dtype)


def compare(label, C, a, b, eps, reps):
    kw = dict(tol=1e-6, max_iter=20000, warn=False)
    best, its = {}, {}
    for mod in (old, new):
        mod.sinkhorn(C, eps, a, b, **kw)
    for _ in range(reps):
        for name, mod in (("old", old), ("new", new)):
            t0 = time.perf_counter()
            res = mod.sinkhorn(C, eps, a, b, **kw)
            best[name] = min(best.get(name, 1e9), time.perf_counter() - t0)
            its[name] = res.iterations
    print(f"{label:22s} eps {eps:<5} its {its['old']:5d} / {its['new']:5d}   old "
          f"{best['old'] * 1e3:8.2f} ms   new {best['new'] * 1e3:8.2f} ms   new / old "
          f"{best['new'] / best['old']:.3f}", flush=True)


print(f"{args.dtype}, {args.threads} thread(s), tol 1e-6, default momentum, minimum of 7-15, "
      f"interleaved; old = {args.old_lib}")
for n in args.sizes:
    C, a, b = make_problem(n, dtype, "cpu")
    for eps in args.eps:
        compare(f"n = {n}", C, a, b, eps, 15 if n <= 512 else 7)
g = torch.Generator().manual_seed(0)
for spec_ in filter(None, args.batches.split(",")):
    B, n = (int(s) for s in spec_.split("x"))
    x = torch.rand(B, n, 2, generator=g, dtype=dtype)
    y = torch.rand(B, n, 2, generator=g, dtype=dtype)
    C = torch.cdist(x, y) ** 2
    for eps in args.eps:
        compare(f"batch {B} x {n} x {n}", C, None, None, eps, 7)
