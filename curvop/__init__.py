"""curvop: the curvature of a model's loss as a linear operator, on every framework.

``import curvop`` imports numpy and scipy only; a framework is imported when its backend is used.

The functions ``curvop.trace`` and ``curvop.diagonal`` live in the modules
``curvop.trace_estimation`` and ``curvop.diagonal_estimation`` (named so that they do not collide
with the functions); the sketching both use is ``curvop.sketch``.
"""

from curvop import arrays, backends, sketch
from curvop._errors import ModeError, NoSecondDerivativeError, PrecisionWarning
from curvop.backends.base import NondeterministicProductError
from curvop.backends.selfcheck import AsymmetricHessianError, Verification, VerificationError
from curvop.factory import hessian, hessian_of
from curvop.operator import MAX_DENSE_SIZE, HessianOperator, aslinearoperator
from curvop.rectangular import JacobianOperator
from curvop.family import fisher, ggn, jacobian
from curvop.eigen import ConvergenceWarning, EigenResult, eigenvalues
from curvop.trace_estimation import IndefiniteOperatorError, TraceResult, trace
from curvop.diagonal_estimation import DiagonalResult, diagonal
from curvop.density import SpectralDensity, spectral_density
from curvop.inversion import InverseOperator, NegativeCurvatureError, SolveResult, inverse, solve
from curvop.tracking import Measurement, SharpnessTracker

__version__ = "0.1.0"

__all__ = [
    "HessianOperator",
    "AsymmetricHessianError",
    "NondeterministicProductError",
    "Verification",
    "VerificationError",
    "MAX_DENSE_SIZE",
    "aslinearoperator",
    "arrays",
    "backends",
    "sketch",
    "hessian",
    "hessian_of",
    "ggn",
    "fisher",
    "jacobian",
    "JacobianOperator",
    "ConvergenceWarning",
    "ModeError",
    "NoSecondDerivativeError",
    "PrecisionWarning",
    "IndefiniteOperatorError",
    "EigenResult",
    "eigenvalues",
    "TraceResult",
    "trace",
    "DiagonalResult",
    "diagonal",
    "SpectralDensity",
    "InverseOperator",
    "NegativeCurvatureError",
    "SolveResult",
    "inverse",
    "solve",
    "spectral_density",
    "Measurement",
    "SharpnessTracker",
]
