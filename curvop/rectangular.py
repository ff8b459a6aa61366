"""``JacobianOperator``: the rectangular Jacobian ``θ ↦ f`` over the data, a scipy ``LinearOperator``.

Rows are the model outputs of every batch, flattened and concatenated in the order the data yields
them; columns are the parameters, flattened as for the Hessian. Like :class:`~curvop.HessianOperator`
it multiplies numpy arrays (scipy's ``svds``, ``lsqr``) and, without a host round trip, arrays of
its own framework: ``J @ v`` and ``J.T @ u`` (``J.rmatvec(u)``) both.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.sparse.linalg import LinearOperator

from curvop.operator import _as_numpy_or_raise, _t

__all__ = ["JacobianOperator"]


class JacobianOperator(LinearOperator):
    """The Jacobian of the model outputs over the data with respect to the parameters, ``(m, n)``.

    Build one with :func:`curvop.jacobian`. ``J @ v`` (``matvec``, ``matmat``) is ``(m,)`` or
    ``(m, k)``; ``J.T @ u`` (``rmatvec``, ``rmatmat``) is ``(n,)`` or ``(n, k)``. The singular values
    of ``J`` are the square roots of the eigenvalues of the neural tangent kernel ``J Jᵀ`` (and of
    ``JᵀJ``, the GGN of ``‖f‖²/2``): ``scipy.sparse.linalg.svds(J, k)``.

    Examples
    --------
    >>> import numpy as np, torch, curvop
    >>> model = torch.nn.Linear(3, 2).double()
    >>> J = curvop.jacobian(model, torch.randn(5, 3, dtype=torch.float64))
    >>> J.shape, (J.T @ torch.ones(10, dtype=torch.float64)).shape
    ((10, 8), torch.Size([8]))
    """

    def __init__(self, backend: Any):
        self.backend = backend
        self.num_matvecs = 0
        rows = sum(m for m, _ in backend.rows())
        super().__init__(dtype=np.dtype(backend.dtype), shape=(rows, backend.size))

    # --- scipy's contract: numpy in, numpy out ---------------------------------------------------
    def _numpy(self, x: np.ndarray, transpose: bool) -> np.ndarray:
        xn = self.backend.from_numpy(np.ascontiguousarray(x, dtype=self.dtype))
        return self.backend.to_numpy(self._apply_native(xn, transpose))

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._numpy(x, False)

    _matmat = _matvec

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._numpy(x, True)

    _rmatmat = _rmatvec

    def _adjoint(self) -> LinearOperator:
        return _Transposed(self)

    _transpose = _adjoint

    # --- native arrays, as HessianOperator's entry points ----------------------------------------
    def matvec(self, x: Any) -> Any:
        """``J @ x`` for ``x`` of shape ``(n,)`` (or ``(n, 1)``)."""
        return self._entry(x, False)

    def matmat(self, X: Any) -> Any:
        """``J @ X`` for ``X`` of shape ``(n, k)``."""
        return self._entry(X, False)

    def rmatvec(self, x: Any) -> Any:
        """``Jᵀ @ x`` for ``x`` of shape ``(m,)``."""
        return self._entry(x, True)

    def rmatmat(self, X: Any) -> Any:
        """``Jᵀ @ X`` for ``X`` of shape ``(m, k)``."""
        return self._entry(X, True)

    def dot(self, x: Any) -> Any:
        if isinstance(x, LinearOperator) or np.isscalar(x):
            return super().dot(x)
        return self._entry(x, False)

    def _entry(self, x: Any, transpose: bool) -> Any:
        if not isinstance(x, np.ndarray):
            if self.backend.is_native(x):
                self.backend.check(x)
                return self._apply_native(x, transpose)
            x = _as_numpy_or_raise(x, self.backend)
        if x.dtype.kind not in "fiub":
            raise TypeError(f"JacobianOperator is real ({self.dtype}); got a {x.dtype} array")
        self._check_shape(tuple(x.shape), transpose)
        return self._numpy(x, transpose)

    def _check_shape(self, shape: tuple[int, ...], transpose: bool) -> None:
        m, n = self.shape
        want, what = (m, "outputs (rows)") if transpose else (n, "parameters")
        if len(shape) not in (1, 2) or shape[0] != want:
            op = "J.T @ u" if transpose else "J @ v"
            raise ValueError(f"{op} expects a vector of length {want} or a ({want}, k) matrix (one entry per "
                             f"{what}), got shape {shape}")

    def _apply_native(self, x: Any, transpose: bool) -> Any:
        shape = tuple(x.shape)
        self._check_shape(shape, transpose)
        k = 1 if len(shape) == 1 else shape[1]
        self.num_matvecs += k
        fn = self.backend.vjp if transpose else self.backend.jvp
        if len(shape) == 2 and k == 1:
            return fn(x[:, 0])[:, None]
        return fn(x, len(shape) == 2)

    def __repr__(self) -> str:
        m, n = self.shape
        return f"<{m}x{n} JacobianOperator ({self.backend.describe()}), {self.num_matvecs} products so far>"


class _Transposed(LinearOperator):
    """``J.T``: the same products with the roles swapped (native arrays too)."""

    def __init__(self, J: JacobianOperator):
        self.J = J
        super().__init__(dtype=J.dtype, shape=(J.shape[1], J.shape[0]))

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self.J._rmatvec(x)

    _matmat = _matvec

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self.J._matvec(x)

    _rmatmat = _rmatvec

    def _adjoint(self) -> JacobianOperator:
        return self.J

    _transpose = _adjoint

    def matvec(self, x: Any) -> Any:
        return self.J.rmatvec(x)

    def matmat(self, X: Any) -> Any:
        return self.J.rmatmat(X)

    def rmatvec(self, x: Any) -> Any:
        return self.J.matvec(x)

    def rmatmat(self, X: Any) -> Any:
        return self.J.matmat(X)

    def dot(self, x: Any) -> Any:
        if isinstance(x, LinearOperator) or np.isscalar(x):
            return super().dot(x)
        return self.J._entry(x, True)

    def __rmatmul__(self, x: Any) -> Any:
        if isinstance(x, (np.ndarray, LinearOperator)) or np.isscalar(x) or not self.J.backend.is_native(x):
            return super().__rmatmul__(x)
        return self.J._entry(x, False) if len(x.shape) == 1 else _t(self.J._entry(_t(x), False))

    def __repr__(self) -> str:
        return f"<{self.shape[0]}x{self.shape[1]} transposed JacobianOperator>"
