"""Subnormal numbers in the scaling engine's matrix-vector products on the CPU: what they cost,
and what the engine saves with its kernel floor (`_exp_kernel_`: the subnormal entries set to
zero) and, in float32, the lifted column product (`Eᵀ(2^k u) / 2^k`, `_lift_pow2`). Behind the
subnormal notes in benchmarks/README.md. Not a test; run on a quiet machine:

    PYTHONPATH=lib .venv/bin/python benchmarks/probe_subnormal.py
    PYTHONPATH=lib .venv/bin/python benchmarks/probe_subnormal.py batched
    PYTHONPATH=lib .venv/bin/python benchmarks/probe_subnormal.py exp

First the two products of an iteration, `E v` and `Eᵀ u`, with the kernel
`E = exp(-(C - r)/eps)` and the converged scalings `u = exp((f - r)/eps)`, `v = exp(g/eps)` of
that frame (n = 1024, one thread, minimum of 5 x 20): the share of subnormal kernel entries and
of subnormal terms `E_ij v_j` and `E_ij u_i`, and the time of each product with the kernel as
built, with the floor, and with the floor and the lifted `u`. Then the time to build the kernel
(`exp`, which is slow for inputs whose result underflows, with and without the clamp before it).
Then `bs.sinkhorn` (tol 1e-6, default momentum, which is Anderson acceleration at this size, and
adaptive relaxation) as the engine runs it, without the clamp, without the lift, and with a plain
`exp` and no lift; interleaved, minimum of 3. With `batched`: float32 batches with the batched
column product's lift and without it (1024 matrices of 16 x 16 capped at 3000 iterations).
With `exp`: torch's `exp` (clone included) on tensors filled with one value, from -1 to -inf.
"""
import importlib
import math
import sys
import time

import torch

import bistochastic as bs
from bistochastic.bench import make_problem

sk = importlib.import_module("bistochastic.sinkhorn")
torch.set_num_threads(1)
CASES = ((torch.float32, 0.01), (torch.float32, 0.002), (torch.float64, 0.01),
         (torch.float64, 0.0005))


def product_ms(M, x):
    torch.mv(M, x)
    best = 1e9
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(20):
            torch.mv(M, x)
        best = min(best, (time.perf_counter() - t0) / 20)
    return best * 1e3


def timed(f):
    t0 = time.perf_counter()
    f()
    return (time.perf_counter() - t0) * 1e3


def flushed(E, floor):
    return torch.where(E < floor, torch.zeros_like(E), E)


def subnormal_share(X, tiny):
    return float(((X > 0) & (X < tiny)).double().mean())


def plain_exp(Z):
    return Z.exp_()


def unclamped_exp(Z):  # the floor without the clamp before exp (the engine before 2026-11-28)
    E = Z.exp_()
    return torch.nn.functional.threshold_(E, torch.finfo(E.dtype).tiny, 0.0)


def clamped_exp(Z):  # the float32 engine's kernel, for either dtype
    lo = sk._EXP_FLOOR[Z.dtype]
    E = Z.clamp_(min=lo).exp_()
    return torch.nn.functional.threshold_(E, 1.5 * math.exp(lo), 0.0)


def no_lift(x, margin=0):
    return 1.0


engine_exp, engine_lift = sk._exp_kernel_, sk._lift_pow2
VARIANTS = (("engine", engine_exp, engine_lift), ("exp not clamped", unclamped_exp, engine_lift),
            ("no lift", engine_exp, no_lift), ("plain exp, no lift", plain_exp, no_lift))

if sys.argv[1:] == ["exp"]:
    # torch's exp per element, by input: 1024 x 1024 constant tensors, one thread, minimum of 5
    print("torch exp of a 1024 x 1024 tensor filled with one value, one thread (ms, minimum of 5)")
    for dtype in (torch.float32, torch.float64):
        for value in (-1.0, -50.0, -86.0, -95.0, -103.0, -110.0, -200.0, -750.0, -1e4, -math.inf):
            Z = torch.full((1024, 1024), value, dtype=dtype)
            t = min(timed(lambda: Z.clone().exp_()) for _ in range(5))
            print(f"{str(dtype)[6:]} {value:>8}: {t:6.2f}")
    sys.exit()
if sys.argv[1:] == ["batched"]:
    # batches in float32: the batched column product's lift (one power of two per matrix) against
    # none, Anderson acceleration (the default at these sizes), tol 1e-5, minimum of 3
    print("batches, float32, one thread, tol 1e-5 (ms, minimum of 3, interleaved)")
    g = torch.Generator().manual_seed(0)
    real = sk._lift_pow2_batched
    for B, n in ((64, 64), (8, 256), (1024, 16)):
        x = torch.rand(B, n, 2, generator=g, dtype=torch.float64)
        y = torch.rand(B, n, 2, generator=g, dtype=torch.float64)
        C = torch.cdist(x, y) ** 2
        C = (C / C.amax((-1, -2), keepdim=True)).float()
        for eps in (0.01, 0.002):
            best, its = {}, {}
            for _ in range(3):
                for name, fn in (("lift", real), ("no lift", no_lift)):
                    sk._lift_pow2_batched = fn
                    t0 = time.perf_counter()
                    res = bs.sinkhorn(C, eps, tol=1e-5, max_iter=20000 if B < 1024 else 3000,
                                      warn=False)
                    best[name] = min(best.get(name, math.inf), time.perf_counter() - t0)
                    its[name] = res.iterations
            sk._lift_pow2_batched = real
            print(f"{B} x {n} x {n}, eps {eps}: " + ", ".join(
                f"{k} {t * 1e3:.1f} ({its[k]} its)" for k, t in best.items()))
    sys.exit()

print("One product at n = 1024, one thread, converged scalings (ms)")
for dtype, eps in CASES:
    C, a, b = make_problem(1024, dtype, "cpu")
    tiny = torch.finfo(dtype).tiny
    r = C.amin(-1)
    res = bs.sinkhorn(C, eps, a, b, tol=1e-6, grad="none")
    E = torch.exp(-(C - r[:, None]) / eps)
    u, v = torch.exp((res.f - r) / eps), torch.exp(res.g / eps)
    tau = sk._scaling_bound(dtype)
    print(f"{str(dtype)[6:]} eps {eps}: entries {subnormal_share(E, tiny):.2%} subnormal, "
          f"products E_ij v_j {subnormal_share(E * v, tiny):.2%}, E_ij u_i "
          f"{subnormal_share(E * u[:, None], tiny):.2%}; |log u| <= {float(u.log().abs().max()):.1f},"
          f" |log v| <= {float(v.log().abs().max()):.1f} (tau {tau:.1f})")
    K = flushed(E, tiny)
    k = engine_lift(u)
    print(f"    as built: E v {product_ms(E, v):.3f}, Eᵀu {product_ms(E.t(), u):.3f}; floor: "
          f"E v {product_ms(K, v):.3f}, Eᵀu {product_ms(K.t(), u):.3f}; floor and lifted u "
          f"(2^{math.log2(k):.0f}): Eᵀu {product_ms(K.t(), u * k):.3f}")

print("Building the kernel E = exp(Z), Z = -(C - r)/eps, n = 1024, one thread (ms, minimum of 5)")
for dtype, eps in CASES:
    C, a, b = make_problem(1024, dtype, "cpu")
    Z = -(C - C.amin(-1, keepdim=True)) / eps
    lo = math.log(torch.finfo(dtype).tiny)
    times = {}
    for name, fn in (("plain exp", plain_exp), ("exp, then the floor", unclamped_exp),
                     ("clamp, exp, floor", clamped_exp), ("engine", engine_exp)):
        times[name] = min(timed(lambda: fn(Z.clone())) for _ in range(5))
    print(f"{str(dtype)[6:]} eps {eps}: {float((Z < lo).double().mean()):.1%} of the exponents "
          "below the smallest normal number's; " + ", ".join(f"{k} {t:.2f}" for k, t in times.items()))

print("bs.sinkhorn at n = 1024, one thread, tol 1e-6 (ms, minimum of 3, interleaved)")
for dtype, eps in CASES:
    C, a, b = make_problem(1024, dtype, "cpu")
    for momentum in ("auto", "adaptive"):
        best, its, errs = {}, {}, {}
        for _ in range(3):
            for name, fexp, flift in VARIANTS:
                sk._exp_kernel_, sk._lift_pow2 = fexp, flift
                t0 = time.perf_counter()
                res = bs.sinkhorn(C, eps, a, b, tol=1e-6, max_iter=100000, grad="none",
                                  momentum=momentum, warn=False)
                best[name] = min(best.get(name, math.inf), time.perf_counter() - t0)
                its[name], errs[name] = res.iterations, float(res.marginal_error)
        sk._exp_kernel_, sk._lift_pow2 = engine_exp, engine_lift
        print(f"{str(dtype)[6:]} eps {eps} {momentum:8s}: "
              + ", ".join(f"{k} {t * 1e3:.1f} ({its[k]} its, error {errs[k]:.2e})"
                          for k, t in best.items()))
