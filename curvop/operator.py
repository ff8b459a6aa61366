"""``HessianOperator``: a scipy ``LinearOperator`` with a native-array fast path."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.sparse.linalg import LinearOperator

from curvop.arrays import namespace
from curvop.backends.base import Backend

__all__ = ["HessianOperator", "MAX_DENSE_SIZE"]

#: ``to_dense`` refuses operators larger than this (n x n float64 is 800 MB at n = 10,000).
MAX_DENSE_SIZE = 10_000


class HessianOperator(LinearOperator):
    """The Hessian of a loss as a symmetric ``(n, n)`` linear operator.

    * numpy in, numpy out: ``H @ x``, ``H.matvec``, ``H.matmat``, ``H.dot`` accept numpy arrays, so
      ``scipy.sparse.linalg.eigsh``, ``lobpcg``, ``cg`` and ``minres`` use it unchanged. numpy inputs
      of another real dtype are converted to :attr:`dtype` (scipy's solvers sometimes pass float64).
    * native in, native out: a tensor of the backend's framework (a ``torch.Tensor`` on the
      parameters' device, a ``tf.Tensor``, a ``jax.Array``, a ``cupy.ndarray``) is multiplied without
      leaving the device and comes back as the same type, dtype and device. Its dtype and device
      must match the operator's; a mismatch is an error, never a silent copy.
    * ``(n,)`` and ``(n, k)`` inputs both work; ``(n, k)`` uses the backend's batched product.
    * for algorithms: :meth:`native`, :meth:`from_numpy`, :meth:`to_numpy`, :meth:`random` and
      :meth:`rng` are all an algorithm needs besides products (it never touches ``H.backend``).

    Build one with :func:`curvop.hessian` or :func:`curvop.hessian_of`.

    Examples
    --------
    >>> import numpy as np, curvop
    >>> A = np.diag([3.0, 2.0, 1.0])
    >>> H = curvop.aslinearoperator(A)
    >>> H @ np.ones(3)
    array([3., 2., 1.])
    >>> H.num_matvecs
    1
    """

    def __init__(self, backend: Backend):
        self.backend = backend
        self.num_matvecs = 0
        super().__init__(dtype=np.dtype(backend.dtype), shape=(backend.size, backend.size))

    # --- copies ------------------------------------------------------------------------------------
    def __copy__(self) -> "HessianOperator":
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict) -> "HessianOperator":
        """A deep copy shares the backend, which is a view of the model, loss and data (a copy of
        the model would not be the one its functions compute with); the copy counts its own
        products. ``copy.deepcopy`` of anything that holds an operator then works."""
        memo[id(self)] = new = self.__copy__()
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            f"a curvop.HessianOperator ({self.backend.name} backend) cannot be pickled: it computes with "
            "the functions, model and data it was built from, which live in this process. Send what "
            "it was built from (the model's state_dict, the data) and build it again there with "
            "curvop.hessian(...) or aslinearoperator(...)"
        )

    # --- scipy's contract: numpy in, numpy out ---------------------------------------------------
    # The entry points below call these for a numpy input once it is checked, as scipy's do; scipy
    # derives the rest (``@``, ``*``, ``H(x)``, ``x @ H``, sums and products of operators).
    def _matvec(self, x: np.ndarray) -> np.ndarray:
        xn = self.backend.from_numpy(np.ascontiguousarray(x, dtype=self.dtype))
        return self.backend.to_numpy(self._apply_native(xn))

    _matmat = _matvec  # (n, k) blocks: one batched product (_apply_native)
    _rmatvec = _matvec  # symmetric: Hᵀx = Hx
    _rmatmat = _matvec

    def _adjoint(self) -> "HessianOperator":
        return self

    _transpose = _adjoint  # real symmetric: H.T is H.H is H

    # --- the only overridden entry points: for native arrays ----------------------------------
    # scipy's public entry points begin with ``np.asanyarray(x)`` (``dot`` and ``x @ H`` with
    # ``np.asarray``): a CPU tensor would silently come back as numpy (a host round trip) and a GPU
    # tensor would fail with the framework's own error. So each of these multiplies a native array
    # itself (native out, same device), and checks a numpy one with curvop's own messages (clearer
    # than scipy's "dimension mismatch") before calling ``_matvec`` & co. as scipy's would.
    def matvec(self, x: Any) -> Any:
        """``H @ x`` for a vector ``x`` of shape ``(n,)`` or ``(n, 1)``."""
        return self._entry(x, "_matvec")

    def rmatvec(self, x: Any) -> Any:
        """``Hᵀ @ x = H @ x`` (symmetric)."""
        return self._entry(x, "_rmatvec")

    def matmat(self, X: Any) -> Any:
        """``H @ X`` for ``X`` of shape ``(n, k)``: k products in one batched call where possible."""
        return self._entry(_two_d(X, "matmat"), "_matmat")

    def rmatmat(self, X: Any) -> Any:
        """``Hᵀ @ X = H @ X`` (symmetric)."""
        return self._entry(_two_d(X, "rmatmat"), "_rmatmat")

    def dot(self, x: Any) -> Any:
        """``H @ x`` (also ``H * x`` and ``H(x)``); operators and scalars compose as in scipy."""
        if not self.backend.is_native(x) and (isinstance(x, LinearOperator) or np.isscalar(x)):
            return super().dot(x)
        return self._entry(x, "_dot")

    def __matmul__(self, x: Any) -> Any:
        """``H @ x``. A native array goes straight to the product: scipy's ``__matmul__`` first asks
        ``np.isscalar``, which costs microseconds on a framework's array, twice per product."""
        if self.backend.is_native(x):
            return self._entry(x, "_dot")
        return super().__matmul__(x)

    def __rmatmul__(self, x: Any) -> Any:
        """``x @ H = (H @ xᵀ)ᵀ``."""
        if isinstance(x, (np.ndarray, LinearOperator)) or np.isscalar(x) or not self.backend.is_native(x):
            return super().__rmatmul__(x)
        return self._entry(x, "") if len(x.shape) == 1 else _t(self._entry(_t(x), ""))

    def _entry(self, x: Any, how: str) -> Any:
        """A native ``x``: checked (dtype, device) and multiplied here. Anything else: made numpy,
        checked, and given to ``how`` (``"_matvec"`` & co., what scipy's entry point would call
        after checks that these already made)."""
        if not isinstance(x, np.ndarray):
            if self.backend.is_native(x):
                self.backend.check(x)
                return self._apply_native(x)
            x = _as_numpy_or_raise(x, self.backend)
        if x.dtype.kind not in "fiub":
            raise TypeError(
                f"HessianOperator is real ({self.dtype}); got a {x.dtype} array. "
                "Pass real vectors (for complex ones, apply H to the real and imaginary parts)."
            )
        n = self.shape[1]
        if x.ndim not in (1, 2) or x.shape[0] != n:
            raise ValueError(f"expected a vector of length {n} or an ({n}, k) matrix, got shape {x.shape}")
        if how == "_dot":  # scipy's dispatch in LinearOperator.dot
            how = "_matvec" if x.ndim == 1 or x.shape[1] == 1 else "_matmat"
        return getattr(self, how)(x)

    def _apply_native(self, x: Any) -> Any:
        n = self.shape[1]
        shape = tuple(x.shape)
        if len(shape) == 1 and shape[0] == n:
            self.num_matvecs += 1
            return self.backend.hvp(x)
        if len(shape) == 2 and shape[0] == n:
            k = shape[1]
            self.num_matvecs += k
            if k == 1:
                return self.backend.hvp(x[:, 0])[:, None]
            return self.backend.hvp_batch(x)
        raise ValueError(
            f"expected a vector of length {n} or an ({n}, k) matrix, got shape {shape}; "
            f"the operator acts on the {n} flattened parameters"
        )

    def on(self, data: Any, *, params: Any = None) -> "HessianOperator":
        """The same loss's Hessian on other ``data`` (and, for JAX, at other ``params`` values).

        Much cheaper than building a new operator when one is needed per mini-batch (an optimizer,
        a tracker on fresh batches): the build's checks and compiled functions are reused, only a
        cache for the new data is made. torch and TensorFlow follow the live parameters, so
        ``params`` is for JAX (a pytree of the same structure, shapes and dtype). The operator of
        :func:`curvop.hessian_of` of a torch closure or of gradients takes the next closure or
        gradients as ``data`` (an optimizer's next step). The new operator counts its own products.

        >>> import torch, curvop
        >>> model = torch.nn.Linear(2, 1).double()
        >>> H = curvop.hessian(model, torch.nn.MSELoss(), (torch.ones(4, 2).double(), torch.zeros(4, 1).double()))
        >>> H2 = H.on((2 * torch.ones(4, 2).double(), torch.zeros(4, 1).double()))
        >>> float(H2.to_dense()[0, 0] / H.to_dense()[0, 0])
        4.0
        """
        return HessianOperator(self.backend.on(data, params))

    @property
    def is_psd(self) -> bool:
        """Whether the operator is positive semi-definite by construction (the GGN, the Fisher, ``JᵀJ``):
        ``curvop.trace(method="auto")`` then runs XNysTrace. A Hessian is not known to be."""
        return bool(getattr(self.backend, "is_psd", False))

    # --- constructors for codes without autodiff -----------------------------------------------
    @classmethod
    def from_hvp(cls, hvp_fn: Any, x0: Any, *, matmat_fn: Any = None) -> "HessianOperator":
        """The operator of a user-supplied exact product ``hvp_fn(v) = H(x0) v``.

        ``x0`` is a 1-D numpy or CuPy array (or another Array API array, e.g. array-api-strict's):
        it gives n, the dtype and the device, and ``hvp_fn`` receives and must return vectors of the
        same type (a wrong shape or array type is an error at the first product). ``matmat_fn(V)``,
        optional, multiplies an ``(n, k)`` block.

        >>> import numpy as np, curvop
        >>> A = np.array([[2.0, 1.0], [1.0, 3.0]])
        >>> H = curvop.HessianOperator.from_hvp(lambda v: A @ v, np.zeros(2))
        >>> H @ np.array([1.0, 0.0])
        array([2., 1.])
        """
        from curvop.backends.callables import from_hvp

        return cls(from_hvp(hvp_fn, x0, matmat_fn=matmat_fn))

    @classmethod
    def from_grad(cls, grad_fn: Any, x0: Any, *, step: float | None = None,
                  richardson: bool = False) -> "HessianOperator":
        """The Hessian at ``x0`` from a gradient function, by central differences.

        ``H v ~ (g(x0 + t v) - g(x0 - t v)) / (2 t)`` with ``t = step * max(1, ||x0||) / ||v||``,
        so the displacement ``t v`` has length ``step * max(1, ||x0||)``. Each product costs two
        gradients (four with ``richardson=True``, which combines ``t`` and ``t/2`` as
        ``(4 D(t/2) - D(t)) / 3``).

        Error per product, with ``s = step * max(1, ||x0||)``, ``eps`` the dtype's machine epsilon,
        ``G`` the size of the gradient near ``x0`` (plus ``||H|| ||x0||``, from rounding ``x0 + t v``)
        and ``M`` a bound on the third derivative of the gradient (``nabla^4 f``)::

            ||error|| / ||v||  <~  s**2 * M / 6  +  eps * G / s          (central)
            ||error|| / ||v||  <~  C * s**4 * M5  +  3 * eps * G / s     (richardson; M5 ~ nabla^6 f)

        The default ``step`` balances the two terms when ``G`` and ``M`` are of order one:
        ``eps**(1/3)`` (6.1e-6 in float64, 4.9e-3 in float32) for central differences,
        ``eps**(1/5)`` (7.4e-4 in float64) with Richardson; the error is then about ``eps**(2/3)``
        (4e-11) or ``eps**(4/5)`` relative. On a quadratic the truncation term is zero and only
        rounding remains. See ``docs/numpy-cupy.md``.

        >>> import numpy as np, curvop
        >>> H = curvop.HessianOperator.from_grad(lambda x: x ** 3, np.ones(2))  # f = sum(x**4) / 4
        >>> np.allclose(H @ np.array([1.0, 0.0]), [3.0, 0.0])
        True
        """
        from curvop.backends.callables import from_grad

        return cls(from_grad(grad_fn, x0, step=step, richardson=richardson))

    def to_cupy_linear_operator(self) -> Any:
        """This operator as a ``cupyx.scipy.sparse.linalg.LinearOperator`` (for ``cupyx`` ``eigsh``).

        cupyx's solvers accept only their own ``LinearOperator`` class; products stay on the GPU
        when the operator's backend computes with CuPy arrays.
        """
        from cupyx.scipy.sparse.linalg import LinearOperator as CupyLinearOperator

        return CupyLinearOperator(self.shape, matvec=self.matvec, matmat=self.matmat,
                                  rmatvec=self.matvec, dtype=self.dtype)

    # --- the array adapter: what an algorithm needs besides products --------------------------
    # Algorithms (curvop's and yours, docs/own-algorithm.md) use these five and never the backend.
    def native(self, a: Any) -> Any:
        """``a`` as a native array of the operator: a native array is checked (dtype, device) and
        returned as is; anything else (numpy, a list) is converted with :meth:`from_numpy`.

        >>> import numpy as np, curvop
        >>> H = curvop.aslinearoperator(np.eye(2))
        >>> H.native([1, 2])
        array([1., 2.])
        """
        if not isinstance(a, np.ndarray) and self.backend.is_native(a):
            self.backend.check(a)
            return a
        try:
            h = np.asarray(a)
        except Exception as err:  # e.g. a GPU array of another framework
            raise TypeError(_native_help(a, self.backend)) from err
        if h.dtype.kind not in "fiub":
            raise TypeError(_native_help(a, self.backend, f" of dtype {h.dtype}"))
        return self.from_numpy(h)

    def from_numpy(self, a: np.ndarray) -> Any:
        """A numpy array as a native array of the operator's dtype and device."""
        return self.backend.from_numpy(np.ascontiguousarray(a, dtype=self.dtype))

    def to_numpy(self, x: Any) -> np.ndarray:
        """A native array (or numpy array) as numpy."""
        return x if isinstance(x, np.ndarray) else self.backend.to_numpy(x)

    def rng(self, seed: Any = None) -> np.random.Generator:
        """The numpy generator an algorithm draws its randomness from, given the user's ``seed``.

        On a data-parallel operator every rank gets the same generator state, whatever the seed
        (:meth:`Backend.agree_seed`: rank 0's draw for ``None`` or a Generator).
        """
        try:
            return np.random.default_rng(self.backend.agree_seed(seed))
        except (TypeError, ValueError) as err:  # numpy's words for a bad seed ("SeedSequence expects ...")
            kind = TypeError if isinstance(err, TypeError) else ValueError
            raise kind(f"seed must be None, a non-negative int (or a sequence of them), a numpy SeedSequence "
                       f"or Generator; got {seed!r} ({err})") from None

    def random(self, shape: int | tuple[int, ...], kind: str = "rademacher", seed: Any = None) -> Any:
        """Native random probes (``"rademacher"``, ``"gaussian"`` or ``"sphere"``) from a seed.

        On a data-parallel operator every rank gets the same probes, whatever the seed
        (:meth:`Backend.agree_seed`: rank 0's draw for ``None`` or a Generator).
        """
        return self.backend.random(shape, kind, self.rng(seed))

    def verify(self, v: Any = None, *, step: float | None = None, seed: int = 0) -> Any:
        """``H v`` against central differences of the gradient, per parameter block: a
        :class:`curvop.Verification` (one product and four gradients over the data).

        ``v``: a native or numpy vector (default: Gaussian from ``seed``); ``step``: the difference
        step (default ``eps**(1/3)`` over the vector's root mean square). Backends built on the
        template (torch, JAX, TensorFlow) support it.

        Examples
        --------
        >>> import torch, curvop
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> batch = (torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 1] * 4))
        >>> curvop.hessian(model, torch.nn.CrossEntropyLoss(), batch).verify().ok
        True
        """
        check = getattr(self.backend, "verify", None)
        if check is None:
            raise TypeError(f"the {self.backend.name} backend has no gradients to compare with; verify needs a "
                            "backend built on the template (torch, JAX, TensorFlow)")
        if v is not None and isinstance(v, np.ndarray):
            v = self.from_numpy(v)
        return check(v, step=step, seed=seed)

    def to_dense(self, *, max_size: int = MAX_DENSE_SIZE, chunk: int = 64) -> np.ndarray:
        """The explicit ``(n, n)`` matrix as numpy (n products, in blocks of ``chunk`` columns).

        Refuses ``n > max_size`` (default :data:`MAX_DENSE_SIZE`): the matrix would need
        ``8 n**2`` bytes and ``n`` products. Raise ``max_size`` if you really want it. ``chunk``
        must be a positive integer.
        """
        n = self.shape[0]
        if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
            raise ValueError(
                f"to_dense(chunk={chunk!r}): chunk is the number of columns computed per block "
                "product and must be a positive integer (e.g. the default 64)"
            )
        if n > max_size:
            raise ValueError(
                f"to_dense() refuses n={n} > max_size={max_size}: the matrix would take "
                f"{8 * n * n / 1e9:.1f} GB and {n} Hessian-vector products; use the matrix-free "
                "algorithms (curvop.eigenvalues, curvop.trace) or pass a larger max_size"
            )
        out = np.empty((n, n), dtype=self.dtype)
        for j in range(0, n, chunk):
            k = min(chunk, n - j)
            e = np.zeros((n, k), dtype=self.dtype)
            e[np.arange(j, j + k), np.arange(k)] = 1
            out[:, j : j + k] = self.backend.to_numpy(self._apply_native(self.from_numpy(e)))
        return out

    def __repr__(self) -> str:
        n = self.shape[0]
        return f"<{n}x{n} HessianOperator ({self.backend.describe()}), {self.num_matvecs} products so far>"


def _t(x: Any) -> Any:
    """The transpose of a native 2-D array (TensorFlow tensors have no ``.T``)."""
    xp = namespace(x)
    return xp.matrix_transpose(x) if hasattr(xp, "matrix_transpose") else x.T


def _native_help(a: Any, backend: Backend, what: str = "") -> str:
    return (
        f"H.native: cannot make a {type(a).__module__}.{type(a).__name__}{what} an array of this "
        f"{backend.name} operator; pass real numbers as numpy (or a list), or an array of the "
        "operator's own framework"
    )


def _two_d(X: Any, entry: str) -> Any:
    if getattr(X, "ndim", len(getattr(X, "shape", ()))) != 2:
        raise ValueError(f"{entry} expects a 2-D (n, k) array, got shape {tuple(np.shape(X))}")
    return X


def _as_numpy_or_raise(x: Any, backend: Backend) -> np.ndarray:
    """Lists and scalars become numpy; arrays of another framework are refused (no hidden copy)."""
    if isinstance(x, (list, tuple, float, int, np.generic)):
        return np.asarray(x)
    raise TypeError(
        f"this operator computes with the {backend.name} backend and got a {type(x).__module__}."
        f"{type(x).__name__}; pass a numpy array or an array of the operator's own framework "
        "(convert with curvop.arrays.to_numpy / H.from_numpy)"
    )


def aslinearoperator(A: Any, *, shape: tuple[int, int] | None = None, like: Any = None) -> HessianOperator:
    """Wrap anything square and symmetric as a :class:`HessianOperator` the algorithms accept.

    Parameters
    ----------
    A : HessianOperator, scipy LinearOperator or sparse matrix, dense matrix, or callable
        A dense matrix may be numpy or any supported framework's (torch, JAX, TensorFlow, CuPy):
        products then stay in that framework. A callable ``A(v)`` needs ``shape``.
    shape : (n, n), only for a callable
    like : array, optional, only for a callable
        An array of the framework/dtype/device the callable computes with (default: float64 numpy).

    Examples
    --------
    >>> import numpy as np, curvop
    >>> H = curvop.aslinearoperator(lambda v: 2.0 * v, shape=(3, 3))
    >>> H @ np.ones(3)
    array([2., 2., 2.])
    """
    from scipy.sparse import issparse
    from scipy.sparse.linalg import aslinearoperator as scipy_aslinop

    from curvop.backends.array import ArrayBackend, dense

    if isinstance(A, HessianOperator):
        return A
    if issparse(A):
        A = scipy_aslinop(A)
    if isinstance(A, LinearOperator):
        n, m = A.shape
        if n != m:
            raise ValueError(f"a Hessian operator must be square; got shape {A.shape}")
        dt = np.dtype(A.dtype) if A.dtype is not None else np.dtype(np.float64)
        return HessianOperator(ArrayBackend(A.matvec, n, np.zeros(0, dt), matmat=A.matmat, name="numpy"))
    if callable(A) and not hasattr(A, "shape"):
        if shape is None or len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError("a callable needs shape=(n, n) (a square shape) to become an operator")
        like = np.zeros(0) if like is None else like
        return HessianOperator(ArrayBackend(A, shape[0], like))
    if hasattr(A, "shape") and hasattr(A, "dtype"):
        return HessianOperator(dense(A))
    raise TypeError(
        f"cannot make an operator from a {type(A).__name__}; pass a HessianOperator, a scipy "
        "LinearOperator, a square matrix, or a callable with shape=(n, n)"
    )
