"""Sharded vectors for the algorithms: torch ``DTensor`` s whose reductions are all-reduced by DTensor.

A vector of an FSDP operator (:mod:`curvop.backends.torch.fsdp`) is a ``DTensor`` of global shape
``(n,)`` (or ``(n, k)``) with placement ``Shard(0)`` on a 1-D device mesh: each rank holds its own
parameter shards, concatenated. Elementwise arithmetic on such vectors is local. A reduction over
the sharded axis (``sum``, ``x.T @ y``) gives a DTensor with a ``Partial`` placement, which DTensor
all-reduces when it is made whole (``full_tensor``): the framework's own engine does the
communication.

DTensor alone does not carry curvop's algorithms (measured, torch 2.13, gloo): ``float(sum(x * y))``
of a ``Partial`` result is the *local* sum (silently wrong), ``.numpy()`` refuses DTensors, host
coefficients (plain tensors) cannot be mixed with DTensors, and ``linalg.qr`` gathers the whole
matrix on every rank. :class:`ShardedNamespace` is the array namespace :mod:`curvop.arrays` uses for
these vectors (through the ``register_namespace`` hook): reductions over the sharded axis come back
whole (a plain, replicated tensor, the same on every rank), host coefficients become replicated
DTensors, QR is a shifted Cholesky QR (a ``k x k`` all-reduced Gram matrix, no gather), and basis
storage is sharded along its vector axis.

This module imports no framework at import time.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

__all__ = ["ShardedNamespace", "namespace_for", "register", "hook_installed"]

#: the layouts of live FSDP operators: (id(mesh), n, n_local) -> namespace
_LAYOUTS: dict[tuple[int, int, int], "ShardedNamespace"] = {}


def _dtensor_type() -> Any:
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def _sharded_dim(x: Any) -> int | None:
    for p in x.placements:
        if p.is_shard():
            return p.dim
    return None


def namespace_for(x: Any) -> "ShardedNamespace | None":
    """The namespace of a sharded curvop vector (a DTensor of a registered layout), else ``None``.

    This is the function :func:`curvop.arrays.register_namespace` is given.
    """
    DTensor = _dtensor_type()
    if DTensor is None or not isinstance(x, DTensor):
        return None
    dim = _sharded_dim(x)
    if dim is None:
        return None
    return _LAYOUTS.get((id(x.device_mesh), int(x.shape[dim]), int(x.to_local().shape[dim])))


def hook_installed() -> bool:
    """True when :mod:`curvop.arrays` consults :func:`namespace_for` (the ``register_namespace`` hook)."""
    from curvop import arrays

    return namespace_for in getattr(arrays, "_NAMESPACE_HOOKS", ())


def register(ns: "ShardedNamespace") -> None:
    """Make ``ns`` the namespace of its layout and install the hook in :mod:`curvop.arrays` if it has one."""
    _LAYOUTS[(id(ns.mesh), ns.n, ns.n_local)] = ns
    from curvop import arrays

    reg = getattr(arrays, "register_namespace", None)
    if reg is not None and not hook_installed():
        reg(namespace_for)


class _Linalg:
    def __init__(self, ns: "ShardedNamespace") -> None:
        self._ns = ns

    def qr(self, v: Any) -> tuple[Any, Any]:
        return self._ns.qr(v)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ns._xp.linalg, name)


class ShardedNamespace:
    """Array namespace for ``Shard(0)`` DTensor vectors of global length ``n`` on a 1-D ``mesh``.

    Everything not defined here is torch's (array-api-compat), which works on DTensors.

    Parameters
    ----------
    mesh : DeviceMesh
        The 1-D mesh the parameters are sharded over.
    n : int
        The global vector length (the number of parameters).
    n_local : int
        This rank's share of it (its parameter shards, concatenated).
    """

    def __init__(self, mesh: Any, n: int, n_local: int) -> None:
        import array_api_compat.torch as xp

        self._xp, self.mesh, self.n, self.n_local = xp, mesh, int(n), int(n_local)
        self.linalg = _Linalg(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._xp, name)

    # --- conversions ---------------------------------------------------------------------------
    def is_sharded(self, x: Any) -> bool:
        DTensor = _dtensor_type()
        return DTensor is not None and isinstance(x, DTensor)

    def replicate(self, t: Any) -> Any:
        """A plain tensor (the same on every rank) as a replicated DTensor."""
        from torch.distributed.tensor import DTensor, Replicate

        return t if isinstance(t, DTensor) else DTensor.from_local(t, self.mesh, [Replicate()], run_check=False)

    def shard(self, local: Any, dim: int = 0) -> Any:
        """This rank's piece ``local`` (``n_local`` long along ``dim``) as a sharded DTensor."""
        from torch.distributed.tensor import DTensor, Shard

        shape = list(local.shape)
        shape[dim] = self.n
        stride = [int(np.prod(shape[i + 1:])) for i in range(len(shape))]
        return DTensor.from_local(local, self.mesh, [Shard(dim)], run_check=False, shape=tuple(shape),
                                  stride=tuple(stride))

    def local(self, x: Any) -> Any:
        """This rank's piece of a sharded array (of a replicated one: the whole; a plain tensor as it is)."""
        return x.to_local() if self.is_sharded(x) else x

    def _dim(self, x: Any) -> int | None:
        return _sharded_dim(x) if self.is_sharded(x) else None

    def allreduce(self, t: Any) -> Any:
        """The sum over ranks of the plain tensor ``t`` (DTensor's ``Partial`` made whole), on every rank."""
        from torch.distributed.tensor import DTensor, Partial

        return DTensor.from_local(t, self.mesh, [Partial()], run_check=False).full_tensor()

    # --- the operations that differ from torch's: computed on the local parts ---------------------
    def sum(self, x: Any, axis: Any = None, **kwargs: Any) -> Any:
        d = self._dim(x)
        r = self._xp.sum(self.local(x), axis=axis, **kwargs)
        if d is None:
            return r
        if axis is None or (axis % x.ndim) == d:
            return self.allreduce(r)  # a reduction over the sharded axis: whole, the same on every rank
        if kwargs.get("keepdims"):
            return self.shard(r, d)
        return self.shard(r, d - 1 if (axis % x.ndim) < d else d)

    def matmul(self, a: Any, b: Any) -> Any:
        """``a @ b``: a contraction over the sharded axis is all-reduced (plain result); otherwise the
        result stays sharded along the axis that ``a`` (rows) or ``b`` (columns) is sharded on."""
        da, db = self._dim(a), self._dim(b)
        r = self._xp.matmul(self.local(a), self.local(b))
        if da is not None and db is not None:
            return self.allreduce(r)
        if da is not None:
            if a.ndim < 2 or da != a.ndim - 2:
                raise ValueError("sharded matmul: the left operand is sharded along its contracted axis "
                                 "but the right one is not sharded")
            return self.shard(r, r.ndim - 2)
        if db is not None:
            if db != b.ndim - 1 or b.ndim < 2:
                raise ValueError("sharded matmul: the right operand is sharded along its contracted axis "
                                 "but the left one is not sharded")
            return self.shard(r, r.ndim - 1)
        return r

    def asarray(self, a: Any, dtype: Any = None, device: Any = None, **kwargs: Any) -> Any:
        """Host data (coefficients, scalars) as a replicated DTensor, to combine with sharded vectors."""
        return self.replicate(self._xp.asarray(a, dtype=dtype, device=device, **kwargs))

    def _alloc(self, fn: Any, shape: Any, dtype: Any = None, device: Any = None) -> Any:
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        if len(shape) >= 2 and shape[-1] == self.n:  # basis storage: sharded along the vector axis
            local = fn(shape[:-1] + (self.n_local,), dtype=dtype, device=device)
            return self.shard(local, dim=len(shape) - 1)
        return fn(shape, dtype=dtype, device=device)

    def empty(self, shape: Any, dtype: Any = None, device: Any = None) -> Any:
        return self._alloc(self._xp.empty, shape, dtype, device)

    def zeros(self, shape: Any, dtype: Any = None, device: Any = None) -> Any:
        return self._alloc(self._xp.zeros, shape, dtype, device)

    def qr(self, v: Any) -> tuple[Any, Any]:
        """Thin QR of a sharded ``(n, k)`` matrix by shifted Cholesky QR, three passes.

        Each pass needs the ``k x k`` Gram matrix (one all-reduce); the first adds a small shift so
        the factorisation exists for ill-conditioned ``v`` (Fukaya et al., shifted CholeskyQR3).
        Returns ``(Q, R)`` with ``Q`` sharded like ``v`` and ``R`` a plain ``k x k`` tensor.
        """
        import torch

        if not self.is_sharded(v):
            return self._xp.linalg.qr(v)
        k = v.shape[1]
        eps = float(torch.finfo(v.dtype).eps)
        q, R = v, torch.eye(k, dtype=torch.float64)
        for attempt in range(3):
            G = self.matmul(self._xp.matrix_transpose(q), q).to(torch.float64)
            G = (G + G.T) / 2
            if attempt == 0:
                G = G + 11 * (self.n * k + k * (k + 1)) * eps * torch.trace(G) * torch.eye(k, dtype=G.dtype)
            L, info = torch.linalg.cholesky_ex(G)
            if int(info) != 0:
                raise FloatingPointError(
                    "the Cholesky QR of a sharded block failed: its columns are linearly dependent to "
                    "working precision (e.g. a zero probe or a repeated column)"
                )
            Rk = L.T
            q = self.matmul(q, torch.linalg.inv(Rk).to(v.dtype))
            R = Rk @ R
        return q, R.to(v.dtype)
