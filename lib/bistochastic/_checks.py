"""Argument checks shared by the modules (one message format for the whole library)."""

from __future__ import annotations

import math
import numbers


def positive_finite(name: str, x) -> float:
    """``float(x)`` if it is a positive finite number, else ``ValueError`` naming ``name``."""
    try:
        v = float(x)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"`{name}` must be a positive finite number; got {x!r}") from exc
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"`{name}` must be a positive finite number; got {x!r}")
    return v


def _is_real_number(x) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, numbers.Real):
        return True
    # a one-element real tensor or array (torch, numpy) counts as a number
    return (hasattr(x, "numel") and hasattr(x, "is_complex") and x.numel() == 1
            and not x.is_complex() and not getattr(x, "is_meta", False))


def integer_arg(name: str, x, minimum: int = 1) -> int:
    """``int(x)`` for an integer ``>= minimum`` (an integral float such as ``10.0`` is accepted).

    ``TypeError`` naming ``name`` for a non-number (``None``, a string, a bool); ``ValueError`` for a
    non-integral, infinite or too small number.
    """
    if not _is_real_number(x):
        raise TypeError(f"`{name}` must be an integer >= {minimum}; got {x!r} of type "
                        f"{type(x).__name__}")
    v = float(x)
    if not math.isfinite(v) or v != int(v) or v < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"`{name}` must be {kind}; got {x!r}")
    return int(v)


def nonneg_finite(name: str, x) -> float:
    """``float(x)`` for a finite number ``>= 0``: ``TypeError`` naming ``name`` for a non-number
    (``None``, a string), ``ValueError`` for NaN, inf or a negative value."""
    if not _is_real_number(x):
        raise TypeError(f"`{name}` must be a nonnegative finite number; got {x!r} of type "
                        f"{type(x).__name__}")
    v = float(x)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"`{name}` must be a nonnegative finite number; got {x!r}")
    return v
