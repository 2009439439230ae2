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
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from bistochastic.bench import bench_dense, bench_tiny, copy_bandwidth, pot_version


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
    print("\n## Dense problems: time to tolerance (relative L1 marginal error <= %g)" % args.tol)
    hdr = (f"{'n':>5} {'eps':>6} | {'floor ms/it':>11} | {'ours its':>8} {'ms/it':>7} {'s':>7} | "
           f"{'plain its':>9} {'ms/it':>7} {'s':>7} | {'POT its':>7} {'ms/it':>7} {'s':>7} | "
           f"{'POT/ours':>8} {'plain/ours':>10} {'ours/floor':>10}")
    print(hdr)
    for n in args.sizes:
        for eps in args.eps:
            r = bench_dense(n, eps, args.tol, dtype, dev, args.reps, bw)
            rows.append(r)
            print(f"{n:>5} {eps:>6g} | {r['floor_ms_per_it']:>11.3f} | {r['ours_its']:>8} "
                  f"{r['ours_ms_per_it']:>7.3f} {r['ours_s']:>7.3f} | {r['plain_its']:>9} "
                  f"{r['plain_ms_per_it']:>7.3f} {r['plain_s']:>7.3f} | {r.get('pot_its', 0):>7} "
                  f"{r.get('pot_ms_per_it', float('nan')):>7.3f} {r.get('pot_s', float('nan')):>7.3f} | "
                  f"{r.get('pot_over_ours', float('nan')):>8.2f} {r['plain_over_ours']:>10.2f} "
                  f"{r['ours_over_floor_per_it']:>10.1f}", flush=True)
    if args.tiny_batch:
        tdt = getattr(torch, args.tiny_dtype)
        bw_t = copy_bandwidth(dev, tdt)
        r = bench_tiny(args.tiny_batch, 4, 20, tdt, dev, args.reps, bw_t)
        rows.append(r)
        print(f"\n## Batched tiny problems: {r['B']} matrices of 4x4, 20 iterations, {r['dtype']}")
        print(f"floor {r['floor_ms']:.3f} ms | ours(log) {r['ours_log_ms']:.2f} ms | ours(absorb) "
              f"{r['ours_absorb_ms']:.2f} ms | plain {r['plain_ms']:.2f} ms | POT batch "
              f"{r.get('pot_batch_ms', float('nan')):.2f} ms | plain/ours {r['plain_over_ours']:.2f} | "
              f"POT/ours {r.get('pot_over_ours', float('nan')):.2f} | ours/floor {r['ours_over_floor']:.1f} | "
              f"max marginal error after 20 its {r['max_row_err_ours']:.1e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": str(dev), "torch": torch.__version__, "bandwidth": bw, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
