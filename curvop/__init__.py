"""curvop: the curvature of a model's loss as a linear operator, on every framework.

``import curvop`` imports numpy and scipy only; a framework is imported when its backend is used.
"""

from curvop import arrays, backends
from curvop.factory import hessian, hessian_of
from curvop.operator import MAX_DENSE_SIZE, HessianOperator, aslinearoperator
from curvop.eigen import ConvergenceWarning, EigenResult, eigenvalues
from curvop.trace import IndefiniteOperatorError, TraceResult, trace
from curvop.diagonal import DiagonalResult, diagonal
from curvop.density import SpectralDensity, spectral_density
from curvop.tracking import Measurement, SharpnessTracker

__version__ = "0.1.0"

__all__ = [
    "HessianOperator",
    "MAX_DENSE_SIZE",
    "aslinearoperator",
    "arrays",
    "backends",
    "hessian",
    "hessian_of",
    "ConvergenceWarning",
    "IndefiniteOperatorError",
    "EigenResult",
    "eigenvalues",
    "TraceResult",
    "trace",
    "DiagonalResult",
    "diagonal",
    "SpectralDensity",
    "spectral_density",
    "Measurement",
    "SharpnessTracker",
]
