"""Doubly-stochastic layers as ``torch.nn`` modules, and hooks that diagnose them during training.

* :class:`SinkhornAttention` -- multi-head attention with Sinkhorn or Softmax weights, free or
  frozen logit scale, key padding masks (causal masks refused, with the reason)
* :class:`SinkhornEncoder` -- a pre-LayerNorm encoder built from it (for the training chapters),
  and :class:`Ensemble` to train several seeds of one model as one tensor program
* :func:`train_run` -- the ranking task (:func:`ranking_batch`) trained for several seeds and
  temperatures at once, with per-layer diagnostics at checkpoints (Chapter 15)
* :class:`Diagnostics` -- forward hooks recording per-layer σ₂, logit spread (effective
  temperature), token spread of the residual stream and gradient norms
"""

from .attention import CAUSAL_REFUSAL, SinkhornAttention, dsm_attention_weights
from .diagnostics import Diagnostics, is_mixing_module, mixing_metrics, token_spread, valid_blocks
from .encoder import Ensemble, SinkhornEncoder
from .experiments import RunResult, no_attention_floor, ranking_batch, train_run

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
]
