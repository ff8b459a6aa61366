"""The array layer: a handful of framework-free helpers the algorithms are written against.

Every function here takes arrays of any supported framework (numpy, torch, CuPy, JAX, and
TensorFlow through a small adapter) and returns arrays of the same framework, on the same device.
Functions that return host scalars (:func:`dot`, :func:`norm`, :func:`gram`, :func:`column_dots`)
synchronise once, which is what an algorithm that needs a scalar has to do anyway.

Write your own algorithm with these and it runs on every backend:

>>> import numpy as np
>>> from curvop import arrays
>>> x = np.array([3.0, 4.0])
>>> arrays.norm(x)
5.0
>>> q = arrays.orthonormalize(np.array([[1.0, 1.0], [0.0, 1.0]]))
>>> np.allclose(q.T @ q, np.eye(2))
True
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import numpy as np

__all__ = [
    "namespace",
    "is_numpy",
    "to_numpy",
    "asarray_like",
    "dot",
    "norm",
    "gram",
    "column_dots",
    "matmul",
    "stack",
    "concat",
    "orthonormalize",
    "project_out",
    "project_out_each",
    "stack_blocks",
    "random_probes",
    "itemsize",
    "Basis",
    "register_namespace",
]

Array = Any


def _is_tensorflow(x: Array) -> bool:
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(x, (tf.Tensor, tf.Variable))


_NAMESPACE_HOOKS: list[Any] = []


def register_namespace(hook: Any) -> None:
    """Let ``hook(x)`` choose the namespace of arrays it recognises (``None`` for the others).

    Used by backends whose vectors are sharded across processes (:mod:`curvop.backends.torch.fsdp`):
    their namespace reduces over the sharded axis. A namespace may define ``local(x)``, this
    process's part of a sharded array, which :class:`Basis` writes in place.
    """
    if hook not in _NAMESPACE_HOOKS:
        _NAMESPACE_HOOKS.append(hook)


def namespace(x: Array):
    """Return the array namespace of ``x`` (array-API style: ``xp.matmul``, ``xp.linalg.qr``...).

    numpy, torch, CuPy and JAX use `array_api_compat`; TensorFlow tensors get curvop's adapter;
    a namespace registered with :func:`register_namespace` takes the arrays it recognises.
    """
    for hook in _NAMESPACE_HOOKS:
        xp = hook(x)
        if xp is not None:
            return xp
    if isinstance(x, np.ndarray) or np.isscalar(x):
        import array_api_compat.numpy as xp

        return xp
    if _is_tensorflow(x):
        from curvop import _tf_array

        return _tf_array
    import array_api_compat

    try:
        return array_api_compat.array_namespace(x)
    except TypeError as err:
        raise TypeError(
            f"curvop does not know how to compute with arrays of type {type(x).__name__}; "
            "supported are numpy, torch, CuPy, JAX and TensorFlow arrays."
        ) from err


def is_numpy(x: Array) -> bool:
    """True for numpy arrays (and numpy scalars)."""
    return isinstance(x, (np.ndarray, np.generic))


def to_numpy(x: Array) -> np.ndarray:
    """Copy (or share, on CPU) ``x`` into a numpy array on the host.

    CPU torch tensors and CPU JAX arrays share memory with the result where the framework allows
    (DLPack / ``__array__``); device arrays are copied once.
    """
    if isinstance(x, np.ndarray):
        return x
    if _is_tensorflow(x):
        return x.numpy()
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        return x.detach().cpu().numpy()
    if mod == "cupy":
        return x.get()
    # Any other array-API array: DLPack, the standard's interchange protocol. It also reads arrays
    # that refuse implicit conversion (array-api-strict off its CPU device has no __array__ path).
    # numpy reads host memory only, so a device array (a JAX GPU array) fails here: np.asarray.
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError, ValueError):
            pass
    return np.asarray(x)


def asarray_like(a: Array, like: Array) -> Array:
    """Return ``a`` (numpy or native) as an array of ``like``'s framework, dtype and device."""
    if is_numpy(like):
        return np.asarray(to_numpy(a) if not is_numpy(a) else a, dtype=like.dtype)
    xp = namespace(like)
    if not is_numpy(a) and namespace(a) is xp:
        return a
    a = np.ascontiguousarray(to_numpy(a) if not is_numpy(a) else a)
    return xp.asarray(a, dtype=like.dtype, device=_device(like))


def _device(x: Array):
    import array_api_compat

    if _is_tensorflow(x):
        return x.device
    d = array_api_compat.device(x)
    spec = getattr(d, "spec", None)  # a jax.Array sharded over a mesh: small arrays go replicated on it
    return type(d)(d.mesh, type(spec)()) if spec is not None and any(a is not None for a in spec) else d


def dot(x: Array, y: Array) -> float:
    """Inner product of two vectors of the same framework, as a Python float (one sync)."""
    xp = namespace(x)
    return float(xp.sum(x * y))


def norm(x: Array) -> float:
    """Euclidean norm of a vector (or Frobenius norm of a matrix), as a Python float."""
    xp = namespace(x)
    return float(xp.sqrt(xp.sum(x * x)))


def gram(x: Array, y: Array) -> np.ndarray:
    """``x.T @ y`` for ``(n, k)`` and ``(n, m)`` arrays, returned as a float64 numpy ``(k, m)``."""
    xp = namespace(x)
    return np.asarray(to_numpy(xp.matmul(_t(xp, x), y)), dtype=np.float64)


def column_dots(x: Array, y: Array) -> np.ndarray:
    """Per-column inner products ``sum(x * y, axis=0)`` of two ``(n, k)`` arrays, as numpy."""
    xp = namespace(x)
    return np.asarray(to_numpy(xp.sum(x * y, axis=0)), dtype=np.float64)


def matmul(a: Array, b: Array) -> Array:
    """Matrix product in ``a``'s framework; ``b`` may be a small numpy array (it is moved over)."""
    xp = namespace(a)
    return xp.matmul(a, asarray_like(b, a))



def stack(vectors: Sequence[Array], axis: int = 1) -> Array:
    """Stack 1-D vectors into the columns (``axis=1``) or rows of a matrix."""
    xp = namespace(vectors[0])
    return xp.stack(list(vectors), axis=axis)


def concat(arrays: Sequence[Array], axis: int = 1) -> Array:
    """Concatenate arrays along ``axis`` (columns by default)."""
    xp = namespace(arrays[0])
    return xp.concat(list(arrays), axis=axis)


def orthonormalize(v: Array, basis: Array | None = None) -> Array:
    """Orthonormal basis of the columns of ``v`` (thin QR), optionally made orthogonal to ``basis``.

    With ``basis`` (an ``(n, m)`` array with orthonormal columns), the projection is applied twice
    ("twice is enough") before the QR, so the result is orthogonal to ``basis`` to working precision.
    """
    xp = namespace(v)
    if basis is not None:
        v = project_out(project_out(v, basis), basis)
    q, _ = xp.linalg.qr(v)
    return q


def project_out(v: Array, basis: Array) -> Array:
    """``v - basis @ (basis.T @ v)``: remove the components of ``v`` along orthonormal ``basis``."""
    xp = namespace(v)
    return v - xp.matmul(basis, xp.matmul(_t(xp, basis), v))


def project_out_each(w: Array, blocks: Sequence[Array] | Array) -> Array:
    """Column-wise :func:`project_out` for ``p`` independent runs sharing one ``(n, p)`` array.

    Column ``i`` of ``w`` loses its components along column ``i`` of every block in ``blocks``
    (for each ``i`` those columns must be orthonormal). Two batched matrix products, whatever ``p``:
    this is the reorthogonalisation of ``p`` Lanczos runs advanced in lockstep. ``blocks`` may also
    be the stacked ``(p, n, j)`` array :func:`stack_blocks` returns (build it once, use it twice).

    >>> import numpy as np
    >>> from curvop import arrays
    >>> e = np.eye(3)[:, :2]                     # run 0 has basis e0, run 1 has basis e1
    >>> arrays.project_out_each(np.ones((3, 2)), [e])
    array([[0., 1.],
           [1., 0.],
           [1., 1.]])
    """
    xp = namespace(w)
    B = stack_blocks(blocks) if isinstance(blocks, (list, tuple)) else blocks  # (p, n, j)
    wt = _t(xp, w)[:, :, None]  # (p, n, 1)
    return _t(xp, (wt - xp.matmul(B, xp.matmul(_t(xp, B), wt)))[:, :, 0])


def stack_blocks(blocks: Sequence[Array], onto: Array | None = None) -> Array:
    """The ``(n, p)`` blocks as one ``(p, n, j)`` array (run ``i``'s basis is ``[i]``), optionally
    appended to an earlier result ``onto``: one copy per Lanczos step instead of a restack."""
    xp = namespace(blocks[0])
    new = xp.stack([_t(xp, b) for b in blocks], axis=2)
    return new if onto is None else xp.concat([onto, new], axis=2)


def random_probes(
    rng: np.random.Generator | int | None,
    shape: int | tuple[int, ...],
    kind: str = "rademacher",
    dtype: Any = np.float64,
) -> np.ndarray:
    """Random probe vectors on the host, for :func:`asarray_like` to move to a device.

    Generating probes with numpy from one seed makes every backend see the same probes, so the
    same seed gives the same estimate on numpy, torch, TensorFlow, JAX and CuPy.

    Parameters
    ----------
    rng : numpy Generator, int seed or None
    shape : int or tuple
    kind : {"rademacher", "gaussian", "sphere"}
        Rademacher (±1), standard normal, or normal columns rescaled to norm ``sqrt(n)``.
    """
    rng = np.random.default_rng(rng)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if kind == "rademacher":
        out = rng.integers(0, 2, size=shape, dtype=np.int8).astype(dtype) * 2 - 1
    elif kind == "gaussian":
        out = rng.standard_normal(shape)
    elif kind == "sphere":
        out = rng.standard_normal(shape)
        out *= np.sqrt(shape[0]) / np.linalg.norm(out, axis=0)
    else:
        raise ValueError(f"unknown probe kind {kind!r}; use 'rademacher', 'gaussian' or 'sphere'")
    return np.asarray(out, dtype=dtype)


def itemsize(x: Array) -> int:
    """Bytes per element of ``x`` (any framework).

    >>> import numpy as np
    >>> itemsize(np.zeros(3, dtype=np.float32))
    4
    """
    size = getattr(getattr(x, "dtype", None), "itemsize", None)
    return int(size) if isinstance(size, (int, np.integer)) else int(to_numpy(x[:1]).itemsize)


def _immutable(x: Array) -> bool:
    """Arrays that cannot be written in place (JAX, TensorFlow): a basis of them is a list."""
    return _is_tensorflow(x) or type(x).__module__.split(".")[0] in ("jax", "jaxlib")


class Basis:
    """Orthonormal Krylov vectors in storage preallocated once: ``capacity`` rows of length ``n``.

    The Krylov algorithms (:func:`curvop.eigenvalues`, :func:`curvop.spectral_density`) keep their
    bases here, so a basis never grows by copying and its memory is known before the first product
    (``nbytes``). Vectors go in and come out in the operator's framework, dtype and device; the
    storage may differ from them:

    * ``location="device"`` (default): an array of the operator's framework on its device;
      ``location="host"``: a numpy array in host memory while products run on the device (each
      projection moves one vector to the host and one correction back).
    * ``dtype``: the storage dtype (e.g. ``"float32"`` for a float64 operator, half the memory);
      projections are computed in it and the corrections applied in the vectors' own dtype.
    * ``runs=p``: ``p`` independent bases in lockstep (vectors are ``(n, p)`` blocks, column ``i``
      projected against basis ``i`` only, as :func:`project_out_each`); storage ``(p, capacity, n)``.

    Immutable arrays (JAX, TensorFlow) on the device cannot be written in place: their basis is a
    list of rows, stacked when used (``location="host"`` gives them preallocated storage).

    >>> import numpy as np
    >>> B = Basis(np.zeros(3), capacity=2)
    >>> B.append(np.array([1.0, 0.0, 0.0])); B.append(np.array([0.0, 1.0, 0.0]))
    >>> B.project_out(np.ones(3)), B.nbytes
    (array([0., 0., 1.]), 48)
    """

    def __init__(self, like: Array, capacity: int, *, location: str = "device", dtype: Any = None,
                 runs: int | None = None) -> None:
        if location not in ("device", "host"):
            raise ValueError(f"the basis location must be 'device' or 'host', got {location!r}")
        self.capacity, self.runs, self.size = int(capacity), runs, 0
        self.host = location == "host" or is_numpy(like)
        n = like.shape[0]
        shape = (self.capacity, n) if runs is None else (int(runs), self.capacity, n)
        part = getattr(namespace(like), "local", lambda a: a)(like)  # a sharded array: this rank's part
        self._like = part[:1] * 0 if runs is None else part[:1, :1] * 0  # framework, dtype, device
        if self.host:
            self._xp = namespace(np.zeros(0))
            self.dtype = np.dtype(dtype) if dtype is not None else to_numpy(self._like).dtype
        else:
            self._xp = namespace(like)
            try:
                self.dtype = like.dtype if dtype is None else getattr(self._xp, str(np.dtype(dtype)))
            except (AttributeError, TypeError) as err:
                raise ValueError(f"basis dtype {dtype!r} is not a dtype of {type(like).__name__}") from err
        self.nbytes = int(np.prod(shape)) * (np.dtype(self.dtype).itemsize if self.host else itemsize(
            self._xp.zeros(1, dtype=self.dtype, device=_device(like))))
        self._rows: list | None = None
        self._stacked = None
        if not self.host and _immutable(like):
            self._rows = []  # rows (runs=None) or (p, n) blocks, stacked on use
        else:
            xp = self._xp
            self._S = xp.empty(shape, dtype=self.dtype, **({} if self.host else {"device": _device(like)}))

    # --- conversions between the vectors' world and the storage --------------------------------
    def _store(self, x: Array) -> Array:
        if self.host:
            return np.asarray(to_numpy(x), dtype=self.dtype)
        return x if x.dtype == self.dtype else self._xp.astype(x, self.dtype)

    def _load(self, s: Array) -> Array:
        if self.host:
            return asarray_like(s, self._like)
        return s if s.dtype == self._like.dtype else self._xp.astype(s, self._like.dtype)

    def _matrix(self) -> Array:
        """The ``size`` stored rows: ``(m, n)``, or ``(p, m, n)`` with ``runs``; a view, no copy."""
        if self._rows is not None:
            if self._stacked is None:  # stacked once per new vector, used by both projections
                self._stacked = self._xp.stack(self._rows, axis=0 if self.runs is None else 1)
            return self._stacked
        return self._S[: self.size, :] if self.runs is None else self._S[:, : self.size, :]

    # --- the operations the algorithms use -----------------------------------------------------
    def append(self, v: Array) -> None:
        """Store ``v`` (a vector, or an ``(n, p)`` block with ``runs``) as the next basis row."""
        if self.size >= self.capacity:
            raise ValueError(f"the basis is full ({self.capacity} vectors)")
        s = self._store(v)
        s = s if self.runs is None else _t(self._xp, s)
        if self._rows is not None:
            self._rows.append(s)
            self._stacked = None
        elif self.runs is None:
            self._S[self.size, :] = s
        else:
            self._S[:, self.size, :] = s
        self.size += 1

    def project_out(self, w: Array) -> Array:
        """``w`` minus its components along the stored rows (per run with ``runs``)."""
        if self.size == 0:
            return w
        xp, Q, s = self._xp, self._matrix(), self._store(w)
        if self.runs is None:
            corr = xp.matmul(xp.matmul(s, _t(xp, Q)), Q)
        else:
            st = _t(xp, s)[:, None, :]  # (p, 1, n)
            corr = _t(xp, xp.matmul(xp.matmul(st, _t(xp, Q)), Q)[:, 0, :])
        corr = self._load(corr)
        if _immutable(corr) or getattr(corr, "shape", None) != getattr(w, "shape", None):
            return w - corr
        corr *= -1  # w - corr formed in the temporary: with w, two vectors at peak instead of three
        corr += w
        return corr

    def lincomb(self, coeffs: np.ndarray) -> Array:
        """``Qᵀ @ coeffs`` for host coefficients ``(m,)`` or ``(m, k)``: native, ``(n,)`` or ``(n, k)``."""
        Q = self._matrix()
        return self._load(self._xp.matmul(_t(self._xp, Q), _coeffs(coeffs, Q)))

    def restart(self, coeffs: np.ndarray, chunk: int | None = None) -> None:
        """Replace the rows by the ``l`` combinations ``coeffs`` ``(m, l)`` of them, in place.

        Computed in column chunks of the storage (``chunk`` elements, default ``n // m``), so the
        only temporary is about one vector: no second basis-sized array.
        """
        Q, l = self._matrix(), int(np.shape(coeffs)[1])
        Ct = _coeffs(np.ascontiguousarray(np.asarray(coeffs).T), Q)  # (l, m)
        local = getattr(self._xp, "local", lambda a: a)  # sharded storage: restart this rank's part
        Q, Ct, S = local(Q), local(Ct), local(self._S) if self._rows is None else None
        if self._rows is not None:
            new = self._xp.matmul(Ct, Q)
            self._rows, self._stacked = [new[i, ...] for i in range(l)], None
        else:
            n = Q.shape[1]
            step = max(1, n // max(1, self.size)) if chunk is None else int(chunk)
            for a in range(0, n, step):
                S[:l, a : a + step] = self._xp.matmul(Ct, Q[:, a : a + step])
        self.size = l

    def newest(self) -> Array | None:
        """The newest stored vector as a view of the storage (no copy), or None where it cannot be.

        None with ``runs``, or where the storage differs from the vectors (host storage of device
        vectors, another dtype). The view is overwritten by the next :meth:`restart`.
        """
        if self.runs is not None or self.size == 0 or (self.host and not is_numpy(self._like)):
            return None
        s = self._rows[-1] if self._rows is not None else self._S[self.size - 1, :]
        return s if s.dtype == self._like.dtype else None

    def native(self) -> Array:
        """The stored vectors as the columns of a native ``(n, m)`` array (a copy)."""
        return self.lincomb(np.eye(self.size))


def _coeffs(c: np.ndarray, like: Array) -> Array:
    return asarray_like(np.asarray(c, dtype=np.float64), like)


def _t(xp, x: Array) -> Array:
    return xp.matrix_transpose(x) if hasattr(xp, "matrix_transpose") else x.T
