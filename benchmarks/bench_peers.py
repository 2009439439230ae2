#!/usr/bin/env python
"""`bistochastic.sinkhorn` against its peers, side by side, at one tolerance (dense problems).

Not a test: timings and ratios measured in one process, runs interleaved (ours, peer, peer, ...,
ours, ...), the minimum of ``--reps`` runs after a warm-up, and the spread (max/min) of each.

Every method is stopped by, or checked against, one criterion: the relative L1 marginal error of
`bs.marginal_error` <= tol, recomputed here from the plan each method returns.

* ``ours``     `bs.sinkhorn(C, eps, a, b, tol=tol, grad="none")` (default engine).
* ``fused``    the solver's fused path (`bistochastic._fused.solve_detached`, TorchInductor, adaptive
               over-relaxation as in the eager solver): what `bs.sinkhorn` runs on CUDA tensors
               (forced on the CPU here with the C++ code generator).
* ``compile``  `torch.compile` of the plain log-domain loop (no relaxation, POT's update order:
               columns then rows, so its iterates are POT's), checked every 10 iterations.
* ``pot``      POT `ot.sinkhorn(method="sinkhorn_log")`, torch backend, run for exactly the
               iterations the identical `compile` loop needed (POT's own test differs). With
               ``--pot-sample-its K`` and more than K iterations needed, POT is timed on K
               iterations and its time to tolerance is that per-iteration time times the count
               (marked ``x`` in the table: extrapolated from a measured per-iteration time).
* ``ott``      OTT-JAX `Sinkhorn(lse_mode=True, threshold=tol, norm_error=1, inner_iterations=10)`,
               `jax.jit`-compiled, jax CPU. OTT stops on the L1 error of one marginal (the other is
               exact after its update), which is our criterion for uniform weights.
* ``geomloss`` GeomLoss `geomloss.ot.solve(C, reg=eps, a=a, b=b, tol=tol)`, its matrix
               (tensorised) solver: the closest like-for-like thing GeomLoss offers. It is not the
               same algorithm: symmetrised (averaged) updates with eps-annealing, no debiasing on a
               fixed cost matrix; it runs a fixed number of iterations (no marginal-error test), so
               the benchmark first searches the fewest iterations whose plan meets tol (doubling,
               then bisection to 1/8 of the bracket) and times that; if none up to
               ``--geomloss-max-its`` does, the error it reaches is reported.

Optional peers that are not installed are skipped with a message. Threads: ``--threads N`` pins
the process to N cores (affinity, before jax is imported: XLA sizes its pool from it) and sets
torch's intra-op threads; run once per thread count (see benchmarks/README.md).

Usage:
    python benchmarks/bench_peers.py --threads 1 --sizes 1024 --eps 0.01 0.002
    python benchmarks/bench_peers.py --device cuda --dtype float32 --sizes 4096 8192
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings


def _pin(threads: int) -> int:
    cpus = sorted(os.sched_getaffinity(0))
    if threads <= 0 or threads >= len(cpus):
        return len(cpus)
    os.sched_setaffinity(0, set(cpus[:threads]))
    if threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_multi_thread_eigen=false").strip()
    return threads


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--sizes", type=int, nargs="*", default=[1024])
    ap.add_argument("--eps", type=float, nargs="*", default=[0.01, 0.002])
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="cores to use (0: all)")
    ap.add_argument("--methods", nargs="*",
                    default=["ours", "fused", "compile", "pot", "ott", "geomloss"])
    ap.add_argument("--pot-sample-its", type=int, default=0,
                    help="time POT on this many iterations and scale (0: full runs)")
    ap.add_argument("--geomloss-max-its", type=int, default=1024,
                    help="largest GeomLoss iteration count tried when searching for tol")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    threads = _pin(args.threads)

    import torch

    torch.set_num_threads(threads)
    import bistochastic as bs
    from bistochastic import _fused
    from bistochastic.bench import copy_bandwidth, make_problem, pot_version, sync

    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    methods = list(args.methods)
    versions = {"torch": torch.__version__, "pot": pot_version()}
    # `fused` calls the compiled solver directly; `ours` is what a user's `bs.sinkhorn` call runs
    # (on CPU tensors the eager engine, on CUDA the fused path): do not force a dispatch here
    # (forcing BISTOCHASTIC_FUSED=cpu made `ours` the fused path too).
    if dev.type == "cpu" and os.environ.get("BISTOCHASTIC_FUSED", "auto").lower() == "cpu":
        print("# BISTOCHASTIC_FUSED=cpu is set: `ours` runs the fused path on the CPU")
    if dev.type == "cuda" and not _fused.use_fused(torch.empty(1, device=dev)):
        print("# fused: Triton not available on this CUDA setup: fused/compile skipped")
        methods = [m for m in methods if m not in ("fused", "compile")]
    jax = ott_lin = None
    if "ott" in methods:
        try:
            import jax  # noqa: F811

            if dtype == torch.float64:
                jax.config.update("jax_enable_x64", True)
            import ott
            from ott.geometry import geometry
            from ott.problems.linear import linear_problem
            from ott.solvers.linear import sinkhorn as ott_sk

            ott_lin = (geometry, linear_problem, ott_sk)
            versions.update(jax=jax.__version__, ott=ott.__version__)
            if dev.type == "cuda" and jax.default_backend() == "cpu":
                print("# ott: jax has no GPU backend here: OTT runs on the CPU (not comparable)")
        except Exception as exc:  # absent, or built for another jax
            print(f"# ott: skipped (OTT-JAX/jax not installed or not importable: {exc!r})")
            methods.remove("ott")
    if "geomloss" in methods:
        try:
            import geomloss
            from geomloss import ot as gl_ot

            versions["geomloss"] = geomloss.__version__
        except Exception as exc:
            print(f"# geomloss: skipped (not installed or not importable: {exc!r})")
            methods.remove("geomloss")
    if "pot" in methods and versions["pot"] == "absent":
        print("# pot: skipped (POT not installed)")
        methods.remove("pot")
    if "pot" in methods and "compile" not in methods:
        print("# pot: needs the iteration count of the identical `compile` loop: added")
        methods.insert(methods.index("pot"), "compile")

    bw = copy_bandwidth(dev, dtype)
    print(f"# {' '.join(f'{k} {v}' for k, v in versions.items())}")
    print(f"# device {dev}, {args.dtype}, {threads} thread(s) of {os.cpu_count()}, "
          f"{platform.machine()}, copy bandwidth {bw / 1e9:.1f} GB/s (read+write)")
    print(f"# time to tolerance: relative L1 marginal error <= {args.tol:g}; min of {args.reps} "
          "interleaved runs after one warm-up; spread = max/min over the runs")

    rows = []
    for n in args.sizes:
        C, a, b = make_problem(n, dtype, dev)
        floor_ms = 2 * n * n * C.element_size() / bw * 1e3
        for eps in args.eps:
            Kc = -C / eps
            KcT = Kc.T.contiguous()
            la, lb = a.log(), b.log()
            zn = torch.zeros_like(a)
            info = {}

            def run_ours():
                r = bs.sinkhorn(C, eps, a, b, tol=args.tol, max_iter=100000, grad="none",
                                warn=False)
                return r.plan, r.iterations

            def run_fused():
                F, G, P, err, nit, it, _ = _fused.solve_detached(
                    Kc, la, lb, a, b, zn, zn, tol=args.tol, max_iter=100000, check_every=10,
                    fixed=False, momentum="adaptive")
                return P, it

            def run_compile():
                # POT's order (columns, then rows) = rows-then-columns on the transposed problem
                G, F, PT, err, nit, it, _ = _fused.solve_detached(
                    KcT, lb, la, b, a, zn, zn, tol=args.tol, max_iter=100000, check_every=10,
                    fixed=False, momentum=None)
                return PT.T, it

            def run_pot():
                import ot

                its = info["compile_its"]
                k = its if not args.pot_sample_its else min(its, args.pot_sample_its)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    P = ot.sinkhorn(a, b, C, eps, method="sinkhorn_log", numItermax=k,
                                    stopThr=0.0)
                return P, k

            def run_ott():
                P = info["ott_fn"](info["ott_C"])
                P.block_until_ready()
                return P, None

            def run_geomloss(its=None):
                its = its or info["gl_its"]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = gl_ot.solve(C, reg=eps, a=a, b=b, max_iter=its)
                return res.plan, its

            def geomloss_search():
                # fewest annealing iterations whose plan meets tol: doubling, then 3 bisections
                # (so the count is at most 1/8 of the bracket above the true minimum)
                lo, hi = 0, 16
                while True:
                    err = float(bs.marginal_error(run_geomloss(hi)[0], a, b))
                    if err <= args.tol or hi >= args.geomloss_max_its:
                        break
                    lo, hi = hi, 2 * hi
                for _ in range(3 if err <= args.tol else 0):
                    mid = (lo + hi) // 2
                    if mid <= lo:
                        break
                    if float(bs.marginal_error(run_geomloss(mid)[0], a, b)) <= args.tol:
                        hi = mid
                    else:
                        lo = mid
                info["gl_its"] = hi

            fns = {"ours": run_ours, "fused": run_fused, "compile": run_compile,
                   "pot": run_pot, "ott": run_ott, "geomloss": run_geomloss}
            if "ott" in methods:
                geometry, linear_problem, ott_sk = ott_lin
                aj, bj = jax.numpy.asarray(a.cpu().numpy()), jax.numpy.asarray(b.cpu().numpy())
                solver = ott_sk.Sinkhorn(lse_mode=True, threshold=args.tol, norm_error=1,
                                         inner_iterations=10, max_iterations=100000)

                def solve(Cj):
                    geom = geometry.Geometry(cost_matrix=Cj, epsilon=eps)
                    out = solver(linear_problem.LinearProblem(geom, aj, bj))
                    its = (out.errors > -1).sum() * 10
                    return out.matrix, its

                jitted = jax.jit(solve)
                info["ott_C"] = jax.numpy.asarray(C.cpu().numpy())
                info["ott_fn"] = lambda Cj: jitted(Cj)[0]
                info["ott_its_fn"] = lambda: int(jitted(info["ott_C"])[1])

            res = {m: {"times": []} for m in methods}
            if "geomloss" in methods:
                geomloss_search()
            # warm-up (compilation, caches) and the outputs we check
            for m in methods:
                t0 = time.perf_counter()
                P, its = fns[m]()
                sync(dev)
                res[m]["warmup_s"] = time.perf_counter() - t0
                print(f"#   warm-up {m}: {res[m]['warmup_s']:.1f} s", file=sys.stderr, flush=True)
                if m == "ott":
                    P = torch.tensor(jax.device_get(P).copy()).to(dev)
                    its = info["ott_its_fn"]()
                if m == "compile":
                    info["compile_its"] = its
                res[m]["its"] = its
                res[m]["err"] = float(bs.marginal_error(P.to(dtype), a, b))
            for _ in range(args.reps):
                for m in methods:
                    t0 = time.perf_counter()
                    fns[m]()
                    sync(dev)
                    res[m]["times"].append(time.perf_counter() - t0)
            row = {"n": n, "eps": eps, "tol": args.tol, "dtype": args.dtype, "threads": threads,
                   "device": str(dev), "floor_ms_per_it": floor_ms, "methods": {}}
            for m in methods:
                r = res[m]
                t = min(r["times"])
                entry = {"min_s": t, "spread": max(r["times"]) / t, "times_s": r["times"],
                         "warmup_s": r["warmup_s"], "its": r["its"], "err": r["err"]}
                if m == "pot" and r["its"] != info["compile_its"]:
                    entry["measured_its"] = r["its"]
                    entry["its"] = info["compile_its"]
                    entry["min_s"] = t / r["its"] * info["compile_its"]
                    entry["extrapolated"] = True
                    entry["err"] = None  # the sampled run's plan is not the converged one
                if entry["its"]:
                    entry["ms_per_it"] = entry["min_s"] / entry["its"] * 1e3
                    entry["per_it_over_floor"] = entry["ms_per_it"] / floor_ms
                row["methods"][m] = entry
            if "ours" in row["methods"]:
                t_ours = row["methods"]["ours"]["min_s"]
                for m, e in row["methods"].items():
                    e["over_ours"] = e["min_s"] / t_ours
            rows.append(row)
            _print_row(row)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"versions": versions, "bandwidth": bw, "argv": sys.argv, "rows": rows},
                      fh, indent=1)
    return 0


def _print_row(row):
    print(f"\n## n = {row['n']}, eps = {row['eps']:g}, {row['threads']} thread(s): "
          f"floor {row['floor_ms_per_it']:.3f} ms/it")
    print(f"{'method':>9} | {'its':>6} | {'min s':>8} {'spread':>6} | {'ms/it':>8} "
          f"{'/floor':>6} | {'x ours':>7} | {'error':>8} | {'warm-up s':>9}")
    for m, e in row["methods"].items():
        its = f"{e['its']}" if e["its"] else "-"
        mpi = f"{e['ms_per_it']:8.3f}" if e.get("ms_per_it") else f"{'-':>8}"
        fl = f"{e['per_it_over_floor']:6.1f}" if e.get("per_it_over_floor") else f"{'-':>6}"
        err = f"{e['err']:.1e}" if e["err"] is not None else "-"
        mark = "x" if e.get("extrapolated") else " "
        print(f"{m:>9} | {its:>6} | {e['min_s']:8.3f}{mark}{e['spread']:6.2f} | {mpi} {fl} | "
              f"{e.get('over_ours', float('nan')):7.2f} | {err:>8} | {e['warmup_s']:9.1f}",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
