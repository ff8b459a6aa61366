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


def orthogonal(n: int, seed: int = 0) -> np.ndarray:
    """A delocalised random orthogonal matrix, cheap to build (no QR of an n × n matrix).

    The orthonormal DCT-II basis (every entry of size about ``1/sqrt(n)``, like a Haar-random
    orthogonal matrix) with random row signs and a random column order.
    """
    rng = np.random.default_rng(seed)
    i = np.arange(n)
    C = np.cos(np.pi * (i[:, None] + 0.5) * i[None, :] / n) * np.sqrt(2.0 / n)
    C[:, 0] /= np.sqrt(2.0)
    return rng.choice([-1.0, 1.0], size=n)[:, None] * C[:, rng.permutation(n)]


@functools.lru_cache(maxsize=None)
def with_spectrum(lam: tuple, seed: int = 0) -> np.ndarray:
    """``Q diag(lam) Qᵀ`` with a random orthogonal ``Q`` (see :func:`orthogonal`)."""
    lam = np.asarray(lam)
    Q = orthogonal(lam.size, seed)
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2


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


class NumpyArrays:
    """The array glue of a small numpy backend on the template (``curvop.backends.template``'s tests):
    put it before ``AutodiffBackend`` in the bases."""

    def _all_finite(self, y):
        return bool(np.isfinite(y).all())

    def is_native(self, x):
        return isinstance(x, np.ndarray)

    def from_numpy(self, a):
        return np.asarray(a, dtype=self.dtype)
