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


# --- issue 23: HessianOperator.on, the same loss on another batch -----------------------------------
def test_issue23_on_other_data_is_the_hessian_there():
    """``H.on(batch)`` equals a Hessian built on that batch (dense ``torch.func.hessian`` reference),
    over one batch and over a loader of unequal batches, and counts its own products."""
    import torch

    from torch_reference import dense_hessian, tanh_mlp

    model, (x, y) = tanh_mlp(3, 4, 2, 20, seed=1)
    loss_fn = torch.nn.MSELoss()
    H = curvop.hessian(model, loss_fn, (x[:5], y[:5]))
    H.to_dense()
    for data in ((x[5:12], y[5:12]), [(x[:8], y[:8]), (x[8:20], y[8:20])]):
        moved = H.on(data)
        batches = [data] if isinstance(data, tuple) else data
        np.testing.assert_allclose(moved.to_dense(), dense_hessian(model, loss_fn, batches), rtol=1e-10, atol=1e-12)
        assert moved.num_matvecs == H.shape[0]
    with pytest.raises(TypeError, match="follows the live parameters"):
        H.on((x, y), params=list(model.parameters()))
    with pytest.raises(NotImplementedError, match="cannot be moved"):
        curvop.aslinearoperator(np.eye(3)).on(None)
