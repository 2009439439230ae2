"""Chapter setup: profile, device and reproducible random numbers.

CPU and GPU draw different numbers from the same seed, so every random tensor in the book is drawn
from a seeded CPU generator and then moved to the device (:meth:`ChapterSetup.randn`).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from . import profiles

__all__ = ["ChapterSetup", "resolve_device", "setup", "round_sig", "glue", "table"]


def round_sig(x: Any, sig: int = 4) -> Any:
    """Round a float (or every float inside a list, tuple or dict) to ``sig`` significant digits.

    Golden outputs must read the same on any CPU: the last digits of a float depend on the vector
    kernels torch and numpy pick for the machine, so the book never shows or glues more digits than
    the text means. Integers, bools, strings and ``None`` pass through unchanged; numpy and torch
    scalars become plain Python numbers. Non-finite floats pass through.
    """
    if isinstance(sig, bool) or not isinstance(sig, int) or sig < 1:
        raise ValueError(f"sig must be a positive int, got {sig!r}")
    if isinstance(x, (bool, str)) or x is None:
        return x
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise TypeError("x: round_sig takes scalars (or containers of scalars), not a tensor of "
                            f"shape {tuple(x.shape)}")
        x = x.item()
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, int):
        return x
    if isinstance(x, float):
        if x == 0.0 or not np.isfinite(x):
            return x
        return float(f"{x:.{sig - 1}e}")
    if isinstance(x, (list, tuple)):
        return type(x)(round_sig(v, sig) for v in x)
    if isinstance(x, dict):
        return {k: round_sig(v, sig) for k, v in x.items()}
    return x


def glue(name: str, value: Any, sig: int = 4, display: bool = False) -> None:
    """Glue ``value`` for the text (``{glue:text}`name:.3g```), floats rounded to ``sig`` digits.

    The one way chapters glue numbers: it wraps :func:`myst_nb.glue` and applies :func:`round_sig`,
    so a glued float never carries machine-specific last digits into the golden outputs. Figures
    and other objects are glued unchanged. ``display=False`` (the default) shows nothing in the
    notebook; the value appears where the text references it.
    """
    from myst_nb import glue as _glue

    if isinstance(value, (float, int, np.generic, torch.Tensor, list, tuple, dict)):
        value = round_sig(value, sig)
    _glue(name, value, display=display)


def table(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None,
          sig: int = 3) -> Any:
    """A Markdown table of ``rows`` (dicts sharing keys), floats at ``sig`` significant digits.

    Returns an ``IPython.display.Markdown`` object: the book renders it as a real table (no
    horizontal scroll, no cut columns), and its plain-text form, which nbval compares, holds no
    machine-specific digits. ``columns`` picks and orders the keys (default: the first row's keys).
    """
    from IPython.display import Markdown

    if not rows:
        raise ValueError("rows: need at least one row")
    cols = list(columns) if columns is not None else list(rows[0].keys())

    def cell(v: Any) -> str:
        v = round_sig(v, sig)
        if isinstance(v, float):
            return f"{v:.{sig}g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |")
    return Markdown("\n".join(lines))


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` means CUDA when present, else the CPU.

    A device that this machine does not have (``"cuda"`` without CUDA, ``"cuda:3"`` on a one-GPU
    machine, ``"mps"`` off Apple silicon) raises ``ValueError`` naming ``device`` here, at setup,
    rather than at the first tensor moved there.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"`device` {device!r} is not a torch device: {exc}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"`device` {device!r} asked for CUDA, but CUDA is not available here; "
                             "use device='auto' or 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"`device` {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"`device` {device!r} asked for MPS, which is not available here")
    elif dev.type == "meta":
        raise ValueError("`device` 'meta' holds no data; a chapter needs 'cpu', 'cuda' or 'auto'")
    return dev


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
        """Standard normal draws from the CPU generator, moved to :attr:`device`.

        Always drawn in float64 and then cast: torch's vectorised float32 normal sampler gives other
        last bits on CPUs with other instruction sets, the float64 one does not.
        """
        g = self.generator if generator is None else generator
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype,
                                                                         device=self.device)

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
    from .plotting import use_style  # matplotlib and seaborn: the [plot] extra, the book has it

    use_style()
    return ChapterSetup(
        chapter=chapter, profile=profile, seed=int(seed), device=dev, sizes=sz,
        generator=torch.Generator().manual_seed(int(seed)), rng=np.random.default_rng(seed),
    )
