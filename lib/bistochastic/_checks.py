"""Argument checks shared by the modules (one message format for the whole library)."""

from __future__ import annotations

import math


def positive_finite(name: str, x) -> float:
    """``float(x)`` if it is a positive finite number, else ``ValueError`` naming ``name``."""
    try:
        v = float(x)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"`{name}` must be a positive finite number; got {x!r}") from exc
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"`{name}` must be a positive finite number; got {x!r}")
    return v
