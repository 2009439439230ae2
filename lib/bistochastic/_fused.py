"""Fused (``torch.compile``) log-domain Sinkhorn updates: the GPU path of :func:`bistochastic.sinkhorn`.

The eager log-domain loop launches several kernels per half-iteration (add, max, subtract, exp, sum,
log) and streams the ``n × m`` matrix through memory each time. Compiled by TorchInductor, each
half-iteration ``F ← log a − LSE_j(K̃ + G)`` becomes one fused reduction that reads the scaled cost
``K̃`` once (Triton kernels on CUDA, C++/OpenMP on the CPU), which is what the memory-bandwidth
floor of ``2 n m s`` bytes per iteration assumes.

The functions here work in the solver's internal coordinates (see :mod:`bistochastic.sinkhorn`):
``Kc = -(C - r ⊕ s)/ε`` (``(..., n, m)``), potentials in units of ε, ``F (..., n)``, ``G (..., m)``,
``loga``/``logb`` the log-marginals (``-inf`` at zero weights). They compute exactly what the eager
``log`` engine computes (same update order: rows, then columns; the last column update of a block
is never over-relaxed), so the solver keeps its validation, centring, support masks, honest
reporting and gradients, and only swaps the inner loop:

* :func:`solve_detached` replaces ``sinkhorn._solve_detached`` (no autograd: ``grad="none"``,
  ``"implicit"``, or no input requiring grad), dense problems and batched tiny ones alike; a fixed
  sweep count with plain updates on matrices of at most 32 x 32 (the mHC shape) runs as one
  hand-written Triton kernel instead (:mod:`bistochastic._triton`: each matrix stays in registers
  for all sweeps, where Inductor's kernels stream the batch through memory twice per sweep);
* :func:`log_block` computes ``sinkhorn._log_block`` (plain updates) differentiably; compiled with
  AOTAutograd its backward is fused too (the tiny-batch training shape). It is NOT hooked into the
  solver's unrolled loop: a compiled backward supports neither double backward (Hessians,
  ``gradgradcheck``) nor ``retain_graph=True`` (donated buffers), which the eager loop supports, so
  swapping it in silently would break working user code. Callers that need only first-order
  gradients can use it directly.

:func:`use_fused` is the dispatch test: CUDA tensors when TorchInductor can generate GPU code
(Triton present), never inside an enclosing ``torch.compile``, and never after a failure (the
first failure warns once and the eager path takes over). The environment variable
``BISTOCHASTIC_FUSED`` overrides: ``0`` turns the fused path off, ``cpu`` turns it on for CPU
tensors too (the tests use this: the compiled graph is the same, only the code generator differs).
"""

from __future__ import annotations

import functools
import os
import types
import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _overrelax, _triton

__all__ = ["backend", "use_fused", "try_solve_detached", "try_log_block", "solve_detached", "log_block", "plan_and_error", "disable"]

_FAILED = False


def disable(reason: str) -> None:
    """Turn the fused path off for the rest of the process (warns once with ``reason``)."""
    global _FAILED
    if not _FAILED:
        warnings.warn(f"bistochastic: fused Sinkhorn path disabled, using the eager loop ({reason})",
                      RuntimeWarning, stacklevel=3)
    _FAILED = True


@functools.lru_cache(maxsize=None)
def _gpu_codegen_available() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # pragma: no cover
        return False
    return bool(has_triton())


def use_fused(x: Tensor) -> bool:
    """Whether the solver should run its inner loop through the compiled kernels for ``x``.

    True for CUDA tensors of float32/float64 when Triton is importable; ``BISTOCHASTIC_FUSED=0``
    disables, ``BISTOCHASTIC_FUSED=cpu`` also enables CPU tensors. False inside an enclosing
    ``torch.compile`` (the caller's graph already fuses) and after a compilation failure.
    """
    mode = os.environ.get("BISTOCHASTIC_FUSED", "auto").lower()
    if _FAILED or mode in ("0", "off", "false", "no"):
        return False
    if x.dtype not in (torch.float32, torch.float64):
        return False
    if torch.compiler.is_compiling():
        return False
    if x.device.type == "cuda":
        return _gpu_codegen_available()
    return x.device.type == "cpu" and mode == "cpu"


# ----------------------------------------------------------------------------------------------
# the compiled pieces (plain functions first: the eager reference of exactly the same math)


def _block_impl(Kc: Tensor, loga: Tensor, logb: Tensor, F: Tensor, G: Tensor, omega: Tensor,
                k: int) -> Tuple[Tensor, Tensor]:
    """``k`` iterations: ``F ← F + ω(log a − LSE_j(Kc + G) − F)``, then the same for ``G``; the last
    column update is not relaxed. ``omega`` is a 0-d tensor (no recompilation per value); with
    ``ω = 1`` the relaxation is skipped by the caller's choice of ``relax=False``."""
    for i in range(k):
        Fn = loga - torch.logsumexp(Kc + G[..., None, :], dim=-1)
        F = F + omega * (Fn - F)
        Gn = logb - torch.logsumexp(Kc + F[..., :, None], dim=-2)
        G = Gn if i == k - 1 else G + omega * (Gn - G)
    return F, G


def _block_masked_impl(Kc: Tensor, loga: Tensor, logb: Tensor, F: Tensor, G: Tensor,
                       omega: Tensor, sa: Tensor, sb: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """:func:`_block_impl` relaxed on the support only (``sa``/``sb``: positive weights), as the
    eager solver does with zero weights (off the support the plain update, ``-inf``)."""
    for i in range(k):
        Fn = loga - torch.logsumexp(Kc + G[..., None, :], dim=-1)
        F = torch.where(sa, F + omega * (Fn - F), Fn)
        Gn = logb - torch.logsumexp(Kc + F[..., :, None], dim=-2)
        G = Gn if i == k - 1 else torch.where(sb, G + omega * (Gn - G), Gn)
    return F, G


def _block_plain_impl(Kc: Tensor, loga: Tensor, logb: Tensor, F: Tensor, G: Tensor,
                      k: int) -> Tuple[Tensor, Tensor]:
    """``k`` plain iterations (no relaxation): safe with ``-inf`` potentials at zero weights."""
    for _ in range(k):
        F = loga - torch.logsumexp(Kc + G[..., None, :], dim=-1)
        G = logb - torch.logsumexp(Kc + F[..., :, None], dim=-2)
    return F, G


def _error_impl(Kc: Tensor, F: Tensor, G: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Marginal error of ``exp(Kc + F ⊕ G)`` without writing the plan (one fused read of ``Kc``)."""
    P = torch.exp(Kc + F[..., :, None] + G[..., None, :])
    row = (P.sum(-1) - a).abs().sum(-1)
    col = (P.sum(-2) - b).abs().sum(-1)
    return torch.maximum(row, col) / a.sum(-1)


def _plan_impl(Kc: Tensor, F: Tensor, G: Tensor) -> Tensor:
    """The plan ``exp(Kc + F ⊕ G)`` in one fused pass."""
    return torch.exp(Kc + F[..., :, None] + G[..., None, :])


def _marginal_error_eager(P: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``bistochastic.marginal_error``'s formula, run eagerly: the reported error is bit-for-bit
    the one a user recomputes from the returned plan (a compiled reduction sums in another order)."""
    row = (P.sum(-1) - a).abs().sum(-1)
    col = (P.sum(-2) - b).abs().sum(-1)
    return torch.maximum(row, col) / a.sum(-1)


_COMPILED = {}


def backend() -> str:
    """The ``torch.compile`` backend: ``BISTOCHASTIC_FUSED_BACKEND`` (default ``"inductor"``, the
    code generator; the tests also use ``"aot_eager"``, which captures and differentiates the same
    graph without generating code)."""
    return os.environ.get("BISTOCHASTIC_FUSED_BACKEND", "inductor")


def _compiled(name: str, x: Tensor):
    """One compiled function per (graph, backend, device type, dtype, grad mode, rank): each its own
    code object, hence its own Dynamo cache, so that mixing dtypes or devices in one process
    never exhausts Dynamo's per-function recompile limit (8)."""
    key = (name, backend(), x.device.type, x.dtype, torch.is_grad_enabled(), x.dim())
    fn = _COMPILED.get(key)
    if fn is None:
        impl = {"block": _block_impl, "block_masked": _block_masked_impl,
                "block_plain": _block_plain_impl, "error": _error_impl,
                "plan": _plan_impl}[name]
        clone = types.FunctionType(impl.__code__.replace(), impl.__globals__, impl.__name__,
                                   impl.__defaults__, impl.__closure__)
        fn = torch.compile(clone, fullgraph=True, dynamic=None, backend=key[1])
        _COMPILED[key] = fn
    return fn


#: Recompilations allowed per compiled function (shapes, block lengths, broadcast patterns): past
#: it, Dynamo raises and the solver falls back to its eager loop (with one warning).
RECOMPILE_LIMIT = 64


def _call(name: str, *args):
    fn = _compiled(name, args[0])
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT,
                                    accumulated_recompile_limit=16 * RECOMPILE_LIMIT):
        return fn(*args)


# ----------------------------------------------------------------------------------------------
# public pieces


def log_block(Kc: Tensor, loga: Tensor, logb: Tensor, F: Tensor, G: Tensor, k: int,
              omega: float = 1.0) -> Tuple[Tensor, Tensor]:
    """``k`` fused log-domain iterations, differentiable (the compiled graph has a fused backward).

    Shapes: ``Kc (..., n, m)``, ``loga``/``F`` ``(..., n)``, ``logb``/``G`` ``(..., m)``, all
    broadcastable to the batch of ``Kc``. Same result as ``sinkhorn._log_block`` (to round-off).
    ``omega != 1`` needs finite potentials (no zero weights).
    """
    if omega == 1.0:
        return _call("block_plain", Kc, loga, logb, F, G, int(k))
    om = torch.tensor(float(omega), dtype=Kc.dtype, device=Kc.device)
    return _call("block", Kc, loga, logb, F, G, om, int(k))


def plan_and_error(Kc: Tensor, F: Tensor, G: Tensor, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """Fused plan ``exp(Kc + F ⊕ G)`` ``(..., n, m)`` and its relative L1 marginal error ``(...)``
    (computed eagerly from that plan, exactly as :func:`bistochastic.marginal_error` does)."""
    P = _call("plan", Kc, F, G)
    return P, _marginal_error_eager(P, a.expand(P.shape[:-1]), b.expand(P.shape[:-2] + P.shape[-1:]))


@torch.no_grad()
def solve_detached(
    Kc: Tensor,
    loga: Tensor,
    logb: Tensor,
    a: Tensor,
    b: Tensor,
    F0: Tensor,
    G0: Tensor,
    *,
    tol: float,
    max_iter: int,
    check_every: int,
    fixed: bool,
    momentum=None,
    masked: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int, List[Tensor]]:
    """The solver loop without autograd, fused: drop-in for ``sinkhorn._solve_detached`` with the
    ``log`` engine. Returns ``F, G, P, err, n_iter, iterations, history``.

    Shapes: ``Kc (..., n, m)``, ``F0``/``loga``/``a`` ``(..., n)``, ``G0``/``logb``/``b``
    ``(..., m)`` (broadcastable to the batch of ``Kc``). ``momentum``: ``None`` (plain updates),
    a float in [1, 2) or ``"adaptive"`` (the eager solver's rule); with ``masked`` (zero weights,
    ``-inf`` log-marginals) the relaxation acts on the support only, as in the eager solver. Convergence checks
    read ``Kc`` once without writing the plan; the returned plan is materialised once at the end
    and ``err`` (= ``history[-1]``) is computed from that tensor. One host sync per check.
    """
    batch = Kc.shape[:-2]
    n, m = Kc.shape[-2], Kc.shape[-1]
    a = a.expand(batch + (n,))
    b = b.expand(batch + (m,))
    F, G = F0.expand(batch + (n,)).contiguous(), G0.expand(batch + (m,)).contiguous()
    n_iter = torch.full(batch, -1, dtype=torch.long, device=Kc.device)
    history: List[Tensor] = []
    sa = sb = None
    if masked:  # relaxation on the support only (the eager solver's rule)
        sa, sb = torch.isfinite(loga).expand(batch + (n,)), torch.isfinite(logb).expand(batch + (m,))
    omega = float(momentum) if isinstance(momentum, (int, float)) else 1.0
    adaptive = momentum == "adaptive"
    if fixed and omega == 1.0 and sa is None and _triton.available(Kc):
        # a batch of tiny matrices, fixed sweeps (the mHC shape): one Triton kernel keeps each
        # matrix in registers for every sweep and writes the plan once
        F, G, P = _triton.tiny_solve(Kc, loga, logb, F, G, max_iter)
        err = _marginal_error_eager(P, a, b)
        return F, G, P, err, torch.full_like(n_iter, max_iter), max_iter, [err]
    err_prev: Optional[float] = None
    it = 0
    while it < max_iter:
        k = min(check_every, max_iter - it)
        F_last, G_last = F, G
        check = not fixed or it + k >= max_iter
        if sa is not None and omega != 1.0:
            om = torch.tensor(float(omega), dtype=Kc.dtype, device=Kc.device)
            F, G = _call("block_masked", Kc, loga, logb, F, G, om, sa, sb, k)
        else:
            F, G = log_block(Kc, loga, logb, F, G, k, omega)
        it += k
        if not check:
            continue
        err = _call("error", Kc, F, G, a, b)
        history.append(err)
        newly = (err <= tol) & (n_iter < 0)
        n_iter = torch.where(newly, torch.full_like(n_iter, it), n_iter)
        if fixed:
            break
        if bool((n_iter >= 0).all()):
            break
        if not bool(torch.isfinite(err).all()):
            if omega == 1.0:  # not an overshoot: nothing to roll back, report it
                break
            F, G = F_last, G_last  # over-relaxation overshoot: roll back, plain updates
            history[-1] = torch.nan_to_num(err, nan=float("inf"))
            omega, adaptive = 1.0, False
            continue
        if adaptive:
            omega, err_prev = _overrelax.adapt(err, err_prev, k, omega)
    n_iter = torch.where(n_iter < 0, torch.full_like(n_iter, it), n_iter)
    P, err = plan_and_error(Kc, F, G, a, b)
    if history:
        history[-1] = err  # the reported error is the returned plan's
    else:
        history.append(err)
    # n_iter must agree with the final error (the check above read the same potentials)
    n_iter = torch.where((err > tol) & (n_iter < it), torch.full_like(n_iter, it), n_iter)
    return F, G, P, err, n_iter, it, history


def try_solve_detached(*args, **kwargs):
    """:func:`solve_detached`, or ``None`` after disabling the fused path (with one warning) if
    compilation or the compiled code fails: the caller then runs its eager loop."""
    try:
        return solve_detached(*args, **kwargs)
    except Exception as exc:  # compiler missing/broken, recompile limit, out of resources ...
        disable(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None


def try_log_block(Kc: Tensor, loga: Tensor, logb: Tensor, F: Tensor, G: Tensor, k: int
                  ) -> Optional[Tuple[Tensor, Tensor]]:
    """:func:`log_block` (plain updates, differentiable), or ``None`` after disabling the fused
    path (one warning) if compilation fails: the caller then runs its eager block."""
    try:
        return log_block(Kc, loga, logb, F, G, k)
    except Exception as exc:
        disable(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None
