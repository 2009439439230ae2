"""Adaptive over-relaxation of Sinkhorn updates: one rule for the eager engines and the fused path."""

from __future__ import annotations

import math
from typing import Optional, Tuple

from torch import Tensor


def omega_from_rate(rate: float) -> float:
    """Optimal over-relaxation for a linear rate ``rate`` (Lehmann et al. 2021), clipped to [1, 1.9]."""
    if not math.isfinite(rate) or rate <= 0:
        return 1.0
    rate = min(rate, 0.9999)
    return float(min(max(2.0 / (1.0 + math.sqrt(1.0 - rate)), 1.0), 1.9))


def adapt(err: Tensor, err_prev: Optional[float], k: int, omega: float) -> Tuple[float, float]:
    """The next ``(omega, err_prev)`` after a check: ``err`` (batch,) the marginal errors now,
    ``err_prev`` the largest at the previous check, ``k`` iterations between them. The observed
    per-iteration rate of the worst problem sets ω for the next block (ω = 1 if the error grew)."""
    emax = float(err.max())
    if err_prev is not None and err_prev > 0 and emax > 0:
        rate = (emax / err_prev) ** (1.0 / k)
        omega = omega_from_rate(rate * rate) if rate < 1.0 else 1.0
    return omega, emax
