"""Run profiles of the book and the per-chapter sizes they imply.

Every chapter's ``parameters`` cell sets ``PROFILE`` (default: the environment variable
``BOOK_PROFILE``, else ``"ci"``); a later cell calls :func:`sizes` so that the sizes follow a papermill
override of ``PROFILE``.

* ``ci``: CPU-sized. The whole book executes in about ten minutes on two cores; the golden outputs
  that ``nbval`` compares against are recorded with this profile on the CPU.
* ``full``: GPU-sized, the paper-scale runs.

Each chapter owns one entry of :data:`TABLE`, keyed by the chapter's file stem.
"""

from __future__ import annotations

import os
from types import MappingProxyType
from typing import Any, Dict, Mapping

__all__ = ["PROFILES", "TABLE", "default_profile", "sizes"]

PROFILES = ("ci", "full")

# One entry per chapter: {"ci": {...}, "full": {...}}. Keep the keys identical across profiles.
TABLE: Dict[str, Dict[str, Dict[str, Any]]] = {
    "00_preface": {
        "ci": {"n": 8, "tau": 0.5},
        "full": {"n": 8, "tau": 0.5},
    },
    "01_birkhoff": {
        "ci": {"n_decomp": 6, "n_grid": (4, 16, 64), "taus": (0.3, 1.0, 3.0), "trials": 5},
        "full": {"n_decomp": 12, "n_grid": (4, 16, 64, 256), "taus": (0.3, 1.0, 3.0), "trials": 20},
    },
    "02_sinkhorn": {
        "ci": {"n": 64, "eps_grid": 12, "bench_sizes": (64, 256), "bench_reps": 3, "batch_tiny": 4096},
        "full": {"n": 512, "eps_grid": 20, "bench_sizes": (256, 1024, 4096), "bench_reps": 10, "batch_tiny": 65536},
    },
    "03_entropy_sigma2": {
        "ci": {},
        "full": {},
    },
    "04_effective_depth": {
        "ci": {},
        "full": {},
    },
    "05_low_pass": {
        "ci": {},
        "full": {},
    },
    "06_snr_orthogonal_collapse": {
        "ci": {},
        "full": {},
    },
    "07_layernorm": {
        "ci": {},
        "full": {},
    },
    "08_residual_stagnation": {
        "ci": {},
        "full": {},
    },
    "09_dsm_vs_softmax": {
        "ci": {},
        "full": {},
    },
    "09b_tradeoff": {
        "ci": {},
        "full": {},
    },
    "10_sensitivity": {
        "ci": {},
        "full": {},
    },
    "11_contraction_resolvent": {
        "ci": {},
        "full": {},
    },
    "12_speed_limit": {
        "ci": {},
        "full": {},
    },
    "13_eph_asc": {
        "ci": {},
        "full": {},
    },
    "14_premature_collapse": {
        "ci": {},
        "full": {},
    },
}


def default_profile() -> str:
    """``$BOOK_PROFILE`` if set, else ``"ci"``."""
    return os.environ.get("BOOK_PROFILE", "ci")


def sizes(chapter: str, profile: str) -> Mapping[str, Any]:
    """The sizes of ``chapter`` under ``profile`` (read-only mapping).

    Raises
    ------
    ValueError
        For an unknown profile or chapter.
    """
    if profile not in PROFILES:
        raise ValueError(f"`profile` must be one of {PROFILES}; got {profile!r}")
    if chapter not in TABLE:
        raise ValueError(f"`chapter` {chapter!r} has no entry in bistochastic.profiles.TABLE")
    return MappingProxyType(dict(TABLE[chapter][profile]))
