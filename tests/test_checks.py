"""The algorithms' shared finiteness check (``curvop._checks``): one curvop error on NaN products (issue 12 item 7)."""

from __future__ import annotations

import warnings
import numpy as np
import pytest

import curvop
from curvop.backends.faults import NonFiniteProductError
from _matrices import KINDS, operator


pytest.importorskip("torch")


# --- item 7: NaN products raise, never converged=True -------------------------------------------
def _nan_matrix(n=20, bad=np.nan):
    A = np.eye(n)
    A[3, 3] = bad
    return A


@pytest.mark.parametrize("kind", KINDS)
def test_issue12_item7_every_algorithm_raises_one_curvop_error_on_nan(kind):
    H = operator(_nan_matrix(), kind)
    calls = [
        lambda: curvop.diagonal(H, num_matvecs=8, seed=0),
        lambda: curvop.diagonal(H, method="xdiag", num_matvecs=8, seed=0),
        lambda: curvop.diagonal(H, num_matvecs=20),
        lambda: curvop.eigenvalues(H, k=2, seed=0),
        lambda: curvop.eigenvalues(H, k=2, which="LM", method="power", seed=0),
        lambda: curvop.spectral_density(H, num_steps=5, num_probes=2, seed=0),
    ]
    for call in calls:
        with pytest.raises(NonFiniteProductError, match="NaN or Inf"):
            call()
    H = operator(_nan_matrix(bad=np.inf), kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for call in calls[:2] + calls[3:]:  # calls[2] multiplies inf by the zeros of unit vectors
            with pytest.raises(NonFiniteProductError):
                call()
