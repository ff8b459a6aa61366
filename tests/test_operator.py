"""``HessianOperator`` itself: ``to_dense`` checks its arguments (issue 12 item 11)."""

from __future__ import annotations

import numpy as np
import pytest

import curvop
from _matrices import with_spectrum


pytest.importorskip("torch")


# --- item 11: to_dense(chunk=...) is validated ----------------------------------------------------
def test_issue12_item11_to_dense_rejects_bad_chunk():
    A = with_spectrum(tuple(np.linspace(1.0, 2.0, 7)), seed=0)
    H = curvop.aslinearoperator(A)
    for chunk in (-1, 0, 2.5, True, "4"):
        with pytest.raises(ValueError, match="chunk.*positive integer"):
            H.to_dense(chunk=chunk)
    assert H.num_matvecs == 0
    np.testing.assert_allclose(H.to_dense(chunk=3), A, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(H.to_dense(chunk=np.int64(100)), A, rtol=1e-14, atol=1e-15)
