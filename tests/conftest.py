"""Shared test configuration."""

import torch

# One intra-op thread: deterministic reductions, and no oversubscription when suites run side by side.
torch.set_num_threads(1)
