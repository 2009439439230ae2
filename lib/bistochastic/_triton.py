"""One-kernel Sinkhorn for batches of tiny matrices (the mHC shape): a Triton kernel.

A batch of ``B`` matrices of ``n x m`` (``n, m <= MAX_SIZE``) with a fixed number of sweeps, as
``bs.project_dsm`` runs it inside a hyper-connection layer, is a poor fit for a kernel per pass:
each pass streams the whole batch through memory for a few flops per entry (``torch.compile``
of the plain loop runs at hundreds of times the single-pass floor). Here each Triton program
loads a block of whole matrices into registers once, runs every sweep there (row log-sum-exp,
then column log-sum-exp, exactly :func:`bistochastic._fused._block_plain_impl`), and writes the
potentials and the plan once: one launch, one read of the logits, one write of the plan.

Used by :func:`bistochastic._fused.solve_detached` for fixed sweep counts with plain updates on
CUDA tensors; tested on the CPU with Triton's interpreter (``TRITON_INTERPRET=1``, set before
Triton is imported) and on CUDA by ``pytest -m gpu``. Without Triton nothing here is used.
"""

from __future__ import annotations

import functools
import math
from typing import Tuple

import torch
from torch import Tensor

__all__ = ["MAX_SIZE", "available", "tiny_solve"]

#: Largest ``n`` and ``m`` handled (a block of matrices must fit in one program's registers).
MAX_SIZE = 32
_ELEMENTS_PER_PROGRAM = 4096


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _kernel(interpret: bool):
    """The kernel, JIT-compiled for the GPU or, with ``interpret``, Triton's CPU interpreter
    (``TRITON_INTERPRET=1`` is read when the kernel is defined: one definition per mode)."""
    import triton
    import triton.language as tl

    @triton.jit
    def tiny_sinkhorn(Kc, loga, logb, F, G, P, B, n, m, N_ITER: tl.constexpr,
                      BB: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr):
        pid = tl.program_id(0)
        ib = pid * BB + tl.arange(0, BB)
        i = tl.arange(0, BN)
        j = tl.arange(0, BM)
        okb = ib < B
        oki = i < n
        okj = j < m
        row_ok = okb[:, None] & oki[None, :]
        col_ok = okb[:, None] & okj[None, :]
        ok = row_ok[:, :, None] & okj[None, None, :]
        offs = ib[:, None, None] * (n * m) + i[None, :, None] * m + j[None, None, :]
        X = tl.load(Kc + offs, mask=ok, other=-float("inf"))
        la = tl.load(loga + ib[:, None] * n + i[None, :], mask=row_ok, other=0.0)
        lb = tl.load(logb + ib[:, None] * m + j[None, :], mask=col_ok, other=0.0)
        f = tl.load(F + ib[:, None] * n + i[None, :], mask=row_ok, other=-float("inf"))
        g = tl.load(G + ib[:, None] * m + j[None, :], mask=col_ok, other=-float("inf"))
        for _ in range(N_ITER):
            # rows: f = log a - LSE_j (Kc + g)
            Y = X + g[:, None, :]
            mx = tl.max(Y, axis=2)
            mx = tl.where(mx == -float("inf"), 0.0, mx)
            f = la - (mx + tl.log(tl.sum(tl.exp(Y - mx[:, :, None]), axis=2)))
            f = tl.where(row_ok, f, -float("inf"))
            # columns: g = log b - LSE_i (Kc + f)
            Y = X + f[:, :, None]
            mx = tl.max(Y, axis=1)
            mx = tl.where(mx == -float("inf"), 0.0, mx)
            g = lb - (mx + tl.log(tl.sum(tl.exp(Y - mx[:, None, :]), axis=1)))
            g = tl.where(col_ok, g, -float("inf"))
        tl.store(F + ib[:, None] * n + i[None, :], f, mask=row_ok)
        tl.store(G + ib[:, None] * m + j[None, :], g, mask=col_ok)
        tl.store(P + offs, tl.exp(X + f[:, :, None] + g[:, None, :]), mask=ok)

    return tiny_sinkhorn


@functools.lru_cache(maxsize=None)
def _importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available(x: Tensor) -> bool:
    """Whether :func:`tiny_solve` can run on ``x``: Triton importable, float32/float64, a batch
    of matrices no larger than ``MAX_SIZE`` on each side, on CUDA (or on the CPU under Triton's
    interpreter, ``TRITON_INTERPRET=1``)."""
    if x.dim() < 2 or x.shape[-2] > MAX_SIZE or x.shape[-1] > MAX_SIZE:
        return False
    if x.numel() >= 2**31:  # the kernel's offsets are 32-bit
        return False
    if x.dtype not in (torch.float32, torch.float64) or not _importable():
        return False
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and _interpreting()


def _pow2(k: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(k, 1))))


@torch.no_grad()
def tiny_solve(Kc: Tensor, loga: Tensor, logb: Tensor, F0: Tensor, G0: Tensor,
               n_iter: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``n_iter`` plain log-domain Sinkhorn sweeps on a batch of small matrices, one kernel.

    Shapes: ``Kc (..., n, m)`` (the scaled logits), ``loga``/``F0`` broadcastable to
    ``(..., n)``, ``logb``/``G0`` to ``(..., m)``. Each sweep sets ``F = loga - LSE_j(Kc + G)``,
    then ``G = logb - LSE_i(Kc + F)``. Returns ``F (..., n)``, ``G (..., m)`` and the plan
    ``P = exp(Kc + F ⊕ G) (..., n, m)``, in the dtype and on the device of ``Kc``.
    """
    if not available(Kc):
        raise ValueError("`Kc`: tiny_solve needs float32/float64 matrices of at most "
                         f"{MAX_SIZE} x {MAX_SIZE} on CUDA (or the Triton interpreter), with "
                         "Triton installed")
    batch, n, m = Kc.shape[:-2], Kc.shape[-2], Kc.shape[-1]
    B = math.prod(batch)
    X = Kc.reshape(B, n, m).contiguous()

    def flat(t: Tensor, k: int) -> Tensor:
        return t.to(Kc.dtype).expand(batch + (k,)).reshape(B, k).contiguous()

    la, lb = flat(loga, n), flat(logb, m)
    F = flat(F0, n).clone()
    G = flat(G0, m).clone()
    P = torch.empty_like(X)
    if B:
        BN, BM = _pow2(n), _pow2(m)
        BB = max(1, _ELEMENTS_PER_PROGRAM // (BN * BM))
        grid = ((B + BB - 1) // BB,)
        _kernel(_interpreting())[grid](X, la, lb, F, G, P, B, n, m, N_ITER=int(n_iter), BB=BB, BN=BN, BM=BM)
    return F.reshape(batch + (n,)), G.reshape(batch + (m,)), P.reshape(batch + (n, m))
