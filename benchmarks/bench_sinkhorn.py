#!/usr/bin/env python
"""Side-by-side benchmark of `bistochastic.sinkhorn` against POT and a plain eager PyTorch loop.

Not a test: it prints timings and ratios measured in one process, at equal tolerance, next to a
memory-bandwidth floor. Results and the command that produced them go in benchmarks/README.md.

Dense problems: n points uniform in the unit square, squared-Euclidean cost scaled to max 1,
uniform marginals, eps = 0.01 (and 0.002 where asked). "Equal tolerance" means the same stopping
criterion for all three: the relative L1 marginal error of `bs.marginal_error` <= tol, checked every
10 iterations. POT's own test (L2 column error) differs, so POT is run for exactly the number of
iterations that its algorithm (alternating LSE, columns first, identical to the plain loop below)
needs to meet our criterion, and its returned plan is re-checked.

Batched tiny problems (the mHC shape): B matrices of 4x4, 20 iterations, no convergence test.

Usage:
    python benchmarks/bench_sinkhorn.py                     # CPU defaults, n in {256, 1024, 4096}
    python benchmarks/bench_sinkhorn.py --device cuda --dtype float32
    python benchmarks/bench_sinkhorn.py --sizes 256 --reps 1 --json out.json
    python benchmarks/bench_sinkhorn.py --sizes 1024 4096 --eps 0.01 0.002 --raw \
        --threads-list 1 2 --tiny-batch 0                 # dense: per-iteration limit, threads
    python benchmarks/bench_sinkhorn.py --sizes --tiny-sizes 2 4 8 16 --tiny-grad  # tiny batch
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import torch

from bistochastic import marginal_error, project_dsm, sinkhorn
from bistochastic.bench import (_pot, autograd_saved_bytes, bench_dense, bench_tiny,
                                copy_bandwidth, make_problem, pot_version, sync, timeit)


def raw_sk(K, a, b, iters):
    """``iters`` raw scaling-domain Sinkhorn-Knopp iterations (two GEMVs with a precomputed
    kernel, ``u = a / K v``, ``v = b / Kᵀ u``): the practical per-iteration limit of any dense
    solver."""
    u, v = torch.ones_like(a), torch.ones_like(b)
    for _ in range(iters):
        u = a / torch.mv(K, v)
        v = b / torch.mv(K.t(), u)
    return v


def sk_count_its(K, a, b, tol, max_iter=100000, check_every=10):
    """Iterations that POT's ``sinkhorn_log`` needs to reach ``tol`` (our criterion, checked every
    ``check_every``), counted with the scaling-domain form of the same iteration (columns first,
    then rows: ``v = b / Kᵀu``, ``u = a / K v``), whose iterates equal POT's log-domain iterates
    in exact arithmetic; two GEMVs per iteration instead of two log-sum-exp passes."""
    u = torch.ones_like(a)
    it = 0
    while it < max_iter:
        v = b / torch.mv(K.t(), u)
        u = a / torch.mv(K, v)
        it += 1
        if it % check_every == 0:
            P = u[:, None] * K * v[None, :]
            if float(marginal_error(P, a, b)) <= tol:
                return it
    return it


def dense_interleaved(n, eps, tol, dtype, dev, reps, threads_list, pot_sample_its,
                      momenta=(None,)):
    """Time to tolerance of ours (once per entry of ``momenta``; ``None``: the default), the raw
    two-GEMV Sinkhorn-Knopp iteration and POT ``sinkhorn_log``, runs interleaved (for each
    repetition: every thread count, ours, raw, POT), minimum over ``reps`` after one warm-up;
    returns one row per thread count and momentum."""
    ot = _pot()
    C, a, b = make_problem(n, dtype, dev)
    K = torch.exp(-C / eps)
    pot_its = sk_count_its(K, a, b, tol)
    pot_k = pot_its if not pot_sample_its else min(pot_its, pot_sample_its)
    raw_k = 20

    def ours(mom):
        kw = {} if mom is None else {"momentum": mom}
        return lambda: sinkhorn(C, eps, a, b, tol=tol, max_iter=100000, grad="none", warn=False,
                                **kw)

    def raw():
        return raw_sk(K, a, b, raw_k)

    def pot():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ot.sinkhorn(a, b, C, eps, method="sinkhorn_log", numItermax=pot_k, stopThr=0.0)

    def t(fn):
        t0 = time.perf_counter()
        out = fn()
        sync(dev)
        return time.perf_counter() - t0, out

    times = {}
    res = {}
    for rep in range(reps + 1):  # the first round is the warm-up
        for th in threads_list:
            torch.set_num_threads(th)
            for name, fn in ([(("ours", m), ours(m)) for m in momenta]
                             + [("raw", raw), ("pot", pot)]):
                if name == "pot" and ot is None:
                    continue
                dt, out = t(fn)
                if rep == 0:
                    res[(th, name)] = out
                    continue
                times.setdefault((th, name), []).append(dt)
    rows = []
    for th, mom in [(th, mom) for th in threads_list for mom in momenta]:
        r = res[(th, ("ours", mom))]
        assert bool(r.converged), "bistochastic did not reach the tolerance"
        to = times[(th, ("ours", mom))]
        tr = [x / raw_k for x in times[(th, "raw")]]
        row = {"n": n, "eps": eps, "tol": tol, "dtype": str(dtype).split(".")[-1], "threads": th,
               "momentum": mom or "default", "ours_its": r.iterations, "ours_s": min(to), "ours_spread": max(to) / min(to),
               "ours_err": float(r.marginal_error), "raw_ms_per_it": min(tr) * 1e3,
               "raw_spread": max(tr) / min(tr)}
        row["ours_ms_per_it"] = row["ours_s"] / r.iterations * 1e3
        row["ours_over_raw_per_it"] = row["ours_ms_per_it"] / row["raw_ms_per_it"]
        if ot is not None:
            tp = times[(th, "pot")]
            row.update(pot_its=pot_its, pot_timed_its=pot_k, pot_ms_per_it=min(tp) / pot_k * 1e3,
                       pot_spread=max(tp) / min(tp))
            row["pot_s"] = row["pot_ms_per_it"] * pot_its / 1e3
            if pot_k == pot_its:
                row["pot_err"] = float(marginal_error(res[(th, "pot")], a, b))
            row["pot_over_ours"] = row["pot_s"] / row["ours_s"]
        rows.append(row)
    return rows


def bench_tiny_grad(B, n, iters, dtype, dev, reps, tau=1.0):
    """Forward+backward of B batched n x n projections, 20 sweeps: autograd through the plain
    eager log-domain loop (what mHC code does), ours unrolled, ours implicit; time and the bytes
    autograd saves for the backward (its memory)."""
    g = torch.Generator().manual_seed(2)
    logits0 = torch.randn(B, n, n, generator=g, dtype=torch.float64).to(dtype=dtype, device=dev)
    W = torch.randn(B, n, n, generator=g, dtype=torch.float64).to(dtype=dtype, device=dev)

    def eager(lg):
        L = lg / tau
        for _ in range(iters):
            L = L - torch.logsumexp(L, dim=-1, keepdim=True)
            L = L - torch.logsumexp(L, dim=-2, keepdim=True)
        return L.exp()

    fns = {
        "eager_loop": eager,
        "unroll": lambda lg: project_dsm(lg, tau=tau, n_iter=iters, grad="unroll").plan,
        "implicit": lambda lg: project_dsm(lg, tau=tau, n_iter=iters, grad="implicit").plan,
    }
    row = {"B": B, "n": n, "iters": iters, "dtype": str(dtype).split(".")[-1], "kind": "tiny_grad"}
    for name, fn in fns.items():
        def step():
            lg = logits0.clone().requires_grad_()
            (fn(lg) * W).sum().backward()
            return lg.grad

        t, _ = timeit(step, dev, reps)
        lg = logits0.clone().requires_grad_()
        row[name + "_ms"] = t * 1e3
        row[name + "_saved_MB"] = autograd_saved_bytes(lambda: fn(lg)) / 2**20
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--sizes", type=int, nargs="*", default=[256, 1024, 4096])
    ap.add_argument("--eps", type=float, nargs="*", default=[0.01])
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tiny-batch", type=int, default=65536)
    ap.add_argument("--tiny-dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--tiny-sizes", type=int, nargs="*", default=[4],
                    help="matrix sizes n of the batched-tiny part (B*n*n kept at 65536*16)")
    ap.add_argument("--tiny-grad", action="store_true",
                    help="also time forward+backward (unroll, implicit, eager-loop autograd) and "
                         "the bytes saved for the backward, 20 sweeps")
    ap.add_argument("--tiny-compile", action="store_true",
                    help="also time torch.compile of the plain tiny loop")
    ap.add_argument("--raw", action="store_true",
                    help="dense: ours, a raw scaling-domain Sinkhorn-Knopp iteration (two GEMVs "
                         "with a precomputed kernel) and POT, interleaved in one process, minimum "
                         "of --reps; ours per iteration against raw, time to tol against POT")
    ap.add_argument("--threads-list", type=int, nargs="*", default=None,
                    help="dense: repeat the dense rows at each of these thread counts (with "
                         "--raw: interleaved in each repetition)")
    ap.add_argument("--momentum", nargs="*", default=None,
                    help="with --raw: time ours once per momentum given (default, adaptive, "
                         "anderson, a float), interleaved; default: the solver's default only")
    ap.add_argument("--pot-sample-its", type=int, default=0,
                    help="with --raw: time POT on this many iterations and scale to the "
                         "iteration count it needs (measured); 0 = the full run")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    bw = copy_bandwidth(dev, dtype)
    print(f"# torch {torch.__version__}, POT {pot_version()}, device {dev}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"# measured copy bandwidth: {bw / 1e9:.1f} GB/s (read+write)")
    rows = []
    if args.sizes:
        print("\n## Dense problems: time to tolerance (relative L1 marginal error <= %g)" % args.tol)
    hdr = (f"{'n':>5} {'eps':>6} | {'floor ms/it':>11} | {'ours its':>8} {'ms/it':>7} {'s':>7} | "
           f"{'plain its':>9} {'ms/it':>7} {'s':>7} | {'POT its':>7} {'ms/it':>7} {'s':>7} | "
           f"{'POT/ours':>8} {'plain/ours':>10} {'ours/floor':>10}")
    if args.sizes and not args.raw:
        print(hdr)
    default_threads = torch.get_num_threads()
    if args.raw:
        # interleaved: ours, raw SK, POT at each thread count in turn, minimum of --reps
        print(f"# load average {os.getloadavg()[0]:.2f} at start; runs interleaved, minimum of "
              f"{args.reps} (spread = max/min); POT's iteration count measured with the "
              "scaling form of its iteration"
              + (f", POT timed on {args.pot_sample_its} of them" if args.pot_sample_its else ""))
        moms = [None if m == "default" else (m if m in ("adaptive", "anderson") else float(m))
                for m in (args.momentum or ["default"])]
        print(f"{'n':>5} {'eps':>6} {'thr':>3} {'momentum':>9} | {'ours its':>8} {'ms/it':>8} {'s':>7} {'sprd':>5} | "
              f"{'raw ms/it':>9} {'sprd':>5} | {'ours/raw':>8} | {'POT its':>7} {'ms/it':>8} "
              f"{'s':>8} {'sprd':>5} | {'POT/ours':>8}")
        ths = args.threads_list or [torch.get_num_threads()]
        for n in args.sizes:
            for eps in args.eps:
                for r in dense_interleaved(n, eps, args.tol, dtype, dev, args.reps, ths,
                                           args.pot_sample_its, moms):
                    rows.append(r)
                    print(f"{n:>5} {eps:>6g} {r['threads']:>3} {r['momentum']:>9} | "
                          f"{r['ours_its']:>8} "
                          f"{r['ours_ms_per_it']:>8.3f} {r['ours_s']:>7.3f} {r['ours_spread']:>5.2f} | "
                          f"{r['raw_ms_per_it']:>9.3f} {r['raw_spread']:>5.2f} | "
                          f"{r['ours_over_raw_per_it']:>8.2f} | {r.get('pot_its', 0):>7} "
                          f"{r.get('pot_ms_per_it', float('nan')):>8.3f} "
                          f"{r.get('pot_s', float('nan')):>8.3f} {r.get('pot_spread', float('nan')):>5.2f} | "
                          f"{r.get('pot_over_ours', float('nan')):>8.2f}", flush=True)
        print(f"# load average {os.getloadavg()[0]:.2f} at end")
    for threads in ([] if args.raw else (args.threads_list or [None])):
        if threads:
            torch.set_num_threads(threads)
            print(f"# {threads} thread(s)")
        for n in args.sizes:
            for eps in args.eps:
                r = bench_dense(n, eps, args.tol, dtype, dev, args.reps, bw)
                r["threads"] = torch.get_num_threads()
                rows.append(r)
                extra = ""
                print(f"{n:>5} {eps:>6g} | {r['floor_ms_per_it']:>11.3f} | {r['ours_its']:>8} "
                      f"{r['ours_ms_per_it']:>7.3f} {r['ours_s']:>7.3f} | {r['plain_its']:>9} "
                      f"{r['plain_ms_per_it']:>7.3f} {r['plain_s']:>7.3f} | {r.get('pot_its', 0):>7} "
                      f"{r.get('pot_ms_per_it', float('nan')):>7.3f} {r.get('pot_s', float('nan')):>7.3f} | "
                      f"{r.get('pot_over_ours', float('nan')):>8.2f} {r['plain_over_ours']:>10.2f} "
                      f"{r['ours_over_floor_per_it']:>10.1f}{extra}", flush=True)
    torch.set_num_threads(default_threads)
    if args.tiny_batch:
        tdt = getattr(torch, args.tiny_dtype)
        bw_t = copy_bandwidth(dev, tdt)
        for tn in args.tiny_sizes:
            B = max(1, args.tiny_batch * 16 // (tn * tn))
            r = bench_tiny(B, tn, 20, tdt, dev, args.reps, bw_t, compiled=args.tiny_compile)
            rows.append(r)
            print(f"\n## Batched tiny problems: {r['B']} matrices of {tn}x{tn}, 20 iterations, "
                  f"{r['dtype']}")
            print(f"floor {r['floor_ms']:.3f} ms | ours(log) {r['ours_log_ms']:.2f} ms | ours(absorb) "
                  f"{r['ours_absorb_ms']:.2f} ms | plain {r['plain_ms']:.2f} ms | POT batch "
                  f"{r.get('pot_batch_ms', float('nan')):.2f} ms | plain/ours {r['plain_over_ours']:.2f} | "
                  f"POT/ours {r.get('pot_over_ours', float('nan')):.2f} | ours/floor {r['ours_over_floor']:.1f} | "
                  f"max marginal error after 20 its {r['max_row_err_ours']:.1e}")
            print(f"single-pass floor {r['single_pass_floor_ms']:.3f} ms | ours/single-pass "
                  f"{r['ours_over_single_pass']:.1f}"
                  + (f" | compile {r['compile_ms']:.2f} ms, compile/single-pass "
                     f"{r['compile_over_single_pass']:.1f}" if "compile_ms" in r else "")
                  + (f" | Triton kernel alone {r['kernel_ms']:.3f} ms, kernel/single-pass "
                     f"{r['kernel_over_single_pass']:.1f}" if "kernel_ms" in r else ""))
            if args.tiny_grad:
                g = bench_tiny_grad(B, tn, 20, tdt, dev, args.reps)
                rows.append(g)
                print("forward+backward, 20 sweeps (ms | bytes saved for the backward):")
                for k in ("eager_loop", "unroll", "implicit"):
                    print(f"  {k:>10}: {g[k + '_ms']:8.2f} ms | {g[k + '_saved_MB']:8.2f} MB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": str(dev), "torch": torch.__version__, "bandwidth": bw, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
