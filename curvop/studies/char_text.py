"""A character-level language-modelling task on text that ships with Python: the standard library's docstrings.

Nothing is downloaded: :func:`corpus` joins the docstrings of a fixed list of standard-library
modules and of their public functions and classes (their text depends on the Python version), keeps
printable ASCII, and :func:`encode` maps it to 96 token ids. :func:`transformer` is a small causal
transformer written with explicit attention (``softmax(QKᵀ/√d)V``), so that every optimizer,
including a hand-written double backward, can differentiate it twice.
"""

from __future__ import annotations

import importlib
import inspect
import string
from typing import Any

import numpy as np

__all__ = ["MODULES", "VOCAB", "corpus", "encode", "batches", "transformer"]

#: The modules whose docstrings make the text (in this order).
MODULES = ("collections", "functools", "itertools", "json", "argparse", "textwrap", "string", "re", "pathlib",
           "random", "statistics", "heapq", "bisect", "contextlib", "dataclasses", "enum", "fractions",
           "decimal", "shutil", "tempfile", "csv", "datetime", "calendar", "difflib", "pprint", "abc", "copy",
           "operator", "math")
#: The 96 characters kept: printable ASCII and the newline.
VOCAB = "".join(sorted(set(string.printable) - set("\t\r\x0b\x0c")))


def corpus() -> str:
    """The docstrings of :data:`MODULES` and of their public functions and classes, joined."""
    parts = []
    for name in MODULES:
        mod = importlib.import_module(name)
        parts.append(mod.__doc__ or "")
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr)
            doc = getattr(obj, "__doc__", None)
            if (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)) and isinstance(doc, str):
                parts.append(doc)
    keep = set(VOCAB)
    return "".join(ch for ch in "\n\n".join(parts) if ch in keep)


def encode(text: str) -> np.ndarray:
    """Token ids (int64) of ``text`` in :data:`VOCAB`."""
    table = {ch: i for i, ch in enumerate(VOCAB)}
    return np.fromiter((table[ch] for ch in text), dtype=np.int64, count=len(text))


def batches(ids: np.ndarray, *, context: int, batch_size: int, seed: int) -> Any:
    """An endless stream of ``(inputs, targets)`` torch batches of random windows (seeded)."""
    import torch

    rng = np.random.default_rng(seed)
    data = torch.from_numpy(ids)
    while True:
        starts = torch.from_numpy(rng.integers(0, len(ids) - context - 1, batch_size))
        idx = starts[:, None] + torch.arange(context + 1)
        window = data[idx]
        yield window[:, :-1], window[:, 1:]


def transformer(*, d: int = 32, layers: int = 2, heads: int = 2, context: int = 32, vocab: int = len(VOCAB)) -> Any:
    """A causal character transformer (pre-LayerNorm blocks, GELU MLP); logits ``(B, T, vocab)``."""
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.register_buffer("mask", torch.ones(context, context, dtype=torch.bool).triu(1), persistent=False)

        def forward(self, x: Any) -> Any:
            B, T, _ = x.shape
            q, k, v = self.qkv(x).view(B, T, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            att = (q @ k.transpose(-1, -2)) * (d // heads) ** -0.5
            att = att.masked_fill(self.mask[:T, :T], float("-inf")).softmax(-1)
            return self.out((att @ v).transpose(1, 2).reshape(B, T, d))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.att, self.ln2 = nn.LayerNorm(d), Attention(), nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x: Any) -> Any:
            x = x + self.att(self.ln1(x))
            return x + self.mlp(self.ln2(x))

    class CharTransformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(context, d))
            self.blocks = nn.Sequential(*[Block() for _ in range(layers)])
            self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

        def forward(self, idx: Any) -> Any:
            x = self.tok(idx) + self.pos[: idx.shape[1]]
            return self.head(self.ln(self.blocks(x)))

    return CharTransformer()
