"""Drop-in doubly-stochastic modules: mHC hyper-connections and a small character-level GPT."""

from .hyper import (HyperConnections, collapse_streams, depth_product, depth_product_sigma2,
                    expand_streams, identity_distance)
from .gpt import GPT, GPTConfig, load_corpus
from . import hyper, gpt, corpus
