"""Shared test configuration."""

import os

import torch

# Without a GPU, Triton kernels can only run in Triton's interpreter, which must be chosen before
# Triton is first imported (its standard library is defined at import): tests/test_triton.py runs
# the tiny-batch kernel this way. On a CUDA machine the kernels are compiled as users get them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread: deterministic reductions, and no oversubscription when suites run side by side.
torch.set_num_threads(1)
