"""Test matrices with known spectra, shared by the algorithm tests (dense float64 oracles)."""

from __future__ import annotations

import functools

import numpy as np

import curvop


@functools.lru_cache(maxsize=None)
def wishart(n: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``A = GᵀG`` with ``G`` an ``n × n`` standard normal matrix; eigenvalues descending."""
    G = np.random.default_rng(seed).standard_normal((n, n))
    A = G.T @ G
    return A, np.linalg.eigvalsh(A)[::-1]


@functools.lru_cache(maxsize=None)
def with_spectrum(lam: tuple, seed: int = 0) -> np.ndarray:
    """``Q diag(lam) Qᵀ`` with a random orthogonal ``Q``."""
    lam = np.asarray(lam)
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((lam.size, lam.size)))
    return (Q * lam) @ Q.T


def operator(A: np.ndarray, kind: str):
    """``A`` as given (numpy) or as a curvop operator over a float64 torch tensor (native path)."""
    if kind == "numpy":
        return A
    import torch

    return curvop.aslinearoperator(torch.as_tensor(A))


def is_native(x, kind: str) -> bool:
    if kind == "numpy":
        return isinstance(x, np.ndarray)
    import torch

    return isinstance(x, torch.Tensor)


KINDS = ["numpy", "torch"]
