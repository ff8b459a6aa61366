"""curvop: the curvature of a model's loss as a linear operator, on every framework.

``import curvop`` imports numpy and scipy only; a framework is imported when its backend is used.
"""

from curvop import arrays, backends
from curvop.factory import hessian, hessian_of
from curvop.operator import MAX_DENSE_SIZE, HessianOperator, aslinearoperator

__version__ = "0.1.0"

__all__ = [
    "HessianOperator",
    "MAX_DENSE_SIZE",
    "aslinearoperator",
    "arrays",
    "backends",
    "hessian",
    "hessian_of",
]
