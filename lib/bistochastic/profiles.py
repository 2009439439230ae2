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
        "ci": {"n": 8, "tau": 0.5, "tau_hi": 5.0},
        "full": {"n": 8, "tau": 0.5, "tau_hi": 5.0},
    },
    "01_birkhoff": {
        "ci": {"n_decomp": 6, "n_counts": (2, 3, 4, 5, 6, 7, 8), "count_trials": 4, "n_bary": 4,
               "n_dim_max": 5, "n_entropy": 16, "n_taus_entropy": 11, "entropy_trials": 5,
               "n_grid": (4, 16, 64), "taus": (0.3, 1.0, 3.0), "trials": 5},
        "full": {"n_decomp": 12, "n_counts": (2, 3, 4, 6, 8, 10, 12, 16), "count_trials": 20, "n_bary": 6,
                 "n_dim_max": 6, "n_entropy": 64, "n_taus_entropy": 21, "entropy_trials": 20,
                 "n_grid": (4, 16, 64, 256), "taus": (0.3, 1.0, 3.0), "trials": 20},
    },
    "02_sinkhorn": {
        "ci": {"n": 64, "eps_grid": 13, "bench_sizes": (64, 256), "bench_reps": 1, "batch_tiny": 4096},
        "full": {"n": 256, "eps_grid": 25, "bench_sizes": (256, 1024, 4096), "bench_reps": 5, "batch_tiny": 65536},
    },
    "03_entropy_sigma2": {
        "ci": {"ns": (16, 32, 64), "tau_min": 0.1, "tau_max": 100.0, "n_tau": 12, "trials": 2,
               "tol": 1e-9, "max_iter": 400, "n_block": 64},
        "full": {"ns": (16, 64, 256, 1024), "tau_min": 0.05, "tau_max": 100.0, "n_tau": 25, "trials": 8,
                 "tol": 1e-10, "max_iter": 20000, "n_block": 1024},
    },
    "04_effective_depth": {
        "ci": {"n": 48, "d": 16, "taus": (0.3, 1.0, 3.0), "L": 24, "deltas": (1e-1, 1e-2, 1e-3),
               "tol": 1e-10, "pos_n": 24, "pos_taus": (0.05, 10.0, 8), "pairs": 100, "n_pair": 12},
        "full": {"n": 256, "d": 128, "taus": (0.3, 1.0, 3.0), "L": 64, "deltas": (1e-1, 1e-2, 1e-3),
                 "tol": 1e-12, "pos_n": 128, "pos_taus": (0.02, 10.0, 20), "pairs": 2000, "n_pair": 64},
    },
    "05_low_pass": {
        "ci": {"n": 64, "eps": (1e-3, 3e-3, 1e-2, 3e-2, 0.1), "eps_tone": 0.003, "tones": (2, 8), "L_tone": 8,
               "tau_rand": 0.5, "trials": 3, "schur_draws": 300},
        "full": {"n": 256, "eps": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1), "eps_tone": 0.003, "tones": (4, 40),
                 "L_tone": 16, "tau_rand": 0.5, "trials": 20, "schur_draws": 3000},
    },
    "06_snr_orthogonal_collapse": {
        "ci": {"ns": (4, 16, 64, 256), "n_snr": 17, "xs": (1.0, 3.0), "trials": 20000,
               "n_prop": 128, "layers_prop": 10, "taus_prop": (0.3, 1.0), "eta": 0.01, "trials_prop": 1000},
        "full": {"ns": (4, 16, 64, 256, 1024, 4096), "n_snr": 33, "xs": (1.0, 3.0), "trials": 200000,
                 "n_prop": 1024, "layers_prop": 16, "taus_prop": (0.3, 1.0), "eta": 0.01, "trials_prop": 10000},
    },
    "07_layernorm": {
        "ci": {"n": 64, "d": 32, "layers": 12, "tau": 1.0, "eta": 1e-6, "n_check": 2000},
        "full": {"n": 256, "d": 128, "layers": 16, "tau": 1.0, "eta": 1e-6, "n_check": 100000},
    },
    "08_residual_stagnation": {
        "ci": {"n": 64, "layers": 32, "tau": 10.0, "alphas": (0.01, 0.05, 0.1, 0.3, 0.5), "n_alpha_grid": 13,
               "d_branch": 16, "taus_branch": (0.3, 1.0, 10.0), "layers_branch": 16,
               "n_jac": 12, "jac_tau_range": (0.1, 100.0), "n_jac_tau": 10,
               "mhc_tau_range": (0.03, 10.0), "n_mhc_tau": 41, "mhc_layers": 16, "mhc_iters": 20},
        "full": {"n": 256, "layers": 32, "tau": 10.0, "alphas": (0.01, 0.05, 0.1, 0.3, 0.5), "n_alpha_grid": 41,
                 "d_branch": 128, "taus_branch": (0.3, 1.0, 10.0), "layers_branch": 64,
                 "n_jac": 32, "jac_tau_range": (0.1, 100.0), "n_jac_tau": 30,
                 "mhc_tau_range": (0.03, 10.0), "n_mhc_tau": 121, "mhc_layers": 64, "mhc_iters": 20},
    },
    "09_dsm_vs_softmax": {
        "ci": {"n": 32, "seeds": 3, "layers": 16, "tau_range": (0.25, 30.0), "n_tau": 9,
               "fixed_taus": (0.02, 0.05, 0.1, 0.2, 0.5, 1.0), "fixed_iters": 20, "fixed_batch": 8},
        "full": {"n": 128, "seeds": 10, "layers": 16, "tau_range": (0.25, 30.0), "n_tau": 21,
                 "fixed_taus": (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0), "fixed_iters": 20, "fixed_batch": 64},
    },
    "09b_tradeoff": {
        "ci": {"n": 16, "tau_min": 0.1, "tau_max": 30.0, "n_tau": 11, "trials": 3, "tol": 1e-10,
               "max_iter": 4000},
        "full": {"n": 32, "tau_min": 0.03, "tau_max": 100.0, "n_tau": 25, "trials": 10, "tol": 1e-12,
                 "max_iter": 200000},
    },
    "10_sensitivity": {
        "ci": {"n": 6, "tie_scale": 1e-3, "eps_top": 31.6, "gap_depth": 30.0, "n_eps": 37,
               "fd_eps": 0.1, "fd_h": 1e-6, "unit_scale": 10.0},
        "full": {"n": 6, "tie_scale": 1e-3, "eps_top": 100.0, "gap_depth": 30.0, "n_eps": 81,
                 "fd_eps": 0.1, "fd_h": 1e-6, "unit_scale": 10.0},
    },
    "11_contraction_resolvent": {
        "ci": {"sizes": (10, 50), "eps_max": 3.16, "eps_min": 0.02, "n_eps": 23,
               "nonuniform_spread": 4.0, "nn_eps_min": 0.05, "k_max": 50},
        "full": {"sizes": (10, 50, 200), "eps_max": 3.16, "eps_min": 0.01, "n_eps": 45,
                 "nonuniform_spread": 4.0, "nn_eps_min": 0.05, "k_max": 100},
    },
    "12_speed_limit": {
        "ci": {"n": 30, "shift_eps": (1.0, 0.1), "n_shift": 14, "alphas": (0.9, 0.95, 0.99),
               "track_eps_min": 0.1, "K": 20, "hyper_ks": (0.5, 2.0), "k_law": 0.5, "rec_eps": 0.2,
               "gap_eps": (1.0, 0.05), "n_gap": 25, "seeds": 5, "budgets": (5, 10, 20, 40), "sl_steps": 80},
        "full": {"n": 30, "shift_eps": (1.0, 0.05), "n_shift": 40, "alphas": (0.9, 0.95, 0.99),
                 "track_eps_min": 0.06, "K": 20, "hyper_ks": (0.5, 2.0), "k_law": 0.5, "rec_eps": 0.2,
                 "gap_eps": (1.0, 0.05), "n_gap": 50, "seeds": 30, "sl_steps": 300,
                 "budgets": (5, 7, 9, 13, 18, 26, 36, 51, 72, 100, 140)},
    },
    "13_eph_asc": {
        "ci": {"n_fixed": 10, "fixed_steps": 200, "demo_n": 10, "demo_epochs": 100, "demo_ks": (0.1, 0.5, 1.0, 2.0, 4.0),
               "calib_n": (10, 20), "calib_b": 4, "batch_sizes": (1, 4, 16), "bench_n": (10, 64, 256, 512),
               "bench_b": 4, "bench_reps": 3, "e_tol": 1e-3, "substeps": 4, "e_tols": (1e-3, 3e-4, 1e-4)},
        "full": {"n_fixed": 10, "fixed_steps": 300, "demo_n": 10, "demo_epochs": 100,
                 "demo_ks": (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0), "calib_n": (10, 20, 50), "calib_b": 32,
                 "batch_sizes": (1, 4, 16, 64, 256), "bench_n": (10, 64, 256, 512), "bench_b": 32, "bench_reps": 10,
                 "e_tol": 1e-3, "substeps": 8, "e_tols": (1e-3, 3e-4, 1e-4)},
    },
    "14_premature_collapse": {
        "ci": {"n": 8, "d": 8, "batch": 4, "test_batch": 24, "sigma": 0.5, "epochs": 100, "lr": 0.01,
               "init_scale": 1.0, "seeds": 12, "eps0": 1.0, "eps_min": 0.01, "t_floor": 90,
               "cal_eps_min": 0.2, "cal_seed": 1000, "ks": (0.03, 0.06, 0.125, 0.25, 0.5, 1.0, 2.0),
               "paper": {"n": 10, "epochs": 50, "k": 0.5, "seeds": 12}, "n_solver_eps": 25,
               "converged_iter": 3000},
        "full": {"n": 16, "d": 16, "batch": 16, "test_batch": 128, "sigma": 0.5, "epochs": 200, "lr": 0.01,
                 "init_scale": 1.0, "seeds": 30, "eps0": 1.0, "eps_min": 0.01, "t_floor": 90,
                 "cal_eps_min": 0.05, "cal_seed": 1000,
                 "ks": (0.015, 0.03, 0.045, 0.06, 0.09, 0.125, 0.18, 0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 4.0),
                 "paper": {"n": 10, "epochs": 50, "k": 0.5, "seeds": 30}, "n_solver_eps": 49,
                 "converged_iter": 20000},
    },
    "14b_annealing_task": {
        "ci": {"n": 16, "d": 8, "batch": 8, "probe_batch": 8, "test_batch": 64, "sigma": 0.01,
               "nuisance": 1.0, "steps": 100, "lr": 0.05, "n_iter": 50, "seeds": 5,
               "eps0": 1.0, "eps_min": 0.05, "alpha": 0.95, "t_floor": 80, "k": 0.1,
               "ks": (0.05, 0.2, 0.4, 0.8), "tost_margin": 0.05},
        "full": {"n": 32, "d": 16, "batch": 64, "probe_batch": 32, "test_batch": 512,
                 "sigma": 0.01, "nuisance": 1.0, "steps": 600, "lr": 0.05, "n_iter": 50,
                 "seeds": 20, "eps0": 1.0, "eps_min": 0.05, "alpha": 0.99, "t_floor": 480,
                 "k": 0.1, "ks": (0.025, 0.05, 0.2, 0.4, 0.8, 1.6), "tost_margin": 0.05},
    },
    "16_mhc_language_model": {
        "ci": {"max_chars": 400_000, "block": 32, "layers": 2, "heads": 2, "width": 32,
               "batch": 8, "steps": 80, "lr": 3e-3, "eval_every": 20, "n_iter": 20, "seeds": 3,
               "tau_range": (0.05, 10.0), "n_taus": 10, "sigma2_level": 0.5,
               "sym_steps": 30, "tost_margin": 0.05},
        "full": {"max_chars": None, "block": 128, "layers": 6, "heads": 4, "width": 128,
                 "batch": 64, "steps": 3000, "lr": 1e-3, "eval_every": 250, "n_iter": 20,
                 "seeds": 5, "tau_range": (0.05, 10.0), "n_taus": 16, "sigma2_level": 0.5,
                 "sym_steps": 200,
                 "tost_margin": 0.05},
    },
    "15_sinkhorn_attention": {
        "ci": {"T": 8, "d": 32, "heads": 2, "batch": 16, "steps": 60, "lr": 5e-3, "n_iter": 8,
               "taus": (10.0,), "seeds": (0, 1, 2), "depths": (1, 2, 4, 8), "test_size": 256,
               "n_checkpoints": 3, "sweep_taus": (0.1, 1000.0, 9),
               "pc_T": 12, "pc_batch": 32, "pc_steps": 120, "pc_lr": 1e-2, "pc_taus": (1.0, 10.0),
               "pc_test": 512},
        "full": {"T": 16, "d": 64, "heads": 4, "batch": 128, "steps": 2000, "lr": 1e-3, "n_iter": 20,
                 "taus": (10.0,), "seeds": tuple(range(10)), "depths": (1, 2, 4, 8),
                 "test_size": 4096, "n_checkpoints": 20, "sweep_taus": (0.1, 1000.0, 25),
                 "pc_T": 32, "pc_batch": 128, "pc_steps": 2000, "pc_lr": 1e-3,
                 "pc_taus": (1.0, 10.0), "pc_test": 4096},
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
