"""Two versions of the library side by side in one process: `bs.sinkhorn` to tol 1e-6 with the
default momentum, on single matrices and batches, timed interleaved (minimum of several runs).
For changes whose gain is smaller than the run-to-run noise of separate processes on a shared
machine. Not a test; run on a quiet machine, the older version checked out in a worktree:

    git worktree add /tmp/old <commit>
    PYTHONPATH=lib .venv/bin/python benchmarks/ab_versions.py /tmp/old/lib --threads 1

The older package is loaded under another name (`bistochastic_old`) from its own files. Prints,
per problem, both iteration counts and times and the ratio new / old; n = 64 runs adaptive
relaxation in both (below Anderson's threshold), so its ratio shows the noise of the run. With
`--tiny`: batches of tiny matrices instead; with `--iterations`: the iteration counts of 192
problems, old against new.
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
parser.add_argument("--tiny", action="store_true",
                    help="instead: batches of tiny matrices (2x2 to 16x16, float32, 20 sweeps, "
                         "tau 1, no autograd: the planar loop), minimum of 15")
parser.add_argument("--iterations", action="store_true",
                    help="instead: iteration counts of 192 problems (float32 and float64, "
                         "n = 128 to 512, eps 0.05 to 0.001, three seeds, uniform and random "
                         "marginals), the ones that differ printed")
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


if args.tiny:
    print(f"tiny batches, float32, 20 sweeps, tau 1, {args.threads} thread(s), minimum of 15, "
          f"interleaved; old = {args.old_lib}")
    g = torch.Generator().manual_seed(1)
    for n, B in ((2, 262144), (4, 65536), (8, 16384), (16, 4096)):
        L = torch.randn(B, n, n, generator=g)
        best = {}
        for mod in (old, new):
            mod.project_dsm(L, 1.0, n_iter=20, grad="none")
        for _ in range(15):
            for name, mod in (("old", old), ("new", new)):
                t0 = time.perf_counter()
                mod.project_dsm(L, 1.0, n_iter=20, grad="none")
                best[name] = min(best.get(name, 1e9), time.perf_counter() - t0)
        print(f"{B} x {n} x {n}: old {best['old'] * 1e3:7.1f} ms   new {best['new'] * 1e3:7.1f} ms"
              f"   new / old {best['new'] / best['old']:.3f}", flush=True)
    sys.exit()
if args.iterations:
    print(f"iteration counts, tol 1e-6 (float64) or 1e-5 (float32); old = {args.old_lib}")
    total, differ = 0, []
    for dt in (torch.float64, torch.float32):
        for n, m in ((128, 128), (200, 150), (300, 300), (512, 400)):
            for eps in (0.05, 0.01, 0.002, 0.001):
                for seed in range(3):
                    for uniform in (True, False):
                        g = torch.Generator().manual_seed(seed)
                        x = torch.rand(n, 2, generator=g, dtype=dt)
                        y = torch.rand(m, 2, generator=g, dtype=dt)
                        C = torch.cdist(x, y) ** 2
                        C = C / C.max()
                        a = torch.full((n,), 1.0 / n, dtype=dt)
                        b = torch.full((m,), 1.0 / m, dtype=dt)
                        if not uniform:
                            a = torch.rand(n, generator=g, dtype=dt) + 0.1
                            b = torch.rand(m, generator=g, dtype=dt) + 0.1
                            a, b = a / a.sum(), b / b.sum()
                        kw = dict(tol=1e-6 if dt == torch.float64 else 1e-5, max_iter=20000,
                                  warn=False)
                        r0, r1 = old.sinkhorn(C, eps, a, b, **kw), new.sinkhorn(C, eps, a, b, **kw)
                        total += 1
                        if (r0.iterations, bool(r0.converged)) != (r1.iterations,
                                                                    bool(r1.converged)):
                            differ.append(f"{str(dt)[6:]} {n}x{m} eps {eps} seed {seed} "
                                          f"uniform {uniform}: {r0.iterations} -> "
                                          f"{r1.iterations} iterations, converged "
                                          f"{bool(r0.converged)} -> {bool(r1.converged)}")
    print(f"{total} problems, {len(differ)} with other counts")
    print("\n".join(differ))
    sys.exit()
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
