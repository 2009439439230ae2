"""Chapter setup: profile, device and reproducible random numbers.

CPU and GPU draw different numbers from the same seed, so every random tensor in the book is drawn
from a seeded CPU generator and then moved to the device (:meth:`ChapterSetup.randn`).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
import torch

from . import profiles
from .plotting import use_style

__all__ = ["ChapterSetup", "resolve_device", "setup"]


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` means CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class ChapterSetup:
    """What a chapter needs after its parameters cell.

    Attributes: ``chapter``, ``profile``, ``seed``, ``device``, ``sizes`` (read-only mapping),
    ``generator`` (a seeded CPU ``torch.Generator``) and ``rng`` (a seeded ``numpy.random.Generator``).
    """

    chapter: str
    profile: str
    seed: int
    device: torch.device
    sizes: Mapping[str, Any]
    generator: torch.Generator = field(repr=False)
    rng: np.random.Generator = field(repr=False)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float64,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Standard normal draws from the CPU generator, moved to :attr:`device`."""
        g = self.generator if generator is None else generator
        return torch.randn(*shape, generator=g, dtype=dtype).to(self.device)

    def rand(self, *shape: int, dtype: torch.dtype = torch.float64,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Uniform [0, 1) draws from the CPU generator, moved to :attr:`device`."""
        g = self.generator if generator is None else generator
        return torch.rand(*shape, generator=g, dtype=dtype).to(self.device)

    def child_generator(self, offset: int) -> torch.Generator:
        """A fresh CPU generator seeded with ``seed + offset`` (independent streams per experiment)."""
        return torch.Generator().manual_seed(self.seed + int(offset))

    def __repr__(self) -> str:
        return (f"ChapterSetup(chapter={self.chapter!r}, profile={self.profile!r}, seed={self.seed}, "
                f"device={self.device.type!r})")


def setup(chapter: str, profile: str = "ci", seed: int = 0, device: str = "auto",
          threads: Optional[int] = None) -> ChapterSetup:
    """Resolve the profile and device, seed every generator and apply the book's figure style.

    CPU work runs on ``threads`` intra-op threads (default: ``$BOOK_THREADS``, else 1). One thread
    makes every floating-point reduction independent of the machine's core count, so the golden
    outputs are reproducible anywhere; the chapters' problems are small enough that more threads
    would mostly add synchronisation overhead.
    """
    sz = profiles.sizes(chapter, profile)
    dev = resolve_device(device)
    if threads is None:
        threads = int(os.environ.get("BOOK_THREADS", "1"))
    torch.set_num_threads(max(1, int(threads)))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    use_style()
    return ChapterSetup(
        chapter=chapter, profile=profile, seed=int(seed), device=dev, sizes=sz,
        generator=torch.Generator().manual_seed(int(seed)), rng=np.random.default_rng(seed),
    )
